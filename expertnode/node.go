package expertnode

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/soheilhy/cmux"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/grpc"

	"github.com/expertmesh/expertmesh/internal/dataplane"
	"github.com/expertmesh/expertmesh/internal/rpc"
	"github.com/expertmesh/expertmesh/kernels"
	"github.com/expertmesh/expertmesh/model"
	"github.com/expertmesh/expertmesh/model/safetensors"
	"github.com/expertmesh/expertmesh/placement"
	meshpb "github.com/expertmesh/expertmesh/proto"
)

var (
	// ErrClosed is returned by Hold and Release once Close has begun.
	ErrClosed = errors.New("expert node closed")
	// ErrManaged is why a managed node refuses the Load and Drop RPCs
	// (FAILED_PRECONDITION on the wire): its placement comes from the
	// control plane.
	ErrManaged = errors.New("placement is managed by the control plane")
)

// Node is a running expert node. Its methods are safe for concurrent use.
type Node struct {
	cfg   Config
	id    string
	log   *slog.Logger
	mc    *model.Config
	shape placement.Shape
	w     *model.Weights
	ck    *safetensors.Checkpoint // owned by w; kept for Prefetch
	pool  *kernels.Pool
	srv   *rpc.Server
	// dp serves Dispatch streams over the data plane; one listening
	// address for both: mux hands connections that open with the data
	// plane's magic to dp and the rest to srv.
	dp  *dataplane.Server
	mux cmux.CMux
	lis net.Listener
	// tracer makes the per-dispatch spans; with no provider installed it is
	// the global no-op tracer and a span costs a few allocations.
	tracer  trace.Tracer
	metrics *metrics
	stats   *expertStats
	version atomic.Uint64 // SetPlacementVersion

	// compute serialises ExpertRunner.Run: the runner's scratch buffers and
	// the kernel pool serve one caller at a time, and one pool already uses
	// every core, so running two batches at once would only make both slower.
	compute struct {
		sync.Mutex
		runner *model.ExpertRunner
	}

	// mu guards held. Dispatch takes the read lock once per request to check
	// all its ids; placement changes take the write lock briefly.
	mu struct {
		sync.RWMutex
		held  placement.Set
		count int // held.Len()
	}

	// placing serialises placement changes (Hold, Release, Load, Drop) one
	// expert at a time, so a Release can free memory between the experts
	// of a long Hold. It guards the resident copies (the held experts
	// copied into huge-page memory, swapped in and out under the compute
	// lock; always a subset of held) and closed, set by Close before it
	// unmaps the weights.
	placing struct {
		sync.Mutex
		closed   bool
		resident map[[2]int]*model.ResidentExpert
	}

	// streams counts open Dispatch handlers, for Shutdown.
	streams struct {
		sync.Mutex
		open     int
		draining bool
		idle     chan struct{} // closed once draining and open == 0
	}
	// drain is closed when Shutdown begins: open streams answer what they
	// received and end.
	drain chan struct{}
	// pipes counts the per-stream goroutines; a drained stream's reader
	// outlives its handler until the stream's context ends.
	pipes sync.WaitGroup

	requests   atomic.Uint64
	rowsServed []atomic.Uint64 // per layer

	ready     chan struct{}
	errc      chan error
	runDone   chan struct{} // the goroutines serving the listener returned
	stopping  atomic.Bool   // stop has begun
	closeOnce sync.Once
	closeErr  error
}

