package kernels

import (
	"fmt"
	"math"
)

// Integer activations: x rounded to Q8_0 blocks and multiplied with Q8_0
// or Q4_0 weights in integers (VPDPBUSD where the CPU has AVX512_VNNI or
// AVX-VNNI, VPMADDUBSW elsewhere, plain Go as the reference). Block sums
// are exact; each is scaled by the weight's and x's block scales in
// float32, so implementations differ only in the order of the float sums.

// QuantizeAct rounds x to Q8_0 blocks the way every integer-activation
// product does: per 32 values, d = absmax/127 (float32), q = the nearest
// integer to v/d, ties to even, in [-127, 127] (d = 0 gives q = 0).
// q must hold len(x) bytes and d len(x)/32 floats; len(x) must be a
// multiple of 32. (The reference for tests and for callers that need the
// rounded activations themselves.)
func QuantizeAct(q []int8, d []float32, x []float32) {
	if len(x)%Q8Block != 0 || len(q) < len(x) || len(d) < len(x)/Q8Block {
		panic(fmt.Sprintf("kernels: QuantizeAct len(x)=%d (a multiple of 32), len(q)=%d, len(d)=%d", len(x), len(q), len(d)))
	}
	for b := 0; b < len(x)/Q8Block; b++ {
		var s int32
		d[b] = quantBlock(q[b*Q8Block:(b+1)*Q8Block], x[b*Q8Block:(b+1)*Q8Block], &s)
	}
}

// quantBlock rounds one block of 32 values, returning its scale and
// adding Σq to *sum.
func quantBlock(q []int8, x []float32, sum *int32) float32 {
	var amax float32
	for _, v := range x[:Q8Block] {
		amax = max(amax, float32(math.Abs(float64(v))))
	}
	d := amax / 127
	div := d
	if d == 0 {
		div = 1 // every value is 0
	}
	var s int32
	for j, v := range x[:Q8Block] {
		// x/d rather than x·(1/d): 1/d overflows for subnormal d.
		r := int32(math.RoundToEven(float64(v / div)))
		r = max(-127, min(127, r))
		q[j] = int8(r)
		s += r
	}
	*sum += s
	return d
}

// qLayout is how one kernel wants x: groups of blocks whose sums its
// reduction produces together, in the order perm (position p holds block
// perm[p] of the group); for Q4 kernels, x's 32 values per block split
// into halves interleaved per vec blocks ([first halves][second halves],
// matching the nibble order); bias·Σq per block in c.
type qLayout struct {
	group int
	perm  []int
	inv   []int // inverse of perm
	vec   int   // Q4: blocks per weight vector (1: x in natural order)
	bias  int32
}

func newLayout(group int, perm []int, vec int, bias int32) *qLayout {
	inv := make([]int, len(perm))
	for p, b := range perm {
		inv[b] = p
	}
	return &qLayout{group: group, perm: perm, inv: inv, vec: vec, bias: bias}
}

// actQ8 is n rows of x rounded to Q8_0 blocks and laid out for one
// kernel. Buffers are reused across calls (owned by a Pool).
type actQ8 struct {
	lay        *qLayout
	n, cols    int
	rowQ, rowS int // per row: bytes of q (padded to whole groups), entries of s and c
	q          []int8
	s          []float32
	c          []int32
	src        *float32 // first x value quantised (dedup in MatVecMany)
}

// actSize is the storage (values, and scales or offsets) of n rows of
// cols values in layout lay.
func actSize(lay *qLayout, n, cols int) (nq, ns int) {
	rowS := ceilDiv(cols/Q8Block, lay.group) * lay.group
	return n * rowS * Q8Block, n * rowS
}

// resetIn sizes a for n rows of cols values in layout lay over the given
// storage (of actSize).
func (a *actQ8) resetIn(lay *qLayout, n, cols int, q []int8, s []float32, c []int32) {
	a.lay, a.n, a.cols = lay, n, cols
	a.rowS = ceilDiv(cols/Q8Block, lay.group) * lay.group
	a.rowQ = a.rowS * Q8Block
	a.q, a.s, a.c, a.src = q, s, c, nil
}

// reset sizes a for n rows of cols values in layout lay, in its own
// storage.
func (a *actQ8) reset(lay *qLayout, n, cols int) {
	nb := cols / Q8Block
	a.lay, a.n, a.cols = lay, n, cols
	a.rowS = ceilDiv(nb, lay.group) * lay.group
	a.rowQ = a.rowS * Q8Block
	if cap(a.q) < n*a.rowQ || cap(a.s) < n*a.rowS {
		// Headroom: slots are reused for inputs of varying rows, so
		// they settle after a few growths instead of reallocating.
		a.q = make([]int8, max(n*a.rowQ, 2*cap(a.q)))
		a.s = make([]float32, max(n*a.rowS, 2*cap(a.s)))
		a.c = make([]int32, max(n*a.rowS, 2*cap(a.c)))
	}
	a.q, a.s, a.c = a.q[:n*a.rowQ], a.s[:n*a.rowS], a.c[:n*a.rowS]
	a.src = nil
}

