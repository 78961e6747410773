package coordinator

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/expertmesh/expertmesh/attnnode"
	"github.com/expertmesh/expertmesh/model"
	meshpb "github.com/expertmesh/expertmesh/proto"
)

// proxy forwards TCP to a target until killed; killing it looks to the
// coordinator like the node's process dying (connections reset, dials
// refused) while the node itself stays intact.
type proxy struct {
	ln     net.Listener
	target string
	mu     sync.Mutex
	conns  []net.Conn
	wg     sync.WaitGroup
}

func newProxy(t *testing.T, target string) *proxy {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &proxy{ln: ln, target: target}
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			u, err := net.Dial("tcp", target)
			if err != nil {
				c.Close()
				continue
			}
			p.mu.Lock()
			p.conns = append(p.conns, c, u)
			p.mu.Unlock()
			p.wg.Add(2)
			go func() { defer p.wg.Done(); io.Copy(u, c); u.Close() }()
			go func() { defer p.wg.Done(); io.Copy(c, u); c.Close() }()
		}
	}()
	t.Cleanup(p.kill)
	return p
}

func (p *proxy) kill() {
	p.ln.Close()
	p.mu.Lock()
	for _, c := range p.conns {
		c.Close()
	}
	p.mu.Unlock()
	p.wg.Wait()
}

// startGRPC starts n attention-node servers on loopback and a coordinator
// dialing them (through a proxy each), as `expertmesh coordinator --attn`
// does.
func startGRPC(t *testing.T, n int, wrap func(i int, nd AttentionNode) AttentionNode) (*Coordinator, []*proxy) {
	t.Helper()
	var proxies []*proxy
	var nodes []AttentionNode
	for i := range n {
		nc := attnnode.DefaultConfig()
		nc.ModelDir, nc.NodeID, nc.Threads, nc.CacheBytes = tinyDir, fmt.Sprintf("attn-%d", i), 1, 2<<20
		s, err := attnnode.Start(context.Background(), nc)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.Close() })
		p := newProxy(t, s.Addr())
		cl, err := attnnode.Dial(context.Background(), p.ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cl.Close() })
		proxies = append(proxies, p)
		var nd AttentionNode = cl
		if wrap != nil {
			nd = wrap(i, nd)
		}
		nodes = append(nodes, nd)
	}
	cfg := DefaultConfig()
	cfg.ModelDir, cfg.Addr, cfg.StepTokenBudget, cfg.MaxRunningPerNode = tinyDir, "127.0.0.1:0", 16, 8
	// A node cut off here stays cut off: what it ran fails at once
	// instead of waiting for it (TestNodeWait* test the wait).
	cfg.NodeWait = 0
	cfg.Logger = slog.New(slog.DiscardHandler)
	c, err := Start(context.Background(), cfg, byID(nodes))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	<-c.Ready()
	return c, proxies
}

func TestOverGRPC(t *testing.T) {
	c, _ := startGRPC(t, 2, nil)
	cl := &cluster{c: c, url: "http://" + c.Addr()}
	var wg sync.WaitGroup
	outs := make([]*completionOut, 8)
	for i := range outs {
		wg.Go(func() {
			code, out := complete(t, cl, map[string]any{"prompt": prompt(2+i*7, i), "max_tokens": 3 + i, "temperature": 0, "ignore_eos": true, "logprobs": 0})
			if code != 200 {
				t.Errorf("request %d: %d %+v", i, code, out.Error)
			}
			outs[i] = out
		})
	}
	wg.Wait()
	if t.Failed() {
		return
	}
	for i, out := range outs {
		checkAgainst(t, out, ref(t, model.GenerateRequest{Prompt: prompt(2+i*7, i), MaxTokens: 3 + i, Logprobs: 0}), false, 0, 1e-4)
	}
}

