package model

import (
	"fmt"
	"math"
	"math/rand/v2"
	"sort"
)

// SamplingParams choose how the next token is drawn. Temperature 0 is
// greedy. TopK 0 and TopP 0 or 1 disable those filters. Seed makes the
// draw reproducible: the same seed and logits give the same tokens.
type SamplingParams struct {
	Temperature float64
	TopK        int
	TopP        float64
	Seed        uint64
}

// Validate names the first out-of-range parameter.
func (p SamplingParams) Validate() error {
	switch {
	case math.IsNaN(p.Temperature) || p.Temperature < 0:
		return fmt.Errorf("%w: temperature must be >= 0, got %g", ErrBadInput, p.Temperature)
	case p.TopK < 0:
		return fmt.Errorf("%w: top_k must be >= 0, got %d", ErrBadInput, p.TopK)
	case math.IsNaN(p.TopP) || p.TopP < 0 || p.TopP > 1:
		return fmt.Errorf("%w: top_p must be in [0, 1], got %g", ErrBadInput, p.TopP)
	}
	return nil
}

// Sampler draws tokens for one sequence. Filters apply in HF's order:
// temperature, then top-k, then top-p.
type Sampler struct {
	p    SamplingParams
	rng  *rand.Rand
	idx  []int
	prob []float64
}

// NewSampler seeds a sampler.
func NewSampler(p SamplingParams) *Sampler {
	return &Sampler{p: p, rng: rand.New(rand.NewPCG(p.Seed, p.Seed^0x9e3779b97f4a7c15))}
}

// Skip advances the random stream past n samples, as if n tokens had
// been drawn: a sequence created again with its generated tokens (after
// a preemption or a node failure) continues its stream exactly. Each
// sample draws one number; greedy sampling draws none.
func (s *Sampler) Skip(n int) {
	if s.p.Temperature == 0 {
		return
	}
	for range n {
		s.rng.Float64()
	}
}

// Sample picks the next token from logits.
func (s *Sampler) Sample(logits []float32) int {
	if s.p.Temperature == 0 {
		return Argmax(logits)
	}
	n := len(logits)
	if cap(s.idx) < n {
		s.idx = make([]int, n)
		s.prob = make([]float64, n)
	}
	idx, prob := s.idx[:n], s.prob[:n]
	for i := range idx {
		idx[i] = i
	}
	sort.Slice(idx, func(a, b int) bool {
		la, lb := logits[idx[a]], logits[idx[b]]
		return la > lb || (la == lb && idx[a] < idx[b])
	})
	keep := n
	if s.p.TopK > 0 && s.p.TopK < keep {
		keep = s.p.TopK
	}
	// Softmax of logits/T over the kept candidates, in descending order.
	top := float64(logits[idx[0]]) / s.p.Temperature
	var sum float64
	for i := range keep {
		prob[i] = math.Exp(float64(logits[idx[i]])/s.p.Temperature - top)
		sum += prob[i]
	}
	if s.p.TopP > 0 && s.p.TopP < 1 {
		// Keep the smallest prefix whose mass reaches top_p (at least one).
		var cum float64
		for i := range keep {
			cum += prob[i] / sum
			if cum >= s.p.TopP {
				keep = i + 1
				break
			}
		}
		sum = 0
		for i := range keep {
			sum += prob[i]
		}
	}
	u := s.rng.Float64() * sum
	for i := range keep {
		u -= prob[i]
		if u < 0 {
			return idx[i]
		}
	}
	return idx[keep-1]
}

// Argmax returns the index of the largest logit, ties to the lower index.
func Argmax(x []float32) int {
	best := 0
	for i, v := range x {
		if v > x[best] {
			best = i
		}
	}
	return best
}

// TokenLogprob is one position's log-probability report: the chosen
// token's logprob under the model's raw distribution and the top
// alternatives.
type TokenLogprob struct {
	Token   int
	Logprob float64
	Top     []IDLogprob
}

// IDLogprob pairs a token id with its logprob.
type IDLogprob struct {
	ID      int
	Logprob float64
}

// Logprobs computes log_softmax(logits)[token] and the top-k entries.
func Logprobs(logits []float32, token, k int) TokenLogprob {
	m := float64(logits[Argmax(logits)])
	var sum float64
	for _, v := range logits {
		sum += math.Exp(float64(v) - m)
	}
	lse := m + math.Log(sum)
	tl := TokenLogprob{Token: token, Logprob: float64(logits[token]) - lse}
	if k > 0 {
		for _, id := range topKSmall(logits, min(k, len(logits))) {
			tl.Top = append(tl.Top, IDLogprob{ID: id, Logprob: float64(logits[id]) - lse})
		}
	}
	return tl
}

// topKSmall returns the indices of the k largest values, descending, ties
// to the lower index, in one pass with a k-slot insertion list: no
// vocabulary-sized scratch per token.
func topKSmall(x []float32, k int) []int {
	top := make([]int, 0, k)
	for i, v := range x {
		if len(top) == k && v <= x[top[k-1]] {
			continue
		}
		j := len(top)
		if j < k {
			top = append(top, i)
		} else {
			j = k - 1
		}
		// Shift smaller entries down; equal values keep the lower index first.
		for j > 0 && v > x[top[j-1]] {
			top[j] = top[j-1]
			j--
		}
		top[j] = i
	}
	return top
}
