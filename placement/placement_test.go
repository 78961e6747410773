package placement

import (
	"errors"
	"testing"
)

var v2shape = Shape{Layers: 3, Experts: 160, Groups: 8, MoELayers: []int{1, 2}}

func TestEvenGroupAligned(t *testing.T) {
	tb, err := Even(v2shape, []string{"a", "b", "c"})
	if err != nil {
		t.Fatal(err)
	}
	// 8 groups of 20 over 3 nodes: cuts fall on group boundaries.
	for _, l := range v2shape.MoELayers {
		for g := range 8 {
			first := tb.Replicas(l, g*20)[0]
			for e := g * 20; e < (g+1)*20; e++ {
				if tb.Replicas(l, e)[0] != first {
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
	for _, l := range v2shape.MoELayers {
		for e := range 160 {
			if tb.Replicas(l, e)[0] != tb2.Replicas(l, e)[0] {
				t.Fatalf("round trip differs at %d/%d", l, e)
			}
		}
	}
}

func TestParseSpec(t *testing.T) {
	tb, err := ParseSpec(v2shape, "x=0-159;y=0-9")
	if err != nil {
		t.Fatal(err)
	}
	if r := tb.Replicas(2, 5); len(r) != 2 || r[0] != "x" || r[1] != "y" {
		t.Fatalf("replicas %v", r)
	}
	for _, bad := range []string{"x=0-100", "x=0-160", "x", "x=1:0-159;x=3:0-159", "x=a-b", "x=0:0-159"} {
		if _, err := ParseSpec(v2shape, bad); !errors.Is(err, ErrPlacement) {
			t.Errorf("%q: err = %v", bad, err)
		}
	}
	if len(tb.Nodes()) != 2 {
		t.Fatalf("nodes %v", tb.Nodes())
	}
}
