package attnnode

import (
	"context"
	"errors"
	"fmt"
	"math"
	"net"
	"runtime/debug"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/expertmesh/expertmesh/internal/rpc"
	"github.com/expertmesh/expertmesh/kernels"
	"github.com/expertmesh/expertmesh/model"
	"github.com/expertmesh/expertmesh/placement"
	meshpb "github.com/expertmesh/expertmesh/proto"
)

// tracerName names the node's spans (attn.step, attn.microbatch,
// attn.dispatch).
const tracerName = "github.com/expertmesh/expertmesh/attnnode"

// Config configures an attention node.
type Config struct {
	// ModelDir is the checkpoint in HF layout (--model).
	ModelDir string
	// NodeID names the node in logs, traces and Info (--node-id).
	NodeID string
	// ListenAddr is the gRPC address (--listen); ":0" picks a port. Empty
	// runs the node in-process only, without gRPC (serve).
	ListenAddr string
	// Threads sizes the kernel pool (--threads); 0 means all cores.
	Threads int
	// CacheBytes bounds the latent cache (--cache-mb).
	CacheBytes int64
	// BlockSize is tokens per cache block (--block-size).
	BlockSize int
	// PrefixCaching shares full cache blocks between sequences with the
	// same token prefix (--prefix-caching, on by default; see
	// model.LatentCache).
	PrefixCaching bool
	// Placement says which expert node holds which routed expert. Nil
	// means every routed expert is loaded in-process (serve, generate).
	Placement placement.View
	// MicroBatches splits each step's batch so one micro-batch computes
	// attention while another's experts are in flight (--micro-batches).
	// 0 means 2 with remote experts and 1 with local ones.
	MicroBatches int
	// Quantize converts weights at load ("q8" or "").
	Quantize string
	// MaxStepTokens bounds the rows of one step (--max-step-tokens).
	MaxStepTokens int
	// Weights says where compute reads the weights from (--weights):
	// resident, mmap, or auto (the zero value: resident when they fit in
	// half of the available memory).
	Weights model.Residency
	// DispatchTimeout is the deadline of one dispatch of up to 256 rows
	// to an expert node; larger dispatches get proportionally more
	// (--dispatch-timeout). A node that misses it is skipped for other
	// replicas. See DefaultDispatchTimeout.
	DispatchTimeout time.Duration
	// ExpertWait bounds how long a step waits for some replica of a
	// routed expert before it fails with UNAVAILABLE (--expert-wait). It
	// must stay below the coordinator's step timeout (2 min by default)
	// so an expert outage is never charged to this node. See
	// DefaultExpertWait.
	ExpertWait time.Duration
	// Wire is the activation dtype of dispatches to expert nodes (--wire):
	// DTYPE_F32 (or UNSPECIFIED), exact; DTYPE_BF16, half the bytes with
	// every value rounded to 8 significant bits; DTYPE_F8_E4M3, E4M3
	// hidden rows with BF16 partial rows back. See RemoteConfig.
	Wire meshpb.DType
	// DispatchTransport carries dispatches to expert nodes
	// (--dispatch-transport): TransportTCP (or ""), the data plane, or
	// TransportGRPC. See RemoteConfig.
	DispatchTransport Transport
	// TracerProvider receives the node's spans; nil means the global
	// provider as it is when Start runs.
	TracerProvider trace.TracerProvider
	// Metrics, if set, records steps and dispatches (see NewMetrics).
	Metrics *Metrics
}

// DefaultConfig returns a node configuration for one machine.
func DefaultConfig() Config {
	return Config{NodeID: "attn-0", ListenAddr: "127.0.0.1:0", CacheBytes: 256 << 20, BlockSize: 16, PrefixCaching: true, MaxStepTokens: 8192,
		DispatchTimeout: DefaultDispatchTimeout, ExpertWait: DefaultExpertWait}
}