// Start loads the checkpoint's expert tensors (binding is mmap views, so
// only the held experts' bytes are ever read, and those are readied as
// Hold does), starts the gRPC server and returns once it is serving. ctx
// bounds the start only (it cancels readying the initial experts between
// experts); the node runs until Close or Shutdown. A failed start
// releases everything it had acquired.
func Start(ctx context.Context, cfg Config) (_ *Node, err error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}
	n := &Node{cfg: cfg, id: cfg.NodeID, log: log, ready: make(chan struct{}), errc: make(chan error, 1),
		runDone: make(chan struct{}), drain: make(chan struct{})}
	n.streams.idle = make(chan struct{})
	// Undo in reverse on failure; each step below appends its release.
	var undo []func()
	defer func() {
		if err != nil {
			for i := len(undo) - 1; i >= 0; i-- {
				undo[i]()
			}
		}
	}()

	if n.mc, err = model.LoadConfig(cfg.ModelDir); err != nil {
		return nil, fmt.Errorf("--model %s: %w", cfg.ModelDir, err)
	}
	if !n.mc.HasMoE() {
		return nil, fmt.Errorf("--model %s: model has no routed experts", cfg.ModelDir)
	}
	n.shape = placement.ShapeOf(n.mc)
	initial, err := placement.ParseSet(n.shape, cfg.Experts)
	if err != nil {
		return nil, fmt.Errorf("--experts: %w", err)
	}
	if n.ck, err = safetensors.OpenCheckpoint(cfg.ModelDir); err != nil {
		return nil, fmt.Errorf("--model %s: %w", cfg.ModelDir, err)
	}
	undo = append(undo, func() { n.ck.Close() })
	// Bind every routed expert, not just the held ones: binding is only
	// mmap views, so it reads nothing, and a later Hold needs no re-bind.
	if n.w, err = model.Bind(n.mc, n.ck, model.LoadOptions{ExpertsOnly: true}); err != nil {
		return nil, fmt.Errorf("--model %s: %w", cfg.ModelDir, err)
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	n.metrics = newMetrics(n.mc)
	n.stats = newExpertStats(n.mc)
	n.mu.held = placement.NewSet(n.shape)
	n.rowsServed = make([]atomic.Uint64, n.mc.NumHiddenLayers)
	n.placing.resident = map[[2]int]*model.ResidentExpert{}
	undo = append(undo, func() { n.freeResident() })
	if _, err := n.hold(ctx, initial); err != nil {
		return nil, err // ctx ended the start
	}

	n.pool = kernels.NewPool(cfg.Threads)
	undo = append(undo, n.pool.Close)
	n.compute.runner = model.NewLocalExperts(n.w, n.pool)

	var lc net.ListenConfig
	if n.lis, err = lc.Listen(ctx, "tcp", cfg.ListenAddr); err != nil {
		return nil, fmt.Errorf("--listen %s: %w", cfg.ListenAddr, err)
	}
	undo = append(undo, func() { n.lis.Close() })
	tp := cfg.TracerProvider
	if tp == nil {
		tp = otel.GetTracerProvider()
	}
	n.tracer = tp.Tracer("github.com/expertmesh/expertmesh/expertnode")
	if n.id == "" {
		n.id = "expert@" + n.lis.Addr().String()
	}

	// WaitForHandlers makes Stop wait for every handler to return, which is
	// what lets Close unmap the weights afterwards without a handler still
	// reading them.
	n.srv = rpc.NewServer(rpc.ServerOptions{Logger: log, TracerProvider: cfg.TracerProvider, Extra: []grpc.ServerOption{grpc.WaitForHandlers(true)}})
	meshpb.RegisterExpertServiceServer(n.srv, &service{n: n})
	n.srv.SetServing(true, meshpb.ExpertService_ServiceDesc.ServiceName)
	n.dp = dataplane.NewServer(n.serveDataPlane)
	n.mux = cmux.New(n.lis)
	// A client that connects and sends nothing is dropped after this
	// (both transports' clients speak first).
	n.mux.SetReadTimeout(sniffTimeout)
	dpLis := n.mux.Match(dataplane.Matcher)
	grpcLis := n.mux.Match(cmux.HTTP2())
	n.serve(dpLis, grpcLis)
	close(n.ready)
	log.Info("expert node serving", "node", n.id, "addr", n.Addr(), "experts", cfg.Experts, "managed", cfg.Managed)
	return n, nil
}

// sniffTimeout bounds how long the listener waits for a new
// connection's first bytes to tell the data plane from gRPC.
const sniffTimeout = 5 * time.Second

// serve runs the multiplexer, the data plane and the gRPC server until
// they stop; runDone closes once all three returned. A return before
// stop or a drain began is fatal: the node stops itself and Err delivers
// the error. (A drain's graceful stop of the gRPC server closes the
// listener they share.)
func (n *Node) serve(dpLis, grpcLis net.Listener) {
	var wg sync.WaitGroup
	run := func(what string, f func() error) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := f(); err != nil && !errors.Is(err, grpc.ErrServerStopped) && !n.stopping.Load() && !n.isDraining() {
				n.stop(fmt.Errorf("expert node %s: serve %s: %w", n.id, what, err))
			}
		}()
	}
	run("gRPC", func() error { return n.srv.Serve(grpcLis) })
	run("data plane", func() error { return n.dp.Serve(dpLis) })
	run("listener", n.mux.Serve)
	go func() {
		wg.Wait()
		close(n.runDone)
	}()
}

