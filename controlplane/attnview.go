package controlplane

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"sync/atomic"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/trace"

	"github.com/expertmesh/expertmesh/placement"
)

// AttnView is an attention node's window on the placement: the etcd-backed
// placement.View. It follows the active version, the stored tables and the
// expert members' addresses, and publishes a new Routing whenever the
// active version or an address of a node it names changes. When etcd is
// unreachable, or the active key vanishes, the last routing stays in
// force. It also reports the versions the node's steps use (InUse) under
// the node's lease, and which coordinator epochs are alive
// (OnCoordinators).
//
// The attention node's side of the protocol: take r, ch := Routing() at
// every step start and pin r for the whole step; report InUse(oldest,
// newest) whenever the versions its running steps use change, where oldest
// is the oldest version a running step dispatches by (with no step
// running, the version of the newest routing taken) and newest the newest
// routing taken. While idle, acknowledge a new routing (ch closed) by
// taking it and reporting InUse(v, v). Expert nodes drop what a newer
// version no longer assigns them only once every attention node's oldest
// has passed it.
type AttnView struct {
	store *Store
	reg   *Registration
	shape placement.Shape
	log   *slog.Logger
	w     *Watcher

	cur   atomic.Pointer[routingState]
	ready chan struct{}

	inuse struct {
		sync.Mutex
		v        InUse
		reported bool // InUse was called
	}
	inuseKick chan struct{}

	coord struct {
		sync.Mutex
		epochs []uint64
		known  bool
		fns    []func([]uint64)
	}
	// callMu serialises callbacks so that every fn sees the sets in order.
	callMu sync.Mutex

	cancel context.CancelFunc
	wg     sync.WaitGroup
}

type routingState struct {
	r  *placement.Routing
	ch chan struct{} // closed when a newer routing replaces r
}

var _ placement.View = (*AttnView)(nil)

// NewAttnView starts the view of the attention node registered by reg.
// Wait for the first routing before dispatching.
func NewAttnView(ctx context.Context, s *Store, reg *Registration, shape placement.Shape) (*AttnView, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if m := reg.Member(); m.Role != RoleAttn {
		return nil, fmt.Errorf("%w: an attention view needs an attention node's registration, not %s's", ErrConfig, m.Role)
	}
	bg, cancel := context.WithCancel(context.Background())
	k := s.keys
	v := &AttnView{
		store: s, reg: reg, shape: shape, log: s.log.With("view", reg.Member().ID),
		w:         newWatcher(bg, s, k.Prefix(), k.Active(), k.Versions(), k.ReadyPrefix(), k.MembersOf(RoleExpert), k.MembersOf(RoleCoordinator)),
		ready:     make(chan struct{}),
		inuseKick: make(chan struct{}, 1),
		cancel:    cancel,
	}
	v.cur.Store(&routingState{ch: make(chan struct{})})
	v.wg.Add(2)
	go v.run(bg)
	go v.writeInUse(bg)
	return v, nil
}

// Routing implements placement.View: the routing in force (nil before
// the first active placement; see Wait) and a channel closed when a newer
// one replaces it. It is cheap: one atomic load.
func (v *AttnView) Routing() (*placement.Routing, <-chan struct{}) {
	s := v.cur.Load()
	return s.r, s.ch
}

