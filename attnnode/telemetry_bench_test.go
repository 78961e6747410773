package attnnode

import (
	"context"
	"os"
	"testing"

	"go.opentelemetry.io/otel"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/trace"
	"go.opentelemetry.io/otel/trace/noop"

	"github.com/expertmesh/expertmesh/placement"
)

type discardSpans struct{}

func (discardSpans) ExportSpans(context.Context, []sdktrace.ReadOnlySpan) error { return nil }
func (discardSpans) Shutdown(context.Context) error                             { return nil }

// BenchmarkStepTracing is a decode step (batch 8, two micro-batches,
// three expert nodes over loopback gRPC) with no tracer provider (what
// `telemetry.Setup` leaves with no endpoint), with an SDK provider that
// samples nothing, and with one that records every span into a batch
// processor (exporter discarding). The difference between the first two
// and the step's time is the "costs nothing measurable" claim.
//
//	go test -run '^$' -bench StepTracing -benchmem -count 6 ./attnnode/
func BenchmarkStepTracing(b *testing.B) {
	dir := os.Getenv("EXPERTMESH_BENCH_MODEL")
	if dir == "" {
		dir = genTiny(b, "tiny-v2")
	}
	prev := otel.GetTracerProvider()
	defer otel.SetTracerProvider(prev)
	for _, mode := range []string{"noop", "never", "always"} {
		b.Run(mode, func(b *testing.B) {
			var tp trace.TracerProvider = noop.NewTracerProvider()
			switch mode {
			case "never":
				p := sdktrace.NewTracerProvider(sdktrace.WithSampler(sdktrace.NeverSample()), sdktrace.WithBatcher(discardSpans{}))
				defer p.Shutdown(context.Background())
				tp = p
			case "always":
				p := sdktrace.NewTracerProvider(sdktrace.WithSampler(sdktrace.AlwaysSample()),
					sdktrace.WithBatcher(discardSpans{}, sdktrace.WithMaxQueueSize(1<<16)))
				defer p.Shutdown(context.Background())
				tp = p
			}
			// Expert nodes take the global provider when they start.
			otel.SetTracerProvider(tp)
			table, _ := startExperts(b, dir, 3)
			cfg := DefaultConfig()
			cfg.ModelDir, cfg.CacheBytes, cfg.MicroBatches, cfg.TracerProvider = dir, 512<<20, 2, tp
			cfg.Placement = placement.NewStatic(table)
			node, err := Start(context.Background(), inProcess(cfg))
			if err != nil {
				b.Fatal(err)
			}
			defer node.Close()
			b.ReportAllocs()
			benchDecode(b, node, 8)
		})
	}
}