// Validate names the flag of the first bad field.
func (c Config) Validate() error {
	switch {
	case c.ModelDir == "":
		return errors.New("--model is required")
	case c.CacheBytes <= 0:
		return fmt.Errorf("--cache-mb must be > 0")
	case c.BlockSize <= 0:
		return fmt.Errorf("--block-size must be > 0, got %d", c.BlockSize)
	case c.MicroBatches < 0:
		return fmt.Errorf("--micro-batches must be >= 0, got %d", c.MicroBatches)
	case c.MaxStepTokens <= 0:
		return fmt.Errorf("--max-step-tokens must be > 0, got %d", c.MaxStepTokens)
	case !validResidency(c.Weights):
		return fmt.Errorf("--weights %q: want auto, resident or mmap", c.Weights)
	case c.Quantize != "" && c.Quantize != "q8":
		return fmt.Errorf("--quantize %q: want q8 or nothing", c.Quantize)
	case c.DispatchTimeout <= 0:
		return fmt.Errorf("--dispatch-timeout must be > 0, got %v", c.DispatchTimeout)
	case c.ExpertWait <= 0:
		return fmt.Errorf("--expert-wait must be > 0, got %v", c.ExpertWait)
	case c.Wire != meshpb.DType_DTYPE_UNSPECIFIED && c.Wire != meshpb.DType_DTYPE_F32 && c.Wire != meshpb.DType_DTYPE_BF16 && c.Wire != meshpb.DType_DTYPE_F8_E4M3:
		return fmt.Errorf("--wire %v: want f32, bf16 or fp8", c.Wire)
	case c.DispatchTransport != "" && c.DispatchTransport != TransportTCP && c.DispatchTransport != TransportGRPC:
		return fmt.Errorf("--dispatch-transport %q: want tcp or grpc", c.DispatchTransport)
	}
	return nil
}

// Node is an attention node: it owns sequences, their latent cache and
// samplers, and runs steps; with a ListenAddr it also serves them over
// gRPC (AttentionService). Steps are serialised; Info, Drain, ExpireEpoch
// and Sequences may be called concurrently with a step.
type Node struct {
	cfg     Config
	w       *model.Weights
	pool    *kernels.Pool
	cache   *model.LatentCache
	engines []*model.Engine
	remote  *RemoteExperts
	compute sync.Mutex // held by whichever micro-batch computes
	tracer  trace.Tracer

	// Serving (nil lis and srv in-process).
	lis       net.Listener
	srv       *rpc.Server
	ready     chan struct{}
	errc      chan error
	errOnce   sync.Once
	serveDone chan struct{}
	// stop is cancelled by Close: running steps end at once.
	stop      context.Context
	cancel    context.CancelFunc
	closeOnce sync.Once
	closeErr  error
	draining  atomic.Bool

	stepMu    sync.Mutex // one step at a time
	closed    bool       // guarded by stepMu: no step runs after Close
	logitBufs [][]float32

	mu struct {
		sync.Mutex
		seqs map[uint64]*sequence
		// epoch is the newest coordinator epoch seen (0: none).
		epoch uint64
		// expired epochs (ExpireEpoch) whose steps are refused.
		expired map[uint64]bool
		// fence: sequences of older or expired epochs await dropping
		// (a step was running when the fence was raised).
		fence bool
		// idle is closed while the node holds no sequence.
		idle chan struct{}
	}
}

// sequence is one sequence's state on this node.
type sequence struct {
	seq      *model.Sequence
	sampler  *model.Sampler
	logprobs int
	// reserved bounds the positions the sequence may hold (reserve_tokens);
	// its blocks are taken as it grows.
	reserved int
	// sampled counts tokens drawn, those before its creation included;
	// under minTokens, stopIDs are never drawn.
	sampled   int
	minTokens int
	stopIDs   []int32
	// epoch is the coordinator epoch that created the sequence.
	epoch uint64
	// lastLogits keeps the previous chunk's final logits for echo requests
	// prefilled over several steps.
	lastLogits []float32
}

