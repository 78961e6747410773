package expertnode

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"sync"
	"sync/atomic"
	"time"

	"go.opentelemetry.io/otel/attribute"
	otelcodes "go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/expertmesh/expertmesh/internal/dataplane"
	"github.com/expertmesh/expertmesh/internal/rpc"
	"github.com/expertmesh/expertmesh/internal/wire"
	"github.com/expertmesh/expertmesh/placement"
	meshpb "github.com/expertmesh/expertmesh/proto"
)

// streamWorkers is how many goroutines serve one Dispatch stream. Each
// takes the stream's receiving turn, receives one request, passes the
// turn on and then validates, computes and answers that request itself,
// so a request that finds the node idle goes from gRPC's reader to the
// experts and back to gRPC's writer on one goroutine, with no hand-off
// in between, while another worker already waits for the next request.
// Three: while one computes, two more requests are received and
// validated ahead of the single compute lane (ping-pong keeps one
// micro-batch's request arriving while another's computes), as deep as
// the three-stage pipeline this replaced; later ones wait in gRPC's
// receive buffer.
//
// On the data plane a worker keeps the turn while the node is idle: it
// passes it on at once only when the next request has begun to arrive
// with the one it received (the connection holds bytes of it:
// bufferedStream), or later, when its request has to wait for the
// compute lane; otherwise it computes, answers and receives the next
// request itself, as one goroutine would. Requests that come one at a
// time then need no hand-off at all: a passed turn woke a worker only
// for it to find nothing to read and park in the poller, and the next
// request then woke it on whichever core polled, away from the caches
// the last one warmed (8-row dispatches of BenchmarkDispatchTCP cost
// ~150 µs of CPU, compute ~80 µs, with the turn passed every time, ~105
// and ~50 with one worker). A request that arrives while its
// predecessor computes waits in the socket until the worker is done
// with it (rather than being received and validated meanwhile).
const streamWorkers = 3

// bufferedStream is a stream that tells how many bytes it has read past
// the message it last received (dataplane.Conn.Buffered).
type bufferedStream interface {
	Buffered() int
}

type service struct {
	meshpb.UnimplementedExpertServiceServer
	n *Node
}

// job is one dispatch request and every buffer it needs. Each worker of a
// stream owns one and reuses it, so steady-state traffic allocates
// nothing: the request is received in place into req (wire.Codec reuses
// its tensor, ids and weights), and x, out and data grow to the largest
// batch seen and are reused.
type job struct {
	id      uint64
	layer   int
	rows, k int
	ids     []int32   // aliases the request it was prepared from
	weights []float32 // aliases the request it was prepared from
	trace   map[string]string
	x       []float32 // the rows: a view of req's F32 bytes, or xbuf
	xbuf    []float32 // decoded rows of other dtypes
	out     []float32 // the partial sums: outBuf, or the rows of sendBuf
	outBuf  []float32
	partial meshpb.DType // the reply's dtype (F32 or BF16)
	code    codes.Code
	msg     string
	compute time.Duration

	req    meshpb.DispatchRequest
	hidden *meshpb.Tensor // req's tensor, kept while a request has none
	frame  []byte         // the request's bytes, on the data plane (req's rows alias it)

	resp   meshpb.DispatchResponse
	outMsg wire.OutResponse // resp with out's rows, as Send marshals it
	tensor meshpb.Tensor    // reply's
	shape  [2]int64         // reply's
	data   []byte           // reply's
	// On the data plane, a reply with F32 rows is computed straight into
	// the frame that sends it (dataplane.ReplyFrame): sendBuf is that
	// frame, and inFrame says out is its rows.
	sendBuf []byte
	inFrame bool
}

// dispatchStream is what serving a Dispatch stream needs of its
// transport: gRPC's server stream, or a data-plane connection
// (dataplane.Conn). RecvMsg decodes a *meshpb.DispatchRequest in place
// (wire.Codec's semantics) and is called by one goroutine at a time;
// SendMsg sends a *wire.OutResponse, also one at a time, possibly
// concurrently with RecvMsg; Context ends with the stream.
type dispatchStream interface {
	Context() context.Context
	RecvMsg(m any) error
	SendMsg(m any) error
}

