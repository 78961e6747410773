package bench

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
)

// The end-to-end tests run the real binary: `expertmesh serve` on a
// generated tiny-v2 model as a subprocess, loaded by `expertmesh bench`
// (through the binary, or bench.Run in-process). The binary is built and
// the server started once, on first use; TestMain stops it.

var e2e struct {
	once sync.Once
	dir  string
	bin  string
	url  string
	cmd  *exec.Cmd
	logs *lockedBuffer
	err  error
}

func TestMain(m *testing.M) {
	code := m.Run()
	stopServer()
	os.Exit(code)
}

// lockedBuffer keeps the server's stderr for failure messages.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.b.Len() > 1<<20 {
		return len(p), nil
	}
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// server returns the binary and the URL of a running `expertmesh serve`.
func server(t *testing.T) (bin, url string) {
	t.Helper()
	e2e.once.Do(startServer)
	if e2e.err != nil {
		t.Fatal(e2e.err)
	}
	return e2e.bin, e2e.url
}

func startServer() {
	fail := func(format string, args ...any) { e2e.err = fmt.Errorf(format, args...) }
	dir, err := os.MkdirTemp("", "bench-e2e-")
	if err != nil {
		fail("%v", err)
		return
	}
	e2e.dir = dir
	e2e.bin = filepath.Join(dir, "expertmesh")
	build := exec.Command("go", "build", "-o", e2e.bin, "github.com/expertmesh/expertmesh/cmd/expertmesh")
	if out, err := build.CombinedOutput(); err != nil {
		fail("building the binary: %v\n%s", err, out)
		return
	}
	model := filepath.Join(dir, "model")
	if out, err := exec.Command(e2e.bin, "gen-model", "--preset", "tiny-v2", "--out", model).CombinedOutput(); err != nil {
		fail("gen-model: %v\n%s", err, out)
		return
	}
	cmd := exec.Command(e2e.bin, "serve", "--model", model, "--addr", "127.0.0.1:0", "--threads", "2")
	e2e.logs = &lockedBuffer{}
	cmd.Stderr = e2e.logs
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		fail("%v", err)
		return
	}
	if err := cmd.Start(); err != nil {
		fail("starting serve: %v", err)
		return
	}
	e2e.cmd = cmd
	found := make(chan string, 1)
	go func() {
		// Reads until the server exits, so its stdout never fills up.
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			if _, addr, ok := strings.Cut(sc.Text(), "listening on "); ok {
				select {
				case found <- strings.TrimSpace(addr):
				default:
				}
			}
		}
		close(found)
	}()
	select {
	case u, ok := <-found:
		if !ok || u == "" {
			fail("serve exited before listening:\n%s", e2e.logs.String())
			return
		}
		e2e.url = u
	case <-time.After(2 * time.Minute):
		fail("serve did not say it was listening within 2 minutes:\n%s", e2e.logs.String())
	}
}

func stopServer() {
	if e2e.cmd != nil {
		e2e.cmd.Process.Signal(os.Interrupt)
		done := make(chan struct{})
		go func() { e2e.cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			e2e.cmd.Process.Kill()
			<-done
		}
	}
	if e2e.dir != "" {
		os.RemoveAll(e2e.dir)
	}
}

// runBin runs the binary and returns its stdout; it fails the test on a
// non-zero exit.
func runBin(t *testing.T, bin string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("%s %s: %v\nstdout:\n%s\nstderr:\n%s\nserver log:\n%s", filepath.Base(bin), strings.Join(args, " "), err, stdout.String(), stderr.String(), e2e.logs.String())
	}
	return stdout.String()
}

