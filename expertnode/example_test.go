package expertnode_test

import (
	"context"
	"fmt"
	"log"
	"log/slog"
	"os"

	"github.com/expertmesh/expertmesh/expertnode"
	"github.com/expertmesh/expertmesh/internal/rpc"
	"github.com/expertmesh/expertmesh/internal/wire"
	"github.com/expertmesh/expertmesh/model"
	meshpb "github.com/expertmesh/expertmesh/proto"
)

// Start an expert node holding experts 0-79 of every MoE layer of a tiny
// generated model, and dispatch one row to it.
func Example() {
	dir, err := os.MkdirTemp("", "expertnode-example")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)
	preset, _ := model.IsPreset("tiny-v2")
	if err := model.GenerateCheckpoint(dir, preset, model.GenOptions{Seed: 1}); err != nil {
		log.Fatal(err)
	}

	cfg := expertnode.DefaultConfig()
	cfg.ModelDir = dir
	cfg.NodeID = "expert-0"
	cfg.Experts = "0-79"
	cfg.Threads = 1
	cfg.Logger = slog.New(slog.DiscardHandler)
	node, err := expertnode.Start(context.Background(), cfg)
	if err != nil {
		log.Fatal(err)
	}
	defer node.Close()
	<-node.Ready()

	cc, err := rpc.Dial(node.Addr())
	if err != nil {
		log.Fatal(err)
	}
	defer cc.Close()
	client := meshpb.NewExpertServiceClient(cc)
	stream, err := client.Dispatch(context.Background())
	if err != nil {
		log.Fatal(err)
	}
	row := make([]float32, 64) // tiny-v2's hidden size
	for i := range row {
		row[i] = float32(i%7) / 7
	}
	// Layer 1 is tiny-v2's first MoE layer; k=2 slots, the second unused
	// (-1: an expert another node holds).
	err = stream.Send(&meshpb.DispatchRequest{Id: 1, Layer: 1, Hidden: wire.F32Matrix(row, 1, 64),
		K: 2, ExpertIds: []int32{5, -1}, GateWeights: []float32{0.5, 0.5}})
	if err != nil {
		log.Fatal(err)
	}
	resp, err := stream.Recv()
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("reply", resp.Id, "code", resp.Code, "shape", resp.Partial.Shape)

	st, err := client.Status(context.Background(), &meshpb.StatusRequest{})
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(st.NodeId, "holds", len(st.Experts), "ranges; rows served at layer 1:", st.RowsServed[1])
	// Output:
	// reply 1 code 0 shape [1 64]
	// expert-0 holds 2 ranges; rows served at layer 1: 1
}
