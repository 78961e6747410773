// Package rpc is the gRPC plumbing every expertmesh role shares: the one
// function that builds servers, the client dial options, and the one table
// that turns package errors into gRPC status codes at the boundary.
//
// Keeping these in one place means every server has the same limits,
// interceptors and health service, and every client can talk to every
// server (message limits agree on both ends).
package rpc

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"runtime/debug"
	"strings"
	"time"

	"go.opentelemetry.io/contrib/instrumentation/google.golang.org/grpc/otelgrpc"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/experimental"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/status"

	"github.com/expertmesh/expertmesh/internal/wire"
	"github.com/expertmesh/expertmesh/model"
)

// DefaultMaxMsgSize bounds one message in either direction. A prefill of
// 512 rows × 5120 floats is 10 MB; 256 MiB leaves room for the largest
// batches while still refusing a runaway sender before it exhausts memory.
const DefaultMaxMsgSize = 256 << 20

// windowSize is every connection's and stream's HTTP/2 flow-control
// window. A static window turns off gRPC's bandwidth-delay estimator,
// which otherwise answers received data with PING frames (a frame each
// way and allocations on both ends, per message of the Dispatch stream)
// to grow the window from 64 KiB; 16 MiB covers a 512-row prefill
// dispatch of V2-Lite in flight at once and, at 1 ms of round trip,
// 16 GB/s, while a stalled receiver can hold no more than that.
const windowSize = 16 << 20

// DefaultMaxConcurrentStreams bounds streams per connection. Each
// attention node keeps one long-lived Dispatch stream per expert node, so
// the limit only has to cover unary calls in flight alongside them.
const DefaultMaxConcurrentStreams = 1024

// Keepalive timings shared by servers and clients. The client pings an
// idle connection every keepaliveTime so a dead peer is noticed within
// seconds rather than at the next TCP retransmit timeout; the server's
// enforcement policy must allow at least that rate, or it would close the
// connection with ENHANCE_YOUR_CALM.
const (
	keepaliveTime    = 10 * time.Second
	keepaliveTimeout = 5 * time.Second
	keepaliveMinTime = 5 * time.Second
)

// ServerOptions tune NewServer. The zero value is usable.
type ServerOptions struct {
	// MaxMsgSize bounds received and sent messages (0: DefaultMaxMsgSize).
	MaxMsgSize int
	// MaxConcurrentStreams per connection (0: DefaultMaxConcurrentStreams).
	MaxConcurrentStreams uint32
	// Logger receives recovered panics (nil: slog.Default()).
	Logger *slog.Logger
	// TracerProvider for server spans (nil: the global provider, a no-op
	// until the process installs one).
	TracerProvider trace.TracerProvider
	// Extra options appended after the defaults (tests, TLS).
	Extra []grpc.ServerOption
}

// propagator carries W3C trace context and baggage in gRPC metadata. It is
// set explicitly because the global default propagates nothing, which
// would silently cut every trace at the first hop. With no tracer
// installed the span context is invalid and nothing is written.
var propagator = propagation.NewCompositeTextMapPropagator(propagation.TraceContext{}, propagation.Baggage{})

// Server is a gRPC server with the health service registered.
type Server struct {
	*grpc.Server
	// Health is the standard health service; roles set SERVING once they
	// can answer requests and NOT_SERVING while starting or stopping.
	Health *health.Server
}

// SetServing sets the overall ("") status and the named services' status.
func (s *Server) SetServing(serving bool, services ...string) {
	st := healthpb.HealthCheckResponse_NOT_SERVING
	if serving {
		st = healthpb.HealthCheckResponse_SERVING
	}
	s.Health.SetServingStatus("", st)
	for _, name := range services {
		s.Health.SetServingStatus(name, st)
	}
}

