package bench

import (
	"encoding/json"
	"math"
	"strings"
	"testing"
	"time"
)

func near(a, b float64) bool { return math.Abs(a-b) <= 1e-9*math.Max(1, math.Abs(b)) }

// Values checked against numpy.percentile / numpy.std by hand.
func TestPercentile(t *testing.T) {
	cases := []struct {
		v    []float64
		p    float64
		want float64
	}{
		{nil, 99, 0},
		{[]float64{7}, 99, 7},
		{[]float64{4, 1, 3, 2}, 50, 2.5},        // rank 1.5
		{[]float64{4, 1, 3, 2}, 99, 3.97},       // rank 2.97
		{[]float64{4, 1, 3, 2}, 0, 1},           // the minimum
		{[]float64{4, 1, 3, 2}, 100, 4},         // the maximum
		{[]float64{10, 20, 30, 40, 50}, 90, 46}, // rank 3.6
		{[]float64{10, 20, 30, 40, 50}, 25, 20}, // rank 1 exactly
		{[]float64{1, 1, 1, 100}, 75, 25.75},    // rank 2.25
	}
	for _, c := range cases {
		if got := Percentile(c.v, c.p); !near(got, c.want) {
			t.Errorf("Percentile(%v, %v) = %v, want %v", c.v, c.p, got, c.want)
		}
	}
	if !near(Std([]float64{2, 4, 4, 4, 5, 5, 7, 9}), 2) || Std(nil) != 0 || !near(Mean([]float64{1, 2, 6}), 3) {
		t.Error("Mean/Std")
	}
	s := Summarize([]float64{0.004, 0.001, 0.003, 0.002}, []float64{50, 99})
	if !near(s.Mean, 2.5) || !near(s.Median, 2.5) || !near(s.Percentiles[0], 2.5) || !near(s.Percentiles[1], 3.97) {
		t.Errorf("Summarize in ms: %+v", s)
	}
}

func TestTPOT(t *testing.T) {
	if _, ok := TPOT(1, 0.2, 1); ok {
		t.Error("TPOT of a 1-token request must be undefined")
	}
	if _, ok := TPOT(1, 0.2, 0); ok {
		t.Error("TPOT of a 0-token request must be undefined")
	}
	if v, ok := TPOT(1.0, 0.2, 5); !ok || !near(v, 0.2) {
		t.Errorf("TPOT(1.0, 0.2, 5) = %v, %v; want 0.2", v, ok)
	}
}

// okOutcome is a successful request starting at start, with its first
// token after ttft and n−1 more every gap seconds.
func okOutcome(start, ttft, gap float64, n, prompt int) outcome {
	o := outcome{start: start, ttft: ttft, promptLen: prompt, outputLen: n}
	t := start + ttft
	o.chunkTimes = append(o.chunkTimes, t)
	o.chunkTokens = append(o.chunkTokens, 1)
	for range n - 1 {
		t += gap
		o.itl = append(o.itl, gap)
		o.chunkTimes = append(o.chunkTimes, t)
		o.chunkTokens = append(o.chunkTokens, 1)
	}
	o.latency = t - start
	o.end = t
	return o
}

