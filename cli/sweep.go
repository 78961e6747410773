package cli

import (
	"context"
	"fmt"
	"io"
	"os"
	"runtime"
	"strconv"
	"time"

	"github.com/expertmesh/expertmesh/bench"
	"github.com/expertmesh/expertmesh/bench/sweep"
	"github.com/expertmesh/expertmesh/capacity"
	"github.com/expertmesh/expertmesh/model"
)

// runBenchSweep is `expertmesh bench sweep`: a local cluster per
// configuration, loaded by bench, results as JSON and HTML (package
// sweep).
func runBenchSweep(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("bench sweep", stderr)
	var cfg sweep.Config
	fs.StringVar(&cfg.ModelDir, "model", "", "checkpoint directory (default: generate --preset into the cache dir)")
	fs.StringVar(&cfg.Preset, "preset", "tiny-v2", "model to generate when --model is not given (v2-lite-4l for the real dimensions)")
	fs.StringVar(&cfg.CacheDir, "cache-dir", "", "where generated models are kept (default: the user cache dir)")
	experts := fs.String("expert-nodes", "1,2,3,4", "expert node counts to sweep")
	attn := fs.String("attn-nodes", "1", "attention node counts to sweep")
	mbs := fs.String("micro-batches", "1,2", "micro-batch counts to sweep (1: ping-pong off)")
	conc := fs.String("concurrency", "8", "request concurrencies to sweep")
	links := fs.String("links", "loopback", `links to sweep: "loopback" (no namespaces) and one-way delays of emulated links, e.g. loopback,50us,500us (network namespaces; needs root)`)
	gbit := fs.Float64("link-gbit", 10, "emulated links' rate, Gbit/s each way (0: no limit)")
	fs.StringVar(&cfg.Emulation, "emulation", "auto", "how emulated links delay: netem, proxy (user-space, where the kernel has no netem) or auto")
	fs.IntVar(&cfg.Repeats, "repeats", 1, "runs of every configuration, interleaved (all once, then all again)")
	fs.IntVar(&cfg.StartAttempts, "start-attempts", 2, "tries of a point whose cluster fails to start (each failure is kept in sweep.json)")
	fs.IntVar(&cfg.AttnThreads, "attn-threads", 0, "threads per attention node (0: all cores)")
	fs.IntVar(&cfg.ExpertThreads, "expert-threads", min(2, runtime.NumCPU()), "threads per expert node (as up)")
	fs.BoolVar(&cfg.ExpertSchedBatch, "expert-sched-batch", runtime.GOOS == "linux", "run expert nodes under SCHED_BATCH (Linux), as up does")
	fs.StringVar(&cfg.ResultDir, "result-dir", "sweep-results", "directory for every point's bench JSON and HTML, sweep.json and sweep.html")
	quiet := fs.Bool("quiet", true, "do not print the clusters' logs")
	bc := bench.DefaultConfig()
	fs.IntVar(&bc.NumPrompts, "num-prompts", 32, "requests per point")
	fs.IntVar(&bc.RandomInputLen, "random-input-len", 32, "prompt tokens")
	fs.IntVar(&bc.RandomOutputLen, "random-output-len", 64, "output tokens")
	fs.IntVar(&bc.Warmup, "warmup", 4, "requests per point sent first and not counted")
	fs.Int64Var(&bc.Seed, "seed", 0, "seed of prompts")
	// plan's model for every point, when rates are given.
	var plan capacity.Setup
	fs.Float64Var(&plan.Attn.GBps, "attn-gbps", 0, "predict every point with plan: the attention node's GB/s (bench-kernels); 0: no prediction")
	fs.Float64Var(&plan.Attn.GFLOPs, "attn-gflops", 0, "the attention node's GFLOP/s")
	fs.Float64Var(&plan.Expert.GBps, "expert-gbps", 0, "an expert node's GB/s")
	fs.Float64Var(&plan.Expert.GFLOPs, "expert-gflops", 0, "an expert node's GFLOP/s")
	sharedGBps := fs.Float64("shared-gbps", 0, "the machine's total GB/s all nodes share (0: not modelled)")
	sharedGFLOPs := fs.Float64("shared-gflops", 0, "the machine's total GFLOP/s")
	fs.IntVar(&plan.SharedCores, "shared-cores", 0, "the machine's cores, which share every process's CPU time (0: the sweep's recorded count, else this machine's)")
	fs.DurationVar(&plan.DispatchOverhead, "dispatch-overhead", 0, "plan's software cost per dispatch (0: calibrated on the loopback points)")
	fs.DurationVar(&plan.DispatchNodeOverhead, "dispatch-node-overhead", 0, "plan's software cost per expert node a dispatch reaches (0 with --dispatch-overhead 0: calibrated on the loopback points)")
	fs.DurationVar(&plan.StepOverhead, "step-overhead", 0, "plan's cost per step outside the layers (0: calibrated on the loopback points)")
	fs.BoolVar(&cfg.FitRates, "fit-rates", false, "scale the rates by one factor that makes plan predict the loopback point with the fewest expert nodes and micro-batches exactly (a loaded, shared machine); the other points are then predictions")
	temp := fs.Float64("temperature", 0, "sampling temperature of the requests (0: greedy, so that sampling over the vocabulary does not weigh on the step)")
	from := fs.String("from", "", "re-render (and, with rates, re-predict) a saved sweep.json instead of running; its points stay as measured")
	pos, err := parseInterleaved(fs, args)
	if err != nil {
		return err
	}
	if len(pos) > 0 {
		return fmt.Errorf("bench sweep: unexpected argument %q", pos[0])
	}
	for dst, src := range map[*[]int]*string{&cfg.ExpertNodes: experts, &cfg.AttnNodes: attn, &cfg.MicroBatches: mbs, &cfg.Concurrency: conc} {
		for _, f := range bench.ParseList(*src) {
			v, err := strconv.Atoi(f)
			if err != nil {
				return fmt.Errorf("%q: not a number", f)
			}
			*dst = append(*dst, v)
		}
	}
	if cfg.Links, err = sweep.ParseLinks(*links, *gbit); err != nil {
		return err
	}
	bc.NumPrompts = max(bc.NumPrompts, 1)
	bc.Temperature = temp
	cfg.Bench = bc
	if plan.Attn.GBps > 0 {
		c, err := loadSweepModel(cfg)
		if err != nil {
			return err
		}
		def := capacity.DefaultSetup(c)
		plan.Context = bc.RandomInputLen + bc.RandomOutputLen/2
		plan.WeightBytes, plan.ExpertWeightBytes, plan.CacheBytes, plan.WireBytes = def.WeightBytes, def.ExpertWeightBytes, def.CacheBytes, def.WireBytes
		if plan.Expert.GBps == 0 {
			plan.Expert = plan.Attn
		}
		if *sharedGBps > 0 {
			plan.Shared = &capacity.Rates{GBps: *sharedGBps, GFLOPs: max(*sharedGFLOPs, plan.Attn.GFLOPs)}
		}
		cfg.Plan = &plan
	}
	if *from != "" {
		res, err := sweep.Read(*from)
		if err != nil {
			return err
		}
		if cfg.Plan != nil {
			c, err := capacity.LoadModel(res.Model)
			if err != nil {
				return err
			}
			sweep.Predict(res, c, *cfg.Plan, cfg.FitRates)
		}
		if err := os.MkdirAll(cfg.ResultDir, 0o755); err != nil {
			return err
		}
		return saveSweep(res, cfg.ResultDir, time.Time{}, stdout, stderr)
	}
	cfg.Log = stderr
	if !*quiet {
		cfg.ClusterLog = stderr
	}
	start := time.Now()
	res, err := sweep.Run(ctx, cfg)
	if res != nil && len(res.Points) > 0 {
		if serr := saveSweep(res, cfg.ResultDir, start, stdout, stderr); serr != nil {
			return serr
		}
	}
	return err
}