// Ready is closed once the node serves requests (Start returns only then).
func (n *Node) Ready() <-chan struct{} { return n.ready }

// Err delivers at most one fatal serving error (the listener failed; the
// node then stops itself) and is closed once the node has stopped, after
// Close, Shutdown or a fatal error. A receive that yields no error (the
// channel closed) means the node stopped because it was asked to.
func (n *Node) Err() <-chan error { return n.errc }

// Addr is the actual listen address (the chosen port when ListenAddr had
// port 0).
func (n *Node) Addr() string { return n.lis.Addr().String() }

// ID is the node id reported by Status.
func (n *Node) ID() string { return n.id }

// Serving reports nil while the node serves dispatches, and why not once
// Shutdown or Close has begun: a readiness probe (/readyz).
func (n *Node) Serving() error {
	n.streams.Lock()
	draining := n.streams.draining
	n.streams.Unlock()
	switch {
	case n.stopping.Load():
		return ErrClosed
	case draining:
		return fmt.Errorf("expert node %s is draining", n.id)
	}
	return nil
}

// Close stops the node at once and releases everything, in this order:
//  1. health turns NOT_SERVING, so health watchers stop routing here;
//  2. the gRPC server stops: the listener and every connection close and
//     open Dispatch streams are cancelled (expert calls are idempotent, so
//     callers retry elsewhere; Shutdown is the graceful way);
//  3. it waits for every handler and its per-stream goroutines to return;
//  4. Hold and Release fail with ErrClosed from now on; an expert being
//     readied finishes first;
//  5. the kernel pool stops;
//  6. resident copies are freed and the checkpoint is unmapped (nothing
//     can read the weights any more);
//  7. Err is closed, and Close waits for the goroutine that ran the
//     server.
//
// Close is idempotent and safe to call concurrently with Shutdown and
// with itself; every call returns the unmap error, if any.
func (n *Node) Close() error {
	n.stop(nil)
	<-n.runDone
	return n.closeErr
}

// Shutdown stops the node gracefully: health turns NOT_SERVING and new
// Dispatch streams are refused (UNAVAILABLE); every open stream answers
// the requests it had received when Shutdown began and then ends with
// UNAVAILABLE (a request the client sent later is not answered: the
// client retries it elsewhere, as after any failure). Once every stream
// has ended the server stops gracefully, so those last replies reach the
// clients (for at most lingerTimeout). When ctx ends first, the wait
// ends there. Shutdown then runs Close (hard: streams still open are
// cancelled) and returns ctx's error if ctx cut the drain short, joined
// with Close's.
//
// Callers make sure no attention node routes here any more first (the
// control plane takes the node out of the placement), so that open
// streams are idle and Shutdown returns at once.
func (n *Node) Shutdown(ctx context.Context) error {
	var err error
	idle := n.beginDrain()
	select {
	case <-idle:
	case <-ctx.Done():
		select {
		case <-idle:
		default:
			err = ctx.Err()
		}
	}
	if err == nil {
		n.linger(ctx)
	}
	return errors.Join(err, n.Close())
}

// lingerTimeout bounds how long a drained node waits for its connections
// to close gracefully. Flushing the last replies takes microseconds; the
// bound is for connections that never close by themselves (a health
// Watch stream lives as long as its client).
const lingerTimeout = time.Second

// linger stops the server gracefully once every Dispatch stream has ended,
// so that their last replies and statuses, already queued, reach the
// clients: Stop would discard what the transports have not yet written.
func (n *Node) linger(ctx context.Context) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		n.srv.GracefulStop()
	}()
	t := time.NewTimer(lingerTimeout)
	defer t.Stop()
	select {
	case <-done:
	case <-ctx.Done():
	case <-t.C:
	}
	n.srv.Stop() // ends a graceful stop still waiting
	<-done
}

// beginDrain marks the node draining and returns a channel closed once no
// Dispatch handler runs any more.
func (n *Node) beginDrain() <-chan struct{} {
	n.streams.Lock()
	defer n.streams.Unlock()
	if !n.streams.draining {
		n.streams.draining = true
		n.srv.Health.Shutdown()
		close(n.drain)
		if n.streams.open == 0 {
			close(n.streams.idle)
		}
		n.log.Info("expert node draining", "node", n.id, "streams", n.streams.open)
	}
	return n.streams.idle
}

