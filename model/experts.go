package model

import (
	"context"
	"errors"
	"fmt"

	"github.com/expertmesh/expertmesh/kernels"
)

// ErrExpertNotLoaded is returned when a row is routed to an expert this
// process does not hold.
var ErrExpertNotLoaded = errors.New("expert not loaded")

// ExpertRunner computes weighted sums of routed experts for batches of
// rows, grouping rows by expert so each expert's weights stream once per
// batch. Expert nodes and the single-process engine share it. One caller
// at a time.
type ExpertRunner struct {
	W    *Weights
	Pool *kernels.Pool
	// BF16Act: see Engine.BF16Prefill.
	BF16Act bool

	rowsOf      [][]int32   // expert -> row indices
	wOf         [][]float32 // expert -> gate weight per row
	in, g, u, y []float32
	// runSingles scratch
	sIdx []int
	prod products
}

// products is a list of independent products for one pool call
// (Pool.MatVecMany, or MatMulMany when some take several rows), kept
// across calls so decode allocates nothing.
type products struct {
	ws     []*kernels.Matrix
	ys, xs [][]float32
	ns     []int
	multi  bool // some product has other than one row
}

// reset empties the list and drops its references to callers' buffers.
func (l *products) reset() {
	clear(l.ws)
	clear(l.ys)
	clear(l.xs)
	l.ws, l.ys, l.xs, l.ns, l.multi = l.ws[:0], l.ys[:0], l.xs[:0], l.ns[:0], false
}

func (l *products) add(y []float32, w *kernels.Matrix, x []float32) { l.addN(y, w, x, 1) }

// addN adds y = w·x over n rows of x.
func (l *products) addN(y []float32, w *kernels.Matrix, x []float32, n int) {
	l.ws, l.ys, l.xs, l.ns = append(l.ws, w), append(l.ys, y), append(l.xs, x), append(l.ns, n)
	l.multi = l.multi || n != 1
}

// run computes every product in one pool call and empties the list.
func (l *products) run(p *kernels.Pool) {
	if l.multi {
		p.MatMulMany(l.ys, l.ws, l.xs, l.ns)
	} else {
		p.MatVecMany(l.ys, l.ws, l.xs)
	}
	l.reset()
}

// NewLocalExperts is the in-process ExpertBackend.
func NewLocalExperts(w *Weights, pool *kernels.Pool) *ExpertRunner {
	return &ExpertRunner{W: w, Pool: pool}
}

// StartRoutedExperts implements ExpertBackend. Local experts compute at
// once; wait only reports the result.
func (r *ExpertRunner) StartRoutedExperts(_ context.Context, layer int, x []float32, n, k int, ids []int32, weights []float32, out []float32) func() error {
	if err := r.Run(layer, x, n, k, ids, weights, out); err != nil {
		return func() error { return err }
	}
	return waitNone
}

// waitNone is the wait of work already done: no allocation per layer.
func waitNone() error { return nil }

// Run adds Σ_j weights[i*k+j]·Expert_{ids[i*k+j]}(x_i) to out_i for each
// of the n rows of x. Ids < 0 are skipped (rows routed to other nodes).
func (r *ExpertRunner) Run(layer int, x []float32, n, k int, ids []int32, weights []float32, out []float32) error {
	return r.runAlongside(layer, x, n, k, ids, weights, out, product{})
}

// product is one matrix product, y = w·x over n rows of x (0 means 1);
// a nil w means none.
type product struct {
	y []float32
	w *kernels.Matrix
	x []float32
	n int
}

// runAlongside is Run that also computes extra, a product independent of
// the experts, in the same pool call as the experts' gate and up products
// (with BF16 activations: those of the experts that have one row): the
// engine's shared expert down product then costs no pool round trip of
// its own. extra is not computed when Run's checks fail.
func (r *ExpertRunner) runAlongside(layer int, x []float32, n, k int, ids []int32, weights []float32, out []float32, extra product) error {
	c := r.W.Config
	if layer < 0 || layer >= len(r.W.Layers) || r.W.Layers[layer].MoE == nil {
		return fmt.Errorf("%w: layer %d is not an MoE layer", ErrBadInput, layer)
	}
	experts := r.W.Layers[layer].MoE.Experts
	h := c.HiddenSize
	if len(x) < n*h || len(out) < n*h || len(ids) < n*k || len(weights) < n*k {
		return fmt.Errorf("%w: buffers too small for %d rows", ErrBadInput, n)
	}
	if len(r.rowsOf) < len(experts) {
		r.rowsOf = make([][]int32, len(experts))
		r.wOf = make([][]float32, len(experts))
	}
	for e := range experts {
		if cap(r.rowsOf[e]) < n {
			// An expert takes each row at most once: room for n rows
			// means no append below ever allocates at this batch size.
			r.rowsOf[e] = make([]int32, 0, max(n, 2*cap(r.rowsOf[e])))
			r.wOf[e] = make([]float32, 0, max(n, 2*cap(r.wOf[e])))
		}
		r.rowsOf[e] = r.rowsOf[e][:0]
		r.wOf[e] = r.wOf[e][:0]
	}
	for i := range n {
		for j := range k {
			id := ids[i*k+j]
			if id < 0 {
				continue
			}
			if int(id) >= len(experts) || experts[id] == nil {
				return fmt.Errorf("%w: layer %d expert %d", ErrExpertNotLoaded, layer, id)
			}
			r.rowsOf[id] = append(r.rowsOf[id], int32(i))
			r.wOf[id] = append(r.wOf[id], weights[i*k+j])
		}
	}
	inter := c.MoEIntermediateSize
	r.prod.reset()
	if extra.w != nil {
		r.prod.addN(extra.y, extra.w, extra.x, max(1, extra.n))
	}
	if r.BF16Act {
		// BF16 activations (an opt-in prefill trade) run per expert.
		r.runSingles(experts, x, out, h, inter)
		r.runEach(experts, x, out, h, inter)
		return nil
	}
	r.runGrouped(experts, x, out, h, inter)
	return nil
}