// saveSweep writes sweep.json and sweep.html and prints the summary.
func saveSweep(res *sweep.Result, dir string, start time.Time, stdout, stderr io.Writer) error {
	jp, hp, err := sweep.Save(res, dir)
	if err != nil {
		return err
	}
	took := ""
	if !start.IsZero() {
		took = fmt.Sprintf(" in %v", time.Since(start).Round(time.Second))
	}
	fmt.Fprintf(stderr, "sweep of %d points%s: saved %s and %s\n", len(res.Points), took, jp, hp)
	if res.Calibration != "" {
		fmt.Fprintf(stderr, "plan calibrated on loopback: %s\n", res.Calibration)
	}
	for _, s := range sweep.Summarize(res) {
		fmt.Fprintf(stdout, "%-34s runs %d  load %4.1f  %7.1f tok/s  %6.2f tok/s/user  TPOT %7.1f ms  step %7.1f ms", s.Key, s.Runs, s.LoadAvg, s.OutputTokS, s.PerUserTokS, s.TPOTMs, s.StepMs)
		if s.PredictedStepMs > 0 {
			fmt.Fprintf(stdout, "  plan %7.1f ms (%+.0f%%, %s)", s.PredictedStepMs, s.ErrorPct, s.Bound)
		}
		fmt.Fprintln(stdout)
	}
	return nil
}

func loadSweepModel(cfg sweep.Config) (*model.Config, error) {
	if cfg.ModelDir != "" {
		return capacity.LoadModel(cfg.ModelDir)
	}
	return capacity.LoadModel(cfg.Preset)
}
