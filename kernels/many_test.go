package kernels

import (
	"fmt"
	"math"
	"math/rand/v2"
	"testing"
)

// TestMatMulManyEqualsMatMul: each product of MatMulMany equals MatMul
// (MatVec for one row) on its own, bit for bit, for every dtype, row
// counts across the kernels' ranges (0, 1, small, the dot form, packed),
// products cut across threads, and every ISA level; no output element is
// skipped (NaN-prefilled) or written past (guards).
func TestMatMulManyEqualsMatMul(t *testing.T) {
	rng := rand.New(rand.NewPCG(21, 22))
	old := guidedMinBytes
	guidedMinBytes = 1
	defer func() { guidedMinBytes = old }()
	pools := []*Pool{NewPool(1), NewPool(3)}
	defer func() {
		for _, p := range pools {
			p.Close()
		}
	}()
	type prod struct {
		w *Matrix
		x []float32
		n int
	}
	var prods []prod
	shapes := [][2]int{{70, 64}, {33, 96}, {130, 160}, {40, 2048}, {7, 288}}
	ns := []int{0, 1, 2, 3, 5, 17, 40, 70}
	k := 0
	for _, dt := range []DType{F32, BF16, F16, F8E4M3, Q8_0, Q4_0} {
		for si, sh := range shapes {
			n := ns[(k+si)%len(ns)]
			k++
			var w *Matrix
			if dt == Q4_0 || (dt == Q8_0 && si%2 == 0) {
				w = randQMatrix(rng, dt, sh[0], sh[1], 1)
			} else {
				w = randMatrix(rng, dt, sh[0], sh[1], 1)
			}
			prods = append(prods, prod{w, randVec(rng, n*sh[1], 0), n})
		}
	}
	for _, isa := range isas() {
		for _, p := range pools {
			withISA(t, isa, func() {
				ys := make([][]float32, len(prods))
				ws := make([]*Matrix, len(prods))
				xs := make([][]float32, len(prods))
				nn := make([]int, len(prods))
				checks := make([]func(testing.TB), len(prods))
				for i, pr := range prods {
					ys[i], checks[i] = guarded(pr.n * pr.w.Rows)
					for j := range ys[i] {
						ys[i][j] = float32(math.NaN())
					}
					ws[i], xs[i], nn[i] = pr.w, pr.x, pr.n
				}
				p.MatMulMany(ys, ws, xs, nn)
				for i, pr := range prods {
					checks[i](t)
					want := make([]float32, pr.n*pr.w.Rows)
					if pr.n == 1 {
						p.MatVec(want, pr.w, pr.x)
					} else {
						p.MatMul(want, pr.w, pr.x, pr.n)
					}
					for j := range want {
						if want[j] != ys[i][j] {
							t.Fatalf("%s t%d product %d (%s %dx%d n=%d): y[%d]=%g, alone %g", isa, p.Threads(), i, pr.w.DType, pr.w.Rows, pr.w.Cols, pr.n, j, ys[i][j], want[j])
						}
					}
				}
			})
		}
	}
}

// TestMLADecodeManyEqualsMLADecode: every row of MLADecodeMany equals
// MLADecode on that row alone, bit for bit: rows of different lengths
// (0 tokens included) over one cache, as a prefill chunk has them, and
// over separate caches, as a batched decode step has them.
func TestMLADecodeManyEqualsMLADecode(t *testing.T) {
	rng := rand.New(rand.NewPCG(23, 24))
	for _, c := range []struct{ H, R, P, bs int }{{16, 512, 64, 16}, {3, 20, 6, 5}, {17, 48, 32, 8}} {
		var rows []MLARow
		shared := make([][]float32, 40)
		for b := range shared {
			shared[b] = randVec(rng, c.bs*(c.R+c.P), 0)
		}
		for i, nt := range []int{1, 7, 0, 33, 100, 2, 64} {
			blocks := shared
			if i%2 == 1 {
				blocks = make([][]float32, ceilDiv(nt, c.bs))
				for b := range blocks {
					blocks[b] = randVec(rng, c.bs*(c.R+c.P), 0)
				}
			}
			rows = append(rows, MLARow{Out: make([]float32, c.H*c.R), QLat: randVec(rng, c.H*c.R, 0), QPE: randVec(rng, c.H*c.P, 0),
				Blocks: blocks, NTokens: nt, Scratch: make([]float32, MLAScratchSize(c.H, nt))})
		}
		for _, isa := range isas() {
			for _, th := range []int{1, 2, 3} {
				p := NewPool(th)
				name := fmt.Sprintf("H%d R%d %s t%d", c.H, c.R, isa, th)
				withISA(t, isa, func() {
					for i := range rows {
						for j := range rows[i].Out {
							rows[i].Out[j] = float32(math.NaN())
						}
					}
					// Fewer rows first: buffers grow within capacity, then beyond.
					p.MLADecodeMany(rows[:2], c.bs, c.H, c.R, c.P, 0.07)
					p.MLADecodeMany(rows[:4], c.bs, c.H, c.R, c.P, 0.07)
					p.MLADecodeMany(rows, c.bs, c.H, c.R, c.P, 0.07)
					for i, r := range rows {
						want := make([]float32, c.H*c.R)
						p.MLADecode(want, r.QLat, r.QPE, r.Blocks, c.bs, r.NTokens, c.H, c.R, c.P, 0.07, make([]float32, MLAScratchSize(c.H, r.NTokens)))
						for j := range want {
							if want[j] != r.Out[j] {
								t.Fatalf("%s row %d (%d tokens): out[%d]=%g, alone %g", name, i, r.NTokens, j, r.Out[j], want[j])
							}
						}
					}
				})
				p.Close()
			}
		}
	}
}
