package model

import (
	"context"
	"testing"

	"github.com/expertmesh/expertmesh/kernels"
)

// TestBatchedDecodeAllocations: a steady-state decode step of several
// sequences (grouped experts, all heads and all rows' attention in one
// pool call each) allocates nothing either, with float and integer
// activations.
func TestBatchedDecodeAllocations(t *testing.T) {
	for _, quant := range []string{"", QuantQ4} {
		w := loadQuant(t, "tiny-v2", quant)
		w.SetIntActivations(quant != "")
		pool := kernels.NewPool(2)
		eng := NewEngine(w, pool, nil)
		cache, _ := NewLatentCache(w.Config, 16, 256)
		const n = 6
		rows := make([]Row, n)
		out := make([][]float32, n)
		for i := range rows {
			s := cache.NewSequence()
			defer s.Release()
			s.Reserve(512)
			rows[i] = Row{Seq: s, Token: 1 + i, Logits: true}
			out[i] = make([]float32, w.Config.VocabSize)
		}
		pos := 0
		step := func() {
			for i := range rows {
				rows[i].Pos = pos + i // different lengths
				rows[i].Token = (pos*7 + i) % w.Config.VocabSize
			}
			if err := eng.Forward(context.Background(), rows, out); err != nil {
				t.Fatal(err)
			}
			pos++
		}
		for range 8 {
			step()
		}
		if a := testing.AllocsPerRun(30, step); a > 0 {
			t.Fatalf("quantize %q: %.1f allocations per batched decode step", quant, a)
		}
		w.SetIntActivations(false)
		pool.Close()
	}
}