// runGrouped computes every expert that has rows in two pool calls in
// all, whatever the batch: every expert's gate and up products over its
// rows (with whatever r.prod already holds), then every down product.
// Each expert's weights stream once for all its rows, and the threads
// share out all the experts' rows together, so the batch pays two
// barriers, not three per expert.
func (r *ExpertRunner) runGrouped(experts []*MLP, x, out []float32, h, inter int) {
	r.sIdx = r.sIdx[:0]
	total, gathered := 0, 0
	for e, rows := range r.rowsOf[:len(experts)] {
		if len(rows) > 0 {
			r.sIdx = append(r.sIdx, e)
			total += len(rows)
			if len(rows) > 1 {
				gathered += len(rows)
			}
		}
	}
	r.in = grow(r.in, gathered*h)
	r.g = grow(r.g, total*inter)
	r.u = grow(r.u, total*inter)
	r.y = grow(r.y, total*h)
	off, goff := 0, 0
	for _, e := range r.sIdx {
		rows := r.rowsOf[e]
		m := len(rows)
		var xe []float32
		if m == 1 {
			xe = x[int(rows[0])*h : int(rows[0]+1)*h] // read in place
		} else {
			xe = r.in[goff*h : (goff+m)*h]
			for j, row := range rows {
				copy(xe[j*h:(j+1)*h], x[int(row)*h:int(row+1)*h])
			}
			goff += m
		}
		r.prod.addN(r.g[off*inter:(off+m)*inter], experts[e].Gate, xe, m)
		r.prod.addN(r.u[off*inter:(off+m)*inter], experts[e].Up, xe, m)
		off += m
	}
	r.prod.run(r.Pool)
	if total == 0 {
		return
	}
	kernels.SiLUMul(r.g[:total*inter], r.g[:total*inter], r.u[:total*inter])
	off = 0
	for _, e := range r.sIdx {
		m := len(r.rowsOf[e])
		r.prod.addN(r.y[off*h:(off+m)*h], experts[e].Down, r.g[off*inter:(off+m)*inter], m)
		off += m
	}
	r.prod.run(r.Pool)
	off = 0
	for _, e := range r.sIdx {
		for j, row := range r.rowsOf[e] {
			kernels.Axpy(out[int(row)*h:int(row+1)*h], r.wOf[e][j], r.y[(off+j)*h:(off+j+1)*h])
		}
		off += len(r.rowsOf[e])
	}
}

// runEach computes the experts with several rows one at a time (three
// matrix products each), for BF16 activations.
func (r *ExpertRunner) runEach(experts []*MLP, x, out []float32, h, inter int) {
	for e, rows := range r.rowsOf[:len(experts)] {
		m := len(rows)
		if m <= 1 {
			continue // none, or done by runSingles
		}
		r.in = grow(r.in, m*h)
		r.g = grow(r.g, m*inter)
		r.u = grow(r.u, m*inter)
		r.y = grow(r.y, m*h)
		for j, row := range rows {
			copy(r.in[j*h:(j+1)*h], x[int(row)*h:int(row+1)*h])
		}
		ex := experts[e]
		r.mm(r.g, ex.Gate, r.in, m)
		r.mm(r.u, ex.Up, r.in, m)
		kernels.SiLUMul(r.g, r.g, r.u)
		r.mm(r.y, ex.Down, r.g, m)
		for j, row := range rows {
			kernels.Axpy(out[int(row)*h:int(row+1)*h], r.wOf[e][j], r.y[j*h:(j+1)*h])
		}
	}
}

// runSingles computes every expert that has exactly one row with two
// pool calls in all: every gate and up product at once (with whatever
// r.prod already holds), then every down product.
func (r *ExpertRunner) runSingles(experts []*MLP, x, out []float32, h, inter int) {
	r.sIdx = r.sIdx[:0]
	for e, rows := range r.rowsOf[:len(experts)] {
		if len(rows) == 1 {
			r.sIdx = append(r.sIdx, e)
		}
	}
	k := len(r.sIdx)
	r.g = grow(r.g, k*inter)
	r.u = grow(r.u, k*inter)
	r.y = grow(r.y, k*h)
	for j, e := range r.sIdx {
		row := int(r.rowsOf[e][0])
		xr := x[row*h : (row+1)*h]
		r.prod.add(r.g[j*inter:(j+1)*inter], experts[e].Gate, xr)
		r.prod.add(r.u[j*inter:(j+1)*inter], experts[e].Up, xr)
	}
	r.prod.run(r.Pool)
	if k == 0 {
		return
	}
	kernels.SiLUMul(r.g[:k*inter], r.g[:k*inter], r.u[:k*inter])
	for j, e := range r.sIdx {
		r.prod.add(r.y[j*h:(j+1)*h], experts[e].Down, r.g[j*inter:(j+1)*inter])
	}
	r.prod.run(r.Pool)
	for j, e := range r.sIdx {
		row := int(r.rowsOf[e][0])
		kernels.Axpy(out[row*h:(row+1)*h], r.wOf[e][0], r.y[j*h:(j+1)*h])
	}
}

func (r *ExpertRunner) mm(y []float32, w *kernels.Matrix, x []float32, n int) {
	matmul(r.Pool, y, w, x, n, r.BF16Act)
}
