package controlplane_test

import (
	"context"
	"fmt"
	"log"
	"os"
	"time"

	"github.com/expertmesh/expertmesh/controlplane"
	"github.com/expertmesh/expertmesh/placement"
)

// A whole control plane in one process: an embedded etcd, a coordinator's
// controller, one expert node (an in-memory holder standing in for the
// real node) and an attention node's view of the placement.
func Example() {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	dir, err := os.MkdirTemp("", "etcd")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)

	// `up` starts etcd in its data directory; port 0 picks a free port.
	etcd, err := controlplane.StartEtcd(ctx, controlplane.EtcdConfig{Dir: dir, ClientAddr: "127.0.0.1:0", PeerAddr: "127.0.0.1:0"})
	if err != nil {
		log.Fatal(err)
	}
	defer etcd.Close()
	if err := etcd.WaitReady(ctx); err != nil {
		log.Fatal(err)
	}
	store, err := controlplane.Connect(ctx, controlplane.Config{Endpoints: []string{etcd.ClientAddr()}})
	if err != nil {
		log.Fatal(err)
	}
	defer store.Close()

	// The model: two layers, the second with eight routed experts. Real
	// nodes use placement.ShapeOf(config) and IdentifyModel(dir).
	shape := placement.Shape{Layers: 2, Experts: 8, Groups: 1, MoELayers: []int{1}}
	model := controlplane.ModelIdentity{Hash: "0123abcd", Name: "demo", Layers: 2, RoutedExperts: 8}

	// The coordinator: a new epoch, then the controller.
	epoch, err := store.NextEpoch(ctx)
	if err != nil {
		log.Fatal(err)
	}
	ctrl, err := controlplane.StartController(ctx, store, controlplane.ControllerConfig{Shape: shape, Epoch: epoch})
	if err != nil {
		log.Fatal(err)
	}
	defer ctrl.Close()

	// An expert node registers and runs its agent.
	expert, err := controlplane.Register(ctx, store, controlplane.Member{ID: "e1", Role: controlplane.RoleExpert, Addr: "127.0.0.1:7001", Model: model}, 0)
	if err != nil {
		log.Fatal(err)
	}
	defer expert.Close(ctx)
	agent, err := controlplane.NewExpertAgent(ctx, store, expert, shape, controlplane.NewMemHolder(shape))
	if err != nil {
		log.Fatal(err)
	}
	defer agent.Close()

	// An attention node registers and routes by its view.
	attn, err := controlplane.Register(ctx, store, controlplane.Member{ID: "a1", Role: controlplane.RoleAttn, Addr: "127.0.0.1:7101", Model: model}, 0)
	if err != nil {
		log.Fatal(err)
	}
	defer attn.Close(ctx)
	view, err := controlplane.NewAttnView(ctx, store, attn, shape)
	if err != nil {
		log.Fatal(err)
	}
	defer view.Close()
	if err := view.Wait(ctx); err != nil {
		log.Fatal(err)
	}
	r, _ := view.Routing()
	fmt.Printf("version %d: layer 1 expert 5 on %v\n", r.Table.Version, r.Table.ReplicaIDs(1, 5))
	// Output: version 1: layer 1 expert 5 on [e1]
}