// checkRun checks what every correct run against the real server shows:
// n requests of outLen tokens each with --ignore-eos, none failed.
func checkRun(t *testing.T, r *Result, n, inLen, outLen int) {
	t.Helper()
	if r.Completed != n || r.Failed != 0 || len(r.ErrorsByKind) != 0 {
		t.Fatalf("completed %d, failed %d (%v), want %d, 0; errors %v", r.Completed, r.Failed, r.ErrorsByKind, n, r.Errors)
	}
	sumOut := 0
	for i, v := range r.OutputLens {
		sumOut += v
		if v != outLen {
			t.Errorf("request %d: %d output tokens, want %d", i, v, outLen)
		}
		if inLen > 0 && r.InputLens[i] != inLen {
			t.Errorf("request %d: %d input tokens, want %d", i, r.InputLens[i], inLen)
		}
		if r.InputLens[i] <= 0 {
			t.Errorf("request %d: input length %d", i, r.InputLens[i])
		}
		if !(r.TTFTs[i] > 0) || r.TTFTs[i] > r.Latencies[i] {
			t.Errorf("request %d: ttft %v, e2el %v", i, r.TTFTs[i], r.Latencies[i])
		}
		if l := len(r.ITLs[i]); l < 1 || l > outLen-1 {
			t.Errorf("request %d: %d ITLs for %d tokens", i, l, outLen)
		}
	}
	if r.TotalOutput != sumOut || sumOut != n*outLen {
		t.Errorf("total_output_tokens %d, sum(output_lens) %d, want %d", r.TotalOutput, sumOut, n*outLen)
	}
	if len(r.InputLens) != n || len(r.TTFTs) != n || len(r.ITLs) != n || len(r.Errors) != n {
		t.Errorf("per-request arrays of %d, %d, %d, %d for %d requests", len(r.InputLens), len(r.TTFTs), len(r.ITLs), len(r.Errors), n)
	}
	closeTo := func(a, b float64) bool { return math.Abs(a-b) <= 1e-6*math.Max(1, math.Abs(b)) }
	if !(r.Duration > 0) || !closeTo(r.ReqTput*r.Duration, float64(n)) || !closeTo(r.OutTput*r.Duration, float64(sumOut)) ||
		!closeTo(r.TotalTput*r.Duration, float64(sumOut+r.TotalInput)) {
		t.Errorf("throughputs inconsistent with duration %v: %v req/s, %v tok/s", r.Duration, r.ReqTput, r.OutTput)
	}
	// No request can end after the run does.
	for i := range r.StartTimes {
		if r.StartTimes[i]+r.Latencies[i] > r.Duration+1e-3 {
			t.Errorf("request %d ends at %v, after the run's %v", i, r.StartTimes[i]+r.Latencies[i], r.Duration)
		}
	}
	for _, m := range r.PercentileMetrics {
		prev := math.Inf(-1)
		for _, p := range r.MetricPercentiles {
			k := "p" + percentileWord(p) + "_" + m + "_ms"
			v, ok := r.Stats[k]
			if !ok || v < prev {
				t.Errorf("%s = %v (present %v) below the previous percentile %v", k, v, ok, prev)
			}
			prev = v
		}
		mean, med := r.Stats["mean_"+m+"_ms"], r.Stats["median_"+m+"_ms"]
		if !(mean > 0) || !(med > 0) {
			t.Errorf("%s: mean %v median %v", m, mean, med)
		}
		if top, ok := r.Stats["p100_"+m+"_ms"]; ok && (mean > top+1e-9 || med > top+1e-9) {
			t.Errorf("%s: mean %v or median %v above the maximum %v", m, mean, med, top)
		}
	}
	var series float64
	for _, v := range r.TimeSeries.OutputTokensPerS {
		series += v
	}
	if math.Abs(series-float64(sumOut)) > 1e-6*float64(sumOut) {
		t.Errorf("the time series sums to %v output tokens, want %d", series, sumOut)
	}
	if r.MaxConcReqs < 1 || r.MaxOutPerS <= 0 {
		t.Errorf("peaks: %d requests, %v tok/s", r.MaxConcReqs, r.MaxOutPerS)
	}
	var models struct{ Data []struct{ ID string } }
	if json.Unmarshal(r.ServerModels, &models) != nil || len(models.Data) == 0 || models.Data[0].ID != r.ModelID {
		t.Errorf("server_models %s, model %q", r.ServerModels, r.ModelID)
	}
}

