package attnnode

import (
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/expertmesh/expertmesh/placement"
)

// Metric names of an attention node, for tests and dashboards. Label
// cardinality is bounded by the cluster: the only label is the expert
// node's id (one series per expert node this node dispatched to) and the
// outcome of a dispatch attempt.
const (
	MetricDispatchSeconds  = "expertmesh_attn_dispatch_seconds"
	MetricDispatchRows     = "expertmesh_attn_dispatch_rows_total"
	MetricDispatchBytes    = "expertmesh_attn_dispatch_bytes_total"
	MetricDispatchAttempts = "expertmesh_attn_dispatch_attempts_total"
	MetricStepSeconds      = "expertmesh_attn_step_seconds"
	MetricStepRows         = "expertmesh_attn_step_rows"
	MetricPlacementVersion = "expertmesh_attn_placement_version"
)

// Metrics are an attention node's Prometheus collectors: per expert node
// dispatch latency, rows and bytes; step time and rows; the placement
// version it routes by. A nil *Metrics records nothing, so the hooks in
// the step and dispatch paths cost one nil check when metrics are off.
// Register them with Collectors. Safe for concurrent use.
type Metrics struct {
	dispatch *prometheus.HistogramVec
	rows     *prometheus.CounterVec
	bytes    *prometheus.CounterVec
	attempts *prometheus.CounterVec
	step     prometheus.Histogram
	stepRows prometheus.Histogram
	version  prometheus.Collector

	// per caches the per-node series so the hot path looks a node up in
	// a map under a read lock instead of hashing label values.
	mu  sync.RWMutex
	per map[string]*nodeSeries
}

type nodeSeries struct {
	latency     prometheus.Observer
	rows, bytes prometheus.Counter
	ok, failed  prometheus.Counter
}

// dispatchBuckets span one dispatch round trip: 50 µs (a decode row on
// loopback) to about 13 s (a large prefill chunk on a slow expert node).
var dispatchBuckets = prometheus.ExponentialBuckets(50e-6, 2, 19)

// stepBuckets span one step: 1 ms to about 65 s.
var stepBuckets = prometheus.ExponentialBuckets(1e-3, 2, 17)

// rowBuckets span the rows of one step: 1 to 8192.
var rowBuckets = prometheus.ExponentialBuckets(1, 2, 14)

// NewMetrics returns an attention node's collectors. view, when not nil,
// is read at scrape time for the placement version the node routes by.
func NewMetrics(view placement.View) *Metrics {
	m := &Metrics{per: map[string]*nodeSeries{}}
	m.dispatch = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name:    MetricDispatchSeconds,
		Help:    "Round trip of one dispatch request to an expert node (one MoE layer of one micro-batch), from queueing to the decoded reply, by expert node.",
		Buckets: dispatchBuckets,
	}, []string{"expert_node"})
	m.rows = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: MetricDispatchRows,
		Help: "Hidden rows sent to an expert node in answered dispatch requests, by expert node.",
	}, []string{"expert_node"})
	m.bytes = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: MetricDispatchBytes,
		Help: "Hidden-state bytes sent to an expert node in answered dispatch requests (the same come back as partial sums), by expert node.",
	}, []string{"expert_node"})
	m.attempts = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: MetricDispatchAttempts,
		Help: "Dispatch attempts by expert node and outcome (ok, or failed: retried on the same or another replica, or abandoned).",
	}, []string{"expert_node", "outcome"})
	m.step = prometheus.NewHistogram(prometheus.HistogramOpts{
		Name:    MetricStepSeconds,
		Help:    "Duration of one scheduler step on this node: every row through every layer, micro-batches overlapped.",
		Buckets: stepBuckets,
	})
	m.stepRows = prometheus.NewHistogram(prometheus.HistogramOpts{
		Name:    MetricStepRows,
		Help:    "Rows (tokens) of one step: prefill chunks plus one per decoding sequence.",
		Buckets: rowBuckets,
	})
	m.version = prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: MetricPlacementVersion,
		Help: "Placement version of the routing this node dispatches by (0: none yet, or experts in-process).",
	}, func() float64 {
		if view == nil {
			return 0
		}
		rt, _ := view.Routing()
		if rt == nil || rt.Table == nil {
			return 0
		}
		return float64(rt.Table.Version)
	})
	return m
}

// Collectors are the metrics to register on a role's registry.
func (m *Metrics) Collectors() []prometheus.Collector {
	return []prometheus.Collector{m.dispatch, m.rows, m.bytes, m.attempts, m.step, m.stepRows, m.version}
}

func (m *Metrics) node(id string) *nodeSeries {
	m.mu.RLock()
	s := m.per[id]
	m.mu.RUnlock()
	if s != nil {
		return s
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if s = m.per[id]; s == nil {
		s = &nodeSeries{
			latency: m.dispatch.WithLabelValues(id),
			rows:    m.rows.WithLabelValues(id), bytes: m.bytes.WithLabelValues(id),
			ok: m.attempts.WithLabelValues(id, "ok"), failed: m.attempts.WithLabelValues(id, "failed"),
		}
		m.per[id] = s
	}
	return s
}

// observeDispatch records one finished dispatch attempt to node: its
// round trip, and for an answered one its rows and bytes.
func (m *Metrics) observeDispatch(node string, rows, bytes int, took time.Duration, err error) {
	if m == nil {
		return
	}
	s := m.node(node)
	if err != nil {
		s.failed.Inc()
		return
	}
	s.ok.Inc()
	s.latency.Observe(took.Seconds())
	s.rows.Add(float64(rows))
	s.bytes.Add(float64(bytes))
}

// observeStep records one step's duration and rows.
func (m *Metrics) observeStep(took time.Duration, rows int) {
	if m == nil {
		return
	}
	m.step.Observe(took.Seconds())
	m.stepRows.Observe(float64(rows))
}
