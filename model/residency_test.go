package model

import (
	"bufio"
	"errors"
	"strings"
	"testing"
)

func TestParseResidency(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want Residency
		err  bool
	}{
		{"", ResidencyAuto, false},
		{"auto", ResidencyAuto, false},
		{"resident", ResidencyResident, false},
		{"mmap", ResidencyMapped, false},
		{"Resident", "", true},
		{"huge", "", true},
	} {
		got, err := ParseResidency(tc.in)
		if (err != nil) != tc.err || got != tc.want {
			t.Errorf("ParseResidency(%q) = %q, %v; want %q, error %v", tc.in, got, err, tc.want, tc.err)
		}
	}
}

func TestParseMemAvailable(t *testing.T) {
	for _, tc := range []struct {
		text string
		want int64
	}{
		{"MemTotal:       24000000 kB\nMemFree:  1 kB\nMemAvailable:   22000000 kB\n", 22000000 << 10},
		{"MemTotal:       24000000 kB\n", 0},
		{"MemAvailable:   x kB\n", 0},
		{"MemAvailable:   12 MB\n", 0},
		{"MemAvailable:   -5 kB\n", 0},
		{"", 0},
	} {
		if got := parseMemAvailable(bufio.NewScanner(strings.NewReader(tc.text))); got != tc.want {
			t.Errorf("%q: got %d, want %d", tc.text, got, tc.want)
		}
	}
	if MemAvailable() <= 0 {
		t.Skip("no /proc/meminfo on this OS")
	}
}

// TestPlaceAuto: auto copies the weights when they take at most half of
// the available memory and leaves them mapped otherwise; either way the
// weights compute the same tokens.
func TestPlaceAuto(t *testing.T) {
	dir := tinyCheckpoint(t, "tiny-v2")
	for _, tc := range []struct {
		name      string
		mode      Residency
		available func(size int64) int64
		want      Residency
	}{
		{"auto fits", ResidencyAuto, func(n int64) int64 { return 2 * n }, ResidencyResident},
		{"auto too big", ResidencyAuto, func(n int64) int64 { return 2*n - 1 }, ResidencyMapped},
		{"auto unknown memory", ResidencyAuto, func(int64) int64 { return 0 }, ResidencyMapped},
		{"forced resident", ResidencyResident, func(int64) int64 { return 0 }, ResidencyResident},
		{"forced mmap", ResidencyMapped, func(n int64) int64 { return 100 * n }, ResidencyMapped},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w, err := Load(dir, LoadOptions{})
			if err != nil {
				t.Fatal(err)
			}
			defer w.Close()
			mapped := &w.LMHead.Data[0]
			got, err := w.Place(tc.mode, 2, tc.available(w.Bytes()))
			if err != nil {
				t.Fatal(err)
			}
			if got != tc.want {
				t.Fatalf("chose %q, want %q", got, tc.want)
			}
			if copied := &w.LMHead.Data[0] != mapped; copied != (got == ResidencyResident) {
				t.Fatalf("chose %q but lm_head copied = %v", got, copied)
			}
		})
	}
}

func TestCopyExpertUnbound(t *testing.T) {
	dir := tinyCheckpoint(t, "tiny-v2")
	w, err := Load(dir, LoadOptions{Expert: func(l, e int) bool { return e == 0 }})
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	for _, tc := range []struct{ layer, expert int }{{1, 1}, {0, 0}, {-1, 0}, {99, 0}, {1, -1}, {1, 1 << 20}} {
		if _, err := w.CopyExpert(tc.layer, tc.expert); !errors.Is(err, ErrWeights) {
			t.Errorf("CopyExpert(%d, %d) = %v, want ErrWeights", tc.layer, tc.expert, err)
		}
		if n := w.ExpertBytes(tc.layer, tc.expert); n != 0 {
			t.Errorf("ExpertBytes(%d, %d) = %d, want 0", tc.layer, tc.expert, n)
		}
	}
	r, err := w.CopyExpert(1, 0)
	if err != nil {
		t.Fatal(err)
	}
	if r.Bytes() != w.ExpertBytes(1, 0) || r.Bytes() == 0 {
		t.Fatalf("copy of %d bytes, expert has %d", r.Bytes(), w.ExpertBytes(1, 0))
	}
	if err := r.Free(); err != nil {
		t.Fatal(err)
	}
}

func TestResidencyResolve(t *testing.T) {
	for _, tc := range []struct {
		r            Residency
		bytes, avail int64
		want         Residency
	}{
		{ResidencyAuto, 10, 20, ResidencyResident},
		{ResidencyAuto, 11, 20, ResidencyMapped},
		{"", 10, 20, ResidencyResident},
		{ResidencyAuto, 10, 0, ResidencyMapped},
		{ResidencyResident, 100, 1, ResidencyResident},
		{ResidencyMapped, 1, 100, ResidencyMapped},
	} {
		if got := tc.r.Resolve(tc.bytes, tc.avail); got != tc.want {
			t.Errorf("%q.Resolve(%d, %d) = %q, want %q", tc.r, tc.bytes, tc.avail, got, tc.want)
		}
	}
}
