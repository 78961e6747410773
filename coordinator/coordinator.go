package coordinator

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	mrand "math/rand/v2"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
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
// overlap. Info may be called concurrently with a Step. A StepResponse
// with a non-zero code was not applied (the coordinator sends the work
// again); an error from Step means the node itself failed: the
// coordinator moves its sequences to other nodes and treats it as down
// until Info answers again. Both calls carry the coordinator's epoch so a
// node drops what older coordinators left behind. The coordinator does
// not close nodes; their owner does, after RemoveNode or Close.
type AttentionNode interface {
	Step(ctx context.Context, req *meshpb.StepRequest) (*meshpb.StepResponse, error)
	Info(ctx context.Context, epoch uint64) (*meshpb.NodeInfo, error)
}

// Coordinator is a running coordinator: the OpenAI-compatible HTTP front
// door and one scheduling loop per attention node. Attention nodes join
// and leave while it runs (AddNode, RemoveNode), keyed by their ids.
type Coordinator struct {
	cfg  Config
	log  *slog.Logger
	name string
	mcfg *model.Config
	eos  []int
	gen  *model.GenerationConfig
	tok  *tokenizer.Tokenizer // nil: the model dir has no tokenizer

	ln      net.Listener
	srv     *http.Server
	metrics *metrics

	ready     chan struct{}
	readyOnce sync.Once
	errc      chan error
	serveDone chan struct{}
	lctx      context.Context // the loops' context; cancelled by Close
	cancel    context.CancelFunc
	loops     sync.WaitGroup
	nextID    atomic.Uint64
	closeOnce sync.Once
	closeErr  error

	mu struct {
		sync.Mutex
		sched *scheduler
		// published is what publishLocked last counted.
		published struct{ rebuilt, preempted, cacheQueries, cacheHits int }
		closing   bool
		draining  bool
		// noNodesSince is when the last usable attention node was lost
		// (or the coordinator started); zero while one is usable.
		noNodesSince time.Time
		// nodes[i] drives scheduler node i; indexes are never reused.
		nodes []*nodeHandle
		boxes map[uint64]*mailbox
		idle  chan struct{} // closed when boxes empties, while draining
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

// nodeHandle is one attention node's driver state.
type nodeHandle struct {
	id     string
	node   AttentionNode
	wake   chan struct{} // capacity 1
	cancel context.CancelFunc
	// err is why the node is down (nil while up); guarded by c.mu.
	err error
}

// Start loads the model's configs and tokenizer from cfg.ModelDir and
// serves HTTP on cfg.Addr. nodes (id → node) are added as by AddNode; more
// may join later. Ready() closes once an attention node has answered
// Info; until then requests fail with 503 and /readyz says why. A failed
// Start undoes what it began. The coordinator keeps ctx's values (trace
// context) but not its cancellation: it runs until Close.
func Start(ctx context.Context, cfg Config, nodes map[string]AttentionNode) (*Coordinator, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
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
		cfg: cfg, name: name, mcfg: mcfg, gen: gen, eos: gen.EOSTokenIDs, tok: tok,
		ln: ln, metrics: newMetrics(), ready: make(chan struct{}), errc: make(chan error, 1), serveDone: make(chan struct{}),
	}
	c.log = cfg.Logger
	if c.log == nil {
		c.log = slog.Default()
	}
	for _, col := range cfg.Collectors {
		if err := c.metrics.reg.Register(col); err != nil {
			ln.Close()
			return nil, fmt.Errorf("registering a metrics collector: %w", err)
		}
	}
	// Sequence ids carry the epoch in their high half, so they are unique
	// across coordinator lifetimes.
	c.nextID.Store(cfg.Epoch << 32)
	c.mu.sched = newScheduler(schedConfig{budget: cfg.StepTokenBudget, maxSeqs: cfg.MaxRunningPerNode})
	c.mu.boxes = map[uint64]*mailbox{}
	c.mu.noNodesSince = time.Now() // nodes join after the start
	c.armNodeWait()
	c.lctx, c.cancel = context.WithCancel(context.WithoutCancel(ctx))
	ids := make([]string, 0, len(nodes))
	for id := range nodes {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	for _, id := range ids {
		c.AddNode(id, nodes[id])
	}
	c.srv = &http.Server{Handler: c.Handler(), ReadHeaderTimeout: 30 * time.Second, IdleTimeout: 2 * time.Minute,
		BaseContext: func(net.Listener) context.Context { return c.lctx }, ConnState: c.trackConn}
	c.fresh = map[net.Conn]struct{}{}
	go func() {
		defer close(c.serveDone)
		if err := c.srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			c.errc <- err
		}
	}()
	return c, nil
}

// Ready is closed once an attention node has answered Info.
func (c *Coordinator) Ready() <-chan struct{} { return c.ready }

// Err delivers at most one fatal serving error (the listener failed) and
// is closed once the coordinator has stopped serving, after Close or such
// an error.
func (c *Coordinator) Err() <-chan error { return c.errc }

// Addr is the HTTP listen address, with the port ":0" picked.
func (c *Coordinator) Addr() string { return c.ln.Addr().String() }

// ModelName is the id requests name and /v1/models reports.
func (c *Coordinator) ModelName() string { return c.name }

// Epoch is the coordinator's epoch (0 without a control plane).
func (c *Coordinator) Epoch() uint64 { return c.cfg.Epoch }

// AddNode starts driving an attention node that joined under id. A node
// already known under id is replaced (it restarted, perhaps at another
// address): its sequences move as after a failure.
func (c *Coordinator) AddNode(id string, node AttentionNode) {
	c.mu.Lock()
	if c.mu.closing {
		c.mu.Unlock()
		return
	}
	var ups []update
	for i, h := range c.mu.nodes {
		if h.id == id && !c.mu.sched.nodes[i].gone {
			ups = append(ups, c.removeLocked(i, fmt.Errorf("%w: node %s was replaced", ErrNodeFailed, id))...)
		}
	}
	i := c.mu.sched.addNode(id)
	ctx, cancel := context.WithCancel(c.lctx)
	h := &nodeHandle{id: id, node: node, wake: make(chan struct{}, 1), cancel: cancel, err: errors.New("not contacted yet")}
	c.mu.nodes = append(c.mu.nodes, h)
	woken, failed := c.admitLocked()
	c.mu.Unlock()
	c.deliver(ups)
	c.deliver(failed)
	c.wakeNodes(woken)
	c.loops.Add(1)
	go c.nodeLoop(ctx, i, h)
}

// RemoveNode stops driving the node known as id (it left the cluster: its
// lease expired, or it drained). Its sequences are rebuilt on other nodes
// by re-prefilling what they had. It reports whether id was known.
func (c *Coordinator) RemoveNode(id string, why error) bool {
	c.mu.Lock()
	found := false
	var ups []update
	for i, h := range c.mu.nodes {
		if h.id == id && !c.mu.sched.nodes[i].gone {
			found = true
			ups = append(ups, c.removeLocked(i, fmt.Errorf("%w: node %s left: %v", ErrNodeFailed, id, why))...)
		}
	}
	woken, failed := c.admitLocked()
	c.mu.Unlock()
	c.deliver(ups)
	c.deliver(failed)
	c.wakeNodes(woken)
	return found
}

func (c *Coordinator) removeLocked(i int, err error) []update {
	h := c.mu.nodes[i]
	h.cancel()
	h.err = err
	onNode := len(c.mu.sched.nodes[i].running)
	ups := c.mu.sched.removeNode(i, err)
	if onNode > 0 {
		c.log.Warn("attention node left; moving its sequences to other nodes", "node", h.id,
			"sequences", onNode, "failed", len(ups), "err", err)
	}
	return ups
}

// SetNodeDraining marks the node known as id as taking no new sequences
// (it is shutting down) or as taking them again.
func (c *Coordinator) SetNodeDraining(id string, draining bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for i, h := range c.mu.nodes {
		if h.id == id {
			c.mu.sched.setDraining(i, draining)
		}
	}
}

// Drain stops admitting requests (new ones get 503 and /readyz turns not
// ready) and waits until every admitted request has finished, or ctx ends;
// then it closes the coordinator. It returns ctx's error if requests were
// still running when ctx ended (they fail with 503, as at Close).
func (c *Coordinator) Drain(ctx context.Context) error {
	c.mu.Lock()
	c.mu.draining = true
	if c.mu.idle == nil {
		c.mu.idle = make(chan struct{})
		if len(c.mu.boxes) == 0 {
			close(c.mu.idle)
		}
	}
	idle := c.mu.idle
	running := len(c.mu.boxes)
	c.mu.Unlock()
	c.log.Info("draining: no new requests", "running", running)
	var err error
	select {
	case <-idle:
	case <-ctx.Done():
		err = ctx.Err()
	}
	c.Close()
	return err
}

// Close shuts down in this order: refuse new requests; fail every waiting
// and running request with 503 so their handlers return; close connections
// that never sent a request; shut the HTTP server down (waiting up to 5s
// for handlers to write their answers); stop the node loops (cancelling
// any step in flight) and wait for them. The nodes themselves are left to
// their owner. Close is idempotent.
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
		<-c.serveDone
		close(c.errc)
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

// errAborted: the node answered the step without applying it.
var errAborted = errors.New("step not applied")

// nodeLoop drives node i: bring it up with Info, then plan a step, run it,
// apply the results, deliver them, repeat; sleep on the node's wake channel
// while there is nothing to do. It ends when ctx does (RemoveNode, Close).
func (c *Coordinator) nodeLoop(ctx context.Context, i int, h *nodeHandle) {
	defer c.loops.Done()
	backoff := 50 * time.Millisecond
	wait := func() bool {
		// Jitter keeps many coordinators' (or nodes') retries apart.
		d := backoff/2 + time.Duration(mrand.Int64N(int64(backoff)))
		backoff = min(2*backoff, 2*time.Second)
		select {
		case <-ctx.Done():
			return false
		case <-time.After(d):
			return true
		}
	}
	for ctx.Err() == nil {
		c.mu.Lock()
		up := c.mu.sched.nodes[i].up
		c.mu.Unlock()
		if !up {
			if err := c.bringUp(ctx, i, h); err != nil {
				c.mu.Lock()
				prev := h.err
				if ctx.Err() == nil {
					h.err = err
				}
				c.mu.Unlock()
				if ctx.Err() == nil && (prev == nil || prev.Error() != err.Error()) {
					c.log.Warn("attention node not answering", "node", h.id, "err", err)
				}
				if !wait() {
					return
				}
				continue
			}
		}
		c.mu.Lock()
		req := c.mu.sched.plan(i)
		c.publishLocked() // plan may have preempted
		var links []trace.Link
		if in := c.mu.sched.nodes[i].inflight; req != nil && in != nil {
			for _, w := range in.work {
				if a := w.seq.admission; a != nil {
					a.End() // placed and in a step: its wait is over
				}
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
			case <-h.wake:
			}
			continue
		}
		req.Epoch = c.cfg.Epoch
		if err := c.runStep(ctx, i, h, req, links); err != nil {
			// Down, or the step was not applied: wait before asking again
			// so a node (or an expert layer) that fails every step is not
			// hammered.
			if !wait() {
				return
			}
		} else {
			backoff = 50 * time.Millisecond
		}
	}
}

func (c *Coordinator) bringUp(ctx context.Context, i int, h *nodeHandle) error {
	ictx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	info, err := h.node.Info(ictx, c.cfg.Epoch)
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
	if ctx.Err() != nil { // removed meanwhile
		c.mu.Unlock()
		return ctx.Err()
	}
	c.mu.sched.nodeUp(i, info)
	h.err = nil
	c.log.Info("attention node up", "node", h.id, "blocks", info.TotalBlocks,
		"free", info.FreeBlocks, "block_size", info.BlockSize)
	woken, failed := c.admitLocked()
	c.mu.Unlock()
	c.deliver(failed)
	c.wakeNodes(woken)
	c.readyOnce.Do(func() { close(c.ready) })
	return nil
}

// runStep sends one step and applies its answer. The step's span links to
// the spans of the requests it serves: a step is shared by many requests,
// so it cannot be the child of one.
func (c *Coordinator) runStep(ctx context.Context, i int, h *nodeHandle, req *meshpb.StepRequest, links []trace.Link) error {
	rows := 0
	for _, w := range req.Work {
		rows += len(w.Tokens)
	}
	sctx, cancel := context.WithTimeout(ctx, c.cfg.StepTimeout)
	sctx, span := tracer.Start(sctx, "coordinator.step", trace.WithAttributes(
		attribute.String("node", h.id), attribute.Int64("step", int64(req.Step)),
		attribute.Int("sequences", len(req.Work)), attribute.Int("tokens", rows),
		attribute.Int("released", len(req.Release))), trace.WithLinks(links...))
	start := time.Now()
	resp, err := h.node.Step(sctx, req)
	el := time.Since(start)
	cancel()
	if err == nil && resp.GetCode() != 0 {
		span.AddEvent("step not applied", trace.WithAttributes(attribute.Int("code", int(resp.Code)), attribute.String("message", resp.Message)))
	}
	if err != nil {
		span.RecordError(err)
	}
	span.End()
	c.metrics.stepSeconds.Observe(el.Seconds())
	c.metrics.stepTokens.Observe(float64(rows))
	c.mu.Lock()
	var ups, failed []update
	var woken []int
	switch {
	case ctx.Err() != nil:
		// Removed or closing: whoever did it dealt with the sequences.
		c.mu.Unlock()
		return ctx.Err()
	case err != nil:
		err = fmt.Errorf("%w: %v", ErrNodeFailed, err)
		h.err = err
		onNode := len(c.mu.sched.nodes[i].running)
		ups = c.mu.sched.fail(i, err)
		c.log.Error("attention node step failed; its sequences wait for another node", "node", h.id, "step", req.Step,
			"sequences", onNode, "failed", len(ups), "err", err)
	case resp.GetCode() != 0:
		c.mu.sched.abort(i, resp)
		err = fmt.Errorf("%w: %v", errAborted, c.mu.sched.nodes[i].lastAbort)
		c.metrics.abortedSteps.Inc()
		c.log.Warn("step not applied; it will be sent again", "node", h.id, "step", req.Step, "code", resp.Code, "message", resp.Message)
	default:
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
	if len(nodes) == 0 {
		return
	}
	c.mu.Lock()
	hs := make([]*nodeHandle, len(nodes))
	for j, i := range nodes {
		hs[j] = c.mu.nodes[i]
	}
	c.mu.Unlock()
	for _, h := range hs {
		select {
		case h.wake <- struct{}{}:
		default:
		}
	}
}

// admitLocked places waiting sequences and publishes the scheduler's
// figures.
func (c *Coordinator) admitLocked() (woken []int, failed []update) {
	c.holdLocked()
	woken, failed = c.mu.sched.admit()
	c.publishLocked()
	return woken, failed
}

// holdLocked sets whether the scheduler holds requests for an attention
// node while none is usable: for NodeWait from when the last one was lost
// (or the coordinator started), so that a node whose lease lapsed and
// re-registers, or one that restarts, loses no request. A timer admits
// again at the end of the wait, when what still waits fails.
func (c *Coordinator) holdLocked() {
	s := c.mu.sched
	if s.anyUsable() {
		c.mu.noNodesSince = time.Time{}
		return
	}
	now := time.Now()
	if c.mu.noNodesSince.IsZero() {
		c.mu.noNodesSince = now
		c.armNodeWait()
	}
	s.hold = now.Sub(c.mu.noNodesSince) < c.cfg.NodeWait
}

// armNodeWait admits again once NodeWait has passed, so that what waits
// for a node that never came fails then. A timer of an earlier wait finds
// a node usable, or a later wait still running, and changes nothing.
func (c *Coordinator) armNodeWait() {
	if c.cfg.NodeWait <= 0 {
		return
	}
	time.AfterFunc(c.cfg.NodeWait, func() {
		c.mu.Lock()
		if c.mu.closing {
			c.mu.Unlock()
			return
		}
		woken, failed := c.admitLocked()
		c.mu.Unlock()
		c.deliver(failed)
		c.wakeNodes(woken)
	})
}

// publishLocked brings the metrics up to the scheduler's counters and
// state: rebuilds, preemptions and prefix cache use since the last call,
// the queue, the running batch and each live node's cache.
func (c *Coordinator) publishLocked() {
	s, p := c.mu.sched, &c.mu.published
	c.metrics.rebuilds.Add(float64(s.rebuilt - p.rebuilt))
	c.metrics.preemptions.Add(float64(s.preempted - p.preempted))
	c.metrics.cacheQueries.Add(float64(s.cacheQueries - p.cacheQueries))
	c.metrics.cacheHits.Add(float64(s.cacheHits - p.cacheHits))
	p.rebuilt, p.preempted, p.cacheQueries, p.cacheHits = s.rebuilt, s.preempted, s.cacheQueries, s.cacheHits
	c.metrics.queue.Set(float64(len(s.waiting)))
	running := 0
	for i, n := range s.nodes {
		running += len(n.running)
		id := c.mu.nodes[i].id
		if n.gone || !n.up {
			if n.gone {
				c.metrics.cacheBlocks.DeleteLabelValues(id, "used")
				c.metrics.cacheBlocks.DeleteLabelValues(id, "free")
				c.metrics.cacheBlocks.DeleteLabelValues(id, "cached")
			}
			continue
		}
		c.metrics.cacheBlocks.WithLabelValues(id, "used").Set(float64(n.totalBlocks - n.reportedFree))
		c.metrics.cacheBlocks.WithLabelValues(id, "free").Set(float64(n.reportedFree))
		c.metrics.cacheBlocks.WithLabelValues(id, "cached").Set(float64(n.cachedBlocks))
	}
	c.metrics.runningSeqs.Set(float64(running))
}

// submit admits the sequences of one request, all or none, or says why
// not. On success box receives their updates until each has had one
// carrying finish or err.
func (c *Coordinator) submit(qs []*sequence) (*mailbox, error) {
	box := newMailbox()
	c.mu.Lock()
	if c.mu.closing || c.mu.draining {
		c.mu.Unlock()
		return nil, ErrShuttingDown
	}
	s := c.mu.sched
	c.holdLocked()
	for _, q := range qs {
		if err := s.check(q); err != nil {
			c.mu.Unlock()
			return nil, err
		}
	}
	// The queue is full when it holds MaxWaiting, or this request's
	// choices would take it past (a request of more choices than that
	// finds room only in an empty queue). What would be placed at once
	// never waits, so it is never refused.
	full := len(s.waiting) >= c.cfg.MaxWaiting || len(s.waiting)+len(qs) > max(c.cfg.MaxWaiting, len(qs))
	if full && !s.fitsNow(qs[0]) {
		c.mu.Unlock()
		return nil, ErrOverloaded
	}
	for _, q := range qs {
		c.mu.boxes[q.id] = box
		s.enqueue(q)
	}
	woken, failed := c.admitLocked()
	c.mu.Unlock()
	if f := c.hooks.enqueued.Load(); f != nil {
		for _, q := range qs {
			(*f)(q.id)
		}
	}
	c.deliver(failed)
	c.wakeNodes(woken)
	return box, nil
}

// withdraw cancels q if it is still running and forgets its mailbox.
func (c *Coordinator) withdraw(q *sequence) {
	c.mu.Lock()
	node := c.mu.sched.cancel(q)
	delete(c.mu.boxes, q.id)
	c.checkIdleLocked()
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
	c.checkIdleLocked()
	c.mu.Unlock()
	for j, u := range ups {
		if boxes[j] != nil {
			boxes[j].put(u)
		}
	}
}

// checkIdleLocked closes the drain's idle channel once no request is left.
func (c *Coordinator) checkIdleLocked() {
	if c.mu.idle != nil && len(c.mu.boxes) == 0 {
		select {
		case <-c.mu.idle:
		default:
			close(c.mu.idle)
		}
	}
}

// troubleFor says why q's node is not making progress (its last step was
// not applied), or nil: a request that times out says so rather than
// just "timed out".
func (c *Coordinator) troubleFor(q *sequence) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if q.node < 0 || q.node >= len(c.mu.sched.nodes) {
		return nil
	}
	return c.mu.sched.nodes[q.node].lastAbort
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
