package controlplane

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"
)

// freePorts finds n free loopback ports by listening on port 0 and
// closing. A static cluster's members must know each other's peer URLs
// before any starts, so ports cannot be chosen by the members themselves;
// another process could take a port between the close and etcd's listen,
// which a test on a busy machine may rarely hit.
func freePorts(t testing.TB, n int) []int {
	t.Helper()
	var ls []net.Listener
	var ports []int
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		ls = append(ls, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	for _, l := range ls {
		l.Close()
	}
	return ports
}

// A static three-member cluster starts (its members concurrently, as a
// quorum needs) and serves a put on one member and a get on another.
func TestEtcdStaticCluster(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t, 40*time.Second)
	ports := freePorts(t, 6)
	var initial []string
	for i := range 3 {
		initial = append(initial, fmt.Sprintf("n%d=http://127.0.0.1:%d", i, ports[3+i]))
	}
	members := make([]*Etcd, 3)
	for i := range 3 {
		e, err := StartEtcd(ctx, EtcdConfig{
			Dir: t.TempDir(), Name: fmt.Sprintf("n%d", i),
			ClientAddr:     fmt.Sprintf("127.0.0.1:%d", ports[i]),
			PeerAddr:       fmt.Sprintf("127.0.0.1:%d", ports[3+i]),
			InitialCluster: strings.Join(initial, ","),
			ClusterState:   "new",
			Logger:         testLogger(t),
		})
		if err != nil {
			t.Fatalf("member %d: %v", i, err)
		}
		members[i] = e
		t.Cleanup(func() { e.Close() })
	}
	for i, e := range members {
		if err := e.WaitReady(ctx); err != nil {
			t.Fatalf("member %d not ready: %v", i, err)
		}
	}
	var eps []string
	for _, e := range members {
		eps = append(eps, e.ClientAddr())
	}
	s, err := Connect(ctx, Config{Endpoints: eps, DialTimeout: 5 * time.Second, RequestTimeout: 5 * time.Second, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if _, err := s.client.Put(ctx, s.keys.Rebalance(), "x"); err != nil {
		t.Fatal(err)
	}
	other := connect(t, ctx, members[2].ClientAddr())
	if v := mustGet(t, ctx, other, s.keys.Rebalance()); v != "x" {
		t.Fatalf("member 2 reads %q", v)
	}
	resp, err := s.client.MemberList(ctx)
	if err != nil || len(resp.Members) != 3 {
		t.Fatalf("member list: %v %v", resp, err)
	}
	// Losing one member keeps a quorum.
	members[0].Close()
	select {
	case _, ok := <-members[0].Err():
		if ok {
			t.Fatal("a closed member reported an error")
		}
	case <-ctx.Done():
		t.Fatal("Err not closed after Close")
	}
	if _, err := other.client.Put(ctx, s.keys.Rebalance(), "y"); err != nil {
		t.Fatalf("put with one member down: %v", err)
	}
}

func TestEtcdConfigValidate(t *testing.T) {
	ok := DefaultEtcdConfig("/tmp/x")
	if err := ok.Validate(); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		mut  func(*EtcdConfig)
		want string
	}{
		{func(c *EtcdConfig) { c.Dir = "" }, "--etcd-dir"},
		{func(c *EtcdConfig) { c.ClientAddr = "nope" }, "--etcd-listen"},
		{func(c *EtcdConfig) { c.PeerAddr = "h:99999" }, "--etcd-peer"},
		{func(c *EtcdConfig) { c.ClusterState = "old" }, "--etcd-initial-cluster-state"},
		{func(c *EtcdConfig) { c.InitialCluster = "a=http://h:1" }, "does not name"},
		{func(c *EtcdConfig) { c.InitialCluster = "default=http://h:1"; c.PeerAddr = "h:0" }, "fixed peer ports"},
	} {
		c := ok
		tc.mut(&c)
		if err := c.Validate(); !errors.Is(err, ErrConfig) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%+v: %v, want ErrConfig naming %s", c, err, tc.want)
		}
	}
	if _, err := StartEtcd(context.Background(), EtcdConfig{}); !errors.Is(err, ErrConfig) {
		t.Errorf("StartEtcd without a dir: %v", err)
	}
}

// The watcher delivers a consistent view across compaction (it re-reads
// when its watch revision is compacted away) and across an etcd restart
// on an empty data directory (the revision goes backwards).
func TestWatcherResyncs(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t, 30*time.Second)
	e := startEtcd(t, ctx, t.TempDir(), restartablePort(t))
	addr := e.ClientAddr()
	s := connect(t, ctx, addr)
	k := s.Keys()
	w := newWatcher(ctx, s, k.Prefix(), k.DrainPrefix())
	defer w.Close()
	waitSnap(t, ctx, w, "first snapshot", func(Snapshot) bool { return true })
	if _, err := s.client.Put(ctx, k.Drain("a"), "1"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.client.Put(ctx, k.Rebalance(), "outside the watched prefixes"); err != nil {
		t.Fatal(err)
	}
	snap := waitSnap(t, ctx, w, "drain/a", func(s Snapshot) bool { _, ok := s.KVs[k.Drain("a")]; return ok })
	if _, ok := snap.KVs[k.Rebalance()]; ok {
		t.Fatal("a key outside the watched prefixes is in the snapshot")
	}

	// Compaction while the watcher is cut off from etcd: it must re-read.
	w2 := newWatcher(ctx, s, k.Prefix())
	defer w2.Close()
	waitSnap(t, ctx, w2, "w2 first snapshot", func(Snapshot) bool { return true })
	for i := range 5 {
		if _, err := s.client.Put(ctx, k.Drain("b"), fmt.Sprint(i)); err != nil {
			t.Fatal(err)
		}
	}
	resp, err := s.client.Put(ctx, k.Drain("c"), "x")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.client.Compact(ctx, resp.Header.Revision); err != nil {
		t.Fatal(err)
	}
	if _, err := s.client.Delete(ctx, k.Drain("a")); err != nil {
		t.Fatal(err)
	}
	waitSnap(t, ctx, w2, "state after compaction", func(s Snapshot) bool {
		_, a := s.KVs[k.Drain("a")]
		return !a && s.KVs[k.Drain("b")].Value == "4" && s.KVs[k.Drain("c")].Value == "x"
	})

	// etcd wiped: the watcher re-reads from the new, lower revision.
	e.Close()
	startEtcd(t, ctx, t.TempDir(), addr)
	waitSnap(t, ctx, w, "empty cluster after the wipe", func(s Snapshot) bool { return len(s.KVs) == 0 })
	if _, err := s.client.Put(ctx, k.Drain("d"), "new"); err != nil {
		t.Fatal(err)
	}
	waitSnap(t, ctx, w, "a write to the new etcd", func(s Snapshot) bool { return s.KVs[k.Drain("d")].Value == "new" })
}