// load reads the model and builds the compute side of the node. With
// cfg.Placement set, no routed expert is loaded here; they are dispatched
// to expert nodes.
func load(ctx context.Context, cfg Config) (*Node, error) {
	opts := model.LoadOptions{}
	if cfg.Placement != nil {
		opts.Expert = func(int, int) bool { return false }
	}
	if cfg.Quantize == "q8" {
		q := kernels.Q8_0
		opts.Quantize = &q
	}
	w, err := model.LoadContext(ctx, cfg.ModelDir, opts)
	if err != nil {
		return nil, err
	}
	if _, err := w.PlaceContext(ctx, cfg.Weights, cfg.Threads, model.MemAvailable()); err != nil {
		w.Close()
		return nil, err
	}
	c := w.Config
	blocks := model.BlocksForBytes(c, cfg.BlockSize, cfg.CacheBytes)
	if blocks < 1 {
		w.Close()
		return nil, fmt.Errorf("--cache-mb: %d bytes hold no block of %d tokens", cfg.CacheBytes, cfg.BlockSize)
	}
	cache, err := model.NewLatentCache(c, cfg.BlockSize, blocks)
	if err != nil {
		w.Close()
		return nil, err
	}
	cache.SetPrefixCaching(cfg.PrefixCaching)
	tp := cfg.TracerProvider
	if tp == nil {
		tp = otel.GetTracerProvider()
	}
	n := &Node{cfg: cfg, w: w, pool: kernels.NewPool(cfg.Threads), cache: cache, tracer: tp.Tracer(tracerName)}
	n.mu.seqs = map[uint64]*sequence{}
	n.mu.expired = map[uint64]bool{}
	n.mu.idle = make(chan struct{})
	close(n.mu.idle)
	var backend model.ExpertBackend
	mb := cfg.MicroBatches
	if cfg.Placement != nil {
		n.remote = NewRemoteExperts(cfg.Placement, c.HiddenSize, RemoteConfig{DispatchTimeout: cfg.DispatchTimeout, ExpertWait: cfg.ExpertWait, TracerProvider: tp, Metrics: cfg.Metrics, Wire: cfg.Wire, Transport: cfg.DispatchTransport})
		backend = n.remote
		if mb == 0 {
			mb = 2
		}
	} else {
		backend = model.NewLocalExperts(w, n.pool)
		if mb == 0 {
			mb = 1
		}
	}
	for range mb {
		e := model.NewEngine(w, n.pool, backend)
		e.Compute = &n.compute
		n.engines = append(n.engines, e)
	}
	return n, nil
}

// ModelConfig is the loaded model's config.
func (n *Node) ModelConfig() *model.Config { return n.w.Config }

// Info reports capacity for the coordinator's placement of sequences.
// epoch fences like a step's: an epoch older than one seen is refused
// with FAILED_PRECONDITION; a newer one first drops the sequences of
// older epochs, so the free count reported is the caller's to use (if a
// step of the older epoch is still running, its sequences go when it
// ends, and this count is lower until then). 0 fences nothing.
func (n *Node) Info(ctx context.Context, epoch uint64) (*meshpb.NodeInfo, error) {
	if err := n.fenceInfo(epoch); err != nil {
		return nil, err
	}
	n.mu.Lock()
	active, seen := len(n.mu.seqs), n.mu.epoch
	n.mu.Unlock()
	c := n.w.Config
	return &meshpb.NodeInfo{
		NodeId: n.cfg.NodeID, BlockSize: uint32(n.cache.BlockSize()),
		TotalBlocks: uint32(n.cache.Capacity()), FreeBlocks: uint32(n.cache.FreeBlocks()),
		ActiveSequences: uint32(active), VocabSize: uint32(c.VocabSize),
		MaxPositionEmbeddings: uint32(c.MaxPositionEmbeddings),
		Epoch:                 seen, Draining: n.draining.Load(),
		PrefixCaching: n.cache.PrefixCaching(), CachedBlocks: uint32(n.cache.CachedBlocks()),
		MaxStepTokens: uint32(n.cfg.MaxStepTokens),
	}, nil
}

// ErrSuperseded is the FAILED_PRECONDITION of a request whose epoch is
// older than one the node has seen, or expired.
var ErrSuperseded = errors.New("coordinator epoch superseded")

