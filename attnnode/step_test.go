package attnnode

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	meshpb "github.com/expertmesh/expertmesh/proto"
)

// localNode starts an in-process node with every expert loaded.
func localNode(t *testing.T) *Node {
	t.Helper()
	cfg := DefaultConfig()
	cfg.ModelDir, cfg.Threads, cfg.CacheBytes, cfg.ListenAddr = genTiny(t, "tiny-v2-lite"), 1, 1<<20, ""
	n, err := Start(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.Close() })
	return n
}

// checkedStep runs a step and checks that its answer reports the node's
// free blocks exactly as Info does right after.
func checkedStep(t *testing.T, n *Node, req *meshpb.StepRequest) *meshpb.StepResponse {
	t.Helper()
	resp, err := n.Step(context.Background(), req)
	if err != nil {
		t.Fatalf("step %d: %v", req.Step, err)
	}
	info, err := n.Info(context.Background(), 0)
	if err != nil {
		t.Fatal(err)
	}
	if resp.FreeBlocks != info.FreeBlocks || resp.TotalBlocks != info.TotalBlocks {
		t.Fatalf("step %d answered %d/%d blocks free, Info says %d/%d", req.Step, resp.FreeBlocks, resp.TotalBlocks, info.FreeBlocks, info.TotalBlocks)
	}
	return resp
}

func newSeq(id uint64, epoch uint64) *meshpb.StepRequest {
	return &meshpb.StepRequest{Step: id, Epoch: epoch, Work: []*meshpb.SeqWork{
		{SeqId: 1, Tokens: []int32{1, 2, 3}, Sample: true, ReserveTokens: 40},
	}}
}

// TestEpochFencing: an older epoch is refused (Step: FAILED_PRECONDITION
// answer; Info: status error) with nothing applied; a newer one drops the
// older epoch's sequences, so a restarted coordinator reusing sequence
// ids never hits "already exists" and no block leaks; ExpireEpoch frees
// the sequences of a coordinator whose lease expired.
func TestEpochFencing(t *testing.T) {
	n := localNode(t)
	info, _ := n.Info(context.Background(), 0)
	total := info.TotalBlocks

	if r := checkedStep(t, n, newSeq(1, 5)); r.Code != 0 || r.Results[0].Code != 0 {
		t.Fatalf("epoch 5: %v", r)
	}
	if info, _ := n.Info(context.Background(), 5); info.Epoch != 5 || info.ActiveSequences != 1 || info.FreeBlocks == total {
		t.Fatalf("after epoch 5's step: %v", info)
	}

	// An older coordinator is refused, its release not applied.
	old := newSeq(2, 4)
	old.Release = []uint64{1}
	if r := checkedStep(t, n, old); codes.Code(r.Code) != codes.FailedPrecondition || len(r.Results) != 0 {
		t.Fatalf("epoch 4 after 5: code %v %q", codes.Code(r.Code), r.Message)
	}
	if _, err := n.Info(context.Background(), 4); status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("Info of epoch 4 after 5: %v", err)
	}
	if n.Sequences() != 1 {
		t.Fatal("a refused step changed the sequences")
	}

	// A new coordinator (epoch 6) restarts ids at 1: the old sequence 1
	// is dropped first.
	r := checkedStep(t, n, newSeq(1, 6))
	if r.Code != 0 || r.Results[0].Code != 0 {
		t.Fatalf("epoch 6 reusing sequence 1: %v", r)
	}
	if n.Sequences() != 1 {
		t.Fatalf("%d sequences after the new coordinator's first step, want 1", n.Sequences())
	}
	// Info with a newer epoch fences too: free blocks back to total.
	info, err := n.Info(context.Background(), 7)
	if err != nil || info.FreeBlocks != total || info.ActiveSequences != 0 || info.Epoch != 7 {
		t.Fatalf("Info(7): %v %v; want every block free", info, err)
	}

	// ExpireEpoch frees a coordinator's sequences and refuses it later.
	checkedStep(t, n, newSeq(1, 7))
	n.ExpireEpoch(7)
	if info, _ := n.Info(context.Background(), 0); info.FreeBlocks != total || info.ActiveSequences != 0 {
		t.Fatalf("after ExpireEpoch: %d/%d free, %d sequences", info.FreeBlocks, total, info.ActiveSequences)
	}
	if r := checkedStep(t, n, newSeq(1, 7)); codes.Code(r.Code) != codes.FailedPrecondition {
		t.Fatalf("step of an expired epoch: code %v", codes.Code(r.Code))
	}
	if r := checkedStep(t, n, newSeq(1, 8)); r.Code != 0 || r.Results[0].Code != 0 {
		t.Fatalf("epoch 8 after 7 expired: %v", r)
	}
	// Epoch 0 (no control plane) is never fenced.
	if r := checkedStep(t, n, &meshpb.StepRequest{Step: 9, Release: []uint64{1}}); r.Code != 0 || r.FreeBlocks != total {
		t.Fatalf("epoch 0 step: %v", r)
	}
}

