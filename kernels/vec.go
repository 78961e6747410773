package kernels

import "math"

// Dot returns sum a[i]*b[i] in float32; len(b) must be at least len(a).
func Dot(a, b []float32) float32 {
	if len(b) < len(a) {
		lenPanic("Dot", len(a), len(b), "b")
	}
	return impl.dot(a, b[:len(a)])
}

// Axpy computes y += a*x; len(x) must be at least len(y).
func Axpy(y []float32, a float32, x []float32) {
	if len(x) < len(y) {
		lenPanic("Axpy", len(y), len(x), "x")
	}
	impl.axpy(y, a, x[:len(y)])
}

// Scale computes x *= a.
func Scale(x []float32, a float32) { impl.scale(x, a) }

// Add computes dst = a+b; dst may alias a or b.
func Add(dst, a, b []float32) {
	if len(a) < len(dst) || len(b) < len(dst) {
		lenPanic("Add", len(dst), min(len(a), len(b)), "a/b")
	}
	impl.add(dst, a[:len(dst)], b[:len(dst)])
}

// RMSNorm computes out = weight * (x * 1/sqrt(mean(x^2)+eps)) in HF's
// order: normalise in float32, then multiply by the weight. out may alias x.
func RMSNorm(out, x, weight []float32, eps float32) {
	if len(x) < len(out) || len(weight) < len(out) {
		lenPanic("RMSNorm", len(out), min(len(x), len(weight)), "x/weight")
	}
	x = x[:len(out)]
	if len(x) == 0 {
		return
	}
	ms := impl.sumSq(x) / float32(len(x))
	inv := float32(1 / math.Sqrt(float64(ms+eps)))
	impl.mulScale(out, x, weight[:len(out)], inv)
}

// SiLUMul computes out[i] = gate[i]/(1+exp(-gate[i])) * up[i]. out may
// alias gate or up.
func SiLUMul(out, gate, up []float32) {
	if len(gate) < len(out) || len(up) < len(out) {
		lenPanic("SiLUMul", len(out), min(len(gate), len(up)), "gate/up")
	}
	impl.siluMul(out, gate[:len(out)], up[:len(out)])
}

// Softmax normalises x in place: max-subtracted, exp in float32 (within a
// few ulp of math.Exp rounded to float32), sums in float32.
func Softmax(x []float32) {
	if len(x) == 0 {
		return
	}
	m := impl.max(x)
	s := impl.expSub(x, m)
	impl.scale(x, 1/s)
}

// Sigmoid computes x[i] = 1/(1+exp(-x[i])) in place.
func Sigmoid(x []float32) { impl.sigmoid(x) }

// RoPEInterleaved rotates interleaved pairs as HF's apply_rotary_emb for
// DeepSeek (a complex multiply): for i < len(cos),
//
//	a, b := x[2i], x[2i+1]; x[2i] = a*cos[i] - b*sin[i]; x[2i+1] = a*sin[i] + b*cos[i]
func RoPEInterleaved(x, cos, sin []float32) {
	if len(x) < 2*len(cos) || len(sin) < len(cos) {
		lenPanic("RoPEInterleaved", 2*len(cos), len(x), "x (or sin short)")
	}
	impl.rope(x[:2*len(cos)], cos, sin[:len(cos)])
}

// TopK returns the indices of the k largest values of x, ordered by value
// descending, ties to the lower index first; NaN ranks below every number.
// dst's storage is reused when large enough. k is clamped to [0, len(x)].
func TopK(dst []int, x []float32, k int) []int {
	k = max(0, min(k, len(x)))
	if cap(dst) < k {
		dst = make([]int, k)
	}
	dst = dst[:0]
	// Insertion into a sorted list of at most k: k is small (router top-k).
	for i, v := range x {
		if len(dst) == k {
			if k == 0 || !topkLess(x[dst[k-1]], v) {
				continue
			}
			dst = dst[:k-1]
		}
		j := len(dst)
		dst = append(dst, i)
		for j > 0 && topkLess(x[dst[j-1]], v) {
			dst[j] = dst[j-1]
			j--
		}
		dst[j] = i
	}
	return dst
}

// topkLess reports whether a ranks strictly below b (earlier index wins
// ties, so equal values never displace).
func topkLess(a, b float32) bool {
	if a != a {
		return b == b
	}
	return a < b
}