// checkEpochLocked refuses an old or expired epoch and records a newer
// one, raising the fence for older epochs' sequences.
func (n *Node) checkEpochLocked(epoch uint64) error {
	if epoch == 0 {
		return nil
	}
	switch {
	case epoch < n.mu.epoch:
		return fmt.Errorf("%w: epoch %d is older than %d", ErrSuperseded, epoch, n.mu.epoch)
	case n.mu.expired[epoch]:
		return fmt.Errorf("%w: epoch %d expired", ErrSuperseded, epoch)
	case epoch > n.mu.epoch:
		n.mu.epoch = epoch
		for e := range n.mu.expired {
			if e < epoch {
				delete(n.mu.expired, e) // fenced by the newer epoch anyway
			}
		}
		n.mu.fence = true
	}
	return nil
}

func (n *Node) fenceInfo(epoch uint64) error {
	n.mu.Lock()
	err := n.checkEpochLocked(epoch)
	fence := n.mu.fence
	n.mu.Unlock()
	if err != nil {
		return status.Error(codes.FailedPrecondition, err.Error())
	}
	if fence {
		n.tryFence()
	}
	return nil
}

// tryFence drops fenced sequences now unless a step is running (it drops
// them when it ends).
func (n *Node) tryFence() {
	if n.stepMu.TryLock() {
		n.fenceStepLocked()
		n.stepMu.Unlock()
	}
}

// fenceStepLocked drops the sequences of epochs older than the newest seen
// and of expired epochs. The caller holds stepMu, so no step uses them.
func (n *Node) fenceStepLocked() {
	n.mu.Lock()
	if !n.mu.fence {
		n.mu.Unlock()
		return
	}
	n.mu.fence = false
	var drop []*sequence
	for id, s := range n.mu.seqs {
		if s.epoch < n.mu.epoch || n.mu.expired[s.epoch] {
			drop = append(drop, s)
			n.deleteSeqLocked(id)
		}
	}
	n.mu.Unlock()
	for _, s := range drop {
		s.seq.Release()
	}
}

// ExpireEpoch drops every sequence of epoch now (or, if a step is running,
// when it ends) and refuses later requests of that epoch: the control
// plane calls it when that coordinator's lease expired. Epoch 0 (no
// control plane) has no lease and is never expired.
func (n *Node) ExpireEpoch(epoch uint64) {
	if epoch == 0 {
		return
	}
	n.mu.Lock()
	n.mu.expired[epoch] = true
	n.mu.fence = true
	n.mu.Unlock()
	n.tryFence()
}

// ReviveEpoch accepts steps of an expired epoch again: the control plane
// calls it when that coordinator is a member again (its lease had expired
// while it lived, a stall or a partition from etcd, and it re-registered
// under the same epoch). What ExpireEpoch dropped stays dropped: the
// coordinator learns from NOT_FOUND which sequences to rebuild. A newer
// epoch still fences it.
func (n *Node) ReviveEpoch(epoch uint64) {
	n.mu.Lock()
	delete(n.mu.expired, epoch)
	n.mu.Unlock()
}

// Drain marks the node draining: Info reports it, and the coordinator
// places no new sequence here. Running sequences keep being served (a
// new one is still accepted: the coordinator's view may lag); the owner
// waits on Idle, bounded by its grace period, then closes the node.
func (n *Node) Drain() { n.draining.Store(true) }

// Sequences is the number of sequences the node holds.
func (n *Node) Sequences() int {
	n.mu.Lock()
	defer n.mu.Unlock()
	return len(n.mu.seqs)
}

// Idle returns a channel that is closed once the node holds no sequence
// (already closed if it holds none now).
func (n *Node) Idle() <-chan struct{} {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.mu.idle
}

func (n *Node) setSeqLocked(id uint64, s *sequence) {
	if len(n.mu.seqs) == 0 {
		n.mu.idle = make(chan struct{})
	}
	n.mu.seqs[id] = s
}

func (n *Node) deleteSeqLocked(id uint64) {
	if _, ok := n.mu.seqs[id]; !ok {
		return
	}
	delete(n.mu.seqs, id)
	if len(n.mu.seqs) == 0 {
		close(n.mu.idle)
	}
}

