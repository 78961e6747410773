package controlplane

import (
	"context"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"time"

	"github.com/expertmesh/expertmesh/placement"
)

// DefaultLoadReportInterval is how often an attention node publishes its
// load report (--load-report-interval): one small etcd write per
// attention node per interval, never one per token.
const DefaultLoadReportInterval = 10 * time.Second

// LoadReport is what an attention node tells the placement controller
// about its expert traffic, at /expertmesh/<c>/load/<attn-id> under its
// lease.
type LoadReport struct {
	// At is when the report was taken; Window how far back Routed reaches.
	At     time.Time
	Window time.Duration
	// Routed[layer][expert] is the tokens the node routed to each expert
	// in the window (a token routed to k experts counts k times); nil
	// rows for dense layers.
	Routed [][]uint64
	// Served[expert node id][layer] is the tokens that node computed for
	// this attention node since the attention node started; nil rows (or
	// zeros) for dense layers.
	Served map[string][]uint64
}

// loadJSON is a LoadReport's stored form. Counts are unsigned varints,
// base64 (standard, padded): Routed for every MoE layer in order, experts
// in order (layers × experts values); each Served entry one value per MoE
// layer. A V3 report (58 MoE layers × 256 experts) is a few tens of KB.
type loadJSON struct {
	At       int64             `json:"at_ms"`
	WindowMS int64             `json:"window_ms"`
	Layers   int               `json:"moe_layers"`
	Experts  int               `json:"experts"`
	Routed   string            `json:"routed"`
	Served   map[string]string `json:"served,omitempty"`
}

// EncodeLoadReport writes r's stored form for shape.
func EncodeLoadReport(shape placement.Shape, r LoadReport) ([]byte, error) {
	lj := loadJSON{At: r.At.UnixMilli(), WindowMS: r.Window.Milliseconds(), Layers: len(shape.MoELayers), Experts: shape.Experts}
	var buf []byte
	for _, l := range shape.MoELayers {
		var row []uint64
		if l < len(r.Routed) {
			row = r.Routed[l]
		}
		if row != nil && len(row) != shape.Experts {
			return nil, fmt.Errorf("%w: load report: layer %d has %d experts, the model %d", ErrConfig, l, len(row), shape.Experts)
		}
		for e := range shape.Experts {
			var v uint64
			if row != nil {
				v = row[e]
			}
			buf = binary.AppendUvarint(buf, v)
		}
	}
	lj.Routed = base64.StdEncoding.EncodeToString(buf)
	if len(r.Served) > 0 {
		lj.Served = map[string]string{}
		for id, per := range r.Served {
			buf = buf[:0]
			for _, l := range shape.MoELayers {
				var v uint64
				if l < len(per) {
					v = per[l]
				}
				buf = binary.AppendUvarint(buf, v)
			}
			lj.Served[id] = base64.StdEncoding.EncodeToString(buf)
		}
	}
	return json.Marshal(lj)
}

// DecodeLoadReport reads a stored load report, checking it against
// shape.
func DecodeLoadReport(shape placement.Shape, data []byte) (LoadReport, error) {
	var lj loadJSON
	if err := json.Unmarshal(data, &lj); err != nil {
		return LoadReport{}, fmt.Errorf("%w: load report: %v", ErrCorrupt, err)
	}
	if lj.Layers != len(shape.MoELayers) || lj.Experts != shape.Experts {
		return LoadReport{}, fmt.Errorf("%w: load report for %d MoE layers × %d experts; the model has %d × %d", ErrCorrupt, lj.Layers, lj.Experts, len(shape.MoELayers), shape.Experts)
	}
	if lj.WindowMS < 0 {
		return LoadReport{}, fmt.Errorf("%w: load report: negative window", ErrCorrupt)
	}
	r := LoadReport{At: time.UnixMilli(lj.At), Window: time.Duration(lj.WindowMS) * time.Millisecond, Routed: make([][]uint64, shape.Layers)}
	vals, err := uvarints(lj.Routed, len(shape.MoELayers)*shape.Experts)
	if err != nil {
		return LoadReport{}, fmt.Errorf("%w: load report: routed: %v", ErrCorrupt, err)
	}
	for i, l := range shape.MoELayers {
		r.Routed[l] = vals[i*shape.Experts : (i+1)*shape.Experts]
	}
	if len(lj.Served) > 0 {
		r.Served = map[string][]uint64{}
		for id, s := range lj.Served {
			vals, err := uvarints(s, len(shape.MoELayers))
			if err != nil || !idPattern.MatchString(id) {
				return LoadReport{}, fmt.Errorf("%w: load report: served by %q: %v", ErrCorrupt, id, err)
			}
			per := make([]uint64, shape.Layers)
			for i, l := range shape.MoELayers {
				per[l] = vals[i]
			}
			r.Served[id] = per
		}
	}
	return r, nil
}