// quantRows rounds x rows [lo,hi) into a (after reset). Rows may be
// split across threads: nothing shared is written.
func (a *actQ8) quantRows(x []float32, lo, hi int) {
	L := a.lay
	nb := a.cols / Q8Block
	const chunk = 128 // blocks rounded per kernel call (buffers on the stack)
	var d [chunk]float32
	var sums [chunk]int32
	var tmp [chunk * Q8Block]int8
	for i := lo; i < hi; i++ {
		q := a.q[i*a.rowQ : (i+1)*a.rowQ]
		s := a.s[i*a.rowS : (i+1)*a.rowS]
		c := a.c[i*a.rowS : (i+1)*a.rowS]
		xr := x[i*a.cols : (i+1)*a.cols]
		if L.vec > 1 {
			clear(q) // the padding interleaves with the values
		}
		for b0 := 0; b0 < nb; b0 += chunk {
			m := min(chunk, nb-b0)
			dst := tmp[:m*Q8Block]
			if L.vec <= 1 {
				dst = q[b0*Q8Block : (b0+m)*Q8Block]
			}
			quantBlocks(dst, d[:m], sums[:m], xr[b0*Q8Block:(b0+m)*Q8Block])
			for k := 0; k < m; k++ {
				b := b0 + k
				pos := b/L.group*L.group + L.inv[b%L.group]
				s[pos], c[pos] = d[k], L.bias*sums[k]
				if L.vec > 1 {
					v, j := b/L.vec, b%L.vec
					base := v * L.vec * Q8Block
					copy(q[base+j*16:], tmp[k*Q8Block:k*Q8Block+16])
					copy(q[base+L.vec*16+j*16:], tmp[k*Q8Block+16:(k+1)*Q8Block])
				}
			}
		}
		// Padding to whole groups: zero values, scales and offsets.
		if L.vec <= 1 {
			clear(q[nb*Q8Block:])
		}
		for b := nb; b < a.rowS; b++ {
			pos := b/L.group*L.group + L.inv[b%L.group]
			s[pos], c[pos] = 0, 0
		}
	}
}

// quantBlocks rounds len(d) blocks with the active kernel (called
// directly, not through a function value, so that callers' buffers can
// stay on their stacks).
func quantBlocks(q []int8, d []float32, sum []int32, x []float32) {
	if impl.quantSIMD {
		quantSIMDBlocks(q, d, sum, x)
		return
	}
	quantGeneric(q, d, sum, x)
}

// quantGeneric rounds len(d) blocks of x into q, their scales into d and
// their sums Σq into sum (the reference of QuantizeAct).
func quantGeneric(q []int8, d []float32, sum []int32, x []float32) {
	for b := range d {
		sum[b] = 0
		d[b] = quantBlock(q[b*Q8Block:(b+1)*Q8Block], x[b*Q8Block:(b+1)*Q8Block], &sum[b])
	}
}

// qdotFunc computes y[r] for W rows [lo,hi) against row i of a.
type qdotFunc func(y []float32, w *Matrix, a *actQ8, i, lo, hi int)

// genericLayout is the plain kernels' layout: x in natural order, no
// groups, no offsets.
var genericLayout = newLayout(1, []int{0}, 1, 0)

// qdotGeneric is the reference: per block the exact integer sum, scaled
// by both block scales, summed left to right in float32.
func qdotGeneric(y []float32, w *Matrix, a *actQ8, i, lo, hi int) {
	nb := w.Cols / Q8Block
	xq := a.q[i*a.rowQ : i*a.rowQ+nb*Q8Block]
	xs := a.s[i*a.rowS : i*a.rowS+nb]
	for r := lo; r < hi; r++ {
		sc := w.Scales[r*nb : (r+1)*nb]
		var s float32
		if w.DType == Q4_0 {
			d := w.Data[r*w.Cols/2 : (r+1)*w.Cols/2]
			for b := range nb {
				var acc int32
				for j := 0; j < 16; j++ {
					t := d[b*16+j]
					acc += (int32(t&15) - 8) * int32(xq[b*Q8Block+j])
					acc += (int32(t>>4) - 8) * int32(xq[b*Q8Block+16+j])
				}
				s += sc[b] * xs[b] * float32(acc)
			}
		} else {
			d := w.Data[r*w.Cols : (r+1)*w.Cols]
			for b := range nb {
				var acc int32
				for j := b * Q8Block; j < (b+1)*Q8Block; j++ {
					acc += int32(int8(d[j])) * int32(xq[j])
				}
				s += sc[b] * xs[b] * float32(acc)
			}
		}
		y[r] = s
	}
}

// qFormat indexes the kernel tables: 0 for Q8_0 weights, 1 for Q4_0.
func qFormat(w *Matrix) int {
	if w.DType == Q4_0 {
		return 1
	}
	return 0
}

// qKernel returns the active kernel and layout for w.
func qKernel(w *Matrix) (qdotFunc, *qLayout) {
	f := qFormat(w)
	return impl.qdot[f], impl.qlay[f]
}

// qBlockBytes bounds the W rows a thread streams against every x row of an
// integer-activation MatMul before moving on: 64 KiB of Q8 weights at
// 2048 columns, so the block stays in L2 across the x rows.
const qBlockBytes = 64 << 10

// qRows computes y = W·x for W rows [lo,hi) against all n rows of a: W
// rows in blocks that stay in L2, each block against every x row with
// the matrix-vector kernel (so prefill rounds and sums exactly as decode).
func qRows(y []float32, w *Matrix, a *actQ8, n, lo, hi int) {
	k, _ := qKernel(w)
	step := max(rowGrain, qBlockBytes/max(1, w.rowBytes())&^(rowGrain-1))
	rows := w.Rows
	for r0 := lo; r0 < hi; r0 += step {
		r1 := min(hi, r0+step)
		for i := 0; i < n; i++ {
			k(y[i*rows:(i+1)*rows], w, a, i, r0, r1)
		}
	}
}