// work is one validated SeqWork with its place in the step.
type work struct {
	w       *meshpb.SeqWork
	s       *sequence
	result  *meshpb.SeqResult
	rows    []model.Row
	created bool
	// cached is how many leading tokens came from the prefix cache (they
	// have no rows).
	cached int
	// logit indexes into the micro-batch's logits buffers, per row (-1: none).
	logit []int
}

// Step runs one scheduler step: releases, new sequences, every row through
// every layer, sampling. Per-sequence problems are reported in their
// SeqResult. A step is applied to all its sequences or to none: when it
// cannot complete (no replica of some expert within the expert-wait
// budget: UNAVAILABLE) the response carries the code and a message, only
// its releases were applied, sequences it created are gone, and nothing
// advanced, so the same request may be sent again. Steps of an older or
// expired epoch get FAILED_PRECONDITION and a step naming a sequence twice
// INVALID_ARGUMENT, with nothing applied. Every response carries the
// node's free and total blocks after the step.
//
// An error return means this node cannot serve (it was closed, a step
// panicked) or ctx ended; the step was rolled back all the same.
func (n *Node) Step(ctx context.Context, req *meshpb.StepRequest) (*meshpb.StepResponse, error) {
	ctx, span := n.tracer.Start(ctx, "attn.step")
	start := time.Now()
	defer span.End()
	n.stepMu.Lock()
	defer n.stepMu.Unlock()
	if n.closed || (n.stop != nil && n.stop.Err() != nil) {
		// A step queued behind Close must not touch unmapped weights.
		return nil, ErrClosed
	}
	resp := &meshpb.StepResponse{Step: req.Step}
	n.mu.Lock()
	err := n.checkEpochLocked(req.Epoch)
	n.mu.Unlock()
	n.fenceStepLocked()
	if err != nil {
		return n.refuse(resp, codes.FailedPrecondition, err), nil
	}
	if id, dup := repeated(req.Work); dup {
		return n.refuse(resp, codes.InvalidArgument, fmt.Errorf("%w: sequence %d appears twice in step %d", model.ErrBadInput, id, req.Step)), nil
	}

	for _, id := range req.Release {
		n.release(id)
	}
	var works []*work
	total := 0
	for _, sw := range req.Work {
		res := &meshpb.SeqResult{SeqId: sw.SeqId}
		resp.Results = append(resp.Results, res)
		wk, err := n.admit(sw, res, total, req.Epoch)
		if err != nil {
			res.Code, res.Message = int32(rpc.Code(err)), err.Error()
			continue
		}
		total += len(wk.rows)
		works = append(works, wk)
	}
	span.SetAttributes(attribute.Int("rows", total), attribute.Int("sequences", len(works)))

	runCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	if n.stop != nil {
		defer context.AfterFunc(n.stop, cancel)()
	}
	var pin *stepPin
	if n.remote != nil {
		pin = n.remote.beginStep()
		runCtx = context.WithValue(runCtx, pinKey{}, pin)
	}
	err = n.run(runCtx, works)
	n.cfg.Metrics.observeStep(time.Since(start), total)
	if pin != nil {
		resp.PlacementVersion = n.remote.endStep(pin)
	}
	if err != nil {
		n.rollback(works)
		span.RecordError(err)
		switch {
		case n.stop != nil && n.stop.Err() != nil:
			return nil, ErrClosed
		case errors.Is(err, errPanic):
			return nil, err
		case ctx.Err() != nil:
			return nil, ctx.Err()
		case errors.Is(err, ErrExpertUnavailable):
			return n.refuse(resp, codes.Unavailable, err), nil
		}
		return n.refuse(resp, rpc.Code(err), err), nil
	}
	for _, wk := range works {
		n.finish(wk)
	}
	n.fillBlocks(resp)
	return resp, nil
}

// refuse turns resp into a whole-step failure.
func (n *Node) refuse(resp *meshpb.StepResponse, code codes.Code, err error) *meshpb.StepResponse {
	resp.Results = nil
	resp.Code, resp.Message = int32(code), err.Error()
	n.fillBlocks(resp)
	return resp
}

