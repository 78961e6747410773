package telemetry

import (
	"context"
	"fmt"
	"testing"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/propagation"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/trace"
	"go.opentelemetry.io/otel/trace/noop"
)

// discard is an exporter that drops everything: the benchmark measures the
// spans' cost in the traced process, not a collector's.
type discard struct{}

func (discard) ExportSpans(context.Context, []sdktrace.ReadOnlySpan) error { return nil }
func (discard) Shutdown(context.Context) error                             { return nil }

// BenchmarkStepSpans is the tracing work of one decode step of an
// attention node as the code does it (attn.step, 2 micro-batches, 3 MoE
// layers × 4 expert nodes of attn.dispatch spans with their attributes,
// the trace context injected into each dispatch, and the expert node's
// expert.compute span extracted from it; the dispatch and compute spans
// only inside a traced step, as attnnode and expertnode skip them, and
// their attributes, when the step's context carries no valid span),
// under three providers:
//
//   - noop: what Setup leaves with nothing configured (the global no-op);
//   - never: an SDK provider whose sampler records nothing;
//   - always: an SDK provider sampling everything into a batch processor
//     (with an exporter that discards).
//
// Run: go test -run '^$' -bench StepSpans -benchmem ./internal/telemetry/
func BenchmarkStepSpans(b *testing.B) {
	for _, mode := range []string{"noop", "never", "always"} {
		b.Run(mode, func(b *testing.B) {
			var tp trace.TracerProvider
			switch mode {
			case "noop":
				tp = noop.NewTracerProvider()
			case "never":
				p := sdktrace.NewTracerProvider(sdktrace.WithSampler(sdktrace.NeverSample()), sdktrace.WithBatcher(discard{}))
				defer p.Shutdown(context.Background())
				tp = p
			case "always":
				p := sdktrace.NewTracerProvider(sdktrace.WithSampler(sdktrace.AlwaysSample()),
					sdktrace.WithBatcher(discard{}, sdktrace.WithMaxQueueSize(1<<16)))
				defer p.Shutdown(context.Background())
				tp = p
			}
			stepSpans(b, tp)
		})
	}
}

func stepSpans(b *testing.B, tp trace.TracerProvider) {
	attn, expert := tp.Tracer("attnnode"), tp.Tracer("expertnode")
	const microBatches, layers, nodes = 2, 3, 4
	carrier := map[string]string{}
	tc := propagation.TraceContext{}
	b.ReportAllocs()
	b.ResetTimer()
	for range b.N {
		ctx, step := attn.Start(context.Background(), "attn.step")
		step.SetAttributes(attribute.Int("rows", 16), attribute.Int("sequences", 16))
		for m := range microBatches {
			mctx, mb := attn.Start(ctx, "attn.microbatch")
			mb.SetAttributes(attribute.Int("microbatch", m), attribute.Int("rows", 8))
			traced := trace.SpanContextFromContext(mctx).IsValid()
			for l := range layers {
				for n := range nodes {
					if !traced {
						continue
					}
					dctx, d := attn.Start(mctx, "attn.dispatch", trace.WithAttributes(
						attribute.Int("layer", l+1), attribute.String("expert_node", "127.0.0.1:7001"), attribute.String("node_id", nodeIDs[n]),
						attribute.Int("rows", 8), attribute.Int("bytes", 8*2048*4),
						attribute.Int64("placement_version", 3), attribute.Int("attempt", 1)))
					if trace.SpanContextFromContext(dctx).IsValid() {
						clear(carrier)
						tc.Inject(dctx, propagation.MapCarrier(carrier))
					}
					// The expert node's side.
					ectx := context.Background()
					if len(carrier) > 0 {
						ectx = tc.Extract(ectx, propagation.MapCarrier(carrier))
					}
					_, c := expert.Start(ectx, "expert.compute")
					if c.IsRecording() {
						c.SetAttributes(attribute.Int("layer", l+1), attribute.Int("rows", 8), attribute.Int("experts", 20), attribute.String("node", nodeIDs[n]))
					}
					c.End()
					d.End()
				}
			}
			mb.End()
		}
		step.End()
	}
}

var nodeIDs = func() []string {
	var s []string
	for i := range 4 {
		s = append(s, fmt.Sprintf("expert-%d", i))
	}
	return s
}()
