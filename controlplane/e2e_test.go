package controlplane

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/expertmesh/expertmesh/placement"
)

// invariant checks the make-before-break promise while the cluster
// changes: a step never dispatches by a routing that names a node lacking
// the expert, and no expert is released while a running step's routing
// assigns it to the releasing node.
type invariant struct {
	t  testing.TB
	mu sync.Mutex
	// running are the routings each fake attention node's running steps
	// pinned.
	running map[string][]*placement.Routing
	// holders and killed are keyed by address: a restarted node is a new
	// process (a new holder) behind the same id.
	holders map[string]*fakeHolder
	killed  map[string]bool
	bad     []string
	steps   int
}

func newInvariant(t testing.TB) *invariant {
	return &invariant{t: t, running: map[string][]*placement.Routing{}, holders: map[string]*fakeHolder{}, killed: map[string]bool{}}
}

func (inv *invariant) violate(format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	if len(inv.bad) < 20 {
		inv.bad = append(inv.bad, msg)
	}
}

func (inv *invariant) check() {
	inv.t.Helper()
	inv.mu.Lock()
	defer inv.mu.Unlock()
	for _, b := range inv.bad {
		inv.t.Error(b)
	}
	inv.bad = nil
}

// kill marks a node's process dead: dispatches to it fail as
// unreachable, which is the retry path, not a missing expert.
func (inv *invariant) kill(h *fakeHolder) {
	inv.mu.Lock()
	defer inv.mu.Unlock()
	inv.killed[h.addr] = true
}

// fakeHolder is an in-memory ExpertHolder recording its calls.
type fakeHolder struct {
	id    string
	addr  string
	inv   *invariant
	shape placement.Shape
	mu    sync.Mutex
	held  placement.Set
	calls []string
	// changed is closed (and replaced) at every Hold and Release.
	changed chan struct{}
}

func (h *fakeHolder) changedLocked() {
	close(h.changed)
	h.changed = make(chan struct{})
}

func (h *fakeHolder) changes() <-chan struct{} {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.changed
}

func newFakeHolder(inv *invariant, shape placement.Shape, id, addr string) *fakeHolder {
	h := &fakeHolder{id: id, addr: addr, inv: inv, shape: shape, held: placement.NewSet(shape), changed: make(chan struct{})}
	inv.mu.Lock()
	inv.holders[addr] = h
	inv.mu.Unlock()
	return h
}

// loadTime is how long a fake Hold takes (loading weights): the scenario's
// make phase, long enough that activating before readiness would show.
const loadTime = 30 * time.Millisecond

