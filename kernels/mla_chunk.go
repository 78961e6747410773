package kernels

import "fmt"

// MLAChunk is a run of NQ consecutive query positions of one sequence (a
// prefill chunk): query i sits at position Start+i and attends to the
// sequence's tokens 0..Start+i, which must all be in Blocks already (the
// chunk's own latents written before the call). Out and QLat are
// [NQ][H][R], QPE [NQ][H][P], in the layout of MLADecodeMany's rows laid
// end to end. Scratch holds MLAChunkScratchSize(H, Start, NQ) floats.
type MLAChunk struct {
	Out, QLat, QPE []float32
	Blocks         [][]float32
	Start, NQ      int
	Scratch        []float32
}

// MLAChunkScratchSize is the number of floats of scratch an MLAChunk of
// nq queries from position start needs: every query's scores for every
// head, rows padded to a multiple of the score kernel's four tokens.
func MLAChunkScratchSize(heads, start, nq int) int {
	return heads * nq * mlaScoreStride(start, nq)
}

func mlaScoreStride(start, nq int) int { return (start + nq + 3) &^ 3 }

// mlaChunkTile is the queries of one unit of an MLAChunks job (with one
// head): eight of the AVX-512 micro-kernels' 6-query tiles, which share
// each pass over the cache (see mlaChunkUnit). A 512-query chunk's 16
// heads still make 176 units (the threads balance however the causal
// lengths fall). BenchmarkMLAChunk, 1 thread, medians of 3 alternated
// rounds at load 3.9: 24 -> 48 queries took 512 queries from 0 from 45
// to 37 ms and 64 after 4032 tokens from 92 to 81 ms; 96 gave 44 and 73.
const mlaChunkTile = 48

// MLAChunks is absorbed MLA (MLADecode's arithmetic) for chunks of
// consecutive queries of one sequence each, in one pool call: a prefill
// step's chunks. The threads claim (chunk, head, tile of queries) units,
// longest first. On AVX-512 each cache row a micro-kernel loads serves up
// to six queries of a head (scores as a small matrix product per group of
// four rows, the weighted latent sum with the outputs in registers), where
// MLADecodeMany reads every row once per query and group of 8 heads. Each
// query's result equals MLADecode's for it to float32 rounding (the
// same products, summed in another order); on the plain path they are
// identical. Mismatched sizes panic.
func (p *Pool) MLAChunks(chunks []MLAChunk, blockSize, heads, R, P int, scale float32) {
	if heads < 0 || R <= 0 || P < 0 || blockSize <= 0 {
		panic(fmt.Sprintf("kernels: MLAChunks bad dims heads=%d R=%d P=%d blockSize=%d", heads, R, P, blockSize))
	}
	toks := 0
	for i := range chunks {
		c := &chunks[i]
		if c.Start < 0 || c.NQ < 0 {
			panic(fmt.Sprintf("kernels: MLAChunks chunk %d: Start=%d NQ=%d", i, c.Start, c.NQ))
		}
		if len(c.Out) < c.NQ*heads*R || len(c.QLat) < c.NQ*heads*R || len(c.QPE) < c.NQ*heads*P {
			panic(fmt.Sprintf("kernels: MLAChunks chunk %d NQ=%d heads=%d R=%d P=%d: len(Out)=%d len(QLat)=%d len(QPE)=%d",
				i, c.NQ, heads, R, P, len(c.Out), len(c.QLat), len(c.QPE)))
		}
		if len(c.Scratch) < MLAChunkScratchSize(heads, c.Start, c.NQ) {
			panic(fmt.Sprintf("kernels: MLAChunks chunk %d scratch has %d floats, need %d", i, len(c.Scratch), MLAChunkScratchSize(heads, c.Start, c.NQ)))
		}
		checkBlocks("MLAChunks", c.Blocks, blockSize, c.Start+c.NQ, R, P)
		if c.NQ > 0 {
			toks += mlaScoreStride(c.Start, c.NQ)
		}
	}
	if heads == 0 {
		return
	}
	if cap(p.mlaRows) < toks {
		p.mlaRows = make([]*float32, toks, 2*toks)
	}
	if cap(p.mlaArgs) < len(chunks) {
		p.mlaArgs = make([]mlaArgs, len(chunks), 2*len(chunks))
	}
	p.mlaArgs = p.mlaArgs[:len(chunks)]
	args := p.mlaArgs
	off, units := 0, 0
	for i := range chunks {
		c := &chunks[i]
		if c.NQ == 0 {
			args[i] = mlaArgs{unitEnd: units}
			continue
		}
		// Rows padded to the score stride point at token 0: the score
		// kernel reads four rows at a time, and their scores are masked.
		tc := mlaScoreStride(c.Start, c.NQ)
		tr := p.mlaRows[off : off+tc]
		off += tc
		nt := c.Start + c.NQ
		for t := range tr {
			if t < nt {
				tr[t] = &c.Blocks[t/blockSize][(t%blockSize)*(R+P)]
			} else {
				tr[t] = &c.Blocks[0][0]
			}
		}
		tiles := ceilDiv(c.NQ, mlaChunkTile)
		units += heads * tiles
		args[i] = mlaArgs{out: c.Out, qLat: c.QLat, qPE: c.QPE, blocks: c.Blocks, blockSize: blockSize,
			r: R, pe: P, scale: scale, scratch: c.Scratch, rows: tr,
			heads: heads, start: c.Start, nq: c.NQ, sstride: tc, tiles: tiles, unitEnd: units}
	}
	p.job = job{kind: jobMLAMany, n: units, grain: 1, chunk: 1, mla: mlaArgs{chunks: true}}
	p.run()
	clear(args) // drop the caller's buffers
}

