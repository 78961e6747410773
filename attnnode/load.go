package attnnode

import (
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/expertmesh/expertmesh/placement"
)

// Load statistics: what an attention node's steps route and where it was
// served. They feed the placement controller (through etcd, see
// controlplane.LoadReport) and /metrics.
const (
	// DefaultLoadWindow is how far back routed-token counts reach
	// (--load-window): long enough that a rebalance plans for the
	// traffic's mix rather than for the last few requests, short enough
	// that it follows a shift in the mix within minutes.
	DefaultLoadWindow = 5 * time.Minute
	// loadBuckets is how many intervals the window is cut into: it slides
	// by window/loadBuckets.
	loadBuckets = 30

	MetricRoutedTokens = "expertmesh_attn_routed_tokens_total"
	MetricServedTokens = "expertmesh_attn_served_tokens_total"
)

// LoadStats counts an attention node's expert traffic:
//
//   - routed tokens per (MoE layer, expert) over a sliding window: a ring
//     of loadBuckets per-interval counts, the oldest cleared as time
//     moves on. A token routed to k experts counts once for each of
//     them. This is the load the planner balances; it depends on the
//     model and the traffic, not on the placement.
//   - tokens served per (MoE layer, expert node) since the node started,
//     counted when a dispatch's answers are in: what each expert node
//     actually computed for this node, the placement's effect.
//
// Recording takes one mutex per (layer, micro-batch) and allocates
// nothing once a node's series exist. The shape is learnt from the first
// routing recorded. Safe for concurrent use.
type LoadStats struct {
	now func() time.Time

	mu struct {
		sync.Mutex
		width   time.Duration // of one bucket
		layers  []int         // MoE layer indexes
		index   []int         // layer -> index into layers, -1 if dense
		experts int
		// counts[b][li*experts+e]: tokens routed in the interval stamp[b].
		counts  [][]uint32
		stamp   []int64
		started time.Time // first record: how far back the window reaches
		routed  []uint64  // per MoE layer, since start (metrics)
		served  map[string][]uint64
	}
}

// NewLoadStats returns empty statistics with a window of window
// (DefaultLoadWindow if <= 0).
func NewLoadStats(window time.Duration) *LoadStats {
	s := &LoadStats{now: time.Now}
	s.SetWindow(window)
	return s
}

