package expertnode

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/grpc"

	"github.com/expertmesh/expertmesh/internal/rpc"
	"github.com/expertmesh/expertmesh/kernels"
	"github.com/expertmesh/expertmesh/model"
	"github.com/expertmesh/expertmesh/model/safetensors"
	meshpb "github.com/expertmesh/expertmesh/proto"
)

// Node is a running expert node. Its methods are safe for concurrent use.
type Node struct {
	cfg  Config
	id   string
	log  *slog.Logger
	mc   *model.Config
	w    *model.Weights
	ck   *safetensors.Checkpoint // owned by w; kept for Prefetch
	pool *kernels.Pool
	srv  *rpc.Server
	lis  net.Listener
	// tracer makes the per-dispatch spans; with no provider installed it is
	// the global no-op tracer and a span costs a few allocations.
	tracer trace.Tracer

	// compute serialises ExpertRunner.Run: the runner's scratch buffers and
	// the kernel pool serve one caller at a time, and one pool already uses
	// every core, so running two batches at once would only make both slower.
	compute struct {
		sync.Mutex
		runner *model.ExpertRunner
	}

	// mu guards held. Dispatch takes the read lock once per request to check
	// all its ids; Load and Drop take the write lock.
	mu struct {
		sync.RWMutex
		held [][]bool // [layer][expert]; nil rows for dense layers
	}

	// residentMu serialises changes to resident, the held experts copied
	// into huge-page memory; the copies are swapped in and out under the
	// compute lock.
	residentMu sync.Mutex
	resident   map[[2]int]*model.ResidentExpert

	requests   atomic.Uint64
	rowsServed []atomic.Uint64 // per layer

	ready     chan struct{}
	errc      chan error
	serveDone chan struct{}
	closeOnce sync.Once
	closeErr  error
}

// Start loads the checkpoint's expert tensors (binding is mmap views, so
// only the held experts' bytes are ever read, and those are prefetched),
// starts the gRPC server and returns once it is serving. ctx bounds the
// start only; the node runs until Close. A failed start releases
// everything it had acquired.
func Start(ctx context.Context, cfg Config) (_ *Node, err error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}
	n := &Node{cfg: cfg, log: log, ready: make(chan struct{}), errc: make(chan error, 1), serveDone: make(chan struct{})}
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
	held, err := resolveSpec(cfg.Experts, n.mc)
	if err != nil {
		return nil, fmt.Errorf("--experts: %w", err)
	}
	if n.ck, err = safetensors.OpenCheckpoint(cfg.ModelDir); err != nil {
		return nil, fmt.Errorf("--model %s: %w", cfg.ModelDir, err)
	}
	undo = append(undo, func() { n.ck.Close() })
	// Bind every routed expert, not just the held ones: binding is only
	// mmap views, so it reads nothing, and a later Load needs no re-bind.
	if n.w, err = model.Bind(n.mc, n.ck, model.LoadOptions{ExpertsOnly: true}); err != nil {
		return nil, fmt.Errorf("--model %s: %w", cfg.ModelDir, err)
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	n.mu.held = held
	n.rowsServed = make([]atomic.Uint64, n.mc.NumHiddenLayers)
	n.resident = map[[2]int]*model.ResidentExpert{}
	n.place(heldPairs(held))

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
	n.id = cfg.NodeID
	if n.id == "" {
		n.id = "expert@" + n.lis.Addr().String()
	}

	// WaitForHandlers makes Stop wait for every handler to return, which is
	// what lets Close unmap the weights afterwards without a handler still
	// reading them.
	n.srv = rpc.NewServer(rpc.ServerOptions{Logger: log, TracerProvider: cfg.TracerProvider, Extra: []grpc.ServerOption{grpc.WaitForHandlers(true)}})
	meshpb.RegisterExpertServiceServer(n.srv, &service{n: n})
	n.srv.SetServing(true, meshpb.ExpertService_ServiceDesc.ServiceName)
	go func() {
		defer close(n.serveDone)
		if err := n.srv.Serve(n.lis); err != nil && !errors.Is(err, grpc.ErrServerStopped) {
			n.errc <- fmt.Errorf("expert node %s: serve: %w", n.id, err)
		}
	}()
	close(n.ready)
	log.Info("expert node serving", "node", n.id, "addr", n.Addr(), "experts", cfg.Experts)
	return n, nil
}

// Ready is closed once the node serves requests.
func (n *Node) Ready() <-chan struct{} { return n.ready }

// Err delivers at most one error if the server stops on its own (the
// listener failed); it is not closed by Close.
func (n *Node) Err() <-chan error { return n.errc }

