//go:build unix

package model

import (
	"context"
	"syscall"
	"testing"
	"time"

	"github.com/expertmesh/expertmesh/kernels"
)

// BenchmarkPrefillMLA: one 512-token prefill step (a single chunk, the
// 16-token blocks of generate's cache) with attention's MLA by MLAChunks
// and by MLADecodeMany one row per query, alternated in every iteration
// (ABBA, same weights, pool and prompt). Reports each path's prompt
// tokens/s and its attention half (norm, projections, cache write, MLA,
// output projection: attention() over every layer, timed again alone
// after the step) as ms and as a share of the step, each also as process
// CPU time (user+sys: less disturbed than wall time by other processes on
// a shared machine, though it counts the pool's spinning). Run on the benchmark
// model with go test ./model -run '^$' -bench PrefillMLA -args -model DIR.
func BenchmarkPrefillMLA(b *testing.B) {
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
	const n = 512
	pool := kernels.NewPool(2)
	defer pool.Close()
	cache, err := NewLatentCache(w.Config, 16, n/16)
	if err != nil {
		b.Fatal(err)
	}
	chunks, perRow := NewEngine(w, pool, nil), NewEngine(w, pool, nil)
	perRow.mlaChunkRows = 1 << 30
	out := [][]float32{make([]float32, w.Config.VocabSize)}
	ctx := context.Background()
	cpu := func() time.Duration {
		var ru syscall.Rusage
		if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
			b.Fatal(err)
		}
		return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
	}
	run := func(e *Engine) (step, attn, stepCPU, attnCPU time.Duration) {
		seq := cache.NewSequence()
		defer seq.Release()
		if err := seq.Reserve(n); err != nil {
			b.Fatal(err)
		}
		rows := make([]Row, n)
		for p := range rows {
			rows[p] = Row{Seq: seq, Token: (p*7919 + 13) % w.Config.VocabSize, Pos: p, Logits: p == n-1}
		}
		c0, t0 := cpu(), time.Now()
		if err := e.Forward(ctx, rows, out); err != nil {
			b.Fatal(err)
		}
		step, stepCPU = time.Since(t0), cpu()-c0
		c1, t1 := cpu(), time.Now()
		for l := range e.W.Layers {
			e.attention(l, rows)
		}
		return step, time.Since(t1), stepCPU, cpu() - c1
	}
	var stepC, attnC, stepR, attnR, cStepC, cAttnC, cStepR, cAttnR time.Duration
	i := 0
	for b.Loop() {
		for k := range 2 {
			if (i+k)%2 == 0 {
				s, a, cs, ca := run(chunks)
				stepC, attnC, cStepC, cAttnC = stepC+s, attnC+a, cStepC+cs, cAttnC+ca
			} else {
				s, a, cs, ca := run(perRow)
				stepR, attnR, cStepR, cAttnR = stepR+s, attnR+a, cStepR+cs, cAttnR+ca
			}
		}
		i++
	}
	iters := float64(b.N)
	b.ReportMetric(n*iters/stepC.Seconds(), "chunks-tok/s")
	b.ReportMetric(n*iters/stepR.Seconds(), "rows-tok/s")
	b.ReportMetric(attnC.Seconds()*1e3/iters, "chunks-attn-ms")
	b.ReportMetric(attnR.Seconds()*1e3/iters, "rows-attn-ms")
	b.ReportMetric(attnC.Seconds()/stepC.Seconds(), "chunks-attn-share")
	b.ReportMetric(attnR.Seconds()/stepR.Seconds(), "rows-attn-share")
	b.ReportMetric(cStepC.Seconds()/iters, "chunks-cpu-s")
	b.ReportMetric(cStepR.Seconds()/iters, "rows-cpu-s")
	b.ReportMetric(cAttnC.Seconds()/iters, "chunks-attn-cpu-s")
	b.ReportMetric(cAttnR.Seconds()/iters, "rows-attn-cpu-s")
}
