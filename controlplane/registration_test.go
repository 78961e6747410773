package controlplane

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// observe follows every key of s's cluster.
func observe(t testing.TB, ctx context.Context, s *Store) *Watcher {
	w := newWatcher(ctx, s, s.keys.Prefix())
	t.Cleanup(w.Close)
	return w
}

// waitSnap waits until a snapshot of w satisfies cond and returns it.
func waitSnap(t testing.TB, ctx context.Context, w *Watcher, what string, cond func(Snapshot) bool) Snapshot {
	t.Helper()
	for {
		select {
		case s := <-w.C():
			if cond(s) {
				return s
			}
		case <-ctx.Done():
			t.Fatalf("timed out waiting for %s", what)
		}
	}
}

func TestRegisterOwnClose(t *testing.T) {
	ctx := testCtx(t, 20*time.Second)
	e := startEtcd(t, ctx, t.TempDir(), "127.0.0.1:0")
	s := connect(t, ctx, e.ClientAddr())
	k := s.Keys()
	mi := tinyIdentity(t)
	r, err := Register(ctx, s, member(RoleExpert, "e1", mi), 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Own(k.Ready("e1"), "7"); err != nil {
		t.Fatal(err)
	}
	if err := r.Update(k.Ready("e2"), "7"); !errors.Is(err, ErrNotOwned) {
		t.Fatalf("Update of an unowned key: %v, want ErrNotOwned", err)
	}
	if err := r.Own("/elsewhere", "x"); !errors.Is(err, ErrConfig) {
		t.Fatalf("Own outside the cluster: %v, want ErrConfig", err)
	}
	if err := r.SetState(ctx, StateDraining); err != nil {
		t.Fatal(err)
	}
	resp, err := s.client.Get(ctx, k.Prefix(), clientv3.WithPrefix())
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]int64{}
	for _, kv := range resp.Kvs {
		got[string(kv.Key)] = kv.Lease
	}
	if got[k.Member(RoleExpert, "e1")] != int64(r.Lease()) || got[k.Ready("e1")] != int64(r.Lease()) {
		t.Fatalf("keys %v: member and ready must live under lease %x", got, r.Lease())
	}
	if _, ok := got[k.Model()]; !ok || got[k.Model()] != 0 {
		t.Fatalf("model identity missing or under a lease: %v", got)
	}
	m, err := decodeMember(mustGet(t, ctx, s, k.Member(RoleExpert, "e1")))
	if err != nil || m.State != StateDraining || m.Model.Hash != mi.Hash {
		t.Fatalf("member %+v (%v)", m, err)
	}
	if err := r.Close(ctx); err != nil {
		t.Fatal(err)
	}
	resp, err = s.client.Get(ctx, k.Prefix(), clientv3.WithPrefix(), clientv3.WithKeysOnly())
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.Kvs) != 1 || string(resp.Kvs[0].Key) != k.Model() {
		t.Fatalf("after Close: %v, want only the model key", resp.Kvs)
	}
}

func mustGet(t testing.TB, ctx context.Context, s *Store, key string) string {
	t.Helper()
	resp, err := s.client.Get(ctx, key)
	if err != nil || len(resp.Kvs) == 0 {
		t.Fatalf("get %s: %v (%d keys)", key, err, len(resp.Kvs))
	}
	return string(resp.Kvs[0].Value)
}

// A process that dies stops its keepalives; its member key must vanish
// within about a TTL.
func TestRegistrationExpiresWhenProcessDies(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t, 20*time.Second)
	e := startEtcd(t, ctx, t.TempDir(), "127.0.0.1:0")
	obs := connect(t, ctx, e.ClientAddr())
	node := connect(t, ctx, e.ClientAddr())
	k := obs.Keys()
	r, err := Register(ctx, node, member(RoleExpert, "e1", tinyIdentity(t)), 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Own(k.Ready("e1"), "3"); err != nil {
		t.Fatal(err)
	}
	if err := r.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	w := observe(t, ctx, obs)
	waitSnap(t, ctx, w, "member registered", func(s Snapshot) bool { _, ok := s.KVs[k.Member(RoleExpert, "e1")]; return ok })
	node.Close() // the process dies: no revoke, no more keepalives
	died := time.Now()
	waitSnap(t, ctx, w, "member expired", func(s Snapshot) bool {
		_, m := s.KVs[k.Member(RoleExpert, "e1")]
		_, rd := s.KVs[k.Ready("e1")]
		return !m && !rd
	})
	gone := time.Since(died)
	t.Logf("member key gone %v after the process died (TTL 2s)", gone.Round(10*time.Millisecond))
	if gone > 6*time.Second {
		t.Errorf("member key lived %v after its keepalives stopped, TTL 2s", gone)
	}
	if err := r.Close(ctx); err != nil {
		t.Fatalf("Close after the store closed: %v", err)
	}
}

