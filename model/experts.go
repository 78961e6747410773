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
}

// NewLocalExperts is the in-process ExpertBackend.
func NewLocalExperts(w *Weights, pool *kernels.Pool) *ExpertRunner {
	return &ExpertRunner{W: w, Pool: pool}
}

// StartRoutedExperts implements ExpertBackend. Local experts compute at
// once; wait only reports the result.
func (r *ExpertRunner) StartRoutedExperts(_ context.Context, layer int, x []float32, n, k int, ids []int32, weights []float32, out []float32) func() error {
	err := r.Run(layer, x, n, k, ids, weights, out)
	return func() error { return err }
}

// Run adds Σ_j weights[i*k+j]·Expert_{ids[i*k+j]}(x_i) to out_i for each
// of the n rows of x. Ids < 0 are skipped (rows routed to other nodes).
func (r *ExpertRunner) Run(layer int, x []float32, n, k int, ids []int32, weights []float32, out []float32) error {
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
	for e, rows := range r.rowsOf[:len(experts)] {
		m := len(rows)
		if m == 0 {
			continue
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
	return nil
}

func (r *ExpertRunner) mm(y []float32, w *kernels.Matrix, x []float32, n int) {
	matmul(r.Pool, y, w, x, n, r.BF16Act)
}
