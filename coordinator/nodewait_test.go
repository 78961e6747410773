package coordinator

import (
	"context"
	"errors"
	"net/http"
	"sync"
	"testing"
	"time"

	"github.com/expertmesh/expertmesh/model"
	meshpb "github.com/expertmesh/expertmesh/proto"
)

// awayOnce is a node that goes away once and comes back under its id:
// the step after `after` steps with work fails, and so does every Info
// until back is closed (a node whose lease lapsed and that re-registers,
// or one that restarts).
type awayOnce struct {
	AttentionNode
	after int
	mu    sync.Mutex
	n     int
	gone  chan struct{} // closed when the failing step was answered
	back  chan struct{}
}

func newAwayOnce(n AttentionNode, after int) *awayOnce {
	return &awayOnce{AttentionNode: n, after: after, gone: make(chan struct{}), back: make(chan struct{})}
}

var errAway = errors.New("connection reset")

func (a *awayOnce) Step(ctx context.Context, req *meshpb.StepRequest) (*meshpb.StepResponse, error) {
	if len(req.Work) > 0 {
		a.mu.Lock()
		a.n++
		fail := a.n == a.after+1
		a.mu.Unlock()
		if fail {
			close(a.gone)
			return nil, errAway
		}
	}
	return a.AttentionNode.Step(ctx, req)
}

func (a *awayOnce) Info(ctx context.Context, epoch uint64) (*meshpb.NodeInfo, error) {
	select {
	case <-a.gone:
		select {
		case <-a.back:
		default:
			return nil, errAway
		}
	default:
	}
	return a.AttentionNode.Info(ctx, epoch)
}

// TestNodeWaitKeepsRequests: the only attention node fails a step in the
// middle of a generation and is away for a while. Within --node-wait the
// running request is rebuilt on it when it answers again and a request
// that arrives while it is away is taken, not refused: both finish with
// Engine.Generate's tokens. With --node-wait 0 the same failure ends the
// request at once (TestNodeFailure).
func TestNodeWaitKeepsRequests(t *testing.T) {
	var a *awayOnce
	cl := startCluster(t, 1, nil, func(_ int, n AttentionNode) AttentionNode { a = newAwayOnce(n, 3); return a })
	p1, p2 := prompt(7, 1), prompt(5, 2)
	type res struct {
		code int
		out  *completionOut
	}
	first := make(chan res, 1)
	go func() {
		code, out := complete(t, cl, map[string]any{"prompt": p1, "max_tokens": 10, "temperature": 0, "ignore_eos": true, "logprobs": 1})
		first <- res{code, out}
	}()
	<-a.gone
	// Away: a new request waits for the node instead of getting 503.
	second := make(chan res, 1)
	enq := make(chan uint64, 1)
	hook := func(id uint64) { enq <- id }
	cl.c.hooks.enqueued.Store(&hook)
	go func() {
		code, out := complete(t, cl, map[string]any{"prompt": p2, "max_tokens": 6, "temperature": 0, "ignore_eos": true, "logprobs": 1})
		second <- res{code, out}
	}()
	select {
	case <-enq: // taken while the node is away
	case r := <-second:
		t.Fatalf("a request while the node is away was answered without waiting: %d %+v", r.code, r.out.Error)
	}
	close(a.back)
	r1, r2 := <-first, <-second
	for i, r := range []res{r1, r2} {
		if r.code != http.StatusOK || r.out.Error != nil {
			t.Fatalf("request %d across the node's absence: %d %+v", i, r.code, r.out.Error)
		}
	}
	checkAgainst(t, r1.out, ref(t, model.GenerateRequest{Prompt: p1, MaxTokens: 10, Logprobs: 1}), false, 1, 1e-4)
	checkAgainst(t, r2.out, ref(t, model.GenerateRequest{Prompt: p2, MaxTokens: 6, Logprobs: 1}), false, 1, 1e-4)
	if n := metricValue(t, cl, "expertmesh_coordinator_rebuilds_total"); n != 1 {
		t.Errorf("rebuilds_total %v, want 1 (the running request)", n)
	}
}

// TestNodeWaitEnds: with the only node away for longer than --node-wait,
// the waiting request fails with the attention node's 503 once the wait
// is over, and a new one is refused at once.
func TestNodeWaitEnds(t *testing.T) {
	var a *awayOnce
	cl := startCluster(t, 1, func(c *Config) { c.NodeWait = 300 * time.Millisecond },
		func(_ int, n AttentionNode) AttentionNode { a = newAwayOnce(n, 1); return a })
	code, out := complete(t, cl, map[string]any{"prompt": prompt(4, 3), "max_tokens": 8, "temperature": 0, "ignore_eos": true})
	if code != http.StatusServiceUnavailable || out.Error == nil || out.Error.Type != "attention_node_unavailable" {
		t.Fatalf("after the wait: %d %+v", code, out.Error)
	}
	code, out = complete(t, cl, map[string]any{"prompt": prompt(4, 3), "max_tokens": 8})
	if code != http.StatusServiceUnavailable || out.Error == nil || out.Error.Type != "attention_node_unavailable" {
		t.Fatalf("new request after the wait: %d %+v", code, out.Error)
	}
}

// TestLostSequencesRebuilt: the node drops the coordinator's sequences
// (its epoch expired: the coordinator's lease lapsed) and takes its steps
// again (the coordinator re-registered under the same epoch). The running
// request's next step finds its sequence gone (NOT_FOUND); the
// coordinator rebuilds it on the node and the client sees
// Engine.Generate's tokens.
func TestLostSequencesRebuilt(t *testing.T) {
	var h *holdStep
	cl := startCluster(t, 1, func(c *Config) { c.Epoch = 7 }, func(_ int, n AttentionNode) AttentionNode {
		h = &holdStep{AttentionNode: n, after: 3, reached: make(chan struct{}), resume: make(chan struct{})}
		return h
	})
	p := prompt(6, 4)
	done := make(chan *completionOut, 1)
	go func() {
		_, out := complete(t, cl, map[string]any{"prompt": p, "max_tokens": 10, "temperature": 0, "ignore_eos": true, "logprobs": 1})
		done <- out
	}()
	<-h.reached
	node := cl.nodes[0]
	if node.Sequences() != 1 {
		t.Fatalf("node holds %d sequences mid-generation, want 1", node.Sequences())
	}
	node.ExpireEpoch(7)
	if node.Sequences() != 0 {
		t.Fatalf("node holds %d sequences after its epoch expired, want 0", node.Sequences())
	}
	node.ReviveEpoch(7)
	close(h.resume)
	out := <-done
	if out.Error != nil {
		t.Fatalf("request failed across the lost sequence: %+v", out.Error)
	}
	checkAgainst(t, out, ref(t, model.GenerateRequest{Prompt: p, MaxTokens: 10, Logprobs: 1}), false, 1, 1e-4)
	if n := metricValue(t, cl, "expertmesh_coordinator_rebuilds_total"); n != 1 {
		t.Errorf("rebuilds_total %v, want 1", n)
	}
}
