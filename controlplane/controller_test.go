package controlplane

import (
	"context"
	"errors"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/expertmesh/expertmesh/placement"
)

// Nodes joining together make one version.
func TestControllerDebounce(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t, 30*time.Second)
	e := startEtcd(t, ctx, t.TempDir(), "127.0.0.1:0")
	s := connect(t, ctx, e.ClientAddr())
	shape := tinyShape(t)
	inv := newInvariant(t)
	epoch, err := s.NextEpoch(ctx)
	if err != nil {
		t.Fatal(err)
	}
	ctrl, err := StartController(ctx, s, ControllerConfig{Shape: shape, Epoch: epoch, Debounce: 2 * time.Second, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer ctrl.Close()
	var wg sync.WaitGroup
	nodes := make([]*testNode, 3)
	for i, id := range []string{"e1", "e2", "e3"} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			nodes[i] = startExpert(t, ctx, e.ClientAddr(), inv, shape, id, 0)
		}()
	}
	wg.Wait()
	st := settled(t, ctx, ctrl, nil, nodes[0].hold, nodes[1].hold, nodes[2].hold)
	if st != 1 {
		t.Fatalf("three nodes joining together made %d versions", st)
	}
}

// blockingHolder never finishes loading.
type blockingHolder struct{ *fakeHolder }

func (b blockingHolder) Hold(ctx context.Context, s placement.Set) error {
	<-ctx.Done()
	return ctx.Err()
}

// A target naming a node that dies before it is ready is never
// activated: the next plan supersedes it and it is collected.
func TestControllerSupersedesDeadTarget(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t, 30*time.Second)
	e := startEtcd(t, ctx, t.TempDir(), "127.0.0.1:0")
	addr := e.ClientAddr()
	s := connect(t, ctx, addr)
	shape := tinyShape(t)
	inv := newInvariant(t)
	epoch, err := s.NextEpoch(ctx)
	if err != nil {
		t.Fatal(err)
	}
	ctrl, err := StartController(ctx, s, ControllerConfig{Shape: shape, Epoch: epoch, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer ctrl.Close()
	a1 := startAttn(t, ctx, addr, shape, "a1")
	e1 := startExpert(t, ctx, addr, inv, shape, "e1", 0)
	v1 := settled(t, ctx, ctrl, []*AttnView{a1.view}, e1.hold)

	// e2 joins but never finishes loading.
	es := connect(t, ctx, addr)
	reg, err := Register(ctx, es, member(RoleExpert, "e2", tinyIdentity(t)), 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	agent, err := NewExpertAgent(ctx, es, reg, shape, blockingHolder{newFakeHolder(inv, shape, "e2", "x")})
	if err != nil {
		t.Fatal(err)
	}
	st := waitStatus(t, ctx, ctrl, "a target naming e2", func(cs ClusterStatus) bool { return cs.Target > v1 })
	stuck := st.Target
	// e2 dies.
	agent.Close()
	es.Close()
	reg.Close(ctx)
	var actives []uint64
	final := waitStatus(t, ctx, ctrl, "a version without e2 active", func(cs ClusterStatus) bool {
		if len(actives) == 0 || actives[len(actives)-1] != cs.Active {
			actives = append(actives, cs.Active)
		}
		return cs.Active > stuck && cs.Active == cs.Target && !slices.Contains(cs.Versions, stuck)
	})
	if slices.Contains(actives, stuck) {
		t.Fatalf("the target naming a dead node was activated: %v", actives)
	}
	if n := e1.hold.Held().Len(); n != len(shape.MoELayers)*shape.Experts {
		t.Fatalf("e1 holds %d experts after e2 died, want all", n)
	}
	t.Logf("stuck target %d superseded by %d", stuck, final.Active)
}

func TestControllerConfigValidate(t *testing.T) {
	shape := placement.Shape{Layers: 2, Experts: 4, Groups: 1, MoELayers: []int{1}}
	for _, c := range []ControllerConfig{
		{Shape: shape},
		{Shape: placement.Shape{Layers: 2}, Epoch: 1},
		{Shape: shape, Epoch: 1, Redundant: -1},
	} {
		if err := c.Validate(); !errors.Is(err, ErrConfig) {
			t.Errorf("%+v: %v", c, err)
		}
	}
}
