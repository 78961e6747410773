package sweep

import (
	"bytes"
	"context"
	"encoding/json"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/expertmesh/expertmesh/bench"
	"github.com/expertmesh/expertmesh/capacity"
)

// TestSweep runs a small sweep of real clusters (tiny-v2: 1 and 2 expert
// nodes, ping-pong off and on, loopback, and a 300 µs emulated link when
// namespaces can be made) with plan's predictions, then checks the saved
// JSON and that the page renders in headless Chromium.
func TestSweep(t *testing.T) {
	if testing.Short() {
		t.Skip("starts clusters of processes")
	}
	dir := t.TempDir()
	bin := filepath.Join(dir, "expertmesh")
	if out, err := exec.Command("go", "build", "-o", bin, "github.com/expertmesh/expertmesh/cmd/expertmesh").CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	linkSpec := "loopback"
	if _, err := exec.LookPath("ip"); err == nil && os.Geteuid() == 0 {
		linkSpec += ",300us"
	}
	links, err := ParseLinks(linkSpec, 10)
	if err != nil {
		t.Fatal(err)
	}
	bc := bench.DefaultConfig()
	bc.NumPrompts, bc.RandomInputLen, bc.RandomOutputLen, bc.Warmup = 6, 8, 12, 1
	var log bytes.Buffer
	c, _ := capacity.LoadModel("tiny-v2")
	plan := capacity.DefaultSetup(c)
	plan.Attn, plan.Expert, plan.Context = capacity.Rates{GBps: 20, GFLOPs: 100}, capacity.Rates{GBps: 20, GFLOPs: 100}, 14
	cfg := Config{Binary: bin, Preset: "tiny-v2", CacheDir: dir, ExpertNodes: []int{1, 2}, AttnNodes: []int{1},
		MicroBatches: []int{1, 2}, Concurrency: []int{3}, Links: links, AttnThreads: 1, ExpertThreads: 1,
		Bench: bc, ResultDir: filepath.Join(dir, "out"), Plan: &plan, Log: &log}
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	res, err := Run(ctx, cfg)
	if err != nil {
		t.Fatalf("%v\n%s", err, log.String())
	}
	if want := 4 * len(links); len(res.Points) != want {
		t.Fatalf("%d points, want %d", len(res.Points), want)
	}
	for _, p := range res.Points {
		if p.Error != "" || p.Completed != 6 || p.StepMs <= 0 || p.Breakdown == nil || p.PredictedStepMs <= 0 {
			t.Errorf("point %+v", p)
		}
		if p.Link != "loopback" && p.Emulation == "" {
			t.Errorf("emulated point without emulation: %+v", p)
		}
		// A start may fail once (the namespaces' first etcd connection
		// can time out) and is then tried again.
		if p.Attempts < 1 || len(p.StartErrors) != p.Attempts-1 {
			t.Errorf("a point that ran: %d attempts, start errors %q", p.Attempts, p.StartErrors)
		}
		if runtime.GOOS == "linux" && !(p.CPUSeconds["attn"] > 0 && p.CPUSeconds["expert"] > 0 && p.CPUSeconds["harness"] > 0 && p.BenchSeconds > 0) {
			t.Errorf("CPU time by role %v over %.2f s: want every role's from /proc", p.CPUSeconds, p.BenchSeconds)
		}
	}
	if !strings.Contains(res.Calibration, "dispatch overhead") {
		t.Errorf("calibration %q", res.Calibration)
	}
	jp, hp, err := Save(res, cfg.ResultDir)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(jp)
	var back Result
	if err := json.Unmarshal(b, &back); err != nil || len(back.Points) != len(res.Points) {
		t.Fatalf("sweep.json does not read back: %v", err)
	}
	if len(Summarize(res)) != 2*2*len(links) {
		t.Errorf("summaries %d", len(Summarize(res)))
	}
	chromium, err := exec.LookPath("chromium")
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("chromium is not installed; CI must run this test")
		}
		t.Skip("no chromium")
	}
	out, err := exec.CommandContext(ctx, chromium, "--headless", "--no-sandbox", "--disable-gpu", "--user-data-dir="+t.TempDir(), "--dump-dom", "file://"+hp).Output()
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(out), `data-rendered="ok"`) || !strings.Contains(string(out), `data-plots="4"`) {
		t.Errorf("the sweep page did not render its 4 plots")
	}
}

