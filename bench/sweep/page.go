package sweep

import (
	"fmt"
	"html"
	"slices"
	"strings"

	"github.com/expertmesh/expertmesh/bench"
)

// Summary is one configuration over its repeats: means of the points
// that succeeded, and their spread.
type Summary struct {
	Key                                               string
	ExpertNodes, AttnNodes, MicroBatches, Concurrency int
	Link                                              string
	Runs                                              int
	OutputTokS, PerUserTokS, TPOTMs, StepMs           float64
	// StepMin and StepMax are the repeats' extremes.
	StepMin, StepMax          float64
	PredictedStepMs, ErrorPct float64
	Bound                     string
	LoadAvg                   float64
	// Phases: attention, wire, expert, wait summed over the layers, then
	// the LM head and the time outside the micro-batches (means, ms).
	Phases [6]float64
}

// Summarize groups the points by configuration, in first-run order.
func Summarize(res *Result) []Summary {
	var out []Summary
	idx := map[string]int{}
	for _, p := range res.Points {
		key := fmt.Sprintf("e%d a%d m%d c%d %s", p.ExpertNodes, p.AttnNodes, p.MicroBatches, p.Concurrency, p.Link)
		i, ok := idx[key]
		if !ok {
			i = len(out)
			idx[key] = i
			out = append(out, Summary{Key: key, ExpertNodes: p.ExpertNodes, AttnNodes: p.AttnNodes, MicroBatches: p.MicroBatches,
				Concurrency: p.Concurrency, Link: p.Link, PredictedStepMs: p.PredictedStepMs, Bound: p.PredictedBound})
		}
		s := &out[i]
		if p.Error != "" || p.StepMs <= 0 {
			continue
		}
		n := float64(s.Runs)
		mean := func(m *float64, v float64) { *m = (*m*n + v) / (n + 1) }
		mean(&s.OutputTokS, p.OutputTokS)
		mean(&s.PerUserTokS, p.PerUserTokS)
		mean(&s.TPOTMs, p.MeanTPOTMs)
		mean(&s.StepMs, p.StepMs)
		mean(&s.LoadAvg, p.LoadAvg)
		if s.Runs == 0 || p.StepMs < s.StepMin {
			s.StepMin = p.StepMs
		}
		s.StepMax = max(s.StepMax, p.StepMs)
		if bd := p.Breakdown; bd != nil {
			var ph [6]float64
			for _, l := range bd.Layers {
				ph[0] += l.AttentionMs
				ph[1] += l.DispatchWireMs
				ph[2] += l.ExpertComputeMs
				ph[3] += l.SlowestWaitMs
			}
			ph[4], ph[5] = bd.TailMs, bd.OutsideMs
			for k := range ph {
				mean(&s.Phases[k], ph[k])
			}
		}
		s.Runs++
	}
	for i := range out {
		if s := &out[i]; s.PredictedStepMs > 0 && s.StepMs > 0 {
			s.ErrorPct = 100 * (s.PredictedStepMs - s.StepMs) / s.StepMs
		}
	}
	return out
}

