package kernels

import (
	"fmt"
	"testing"
)

func BenchmarkVector(b *testing.B) {
	const n = 2048
	a, c, o := make([]float32, n), make([]float32, n), make([]float32, n)
	for i := range a {
		a[i], c[i] = float32(i%9)*0.1-0.4, float32(i%5)*0.2-0.3
	}
	for _, isa := range isas() {
		cases := []struct {
			name  string
			bytes int // bytes touched per call
			flops int
			f     func()
		}{
			{"Dot", 8 * n, 2 * n, func() { Dot(a, c) }},
			{"Axpy", 12 * n, 2 * n, func() { Axpy(o, 0.5, a) }},
			{"RMSNorm", 12 * n, 4 * n, func() { RMSNorm(o, a, c, 1e-6) }},
			{"SiLUMul", 12 * n, 0, func() { SiLUMul(o, a, c) }},
			{"Softmax", 8 * n, 0, func() { copy(o, a); Softmax(o) }},
		}
		for _, tc := range cases {
			b.Run(fmt.Sprintf("%s/n%d/%s", tc.name, n, isa), func(b *testing.B) {
				withISA(b, isa, func() {
					b.SetBytes(int64(tc.bytes))
					for b.Loop() {
						tc.f()
					}
					if tc.flops > 0 {
						b.ReportMetric(float64(tc.flops)*float64(b.N)/b.Elapsed().Seconds()/1e9, "GFLOP/s")
					}
				})
			})
		}
	}
}

// BenchmarkMLADecode: V2-Lite attention shape, 16 heads, 512+64.
func BenchmarkMLADecode(b *testing.B) {
	const H, R, P, bs = 16, 512, 64, 64
	for _, tokens := range []int{512, 4096} {
		blocks := make([][]float32, tokens/bs)
		for i := range blocks {
			blocks[i] = make([]float32, bs*(R+P))
			for j := range blocks[i] {
				blocks[i][j] = float32((i+j)%11)*0.01 - 0.05
			}
		}
		qLat, qPE, out := make([]float32, H*R), make([]float32, H*P), make([]float32, H*R)
		scratch := make([]float32, MLAScratchSize(H, tokens))
		// kernels=new: scores two tokens per pass and the value outputs in
		// registers; old: one token per pass and the axpy form.
		for _, c := range []struct {
			th      int
			kernels string
		}{{1, "new"}, {1, "old"}, {2, "new"}, {2, "old"}} {
			th := c.th
			b.Run(fmt.Sprintf("H%d/R%d/P%d/tokens%d/t%d/kernels=%s", H, R, P, tokens, th, c.kernels), func(b *testing.B) {
				p := NewPool(th)
				defer p.Close()
				mlaOutInRegisters, mlaScoresInPairs = c.kernels == "new", c.kernels == "new"
				defer func() { mlaOutInRegisters, mlaScoresInPairs = true, true }()
				b.SetBytes(int64(tokens * (R + P) * 4))
				for b.Loop() {
					p.MLADecode(out, qLat, qPE, blocks, bs, tokens, H, R, P, 0.1, scratch)
				}
				b.ReportMetric(2*float64(H*tokens*(2*R+P))*float64(b.N)/b.Elapsed().Seconds()/1e9, "GFLOP/s")
			})
		}
	}
}

// BenchmarkExpertFFN: one V2-Lite expert (2048 -> 1408 -> 2048), BF16.
func BenchmarkExpertFFN(b *testing.B) {
	gate, up, down := fastMatrix(1, BF16, 1408, 2048), fastMatrix(2, BF16, 1408, 2048), fastMatrix(3, BF16, 2048, 1408)
	for _, n := range []int{1, 48} {
		x, out := make([]float32, n*2048), make([]float32, n*2048)
		scratch := make([]float32, FFNScratchSize(n, 1408))
		for _, th := range []int{1, 2} {
			b.Run(fmt.Sprintf("BF16/2048x1408/n%d/t%d", n, th), func(b *testing.B) {
				p := NewPool(th)
				defer p.Close()
				b.SetBytes(gate.Bytes() + up.Bytes() + down.Bytes())
				for b.Loop() {
					p.ExpertFFN(out, x, n, gate, up, down, scratch)
				}
				b.ReportMetric(6*float64(n)*1408*2048*float64(b.N)/b.Elapsed().Seconds()/1e9, "GFLOP/s")
			})
		}
	}
}

// BenchmarkPoolRoundTrip is the cost of one empty ParallelFor: the
// synchronisation every multi-threaded kernel call pays.
func BenchmarkPoolRoundTrip(b *testing.B) {
	p := NewPool(2)
	defer p.Close()
	f := func(lo, hi int) {}
	for b.Loop() {
		p.ParallelFor(2, f)
	}
}