// NewServer builds a gRPC server with OpenTelemetry stats (a no-op until a
// global provider is installed), panic recovery on unary and stream
// handlers, explicit message and stream limits, keepalive enforcement,
// wire.Codec (in-place decoding of Dispatch messages) and wire.Pool (a
// buffer pool that does not zero), static flow-control windows (see
// windowSize) and the standard health service, which starts NOT_SERVING.
func NewServer(opts ServerOptions) *Server {
	maxMsg := opts.MaxMsgSize
	if maxMsg <= 0 {
		maxMsg = DefaultMaxMsgSize
	}
	streams := opts.MaxConcurrentStreams
	if streams == 0 {
		streams = DefaultMaxConcurrentStreams
	}
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	otelOpts := []otelgrpc.Option{otelgrpc.WithPropagators(propagator)}
	if opts.TracerProvider != nil {
		otelOpts = append(otelOpts, otelgrpc.WithTracerProvider(opts.TracerProvider))
	}
	so := []grpc.ServerOption{
		grpc.StatsHandler(otelgrpc.NewServerHandler(otelOpts...)),
		grpc.ChainUnaryInterceptor(recoverUnary(log)),
		grpc.ChainStreamInterceptor(recoverStream(log)),
		grpc.MaxRecvMsgSize(maxMsg),
		grpc.MaxSendMsgSize(maxMsg),
		// Dispatch messages decode in place into the handler's reused
		// messages (wire.Codec); the wire format is protobuf's.
		grpc.ForceServerCodecV2(wire.Codec{}),
		grpc.InitialWindowSize(windowSize),
		grpc.InitialConnWindowSize(windowSize),
		experimental.BufferPool(wire.Pool),
		grpc.MaxConcurrentStreams(streams),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{
			MinTime:             keepaliveMinTime,
			PermitWithoutStream: true,
		}),
		grpc.KeepaliveParams(keepalive.ServerParameters{
			Time:    keepaliveTime,
			Timeout: keepaliveTimeout,
		}),
	}
	so = append(so, opts.Extra...)
	s := &Server{Server: grpc.NewServer(so...), Health: health.NewServer()}
	healthpb.RegisterHealthServer(s.Server, s.Health)
	s.Health.SetServingStatus("", healthpb.HealthCheckResponse_NOT_SERVING)
	return s
}

// Stop marks every service NOT_SERVING (so health watchers learn first)
// and then stops the server, closing open streams.
func (s *Server) Stop() {
	s.Health.Shutdown()
	s.Server.Stop()
}

func recoverUnary(log *slog.Logger) grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (resp any, err error) {
		defer func() {
			if r := recover(); r != nil {
				err = panicStatus(log, info.FullMethod, r)
			}
		}()
		return h(ctx, req)
	}
}

func recoverStream(log *slog.Logger) grpc.StreamServerInterceptor {
	return func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) (err error) {
		defer func() {
			if r := recover(); r != nil {
				err = panicStatus(log, info.FullMethod, r)
			}
		}()
		return h(srv, ss)
	}
}

// panicStatus logs a recovered panic with its stack and hides the details
// from the client: a panic is a server bug, not something the caller did.
func panicStatus(log *slog.Logger, method string, r any) error {
	log.Error("panic in gRPC handler", "method", method, "panic", fmt.Sprint(r), "stack", string(debug.Stack()))
	return status.Errorf(codes.Internal, "internal error in %s", method)
}

// DialOptions are the client options every role uses: OpenTelemetry stats
// (trace context travels in metadata), the same message limits, codec,
// buffer pool and flow-control windows as NewServer, and keepalive pings
// so a dead peer fails calls promptly.
//
// Transport credentials are insecure: expertmesh's internal traffic runs on
// loopback or inside a cluster network; add TLS via extra options where that
// is not true.
func DialOptions() []grpc.DialOption { return dialOptions(true) }