// Dispatch serves one gRPC Dispatch stream (see serveDispatch).
func (s *service) Dispatch(st grpc.BidiStreamingServer[meshpb.DispatchRequest, meshpb.DispatchResponse]) error {
	return s.n.serveDispatch(st)
}

// serveDataPlane serves one data-plane connection's Dispatch stream.
// Like the gRPC server's stats handler for a gRPC stream, it gives the
// stream a server span (a no-op with no tracer provider installed), so
// expert.compute spans of untraced requests have a parent on both
// transports.
func (n *Node) serveDataPlane(c *dataplane.Conn) error {
	ctx, span := n.tracer.Start(c.Context(), "expertmesh.ExpertService/Dispatch", trace.WithSpanKind(trace.SpanKindServer),
		trace.WithAttributes(attribute.String("transport", "dataplane")))
	defer span.End()
	return n.serveDispatch(dataPlaneStream{c, ctx})
}

// dataPlaneStream is a data-plane connection with its span's context.
type dataPlaneStream struct {
	*dataplane.Conn
	ctx context.Context
}

func (s dataPlaneStream) Context() context.Context { return s.ctx }

// serveDispatch serves one stream, over either transport, with
// streamWorkers goroutines that take turns receiving (see streamWorkers);
// each answers what it received. Replies may leave in another order than
// their requests (the client matches them by id). A request that fails
// validation skips compute and is answered with its code; the stream
// stays open. When the client half-closes, requests already received are
// still answered before the stream ends. The handler itself only
// watches: it returns once every worker has exited (which Close relies
// on), or, when the node drains, once every request received before the
// drain is answered; then it ends the stream with UNAVAILABLE and the
// worker waiting to receive exits as the stream ends (the gRPC stream's
// context, the data-plane connection's close; node.pipes tracks it).
func (n *Node) serveDispatch(st dispatchStream) error {
	if !n.streamOpened() {
		return status.Errorf(codes.Unavailable, "expert node %s is draining: dispatch to another replica", n.id)
	}
	defer n.streamClosed()
	p := &pipe{n: n, st: st, ctx: st.Context(), turn: make(chan struct{}, 1), done: make(chan struct{})}
	p.mu.idle = make(chan struct{})
	p.turn <- struct{}{}
	p.live.Store(streamWorkers)
	n.pipes.Add(streamWorkers)
	for range streamWorkers {
		go p.work()
	}
	select {
	case <-p.done:
		return p.result()
	case <-n.drain:
	}
	select {
	case <-p.closeAdmission():
		return status.Errorf(codes.Unavailable, "expert node %s drained: dispatch to another replica", n.id)
	case <-p.done:
		return p.result()
	}
}

// pipe is one Dispatch stream's workers and what they share.
type pipe struct {
	n   *Node
	st  dispatchStream
	ctx context.Context
	// turn holds the one right to receive: the worker that takes it calls
	// RecvMsg and passes it on as soon as it has a request.
	turn chan struct{}
	// recvEnded and recvErr belong to whoever holds the turn: receiving
	// has ended (EOF or recvErr), so every worker exits once it has
	// answered what it holds.
	recvEnded bool
	recvErr   error
	// send serialises Send (gRPC allows one sender per stream at a time);
	// after a failed Send the stream is dead and the rest only compute
	// nothing and answer nothing.
	send struct {
		sync.Mutex
		err error
	}
	live atomic.Int32  // workers not yet exited
	done chan struct{} // closed by the last worker to exit

	// mu counts the requests admitted and not yet answered. Once closed
	// (the node drains) no more are admitted, and idle closes when the
	// last admitted one is answered.
	mu struct {
		sync.Mutex
		closed  bool
		pending int
		idle    chan struct{}
	}
}

// work is one of a stream's workers: receive in turn, then validate,
// compute and answer, until receiving ends.
func (p *pipe) work() {
	defer p.n.pipes.Done()
	defer func() {
		if p.live.Add(-1) == 0 {
			close(p.done)
		}
	}()
	j := new(job)
	bs, lazy := p.st.(bufferedStream)
	held := false // the turn, kept from the last request (see streamWorkers)
	// release passes a kept turn on, when the request must wait for the
	// compute lane: other workers receive meanwhile.
	release := func() {
		if held {
			held = false
			p.turn <- struct{}{}
		}
	}
	for {
		if !held {
			<-p.turn
		}
		if p.recvEnded {
			p.turn <- struct{}{}
			return
		}
		if err := j.receive(p.st); err != nil {
			if !errors.Is(err, io.EOF) {
				p.recvErr = err
			}
			p.recvEnded = true
			p.turn <- struct{}{}
			return
		}
		if held = lazy && bs.Buffered() == 0; !held {
			p.turn <- struct{}{}
		}
		p.serve(j, release)
		j.ids, j.weights, j.msg, j.trace = nil, nil, "", nil
	}
}

