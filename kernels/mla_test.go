package kernels

import (
	"fmt"
	"math"
	"math/rand/v2"
	"testing"
)

func refMLA(qLat, qPE []float32, blocks [][]float32, bs, nt, H, R, P int, scale float32) []float64 {
	out := make([]float64, H*R)
	for h := 0; h < H; h++ {
		s := make([]float64, nt)
		m := math.Inf(-1)
		for t := 0; t < nt; t++ {
			row := blocks[t/bs][(t%bs)*(R+P):]
			var d float64
			for i := 0; i < R; i++ {
				d += float64(qLat[h*R+i]) * float64(row[i])
			}
			for i := 0; i < P; i++ {
				d += float64(qPE[h*P+i]) * float64(row[R+i])
			}
			s[t] = float64(scale) * d
			m = math.Max(m, s[t])
		}
		var sum float64
		for t := range s {
			s[t] = math.Exp(s[t] - m)
			sum += s[t]
		}
		for t := 0; t < nt; t++ {
			row := blocks[t/bs][(t%bs)*(R+P):]
			for i := 0; i < R; i++ {
				out[h*R+i] += s[t] / sum * float64(row[i])
			}
		}
	}
	return out
}

func TestMLADecode(t *testing.T) {
	rng := rand.New(rand.NewPCG(13, 14))
	pools := []*Pool{NewPool(1), NewPool(2), NewPool(3)}
	defer func() {
		mlaOutInRegisters, mlaScoresInPairs = true, true
		for _, p := range pools {
			p.Close()
		}
	}()
	cases := []struct{ H, R, P, bs, nt int }{
		{1, 16, 0, 4, 1},
		{3, 20, 6, 5, 11},      // odd dims: plain path
		{8, 32, 16, 16, 37},    // partial last block
		{16, 64, 16, 8, 64},    // exact blocks
		{17, 48, 32, 64, 70},   // a head beyond the groups of 8
		{16, 96, 16, 16, 300},  // several token tiles of the value kernel
		{16, 512, 64, 16, 129}, // DeepSeek's latent, one token past a tile
	}
	for _, c := range cases {
		stride := c.R + c.P
		blocks := make([][]float32, (c.nt+c.bs-1)/c.bs+1) // one spare block
		for i := range blocks {
			blocks[i] = randVec(rng, c.bs*stride, i%2)
		}
		qLat, qPE := randVec(rng, c.H*c.R, 1), randVec(rng, c.H*c.P, 0)
		scale := float32(1 / math.Sqrt(float64(c.R+c.P)))
		want := refMLA(qLat, qPE, blocks, c.bs, c.nt, c.H, c.R, c.P, scale)
		for _, isa := range isas() {
			for i, p := range pools {
				// Alternate the two value kernels across the pools.
				mlaOutInRegisters, mlaScoresInPairs = i%2 == 0, i%2 == 0
				name := fmt.Sprintf("%+v/%s/t%d/new-kernels=%v", c, isa, p.Threads(), mlaOutInRegisters)
				withISA(t, isa, func() {
					out, check := guarded(c.H * c.R)
					scratch := make([]float32, MLAScratchSize(c.H, c.nt))
					p.MLADecode(out, qLat, qPE, blocks, c.bs, c.nt, c.H, c.R, c.P, scale, scratch)
					check(t)
					for i := range out {
						if math.Abs(float64(out[i])-want[i]) > 2e-5*(1+math.Abs(want[i])) {
							t.Fatalf("%s: out[%d]=%g want %g", name, i, out[i], want[i])
						}
					}
				})
			}
		}
	}
}

// mlaChunkCase is a chunk of nq queries from position start over a cache
// of blockSize-token blocks.
type mlaChunkCase struct{ H, R, P, bs, start, nq int }

// makeMLAChunk fills a chunk's cache (one spare block beyond what it
// needs), queries and an exact-size scratch.
func makeMLAChunk(rng *rand.Rand, c mlaChunkCase) MLAChunk {
	nt := c.start + c.nq
	blocks := make([][]float32, ceilDiv(nt, c.bs)+1)
	for i := range blocks {
		blocks[i] = randVec(rng, c.bs*(c.R+c.P), i%2)
	}
	return MLAChunk{
		QLat: randVec(rng, c.nq*c.H*c.R, 1), QPE: randVec(rng, c.nq*c.H*c.P, 0),
		Blocks: blocks, Start: c.start, NQ: c.nq,
		Scratch: make([]float32, MLAScratchSize(c.H, 0)+MLAChunkScratchSize(c.H, c.start, c.nq)),
	}
}

