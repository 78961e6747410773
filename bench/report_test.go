package bench

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"image/png"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
)

// synthResult is a run of 300 made-up requests, with a layer breakdown and
// an expert-load matrix when cluster is true.
func synthResult(cluster bool) *Result {
	rng := newRand(5, 9)
	var outs []outcome
	for i := range 300 {
		start := float64(i) * 0.02
		n := 16 + rng.IntN(48)
		o := okOutcome(start, 0.03+0.02*rng.ExpFloat64(), 0.008+0.002*rng.Float64(), n, 128+rng.IntN(64))
		if i%50 == 7 {
			o = outcome{start: start, end: start + 0.1, latency: 0.1, promptLen: 100, kind: "http_429", err: "429 Too Many Requests: queue full <script>"}
		}
		outs = append(outs, o)
	}
	dur := 0.0
	for _, o := range outs {
		dur = max(dur, o.end)
	}
	mc := 32
	r := &Result{Date: "20260101-120000", Backend: "openai", EndpointType: "openai", ModelID: "deepseek-ai/DeepSeek-V2-Lite",
		NumPrompts: len(outs), RequestRate: Rate(math.Inf(1)), Burstiness: 1, MaxConcur: &mc,
		Endpoint: "/v1/completions", BaseURL: "http://127.0.0.1:8080", DatasetName: "random", IgnoreEOS: true,
		PercentileMetrics: []string{"ttft", "tpot", "itl", "e2el"}, MetricPercentiles: []float64{50, 90, 99},
		CommandLine:  []string{"expertmesh", "bench", "--max-concurrency", "32"},
		ServerModels: json.RawMessage(`{"object":"list","data":[{"id":"deepseek-ai/DeepSeek-V2-Lite"}]}`)}
	compute(r, outs, dur, map[string]float64{"ttft": 100}, r.PercentileMetrics, r.MetricPercentiles)
	if cluster {
		bd := &Breakdown{Source: "synthetic"}
		for l := range 27 {
			lt := LayerTiming{Layer: l, AttentionMs: 0.4 + 0.01*float64(l)}
			if l > 0 { // layer 0 is dense
				lt.DispatchWireMs, lt.ExpertComputeMs, lt.SlowestWaitMs = 0.15, 0.6+0.1*rng.Float64(), 0.05*rng.Float64()
			}
			bd.Layers = append(bd.Layers, lt)
		}
		el := &ExpertLoad{}
		for n := range 8 {
			el.Nodes = append(el.Nodes, fmt.Sprintf("expert-%d:7000", n))
		}
		for l := 1; l < 27; l++ {
			el.Layers = append(el.Layers, l)
			row := make([]float64, 8)
			for n := range row {
				row[n] = math.Round(1000 * (1 + math.Sin(float64(l*n)) + rng.Float64()))
			}
			el.Tokens = append(el.Tokens, row)
		}
		r.LayerBreakdown, r.ExpertLoad = bd, el
	}
	return r
}

func report(t *testing.T, r *Result) string {
	t.Helper()
	var b bytes.Buffer
	if err := WriteReport(&b, r); err != nil {
		t.Fatal(err)
	}
	return b.String()
}

var plotSVG = regexp.MustCompile(`(?s)<svg class="plot" id="([^"]+)".*?</svg>`)
var drawnPath = regexp.MustCompile(`<path[^>]* d="M[^"]+"`)

// plots returns each plot's id, checking it has a drawn path.
func plots(t *testing.T, page string) []string {
	t.Helper()
	var ids []string
	for _, m := range plotSVG.FindAllStringSubmatch(page, -1) {
		ids = append(ids, m[1])
		if !drawnPath.MatchString(m[0]) {
			t.Errorf("plot %s has no drawn path", m[1])
		}
	}
	return ids
}

var allPlots = []string{"plot-ttft", "plot-tpot", "plot-itl", "plot-e2el", "plot-throughput", "plot-concurrency", "plot-layers-0", "plot-expert-load-0"}

