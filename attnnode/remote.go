package attnnode

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"

	"go.opentelemetry.io/otel/attribute"
	otelcodes "go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/expertmesh/expertmesh/internal/rpc"
	"github.com/expertmesh/expertmesh/internal/wire"
	"github.com/expertmesh/expertmesh/kernels"
	"github.com/expertmesh/expertmesh/placement"
	meshpb "github.com/expertmesh/expertmesh/proto"
)

// ErrExpertUnavailable means no replica of some expert answered.
var ErrExpertUnavailable = errors.New("expert unavailable")

// DialFunc opens a client connection to an expert node.
type DialFunc func(addr string) (*grpc.ClientConn, error)

// RemoteExperts is the model.ExpertBackend of an attention node: it groups
// each MoE layer's rows by expert node (one message per node, each row
// once, with that node's expert ids and gate weights), sends them over one
// long-lived Dispatch stream per node, and sums the pre-summed partial rows
// that come back. Safe for concurrent use by several micro-batches.
type RemoteExperts struct {
	place  placement.View
	hidden int
	dial   DialFunc
	nextID atomic.Uint64

	mu struct {
		sync.Mutex
		conns  map[string]*expertConn
		closed bool
	}
}

// NewRemoteExperts dispatches to the nodes named by place.
func NewRemoteExperts(place placement.View, hidden int) *RemoteExperts {
	r := &RemoteExperts{place: place, hidden: hidden, dial: defaultDial}
	r.mu.conns = map[string]*expertConn{}
	return r
}

// defaultDial is the shared client: otelgrpc stats, message limits and
// keepalive agreed with every expertmesh server.
func defaultDial(addr string) (*grpc.ClientConn, error) { return rpc.Dial(addr) }

// SetDial replaces how connections are opened (interceptors, TLS). Call
// before the first dispatch.
func (r *RemoteExperts) SetDial(d DialFunc) { r.dial = d }

// Close tears down every stream and connection.
func (r *RemoteExperts) Close() {
	r.mu.Lock()
	conns := r.mu.conns
	r.mu.conns = map[string]*expertConn{}
	r.mu.closed = true
	r.mu.Unlock()
	for _, c := range conns {
		c.close(errors.New("attention node closing"))
		<-c.done
	}
}

// nodeBatch is the part of one dispatch bound for one expert node.
type nodeBatch struct {
	addr string
	rows []int32   // indices into the caller's rows
	ids  []int32   // len(rows)*k, -1 for slots served elsewhere
	w    []float32 // len(rows)*k
}

// StartRoutedExperts implements model.ExpertBackend.
func (r *RemoteExperts) StartRoutedExperts(ctx context.Context, layer int, x []float32, n, k int, ids []int32, weights []float32, out []float32) func() error {
	batches, err := r.plan(layer, n, k, ids, weights, nil)
	if err != nil {
		return func() error { return err }
	}
	calls := make([]*call, len(batches))
	for i, b := range batches {
		calls[i] = r.send(ctx, layer, x, k, b)
	}
	return func() error {
		var failed []string
		var firstErr error
		for i, c := range calls {
			if err := c.collect(ctx, x, out, r.hidden); err != nil {
				if ctx.Err() != nil {
					return ctx.Err()
				}
				if !retryable(err) {
					return err
				}
				failed = append(failed, batches[i].addr)
				firstErr = err
			}
		}
		if len(failed) == 0 {
			return nil
		}
		return r.retry(ctx, layer, x, n, k, ids, weights, out, batches, failed, firstErr)
	}
}

// retry re-dispatches the slots of failed nodes to other replicas. Expert
// calls are stateless, so a partial sum that never arrived is simply
// recomputed elsewhere.
func (r *RemoteExperts) retry(ctx context.Context, layer int, x []float32, n, k int, ids []int32, weights []float32, out []float32, prev []*nodeBatch, failed []string, cause error) error {
	for attempt := 0; attempt < 3; attempt++ {
		bad := map[string]bool{}
		for _, a := range failed {
			bad[a] = true
		}
		// Only the slots that went to a failed node are redone.
		redo := make([]int32, len(ids))
		for i := range redo {
			redo[i] = -1
		}
		for _, b := range prev {
			if !bad[b.addr] {
				continue
			}
			for j, row := range b.rows {
				for s := range k {
					if id := b.ids[j*k+s]; id >= 0 {
						redo[int(row)*k+s] = id
					}
				}
			}
		}
		batches, err := r.plan(layer, n, k, redo, weights, bad)
		if err != nil {
			return fmt.Errorf("%w (after %v)", err, cause)
		}
		calls := make([]*call, len(batches))
		for i, b := range batches {
			calls[i] = r.send(ctx, layer, x, k, b)
		}
		failed = failed[:0]
		for i, c := range calls {
			if err := c.collect(ctx, x, out, r.hidden); err != nil {
				if !retryable(err) || ctx.Err() != nil {
					return err
				}
				failed = append(failed, batches[i].addr)
				cause = err
			}
		}
		if len(failed) == 0 {
			return nil
		}
		for a := range bad {
			failed = append(failed, a)
		}
		prev = batches
	}
	return fmt.Errorf("%w: layer %d: %v", ErrExpertUnavailable, layer, cause)
}