// Page is the sweep's HTML page: plots and tables, self-contained.
func Page(res *Result) string {
	sums := Summarize(res)
	var b strings.Builder
	fmt.Fprintf(&b, "<p>Model %s; %d points, %s. Every point: a fresh cluster of processes, bench with traces to an in-process OTLP receiver; the step is the attention node's decode step from its spans.</p>",
		html.EscapeString(res.Model), len(res.Points), html.EscapeString(res.Date))

	// Per-user against total tokens/s: one series per link and micro-batch count.
	group := func(s Summary) string { return fmt.Sprintf("%s M=%d", s.Link, s.MicroBatches) }
	var names []string
	byGroup := map[string][]Summary{}
	for _, s := range sums {
		if s.Runs == 0 {
			continue
		}
		g := group(s)
		if _, ok := byGroup[g]; !ok {
			names = append(names, g)
		}
		byGroup[g] = append(byGroup[g], s)
	}
	var scatter, tput, steps []bench.Series
	for _, g := range names {
		ss := byGroup[g]
		var x, y, e, t, st []float64
		for _, s := range ss {
			x, y = append(x, s.OutputTokS), append(y, s.PerUserTokS)
		}
		scatter = append(scatter, bench.Series{Name: g, X: x, Y: y, Points: true})
		// Against expert nodes: the first attention-node count and concurrency.
		slices.SortFunc(ss, func(a, b Summary) int { return a.ExpertNodes - b.ExpertNodes })
		for _, s := range ss {
			if s.AttnNodes == ss[0].AttnNodes && s.Concurrency == ss[0].Concurrency {
				e, t, st = append(e, float64(s.ExpertNodes)), append(t, s.OutputTokS), append(st, s.StepMs)
			}
		}
		tput = append(tput, bench.Series{Name: g, X: e, Y: t})
		steps = append(steps, bench.Series{Name: g, X: e, Y: st})
	}
	b.WriteString(`<h2>Throughput and latency</h2><div class="grid2"><figure>`)
	b.WriteString(bench.PlotSVG("plot-user-vs-total", "Per-user against total tokens/s", "total output tokens/s", "tokens/s per user (1000 / TPOT)", scatter))
	b.WriteString(`</figure><figure>`)
	b.WriteString(bench.PlotSVG("plot-tput-experts", "Output tokens/s against expert nodes", "expert nodes", "output tokens/s", tput))
	b.WriteString(`</figure><figure>`)
	b.WriteString(bench.PlotSVG("plot-step-experts", "Decode step against expert nodes", "expert nodes", "step (ms)", steps))
	b.WriteString(`</figure>`)
	if res.Plan != nil {
		var meas, pred []float64
		for _, s := range sums {
			if s.Runs > 0 && s.PredictedStepMs > 0 {
				meas, pred = append(meas, s.StepMs), append(pred, s.PredictedStepMs)
			}
		}
		hi := 0.0
		for i := range meas {
			hi = max(hi, meas[i], pred[i])
		}
		b.WriteString(`<figure>`)
		b.WriteString(bench.PlotSVG("plot-plan", "plan's prediction against the measured step", "measured step (ms)", "predicted step (ms)",
			[]bench.Series{{Name: "configurations", X: meas, Y: pred, Points: true}, {Name: "equal", X: []float64{0, hi}, Y: []float64{0, hi}}}))
		b.WriteString(`</figure>`)
	}
	b.WriteString(`</div>`)

	b.WriteString(`<h2>Configurations</h2><table><tr><th>expert nodes</th><th>attention nodes</th><th>micro-batches</th><th>concurrency</th><th>link</th><th>runs</th><th>load avg</th><th>output tok/s</th><th>tok/s per user</th><th>TPOT ms</th><th>step ms (min–max)</th>`)
	if res.Plan != nil {
		b.WriteString(`<th>plan step ms</th><th>plan error</th><th>plan bound</th>`)
	}
	b.WriteString(`<th>attention</th><th>wire</th><th>expert</th><th>wait</th><th>LM head</th><th>outside</th></tr>`)
	for _, s := range sums {
		fmt.Fprintf(&b, `<tr><td>%d</td><td>%d</td><td>%d</td><td>%d</td><td>%s</td><td>%d</td><td>%.1f</td><td>%.1f</td><td>%.2f</td><td>%.1f</td><td>%.1f (%.1f–%.1f)</td>`,
			s.ExpertNodes, s.AttnNodes, s.MicroBatches, s.Concurrency, html.EscapeString(s.Link), s.Runs, s.LoadAvg, s.OutputTokS, s.PerUserTokS, s.TPOTMs, s.StepMs, s.StepMin, s.StepMax)
		if res.Plan != nil {
			fmt.Fprintf(&b, `<td>%.1f</td><td>%+.0f%%</td><td>%s</td>`, s.PredictedStepMs, s.ErrorPct, html.EscapeString(s.Bound))
		}
		for _, v := range s.Phases {
			fmt.Fprintf(&b, `<td>%.2f</td>`, v)
		}
		b.WriteString(`</tr>`)
	}
	b.WriteString(`</table><p>M: micro-batches per step (1: ping-pong off). Phases are the step's critical micro-batch, summed over the MoE layers (ms): see bench's layer_breakdown.</p>`)
	if res.Plan != nil {
		p := res.Plan
		fmt.Fprintf(&b, `<h2>plan's inputs</h2><p>attention node %.4g GB/s, %.4g GFLOP/s; expert node %.4g GB/s, %.4g GFLOP/s`, p.Attn.GBps, p.Attn.GFLOPs, p.Expert.GBps, p.Expert.GFLOPs)
		if p.Shared != nil {
			fmt.Fprintf(&b, `; one shared machine %.4g GB/s, %.4g GFLOP/s on %d cores`, p.Shared.GBps, p.Shared.GFLOPs, p.SharedCores)
		}
		fmt.Fprintf(&b, `; dispatch overhead %v + %v per expert node; step overhead %v; context %d. %s</p>`, p.DispatchOverhead, p.DispatchNodeOverhead, p.StepOverhead, p.Context, html.EscapeString(res.Calibration))
	}
	var failed, retried []string
	for _, p := range res.Points {
		name := fmt.Sprintf("e%d a%d m%d c%d %s r%d", p.ExpertNodes, p.AttnNodes, p.MicroBatches, p.Concurrency, p.Link, p.Repeat)
		if p.Error != "" {
			failed = append(failed, name+": "+p.Error)
		} else if len(p.StartErrors) > 0 {
			retried = append(retried, fmt.Sprintf("%s: started on attempt %d; %s", name, p.Attempts, strings.Join(p.StartErrors, "; ")))
		}
	}
	if len(failed) > 0 {
		fmt.Fprintf(&b, `<h2>Failed points</h2><pre>%s</pre>`, html.EscapeString(strings.Join(failed, "\n")))
	}
	if len(retried) > 0 {
		fmt.Fprintf(&b, `<h2>Points whose cluster failed to start first</h2><pre>%s</pre>`, html.EscapeString(strings.Join(retried, "\n")))
	}
	return bench.Page("expertmesh bench sweep", b.String())
}