// A lease revoked behind the registration's back is replaced: member and
// owned keys come back under a new lease.
func TestReregisterAfterRevoke(t *testing.T) {
	ctx := testCtx(t, 20*time.Second)
	e := startEtcd(t, ctx, t.TempDir(), "127.0.0.1:0")
	obs := connect(t, ctx, e.ClientAddr())
	node := connect(t, ctx, e.ClientAddr())
	k := obs.Keys()
	r, err := Register(ctx, node, member(RoleAttn, "a1", tinyIdentity(t)), 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close(ctx)
	if err := r.Own(k.InUse("a1"), `{"oldest":1,"newest":2}`); err != nil {
		t.Fatal(err)
	}
	if err := r.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	old := r.Lease()
	if _, err := obs.client.Revoke(ctx, old); err != nil {
		t.Fatal(err)
	}
	waitEvent(t, ctx, r, EventLost)
	ev := waitEvent(t, ctx, r, EventRegistered)
	if ev.Lease == old || ev.Lease == 0 {
		t.Fatalf("re-registered under lease %x, old %x", ev.Lease, old)
	}
	w := observe(t, ctx, obs)
	waitSnap(t, ctx, w, "member and in-use back under the new lease", func(s Snapshot) bool {
		m, ok1 := s.KVs[k.Member(RoleAttn, "a1")]
		u, ok2 := s.KVs[k.InUse("a1")]
		return ok1 && ok2 && m.Lease == int64(ev.Lease) && u.Lease == int64(ev.Lease) && u.Value == `{"oldest":1,"newest":2}`
	})
	// And it keeps working: an update lands under the new lease.
	if err := r.Update(k.InUse("a1"), `{"oldest":2,"newest":2}`); err != nil {
		t.Fatal(err)
	}
	if err := r.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	if v := mustGet(t, ctx, obs, k.InUse("a1")); v != `{"oldest":2,"newest":2}` {
		t.Fatalf("in-use %s", v)
	}
}

// Deleting the member key behind the registration's back also
// re-registers.
func TestReregisterAfterMemberKeyDeleted(t *testing.T) {
	ctx := testCtx(t, 20*time.Second)
	e := startEtcd(t, ctx, t.TempDir(), "127.0.0.1:0")
	s := connect(t, ctx, e.ClientAddr())
	k := s.Keys()
	r, err := Register(ctx, s, member(RoleExpert, "e1", tinyIdentity(t)), 0)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close(ctx)
	if _, err := s.client.Delete(ctx, k.Member(RoleExpert, "e1")); err != nil {
		t.Fatal(err)
	}
	waitEvent(t, ctx, r, EventLost)
	ev := waitEvent(t, ctx, r, EventRegistered)
	if l := leaseOf(t, ctx, s, k.Member(RoleExpert, "e1")); l != int64(ev.Lease) {
		t.Fatalf("member under lease %x, want %x", l, ev.Lease)
	}
}

func leaseOf(t testing.TB, ctx context.Context, s *Store, key string) int64 {
	t.Helper()
	resp, err := s.client.Get(ctx, key)
	if err != nil || len(resp.Kvs) == 0 {
		t.Fatalf("get %s: %v (%d keys)", key, err, len(resp.Kvs))
	}
	return resp.Kvs[0].Lease
}

// etcd stopped for 20 s (as in the scenario) and restarted on its
// data and address: the lease survives (the new leader extends it),
// keepalives resume, and the registration keeps working.
func TestRegistrationSurvivesEtcdRestart(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t, 60*time.Second)
	dir := t.TempDir()
	e := startEtcd(t, ctx, dir, restartablePort(t))
	addr := e.ClientAddr()
	s := connect(t, ctx, addr)
	k := s.Keys()
	r, err := Register(ctx, s, member(RoleExpert, "e1", tinyIdentity(t)), 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close(ctx)
	lease := r.Lease()
	e.Close()
	// The outage: far longer than the TTL, so keepalives give up and
	// gRPC's reconnect backoff grows. (A scenario length, not a
	// synchronisation.)
	time.Sleep(20 * time.Second)
	if err := r.Own(k.Ready("e1"), "5"); err != nil { // written once etcd is back
		t.Fatal(err)
	}
	startEtcd(t, ctx, dir, addr)
	back := time.Now()
	if err := r.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	t.Logf("registration writing again %v after etcd came back", time.Since(back).Round(time.Millisecond))
	if ev := waitEvent(t, ctx, r, EventResumed); ev.Lease != lease {
		t.Fatalf("resumed lease %x, had %x", ev.Lease, lease)
	}
	if got := leaseOf(t, ctx, s, k.Ready("e1")); got != int64(r.Lease()) {
		t.Fatalf("ready under lease %x, registration holds %x", got, r.Lease())
	}
	if got := leaseOf(t, ctx, s, k.Member(RoleExpert, "e1")); got != int64(r.Lease()) {
		t.Fatalf("member under lease %x, registration holds %x", got, r.Lease())
	}
	t.Logf("lease before %x, after %x", lease, r.Lease())
	// Still alive well past a TTL: keepalives run.
	obs := observe(t, ctx, s)
	deadline := time.After(3 * time.Second)
	for {
		select {
		case snap := <-obs.C():
			if _, ok := snap.KVs[k.Member(RoleExpert, "e1")]; !ok {
				t.Fatal("member key vanished after the restart")
			}
			continue
		case <-deadline:
		case <-ctx.Done():
			t.Fatal("timeout")
		}
		break
	}
	if _, ok := mustSnapshot(t, ctx, s).KVs[k.Member(RoleExpert, "e1")]; !ok {
		t.Fatal("member key gone after the restart")
	}
}

func mustSnapshot(t testing.TB, ctx context.Context, s *Store) Snapshot {
	t.Helper()
	w := newWatcher(ctx, s, s.keys.Prefix())
	defer w.Close()
	select {
	case snap := <-w.C():
		return snap
	case <-ctx.Done():
		t.Fatal("timed out reading a snapshot")
	}
	return Snapshot{}
}

// etcd restarted on an empty data directory: everything is gone; the
// registration notices (its lease is unknown) and writes itself, its
// owned keys and the model identity again.
func TestReregisterAfterEtcdWiped(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t, 40*time.Second)
	e := startEtcd(t, ctx, t.TempDir(), restartablePort(t))
	addr := e.ClientAddr()
	s := connect(t, ctx, addr)
	k := s.Keys()
	r, err := Register(ctx, s, member(RoleExpert, "e1", tinyIdentity(t)), 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close(ctx)
	if err := r.Own(k.Ready("e1"), "9"); err != nil {
		t.Fatal(err)
	}
	if err := r.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	e.Close()
	startEtcd(t, ctx, t.TempDir(), addr)
	waitEvent(t, ctx, r, EventRegistered)
	w := observe(t, ctx, s)
	waitSnap(t, ctx, w, "member, ready and model written again", func(snap Snapshot) bool {
		_, m := snap.KVs[k.Member(RoleExpert, "e1")]
		rd, ok := snap.KVs[k.Ready("e1")]
		_, mo := snap.KVs[k.Model()]
		return m && ok && rd.Value == "9" && mo
	})
}

func TestModelMismatchRefused(t *testing.T) {
	ctx := testCtx(t, 20*time.Second)
	e := startEtcd(t, ctx, t.TempDir(), "127.0.0.1:0")
	s := connect(t, ctx, e.ClientAddr())
	a, err := IdentifyModel(tinyModel(t, "model-a", nil))
	if err != nil {
		t.Fatal(err)
	}
	b, err := IdentifyModel(tinyModel(t, "model-b", map[string]any{"rms_norm_eps": 1e-5}))
	if err != nil {
		t.Fatal(err)
	}
	if a.Hash == b.Hash {
		t.Fatal("different configs hash alike")
	}
	r, err := Register(ctx, s, member(RoleExpert, "e1", a), 0)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close(ctx)
	_, err = Register(ctx, s, member(RoleExpert, "e2", b), 0)
	if !errors.Is(err, ErrModelMismatch) {
		t.Fatalf("Register with another model: %v, want ErrModelMismatch", err)
	}
	for _, want := range []string{a.Hash, b.Hash, "model-a", "model-b"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not name %s", err, want)
		}
	}
	// The same model registers fine.
	r2, err := Register(ctx, s, member(RoleExpert, "e3", a), 0)
	if err != nil {
		t.Fatal(err)
	}
	r2.Close(ctx)
}

