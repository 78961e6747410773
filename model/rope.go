package model

import "math"

// Rope holds the rotary frequencies of the qk_rope_head_dim dims, with YaRN
// applied when the config asks for it. It reproduces HF's
// DeepseekV2YarnRotaryEmbedding: inv_freq blends interpolated and
// extrapolated frequencies by a linear ramp over the correction range, and
// cos/sin carry the mscale(factor, mscale)/mscale(factor, mscale_all_dim)
// factor.
type Rope struct {
	InvFreq []float32 // dim/2 frequencies, float32 as torch computes them
	Mscale  float32   // multiplies cos and sin
}

// NewRope computes the frequencies for c.
func NewRope(c *Config) *Rope {
	dim := c.QKRopeHeadDim
	half := dim / 2
	r := &Rope{InvFreq: make([]float32, half), Mscale: 1}
	base := c.RopeTheta
	extra := make([]float64, half)
	for i := range half {
		// torch: 1 / base ** (arange(0, dim, 2).float() / dim), float32 throughout.
		exp := float64(float32(float64(2*i) / float64(dim)))
		extra[i] = float64(float32(1 / float64(float32(math.Pow(base, exp)))))
	}
	s := c.RopeScaling
	if s == nil {
		for i := range half {
			r.InvFreq[i] = float32(extra[i])
		}
		return r
	}
	low, high := yarnCorrectionRange(s.BetaFast, s.BetaSlow, dim, base, s.OriginalMaxPositionEmbeddings)
	ramp := yarnLinearRampMask(low, high, half)
	for i := range half {
		// inter = 1 / (factor * base**(2i/dim)); HF computes it in float32.
		pow := float32(math.Pow(base, float64(float32(float64(2*i)/float64(dim)))))
		inter := float64(float32(1 / float64(float32(s.Factor)*pow)))
		mask := float64(float32(1 - ramp[i]))
		r.InvFreq[i] = float32(float64(float32(inter*float64(float32(1-mask)))) + float64(float32(extra[i]*mask)))
	}
	r.Mscale = float32(yarnGetMscale(s.Factor, s.Mscale) / yarnGetMscale(s.Factor, s.MscaleAllDim))
	return r
}

// CosSin fills cos and sin (len dim/2) for position pos.
func (r *Rope) CosSin(cos, sin []float32, pos int) {
	t := float32(pos)
	for i, f := range r.InvFreq {
		a := float64(t * f) // torch.outer in float32, then cos/sin in float32
		cos[i] = float32(math.Cos(a)) * r.Mscale
		sin[i] = float32(math.Sin(a)) * r.Mscale
	}
}

// yarnFindCorrectionDim is HF's yarn_find_correction_dim.
func yarnFindCorrectionDim(numRotations float64, dim int, base float64, maxPos int) float64 {
	return float64(dim) * math.Log(float64(maxPos)/(numRotations*2*math.Pi)) / (2 * math.Log(base))
}

// yarnCorrectionRange is HF's yarn_find_correction_range.
func yarnCorrectionRange(lowRot, highRot float64, dim int, base float64, maxPos int) (float64, float64) {
	low := math.Floor(yarnFindCorrectionDim(lowRot, dim, base, maxPos))
	high := math.Ceil(yarnFindCorrectionDim(highRot, dim, base, maxPos))
	return math.Max(low, 0), math.Min(high, float64(dim-1))
}

// yarnLinearRampMask is HF's yarn_linear_ramp_mask, in float32 like torch.
func yarnLinearRampMask(lo, hi float64, n int) []float64 {
	if lo == hi {
		hi += 0.001
	}
	out := make([]float64, n)
	for i := range n {
		v := float32((float32(i) - float32(lo)) / (float32(hi) - float32(lo)))
		out[i] = float64(min(max(v, 0), 1))
	}
	return out
}

// yarnGetMscale is HF's yarn_get_mscale.
func yarnGetMscale(scale, mscale float64) float64 {
	if scale <= 1 {
		return 1
	}
	return 0.1*mscale*math.Log(scale) + 1
}
