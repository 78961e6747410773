package expertnode

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"sync"
	"time"

	"go.opentelemetry.io/otel/attribute"
	otelcodes "go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/propagation"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/expertmesh/expertmesh/internal/rpc"
	"github.com/expertmesh/expertmesh/internal/wire"
	meshpb "github.com/expertmesh/expertmesh/proto"
)

// pipelineDepth is how many requests of one stream may wait between the
// stages (receive+validate → compute → send). Two keeps the reader one
// micro-batch ahead of compute, which is what ping-pong needs; more would
// only queue work the single compute lane cannot start anyway.
const pipelineDepth = 2

type service struct {
	meshpb.UnimplementedExpertServiceServer
	n *Node
}

// job is one dispatch request on its way through a stream's pipeline,
// with every buffer it needs. Each stream recycles its own jobs (jobList)
// so steady-state traffic allocates no per-row memory: x, out and data grow
// to the largest batch seen on the stream and are reused.
type job struct {
	id      uint64
	layer   int
	rows, k int
	ids     []int32   // aliases the request; not reused
	weights []float32 // aliases the request; not reused
	trace   map[string]string
	x, out  []float32
	code    codes.Code
	msg     string
	compute time.Duration

	resp   meshpb.DispatchResponse
	tensor meshpb.Tensor
	shape  [2]int64
	data   []byte
}

// jobList is a stream's free list. It holds every job the pipeline can
// have in flight (one per stage plus both queues), so a put never drops
// one and after warm-up a get never allocates. A per-stream list rather
// than a sync.Pool keeps buffers sized to that stream's batches and
// survives garbage collections.
type jobList chan *job

const jobsPerStream = 2*pipelineDepth + 3

func (l jobList) get() *job {
	select {
	case j := <-l:
		return j
	default:
		return new(job)
	}
}

func (l jobList) put(j *job) {
	j.ids, j.weights, j.msg = nil, nil, ""
	select {
	case l <- j:
	default:
	}
}

// Dispatch runs one stream as a three-stage pipeline so that receiving and
// validating the next request never waits for the current computation:
//
//	this goroutine: Recv, validate, decode → jobs
//	computer:       ExpertRunner under the node's compute lock → replies
//	sender:         encode, Send
//
// A request that fails validation skips compute and is answered with its
// code; the stream stays open. When the client half-closes, pending
// requests are still answered before the stream ends. The handler returns
// only after both helper goroutines have exited (Close relies on it).
func (s *service) Dispatch(st grpc.BidiStreamingServer[meshpb.DispatchRequest, meshpb.DispatchResponse]) error {
	n := s.n
	ctx := st.Context()
	free := make(jobList, jobsPerStream)
	jobs := make(chan *job, pipelineDepth)
	replies := make(chan *job, pipelineDepth)
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		defer close(replies)
		for j := range jobs {
			if j.code == codes.OK {
				n.run(ctx, j)
			}
			replies <- j
		}
	}()
	var sendErr error
	go func() {
		defer wg.Done()
		// Keep draining after a failed Send so the computer never blocks.
		for j := range replies {
			if sendErr == nil {
				sendErr = st.Send(n.reply(j))
			}
			free.put(j)
		}
	}()

	var recvErr error
	for recvErr == nil {
		req, err := st.Recv()
		if err != nil {
			if !errors.Is(err, io.EOF) {
				recvErr = err
			}
			break
		}
		j := n.prepare(free.get(), req)
		select {
		case jobs <- j:
		case <-ctx.Done():
			recvErr = ctx.Err()
		}
	}
	close(jobs)
	wg.Wait()
	if recvErr != nil {
		return rpc.ToStatus(recvErr)
	}
	return sendErr
}

