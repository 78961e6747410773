package expertnode

import (
	"bufio"
	"io"
	"math/rand/v2"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil/promlint"

	"github.com/expertmesh/expertmesh/internal/ops"
	"github.com/expertmesh/expertmesh/internal/wire"
	"github.com/expertmesh/expertmesh/model"
	meshpb "github.com/expertmesh/expertmesh/proto"
)

// scrape fetches url and returns every sample of the text exposition by
// its series, e.g. `expertmesh_expert_rows_total{layer="1"}`.
func scrape(t testing.TB, url string) map[string]float64 {
	t.Helper()
	c := &http.Client{Timeout: 10 * time.Second}
	resp, err := c.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(resp.Body)
		t.Fatalf("GET %s: %s: %s", url, resp.Status, b)
	}
	out := map[string]float64{}
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			t.Fatalf("sample %q: %v", line, err)
		}
		out[line[:i]] = v
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

// TestMetrics dispatches a known mix of requests, changes the placement,
// and checks the node's metrics as /metrics serves them, the per-expert
// counts, and that the families pass Prometheus' lint.
func TestMetrics(t *testing.T) {
	cfg := testConfig("1:0-79,2:all")
	cfg.Weights = model.ResidencyResident
	node := startNode(t, cfg)
	startBytes := 0.0
	for _, p := range node.Held().Pairs() {
		startBytes += float64(node.w.ExpertBytes(p[0], p[1]))
	}
	_, c := dial(t, node)
	ctx := testCtx(t)
	st, err := c.Dispatch(ctx)
	if err != nil {
		t.Fatal(err)
	}
	// Layer 1: 3 requests of 2 rows, k=2, experts < 80. Layer 2: one of 5
	// rows. Then one malformed and one naming an expert not held.
	type sent struct {
		layer, rows int
		ids         []int32
	}
	rng := rand.New(rand.NewPCG(8, 9))
	var reqs []sent
	for range 3 {
		reqs = append(reqs, sent{layer: 1, rows: 2})
	}
	reqs = append(reqs, sent{layer: 2, rows: 5})
	wantSlots := map[[2]int]uint64{}
	for i := range reqs {
		r := &reqs[i]
		x, ids, w := randomRows(rng, r.rows, 2, 64, 80)
		r.ids = ids
		for _, id := range ids {
			if id >= 0 {
				wantSlots[[2]int{r.layer, int(id)}]++
			}
		}
		if err := st.Send(&meshpb.DispatchRequest{Id: uint64(i), Layer: uint32(r.layer), Hidden: wire.F32Matrix(x, r.rows, 64), K: 2, ExpertIds: ids, GateWeights: w}); err != nil {
			t.Fatal(err)
		}
		if resp, err := st.Recv(); err != nil || resp.Code != 0 {
			t.Fatalf("request %d: %v %v", i, resp, err)
		}
	}
	bad := validRequest(10)
	bad.K = 0
	if err := st.Send(bad); err != nil {
		t.Fatal(err)
	}
	if resp, err := st.Recv(); err != nil || resp.Code == 0 {
		t.Fatalf("malformed request: %v %v", resp, err)
	}
	if r := dispatchOne(t, st, 11, 1, 100); r.Code == 0 {
		t.Fatal("expert 100 of layer 1 is not held, yet the request succeeded")
	}
	st.CloseSend()

	if err := node.Hold(ctx, mustSet(t, "1:80-89")); err != nil {
		t.Fatal(err)
	}
	holdBytes := 0.0
	for e := 80; e <= 89; e++ {
		holdBytes += float64(node.w.ExpertBytes(1, e))
	}
	if err := node.Release(mustSet(t, "2:150-159")); err != nil {
		t.Fatal(err)
	}
	node.SetPlacementVersion(7)

	o, err := ops.Start("127.0.0.1:0", node.Serving, node.Registry())
	if err != nil {
		t.Fatal(err)
	}
	defer o.Close()
	got := scrape(t, "http://"+o.Addr()+"/metrics")
	for series, want := range map[string]float64{
		`expertmesh_expert_dispatch_requests_total{code="OK"}`:                 4,
		`expertmesh_expert_dispatch_requests_total{code="InvalidArgument"}`:    1,
		`expertmesh_expert_dispatch_requests_total{code="FailedPrecondition"}`: 1,
		`expertmesh_expert_dispatch_requests_total{code="Unavailable"}`:        0,
		`expertmesh_expert_rows_total{layer="1"}`:                              6,
		`expertmesh_expert_rows_total{layer="2"}`:                              5,
		`expertmesh_expert_compute_seconds_count`:                              4,
		`expertmesh_expert_queue_seconds_count`:                                4,
		`expertmesh_expert_experts_held`:                                       80 + 10 + 150,
		`expertmesh_expert_experts_resident`:                                   80 + 10 + 150,
		`expertmesh_expert_placement_version`:                                  7,
		`expertmesh_expert_load_seconds_count`:                                 2, // the start and the Hold
		`expertmesh_expert_loaded_bytes_total`:                                 startBytes + holdBytes,
	} {
		if v, ok := got[series]; !ok || v != want {
			t.Errorf("%s = %v (present %v), want %v", series, v, ok, want)
		}
	}
	if _, ok := got[`expertmesh_expert_rows_total{layer="0"}`]; ok {
		t.Error("rows exported for dense layer 0")
	}
	if got[`expertmesh_expert_compute_seconds_sum`] <= 0 || got[`expertmesh_expert_load_seconds_sum`] <= 0 {
		t.Errorf("compute sum %v, load sum %v: want > 0", got[`expertmesh_expert_compute_seconds_sum`], got[`expertmesh_expert_load_seconds_sum`])
	}
	if _, ok := got["go_goroutines"]; !ok {
		t.Error("the ops endpoint's Go collector is missing")
	}

	load, compute := node.ExpertLoad(), node.ExpertCompute()
	if load[0] != nil || compute[0] != nil {
		t.Error("per-expert counts for dense layer 0")
	}
	for _, l := range []int{1, 2} {
		for e := range 160 {
			if want := wantSlots[[2]int{l, e}]; load[l][e] != want {
				t.Errorf("ExpertLoad[%d][%d] = %d, want %d", l, e, load[l][e], want)
			}
			if (compute[l][e] > 0) != (load[l][e] > 0) {
				t.Errorf("ExpertCompute[%d][%d] = %v with %d rows", l, e, compute[l][e], load[l][e])
			}
		}
	}

	mfs, err := node.Registry().Gather()
	if err != nil {
		t.Fatal(err)
	}
	problems, err := promlint.NewWithMetricFamilies(mfs).Lint()
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		if strings.HasPrefix(p.Metric, "expertmesh_") {
			t.Errorf("promlint: %s: %s", p.Metric, p.Text)
		}
	}
}
