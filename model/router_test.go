package model

import (
	"math"
	"testing"
)

func softmaxF64(x []float64) []float64 {
	m := math.Inf(-1)
	for _, v := range x {
		m = math.Max(m, v)
	}
	out := make([]float64, len(x))
	var s float64
	for i, v := range x {
		out[i] = math.Exp(v - m)
		s += out[i]
	}
	for i := range out {
		out[i] /= s
	}
	return out
}

func sigmoidF64(v float64) float64 { return 1 / (1 + math.Exp(-v)) }

func routerConfig(modelType, method, scoring string, experts, k, groups, topkGroups int, norm bool, scale float64) *Config {
	return &Config{
		ModelType: modelType, TopKMethod: method, ScoringFunc: scoring,
		NRoutedExperts: &experts, NumExpertsPerTok: &k, NGroup: &groups, TopKGroup: &topkGroups,
		NormTopKProb: norm, RoutedScalingFactor: scale,
	}
}

// TestRouterHandComputed checks each topk_method on logits whose routing is
// worked out by hand in the comments.
func TestRouterHandComputed(t *testing.T) {
	ln := math.Log
	cases := []struct {
		name    string
		cfg     *Config
		logits  []float64
		bias    []float32
		wantIDs []int
		// wantW computes the expected weights from the scores by the
		// formula the case documents.
		wantW func() []float64
	}{
		{
			// softmax([0, ln2, ln4, 0]) = [1,2,4,1]/8; top-2 = experts 2, 1.
			// V2, norm_topk_prob false: weights scaled by 1.
			name: "greedy softmax", cfg: routerConfig("deepseek_v2", TopKGreedy, ScoreSoftmax, 4, 2, 1, 1, false, 1),
			logits: []float64{0, ln(2), ln(4), 0}, wantIDs: []int{2, 1},
			wantW: func() []float64 { return []float64{0.5, 0.25} },
		},
		{
			// Same, routed_scaling_factor 16 applies because V2 does not normalise.
			name: "greedy softmax scaled", cfg: routerConfig("deepseek_v2", TopKGreedy, ScoreSoftmax, 4, 2, 1, 1, false, 16),
			logits: []float64{0, ln(2), ln(4), 0}, wantIDs: []int{2, 1},
			wantW: func() []float64 { return []float64{8, 4} },
		},
		{
			// V2 with norm_topk_prob: normalise and do NOT scale (remote code's if/else).
			name: "v2 normalise instead of scale", cfg: routerConfig("deepseek_v2", TopKGreedy, ScoreSoftmax, 4, 2, 1, 1, true, 16),
			logits: []float64{0, ln(2), ln(4), 0}, wantIDs: []int{2, 1},
			wantW: func() []float64 { return []float64{4.0 / 6, 2.0 / 6} },
		},
		{
			// Groups of two: g0={3,0} max 3, g1={2.9,2.8} max 2.9, g2={1,1}, g3={2.95,0} max 2.95.
			// topk_group 2 keeps g0 and g3; experts 2 and 3 (2.9, 2.8) are masked to 0
			// although greedy would take expert 2. Top-3 of kept: 0 (3), 6 (2.95), then
			// experts 1 and 7 tie at logit 0 -> the lower index, 1.
			name: "group limited greedy", cfg: routerConfig("deepseek_v2", TopKGroupLimitedGreedy, ScoreSoftmax, 8, 3, 4, 2, false, 16),
			logits: []float64{3, 0, 2.9, 2.8, 1, 1, 2.95, 0}, wantIDs: []int{0, 6, 1},
			wantW: func() []float64 {
				p := softmaxF64([]float64{3, 0, 2.9, 2.8, 1, 1, 2.95, 0})
				return []float64{16 * p[0], 16 * p[6], 16 * p[1]}
			},
		},
		{
			// noaux_tc: sigmoid scores, bias for selection only. Group score is the sum
			// of the group's two best biased scores. Logits all 0 -> scores 0.5; bias makes
			// g1 = {0.5+0.3, 0.5+0.2} = 1.5 and g3 = {0.5+0.4, 0.5-0.4} = 1.0 the best two
			// groups (g0 = 1.0 - 0.2 = 0.8, g2 = 1.0). g2 ties g3 at 1.0: lower index g2 wins.
			// Kept experts 2,3,4,5 with biased 0.8, 0.7, 0.5, 0.5 -> top-2 = 2, 3.
			// Weights: unbiased 0.5 each, normalised to 0.5, then V3 scales by 2.5.
			name: "noaux_tc", cfg: routerConfig("deepseek_v3", TopKNoAuxTC, ScoreSigmoid, 8, 2, 4, 2, true, 2.5),
			logits: make([]float64, 8), bias: []float32{-0.1, -0.1, 0.3, 0.2, 0, 0, 0.4, -0.4},
			wantIDs: []int{2, 3},
			wantW:   func() []float64 { return []float64{1.25, 1.25} },
		},
		{
			// Weights use the unbiased scores: logits [2,0,...]: expert 0 has sigmoid(2),
			// expert 1 sigmoid(0) but a bias of +1 puts it first in the selection.
			name: "noaux_tc weights unbiased", cfg: routerConfig("deepseek_v3", TopKNoAuxTC, ScoreSigmoid, 4, 2, 2, 1, true, 1),
			logits: []float64{2, 0, -3, -3}, bias: []float32{0, 1, 0, 0}, wantIDs: []int{1, 0},
			wantW: func() []float64 {
				a, b := sigmoidF64(0), sigmoidF64(2)
				return []float64{a / (a + b), b / (a + b)}
			},
		},
		{
			// HF masks non-selected groups with 0.0, not -inf. With biased scores below
			// zero in the kept group, the masked experts (score 0) win: g0 biased
			// {-0.2,-0.3} sums to -0.5 > g1 {-0.4,-0.5}; the kept experts are negative, so
			// topk over [-0.2,-0.3,0,0] picks 2 and 3. We reproduce HF, quirk included.
			name: "noaux_tc masked zero quirk", cfg: routerConfig("deepseek_v3", TopKNoAuxTC, ScoreSigmoid, 4, 2, 2, 1, false, 1),
			logits: []float64{0, 0, 0, 0}, bias: []float32{-0.7, -0.8, -0.9, -1.0}, wantIDs: []int{2, 3},
			wantW: func() []float64 { return []float64{0.5, 0.5} },
		},
		{
			// One expert per token: norm_topk_prob is skipped (top_k > 1 condition).
			name: "top1 no normalise", cfg: routerConfig("deepseek_v3", TopKGreedy, ScoreSoftmax, 4, 1, 1, 1, true, 2),
			logits: []float64{0, ln(3), 0, 0}, wantIDs: []int{1},
			wantW: func() []float64 { return []float64{2 * 0.5} },
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r := NewRouter(tc.cfg, tc.bias)
			logits := make([]float32, len(tc.logits))
			for i, v := range tc.logits {
				logits[i] = float32(v)
			}
			k := tc.cfg.TopK()
			ids, w := make([]int, k), make([]float32, k)
			r.Route(logits, ids, w)
			want := tc.wantW()
			for j := range k {
				if ids[j] != tc.wantIDs[j] {
					t.Fatalf("ids %v, want %v", ids, tc.wantIDs)
				}
				if math.Abs(float64(w[j])-want[j]) > 1e-6*math.Max(1, math.Abs(want[j])) {
					t.Errorf("weight[%d] = %g, want %g", j, w[j], want[j])
				}
			}
		})
	}
}

