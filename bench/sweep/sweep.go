// Package sweep is `expertmesh bench sweep`: it starts a local cluster
// (package localcluster: every role its own process, optionally each in a
// network namespace over emulated links) for every combination of expert
// nodes, attention nodes, micro-batches, concurrency and link, loads it
// with `bench` (traces to an in-process OTLP receiver, so every point has
// its per-layer breakdown), and writes the points as JSON and an HTML
// page: throughput and latency against each axis, per-user against total
// tokens/s, and — given node rates — `expertmesh plan`'s prediction for
// every point beside the measurement.
//
// Repeats are interleaved (every configuration once, then again), so a
// change in the machine's load over the sweep spreads over all
// configurations instead of biasing the last ones; every point records
// the load average when it started.
package sweep

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/expertmesh/expertmesh/bench"
	"github.com/expertmesh/expertmesh/capacity"
	"github.com/expertmesh/expertmesh/internal/telemetry"
	"github.com/expertmesh/expertmesh/localcluster"
	"github.com/expertmesh/expertmesh/model"
)

// Link is one network condition of the sweep: "loopback" (every role on
// this host's loopback) or an emulated link.
type Link struct {
	Name  string                `json:"name"`
	Spec  localcluster.LinkSpec `json:"-"`
	Netns bool                  `json:"netns"`
}

// ParseLinks reads --links: "loopback", or a one-way delay ("50us",
// "500us", "0" for namespaces without delay) for an emulated link at gbit.
func ParseLinks(s string, gbit float64) ([]Link, error) {
	var out []Link
	for _, f := range bench.ParseList(s) {
		if f == "loopback" {
			out = append(out, Link{Name: "loopback"})
			continue
		}
		d, err := time.ParseDuration(f)
		if f == "0" {
			d, err = 0, nil
		}
		if err != nil || d < 0 {
			return nil, fmt.Errorf("--links %q: want loopback or a one-way delay such as 50us", f)
		}
		out = append(out, Link{Name: fmt.Sprintf("%v/%gGbit", d, gbit), Spec: localcluster.LinkSpec{Delay: d, Gbit: gbit}, Netns: true})
	}
	if len(out) == 0 {
		return nil, errors.New("--links: want at least one")
	}
	return out, nil
}

// Config is a sweep.
type Config struct {
	// Binary is the expertmesh executable the clusters run (default:
	// this process's).
	Binary string
	// ModelDir, or Preset generated into CacheDir.
	ModelDir, Preset, CacheDir string
	// The axes: every combination is one configuration.
	ExpertNodes, AttnNodes, MicroBatches, Concurrency []int
	Links                                             []Link
	// Emulation of the emulated links: auto, netem or proxy.
	Emulation string
	// Repeats of every configuration, interleaved.
	Repeats int
	// AttnThreads and ExpertThreads per process (0: all cores).
	AttnThreads, ExpertThreads int
	// ExpertSchedBatch runs the expert nodes under SCHED_BATCH (expert
	// --sched-batch), as `up` does by default on Linux.
	ExpertSchedBatch bool
	// Bench is the load of every point (BaseURL, MaxConcurrency and
	// Traces are set per point).
	Bench bench.Config
	// ResultDir receives every point's bench JSON and HTML, sweep.json
	// and sweep.html.
	ResultDir string
	// Plan, when set, predicts every point with `plan`'s model: its rates
	// and link overheads (the nodes, micro-batches, concurrency and delay
	// are the point's). A zero DispatchOverhead (or StepOverhead) is
	// calibrated from the loopback points' measured wire time (or time
	// outside the micro-batches).
	Plan *capacity.Setup
	// FitRates scales Plan's rates to the reference point first (see
	// Predict).
	FitRates bool
	// StartAttempts bounds the tries of a point whose cluster fails to
	// start (a child exits or is not ready in time); 0: 2. A failure
	// once the cluster runs is not retried: it is the measurement.
	StartAttempts int
	// Log receives progress; ClusterLog the clusters' output (nil: none).
	Log, ClusterLog io.Writer
}

