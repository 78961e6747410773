package expertnode

import (
	"context"
	"testing"

	"go.opentelemetry.io/otel/attribute"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"
)

// TestComputeSpan checks that a dispatch produces an "expert.compute" span
// with its attributes, in the caller's trace: the trace context crosses
// the hop in gRPC metadata (rpc.Dial's client handler injects it, the
// node's server handler extracts it).
func TestComputeSpan(t *testing.T) {
	rec := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(rec))
	defer tp.Shutdown(context.Background())
	cfg := testConfig("all")
	cfg.TracerProvider = tp
	node := startNode(t, cfg)
	_, c := dial(t, node)

	traceID, _ := trace.TraceIDFromHex("0102030405060708090a0b0c0d0e0f10")
	spanID, _ := trace.SpanIDFromHex("1112131415161718")
	parent := trace.NewSpanContext(trace.SpanContextConfig{TraceID: traceID, SpanID: spanID, TraceFlags: trace.FlagsSampled, Remote: true})
	ctx := trace.ContextWithRemoteSpanContext(testCtx(t), parent)
	st, err := c.Dispatch(ctx)
	if err != nil {
		t.Fatal(err)
	}
	req := validRequest(1) // 3 rows, k=6, ids < 80
	distinct := distinctExperts(req.ExpertIds)
	if err := st.Send(req); err != nil {
		t.Fatal(err)
	}
	if r, err := st.Recv(); err != nil || r.Code != 0 {
		t.Fatalf("%v %v", r, err)
	}

	var got sdktrace.ReadOnlySpan
	for _, s := range rec.Ended() {
		if s.Name() == "expert.compute" {
			got = s
		}
	}
	if got == nil {
		t.Fatalf("no expert.compute span among %d ended spans", len(rec.Ended()))
	}
	if got.SpanContext().TraceID() != traceID {
		t.Errorf("compute span in trace %v, want the caller's %v", got.SpanContext().TraceID(), traceID)
	}
	if got.Parent().SpanID() == spanID || !got.Parent().IsValid() {
		t.Errorf("compute span's parent %v: want the server's RPC span (a child of the caller's)", got.Parent().SpanID())
	}
	attrs := map[attribute.Key]attribute.Value{}
	for _, kv := range got.Attributes() {
		attrs[kv.Key] = kv.Value
	}
	for k, want := range map[attribute.Key]int64{"layer": 1, "rows": 3, "experts": int64(distinct)} {
		if v, ok := attrs[k]; !ok || v.AsInt64() != want {
			t.Errorf("attribute %s = %v, want %d", k, v.Emit(), want)
		}
	}
	st.CloseSend()
	if _, err := st.Recv(); err == nil {
		t.Error("stream still open after CloseSend")
	}
}
