package sweep

import (
	"fmt"
	"math"
	"strings"
	"testing"

	"github.com/expertmesh/expertmesh/capacity"
)

// TestPlanOnQuietSweep re-predicts a sweep measured on the 2-core
// development machine while nothing else ran (testdata: v2-lite-4l, 1-4
// expert nodes, 1 and 2 micro-batches, loopback and 50 and 500 µs
// emulated links at 10 Gbit/s, 8 sequences; the 500 µs, 4-node,
// 2-micro-batch point failed to start) with the rates bench-kernels
// measured right after it (one thread: 17.5 GB/s, 157 GFLOP/s; two: 32
// and 311; the machine 33.4 GB/s) and the overheads calibrated on its
// loopback points (0.12 ms a dispatch + 1.11 ms per expert node; 1.57 ms
// a step), its rates scaled by one factor fitted to one point
// (--fit-rates: 0.863). plan must be within 15% of every other point (it
// is within 10%); with 2-4 expert nodes and ping-pong its bound is the
// shared machine's cores (before plan counted their CPU time it said
// 141 ms, 19-28% short).
func TestPlanOnQuietSweep(t *testing.T) {
	res, err := Read("testdata/quiet-v2-lite-4l.json")
	if err != nil {
		t.Fatal(err)
	}
	c, err := capacity.LoadModel("v2-lite-4l") // the checkpoint's config
	if err != nil {
		t.Fatal(err)
	}
	plan := capacity.DefaultSetup(c)
	plan.Context = 32 + 64/2 // the sweep's prompt and half its output
	plan.Attn, plan.Expert = capacity.Rates{GBps: 32, GFLOPs: 311}, capacity.Rates{GBps: 17.5, GFLOPs: 157}
	plan.Shared, plan.SharedCores = &capacity.Rates{GBps: 33.4, GFLOPs: 311}, 2
	Predict(res, c, plan, true)
	if !strings.Contains(res.Calibration, "+ 1.113233ms per expert node") || !strings.Contains(res.Calibration, "scaled by 0.863") {
		t.Errorf("calibration %q", res.Calibration)
	}
	var table strings.Builder
	measured, within, worst := 0, 0, 0.0
	for _, p := range res.Points {
		if p.StepMs <= 0 {
			continue
		}
		measured++
		e := math.Abs(p.PredictionErrorPct)
		worst = max(worst, e)
		if e <= 15 {
			within++
		}
		fmt.Fprintf(&table, "e%d m%d %-13s measured %6.1f ms  plan %6.1f ms  %+5.1f%%  %s\n",
			p.ExpertNodes, p.MicroBatches, p.Link, p.StepMs, p.PredictedStepMs, p.PredictionErrorPct, p.PredictedBound)
		if p.ExpertNodes >= 2 && p.MicroBatches == 2 && p.PredictedBound != "machine" {
			t.Errorf("e%d m2 %s: bound %s, want the shared machine's", p.ExpertNodes, p.Link, p.PredictedBound)
		}
	}
	t.Logf("plan against the quiet sweep, rates fitted:\n%s", table.String())
	if measured != 23 || within != measured {
		t.Errorf("%d of %d points within 15%% (worst %.1f%%), want all 23", within, measured, worst)
	}
}