// Point is one configuration's measurement.
type Point struct {
	ExpertNodes  int     `json:"expert_nodes"`
	AttnNodes    int     `json:"attn_nodes"`
	MicroBatches int     `json:"micro_batches"`
	Concurrency  int     `json:"concurrency"`
	Link         string  `json:"link"`
	DelayUs      float64 `json:"delay_us"`
	Gbit         float64 `json:"gbit"`
	Emulation    string  `json:"emulation"`
	Repeat       int     `json:"repeat"`
	// LoadAvg is the machine's 1-minute load average when the point
	// started (other work on the machine).
	LoadAvg float64 `json:"load_avg"`

	Completed   int              `json:"completed"`
	Failed      int              `json:"failed"`
	OutputTokS  float64          `json:"output_throughput"`
	PerUserTokS float64          `json:"per_user_tok_s"` // 1000 / mean TPOT
	MeanTPOTMs  float64          `json:"mean_tpot_ms"`
	MeanITLMs   float64          `json:"mean_itl_ms"`
	P99ITLMs    float64          `json:"p99_itl_ms"`
	MeanTTFTMs  float64          `json:"mean_ttft_ms"`
	MeanE2ELMs  float64          `json:"mean_e2el_ms"`
	StepMs      float64          `json:"step_ms"` // attention node's decode step, from traces
	Breakdown   *bench.Breakdown `json:"layer_breakdown"`
	ResultFile  string           `json:"result_file"`
	Error       string           `json:"error,omitempty"`
	// Attempts is how many times the point's cluster was started (more
	// than 1 when it failed to start); StartErrors why each failed start
	// failed, in order.
	Attempts    int      `json:"attempts,omitempty"`
	StartErrors []string `json:"start_errors,omitempty"`
	// CPUSeconds is the CPU time (user + system) spent while bench ran,
	// by role: the cluster's attn, expert and coordinator processes,
	// each role's summed, and harness, this process (bench's client,
	// the OTLP receiver, the embedded etcd, delay proxies).
	// BenchSeconds is bench's duration: CPU seconds over BenchSeconds
	// and the machine's cores is how busy the cores were.
	CPUSeconds   map[string]float64 `json:"cpu_s,omitempty"`
	BenchSeconds float64            `json:"bench_s,omitempty"`

	// The plan's prediction, when rates were given.
	PredictedStepMs    float64 `json:"predicted_step_ms,omitempty"`
	PredictedTokS      float64 `json:"predicted_output_throughput,omitempty"`
	PredictedBound     string  `json:"predicted_bound,omitempty"`
	PredictionErrorPct float64 `json:"prediction_error_pct,omitempty"`
}

// Result is a sweep: its points in run order, and the plan inputs used.
type Result struct {
	Date  string `json:"date"`
	Model string `json:"model"`
	// Cores is the machine's CPU count, which every point's processes
	// share (plan's --shared-cores; 0 in sweeps saved before it was
	// recorded).
	Cores  int             `json:"cores,omitempty"`
	Points []Point         `json:"points"`
	Plan   *capacity.Setup `json:"plan,omitempty"`
	// Calibration says how the plan's overheads were set.
	Calibration string `json:"calibration,omitempty"`
}

