//go:build amd64 && !purego

package kernels

import (
	"flag"
	"fmt"
	"math/rand/v2"
	"testing"
)

var amxSmall = flag.Bool("amxsmall", false, "BenchmarkMatMulAMX: batches of 1-12 rows (the AMX threshold)")

// BenchmarkMatMulAMX: MatMulBF16Act through AMX tiles against the
// VDPBF16PS kernels (dot form below 48 rows, packed above) and float32
// MatMul, at the batch sizes prefill gives DeepSeek-V2-Lite's dense
// (10944x2048, 2048x10944) and expert (1408x2048, 2048x1408) products.
// Each configuration runs amx, dp, f32 back to back, so -count=N gives
// alternated rounds.
func BenchmarkMatMulAMX(b *testing.B) {
	if ok, why := AMXAvailable(); !ok {
		b.Skip("AMX unavailable: " + why)
	}
	rng := rand.New(rand.NewPCG(45, 46))
	shapes := [][2]int{{1408, 2048}, {2048, 1408}, {10944, 2048}, {2048, 10944}}
	ns := []int{16, 32, 48, 64, 128, 512}
	if *amxSmall {
		ns = []int{1, 2, 4, 6, 8, 10, 12, 14}
	}
	if testing.Short() {
		shapes, ns = shapes[:2], []int{16, 48, 512}
	}
	for _, sh := range shapes {
		w := fastMatrix(uint64(sh[0]), BF16, sh[0], sh[1])
		for _, n := range ns {
			x := randVec(rng, n*sh[1], 0)
			y := make([]float32, n*sh[0])
			for _, th := range []int{1, 2} {
				for _, path := range []string{"amx", "dp", "f32"} {
					b.Run(fmt.Sprintf("%dx%d/n%d/t%d/%s", sh[0], sh[1], n, th, path), func(b *testing.B) {
						p := NewPool(th)
						defer p.Close()
						was, minN := amxOn, amxMinN
						defer func() { amxOn, amxMinN = was, minN }()
						amxOn, amxMinN = path == "amx", 1
						for b.Loop() {
							if path == "f32" {
								p.MatMul(y, w, x, n)
							} else {
								p.MatMulBF16Act(y, w, x, n)
							}
						}
						b.ReportMetric(2*float64(n)*float64(sh[0])*float64(sh[1])*float64(b.N)/b.Elapsed().Seconds()/1e9, "GFLOP/s")
					})
				}
			}
		}
	}
}

// BenchmarkMatMulSplitAMX: float32-activation MatMul through the split
// AMX kernels (three bf16 parts of x) against the FMA kernels (dot form
// from 16 rows, packed from 64), at the shapes of BenchmarkMatMulAMX.
// GFLOP/s counts the product's 2*n*rows*cols, not the split's three
// times that. Each configuration runs split then fma back to back, so
// -count=N gives alternated rounds; -amxsmall takes batches of 4-24 rows
// (the split threshold).
func BenchmarkMatMulSplitAMX(b *testing.B) {
	if ok, why := AMXAvailable(); !ok {
		b.Skip("AMX unavailable: " + why)
	}
	rng := rand.New(rand.NewPCG(59, 60))
	shapes := [][2]int{{1408, 2048}, {2048, 1408}, {10944, 2048}, {2048, 10944}}
	ns := []int{16, 32, 48, 64, 128, 512}
	if *amxSmall {
		ns = []int{4, 8, 12, 16, 20, 24}
	}
	if testing.Short() {
		shapes, ns = shapes[:2], []int{16, 48, 512}
	}
	for _, sh := range shapes {
		w := fastMatrix(uint64(sh[0]), BF16, sh[0], sh[1])
		for _, n := range ns {
			x := randVec(rng, n*sh[1], 0)
			y := make([]float32, n*sh[0])
			for _, th := range []int{1, 2} {
				for _, path := range []string{"split", "fma"} {
					b.Run(fmt.Sprintf("%dx%d/n%d/t%d/%s", sh[0], sh[1], n, th, path), func(b *testing.B) {
						p := NewPool(th)
						defer p.Close()
						was, minN := amxOn, amxSplitMinN
						defer func() { amxOn, amxSplitMinN = was, minN }()
						amxOn, amxSplitMinN = path == "split", 1
						for b.Loop() {
							p.MatMul(y, w, x, n)
						}
						b.ReportMetric(2*float64(n)*float64(sh[0])*float64(sh[1])*float64(b.N)/b.Elapsed().Seconds()/1e9, "GFLOP/s")
					})
				}
			}
		}
	}
}
