package model

import (
	"fmt"
	"math"
	"math/rand/v2"

	"github.com/expertmesh/expertmesh/kernels"
)

// A skewed checkpoint (GenOptions.Zipf) for load-balancing work: in every
// MoE layer, expert popularity follows a Zipf law, different experts hot
// in each layer, under the model's own routing.
//
// Popularity here is f(e), the fraction of tokens whose top-k includes
// expert e (Σ_e f(e) = k). The law: the expert of rank r (1 = hottest)
// gets f = min(zipfCap, C·r^−S), C chosen so that the f sum to k. The
// cap is not a choice but a limit of the only weights we change, the
// router's gate rows: a gate logit is linear in the normalised hidden
// state, which has no direction common to all tokens (its mean is a
// small fraction of its spread), so an expert's logit is as often below
// its mean as above it, and no gate row makes an expert win for more
// than about half of all tokens. Below the cap the law holds exactly:
// ranks past the first few have rank-frequency slope −S.
//
// How: gate row e of layer l is scaled by a factor g(l,e). Scaling a row
// scales the spread of that expert's logit over tokens; top-k selection
// favours the widest spreads, so f(e) grows with g(l,e) (from about 0
// towards the cap). The factors are found by calibration against the
// model itself: random token sequences run through the layers in
// order, each MoE layer's router inputs collected, and the factors
// adjusted (each in the direction its expert misses by, with a step of
// its own that halves whenever the direction flips) until the router's
// choices hit the targets; the layer then computes with its
// calibrated router, so that the next layer is calibrated on the hidden
// states it will really see. Which expert gets which rank is a
// permutation per layer drawn from the seed. Everything else of the
// checkpoint (and its HF layout) is as without Zipf; noaux_tc's
// e_score_correction_bias keeps its random values.

const (
	// zipfCap is the most a target f may be (see above).
	zipfCap = 0.4
	// zipfSequences × zipfSeqLen random tokens calibrate each layer.
	zipfSequences, zipfSeqLen = 256, 32 // 8192 tokens
	// zipfRounds bounds the calibration of a layer; zipfTolerance stops
	// it once every expert's count is within this fraction of its target.
	zipfRounds    = 200
	zipfTolerance = 0.03
)

// ZipfTargets is the popularity law of a Zipf-skewed checkpoint: the
// fraction of tokens that select the expert of each rank (index 0 is the
// hottest), for experts routed experts, k per token and exponent s:
// min(zipfCap, C·r^−s), C such that they sum to k.
func ZipfTargets(experts, k int, s float64) []float64 {
	f := make([]float64, experts)
	sum := func(c float64) float64 {
		t := 0.0
		for r := range f {
			t += min(zipfCap, c*math.Pow(float64(r+1), -s))
		}
		return t
	}
	lo, hi := 0.0, 1.0
	for sum(hi) < float64(k) && hi < 1e12 {
		hi *= 2
	}
	for range 100 {
		if mid := (lo + hi) / 2; sum(mid) < float64(k) {
			lo = mid
		} else {
			hi = mid
		}
	}
	for r := range f {
		f[r] = min(zipfCap, hi*math.Pow(float64(r+1), -s))
	}
	return f
}

// zipfRanks is layer l's permutation: rank[e] is expert e's rank (0:
// hottest), drawn from seed.
func zipfRanks(experts int, seed uint64, l int) []int {
	rng := rand.New(rand.NewPCG(seed^0x5eed21bf, uint64(l)))
	return rng.Perm(experts)
}

// zipfGateScales calibrates the gate-row factors of every MoE layer of
// the checkpoint in dir (see above): scales[l][e], nil for dense layers.
func zipfGateScales(dir string, s float64, seed uint64) ([][]float32, error) {
	w, err := Load(dir, LoadOptions{})
	if err != nil {
		return nil, err
	}
	defer w.Close()
	c := w.Config
	E, k, h := c.NumExperts(), c.TopK(), c.HiddenSize
	if k > E || float64(k) > zipfCap*float64(E) {
		return nil, fmt.Errorf("--zipf: %d experts per token of %d cannot follow a law capped at %v per expert", k, E, zipfCap)
	}
	targets := ZipfTargets(E, k, s)
	ref := NewReference(w)
	rng := rand.New(rand.NewPCG(seed, 0x21bf))
	xs := make([][][]float32, zipfSequences)
	for i := range xs {
		xs[i] = make([][]float32, zipfSeqLen)
		for t := range xs[i] {
			xs[i][t] = make([]float32, h)
			w.Embed.RowF32(xs[i][t], rng.IntN(c.VocabSize))
		}
	}
	scales := make([][]float32, c.NumHiddenLayers)
	for l := range w.Layers {
		L := &w.Layers[l]
		hns := make([][][]float32, len(xs))
		for i, x := range xs {
			att := ref.attention(l, refNormAll(x, L.InputNorm, c.RMSNormEps))
			for t := range x {
				kernels.Add(x[t], x[t], att[t])
			}
			hns[i] = refNormAll(x, L.PostNorm, c.RMSNormEps)
		}
		if L.Dense != nil {
			for i, x := range xs {
				for t := range x {
					kernels.Add(x[t], x[t], refMLP(L.Dense, hns[i][t]))
				}
			}
			continue
		}
		// The router's inputs, as unscaled logits per token.
		var base [][]float32
		for _, hn := range hns {
			for _, v := range hn {
				base = append(base, refLinear(L.MoE.Gate, v))
			}
		}
		ranks := zipfRanks(E, seed, l)
		want := make([]float64, E)
		for e, r := range ranks {
			want[e] = targets[r]
		}
		scales[l] = calibrateGate(c, L.MoE.Bias, base, want)
		// Run the layer with its calibrated router.
		router := NewRouter(c, L.MoE.Bias)
		logits := make([]float32, E)
		ids := make([]int, k)
		weights := make([]float32, k)
		j := 0
		for i, x := range xs {
			for t := range x {
				for e, v := range base[j] {
					logits[e] = v * scales[l][e]
				}
				j++
				router.Route(logits, ids, weights)
				hn := hns[i][t]
				for q, id := range ids {
					y := refMLP(L.MoE.Experts[id], hn)
					for d := range y {
						x[t][d] += weights[q] * y[d]
					}
				}
				if L.MoE.Shared != nil {
					kernels.Add(x[t], x[t], refMLP(L.MoE.Shared, hn))
				}
			}
		}
	}
	return scales, nil
}

