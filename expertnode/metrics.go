package expertnode

import (
	"strconv"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc/codes"

	"github.com/expertmesh/expertmesh/model"
)

// Metric names, for tests and dashboards. Every series a node exports is
// created at Start, so the hot path only increments: no label lookup and
// no allocation per request. Label cardinality is bounded by the gRPC
// codes and the model's layers; per-expert counts are not labels (a V3
// node would export thousands of series) but ExpertLoad and ExpertCompute.
const (
	metricRequests    = "expertmesh_expert_dispatch_requests_total"
	metricRows        = "expertmesh_expert_rows_total"
	metricCompute     = "expertmesh_expert_compute_seconds"
	metricQueue       = "expertmesh_expert_queue_seconds"
	metricHeld        = "expertmesh_expert_experts_held"
	metricResident    = "expertmesh_expert_experts_resident"
	metricVersion     = "expertmesh_expert_placement_version"
	metricLoad        = "expertmesh_expert_load_seconds"
	metricLoadedBytes = "expertmesh_expert_loaded_bytes_total"
)

// numCodes is the number of gRPC codes (OK … Unauthenticated).
const numCodes = int(codes.Unauthenticated) + 1

// metrics are one node's Prometheus collectors, on the node's own
// registry.
type metrics struct {
	reg *prometheus.Registry
	// requests[code] counts answered dispatch requests by reply code.
	requests [numCodes]prometheus.Counter
	// rows[layer] counts rows computed per MoE layer; nil for dense ones.
	rows           []prometheus.Counter
	compute, queue prometheus.Histogram
	held, resident prometheus.Gauge
	version        prometheus.Gauge
	load           prometheus.Histogram
	loadedBytes    prometheus.Counter
}

// latencyBuckets cover one dispatch's compute or queueing: 10 µs (a decode
// row of a tiny model) to 5 s (a large prefill chunk of V3 on a CPU).
var latencyBuckets = prometheus.ExponentialBuckets(10e-6, 2, 20)

// loadBuckets cover one Hold: 1 ms (a few prefetched experts) to about
// 4 min (a node's whole share of V3 copied into resident memory).
var loadBuckets = prometheus.ExponentialBuckets(1e-3, 4, 10)

func newMetrics(mc *model.Config) *metrics {
	m := &metrics{reg: prometheus.NewRegistry()}
	requests := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: metricRequests,
		Help: "Dispatch requests answered, by the reply's gRPC code (OK, InvalidArgument, FailedPrecondition for an expert not held, Canceled, Unavailable for a request refused while draining, ...).",
	}, []string{"code"})
	for c := range numCodes {
		m.requests[c] = requests.WithLabelValues(codes.Code(c).String())
	}
	rows := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: metricRows,
		Help: "Rows computed, per MoE layer (a row counts once however many of its experts this node applied).",
	}, []string{"layer"})
	m.rows = make([]prometheus.Counter, mc.NumHiddenLayers)
	for l := range m.rows {
		if mc.IsMoELayer(l) {
			m.rows[l] = rows.WithLabelValues(strconv.Itoa(l))
		}
	}
	m.compute = prometheus.NewHistogram(prometheus.HistogramOpts{
		Name:    metricCompute,
		Help:    "Expert compute time of one dispatch request, under the node's compute lock.",
		Buckets: latencyBuckets,
	})
	m.queue = prometheus.NewHistogram(prometheus.HistogramOpts{
		Name:    metricQueue,
		Help:    "Time one dispatch request waited for the node's compute lock (other streams' batches, placement swaps).",
		Buckets: latencyBuckets,
	})
	m.held = prometheus.NewGauge(prometheus.GaugeOpts{
		Name: metricHeld,
		Help: "Routed experts (layer, expert) this node holds and serves.",
	})
	m.resident = prometheus.NewGauge(prometheus.GaugeOpts{
		Name: metricResident,
		Help: "Held experts computing from huge-page resident copies rather than the mapped checkpoint.",
	})
	m.version = prometheus.NewGauge(prometheus.GaugeOpts{
		Name: metricVersion,
		Help: "Placement version the control plane last applied to this node (0: static placement).",
	})
	m.load = prometheus.NewHistogram(prometheus.HistogramOpts{
		Name:    metricLoad,
		Help:    "Duration of one Hold or Load that gained experts (start's --experts included): resident copies or prefetch.",
		Buckets: loadBuckets,
	})
	m.loadedBytes = prometheus.NewCounter(prometheus.CounterOpts{
		Name: metricLoadedBytes,
		Help: "Expert weight bytes readied by Hold and Load (start's --experts included): what rebalancing moves.",
	})
	m.reg.MustRegister(requests, rows, m.compute, m.queue, m.held, m.resident, m.version, m.load, m.loadedBytes)
	return m
}

