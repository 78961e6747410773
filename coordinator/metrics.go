package coordinator

import (
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
)

// metrics live in a registry per coordinator, so several coordinators in
// one process (tests, `up`) do not collide on the global registry.
type metrics struct {
	reg              *prometheus.Registry
	requests         *prometheus.CounterVec
	promptTokens     prometheus.Counter
	generationTokens prometheus.Counter
	queue            prometheus.Gauge
	running          prometheus.Gauge
	stepSeconds      prometheus.Histogram
	stepTokens       prometheus.Histogram
	ttft             prometheus.Histogram
	requestSeconds   prometheus.Histogram
	rebuilds         prometheus.Counter
	abortedSteps     prometheus.Counter
}

func newMetrics() *metrics {
	m := &metrics{reg: prometheus.NewRegistry()}
	const ns, sub = "expertmesh", "coordinator"
	m.requests = prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "requests_total",
		Help: "HTTP requests by endpoint and status code."}, []string{"endpoint", "code"})
	m.promptTokens = prometheus.NewCounter(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "prompt_tokens_total",
		Help: "Prompt tokens of admitted requests."})
	m.generationTokens = prometheus.NewCounter(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "generation_tokens_total",
		Help: "Tokens generated."})
	m.queue = prometheus.NewGauge(prometheus.GaugeOpts{Namespace: ns, Subsystem: sub, Name: "queue_depth",
		Help: "Requests admitted but not yet placed on an attention node."})
	m.running = prometheus.NewGauge(prometheus.GaugeOpts{Namespace: ns, Subsystem: sub, Name: "running_requests",
		Help: "Requests being served."})
	m.stepSeconds = prometheus.NewHistogram(prometheus.HistogramOpts{Namespace: ns, Subsystem: sub, Name: "step_duration_seconds",
		Help: "Wall time of one attention-node step.", Buckets: prometheus.ExponentialBuckets(0.0005, 2, 16)})
	m.stepTokens = prometheus.NewHistogram(prometheus.HistogramOpts{Namespace: ns, Subsystem: sub, Name: "step_tokens",
		Help: "Tokens (rows) in one attention-node step.", Buckets: prometheus.ExponentialBuckets(1, 2, 12)})
	m.ttft = prometheus.NewHistogram(prometheus.HistogramOpts{Namespace: ns, Subsystem: sub, Name: "time_to_first_token_seconds",
		Help: "From admission to the first generated token.", Buckets: prometheus.ExponentialBuckets(0.001, 2, 16)})
	m.requestSeconds = prometheus.NewHistogram(prometheus.HistogramOpts{Namespace: ns, Subsystem: sub, Name: "request_duration_seconds",
		Help: "End-to-end generation request time.", Buckets: prometheus.ExponentialBuckets(0.001, 2, 18)})
	m.rebuilds = prometheus.NewCounter(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "rebuilds_total",
		Help: "Sequences placed again (to be re-prefilled) after their attention node failed or left."})
	m.abortedSteps = prometheus.NewCounter(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "aborted_steps_total",
		Help: "Steps an attention node answered without applying them (no replica of some expert answered in time); their work is sent again."})
	m.reg.MustRegister(m.rebuilds, m.abortedSteps, m.requests, m.promptTokens, m.generationTokens, m.queue, m.running,
		m.stepSeconds, m.stepTokens, m.ttft, m.requestSeconds,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}
