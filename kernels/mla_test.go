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