func retryable(err error) bool {
	switch status.Code(err) {
	case codes.Unavailable, codes.Canceled, codes.Aborted, codes.Internal, codes.Unknown:
		return !errors.Is(err, context.Canceled)
	}
	return errors.Is(err, errStreamBroken)
}

// plan groups slots by expert node, skipping nodes in avoid.
func (r *RemoteExperts) plan(layer, n, k int, ids []int32, weights []float32, avoid map[string]bool) ([]*nodeBatch, error) {
	rt, _ := r.place.Routing()
	t := rt.Table
	byAddr := map[string]*nodeBatch{}
	var order []*nodeBatch
	for i := range n {
		for s := range k {
			id := ids[i*k+s]
			if id < 0 {
				continue
			}
			addr := ""
			for _, ri := range t.Replicas(layer, int(id)) {
				if a := rt.Addrs[ri]; a != "" && !avoid[a] {
					addr = a
					break
				}
			}
			if addr == "" {
				return nil, fmt.Errorf("%w: layer %d expert %d has no live replica", ErrExpertUnavailable, layer, id)
			}
			b := byAddr[addr]
			if b == nil {
				b = &nodeBatch{addr: addr}
				byAddr[addr] = b
				order = append(order, b)
			}
			if len(b.rows) == 0 || b.rows[len(b.rows)-1] != int32(i) {
				b.rows = append(b.rows, int32(i))
				for range k {
					b.ids = append(b.ids, -1)
					b.w = append(b.w, 0)
				}
			}
			j := (len(b.rows)-1)*k + s
			b.ids[j], b.w[j] = id, weights[i*k+s]
		}
	}
	return order, nil
}

// call is one in-flight DispatchRequest.
type call struct {
	b    *nodeBatch
	ch   chan *meshpb.DispatchResponse
	conn *expertConn
	err  error
	span trace.Span
}

func (r *RemoteExperts) send(ctx context.Context, layer int, x []float32, k int, b *nodeBatch) *call {
	// One span per (layer, expert node) round trip; the node's
	// expert.compute span becomes its child through trace_context.
	ctx, span := tracer.Start(ctx, "attn.dispatch", trace.WithAttributes(
		attribute.Int("layer", layer), attribute.String("expert_node", b.addr), attribute.Int("rows", len(b.rows))))
	c := &call{b: b, span: span}
	conn, err := r.conn(b.addr)
	if err != nil {
		c.err = err
		return c
	}
	h := r.hidden
	data := make([]byte, 0, 4*h*len(b.rows))
	for _, row := range b.rows {
		data = wire.AppendF32(data, x[int(row)*h:int(row+1)*h])
	}
	req := &meshpb.DispatchRequest{
		Id: r.nextID.Add(1), Layer: uint32(layer), K: uint32(k), ExpertIds: b.ids, GateWeights: b.w,
		Hidden: &meshpb.Tensor{Dtype: meshpb.DType_DTYPE_F32, Shape: []int64{int64(len(b.rows)), int64(h)}, Data: data},
	}
	if sc := trace.SpanContextFromContext(ctx); sc.IsValid() {
		req.TraceContext = map[string]string{}
		propagation.TraceContext{}.Inject(ctx, propagation.MapCarrier(req.TraceContext))
	}
	c.conn = conn
	c.ch, c.err = conn.send(req)
	return c
}

// collect waits for the reply and adds its partial rows into out.
func (c *call) collect(ctx context.Context, x, out []float32, h int) error {
	err := c.wait(ctx, out, h)
	if err != nil {
		c.span.RecordError(err)
		c.span.SetStatus(otelcodes.Error, err.Error())
	}
	c.span.End()
	return err
}