func (n *Node) isDraining() bool {
	n.streams.Lock()
	defer n.streams.Unlock()
	return n.streams.draining
}

// streamOpened registers a new Dispatch handler; false while draining.
func (n *Node) streamOpened() bool {
	n.streams.Lock()
	defer n.streams.Unlock()
	if n.streams.draining {
		return false
	}
	n.streams.open++
	return true
}

func (n *Node) streamClosed() {
	n.streams.Lock()
	defer n.streams.Unlock()
	n.streams.open--
	if n.streams.draining && n.streams.open == 0 {
		close(n.streams.idle)
	}
}

// stop is Close's work, done once; fatal (non-nil when the server failed
// on its own) is delivered on Err first.
func (n *Node) stop(fatal error) {
	n.closeOnce.Do(func() {
		n.stopping.Store(true)
		if fatal != nil {
			n.log.Error("expert node failed; stopping", "node", n.id, "err", fatal)
			n.errc <- fatal
		}
		n.srv.Stop()
		n.lis.Close()
		n.mux.Close()
		n.dp.Close()
		n.pipes.Wait()
		n.placing.Lock()
		n.placing.closed = true
		n.placing.Unlock()
		n.pool.Close()
		n.closeErr = errors.Join(n.freeResident(), n.w.Close())
		n.log.Info("expert node stopped", "node", n.id)
		close(n.errc)
	})
}

// Held returns a copy of the set of experts the node holds.
func (n *Node) Held() placement.Set {
	n.mu.RLock()
	defer n.mu.RUnlock()
	return n.mu.held.Clone()
}

// Hold makes the node hold every expert of s in addition to what it holds
// (it never drops any) and returns once they can be computed: each gained
// expert is copied into resident memory or prefetched (Config.Weights),
// then marked held, one at a time, so dispatches may name it as soon as
// Held shows it. ctx is checked between experts: a cancelled Hold returns
// ctx's error and keeps the experts it had readied. Idempotent; the
// control plane's ExpertHolder.
func (n *Node) Hold(ctx context.Context, s placement.Set) error {
	_, err := n.hold(ctx, s)
	return err
}

// Release drops the experts of s the node holds: dispatches validated
// afterwards that name them get FAILED_PRECONDITION. Their resident copies
// are freed; mapped pages stay mapped (the OS reclaims them under
// pressure). Idempotent.
func (n *Node) Release(s placement.Set) error {
	_, err := n.release(s)
	return err
}

// checkSet refuses a set naming experts the model does not have (another
// model's placement); rows may be short or missing (nothing held there).
func (n *Node) checkSet(s placement.Set) error {
	for l, row := range s {
		for e, in := range row {
			if in && (l >= n.mc.NumHiddenLayers || !n.mc.IsMoELayer(l) || e >= n.shape.Experts) {
				return fmt.Errorf("%w: layer %d expert %d is not a routed expert of the model (%d layers, %d routed experts)",
					placement.ErrPlacement, l, e, n.shape.Layers, n.shape.Experts)
			}
		}
	}
	return nil
}

// hold is Hold, reporting how many experts it gained.
func (n *Node) hold(ctx context.Context, s placement.Set) (int, error) {
	if err := n.checkSet(s); err != nil {
		return 0, err
	}
	gains := s.Minus(n.Held()).Pairs()
	if len(gains) == 0 {
		return 0, nil
	}
	start := time.Now()
	var want int64
	for _, p := range gains {
		want += n.w.ExpertBytes(p[0], p[1])
	}
	mode := n.cfg.Weights.Resolve(want, model.MemAvailable())
	gained, bytes := 0, int64(0)
	defer func() {
		n.metrics.load.Observe(time.Since(start).Seconds())
		n.metrics.loadedBytes.Add(float64(bytes))
		if gained > 0 {
			n.log.Info("experts held", "node", n.id, "gained", gained, "bytes", bytes, "weights", string(mode), "took", time.Since(start))
		}
	}()
	for _, p := range gains {
		if err := ctx.Err(); err != nil {
			return gained, err
		}
		ok, err := n.holdOne(p, mode)
		if err != nil {
			return gained, err
		}
		if ok {
			gained++
			bytes += n.w.ExpertBytes(p[0], p[1])
		}
	}
	return gained, nil
}

