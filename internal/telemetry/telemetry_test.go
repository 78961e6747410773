package telemetry

import (
	"bytes"
	"compress/gzip"
	"context"
	"net/http"
	"strings"
	"testing"
	"time"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"
	"go.opentelemetry.io/otel/trace/noop"
	coltracepb "go.opentelemetry.io/proto/otlp/collector/trace/v1"
	tracepb "go.opentelemetry.io/proto/otlp/trace/v1"
	"go.uber.org/goleak"
	"google.golang.org/protobuf/proto"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m,
		// The OTLP gRPC client's resolver and the SDK's global state.
		goleak.IgnoreTopFunction("google.golang.org/grpc/internal/grpcsync.(*CallbackSerializer).run"),
		goleak.IgnoreTopFunction("net/http.(*persistConn).readLoop"),
		goleak.IgnoreTopFunction("net/http.(*persistConn).writeLoop"),
		goleak.IgnoreTopFunction("internal/poll.runtime_pollWait"))
}

func envOf(kv map[string]string) func(string) string {
	return func(k string) string { return kv[k] }
}

func TestResolve(t *testing.T) {
	for _, tc := range []struct {
		name    string
		o       Options
		env     map[string]string
		enabled bool
		proto   string
		url     string
		sampler string
		service string
		err     string
	}{
		{name: "nothing configured installs nothing", env: nil},
		{name: "flag host:port is plain http with the traces path", o: Options{Endpoint: "127.0.0.1:4318", Role: "attn"},
			enabled: true, proto: ProtocolHTTP, url: "http://127.0.0.1:4318/v1/traces", sampler: "parentbased_always_on", service: "expertmesh-attn"},
		{name: "base env endpoint gets the path", env: map[string]string{"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/"},
			enabled: true, proto: ProtocolHTTP, url: "http://collector:4318/v1/traces", service: "expertmesh"},
		{name: "per-signal endpoint is used as given", env: map[string]string{"OTEL_EXPORTER_OTLP_ENDPOINT": "http://a:1",
			"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://b:2/custom"}, enabled: true, proto: ProtocolHTTP, url: "https://b:2/custom"},
		{name: "flag beats env", o: Options{Endpoint: "http://flag:9"}, env: map[string]string{"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://env:1"},
			enabled: true, url: "http://flag:9/v1/traces"},
		{name: "grpc keeps scheme and host", env: map[string]string{"OTEL_EXPORTER_OTLP_ENDPOINT": "https://c:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
			enabled: true, proto: ProtocolGRPC, url: "https://c:4317"},
		{name: "traces protocol beats general", env: map[string]string{"OTEL_EXPORTER_OTLP_ENDPOINT": "c:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
			"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc"}, enabled: true, proto: ProtocolGRPC, url: "http://c:4317"},
		{name: "flag protocol", o: Options{Endpoint: "c:4317", Protocol: "grpc"}, enabled: true, proto: ProtocolGRPC},
		{name: "bad protocol names the flag", o: Options{Endpoint: "c:1", Protocol: "udp"}, err: "--otlp-protocol"},
		{name: "json protocol refused", env: map[string]string{"OTEL_EXPORTER_OTLP_ENDPOINT": "c:1", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}, err: "OTEL_EXPORTER_OTLP_PROTOCOL"},
		{name: "bad scheme names the variable", env: map[string]string{"OTEL_EXPORTER_OTLP_ENDPOINT": "ftp://c:1"}, err: "OTEL_EXPORTER_OTLP_ENDPOINT"},
		{name: "sdk disabled", env: map[string]string{"OTEL_EXPORTER_OTLP_ENDPOINT": "c:1", "OTEL_SDK_DISABLED": "true"}},
		{name: "exporter none", env: map[string]string{"OTEL_EXPORTER_OTLP_ENDPOINT": "c:1", "OTEL_TRACES_EXPORTER": "none"}},
		{name: "exporter zipkin refused", env: map[string]string{"OTEL_EXPORTER_OTLP_ENDPOINT": "c:1", "OTEL_TRACES_EXPORTER": "zipkin"}, err: "OTEL_TRACES_EXPORTER"},
		{name: "sampler ratio", env: map[string]string{"OTEL_EXPORTER_OTLP_ENDPOINT": "c:1", "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
			"OTEL_TRACES_SAMPLER_ARG": "0.25"}, enabled: true, sampler: "parentbased_traceidratio"},
		{name: "bad sampler arg", env: map[string]string{"OTEL_EXPORTER_OTLP_ENDPOINT": "c:1", "OTEL_TRACES_SAMPLER": "traceidratio",
			"OTEL_TRACES_SAMPLER_ARG": "2"}, err: "OTEL_TRACES_SAMPLER_ARG"},
		{name: "unknown sampler", env: map[string]string{"OTEL_EXPORTER_OTLP_ENDPOINT": "c:1", "OTEL_TRACES_SAMPLER": "jaeger_remote"}, err: "OTEL_TRACES_SAMPLER"},
		{name: "service name from env", o: Options{Role: "expert"}, env: map[string]string{"OTEL_EXPORTER_OTLP_ENDPOINT": "c:1", "OTEL_SERVICE_NAME": "mine",
			"OTEL_RESOURCE_ATTRIBUTES": "service.name=other,deployment.environment=lab"}, enabled: true, service: "mine"},
		{name: "service name from resource attributes", o: Options{Role: "expert"}, env: map[string]string{"OTEL_EXPORTER_OTLP_ENDPOINT": "c:1",
			"OTEL_RESOURCE_ATTRIBUTES": "service.name=other"}, enabled: true, service: "other"},
		{name: "bad headers", env: map[string]string{"OTEL_EXPORTER_OTLP_ENDPOINT": "c:1", "OTEL_EXPORTER_OTLP_HEADERS": "novalue"}, err: "OTEL_EXPORTER_OTLP_HEADERS"},
		{name: "bad queue size", env: map[string]string{"OTEL_EXPORTER_OTLP_ENDPOINT": "c:1", "OTEL_BSP_MAX_QUEUE_SIZE": "-1"}, err: "OTEL_BSP_MAX_QUEUE_SIZE"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tc.o.Getenv = envOf(tc.env)
			c, err := Resolve(tc.o)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("err %v, want one naming %s", err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if c.Enabled != tc.enabled {
				t.Fatalf("enabled %v, want %v", c.Enabled, tc.enabled)
			}
			if tc.proto != "" && c.Protocol != tc.proto {
				t.Errorf("protocol %q, want %q", c.Protocol, tc.proto)
			}
			if tc.url != "" && c.URL != tc.url {
				t.Errorf("url %q, want %q", c.URL, tc.url)
			}
			if tc.sampler != "" && c.Sampler != tc.sampler {
				t.Errorf("sampler %q, want %q", c.Sampler, tc.sampler)
			}
			if tc.service != "" && c.Service != tc.service {
				t.Errorf("service %q, want %q", c.Service, tc.service)
			}
		})
	}
}

func TestResolveHeadersAndResource(t *testing.T) {
	c, err := Resolve(Options{Role: "attn", NodeID: "attn-0", Getenv: envOf(map[string]string{
		"OTEL_EXPORTER_OTLP_ENDPOINT": "c:1",
		"OTEL_EXPORTER_OTLP_HEADERS":  "api-key=a%20b, x-team=infer",
		"OTEL_RESOURCE_ATTRIBUTES":    "deployment.environment=lab,expertmesh.role=override",
	})})
	if err != nil {
		t.Fatal(err)
	}
	if c.Headers["api-key"] != "a b" || c.Headers["x-team"] != "infer" {
		t.Fatalf("headers %v", c.Headers)
	}
	got := map[string]string{}
	for _, kv := range c.Resource {
		got[string(kv.Key)] = kv.Value.AsString()
	}
	want := map[string]string{"service.name": "expertmesh-attn", "service.instance.id": "attn-0",
		"expertmesh.role": "override", "deployment.environment": "lab"}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("resource %s = %q, want %q (all: %v)", k, got[k], v, got)
		}
	}
}