func (h *fakeHolder) Hold(ctx context.Context, s placement.Set) error {
	t := time.NewTimer(loadTime)
	defer t.Stop()
	select {
	case <-t.C:
	case <-ctx.Done():
		return ctx.Err()
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	h.held.Union(s)
	h.calls = append(h.calls, "hold "+s.String())
	h.changedLocked()
	return nil
}

func (h *fakeHolder) Release(s placement.Set) error {
	// Check and release atomically with respect to steps.
	h.inv.mu.Lock()
	defer h.inv.mu.Unlock()
	for attn, rs := range h.inv.running {
		for _, r := range rs {
			if i := slices.Index(r.Table.Nodes(), h.id); i < 0 || r.Addrs[i] != h.addr {
				continue // the step does not dispatch to this process
			}
			assigned := r.Table.Set(h.id)
			for _, p := range s.Pairs() {
				if assigned.Has(p[0], p[1]) {
					h.inv.violate("%s released layer %d expert %d while %s runs a step on version %d assigning it there", h.id, p[0], p[1], attn, r.Table.Version)
				}
			}
		}
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	h.held = h.held.Minus(s)
	h.calls = append(h.calls, "release "+s.String())
	h.changedLocked()
	return nil
}

func (h *fakeHolder) Held() placement.Set {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.held.Clone()
}

func (h *fakeHolder) callLog() []string {
	h.mu.Lock()
	defer h.mu.Unlock()
	return slices.Clone(h.calls)
}

// stepper is a fake attention node's step loop: up to two overlapping
// steps, each pinned to the routing it started with; every iteration
// checks that the pinned routings' nodes hold their experts.
func (inv *invariant) stepper(ctx context.Context, id string, v *AttnView, wg *sync.WaitGroup) {
	defer wg.Done()
	var running []*placement.Routing
	pace := time.NewTicker(2 * time.Millisecond) // load generation, not synchronisation
	defer pace.Stop()
	for {
		r, ch := v.Routing()
		inv.mu.Lock()
		running = append(running, r)
		if len(running) > 2 {
			running = running[1:] // the oldest step finishes
		}
		oldest, newest := running[0].Table.Version, running[0].Table.Version
		for _, rr := range running {
			oldest, newest = min(oldest, rr.Table.Version), max(newest, rr.Table.Version)
		}
		inv.running[id] = slices.Clone(running)
		v.InUse(oldest, newest)
		inv.steps++
		for _, rr := range running {
			for i, node := range rr.Table.Nodes() {
				if rr.Addrs[i] == "" {
					continue // not a ready member now: dispatch waits or retries
				}
				h := inv.holders[rr.Addrs[i]]
				if h == nil || inv.killed[rr.Addrs[i]] {
					continue
				}
				missing := rr.Table.Set(node).Minus(h.Held())
				if missing.Len() > 0 {
					inv.violate("%s routes version %d to %s, which lacks %s", id, rr.Table.Version, node, missing)
				}
			}
		}
		inv.mu.Unlock()
		select {
		case <-ctx.Done():
			return
		case <-ch:
		case <-pace.C:
		}
	}
}

// testNode is one in-process node: its own store (closing it is a
// SIGKILL), registration and agent or view.
type testNode struct {
	store *Store
	reg   *Registration
	agent *ExpertAgent
	view  *AttnView
	hold  *fakeHolder
}

func (n *testNode) close(ctx context.Context) {
	if n.agent != nil {
		n.agent.Close()
	}
	if n.view != nil {
		n.view.Close()
	}
	n.reg.Close(ctx)
	n.store.Close()
}

func startExpert(t *testing.T, ctx context.Context, addr string, inv *invariant, shape placement.Shape, id string, ttl time.Duration) *testNode {
	return startExpertAt(t, ctx, addr, inv, shape, id, "127.0.0.1:1"+id, ttl)
}

// startExpertAt starts expert node id serving dispatches at dispatch.
func startExpertAt(t *testing.T, ctx context.Context, addr string, inv *invariant, shape placement.Shape, id, dispatch string, ttl time.Duration) *testNode {
	t.Helper()
	s := connect(t, ctx, addr)
	m := member(RoleExpert, id, tinyIdentity(t))
	m.Addr = dispatch
	reg, err := Register(ctx, s, m, ttl)
	if err != nil {
		t.Fatal(err)
	}
	h := newFakeHolder(inv, shape, id, dispatch)
	a, err := NewExpertAgent(ctx, s, reg, shape, h)
	if err != nil {
		t.Fatal(err)
	}
	n := &testNode{store: s, reg: reg, agent: a, hold: h}
	t.Cleanup(func() { n.close(context.Background()) })
	return n
}

func startAttn(t *testing.T, ctx context.Context, addr string, shape placement.Shape, id string) *testNode {
	t.Helper()
	s := connect(t, ctx, addr)
	reg, err := Register(ctx, s, member(RoleAttn, id, tinyIdentity(t)), 0)
	if err != nil {
		t.Fatal(err)
	}
	v, err := NewAttnView(ctx, s, reg, shape)
	if err != nil {
		t.Fatal(err)
	}
	n := &testNode{store: s, reg: reg, view: v}
	t.Cleanup(func() { n.close(context.Background()) })
	return n
}

// waitStatus waits until the controller's status satisfies cond.
func waitStatus(t *testing.T, ctx context.Context, c *Controller, what string, cond func(ClusterStatus) bool) ClusterStatus {
	t.Helper()
	for {
		ch := c.Changes()
		if st := c.Status(); cond(st) {
			return st
		}
		select {
		case <-ch:
		case <-ctx.Done():
			t.Fatalf("timed out waiting for %s; status %+v", what, c.Status())
		}
	}
}

// waitRouting waits until view routes by a version whose table names
// exactly nodes, every one with an address.
func waitRouting(t *testing.T, ctx context.Context, v *AttnView, nodes ...string) *placement.Routing {
	t.Helper()
	for {
		r, ch := v.Routing()
		if r != nil {
			got := slices.Sorted(slices.Values(r.Table.Nodes()))
			if slices.Equal(got, nodes) && !slices.Contains(r.Addrs, "") {
				return r
			}
		}
		select {
		case <-ch:
		case <-ctx.Done():
			t.Fatalf("timed out waiting for a routing over %v; have %v", nodes, r)
		}
	}
}

// settled waits until the active version places experts on exactly the
// holders' nodes, the views route by it and every holder holds exactly
// what it assigns: makes done, and breaks done once no step still uses an
// older version.
func settled(t *testing.T, ctx context.Context, c *Controller, views []*AttnView, holders ...*fakeHolder) uint64 {
	t.Helper()
	var ids []string
	for _, h := range holders {
		ids = append(ids, h.id)
	}
	slices.Sort(ids)
	st := waitStatus(t, ctx, c, fmt.Sprintf("a version on %v activated", ids), func(s ClusterStatus) bool {
		var placed []string
		for _, n := range s.Nodes {
			if n.Role == RoleExpert && n.Experts > 0 {
				placed = append(placed, n.ID)
			}
		}
		return s.Active != 0 && s.Active == s.Target && slices.Equal(placed, ids)
	})
	for _, v := range views {
		for {
			r, ch := v.Routing()
			if r != nil && r.Table.Version >= st.Active {
				break
			}
			select {
			case <-ch:
			case <-ctx.Done():
				t.Fatalf("view never switched to version %d", st.Active)
			}
		}
	}
	for _, h := range holders {
		for {
			ch, hch := c.Changes(), h.changes()
			var want string
			for _, n := range c.Status().Nodes {
				if n.ID == h.id && n.Role == RoleExpert {
					want = n.ExpertSpec
				}
			}
			if h.Held().String() == want {
				break
			}
			select {
			case <-ch:
			case <-hch:
			case <-ctx.Done():
				t.Fatalf("%s holds %q, active version %d assigns %q", h.id, h.Held(), c.Status().Active, want)
			}
		}
	}
	return st.Active
}

func TestPlacementEndToEnd(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t, 60*time.Second)
	e := startEtcd(t, ctx, t.TempDir(), "127.0.0.1:0")
	addr := e.ClientAddr()
	shape := tinyShape(t)
	inv := newInvariant(t)

	coord := connect(t, ctx, addr)
	epoch, err := coord.NextEpoch(ctx)
	if err != nil {
		t.Fatal(err)
	}
	ctrl, err := StartController(ctx, coord, ControllerConfig{Shape: shape, Epoch: epoch, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { ctrl.Close() }()

	a1 := startAttn(t, ctx, addr, shape, "a1")
	a2 := startAttn(t, ctx, addr, shape, "a2")
	views := []*AttnView{a1.view, a2.view}

	// No expert node: nothing is published.
	if st := ctrl.Status(); st.Target != 0 {
		t.Fatalf("published %d without expert nodes", st.Target)
	}

	// A node joins: version 1 on it alone; the views switch to it.
	e1 := startExpert(t, ctx, addr, inv, shape, "e1", 0)
	for _, v := range views {
		if err := v.Wait(ctx); err != nil {
			t.Fatal(err)
		}
	}
	stepCtx, stopSteps := context.WithCancel(ctx)
	var wg sync.WaitGroup
	defer func() { stopSteps(); wg.Wait() }()
	wg.Add(2)
	go inv.stepper(stepCtx, "a1", a1.view, &wg)
	go inv.stepper(stepCtx, "a2", a2.view, &wg)
	v1 := settled(t, ctx, ctrl, views, e1.hold)
	waitRouting(t, ctx, a1.view, "e1")
	if got := e1.hold.Held().Len(); got != len(shape.MoELayers)*shape.Experts {
		t.Fatalf("e1 holds %d experts alone, want all %d", got, len(shape.MoELayers)*shape.Experts)
	}
	inv.check()

	// Two more join: they take shares; e1 releases what moved, only once
	// no step runs on a version assigning it there.
	e2 := startExpert(t, ctx, addr, inv, shape, "e2", 2*time.Second)
	e3 := startExpert(t, ctx, addr, inv, shape, "e3", 0)
	v3 := settled(t, ctx, ctrl, views, e1.hold, e2.hold, e3.hold)
	if v3 <= v1 {
		t.Fatalf("active %d after joins, was %d", v3, v1)
	}
	waitRouting(t, ctx, a2.view, "e1", "e2", "e3")
	if slices.ContainsFunc(e1.hold.callLog(), func(c string) bool { return len(c) > 7 && c[:7] == "release" }) == false {
		t.Fatalf("e1 never released what moved away: %v", e1.hold.callLog())
	}
	inv.check()

	// e2 dies (no keepalives): its lease expires and its experts move to
	// the survivors.
	inv.kill(e2.hold)
	e2.agent.Close()
	e2.store.Close()
	vDead := settled(t, ctx, ctrl, views, e1.hold, e3.hold)
	waitRouting(t, ctx, a1.view, "e1", "e3")
	waitRouting(t, ctx, a2.view, "e1", "e3")
	if vDead <= v3 {
		t.Fatalf("active %d after a death, was %d", vDead, v3)
	}
	inv.check()

	// e1 is killed and restarted at once under the same id (a crash and
	// a supervisor's restart, within the TTL): the new process holds
	// nothing, so attention nodes must not dial it until it has loaded
	// what the active version assigns it.
	inv.kill(e1.hold)
	e1.agent.Close()
	e1.store.Close()
	e1 = startExpertAt(t, ctx, addr, inv, shape, "e1", "127.0.0.1:2e1", 0)
	settled(t, ctx, ctrl, views, e1.hold, e3.hold)
	for _, v := range views {
		for {
			r, ch := v.Routing()
			if slices.Contains(r.Addrs, "127.0.0.1:2e1") {
				break
			}
			select {
			case <-ch:
			case <-ctx.Done():
				t.Fatal("the restarted e1 never became routable")
			}
		}
	}
	if st := ctrl.Status(); st.Active != vDead {
		t.Fatalf("a restart under the same id changed the placement: active %d, was %d", st.Active, vDead)
	}
	inv.check()

	// e3 drains: it leaves the placement; Drain returns once nothing
	// routes to it.
	dctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	if err := e3.agent.Drain(dctx); err != nil {
		t.Fatalf("Drain: %v", err)
	}
	cancel()
	for _, v := range views {
		r, _ := v.Routing()
		if r.Table.Has("e3") {
			t.Fatalf("drained e3 still routed by version %d", r.Table.Version)
		}
	}
	if n := e3.hold.Held().Len(); n != 0 {
		t.Fatalf("drained e3 still holds %d experts", n)
	}
	e3.close(ctx)
	settled(t, ctx, ctrl, views, e1.hold)
	inv.check()

	// A drain request (`placement drain e4`): the agent reports Drained;
	// the process exits; the controller clears the request.
	e4 := startExpert(t, ctx, addr, inv, shape, "e4", 0)
	settled(t, ctx, ctrl, views, e1.hold, e4.hold)
	if err := RequestDrain(ctx, coord, "e4"); err != nil {
		t.Fatal(err)
	}
	if err := RequestDrain(ctx, coord, "nobody"); !errors.Is(err, ErrUnknownNode) {
		t.Fatalf("RequestDrain of an unknown node: %v", err)
	}
	select {
	case <-e4.agent.Drained():
	case <-ctx.Done():
		t.Fatal("e4 never drained")
	}
	e4.close(ctx)
	waitStatus(t, ctx, ctrl, "drain request cleared", func(s ClusterStatus) bool {
		for _, n := range s.Nodes {
			if n.ID == "e4" {
				return false
			}
		}
		return true
	})
	vSettled := settled(t, ctx, ctrl, views, e1.hold)
	inv.check()

	// The coordinator restarts: the new controller adopts the active
	// placement and publishes nothing; the old one is fenced.
	epoch2, err := coord.NextEpoch(ctx)
	if err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-ctrl.Err():
		if !errors.Is(err, ErrFenced) {
			t.Fatalf("old controller: %v", err)
		}
	case <-ctx.Done():
		t.Fatal("the superseded controller never noticed")
	}
	ctrl.Close()
	if err := coord.PublishTarget(ctx, epoch, mustEven(t, shape, vSettled+10, "e1")); !errors.Is(err, ErrFenced) {
		t.Fatalf("a stale coordinator published: %v", err)
	}
	if err := coord.Activate(ctx, epoch, vSettled); err != nil {
		t.Fatalf("activating the active version again is a no-op: %v", err)
	}
	ctrl, err = StartController(ctx, coord, ControllerConfig{Shape: shape, Epoch: epoch2, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	if err := RequestRebalance(ctx, coord); err != nil {
		t.Fatal(err)
	}
	rev := mustSnapshot(t, ctx, coord).Rev
	for {
		ch := ctrl.Changes()
		if p, pending := ctrl.processed(); p >= rev {
			if pending {
				t.Fatal("the restarted controller wants to publish a new version")
			}
			break
		}
		select {
		case <-ch:
		case <-ctx.Done():
			t.Fatal("the restarted controller never decided")
		}
	}
	if st := ctrl.Status(); st.Active != vSettled || st.Target != vSettled {
		t.Fatalf("after the restart: active %d target %d, want %d", st.Active, st.Target, vSettled)
	}
	if _, err := StartController(ctx, coord, ControllerConfig{Shape: shape, Epoch: epoch, Logger: testLogger(t)}); !errors.Is(err, ErrFenced) {
		t.Fatalf("a controller of an old epoch started: %v", err)
	}

	stopSteps()
	wg.Wait()
	inv.check()
	t.Logf("%d fake steps checked", inv.steps)
	if inv.steps == 0 {
		t.Fatal("no steps ran")
	}
}

func mustEven(t testing.TB, shape placement.Shape, v uint64, nodes ...string) *placement.Table {
	t.Helper()
	tb, err := placement.Even(shape, nodes, v)
	if err != nil {
		t.Fatal(err)
	}
	return tb
}
