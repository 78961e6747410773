package localcluster

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"net/http"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/expertmesh/expertmesh/kernels"
	"github.com/expertmesh/expertmesh/model"
	"github.com/prometheus/common/expfmt"
	prommodel "github.com/prometheus/common/model"
)

// The load-balancing acceptance test (issue 12): a skewed model (tiny-v2
// with --zipf 1.2: in each MoE layer a few experts take most tokens), 4
// expert nodes with room for 16 redundant replicas per layer, steady
// load from chaos_test.go's 16 streams. The placement starts uniform
// (no load observed yet); `placement rebalance` plans for the load the
// attention node reported. Measured: imbalance before and after (from
// the tokens the expert nodes really served in each phase, and as the
// coordinator reports it), throughput before, around and after the
// switch, zero failed requests, greedy outputs identical to the
// single-process engine's.

const (
	rebalanceZipf      = 1.2
	rebalanceRedundant = 16
	// rebalanceGoal is issue 12's target for the token-weighted imbalance
	// after rebalancing.
	rebalanceGoal = 1.05
	// servedGoal bounds the imbalance of the tokens the expert nodes
	// really served after rebalancing. Looser than rebalanceGoal since an
	// expert with few rows in a dispatch goes whole to one replica, to the
	// node with the least work in it, counting each expert's weight stream
	// as 16 rows (attnnode/load_share.go): that evens out time, not tokens.
	// With the plan at 1.00-1.01, served tokens came out at 1.01-1.03 or
	// 1.06-1.08 by the run (35 runs from db9bc05 on, 2026-12-03; at most
	// 1.0797), against 1.26-1.35 before the rebalance.
	servedGoal = 1.10
	// rebalancePhase is how many requests the before and after phases
	// each complete (tens of thousands of expert tokens per layer).
	rebalancePhase = 8 * chaosStreams
)

// clusterView is what the test reads of GET /v1/cluster.
type clusterView struct {
	ControlPlane struct {
		Active uint64 `json:"active_version"`
		Target uint64 `json:"target_version"`
		Load   *struct {
			Tokens            float64   `json:"tokens"`
			Imbalance         []float64 `json:"imbalance"`
			ImbalanceWeighted float64   `json:"imbalance_weighted"`
		} `json:"load"`
		ExpertLoad *struct {
			Layers []int       `json:"layers"`
			Nodes  []string    `json:"nodes"`
			Tokens [][]float64 `json:"tokens"`
		} `json:"expert_load"`
		Rebalance *struct {
			Switches map[string]int `json:"switches"`
			Last     *struct {
				From            uint64  `json:"from_version"`
				To              uint64  `json:"to_version"`
				Reason          string  `json:"reason"`
				Moved           int     `json:"moved_replicas"`
				BytesMoved      int64   `json:"bytes_moved"`
				DurationSeconds float64 `json:"duration_seconds"`
				ImbalanceBefore float64 `json:"imbalance_before"`
				ImbalanceAfter  float64 `json:"imbalance_after"`
			} `json:"last"`
		} `json:"rebalance"`
	} `json:"control_plane"`
}

func readCluster(url string) (clusterView, bool) {
	var v clusterView
	resp, err := http.Get(url + "/v1/cluster")
	if err != nil {
		return v, false
	}
	defer resp.Body.Close()
	return v, resp.StatusCode == 200 && json.NewDecoder(resp.Body).Decode(&v) == nil
}

// served is the tokens each expert node served per MoE layer, summed over
// attention nodes (/v1/cluster's expert_load), by layer then node id.
func served(v clusterView) map[int]map[string]float64 {
	out := map[int]map[string]float64{}
	el := v.ControlPlane.ExpertLoad
	if el == nil {
		return out
	}
	for i, l := range el.Layers {
		out[l] = map[string]float64{}
		for j, id := range el.Nodes {
			out[l][id] = el.Tokens[i][j]
		}
	}
	return out
}

func totalServed(v clusterView) float64 {
	sum := 0.0
	for _, per := range served(v) {
		for _, x := range per {
			sum += x
		}
	}
	return sum
}

// scrapeServed reads the tokens each expert node served per MoE layer
// straight from the attention nodes' ops /metrics
// (expertmesh_attn_served_tokens_total{layer,expert_node}, summed over
// attention nodes): the counts of this moment, where /v1/cluster's lag by
// up to a load-report interval and would mix traffic of the placement
// before a switch into a phase after it.
func scrapeServed(t *testing.T, c *Cluster) map[int]map[string]float64 {
	t.Helper()
	out := map[int]map[string]float64{}
	for _, ch := range c.Children() {
		if ch.Role != "attn" {
			continue
		}
		resp, err := http.Get("http://" + ch.OpsAddr + "/metrics")
		if err != nil {
			t.Fatalf("%s /metrics: %v", ch.Name, err)
		}
		p := expfmt.NewTextParser(prommodel.UTF8Validation)
		fams, err := p.TextToMetricFamilies(resp.Body)
		resp.Body.Close()
		if err != nil {
			t.Fatalf("%s /metrics: %v", ch.Name, err)
		}
		fam := fams["expertmesh_attn_served_tokens_total"]
		if fam == nil {
			t.Fatalf("%s /metrics has no expertmesh_attn_served_tokens_total", ch.Name)
		}
		for _, m := range fam.GetMetric() {
			var layer int
			var node string
			for _, lp := range m.GetLabel() {
				switch lp.GetName() {
				case "layer":
					fmt.Sscan(lp.GetValue(), &layer)
				case "expert_node":
					node = lp.GetValue()
				}
			}
			if out[layer] == nil {
				out[layer] = map[string]float64{}
			}
			out[layer][node] += m.GetCounter().GetValue()
		}
	}
	return out
}