// Wait waits until an active placement exists (or ctx ends).
func (v *AttnView) Wait(ctx context.Context) error {
	select {
	case <-v.ready:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// InUse implements placement.View. It only records the pair (and wakes a
// writer when it changed): cheap enough for every step, no etcd I/O on
// the caller's goroutine. The writer puts the newest pair in
// placement/inuse/<id> under the node's lease.
func (v *AttnView) InUse(oldest, newest uint64) {
	u := InUse{Oldest: oldest, Newest: newest}
	v.inuse.Lock()
	same := v.inuse.reported && v.inuse.v == u
	v.inuse.v, v.inuse.reported = u, true
	v.inuse.Unlock()
	if !same {
		select {
		case v.inuseKick <- struct{}{}:
		default:
		}
	}
}

// OnCoordinators registers fn to be called with the epochs of the live
// coordinators (members whose lease is alive), sorted, whenever that set
// changes; at once if it is already known. The attention node drops the
// sequences of an epoch that is not live. fn runs on the view's goroutine
// and must not block.
func (v *AttnView) OnCoordinators(fn func(live []uint64)) {
	v.callMu.Lock()
	defer v.callMu.Unlock()
	v.coord.Lock()
	v.coord.fns = append(v.coord.fns, fn)
	known, epochs := v.coord.known, slices.Clone(v.coord.epochs)
	v.coord.Unlock()
	if known {
		fn(epochs)
	}
}

// Close stops the view: its watcher and writer goroutines. The routing in
// force stays readable; the in-use key stays under the node's lease until
// the registration closes.
func (v *AttnView) Close() error {
	v.cancel()
	v.wg.Wait()
	v.w.Close()
	return nil
}

func (v *AttnView) run(ctx context.Context) {
	defer v.wg.Done()
	cache := tableCache{}
	for {
		var snap Snapshot
		select {
		case <-ctx.Done():
			return
		case snap = <-v.w.C():
		}
		st := readState(v.store.keys, snap, v.shape, cache)
		v.updateRouting(st)
		v.updateCoordinators(st)
	}
}

func (v *AttnView) updateRouting(st *clusterState) {
	cur := v.cur.Load()
	t := st.table(st.active)
	if t == nil {
		if st.active != 0 {
			if err, bad := st.badVersions[st.active]; bad {
				v.log.Error("the active placement does not fit this model; keeping the last routing", "version", st.active, "err", err)
			}
		}
		return // no active placement (yet, or etcd lost it): keep routing as before
	}
	// A node is dialled once it is a member that reported ready: a node
	// (re)started since it was placed holds nothing until then.
	addrs := make([]string, len(t.Nodes()))
	for i, id := range t.Nodes() {
		if m, ok := st.members[RoleExpert][id]; ok {
			if _, ready := st.ready[id]; ready {
				addrs[i] = m.Addr
			}
		}
	}
	if cur.r != nil && cur.r.Table == t && slices.Equal(cur.r.Addrs, addrs) {
		return
	}
	if cur.r != nil && cur.r.Table.Version == t.Version && t.Equal(cur.r.Table) && slices.Equal(cur.r.Addrs, addrs) {
		return
	}
	next := &routingState{r: &placement.Routing{Table: t, Addrs: addrs}, ch: make(chan struct{})}
	v.cur.Store(next)
	close(cur.ch)
	if cur.r == nil {
		v.log.Info("first placement", "version", t.Version)
		close(v.ready)
		// Until the node reports, it will route by this version or a
		// newer one.
		v.inuse.Lock()
		if !v.inuse.reported {
			v.inuse.v = InUse{Oldest: t.Version, Newest: t.Version}
			v.inuse.Unlock()
			select {
			case v.inuseKick <- struct{}{}:
			default:
			}
		} else {
			v.inuse.Unlock()
		}
	} else if cur.r.Table.Version != t.Version {
		v.log.Info("placement switched", "from", cur.r.Table.Version, "to", t.Version)
		// A span marks the moment (its own trace: no request caused it).
		_, span := otel.Tracer("github.com/expertmesh/expertmesh/controlplane").Start(context.Background(), "placement.switch", trace.WithAttributes(
			attribute.Int64("from", int64(cur.r.Table.Version)), attribute.Int64("to", int64(t.Version)), attribute.String("node_id", v.reg.Member().ID)))
		span.End()
	}
}

func (v *AttnView) updateCoordinators(st *clusterState) {
	var epochs []uint64
	for _, m := range st.members[RoleCoordinator] {
		if !slices.Contains(epochs, m.Epoch) {
			epochs = append(epochs, m.Epoch)
		}
	}
	slices.Sort(epochs)
	v.callMu.Lock()
	defer v.callMu.Unlock()
	v.coord.Lock()
	if v.coord.known && slices.Equal(epochs, v.coord.epochs) {
		v.coord.Unlock()
		return
	}
	v.coord.epochs, v.coord.known = epochs, true
	fns := slices.Clone(v.coord.fns)
	v.coord.Unlock()
	for _, fn := range fns {
		fn(slices.Clone(epochs))
	}
}

// writeInUse hands the newest in-use pair to the registration, which
// writes it under the node's lease (and again after re-registration).
func (v *AttnView) writeInUse(ctx context.Context) {
	defer v.wg.Done()
	key := v.store.keys.InUse(v.reg.Member().ID)
	var last string
	for {
		select {
		case <-ctx.Done():
			return
		case <-v.inuseKick:
		}
		v.inuse.Lock()
		u := v.inuse.v
		v.inuse.Unlock()
		b, _ := json.Marshal(u)
		if string(b) == last {
			continue
		}
		if err := v.reg.Own(key, string(b)); err != nil {
			v.log.Warn("reporting versions in use failed", "err", err)
			continue
		}
		last = string(b)
	}
}
