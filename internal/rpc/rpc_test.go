package rpc

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	"github.com/expertmesh/expertmesh/internal/wire"
	"github.com/expertmesh/expertmesh/model"
	meshpb "github.com/expertmesh/expertmesh/proto"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// panicky panics in Status (unary) and on a Dispatch whose id is 13
// (stream), and answers otherwise, so a test can check the server keeps
// serving after a panic.
type panicky struct {
	meshpb.UnimplementedExpertServiceServer
}

func (panicky) Status(_ context.Context, req *meshpb.StatusRequest) (*meshpb.ExpertStatus, error) {
	panic("boom in Status")
}

func (panicky) Load(_ context.Context, req *meshpb.LoadRequest) (*meshpb.LoadResponse, error) {
	return &meshpb.LoadResponse{Loaded: uint32(len(req.Experts))}, nil
}

func (panicky) Dispatch(s grpc.BidiStreamingServer[meshpb.DispatchRequest, meshpb.DispatchResponse]) error {
	for {
		req, err := s.Recv()
		if err != nil {
			return nil
		}
		if req.Id == 13 {
			panic("boom in Dispatch")
		}
		// Echo the tensor back so tests can exercise large replies.
		if err := s.Send(&meshpb.DispatchResponse{Id: req.Id, Partial: req.Hidden}); err != nil {
			return err
		}
	}
}

// syncBuf is a bytes.Buffer safe for the server's goroutines to log into.
type syncBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuf) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuf) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// serve starts srv on a loopback port and returns a connected client; both
// are stopped at cleanup.
func serve(t *testing.T, srv *Server) *grpc.ClientConn {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- srv.Serve(lis) }()
	cc, err := Dial(lis.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cc.Close()
		srv.Stop()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	return cc
}

