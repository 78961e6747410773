package attnnode

import (
	"context"
	"fmt"
	"math"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil/promlint"

	"github.com/expertmesh/expertmesh/placement"
)

var loadShape = placement.Shape{Layers: 3, Experts: 4, Groups: 1, MoELayers: []int{1, 2}}

// TestLoadStatsWindow: routed counts slide out of the window interval by
// interval; served counts are cumulative; dense layers and -1 slots are
// not counted; the collector exports per layer and node only.
func TestLoadStatsWindow(t *testing.T) {
	now := time.Unix(1000, 0)
	s := NewLoadStats(30 * time.Second) // 30 buckets of 1 s
	s.now = func() time.Time { return now }
	if snap := s.Snapshot(); snap.Routed != nil || snap.Window != 0 {
		t.Fatalf("empty stats: %+v", snap)
	}
	s.route(loadShape, 1, []int32{0, 1, 1, -1})
	s.route(loadShape, 2, []int32{3, 3})
	s.route(loadShape, 0, []int32{0}) // dense: ignored
	s.serve("a", 1, 3)
	now = now.Add(10 * time.Second)
	s.route(loadShape, 1, []int32{2})
	s.serve("b", 2, 2)
	snap := s.Snapshot()
	if got := fmt.Sprint(snap.Routed); got != "[[] [1 2 1 0] [0 0 0 2]]" {
		t.Fatalf("routed %s", got)
	}
	if snap.Window != 10*time.Second {
		t.Fatalf("window %v, want the 10 s the node has counted", snap.Window)
	}
	if got := fmt.Sprint(snap.Served["a"], snap.Served["b"]); got != "[0 3 0] [0 0 2]" {
		t.Fatalf("served %s", got)
	}
	// 25 s later the first interval has left the 30 s window.
	now = now.Add(25 * time.Second)
	snap = s.Snapshot()
	if got := fmt.Sprint(snap.Routed); got != "[[] [0 0 1 0] [0 0 0 0]]" {
		t.Fatalf("routed after 35 s: %s", got)
	}
	if snap.Window != 30*time.Second {
		t.Fatalf("window %v", snap.Window)
	}
	// A bucket reused for a new interval starts from zero.
	now = now.Add(30 * time.Second)
	s.route(loadShape, 1, []int32{3})
	if got := fmt.Sprint(s.Snapshot().Routed[1]); got != "[0 0 0 1]" {
		t.Fatalf("routed after reuse: %s", got)
	}
	if got := fmt.Sprint(s.Snapshot().Served["a"]); got != "[0 3 0]" {
		t.Fatalf("served is cumulative: %s", got)
	}

	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(s.Collector())
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	series := map[string]float64{}
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			var labels []string
			for _, lp := range m.GetLabel() {
				labels = append(labels, lp.GetName()+"="+lp.GetValue())
			}
			series[mf.GetName()+"{"+strings.Join(labels, ",")+"}"] = m.GetCounter().GetValue()
		}
	}
	want := map[string]float64{
		MetricRoutedTokens + "{layer=1}": 5, MetricRoutedTokens + "{layer=2}": 2,
		MetricServedTokens + "{expert_node=a,layer=1}": 3, MetricServedTokens + "{expert_node=a,layer=2}": 0,
		MetricServedTokens + "{expert_node=b,layer=1}": 0, MetricServedTokens + "{expert_node=b,layer=2}": 2,
	}
	if fmt.Sprint(series) != fmt.Sprint(want) {
		t.Fatalf("series %v, want %v", series, want)
	}
	probs, err := promlint.NewWithMetricFamilies(mfs).Lint()
	if err != nil || len(probs) > 0 {
		t.Fatalf("lint: %v %v", probs, err)
	}
}