// SetWindow changes the window (DefaultLoadWindow if <= 0), clearing the
// routed counts.
func (s *LoadStats) SetWindow(window time.Duration) {
	if window <= 0 {
		window = DefaultLoadWindow
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.mu.width = max(window/loadBuckets, time.Millisecond)
	for b := range s.mu.counts {
		clear(s.mu.counts[b])
		s.mu.stamp[b] = -1
	}
}

// initLocked sizes the counters for shape.
func (s *LoadStats) initLocked(sh placement.Shape) {
	s.mu.layers, s.mu.experts = slices.Clone(sh.MoELayers), sh.Experts
	s.mu.index = make([]int, sh.Layers)
	for l := range s.mu.index {
		s.mu.index[l] = slices.Index(sh.MoELayers, l)
	}
	s.mu.counts = make([][]uint32, loadBuckets)
	s.mu.stamp = make([]int64, loadBuckets)
	for b := range s.mu.counts {
		s.mu.counts[b] = make([]uint32, len(sh.MoELayers)*sh.Experts)
		s.mu.stamp[b] = -1
	}
	s.mu.routed = make([]uint64, len(sh.MoELayers))
	s.mu.served = map[string][]uint64{}
	s.mu.started = s.now()
}

// route records one dispatch's routing: ids[:n*k] of layer, -1 for
// slots with no expert.
func (s *LoadStats) route(sh placement.Shape, layer int, ids []int32) {
	now := s.now()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.mu.counts == nil {
		s.initLocked(sh)
	}
	if layer < 0 || layer >= len(s.mu.index) || s.mu.index[layer] < 0 {
		return
	}
	li := s.mu.index[layer]
	tick := now.UnixNano() / int64(s.mu.width)
	b := int(tick % loadBuckets)
	if s.mu.stamp[b] != tick {
		clear(s.mu.counts[b])
		s.mu.stamp[b] = tick
	}
	row := s.mu.counts[b][li*s.mu.experts : (li+1)*s.mu.experts]
	n := uint64(0)
	for _, id := range ids {
		if id >= 0 && int(id) < len(row) {
			row[id]++
			n++
		}
	}
	s.mu.routed[li] += n
}

// serve records that expert node id computed slots tokens of layer.
func (s *LoadStats) serve(id string, layer, slots int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.mu.counts == nil || layer < 0 || layer >= len(s.mu.index) || s.mu.index[layer] < 0 {
		return
	}
	per := s.mu.served[id]
	if per == nil {
		per = make([]uint64, len(s.mu.layers))
		s.mu.served[id] = per
	}
	per[s.mu.index[layer]] += uint64(slots)
}

// LoadSnapshot is a copy of an attention node's load statistics.
type LoadSnapshot struct {
	// At is when it was taken; Window how far back Routed reaches (less
	// than the configured window while the node is young).
	At     time.Time
	Window time.Duration
	// Routed[layer][expert] is tokens routed in the window; nil rows for
	// dense layers; nil before the first step.
	Routed [][]uint64
	// Served[expert node id][layer] is tokens that node computed for this
	// one since it started; nil rows for dense layers.
	Served map[string][]uint64
}

// Snapshot copies the statistics.
func (s *LoadStats) Snapshot() LoadSnapshot {
	now := s.now()
	s.mu.Lock()
	defer s.mu.Unlock()
	snap := LoadSnapshot{At: now, Served: map[string][]uint64{}}
	if s.mu.counts == nil {
		return snap
	}
	tick := now.UnixNano() / int64(s.mu.width)
	snap.Window = min(now.Sub(s.mu.started), s.mu.width*loadBuckets)
	E := s.mu.experts
	snap.Routed = make([][]uint64, len(s.mu.index))
	for li, l := range s.mu.layers {
		row := make([]uint64, E)
		for b, c := range s.mu.counts {
			if st := s.mu.stamp[b]; st >= 0 && tick-st < loadBuckets {
				for e, v := range c[li*E : (li+1)*E] {
					row[e] += uint64(v)
				}
			}
		}
		snap.Routed[l] = row
	}
	for id, per := range s.mu.served {
		row := make([]uint64, len(s.mu.index))
		for li, l := range s.mu.layers {
			row[l] = per[li]
		}
		snap.Served[id] = row
	}
	return snap
}

// Collector exports the statistics on /metrics, with label cardinality
// bounded by the model's layers and the cluster's expert nodes, never by
// experts: expertmesh_attn_routed_tokens_total{layer} and
// expertmesh_attn_served_tokens_total{layer,expert_node}. Per-expert
// counts travel through etcd and /v1/cluster instead.
func (s *LoadStats) Collector() prometheus.Collector { return loadCollector{s} }

var (
	routedDesc = prometheus.NewDesc(MetricRoutedTokens,
		"Tokens this attention node routed to MoE layer's experts (a token routed to k experts counts k times), since start.",
		[]string{"layer"}, nil)
	servedDesc = prometheus.NewDesc(MetricServedTokens,
		"Tokens an expert node computed for this attention node, per MoE layer (a token counts once per expert of that node it used), since start.",
		[]string{"layer", "expert_node"}, nil)
)

type loadCollector struct{ s *LoadStats }

func (c loadCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- routedDesc
	ch <- servedDesc
}

func (c loadCollector) Collect(ch chan<- prometheus.Metric) {
	s := c.s
	s.mu.Lock()
	defer s.mu.Unlock()
	for li, l := range s.mu.layers {
		ch <- prometheus.MustNewConstMetric(routedDesc, prometheus.CounterValue, float64(s.mu.routed[li]), strconv.Itoa(l))
	}
	for id, per := range s.mu.served {
		for li, l := range s.mu.layers {
			ch <- prometheus.MustNewConstMetric(servedDesc, prometheus.CounterValue, float64(per[li]), strconv.Itoa(l), id)
		}
	}
}

// LoadStats is the node's expert load statistics; nil when its experts
// are in-process (nothing is dispatched, nothing to balance).
func (n *Node) LoadStats() *LoadStats {
	if n.remote == nil {
		return nil
	}
	return n.remote.load
}
