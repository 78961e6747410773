package model

import (
	"math"
	"sort"

	"github.com/expertmesh/expertmesh/kernels"
)

// Reference is the plain forward pass kept for tests: HF's expanded
// per-head MHA form of MLA (kv_b_proj expands every latent into k_nope and
// v), no cache, plain loops with float64 accumulation, and its own routing
// written op by op after HF's MoEGate. It shares nothing with the fast path
// but the weights and the RoPE tables, so agreement between the two is
// evidence, not tautology.
type Reference struct {
	W    *Weights
	rope *Rope
}

// NewReference wraps w, which must hold every tensor (all experts).
func NewReference(w *Weights) *Reference { return &Reference{W: w, rope: NewRope(w.Config)} }

// RefRoute is one token's routing in one layer.
type RefRoute struct {
	IDs     []int
	Weights []float32
}

// Forward returns logits for every position of tokens and, per MoE layer,
// each token's routing (routes[layer] is nil for dense layers).
func (r *Reference) Forward(tokens []int) (logits [][]float32, routes [][]RefRoute) {
	c := r.W.Config
	T, h := len(tokens), c.HiddenSize
	x := make([][]float32, T)
	for t, id := range tokens {
		x[t] = make([]float32, h)
		r.W.Embed.RowF32(x[t], id)
	}
	routes = make([][]RefRoute, c.NumHiddenLayers)
	for l := range r.W.Layers {
		L := &r.W.Layers[l]
		hn := refNormAll(x, L.InputNorm, c.RMSNormEps)
		att := r.attention(l, hn)
		for t := range x {
			for i := range x[t] {
				x[t][i] += att[t][i]
			}
		}
		hn = refNormAll(x, L.PostNorm, c.RMSNormEps)
		for t := range x {
			var y []float32
			if L.Dense != nil {
				y = refMLP(L.Dense, hn[t])
			} else {
				var rt RefRoute
				y, rt = r.moe(L.MoE, hn[t])
				routes[l] = append(routes[l], rt)
			}
			for i := range x[t] {
				x[t][i] += y[i]
			}
		}
	}
	hn := refNormAll(x, r.W.Norm, c.RMSNormEps)
	logits = make([][]float32, T)
	for t := range hn {
		logits[t] = refLinear(r.W.LMHead, hn[t])
	}
	return logits, routes
}

func (r *Reference) attention(l int, hn [][]float32) [][]float32 {
	c := r.W.Config
	a := &r.W.Layers[l].Attn
	T, heads := len(hn), c.NumAttentionHeads
	dn, dr, dv, R, qhd := c.QKNopeHeadDim, c.QKRopeHeadDim, c.VHeadDim, c.KVLoraRank, c.QHeadDim()
	q := make([][]float32, T)
	kpe := make([][]float32, T)
	kv := make([][]float32, T) // per token: heads × (k_nope | v)
	cos, sin := make([]float32, dr/2), make([]float32, dr/2)
	for t := range hn {
		if a.QProj != nil {
			q[t] = refLinear(a.QProj, hn[t])
		} else {
			qa := refLinear(a.QA, hn[t])
			q[t] = refLinear(a.QB, refNorm(qa, a.QANorm, LoraNormEps))
		}
		ckv := refLinear(a.KVA, hn[t])
		kv[t] = refLinear(a.KVB, refNorm(ckv[:R], a.KVANorm, LoraNormEps))
		r.rope.CosSin(cos, sin, t)
		kpe[t] = refRotate(ckv[R:], cos, sin)
		for hd := range heads {
			pe := q[t][hd*qhd+dn : (hd+1)*qhd]
			copy(pe, refRotate(pe, cos, sin))
		}
	}
	scale := c.SoftmaxScale()
	out := make([][]float32, T)
	for t := range T {
		cat := make([]float32, heads*dv)
		for hd := range heads {
			qh := q[t][hd*qhd : (hd+1)*qhd]
			scores := make([]float64, t+1)
			for s := 0; s <= t; s++ {
				kh := kv[s][hd*(dn+dv) : hd*(dn+dv)+dn]
				var dot float64
				for i := range dn {
					dot += float64(qh[i]) * float64(kh[i])
				}
				for i := range dr {
					dot += float64(qh[dn+i]) * float64(kpe[s][i])
				}
				scores[s] = dot * scale
			}
			refSoftmax64(scores)
			for s := 0; s <= t; s++ {
				vh := kv[s][hd*(dn+dv)+dn : (hd+1)*(dn+dv)]
				for i := range dv {
					cat[hd*dv+i] += float32(scores[s] * float64(vh[i]))
				}
			}
		}
		out[t] = refLinear(a.O, cat)
	}
	return out
}