// TestShareChoiceCredits: the rule alone, on one expert with three
// replicas and shares 0.5/0.3/0.2: counts follow the shares at every
// point to within the credit bounds (-1 below, m-1 = 2 above), rows' slots stay together where credit allows, a
// replica left out hands its part to the others, and a node far behind
// is diverted from.
func TestShareChoiceCredits(t *testing.T) {
	tab := placement.NewTable(loadShape, 1)
	for _, id := range []string{"a", "b", "c"} {
		if err := tab.Add(1, 0, id); err != nil {
			t.Fatal(err)
		}
	}
	if err := tab.SetShares(1, 0, []float64{5, 3, 2}); err != nil {
		t.Fatal(err)
	}
	var c shareChoice
	st := c.forTableLocked(tab)
	got := make([]int, 3)
	all := []candidate{{r: 0}, {r: 1}, {r: 2}}
	for n := 1; n <= 1000; n++ {
		cands := append([]candidate(nil), all...)
		if n%3 == 0 { // the row already goes to c
			cands[2].there = true
		}
		got[cands[st.choose(1, 0, cands)].r]++
		for r, share := range []float64{0.5, 0.3, 0.2} {
			if d := share*float64(n) - float64(got[r]); d < -1-1e-9 || d > 2+1e-9 {
				t.Fatalf("after %d slots: %v, replica %d off by %.1f", n, got, r, d)
			}
		}
	}
	// Without b, a and c split 5:2.
	clear(got)
	for range 700 {
		cands := []candidate{{r: 0}, {r: 2}}
		got[cands[st.choose(1, 0, cands)].r]++
	}
	if math.Abs(float64(got[0])-500) > 4 || got[1] != 0 {
		t.Fatalf("without b: %v, want about [500 0 200]", got)
	}
	// A node far behind is diverted from.
	cands := []candidate{{r: 0, load: 2*10 + divertRows}, {r: 1, load: 10}, {r: 2, load: 500}}
	if i := st.choose(1, 0, cands); cands[i].r != 1 {
		t.Fatalf("chose replica %d, want the least loaded", cands[i].r)
	}
	// The credit state follows tables: a new version starts afresh, the
	// previous one is kept for steps still on it, older ones go.
	next := placement.NewTable(loadShape, 2)
	if c.forTableLocked(next) == st || c.forTableLocked(tab) != st {
		t.Fatal("credit states of two versions mixed up")
	}
	c.forTableLocked(placement.NewTable(loadShape, 3))
	if c.forTableLocked(tab) == st {
		t.Fatal("the oldest version's credits were kept")
	}
}

// TestReplicaSharesSplitRows: two expert nodes hold every expert, with
// planned shares 0.5/0.5 and then 0.75/0.25 for every one; with every
// expert split slot by slot (splitRows 1: as prefill chunks' experts of
// splitRows rows or more are), real steps through the attention node
// split each expert's rows accordingly, as the expert nodes count them. The tolerance is the rule's own bound:
// with two replicas a credit stays within ±1, so each expert's rows are
// within one row of their share (nothing in this test fails or falls
// behind, so no correction steps in). Summed over the 128 (layer,
// expert) pairs those errors could in principle reach 128 of about 4200
// rows, but they have no common sign; 1% (about 40 rows) is checked.
// The node's LoadStats agree with what the expert nodes computed.
func TestReplicaSharesSplitRows(t *testing.T) {
	dir := genTiny(t, "tiny-v2-lite")
	for _, shares := range [][]float64{{1, 1}, {3, 1}} {
		t.Run(fmt.Sprintf("%v:%v", shares[0], shares[1]), func(t *testing.T) {
			a, b := startExpert(t, dir, "a", nil), startExpert(t, dir, "b", nil)
			rt := routing(t, dir, 1, a, b)
			sh := rt.Table.Shape()
			for _, l := range sh.MoELayers {
				for e := range sh.Experts {
					if err := rt.Table.SetShares(l, e, shares); err != nil {
						t.Fatal(err)
					}
				}
			}
			node := remoteNode(t, dir, newTestView(rt), 5*time.Second, 30*time.Second)
			node.remote.choice.splitRows = 1
			many := make([][]int, 12)
			for i := range many {
				many[i] = []int{1 + i, 20 + 3*i, 7, 100 + i, 3 * i, 40 + i}
			}
			bounded(t, 2*time.Minute, "load", func() { drive(t, node, many, 24, 4) })
			la, lb := a.node.ExpertLoad(), b.node.ExpertLoad()
			want := shares[0] / (shares[0] + shares[1])
			var ta, tb uint64
			for _, l := range sh.MoELayers {
				for e := range sh.Experts {
					x, y := la[l][e], lb[l][e]
					ta, tb = ta+x, tb+y
					if d := float64(x) - want*float64(x+y); math.Abs(d) > 1+1e-9 {
						t.Errorf("layer %d expert %d: a %d, b %d rows: a is off its share %.2f by %.1f rows", l, e, x, y, want, d)
					}
				}
			}
			got := float64(ta) / float64(ta+tb)
			t.Logf("shares %v: a computed %d expert rows, b %d: a's part %.4f (planned %.4f)", shares, ta, tb, got, want)
			if math.Abs(got-want) > 0.01 {
				t.Errorf("a's part %.4f, want %.4f ± 0.01", got, want)
			}
			snap := node.LoadStats().Snapshot()
			var routed uint64
			for _, l := range sh.MoELayers {
				for _, v := range snap.Routed[l] {
					routed += v
				}
			}
			if sa, sb := sum(snap.Served["a"]), sum(snap.Served["b"]); routed != ta+tb || sa != ta || sb != tb {
				t.Errorf("load stats: routed %d, served a %d b %d; the expert nodes computed a %d b %d", routed, sa, sb, ta, tb)
			}
		})
	}
}

