//go:build amd64 && !purego

package kernels

import (
	"flag"
	"fmt"
	"math/rand/v2"
	"strconv"
	"strings"
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

var waNs = flag.String("wans", "", "BenchmarkMatMulSplitWA: comma-separated batch sizes instead of 8,16,32,64,128,512")

var waRounds = flag.Int("warounds", 1, "BenchmarkMatMulSplitWA: rounds of wa, packed, fma per configuration (alternated)")

var waCold = flag.Int("wacold", 0, "BenchmarkMatMulSplitWA: MiB of weights to rotate through (0: one matrix, hot in cache)")

// BenchmarkMatMulSplitWA: float32-activation MatMul through the split
// path's two forms, transposed (wa: W as the A tiles, no packing) and
// packed (W packed into B tiles), and the FMA kernels, at
// DeepSeek-V2-Lite's shapes (attention-like 2048x2048 and MLA-like
// 3072x512, 512x2048; expert 1408x2048, 2048x1408; dense FFN 10944x2048,
// 2048x10944) and the batches of decode (8-32) and prefill. Each
// configuration runs wa, packed, fma back to back, so -count=N gives
// alternated rounds, as does -warounds=N (wa packed fma wa packed fma
// ... inside each configuration). -wacold=MiB rotates through copies of W filling that
// much memory (weights from memory, as at decode) instead of one matrix.
// GFLOP/s counts 2*n*rows*cols.
func BenchmarkMatMulSplitWA(b *testing.B) {
	if ok, why := AMXAvailable(); !ok {
		b.Skip("AMX unavailable: " + why)
	}
	rng := rand.New(rand.NewPCG(65, 66))
	shapes := [][2]int{{2048, 2048}, {1408, 2048}, {2048, 1408}, {10944, 2048}, {2048, 10944}, {3072, 512}, {512, 2048}}
	ns := []int{8, 16, 32, 64, 128, 512}
	if testing.Short() {
		shapes, ns = shapes[:3], []int{8, 32, 128}
	}
	if *waNs != "" {
		ns = ns[:0]
		for _, f := range strings.Split(*waNs, ",") {
			n, err := strconv.Atoi(f)
			if err != nil {
				b.Fatal(err)
			}
			ns = append(ns, n)
		}
	}
	var big *Matrix
	if *waCold > 0 {
		big = fastMatrix(67, BF16, *waCold<<10, 512) // MiB of bf16 rows
	}
	for _, sh := range shapes {
		rows, cols := sh[0], sh[1]
		ws := []*Matrix{fastMatrix(uint64(rows), BF16, rows, cols)}
		if big != nil {
			ws = ws[:0]
			sz := 2 * rows * cols
			for off := 0; off+sz <= len(big.Data); off += sz {
				ws = append(ws, &Matrix{DType: BF16, Rows: rows, Cols: cols, Data: big.Data[off : off+sz]})
			}
		}
		for _, n := range ns {
			x := randVec(rng, n*cols, 0)
			y := make([]float32, n*rows)
			for _, th := range []int{1, 2} {
				for k := 0; k < *waRounds*3; k++ {
					path := []string{"wa", "packed", "fma"}[k%3]
					b.Run(fmt.Sprintf("%dx%d/n%d/t%d/%s", rows, cols, n, th, path), func(b *testing.B) {
						p := NewPool(th)
						defer p.Close()
						was, minN, maxN, maxNK := amxOn, amxSplitMinN, waMaxN, waMaxNK
						defer func() { amxOn, amxSplitMinN, waMaxN, waMaxNK = was, minN, maxN, maxNK }()
						amxOn, amxSplitMinN, waMaxN, waMaxNK = path != "fma", 1, 0, 1<<62
						if path == "wa" {
							waMaxN = 1 << 30
						}
						i := 0
						for b.Loop() {
							p.MatMul(y, ws[i%len(ws)], x, n)
							i++
						}
						b.ReportMetric(2*float64(n)*float64(rows)*float64(cols)*float64(b.N)/b.Elapsed().Seconds()/1e9, "GFLOP/s")
					})
				}
			}
		}
	}
}