// holdOne readies one expert and marks it held; false if it already was.
func (n *Node) holdOne(p [2]int, mode model.Residency) (bool, error) {
	n.placing.Lock()
	defer n.placing.Unlock()
	if n.placing.closed {
		return false, ErrClosed
	}
	if n.holds(p) {
		return false, nil
	}
	if mode == model.ResidencyMapped {
		n.prefetch(p)
	} else {
		n.makeResidentLocked(p)
	}
	n.mu.Lock()
	n.mu.held[p[0]][p[1]] = true
	n.mu.count++
	n.metrics.held.Set(float64(n.mu.count))
	n.mu.Unlock()
	return true, nil
}

// makeResidentLocked copies one expert into huge-page memory and swaps the
// copy in under the compute lock. A failed copy falls back to the mapping:
// it costs speed, not correctness, so it is logged.
func (n *Node) makeResidentLocked(p [2]int) {
	r, err := n.w.CopyExpert(p[0], p[1])
	if err != nil {
		n.log.Warn("resident copy of expert failed; it stays mapped", "node", n.id, "layer", p[0], "expert", p[1], "err", err)
		n.prefetch(p)
		return
	}
	n.compute.Lock()
	r.Swap()
	n.compute.Unlock()
	n.placing.resident[p] = r
	n.metrics.resident.Set(float64(len(n.placing.resident)))
}

// release is Release, reporting how many experts it dropped.
func (n *Node) release(s placement.Set) (int, error) {
	if err := n.checkSet(s); err != nil {
		return 0, err
	}
	n.placing.Lock()
	defer n.placing.Unlock()
	if n.placing.closed {
		return 0, ErrClosed
	}
	var dropped [][2]int
	n.mu.Lock()
	for _, p := range s.Pairs() {
		if n.mu.held.Has(p[0], p[1]) {
			n.mu.held[p[0]][p[1]] = false
			dropped = append(dropped, p)
		}
	}
	n.mu.count -= len(dropped)
	n.metrics.held.Set(float64(n.mu.count))
	n.mu.Unlock()

	var freed []*model.ResidentExpert
	n.compute.Lock()
	for _, p := range dropped {
		if r, ok := n.placing.resident[p]; ok {
			r.Swap()
			delete(n.placing.resident, p)
			freed = append(freed, r)
		}
	}
	n.compute.Unlock()
	n.metrics.resident.Set(float64(len(n.placing.resident)))
	for _, r := range freed {
		if err := r.Free(); err != nil {
			n.log.Warn("freeing a resident expert failed", "node", n.id, "err", err)
		}
	}
	if len(dropped) > 0 {
		n.log.Info("experts released", "node", n.id, "dropped", len(dropped), "resident_freed", len(freed))
	}
	return len(dropped), nil
}

// freeResident releases every resident copy at Close, after the pool
// stopped (nothing computes any more), or when a start fails.
func (n *Node) freeResident() error {
	n.placing.Lock()
	defer n.placing.Unlock()
	var errs []error
	for p, r := range n.placing.resident {
		r.Swap()
		errs = append(errs, r.Free())
		delete(n.placing.resident, p)
	}
	n.metrics.resident.Set(0)
	return errors.Join(errs...)
}

func (n *Node) holds(p [2]int) bool {
	n.mu.RLock()
	defer n.mu.RUnlock()
	return n.mu.held.Has(p[0], p[1])
}

// ResidentExperts is the number of held experts computing from huge-page
// copies rather than the mapped checkpoint.
func (n *Node) ResidentExperts() int {
	n.placing.Lock()
	defer n.placing.Unlock()
	return len(n.placing.resident)
}

// expertTensorNames lists one routed expert's tensors in the checkpoint,
// including FP8 block scales where the checkpoint has them.
func (n *Node) expertTensorNames(layer, expert int) []string {
	var names []string
	for _, p := range []string{"gate_proj", "up_proj", "down_proj"} {
		name := fmt.Sprintf("model.layers.%d.mlp.experts.%d.%s.weight", layer, expert, p)
		names = append(names, name)
		if n.ck.Has(name + "_scale_inv") {
			names = append(names, name+"_scale_inv")
		}
	}
	return names
}

// prefetch asks the kernel to read an expert's pages in the background, so
// the first dispatch does not pay page faults. Failures only cost latency
// later, so they are logged, not returned.
func (n *Node) prefetch(p [2]int) {
	if err := n.ck.Prefetch(n.expertTensorNames(p[0], p[1])...); err != nil {
		n.log.Warn("prefetch of expert weights failed", "node", n.id, "layer", p[0], "expert", p[1], "err", err)
	}
}