// TestEpochFenceWaitsForRunningStep: a newer epoch's Info while an older
// epoch's step runs does not pull blocks from under it; the old sequences
// go when the step ends, and the step's answer counts them free.
func TestEpochFenceWaitsForRunningStep(t *testing.T) {
	n := localNode(t)
	total := uint32(n.cache.Capacity())
	n.stepMu.Lock() // a step of epoch 1 is "running"
	s, err := n.create(&meshpb.SeqWork{SeqId: 1, Tokens: []int32{1}, ReserveTokens: 40}, 1)
	if err == nil {
		err = s.seq.Reserve(1) // the step's admit grows it
	}
	if err == nil {
		_, err = n.Info(context.Background(), 2)
	}
	dropped := n.Sequences() != 1 || len(s.seq.Blocks()) == 0
	n.stepMu.Unlock() // before any Fatal: Close waits for it
	if err != nil {
		t.Fatal(err)
	}
	if dropped {
		t.Fatal("the fence dropped a sequence a running step uses")
	}
	if r := checkedStep(t, n, &meshpb.StepRequest{Step: 1, Epoch: 2}); r.FreeBlocks != total || n.Sequences() != 0 {
		t.Fatalf("after the next step: %d/%d free, %d sequences", r.FreeBlocks, total, n.Sequences())
	}
}

// TestRepeatedSequenceRefusedWhole: a step naming a sequence twice is
// refused with INVALID_ARGUMENT and nothing of it is applied, not even
// its releases.
func TestRepeatedSequenceRefusedWhole(t *testing.T) {
	n := localNode(t)
	checkedStep(t, n, newSeq(1, 0))
	before := n.cache.FreeBlocks()
	r := checkedStep(t, n, &meshpb.StepRequest{Step: 2, Release: []uint64{1}, Work: []*meshpb.SeqWork{
		{SeqId: 2, Tokens: []int32{1}, Sample: true, ReserveTokens: 8},
		{SeqId: 3, Tokens: []int32{4}, Sample: true, ReserveTokens: 8},
		{SeqId: 2, Tokens: []int32{5}, StartPos: 1, Sample: true},
	}})
	if codes.Code(r.Code) != codes.InvalidArgument || len(r.Results) != 0 || !strings.Contains(r.Message, "sequence 2") {
		t.Fatalf("repeated sequence: code %v %q, %d results", codes.Code(r.Code), r.Message, len(r.Results))
	}
	if n.Sequences() != 1 || n.cache.FreeBlocks() != before {
		t.Fatalf("a refused step changed the node: %d sequences, %d free (was %d)", n.Sequences(), n.cache.FreeBlocks(), before)
	}
}

// TestDrain: a draining node says so in Info and keeps serving; Idle
// closes once its last sequence is released.
func TestDrain(t *testing.T) {
	n := localNode(t)
	select {
	case <-n.Idle():
	default:
		t.Fatal("a fresh node is not idle")
	}
	checkedStep(t, n, newSeq(1, 0))
	idle := n.Idle()
	n.Drain()
	if info, _ := n.Info(context.Background(), 0); !info.Draining {
		t.Fatal("Info does not report draining")
	}
	r := checkedStep(t, n, &meshpb.StepRequest{Step: 2, Work: []*meshpb.SeqWork{{SeqId: 1, Tokens: []int32{9}, StartPos: 3, Sample: true}}})
	if r.Code != 0 || r.Results[0].Code != 0 {
		t.Fatalf("a draining node stopped serving its sequence: %v", r)
	}
	select {
	case <-idle:
		t.Fatal("idle while holding a sequence")
	default:
	}
	checkedStep(t, n, &meshpb.StepRequest{Step: 3, Release: []uint64{1}})
	select {
	case <-idle:
	case <-time.After(10 * time.Second):
		t.Fatal("Idle did not close after the last release")
	}
	if n.Sequences() != 0 {
		t.Fatalf("%d sequences", n.Sequences())
	}
}