func dialOptions(stats bool) []grpc.DialOption {
	opts := []grpc.DialOption{grpc.WithTransportCredentials(insecure.NewCredentials())}
	if stats {
		opts = append(opts, grpc.WithStatsHandler(otelgrpc.NewClientHandler(otelgrpc.WithPropagators(propagator))))
	}
	return append(opts,
		grpc.WithDefaultCallOptions(
			grpc.MaxCallRecvMsgSize(DefaultMaxMsgSize),
			grpc.MaxCallSendMsgSize(DefaultMaxMsgSize),
			grpc.ForceCodecV2(wire.Codec{}),
		),
		grpc.WithInitialWindowSize(windowSize),
		grpc.WithInitialConnWindowSize(windowSize),
		experimental.WithBufferPool(wire.Pool),
		grpc.WithKeepaliveParams(keepalive.ClientParameters{
			Time:                keepaliveTime,
			Timeout:             keepaliveTimeout,
			PermitWithoutStream: true,
		}),
	)
}

// DispatchDialOptions are DialOptions without the OpenTelemetry stats
// handler, for connections that carry only Dispatch streams: a request
// carries its trace context in its own trace_context field (a stream
// lives for the process, so its metadata cannot), and the handler would
// only cost gRPC's payload events, allocated per message even when
// nothing is traced.
func DispatchDialOptions() []grpc.DialOption { return dialOptions(false) }

// Dial returns a lazily connecting client for addr with DialOptions plus
// extra. It does no I/O: the first call connects. A plain "host:port" is
// dialled as given (passthrough: no DNS resolver, which would otherwise
// turn "localhost" into several addresses and a balancer); a target with a
// scheme ("dns:///svc:7000", "unix:///path") is used unchanged.
func Dial(addr string, extra ...grpc.DialOption) (*grpc.ClientConn, error) {
	return dial(addr, append(DialOptions(), extra...))
}

// DialDispatch is Dial with DispatchDialOptions.
func DialDispatch(addr string, extra ...grpc.DialOption) (*grpc.ClientConn, error) {
	return dial(addr, append(DispatchDialOptions(), extra...))
}

func dial(addr string, opts []grpc.DialOption) (*grpc.ClientConn, error) {
	if addr == "" {
		return nil, errors.New("rpc: empty address")
	}
	target := addr
	if !strings.Contains(addr, "://") {
		target = "passthrough:///" + addr
	}
	cc, err := grpc.NewClient(target, opts...)
	if err != nil {
		return nil, fmt.Errorf("rpc: dial %s: %w", addr, err)
	}
	return cc, nil
}

// codeTable maps package sentinels to gRPC codes. It is the one place that
// decides how a failure looks on the wire; order matters only if one error
// wraps several sentinels (the first match wins).
var codeTable = []struct {
	err  error
	code codes.Code
}{
	{context.Canceled, codes.Canceled},
	{context.DeadlineExceeded, codes.DeadlineExceeded},
	{model.ErrBadInput, codes.InvalidArgument},
	{wire.ErrInvalidTensor, codes.InvalidArgument},
	{model.ErrExpertNotLoaded, codes.FailedPrecondition},
	{model.ErrCacheFull, codes.ResourceExhausted},
}

// Code is the gRPC code err should travel as: a status error's own code,
// the table's code for a wrapped sentinel, OK for nil, Internal otherwise.
func Code(err error) codes.Code {
	if err == nil {
		return codes.OK
	}
	// A status error (possibly wrapped) keeps the code it already has, so
	// errors from downstream calls pass through unchanged.
	var se interface{ GRPCStatus() *status.Status }
	if errors.As(err, &se) {
		return se.GRPCStatus().Code()
	}
	for _, e := range codeTable {
		if errors.Is(err, e.err) {
			return e.code
		}
	}
	return codes.Internal
}

// ToStatus converts err into a gRPC status error for returning from a
// handler. nil stays nil; status errors pass through; everything else
// becomes a status with Code(err) and err's message.
func ToStatus(err error) error {
	if err == nil {
		return nil
	}
	if _, ok := status.FromError(err); ok {
		return err
	}
	return status.Error(Code(err), err.Error())
}
