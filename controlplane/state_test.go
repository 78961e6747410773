package controlplane

import (
	"encoding/json"
	"slices"
	"testing"

	"github.com/expertmesh/expertmesh/placement"
)

// fakeCluster builds snapshots for the pure decision functions.
type fakeCluster struct {
	t     *testing.T
	k     Keys
	shape placement.Shape
	kvs   map[string]KV
}

func newFakeCluster(t *testing.T) *fakeCluster {
	return &fakeCluster{t: t, k: KeysFor(""), shape: tinyShape(t), kvs: map[string]KV{}}
}

func (f *fakeCluster) put(key, v string) *fakeCluster {
	f.kvs[key] = KV{Value: v, ModRev: int64(len(f.kvs) + 1)}
	return f
}

func (f *fakeCluster) member(role Role, id string, st State) *fakeCluster {
	m := member(role, id, ModelIdentity{Hash: "h"})
	m.State = st
	return f.put(f.k.Member(role, id), m.marshal())
}

// version stores a table giving node i the i-th contiguous share.
func (f *fakeCluster) version(n uint64, nodes ...string) *placement.Table {
	tb := mustEven(f.t, f.shape, n, nodes...)
	b, err := json.Marshal(tb)
	if err != nil {
		f.t.Fatal(err)
	}
	f.put(f.k.Version(n), string(b))
	return tb
}

func (f *fakeCluster) inuse(id string, oldest, newest uint64) *fakeCluster {
	b, _ := json.Marshal(InUse{Oldest: oldest, Newest: newest})
	return f.put(f.k.InUse(id), string(b))
}

func (f *fakeCluster) state() *clusterState {
	return readState(f.k, Snapshot{Rev: 100, KVs: f.kvs}, f.shape, nil)
}

func TestKeepFor(t *testing.T) {
	type want struct {
		versions []uint64 // keep = union of what these versions assign e1
		certain  bool
	}
	for _, tc := range []struct {
		name  string
		setup func(f *fakeCluster)
		want  want
	}{
		{"nothing placed", func(f *fakeCluster) {}, want{nil, true}},
		{"target only, loading", func(f *fakeCluster) {
			f.version(1, "e1")
			f.put(f.k.Target(), "1")
		}, want{[]uint64{1}, true}},
		{"active and in use by everyone", func(f *fakeCluster) {
			f.version(1, "e1")
			f.put(f.k.Target(), "1").put(f.k.Active(), "1")
			f.member(RoleAttn, "a1", StateServing).inuse("a1", 1, 1)
		}, want{[]uint64{1}, true}},
		{"new active, a step still on the old version", func(f *fakeCluster) {
			f.version(1, "e1")
			f.version(2, "e1", "e2")
			f.put(f.k.Target(), "2").put(f.k.Active(), "2")
			f.member(RoleAttn, "a1", StateServing).inuse("a1", 1, 2)
			f.member(RoleAttn, "a2", StateServing).inuse("a2", 2, 2)
		}, want{[]uint64{1, 2}, true}},
		{"every attention node moved on: the old version is not kept", func(f *fakeCluster) {
			f.version(1, "e1")
			f.version(2, "e1", "e2")
			f.put(f.k.Target(), "2").put(f.k.Active(), "2")
			f.member(RoleAttn, "a1", StateServing).inuse("a1", 2, 2)
		}, want{[]uint64{2}, true}},
		{"an attention node that has not reported keeps everything stored", func(f *fakeCluster) {
			f.version(1, "e1")
			f.version(2, "e1", "e2")
			f.put(f.k.Target(), "2").put(f.k.Active(), "2")
			f.member(RoleAttn, "a1", StateServing).inuse("a1", 2, 2)
			f.member(RoleAttn, "a2", StateServing)
		}, want{[]uint64{1, 2}, true}},
		{"an in-use key whose member key is gone still counts", func(f *fakeCluster) {
			f.version(1, "e1")
			f.version(2, "e1", "e2")
			f.put(f.k.Target(), "2").put(f.k.Active(), "2")
			f.inuse("a1", 1, 1)
		}, want{[]uint64{1, 2}, true}},
		{"pending target kept beside the active version", func(f *fakeCluster) {
			f.version(1, "e2", "e1")
			f.version(2, "e1", "e2")
			f.put(f.k.Target(), "2").put(f.k.Active(), "1")
			f.member(RoleAttn, "a1", StateServing).inuse("a1", 1, 1)
		}, want{[]uint64{1, 2}, true}},
		{"a superseded target is not kept", func(f *fakeCluster) {
			f.version(1, "e1")
			f.version(2, "e2", "e1")
			f.version(3, "e1", "e3")
			f.put(f.k.Target(), "3").put(f.k.Active(), "1")
			f.member(RoleAttn, "a1", StateServing).inuse("a1", 1, 1)
		}, want{[]uint64{1, 3}, true}},
		{"a version in use that etcd lost: uncertain", func(f *fakeCluster) {
			f.version(9, "e1")
			f.put(f.k.Target(), "9")
			f.member(RoleAttn, "a1", StateServing).inuse("a1", 5, 5)
		}, want{[]uint64{9}, false}},
		{"an active version that is not stored: uncertain", func(f *fakeCluster) {
			f.put(f.k.Active(), "4")
		}, want{nil, false}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newFakeCluster(t)
			tc.setup(f)
			st := f.state()
			keep, certain := st.keepFor(f.shape, "e1")
			want := placement.NewSet(f.shape)
			for _, v := range tc.want.versions {
				want.Union(st.table(v).Set("e1"))
			}
			if keep.String() != want.String() || certain != tc.want.certain {
				t.Errorf("keep %q certain %v, want %q %v", keep, certain, want, tc.want.certain)
			}
		})
	}
}

