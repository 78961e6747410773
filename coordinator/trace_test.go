package coordinator

import (
	"sync"
	"testing"

	"go.opentelemetry.io/otel"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
)

// The packages' tracers bind to the first global provider set, so the
// recorder is installed once per test process.
var installRecorder = sync.OnceValue(func() *tracetest.SpanRecorder {
	rec := tracetest.NewSpanRecorder()
	otel.SetTracerProvider(sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(rec)))
	return rec
})

// TestTraceSpans checks the span shape: each request's "http.request"
// span is linked from the "coordinator.step" spans that served it, and
// the in-process node's "attn.step" is a child of the coordinator's step.
func TestTraceSpans(t *testing.T) {
	rec := installRecorder()
	cl := startCluster(t, 1, nil, nil)
	before := len(rec.Ended())
	if code, _ := complete(t, cl, map[string]any{"prompt": []int{1, 2, 3}, "max_tokens": 3, "ignore_eos": true}); code != 200 {
		t.Fatal(code)
	}
	var reqSpan sdktrace.ReadOnlySpan
	steps := map[string]sdktrace.ReadOnlySpan{}
	var attn []sdktrace.ReadOnlySpan
	for _, s := range rec.Ended()[before:] {
		switch s.Name() {
		case "http.request":
			reqSpan = s
		case "coordinator.step":
			steps[s.SpanContext().SpanID().String()] = s
		case "attn.step":
			attn = append(attn, s)
		}
	}
	if reqSpan == nil || len(steps) < 3 {
		t.Fatalf("spans: request %v, %d steps", reqSpan != nil, len(steps))
	}
	linked := 0
	for _, s := range steps {
		for _, l := range s.Links() {
			if l.SpanContext.SpanID() == reqSpan.SpanContext().SpanID() {
				linked++
			}
		}
	}
	// Three tokens: the prefill step and two decode steps serve the request.
	if linked != 3 {
		t.Errorf("%d steps link the request span, want 3", linked)
	}
	for _, a := range attn {
		if _, ok := steps[a.Parent().SpanID().String()]; !ok {
			t.Errorf("attn.step's parent %v is no coordinator.step", a.Parent().SpanID())
		}
	}
	if len(attn) != len(steps) {
		t.Errorf("%d attn.step spans for %d steps", len(attn), len(steps))
	}
}
