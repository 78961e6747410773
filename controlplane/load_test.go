package controlplane

import (
	"context"
	"errors"
	"math"
	"math/rand/v2"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil/promlint"

	"github.com/expertmesh/expertmesh/placement"
)

var loadTestShape = placement.Shape{Layers: 3, Experts: 8, Groups: 1, MoELayers: []int{1, 2}}

func TestLoadReportRoundTrip(t *testing.T) {
	sh := loadTestShape
	r := LoadReport{At: time.UnixMilli(1700000000123), Window: 90 * time.Second, Routed: make([][]uint64, sh.Layers),
		Served: map[string][]uint64{"e1": {0, 5, 1 << 40}, "e2": {0, 0, 7}}}
	r.Routed[1] = []uint64{0, 1, 2, 300, 4, 5, 6, 1 << 33}
	b, err := EncodeLoadReport(sh, r)
	if err != nil {
		t.Fatal(err)
	}
	back, err := DecodeLoadReport(sh, b)
	if err != nil {
		t.Fatal(err)
	}
	if !back.At.Equal(r.At) || back.Window != r.Window || back.Routed[0] != nil ||
		!equalU(back.Routed[1], r.Routed[1]) || !equalU(back.Routed[2], make([]uint64, 8)) ||
		!equalU(back.Served["e1"], r.Served["e1"]) || !equalU(back.Served["e2"], r.Served["e2"]) {
		t.Fatalf("round trip: %+v\n%s", back, b)
	}
	other := placement.Shape{Layers: 3, Experts: 9, Groups: 1, MoELayers: []int{1, 2}}
	for _, bad := range []string{`{`, `{"moe_layers":2,"experts":8,"routed":"!"}`, `{"moe_layers":2,"experts":8,"routed":""}`,
		`{"moe_layers":2,"experts":8,"window_ms":-1,"routed":""}`, string(b[:len(b)-1]) + `,"served":{"bad id":""}}`} {
		if _, err := DecodeLoadReport(sh, []byte(bad)); !errors.Is(err, ErrCorrupt) {
			t.Errorf("%s: %v", bad, err)
		}
	}
	if _, err := DecodeLoadReport(other, b); !errors.Is(err, ErrCorrupt) {
		t.Errorf("a report for another shape: %v", err)
	}
}

func equalU(a, b []uint64) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// FuzzDecodeLoadReport: a stored load report (outside input: etcd)
// decodes into one of the shape that encodes back to itself, or fails
// with ErrCorrupt; it never panics.
func FuzzDecodeLoadReport(f *testing.F) {
	r := LoadReport{Window: time.Second, Routed: [][]uint64{nil, {1, 2, 3, 4, 5, 6, 7, 8}, {8, 7, 6, 5, 4, 3, 2, 1}}, Served: map[string][]uint64{"x": {0, 1, 2}}}
	b, _ := EncodeLoadReport(loadTestShape, r)
	f.Add(string(b))
	f.Add(`{"moe_layers":2,"experts":8,"routed":"AAAAAAAAAAAAAAAAAAAAAA=="}`)
	f.Fuzz(func(t *testing.T, s string) {
		r, err := DecodeLoadReport(loadTestShape, []byte(s))
		if err != nil {
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("error %v does not wrap ErrCorrupt", err)
			}
			return
		}
		b, err := EncodeLoadReport(loadTestShape, r)
		if err != nil {
			t.Fatal(err)
		}
		again, err := DecodeLoadReport(loadTestShape, b)
		if err != nil || len(again.Routed) != len(r.Routed) || len(again.Served) != len(r.Served) {
			t.Fatalf("re-encoded report does not decode alike: %v", err)
		}
	})
}

// skewedLoad is a load on tinyShape's layers where a few experts take
// most tokens (a Zipf law, different hot experts per layer).
func skewedLoad(shape placement.Shape, seed uint64) [][]uint64 {
	r := rand.New(rand.NewPCG(seed, 1))
	out := make([][]uint64, shape.Layers)
	for _, l := range shape.MoELayers {
		out[l] = make([]uint64, shape.Experts)
		for rank, e := range r.Perm(shape.Experts) {
			out[l][e] = uint64(math.Round(20000 / math.Pow(float64(rank+1), 1.2)))
		}
	}
	return out
}

