package bench

import (
	"cmp"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/expertmesh/expertmesh/internal/telemetry"
)

// Span names the breakdown reads (attnnode and expertnode emit them).
const (
	spanStep       = "attn.step"
	spanMicroBatch = "attn.microbatch"
	spanDispatch   = "attn.dispatch"
	spanCompute    = "expert.compute"
)

// BreakdownFromSpans derives the per-layer breakdown of a step from the
// spans of the cluster's attention and expert nodes (OTLP, as `bench
// --otlp-listen` receives them): steps that started at or after since,
// decode steps only when there are any (one row per sequence), else all.
//
// Within one micro-batch, for each MoE layer L in the order it ran:
//
//   - attention = start of L's first dispatch − end of layer L−1's last
//     dispatch (for the first MoE layer: − the micro-batch's start, so it
//     also holds the embedding and the dense layers before it). It is the
//     attention node's own work (combine of L−1, norms, MLA, router,
//     shared experts up to the send) plus, with ping-pong, the time spent
//     waiting for the other micro-batch to release the compute lock;
//   - expert compute = the mean over the expert nodes L was sent to of
//     their expert.compute span;
//   - dispatch wire = the mean round trip (dispatch span) − that mean
//     compute: serialisation, the network both ways, queueing on the
//     expert node;
//   - slowest-node wait = (last dispatch end − first dispatch start) −
//     the mean round trip: what waiting for the slowest node costs beyond
//     a typical one.
//
// The four add up to the layer's span exactly, and the layers plus the
// tail (after the last MoE layer: final norm, LM head) to the micro-batch.
// Each step contributes the micro-batch that ended last (its critical
// path: with ping-pong the others overlap it). OutsideMs is the step's
// time outside its micro-batches: before the first starts (admitting new
// sequences) and after the last ends (sampling, logprobs, bookkeeping).
// Everything is a mean over the steps; StepMs is the mean attn.step.
//
// The expert load is the rows each expert node was sent per MoE layer
// (answered dispatches), summed over the same steps.
func BreakdownFromSpans(spans []telemetry.Span, since time.Time) (*Breakdown, *ExpertLoad, error) {
	byParent := map[string][]*telemetry.Span{}
	var steps []*telemetry.Span
	for i := range spans {
		s := &spans[i]
		switch s.Name {
		case spanStep:
			if !s.Start.Before(since) && !s.Error {
				steps = append(steps, s)
			}
		case spanMicroBatch, spanDispatch, spanCompute:
			if s.ParentID != "" {
				k := s.TraceID + "/" + s.ParentID
				byParent[k] = append(byParent[k], s)
			}
		}
	}
	if len(steps) == 0 {
		return nil, nil, fmt.Errorf("%w: no attn.step span since the run began (is the cluster exporting traces to this receiver?)", telemetry.ErrNoSpans)
	}
	kind := "decode"
	decode := slices.DeleteFunc(slices.Clone(steps), func(s *telemetry.Span) bool {
		return s.Ints["rows"] <= 0 || s.Ints["rows"] != s.Ints["sequences"]
	})
	if len(decode) > 0 {
		steps = decode
	} else {
		kind = "all"
	}
	children := func(s *telemetry.Span, name string) []*telemetry.Span {
		var out []*telemetry.Span
		for _, c := range byParent[s.TraceID+"/"+s.SpanID] {
			if c.Name == name {
				out = append(out, c)
			}
		}
		return out
	}

	type acc struct {
		attn, wire, compute, wait float64
		n                         int
	}
	layers := map[int]*acc{}
	load := map[int]map[string]float64{}
	var tail, outside, stepMs, mbMs float64
	mbs, used, perStep := 0, 0, 0
	for _, st := range steps {
		// The micro-batch that ended last is the step's critical path:
		// with ping-pong the others overlap it.
		var mb *telemetry.Span
		all := children(st, spanMicroBatch)
		perStep = max(perStep, len(all))
		for _, m := range all {
			if len(children(m, spanDispatch)) > 0 && (mb == nil || m.End.After(mb.End)) {
				mb = m
			}
		}
		if mb != nil {
			first := mb.Start
			for _, m := range all {
				first = minTime(first, m.Start)
			}
			// Before the first micro-batch: admission of new sequences;
			// after the last: sampling, logprobs, cache bookkeeping.
			outside += max(ms(first.Sub(st.Start)), 0) + max(ms(st.End.Sub(mb.End)), 0)
			ds := children(mb, spanDispatch)
			byLayer := map[int][]*telemetry.Span{}
			for _, d := range ds {
				l := int(d.Ints["layer"])
				byLayer[l] = append(byLayer[l], d)
			}
			order := make([]int, 0, len(byLayer))
			for l := range byLayer {
				order = append(order, l)
			}
			firstSent := func(l int) time.Time {
				return slices.MinFunc(byLayer[l], func(a, b *telemetry.Span) int { return a.Start.Compare(b.Start) }).Start
			}
			slices.SortFunc(order, func(a, b int) int { return cmp.Or(firstSent(a).Compare(firstSent(b)), a-b) })
			prev := mb.Start
			for _, l := range order {
				group := byLayer[l]
				start, end := group[0].Start, group[0].End
				var rt, comp float64
				nodes := 0
				for _, d := range group {
					start = minTime(start, d.Start)
					end = maxTime(end, d.End)
					if d.Error {
						continue
					}
					nodes++
					rt += ms(d.Duration())
					for _, c := range children(d, spanCompute) {
						comp += ms(c.Duration())
					}
					node := d.Strings["node_id"]
					if node == "" {
						node = d.Strings["expert_node"]
					}
					if load[l] == nil {
						load[l] = map[string]float64{}
					}
					load[l][node] += float64(d.Ints["rows"])
				}
				a := layers[l]
				if a == nil {
					a = &acc{}
					layers[l] = a
				}
				span := ms(end.Sub(start))
				meanRT, meanC := span, 0.0
				if nodes > 0 {
					meanRT, meanC = rt/float64(nodes), comp/float64(nodes)
				}
				meanC = min(meanC, meanRT)
				a.attn += max(ms(start.Sub(prev)), 0)
				a.compute += meanC
				a.wire += meanRT - meanC
				a.wait += max(span-meanRT, 0)
				a.n++
				prev = maxTime(prev, end)
			}
			tail += max(ms(mb.End.Sub(prev)), 0)
			mbMs += ms(mb.Duration())
			mbs++
			stepMs += ms(st.Duration())
			used++
		}
	}
	if mbs == 0 {
		return nil, nil, fmt.Errorf("%w: %d attn.step spans but none with attn.dispatch spans under its micro-batches (experts in-process, or the expert nodes' spans did not arrive)", telemetry.ErrNoSpans, len(steps))
	}
	bd := &Breakdown{
		Source:       fmt.Sprintf("traces: %d %s steps (critical micro-batch of each)", used, kind),
		Steps:        used,
		MicroBatches: perStep,
		StepMs:       stepMs / float64(used),
		TailMs:       tail / float64(mbs),
		OutsideMs:    outside / float64(mbs),
		MicroBatchMs: mbMs / float64(mbs),
	}
	ids := make([]int, 0, len(layers))
	for l := range layers {
		ids = append(ids, l)
	}
	slices.Sort(ids)
	for _, l := range ids {
		a := layers[l]
		// Means over the steps: a layer a micro-batch skipped (no rows
		// routed to any expert) counts as zero there.
		n := float64(mbs)
		bd.Layers = append(bd.Layers, LayerTiming{Layer: l, AttentionMs: a.attn / n, DispatchWireMs: a.wire / n,
			ExpertComputeMs: a.compute / n, SlowestWaitMs: a.wait / n})
	}
	el := &ExpertLoad{}
	nodeSet := map[string]bool{}
	for _, m := range load {
		for n := range m {
			nodeSet[n] = true
		}
	}
	for n := range nodeSet {
		el.Nodes = append(el.Nodes, n)
	}
	slices.Sort(el.Nodes)
	for _, l := range ids {
		if load[l] == nil {
			continue
		}
		el.Layers = append(el.Layers, l)
		row := make([]float64, len(el.Nodes))
		for j, n := range el.Nodes {
			row[j] = load[l][n]
		}
		el.Tokens = append(el.Tokens, row)
	}
	if el.Validate() != nil {
		el = nil
	}
	return bd, el, nil
}

// LayersMs is the sum of the layers' times.
func (b *Breakdown) LayersMs() float64 {
	t := 0.0
	for _, l := range b.Layers {
		t += l.Total()
	}
	return t
}

// Check compares the breakdown (layers, LM head, the step's time outside
// its micro-batches) with the measured step: the relative difference,
// which the breakdown test bounds by 10%.
func (b *Breakdown) Check() (float64, error) {
	if b.StepMs <= 0 {
		return 0, errors.New("no measured step time")
	}
	d := (b.LayersMs() + b.TailMs + b.OutsideMs - b.StepMs) / b.StepMs
	return d, nil
}

func ms(d time.Duration) float64 { return float64(d) / 1e6 }

func minTime(a, b time.Time) time.Time {
	if b.Before(a) {
		return b
	}
	return a
}

func maxTime(a, b time.Time) time.Time {
	if b.After(a) {
		return b
	}
	return a
}
