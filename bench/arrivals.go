package bench

import (
	"math"
	"math/rand/v2"
	"time"
)

// Arrivals draws the gaps between request arrivals: gamma distributed with
// shape = burstiness and scale = 1/(rate·burstiness), so the mean gap is
// 1/rate and the coefficient of variation 1/√burstiness. Burstiness 1 is
// exponential gaps, a Poisson process; an infinite rate gives zero gaps
// (every request at once). This is vLLM's get_request.
type Arrivals struct {
	rate, shape float64
	rng         *rand.Rand
}

// NewArrivals returns the gap sampler for rate (requests/s) and burstiness,
// seeded so that a run repeats exactly.
func NewArrivals(rate, burstiness float64, seed int64) *Arrivals {
	return &Arrivals{rate: rate, shape: burstiness, rng: newRand(seed, streamArrivals)}
}

// Next is the next gap in seconds.
func (a *Arrivals) Next() float64 {
	if math.IsInf(a.rate, 1) {
		return 0
	}
	theta := 1 / (a.rate * a.shape)
	if a.shape == 1 {
		return a.rng.ExpFloat64() * theta
	}
	return gamma(a.rng, a.shape) * theta
}

// Schedule is the arrival time of each of n requests after the start: the
// running sum of n gaps, rescaled (as vLLM does) so the last arrival is at
// exactly n/rate and throughput does not depend on the seed's luck.
func (a *Arrivals) Schedule(n int) []time.Duration {
	out := make([]time.Duration, n)
	if math.IsInf(a.rate, 1) || n == 0 {
		return out
	}
	sums := make([]float64, n)
	var t float64
	for i := range sums {
		t += a.Next()
		sums[i] = t
	}
	scale := 1.0
	if t > 0 {
		scale = float64(n) / a.rate / t
	}
	for i, s := range sums {
		out[i] = time.Duration(s * scale * float64(time.Second))
	}
	return out
}

// gamma draws from Gamma(shape, 1) by Marsaglia and Tsang's method ("A
// simple method for generating gamma variables", 2000); shapes below 1 use
// their boost Gamma(a) = Gamma(a+1)·U^(1/a).
func gamma(rng *rand.Rand, shape float64) float64 {
	boost := 1.0
	if shape < 1 {
		boost = math.Pow(1-rng.Float64(), 1/shape) // 1-U is in (0, 1]
		shape++
	}
	d := shape - 1.0/3
	c := 1 / math.Sqrt(9*d)
	for {
		var x, v float64
		for v <= 0 {
			x = rng.NormFloat64()
			v = 1 + c*x
		}
		v = v * v * v
		u := rng.Float64()
		if u < 1-0.0331*x*x*x*x {
			return d * v * boost
		}
		if u > 0 && math.Log(u) < 0.5*x*x+d*(1-v+math.Log(v)) {
			return d * v * boost
		}
	}
}
