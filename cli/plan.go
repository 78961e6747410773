package cli

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"runtime"
	"time"

	"github.com/expertmesh/expertmesh/capacity"
)

// Rates one core of the development machine reaches (bench-kernels:
// BF16 matvec ~28 GB/s, matmul ~170 GFLOP/s); the defaults of plan's rate
// flags, to be replaced by the target nodes' own figures.
const (
	defaultPlanGBps   = 28
	defaultPlanGFLOPs = 170
)

// runPlan is `expertmesh plan`: the capacity model's prediction for a
// model on a cluster (package capacity).
func runPlan(_ context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("plan", stderr)
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), `usage: expertmesh plan --model MODEL [flags]

Predicts a decode step of MODEL on A attention and E expert nodes: per-layer
attention, wire and expert time, whether ping-pong micro-batching hides the
hop, tokens/s per user and per node, the micro-batch count that hides the
hop, and memory per node. Rates are per node, as bench-kernels measures them
(MatVec GB/s, MatMul GFLOP/s, for the node's thread count). A pure model: see
package capacity's documentation.

flags:
`)
		fs.PrintDefaults()
	}
	name := fs.String("model", "deepseek-v2", "model: deepseek-v2 (236B), deepseek-v2-lite, deepseek-v3, a preset (v2-lite-4l, ...), or a config.json / checkpoint directory")
	var s capacity.Setup
	fs.IntVar(&s.AttnNodes, "attn-nodes", 1, "attention nodes")
	fs.IntVar(&s.ExpertNodes, "expert-nodes", 1, "expert nodes")
	fs.IntVar(&s.MicroBatches, "micro-batches", 2, "micro-batches per attention-node step (1: no ping-pong)")
	fs.IntVar(&s.Concurrency, "concurrency", 32, "sequences decoding at once, cluster-wide")
	fs.IntVar(&s.Context, "context", 2048, "mean tokens in each sequence's cache")
	fs.IntVar(&s.Redundant, "redundant-experts", 0, "extra expert replicas per MoE layer")
	fs.Float64Var(&s.Attn.GBps, "attn-gbps", defaultPlanGBps, "attention node: weight streaming rate, GB/s (bench-kernels MatVec)")
	fs.Float64Var(&s.Attn.GFLOPs, "attn-gflops", defaultPlanGFLOPs, "attention node: GFLOP/s (bench-kernels MatMul)")
	fs.Float64Var(&s.Expert.GBps, "expert-gbps", defaultPlanGBps, "expert node: weight streaming rate, GB/s")
	fs.Float64Var(&s.Expert.GFLOPs, "expert-gflops", defaultPlanGFLOPs, "expert node: GFLOP/s")
	sharedGBps := fs.Float64("shared-gbps", 0, "all nodes on one machine with this total GB/s (the emulated-link harness); 0: nodes are separate machines")
	sharedGFLOPs := fs.Float64("shared-gflops", 0, "with --shared-gbps: the machine's total GFLOP/s")
	fs.IntVar(&s.SharedCores, "shared-cores", 0, "with --shared-gbps: the machine's cores, over which every process's CPU time (compute and dispatch software) is shared (0: this machine's)")
	fs.DurationVar(&s.Link.Latency, "latency", 10*time.Microsecond, "link latency, one way")
	fs.Float64Var(&s.Link.Gbps, "link-gbps", 100, "link rate per node, Gbit/s each way (0: no limit)")
	fs.DurationVar(&s.DispatchOverhead, "dispatch-overhead", 100*time.Microsecond, "software cost of one dispatch round trip besides the wire (measure it on loopback: the breakdown's wire time)")
	fs.DurationVar(&s.DispatchNodeOverhead, "dispatch-node-overhead", 0, "software cost added to a dispatch per expert node it reaches (the slope of the loopback wire time against expert nodes; 0: none)")
	fs.DurationVar(&s.StepOverhead, "step-overhead", 0, "a step's fixed cost outside its layers")
	fs.DurationVar(&s.SampleOverhead, "sample-overhead", 0, "a step's cost per sequence outside its layers (sampling)")
	wb := fs.Float64("weight-bytes", 0, "bytes per weight on attention nodes (default: 2 for BF16, 1 for an FP8 model)")
	ewb := fs.Float64("expert-weight-bytes", 0, "bytes per weight on expert nodes (default: as --weight-bytes)")
	fs.Float64Var(&s.CacheBytes, "cache-bytes", 4, "bytes per latent number in the cache (expertmesh: 4, float32)")
	fs.Float64Var(&s.WireBytes, "wire-bytes", 4, "bytes per hidden number on the wire (expertmesh: 4, float32)")
	asJSON := fs.Bool("json", false, "print the prediction as JSON")
	if err := parse(fs, args); err != nil {
		return err
	}
	c, err := capacity.LoadModel(*name)
	if err != nil {
		return err
	}
	def := capacity.DefaultSetup(c)
	s.WeightBytes, s.ExpertWeightBytes = def.WeightBytes, def.ExpertWeightBytes
	if *wb > 0 {
		s.WeightBytes, s.ExpertWeightBytes = *wb, *wb
	}
	if *ewb > 0 {
		s.ExpertWeightBytes = *ewb
	}
	if *sharedGBps > 0 || *sharedGFLOPs > 0 {
		s.Shared = &capacity.Rates{GBps: *sharedGBps, GFLOPs: *sharedGFLOPs}
		if s.SharedCores == 0 {
			s.SharedCores = runtime.NumCPU()
		}
	}
	p, err := capacity.Predict(c, s)
	if err != nil {
		return err
	}
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(p)
	}
	capacity.Write(stdout, *name, p)
	return nil
}
