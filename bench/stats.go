package bench

import (
	"math"
	"slices"
)

// Percentile is numpy.percentile's default ("linear") method, which vLLM's
// benchmark uses: the value at rank p/100·(n−1) of the sorted values,
// interpolated between the two nearest ranks. It is 0 for no values (vLLM
// computes np.percentile(values or 0, p)). p is clamped to [0, 100].
func Percentile(values []float64, p float64) float64 {
	if len(values) == 0 {
		return 0
	}
	s := slices.Clone(values)
	slices.Sort(s)
	return percentileSorted(s, p)
}

func percentileSorted(s []float64, p float64) float64 {
	if len(s) == 0 {
		return 0
	}
	p = min(max(p, 0), 100)
	rank := p / 100 * float64(len(s)-1)
	lo := int(math.Floor(rank))
	hi := min(lo+1, len(s)-1)
	frac := rank - float64(lo)
	return s[lo] + (s[hi]-s[lo])*frac
}

// Mean is the arithmetic mean, 0 for no values.
func Mean(values []float64) float64 {
	if len(values) == 0 {
		return 0
	}
	var sum float64
	for _, v := range values {
		sum += v
	}
	return sum / float64(len(values))
}

// Std is the population standard deviation (numpy.std's default, ddof=0),
// 0 for no values.
func Std(values []float64) float64 {
	if len(values) == 0 {
		return 0
	}
	m := Mean(values)
	var ss float64
	for _, v := range values {
		ss += (v - m) * (v - m)
	}
	return math.Sqrt(ss / float64(len(values)))
}

// Summary is what the report prints for one latency metric, in
// milliseconds.
type Summary struct {
	Mean, Median, Std float64
	// Percentiles holds one value per requested percentile, in the order
	// asked for.
	Percentiles []float64
}

// Summarize computes a Summary of values given in seconds, reported in ms.
func Summarize(seconds []float64, percentiles []float64) Summary {
	s := slices.Clone(seconds)
	slices.Sort(s)
	out := Summary{Mean: Mean(s) * 1000, Median: percentileSorted(s, 50) * 1000, Std: Std(s) * 1000}
	for _, p := range percentiles {
		out.Percentiles = append(out.Percentiles, percentileSorted(s, p)*1000)
	}
	return out
}

// TPOT is vLLM's time per output token excluding the first:
// (e2el − ttft) / (outputTokens − 1). ok is false when the request has at
// most one output token, where TPOT is undefined (vLLM leaves such
// requests out of the TPOT statistics and counts their TPOT as 0 against a
// goodput objective).
func TPOT(e2el, ttft float64, outputTokens int) (tpot float64, ok bool) {
	if outputTokens <= 1 {
		return 0, false
	}
	return (e2el - ttft) / float64(outputTokens-1), true
}
