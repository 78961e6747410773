package bench

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"math"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/expertmesh/expertmesh/internal/telemetry"
	"github.com/expertmesh/expertmesh/localcluster"
	"github.com/expertmesh/expertmesh/model"
)

// clusterBin builds the binary and a tiny-v2 model once for the tests
// that start a cluster of processes.
var clusterBin struct {
	once       sync.Once
	bin, model string
	err        error
}

func binaryAndModel(t *testing.T) (bin, modelDir string) {
	t.Helper()
	if testing.Short() {
		t.Skip("starts a cluster of processes")
	}
	clusterBin.once.Do(func() {
		dir, err := os.MkdirTemp("", "bench-cluster-")
		if err != nil {
			clusterBin.err = err
			return
		}
		clusterBin.bin = filepath.Join(dir, "expertmesh")
		if out, err := exec.Command("go", "build", "-o", clusterBin.bin, "github.com/expertmesh/expertmesh/cmd/expertmesh").CombinedOutput(); err != nil {
			clusterBin.err = fmt.Errorf("building the binary: %v\n%s", err, out)
			return
		}
		p, _ := model.IsPreset("tiny-v2")
		clusterBin.model = filepath.Join(dir, "tiny-v2")
		clusterBin.err = model.GenerateCheckpoint(clusterBin.model, p, model.GenOptions{Seed: 7})
	})
	if clusterBin.err != nil {
		t.Fatal(clusterBin.err)
	}
	return clusterBin.bin, clusterBin.model
}

// tracedCluster starts coordinator, one attention node and two expert
// nodes as processes exporting their traces to rcv.
func tracedCluster(t *testing.T, rcv *telemetry.Receiver, microBatches int) *localcluster.Cluster {
	t.Helper()
	bin, dir := binaryAndModel(t)
	cfg := localcluster.DefaultConfig()
	cfg.Binary, cfg.ModelDir, cfg.AttnNodes, cfg.ExpertNodes, cfg.Addr = bin, dir, 1, 2, "127.0.0.1:0"
	cfg.AttnThreads, cfg.ExpertThreads = 1, 1
	cfg.DataDir = t.TempDir()
	otlp := []string{"--otlp-endpoint", rcv.Endpoint()}
	cfg.CoordinatorArgs, cfg.ExpertArgs = otlp, otlp
	cfg.AttnArgs = append(otlp, "--micro-batches", fmt.Sprint(microBatches))
	log := &lockedBuffer{}
	cfg.Log = log
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	c, err := localcluster.Start(ctx, cfg)
	if err != nil {
		t.Fatalf("starting the cluster: %v\n%s", err, log.String())
	}
	t.Cleanup(func() {
		c.Close()
		if t.Failed() {
			t.Logf("cluster log:\n%s", log.String())
		}
	})
	return c
}

// TestTraceAcrossProcesses: a request sent with a traceparent is traced
// end to end across the cluster's processes, exported over OTLP to an
// in-process receiver: the coordinator's http.request span is the
// caller's child, its admission span its child, a coordinator.step links
// to it, and that step's trace runs through the attention node (attn.step,
// attn.microbatch, attn.dispatch) to expert.compute on an expert node.
func TestTraceAcrossProcesses(t *testing.T) {
	rcv := telemetry.NewReceiver()
	if err := rcv.Listen("127.0.0.1:0"); err != nil {
		t.Fatal(err)
	}
	defer rcv.Close()
	c := tracedCluster(t, rcv, 2)

	const traceID, parent = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
	body, _ := json.Marshal(map[string]any{"prompt": []int{1, 2, 3, 4, 5}, "max_tokens": 4, "ignore_eos": true})
	req, _ := http.NewRequest(http.MethodPost, c.URL+"/v1/completions", bytes.NewReader(body))
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("traceparent", "00-"+traceID+"-"+parent+"-01")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("completion: %s", resp.Status)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var httpSpan *telemetry.Span
	found := func(spans []telemetry.Span) bool {
		return chain(spans, traceID, parent) == ""
	}
	if err := rcv.WaitFor(ctx, found); err != nil {
		t.Fatalf("%v: %s", err, chain(rcv.Spans(), traceID, parent))
	}
	for _, s := range rcv.Spans() {
		if s.Name == "http.request" && s.TraceID == traceID {
			httpSpan = &s
		}
	}
	if httpSpan.Service != "expertmesh-coordinator" {
		t.Errorf("http.request from service %q", httpSpan.Service)
	}
}

// chain says what is missing from the trace of a request with the given
// traceparent, or "" when the whole chain is there.
func chain(spans []telemetry.Span, traceID, parent string) string {
	byID := map[string]*telemetry.Span{}
	for i := range spans {
		byID[spans[i].SpanID] = &spans[i]
	}
	var req *telemetry.Span
	admitted := false
	for i := range spans {
		s := &spans[i]
		if s.TraceID != traceID {
			continue
		}
		switch s.Name {
		case "http.request":
			if s.ParentID == parent {
				req = s
			}
		}
	}
	if req == nil {
		return "no http.request span whose parent is the caller's span"
	}
	for i := range spans {
		s := &spans[i]
		if s.Name == "coordinator.admission" && s.ParentID == req.SpanID {
			admitted = true
		}
	}
	if !admitted {
		return "no coordinator.admission span under the request"
	}
	for i := range spans {
		st := &spans[i]
		if st.Name != "coordinator.step" || !contains(st.Links, traceID+"/"+req.SpanID) {
			continue
		}
		// Down the step's trace: attn.step (via the gRPC server span),
		// micro-batch, dispatch, expert compute in another process.
		for j := range spans {
			ec := &spans[j]
			if ec.Name != "expert.compute" || ec.TraceID != st.TraceID {
				continue
			}
			d := byID[ec.ParentID]
			if d == nil || d.Name != "attn.dispatch" || d.Service != "expertmesh-attn" || ec.Service != "expertmesh-expert" {
				continue
			}
			mb := byID[d.ParentID]
			if mb == nil || mb.Name != "attn.microbatch" {
				continue
			}
			as := byID[mb.ParentID]
			if as == nil || as.Name != "attn.step" {
				continue
			}
			// attn.step's ancestors lead back to the coordinator's step.
			for p := byID[as.ParentID]; p != nil; p = byID[p.ParentID] {
				if p.SpanID == st.SpanID {
					return ""
				}
			}
		}
	}
	return "no coordinator.step linked to the request whose trace reaches expert.compute through attn.step, attn.microbatch and attn.dispatch"
}

