// Package telemetry installs the process-wide OpenTelemetry setup every
// expertmesh role shares: an OTLP trace exporter (gRPC or HTTP/protobuf)
// behind a batching TracerProvider, and the W3C trace-context + baggage
// propagator, so that a caller's traceparent becomes the parent of the
// coordinator's request span and every hop after it joins the same trace.
//
// Configuration follows the OpenTelemetry environment specification, read
// through Options.Getenv (the CLI passes os.Getenv; nothing here reads the
// environment by itself), with flags taking precedence:
//
//	--otlp-endpoint / OTEL_EXPORTER_OTLP_TRACES_ENDPOINT / OTEL_EXPORTER_OTLP_ENDPOINT
//	--otlp-protocol / OTEL_EXPORTER_OTLP_TRACES_PROTOCOL / OTEL_EXPORTER_OTLP_PROTOCOL  (grpc, http/protobuf)
//	OTEL_EXPORTER_OTLP_TRACES_HEADERS / OTEL_EXPORTER_OTLP_HEADERS  (k=v,k2=v2, values URL-encoded)
//	OTEL_TRACES_SAMPLER, OTEL_TRACES_SAMPLER_ARG   (default parentbased_always_on)
//	OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES
//	OTEL_SDK_DISABLED=true, OTEL_TRACES_EXPORTER=none   (install nothing)
//	OTEL_BSP_MAX_QUEUE_SIZE, OTEL_BSP_SCHEDULE_DELAY, OTEL_BSP_MAX_EXPORT_BATCH_SIZE
//
// With no endpoint configured Setup installs no TracerProvider: the global
// one stays OpenTelemetry's no-op, every span the code starts is a
// non-recording stub, and tracing costs nothing measurable (see
// BenchmarkStepSpans). The propagator is installed either way; it only
// parses an incoming traceparent.
package telemetry

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net/url"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracegrpc"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracehttp"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
)

// Protocols accepted by --otlp-protocol and OTEL_EXPORTER_OTLP_PROTOCOL.
const (
	ProtocolGRPC = "grpc"
	ProtocolHTTP = "http/protobuf"
)

// Options configure Setup. Flags (Endpoint, Protocol) override the
// environment.
type Options struct {
	// Role is the expertmesh role ("coordinator", "attn", "expert",
	// "serve"); it is the resource attribute expertmesh.role and, unless
	// Service or OTEL_SERVICE_NAME says otherwise, names the service
	// "expertmesh-" + Role.
	Role string
	// Service overrides the service name (service.name).
	Service string
	// NodeID is the node's stable id (service.instance.id).
	NodeID string
	// Endpoint is --otlp-endpoint: a base URL ("http://host:4318",
	// "https://collector:4317") or host:port (plain http). For
	// http/protobuf the path /v1/traces is appended unless the URL has a
	// path. Empty: the environment decides.
	Endpoint string
	// Protocol is --otlp-protocol: grpc or http/protobuf. Empty: the
	// environment, else http/protobuf (the specification's default).
	Protocol string
	// Getenv reads the OTEL_* variables; nil reads none.
	Getenv func(string) string
	// Exporter, when set, replaces the OTLP exporter (tests); the
	// provider is installed even with no endpoint.
	Exporter sdktrace.SpanExporter
}

// Config is what Resolve makes of Options and the environment: the exporter
// and sampler Setup installs. Enabled is false when nothing is to be
// installed.
type Config struct {
	Enabled bool
	// Protocol is grpc or http/protobuf; URL the full endpoint (for gRPC,
	// scheme://host:port).
	Protocol string
	URL      string
	Headers  map[string]string
	// Sampler as named by OTEL_TRACES_SAMPLER, and its argument.
	Sampler    string
	SamplerArg float64
	// Resource attributes (service.name, service.instance.id,
	// expertmesh.role and OTEL_RESOURCE_ATTRIBUTES's).
	Service   string
	Resource  []attribute.KeyValue
	QueueSize int
	BatchSize int
	Delay     time.Duration
}