// A node restarted within its TTL takes its id over: what the previous
// process owned (readiness for experts it no longer holds) vanishes.
func TestRestartTakesOverID(t *testing.T) {
	ctx := testCtx(t, 20*time.Second)
	e := startEtcd(t, ctx, t.TempDir(), "127.0.0.1:0")
	obs := connect(t, ctx, e.ClientAddr())
	k := obs.Keys()
	first := connect(t, ctx, e.ClientAddr())
	r1, err := Register(ctx, first, member(RoleExpert, "e1", tinyIdentity(t)), 0)
	if err != nil {
		t.Fatal(err)
	}
	r1.Own(k.Ready("e1"), "4")
	if err := r1.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	first.Close() // killed: its lease lives on for a TTL
	second := connect(t, ctx, e.ClientAddr())
	r2, err := Register(ctx, second, member(RoleExpert, "e1", tinyIdentity(t)), 0)
	if err != nil {
		t.Fatal(err)
	}
	defer r2.Close(ctx)
	snap := mustSnapshot(t, ctx, obs)
	if _, ok := snap.KVs[k.Ready("e1")]; ok {
		t.Fatal("the previous process's readiness outlived the restart")
	}
	if snap.KVs[k.Member(RoleExpert, "e1")].Lease != int64(r2.Lease()) {
		t.Fatal("member key not under the new lease")
	}
	r1.Close(ctx)
}

