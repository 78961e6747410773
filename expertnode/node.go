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
	n.prefetch(held)

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
		n.closeErr = n.w.Close()
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

// prefetch asks the kernel to read the held experts' pages in the
// background, so the first dispatch does not pay page faults. Failures only
// cost latency later, so they are logged, not returned.
func (n *Node) prefetch(held [][]bool) {
	var names []string
	for l, row := range held {
		for x, h := range row {
			if h {
				names = append(names, n.expertTensorNames(l, x)...)
			}
		}
	}
	if len(names) == 0 {
		return
	}
	if err := n.ck.Prefetch(names...); err != nil {
		n.log.Warn("prefetch of expert weights failed", "node", n.id, "err", err)
	}
}