// uvarints decodes exactly n base64 varints.
func uvarints(s string, n int) ([]uint64, error) {
	b, err := base64.StdEncoding.DecodeString(s)
	if err != nil {
		return nil, err
	}
	out := make([]uint64, 0, n)
	for len(b) > 0 && len(out) < n {
		v, k := binary.Uvarint(b)
		if k <= 0 {
			return nil, fmt.Errorf("bad varint")
		}
		out = append(out, v)
		b = b[k:]
	}
	if len(out) != n || len(b) != 0 {
		return nil, fmt.Errorf("%d values and %d bytes left, want %d values", len(out), len(b), n)
	}
	return out, nil
}

// LoadReporter publishes an attention node's load reports under its
// registration's lease, one write per interval (Registration.Own: written
// again after every re-registration, gone with the lease).
type LoadReporter struct {
	cancel context.CancelFunc
	done   chan struct{}
}

// StartLoadReporter publishes source's report every interval
// (DefaultLoadReportInterval if <= 0) under reg's lease, skipping reports
// with no traffic yet (nil Routed). Close stops it.
func StartLoadReporter(s *Store, reg *Registration, shape placement.Shape, interval time.Duration, source func() LoadReport) *LoadReporter {
	if interval <= 0 {
		interval = DefaultLoadReportInterval
	}
	ctx, cancel := context.WithCancel(context.Background())
	r := &LoadReporter{cancel: cancel, done: make(chan struct{})}
	key := s.keys.Load(reg.Member().ID)
	log := s.log
	go func() {
		defer close(r.done)
		t := time.NewTicker(interval)
		defer t.Stop()
		var failed bool
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
			rep := source()
			if rep.Routed == nil {
				continue
			}
			b, err := EncodeLoadReport(shape, rep)
			if err == nil {
				err = reg.Own(key, string(b))
			}
			if err != nil && !failed {
				log.Warn("publishing the load report failed", "err", err)
			}
			failed = err != nil
		}
	}()
	return r
}

// Close stops publishing (the last report stays until the lease ends).
func (r *LoadReporter) Close() {
	r.cancel()
	<-r.done
}

// loadCache keeps decoded load reports across snapshots, keyed by
// attention node, re-decoding only a changed value.
type loadCache map[string]cachedLoad

type cachedLoad struct {
	raw string
	r   LoadReport
	err error
}

// observedLoad is the cluster's expert load as the live attention nodes
// report it: Routed summed over them (as Plan and Imbalance take it,
// [layer][expert]), Served summed per expert node, the longest window.
type observedLoad struct {
	routed  [][]float64
	tokens  float64 // Σ routed over MoE layers
	window  time.Duration
	served  map[string][]uint64
	reports int
}

// observedLoad decodes (through cache, which may be nil) and sums the
// load reports of the snapshot; bad reports are left out (and logged
// once per value when log is set).
func (st *clusterState) observedLoad(shape placement.Shape, cache loadCache, log *slog.Logger) observedLoad {
	ol := observedLoad{served: map[string][]uint64{}}
	for _, id := range slices.Sorted(maps.Keys(st.loads)) {
		raw := st.loads[id]
		c, hit := cache[id]
		if !hit || c.raw != raw {
			r, err := DecodeLoadReport(shape, []byte(raw))
			c = cachedLoad{raw: raw, r: r, err: err}
			if err != nil && log != nil {
				log.Warn("ignoring a load report", "attn", id, "err", err)
			}
			if cache != nil {
				cache[id] = c
			}
		}
		if c.err != nil {
			continue
		}
		ol.reports++
		ol.window = max(ol.window, c.r.Window)
		if ol.routed == nil {
			ol.routed = make([][]float64, shape.Layers)
			for _, l := range shape.MoELayers {
				ol.routed[l] = make([]float64, shape.Experts)
			}
		}
		for _, l := range shape.MoELayers {
			for e, v := range c.r.Routed[l] {
				ol.routed[l][e] += float64(v)
				ol.tokens += float64(v)
			}
		}
		for node, per := range c.r.Served {
			sum := ol.served[node]
			if sum == nil {
				sum = make([]uint64, shape.Layers)
				ol.served[node] = sum
			}
			for l, v := range per {
				sum[l] += v
			}
		}
	}
	for id := range cache {
		if _, ok := st.loads[id]; !ok {
			delete(cache, id)
		}
	}
	return ol
}

