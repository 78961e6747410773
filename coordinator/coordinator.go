package coordinator

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/trace"

	"github.com/expertmesh/expertmesh/model"
	meshpb "github.com/expertmesh/expertmesh/proto"
	"github.com/expertmesh/expertmesh/tokenizer"
)

var tracer = otel.Tracer("github.com/expertmesh/expertmesh/coordinator")

// AttentionNode is how the coordinator drives one attention node: the
// in-process attnnode.Node and the gRPC attnnode.Client both satisfy it.
//
// The coordinator calls Step from one goroutine per node and waits for each
// answer before planning the next, so steps reach a node in order and never
// overlap. Info may be called concurrently with a Step. An error from Step
// means the whole step failed: the coordinator fails every sequence on the
// node and treats the node as down until Info answers again. The
// coordinator does not close nodes; their owner does, after Close.
type AttentionNode interface {
	Step(ctx context.Context, req *meshpb.StepRequest) (*meshpb.StepResponse, error)
	Info(ctx context.Context) (*meshpb.NodeInfo, error)
}

// Coordinator is a running coordinator: the OpenAI-compatible HTTP front
// door and one scheduling loop per attention node.
type Coordinator struct {
	cfg   Config
	log   *slog.Logger
	name  string
	mcfg  *model.Config
	eos   []int
	gen   *model.GenerationConfig
	tok   *tokenizer.Tokenizer // nil: the model dir has no tokenizer
	nodes []AttentionNode

	ln      net.Listener
	srv     *http.Server
	metrics *metrics

	ready     chan struct{}
	readyOnce sync.Once
	errc      chan error
	cancel    context.CancelFunc
	loops     sync.WaitGroup
	nextID    atomic.Uint64
	wake      []chan struct{} // per node, capacity 1
	nodeSeen  []atomic.Bool   // node answered Info at least once
	closeOnce sync.Once
	closeErr  error

	mu struct {
		sync.Mutex
		sched   *scheduler
		closing bool
		// nodeErr is why each node is down (nil while up).
		nodeErr []error
		boxes   map[uint64]*mailbox
	}

	// fresh holds connections accepted but not yet carrying a request.
	// http.Server.Shutdown waits up to 5s for those (a client may have
	// dialed ahead), so Close closes them itself.
	freshMu sync.Mutex
	fresh   map[net.Conn]struct{}

	// hooks let in-package tests observe the driver without sleeping.
	hooks struct {
		enqueued atomic.Pointer[func(id uint64)]
	}
}