// TestDecideWithLoad: with the same nodes, a plan for an observed load
// rebalances the placement made without one; planning again from that
// (the same load) changes nothing.
func TestDecideWithLoad(t *testing.T) {
	f := newFakeCluster(t)
	f.member(RoleExpert, "e1", StateServing).member(RoleExpert, "e2", StateServing).member(RoleExpert, "e3", StateServing)
	tb, err := placement.Plan(placement.PlanInput{Shape: f.shape, Nodes: []placement.Node{{ID: "e1"}, {ID: "e2"}, {ID: "e3"}}, Version: 1, Redundant: 4})
	if err != nil {
		t.Fatal(err)
	}
	b, _ := tb.MarshalJSON()
	f.put(f.k.Version(1), string(b)).put(f.k.Target(), "1").put(f.k.Active(), "1")
	cfg := ControllerConfig{Epoch: 1, Shape: f.shape, Redundant: 4}
	if d := decide(f.state(), cfg, nil, planLoad{}); d.publish != nil {
		t.Fatal("published without a change")
	}
	load := make([][]float64, f.shape.Layers)
	for l, row := range skewedLoad(f.shape, 3) {
		if row != nil {
			load[l] = make([]float64, len(row))
			for e, v := range row {
				load[l][e] = float64(v)
			}
		}
	}
	d := decide(f.state(), cfg, nil, planLoad{load: load, gen: 1})
	if d.publish == nil {
		t.Fatal("a skewed load made no new plan")
	}
	_, before := placement.Imbalance(tb, load)
	_, after := placement.Imbalance(d.publish, load)
	t.Logf("imbalance %.4f -> %.4f, %d replicas moved", before, after, placement.Moved(tb, d.publish))
	if after >= before || after > 1.05 {
		t.Fatalf("imbalance %.4f -> %.4f", before, after)
	}
	b, _ = d.publish.MarshalJSON()
	f.put(f.k.Version(2), string(b)).put(f.k.Target(), "2")
	if d := decide(f.state(), cfg, nil, planLoad{load: load, gen: 1}); d.publish != nil {
		t.Fatal("planning again from the plan for the same load published")
	}
}