// calibrateGate finds per-expert logit factors with which the router
// picks expert e for a fraction want[e] of the tokens whose unscaled
// logits are base (see above).
func calibrateGate(c *Config, bias []float32, base [][]float32, want []float64) []float32 {
	E, k := c.NumExperts(), c.TopK()
	g := make([]float64, E)
	for e := range g {
		g[e] = 1
	}
	router := NewRouter(c, bias)
	logits := make([]float32, E)
	ids := make([]int, k)
	weights := make([]float32, k)
	counts := make([]int, E)
	n := float64(len(base))
	// The router runs in float32: a softmax over logits that differ by
	// more than about 87 underflows to 0, a sigmoid of more than about 17
	// rounds to 1, and ties among those pick experts by index, not by
	// gate. Scaled logits stay within ±limit. Softmax choices depend only
	// on the logits' order, so all factors can be scaled down together;
	// sigmoid ones (with the selection bias added) cannot, so each factor
	// is capped on its own.
	limit, together := 40.0, c.ScoringFunc != ScoreSigmoid
	if !together {
		limit = 12
	}
	peak := make([]float64, E) // max |unscaled logit| per expert
	for _, b := range base {
		for e, v := range b {
			peak[e] = max(peak[e], math.Abs(float64(v)))
		}
	}
	// Each factor moves in log space by its own step, in the direction
	// its expert misses by; a step grows while the direction holds and
	// halves when it flips (Rprop). Frequencies respond steeply to the
	// factors of cold experts and hardly to those of experts near the
	// cap, so one fixed rate would oscillate for some and crawl for
	// others.
	step := make([]float64, E)
	last := make([]int, E)
	for e := range step {
		step[e] = 0.2
	}
	for range zipfRounds {
		clear(counts)
		for _, b := range base {
			for e, v := range b {
				logits[e] = v * float32(g[e])
			}
			router.Route(logits, ids, weights)
			for _, id := range ids {
				counts[id]++
			}
		}
		done, moving := true, 0.0
		for e, cnt := range counts {
			// Within the tolerance, or within a count or two where the
			// target is a few tokens of the sample.
			if math.Abs(float64(cnt)-want[e]*n) > max(zipfTolerance*want[e]*n, 1.5) {
				done = false
			}
			dir := 0
			switch f := float64(cnt) / n; {
			case f < want[e]:
				dir = 1
			case f > want[e]:
				dir = -1
			}
			switch {
			case dir == last[e]:
				step[e] = min(step[e]*1.2, 0.5)
			case dir != 0 && last[e] != 0:
				step[e] = max(step[e]/2, 1e-4)
			}
			last[e] = dir
			if dir != 0 {
				moving = max(moving, step[e])
			}
			g[e] = max(1e-6, g[e]*math.Exp(float64(dir)*step[e]))
			if !together && g[e]*peak[e] > limit {
				g[e] = limit / peak[e]
			}
		}
		if top := maxProduct(g, peak); together && top > limit {
			for e := range g {
				g[e] *= limit / top
			}
		}
		// Done when every expert is on target, or those that are not only
		// flip about a boundary of the sample (their steps bottomed out).
		if done || moving <= 2e-4 {
			break
		}
	}
	out := make([]float32, E)
	for e, v := range g {
		out[e] = float32(v)
	}
	return out
}

func maxProduct(a, b []float64) float64 {
	m := 0.0
	for i := range a {
		m = max(m, a[i]*b[i])
	}
	return m
}

// scaleGateRows multiplies row e of a BF16 [experts, hidden] gate tensor
// by scale[e].
func scaleGateRows(dst []byte, scale []float32) {
	cols := len(dst) / 2 / len(scale)
	for e, s := range scale {
		for j := range cols {
			i := 2 * (e*cols + j)
			v := kernels.BF16ToF32(uint16(dst[i]) | uint16(dst[i+1])<<8)
			b := kernels.F32ToBF16(v * s)
			dst[i], dst[i+1] = byte(b), byte(b>>8)
		}
	}
}

// gateLayer reports whether name is the router gate weight of a layer
// below layers, and which.
func gateLayer(name string, layers int) (int, bool) {
	var l int
	if _, err := fmt.Sscanf(name, "model.layers.%d.mlp.gate.weight", &l); err != nil || l < 0 || l >= layers {
		return 0, false
	}
	return l, fmt.Sprintf("model.layers.%d.mlp.gate.weight", l) == name
}
