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
	// MLAChunks: one chunk of consecutive queries (see mla_chunk.go).
	chunks  bool // set in job.mla: the job's units are MLAChunks units
	heads   int
	start   int // position of the chunk's first query
	nq      int // queries in the chunk
	sstride int // floats between score rows in scratch
	tiles   int // query tiles of the chunk
	unitEnd int // end (exclusive) of the chunk's units in the job
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

// MLARow is one query row of MLADecodeMany: its queries, output, the
// cache blocks it attends to (its first NTokens tokens) and scratch of
// MLAScratchSize(heads, NTokens) floats.
type MLARow struct {
	Out, QLat, QPE []float32
	Blocks         [][]float32
	NTokens        int
	Scratch        []float32
}

// MLADecodeMany is MLADecode for many query rows in one pool call: the
// rows of a batched decode step (each its own sequence) or of a prefill
// chunk (one sequence, each row seeing the tokens up to its own). The
// threads claim (row, group of heads) units as they finish, so rows of
// different lengths balance, and rows over the same pages read them from
// cache. Each row's result is exactly MLADecode's.
func (p *Pool) MLADecodeMany(rows []MLARow, blockSize, heads, R, P int, scale float32) {
	if heads < 0 || R <= 0 || P < 0 || blockSize <= 0 {
		panic(fmt.Sprintf("kernels: MLADecodeMany bad dims heads=%d R=%d P=%d blockSize=%d", heads, R, P, blockSize))
	}
	if heads == 0 || len(rows) == 0 {
		return
	}
	toks := 0
	for i := range rows {
		r := &rows[i]
		checkMLA("MLADecodeMany", r.Out, r.QLat, r.QPE, r.Blocks, blockSize, r.NTokens, heads, R, P, r.Scratch)
		toks += r.NTokens
	}
	if cap(p.mlaQ) < len(rows)*heads*(R+P) {
		p.mlaQ = make([]float32, len(rows)*heads*(R+P))
	}
	if cap(p.mlaRows) < toks {
		p.mlaRows = make([]*float32, toks, 2*toks)
	}
	if cap(p.mlaArgs) < len(rows) {
		p.mlaArgs = make([]mlaArgs, len(rows), 2*len(rows))
	}
	p.mlaArgs = p.mlaArgs[:len(rows)]
	args := p.mlaArgs
	off := 0
	for i := range rows {
		r := &rows[i]
		if r.NTokens == 0 {
			clear(r.Out[:heads*R])
		}
		tr := p.mlaRows[off : off+r.NTokens]
		off += r.NTokens
		for t := range tr {
			tr[t] = &r.Blocks[t/blockSize][(t%blockSize)*(R+P)]
		}
		args[i] = mlaArgs{out: r.Out, qLat: r.QLat, qPE: r.QPE, blocks: r.Blocks, blockSize: blockSize,
			nTokens: r.NTokens, r: R, pe: P, scale: scale, scratch: r.Scratch,
			qc: p.mlaQ[i*heads*(R+P) : (i+1)*heads*(R+P)], rows: tr}
	}
	g := 8
	if heads%8 != 0 {
		g = heads
	}
	p.job = job{kind: jobMLAMany, n: len(rows) * heads, grain: g, chunk: g, rows: heads}
	p.run()
	clear(args) // drop the caller's buffers
}

// mlaMany runs units [lo,hi) of an MLADecodeMany job: unit u is head
// u%heads of row u/heads (or of an MLAChunks job: see mlaChunkUnits).
func (p *Pool) mlaMany(lo, hi int) {
	if p.job.mla.chunks {
		p.mlaChunkUnits(lo, hi)
		return
	}
	heads := p.job.rows
	for u := lo; u < hi; {
		r, h0 := u/heads, u%heads
		h1 := min(heads, h0+hi-u)
		if a := &p.mlaArgs[r]; a.nTokens > 0 {
			mlaHeads(a, h0, h1)
		}
		u += h1 - h0
	}
}

// checkMLA panics when the arguments of one query row do not fit.
func checkMLA(op string, out, qLat, qPE []float32, blocks [][]float32, blockSize, nTokens, heads, R, P int, scratch []float32) {
	if nTokens < 0 {
		panic(fmt.Sprintf("kernels: %s nTokens=%d", op, nTokens))
	}
	if len(out) < heads*R || len(qLat) < heads*R || len(qPE) < heads*P {
		panic(fmt.Sprintf("kernels: %s heads=%d R=%d P=%d: len(out)=%d len(qLat)=%d len(qPE)=%d", op, heads, R, P, len(out), len(qLat), len(qPE)))
	}
	if len(scratch) < MLAScratchSize(heads, nTokens) {
		panic(fmt.Sprintf("kernels: %s scratch has %d floats, need %d", op, len(scratch), MLAScratchSize(heads, nTokens)))
	}
	nb := ceilDiv(nTokens, blockSize)
	if len(blocks) < nb {
		panic(fmt.Sprintf("kernels: %s %d tokens need %d blocks, have %d", op, nTokens, nb, len(blocks)))
	}
	for b := 0; b < nb; b++ {
		used := min(blockSize, nTokens-b*blockSize)
		if len(blocks[b]) < used*(R+P) {
			panic(fmt.Sprintf("kernels: %s block %d has %d floats, need %d", op, b, len(blocks[b]), used*(R+P)))
		}
	}
}