func TestRecovery(t *testing.T) {
	var logs syncBuf
	srv := NewServer(ServerOptions{Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	meshpb.RegisterExpertServiceServer(srv, panicky{})
	cc := serve(t, srv)
	c := meshpb.NewExpertServiceClient(cc)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	// Unary: the panic becomes Internal and the next call still works.
	for range 2 {
		_, err := c.Status(ctx, &meshpb.StatusRequest{})
		if got := status.Code(err); got != codes.Internal {
			t.Fatalf("Status after panic: code %v (%v), want Internal", got, err)
		}
		if strings.Contains(status.Convert(err).Message(), "boom") {
			t.Errorf("panic value leaked to the client: %v", err)
		}
		if _, err := c.Load(ctx, &meshpb.LoadRequest{Experts: []*meshpb.ExpertRange{{}}}); err != nil {
			t.Fatalf("Load after a panic: %v", err)
		}
	}

	// Stream: a panic ends that stream with Internal; a new stream works.
	st, err := c.Dispatch(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Send(&meshpb.DispatchRequest{Id: 1}); err != nil {
		t.Fatal(err)
	}
	if r, err := st.Recv(); err != nil || r.Id != 1 {
		t.Fatalf("first reply: %v, %v", r, err)
	}
	if err := st.Send(&meshpb.DispatchRequest{Id: 13}); err != nil {
		t.Fatal(err)
	}
	if _, err := st.Recv(); status.Code(err) != codes.Internal {
		t.Fatalf("stream after panic: %v, want Internal", err)
	}
	st2, err := c.Dispatch(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := st2.Send(&meshpb.DispatchRequest{Id: 2}); err != nil {
		t.Fatal(err)
	}
	if r, err := st2.Recv(); err != nil || r.Id != 2 {
		t.Fatalf("new stream after panic: %v, %v", r, err)
	}
	st2.CloseSend()

	out := logs.String()
	for _, want := range []string{"boom in Status", "boom in Dispatch", "ExpertService/Status", "stack="} {
		if !strings.Contains(out, want) {
			t.Errorf("log lacks %q:\n%s", want, out)
		}
	}
}

func TestHealth(t *testing.T) {
	srv := NewServer(ServerOptions{Logger: slog.New(slog.DiscardHandler)})
	cc := serve(t, srv)
	h := healthpb.NewHealthClient(cc)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	check := func(service string) healthpb.HealthCheckResponse_ServingStatus {
		t.Helper()
		r, err := h.Check(ctx, &healthpb.HealthCheckRequest{Service: service})
		if err != nil {
			t.Fatalf("Check(%q): %v", service, err)
		}
		return r.Status
	}
	if got := check(""); got != healthpb.HealthCheckResponse_NOT_SERVING {
		t.Errorf("new server: %v, want NOT_SERVING", got)
	}
	srv.SetServing(true, meshpb.ExpertService_ServiceDesc.ServiceName)
	if got := check(""); got != healthpb.HealthCheckResponse_SERVING {
		t.Errorf("after SetServing(true): %v", got)
	}
	if got := check(meshpb.ExpertService_ServiceDesc.ServiceName); got != healthpb.HealthCheckResponse_SERVING {
		t.Errorf("named service after SetServing(true): %v", got)
	}
	if _, err := h.Check(ctx, &healthpb.HealthCheckRequest{Service: "nope"}); status.Code(err) != codes.NotFound {
		t.Errorf("unknown service: %v, want NotFound", err)
	}
	srv.SetServing(false)
	if got := check(""); got != healthpb.HealthCheckResponse_NOT_SERVING {
		t.Errorf("after SetServing(false): %v", got)
	}
}

func TestMessageLimit(t *testing.T) {
	srv := NewServer(ServerOptions{MaxMsgSize: 1024, Logger: slog.New(slog.DiscardHandler)})
	meshpb.RegisterExpertServiceServer(srv, panicky{})
	c := meshpb.NewExpertServiceClient(serve(t, srv))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	big := make([]*meshpb.ExpertRange, 400) // ~2 bytes each empty + tags: over 1 KiB with values
	for i := range big {
		big[i] = &meshpb.ExpertRange{Layer: 1000, First: 1000, Last: 1000}
	}
	if _, err := c.Load(ctx, &meshpb.LoadRequest{Experts: big}); status.Code(err) != codes.ResourceExhausted {
		t.Errorf("oversized request: %v, want ResourceExhausted", err)
	}
	if _, err := c.Load(ctx, &meshpb.LoadRequest{Experts: big[:10]}); err != nil {
		t.Errorf("small request: %v", err)
	}
}

func TestCode(t *testing.T) {
	already := status.Error(codes.Unavailable, "peer gone")
	tests := []struct {
		name string
		err  error
		want codes.Code
	}{
		{"nil", nil, codes.OK},
		{"bad input", fmt.Errorf("row 3: %w", model.ErrBadInput), codes.InvalidArgument},
		{"invalid tensor", fmt.Errorf("hidden: %w: dtype", wire.ErrInvalidTensor), codes.InvalidArgument},
		{"expert not loaded", fmt.Errorf("%w: layer 1 expert 7", model.ErrExpertNotLoaded), codes.FailedPrecondition},
		{"cache full", fmt.Errorf("seq 9: %w", model.ErrCacheFull), codes.ResourceExhausted},
		{"canceled", context.Canceled, codes.Canceled},
		{"wrapped canceled", fmt.Errorf("dispatch: %w", context.Canceled), codes.Canceled},
		{"deadline", fmt.Errorf("x: %w", context.DeadlineExceeded), codes.DeadlineExceeded},
		{"status passes", already, codes.Unavailable},
		{"wrapped status passes", fmt.Errorf("layer 2: %w", already), codes.Unavailable},
		{"unknown", errors.New("disk on fire"), codes.Internal},
		{"config is internal", model.ErrConfig, codes.Internal},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := Code(tt.err); got != tt.want {
				t.Errorf("Code = %v, want %v", got, tt.want)
			}
			st := ToStatus(tt.err)
			if tt.err == nil {
				if st != nil {
					t.Errorf("ToStatus(nil) = %v", st)
				}
				return
			}
			s, ok := status.FromError(st)
			if !ok || s.Code() != tt.want {
				t.Errorf("ToStatus = %v (ok %v), want code %v", st, ok, tt.want)
			}
			if !strings.Contains(s.Message(), strings.TrimPrefix(tt.err.Error(), "rpc error: code = Unavailable desc = ")) {
				t.Errorf("ToStatus message %q lost %q", s.Message(), tt.err.Error())
			}
		})
	}
}

func TestDialEmpty(t *testing.T) {
	if _, err := Dial(""); err == nil {
		t.Error("Dial(\"\") succeeded")
	}
}

func TestDialTargets(t *testing.T) {
	srv := NewServer(ServerOptions{Logger: slog.New(slog.DiscardHandler)})
	srv.SetServing(true)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- srv.Serve(lis) }()
	defer func() {
		srv.Stop()
		<-done
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, port, _ := net.SplitHostPort(lis.Addr().String())
	for _, target := range []string{lis.Addr().String(), "localhost:" + port, "dns:///127.0.0.1:" + port} {
		cc, err := Dial(target)
		if err != nil {
			t.Fatalf("Dial(%q): %v", target, err)
		}
		r, err := healthpb.NewHealthClient(cc).Check(ctx, &healthpb.HealthCheckRequest{})
		cc.Close()
		if err != nil || r.Status != healthpb.HealthCheckResponse_SERVING {
			t.Errorf("Dial(%q): health %v, %v", target, r, err)
		}
	}
}

// TestDefaultLimitsAboveGRPCDefault sends and receives a 10 MB message (a
// 512-row prefill at hidden 5120) through NewServer and Dial with their
// default limits; gRPC's own default would refuse anything over 4 MiB.
func TestDefaultLimitsAboveGRPCDefault(t *testing.T) {
	srv := NewServer(ServerOptions{Logger: slog.New(slog.DiscardHandler)})
	meshpb.RegisterExpertServiceServer(srv, panicky{})
	c := meshpb.NewExpertServiceClient(serve(t, srv))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	st, err := c.Dispatch(ctx)
	if err != nil {
		t.Fatal(err)
	}
	data := make([]byte, 512*5120*4)
	data[len(data)-1] = 7
	if err := st.Send(&meshpb.DispatchRequest{Id: 5, Hidden: &meshpb.Tensor{Data: data}}); err != nil {
		t.Fatal(err)
	}
	r, err := st.Recv()
	if err != nil {
		t.Fatalf("10 MB round trip: %v", err)
	}
	if len(r.Partial.GetData()) != len(data) || r.Partial.Data[len(data)-1] != 7 {
		t.Errorf("echoed %d bytes, want %d", len(r.Partial.GetData()), len(data))
	}
	st.CloseSend()
}
