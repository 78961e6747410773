package model

import (
	"math"
	"math/rand/v2"
	"testing"
)

func TestSampler(t *testing.T) {
	logits := []float32{1, 3, 2, 3, -1, 0.5}
	if got := NewSampler(SamplingParams{}).Sample(logits); got != 1 {
		t.Fatalf("greedy = %d, want 1 (ties to the lower index)", got)
	}
	if got := NewSampler(SamplingParams{Temperature: 1, TopK: 1, Seed: 3}).Sample(logits); got != 1 {
		t.Fatalf("top-k 1 = %d", got)
	}
	// top_p so small only the best token survives.
	for seed := range uint64(20) {
		if got := NewSampler(SamplingParams{Temperature: 1, TopP: 1e-6, Seed: seed}).Sample(logits); got != 1 {
			t.Fatalf("top-p tiny = %d", got)
		}
	}
	// Same seed, same draws; different seeds eventually differ.
	draw := func(seed uint64) []int {
		s := NewSampler(SamplingParams{Temperature: 1.5, Seed: seed})
		var out []int
		for range 50 {
			out = append(out, s.Sample(logits))
		}
		return out
	}
	a, b, c := draw(7), draw(7), draw(8)
	same := true
	for i := range a {
		if a[i] != b[i] {
			t.Fatal("same seed drew differently")
		}
		same = same && a[i] == c[i]
	}
	if same {
		t.Fatal("different seeds drew identically")
	}
	// Frequencies follow softmax(logits / T) restricted by top-k: with top-k 3
	// only ids 1, 3, 2 are possible, with probabilities e^3, e^3, e^2 over
	// their sum (T = 1).
	s := NewSampler(SamplingParams{Temperature: 1, TopK: 3, Seed: 1})
	counts := map[int]int{}
	const n = 20000
	for range n {
		counts[s.Sample(logits)]++
	}
	z := 2*math.Exp(3) + math.Exp(2)
	want := map[int]float64{1: math.Exp(3) / z, 3: math.Exp(3) / z, 2: math.Exp(2) / z}
	for id, c := range counts {
		p, ok := want[id]
		if !ok {
			t.Fatalf("top-k 3 drew id %d", id)
		}
		// 5 standard deviations of a binomial proportion.
		if sd := math.Sqrt(p * (1 - p) / n); math.Abs(float64(c)/n-p) > 5*sd {
			t.Errorf("id %d frequency %.4f, want %.4f", id, float64(c)/n, p)
		}
	}
	for _, bad := range []SamplingParams{{Temperature: -1}, {TopP: 1.5}, {TopK: -2}, {Temperature: math.NaN()}} {
		if bad.Validate() == nil {
			t.Errorf("%+v accepted", bad)
		}
	}
}

func TestLogprobs(t *testing.T) {
	logits := []float32{0, float32(math.Log(3)), 0, 0}
	tl := Logprobs(logits, 0, 2)
	// softmax = [1,3,1,1]/6.
	if math.Abs(tl.Logprob-math.Log(1.0/6)) > 1e-6 {
		t.Fatalf("logprob %g", tl.Logprob)
	}
	if len(tl.Top) != 2 || tl.Top[0].ID != 1 || math.Abs(tl.Top[0].Logprob-math.Log(0.5)) > 1e-6 || tl.Top[1].ID != 0 {
		t.Fatalf("top %+v", tl.Top)
	}
}

func TestTopKSmallMatchesSort(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for trial := range 200 {
		n := 1 + rng.IntN(300)
		x := make([]float32, n)
		for i := range x {
			x[i] = float32(rng.IntN(20)) // many ties
		}
		k := 1 + rng.IntN(min(n, 20))
		got := topKSmall(x, k)
		want := make([]int, n)
		topKInto(want, x, k)
		for j := range k {
			if got[j] != want[j] {
				t.Fatalf("trial %d: topKSmall %v, selection %v", trial, got, want[:k])
			}
		}
	}
}

func TestSamplerSkip(t *testing.T) {
	logits := []float32{0.1, 0.3, 0.2, 0.25, 0.15}
	p := SamplingParams{Temperature: 1, Seed: 7}
	a := NewSampler(p)
	var want []int
	for range 20 {
		want = append(want, a.Sample(logits))
	}
	b := NewSampler(p)
	b.Skip(12)
	for i := 12; i < 20; i++ {
		if got := b.Sample(logits); got != want[i] {
			t.Fatalf("after Skip(12), draw %d: %d, want %d", i, got, want[i])
		}
	}
}