// moe follows HF's MoEGate + DeepseekV2MoE.moe_infer literally.
func (r *Reference) moe(m *MoE, x []float32) ([]float32, RefRoute) {
	c := r.W.Config
	logits := refLinear(m.Gate, x)
	E, k := c.NumExperts(), c.TopK()
	scores := make([]float64, E)
	for i, v := range logits {
		scores[i] = float64(v)
	}
	if c.ScoringFunc == ScoreSigmoid {
		for i := range scores {
			scores[i] = 1 / (1 + math.Exp(-scores[i]))
		}
	} else {
		refSoftmax64(scores)
	}
	choice := append([]float64(nil), scores...)
	if c.TopKMethod == TopKNoAuxTC {
		for i := range choice {
			choice[i] += float64(m.Bias[i])
		}
	}
	if c.TopKMethod != TopKGreedy {
		G, per := c.Groups(), E/c.Groups()
		gs := make([]float64, G)
		for g := range G {
			grp := append([]float64(nil), choice[g*per:(g+1)*per]...)
			sort.Sort(sort.Reverse(sort.Float64Slice(grp)))
			if c.TopKMethod == TopKNoAuxTC {
				gs[g] = grp[0] + grp[1]
			} else {
				gs[g] = grp[0]
			}
		}
		keep := refTopK(gs, c.TopKGroups())
		mask := make([]bool, E)
		for _, g := range keep {
			for i := g * per; i < (g+1)*per; i++ {
				mask[i] = true
			}
		}
		for i := range choice {
			if !mask[i] {
				choice[i] = 0
			}
		}
	}
	ids := refTopK(choice, k)
	w := make([]float64, k)
	for j, id := range ids {
		w[j] = scores[id]
	}
	normalise := k > 1 && c.NormTopKProb
	if normalise {
		var sum float64
		for _, v := range w {
			sum += v
		}
		for j := range w {
			w[j] /= sum + 1e-20
		}
	}
	if c.ModelType == "deepseek_v3" || !normalise {
		for j := range w {
			w[j] *= c.RoutedScalingFactor
		}
	}
	y := make([]float32, c.HiddenSize)
	rt := RefRoute{IDs: ids, Weights: make([]float32, k)}
	for j, id := range ids {
		rt.Weights[j] = float32(w[j])
		ey := refMLP(m.Experts[id], x)
		for i := range y {
			y[i] += float32(w[j] * float64(ey[i]))
		}
	}
	if m.Shared != nil {
		sy := refMLP(m.Shared, x)
		for i := range y {
			y[i] += sy[i]
		}
	}
	return y, rt
}

// refTopK returns the indices of the k largest values, descending, ties to
// the lower index (torch.topk's order on CPU for our purposes).
func refTopK(x []float64, k int) []int {
	idx := make([]int, len(x))
	for i := range idx {
		idx[i] = i
	}
	sort.SliceStable(idx, func(a, b int) bool { return x[idx[a]] > x[idx[b]] })
	return idx[:k]
}

func refLinear(m *kernels.Matrix, x []float32) []float32 {
	y := make([]float32, m.Rows)
	row := make([]float32, m.Cols)
	for r := range m.Rows {
		m.RowF32(row, r)
		var s float64
		for i, w := range row {
			s += float64(w) * float64(x[i])
		}
		y[r] = float32(s)
	}
	return y
}

func refMLP(m *MLP, x []float32) []float32 {
	g := refLinear(m.Gate, x)
	u := refLinear(m.Up, x)
	for i := range g {
		gv := float64(g[i])
		g[i] = float32(gv / (1 + math.Exp(-gv)) * float64(u[i]))
	}
	return refLinear(m.Down, g)
}

func refNorm(x, w []float32, eps float64) []float32 {
	var ss float64
	for _, v := range x {
		ss += float64(v) * float64(v)
	}
	inv := 1 / math.Sqrt(ss/float64(len(x))+eps)
	out := make([]float32, len(x))
	for i, v := range x {
		out[i] = w[i] * float32(float64(v)*inv)
	}
	return out
}

func refNormAll(x [][]float32, w []float32, eps float64) [][]float32 {
	out := make([][]float32, len(x))
	for t := range x {
		out[t] = refNorm(x[t], w, eps)
	}
	return out
}

// refRotate applies HF's complex-multiply RoPE to interleaved pairs.
func refRotate(x, cos, sin []float32) []float32 {
	out := make([]float32, len(x))
	for i := range cos {
		a, b := float64(x[2*i]), float64(x[2*i+1])
		out[2*i] = float32(a*float64(cos[i]) - b*float64(sin[i]))
		out[2*i+1] = float32(a*float64(sin[i]) + b*float64(cos[i]))
	}
	return out
}

func refSoftmax64(x []float64) {
	m := math.Inf(-1)
	for _, v := range x {
		m = math.Max(m, v)
	}
	var s float64
	for i, v := range x {
		x[i] = math.Exp(v - m)
		s += x[i]
	}
	for i := range x {
		x[i] /= s
	}
}