// Addr is the actual listen address (the chosen port when ListenAddr had
// port 0).
func (n *Node) Addr() string { return n.lis.Addr().String() }

// ID is the node id reported by Status.
func (n *Node) ID() string { return n.id }

// Close stops the node and releases everything, in this order:
//  1. health turns NOT_SERVING, so health watchers stop routing here;
//  2. the gRPC server stops: the listener and every connection close and
//     open Dispatch streams are cancelled (expert calls are idempotent, so
//     callers retry elsewhere rather than wait for a graceful drain);
//  3. it waits for every handler and its per-stream goroutines to return;
//  4. the kernel pool stops;
//  5. the checkpoint is unmapped (nothing can read the weights any more).
//
// Close is idempotent and returns the unmap error, if any.
func (n *Node) Close() error {
	n.closeOnce.Do(func() {
		n.srv.Stop()
		<-n.serveDone
		n.pool.Close()
		n.closeErr = errors.Join(n.freeResident(), n.w.Close())
		n.log.Info("expert node stopped", "node", n.id)
	})
	return n.closeErr
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

func heldPairs(held [][]bool) [][2]int {
	var pairs [][2]int
	for l, row := range held {
		for x, h := range row {
			if h {
				pairs = append(pairs, [2]int{l, x})
			}
		}
	}
	return pairs
}

// place readies newly held experts for compute: copied into huge-page
// memory (resident, or auto when they fit in half of the available
// memory) or prefetched through the page cache. An expert dropped again
// meanwhile is skipped. A failed copy falls back to the mapping: it costs
// speed, not correctness, so it is logged.
func (n *Node) place(pairs [][2]int) {
	if len(pairs) == 0 {
		return
	}
	var bytes int64
	for _, p := range pairs {
		bytes += n.w.ExpertBytes(p[0], p[1])
	}
	if n.cfg.Weights.Resolve(bytes, model.MemAvailable()) == model.ResidencyMapped {
		n.prefetch(pairs)
		return
	}
	n.residentMu.Lock()
	defer n.residentMu.Unlock()
	var copies []*model.ResidentExpert
	var keys [][2]int
	for _, p := range pairs {
		if _, ok := n.resident[p]; ok || !n.holds(p) {
			continue
		}
		r, err := n.w.CopyExpert(p[0], p[1])
		if err != nil {
			n.log.Warn("resident copy of expert failed; it stays mapped", "node", n.id, "layer", p[0], "expert", p[1], "err", err)
			n.prefetch([][2]int{p})
			continue
		}
		copies, keys = append(copies, r), append(keys, p)
	}
	n.compute.Lock()
	for i, r := range copies {
		r.Swap()
		n.resident[keys[i]] = r
	}
	n.compute.Unlock()
}

// unplace frees the resident copies of experts no longer held.
func (n *Node) unplace(pairs [][2]int) {
	n.residentMu.Lock()
	defer n.residentMu.Unlock()
	var freed []*model.ResidentExpert
	n.compute.Lock()
	for _, p := range pairs {
		if r, ok := n.resident[p]; ok && !n.holds(p) {
			r.Swap()
			delete(n.resident, p)
			freed = append(freed, r)
		}
	}
	n.compute.Unlock()
	for _, r := range freed {
		if err := r.Free(); err != nil {
			n.log.Warn("freeing a resident expert failed", "node", n.id, "err", err)
		}
	}
}

// freeResident releases every resident copy at Close, after the pool
// stopped (nothing computes any more).
func (n *Node) freeResident() error {
	n.residentMu.Lock()
	defer n.residentMu.Unlock()
	var errs []error
	for p, r := range n.resident {
		r.Swap()
		errs = append(errs, r.Free())
		delete(n.resident, p)
	}
	return errors.Join(errs...)
}

func (n *Node) holds(p [2]int) bool {
	n.mu.RLock()
	defer n.mu.RUnlock()
	return n.mu.held[p[0]][p[1]]
}

// ResidentExperts is the number of held experts computing from huge-page
// copies rather than the mapped checkpoint.
func (n *Node) ResidentExperts() int {
	n.residentMu.Lock()
	defer n.residentMu.Unlock()
	return len(n.resident)
}

// prefetch asks the kernel to read the held experts' pages in the
// background, so the first dispatch does not pay page faults. Failures only
// cost latency later, so they are logged, not returned.
func (n *Node) prefetch(pairs [][2]int) {
	var names []string
	for _, p := range pairs {
		names = append(names, n.expertTensorNames(p[0], p[1])...)
	}
	if len(names) == 0 {
		return
	}
	if err := n.ck.Prefetch(names...); err != nil {
		n.log.Warn("prefetch of expert weights failed", "node", n.id, "err", err)
	}
}
