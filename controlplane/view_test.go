package controlplane

import (
	"encoding/json"
	"slices"
	"testing"
	"time"
)

func TestAttnViewRoutingAndInUse(t *testing.T) {
	ctx := testCtx(t, 30*time.Second)
	e := startEtcd(t, ctx, t.TempDir(), "127.0.0.1:0")
	s := connect(t, ctx, e.ClientAddr())
	k := s.Keys()
	shape := tinyShape(t)
	a1 := startAttn(t, ctx, e.ClientAddr(), shape, "a1")
	if r, _ := a1.view.Routing(); r != nil {
		t.Fatal("a routing before any placement")
	}
	epoch, err := s.NextEpoch(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.PublishTarget(ctx, epoch, mustEven(t, shape, 1, "e1")); err != nil {
		t.Fatal(err)
	}
	if err := s.Activate(ctx, epoch, 1); err != nil {
		t.Fatal(err)
	}
	if err := s.PublishTarget(ctx, epoch, mustEven(t, shape, 1, "e1")); err == nil {
		t.Fatal("a version was published twice")
	}
	if err := a1.view.Wait(ctx); err != nil {
		t.Fatal(err)
	}
	r, ch := a1.view.Routing()
	if r.Table.Version != 1 || !slices.Equal(r.Addrs, []string{""}) {
		t.Fatalf("routing %d %q: e1 is not a member yet", r.Table.Version, r.Addrs)
	}
	// The view reported its version in use by itself.
	w := observe(t, ctx, s)
	waitSnap(t, ctx, w, "initial in-use", func(s Snapshot) bool { return s.KVs[k.InUse("a1")].Value == `{"oldest":1,"newest":1}` })

	// e1 registers and reports ready: its address appears.
	es := connect(t, ctx, e.ClientAddr())
	m := member(RoleExpert, "e1", tinyIdentity(t))
	m.Addr = "10.0.0.1:7000"
	reg, err := Register(ctx, es, m, 0)
	if err != nil {
		t.Fatal(err)
	}
	reg.Own(k.Ready("e1"), "1")
	waitFor(t, ctx, "e1's address", ch, func() bool { r, ch = a1.view.Routing(); return r.Addrs[0] == "10.0.0.1:7000" })

	// It leaves and comes back elsewhere: the address follows.
	reg.Close(ctx)
	waitFor(t, ctx, "e1 gone", ch, func() bool { r, ch = a1.view.Routing(); return r.Addrs[0] == "" })
	m.Addr = "10.0.0.2:7000"
	reg, err = Register(ctx, es, m, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer reg.Close(ctx)
	reg.Own(k.Ready("e1"), "1")
	waitFor(t, ctx, "e1's new address", ch, func() bool { r, ch = a1.view.Routing(); return r.Addrs[0] == "10.0.0.2:7000" })

	// The active key vanishing (etcd lost it) keeps the routing.
	if _, err := s.client.Delete(ctx, k.Active()); err != nil {
		t.Fatal(err)
	}
	if _, err := s.client.Put(ctx, k.Rebalance(), "x"); err != nil { // a later write, to know the view saw the delete
		t.Fatal(err)
	}
	waitSnap(t, ctx, w, "rebalance", func(s Snapshot) bool { _, ok := s.KVs[k.Rebalance()]; return ok })
	if r2, _ := a1.view.Routing(); r2 != r {
		t.Fatal("the routing changed when the active key vanished")
	}

	// InUse: repeated pairs cost nothing; a new pair is written.
	for range 1000 {
		a1.view.InUse(1, 1)
	}
	a1.view.InUse(1, 2)
	waitSnap(t, ctx, w, "in-use 1..2", func(s Snapshot) bool {
		var u InUse
		json.Unmarshal([]byte(s.KVs[k.InUse("a1")].Value), &u)
		return u == InUse{Oldest: 1, Newest: 2}
	})
}

func TestAttnViewCoordinators(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t, 30*time.Second)
	e := startEtcd(t, ctx, t.TempDir(), "127.0.0.1:0")
	shape := tinyShape(t)
	a1 := startAttn(t, ctx, e.ClientAddr(), shape, "a1")
	got := make(chan []uint64, 16)
	a1.view.OnCoordinators(func(live []uint64) { got <- live })
	next := func(want ...uint64) {
		t.Helper()
		for {
			select {
			case live := <-got:
				if slices.Equal(live, want) {
					return
				}
				t.Logf("live coordinators %v, waiting for %v", live, want)
			case <-ctx.Done():
				t.Fatalf("timed out waiting for live coordinators %v", want)
			}
		}
	}
	coordinator := func(id string, epoch uint64) *Store {
		s := connect(t, ctx, e.ClientAddr())
		m := member(RoleCoordinator, id, tinyIdentity(t))
		m.Epoch = epoch
		if _, err := Register(ctx, s, m, 2*time.Second); err != nil {
			t.Fatal(err)
		}
		return s
	}
	c1 := coordinator("c1", 1)
	next(1)
	c2 := coordinator("c2", 2)
	next(1, 2)
	c1.Close() // killed: its lease expires
	next(2)
	c2.Close()
	next()
}

// The coordinator follows attention nodes through a member watch.
func TestWatchMembers(t *testing.T) {
	ctx := testCtx(t, 20*time.Second)
	e := startEtcd(t, ctx, t.TempDir(), "127.0.0.1:0")
	s := connect(t, ctx, e.ClientAddr())
	w := s.Watch(ctx, s.Keys().MembersOf(RoleAttn))
	defer w.Close()
	first := waitSnap(t, ctx, w, "first snapshot", func(Snapshot) bool { return true })
	if len(s.Members(first, RoleAttn)) != 0 {
		t.Fatal("members before any registered")
	}
	m := member(RoleAttn, "a1", tinyIdentity(t))
	m.CacheBlocks, m.BlockSize = 100, 16
	reg, err := Register(ctx, s, m, 0)
	if err != nil {
		t.Fatal(err)
	}
	snap := waitSnap(t, ctx, w, "a1", func(snap Snapshot) bool { return len(s.Members(snap, RoleAttn)) == 1 })
	if got := s.Members(snap, RoleAttn)["a1"]; got.CacheBlocks != 100 || got.Addr != m.Addr {
		t.Fatalf("member %+v", got)
	}
	other, err := Register(ctx, s, member(RoleExpert, "e1", tinyIdentity(t)), 0)
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close(ctx)
	reg.Close(ctx)
	snap = waitSnap(t, ctx, w, "a1 gone", func(snap Snapshot) bool { return len(s.Members(snap, RoleAttn)) == 0 })
	for k := range snap.KVs {
		t.Fatalf("key %s outside the watched prefix", k)
	}
}