// serve validates, computes and answers the request j received; release
// is called if it has to wait for the compute lane.
func (p *pipe) serve(j *job, release func()) {
	if !p.admit() {
		// Received after the drain began: the stream ends with
		// UNAVAILABLE and the client retries it elsewhere.
		p.n.metrics.requests[codes.Unavailable].Inc()
		return
	}
	p.n.prepare(j, &j.req)
	if p.sendFailed() {
		// The stream is dead: nothing to compute or answer.
		p.answered()
		return
	}
	if j.code == codes.OK {
		_, inPlace := p.st.(frameSender)
		p.n.run(p.ctx, j, inPlace, release)
	}
	p.answer(j)
}

// bufferedReceiver is a stream that receives each request into the
// caller's buffer, its rows aliasing it (dataplane.Conn.RecvMsgInto):
// each worker keeps its own, so a request's rows are computed on where
// they arrived while the next worker receives.
type bufferedReceiver interface {
	RecvMsgInto(buf *[]byte, m any) error
}

// frameSender is a stream that sends frames its caller laid out
// (dataplane.Conn.SendFrame): a reply computed in place.
type frameSender interface {
	SendFrame(b []byte) error
}

// receive reads the stream's next request into j.req in place.
func (j *job) receive(st dispatchStream) error {
	if j.hidden != nil {
		j.req.Hidden = j.hidden
	}
	var err error
	if br, ok := st.(bufferedReceiver); ok {
		err = br.RecvMsgInto(&j.frame, &j.req)
	} else {
		err = st.RecvMsg(&j.req)
	}
	if err != nil {
		return err
	}
	if j.req.Hidden != nil {
		j.hidden = j.req.Hidden
	}
	return nil
}

func (p *pipe) sendFailed() bool {
	p.send.Lock()
	defer p.send.Unlock()
	return p.send.err != nil
}

// answer sends j's reply, unless an earlier Send failed: the frame its
// rows were computed in (replyFrame), or its rows encoded straight into
// the transport's message buffer (replyOut).
func (p *pipe) answer(j *job) {
	var frame []byte
	var r *wire.OutResponse
	if j.inFrame && j.code == codes.OK {
		frame = p.n.replyFrame(j)
	} else {
		r = p.n.replyOut(j)
	}
	j.inFrame = false
	p.send.Lock()
	if p.send.err == nil {
		if frame != nil {
			p.send.err = p.st.(frameSender).SendFrame(frame)
		} else {
			p.send.err = p.st.SendMsg(r)
		}
	}
	p.send.Unlock()
	p.answered()
}

// result is the stream's status once every worker has exited.
func (p *pipe) result() error {
	if p.recvErr != nil {
		return rpc.ToStatus(p.recvErr)
	}
	return p.send.err
}

func (p *pipe) admit() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.mu.closed {
		return false
	}
	p.mu.pending++
	return true
}

func (p *pipe) answered() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.mu.pending--
	if p.mu.closed && p.mu.pending == 0 {
		close(p.mu.idle)
	}
}

