package model

import (
	"context"
	"flag"
	"fmt"
	"testing"

	"github.com/expertmesh/expertmesh/kernels"
)

var benchModel = flag.String("model", "", "checkpoint directory for BenchmarkBatchedDecode (e.g. gen-model --preset v2-lite-4l); empty: a tiny preset")

// BenchmarkBatchedDecode: one decode step of b sequences (each 64 tokens
// in) through the engine with local experts, as serve runs it; reports
// output tokens/s. Run on the benchmark model with
// go test ./model -run '^$' -bench BatchedDecode -args -model DIR.
func BenchmarkBatchedDecode(b *testing.B) {
	var w *Weights
	if *benchModel != "" {
		var err error
		if w, err = Load(*benchModel, LoadOptions{}); err != nil {
			b.Fatal(err)
		}
		defer w.Close()
		if _, err := w.Place(ResidencyResident, 2, 0); err != nil {
			b.Fatal(err)
		}
	} else {
		w = loadTiny(b, "tiny-v2")
	}
	pool := kernels.NewPool(2)
	defer pool.Close()
	for _, n := range []int{1, 8, 32} {
		b.Run(fmt.Sprintf("b%d", n), func(b *testing.B) {
			eng := NewEngine(w, pool, nil)
			cache, _ := NewLatentCache(w.Config, 16, n*64)
			seqs := make([]*Sequence, n)
			rows := make([]Row, n)
			out := make([][]float32, n)
			for i := range seqs {
				seqs[i] = cache.NewSequence()
				defer seqs[i].Release()
				seqs[i].Reserve(1024)
				out[i] = make([]float32, w.Config.VocabSize)
			}
			ctx := context.Background()
			// Prefill 64 tokens per sequence.
			for p := 0; p < 64; p++ {
				for i := range rows {
					rows[i] = Row{Seq: seqs[i], Token: (p*31 + i*7) % w.Config.VocabSize, Pos: p, Logits: true}
				}
				if err := eng.Forward(ctx, rows, out); err != nil {
					b.Fatal(err)
				}
			}
			pos := 64
			b.ResetTimer()
			for b.Loop() {
				for i := range rows {
					rows[i] = Row{Seq: seqs[i], Token: (pos*31 + i*7) % w.Config.VocabSize, Pos: pos, Logits: true}
				}
				if err := eng.Forward(ctx, rows, out); err != nil {
					b.Fatal(err)
				}
				pos++
				if pos >= 1024 {
					pos = 64
				}
			}
			b.ReportMetric(float64(n)*float64(b.N)/b.Elapsed().Seconds(), "tok/s")
		})
	}
}