// Start loads the model's configs and tokenizer from cfg.ModelDir, starts
// one scheduling loop per node and serves HTTP on cfg.Addr. Ready() closes
// once every node has answered Info; until then requests may fail with 503
// and /readyz says which nodes are missing. A failed Start undoes what it
// began. The coordinator keeps ctx's values (trace context) but not its
// cancellation: it runs until Close.
func Start(ctx context.Context, cfg Config, nodes []AttentionNode) (*Coordinator, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if len(nodes) == 0 {
		return nil, fmt.Errorf("--attn: at least one attention node is required")
	}
	mcfg, err := model.LoadConfig(cfg.ModelDir)
	if err != nil {
		return nil, fmt.Errorf("--model: %w", err)
	}
	gen, err := model.LoadGenerationConfig(cfg.ModelDir, mcfg)
	if err != nil {
		return nil, fmt.Errorf("--model: %w", err)
	}
	var tok *tokenizer.Tokenizer
	if _, err := os.Stat(filepath.Join(cfg.ModelDir, "tokenizer.json")); err == nil {
		if tok, err = tokenizer.Load(cfg.ModelDir); err != nil {
			return nil, fmt.Errorf("--model: %w", err)
		}
	}
	name := cfg.ModelName
	if name == "" {
		abs, err := filepath.Abs(cfg.ModelDir)
		if err != nil {
			return nil, fmt.Errorf("--model: %w", err)
		}
		name = filepath.Base(abs)
	}
	ln, err := net.Listen("tcp", cfg.Addr)
	if err != nil {
		return nil, fmt.Errorf("--addr: %w", err)
	}
	c := &Coordinator{
		cfg: cfg, name: name, mcfg: mcfg, gen: gen, eos: gen.EOSTokenIDs, tok: tok, nodes: nodes,
		ln: ln, metrics: newMetrics(), ready: make(chan struct{}), errc: make(chan error, 1),
		nodeSeen: make([]atomic.Bool, len(nodes)),
	}
	c.log = cfg.Logger
	if c.log == nil {
		c.log = slog.Default()
	}
	c.mu.sched = newScheduler(schedConfig{budget: cfg.StepTokenBudget, maxSeqs: cfg.MaxRunningPerNode}, len(nodes))
	c.mu.boxes = map[uint64]*mailbox{}
	c.mu.nodeErr = make([]error, len(nodes))
	for i := range c.mu.nodeErr {
		c.mu.nodeErr[i] = errors.New("not contacted yet")
	}
	lctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	c.cancel = cancel
	for range nodes {
		c.wake = append(c.wake, make(chan struct{}, 1))
	}
	for i := range nodes {
		c.loops.Add(1)
		go c.nodeLoop(lctx, i)
	}
	c.srv = &http.Server{Handler: c.Handler(), ReadHeaderTimeout: 30 * time.Second, IdleTimeout: 2 * time.Minute,
		BaseContext: func(net.Listener) context.Context { return lctx }, ConnState: c.trackConn}
	c.fresh = map[net.Conn]struct{}{}
	go func() {
		if err := c.srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			select {
			case c.errc <- err:
			default:
			}
		}
	}()
	return c, nil
}

// Ready is closed once every attention node has answered Info.
func (c *Coordinator) Ready() <-chan struct{} { return c.ready }

// Err reports a fatal serving error (the listener failed).
func (c *Coordinator) Err() <-chan error { return c.errc }

// Addr is the HTTP listen address, with the port ":0" picked.
func (c *Coordinator) Addr() string { return c.ln.Addr().String() }

// ModelName is the id requests name and /v1/models reports.
func (c *Coordinator) ModelName() string { return c.name }

// Close shuts down in this order: refuse new requests; fail every waiting
// and running request with 503 so their handlers return; close connections
// that never sent a request; shut the HTTP server down (waiting up to 5s
// for handlers to write their answers); stop
// the node loops (cancelling any step in flight) and wait for them. The
// nodes themselves are left to their owner. Close is idempotent.
func (c *Coordinator) Close() error {
	c.closeOnce.Do(func() {
		c.mu.Lock()
		c.mu.closing = true
		ups := c.mu.sched.failAll(ErrShuttingDown)
		c.mu.Unlock()
		c.deliver(ups)
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		c.freshMu.Lock()
		for conn := range c.fresh {
			conn.Close()
		}
		c.freshMu.Unlock()
		if err := c.srv.Shutdown(ctx); err != nil {
			c.srv.Close()
		}
		c.cancel()
		c.loops.Wait()
	})
	return c.closeErr
}

func (c *Coordinator) trackConn(conn net.Conn, st http.ConnState) {
	c.freshMu.Lock()
	defer c.freshMu.Unlock()
	if st == http.StateNew {
		c.fresh[conn] = struct{}{}
	} else {
		delete(c.fresh, conn)
	}
}

