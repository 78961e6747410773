package controlplane

import (
	"strconv"

	"github.com/prometheus/client_golang/prometheus"
)

// Metric names of the placement controller, registered on the
// coordinator's /metrics (Controller.Collectors). Labels are bounded:
// the MoE layers, and what caused a switch.
const (
	MetricRebalances        = "expertmesh_placement_rebalances_total"
	MetricRebalanceDuration = "expertmesh_placement_rebalance_duration_seconds"
	MetricRebalanceBytes    = "expertmesh_placement_rebalance_bytes_moved_total"
	MetricPlacementVersion  = "expertmesh_placement_version"
	MetricImbalance         = "expertmesh_expert_imbalance"
	MetricImbalanceWeighted = "expertmesh_expert_imbalance_weighted"
	MetricRoutedWindow      = "expertmesh_expert_routed_tokens_window"
)

// switchReasons are the values of the reason label.
var switchReasons = []string{"initial", "membership", "command", "schedule"}

// controllerMetrics are the controller's collectors.
type controllerMetrics struct {
	c          *Controller
	rebalances *prometheus.CounterVec
	duration   prometheus.Histogram
	bytes      prometheus.Counter
}

// rebalanceBuckets span one switch, publish to activation: 10 ms (nothing
// to load) to about 10 min (a node's share of V3 made resident).
var rebalanceBuckets = prometheus.ExponentialBuckets(0.01, 2, 16)

func newControllerMetrics(c *Controller) *controllerMetrics {
	m := &controllerMetrics{c: c}
	m.rebalances = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: MetricRebalances,
		Help: "Placement versions activated (expert placement switches, make-before-break), by cause: initial, membership (expert nodes joined or left), command (placement rebalance) or schedule (--rebalance-interval found the imbalance over --rebalance-threshold and a plan cutting it by --rebalance-margin).",
	}, []string{"reason"})
	for _, r := range switchReasons {
		m.rebalances.WithLabelValues(r)
	}
	m.duration = prometheus.NewHistogram(prometheus.HistogramOpts{
		Name:    MetricRebalanceDuration,
		Help:    "Time from publishing a placement target to activating it: the expert nodes loading what it gave them while serving went on by the previous version.",
		Buckets: rebalanceBuckets,
	})
	m.bytes = prometheus.NewCounter(prometheus.CounterOpts{
		Name: MetricRebalanceBytes,
		Help: "Expert weight bytes placement switches made nodes load: replicas a version placed where the previous one had none, times one routed expert's bytes.",
	})
	return m
}

func (m *controllerMetrics) switched(r RebalanceRecord) {
	m.rebalances.WithLabelValues(r.Reason).Inc()
	m.duration.Observe(r.DurationSeconds)
	m.bytes.Add(float64(r.BytesMoved))
}

var (
	versionDesc = prometheus.NewDesc(MetricPlacementVersion,
		"Placement version attention nodes route by (the active version; 0: none yet).", nil, nil)
	imbalanceDesc = prometheus.NewDesc(MetricImbalance,
		"Expert load imbalance of an MoE layer under the active placement and the load the attention nodes observed in their window: max over expert nodes of tokens served / mean over expert nodes (served = Σ routed tokens of the experts a node holds × its replica's planned share). 1 is perfect balance.",
		[]string{"layer"}, nil)
	weightedDesc = prometheus.NewDesc(MetricImbalanceWeighted,
		"Mean of expertmesh_expert_imbalance over MoE layers, weighted by each layer's routed tokens.", nil, nil)
	routedDesc = prometheus.NewDesc(MetricRoutedWindow,
		"Tokens routed to an MoE layer's experts in the attention nodes' load window (a token routed to k experts counts k times), summed over attention nodes.",
		[]string{"layer"}, nil)
)

// statusCollector exports what Status says about placement and load.
type statusCollector struct{ c *Controller }

func (s statusCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- versionDesc
	ch <- imbalanceDesc
	ch <- weightedDesc
	ch <- routedDesc
}

func (s statusCollector) Collect(ch chan<- prometheus.Metric) {
	st := s.c.Status()
	ch <- prometheus.MustNewConstMetric(versionDesc, prometheus.GaugeValue, float64(st.Active))
	if st.Load == nil {
		return
	}
	ch <- prometheus.MustNewConstMetric(weightedDesc, prometheus.GaugeValue, st.Load.ImbalanceWeighted)
	for i, l := range st.Load.Layers {
		ch <- prometheus.MustNewConstMetric(imbalanceDesc, prometheus.GaugeValue, st.Load.Imbalance[i], strconv.Itoa(l))
		sum := 0.0
		for _, v := range st.Load.Routed[i] {
			sum += v
		}
		ch <- prometheus.MustNewConstMetric(routedDesc, prometheus.GaugeValue, sum, strconv.Itoa(l))
	}
}

// Collectors are the controller's metrics, for the coordinator's
// /metrics (coordinator.Config.Collectors).
func (c *Controller) Collectors() []prometheus.Collector {
	return []prometheus.Collector{c.metrics.rebalances, c.metrics.duration, c.metrics.bytes, statusCollector{c}}
}