// TestServeConcurrency runs the binary's bench at a fixed concurrency
// against the real server and checks the saved JSON, the HTML beside it
// and the printed summary.
func TestServeConcurrency(t *testing.T) {
	bin, url := server(t)
	dir := t.TempDir()
	const n, in, out = 24, 24, 8
	stdout := runBin(t, bin, "bench", "--base-url", url, "--num-prompts", fmt.Sprint(n), "--max-concurrency", "4",
		"--random-input-len", fmt.Sprint(in), "--random-output-len", fmt.Sprint(out), "--seed", "1",
		"--goodput", "ttft:600000", "tpot:600000", "--metric-percentiles", "50,90,99,100",
		"--api-key", "sekrit", "--result-dir", dir, "--result-filename", "conc.json")
	for _, s := range []string{"============ Serving Benchmark Result ============", "Successful requests:                     24",
		"Maximum request concurrency:             4", "Mean TTFT (ms):", "P90 ITL (ms):", "Request goodput (req/s):"} {
		if !strings.Contains(stdout, s) {
			t.Errorf("summary lacks %q:\n%s", s, stdout)
		}
	}
	r, err := ReadResult(filepath.Join(dir, "conc.json"))
	if err != nil {
		t.Fatal(err)
	}
	checkRun(t, r, n, in, out)
	if r.MaxConcur == nil || *r.MaxConcur != 4 || r.MaxConcReqs > 4 {
		t.Errorf("max_concurrency %v, peak %d", r.MaxConcur, r.MaxConcReqs)
	}
	for _, c := range r.TimeSeries.Concurrency {
		if c > 4+1e-9 {
			t.Errorf("mean concurrency %v above the cap", c)
		}
	}
	// Every request met the generous objectives.
	if r.ReqGoodput == nil || *r.ReqGoodput != r.ReqTput || len(r.GoodputSLOs) != 2 {
		t.Errorf("goodput %v vs throughput %v, objectives %v", r.ReqGoodput, r.ReqTput, r.GoodputSLOs)
	}
	if !math.IsInf(float64(r.RequestRate), 1) || r.Burstiness != 1 || r.Backend != "openai" || !r.IgnoreEOS {
		t.Errorf("rate %v burstiness %v backend %q ignore_eos %v", r.RequestRate, r.Burstiness, r.Backend, r.IgnoreEOS)
	}
	cl := strings.Join(r.CommandLine, " ")
	if !strings.Contains(cl, "--max-concurrency 4") || strings.Contains(cl, "sekrit") || !strings.Contains(cl, "--api-key REDACTED") {
		t.Errorf("command_line %q", cl)
	}
	raw, err := os.ReadFile(filepath.Join(dir, "conc.json"))
	if err != nil {
		t.Fatal(err)
	}
	var keys map[string]json.RawMessage
	if err := json.Unmarshal(raw, &keys); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"duration", "completed", "failed", "total_input_tokens", "total_output_tokens",
		"request_throughput", "output_throughput", "total_token_throughput", "request_goodput",
		"mean_ttft_ms", "median_ttft_ms", "std_ttft_ms", "p99_ttft_ms", "p50_tpot_ms", "p100_e2el_ms", "mean_itl_ms",
		"max_concurrency", "request_rate", "burstiness", "input_lens", "output_lens", "ttfts", "itls", "errors",
		"errors_by_kind", "time_series", "date", "command_line", "server_models", "layer_breakdown", "expert_load"} {
		if _, ok := keys[k]; !ok {
			t.Errorf("the result JSON lacks %q", k)
		}
	}
	page, err := os.ReadFile(filepath.Join(dir, "conc.html"))
	if err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{"plot-ttft", "plot-tpot", "plot-itl", "plot-e2el", "plot-throughput", "plot-concurrency"} {
		if !strings.Contains(string(page), `id="`+id+`"`) {
			t.Errorf("the report lacks %s", id)
		}
	}
}