// TestNodeDiesMidGeneration cuts the only attention node off while a
// stream is running: the client must get an error event and the end of
// the stream, never a hang.
func TestNodeDiesMidGeneration(t *testing.T) {
	c, proxies := startGRPC(t, 1, nil)
	b, _ := json.Marshal(map[string]any{"prompt": prompt(10, 3), "max_tokens": 2000, "ignore_eos": true, "stream": true})
	resp, err := http.Post("http://"+c.Addr()+"/v1/completions", "application/json", bytes.NewReader(b))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	br := bufio.NewReader(resp.Body)
	if line, err := br.ReadString('\n'); err != nil || !strings.HasPrefix(line, "data: {") {
		t.Fatalf("first event %q %v", line, err)
	}
	proxies[0].kill()
	evs := sseEvents(t, br)
	// With no other node to rebuild it on, the request fails with 503.
	if len(evs) < 2 || evs[len(evs)-1] != "[DONE]" || !strings.Contains(evs[len(evs)-2], `"error"`) || !strings.Contains(evs[len(evs)-2], `"attention_node_unavailable"`) {
		t.Fatalf("stream after the node died ends %q", evs[max(0, len(evs)-2):])
	}
	// The next request is refused cleanly too (503), not queued forever.
	code, out := complete(t, &cluster{url: "http://" + c.Addr()}, map[string]any{"prompt": []int{1}, "max_tokens": 2})
	if code != http.StatusServiceUnavailable || out.Error == nil {
		t.Fatalf("after the node died: %d %+v", code, out.Error)
	}
}

// TestRebuildOnAnotherNode cuts off the node serving a greedy stream: the
// coordinator re-prefills prompt + generated tokens on the other node and
// the client sees one uninterrupted stream with Engine.Generate's tokens.
func TestRebuildOnAnotherNode(t *testing.T) {
	// The serving node's fourth step waits until the test has cut the
	// node off, so the failure lands mid-generation on every run. Either
	// node may serve: Ready means one node is up, not both, so the test
	// waits for both (a node still connecting when the other fails is no
	// node to rebuild on: the request would fail, as it should).
	held := make([]*holdStep, 2)
	c, proxies := startGRPC(t, 2, func(i int, n AttentionNode) AttentionNode {
		held[i] = &holdStep{AttentionNode: n, after: 3, reached: make(chan struct{}), resume: make(chan struct{})}
		return held[i]
	})
	waitUsable(t, c, 2)
	p := prompt(9, 5)
	res := make(chan *completionOut, 1)
	go func() {
		_, out := complete(t, &cluster{url: "http://" + c.Addr()}, map[string]any{"prompt": p, "max_tokens": 12, "temperature": 0, "ignore_eos": true, "logprobs": 1})
		res <- out
	}()
	victim := 0
	select {
	case <-held[0].reached:
	case <-held[1].reached:
		victim = 1
	}
	proxies[victim].kill()
	close(held[victim].resume)
	close(held[1-victim].resume) // the survivor never holds
	out := <-res
	if out.Error != nil {
		t.Fatalf("request failed across the rebuild: %+v", out.Error)
	}
	want := ref(t, model.GenerateRequest{Prompt: p, MaxTokens: 12, Logprobs: 1})
	checkAgainst(t, out, want, false, 1, 1e-4)
	resp, err := http.Get("http://" + c.Addr() + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if !strings.Contains(string(b), "expertmesh_coordinator_rebuilds_total 1\n") {
		t.Errorf("rebuild not counted")
	}
}

// holdStep lets `after` steps with work through, then holds the next one
// until resume is closed.
type holdStep struct {
	AttentionNode
	after   int
	n       int
	reached chan struct{}
	resume  chan struct{}
}

func (h *holdStep) Step(ctx context.Context, req *meshpb.StepRequest) (*meshpb.StepResponse, error) {
	if len(req.Work) > 0 {
		if h.n++; h.n == h.after+1 {
			close(h.reached)
			<-h.resume
		}
	}
	return h.AttentionNode.Step(ctx, req)
}

// waitUsable waits until /readyz counts n attention nodes taking new
// sequences.
func waitUsable(t *testing.T, c *Coordinator, n int) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		var ready struct{ Nodes int }
		resp, err := http.Get("http://" + c.Addr() + "/readyz")
		if err == nil {
			err = json.NewDecoder(resp.Body).Decode(&ready)
			resp.Body.Close()
		}
		if err == nil && ready.Nodes >= n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d attention nodes not usable after 30 s (%d are; %v)", n, ready.Nodes, err)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