// mlaChunkUnits runs units [lo,hi) of an MLAChunks job. A chunk's units
// are its (tile, head) pairs, last tile (the longest rows) first.
func (p *Pool) mlaChunkUnits(lo, hi int) {
	c := 0
	for u := lo; u < hi; u++ {
		for p.mlaArgs[c].unitEnd <= u {
			c++
		}
		a := &p.mlaArgs[c]
		first := a.unitEnd - a.heads*a.tiles
		k := u - first
		tile := a.tiles - 1 - k/a.heads
		q0 := tile * mlaChunkTile
		mlaChunkUnit(a, k%a.heads, q0, min(a.nq, q0+mlaChunkTile))
	}
}

// mlaChunkUnitGeneric computes queries [q0,q1) of head h one at a time,
// exactly as mlaHeadsGeneric computes a decode row.
func mlaChunkUnitGeneric(a *mlaArgs, h, q0, q1 int) {
	R, P, H, stride := a.r, a.pe, a.heads, a.r+a.pe
	for i := q0; i < q1; i++ {
		n := a.start + i + 1
		ql := a.qLat[(i*H+h)*R : (i*H+h+1)*R]
		qp := a.qPE[(i*H+h)*P : (i*H+h+1)*P]
		s := a.scratch[(h*a.nq+i)*a.sstride:][:n]
		for t := range s {
			row := a.blocks[t/a.blockSize][(t%a.blockSize)*stride:]
			s[t] = a.scale * (impl.dot(ql, row[:R]) + impl.dot(qp, row[R:R+P]))
		}
		Softmax(s)
		o := a.out[(i*H+h)*R : (i*H+h+1)*R]
		clear(o)
		for t, pt := range s {
			row := a.blocks[t/a.blockSize][(t%a.blockSize)*stride:]
			impl.axpy(o, pt, row[:R])
		}
	}
}

// checkBlocks panics unless blocks hold nTokens tokens of R+P floats.
func checkBlocks(op string, blocks [][]float32, blockSize, nTokens, R, P int) {
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