// TestServePoisson runs bench.Run in-process at a Poisson rate.
func TestServePoisson(t *testing.T) {
	_, url := server(t)
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	cfg := DefaultConfig()
	cfg.BaseURL = url
	cfg.NumPrompts, cfg.RandomInputLen, cfg.RandomOutputLen = 24, 16, 6
	cfg.RequestRate, cfg.Burstiness, cfg.Seed = 40, 1, 2
	cfg.MetricPercentiles = []float64{50, 90, 99}
	r, err := Run(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	checkRun(t, r, 24, 16, 6)
	// The last arrival is at n/rate = 0.6 s (vLLM's rescaled schedule).
	if r.Duration < 0.6 || r.RequestRate != 40 {
		t.Errorf("duration %v at 40 req/s for 24 requests", r.Duration)
	}
	// Request i is dispatched at its arrival time of the seeded schedule,
	// never before (its goroutine may send a moment later; two arrivals
	// microseconds apart may send in either order).
	sched := NewArrivals(40, 1, 2).Schedule(24)
	for i, st := range r.StartTimes {
		if st < sched[i].Seconds() {
			t.Errorf("request %d started at %.4f s, before its arrival at %.4f s", i, st, sched[i].Seconds())
		}
	}
	if last := r.StartTimes[len(r.StartTimes)-1]; last < 0.6 {
		t.Errorf("the last request started at %v, before its arrival time 0.6 s", last)
	}
	if r.MaxConcur != nil {
		t.Errorf("max_concurrency %v without a cap", *r.MaxConcur)
	}
}

// TestServeChatDuration: the chat endpoint for a fixed time with a
// concurrency cap; input lengths come from the server's usage.
func TestServeChatDuration(t *testing.T) {
	_, url := server(t)
	cfg := DefaultConfig()
	cfg.BaseURL, cfg.Endpoint = url, "/v1/chat/completions"
	cfg.NumPrompts, cfg.RandomInputLen, cfg.RandomOutputLen = 4, 12, 5
	cfg.Duration, cfg.MaxConcurrency, cfg.Warmup = time.Second, 2, 2
	r, err := Run(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	if r.Completed < 2 {
		t.Fatalf("only %d requests in a second", r.Completed)
	}
	checkRun(t, r, r.Completed, 0, 5)
	if r.Duration < 1 || r.NumPrompts != r.Completed || r.Backend != "openai-chat" || r.DurationLimit != 1 {
		t.Errorf("duration %v, num_prompts %d for %d, backend %q", r.Duration, r.NumPrompts, r.Completed, r.Backend)
	}
	// Requests start only within the duration.
	for _, s := range r.StartTimes {
		if s > 1 {
			t.Errorf("a request started at %v s, after --duration", s)
		}
	}
}

// TestServeRandomPrefix: chat requests sharing a --random-prefix-len
// system message, one at a time, against serve (prefix caching on by
// default): the server reports the shared blocks as cached tokens, which
// the result totals.
func TestServeRandomPrefix(t *testing.T) {
	_, url := server(t)
	cfg := DefaultConfig()
	cfg.BaseURL, cfg.Endpoint = url, "/v1/chat/completions"
	cfg.NumPrompts, cfg.RandomInputLen, cfg.RandomOutputLen = 3, 8, 2
	cfg.RandomPrefixLen, cfg.MaxConcurrency = 64, 1
	r, err := Run(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	checkRun(t, r, 3, 0, 2)
	if r.RandomPrefixLen != 64 {
		t.Errorf("random_prefix_len %d", r.RandomPrefixLen)
	}
	// The later two requests find at least the prefix's full blocks
	// (block size 16, the chat template's tokens before it aside).
	if r.TotalCached < 2*48 || r.TotalCached >= r.TotalInput {
		t.Errorf("total_cached_tokens %d of %d input tokens: want the shared prefix's blocks twice", r.TotalCached, r.TotalInput)
	}
}

// TestCompareCLI saves two runs and compares them through the binary.
func TestCompareCLI(t *testing.T) {
	bin, url := server(t)
	dir := t.TempDir()
	for _, c := range []string{"1", "4"} {
		runBin(t, bin, "bench", "--base-url", url, "--num-prompts", "8", "--max-concurrency", c,
			"--random-input-len", "8", "--random-output-len", "4", "--result-dir", dir, "--result-filename", "c"+c+".json")
	}
	a, b := filepath.Join(dir, "c1.json"), filepath.Join(dir, "c4.json")
	out := runBin(t, bin, "bench", "compare", a, b, "--result-dir", dir)
	for _, s := range []string{"B/A", "request_throughput", "mean_ttft_ms", "p99_e2el_ms"} {
		if !strings.Contains(out, s) {
			t.Errorf("compare output lacks %q:\n%s", s, out)
		}
	}
	page, err := os.ReadFile(filepath.Join(dir, CompareName(a, b)))
	if err != nil {
		t.Fatal(err)
	}
	if strings.Count(string(page), `<svg class="plot"`) != 6 {
		t.Errorf("compare page has %d plots, want 6", strings.Count(string(page), `<svg class="plot"`))
	}
	// bench report re-renders a saved result.
	rdir := filepath.Join(dir, "again")
	runBin(t, bin, "bench", "report", a, "--result-dir", rdir)
	if _, err := os.Stat(filepath.Join(rdir, "c1.html")); err != nil {
		t.Error(err)
	}
	// Flag mistakes are usage errors naming the flag.
	cmd := exec.Command(bin, "bench", "--base-url", url, "--percentile-metrics", "ttft,bogus")
	var stderr bytes.Buffer
	cmd.Stderr, cmd.Stdout = &stderr, io.Discard
	if err := cmd.Run(); err == nil || !strings.Contains(stderr.String(), "--percentile-metrics") {
		t.Errorf("bad --percentile-metrics: %v, %s", err, stderr.String())
	}
}
