package kernels

import "fmt"

type mlaArgs struct {
	out, qLat, qPE []float32
	blocks         [][]float32
	blockSize      int
	nTokens        int
	r, pe          int
	scale          float32
	scratch        []float32
	qc             []float32  // [heads][R+P] concatenated queries (pool-owned)
	rows           []*float32 // rows[t]: token t's cache row (pool-owned)
}

// MLAScratchSize is the number of floats of scratch MLADecode needs: one
// score per token for every head (heads are processed concurrently, each
// in its own slice, so the size does not depend on the thread count).
func MLAScratchSize(heads, nTokens int) int { return heads * nTokens }

// MLADecode is absorbed multi-head latent attention for one query token
// against a paged latent cache (the role FlashMLA plays on GPUs).
//
// heads H, latent rank R (kv_lora_rank), rope dim P. qLat is [H][R] (the
// query already multiplied into latent space), qPE [H][P] (rotated).
// blocks[b] holds blockSize tokens of R+P floats each, [latent(R) | k_pe(P)];
// token t lives at blocks[t/blockSize][(t%blockSize)*(R+P):]. Only the first
// nTokens count. For each head h:
//
//	s_t = scale*(qLat[h]·c_t + qPE[h]·kpe_t); p = softmax(s); out[h] = sum_t p_t*c_t
//
// out is [H][R]. scratch must hold MLAScratchSize(heads, nTokens) floats.
// Heads are split across the pool's threads. Mismatched sizes panic.
func (p *Pool) MLADecode(out, qLat, qPE []float32, blocks [][]float32, blockSize, nTokens, heads, R, P int, scale float32, scratch []float32) {
	if heads < 0 || R <= 0 || P < 0 || blockSize <= 0 || nTokens < 0 {
		panic(fmt.Sprintf("kernels: MLADecode bad dims heads=%d R=%d P=%d blockSize=%d nTokens=%d", heads, R, P, blockSize, nTokens))
	}
	if len(out) < heads*R || len(qLat) < heads*R || len(qPE) < heads*P {
		panic(fmt.Sprintf("kernels: MLADecode heads=%d R=%d P=%d: len(out)=%d len(qLat)=%d len(qPE)=%d", heads, R, P, len(out), len(qLat), len(qPE)))
	}
	if len(scratch) < MLAScratchSize(heads, nTokens) {
		panic(fmt.Sprintf("kernels: MLADecode scratch has %d floats, need %d", len(scratch), MLAScratchSize(heads, nTokens)))
	}
	nb := ceilDiv(nTokens, blockSize)
	if len(blocks) < nb {
		panic(fmt.Sprintf("kernels: MLADecode %d tokens need %d blocks, have %d", nTokens, nb, len(blocks)))
	}
	for b := 0; b < nb; b++ {
		used := min(blockSize, nTokens-b*blockSize)
		if len(blocks[b]) < used*(R+P) {
			panic(fmt.Sprintf("kernels: MLADecode block %d has %d floats, need %d", b, len(blocks[b]), used*(R+P)))
		}
	}
	if heads == 0 {
		return
	}
	if nTokens == 0 {
		clear(out[:heads*R])
		return
	}
	if cap(p.mlaQ) < heads*(R+P) {
		p.mlaQ = make([]float32, heads*(R+P))
	}
	if cap(p.mlaRows) < nTokens {
		p.mlaRows = make([]*float32, nTokens, 2*nTokens)
	}
	rows := p.mlaRows[:nTokens]
	for t := range rows {
		rows[t] = &blocks[t/blockSize][(t%blockSize)*(R+P)]
	}
	p.job = job{kind: jobMLA, n: heads, grain: 8, mla: mlaArgs{
		out: out, qLat: qLat, qPE: qPE, blocks: blocks, blockSize: blockSize,
		nTokens: nTokens, r: R, pe: P, scale: scale, scratch: scratch,
		qc: p.mlaQ[:heads*(R+P)], rows: rows,
	}}
	p.run()
}

// mlaOutInRegisters selects, on AVX-512, the value kernel that keeps the
// outputs in registers (mlaOut8AVX512) where R is a multiple of 32; false
// keeps the axpy form. Tests and benchmarks compare both.
var mlaOutInRegisters = true

// mlaScoresInPairs selects, on AVX-512, the score kernel that takes two
// tokens per pass (dot8x2AVX512); false scores one token at a time.
var mlaScoresInPairs = true

func mlaHeads(a *mlaArgs, h0, h1 int) { impl.mla(a, h0, h1) }

// mlaHeadsGeneric processes heads [h0,h1) one at a time: scores for every
// token, softmax, then the probability-weighted sum of latent rows.
func mlaHeadsGeneric(a *mlaArgs, h0, h1 int) {
	R, P, stride := a.r, a.pe, a.r+a.pe
	for h := h0; h < h1; h++ {
		ql := a.qLat[h*R : (h+1)*R]
		qp := a.qPE[h*P : (h+1)*P]
		s := a.scratch[h*a.nTokens : (h+1)*a.nTokens]
		for t := range s {
			row := a.blocks[t/a.blockSize][(t%a.blockSize)*stride:]
			s[t] = a.scale * (impl.dot(ql, row[:R]) + impl.dot(qp, row[R:R+P]))
		}
		Softmax(s)
		o := a.out[h*R : (h+1)*R]
		clear(o)
		for t, pt := range s {
			row := a.blocks[t/a.blockSize][(t%a.blockSize)*stride:]
			impl.axpy(o, pt, row[:R])
		}
	}
}