func TestParseLinks(t *testing.T) {
	l, err := ParseLinks("loopback, 50us,500us", 10)
	if err != nil || len(l) != 3 || l[0].Netns || !l[1].Netns || l[2].Spec.Delay != 500*time.Microsecond || l[2].Spec.Gbit != 10 {
		t.Fatalf("%+v %v", l, err)
	}
	for _, bad := range []string{"", "fast", "-5us"} {
		if _, err := ParseLinks(bad, 10); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

// TestPredictCalibratesWireWithoutPingPong: the dispatch overhead is the
// loopback points' median wire time per MoE layer without ping-pong; a
// two-micro-batch point's dispatches also wait for the expert node busy
// with the other micro-batch (the model's M·expert), so they are left out
// when points with one micro-batch exist, and used when none do.
func TestPredictCalibratesWireWithoutPingPong(t *testing.T) {
	c, _ := capacity.LoadModel("v2-lite-4l")
	point := func(m int, link string, wireMs float64) Point {
		bd := &bench.Breakdown{OutsideMs: 1, StepMs: 100}
		for l := 1; l <= 3; l++ {
			bd.Layers = append(bd.Layers, bench.LayerTiming{Layer: l, DispatchWireMs: wireMs})
		}
		return Point{ExpertNodes: 1, AttnNodes: 1, MicroBatches: m, Concurrency: 8, Link: link, StepMs: 100, Breakdown: bd}
	}
	plan := capacity.DefaultSetup(c)
	plan.Attn, plan.Expert, plan.Context = capacity.Rates{GBps: 17, GFLOPs: 165}, capacity.Rates{GBps: 17, GFLOPs: 165}, 64
	for _, tc := range []struct {
		points []Point
		want   time.Duration
	}{
		{[]Point{point(1, "loopback", 2), point(2, "loopback", 30), point(2, "loopback", 40), point(1, "500µs/10Gbit", 9)}, 2 * time.Millisecond},
		{[]Point{point(2, "loopback", 30), point(2, "loopback", 30)}, 30 * time.Millisecond},
	} {
		res := &Result{Points: tc.points}
		Predict(res, c, plan, false)
		if res.Plan.DispatchOverhead != tc.want {
			t.Errorf("dispatch overhead %v, want %v (%s)", res.Plan.DispatchOverhead, tc.want, res.Calibration)
		}
		for _, p := range res.Points {
			if p.PredictedStepMs <= 0 {
				t.Errorf("no prediction: %+v", p)
			}
		}
	}
}

// TestPredictCalibratesNodeOverhead: with several expert-node counts on
// loopback the dispatch overhead is the wire time's line against the
// count (a dispatch's own software plus each node's message), and a
// prediction's wire time follows it.
func TestPredictCalibratesNodeOverhead(t *testing.T) {
	c, _ := capacity.LoadModel("v2-lite-4l")
	var points []Point
	for e := 1; e <= 4; e++ {
		bd := &bench.Breakdown{OutsideMs: 1, StepMs: 100}
		for l := 1; l <= 3; l++ {
			// 0.5 ms + 1 ms a node, ±0.1 ms from layer to layer.
			bd.Layers = append(bd.Layers, bench.LayerTiming{Layer: l, DispatchWireMs: 0.5 + float64(e) + 0.1*float64(l-2)})
		}
		points = append(points, Point{ExpertNodes: e, AttnNodes: 1, MicroBatches: 1, Concurrency: 8, Link: "loopback", StepMs: 100, Breakdown: bd})
	}
	plan := capacity.DefaultSetup(c)
	plan.Attn, plan.Expert, plan.Context = capacity.Rates{GBps: 17, GFLOPs: 165}, capacity.Rates{GBps: 17, GFLOPs: 165}, 64
	res := &Result{Points: points}
	Predict(res, c, plan, false)
	near := func(d time.Duration, ms float64) bool { return math.Abs(d.Seconds()*1e3-ms) < 1e-6 }
	if !near(res.Plan.DispatchOverhead, 0.5) || !near(res.Plan.DispatchNodeOverhead, 1) || !strings.Contains(res.Calibration, "per expert node") {
		t.Fatalf("dispatch overhead %v + %v a node, want 0.5 ms + 1 ms (%s)", res.Plan.DispatchOverhead, res.Plan.DispatchNodeOverhead, res.Calibration)
	}
	for _, p := range res.Points {
		pr, _ := capacity.Predict(c, func() capacity.Setup {
			s := *res.Plan
			s.ExpertNodes, s.MicroBatches, s.Concurrency, s.Link = p.ExpertNodes, 1, 8, capacity.Link{} // loopback
			return s
		}())
		if w := pr.Layers[1].WireMs; math.Abs(w-(0.5+float64(p.ExpertNodes))) > 0.05 {
			t.Errorf("%d expert nodes: predicted wire %.3f ms, measured %.3f", p.ExpertNodes, w, 0.5+float64(p.ExpertNodes))
		}
	}
	// A line that would cross below zero goes through the origin.
	if a, b, ok := fitLine([]float64{1, 2, 3}, []float64{0.5, 2, 3.5}); !ok || a != 0 || b <= 0 {
		t.Errorf("fitLine through the origin: %v %v %v", a, b, ok)
	}
	if _, _, ok := fitLine([]float64{2, 2}, []float64{1, 3}); ok {
		t.Error("fitLine of one x value")
	}
}

// TestRoleArgs: a point's roles get its micro-batches, a cache sized for
// its concurrency, traces to the receiver, and SCHED_BATCH on the expert
// nodes only when the sweep asks for it.
func TestRoleArgs(t *testing.T) {
	p := &Point{AttnNodes: 2, MicroBatches: 2, Concurrency: 16}
	for _, batch := range []bool{false, true} {
		co, at, ex := roleArgs(Config{ExpertSchedBatch: batch}, p, "http://h:1")
		if got := strings.Join(co, " "); got != "--max-running 16" {
			t.Errorf("coordinator %q", got)
		}
		if got := strings.Join(at, " "); got != "--otlp-endpoint http://h:1 --micro-batches 2 --cache-mb 512" {
			t.Errorf("attention nodes %q", got)
		}
		want := "--otlp-endpoint http://h:1"
		if batch {
			want += " --sched-batch"
		}
		if got := strings.Join(ex, " "); got != want {
			t.Errorf("ExpertSchedBatch %v: expert nodes %q, want %q", batch, got, want)
		}
	}
}