// TestReport: every plot is drawn, the cluster sections say "no data"
// without their data, text is escaped, and nothing is fetched.
func TestReport(t *testing.T) {
	page := report(t, synthResult(true))
	if got := plots(t, page); fmt.Sprint(got) != fmt.Sprint(allPlots) {
		t.Errorf("plots %v, want %v", got, allPlots)
	}
	if strings.Contains(page, "no data") || strings.Contains(page, "queue full <script>") || !strings.Contains(page, "queue full &lt;script&gt;") {
		t.Error("unexpected no-data section, or unescaped text")
	}
	for _, bad := range []string{"src=", "href=", "@import", "url(", "<link", "http://www.w3.org/1999/xlink"} {
		if strings.Contains(page, bad) {
			t.Errorf("the page contains %q: it must not need the network", bad)
		}
	}
	if !strings.Contains(page, "layer 26 slowest-node wait") || !strings.Contains(page, "expert-7:7000") {
		t.Error("the cluster plots lack their labels")
	}

	bare := report(t, synthResult(false))
	if got := plots(t, bare); len(got) != 6 {
		t.Errorf("without cluster data: plots %v", got)
	}
	if strings.Count(bare, `class="nodata"`) != 2 {
		t.Errorf("want two no-data sections, got %d", strings.Count(bare, `class="nodata"`))
	}

	// Data of the wrong shape is reported, not drawn (and never panics).
	r := synthResult(true)
	r.ExpertLoad.Tokens = r.ExpertLoad.Tokens[1:]
	r.LayerBreakdown.Layers[3].AttentionMs = math.NaN()
	broken := report(t, r)
	if !strings.Contains(broken, "rows for") || !strings.Contains(broken, "finite") {
		t.Error("shape errors not reported")
	}

	// A vLLM result saved without --save-detailed has no per-request
	// arrays: the distributions say "no data" too.
	var vr Result
	if err := json.Unmarshal([]byte(`{"date":"20250101-000000","backend":"vllm","model_id":"m","request_rate":"inf",
		"duration":10,"completed":5,"mean_ttft_ms":12.5,"p99_ttft_ms":30}`), &vr); err != nil {
		t.Fatal(err)
	}
	if vr.Stats["p99_ttft_ms"] != 30 || !math.IsInf(float64(vr.RequestRate), 1) {
		t.Errorf("vLLM result read as %+v", vr)
	}
	if p := report(t, &vr); strings.Count(p, `class="nodata"`) != 9 {
		t.Errorf("a summary-only result: %d no-data sections, want 9", strings.Count(p, `class="nodata"`))
	}
}

// TestResultJSONRoundTrip: the JSON carries vLLM's flat statistic keys and
// reads back the same.
func TestResultJSONRoundTrip(t *testing.T) {
	r := synthResult(true)
	b, err := json.Marshal(r)
	if err != nil {
		t.Fatal(err)
	}
	var flat map[string]any
	if err := json.Unmarshal(b, &flat); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"p90_tpot_ms", "median_itl_ms", "std_e2el_ms", "request_goodput", "expert_load", "layer_breakdown"} {
		if flat[k] == nil {
			t.Errorf("no %s", k)
		}
	}
	if flat["request_rate"] != "inf" || flat["max_concurrency"] != float64(32) {
		t.Errorf("request_rate %v max_concurrency %v", flat["request_rate"], flat["max_concurrency"])
	}
	back, err := DecodeResult(bytes.NewReader(b))
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(back.Stats) != fmt.Sprint(r.Stats) || back.TotalOutput != r.TotalOutput || len(back.ITLs) != len(r.ITLs) ||
		len(back.ExpertLoad.Tokens) != 26 || back.LayerBreakdown.Layers[5] != r.LayerBreakdown.Layers[5] {
		t.Error("the result does not read back the same")
	}
	rows := Compare(r, back)
	for _, row := range rows {
		if row.A != 0 && row.Ratio != 1 {
			t.Errorf("%s: B/A %v comparing a run with itself", row.Metric, row.Ratio)
		}
	}
	if rows[0].Metric != "duration" || !strings.HasPrefix(rows[len(rows)-1].Metric, "p99_e2el") {
		t.Errorf("row order: first %s, last %s", rows[0].Metric, rows[len(rows)-1].Metric)
	}
}

