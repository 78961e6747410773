package controlplane

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/expertmesh/expertmesh/placement"
)

var update = flag.Bool("update", false, "rewrite testdata golden files")

// golden compares got with testdata/name, or rewrites it with -update.
func golden(t *testing.T, name, got string) {
	t.Helper()
	path := filepath.Join("testdata", name)
	if *update {
		if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run with -update to create it)", err)
	}
	if string(want) != got {
		t.Errorf("%s differs (run with -update after review):\n--- want\n%s\n--- got\n%s", path, want, got)
	}
}

// describeKeys renders every key of the cluster with the parts of its
// value that do not depend on time, addresses or the planner's choices.
func describeKeys(t *testing.T, ctx context.Context, s *Store, shape placement.Shape) string {
	t.Helper()
	resp, err := s.client.Get(ctx, Root, clientv3.WithPrefix())
	if err != nil {
		t.Fatal(err)
	}
	k := s.Keys()
	var lines []string
	for _, kv := range resp.Kvs {
		key, v := string(kv.Key), string(kv.Value)
		lease := ""
		if kv.Lease != 0 {
			lease = " [lease]"
		}
		var desc string
		switch {
		case key == k.Model():
			var m ModelIdentity
			json.Unmarshal(kv.Value, &m)
			desc = fmt.Sprintf("model %s, %d layers, %d routed experts, hash of %d hex digits", m.Name, m.Layers, m.RoutedExperts, len(m.Hash))
		case strings.HasPrefix(key, k.Members()):
			m, err := decodeMember(v)
			if err != nil {
				t.Fatal(err)
			}
			desc = fmt.Sprintf("%s %s %s", m.Role, m.ID, m.State)
			if m.Epoch != 0 {
				desc += fmt.Sprintf(" epoch %d", m.Epoch)
			}
		case strings.HasPrefix(key, k.Versions()):
			tb, err := placement.DecodeTable(shape, kv.Value)
			if err != nil {
				t.Fatal(err)
			}
			var nodes []string
			for _, id := range tb.Nodes() {
				nodes = append(nodes, fmt.Sprintf("%s:%d", id, tb.Set(id).Len()))
			}
			slices.Sort(nodes)
			desc = fmt.Sprintf("table version %d, experts per node %s", tb.Version, strings.Join(nodes, " "))
		case strings.HasPrefix(key, k.LoadPrefix()):
			r, err := DecodeLoadReport(shape, kv.Value)
			if err != nil {
				t.Fatal(err)
			}
			var routed uint64
			for _, row := range r.Routed {
				for _, v := range row {
					routed += v
				}
			}
			desc = fmt.Sprintf("load report: %d tokens routed in %v, served by %v", routed, r.Window, slices.Sorted(maps.Keys(r.Served)))
		case strings.HasPrefix(key, k.DrainPrefix()), key == k.Rebalance():
			if _, err := time.Parse(time.RFC3339Nano, v); err != nil {
				t.Fatalf("%s: %q is not a time", key, v)
			}
			desc = "<time>"
		default:
			desc = v
		}
		lines = append(lines, fmt.Sprintf("%s%s = %s", key, lease, desc))
	}
	return strings.Join(lines, "\n") + "\n"
}