// nodeLoop drives node i: bring it up with Info, then plan a step, run it,
// apply the results, deliver them, repeat; sleep on the node's wake channel
// while there is nothing to do.
func (c *Coordinator) nodeLoop(ctx context.Context, i int) {
	defer c.loops.Done()
	node := c.nodes[i]
	backoff := 50 * time.Millisecond
	for ctx.Err() == nil {
		c.mu.Lock()
		up := c.mu.sched.nodes[i].up
		c.mu.Unlock()
		if !up {
			if err := c.bringUp(ctx, i); err != nil {
				c.mu.Lock()
				prev := c.mu.nodeErr[i]
				c.mu.nodeErr[i] = err
				c.mu.Unlock()
				if prev == nil || prev.Error() != err.Error() {
					c.log.Warn("attention node not answering", "node", i, "err", err)
				}
				select {
				case <-ctx.Done():
					return
				case <-time.After(backoff):
				}
				backoff = min(2*backoff, 2*time.Second)
				continue
			}
		}
		c.mu.Lock()
		req := c.mu.sched.plan(i)
		var links []trace.Link
		if in := c.mu.sched.nodes[i].inflight; req != nil && in != nil {
			for _, w := range in.work {
				if w.seq.span.IsValid() {
					links = append(links, trace.Link{SpanContext: w.seq.span})
				}
			}
		}
		c.mu.Unlock()
		if req == nil {
			select {
			case <-ctx.Done():
				return
			case <-c.wake[i]:
			}
			continue
		}
		if err := c.runStep(ctx, i, node, req, links); err != nil {
			// The node is down now. Wait before asking it again so a node
			// that answers Info but fails every step is not hammered.
			select {
			case <-ctx.Done():
				return
			case <-time.After(backoff):
			}
			backoff = min(2*backoff, 2*time.Second)
		} else {
			backoff = 50 * time.Millisecond
		}
	}
}

func (c *Coordinator) bringUp(ctx context.Context, i int) error {
	ictx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	info, err := c.nodes[i].Info(ictx)
	if err != nil {
		return err
	}
	if int(info.VocabSize) != c.mcfg.VocabSize {
		return fmt.Errorf("node %s serves a vocabulary of %d, the model has %d", info.NodeId, info.VocabSize, c.mcfg.VocabSize)
	}
	if info.BlockSize == 0 || info.TotalBlocks == 0 {
		return fmt.Errorf("node %s reports no cache", info.NodeId)
	}
	c.mu.Lock()
	c.mu.sched.nodeUp(i, info)
	c.mu.nodeErr[i] = nil
	c.log.Info("attention node up", "node", i, "id", info.NodeId, "blocks", info.TotalBlocks,
		"free", info.FreeBlocks, "block_size", info.BlockSize)
	woken, failed := c.admitLocked()
	c.mu.Unlock()
	c.deliver(failed)
	c.wakeNodes(woken)
	c.nodeSeen[i].Store(true)
	all := true
	for j := range c.nodeSeen {
		all = all && c.nodeSeen[j].Load()
	}
	if all {
		c.readyOnce.Do(func() { close(c.ready) })
	}
	return nil
}

// runStep sends one step and applies its answer. The step's span links to
// the spans of the requests it serves: a step is shared by many requests,
// so it cannot be the child of one.
func (c *Coordinator) runStep(ctx context.Context, i int, node AttentionNode, req *meshpb.StepRequest, links []trace.Link) error {
	rows := 0
	for _, w := range req.Work {
		rows += len(w.Tokens)
	}
	sctx, cancel := context.WithTimeout(ctx, c.cfg.StepTimeout)
	sctx, span := tracer.Start(sctx, "coordinator.step", trace.WithAttributes(
		attribute.Int("node", i), attribute.Int64("step", int64(req.Step)),
		attribute.Int("sequences", len(req.Work)), attribute.Int("tokens", rows),
		attribute.Int("released", len(req.Release))), trace.WithLinks(links...))
	start := time.Now()
	resp, err := node.Step(sctx, req)
	el := time.Since(start)
	cancel()
	if err != nil {
		span.RecordError(err)
	}
	span.End()
	c.metrics.stepSeconds.Observe(el.Seconds())
	c.metrics.stepTokens.Observe(float64(rows))
	c.mu.Lock()
	var ups []update
	var woken []int
	var failed []update
	if err != nil {
		err = fmt.Errorf("%w: %v", ErrNodeFailed, err)
		c.mu.nodeErr[i] = err
		onNode := len(c.mu.sched.nodes[i].running)
		ups = c.mu.sched.fail(i, err)
		c.metrics.rebuilds.Add(float64(onNode - len(ups)))
		if ctx.Err() == nil {
			c.log.Error("attention node step failed; moving its sequences to other nodes", "node", i, "step", req.Step,
				"rebuilt", onNode-len(ups), "failed", len(ups), "err", err)
		}
	} else {
		ups = c.mu.sched.apply(i, resp)
	}
	// Finished sequences freed seats and blocks: place waiting ones.
	woken, failed = c.admitLocked()
	c.mu.Unlock()
	c.deliver(ups)
	c.deliver(failed)
	c.wakeNodes(woken)
	return err
}

