package placement

// Routing is what an attention node dispatches by: one placement version
// and where its nodes are. It is immutable once published.
type Routing struct {
	Table *Table
	// Addrs[i] is the dispatch address of Table.Nodes()[i], "" while that
	// node is not a live member (its lease expired, it is restarting).
	Addrs []string
}

// View is an attention node's window on the cluster's expert placement.
// Implementations: Static here; the etcd-backed view in package
// controlplane.
type View interface {
	// Routing returns the routing in force and a channel closed once a
	// newer one replaces it (a new placement version, or a member's
	// address changed).
	Routing() (*Routing, <-chan struct{})
	// InUse reports the oldest placement version a running step still
	// dispatches by and the newest the node has switched to, so expert
	// nodes know when experts only older versions assign may be dropped.
	InUse(oldest, newest uint64)
}

// Static is a View that never changes: a table whose node ids are
// the expert nodes' addresses (--placement).
type Static struct {
	r  *Routing
	ch chan struct{}
}

// NewStatic serves t, dialling each node id as an address.
func NewStatic(t *Table) *Static {
	return &Static{r: &Routing{Table: t, Addrs: append([]string(nil), t.Nodes()...)}, ch: make(chan struct{})}
}

// Routing implements View; the channel is never closed.
func (s *Static) Routing() (*Routing, <-chan struct{}) { return s.r, s.ch }

// InUse implements View; a static placement has nothing to drop.
func (s *Static) InUse(oldest, newest uint64) {}
