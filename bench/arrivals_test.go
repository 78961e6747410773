package bench

import (
	"math"
	"testing"
	"time"
)

// The gaps have mean 1/rate and shape = burstiness (estimated by the
// method of moments, mean²/variance); with 200,000 draws the estimates'
// standard errors are below 1.5%, so 5% is a safe tolerance. The seed is
// fixed, so the test is deterministic.
func TestArrivalsGammaMoments(t *testing.T) {
	const n = 200_000
	for _, c := range []struct{ rate, burstiness float64 }{
		{10, 1}, {2, 0.25}, {5, 0.5}, {50, 2}, {1, 8},
	} {
		a := NewArrivals(c.rate, c.burstiness, 42)
		var sum, sumSq float64
		for range n {
			g := a.Next()
			if !(g >= 0) || math.IsInf(g, 0) {
				t.Fatalf("gap %v", g)
			}
			sum += g
			sumSq += g * g
		}
		mean := sum / n
		variance := sumSq/n - mean*mean
		shape := mean * mean / variance
		if math.Abs(mean*c.rate-1) > 0.05 {
			t.Errorf("rate %v burstiness %v: mean gap %v, want %v", c.rate, c.burstiness, mean, 1/c.rate)
		}
		if math.Abs(shape/c.burstiness-1) > 0.05 {
			t.Errorf("rate %v burstiness %v: shape %v", c.rate, c.burstiness, shape)
		}
	}
}

// For Poisson arrivals the count in a window is Poisson: its variance
// equals its mean (index of dispersion 1); bursty arrivals are
// over-dispersed and regular ones under-dispersed.
func TestArrivalsDispersion(t *testing.T) {
	dispersion := func(burstiness float64) float64 {
		a := NewArrivals(10, burstiness, 7)
		const windows = 20_000
		counts := make([]float64, windows)
		tm := 0.0
		for {
			tm += a.Next()
			w := int(tm) // 1 s windows, 10 arrivals each on average
			if w >= windows {
				break
			}
			counts[w]++
		}
		m := Mean(counts)
		s := Std(counts)
		return s * s / m
	}
	if d := dispersion(1); math.Abs(d-1) > 0.05 {
		t.Errorf("Poisson index of dispersion %v, want 1", d)
	}
	if d := dispersion(0.25); d < 2 {
		t.Errorf("burstiness 0.25: dispersion %v, want well above 1", d)
	}
	if d := dispersion(4); d > 0.5 {
		t.Errorf("burstiness 4: dispersion %v, want well below 1", d)
	}
}

func TestSchedule(t *testing.T) {
	s := NewArrivals(4, 1, 1).Schedule(100)
	if got, want := s[99], 25*time.Second; got < want-time.Microsecond || got > want+time.Microsecond {
		t.Errorf("last arrival %v, want %v (n/rate)", got, want)
	}
	for i := 1; i < len(s); i++ {
		if s[i] < s[i-1] {
			t.Fatalf("arrivals go back at %d", i)
		}
	}
	if s[0] <= 0 {
		t.Error("the first request waits a gap too, as in vLLM")
	}
	for _, v := range NewArrivals(math.Inf(1), 1, 1).Schedule(10) {
		if v != 0 {
			t.Fatal("rate inf must send everything at time 0")
		}
	}
	a, b := NewArrivals(3, 0.5, 9).Schedule(50), NewArrivals(3, 0.5, 9).Schedule(50)
	for i := range a {
		if a[i] != b[i] {
			t.Fatal("the same seed must give the same schedule")
		}
	}
}