func (c *call) wait(ctx context.Context, out []float32, h int) error {
	if c.err != nil {
		return c.err
	}
	var resp *meshpb.DispatchResponse
	select {
	case resp = <-c.ch:
	case <-ctx.Done():
		return ctx.Err()
	}
	if resp == nil {
		return fmt.Errorf("%s: %w: %v", c.b.addr, errStreamBroken, c.conn.failure())
	}
	if resp.Code != 0 {
		return status.Errorf(codes.Code(resp.Code), "expert node %s: %s", c.b.addr, resp.Message)
	}
	rows, err := wire.CheckMatrix(resp.Partial, h, len(c.b.rows))
	if err != nil || rows != len(c.b.rows) {
		return status.Errorf(codes.Internal, "expert node %s: bad partial: %v (rows %d, want %d)", c.b.addr, err, rows, len(c.b.rows))
	}
	part := make([]float32, rows*h)
	if err := wire.DecodeF32(part, resp.Partial.Data); err != nil {
		return status.Errorf(codes.Internal, "expert node %s: %v", c.b.addr, err)
	}
	for j, row := range c.b.rows {
		dst := out[int(row)*h : int(row+1)*h]
		kernels.Add(dst, dst, part[j*h:(j+1)*h])
	}
	return nil
}

var errStreamBroken = errors.New("dispatch stream broken")

// expertConn is one expert node's connection and Dispatch stream, with a
// receiver goroutine routing replies to callers by id.
type expertConn struct {
	addr   string
	cc     *grpc.ClientConn
	cancel context.CancelFunc
	stream meshpb.ExpertService_DispatchClient
	sendMu sync.Mutex
	done   chan struct{}

	mu struct {
		sync.Mutex
		pending map[uint64]chan *meshpb.DispatchResponse
		err     error
	}
}

func (r *RemoteExperts) conn(addr string) (*expertConn, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.mu.closed {
		return nil, status.Error(codes.Canceled, "remote experts closed")
	}
	if c := r.mu.conns[addr]; c != nil && c.failure() == nil {
		return c, nil
	}
	cc, err := r.dial(addr)
	if err != nil {
		return nil, status.Errorf(codes.Unavailable, "dial expert node %s: %v", addr, err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	stream, err := meshpb.NewExpertServiceClient(cc).Dispatch(ctx)
	if err != nil {
		cancel()
		cc.Close()
		return nil, status.Errorf(codes.Unavailable, "open dispatch stream to %s: %v", addr, err)
	}
	c := &expertConn{addr: addr, cc: cc, cancel: cancel, stream: stream, done: make(chan struct{})}
	c.mu.pending = map[uint64]chan *meshpb.DispatchResponse{}
	r.mu.conns[addr] = c
	go c.receive()
	return c, nil
}

func (c *expertConn) send(req *meshpb.DispatchRequest) (chan *meshpb.DispatchResponse, error) {
	ch := make(chan *meshpb.DispatchResponse, 1)
	c.mu.Lock()
	if c.mu.err != nil {
		err := c.mu.err
		c.mu.Unlock()
		return nil, fmt.Errorf("%s: %w: %v", c.addr, errStreamBroken, err)
	}
	c.mu.pending[req.Id] = ch
	c.mu.Unlock()
	c.sendMu.Lock()
	err := c.stream.Send(req)
	c.sendMu.Unlock()
	if err != nil {
		c.close(err)
		return nil, fmt.Errorf("%s: %w: %v", c.addr, errStreamBroken, err)
	}
	return ch, nil
}

func (c *expertConn) receive() {
	defer close(c.done)
	for {
		resp, err := c.stream.Recv()
		if err != nil {
			c.close(err)
			return
		}
		c.mu.Lock()
		ch := c.mu.pending[resp.Id]
		delete(c.mu.pending, resp.Id)
		c.mu.Unlock()
		if ch != nil {
			ch <- resp
		}
	}
}

func (c *expertConn) failure() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.mu.err
}

// close fails every pending call (their channels get nil) and tears down
// the stream; later dispatches redial.
func (c *expertConn) close(err error) {
	c.mu.Lock()
	if c.mu.err != nil {
		c.mu.Unlock()
		return
	}
	c.mu.err = err
	pending := c.mu.pending
	c.mu.pending = nil
	c.mu.Unlock()
	for _, ch := range pending {
		close(ch)
	}
	c.cancel()
	c.cc.Close()
}