// TestStartShape: with a listen address the node serves gRPC (Ready,
// Addr); in-process it has no address; Err closes once Close returns,
// which is idempotent; a step after Close is refused.
func TestStartShape(t *testing.T) {
	dir := genTiny(t, "tiny-v2-lite")
	for _, listen := range []string{"127.0.0.1:0", ""} {
		cfg := DefaultConfig()
		cfg.ModelDir, cfg.Threads, cfg.CacheBytes, cfg.ListenAddr = dir, 1, 1<<20, listen
		n, err := Start(context.Background(), cfg)
		if err != nil {
			t.Fatal(err)
		}
		<-n.Ready()
		if (n.Addr() == "") != (listen == "") {
			t.Fatalf("listen %q: Addr %q", listen, n.Addr())
		}
		if listen != "" {
			cl, err := Dial(context.Background(), n.Addr())
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			info, err := cl.Info(ctx, 3)
			cancel()
			cl.Close()
			if err != nil || info.Epoch != 3 {
				t.Fatalf("Info over gRPC: %v %v", info, err)
			}
		}
		select {
		case err := <-n.Err():
			t.Fatalf("Err before Close: %v", err)
		default:
		}
		if err := n.Close(); err != nil {
			t.Fatal(err)
		}
		if err, ok := <-n.Err(); ok {
			t.Fatalf("Err after Close yielded %v, want closed", err)
		}
		if err := n.Close(); err != nil {
			t.Fatalf("second Close: %v", err)
		}
		if _, err := n.Step(context.Background(), newSeq(1, 0)); !errors.Is(err, ErrClosed) {
			t.Fatalf("step after Close: %v", err)
		}
	}
	cfg := DefaultConfig()
	cfg.ModelDir, cfg.ListenAddr = dir, "256.0.0.1:1"
	if _, err := Start(context.Background(), cfg); err == nil || !strings.Contains(err.Error(), "--listen") {
		t.Fatalf("bad listen address: %v", err)
	}
}

// TestCloseEndsWaitingStep: Close does not wait out the expert-wait budget
// of a step stuck on a frozen expert node; the step ends with ErrClosed
// (this node is going away) and Close returns promptly.
func TestCloseEndsWaitingStep(t *testing.T) {
	dir := genTiny(t, "tiny-v2")
	a := startExpert(t, dir, "a", nil)
	cfg := DefaultConfig()
	cfg.ModelDir, cfg.Threads, cfg.CacheBytes, cfg.Placement = dir, 1, 8<<20, newTestView(routing(t, dir, 1, a))
	cfg.DispatchTimeout, cfg.ExpertWait = time.Minute, time.Minute
	n, err := Start(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	a.proxy.Freeze()
	errc := make(chan error, 1)
	go func() {
		_, err := n.Step(context.Background(), newSeq(1, 0))
		errc <- err
	}()
	select {
	case <-a.proxy.Held():
	case <-time.After(20 * time.Second):
		t.Fatal("nothing reached the frozen expert node")
	}
	took := bounded(t, 20*time.Second, "Close with a step waiting", func() { n.Close() })
	if err := <-errc; !errors.Is(err, ErrClosed) {
		t.Fatalf("waiting step after Close: %v", err)
	}
	t.Logf("Close took %v", took)
}

func TestValidateNamesFlags(t *testing.T) {
	for flag, mut := range map[string]func(*Config){
		"--dispatch-timeout": func(c *Config) { c.DispatchTimeout = 0 },
		"--expert-wait":      func(c *Config) { c.ExpertWait = -time.Second },
	} {
		cfg := DefaultConfig()
		cfg.ModelDir = "x"
		mut(&cfg)
		if err := cfg.Validate(); err == nil || !strings.Contains(err.Error(), flag) {
			t.Errorf("%s: %v", flag, err)
		}
	}
}