// Batching defaults. The SDK's (2048 spans, 5 s) drop spans under a
// busy attention node: a decode step makes one dispatch span per (MoE
// layer, micro-batch, expert node) plus as many expert.compute spans.
const (
	defaultQueueSize = 1 << 16
	defaultBatchSize = 4096
	defaultDelay     = time.Second
)

// Resolve reads the options and the environment into a Config without
// installing anything; its errors name the flag or variable to fix.
func Resolve(o Options) (Config, error) {
	env := o.Getenv
	if env == nil {
		env = func(string) string { return "" }
	}
	get := func(names ...string) (string, string) {
		for _, n := range names {
			if v := strings.TrimSpace(env(n)); v != "" {
				return v, n
			}
		}
		return "", ""
	}
	c := Config{Sampler: "parentbased_always_on", SamplerArg: 1, QueueSize: defaultQueueSize, BatchSize: defaultBatchSize, Delay: defaultDelay}
	if v, _ := get("OTEL_SDK_DISABLED"); strings.EqualFold(v, "true") && o.Exporter == nil {
		return c, nil
	}
	if v, _ := get("OTEL_TRACES_EXPORTER"); v != "" && o.Endpoint == "" && o.Exporter == nil {
		switch v {
		case "none":
			return c, nil
		case "otlp":
		default:
			return c, fmt.Errorf("OTEL_TRACES_EXPORTER=%q: expertmesh exports traces by otlp (or none)", v)
		}
	}

	// Protocol.
	c.Protocol = o.Protocol
	src := "--otlp-protocol"
	if c.Protocol == "" {
		c.Protocol, src = get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")
	}
	switch c.Protocol {
	case "":
		c.Protocol = ProtocolHTTP
	case ProtocolGRPC, ProtocolHTTP:
	case "http/json":
		return c, fmt.Errorf("%s %q: the Go exporter speaks grpc or http/protobuf, not http/json", src, c.Protocol)
	default:
		return c, fmt.Errorf("%s %q: want grpc or http/protobuf", src, c.Protocol)
	}

	// Endpoint: a signal-specific URL is used as given; a base URL gets
	// the signal's path (HTTP only).
	raw, name := o.Endpoint, "--otlp-endpoint"
	perSignal := false
	if raw == "" {
		raw, name = get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
		perSignal = raw != ""
		if raw == "" {
			raw, name = get("OTEL_EXPORTER_OTLP_ENDPOINT")
		}
	}
	if raw == "" && o.Exporter == nil {
		return c, nil // nothing configured: install nothing
	}
	if raw != "" {
		u, err := endpointURL(raw, c.Protocol, perSignal)
		if err != nil {
			return c, fmt.Errorf("%s %q: %v", name, raw, err)
		}
		c.URL = u
	}

	hdr, hname := get("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "OTEL_EXPORTER_OTLP_HEADERS")
	h, err := parseKV(hdr)
	if err != nil {
		return c, fmt.Errorf("%s: %v", hname, err)
	}
	c.Headers = h

	if v, _ := get("OTEL_TRACES_SAMPLER"); v != "" {
		c.Sampler = v
	}
	switch c.Sampler {
	case "always_on", "always_off", "parentbased_always_on", "parentbased_always_off":
	case "traceidratio", "parentbased_traceidratio":
		if v, _ := get("OTEL_TRACES_SAMPLER_ARG"); v != "" {
			r, err := strconv.ParseFloat(v, 64)
			if err != nil || r < 0 || r > 1 {
				return c, fmt.Errorf("OTEL_TRACES_SAMPLER_ARG=%q: want a ratio in [0, 1]", v)
			}
			c.SamplerArg = r
		}
	default:
		return c, fmt.Errorf("OTEL_TRACES_SAMPLER=%q: want always_on, always_off, traceidratio or their parentbased_ forms", c.Sampler)
	}

	for _, b := range []struct {
		env string
		dst *int
	}{{"OTEL_BSP_MAX_QUEUE_SIZE", &c.QueueSize}, {"OTEL_BSP_MAX_EXPORT_BATCH_SIZE", &c.BatchSize}} {
		if v, _ := get(b.env); v != "" {
			n, err := strconv.Atoi(v)
			if err != nil || n <= 0 {
				return c, fmt.Errorf("%s=%q: want a positive integer", b.env, v)
			}
			*b.dst = n
		}
	}
	c.BatchSize = min(c.BatchSize, c.QueueSize)
	if v, _ := get("OTEL_BSP_SCHEDULE_DELAY"); v != "" {
		ms, err := strconv.Atoi(v)
		if err != nil || ms < 0 {
			return c, fmt.Errorf("OTEL_BSP_SCHEDULE_DELAY=%q: want milliseconds", v)
		}
		c.Delay = time.Duration(ms) * time.Millisecond
	}

	// Resource: ours first, OTEL_RESOURCE_ATTRIBUTES may add to or
	// override them, OTEL_SERVICE_NAME and Options.Service win.
	ra, rname := get("OTEL_RESOURCE_ATTRIBUTES")
	attrs, err := parseKV(ra)
	if err != nil {
		return c, fmt.Errorf("%s: %v", rname, err)
	}
	c.Service = "expertmesh"
	if o.Role != "" {
		c.Service = "expertmesh-" + o.Role
	}
	if v, ok := attrs["service.name"]; ok {
		c.Service = v
		delete(attrs, "service.name")
	}
	if v, _ := get("OTEL_SERVICE_NAME"); v != "" {
		c.Service = v
	}
	if o.Service != "" {
		c.Service = o.Service
	}
	set := map[string]string{"expertmesh.role": o.Role, "service.instance.id": o.NodeID}
	for k, v := range attrs {
		set[k] = v
	}
	c.Resource = append(c.Resource, attribute.String("service.name", c.Service))
	for _, k := range slices.Sorted(maps.Keys(set)) {
		if set[k] != "" {
			c.Resource = append(c.Resource, attribute.String(k, set[k]))
		}
	}
	c.Enabled = true
	return c, nil
}

// endpointURL normalises an endpoint: host:port becomes http://host:port;
// for HTTP a base URL (no path, or a path not naming the signal and not
// given per signal) gets /v1/traces.
func endpointURL(raw, protocol string, perSignal bool) (string, error) {
	if !strings.Contains(raw, "://") {
		raw = "http://" + raw
	}
	u, err := url.Parse(raw)
	if err != nil {
		return "", err
	}
	if u.Scheme != "http" && u.Scheme != "https" {
		return "", fmt.Errorf("scheme %q: want http or https", u.Scheme)
	}
	if u.Host == "" {
		return "", errors.New("no host")
	}
	if protocol == ProtocolGRPC {
		return u.Scheme + "://" + u.Host, nil
	}
	if !perSignal {
		u.Path = strings.TrimRight(u.Path, "/") + "/v1/traces"
	} else if u.Path == "" {
		u.Path = "/"
	}
	return u.String(), nil
}

// parseKV reads the W3C-baggage-like lists of OTEL_RESOURCE_ATTRIBUTES and
// OTEL_EXPORTER_OTLP_HEADERS: "k=v,k2=v2" with URL-encoded values.
func parseKV(s string) (map[string]string, error) {
	out := map[string]string{}
	for _, f := range strings.Split(s, ",") {
		if strings.TrimSpace(f) == "" {
			continue
		}
		k, v, ok := strings.Cut(f, "=")
		k = strings.TrimSpace(k)
		if !ok || k == "" {
			return nil, fmt.Errorf("%q: want key=value", f)
		}
		dv, err := url.PathUnescape(strings.TrimSpace(v))
		if err != nil {
			return nil, fmt.Errorf("%q: %v", f, err)
		}
		out[k] = dv
	}
	return out, nil
}

// sampler builds the configured sampler.
func (c Config) sampler() sdktrace.Sampler {
	switch c.Sampler {
	case "always_on":
		return sdktrace.AlwaysSample()
	case "always_off":
		return sdktrace.NeverSample()
	case "traceidratio":
		return sdktrace.TraceIDRatioBased(c.SamplerArg)
	case "parentbased_always_off":
		return sdktrace.ParentBased(sdktrace.NeverSample())
	case "parentbased_traceidratio":
		return sdktrace.ParentBased(sdktrace.TraceIDRatioBased(c.SamplerArg))
	}
	return sdktrace.ParentBased(sdktrace.AlwaysSample())
}

// Propagator is the propagator Setup installs: W3C trace context and
// baggage.
func Propagator() propagation.TextMapPropagator {
	return propagation.NewCompositeTextMapPropagator(propagation.TraceContext{}, propagation.Baggage{})
}

// Shutdown flushes and stops what Setup installed; a no-op when it
// installed no provider. It returns when ctx ends at the latest.
type Shutdown func(ctx context.Context) error

// Setup installs the global propagator and, when an endpoint is configured
// (or Options.Exporter is set), a batching TracerProvider exporting over
// OTLP. Call it before starting the role: packages take the global
// provider when their nodes are built. The returned Shutdown flushes the
// spans still queued; call it after the role stopped.
func Setup(ctx context.Context, o Options) (Shutdown, Config, error) {
	nop := func(context.Context) error { return nil }
	otel.SetTextMapPropagator(Propagator())
	c, err := Resolve(o)
	if err != nil || !c.Enabled {
		return nop, c, err
	}
	tp, err := NewProvider(ctx, c, o.Exporter)
	if err != nil {
		return nop, c, err
	}
	otel.SetTracerProvider(tp)
	return tp.Shutdown, c, nil
}

// NewProvider builds the TracerProvider c describes, exporting to exp, or
// over OTLP when exp is nil. It installs nothing.
func NewProvider(ctx context.Context, c Config, exp sdktrace.SpanExporter) (*sdktrace.TracerProvider, error) {
	if exp == nil {
		var err error
		if exp, err = newExporter(ctx, c); err != nil {
			return nil, err
		}
	}
	res, err := resource.New(ctx, resource.WithAttributes(c.Resource...), resource.WithHost(), resource.WithProcessPID(),
		resource.WithTelemetrySDK())
	if err != nil && res == nil {
		return nil, fmt.Errorf("telemetry resource: %w", err)
	}
	bsp := sdktrace.NewBatchSpanProcessor(exp, sdktrace.WithMaxQueueSize(c.QueueSize),
		sdktrace.WithMaxExportBatchSize(c.BatchSize), sdktrace.WithBatchTimeout(c.Delay))
	return sdktrace.NewTracerProvider(sdktrace.WithSampler(c.sampler()), sdktrace.WithResource(res),
		sdktrace.WithSpanProcessor(bsp)), nil
}

// newExporter builds the OTLP exporter. It does no I/O: both clients
// connect on the first export, so a collector that is down costs dropped
// spans (logged by OpenTelemetry's error handler), never a failed start.
func newExporter(ctx context.Context, c Config) (sdktrace.SpanExporter, error) {
	u, err := url.Parse(c.URL)
	if err != nil {
		return nil, err
	}
	insecure := u.Scheme == "http"
	switch c.Protocol {
	case ProtocolGRPC:
		opts := []otlptracegrpc.Option{otlptracegrpc.WithEndpoint(u.Host)}
		if insecure {
			opts = append(opts, otlptracegrpc.WithInsecure())
		}
		if len(c.Headers) > 0 {
			opts = append(opts, otlptracegrpc.WithHeaders(c.Headers))
		}
		return otlptrace.New(ctx, otlptracegrpc.NewClient(opts...))
	default:
		opts := []otlptracehttp.Option{otlptracehttp.WithEndpointURL(c.URL)}
		if insecure {
			opts = append(opts, otlptracehttp.WithInsecure())
		}
		if len(c.Headers) > 0 {
			opts = append(opts, otlptracehttp.WithHeaders(c.Headers))
		}
		return otlptrace.New(ctx, otlptracehttp.NewClient(opts...))
	}
}

// Getenv is os.Getenv, for callers that configure from the process
// environment (the CLI).
var Getenv = os.Getenv