func contains(ss []string, s string) bool {
	for _, x := range ss {
		if x == s {
			return true
		}
	}
	return false
}

// TestBreakdownAddsUp runs the benchmark against a traced cluster with
// its own OTLP receiver (--otlp-listen's path): the per-layer breakdown
// derived from the spans, plus the LM head, adds up to the measured step
// within 10%, every MoE layer has all four phases, and the expert load
// from the traces covers both expert nodes. Then the report of that run
// opens in headless Chromium with the timeline and the heatmap drawn.
func TestBreakdownAddsUp(t *testing.T) {
	for _, mb := range []int{1, 2} {
		t.Run(fmt.Sprintf("micro-batches=%d", mb), func(t *testing.T) {
			rcv := telemetry.NewReceiver()
			if err := rcv.Listen("127.0.0.1:0"); err != nil {
				t.Fatal(err)
			}
			defer rcv.Close()
			c := tracedCluster(t, rcv, mb)
			cfg := DefaultConfig()
			cfg.BaseURL, cfg.NumPrompts, cfg.MaxConcurrency = c.URL, 12, 6
			cfg.RandomInputLen, cfg.RandomOutputLen, cfg.Warmup = 8, 24, 2
			cfg.Traces, cfg.TraceSettle = rcv, 2*time.Second
			ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
			defer cancel()
			r, err := Run(ctx, cfg)
			if err != nil {
				t.Fatal(err)
			}
			if r.Failed != 0 {
				t.Fatalf("%d requests failed: %v", r.Failed, r.ErrorsByKind)
			}
			bd := r.LayerBreakdown
			if bd == nil || !strings.HasPrefix(bd.Source, "traces") {
				t.Fatalf("no breakdown from traces: %+v", bd)
			}
			d, err := bd.Check()
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("%s: layers %.3f ms + LM head %.3f ms + outside %.3f ms vs step %.3f ms (%+.1f%%); client TPOT %.3f ms", bd.Source,
				bd.LayersMs(), bd.TailMs, bd.OutsideMs, bd.StepMs, 100*d, r.Stats["mean_tpot_ms"])
			for _, l := range bd.Layers {
				t.Logf("layer %d: attention %.3f, wire %.3f, expert %.3f, wait %.3f ms", l.Layer, l.AttentionMs, l.DispatchWireMs, l.ExpertComputeMs, l.SlowestWaitMs)
			}
			if math.Abs(d) > 0.10 {
				t.Errorf("the breakdown adds up to %.3f ms, the measured step is %.3f ms: %+.1f%%, beyond 10%%", bd.LayersMs()+bd.TailMs+bd.OutsideMs, bd.StepMs, 100*d)
			}
			// tiny-v2: layer 0 dense, 1 and 2 MoE.
			if len(bd.Layers) != 2 || bd.Layers[0].Layer != 1 || bd.Layers[1].Layer != 2 {
				t.Fatalf("layers %+v, want MoE layers 1 and 2", bd.Layers)
			}
			for _, l := range bd.Layers {
				if !(l.AttentionMs > 0 && l.DispatchWireMs > 0 && l.ExpertComputeMs > 0) {
					t.Errorf("layer %d: a phase is zero: %+v", l.Layer, l)
				}
			}
			if bd.Steps < 10 || bd.MicroBatches != mb {
				t.Errorf("%d steps of %d micro-batches: want the run's decode steps, of %d", bd.Steps, bd.MicroBatches, mb)
			}
			el := r.ExpertLoad
			if el == nil || len(el.Nodes) != 2 || len(el.Layers) != 2 {
				t.Fatalf("expert load %+v: want 2 layers × 2 nodes", el)
			}
			if mb == 2 {
				reportOfClusterRun(t, r)
			}
		})
	}
}

// reportOfClusterRun opens the saved report of a real cluster run in
// headless Chromium: its script finishes, every plot is drawn (6 of a run
// plus the timeline and the heatmap), and no console error.
func reportOfClusterRun(t *testing.T, r *Result) {
	bin := chromium(t)
	_, page, err := Save(r, t.TempDir(), "cluster.json")
	if err != nil {
		t.Fatal(err)
	}
	dom, logs := runChromium(t, bin, "--dump-dom", "file://"+page)
	if !strings.Contains(dom, `data-rendered="ok"`) {
		t.Errorf("the report's script did not finish")
	}
	if !strings.Contains(dom, `data-plots="8"`) || len(plots(t, dom)) != 8 {
		t.Errorf("want 8 plots (with the layer timeline and the expert-load heatmap), got %d", len(plots(t, dom)))
	}
	if !strings.Contains(dom, "plot-layers-0") || !strings.Contains(dom, "plot-expert-load-0") {
		t.Errorf("the timeline or the heatmap is missing")
	}
	for _, l := range strings.Split(logs, "\n") {
		if strings.Contains(l, "CONSOLE") || strings.Contains(l, "Uncaught") {
			t.Errorf("console: %s", l)
		}
	}
}
