package placement

import (
	"encoding/json"
	"errors"
	"math"
	"slices"
	"strings"
	"testing"
)

var v2shape = Shape{Layers: 3, Experts: 160, Groups: 8, TopKGroup: 3, MoELayers: []int{1, 2}}

func TestEvenGroupAligned(t *testing.T) {
	tb, err := Even(v2shape, []string{"a", "b", "c"}, 1)
	if err != nil {
		t.Fatal(err)
	}
	// 8 groups of 20 over 3 nodes: cuts fall on group boundaries.
	for _, l := range v2shape.MoELayers {
		for g := range 8 {
			first := tb.ReplicaIDs(l, g*20)[0]
			for e := g * 20; e < (g+1)*20; e++ {
				if tb.ReplicaIDs(l, e)[0] != first {
					t.Fatalf("layer %d group %d split across nodes", l, g)
				}
			}
		}
	}
	if got := tb.Spec("a"); got != "1:0-59,2:0-59" {
		t.Fatalf("spec a = %q", got)
	}
	// Round trip through the spec syntax.
	tb2, err := ParseSpec(v2shape, "a="+tb.Spec("a")+";b="+tb.Spec("b")+";c="+tb.Spec("c"))
	if err != nil {
		t.Fatal(err)
	}
	if !tb.Equal(tb2) {
		t.Fatal("round trip through specs differs")
	}
}

func TestParseSpec(t *testing.T) {
	tb, err := ParseSpec(v2shape, "x=0-159;y=0-9")
	if err != nil {
		t.Fatal(err)
	}
	if r := tb.ReplicaIDs(2, 5); !slices.Equal(r, []string{"x", "y"}) {
		t.Fatalf("replicas %v", r)
	}
	if r := tb.ReplicaIDs(2, 50); !slices.Equal(r, []string{"x"}) {
		t.Fatalf("replicas %v", r)
	}
	for _, bad := range []string{"x=0-100", "x=0-160", "x", "=0-159", "x=1:0-159;x=3:0-159", "x=a-b", "x=0:0-159", "x=2-1"} {
		if _, err := ParseSpec(v2shape, bad); !errors.Is(err, ErrPlacement) {
			t.Errorf("%q: err = %v", bad, err)
		}
	}
	if len(tb.Nodes()) != 2 {
		t.Fatalf("nodes %v", tb.Nodes())
	}
}

func TestParseSet(t *testing.T) {
	for _, c := range []struct {
		spec string
		want string // canonical rendering, or "ERR"
		n    int
	}{
		{"", "", 0},
		{"none", "", 0},
		{"all", "1:0-159,2:0-159", 320},
		{"0-9", "1:0-9,2:0-9", 20},
		{"1:all", "1:0-159", 160},
		{"1-2:5", "1:5,2:5", 2},
		{"1:0-3, 2:4-7 ,1:2-5", "1:0-5,2:4-7", 10},
		{"0:0-3", "ERR", 0},   // dense layer
		{"3:0-3", "ERR", 0},   // past the layers
		{"1:0-160", "ERR", 0}, // past the experts
		{"1:", "ERR", 0},
		{"1:5-4", "ERR", 0},
		{",", "ERR", 0},
		{"-1", "ERR", 0},
		{"99999999999999999999", "ERR", 0},
	} {
		s, err := ParseSet(v2shape, c.spec)
		if c.want == "ERR" {
			if !errors.Is(err, ErrPlacement) {
				t.Errorf("%q: err = %v, want ErrPlacement", c.spec, err)
			}
			continue
		}
		if err != nil {
			t.Errorf("%q: %v", c.spec, err)
			continue
		}
		if s.String() != c.want || s.Len() != c.n {
			t.Errorf("%q: %q (%d), want %q (%d)", c.spec, s.String(), s.Len(), c.want, c.n)
		}
		back, err := ParseSet(v2shape, s.String())
		if err != nil || back.String() != s.String() {
			t.Errorf("%q does not round-trip: %q %v", c.spec, back.String(), err)
		}
		if err := CheckSyntax(c.spec); err != nil {
			t.Errorf("CheckSyntax(%q) = %v", c.spec, err)
		}
	}
}

func TestSetAlgebra(t *testing.T) {
	a, _ := ParseSet(v2shape, "1:0-9")
	b, _ := ParseSet(v2shape, "1:5-14,2:0")
	if got := a.Minus(b).String(); got != "1:0-4" {
		t.Fatalf("a-b = %q", got)
	}
	if got := a.Clone().Union(b).String(); got != "1:0-14,2:0" {
		t.Fatalf("a|b = %q", got)
	}
	if a.String() != "1:0-9" {
		t.Fatal("Minus or Clone changed a")
	}
}

func TestTableJSON(t *testing.T) {
	tb, err := ParseSpec(v2shape, "x=1:0-99,2:0-159;y=1:100-159;z=1:150-159")
	if err != nil {
		t.Fatal(err)
	}
	tb.Version = 7
	data, err := json.Marshal(tb)
	if err != nil {
		t.Fatal(err)
	}
	back, err := DecodeTable(v2shape, data)
	if err != nil {
		t.Fatal(err)
	}
	if back.Version != 7 || !back.Equal(tb) || !slices.Equal(back.Nodes(), tb.Nodes()) {
		t.Fatalf("round trip: %s", data)
	}
	// A stored table for another model is refused.
	other := Shape{Layers: 3, Experts: 64, Groups: 1, MoELayers: []int{1, 2}}
	if _, err := DecodeTable(other, data); !errors.Is(err, ErrPlacement) {
		t.Fatalf("decoding for another shape: %v", err)
	}
	if _, err := DecodeTable(v2shape, []byte(`{"version":1,"nodes":[{"id":"x","experts":"1:0-9"}]}`)); !errors.Is(err, ErrPlacement) {
		t.Fatalf("incomplete table decoded: %v", err)
	}
}