// servedImbalance is issue 12's imbalance of the tokens served between
// two readings: per layer max over nodes / mean over nodes (nodes: those
// of the later reading), and the mean weighted by each layer's tokens.
func servedImbalance(b, a map[int]map[string]float64) (perLayer map[int]float64, weighted float64, detail string) {
	perLayer = map[int]float64{}
	var sw, swi float64
	var parts []string
	for _, l := range slices.Sorted(maps.Keys(a)) {
		var most, sum float64
		var row []string
		for _, id := range slices.Sorted(maps.Keys(a[l])) {
			d := a[l][id] - b[l][id]
			most, sum = max(most, d), sum+d
			row = append(row, fmt.Sprintf("%s %.0f", id, d))
		}
		n := float64(len(a[l]))
		if sum == 0 {
			continue
		}
		imb := most / (sum / n)
		perLayer[l] = imb
		sw += sum
		swi += sum * imb
		parts = append(parts, fmt.Sprintf("layer %d [%s]: %.4f", l, strings.Join(row, ", "), imb))
	}
	if sw == 0 {
		return perLayer, 0, "no tokens"
	}
	return perLayer, swi / sw, strings.Join(parts, "; ")
}

// throughput is the generated tokens per second of requests that ended
// within [from, to).
func throughput(res []result, from, to time.Time) (float64, int) {
	tokens, n := 0, 0
	for _, r := range res {
		if r.err == nil && !r.end.Before(from) && r.end.Before(to) {
			tokens += len(r.tokens)
			n++
		}
	}
	return float64(tokens) / to.Sub(from).Seconds(), n
}

// latencies are the median latency of requests that ended before from
// and the worst of those overlapping [from, to].
func latencies(res []result, from, to time.Time) (median, worst time.Duration) {
	var before []time.Duration
	for _, r := range res {
		d := r.end.Sub(r.start)
		switch {
		case r.end.Before(from):
			before = append(before, d)
		case !r.start.After(to):
			worst = max(worst, d)
		}
	}
	slices.Sort(before)
	if len(before) > 0 {
		median = before[len(before)/2]
	}
	return median, worst
}