// fillBlocks reports the cache after the step, fences applied; the
// caller holds stepMu.
func (n *Node) fillBlocks(resp *meshpb.StepResponse) {
	n.fenceStepLocked()
	resp.FreeBlocks, resp.TotalBlocks = uint32(n.cache.FreeBlocks()), uint32(n.cache.Capacity())
	resp.CachedBlocks = uint32(n.cache.CachedBlocks())
}

// repeated reports the first sequence named twice.
func repeated(ws []*meshpb.SeqWork) (uint64, bool) {
	seen := make(map[uint64]struct{}, len(ws))
	for _, w := range ws {
		if _, ok := seen[w.SeqId]; ok {
			return w.SeqId, true
		}
		seen[w.SeqId] = struct{}{}
	}
	return 0, false
}

// rollback undoes a failed step: sequences it created are released, the
// others go back to where the step found them (their length, the blocks
// the step took or matched given back). Latents the step wrote past
// those lengths are never read before a retry of the step rewrites the
// same positions (attention reads only positions up to its own row,
// written earlier in the same layer), samplers and echo logits are only
// touched by finish, and blocks reach the prefix index only through
// finish's Commit, which a failed step never reaches: no half-written
// block is ever shared.
func (n *Node) rollback(works []*work) {
	for _, wk := range works {
		n.undo(wk)
	}
}

// undo gives back what admitting wk took.
func (n *Node) undo(wk *work) {
	if wk.created {
		n.mu.Lock()
		n.deleteSeqLocked(wk.w.SeqId)
		n.mu.Unlock()
		wk.s.seq.Release()
		return
	}
	wk.s.seq.Truncate(int(wk.w.StartPos))
}

// errNotFound carries its gRPC code itself; every other per-sequence
// error is translated by the shared rpc table.
var errNotFound = status.Error(codes.NotFound, "sequence not found")

// ErrClosed is returned by Step after Close. It is a gRPC Unavailable
// status so the coordinator treats the node as gone and rebuilds its
// sequences elsewhere.
var ErrClosed = status.Error(codes.Unavailable, "attention node closed")

// errPanic marks a step whose compute panicked: the node is broken.
var errPanic = errors.New("attention node: step panicked")

func (n *Node) release(id uint64) {
	n.mu.Lock()
	s, ok := n.mu.seqs[id]
	n.deleteSeqLocked(id)
	n.mu.Unlock()
	if ok {
		s.seq.Release()
	}
}

// admit validates one SeqWork, creating its sequence on the first chunk,
// and lays out its rows.
func (n *Node) admit(sw *meshpb.SeqWork, res *meshpb.SeqResult, stepRows int, epoch uint64) (*work, error) {
	c := n.w.Config
	if len(sw.Tokens) == 0 {
		return nil, fmt.Errorf("%w: sequence %d: no tokens", model.ErrBadInput, sw.SeqId)
	}
	if stepRows+len(sw.Tokens) > n.cfg.MaxStepTokens {
		return nil, fmt.Errorf("%w: step exceeds %d tokens", model.ErrBadInput, n.cfg.MaxStepTokens)
	}
	for _, t := range sw.Tokens {
		if t < 0 || int(t) >= c.VocabSize {
			return nil, fmt.Errorf("%w: token id %d outside vocabulary [0,%d)", model.ErrBadInput, t, c.VocabSize)
		}
	}
	n.mu.Lock()
	s, exists := n.mu.seqs[sw.SeqId]
	n.mu.Unlock()
	switch {
	case sw.StartPos == 0 && exists:
		return nil, fmt.Errorf("%w: sequence %d already exists", model.ErrBadInput, sw.SeqId)
	case sw.StartPos > 0 && !exists:
		return nil, fmt.Errorf("%w: sequence %d", errNotFound, sw.SeqId)
	}
	end := int(sw.StartPos) + len(sw.Tokens)
	if exists {
		if int(sw.StartPos) != s.seq.Len {
			return nil, fmt.Errorf("%w: sequence %d: start_pos %d, but %d tokens are cached", model.ErrBadInput, sw.SeqId, sw.StartPos, s.seq.Len)
		}
		if end > s.reserved {
			return nil, fmt.Errorf("%w: sequence %d: %d tokens exceed the %d reserved", model.ErrBadInput, sw.SeqId, end, s.reserved)
		}
	} else {
		var err error
		if s, err = n.create(sw, epoch); err != nil {
			return nil, err
		}
	}
	wk := &work{w: sw, s: s, result: res, created: !exists}
	// Whole blocks found in the prefix cache are taken, not computed; a
	// sampling chunk always computes its last token for its logits, and
	// echo needs every position's.
	if !sw.EchoLogprobs && s.lastLogits == nil {
		limit := len(sw.Tokens)
		if sw.Sample {
			limit--
		}
		wk.cached = s.seq.Match(sw.Tokens, limit)
		res.CachedTokens = uint32(wk.cached)
	}
	if err := s.seq.Reserve(end); err != nil {
		n.undo(wk)
		return nil, fmt.Errorf("sequence %d: %w", sw.SeqId, err)
	}
	for i := wk.cached; i < len(sw.Tokens); i++ {
		last := i == len(sw.Tokens)-1
		wk.rows = append(wk.rows, model.Row{Seq: s.seq, Token: int(sw.Tokens[i]), Pos: int(sw.StartPos) + i,
			Logits: (last && sw.Sample) || sw.EchoLogprobs || (last && s.lastLogits != nil)})
	}
	return wk, nil
}

