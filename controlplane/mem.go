package controlplane

import (
	"context"
	"sync"

	"github.com/expertmesh/expertmesh/placement"
)

// MemHolder is an in-memory ExpertHolder: it holds sets, nothing more.
// It stands in for an expert node where only the protocol matters
// (examples, tests of other roles). Safe for concurrent use.
type MemHolder struct {
	mu   sync.Mutex
	held placement.Set
}

// NewMemHolder returns a holder of nothing for shape.
func NewMemHolder(shape placement.Shape) *MemHolder {
	return &MemHolder{held: placement.NewSet(shape)}
}

// Hold implements ExpertHolder.
func (h *MemHolder) Hold(ctx context.Context, s placement.Set) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	h.held.Union(s)
	return nil
}

// Release implements ExpertHolder.
func (h *MemHolder) Release(s placement.Set) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.held = h.held.Minus(s)
	return nil
}

// Held implements ExpertHolder.
func (h *MemHolder) Held() placement.Set {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.held.Clone()
}

var _ ExpertHolder = (*MemHolder)(nil)
