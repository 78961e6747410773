package cli

import (
	"context"
	"flag"
	"fmt"
	"io"
	"time"

	"github.com/expertmesh/expertmesh/internal/telemetry"
)

// telemetryFlags are the tracing flags every role takes; the OTEL_*
// environment variables configure the rest (see package telemetry).
type telemetryFlags struct {
	endpoint string
	protocol string
}

// addTelemetryFlags binds --otlp-endpoint and --otlp-protocol.
func addTelemetryFlags(fs *flag.FlagSet) *telemetryFlags {
	t := &telemetryFlags{}
	fs.StringVar(&t.endpoint, "otlp-endpoint", "", "export traces over OTLP to this collector (http://HOST:4318, or HOST:PORT; overrides $OTEL_EXPORTER_OTLP_ENDPOINT); empty with no OTEL_* endpoint set: no tracing")
	fs.StringVar(&t.protocol, "otlp-protocol", "", "OTLP protocol: grpc or http/protobuf (default: $OTEL_EXPORTER_OTLP_PROTOCOL, else http/protobuf)")
	return t
}

// args are the flags as given, for passing on to children (up).
func (t *telemetryFlags) args() []string {
	var out []string
	if t.endpoint != "" {
		out = append(out, "--otlp-endpoint", t.endpoint)
	}
	if t.protocol != "" {
		out = append(out, "--otlp-protocol", t.protocol)
	}
	return out
}

// setup installs tracing for a role (before the role starts: its packages
// take the global provider as they build their nodes) and returns the
// function that flushes it (bounded, after the role stopped).
func (t *telemetryFlags) setup(ctx context.Context, role, nodeID string, stderr io.Writer) (func(), error) {
	shutdown, c, err := telemetry.Setup(ctx, telemetry.Options{Role: role, NodeID: nodeID, Endpoint: t.endpoint,
		Protocol: t.protocol, Getenv: telemetry.Getenv})
	if err != nil {
		return func() {}, err
	}
	if c.Enabled {
		fmt.Fprintf(stderr, "%s: exporting traces to %s (%s, sampler %s)\n", role, c.URL, c.Protocol, c.Sampler)
	}
	return func() {
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := shutdown(sctx); err != nil {
			fmt.Fprintf(stderr, "%s: flushing traces: %v\n", role, err)
		}
	}, nil
}
