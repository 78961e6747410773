package telemetry

import (
	"bytes"
	"compress/gzip"
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"time"

	coltracepb "go.opentelemetry.io/proto/otlp/collector/trace/v1"
	commonpb "go.opentelemetry.io/proto/otlp/common/v1"
	tracepb "go.opentelemetry.io/proto/otlp/trace/v1"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
)

// Span is one received span, reduced to what analyses need: ids, timing,
// the resource's service and instance, and the span's attributes as
// strings and integers.
type Span struct {
	TraceID, SpanID, ParentID string // hex; ParentID "" for a root
	Name                      string
	Start, End                time.Time
	// Service and Instance are the resource's service.name and
	// service.instance.id.
	Service, Instance string
	Ints              map[string]int64
	Strings           map[string]string
	// Error is set when the span's status is an error.
	Error bool
	// Links are the linked spans' "traceid/spanid".
	Links []string
}

// Duration is End − Start.
func (s *Span) Duration() time.Duration { return s.End.Sub(s.Start) }

// Receiver is an OTLP trace receiver that keeps what it receives in
// memory: OTLP/HTTP (POST /v1/traces, protobuf or JSON, optionally
// gzip-compressed) and OTLP/gRPC (TraceService/Export), both on one port
// (gRPC over unencrypted HTTP/2). `expertmesh bench --otlp-listen` runs one
// so that a cluster exporting to it yields the per-layer breakdown; tests
// use it as an in-process collector. Safe for concurrent use.
type Receiver struct {
	// MaxSpans bounds the spans kept; later ones are counted in Dropped.
	MaxSpans int

	srv  *http.Server
	grpc *grpc.Server
	lis  net.Listener
	done chan struct{}

	mu      sync.Mutex
	spans   []Span
	dropped int
	notify  chan struct{} // closed and replaced on every export
}

// DefaultMaxSpans keeps a few minutes of a busy cluster's spans (about
// 300 bytes each).
const DefaultMaxSpans = 2_000_000

// maxBody bounds one export request.
const maxBody = 64 << 20

// NewReceiver returns a receiver that is not listening; use Handler or
// Listen.
func NewReceiver() *Receiver {
	r := &Receiver{MaxSpans: DefaultMaxSpans, notify: make(chan struct{}), done: make(chan struct{})}
	r.grpc = grpc.NewServer(grpc.MaxRecvMsgSize(maxBody))
	coltracepb.RegisterTraceServiceServer(r.grpc, grpcExport{r: r})
	return r
}

// Listen serves OTLP/HTTP and OTLP/gRPC on addr ("127.0.0.1:0" picks a
// port) until Close.
func (r *Receiver) Listen(addr string) error {
	lis, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	var p http.Protocols
	p.SetHTTP1(true)
	p.SetUnencryptedHTTP2(true)
	r.lis = lis
	r.srv = &http.Server{Handler: r.Handler(), Protocols: &p, ReadHeaderTimeout: 10 * time.Second}
	go func() {
		defer close(r.done)
		_ = r.srv.Serve(lis)
	}()
	return nil
}

// Addr is the listening address (host:port).
func (r *Receiver) Addr() string { return r.lis.Addr().String() }

// Endpoint is the base URL to give exporters (OTEL_EXPORTER_OTLP_ENDPOINT).
func (r *Receiver) Endpoint() string { return "http://" + r.Addr() }

// Close stops listening and waits for the server to end.
func (r *Receiver) Close() error {
	if r.srv == nil {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	err := r.srv.Shutdown(ctx)
	if err != nil {
		r.srv.Close()
	}
	<-r.done
	r.grpc.Stop()
	return err
}

// Handler serves POST /v1/traces and gRPC's TraceService/Export.
func (r *Receiver) Handler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		if req.ProtoMajor == 2 && strings.HasPrefix(req.Header.Get("Content-Type"), "application/grpc") {
			r.grpc.ServeHTTP(w, req)
			return
		}
		if req.URL.Path != "/v1/traces" {
			http.NotFound(w, req)
			return
		}
		if req.Method != http.MethodPost {
			w.Header().Set("Allow", "POST")
			http.Error(w, "POST only", http.StatusMethodNotAllowed)
			return
		}
		r.serveHTTP(w, req)
	})
}

func (r *Receiver) serveHTTP(w http.ResponseWriter, req *http.Request) {
	var body io.Reader = http.MaxBytesReader(w, req.Body, maxBody)
	if strings.EqualFold(req.Header.Get("Content-Encoding"), "gzip") {
		gz, err := gzip.NewReader(body)
		if err != nil {
			http.Error(w, "bad gzip body: "+err.Error(), http.StatusBadRequest)
			return
		}
		defer gz.Close()
		body = io.LimitReader(gz, maxBody)
	}
	b, err := io.ReadAll(body)
	if err != nil {
		http.Error(w, "reading the body: "+err.Error(), http.StatusBadRequest)
		return
	}
	var msg coltracepb.ExportTraceServiceRequest
	ct := req.Header.Get("Content-Type")
	isJSON := strings.HasPrefix(ct, "application/json")
	if isJSON {
		err = protojson.Unmarshal(b, &msg)
	} else {
		err = proto.Unmarshal(b, &msg)
	}
	if err != nil {
		http.Error(w, "not an ExportTraceServiceRequest: "+err.Error(), http.StatusBadRequest)
		return
	}
	r.add(&msg)
	resp := &coltracepb.ExportTraceServiceResponse{}
	var out []byte
	if isJSON {
		out, _ = protojson.Marshal(resp)
		w.Header().Set("Content-Type", "application/json")
	} else {
		out, _ = proto.Marshal(resp)
		w.Header().Set("Content-Type", "application/x-protobuf")
	}
	w.Write(out)
}

