package attnnode_test

import (
	"context"
	"fmt"
	"log"
	"os"
	"path/filepath"

	"github.com/expertmesh/expertmesh/attnnode"
	"github.com/expertmesh/expertmesh/model"
	meshpb "github.com/expertmesh/expertmesh/proto"
)

// An attention node run in-process (no gRPC), as serve runs it: one step
// creates a sequence from a three-token prompt and samples its next token.
func ExampleStart() {
	dir, err := os.MkdirTemp("", "attnnode-example")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)
	p, _ := model.IsPreset("tiny-v2-lite")
	ckpt := filepath.Join(dir, "tiny")
	if err := model.GenerateCheckpoint(ckpt, p, model.GenOptions{Seed: 1}); err != nil {
		log.Fatal(err)
	}

	cfg := attnnode.DefaultConfig()
	cfg.ModelDir, cfg.Threads, cfg.CacheBytes = ckpt, 1, 1<<20
	cfg.ListenAddr = "" // in-process; set an address to serve AttentionService
	node, err := attnnode.Start(context.Background(), cfg)
	if err != nil {
		log.Fatal(err)
	}
	defer node.Close()
	<-node.Ready()

	resp, err := node.Step(context.Background(), &meshpb.StepRequest{Step: 1, Work: []*meshpb.SeqWork{
		{SeqId: 1, Tokens: []int32{1, 2, 3}, Sample: true, ReserveTokens: 8},
	}})
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("code", resp.Code, "sampled", resp.Results[0].Sampled, "blocks in use", resp.TotalBlocks-resp.FreeBlocks)
	// Output: code 0 sampled true blocks in use 1
}
