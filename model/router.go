package model

import "math"

// Router turns one token's gate logits into its routed experts and their
// weights, exactly as HF's MoEGate does (DeepSeek-V2 remote code for
// deepseek_v2, DeepSeek-V3's for deepseek_v3). It is pure: no allocation
// after NewRouter, not safe for concurrent use (each goroutine owns one).
type Router struct {
	method     string
	scoring    string
	v3         bool // deepseek_v3 weight post-processing
	topK       int
	groups     int
	topKGroups int
	norm       bool
	scale      float32
	experts    int
	bias       []float32 // e_score_correction_bias (noaux_tc), selection only

	scores    []float32
	choice    []float32
	groupBest []float32
	groupIdx  []int
	order     []int
}

// NewRouter builds a router for c; bias is the layer's
// e_score_correction_bias (nil unless noaux_tc).
func NewRouter(c *Config, bias []float32) *Router {
	e := c.NumExperts()
	g := c.Groups()
	return &Router{
		method: c.TopKMethod, scoring: c.ScoringFunc, v3: c.ModelType == "deepseek_v3",
		topK: c.TopK(), groups: g, topKGroups: c.TopKGroups(), norm: c.NormTopKProb,
		scale: float32(c.RoutedScalingFactor), experts: e, bias: bias,
		scores: make([]float32, e), choice: make([]float32, e),
		groupBest: make([]float32, g), groupIdx: make([]int, g), order: make([]int, e),
	}
}

// Route fills ids and weights (len topK each) from logits (len
// n_routed_experts). ids come out in descending order of selection score,
// ties broken towards the lower index.
func (r *Router) Route(logits []float32, ids []int, weights []float32) {
	copy(r.scores, logits)
	if r.scoring == ScoreSigmoid {
		for i, v := range r.scores {
			r.scores[i] = sigmoid32(v)
		}
	} else {
		softmax32(r.scores)
	}
	copy(r.choice, r.scores)
	if r.bias != nil && r.method == TopKNoAuxTC {
		for i := range r.choice {
			r.choice[i] += r.bias[i]
		}
	}
	if r.method != TopKGreedy {
		r.maskGroups()
	}
	topKInto(r.order, r.choice, r.topK)
	for i := range r.topK {
		ids[i] = r.order[i]
		// HF gathers the *unbiased* scores of the chosen experts.
		weights[i] = r.scores[ids[i]]
	}
	r.postProcess(weights[:r.topK])
}

// maskGroups keeps only the topk_group best groups, setting every other
// expert's selection score to 0 (HF masked_fill(~mask, 0.0), which is not
// -inf: with biased sigmoid scores a masked expert can still beat a negative
// in-group score, and HF's choice is what we reproduce).
func (r *Router) maskGroups() {
	per := r.experts / r.groups
	for g := range r.groups {
		grp := r.choice[g*per : (g+1)*per]
		if r.method == TopKNoAuxTC {
			// V3: the sum of the group's two best biased scores.
			a, b := float32(math.Inf(-1)), float32(math.Inf(-1))
			for _, v := range grp {
				if v > a {
					a, b = v, a
				} else if v > b {
					b = v
				}
			}
			r.groupBest[g] = a + b
		} else {
			// V2: the group's best probability.
			best := float32(math.Inf(-1))
			for _, v := range grp {
				best = max(best, v)
			}
			r.groupBest[g] = best
		}
	}
	topKInto(r.groupIdx, r.groupBest, r.topKGroups)
	keep := r.groupIdx[:r.topKGroups]
	for g := range r.groups {
		kept := false
		for _, k := range keep {
			if k == g {
				kept = true
				break
			}
		}
		if !kept {
			clear(r.choice[g*per : (g+1)*per])
		}
	}
}

// postProcess applies norm_topk_prob and routed_scaling_factor. DeepSeek-V2
// normalises *or* scales; DeepSeek-V3 normalises and then always scales.
func (r *Router) postProcess(w []float32) {
	normalise := r.topK > 1 && r.norm
	if normalise {
		var sum float32
		for _, v := range w {
			sum += v
		}
		sum += 1e-20
		for i := range w {
			w[i] /= sum
		}
	}
	if r.v3 || !normalise {
		for i := range w {
			w[i] *= r.scale
		}
	}
}

// topKInto writes into idx[:k] the indices of the k largest values of x in
// descending order, ties to the lower index. idx must have len(x) capacity.
func topKInto(idx []int, x []float32, k int) {
	idx = idx[:len(x)]
	for i := range idx {
		idx[i] = i
	}
	// Partial selection sort: k is small (experts per token, groups), so
	// this beats sorting everything and allocates nothing.
	for i := range k {
		best := i
		for j := i + 1; j < len(idx); j++ {
			if x[idx[j]] > x[idx[best]] || (x[idx[j]] == x[idx[best]] && idx[j] < idx[best]) {
				best = j
			}
		}
		idx[i], idx[best] = idx[best], idx[i]
	}
}

func sigmoid32(v float32) float32 {
	return float32(1 / (1 + math.Exp(-float64(v))))
}

// softmax32 is a float32 softmax with float64 exponentials, matching
// torch's float32 softmax to within rounding.
func softmax32(x []float32) {
	m := float32(math.Inf(-1))
	for _, v := range x {
		m = max(m, v)
	}
	var sum float64
	for i, v := range x {
		e := math.Exp(float64(v - m))
		x[i] = float32(e)
		sum += e
	}
	inv := 1 / sum
	for i := range x {
		x[i] = float32(float64(x[i]) * inv)
	}
}