// Run runs the sweep. Each point's cluster is stopped (and its
// namespaces removed) before the next starts; a point that fails is
// recorded with its error and the sweep goes on; sweep.json and
// sweep.html are rewritten after every point. Cancelling ctx stops it
// after cleaning up.
func Run(ctx context.Context, cfg Config) (*Result, error) {
	if cfg.Repeats < 1 {
		cfg.Repeats = 1
	}
	logw := cfg.Log
	if logw == nil {
		logw = io.Discard
	}
	if cfg.ResultDir == "" {
		return nil, errors.New("--result-dir is required")
	}
	if err := os.MkdirAll(cfg.ResultDir, 0o755); err != nil {
		return nil, err
	}
	for name, v := range map[string][]int{"--expert-nodes": cfg.ExpertNodes, "--attn-nodes": cfg.AttnNodes, "--micro-batches": cfg.MicroBatches, "--concurrency": cfg.Concurrency} {
		if len(v) == 0 || slices.Min(v) < 1 {
			return nil, fmt.Errorf("%s: want a list of positive numbers", name)
		}
	}
	dir, err := localcluster.EnsureModel(localcluster.Config{ModelDir: cfg.ModelDir, Preset: cfg.Preset, CacheDir: cfg.CacheDir})
	if err != nil {
		return nil, err
	}
	mcfg, err := model.LoadConfig(dir)
	if err != nil {
		return nil, err
	}
	rcv := telemetry.NewReceiver()
	if err := rcv.Listen("0.0.0.0:0"); err != nil {
		return nil, err
	}
	defer rcv.Close()
	_, port, err := net.SplitHostPort(rcv.Addr())
	if err != nil {
		return nil, err
	}

	type conf struct {
		e, a, m, c int
		link       Link
	}
	var confs []conf
	for _, link := range cfg.Links {
		for _, e := range cfg.ExpertNodes {
			for _, a := range cfg.AttnNodes {
				for _, m := range cfg.MicroBatches {
					for _, c := range cfg.Concurrency {
						confs = append(confs, conf{e, a, m, c, link})
					}
				}
			}
		}
	}
	res := &Result{Date: time.Now().Format("20060102-150405"), Model: dir, Cores: runtime.NumCPU()}
	total := len(confs) * cfg.Repeats
	for r := range cfg.Repeats {
		for i, cf := range confs {
			if err := ctx.Err(); err != nil {
				return res, err
			}
			p := Point{ExpertNodes: cf.e, AttnNodes: cf.a, MicroBatches: cf.m, Concurrency: cf.c, Link: cf.link.Name,
				DelayUs: float64(cf.link.Spec.Delay) / 1e3, Gbit: cf.link.Spec.Gbit, Repeat: r, LoadAvg: loadAvg()}
			fmt.Fprintf(logw, "[%d/%d] %d expert, %d attention node(s), %d micro-batch(es), concurrency %d, link %s (load %.1f)\n",
				r*len(confs)+i+1, total, cf.e, cf.a, cf.m, cf.c, cf.link.Name, p.LoadAvg)
			if err := runAttempts(ctx, cfg, logw, func() error {
				rcv.Reset()
				return runPoint(ctx, cfg, dir, port, rcv, cf.link, &p)
			}, &p); err != nil {
				p.Error = err.Error()
				fmt.Fprintf(logw, "  failed: %v\n", err)
			} else {
				fmt.Fprintf(logw, "  %.1f tok/s, %.1f tok/s per user, TPOT %.1f ms, step %.1f ms\n", p.OutputTokS, p.PerUserTokS, p.MeanTPOTMs, p.StepMs)
			}
			res.Points = append(res.Points, p)
			// Saved as it goes: an interrupted sweep keeps its points.
			if _, _, err := Save(res, cfg.ResultDir); err != nil {
				fmt.Fprintf(logw, "  saving: %v\n", err)
			}
		}
	}
	if cfg.Plan != nil {
		Predict(res, mcfg, *cfg.Plan, cfg.FitRates)
	}
	return res, nil
}

// startError is a point whose cluster (or its namespaces) did not come
// up: nothing was measured, and the point may be tried again.
type startError struct{ err error }

func (e *startError) Error() string { return "cluster start: " + e.err.Error() }
func (e *startError) Unwrap() error { return e.err }

// runAttempts runs a point (run) until it does not fail to start, at
// most cfg.StartAttempts times, and records the attempts and each failed
// start's error in p.
func runAttempts(ctx context.Context, cfg Config, logw io.Writer, run func() error, p *Point) error {
	attempts := cfg.StartAttempts
	if attempts < 1 {
		attempts = 2
	}
	for {
		p.Attempts++
		err := run()
		var se *startError
		if !errors.As(err, &se) {
			return err
		}
		p.StartErrors = append(p.StartErrors, err.Error())
		if p.Attempts >= attempts || ctx.Err() != nil {
			return err
		}
		fmt.Fprintf(logw, "  attempt %d of %d failed to start, trying again: %v\n", p.Attempts, attempts, err)
	}
}

// roleArgs is what a point's roles are started with beyond the cluster's
// shape: traces to the sweep's receiver at otlp, the point's
// micro-batches, a cache for its concurrency, and SCHED_BATCH for the
// expert nodes when the sweep asks for it.
func roleArgs(cfg Config, p *Point, otlp string) (coordinator, attn, expert []string) {
	coordinator = []string{"--max-running", strconv.Itoa(p.Concurrency)}
	attn = []string{"--otlp-endpoint", otlp, "--micro-batches", strconv.Itoa(p.MicroBatches),
		"--cache-mb", strconv.Itoa(max(256, 64*p.Concurrency/p.AttnNodes))}
	expert = []string{"--otlp-endpoint", otlp}
	if cfg.ExpertSchedBatch {
		expert = append(expert, "--sched-batch")
	}
	return coordinator, attn, expert
}