// expertStats counts, per (layer, expert), the rows computed and the
// compute time attributed to the expert, in flat arrays of atomics
// allocated once: the hot path adds, it never allocates.
type expertStats struct {
	experts int
	rows    []atomic.Uint64 // [layer*experts + expert]
	nanos   []atomic.Uint64 // [layer*experts + expert]
}

func newExpertStats(mc *model.Config) *expertStats {
	n := mc.NumHiddenLayers * mc.NumExperts()
	return &expertStats{experts: mc.NumExperts(), rows: make([]atomic.Uint64, n), nanos: make([]atomic.Uint64, n)}
}

// add records one computed request: each slot naming an expert counts one
// row for it, and the request's compute time is split evenly over its
// slots (an expert's FFN costs the same per row, so its share of the time
// is its share of the slots).
func (s *expertStats) add(layer int, ids []int32, d time.Duration) {
	base := layer * s.experts
	slots := 0
	for _, id := range ids {
		if id >= 0 {
			s.rows[base+int(id)].Add(1)
			slots++
		}
	}
	if slots == 0 || d <= 0 {
		return
	}
	per := uint64(d) / uint64(slots)
	for _, id := range ids {
		if id >= 0 {
			s.nanos[base+int(id)].Add(per)
		}
	}
}

// snapshot copies one array into [layer][expert], nil rows for dense
// layers.
func (s *expertStats) snapshot(mc *model.Config, a []atomic.Uint64) [][]uint64 {
	out := make([][]uint64, mc.NumHiddenLayers)
	for l := range out {
		if !mc.IsMoELayer(l) {
			continue
		}
		row := make([]uint64, s.experts)
		for e := range row {
			row[e] = a[l*s.experts+e].Load()
		}
		out[l] = row
	}
	return out
}

// Registry is the node's own Prometheus registry, holding only the node's
// metrics (the expertmesh_expert_* families); serve it at /metrics
// (internal/ops.Start adds the Go and process collectors to it).
func (n *Node) Registry() *prometheus.Registry { return n.metrics.reg }

// ExpertLoad is the rows computed per (layer, expert) since start:
// ExpertLoad()[layer][expert], with nil rows for dense layers. A row
// counts once for each of this node's experts it names. It is what the
// load balancer and /v1/cluster read; the counts are kept in memory, not
// exported as Prometheus labels.
func (n *Node) ExpertLoad() [][]uint64 { return n.stats.snapshot(n.mc, n.stats.rows) }

// ExpertCompute is the compute time attributed to each (layer, expert)
// since start, shaped like ExpertLoad: each request's compute time split
// evenly over the expert slots it named.
func (n *Node) ExpertCompute() [][]time.Duration {
	ns := n.stats.snapshot(n.mc, n.stats.nanos)
	out := make([][]time.Duration, len(ns))
	for l, row := range ns {
		if row == nil {
			continue
		}
		out[l] = make([]time.Duration, len(row))
		for e, v := range row {
			out[l][e] = time.Duration(v)
		}
	}
	return out
}

// SetPlacementVersion records the placement version the control plane has
// applied to this node (its Hold and Release for that version returned);
// it is exported as expertmesh_expert_placement_version and by
// PlacementVersion. It changes nothing the node serves.
func (n *Node) SetPlacementVersion(v uint64) {
	n.version.Store(v)
	n.metrics.version.Set(float64(v))
}

// PlacementVersion is the last version given to SetPlacementVersion (0:
// static placement).
func (n *Node) PlacementVersion() uint64 { return n.version.Load() }