// prepare validates req completely and decodes its rows into j. A request
// that fails comes back with a non-OK code and a message naming the
// problem.
func (n *Node) prepare(j *job, req *meshpb.DispatchRequest) *job {
	n.requests.Add(1)
	j.id, j.code, j.compute = req.Id, codes.OK, 0
	fail := func(c codes.Code, format string, args ...any) *job {
		j.code, j.msg = c, fmt.Sprintf(format, args...)
		return j
	}
	mc := n.mc
	h, ne := mc.HiddenSize, mc.NumExperts()
	if req.Layer >= uint32(mc.NumHiddenLayers) {
		return fail(codes.InvalidArgument, "layer %d out of range: model has %d layers", req.Layer, mc.NumHiddenLayers)
	}
	layer := int(req.Layer)
	if !mc.IsMoELayer(layer) {
		return fail(codes.InvalidArgument, "layer %d is dense: it has no routed experts", layer)
	}
	rows, err := wire.CheckMatrix(req.Hidden, h, n.cfg.MaxRows)
	if err != nil {
		return fail(codes.InvalidArgument, "hidden: %v", err)
	}
	if req.K < 1 || req.K > uint32(ne) {
		return fail(codes.InvalidArgument, "k = %d: want 1..%d", req.K, ne)
	}
	k := int(req.K)
	if len(req.ExpertIds) != rows*k || len(req.GateWeights) != rows*k {
		return fail(codes.InvalidArgument, "%d expert ids and %d gate weights for %d rows × k=%d: want %d of each",
			len(req.ExpertIds), len(req.GateWeights), rows, k, rows*k)
	}
	for i, id := range req.ExpertIds {
		if id < -1 || int(id) >= ne {
			return fail(codes.InvalidArgument, "expert_ids[%d] = %d: want -1 or 0..%d", i, id, ne-1)
		}
	}
	for i, w := range req.GateWeights {
		if math.IsNaN(float64(w)) || math.IsInf(float64(w), 0) {
			return fail(codes.InvalidArgument, "gate_weights[%d] = %v: not finite", i, w)
		}
	}
	if i, id := n.firstNotHeld(layer, req.ExpertIds); i >= 0 {
		return fail(codes.FailedPrecondition, "expert_ids[%d]: layer %d expert %d is not held by node %s", i, layer, id, n.id)
	}
	j.x = grow(j.x, rows*h)
	if err := wire.DecodeF32(j.x, req.Hidden.Data); err != nil {
		return fail(codes.InvalidArgument, "hidden: %v", err)
	}
	j.layer, j.rows, j.k = layer, rows, k
	j.trace = req.TraceContext
	j.ids, j.weights = req.ExpertIds, req.GateWeights
	return j
}

// firstNotHeld returns the first slot naming an expert this node does not
// hold, or -1.
func (n *Node) firstNotHeld(layer int, ids []int32) (int, int32) {
	n.mu.RLock()
	defer n.mu.RUnlock()
	row := n.mu.held[layer]
	for i, id := range ids {
		if id >= 0 && !row[id] {
			return i, id
		}
	}
	return -1, 0
}

// run computes a validated job's partial sums under the compute lock.
func (n *Node) run(ctx context.Context, j *job) {
	if err := ctx.Err(); err != nil {
		j.code, j.msg = codes.Canceled, err.Error()
		return
	}
	if len(j.trace) > 0 {
		// Parent the span on the dispatching layer, not the stream.
		ctx = propagation.TraceContext{}.Extract(ctx, propagation.MapCarrier(j.trace))
	}
	_, span := n.tracer.Start(ctx, "expert.compute")
	if span.IsRecording() {
		span.SetAttributes(
			attribute.Int("layer", j.layer),
			attribute.Int("rows", j.rows),
			attribute.Int("experts", distinctExperts(j.ids)),
			attribute.String("node", n.id))
	}
	h := n.mc.HiddenSize
	j.out = grow(j.out, j.rows*h)
	n.compute.Lock()
	start := time.Now()
	// Run accumulates into out, so it starts from zero.
	clear(j.out[:j.rows*h])
	err := n.compute.runner.Run(j.layer, j.x, j.rows, j.k, j.ids, j.weights, j.out)
	j.compute = time.Since(start)
	n.compute.Unlock()
	if err != nil {
		j.code, j.msg = rpc.Code(err), err.Error()
		span.RecordError(err)
		span.SetStatus(otelcodes.Error, err.Error())
	} else {
		n.rowsServed[j.layer].Add(uint64(j.rows))
	}
	span.End()
}

func distinctExperts(ids []int32) int {
	seen := map[int32]bool{}
	for _, id := range ids {
		if id >= 0 {
			seen[id] = true
		}
	}
	return len(seen)
}