func TestYarn(t *testing.T) {
	// DeepSeek-V2's rope: dim 64, base 10000, factor 40, original 4096,
	// beta_fast 32, beta_slow 1. By hand: low = floor(64 ln(4096/(64π)) /
	// (2 ln 10000)) = floor(10.47) = 10; high = ceil(64 ln(4096/(2π)) /
	// (2 ln 10000)) = ceil(22.51) = 23.
	lo, hi := yarnCorrectionRange(32, 1, 64, 10000, 4096)
	if lo != 10 || hi != 23 {
		t.Fatalf("correction range = [%g, %g], want [10, 23]", lo, hi)
	}
	// mscale(40, 0.707) = 0.1*0.707*ln 40 + 1 = 1.2608038...
	if m := yarnGetMscale(40, 0.707); math.Abs(m-1.26080378) > 1e-6 {
		t.Fatalf("mscale = %.7f", m)
	}
	if yarnGetMscale(1, 5) != 1 || yarnGetMscale(0.5, 5) != 1 {
		t.Fatal("mscale must be 1 for factor <= 1")
	}
	c := &Config{QKNopeHeadDim: 128, QKRopeHeadDim: 64, RopeTheta: 10000,
		RopeScaling: &RopeScaling{Type: "yarn", Factor: 40, OriginalMaxPositionEmbeddings: 4096, BetaFast: 32, BetaSlow: 1, Mscale: 0.707, MscaleAllDim: 0.707}}
	// Softmax scale: 192^-0.5 * mscale(40, 0.707)^2.
	want := math.Pow(192, -0.5) * 1.26080378 * 1.26080378
	if s := c.SoftmaxScale(); math.Abs(s-want) > 1e-7 {
		t.Fatalf("softmax scale = %g, want %g", s, want)
	}
	r := NewRope(c)
	// mscale == mscale_all_dim: cos/sin factor is exactly 1.
	if r.Mscale != 1 {
		t.Fatalf("rope mscale = %g, want 1", r.Mscale)
	}
	for i, f := range r.InvFreq {
		extra := math.Pow(10000, -float64(2*i)/64)
		inter := extra / 40
		ramp := math.Min(math.Max((float64(i)-10)/(23-10), 0), 1)
		mask := 1 - ramp // 1 keeps the extrapolated frequency
		want := inter*(1-mask) + extra*mask
		if math.Abs(float64(f)-want) > 1e-6*want {
			t.Errorf("inv_freq[%d] = %g, want %g", i, f, want)
		}
	}
	// Below the range the original frequencies survive; above it they are
	// divided by the factor.
	if math.Abs(float64(r.InvFreq[0])-1) > 1e-7 || math.Abs(float64(r.InvFreq[31])-math.Pow(10000, -62.0/64)/40) > 1e-9 {
		t.Fatalf("ends of inv_freq wrong: %g %g", r.InvFreq[0], r.InvFreq[31])
	}
	// mscale 1 vs mscale_all_dim 0 (HF defaults): cos/sin scale by mscale(40, 1).
	c.RopeScaling.Mscale, c.RopeScaling.MscaleAllDim = 1, 0
	if r := NewRope(c); math.Abs(float64(r.Mscale)-(0.1*math.Log(40)+1)) > 1e-6 {
		t.Fatalf("rope mscale = %g", r.Mscale)
	}
	if s := c.SoftmaxScale(); math.Abs(s-math.Pow(192, -0.5)) > 1e-9 {
		t.Fatalf("softmax scale without mscale_all_dim = %g", s)
	}
	// Plain RoPE.
	c.RopeScaling = nil
	r = NewRope(c)
	cos, sin := make([]float32, 32), make([]float32, 32)
	r.CosSin(cos, sin, 5)
	for i := range 32 {
		a := 5 * math.Pow(10000, -float64(2*i)/64)
		if math.Abs(float64(cos[i])-math.Cos(a)) > 1e-5 || math.Abs(float64(sin[i])-math.Sin(a)) > 1e-5 {
			t.Fatalf("cos/sin[%d] = %g/%g, want %g/%g", i, cos[i], sin[i], math.Cos(a), math.Sin(a))
		}
	}
}
