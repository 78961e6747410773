package kernels

import (
	"fmt"
	"math/rand/v2"
	"testing"
)

func BenchmarkMatMul(b *testing.B) {
	rng := rand.New(rand.NewPCG(9, 10))
	const n = 512
	for _, dt := range []DType{BF16, Q8_0, F32} {
		for _, sh := range [][2]int{{1408, 2048}, {2048, 1408}, {3072, 2048}} {
			var w *Matrix
			x := randVec(rng, n*sh[1], 0)
			y := make([]float32, n*sh[0])
			for _, act := range []string{"f32", "bf16"} {
				for _, th := range []int{1, 2} {
					b.Run(fmt.Sprintf("%s/%dx%d/n%d/%s/t%d", dt, sh[0], sh[1], n, act, th), func(b *testing.B) {
						if w == nil {
							w = fastMatrix(uint64(sh[0]), dt, sh[0], sh[1])
						}
						p := NewPool(th)
						defer p.Close()
						b.SetBytes(w.Bytes())
						for b.Loop() {
							if act == "f32" {
								p.MatMul(y, w, x, n)
							} else {
								p.MatMulBF16Act(y, w, x, n)
							}
						}
						b.ReportMetric(2*n*float64(sh[0])*float64(sh[1])*float64(b.N)/b.Elapsed().Seconds()/1e9, "GFLOP/s")
					})
				}
			}
		}
	}
}

func BenchmarkProbe(b *testing.B) {
	b.Run("fma", func(b *testing.B) {
		var fl float64
		for b.Loop() {
			fl += probeFMA(1 << 20)
		}
		b.ReportMetric(fl/b.Elapsed().Seconds()/1e9, "GFLOP/s")
	})
	b.Run("dpbf16", func(b *testing.B) {
		var fl float64
		for b.Loop() {
			fl += probeDPBF16(1 << 20)
		}
		b.ReportMetric(fl/b.Elapsed().Seconds()/1e9, "GFLOP/s")
	})
}

// BenchmarkMatMulSmallBatch: BF16 products against a few x rows (a batched
// decode step's dense and expert products), W larger than the L3 so it
// streams from memory: the multi-row kernels should keep GB/s near the
// single-row figure whatever n is.
func BenchmarkMatMulSmallBatch(b *testing.B) {
	rng := rand.New(rand.NewPCG(11, 12))
	const rows, cols = 8192, 4096 // 64 MiB of BF16
	w := fastMatrix(7, BF16, rows, cols)
	for _, n := range []int{1, 2, 3, 4, 6, 8, 11, 15} {
		x := randVec(rng, n*cols, 0)
		y := make([]float32, n*rows)
		b.Run(fmt.Sprintf("n%d/t2", n), func(b *testing.B) {
			p := NewPool(2)
			defer p.Close()
			b.SetBytes(w.Bytes())
			for b.Loop() {
				p.MatMul(y, w, x, n)
			}
			b.ReportMetric(2*float64(n)*rows*cols*float64(b.N)/b.Elapsed().Seconds()/1e9, "GFLOP/s")
		})
	}
}