// chromium finds Debian's chromium; without it the test is skipped, except
// in CI (CI set), where it must be installed.
func chromium(t *testing.T) string {
	t.Helper()
	for _, name := range []string{"/usr/bin/chromium", "chromium", "chromium-browser"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	if os.Getenv("CI") == "" {
		t.Skip("chromium is not installed (CI installs it: .ci/run)")
	}
	t.Fatal("chromium is not installed; CI must run this test (.ci/run installs it)")
	return ""
}

func runChromium(t *testing.T, bin string, args ...string) (stdout, stderr string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	base := []string{"--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
		"--disable-background-networking", "--disable-component-update", "--disable-sync",
		"--user-data-dir=" + t.TempDir(), "--enable-logging=stderr", "--v=0"}
	cmd := exec.CommandContext(ctx, bin, append(base, args...)...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		t.Fatalf("chromium %v: %v\n%s", args, err, errb.String())
	}
	return out.String(), errb.String()
}

// TestReportInChromium opens the reports in headless Chromium: the page's
// script must run without error and find every plot drawn, the screenshot
// must show something.
func TestReportInChromium(t *testing.T) {
	bin := chromium(t)
	dir := t.TempDir()
	full, _, err := Save(synthResult(true), dir, "full.json")
	if err != nil {
		t.Fatal(err)
	}
	_, bare, err := Save(synthResult(false), dir, "bare.json")
	if err != nil {
		t.Fatal(err)
	}
	cmp := filepath.Join(dir, "cmp.html")
	var cb bytes.Buffer
	if err := WriteCompareReport(&cb, synthResult(true), synthResult(false), "with", "without"); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(cmp, cb.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
	shot := filepath.Join(dir, "shot.png")
	for i, c := range []struct {
		page  string
		plots int
	}{{strings.TrimSuffix(full, ".json") + ".html", 8}, {bare, 6}, {cmp, 6 + 2}} {
		args := []string{"--dump-dom"}
		if i == 0 {
			args = append(args, "--screenshot="+shot, "--window-size=1280,3000", "--hide-scrollbars")
		}
		dom, logs := runChromium(t, bin, append(args, "file://"+c.page)...)
		if !strings.Contains(dom, `data-rendered="ok"`) {
			m := regexp.MustCompile(`data-rendered="[^"]*"`).FindString(dom)
			t.Errorf("%s: the page's script did not finish: %s", filepath.Base(c.page), m)
		}
		if !strings.Contains(dom, fmt.Sprintf(`data-plots="%d"`, c.plots)) {
			t.Errorf("%s: the script did not count %d plots", filepath.Base(c.page), c.plots)
		}
		if got := plots(t, dom); len(got) != c.plots {
			t.Errorf("%s: %d plots in the DOM, want %d", filepath.Base(c.page), len(got), c.plots)
		}
		for _, l := range strings.Split(logs, "\n") {
			if strings.Contains(l, "CONSOLE") || strings.Contains(l, "Uncaught") {
				t.Errorf("%s: console: %s", filepath.Base(c.page), l)
			}
		}
	}

	f, err := os.Open(shot)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	img, err := png.Decode(f)
	if err != nil {
		t.Fatal(err)
	}
	b := img.Bounds()
	if b.Dx() < 1000 || b.Dy() < 2000 {
		t.Fatalf("screenshot %v", b)
	}
	colours := map[[4]uint32]int{}
	for y := b.Min.Y; y < b.Max.Y; y += 3 {
		for x := b.Min.X; x < b.Max.X; x += 3 {
			r, g, bl, a := img.At(x, y).RGBA()
			colours[[4]uint32{r >> 8, g >> 8, bl >> 8, a >> 8}]++
		}
	}
	// Text, grid, curves, the heatmap's scale: a real page has hundreds.
	if len(colours) < 50 {
		t.Errorf("the screenshot has %d colours: blank or broken", len(colours))
	}
	if os.Getenv("BENCH_KEEP_SCREENSHOT") != "" {
		data, _ := os.ReadFile(shot)
		os.WriteFile(os.Getenv("BENCH_KEEP_SCREENSHOT"), data, 0o644)
	}
}