// FuzzParseSet: any spec either parses into a set that renders back to
// itself, or fails with ErrPlacement; it never panics.
func FuzzParseSet(f *testing.F) {
	for _, s := range []string{"", "all", "0-9", "1:all,2:0-9", "1-2:5", " 1:0-3 , 2:4-7", "9999999999:0", "1:-", ",,", "1:2:3"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, spec string) {
		s, err := ParseSet(v2shape, spec)
		if err != nil {
			if !errors.Is(err, ErrPlacement) {
				t.Fatalf("%q: error %v does not wrap ErrPlacement", spec, err)
			}
			return
		}
		back, err := ParseSet(v2shape, s.String())
		if err != nil || back.String() != s.String() {
			t.Fatalf("%q: %q does not round-trip: %v", spec, s.String(), err)
		}
		if CheckSyntax(spec) != nil {
			t.Fatalf("%q parses but CheckSyntax refuses it", spec)
		}
	})
}

func TestTableShares(t *testing.T) {
	tb, err := ParseSpec(v2shape, "x=1:0-99,2:0-159;y=1:100-159,1:5;z=1:5,1:150-159")
	if err != nil {
		t.Fatal(err)
	}
	if got := tb.Share(1, 5, 0); got != 1.0/3 {
		t.Fatalf("equal share %v", got)
	}
	if err := tb.SetShares(1, 5, []float64{2, 1, 1}); err != nil {
		t.Fatal(err)
	}
	if err := tb.SetShares(1, 150, []float64{3, 1}); err != nil {
		t.Fatal(err)
	}
	if got := []float64{tb.Share(1, 5, 0), tb.Share(1, 5, 1), tb.Share(1, 5, 2)}; !slices.Equal(got, []float64{0.5, 0.25, 0.25}) {
		t.Fatalf("shares %v", got)
	}
	if !tb.Unequal(1, 5) || tb.Unequal(1, 6) {
		t.Fatal("Unequal")
	}
	data, err := json.Marshal(tb)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(data), `"shares":"1:5=500"`) {
		t.Fatalf("stored form: %s", data)
	}
	back, err := DecodeTable(v2shape, data)
	if err != nil {
		t.Fatal(err)
	}
	if !back.Equal(tb) || back.Share(1, 150, 1) != 0.25 {
		t.Fatalf("round trip: %s", data)
	}
	plain, _ := ParseSpec(v2shape, "x=1:0-99,2:0-159;y=1:100-159,1:5;z=1:5,1:150-159")
	if plain.Equal(tb) || tb.Equal(plain) {
		t.Fatal("tables differing in shares compare equal")
	}
	// Equal parts are no shares; a new replica resets them.
	if err := tb.SetShares(1, 150, []float64{1, 1}); err != nil || tb.Unequal(1, 150) {
		t.Fatalf("equal parts kept as shares: %v", err)
	}
	if err := tb.Add(1, 5, "w"); err != nil || tb.Unequal(1, 5) || tb.Share(1, 5, 3) != 0.25 {
		t.Fatalf("a new replica keeps old shares: %v", err)
	}
	for _, bad := range [][]float64{{1}, {-1, 2}, {0, 0}, {math.NaN(), 1}} {
		if err := plain.SetShares(1, 150, bad); !errors.Is(err, ErrPlacement) {
			t.Errorf("SetShares(%v): %v", bad, err)
		}
	}
	// Stored shares that do not fit are refused.
	for _, bad := range []string{
		`{"version":1,"nodes":[{"id":"x","experts":"all"},{"id":"y","experts":"1:5","shares":"1:5=300"}]}`,  // one replica's only
		`{"version":1,"nodes":[{"id":"x","experts":"all"},{"id":"y","experts":"1:5","shares":"1:6=300"}]}`,  // not held by y
		`{"version":1,"nodes":[{"id":"x","experts":"all","shares":"1:5=x"},{"id":"y","experts":"1:5"}]}`,    // syntax
		`{"version":1,"nodes":[{"id":"x","experts":"all","shares":"1:5=1001"},{"id":"y","experts":"1:5"}]}`, // range
	} {
		if _, err := DecodeTable(v2shape, []byte(bad)); !errors.Is(err, ErrPlacement) {
			t.Errorf("%s: %v", bad, err)
		}
	}
}

// FuzzDecodeTable: a stored table (outside input: etcd) either decodes
// into a valid table that survives its stored form, or fails with
// ErrPlacement; it never panics.
func FuzzDecodeTable(f *testing.F) {
	for _, s := range []string{
		`{"version":1,"nodes":[{"id":"x","experts":"all"}]}`,
		`{"version":2,"nodes":[{"id":"x","experts":"all","shares":"1:5=250"},{"id":"y","experts":"1:5","shares":"1:5=750"}]}`,
		`{"version":3,"nodes":[{"id":"x","experts":"all","shares":"1:5=0"},{"id":"y","experts":"1:5","shares":"1:5=0"}]}`,
		`{"nodes":null}`, `[]`, `{"version":1,"nodes":[{"id":"","experts":"all"}]}`,
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, data string) {
		tb, err := DecodeTable(v2shape, []byte(data))
		if err != nil {
			if !errors.Is(err, ErrPlacement) {
				t.Fatalf("error %v does not wrap ErrPlacement", err)
			}
			return
		}
		if err := tb.Validate(); err != nil {
			t.Fatal(err)
		}
		js, err := json.Marshal(tb)
		if err != nil {
			t.Fatal(err)
		}
		back, err := DecodeTable(v2shape, js)
		if err != nil || !back.Equal(tb) {
			t.Fatalf("%s does not round-trip: %v", js, err)
		}
	})
}
