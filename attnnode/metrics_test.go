package attnnode

import (
	"context"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil/promlint"
	dto "github.com/prometheus/client_model/go"

	"github.com/expertmesh/expertmesh/placement"
	meshpb "github.com/expertmesh/expertmesh/proto"
)

// TestMetricsAfterRemoteSteps: after steps that dispatch to two expert
// nodes, the node's collectors hold one latency histogram and row counter
// per expert node, the steps and the placement version, and pass
// promlint (Prometheus naming conventions).
func TestMetricsAfterRemoteSteps(t *testing.T) {
	dir := genTiny(t, "tiny-v2")
	table, _ := startExperts(t, dir, 2)
	view := placement.NewStatic(table)
	cfg := DefaultConfig()
	cfg.ModelDir, cfg.Threads, cfg.CacheBytes, cfg.Placement = dir, 1, 4<<20, view
	cfg.Metrics = NewMetrics(view)
	node, err := Start(context.Background(), inProcess(cfg))
	if err != nil {
		t.Fatal(err)
	}
	defer node.Close()
	for step := uint64(1); step <= 3; step++ {
		if _, err := node.Step(context.Background(), &meshpb.StepRequest{Step: step, Work: []*meshpb.SeqWork{
			{SeqId: step, Tokens: []int32{1, 2, 3, 4}, Sample: true, ReserveTokens: 8},
		}}); err != nil {
			t.Fatal(err)
		}
	}
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(cfg.Metrics.Collectors()...)
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	problems, err := promlint.NewWithMetricFamilies(mfs).Lint()
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("promlint: %s: %s", p.Metric, p.Text)
	}
	byName := map[string]*dto.MetricFamily{}
	for _, mf := range mfs {
		byName[mf.GetName()] = mf
	}
	lat := byName[MetricDispatchSeconds]
	if lat == nil || len(lat.Metric) != 2 {
		t.Fatalf("%s: want one series per expert node (2), got %v", MetricDispatchSeconds, lat)
	}
	for _, m := range lat.Metric {
		if m.GetHistogram().GetSampleCount() == 0 || !strings.Contains(m.String(), "expert_node") {
			t.Errorf("dispatch latency series %v: no samples", m)
		}
	}
	rows := 0.0
	for _, m := range byName[MetricDispatchRows].GetMetric() {
		rows += m.GetCounter().GetValue()
	}
	if rows == 0 {
		t.Errorf("%s: no rows counted", MetricDispatchRows)
	}
	if c := byName[MetricStepSeconds].GetMetric()[0].GetHistogram().GetSampleCount(); c != 3 {
		t.Errorf("%s: %d steps, want 3", MetricStepSeconds, c)
	}
	if s := byName[MetricStepRows].GetMetric()[0].GetHistogram().GetSampleSum(); s != 12 {
		t.Errorf("%s: sum %v, want 12 rows", MetricStepRows, s)
	}
	if v := byName[MetricPlacementVersion].GetMetric()[0].GetGauge().GetValue(); v != float64(table.Version) {
		t.Errorf("%s = %v, want %d", MetricPlacementVersion, v, table.Version)
	}
}

// TestNilMetrics: a node without metrics records nothing and does not
// fail.
func TestNilMetrics(t *testing.T) {
	var m *Metrics
	m.observeStep(0, 1)
	m.observeDispatch("a", 1, 4, 0, nil)
}