// runPoint starts the point's cluster, benches it and stops it.
func runPoint(ctx context.Context, cfg Config, dir, rcvPort string, rcv *telemetry.Receiver, link Link, p *Point) (err error) {
	lc := localcluster.DefaultConfig()
	lc.Binary, lc.ModelDir, lc.CacheDir = cfg.Binary, dir, cfg.CacheDir
	lc.AttnNodes, lc.ExpertNodes, lc.Addr = p.AttnNodes, p.ExpertNodes, "127.0.0.1:0"
	lc.AttnThreads, lc.ExpertThreads = cfg.AttnThreads, cfg.ExpertThreads
	lc.DataDir, err = os.MkdirTemp("", "expertmesh-sweep-etcd-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(lc.DataDir)
	lc.ClusterName = "sweep"
	lc.Log = cfg.ClusterLog
	lc.ReadyTimeout = 5 * time.Minute
	host := "127.0.0.1"
	if link.Netns {
		n, err := localcluster.NewNetns(ctx, localcluster.NetnsConfig{Link: link.Spec, Emulation: cfg.Emulation})
		if err != nil {
			return &startError{err}
		}
		defer n.Close() // after the cluster's Close, deferred below
		lc.Net, host, p.Emulation = n, n.Host(), n.Mode()
	}
	lc.CoordinatorArgs, lc.AttnArgs, lc.ExpertArgs = roleArgs(cfg, p, "http://"+host+":"+rcvPort)
	c, err := localcluster.Start(ctx, lc)
	if err != nil {
		if ctx.Err() != nil {
			return err
		}
		return &startError{err}
	}
	defer c.Close()

	bc := cfg.Bench
	bc.BaseURL, bc.Host, bc.MaxConcurrency = c.URL, "", p.Concurrency
	bc.Traces, bc.Log, bc.Progress = rcv, nil, nil
	bc.Label = fmt.Sprintf("sweep-e%d-a%d-m%d-c%d-%s-r%d", p.ExpertNodes, p.AttnNodes, p.MicroBatches, p.Concurrency, safeName(link.Name), p.Repeat)
	cpu0 := cpuByRole(c)
	r, err := bench.Run(ctx, bc)
	if err != nil {
		return err
	}
	if cpu1 := cpuByRole(c); cpu0 != nil && cpu1 != nil {
		p.CPUSeconds = map[string]float64{}
		for role, v := range cpu1 {
			p.CPUSeconds[role] = v - cpu0[role]
		}
		p.BenchSeconds = r.Duration
	}
	jp, _, err := bench.Save(r, cfg.ResultDir, bc.Label+".json")
	if err != nil {
		return err
	}
	p.ResultFile = filepath.Base(jp)
	p.Completed, p.Failed, p.OutputTokS = r.Completed, r.Failed, r.OutTput
	p.MeanTPOTMs, p.MeanITLMs, p.P99ITLMs = r.Stats["mean_tpot_ms"], r.Stats["mean_itl_ms"], r.Stats["p99_itl_ms"]
	p.MeanTTFTMs, p.MeanE2ELMs = r.Stats["mean_ttft_ms"], r.Stats["mean_e2el_ms"]
	if p.MeanTPOTMs > 0 {
		p.PerUserTokS = 1000 / p.MeanTPOTMs
	}
	if bd := r.LayerBreakdown; bd != nil && strings.HasPrefix(bd.Source, "traces") {
		p.Breakdown, p.StepMs = bd, bd.StepMs
	}
	return nil
}

// Predict fills every point's prediction. Overheads left zero are
// calibrated on the loopback points: the dispatch overhead from their
// measured wire time per MoE layer (of the points without ping-pong
// where there are any: with two micro-batches a dispatch's span also
// holds its wait for the expert node still busy with the other
// micro-batch, which the model has as the expert node's work for every
// micro-batch, so it would count twice), the step overhead from their
// time outside the micro-batches.
//
// With fit, the rates are first scaled by one factor so that the
// reference point (loopback, fewest expert nodes, fewest micro-batches)
// is predicted exactly: the load of a shared machine in one number.
func Predict(res *Result, c *model.Config, s capacity.Setup, fit bool) {
	var wire, wire1, nodes, nodes1, outside []float64
	for _, p := range res.Points {
		if p.Link != "loopback" || p.Breakdown == nil {
			continue
		}
		for _, l := range p.Breakdown.Layers {
			wire, nodes = append(wire, l.DispatchWireMs), append(nodes, float64(p.ExpertNodes))
			if p.MicroBatches == 1 {
				wire1, nodes1 = append(wire1, l.DispatchWireMs), append(nodes1, float64(p.ExpertNodes))
			}
		}
		outside = append(outside, p.Breakdown.OutsideMs)
	}
	wireFrom := "loopback"
	if len(wire1) > 0 {
		wire, nodes, wireFrom = wire1, nodes1, "loopback with one micro-batch"
	}
	var notes []string
	if s.DispatchOverhead == 0 && s.DispatchNodeOverhead == 0 && len(wire) > 0 {
		// With several expert-node counts, the wire time's line against
		// the count: a dispatch's own software and each node's message
		// (at the sweep's rows every node is reached); with one count,
		// its median.
		if a, b, ok := fitLine(nodes, wire); ok {
			s.DispatchOverhead, s.DispatchNodeOverhead = time.Duration(a*1e6), time.Duration(b*1e6)
			notes = append(notes, fmt.Sprintf("dispatch overhead %v + %v per expert node: least-squares line of the wire time per MoE layer against expert nodes on %s",
				s.DispatchOverhead, s.DispatchNodeOverhead, wireFrom))
		} else {
			s.DispatchOverhead = time.Duration(median(wire) * 1e6)
			notes = append(notes, fmt.Sprintf("dispatch overhead %v: median wire time per MoE layer on %s", s.DispatchOverhead, wireFrom))
		}
	}
	if s.StepOverhead == 0 && len(outside) > 0 {
		s.StepOverhead = time.Duration(median(outside) * 1e6)
		notes = append(notes, fmt.Sprintf("step overhead %v: median time outside the micro-batches on loopback", s.StepOverhead))
	}
	if s.Shared != nil && s.SharedCores == 0 {
		s.SharedCores = res.Cores
		if s.SharedCores == 0 {
			s.SharedCores = runtime.NumCPU()
		}
	}
	at := func(s capacity.Setup, p *Point) capacity.Setup {
		s.AttnNodes, s.ExpertNodes, s.MicroBatches, s.Concurrency = p.AttnNodes, p.ExpertNodes, p.MicroBatches, p.Concurrency
		s.Link = capacity.Link{Latency: time.Duration(p.DelayUs * 1e3), Gbps: p.Gbit}
		return s
	}
	if fit {
		// One number from one configuration: the factor by which this
		// run's machine (its load included) is slower than the rates
		// given, from the loopback configuration with the fewest expert
		// nodes and micro-batches; every other point is predicted.
		if ref, step := reference(res); ref != nil {
			f := fitScale(c, at(s, ref), step)
			s.Attn, s.Expert = s.Attn.Scaled(f), s.Expert.Scaled(f)
			if s.Shared != nil {
				sh := s.Shared.Scaled(f)
				s.Shared = &sh
			}
			notes = append(notes, fmt.Sprintf("rates scaled by %.3f to match the measured %.1f ms step of %d expert node(s), %d micro-batch(es) on loopback (the machine's load in one number)",
				f, step, ref.ExpertNodes, ref.MicroBatches))
		}
	}
	res.Plan, res.Calibration = &s, strings.Join(notes, "; ")
	for i := range res.Points {
		p := &res.Points[i]
		pr, err := capacity.Predict(c, at(s, p))
		if err != nil {
			continue
		}
		p.PredictedStepMs, p.PredictedTokS, p.PredictedBound = pr.StepMs, pr.TotalTokS, pr.Bound
		if p.StepMs > 0 {
			p.PredictionErrorPct = 100 * (pr.StepMs - p.StepMs) / p.StepMs
		}
	}
}

// reference is the loopback configuration with the fewest expert nodes,
// then micro-batches, and its mean measured step.
func reference(res *Result) (*Point, float64) {
	var ref *Point
	for i := range res.Points {
		p := &res.Points[i]
		if p.Link != "loopback" || p.StepMs <= 0 {
			continue
		}
		if ref == nil || p.ExpertNodes < ref.ExpertNodes || (p.ExpertNodes == ref.ExpertNodes && p.MicroBatches < ref.MicroBatches) {
			ref = p
		}
	}
	if ref == nil {
		return nil, 0
	}
	var sum float64
	n := 0
	for _, p := range res.Points {
		if p.Link == ref.Link && p.ExpertNodes == ref.ExpertNodes && p.MicroBatches == ref.MicroBatches &&
			p.AttnNodes == ref.AttnNodes && p.Concurrency == ref.Concurrency && p.StepMs > 0 {
			sum += p.StepMs
			n++
		}
	}
	return ref, sum / float64(n)
}

// fitScale finds the factor f for s's rates at which the predicted step
// is want (the prediction falls as f grows), by bisection in log space.
func fitScale(c *model.Config, s capacity.Setup, want float64) float64 {
	pred := func(f float64) float64 {
		t := s
		t.Attn, t.Expert = s.Attn.Scaled(f), s.Expert.Scaled(f)
		if s.Shared != nil {
			sh := s.Shared.Scaled(f)
			t.Shared = &sh
		}
		p, err := capacity.Predict(c, t)
		if err != nil {
			return math.NaN()
		}
		return p.StepMs
	}
	lo, hi := math.Log(1e-4), math.Log(1e4)
	for range 80 {
		mid := (lo + hi) / 2
		if pred(math.Exp(mid)) > want {
			lo = mid
		} else {
			hi = mid
		}
	}
	return math.Exp((lo + hi) / 2)
}

// cpuByRole is the CPU seconds (user + system) each role's processes
// and this process have used so far, from /proc; nil where /proc does
// not tell (not Linux) or a process is gone.
func cpuByRole(c *localcluster.Cluster) map[string]float64 {
	self, ok := procCPU("self")
	if !ok {
		return nil
	}
	out := map[string]float64{"harness": self}
	for _, ch := range c.Children() {
		v, ok := procCPU(strconv.Itoa(ch.PID))
		if !ok {
			return nil
		}
		out[ch.Role] += v
	}
	return out
}

// procCPU reads utime + stime of /proc/PID/stat, in seconds (the kernel
// counts them in USER_HZ ticks, 100 a second on Linux).
func procCPU(pid string) (float64, bool) {
	b, err := os.ReadFile("/proc/" + pid + "/stat")
	if err != nil {
		return 0, false
	}
	// The command name (field 2) is in parentheses and may hold spaces;
	// utime and stime are fields 14 and 15, the 12th and 13th after it.
	i := strings.LastIndexByte(string(b), ')')
	if i < 0 {
		return 0, false
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 13 {
		return 0, false
	}
	u, err1 := strconv.ParseFloat(f[11], 64)
	s, err2 := strconv.ParseFloat(f[12], 64)
	if err1 != nil || err2 != nil {
		return 0, false
	}
	return (u + s) / 100, true
}

// fitLine is the least-squares line y = a + b·x, with a and b clipped
// at 0 (a software time is not negative); ok is false unless x holds at
// least two values.
func fitLine(x, y []float64) (a, b float64, ok bool) {
	n := float64(len(x))
	var mx, my float64
	for i := range x {
		mx, my = mx+x[i], my+y[i]
	}
	mx, my = mx/n, my/n
	var sxy, sxx float64
	for i := range x {
		sxy += (x[i] - mx) * (y[i] - my)
		sxx += (x[i] - mx) * (x[i] - mx)
	}
	if n < 2 || sxx == 0 {
		return 0, 0, false
	}
	b = max(sxy/sxx, 0)
	a = my - b*mx
	if a < 0 {
		// Through the origin instead.
		var sx2, sxy0 float64
		for i := range x {
			sx2, sxy0 = sx2+x[i]*x[i], sxy0+x[i]*y[i]
		}
		a, b = 0, sxy0/sx2
	}
	return a, b, true
}

func median(v []float64) float64 {
	s := slices.Clone(v)
	slices.Sort(s)
	if len(s) == 0 {
		return math.NaN()
	}
	return s[len(s)/2]
}

func loadAvg() float64 {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return 0
	}
	f := strings.Fields(string(b))
	if len(f) == 0 {
		return 0
	}
	v, _ := strconv.ParseFloat(f[0], 64)
	return v
}

func safeName(s string) string {
	return strings.Map(func(r rune) rune {
		if r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '.' {
			return r
		}
		return '_'
	}, s)
}

// Save writes sweep.json and sweep.html into dir.
func Save(res *Result, dir string) (jsonPath, htmlPath string, err error) {
	jsonPath, htmlPath = filepath.Join(dir, "sweep.json"), filepath.Join(dir, "sweep.html")
	b, err := json.MarshalIndent(res, "", "  ")
	if err != nil {
		return "", "", err
	}
	if err := os.WriteFile(jsonPath, append(b, '\n'), 0o644); err != nil {
		return "", "", err
	}
	return jsonPath, htmlPath, os.WriteFile(htmlPath, []byte(Page(res)), 0o644)
}

// Read reads a sweep.json.
func Read(path string) (*Result, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var r Result
	if err := json.Unmarshal(b, &r); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return &r, nil
}