func (n *Node) create(sw *meshpb.SeqWork, epoch uint64) (*sequence, error) {
	c := n.w.Config
	reserve := int(sw.ReserveTokens)
	if reserve < len(sw.Tokens) {
		reserve = len(sw.Tokens) + 1
	}
	if reserve > c.MaxPositionEmbeddings {
		return nil, fmt.Errorf("%w: %d tokens exceed max_position_embeddings %d", model.ErrBadInput, reserve, c.MaxPositionEmbeddings)
	}
	p := model.SamplingParams{}
	if sp := sw.Sampling; sp != nil {
		p = model.SamplingParams{Temperature: sp.Temperature, TopK: int(sp.TopK), TopP: sp.TopP, Seed: sp.Seed}
	}
	if err := p.Validate(); err != nil {
		return nil, err
	}
	s := &sequence{seq: n.cache.NewSequence(), sampler: model.NewSampler(p), logprobs: int(sw.Logprobs), reserved: reserve, epoch: epoch,
		sampled: int(sw.Generated), minTokens: int(sw.MinTokens), stopIDs: sw.StopIds}
	s.sampler.Skip(int(sw.Generated))
	if sw.EchoLogprobs {
		s.lastLogits = []float32{} // non-nil: keep chunk-final logits
	}
	n.mu.Lock()
	n.setSeqLocked(sw.SeqId, s)
	n.mu.Unlock()
	return s, nil
}

// run splits the works into micro-batches balanced by rows and runs them
// concurrently; the engines' shared compute lock makes them alternate. The
// first failure cancels the others.
func (n *Node) run(ctx context.Context, works []*work) error {
	if len(works) == 0 {
		return nil
	}
	mbs := make([][]*work, min(len(n.engines), len(works)))
	rowsIn := make([]int, len(mbs))
	// Largest first onto the lightest micro-batch.
	order := slices.Clone(works)
	slices.SortStableFunc(order, func(a, b *work) int { return len(b.rows) - len(a.rows) })
	for _, wk := range order {
		j := 0
		for i := range rowsIn {
			if rowsIn[i] < rowsIn[j] {
				j = i
			}
		}
		mbs[j] = append(mbs[j], wk)
		rowsIn[j] += len(wk.rows)
	}
	// Logit buffers: one per row that wants logits, across micro-batches.
	need := 0
	for _, wk := range works {
		for _, r := range wk.rows {
			if r.Logits {
				need++
			}
		}
	}
	c := n.w.Config
	for len(n.logitBufs) < need {
		n.logitBufs = append(n.logitBufs, make([]float32, c.VocabSize))
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var (
		errMu    sync.Mutex
		firstErr error
	)
	next := 0
	var wg sync.WaitGroup
	for i, mb := range mbs {
		var rows []model.Row
		var bufs [][]float32
		for _, wk := range mb {
			wk.logit = make([]int, len(wk.rows))
			for j, r := range wk.rows {
				wk.logit[j] = -1
				if r.Logits {
					wk.logit[j] = next
					bufs = append(bufs, n.logitBufs[next])
					next++
				}
			}
			rows = append(rows, wk.rows...)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, span := n.tracer.Start(ctx, "attn.microbatch")
			span.SetAttributes(attribute.Int("microbatch", i), attribute.Int("rows", len(rows)))
			defer span.End()
			err := n.forward(ctx, i, rows, bufs)
			if err != nil {
				errMu.Lock()
				// The first failure is the cause; the others are
				// cancellations it caused.
				if firstErr == nil || (errors.Is(firstErr, context.Canceled) && !errors.Is(err, context.Canceled)) {
					firstErr = err
				}
				errMu.Unlock()
				cancel()
			}
		}()
	}
	wg.Wait()
	return firstErr
}

// forward runs one micro-batch, turning a panic into errPanic.
func (n *Node) forward(ctx context.Context, i int, rows []model.Row, bufs [][]float32) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("%w: %v\n%s", errPanic, r, debug.Stack())
		}
	}()
	return n.engines[i].Forward(ctx, rows, bufs)
}