// referenceOn is what the single-process engine generates for every chaos
// prompt on the checkpoint in dir.
func referenceOn(t *testing.T, dir string) map[string][]int {
	t.Helper()
	w, err := model.Load(dir, model.LoadOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	pool := kernels.NewPool(1)
	defer pool.Close()
	eng := model.NewEngine(w, pool, nil)
	out := map[string][]int{}
	for _, p := range chaosPrompts() {
		cache, _ := model.NewLatentCache(w.Config, 16, 64)
		res, err := eng.Generate(context.Background(), cache, model.GenerateRequest{Prompt: p, MaxTokens: chaosMaxTokens})
		if err != nil {
			t.Fatal(err)
		}
		out[fmt.Sprint(p)] = res.Tokens
	}
	return out
}

var (
	zipfOnce sync.Once
	zipfDir  string
	zipfRefs map[string][]int
)

// skewedModel generates the skewed checkpoint once per test binary.
func skewedModel(t *testing.T) (string, map[string][]int) {
	t.Helper()
	zipfOnce.Do(func() {
		p, _ := model.IsPreset("tiny-v2")
		dir := filepath.Join(filepath.Dir(modelDir), "tiny-v2-zipf")
		if err := model.GenerateCheckpoint(dir, p, model.GenOptions{Seed: 5, Zipf: rebalanceZipf}); err != nil {
			t.Fatal(err)
		}
		zipfDir, zipfRefs = dir, referenceOn(t, dir)
	})
	if zipfRefs == nil {
		t.Fatal("no skewed model (generating it failed earlier)")
	}
	return zipfDir, zipfRefs
}

func TestRebalanceSkewedLoad(t *testing.T) {
	if testing.Short() {
		t.Skip("starts processes")
	}
	dir, refs := skewedModel(t)
	c := startChaos(t, 1, 4, func(cfg *Config) {
		cfg.ModelDir = dir
		cfg.CoordinatorArgs = append(cfg.CoordinatorArgs, "--redundant-experts", fmt.Sprint(rebalanceRedundant))
		cfg.AttnArgs = append(cfg.AttnArgs, "--load-report-interval", "500ms")
	})
	l := startLoad(t, c.URL)
	l.warm(t)

	// Before: the uniform placement under the skewed load, once the
	// attention node has reported plenty of it.
	start, _ := readCluster(c.URL)
	startServed := scrapeServed(t, c)
	beganBefore := time.Now()
	l.waitProgress(t, beganBefore, rebalancePhase, 2*time.Minute)
	beforeServed := scrapeServed(t, c)
	var before clusterView
	eventually(t, "a load report covering the before phase", time.Minute, func() bool {
		v, ok := readCluster(c.URL)
		before = v
		return ok && v.ControlPlane.Load != nil && totalServed(v) > totalServed(start)
	})
	_, imbBefore, detailBefore := servedImbalance(startServed, beforeServed)
	reported := before.ControlPlane.Load.ImbalanceWeighted
	from := before.ControlPlane.Active

	// Rebalance, under load.
	trigger := time.Now()
	expertmesh(t, c, "placement", "rebalance")
	var switched clusterView
	took := eventually(t, "the rebalanced placement active", time.Minute, func() bool {
		v, ok := readCluster(c.URL)
		switched = v
		cp := v.ControlPlane
		return ok && cp.Active > from && cp.Active == cp.Target && cp.Rebalance != nil && cp.Rebalance.Switches["command"] > 0
	})
	activated := time.Now()
	rec := switched.ControlPlane.Rebalance.Last

	// After: a fresh phase under the new placement.
	l.waitProgress(t, activated, chaosStreams, time.Minute) // requests that began before the switch are out of the way
	mark, _ := readCluster(c.URL)
	markServed := scrapeServed(t, c)
	beganAfter := time.Now()
	l.waitProgress(t, beganAfter, rebalancePhase, 2*time.Minute)
	afterServed := scrapeServed(t, c)
	var after clusterView
	eventually(t, "a load report covering the after phase", time.Minute, func() bool {
		v, ok := readCluster(c.URL)
		after = v
		return ok && totalServed(v) > totalServed(mark)
	})
	endAfter := time.Now()
	res := l.finish()

	perAfter, imbAfter, detailAfter := servedImbalance(markServed, afterServed)
	tpBefore, nBefore := throughput(res, beganBefore, trigger)
	tpDuring, nDuring := throughput(res, trigger.Add(-time.Second), activated.Add(time.Second))
	med, worst := latencies(res, trigger, activated)
	tpAfter, nAfter := throughput(res, beganAfter, endAfter)
	t.Logf("before: served imbalance %.4f (%s); the coordinator reports %.4f for the load window", imbBefore, detailBefore, reported)
	t.Logf("rebalance: version %d -> %d (%s), %d expert replicas loaded = %d bytes, published to activated in %.0f ms (command to active seen in %v); planned imbalance %.4f -> %.4f",
		rec.From, rec.To, rec.Reason, rec.Moved, rec.BytesMoved, 1000*rec.DurationSeconds, took.Round(time.Millisecond), rec.ImbalanceBefore, rec.ImbalanceAfter)
	t.Logf("after: served imbalance %.4f (%s); the coordinator reports %.4f", imbAfter, detailAfter, after.ControlPlane.Load.ImbalanceWeighted)
	t.Logf("throughput (generated tokens/s of requests ending in the phase): before %.0f (%d requests), from 1 s before the command to 1 s after activation %.0f (%d), after %.0f (%d); median request latency before %v, worst of the requests overlapping the switch %v",
		tpBefore, nBefore, tpDuring, nDuring, tpAfter, nAfter, med.Round(time.Millisecond), worst.Round(time.Millisecond))

	if imbBefore < 1.2 {
		t.Errorf("served imbalance before %.4f: the skewed model should unbalance a uniform placement", imbBefore)
	}
	if imbAfter > servedGoal {
		t.Errorf("served imbalance after %.4f (per layer %v), want at most %.2f", imbAfter, perAfter, servedGoal)
	}
	if rec.From != from || rec.Moved == 0 || rec.BytesMoved <= 0 || rec.ImbalanceAfter > rebalanceGoal {
		t.Errorf("rebalance record %+v", *rec)
	}
	if v := after.ControlPlane.Load.ImbalanceWeighted; v > rebalanceGoal {
		t.Errorf("the coordinator reports imbalance %.4f after, want at most %.2f", v, rebalanceGoal)
	}
	// The coordinator's /metrics carries the switch.
	addr := strings.TrimPrefix(c.URL, "http://")
	for _, name := range []string{"expertmesh_placement_rebalances_total", "expertmesh_placement_rebalance_bytes_moved_total", "expertmesh_expert_imbalance_weighted", "expertmesh_placement_version"} {
		if v, ok := metric(addr, name); !ok || v <= 0 {
			t.Errorf("coordinator /metrics: %s = %v (%v)", name, v, ok)
		}
	}

	// Zero failures; every output what the engine computes undisturbed.
	failed := 0
	for _, r := range res {
		if r.err != nil {
			failed++
			t.Errorf("request %v failed: %v", r.prompt, r.err)
			continue
		}
		if want := refs[fmt.Sprint(r.prompt)]; !slices.Equal(r.tokens, want) {
			t.Errorf("request %v: tokens %v, undisturbed %v", r.prompt, r.tokens, want)
		}
	}
	t.Logf("%d requests, %d failed, every output checked against the single-process engine", len(res), failed)
}