// LoadStatus is the cluster's observed expert load in ClusterStatus.
//
// Imbalance is defined once, in placement.Imbalance: for each MoE layer
// l, with the active placement's replicas and planned shares,
//
//	served(n)   = Σ over experts e node n holds of routed[l][e] × share of n's replica of e
//	imbalance_l = max over expert nodes n of served(n) / mean over expert nodes n of served(n)
//
// 1 is perfect balance; k means the busiest expert node does k times its
// fair part, so the layer's expert step takes k times as long as it would
// balanced. ImbalanceWeighted is the mean over MoE layers weighted by each
// layer's routed tokens.
type LoadStatus struct {
	// Reports is how many attention nodes' reports are summed.
	Reports int `json:"attention_node_reports"`
	// WindowSeconds is the longest window the reports cover.
	WindowSeconds float64 `json:"window_seconds"`
	// Tokens is the routed tokens in the window over all MoE layers (a
	// token routed to k experts counts k times).
	Tokens float64 `json:"tokens"`
	// Layers are the MoE layers; Imbalance[i] is layer Layers[i]'s under
	// the active placement (see above); Routed[i][e] the tokens routed to
	// expert e of layer Layers[i] in the window, summed over attention
	// nodes.
	Layers            []int       `json:"layers"`
	Imbalance         []float64   `json:"imbalance"`
	ImbalanceWeighted float64     `json:"imbalance_weighted"`
	Routed            [][]float64 `json:"routed"`
}

// ExpertLoad is how many tokens each expert node served per MoE layer,
// summed over the attention nodes that report (each counts from its own
// start; one that restarts or leaves takes its counts along): Tokens[i][j]
// is layer Layers[i] on node Nodes[j]. It has the shape of bench's
// expert_load, which subtracts a reading before a run from one after it
// and draws the difference as a heatmap.
type ExpertLoad struct {
	Layers []int       `json:"layers"`
	Nodes  []string    `json:"nodes"`
	Tokens [][]float64 `json:"tokens"`
}

// loadStatus describes the observed load under table t (may be nil).
func loadStatus(shape placement.Shape, ol observedLoad, t *placement.Table) (*LoadStatus, *ExpertLoad) {
	if ol.reports == 0 {
		return nil, nil
	}
	ls := &LoadStatus{Reports: ol.reports, WindowSeconds: ol.window.Seconds(), Tokens: ol.tokens, Layers: slices.Clone(shape.MoELayers)}
	var per []float64
	if t != nil && ol.tokens > 0 {
		per, ls.ImbalanceWeighted = placement.Imbalance(t, ol.routed)
	}
	for _, l := range shape.MoELayers {
		ls.Routed = append(ls.Routed, ol.routed[l])
		v := 0.0
		if per != nil {
			v = per[l]
		}
		ls.Imbalance = append(ls.Imbalance, v)
	}
	nodes := map[string]bool{}
	for id := range ol.served {
		nodes[id] = true
	}
	if t != nil {
		for _, id := range t.Nodes() {
			nodes[id] = true
		}
	}
	el := &ExpertLoad{Layers: slices.Clone(shape.MoELayers), Nodes: slices.Sorted(maps.Keys(nodes))}
	for _, l := range shape.MoELayers {
		row := make([]float64, len(el.Nodes))
		for j, id := range el.Nodes {
			if per := ol.served[id]; per != nil {
				row[j] = float64(per[l])
			}
		}
		el.Tokens = append(el.Tokens, row)
	}
	return ls, el
}

// RebalanceStatus is the controller's record of placement switches (not
// stored in etcd: a new coordinator starts it afresh).
type RebalanceStatus struct {
	// Interval, Threshold and Margin are the schedule (see
	// ControllerConfig; interval 0: no schedule).
	IntervalSeconds float64 `json:"interval_seconds"`
	Threshold       float64 `json:"threshold"`
	Margin          float64 `json:"margin"`
	// Switches counts activated placement versions by what caused them:
	// initial, membership, command, schedule.
	Switches map[string]int `json:"switches"`
	// Last is the most recent switch.
	Last *RebalanceRecord `json:"last,omitempty"`
	// LastDecision says what the schedule or a command last decided and
	// why (e.g. "skipped: imbalance 1.03 under threshold 1.10").
	LastDecision string `json:"last_decision,omitempty"`
}

// RebalanceRecord is one placement switch.
type RebalanceRecord struct {
	From   uint64 `json:"from_version"`
	To     uint64 `json:"to_version"`
	Reason string `json:"reason"`
	// Moved is the expert replicas nodes had to load (placement.Moved);
	// BytesMoved that × one expert's weight bytes.
	Moved      int   `json:"moved_replicas"`
	BytesMoved int64 `json:"bytes_moved"`
	// DurationSeconds is from publishing the target to activating it:
	// planning aside, the time the new version took to be loaded
	// everywhere (serving went on by the old one meanwhile).
	DurationSeconds float64 `json:"duration_seconds"`
	// ImbalanceBefore and ImbalanceAfter are the weighted imbalance under
	// the load the plan was made for, by the old and the new version.
	ImbalanceBefore float64   `json:"imbalance_before"`
	ImbalanceAfter  float64   `json:"imbalance_after"`
	At              time.Time `json:"at"`
}