// finish commits one work's tokens (its full blocks join the prefix
// index), then samples and reports logprobs after its rows ran.
func (n *Node) finish(wk *work) {
	sw, s, res := wk.w, wk.s, wk.result
	s.seq.Commit(sw.Tokens[wk.cached:])
	if len(wk.rows) == 0 {
		return // all of it came from the prefix cache; it does not sample
	}
	if sw.EchoLogprobs {
		for j, t := range sw.Tokens {
			var prev []float32
			switch {
			case j > 0:
				prev = n.logitBufs[wk.logit[j-1]]
			case len(s.lastLogits) > 0:
				prev = s.lastLogits
			}
			if prev == nil {
				// The sequence's first token has no prediction.
				res.PromptLogprobs = append(res.PromptLogprobs, &meshpb.TokenLogprob{Token: t})
				continue
			}
			res.PromptLogprobs = append(res.PromptLogprobs, toProto(model.Logprobs(prev, int(t), max(s.logprobs, 0))))
		}
	}
	last := wk.logit[len(wk.logit)-1]
	if s.lastLogits != nil && last >= 0 {
		s.lastLogits = append(s.lastLogits[:0], n.logitBufs[last]...)
	}
	if !sw.Sample {
		return
	}
	logits := n.logitBufs[last]
	tok := s.sample(logits)
	res.Token, res.Sampled = int32(tok), true
	if s.logprobs >= 0 {
		res.Logprob = toProto(model.Logprobs(logits, tok, s.logprobs))
	}
}

// sample draws the next token, never a stop token under min_tokens
// (their logits are masked for the draw only: logprobs stay the model's).
func (s *sequence) sample(logits []float32) int {
	defer func() { s.sampled++ }()
	if s.sampled >= s.minTokens || len(s.stopIDs) == 0 {
		return s.sampler.Sample(logits)
	}
	saved := make([]float32, len(s.stopIDs))
	for i, id := range s.stopIDs {
		if int(id) >= 0 && int(id) < len(logits) {
			saved[i], logits[id] = logits[id], float32(math.Inf(-1))
		}
	}
	tok := s.sampler.Sample(logits)
	for i := len(s.stopIDs) - 1; i >= 0; i-- { // backwards: an id listed twice saved -inf the second time
		if id := s.stopIDs[i]; int(id) >= 0 && int(id) < len(logits) {
			logits[id] = saved[i]
		}
	}
	return tok
}

func toProto(tl model.TokenLogprob) *meshpb.TokenLogprob {
	out := &meshpb.TokenLogprob{Token: int32(tl.Token), Logprob: tl.Logprob}
	for _, t := range tl.Top {
		out.Top = append(out.Top, &meshpb.TopLogprob{Token: int32(t.ID), Logprob: t.Logprob})
	}
	return out
}

func validResidency(r model.Residency) bool {
	_, err := model.ParseResidency(string(r))
	return err == nil
}