// closeAdmission stops admitting requests and returns a channel closed
// once every admitted one is answered.
func (p *pipe) closeAdmission() <-chan struct{} {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.mu.closed {
		p.mu.closed = true
		if p.mu.pending == 0 {
			close(p.mu.idle)
		}
	}
	return p.mu.idle
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
	pdt, err := wire.ActivationDType(req.PartialDtype)
	if err != nil {
		return fail(codes.InvalidArgument, "partial_dtype: %v", err)
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
	// F32 rows are computed on in place, in the request's own bytes;
	// other dtypes (or unaligned bytes) are decoded into j's buffer.
	if x, ok, err := wire.ViewF32(req.Hidden); ok {
		if err != nil {
			return fail(codes.InvalidArgument, "hidden: %v", err)
		}
		j.x = x[:rows*h]
	} else {
		j.xbuf = grow(j.xbuf, rows*h)
		if err := wire.Decode(j.xbuf, req.Hidden); err != nil {
			return fail(codes.InvalidArgument, "hidden: %v", err)
		}
		j.x = j.xbuf
	}
	j.layer, j.rows, j.k, j.partial = layer, rows, k, pdt
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

// run computes a validated job's partial sums under the compute lock:
// F32 ones straight into their reply's frame when inPlace (the stream
// sends frames: replyFrame), others into j's own buffer. busy, when not
// nil, is called before it waits for the lock, held by another request.
func (n *Node) run(ctx context.Context, j *job, inPlace bool, busy func()) {
	if err := ctx.Err(); err != nil {
		j.code, j.msg = codes.Canceled, err.Error()
		return
	}
	if len(j.trace) > 0 {
		// Parent the span on the dispatching layer, not the stream.
		ctx = propagation.TraceContext{}.Extract(ctx, propagation.MapCarrier(j.trace))
	}
	// Only a traced request gets a span: with no tracer installed the
	// stream's context carries no valid span and the sender sends no trace
	// context, and a no-op span would still cost allocations per request.
	span := trace.SpanFromContext(ctx)
	if span.SpanContext().IsValid() {
		_, span = n.tracer.Start(ctx, "expert.compute")
	}
	if span.IsRecording() {
		span.SetAttributes(
			attribute.Int("layer", j.layer),
			attribute.Int("rows", j.rows),
			attribute.Int("experts", distinctExperts(j.ids)),
			attribute.String("node", n.id))
	}
	h := n.mc.HiddenSize
	j.inFrame = false
	if inPlace && j.partial == meshpb.DType_DTYPE_F32 {
		var x []float32
		if j.sendBuf, x = dataplane.ReplyFrame(j.sendBuf, j.id, j.rows, h); x != nil {
			j.out, j.inFrame = x, true
		}
	}
	if !j.inFrame {
		j.outBuf = grow(j.outBuf, j.rows*h)
		j.out = j.outBuf
	}
	queued := time.Now()
	if !n.compute.TryLock() {
		if busy != nil {
			busy()
		}
		n.compute.Lock()
	}
	start := time.Now()
	// Run accumulates into out, so it starts from zero.
	clear(j.out[:j.rows*h])
	err := n.compute.runner.Run(j.layer, j.x, j.rows, j.k, j.ids, j.weights, j.out)
	j.compute = time.Since(start)
	n.compute.Unlock()
	n.metrics.queue.Observe(start.Sub(queued).Seconds())
	n.metrics.compute.Observe(j.compute.Seconds())
	if err != nil {
		j.code, j.msg = rpc.Code(err), err.Error()
		span.RecordError(err)
		span.SetStatus(otelcodes.Error, err.Error())
	} else {
		n.rowsServed[j.layer].Add(uint64(j.rows))
		n.metrics.rows[j.layer].Add(float64(j.rows))
		n.stats.add(j.layer, j.ids, j.compute)
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

// replyOut fills j's reusable response, without its partial rows, and
// counts it by code; the returned message has Codec encode the rows
// straight from j.out while Send marshals it (one pass over them, not
// reply's two). j's buffers may be reused once Send has returned.
func (n *Node) replyOut(j *job) *wire.OutResponse {
	r := n.replyHead(j)
	j.outMsg.Resp, j.outMsg.Dtype, j.outMsg.Rows, j.outMsg.Cols = r, j.partial, nil, n.mc.HiddenSize
	if j.code == codes.OK {
		j.outMsg.Rows = j.out[:j.rows*n.mc.HiddenSize]
	}
	return &j.outMsg
}

// replyFrame finishes the frame j's rows were computed in (run) with its
// compute time, counts the reply, and returns the frame to send.
func (n *Node) replyFrame(j *job) []byte {
	n.metrics.requests[codes.OK].Inc()
	j.sendBuf = wire.AppendComputeUs(j.sendBuf, uint64(j.compute.Microseconds()))
	return j.sendBuf
}

// replyHead fills j's response but its partial rows and counts it by code.
func (n *Node) replyHead(j *job) *meshpb.DispatchResponse {
	if int(j.code) < numCodes {
		n.metrics.requests[j.code].Inc()
	}
	r := &j.resp
	r.Id, r.Code, r.Message, r.Partial, r.ComputeUs = j.id, int32(j.code), j.msg, nil, uint64(j.compute.Microseconds())
	return r
}

// reply is replyOut's message with the partial rows encoded into a
// Tensor first: the same bytes on the wire (TestReplyOut).
func (n *Node) reply(j *job) *meshpb.DispatchResponse {
	r := n.replyHead(j)
	if j.code == codes.OK {
		h := n.mc.HiddenSize
		j.shape = [2]int64{int64(j.rows), int64(h)}
		j.data = wire.AppendRows(j.data[:0], j.partial, j.out[:j.rows*h])
		j.tensor.Dtype, j.tensor.Shape, j.tensor.Data = j.partial, j.shape[:], j.data
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
// any is applied, so a bad request changes nothing, and returns them as a
// set.
func (n *Node) checkRanges(rs []*meshpb.ExpertRange) (placement.Set, error) {
	mc := n.mc
	set := placement.NewSet(n.shape)
	for i, r := range rs {
		switch {
		case r.Layer >= uint32(mc.NumHiddenLayers):
			return nil, fmt.Errorf("experts[%d]: layer %d out of range: model has %d layers", i, r.Layer, mc.NumHiddenLayers)
		case !mc.IsMoELayer(int(r.Layer)):
			return nil, fmt.Errorf("experts[%d]: layer %d is dense", i, r.Layer)
		case r.First > r.Last:
			return nil, fmt.Errorf("experts[%d]: first %d > last %d", i, r.First, r.Last)
		case r.Last >= uint32(mc.NumExperts()):
			return nil, fmt.Errorf("experts[%d]: expert %d out of range: model has %d routed experts", i, r.Last, mc.NumExperts())
		}
		for e := r.First; e <= r.Last; e++ {
			set[r.Layer][e] = true
		}
	}
	return set, nil
}

// managedStatus is what Load and Drop answer on a managed node.
func (n *Node) managedStatus(rpcName string) error {
	return status.Errorf(codes.FailedPrecondition, "%s refused: node %s: %v; change it with `expertmesh placement` (drain, rebalance), not %s",
		rpcName, n.id, ErrManaged, rpcName)
}

// Load marks the experts held and readies their tensors, as Hold does
// (the call's context cancels it between experts). loaded counts experts
// that were not held before, so a repeated Load reports 0. Refused on a
// managed node.
func (s *service) Load(ctx context.Context, req *meshpb.LoadRequest) (*meshpb.LoadResponse, error) {
	n := s.n
	if n.cfg.Managed {
		return nil, n.managedStatus("Load")
	}
	set, err := n.checkRanges(req.Experts)
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	loaded, err := n.hold(ctx, set)
	if err != nil {
		return nil, rpc.ToStatus(err)
	}
	return &meshpb.LoadResponse{Loaded: uint32(loaded)}, nil
}

// Drop releases the experts, as Release does; dispatches validated
// afterwards that name them get FAILED_PRECONDITION. dropped counts
// experts that were held. Refused on a managed node.
func (s *service) Drop(ctx context.Context, req *meshpb.DropRequest) (*meshpb.DropResponse, error) {
	n := s.n
	if n.cfg.Managed {
		return nil, n.managedStatus("Drop")
	}
	set, err := n.checkRanges(req.Experts)
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	dropped, err := n.release(set)
	if err != nil {
		return nil, rpc.ToStatus(err)
	}
	return &meshpb.DropResponse{Dropped: uint32(dropped)}, nil
}

// Status reports the held set, rows served per MoE layer and the number of
// dispatch requests received (rejected ones included). It works on
// managed nodes too.
func (s *service) Status(ctx context.Context, _ *meshpb.StatusRequest) (*meshpb.ExpertStatus, error) {
	n := s.n
	st := &meshpb.ExpertStatus{NodeId: n.id, RowsServed: map[uint32]uint64{}, Requests: n.requests.Load()}
	for _, r := range n.Held().Ranges() {
		st.Experts = append(st.Experts, &meshpb.ExpertRange{Layer: uint32(r.Layer), First: uint32(r.First), Last: uint32(r.Last)})
	}
	for l := range n.rowsServed {
		if n.mc.IsMoELayer(l) {
			st.RowsServed[uint32(l)] = n.rowsServed[l].Load()
		}
	}
	return st, nil
}