// TestScheduledRebalance: an attention node reports a skewed load; the
// schedule finds the placement made without it over the threshold and
// switches, make-before-break, to one that balances it; the next checks
// find nothing worth moving. The record of the switch (moved replicas,
// bytes, duration, imbalance before and after) is in Status and on the
// metrics. A placement rebalance command then plans for the load too.
func TestScheduledRebalance(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t, 60*time.Second)
	e := startEtcd(t, ctx, t.TempDir(), "127.0.0.1:0")
	addr := e.ClientAddr()
	s := connect(t, ctx, addr)
	shape := tinyShape(t)
	inv := newInvariant(t)
	epoch, err := s.NextEpoch(ctx)
	if err != nil {
		t.Fatal(err)
	}
	a1 := startAttn(t, ctx, addr, shape, "a1")
	nodes := []*testNode{startExpert(t, ctx, addr, inv, shape, "e1", 0), startExpert(t, ctx, addr, inv, shape, "e2", 0), startExpert(t, ctx, addr, inv, shape, "e3", 0)}
	ctrl, err := StartController(ctx, s, ControllerConfig{Shape: shape, Epoch: epoch, Redundant: 6, ExpertBytes: 1000,
		RebalanceInterval: 200 * time.Millisecond, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer ctrl.Close()
	first := settled(t, ctx, ctrl, []*AttnView{a1.view}, nodes[0].hold, nodes[1].hold, nodes[2].hold)
	// The attention node acknowledges every routing while idle.
	ackCtx, stopAck := context.WithCancel(ctx)
	acked := make(chan struct{})
	go func() {
		defer close(acked)
		for {
			r, ch := a1.view.Routing()
			a1.view.InUse(r.Table.Version, r.Table.Version)
			select {
			case <-ch:
			case <-ackCtx.Done():
				return
			}
		}
	}()
	defer func() { stopAck(); <-acked }()

	var report atomic.Pointer[LoadReport]
	report.Store(&LoadReport{At: time.Now(), Window: time.Minute, Routed: skewedLoad(shape, 7)})
	lr := StartLoadReporter(s, a1.reg, shape, 50*time.Millisecond, func() LoadReport { return *report.Load() })
	defer lr.Close()
	st := waitStatus(t, ctx, ctrl, "a scheduled switch", func(cs ClusterStatus) bool {
		return cs.Rebalance.Switches["schedule"] > 0 && cs.Active == cs.Target
	})
	rec := st.Rebalance.Last
	t.Logf("switch %d -> %d (%s): %d replicas moved (%d bytes) in %.3f s, imbalance %.4f -> %.4f; status imbalance %.4f %v",
		rec.From, rec.To, rec.Reason, rec.Moved, rec.BytesMoved, rec.DurationSeconds, rec.ImbalanceBefore, rec.ImbalanceAfter,
		st.Load.ImbalanceWeighted, st.Load.Imbalance)
	if rec.From != first || rec.Reason != "schedule" || rec.Moved == 0 || rec.BytesMoved != 1000*int64(rec.Moved) || rec.DurationSeconds <= 0 {
		t.Fatalf("record %+v", rec)
	}
	// The planner's migration cost stops it short of perfect balance (a
	// move must buy 1% of a layer's mean node load); the margin and the
	// threshold are what the schedule checks.
	if rec.ImbalanceBefore <= DefaultRebalanceThreshold || rec.ImbalanceAfter > DefaultRebalanceThreshold ||
		rec.ImbalanceBefore-rec.ImbalanceAfter < DefaultRebalanceMargin*rec.ImbalanceBefore {
		t.Fatalf("imbalance %.4f -> %.4f", rec.ImbalanceBefore, rec.ImbalanceAfter)
	}
	if math.Abs(st.Load.ImbalanceWeighted-rec.ImbalanceAfter) > 1e-9 {
		t.Fatalf("status imbalance %.6f, the switch's %.6f", st.Load.ImbalanceWeighted, rec.ImbalanceAfter)
	}
	settled(t, ctx, ctrl, []*AttnView{a1.view}, nodes[0].hold, nodes[1].hold, nodes[2].hold)
	// The next checks leave it alone.
	waitStatus(t, ctx, ctrl, "a check after the switch", func(cs ClusterStatus) bool {
		return strings.Contains(cs.Rebalance.LastDecision, "skipped")
	})
	if cs := ctrl.Status(); cs.Rebalance.Switches["schedule"] != 1 || cs.Active != rec.To {
		t.Fatalf("more switches after the first: %+v", cs.Rebalance)
	}

	// The metrics say the same, and pass promlint.
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(ctrl.Collectors()...)
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]float64{}
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			name := mf.GetName()
			for _, lp := range m.GetLabel() {
				name += "," + lp.GetName() + "=" + lp.GetValue()
			}
			switch {
			case m.Counter != nil:
				got[name] = m.GetCounter().GetValue()
			case m.Gauge != nil:
				got[name] = m.GetGauge().GetValue()
			case m.Histogram != nil:
				got[name] = float64(m.GetHistogram().GetSampleCount())
			}
		}
	}
	for name, want := range map[string]float64{
		MetricRebalances + ",reason=schedule": 1, MetricRebalances + ",reason=initial": 1,
		MetricRebalanceBytes: float64(rec.BytesMoved), MetricPlacementVersion: float64(rec.To),
		MetricImbalanceWeighted: rec.ImbalanceAfter,
	} {
		if name == MetricRebalanceBytes {
			if got[name] < want {
				t.Errorf("%s = %v, want at least %v", name, got[name], want)
			}
			continue
		}
		if math.Abs(got[name]-want) > 1e-9 {
			t.Errorf("%s = %v, want %v (all: %v)", name, got[name], want, got)
		}
	}
	if got[MetricImbalance+",layer=1"] == 0 || got[MetricRebalanceDuration] < 2 {
		t.Errorf("metrics %v", got)
	}
	if probs, err := promlint.NewWithMetricFamilies(mfs).Lint(); err != nil || len(probs) > 0 {
		t.Fatalf("lint: %v %v", probs, err)
	}

	// The load shifts and a new coordinator (no schedule) takes over: it
	// adopts the placement as it is, planned for another load, and plans
	// for the new one only when asked.
	ctrl.Close()
	report.Store(&LoadReport{At: time.Now(), Window: time.Minute, Routed: skewedLoad(shape, 99)})
	for {
		cs, err := Show(ctx, s, shape)
		if err != nil {
			t.Fatal(err)
		}
		if cs.Load != nil && cs.Load.ImbalanceWeighted > 1.1 {
			break
		}
		select {
		case <-ctx.Done():
			t.Fatal("the shifted load never reached etcd")
		case <-time.After(20 * time.Millisecond): // polling etcd for our own write
		}
	}
	epoch2, err := s.NextEpoch(ctx)
	if err != nil {
		t.Fatal(err)
	}
	ctrl2, err := StartController(ctx, s, ControllerConfig{Shape: shape, Epoch: epoch2, Redundant: 6, ExpertBytes: 1000, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer ctrl2.Close()
	rev := mustSnapshot(t, ctx, s).Rev
	for {
		ch := ctrl2.Changes()
		if p, pending := ctrl2.processed(); p >= rev && !pending {
			break
		}
		select {
		case <-ch:
		case <-ctx.Done():
			t.Fatal("the new controller never settled")
		}
	}
	if cs := ctrl2.Status(); cs.Active != rec.To || cs.Target != rec.To || cs.Load.ImbalanceWeighted <= 1.1 {
		t.Fatalf("the new coordinator changed the placement by itself: active %d target %d, %+v", cs.Active, cs.Target, cs.Rebalance)
	}
	if err := RequestRebalance(ctx, s); err != nil {
		t.Fatal(err)
	}
	st = waitStatus(t, ctx, ctrl2, "a commanded switch", func(cs ClusterStatus) bool {
		return cs.Rebalance.Switches["command"] > 0 && cs.Active == cs.Target
	})
	t.Logf("command: %d replicas moved, imbalance %.4f -> %.4f", st.Rebalance.Last.Moved, st.Rebalance.Last.ImbalanceBefore, st.Rebalance.Last.ImbalanceAfter)
	if last := st.Rebalance.Last; last.ImbalanceAfter > DefaultRebalanceThreshold || last.ImbalanceAfter >= last.ImbalanceBefore {
		t.Fatalf("after the command: %+v", st.Rebalance.Last)
	}
}
