package cli

import (
	"strings"
	"testing"
	"time"

	"github.com/expertmesh/expertmesh/kernels"
)

func TestRooflineReport(t *testing.T) {
	for _, tc := range []struct {
		name  string
		steps []stepSample
		want  string
	}{
		{
			// 1 GB in 50 ms is 20 GB/s: 80%, 100%, 50%, 100% of the
			// probes; median of the sorted 50, 80, 100, 100 at index 2; the
			// probes read 4 GB in 0.165 s: 24.2 tok/s.
			name: "four steps",
			steps: []stepSample{
				{bytes: 1e9, time: 50 * time.Millisecond, probeBps: 25e9},
				{bytes: 1e9, time: 50 * time.Millisecond, probeBps: 20e9},
				{bytes: 1e9, time: 50 * time.Millisecond, probeBps: 40e9},
				{bytes: 1e9, time: 50 * time.Millisecond, probeBps: 20e9},
			},
			want: "roofline: 4 decode steps streamed 1.000 GB of weights each; against a 128 MiB read probe run after each step (best of one and two streams per thread): median 100.0% of the bandwidth roofline (quartiles 80.0-100.0%); all steps 20.0 GB/s, roofline 24.2 tok/s\n",
		},
		{name: "none", want: "roofline: too few decode steps to measure (need 3 tokens)\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var b strings.Builder
			(&rooflineMeter{steps: tc.steps}).write(&b)
			if b.String() != tc.want {
				t.Fatalf("got  %q\nwant %q", b.String(), tc.want)
			}
		})
	}
}

// TestRooflineMeter: the hook skips the first step (its start is not
// observable), then records each step's streamed bytes and a probe rate.
func TestRooflineMeter(t *testing.T) {
	pool := kernels.NewPool(2)
	defer pool.Close()
	m, err := newRooflineMeter(pool)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	w := &kernels.Matrix{DType: kernels.F32, Rows: 4, Cols: 16, Data: make([]byte, 4*16*4)}
	x, y := make([]float32, 16), make([]float32, 4)
	for range 3 {
		pool.MatVec(y, w, x)
		m.afterStep()
	}
	if len(m.steps) != 2 {
		t.Fatalf("%d steps recorded, want 2", len(m.steps))
	}
	for i, s := range m.steps {
		if s.bytes != uint64(len(w.Data)) || s.time <= 0 || s.probeBps <= 0 {
			t.Errorf("step %d: %+v", i, s)
		}
	}
}
