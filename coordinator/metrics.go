package coordinator

import (
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
)

// metrics live in a registry per coordinator, so several coordinators in
// one process (tests, `up`) do not collide on the global registry.
//
// What a client saw: requests_total counts every API request by the HTTP
// status it was answered with and its outcome. A stream that started (a
// 200 and event-stream headers went out) and then ended with an error
// event is code="200", outcome="error": the status is what the client's
// HTTP library saw, the outcome what the request came to; the error's
// type (the OpenAI-shaped error's "type", the same set as plain error
// answers) is counted in request_errors_total. outcome="cancelled" is a
// client that went away before the answer was complete.
type metrics struct {
	reg              *prometheus.Registry
	requests         *prometheus.CounterVec
	requestErrors    *prometheus.CounterVec
	promptTokens     prometheus.Counter
	generationTokens prometheus.Counter
	queue            prometheus.Gauge
	running          prometheus.Gauge
	runningSeqs      prometheus.Gauge
	stepSeconds      prometheus.Histogram
	stepTokens       prometheus.Histogram
	stepSeqs         prometheus.Histogram
	ttft             prometheus.Histogram
	tpot             prometheus.Histogram
	itl              prometheus.Histogram
	requestSeconds   prometheus.Histogram
	rebuilds         prometheus.Counter
	preemptions      prometheus.Counter
	abortedSteps     prometheus.Counter
	cacheQueries     prometheus.Counter
	cacheHits        prometheus.Counter
	cacheBlocks      *prometheus.GaugeVec
}

func newMetrics() *metrics {
	m := &metrics{reg: prometheus.NewRegistry()}
	const ns, sub = "expertmesh", "coordinator"
	latency := prometheus.ExponentialBuckets(0.001, 2, 18) // 1 ms .. 131 s
	m.requests = prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "requests_total",
		Help: `HTTP requests by endpoint, the status code the client got, and outcome: success, error (an error answer, or a stream that started with a 200 and ended with an error event), cancelled (the client went away).`},
		[]string{"endpoint", "code", "outcome"})
	m.requestErrors = prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "request_errors_total",
		Help: "Requests that ended with an error, plain or as a stream's error event, by endpoint and the OpenAI error type the client got."},
		[]string{"endpoint", "type"})
	m.promptTokens = prometheus.NewCounter(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "prompt_tokens_total",
		Help: "Prompt tokens of admitted requests (once per choice)."})
	m.generationTokens = prometheus.NewCounter(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "generation_tokens_total",
		Help: "Tokens generated."})
	m.queue = prometheus.NewGauge(prometheus.GaugeOpts{Namespace: ns, Subsystem: sub, Name: "queue_depth",
		Help: "Sequences admitted but not placed on an attention node (waiting, preempted or being rebuilt)."})
	m.running = prometheus.NewGauge(prometheus.GaugeOpts{Namespace: ns, Subsystem: sub, Name: "running_requests",
		Help: "Generation requests being served (admitted, not finished)."})
	m.runningSeqs = prometheus.NewGauge(prometheus.GaugeOpts{Namespace: ns, Subsystem: sub, Name: "running_sequences",
		Help: "Sequences placed on attention nodes: the running batch, all nodes together."})
	m.stepSeconds = prometheus.NewHistogram(prometheus.HistogramOpts{Namespace: ns, Subsystem: sub, Name: "step_duration_seconds",
		Help: "Wall time of one attention-node step.", Buckets: prometheus.ExponentialBuckets(0.0005, 2, 16)})
	m.stepTokens = prometheus.NewHistogram(prometheus.HistogramOpts{Namespace: ns, Subsystem: sub, Name: "step_tokens",
		Help: "Tokens (rows) in one attention-node step.", Buckets: prometheus.ExponentialBuckets(1, 2, 12)})
	m.stepSeqs = prometheus.NewHistogram(prometheus.HistogramOpts{Namespace: ns, Subsystem: sub, Name: "step_sequences",
		Help: "Sequences in one attention-node step (its batch size).", Buckets: prometheus.ExponentialBuckets(1, 2, 10)})
	m.ttft = prometheus.NewHistogram(prometheus.HistogramOpts{Namespace: ns, Subsystem: sub, Name: "time_to_first_token_seconds",
		Help: "From a request's arrival (queueing included) to its first generated token.", Buckets: latency})
	m.tpot = prometheus.NewHistogram(prometheus.HistogramOpts{Namespace: ns, Subsystem: sub, Name: "time_per_output_token_seconds",
		Help: "Per finished choice of two tokens or more: (end - first token) / (tokens - 1).", Buckets: prometheus.ExponentialBuckets(0.0005, 2, 16)})
	m.itl = prometheus.NewHistogram(prometheus.HistogramOpts{Namespace: ns, Subsystem: sub, Name: "inter_token_latency_seconds",
		Help: "Time between consecutive generated tokens of a choice.", Buckets: prometheus.ExponentialBuckets(0.0005, 2, 16)})
	m.requestSeconds = prometheus.NewHistogram(prometheus.HistogramOpts{Namespace: ns, Subsystem: sub, Name: "request_duration_seconds",
		Help: "End-to-end time of a generation request that finished.", Buckets: latency})
	m.rebuilds = prometheus.NewCounter(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "rebuilds_total",
		Help: "Sequences placed again (to be re-prefilled) after their attention node failed or left; one that found no node to go to is not counted."})
	m.preemptions = prometheus.NewCounter(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "preemptions_total",
		Help: "Sequences preempted to free latent cache blocks (released, to re-prefill later)."})
	m.abortedSteps = prometheus.NewCounter(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "aborted_steps_total",
		Help: "Steps an attention node answered without applying them (no replica of some expert answered in time); their work is sent again."})
	m.cacheQueries = prometheus.NewCounter(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "prefix_cache_queries_total",
		Help: "Tokens sent in prefill chunks, each a prefix-cache lookup on nodes with prefix caching."})
	m.cacheHits = prometheus.NewCounter(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "prefix_cache_hits_total",
		Help: "Prefill tokens the attention nodes took from their prefix caches instead of computing them."})
	m.cacheBlocks = prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: ns, Subsystem: sub, Name: "latent_cache_blocks",
		Help: `Latent cache blocks per attention node (live nodes only) as of its last answer: state="used" (held by sequences), "free" (free, cached included), "cached" (free blocks holding prefix-cache content).`},
		[]string{"node", "state"})
	m.reg.MustRegister(m.rebuilds, m.preemptions, m.abortedSteps, m.requests, m.requestErrors, m.promptTokens, m.generationTokens,
		m.queue, m.running, m.runningSeqs, m.stepSeconds, m.stepTokens, m.stepSeqs, m.ttft, m.tpot, m.itl, m.requestSeconds,
		m.cacheQueries, m.cacheHits, m.cacheBlocks,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}
