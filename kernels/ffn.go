package kernels

import "fmt"

// FFNScratchSize is the scratch (floats) ExpertFFN needs for n tokens and
// an intermediate size of inter.
func FFNScratchSize(n, inter int) int { return 2 * n * inter }

// ExpertFFN runs one SwiGLU expert on n tokens:
//
//	out[i] = down · (SiLU(gate·x[i]) * (up·x[i]))
//
// gate and up are [inter x hidden], down is [hidden x inter]; x is n rows
// of hidden floats and out n rows of hidden. Gate and up are fused in one
// pass over the pool: each thread computes the same rows of both and
// applies SiLU·mul to them at once, so a call costs two synchronisations
// (three or four when the batch takes the dot-form path, which first
// reorders its input). scratch must hold FFNScratchSize(n, inter) floats.
// Mismatched shapes panic.
func (p *Pool) ExpertFFN(out, x []float32, n int, gate, up, down *Matrix, scratch []float32) {
	inter, hidden := gate.Rows, gate.Cols
	if up.Rows != inter || up.Cols != hidden || down.Rows != hidden || down.Cols != inter || gate.DType != up.DType || gate.IntAct() != up.IntAct() {
		panic(fmt.Sprintf("kernels: ExpertFFN shapes gate %dx%d %s, up %dx%d %s, down %dx%d do not form an FFN",
			gate.Rows, gate.Cols, gate.DType, up.Rows, up.Cols, up.DType, down.Rows, down.Cols))
	}
	if n < 0 || len(x) != n*hidden || len(out) != n*hidden || len(scratch) < FFNScratchSize(n, inter) {
		panic(fmt.Sprintf("kernels: ExpertFFN n=%d hidden=%d inter=%d: len(x)=%d len(out)=%d len(scratch)=%d (want %d)",
			n, hidden, inter, len(x), len(out), len(scratch), FFNScratchSize(n, inter)))
	}
	if n == 0 {
		return
	}
	p.streamed += uint64(gate.Bytes() + up.Bytes() + down.Bytes())
	g, u := scratch[:n*inter], scratch[n*inter:2*n*inter]
	var xa, ga *actQ8
	var xe, he []float32
	var xs, hs *splitX
	switch {
	case gate.IntAct():
		xa = p.quantize(0, gate, x, n)
	case splitUsed(gate, n):
		xs = p.splitOne(x, n, hidden)
	}
	if xa == nil && xs == nil {
		xe = p.prepare(gate, x, n)
	}
	p.job = job{kind: jobFFNGateUp, n: inter, grain: rowGrain, chunk: p.rowChunk(gate), w: gate, w2: up, x: x, xe: xe, act: xa, split: xs, rows: n, y: g, y2: u}
	p.run()
	switch {
	case down.IntAct():
		ga = p.quantize(1, down, g, n)
	case splitUsed(down, n):
		hs = p.splitOne(g, n, inter)
	}
	if ga == nil && hs == nil {
		he = p.prepare(down, g, n)
	}
	p.job = job{kind: jobRows, n: hidden, grain: rowGrain, chunk: p.rowChunk(down), w: down, x: g, xe: he, act: ga, split: hs, rows: n, y: out}
	p.run()
}

// prepare reorders x for the dot-form kernels when w and n take that path
// (returning the reordered rows, shared by all threads), else returns nil.
func (p *Pool) prepare(w *Matrix, x []float32, n int) []float32 {
	if !dotFormAvailable(w, n, false) {
		return nil
	}
	main := w.Cols &^ 31
	if cap(p.xe) < n*main {
		p.xe = make([]float32, n*main)
	}
	xe := p.xe[:n*main]
	p.job = job{kind: jobPermuteEO, n: n, grain: 1, w: w, x: x, xe: xe}
	p.run()
	return xe
}

// rowsFor computes y = W·x for W rows [lo,hi) and all n x rows on thread
// id, with whichever kernel MatVec/MatMul would use (xe from prepare, s
// from splitOne).
func (p *Pool) rowsFor(id int, y []float32, w *Matrix, x, xe []float32, act *actQ8, s *splitX, n, lo, hi int) {
	switch {
	case act != nil:
		qRows(y, w, act, n, lo, hi)
	case s != nil:
		matMulSplitRows(y, w, s, lo, hi, p.scratchFor(id, splitScratch(w.Cols)))
	case n == 1:
		matVecRows(y, w, x, lo, hi, p.scratchFor(id, w.Cols))
	case xe != nil:
		matMulDotRows(y, w, n, lo, hi, false, xe, x, nil, 0)
	default:
		matMulRows(y, w, x, n, lo, hi, p.scratchFor(id, matMulScratch(w.Cols)))
	}
}
