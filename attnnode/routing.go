package attnnode

import (
	"sync"

	"github.com/expertmesh/expertmesh/placement"
)

// Routing is what an attention node dispatches by: one placement version
// and where its nodes are. It is immutable once published.
type Routing struct {
	Table *placement.Table
	// Addrs[i] is the dispatch address of Table.Nodes()[i], "" while that
	// node is not a live member (its lease expired, it is restarting).
	Addrs []string
}

// PlacementView is the attention node's window on the cluster's expert
// placement. Implementations: Static here; the etcd-backed view in package
// controlplane.
type PlacementView interface {
	// Routing returns the routing in force and a channel closed once a
	// newer one replaces it (a new placement version, or a member's
	// address changed).
	Routing() (*Routing, <-chan struct{})
	// InUse reports the oldest placement version a running step still
	// dispatches by and the newest the node has switched to, so expert
	// nodes know when experts only older versions assign may be dropped.
	InUse(oldest, newest uint64)
}

// Static is a PlacementView that never changes: a table whose node ids are
// the expert nodes' addresses (--placement).
type Static struct {
	r    *Routing
	once sync.Once
	ch   chan struct{}
}

// NewStatic serves t, dialling each node id as an address.
func NewStatic(t *placement.Table) *Static {
	return &Static{r: &Routing{Table: t, Addrs: append([]string(nil), t.Nodes()...)}, ch: make(chan struct{})}
}

// Routing implements PlacementView; the channel is never closed.
func (s *Static) Routing() (*Routing, <-chan struct{}) { return s.r, s.ch }

// InUse implements PlacementView; a static placement has nothing to drop.
func (s *Static) InUse(oldest, newest uint64) {}
