package kernels

import (
	"fmt"
	"testing"
)

// BenchmarkMLAChunk: a prefill chunk of V2-Lite's attention (16 heads,
// 512+64, 16-token blocks as the engine's cache) by MLAChunks against
// MLADecodeMany with one row per query, the same work. GFLOP/s counts the
// causal products only (2·H·(2R+P) per query and token it sees).
func BenchmarkMLAChunk(b *testing.B) {
	const H, R, P, bs = 16, 512, 64, 16
	for _, c := range []struct{ start, nq int }{{0, 512}, {0, 64}, {448, 64}, {4032, 64}, {500, 2}, {500, 8}, {496, 16}, {480, 32}} {
		nt := c.start + c.nq
		blocks := make([][]float32, ceilDiv(nt, bs))
		for i := range blocks {
			blocks[i] = make([]float32, bs*(R+P))
			for j := range blocks[i] {
				blocks[i][j] = float32((i+j)%11)*0.01 - 0.05
			}
		}
		qLat, qPE := make([]float32, c.nq*H*R), make([]float32, c.nq*H*P)
		for i := range qLat {
			qLat[i] = float32(i%7)*0.02 - 0.06
		}
		out := make([]float32, c.nq*H*R)
		chunk := []MLAChunk{{Out: out, QLat: qLat, QPE: qPE, Blocks: blocks, Start: c.start, NQ: c.nq,
			Scratch: make([]float32, MLAChunkScratchSize(H, c.start, c.nq))}}
		rows := make([]MLARow, c.nq)
		scratch := make([]float32, c.nq*MLAScratchSize(H, nt))
		toks := 0
		for q := range rows {
			n := c.start + q + 1
			toks += n
			rows[q] = MLARow{Out: out[q*H*R : (q+1)*H*R], QLat: qLat[q*H*R : (q+1)*H*R], QPE: qPE[q*H*P : (q+1)*H*P],
				Blocks: blocks, NTokens: n, Scratch: scratch[q*MLAScratchSize(H, nt):]}
		}
		flops := 2 * float64(H*(2*R+P)) * float64(toks)
		for _, th := range []int{1, 2} {
			for _, impl := range []string{"many", "chunks"} {
				b.Run(fmt.Sprintf("H%d/R%d/P%d/bs%d/start%d/q%d/t%d/impl=%s", H, R, P, bs, c.start, c.nq, th, impl), func(b *testing.B) {
					p := NewPool(th)
					defer p.Close()
					for b.Loop() {
						if impl == "many" {
							p.MLADecodeMany(rows, bs, H, R, P, 0.1)
						} else {
							p.MLAChunks(chunk, bs, H, R, P, 0.1)
						}
					}
					b.ReportMetric(flops*float64(b.N)/b.Elapsed().Seconds()/1e9, "GFLOP/s")
				})
			}
		}
	}
}