func TestMemberValidation(t *testing.T) {
	mi := ModelIdentity{Hash: "h"}
	for _, tc := range []struct {
		m    Member
		want string
	}{
		{Member{ID: "a/b", Role: RoleExpert, Addr: "x:1", Model: mi, State: StateServing}, "node-id"},
		{Member{ID: "", Role: RoleExpert, Addr: "x:1", Model: mi, State: StateServing}, "node-id"},
		{Member{ID: "a", Role: "boss", Addr: "x:1", Model: mi, State: StateServing}, "role"},
		{Member{ID: "a", Role: RoleExpert, Model: mi, State: StateServing}, "--listen"},
		{Member{ID: "a", Role: RoleExpert, Addr: "x:1", State: StateServing}, "model"},
	} {
		if err := tc.m.Validate(); !errors.Is(err, ErrConfig) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%+v: %v, want ErrConfig naming %s", tc.m, err, tc.want)
		}
	}
	id := DefaultNodeID(RoleExpert, 7001)
	if err := ValidateID(id); err != nil || !strings.HasSuffix(id, "-expert-7001") {
		t.Errorf("DefaultNodeID = %q (%v)", id, err)
	}
	if got := sanitizeID("pod name/ü"); got != "pod-name--" {
		t.Errorf("sanitizeID = %q", got)
	}
}

func TestParseEndpoints(t *testing.T) {
	if eps, err := ParseEndpoints("a:2379, http://b:2379,"); err != nil || len(eps) != 2 {
		t.Fatalf("%v %v", eps, err)
	}
	for _, bad := range []string{"", "a", "a:0", "a:99999", "https://a:1", " :1"} {
		if _, err := ParseEndpoints(bad); !errors.Is(err, ErrConfig) || !strings.Contains(err.Error(), "--etcd") {
			t.Errorf("ParseEndpoints(%q): %v", bad, err)
		}
	}
}
