package attnnode

import (
	"context"
	"testing"

	"go.opentelemetry.io/otel"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"

	"github.com/expertmesh/expertmesh/placement"
	meshpb "github.com/expertmesh/expertmesh/proto"
)

// TestTraceCrossesDispatch: every expert node's compute span belongs to the
// attention node's step trace, parented by the per-node dispatch span of
// the micro-batch that sent it, although all layers share one long-lived
// Dispatch stream.
func TestTraceCrossesDispatch(t *testing.T) {
	rec := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(rec))
	prev := otel.GetTracerProvider()
	otel.SetTracerProvider(tp)
	t.Cleanup(func() { otel.SetTracerProvider(prev) })

	dir := genTiny(t, "tiny-v2")
	table, _ := startExperts(t, dir, 2)
	cfg := DefaultConfig()
	cfg.ModelDir, cfg.Threads, cfg.CacheBytes, cfg.Placement = dir, 1, 4<<20, placement.NewStatic(table)
	node, err := Start(context.Background(), inProcess(cfg))
	if err != nil {
		t.Fatal(err)
	}
	defer node.Close()
	for step := uint64(1); step <= 2; step++ {
		if _, err := node.Step(context.Background(), &meshpb.StepRequest{Step: step, Work: []*meshpb.SeqWork{
			{SeqId: step, Tokens: []int32{1, 2, 3}, Sample: true, ReserveTokens: 8},
		}}); err != nil {
			t.Fatal(err)
		}
	}
	spans := rec.Ended()
	micro := map[[8]byte]bool{}
	dispatch := map[[8]byte]bool{}
	steps := map[[16]byte]bool{}
	for _, s := range spans {
		switch s.Name() {
		case "attn.microbatch":
			micro[s.SpanContext().SpanID()] = true
		case "attn.step":
			steps[s.SpanContext().TraceID()] = true
		}
	}
	for _, s := range spans {
		if s.Name() == "attn.dispatch" {
			if !micro[s.Parent().SpanID()] {
				t.Fatalf("attn.dispatch parent %s is not a micro-batch span", s.Parent().SpanID())
			}
			dispatch[s.SpanContext().SpanID()] = true
		}
	}
	computes := 0
	for _, s := range spans {
		if s.Name() != "expert.compute" {
			continue
		}
		computes++
		if !steps[s.SpanContext().TraceID()] {
			t.Fatalf("expert.compute in trace %s, not an attention step's", s.SpanContext().TraceID())
		}
		if !dispatch[s.Parent().SpanID()] {
			t.Fatalf("expert.compute parent %s is not a dispatch span", s.Parent().SpanID())
		}
	}
	// 2 steps x 2 MoE layers, each touching at least one node.
	if computes < 4 {
		t.Fatalf("%d expert.compute spans, want >= 4", computes)
	}
	if len(steps) != 2 {
		t.Fatalf("%d step traces, want 2", len(steps))
	}
}