// reply fills j's reusable response. gRPC marshals a message inside Send,
// so the buffers may be reused once Send has returned.
func (n *Node) reply(j *job) *meshpb.DispatchResponse {
	r := &j.resp
	r.Id, r.Code, r.Message, r.Partial, r.ComputeUs = j.id, int32(j.code), j.msg, nil, uint64(j.compute.Microseconds())
	if j.code == codes.OK {
		h := n.mc.HiddenSize
		j.shape = [2]int64{int64(j.rows), int64(h)}
		j.data = wire.AppendF32(j.data[:0], j.out[:j.rows*h])
		j.tensor.Dtype, j.tensor.Shape, j.tensor.Data = meshpb.DType_DTYPE_F32, j.shape[:], j.data
		r.Partial = &j.tensor
	}
	return r
}

func grow(b []float32, n int) []float32 {
	if cap(b) < n {
		return make([]float32, n)
	}
	return b[:n]
}

// checkRanges validates Load/Drop ranges against the model, all before
// any is applied, so a bad request changes nothing.
func (n *Node) checkRanges(rs []*meshpb.ExpertRange) error {
	mc := n.mc
	for i, r := range rs {
		switch {
		case r.Layer >= uint32(mc.NumHiddenLayers):
			return fmt.Errorf("experts[%d]: layer %d out of range: model has %d layers", i, r.Layer, mc.NumHiddenLayers)
		case !mc.IsMoELayer(int(r.Layer)):
			return fmt.Errorf("experts[%d]: layer %d is dense", i, r.Layer)
		case r.First > r.Last:
			return fmt.Errorf("experts[%d]: first %d > last %d", i, r.First, r.Last)
		case r.Last >= uint32(mc.NumExperts()):
			return fmt.Errorf("experts[%d]: expert %d out of range: model has %d routed experts", i, r.Last, mc.NumExperts())
		}
	}
	return nil
}

// setHeld marks or unmarks the ranges and returns the (layer, expert)
// pairs whose state changed.
func (n *Node) setHeld(rs []*meshpb.ExpertRange, hold bool) [][2]int {
	n.mu.Lock()
	defer n.mu.Unlock()
	var changed [][2]int
	for _, r := range rs {
		row := n.mu.held[r.Layer]
		for x := int(r.First); x <= int(r.Last); x++ {
			if row[x] != hold {
				row[x] = hold
				changed = append(changed, [2]int{int(r.Layer), x})
			}
		}
	}
	return changed
}

// Load marks the experts held and readies their tensors (resident copies
// or a prefetch, per Config.Weights). loaded counts
// experts that were not held before, so a repeated Load reports 0.
func (s *service) Load(ctx context.Context, req *meshpb.LoadRequest) (*meshpb.LoadResponse, error) {
	n := s.n
	if err := n.checkRanges(req.Experts); err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	changed := n.setHeld(req.Experts, true)
	n.place(changed)
	return &meshpb.LoadResponse{Loaded: uint32(len(changed))}, nil
}

// Drop unmarks the experts; dispatches validated afterwards that name them
// get FAILED_PRECONDITION. Their resident copies are freed; mapped pages
// stay mapped (the OS reclaims them under pressure). dropped counts
// experts that were held.
func (s *service) Drop(ctx context.Context, req *meshpb.DropRequest) (*meshpb.DropResponse, error) {
	n := s.n
	if err := n.checkRanges(req.Experts); err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	changed := n.setHeld(req.Experts, false)
	n.unplace(changed)
	return &meshpb.DropResponse{Dropped: uint32(len(changed))}, nil
}

// Status reports the held set, rows served per MoE layer and the number of
// dispatch requests received (rejected ones included).
func (s *service) Status(ctx context.Context, _ *meshpb.StatusRequest) (*meshpb.ExpertStatus, error) {
	n := s.n
	n.mu.RLock()
	ranges := heldRanges(n.mu.held)
	n.mu.RUnlock()
	st := &meshpb.ExpertStatus{NodeId: n.id, Experts: ranges, RowsServed: map[uint32]uint64{}, Requests: n.requests.Load()}
	for l := range n.rowsServed {
		if n.mc.IsMoELayer(l) {
			st.RowsServed[uint32(l)] = n.rowsServed[l].Load()
		}
	}
	return st, nil
}