func sum(xs []uint64) uint64 {
	var s uint64
	for _, x := range xs {
		s += x
	}
	return s
}

// TestChooseWholeTakesTurnsInShares: replicas with equal work take an
// expert whole in turns that follow the planned shares (credits charged
// by rows); less work wins over credit.
func TestChooseWholeTakesTurnsInShares(t *testing.T) {
	tab := placement.NewTable(loadShape, 1)
	for _, id := range []string{"a", "b"} {
		if err := tab.Add(1, 0, id); err != nil {
			t.Fatal(err)
		}
	}
	if err := tab.SetShares(1, 0, []float64{3, 1}); err != nil {
		t.Fatal(err)
	}
	var c shareChoice
	st := c.forTableLocked(tab)
	cands := []candidate{{r: 0}, {r: 1}}
	even := []int64{7, 7}
	got := make([]int, 2)
	for n := 1; n <= 400; n++ {
		got[cands[st.chooseWhole(1, 0, cands, 1, even)].r]++
		if d := 0.75*float64(n) - float64(got[0]); d < -1-1e-9 || d > 1+1e-9 {
			t.Fatalf("after %d dispatches of 1 row: %v, a off its share by %.2f", n, got, d)
		}
	}
	// b has less work: it takes the expert whatever the credits say.
	for range 5 {
		if i := st.chooseWhole(1, 0, cands, 3, []int64{7, 6}); cands[i].r != 1 {
			t.Fatalf("chose replica %d, want b with less work", cands[i].r)
		}
	}
}

// TestWholeExpertsBalanceDispatch: three expert nodes hold every expert;
// every dispatch of real steps sends each expert with fewer than
// splitRows rows whole to one node, evens the nodes' work out to within
// one expert (with one micro-batch nothing else is outstanding when a
// dispatch plans, so longest-first greedy leaves the busiest node at
// most its last expert above the least busy), and splits experts with
// more rows; the outputs are the single-process engine's.
func TestWholeExpertsBalanceDispatch(t *testing.T) {
	dir := genTiny(t, "tiny-v2-lite")
	a, b, c := startExpert(t, dir, "a", nil), startExpert(t, dir, "b", nil), startExpert(t, dir, "c", nil)
	cfg := DefaultConfig()
	cfg.ModelDir, cfg.Threads, cfg.CacheBytes, cfg.Placement = dir, 1, 8<<20, newTestView(routing(t, dir, 1, a, b, c))
	cfg.ListenAddr, cfg.MicroBatches = "", 1
	node, err := Start(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer node.Close()
	const split = 4
	node.remote.choice.splitRows = split
	var dispatches, wholeExperts, splitExperts, splitAcross int
	node.remote.choice.observe = func(layer int, ids, dest []int32) {
		dispatches++
		nodesOf := map[int32][]int32{}
		rowsOf := map[int32]int64{}
		for slot, n := range dest {
			if n < 0 {
				continue
			}
			id := ids[slot]
			rowsOf[id]++
			if !slices.Contains(nodesOf[id], n) {
				nodesOf[id] = append(nodesOf[id], n)
			}
		}
		work := make([]int64, 3)
		largest := int64(0)
		for id, on := range nodesOf {
			rows := rowsOf[id]
			if rows >= split {
				splitExperts++
				if len(on) > 1 {
					splitAcross++
				}
				continue
			}
			wholeExperts++
			if len(on) != 1 {
				t.Errorf("layer %d expert %d (%d rows) went to nodes %v, want one", layer, id, rows, on)
				continue
			}
			work[on[0]] += expertRowCost + rows
			largest = max(largest, expertRowCost+rows)
		}
		if slices.Max(work)-slices.Min(work) > largest {
			t.Errorf("layer %d: whole experts' work per node %v, spread above the largest expert's %d", layer, work, largest)
		}
	}
	many := make([][]int, 12)
	for i := range many {
		many[i] = []int{1 + i, 20 + 3*i, 7, 100 + i, 3 * i, 40 + i}
	}
	const maxTokens = 6
	var tokens [][]int
	var lps, echo [][]float64
	bounded(t, 2*time.Minute, "drive", func() { tokens, lps, echo = drive(t, node, many, maxTokens, 4) })
	checkPromptsAgainstReference(t, dir, many, tokens, lps, echo, maxTokens)
	t.Logf("%d dispatches: %d whole experts, %d split (%d of them over more than one node)", dispatches, wholeExperts, splitExperts, splitAcross)
	if wholeExperts == 0 || splitAcross == 0 {
		t.Fatalf("%d whole experts, %d split over nodes: the test did not exercise both rules", wholeExperts, splitAcross)
	}
}