// TestSetupNothingConfigured: no endpoint leaves the global provider the
// no-op one, and still installs the W3C propagator.
func TestSetupNothingConfigured(t *testing.T) {
	restore := saveGlobals(t)
	defer restore()
	otel.SetTracerProvider(noop.NewTracerProvider())
	shutdown, c, err := Setup(context.Background(), Options{Role: "attn", Getenv: envOf(nil)})
	if err != nil {
		t.Fatal(err)
	}
	defer shutdown(context.Background())
	if c.Enabled {
		t.Fatal("enabled with nothing configured")
	}
	if _, ok := otel.GetTracerProvider().(noop.TracerProvider); !ok {
		t.Fatalf("provider %T installed with nothing configured", otel.GetTracerProvider())
	}
	ctx := extract(t, "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
	if sc := trace.SpanContextFromContext(ctx); !sc.IsRemote() || sc.TraceID().String() != "0af7651916cd43dd8448eb211c80319c" {
		t.Fatalf("traceparent not extracted: %v", sc)
	}
}

func extract(t *testing.T, traceparent string) context.Context {
	t.Helper()
	h := http.Header{}
	h.Set("traceparent", traceparent)
	h.Set("baggage", "tenant=a")
	return otel.GetTextMapPropagator().Extract(context.Background(), propagation.HeaderCarrier(h))
}

func saveGlobals(t *testing.T) func() {
	tp, prop := otel.GetTracerProvider(), otel.GetTextMapPropagator()
	return func() {
		otel.SetTracerProvider(tp)
		otel.SetTextMapPropagator(prop)
	}
}

// TestSetupExportsToReceiver: spans reach an in-process receiver over
// OTLP/HTTP and OTLP/gRPC, carry the role's resource, and a span started
// under an incoming traceparent is its child.
func TestSetupExportsToReceiver(t *testing.T) {
	for _, protocol := range []string{ProtocolHTTP, ProtocolGRPC} {
		t.Run(protocol, func(t *testing.T) {
			restore := saveGlobals(t)
			defer restore()
			rcv := NewReceiver()
			if err := rcv.Listen("127.0.0.1:0"); err != nil {
				t.Fatal(err)
			}
			defer rcv.Close()
			shutdown, c, err := Setup(context.Background(), Options{Role: "coordinator", NodeID: "coord-1", Endpoint: rcv.Addr(), Protocol: protocol,
				Getenv: envOf(map[string]string{"OTEL_BSP_SCHEDULE_DELAY": "10"})})
			if err != nil {
				t.Fatal(err)
			}
			if !c.Enabled || c.Protocol != protocol {
				t.Fatalf("config %+v", c)
			}
			ctx := extract(t, "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
			_, span := otel.Tracer("test").Start(ctx, "http.request", trace.WithAttributes(attribute.Int("rows", 3), attribute.String("node_id", "e1")))
			span.End()
			sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			if err := shutdown(sctx); err != nil {
				t.Fatal(err)
			}
			spans := rcv.Spans()
			if len(spans) != 1 {
				t.Fatalf("%d spans received, want 1", len(spans))
			}
			s := spans[0]
			if s.Name != "http.request" || s.TraceID != "0af7651916cd43dd8448eb211c80319c" || s.ParentID != "b7ad6b7169203331" {
				t.Fatalf("span %+v: not the traceparent's child", s)
			}
			if s.Service != "expertmesh-coordinator" || s.Instance != "coord-1" || s.Ints["rows"] != 3 || s.Strings["node_id"] != "e1" {
				t.Fatalf("span %+v: resource or attributes lost", s)
			}
			if s.Duration() < 0 {
				t.Fatalf("negative duration %v", s.Duration())
			}
		})
	}
}

// TestReceiverHTTPForms: gzip and JSON bodies are accepted; junk is a 400;
// GET a 405.
func TestReceiverHTTPForms(t *testing.T) {
	rcv := NewReceiver()
	if err := rcv.Listen("127.0.0.1:0"); err != nil {
		t.Fatal(err)
	}
	defer rcv.Close()
	req := &coltracepb.ExportTraceServiceRequest{ResourceSpans: []*tracepb.ResourceSpans{{ScopeSpans: []*tracepb.ScopeSpans{{Spans: []*tracepb.Span{
		{TraceId: bytes.Repeat([]byte{1}, 16), SpanId: bytes.Repeat([]byte{2}, 8), Name: "a", StartTimeUnixNano: 1, EndTimeUnixNano: 2},
	}}}}}}
	b, _ := proto.Marshal(req)
	var gz bytes.Buffer
	zw := gzip.NewWriter(&gz)
	zw.Write(b)
	zw.Close()
	post := func(body []byte, ct, enc string) int {
		r, _ := http.NewRequest(http.MethodPost, rcv.Endpoint()+"/v1/traces", bytes.NewReader(body))
		r.Header.Set("Content-Type", ct)
		if enc != "" {
			r.Header.Set("Content-Encoding", enc)
		}
		resp, err := http.DefaultClient.Do(r)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	if c := post(gz.Bytes(), "application/x-protobuf", "gzip"); c != 200 {
		t.Fatalf("gzip protobuf: %d", c)
	}
	js := `{"resourceSpans":[{"scopeSpans":[{"spans":[{"traceId":"0102030405060708090a0b0c0d0e0f10","spanId":"0102030405060708","name":"b","startTimeUnixNano":"5","endTimeUnixNano":"9"}]}]}]}`
	if c := post([]byte(js), "application/json", ""); c != 200 {
		t.Fatalf("json: %d", c)
	}
	if c := post([]byte("junk"), "application/x-protobuf", ""); c != 400 {
		t.Fatalf("junk: %d, want 400", c)
	}
	resp, err := http.Get(rcv.Endpoint() + "/v1/traces")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusMethodNotAllowed {
		t.Fatalf("GET: %d", resp.StatusCode)
	}
	spans := rcv.Spans()
	if len(spans) != 2 || spans[1].Name != "b" || spans[1].Duration() != 4 {
		t.Fatalf("spans %+v", spans)
	}
	rcv.MaxSpans = 2
	post(b, "application/x-protobuf", "")
	if rcv.Dropped() != 1 || len(rcv.Spans()) != 2 {
		t.Fatalf("over MaxSpans: dropped %d, kept %d", rcv.Dropped(), len(rcv.Spans()))
	}
}