func (c *Coordinator) wakeNodes(nodes []int) {
	for _, i := range nodes {
		select {
		case c.wake[i] <- struct{}{}:
		default:
		}
	}
}

// admitLocked places waiting sequences and publishes the queue depth.
func (c *Coordinator) admitLocked() (woken []int, failed []update) {
	woken, failed = c.mu.sched.admit()
	c.metrics.queue.Set(float64(len(c.mu.sched.waiting)))
	return woken, failed
}

// submit admits q or says why not. On success q's mailbox receives its
// updates until one carries finish or err.
func (c *Coordinator) submit(q *sequence) (*mailbox, error) {
	box := newMailbox()
	c.mu.Lock()
	if c.mu.closing {
		c.mu.Unlock()
		return nil, ErrShuttingDown
	}
	s := c.mu.sched
	if err := s.check(q); err != nil {
		c.mu.Unlock()
		return nil, err
	}
	if len(s.waiting) >= c.cfg.MaxWaiting && !c.fitsNowLocked(q) {
		c.mu.Unlock()
		return nil, ErrOverloaded
	}
	c.mu.boxes[q.id] = box
	s.enqueue(q)
	woken, failed := c.admitLocked()
	c.mu.Unlock()
	if f := c.hooks.enqueued.Load(); f != nil {
		(*f)(q.id)
	}
	c.deliver(failed)
	c.wakeNodes(woken)
	return box, nil
}

// fitsNowLocked says whether q would be placed at once (queue empty and a
// node has room), so a full waiting queue does not refuse work that would
// not wait.
func (c *Coordinator) fitsNowLocked(q *sequence) bool {
	s := c.mu.sched
	if len(s.waiting) > 0 {
		return false
	}
	for _, n := range s.nodes {
		if n.up && len(n.running) < s.cfg.maxSeqs && blocksFor(q.reserveTokens(), n.blockSize) <= n.freeBlocks {
			return true
		}
	}
	return false
}

// withdraw cancels q if it is still running and forgets its mailbox.
func (c *Coordinator) withdraw(q *sequence) {
	c.mu.Lock()
	node := c.mu.sched.cancel(q)
	delete(c.mu.boxes, q.id)
	woken, failed := c.admitLocked()
	c.mu.Unlock()
	c.deliver(failed)
	if node >= 0 {
		woken = append(woken, node)
	}
	c.wakeNodes(woken)
}

func (c *Coordinator) deliver(ups []update) {
	if len(ups) == 0 {
		return
	}
	c.mu.Lock()
	boxes := make([]*mailbox, len(ups))
	for j, u := range ups {
		boxes[j] = c.mu.boxes[u.seq.id]
		if u.finish != "" || u.err != nil {
			delete(c.mu.boxes, u.seq.id)
		}
	}
	c.mu.Unlock()
	for j, u := range ups {
		if boxes[j] != nil {
			boxes[j].put(u)
		}
	}
}

// mailbox hands updates from node loops to a request's handler without
// ever blocking the loop on a slow client.
type mailbox struct {
	mu      sync.Mutex
	pending []update
	notify  chan struct{} // capacity 1
}

func newMailbox() *mailbox { return &mailbox{notify: make(chan struct{}, 1)} }

func (m *mailbox) put(u update) {
	m.mu.Lock()
	m.pending = append(m.pending, u)
	m.mu.Unlock()
	select {
	case m.notify <- struct{}{}:
	default:
	}
}

func (m *mailbox) take() []update {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := m.pending
	m.pending = nil
	return out
}