type grpcExport struct {
	coltracepb.UnimplementedTraceServiceServer
	r *Receiver
}

func (g grpcExport) Export(_ context.Context, req *coltracepb.ExportTraceServiceRequest) (*coltracepb.ExportTraceServiceResponse, error) {
	g.r.add(req)
	return &coltracepb.ExportTraceServiceResponse{}, nil
}

// add converts and keeps the request's spans.
func (r *Receiver) add(req *coltracepb.ExportTraceServiceRequest) {
	var got []Span
	for _, rs := range req.GetResourceSpans() {
		var service, instance string
		for _, kv := range rs.GetResource().GetAttributes() {
			switch kv.Key {
			case "service.name":
				service = kv.GetValue().GetStringValue()
			case "service.instance.id":
				instance = kv.GetValue().GetStringValue()
			}
		}
		for _, ss := range rs.GetScopeSpans() {
			for _, sp := range ss.GetSpans() {
				got = append(got, convert(sp, service, instance))
			}
		}
	}
	r.mu.Lock()
	room := max(r.MaxSpans-len(r.spans), 0)
	if len(got) > room {
		r.dropped += len(got) - room
		got = got[:room]
	}
	r.spans = append(r.spans, got...)
	close(r.notify)
	r.notify = make(chan struct{})
	r.mu.Unlock()
}

func convert(sp *tracepb.Span, service, instance string) Span {
	s := Span{
		TraceID: hex.EncodeToString(sp.TraceId), SpanID: hex.EncodeToString(sp.SpanId),
		Name:  sp.Name,
		Start: time.Unix(0, int64(sp.StartTimeUnixNano)), End: time.Unix(0, int64(sp.EndTimeUnixNano)),
		Service: service, Instance: instance,
		Error: sp.GetStatus().GetCode() == tracepb.Status_STATUS_CODE_ERROR,
	}
	if len(sp.ParentSpanId) > 0 && !bytes.Equal(sp.ParentSpanId, make([]byte, 8)) {
		s.ParentID = hex.EncodeToString(sp.ParentSpanId)
	}
	for _, kv := range sp.Attributes {
		switch v := kv.GetValue().GetValue().(type) {
		case *commonpb.AnyValue_IntValue:
			if s.Ints == nil {
				s.Ints = map[string]int64{}
			}
			s.Ints[kv.Key] = v.IntValue
		case *commonpb.AnyValue_StringValue:
			if s.Strings == nil {
				s.Strings = map[string]string{}
			}
			s.Strings[kv.Key] = v.StringValue
		}
	}
	for _, l := range sp.Links {
		s.Links = append(s.Links, hex.EncodeToString(l.TraceId)+"/"+hex.EncodeToString(l.SpanId))
	}
	return s
}

// Spans returns a copy of the spans received so far.
func (r *Receiver) Spans() []Span {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]Span(nil), r.spans...)
}

// Dropped counts spans not kept because MaxSpans was reached.
func (r *Receiver) Dropped() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.dropped
}

// Reset forgets every span received so far.
func (r *Receiver) Reset() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.spans, r.dropped = nil, 0
}

// WaitFor waits until ok(spans) holds for the spans received so far,
// re-checking after every export, or ctx ends.
func (r *Receiver) WaitFor(ctx context.Context, ok func([]Span) bool) error {
	for {
		r.mu.Lock()
		spans, ch := r.spans, r.notify
		r.mu.Unlock()
		if ok(spans) {
			return nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return fmt.Errorf("waiting for spans (%d received): %w", len(spans), ctx.Err())
		}
	}
}

// Settle waits until no export has arrived for quiet (exporters batch:
// the cluster's last spans arrive one schedule delay after they ended),
// or ctx ends. It returns the spans received by then.
func (r *Receiver) Settle(ctx context.Context, quiet time.Duration) []Span {
	t := time.NewTimer(quiet)
	defer t.Stop()
	for {
		r.mu.Lock()
		ch := r.notify
		r.mu.Unlock()
		select {
		case <-ch:
			t.Reset(quiet)
		case <-t.C:
			return r.Spans()
		case <-ctx.Done():
			return r.Spans()
		}
	}
}

// ErrNoSpans is returned by analyses given no spans of the kind they need.
var ErrNoSpans = errors.New("no spans")
