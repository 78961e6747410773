package kernels

import (
	"fmt"
	"math/rand/v2"
	"testing"
)

// V2-Lite decode shapes (rows x cols).
var mvBenchShapes = [][2]int{{2048, 10944}, {10944, 2048}, {1408, 2048}, {2048, 1408}, {3072, 2048}, {576, 2048}, {102400, 2048}}

// BenchmarkMatVec repeats one matrix, so shapes below the L3 size run from
// cache; RunBench measures decode from memory against the read bandwidth.
// -short skips the 102400-row lm_head.
func BenchmarkMatVec(b *testing.B) {
	rng := rand.New(rand.NewPCG(3, 4))
	for _, dt := range allDTypes {
		for _, sh := range mvBenchShapes {
			var w *Matrix
			x := randVec(rng, sh[1], 0)
			y := make([]float32, sh[0])
			for _, th := range []int{1, 2} {
				b.Run(fmt.Sprintf("%s/%dx%d/t%d", dt, sh[0], sh[1], th), func(b *testing.B) {
					if testing.Short() && sh[0] == 102400 {
						b.Skip("lm_head shape skipped in -short")
					}
					if w == nil {
						w = fastMatrix(uint64(sh[0]), dt, sh[0], sh[1])
					}
					p := NewPool(th)
					defer p.Close()
					b.SetBytes(w.Bytes())
					for b.Loop() {
						p.MatVec(y, w, x)
					}
					b.ReportMetric(2*float64(sh[0])*float64(sh[1])*float64(b.N)/b.Elapsed().Seconds()/1e9, "GFLOP/s")
				})
			}
		}
	}
}

// BenchmarkMatVecMany is one MoE layer's first decode call on local
// experts: the gate and up products of six routed experts and the shared
// experts' down product (V2-Lite shapes, 81 MB, more than the L3), split
// across the threads as one job.
func BenchmarkMatVecMany(b *testing.B) {
	rng := rand.New(rand.NewPCG(5, 6))
	var ws []*Matrix
	var ys, xs [][]float32
	add := func(rows, cols int) {
		ws = append(ws, fastMatrix(uint64(len(ws)+1), BF16, rows, cols))
		ys, xs = append(ys, make([]float32, rows)), append(xs, randVec(rng, cols, 0))
	}
	for range 12 {
		add(1408, 2048)
	}
	add(2048, 2816)
	var bytes int64
	var flops float64
	for _, w := range ws {
		bytes += w.Bytes()
		flops += 2 * float64(w.Rows) * float64(w.Cols)
	}
	for _, th := range []int{1, 2} {
		b.Run(fmt.Sprintf("moe-layer/t%d", th), func(b *testing.B) {
			p := NewPool(th)
			defer p.Close()
			b.SetBytes(bytes)
			for b.Loop() {
				p.MatVecMany(ys, ws, xs)
			}
			b.ReportMetric(flops*float64(b.N)/b.Elapsed().Seconds()/1e9, "GFLOP/s")
		})
	}
}

// BenchmarkQDot: integer-activation matrix-vector products (Q8_0 weights
// with int8 activations, Q4_0) at the expert shapes, from cache.
func BenchmarkQDot(b *testing.B) {
	rng := rand.New(rand.NewPCG(7, 8))
	for _, dt := range []DType{Q8_0, Q4_0} {
		for _, sh := range [][2]int{{1408, 2048}, {2048, 1408}} {
			w := fastMatrix(uint64(sh[0]), dt, sh[0], sh[1])
			w.ActQ8 = dt == Q8_0
			x := randVec(rng, sh[1], 0)
			y := make([]float32, sh[0])
			for _, th := range []int{1, 2} {
				b.Run(fmt.Sprintf("%s/%dx%d/t%d", dt, sh[0], sh[1], th), func(b *testing.B) {
					p := NewPool(th)
					defer p.Close()
					b.SetBytes(w.Bytes())
					for b.Loop() {
						p.MatVec(y, w, x)
					}
				})
			}
		}
	}
}