// TestMLAChunks: every query of MLAChunks against MLADecode on that query
// alone (its causal length) and against the float64 reference, at every
// ISA and thread count: one query, queries past a 6-query and a 24-query
// tile, chunks starting mid-sequence and mid-block, blocks of 1 and 3
// tokens, pages crossed by a tile, dimensions off the AVX-512 path (R not
// a multiple of 64, P not of 16, P = 0), several chunks (one empty) in one
// call. On the plain path (and AVX2, which shares it) the result is
// MLADecode's bit for bit; on AVX-512 within float32 rounding.
func TestMLAChunks(t *testing.T) {
	rng := rand.New(rand.NewPCG(31, 32))
	pools := []*Pool{NewPool(1), NewPool(2), NewPool(3)}
	defer func() {
		for _, p := range pools {
			p.Close()
		}
	}()
	groups := [][]mlaChunkCase{
		{{16, 64, 16, 16, 0, 1}},
		{{3, 64, 16, 5, 7, 1}},
		{{16, 128, 64, 16, 0, 37}},  // past a 24-query tile
		{{2, 64, 16, 16, 0, 7}},     // one past a 6-query tile
		{{5, 64, 0, 3, 13, 50}},     // no rope part, 3-token blocks, mid-block start
		{{4, 128, 32, 1, 9, 25}},    // one-token blocks
		{{16, 512, 64, 16, 5, 40}},  // V2-Lite's shape
		{{8, 192, 16, 64, 100, 30}}, // a long history, 64-token blocks
		{{3, 48, 16, 8, 4, 13}},     // R off the 64-column kernel: plain path
		{{3, 64, 6, 4, 0, 9}},       // P off the 16-float kernel: plain path
		{{16, 64, 16, 16, 3, 5}, {16, 64, 16, 16, 0, 0}, {16, 64, 16, 16, 40, 31}, {16, 64, 16, 16, 0, 1}}, // several chunks
	}
	for _, cases := range groups {
		H, R, P, bs := cases[0].H, cases[0].R, cases[0].P, cases[0].bs
		scale := float32(1 / math.Sqrt(float64(R+P)))
		chunks := make([]MLAChunk, len(cases))
		checks := make([]func(testing.TB), len(cases))
		for i, c := range cases {
			chunks[i] = makeMLAChunk(rng, c)
		}
		var plain [][]float32
		for _, isa := range isas() {
			for _, p := range pools {
				name := fmt.Sprintf("%+v/%s/t%d", cases, isa, p.Threads())
				withISA(t, isa, func() {
					for i := range chunks {
						chunks[i].Out, checks[i] = guarded(cases[i].nq * H * R)
						for j := range chunks[i].Out {
							chunks[i].Out[j] = float32(math.NaN())
						}
					}
					p.MLAChunks(chunks, bs, H, R, P, scale)
					for i, c := range cases {
						ch := &chunks[i]
						checks[i](t)
						for q := 0; q < c.nq; q++ {
							nt := c.start + q + 1
							ql, qp := ch.QLat[q*H*R:(q+1)*H*R], ch.QPE[q*H*P:(q+1)*H*P]
							want := make([]float32, H*R)
							p.MLADecode(want, ql, qp, ch.Blocks, bs, nt, H, R, P, scale, make([]float32, MLAScratchSize(H, nt)))
							ref := refMLA(ql, qp, ch.Blocks, bs, nt, H, R, P, scale)
							got := ch.Out[q*H*R : (q+1)*H*R]
							for j := range got {
								exact := isa != ISAAVX512 || R%64 != 0 || P%16 != 0
								if exact && got[j] != want[j] || math.Abs(float64(got[j]-want[j])) > 2e-6*(1+math.Abs(float64(want[j]))) {
									t.Fatalf("%s chunk %d query %d (%d tokens): out[%d]=%g, MLADecode %g", name, i, q, nt, j, got[j], want[j])
								}
								if math.Abs(float64(got[j])-ref[j]) > 2e-5*(1+math.Abs(ref[j])) {
									t.Fatalf("%s chunk %d query %d (%d tokens): out[%d]=%g, float64 reference %g", name, i, q, nt, j, got[j], ref[j])
								}
							}
						}
						// Each SIMD path against the plain one.
						if isa == ISAGeneric && p == pools[0] {
							plain = append(plain, append([]float32(nil), ch.Out...))
							continue
						}
						for j, v := range ch.Out {
							if w := plain[i][j]; math.Abs(float64(v-w)) > 2e-5*(1+math.Abs(float64(w))) {
								t.Fatalf("%s chunk %d: out[%d]=%g, plain path %g", name, i, j, v, w)
							}
						}
					}
				})
			}
		}
	}
}