func TestDecide(t *testing.T) {
	cfg := ControllerConfig{Epoch: 1}
	for _, tc := range []struct {
		name        string
		setup       func(f *fakeCluster)
		publish     []string // nodes of the published plan (nil: none)
		activate    uint64
		collect     []uint64
		clearDrains []string
	}{
		{name: "no expert nodes: nothing", setup: func(f *fakeCluster) {}},
		{name: "first node: a first version", setup: func(f *fakeCluster) {
			f.member(RoleExpert, "e1", StateServing)
		}, publish: []string{"e1"}},
		{name: "same nodes as the active version: adopt, publish nothing", setup: func(f *fakeCluster) {
			f.member(RoleExpert, "e1", StateServing).member(RoleExpert, "e2", StateServing)
			tb := placementPlan(f, 3, nil, "e1", "e2")
			b, _ := json.Marshal(tb)
			f.put(f.k.Version(3), string(b)).put(f.k.Target(), "3").put(f.k.Active(), "3")
		}},
		{name: "a node joined", setup: func(f *fakeCluster) {
			f.member(RoleExpert, "e1", StateServing).member(RoleExpert, "e2", StateServing)
			f.version(1, "e1")
			f.put(f.k.Target(), "1").put(f.k.Active(), "1")
		}, publish: []string{"e1", "e2"}},
		{name: "draining and drain-requested nodes are left out", setup: func(f *fakeCluster) {
			f.member(RoleExpert, "e1", StateServing).member(RoleExpert, "e2", StateDraining).member(RoleExpert, "e3", StateServing)
			f.put(f.k.Drain("e3"), "t")
			f.version(1, "e1", "e2", "e3")
			f.put(f.k.Target(), "1").put(f.k.Active(), "1")
		}, publish: []string{"e1"}},
		{name: "target ready everywhere: activate", setup: func(f *fakeCluster) {
			f.member(RoleExpert, "e1", StateServing)
			tb := placementPlan(f, 2, nil, "e1")
			b, _ := json.Marshal(tb)
			f.put(f.k.Version(2), string(b)).put(f.k.Target(), "2")
			f.put(f.k.Ready("e1"), "2")
		}, activate: 2},
		{name: "target not ready on one node: wait", setup: func(f *fakeCluster) {
			f.member(RoleExpert, "e1", StateServing).member(RoleExpert, "e2", StateServing)
			tb := placementPlan(f, 2, nil, "e1", "e2")
			b, _ := json.Marshal(tb)
			f.put(f.k.Version(2), string(b)).put(f.k.Target(), "2")
			f.put(f.k.Ready("e1"), "2").put(f.k.Ready("e2"), "1")
		}},
		{name: "a node of the target died: supersede it", setup: func(f *fakeCluster) {
			f.member(RoleExpert, "e1", StateServing)
			f.version(1, "e1")
			f.version(2, "e1", "e2")
			f.put(f.k.Target(), "2").put(f.k.Active(), "1").put(f.k.Ready("e1"), "2")
			f.member(RoleAttn, "a1", StateServing).inuse("a1", 1, 1)
		}, publish: []string{"e1"}},
		{name: "collect below the oldest in use and superseded targets", setup: func(f *fakeCluster) {
			f.member(RoleExpert, "e1", StateServing)
			for v := uint64(1); v <= 5; v++ {
				placementStore(f, v, "e1")
			}
			f.put(f.k.Active(), "3").put(f.k.Target(), "5").put(f.k.Ready("e1"), "4")
			f.member(RoleAttn, "a1", StateServing).inuse("a1", 2, 3)
		}, collect: []uint64{1, 4}},
		{name: "nothing collected while an attention node has not reported", setup: func(f *fakeCluster) {
			f.member(RoleExpert, "e1", StateServing)
			placementStore(f, 1, "e1")
			placementStore(f, 2, "e1")
			f.put(f.k.Active(), "2").put(f.k.Target(), "2")
			f.member(RoleAttn, "a1", StateServing)
		}},
		{name: "drain request of a node that left is cleared", setup: func(f *fakeCluster) {
			f.put(f.k.Drain("gone"), "t")
			f.member(RoleExpert, "e1", StateServing)
			f.put(f.k.Drain("e1"), "t")
		}, clearDrains: []string{"gone"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newFakeCluster(t)
			tc.setup(f)
			cfg.Shape = f.shape
			d := decide(f.state(), cfg, nil, planLoad{})
			var published []string
			if d.publish != nil {
				published = slices.Sorted(slices.Values(d.publish.Nodes()))
				if d.publish.Version != f.state().nextVersion() {
					t.Errorf("published version %d, want %d", d.publish.Version, f.state().nextVersion())
				}
			}
			if !slices.Equal(published, tc.publish) {
				t.Errorf("publish %v, want %v", published, tc.publish)
			}
			if d.activate != tc.activate {
				t.Errorf("activate %d, want %d", d.activate, tc.activate)
			}
			if !slices.Equal(d.collect, tc.collect) {
				t.Errorf("collect %v, want %v", d.collect, tc.collect)
			}
			if !slices.Equal(d.clearDrains, tc.clearDrains) {
				t.Errorf("clear drains %v, want %v", d.clearDrains, tc.clearDrains)
			}
		})
	}
}

// placementPlan is what the planner makes of nodes from current.
func placementPlan(f *fakeCluster, v uint64, current *placement.Table, nodes ...string) *placement.Table {
	var ns []placement.Node
	for _, id := range nodes {
		ns = append(ns, placement.Node{ID: id})
	}
	tb, err := placement.Plan(placement.PlanInput{Shape: f.shape, Nodes: ns, Current: current, Version: v})
	if err != nil {
		f.t.Fatal(err)
	}
	return tb
}

func placementStore(f *fakeCluster, v uint64, nodes ...string) {
	b, _ := json.Marshal(mustEven(f.t, f.shape, v, nodes...))
	f.put(f.k.Version(v), string(b))
}

// A version number after etcd lost its data stays above every number
// nodes still report.
func TestNextVersion(t *testing.T) {
	f := newFakeCluster(t)
	f.put(f.k.Ready("e1"), "15").inuse("a1", 12, 14)
	if n := f.state().nextVersion(); n != 16 {
		t.Fatalf("next version %d, want 16", n)
	}
}
