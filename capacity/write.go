package capacity

import (
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
)

// Write prints a prediction for people: the setup, the per-layer table
// (consecutive layers with the same figures folded into one line), the
// step and its bound, tokens per second, the micro-batch counts, memory.
func Write(w io.Writer, name string, p *Prediction) {
	s := p.Setup
	fmt.Fprintf(w, "model %s on %d attention + %d expert node(s), %d micro-batch(es), %d sequences of %d tokens (%d rows per micro-batch)\n",
		name, s.AttnNodes, s.ExpertNodes, s.MicroBatches, s.Concurrency, s.Context, p.RowsPerMicroBatch)
	fmt.Fprintf(w, "rates: attention %.4g GB/s %.4g GFLOP/s, expert %.4g GB/s %.4g GFLOP/s", s.Attn.GBps, s.Attn.GFLOPs, s.Expert.GBps, s.Expert.GFLOPs)
	if s.Shared != nil {
		fmt.Fprintf(w, ", one shared machine %.4g GB/s %.4g GFLOP/s on %d cores", s.Shared.GBps, s.Shared.GFLOPs, s.SharedCores)
	}
	fmt.Fprintf(w, "\nlink: %v one way, %s; dispatch overhead %v", s.Link.Latency, gbps(s.Link.Gbps), s.DispatchOverhead)
	if s.DispatchNodeOverhead > 0 {
		fmt.Fprintf(w, " + %v per expert node reached", s.DispatchNodeOverhead)
	}
	fmt.Fprint(w, "\n\n")

	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "layers\tkind\tattention ms\twire ms\texpert ms\tslowest +ms\tlayer ms\thop\t")
	row := func(first, last int, l Layer) {
		span := fmt.Sprint(first)
		if last > first {
			span = fmt.Sprintf("%d-%d", first, last)
		}
		kind, hop := "dense", "-"
		if l.MoE {
			kind, hop = "MoE", "exposed"
			if l.Hidden {
				hop = "hidden"
			}
			if l.ExpertBound {
				hop += ", experts bound"
			}
		}
		fmt.Fprintf(tw, "%s\t%s\t%.3f\t%.3f\t%.3f\t%.3f\t%.3f\t%s\t\n", span, kind, l.AttentionMs, l.WireMs, l.ExpertMs, l.SlowestWaitMs, l.LayerMs, hop)
	}
	start := 0
	for i := 1; i <= len(p.Layers); i++ {
		if i < len(p.Layers) && same(p.Layers[i], p.Layers[start]) {
			continue
		}
		row(start, i-1, p.Layers[start])
		start = i
	}
	tw.Flush()
	fmt.Fprintf(w, "LM head %.3f ms, overhead %.3f ms\n\n", p.HeadMs, p.OverheadMs)
	fmt.Fprintf(w, "step %.3f ms (bound: %s; pipeline %.3f ms, expert nodes busy %.3f ms", p.StepMs, p.Bound, p.PipelineMs, p.ExpertBusyMs)
	if p.MachineMs > 0 {
		fmt.Fprintf(w, ", machine %.3f ms = work %.3f + dispatch software %.3f + overhead %.3f", p.MachineMs, p.MachineWorkMs, p.MachineDispatchMs, p.OverheadMs)
	}
	fmt.Fprintf(w, ")\ntokens/s: %.1f per user, %.1f total, %.1f per node, %.1f per attention node\n", p.PerUserTokS, p.TotalTokS, p.PerNodeTokS, p.PerAttnNodeTokS)
	if p.HideMicroBatches > 0 {
		fmt.Fprintf(w, "micro-batches that hide the hop: %d", p.HideMicroBatches)
	} else {
		fmt.Fprintf(w, "micro-batches that hide the hop: none (attention per micro-batch is shorter than the hop at any count)")
	}
	fmt.Fprintf(w, "; fastest step with %d (%.3f ms)\n\n", p.BestMicroBatches, p.BestStepMs)
	m := p.Memory
	fmt.Fprintf(w, "memory per attention node: weights %s + latent cache %s (%s per token) = %s\n",
		size(m.AttnWeights), size(m.AttnCache), size(m.CachePerToken), size(m.AttnTotal))
	fmt.Fprintf(w, "memory per expert node: %.1f routed experts per MoE layer, %s of weights (redundant replicas %s)\n",
		m.ExpertsPerNode, size(m.ExpertWeights), size(m.ExpertRedundant))
}

func same(a, b Layer) bool {
	a.Layer, b.Layer = 0, 0
	return a == b
}

func gbps(v float64) string {
	if v == 0 {
		return "no rate limit"
	}
	return fmt.Sprintf("%.4g Gbit/s", v)
}

func size(v float64) string {
	units := []string{"B", "KB", "MB", "GB", "TB"}
	i := 0
	for v >= 1000 && i < len(units)-1 {
		v /= 1000
		i++
	}
	return strings.TrimSpace(fmt.Sprintf("%.4g %s", v, units[i]))
}