// TestKeyLayout runs a scripted scenario (a coordinator, an attention
// node, two expert nodes, a drain request and a rebalance request) and
// compares every key it leaves with testdata/keys.golden: the layout
// documented in doc.go.
func TestKeyLayout(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t, 30*time.Second)
	e := startEtcd(t, ctx, t.TempDir(), "127.0.0.1:0")
	s := connect(t, ctx, e.ClientAddr())
	shape := tinyShape(t)
	mi := tinyIdentity(t)
	inv := newInvariant(t)

	epoch, err := s.NextEpoch(ctx)
	if err != nil {
		t.Fatal(err)
	}
	cm := member(RoleCoordinator, "c1", mi)
	cm.Addr, cm.HTTPAddr, cm.Epoch = "", "127.0.0.1:8000", epoch
	creg, err := Register(ctx, s, cm, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer creg.Close(ctx)
	a1 := startAttn(t, ctx, e.ClientAddr(), shape, "a1")
	e1 := startExpert(t, ctx, e.ClientAddr(), inv, shape, "e1", 0)
	e2 := startExpert(t, ctx, e.ClientAddr(), inv, shape, "e2", 0)
	ctrl, err := StartController(ctx, s, ControllerConfig{Shape: shape, Epoch: epoch, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer ctrl.Close()
	settled(t, ctx, ctrl, []*AttnView{a1.view}, e1.hold, e2.hold)

	// The attention node acknowledges every routing while idle.
	ackCtx, stopAck := context.WithCancel(ctx)
	acked := make(chan struct{})
	go func() {
		defer close(acked)
		for {
			r, ch := a1.view.Routing()
			a1.view.InUse(r.Table.Version, r.Table.Version)
			select {
			case <-ch:
			case <-ackCtx.Done():
				return
			}
		}
	}()
	defer func() { stopAck(); <-acked }()

	// The attention node reports its load (a fixed report).
	report := LoadReport{At: time.Unix(1700000000, 0), Window: time.Minute, Routed: make([][]uint64, shape.Layers),
		Served: map[string][]uint64{"e1": make([]uint64, shape.Layers)}}
	for _, l := range shape.MoELayers {
		report.Routed[l] = make([]uint64, shape.Experts)
		for e := range shape.Experts {
			report.Routed[l][e] = uint64(1 + e%5)
			report.Served["e1"][l] += uint64(1 + e%5)
		}
	}
	lr := StartLoadReporter(s, a1.reg, shape, 50*time.Millisecond, func() LoadReport { return report })
	defer lr.Close()
	waitStatus(t, ctx, ctrl, "the load report", func(cs ClusterStatus) bool { return cs.Load != nil })

	if err := RequestDrain(ctx, s, "e2"); err != nil {
		t.Fatal(err)
	}
	select {
	case <-e2.agent.Drained():
	case <-ctx.Done():
		t.Fatal("e2 never drained")
	}
	if err := RequestRebalance(ctx, s); err != nil {
		t.Fatal(err)
	}
	st := settled(t, ctx, ctrl, []*AttnView{a1.view}, e1.hold)
	waitStatus(t, ctx, ctrl, "old versions collected", func(cs ClusterStatus) bool {
		return slices.Equal(cs.Versions, []uint64{st})
	})
	for {
		ch := ctrl.Changes()
		if p, pending := ctrl.processed(); p >= mustSnapshot(t, ctx, s).Rev && !pending {
			break
		}
		select {
		case <-ch:
		case <-ctx.Done():
			t.Fatal("the controller never settled")
		}
	}
	golden(t, "keys.golden", describeKeys(t, ctx, s, shape))

	// placement show reads the same facts.
	cs, err := Show(ctx, s, shape)
	if err != nil {
		t.Fatal(err)
	}
	cs.Revision = 0
	if cs.Model == nil || len(cs.Model.Hash) != 64 {
		t.Fatalf("show: model %+v", cs.Model)
	}
	cs.Model.Hash = "(sha256)"
	for i := range cs.Nodes {
		cs.Nodes[i].Addr, cs.Nodes[i].HTTPAddr, cs.Nodes[i].ExpertSpec = "", "", ""
	}
	b, err := json.MarshalIndent(cs, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	golden(t, "show.golden", string(b)+"\n")
	cst := ctrl.Status()
	if rb := cst.Rebalance; rb == nil || rb.Switches["initial"] < 1 || rb.Switches["membership"]+rb.Switches["command"] == 0 || rb.Last == nil {
		t.Errorf("rebalance record %+v: want the initial switch and a later one", rb)
	}
	cst.Rebalance = nil // the controller's own record; Show has none
	cst.Revision = 0
	m := *cst.Model
	m.Hash = "(sha256)"
	cst.Model = &m
	for i := range cst.Nodes {
		cst.Nodes[i].Addr, cst.Nodes[i].HTTPAddr, cst.Nodes[i].ExpertSpec = "", "", ""
	}
	if b2, _ := json.MarshalIndent(cst, "", "  "); string(b2) != string(b) {
		t.Errorf("Controller.Status and Show differ:\n%s\n%s", b2, b)
	}
}
