package attnnode

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/expertmesh/expertmesh/internal/rpc"
	"github.com/expertmesh/expertmesh/kernels"
	"github.com/expertmesh/expertmesh/model"
	"github.com/expertmesh/expertmesh/placement"
	meshpb "github.com/expertmesh/expertmesh/proto"
)

var tracer = otel.Tracer("github.com/expertmesh/expertmesh/attnnode")

// Config configures an attention node.
type Config struct {
	// ModelDir is the checkpoint in HF layout (--model).
	ModelDir string
	// NodeID names the node in logs, traces and Info (--node-id).
	NodeID string
	// ListenAddr is the gRPC address of Start (--listen); ":0" picks a port.
	ListenAddr string
	// Threads sizes the kernel pool (--threads); 0 means all cores.
	Threads int
	// CacheBytes bounds the latent cache (--cache-mb).
	CacheBytes int64
	// BlockSize is tokens per cache block (--block-size).
	BlockSize int
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
}

// DefaultConfig returns a node configuration for one machine.
func DefaultConfig() Config {
	return Config{NodeID: "attn-0", ListenAddr: "127.0.0.1:0", CacheBytes: 256 << 20, BlockSize: 16, MaxStepTokens: 8192}
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
	}
	return nil
}

// Node is an attention node without its network face: it owns sequences,
// their latent cache and samplers, and runs steps. Steps are serialised;
// Info may be called concurrently with a step.
type Node struct {
	cfg     Config
	w       *model.Weights
	pool    *kernels.Pool
	cache   *model.LatentCache
	engines []*model.Engine
	remote  *RemoteExperts
	compute sync.Mutex // held by whichever micro-batch computes

	stepMu sync.Mutex // one step at a time
	closed bool       // guarded by stepMu: no step runs after Close
	mu     struct {
		sync.Mutex
		seqs map[uint64]*sequence
	}
	logitBufs [][]float32
}

// sequence is one sequence's state on this node.
type sequence struct {
	seq      *model.Sequence
	sampler  *model.Sampler
	logprobs int
	reserved int
	// lastLogits keeps the previous chunk's final logits for echo requests
	// prefilled over several steps.
	lastLogits []float32
}

