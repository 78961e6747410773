package bench

import (
	"math"
	"slices"
	"sort"
)

// metricOrder is the order metrics are reported in.
var metricOrder = []string{"ttft", "tpot", "itl", "e2el"}

// compute fills r's metrics from the measured requests, with vLLM's
// definitions (calculate_metrics in vllm/benchmarks/serve.py):
//
//   - completed/failed count requests; token totals and throughputs count
//     completed requests only, over the run's duration.
//   - TPOT of a request is (e2el − ttft)/(output tokens − 1), for requests
//     with more than one output token; for goodput a request with one
//     token has TPOT 0.
//   - ITLs of all requests are pooled.
//   - A request is good when every --goodput objective is at least its
//     value; request_goodput is good requests per second.
//   - Statistics of an empty set are 0.
func compute(r *Result, outs []outcome, dur float64, goodput map[string]float64, metrics []string, pcts []float64) {
	n := len(outs)
	r.Duration = dur
	r.InputLens = make([]int, n)
	r.OutputLens = make([]int, n)
	r.TTFTs = make([]float64, n)
	r.ITLs = make([][]float64, n)
	r.Latencies = make([]float64, n)
	r.StartTimes = make([]float64, n)
	r.Errors = make([]string, n)
	r.ErrorKinds = make([]string, n)
	r.ErrorsByKind = map[string]int{}
	var ttfts, tpots, allTPOTs, itls, e2els []float64
	good := 0
	for i, o := range outs {
		r.InputLens[i] = o.promptLen
		r.TTFTs[i] = o.ttft
		r.ITLs[i] = o.itl
		if r.ITLs[i] == nil {
			r.ITLs[i] = []float64{}
		}
		r.Latencies[i] = o.latency
		r.StartTimes[i] = o.start
		r.Errors[i] = o.err
		r.ErrorKinds[i] = o.kind
		if o.kind != "" {
			r.Failed++
			r.ErrorsByKind[o.kind]++
			continue
		}
		r.Completed++
		r.OutputLens[i] = o.outputLen
		r.TotalInput += o.promptLen
		r.TotalCached += o.cachedLen
		r.TotalOutput += o.outputLen
		tpot, ok := TPOT(o.latency, o.ttft, o.outputLen)
		if ok {
			tpots = append(tpots, tpot)
		}
		allTPOTs = append(allTPOTs, tpot)
		ttfts = append(ttfts, o.ttft)
		e2els = append(e2els, o.latency)
		itls = append(itls, o.itl...)
		if len(goodput) > 0 {
			ok := true
			for name, slo := range goodput {
				v := map[string]float64{"ttft": o.ttft, "tpot": tpot, "e2el": o.latency}[name]
				if slo/1000 < v {
					ok = false
				}
			}
			if ok {
				good++
			}
		}
	}
	if dur > 0 {
		r.ReqTput = float64(r.Completed) / dur
		r.OutTput = float64(r.TotalOutput) / dur
		r.TotalTput = float64(r.TotalInput+r.TotalOutput) / dur
	}
	if len(goodput) > 0 {
		g := 0.0
		if dur > 0 {
			g = float64(good) / dur
		}
		r.ReqGoodput = &g
	}
	values := map[string][]float64{"ttft": ttfts, "tpot": tpots, "itl": itls, "e2el": e2els}
	r.Stats = map[string]float64{}
	for _, m := range metricOrder {
		if !slices.Contains(metrics, m) {
			continue
		}
		s := Summarize(values[m], pcts)
		r.Stats["mean_"+m+"_ms"] = s.Mean
		r.Stats["median_"+m+"_ms"] = s.Median
		r.Stats["std_"+m+"_ms"] = s.Std
		for k, p := range pcts {
			r.Stats["p"+percentileWord(p)+"_"+m+"_ms"] = s.Percentiles[k]
		}
	}
	r.TimeSeries = timeSeries(outs, dur)
	r.MaxOutPerS = 0
	for _, v := range r.TimeSeries.OutputTokensPerS {
		r.MaxOutPerS = max(r.MaxOutPerS, v)
	}
	r.MaxConcReqs = peakConcurrency(outs)
}

// timeSeries buckets the run into seconds.
func timeSeries(outs []outcome, dur float64) TimeSeries {
	nb := max(1, int(math.Ceil(dur)))
	ts := TimeSeries{BucketS: 1, OutputTokensPerS: make([]float64, nb), Concurrency: make([]float64, nb),
		Completed: make([]int, nb), Failed: make([]int, nb)}
	bucket := func(t float64) int { return min(nb-1, max(0, int(math.Floor(t)))) }
	for _, o := range outs {
		// Time in flight, spread over the buckets it overlaps.
		for k := bucket(o.start); k <= bucket(o.end); k++ {
			lo, hi := max(o.start, float64(k)), min(o.end, float64(k+1))
			if hi > lo {
				ts.Concurrency[k] += hi - lo
			}
		}
		if o.kind != "" {
			ts.Failed[bucket(o.end)]++
			continue
		}
		ts.Completed[bucket(o.end)]++
		counted := 0
		for _, c := range o.chunkTokens {
			counted += c
		}
		if counted == 0 {
			continue
		}
		// The server's usage count, spread over the events in proportion to
		// the tokens each carried, so the series sums to the output tokens.
		scale := float64(o.outputLen) / float64(counted)
		for j, t := range o.chunkTimes {
			ts.OutputTokensPerS[bucket(t)] += float64(o.chunkTokens[j]) * scale
		}
	}
	// The last bucket may be partial: its mean concurrency is over its own
	// width. Its token count stays a count (as vLLM's does), so a sliver of
	// a bucket cannot show as a spike.
	if last := dur - float64(nb-1); last > 0 && last < 1 {
		ts.Concurrency[nb-1] /= last
	}
	return ts
}

// peakConcurrency is the most successful requests in flight at once, over
// half-open intervals [start, end) (vLLM's max_concurrent_requests).
func peakConcurrency(outs []outcome) int {
	type ev struct {
		t float64
		d int
	}
	var evs []ev
	for _, o := range outs {
		if o.kind == "" {
			evs = append(evs, ev{o.start, 1}, ev{o.start + o.latency, -1})
		}
	}
	sort.Slice(evs, func(i, j int) bool {
		if evs[i].t != evs[j].t {
			return evs[i].t < evs[j].t
		}
		return evs[i].d < evs[j].d
	})
	cur, peak := 0, 0
	for _, e := range evs {
		cur += e.d
		peak = max(peak, cur)
	}
	return peak
}