// TestCompute checks the run metrics of four hand-made requests.
func TestCompute(t *testing.T) {
	outs := []outcome{
		okOutcome(0, 0.1, 0.05, 5, 10),  // e2el 0.3, tpot 0.05
		okOutcome(0.5, 0.4, 0.2, 3, 20), // e2el 0.8, tpot 0.2
		okOutcome(1.0, 0.05, 0, 1, 30),  // one token: no TPOT; TPOT 0 for goodput
		{start: 1.2, end: 1.5, latency: 0.3, promptLen: 40, kind: "http_429", err: "429 Too Many Requests: queue full"},
	}
	var r Result
	compute(&r, outs, 2.0, map[string]float64{"ttft": 200, "tpot": 100}, []string{"ttft", "tpot", "itl", "e2el"}, []float64{50, 99})
	if r.Completed != 3 || r.Failed != 1 || r.ErrorsByKind["http_429"] != 1 {
		t.Fatalf("completed %d failed %d kinds %v", r.Completed, r.Failed, r.ErrorsByKind)
	}
	if r.TotalInput != 60 || r.TotalOutput != 9 {
		t.Errorf("totals %d in, %d out; want 60, 9", r.TotalInput, r.TotalOutput)
	}
	if !near(r.ReqTput, 1.5) || !near(r.OutTput, 4.5) || !near(r.TotalTput, 34.5) {
		t.Errorf("throughputs %v %v %v", r.ReqTput, r.OutTput, r.TotalTput)
	}
	// Good: request 0 (ttft 100 ms, tpot 50 ms) and request 2 (ttft 50 ms,
	// tpot counted as 0); request 1's ttft 400 ms misses.
	if r.ReqGoodput == nil || !near(*r.ReqGoodput, 1.0) {
		t.Errorf("goodput %v, want 2 good / 2 s", r.ReqGoodput)
	}
	want := map[string]float64{
		"mean_ttft_ms": (100 + 400 + 50) / 3.0, "median_ttft_ms": 100, "p99_ttft_ms": 100 + 300*0.98,
		"mean_tpot_ms": 125, "median_tpot_ms": 125, "std_tpot_ms": 75,
		"mean_itl_ms": (4*50 + 2*200) / 6.0, "median_itl_ms": 50,
		"mean_e2el_ms": (300 + 800 + 50) / 3.0, "p50_e2el_ms": 300,
	}
	for k, v := range want {
		if !near(r.Stats[k], v) {
			t.Errorf("%s = %v, want %v", k, r.Stats[k], v)
		}
	}
	if r.OutputLens[3] != 0 || r.InputLens[3] != 40 || r.Errors[3] == "" || r.ErrorKinds[3] != "http_429" {
		t.Errorf("failed request arrays: out %d in %d err %q kind %q", r.OutputLens[3], r.InputLens[3], r.Errors[3], r.ErrorKinds[3])
	}
	// Time series: 2 buckets; tokens at 0.1..0.3 (5), 0.9, 1.1, 1.3 and
	// 1.05 (1).
	ts := r.TimeSeries
	if len(ts.OutputTokensPerS) != 2 || ts.OutputTokensPerS[0] != 6 || ts.OutputTokensPerS[1] != 3 {
		t.Errorf("tokens per second %v, want [6 3]", ts.OutputTokensPerS)
	}
	// In flight: [0, 0.3] + [0.5, 1.0] in bucket 0 = 0.8; [1.0, 1.3] +
	// [1.0, 1.05] + [1.2, 1.5] in bucket 1 = 0.65.
	if !near(ts.Concurrency[0], 0.8) || !near(ts.Concurrency[1], 0.65) {
		t.Errorf("concurrency %v, want [0.8 0.65]", ts.Concurrency)
	}
	if ts.Completed[0] != 1 || ts.Completed[1] != 2 || ts.Failed[1] != 1 {
		t.Errorf("completed %v failed %v", ts.Completed, ts.Failed)
	}
	if r.MaxOutPerS != 6 || r.MaxConcReqs != 2 {
		t.Errorf("peaks %v tok/s, %d requests; want 6, 2", r.MaxOutPerS, r.MaxConcReqs)
	}
}

// Without --goodput request_goodput is null; with no successful request
// every statistic is 0, never NaN, and the JSON encodes.
func TestComputeEmpty(t *testing.T) {
	var r Result
	compute(&r, []outcome{{kind: KindTimeout, err: "x", end: 1, latency: 1}}, 1, nil, []string{"ttft", "tpot", "itl", "e2el"}, []float64{99})
	if r.ReqGoodput != nil {
		t.Error("goodput without objectives")
	}
	for k, v := range r.Stats {
		if v != 0 {
			t.Errorf("%s = %v with no successful request", k, v)
		}
	}
	b, err := json.Marshal(r)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(b), `"request_goodput":null`) || !strings.Contains(string(b), `"p99_itl_ms":0`) {
		t.Errorf("JSON: %s", b)
	}
}

// The usage-reported output count is spread over the events, so a server
// that sends two tokens in one event still sums right in the series.
func TestTimeSeriesScalesToUsage(t *testing.T) {
	o := outcome{start: 0, end: 0.5, latency: 0.5, ttft: 0.1, outputLen: 8,
		chunkTimes: []float64{0.1, 0.2, 0.3, 0.4}, chunkTokens: []int{1, 1, 1, 1}}
	ts := timeSeries([]outcome{o}, 0.5)
	if len(ts.OutputTokensPerS) != 1 || ts.OutputTokensPerS[0] != 8 {
		t.Errorf("series %v, want [8]", ts.OutputTokensPerS)
	}
	if !near(ts.Concurrency[0], 1) {
		t.Errorf("one request in flight for the whole partial bucket: %v", ts.Concurrency)
	}
}

// The progress line counts what the run did and ends with a newline.
func TestProgress(t *testing.T) {
	var p progress
	p.total = 10
	p.done.Store(4)
	p.failed.Store(1)
	p.inflight.Store(2)
	var b strings.Builder
	stop := p.start(&b, time.Now(), 0)
	stop()
	out := b.String()
	if !strings.HasPrefix(out, "\r[============") || !strings.Contains(out, " 40% 4/10 done, 1 failed, 2 in flight") || !strings.HasSuffix(out, "\n") {
		t.Errorf("progress line %q", out)
	}
	p.start(nil, time.Now(), 0)() // nil writer: nothing to do
}