// New loads the model and builds the node. With cfg.Placement set, no
// routed expert is loaded here; they are dispatched to expert nodes.
func New(cfg Config) (*Node, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	opts := model.LoadOptions{}
	if cfg.Placement != nil {
		opts.Expert = func(int, int) bool { return false }
	}
	if cfg.Quantize == "q8" {
		q := kernels.Q8_0
		opts.Quantize = &q
	}
	w, err := model.Load(cfg.ModelDir, opts)
	if err != nil {
		return nil, err
	}
	if _, err := w.Place(cfg.Weights, cfg.Threads, model.MemAvailable()); err != nil {
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
	n := &Node{cfg: cfg, w: w, pool: kernels.NewPool(cfg.Threads), cache: cache}
	n.mu.seqs = map[uint64]*sequence{}
	var backend model.ExpertBackend
	mb := cfg.MicroBatches
	if cfg.Placement != nil {
		n.remote = NewRemoteExperts(cfg.Placement, c.HiddenSize)
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

// Close releases the kernel pool, expert connections and the mapped
// weights. No step may be running.
func (n *Node) Close() error {
	n.stepMu.Lock()
	defer n.stepMu.Unlock()
	if n.closed {
		return nil
	}
	n.closed = true
	if n.remote != nil {
		n.remote.Close()
	}
	n.pool.Close()
	return n.w.Close()
}

// Info reports capacity for the coordinator's placement of sequences.
// (epoch fencing: see proto InfoRequest; not enforced yet)
func (n *Node) Info(_ context.Context, epoch uint64) (*meshpb.NodeInfo, error) {
	n.mu.Lock()
	active := len(n.mu.seqs)
	n.mu.Unlock()
	c := n.w.Config
	return &meshpb.NodeInfo{
		NodeId: n.cfg.NodeID, BlockSize: uint32(n.cache.BlockSize()),
		TotalBlocks: uint32(n.cache.Capacity()), FreeBlocks: uint32(n.cache.FreeBlocks()),
		ActiveSequences: uint32(active), VocabSize: uint32(c.VocabSize),
		MaxPositionEmbeddings: uint32(c.MaxPositionEmbeddings),
	}, nil
}

// work is one validated SeqWork with its place in the step.
type work struct {
	w      *meshpb.SeqWork
	s      *sequence
	result *meshpb.SeqResult
	rows   []model.Row
	// logit indexes into the micro-batch's logits buffers, per row (-1: none).
	logit []int
}

// Step runs one scheduler step: releases, new sequences, every row through
// every layer, sampling. Per-sequence problems are reported in their
// SeqResult; an error return means the whole step failed (an expert node
// is gone, the context ended) and no sequence advanced past its last
// complete step.
func (n *Node) Step(ctx context.Context, req *meshpb.StepRequest) (*meshpb.StepResponse, error) {
	ctx, span := tracer.Start(ctx, "attn.step")
	defer span.End()
	n.stepMu.Lock()
	defer n.stepMu.Unlock()
	if n.closed {
		// A step queued behind Close must not touch unmapped weights.
		return nil, ErrClosed
	}

	for _, id := range req.Release {
		n.release(id)
	}
	resp := &meshpb.StepResponse{Step: req.Step}
	var works []*work
	total := 0
	for _, sw := range req.Work {
		res := &meshpb.SeqResult{SeqId: sw.SeqId}
		resp.Results = append(resp.Results, res)
		wk, err := n.admit(sw, res, total)
		if err != nil {
			res.Code, res.Message = int32(rpc.Code(err)), err.Error()
			continue
		}
		total += len(wk.rows)
		works = append(works, wk)
	}
	span.SetAttributes(attribute.Int("rows", total), attribute.Int("sequences", len(works)))
	if err := n.run(ctx, works); err != nil {
		return nil, err
	}
	for _, wk := range works {
		n.finish(wk)
	}
	return resp, nil
}

// errNotFound carries its gRPC code itself; every other per-sequence
// error is translated by the shared rpc table.
var errNotFound = status.Error(codes.NotFound, "sequence not found")

// ErrClosed is returned by Step after Close. It is a gRPC Unavailable
// status so the coordinator treats the node as gone and rebuilds its
// sequences elsewhere.
var ErrClosed = status.Error(codes.Unavailable, "attention node closed")

func (n *Node) release(id uint64) {
	n.mu.Lock()
	s, ok := n.mu.seqs[id]
	delete(n.mu.seqs, id)
	n.mu.Unlock()
	if ok {
		s.seq.Release()
	}
}

// admit validates one SeqWork, creating its sequence on the first chunk,
// and lays out its rows.
func (n *Node) admit(sw *meshpb.SeqWork, res *meshpb.SeqResult, stepRows int) (*work, error) {
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
	case !exists:
		var err error
		if s, err = n.create(sw); err != nil {
			return nil, err
		}
	}
	end := int(sw.StartPos) + len(sw.Tokens)
	if int(sw.StartPos) != s.seq.Len {
		return nil, fmt.Errorf("%w: sequence %d: start_pos %d, but %d tokens are cached", model.ErrBadInput, sw.SeqId, sw.StartPos, s.seq.Len)
	}
	if end > s.reserved {
		return nil, fmt.Errorf("%w: sequence %d: %d tokens exceed the %d reserved", model.ErrBadInput, sw.SeqId, end, s.reserved)
	}
	wk := &work{w: sw, s: s, result: res}
	for i, t := range sw.Tokens {
		last := i == len(sw.Tokens)-1
		wk.rows = append(wk.rows, model.Row{Seq: s.seq, Token: int(t), Pos: int(sw.StartPos) + i,
			Logits: (last && sw.Sample) || sw.EchoLogprobs || (last && s.lastLogits != nil)})
	}
	return wk, nil
}

func (n *Node) create(sw *meshpb.SeqWork) (*sequence, error) {
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
	s := &sequence{seq: n.cache.NewSequence(), sampler: model.NewSampler(p), logprobs: int(sw.Logprobs), reserved: reserve}
	if err := s.seq.Reserve(reserve); err != nil {
		return nil, err
	}
	if sw.EchoLogprobs {
		s.lastLogits = []float32{} // non-nil: keep chunk-final logits
	}
	n.mu.Lock()
	n.mu.seqs[sw.SeqId] = s
	n.mu.Unlock()
	return s, nil
}

// run splits the works into micro-batches balanced by rows and runs them
// concurrently; the engines' shared compute lock makes them alternate.
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
	next := 0
	errs := make([]error, len(mbs))
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
			ctx, span := tracer.Start(ctx, "attn.microbatch")
			span.SetAttributes(attribute.Int("microbatch", i), attribute.Int("rows", len(rows)))
			defer span.End()
			errs[i] = n.engines[i].Forward(ctx, rows, bufs)
		}()
	}
	wg.Wait()
	return errors.Join(errs...)
}

// finish samples and reports logprobs for one work after its rows ran.
func (n *Node) finish(wk *work) {
	sw, s, res := wk.w, wk.s, wk.result
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
	tok := s.sampler.Sample(logits)
	res.Token, res.Sampled = int32(tok), true
	if s.logprobs >= 0 {
		res.Logprob = toProto(model.Logprobs(logits, tok, s.logprobs))
	}
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
