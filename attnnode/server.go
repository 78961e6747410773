package attnnode

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"

	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/grpc"

	"github.com/expertmesh/expertmesh/internal/rpc"
	meshpb "github.com/expertmesh/expertmesh/proto"
)

// Start loads the model and builds the node. With cfg.ListenAddr set it
// also listens there and serves AttentionService; with it empty the node
// runs in-process only (serve drives it directly). ctx bounds the start
// only; the node runs until Close. A failed start releases everything it
// had acquired.
func Start(ctx context.Context, cfg Config) (_ *Node, err error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	n, err := load(ctx, cfg)
	if err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			n.releaseAll()
		}
	}()
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	n.stop, n.cancel = context.WithCancel(context.Background())
	n.ready, n.errc, n.serveDone = make(chan struct{}), make(chan error, 1), make(chan struct{})
	if cfg.ListenAddr == "" {
		close(n.serveDone)
		close(n.ready)
		return n, nil
	}
	var lc net.ListenConfig
	if n.lis, err = lc.Listen(ctx, "tcp", cfg.ListenAddr); err != nil {
		return nil, fmt.Errorf("--listen %s: %w", cfg.ListenAddr, err)
	}
	// WaitForHandlers makes Stop wait for every Step handler to return,
	// so Close releases the weights only once no step can touch them.
	n.srv = rpc.NewServer(rpc.ServerOptions{Extra: []grpc.ServerOption{grpc.WaitForHandlers(true)}})
	meshpb.RegisterAttentionServiceServer(n.srv.Server, &service{node: n})
	n.srv.SetServing(true, meshpb.AttentionService_ServiceDesc.ServiceName)
	go func() {
		defer close(n.serveDone)
		if err := n.srv.Serve(n.lis); err != nil && !errors.Is(err, grpc.ErrServerStopped) {
			n.errc <- fmt.Errorf("attention node %s: serve: %w", cfg.NodeID, err)
			n.closeErrc()
		}
	}()
	close(n.ready)
	return n, nil
}

// releaseAll frees the compute side: expert connections, pool, weights.
func (n *Node) releaseAll() error {
	if n.remote != nil {
		n.remote.Close()
	}
	n.pool.Close()
	return n.w.Close()
}

// Ready is closed once the node serves (in-process: once Start returned).
func (n *Node) Ready() <-chan struct{} { return n.ready }

// Err delivers at most one fatal serving error (the listener failed) and
// is closed once the node has stopped: right after that error, or when
// Close has finished. The owner still calls Close after a fatal error.
func (n *Node) Err() <-chan error { return n.errc }

func (n *Node) closeErrc() { n.errOnce.Do(func() { close(n.errc) }) }

// Addr is the address the node serves on; "" in-process.
func (n *Node) Addr() string {
	if n.lis == nil {
		return ""
	}
	return n.lis.Addr().String()
}

// Close stops the node and releases everything, in this order:
//  1. the running step is cancelled (rolled back: nothing of it applied
//     but its releases) and later steps are refused with ErrClosed;
//  2. health turns NOT_SERVING, the listener closes (no new connections
//     or streams) and every Step stream ends; Close waits for their
//     handlers to return;
//  3. expert connections close;
//  4. the kernel pool stops;
//  5. the weights are unmapped.
//
// Close is idempotent; later calls return the first one's result. Err is
// closed when it returns.
func (n *Node) Close() error {
	n.closeOnce.Do(func() {
		n.cancel()
		if n.srv != nil {
			n.srv.Stop()
		}
		<-n.serveDone
		n.stepMu.Lock()
		n.closed = true
		n.closeErr = n.releaseAll()
		n.stepMu.Unlock()
		n.closeErrc()
	})
	return n.closeErr
}

type service struct {
	meshpb.UnimplementedAttentionServiceServer
	node *Node
}

// Step serves one coordinator's step stream, a step at a time in order.
// A step that fails as a whole is answered with its code on the open
// stream; only a broken node (closed, panicked) ends the stream.
func (s *service) Step(stream meshpb.AttentionService_StepServer) error {
	for {
		req, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		ctx := stream.Context()
		if len(req.TraceContext) > 0 {
			// The coordinator's step span parents this step (not the stream).
			ctx = propagation.TraceContext{}.Extract(ctx, propagation.MapCarrier(req.TraceContext))
		}
		resp, err := s.node.Step(ctx, req)
		if err != nil {
			return rpc.ToStatus(err)
		}
		if err := stream.Send(resp); err != nil {
			return err
		}
	}
}

func (s *service) Info(ctx context.Context, req *meshpb.InfoRequest) (*meshpb.NodeInfo, error) {
	return s.node.Info(ctx, req.Epoch)
}

// Client is a coordinator's handle on a remote attention node. Step calls
// are serialised over one long-lived stream.
type Client struct {
	cc     *grpc.ClientConn
	api    meshpb.AttentionServiceClient
	mu     sync.Mutex
	stream meshpb.AttentionService_StepClient
	cancel context.CancelFunc
}

// Dial connects to an attention node. The connection is lazy; the first
// Info or Step reaches the node.
func Dial(ctx context.Context, addr string) (*Client, error) {
	cc, err := rpc.Dial(addr)
	if err != nil {
		return nil, err
	}
	return &Client{cc: cc, api: meshpb.NewAttentionServiceClient(cc)}, nil
}

// Info asks the node for its capacity, fencing older epochs than epoch
// (0: none); a node that has seen a newer epoch answers
// FAILED_PRECONDITION.
func (c *Client) Info(ctx context.Context, epoch uint64) (*meshpb.NodeInfo, error) {
	return c.api.Info(ctx, &meshpb.InfoRequest{Epoch: epoch})
}

// Step sends one step and waits for its response. A whole-step failure
// comes back as the response's code, the stream staying open; an error
// means the stream broke (it is reopened on the next call) or ctx ended.
func (c *Client) Step(ctx context.Context, req *meshpb.StepRequest) (*meshpb.StepResponse, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.stream == nil {
		sctx, cancel := context.WithCancel(context.Background())
		st, err := c.api.Step(sctx)
		if err != nil {
			cancel()
			return nil, err
		}
		c.stream, c.cancel = st, cancel
	}
	if trace.SpanContextFromContext(ctx).IsValid() {
		req.TraceContext = map[string]string{}
		propagation.TraceContext{}.Inject(ctx, propagation.MapCarrier(req.TraceContext))
	}
	type result struct {
		resp *meshpb.StepResponse
		err  error
	}
	done := make(chan result, 1)
	// The goroutine works on this step's stream: on ctx.Done reset clears
	// c.stream while it may not have started yet.
	st := c.stream
	go func() {
		if err := st.Send(req); err != nil {
			_, err = st.Recv() // the real status is on Recv
			done <- result{nil, err}
			return
		}
		resp, err := st.Recv()
		done <- result{resp, err}
	}()
	select {
	case r := <-done:
		if r.err != nil {
			c.reset()
		}
		return r.resp, r.err
	case <-ctx.Done():
		// The stream is mid-step: abandon it so the next step starts clean.
		c.reset()
		<-done
		return nil, ctx.Err()
	}
}

func (c *Client) reset() {
	if c.cancel != nil {
		c.cancel()
	}
	c.stream, c.cancel = nil, nil
}

// Close closes the stream and connection.
func (c *Client) Close() error {
	c.mu.Lock()
	c.reset()
	c.mu.Unlock()
	return c.cc.Close()
}
