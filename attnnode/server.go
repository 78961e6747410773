package attnnode

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"

	"google.golang.org/grpc"

	"github.com/expertmesh/expertmesh/internal/rpc"
	meshpb "github.com/expertmesh/expertmesh/proto"
)

// Server is a running attention node: a Node behind the AttentionService
// gRPC face.
type Server struct {
	*Node
	lis   net.Listener
	srv   *rpc.Server
	ready chan struct{}
	errc  chan error
	once  sync.Once
}

// Start loads the model, listens on cfg.ListenAddr and serves. On error
// everything begun is undone.
//
// Close stops accepting, closes open Step streams, then releases the
// node (expert connections, kernel pool, weights), in that order.
func Start(ctx context.Context, cfg Config) (*Server, error) {
	node, err := New(cfg)
	if err != nil {
		return nil, err
	}
	lis, err := net.Listen("tcp", cfg.ListenAddr)
	if err != nil {
		node.Close()
		return nil, fmt.Errorf("--listen %s: %w", cfg.ListenAddr, err)
	}
	s := &Server{Node: node, lis: lis, srv: rpc.NewServer(rpc.ServerOptions{}), ready: make(chan struct{}), errc: make(chan error, 1)}
	meshpb.RegisterAttentionServiceServer(s.srv.Server, &service{node: node})
	s.srv.SetServing(true, meshpb.AttentionService_ServiceDesc.ServiceName)
	go func() {
		close(s.ready)
		if err := s.srv.Serve(lis); err != nil && !errors.Is(err, grpc.ErrServerStopped) {
			s.errc <- err
		}
		close(s.errc)
	}()
	return s, nil
}

// Ready is closed once the node serves.
func (s *Server) Ready() <-chan struct{} { return s.ready }

// Err yields a serving error, and is closed when serving ends.
func (s *Server) Err() <-chan error { return s.errc }

// Addr is the address the node listens on.
func (s *Server) Addr() string { return s.lis.Addr().String() }

// Close stops serving and releases the node.
func (s *Server) Close() error {
	var err error
	s.once.Do(func() {
		s.srv.Stop()
		err = s.Node.Close()
	})
	return err
}

type service struct {
	meshpb.UnimplementedAttentionServiceServer
	node *Node
}

// Step serves one coordinator's step stream, a step at a time in order.
func (s *service) Step(stream meshpb.AttentionService_StepServer) error {
	for {
		req, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		resp, err := s.node.Step(stream.Context(), req)
		if err != nil {
			return rpc.ToStatus(err)
		}
		if err := stream.Send(resp); err != nil {
			return err
		}
	}
}

func (s *service) Info(ctx context.Context, req *meshpb.InfoRequest) (*meshpb.NodeInfo, error) {
	return s.node.Info(ctx, req.GetEpoch())
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

// Info asks the node for its capacity.
func (c *Client) Info(ctx context.Context, epoch uint64) (*meshpb.NodeInfo, error) {
	return c.api.Info(ctx, &meshpb.InfoRequest{Epoch: epoch})
}

// Step sends one step and waits for its response. A broken stream is
// reopened on the next call; the failed step's error is returned.
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
	type result struct {
		resp *meshpb.StepResponse
		err  error
	}
	done := make(chan result, 1)
	go func() {
		if err := c.stream.Send(req); err != nil {
			_, err = c.stream.Recv() // the real status is on Recv
			done <- result{nil, err}
			return
		}
		resp, err := c.stream.Recv()
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
