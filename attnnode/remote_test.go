package attnnode

import (
	"context"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"

	"github.com/expertmesh/expertmesh/expertnode"
	"github.com/expertmesh/expertmesh/model"
	"github.com/expertmesh/expertmesh/placement"
	meshpb "github.com/expertmesh/expertmesh/proto"
)

// startExperts starts n expert nodes on loopback holding an even,
// group-aligned split of dir's experts, and returns the placement.
func startExperts(t testing.TB, dir string, n int) (*placement.Table, []*expertnode.Node) {
	t.Helper()
	c, err := model.LoadConfig(dir)
	if err != nil {
		t.Fatal(err)
	}
	shape := placement.ShapeOf(c)
	names := make([]string, n)
	for i := range names {
		names[i] = string(rune('a' + i))
	}
	plan, err := placement.Even(shape, names, 0)
	if err != nil {
		t.Fatal(err)
	}
	spec := ""
	var nodes []*expertnode.Node
	for _, name := range names {
		cfg := expertnode.DefaultConfig()
		cfg.ModelDir, cfg.Experts, cfg.Threads, cfg.NodeID = dir, plan.Spec(name), 1, name
		node, err := expertnode.Start(context.Background(), cfg)
		if err != nil {
			t.Fatal(err)
		}
		<-node.Ready()
		t.Cleanup(func() { node.Close() })
		nodes = append(nodes, node)
		if spec != "" {
			spec += ";"
		}
		spec += node.Addr() + "=" + plan.Spec(name)
	}
	table, err := placement.ParseSpec(shape, spec)
	if err != nil {
		t.Fatal(err)
	}
	return table, nodes
}

// TestRemoteExpertsMatchLocal: an attention node dispatching every MoE
// layer to three expert nodes over gRPC, with ping-pong micro-batches,
// produces the single-process engine's tokens and logprobs.
func TestRemoteExpertsMatchLocal(t *testing.T) {
	for _, preset := range []string{"tiny-v2", "tiny-v3"} {
		t.Run(preset, func(t *testing.T) {
			dir := genTiny(t, preset)
			table, _ := startExperts(t, dir, 3)
			cfg := DefaultConfig()
			cfg.ModelDir, cfg.Threads, cfg.CacheBytes, cfg.Placement = dir, 1, 8<<20, placement.NewStatic(table)
			s, err := Start(context.Background(), cfg)
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			client, err := Dial(context.Background(), s.Addr())
			if err != nil {
				t.Fatal(err)
			}
			defer client.Close()
			const maxTokens = 5
			tokens, lps, echo := drive(t, client, prompts, maxTokens, 4)
			checkAgainstReference(t, dir, tokens, lps, echo, maxTokens)
		})
	}
}

// TestExpertNodeDeathIsACleanError: with an expert node gone and no other
// replica, a step fails once the expert-wait budget is spent, with
// UNAVAILABLE naming the layer and experts; it never hangs.
func TestExpertNodeDeathIsACleanError(t *testing.T) {
	dir := genTiny(t, "tiny-v2")
	table, nodes := startExperts(t, dir, 2)
	cfg := DefaultConfig()
	cfg.ModelDir, cfg.Threads, cfg.CacheBytes, cfg.Placement = dir, 1, 8<<20, placement.NewStatic(table)
	cfg.ExpertWait = time.Second
	node, err := Start(context.Background(), inProcess(cfg))
	if err != nil {
		t.Fatal(err)
	}
	defer node.Close()
	step := func(id uint64) (*meshpb.StepResponse, error) {
		return node.Step(context.Background(), &meshpb.StepRequest{Step: id, Work: []*meshpb.SeqWork{
			{SeqId: id, Tokens: []int32{1, 2, 3, 4, 5, 6, 7, 8}, Sample: true, ReserveTokens: 16},
		}})
	}
	if resp, err := step(1); err != nil || resp.Code != 0 {
		t.Fatalf("healthy cluster: %v %v", resp, err)
	}
	nodes[1].Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	type result struct {
		resp *meshpb.StepResponse
		err  error
	}
	done := make(chan result, 1)
	go func() { r, err := step(2); done <- result{r, err} }()
	select {
	case r := <-done:
		if r.err != nil {
			t.Fatalf("an expert outage ended the step as this node's fault: %v", r.err)
		}
		if codes.Code(r.resp.Code) != codes.Unavailable || !strings.Contains(r.resp.Message, "layer") {
			t.Fatalf("step with half the experts gone: code %v %q", codes.Code(r.resp.Code), r.resp.Message)
		}
		t.Logf("answer: %s", r.resp.Message)
	case <-ctx.Done():
		t.Fatal("step hung after an expert node died")
	}
}

// TestReplicaFailover: with every expert replicated on two nodes, losing
// one node does not fail the step, and tokens stay exact.
func TestReplicaFailover(t *testing.T) {
	dir := genTiny(t, "tiny-v2-lite")
	c, _ := model.LoadConfig(dir)
	shape := placement.ShapeOf(c)
	var nodes []*expertnode.Node
	spec := ""
	for i := range 2 {
		cfg := expertnode.DefaultConfig()
		cfg.ModelDir, cfg.Threads = dir, 1
		n, err := expertnode.Start(context.Background(), cfg)
		if err != nil {
			t.Fatal(err)
		}
		<-n.Ready()
		t.Cleanup(func() { n.Close() })
		nodes = append(nodes, n)
		if i > 0 {
			spec += ";"
		}
		spec += n.Addr() + "=0-" + itoa(c.NumExperts()-1)
	}
	table, err := placement.ParseSpec(shape, spec)
	if err != nil {
		t.Fatal(err)
	}
	cfg := DefaultConfig()
	cfg.ModelDir, cfg.Threads, cfg.CacheBytes, cfg.Placement = dir, 1, 8<<20, placement.NewStatic(table)
	node, err := Start(context.Background(), inProcess(cfg))
	if err != nil {
		t.Fatal(err)
	}
	defer node.Close()
	// Warm both streams, then kill the preferred replica.
	drive(t, node, prompts[:1], 1, 8)
	nodes[0].Close()
	const maxTokens = 5
	tokens, lps, echo := drive(t, node, prompts, maxTokens, 4)
	checkAgainstReference(t, dir, tokens, lps, echo, maxTokens)
}

func itoa(i int) string {
	if i < 10 {
		return string(rune('0' + i))
	}
	return itoa(i/10) + string(rune('0'+i%10))
}
