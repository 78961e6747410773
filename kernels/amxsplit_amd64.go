//go:build amd64 && !purego

package kernels

import (
	"math"
	"unsafe"
)

// The exact (float32-activation) product on AMX-BF16 tiles.
//
// Each activation x splits into three bf16 parts with x = hi + lo + lo2
// exactly: hi is x truncated to bf16, so x-hi is exact in float32 and has
// at most 16 significant bits; lo is x-hi truncated, and lo2 = x-hi-lo has
// at most 8 left, a bf16 value. The weights are bf16, so every product
// w·part is exact in float32 and TDPBF16PS sums them in float32 with round
// to nearest even: W·hi + W·lo + W·lo2, accumulated into the same C tiles,
// is W·x with float32 summation error, the error class of the FMA
// kernels (bound below), for three times their tile work. Two forms:
// here x's parts are the A tiles and W is packed into B tiles on every
// call; in amxwa_amd64.go (batches up to waMaxN rows, even columns) W's
// rows are the A tiles as stored and x's parts the B tiles, which saves
// the packing. Here the parts of a 16-pair step lie next to each other
// (amxSplitRow) so one kernel loads each B tile once for all three.
//
// What TDPBF16PS does differently from float32 FMA, and how it is kept
// out of the result:
//   - Inf and NaN activations would make lo NaN: a call whose x holds any
//     runs the FMA kernels instead (amxSplitX reports them).
//   - Subnormal inputs count as zero and subnormal sums are flushed. A row
//     of x whose largest |x| is under 2^-32 is scaled by a power of two
//     (exact) so that it lies in [1,2), and its outputs are scaled back;
//     otherwise only parts under 2^-126, products under 2^-126 and partial
//     sums under 2^-126 are lost, an absolute error below
//     3*K*2^-126*(1+max|w|) per output: for K = 10944 and |w| <= 2^10,
//     below 2^-100 (8e-31), under the 1e-30 the kernel tests allow beside
//     the relative bound, and far below any value a model's activations
//     carry. Subnormal weights count as zero: |w| < 2^-126, a loss below
//     2^-126*|x| per product.
//   - Signed zeros: -0 splits into -0, +0, +0, and a sum of zeros is +0
//     as in the FMA kernels.
//   - Inf weights (which Matrix assumes absent): an output the FMA kernels
//     make ±Inf may be NaN here, Inf times a zero part of x.
//
// The float32 sum has 3K terms instead of K, whose magnitudes add up to
// sum|w*x|, so its worst-case bound is 3K*2^-24 * sum|w*x|.

//go:noescape
func amxSplit11(cfg *amxConfig, a *uint16, astride uintptr, b *uint32, bstride uintptr, ksteps int, c *float32, cstride uintptr, acc int)

//go:noescape
func amxSplit12(cfg *amxConfig, a *uint16, astride uintptr, b *uint32, bstride uintptr, ksteps int, c *float32, cstride uintptr, acc int)

//go:noescape
func amxSplit21(cfg *amxConfig, a *uint16, astride uintptr, b *uint32, bstride uintptr, ksteps int, c *float32, cstride uintptr, acc int)

//go:noescape
func amxSplit22(cfg *amxConfig, a *uint16, astride uintptr, b *uint32, bstride uintptr, ksteps int, c *float32, cstride uintptr, acc int)

//go:noescape
func amxSplitRow(dst *uint16, src *float32, steps int, scale float32, mx *[16]uint32)

// amxSplitRun is amxRun for the split kernels.
func amxSplitRun(m2, n2 bool, cfg *amxConfig, a *uint16, astride uintptr, b *uint32, bstride uintptr, ksteps int, c *float32, cstride uintptr, acc int) {
	switch {
	case m2 && n2:
		amxSplit22(cfg, a, astride, b, bstride, ksteps, c, cstride, acc)
	case m2:
		amxSplit21(cfg, a, astride, b, bstride, ksteps, c, cstride, acc)
	case n2:
		amxSplit12(cfg, a, astride, b, bstride, ksteps, c, cstride, acc)
	default:
		amxSplit11(cfg, a, astride, b, bstride, ksteps, c, cstride, acc)
	}
}

// amxSplitCfg is amxCfg for the split kernels: with one A tile (m1 = 0)
// TMM5 takes A0's shape too (the kernels alternate the parts between
// TMM4 and TMM5).
func amxSplitCfg(m0, m1, n0, n1, kc int) amxConfig {
	c := amxCfg(m0, m1, n0, n1, kc)
	if m1 == 0 {
		c[16+2*5] = byte(4 * kc)
		c[17+2*5] = byte((4 * kc) >> 8)
		c[48+5] = byte(m0)
	}
	return c
}

// amxSplitMinN: the smallest batch whose float32-activation BF16 products
// (MatMul, MatMulMany, ExpertFFN) take the split AMX path. One thread at
// load 4.7-6.1, split/FMA: BenchmarkMatMulSplitAMX -amxsmall (1408x2048,
// 2048x1408, W in cache) 0.66-0.69 at 4 rows, 1.11-1.30 at 8, 1.37-1.67
// at 12, 1.69-1.73 at 16; MatMulMany over 24 experts' gate and up
// (1408x2048, 280 MB of weights streamed from memory as in a MoE layer,
// best of 8 alternated calls) 1.03-1.08 at 6 rows, 1.29-1.34 at 8,
// 1.41-1.53 at 12, 2.04-2.08 at 48. (Measured on the packed form; the
// transposed one starts at waMinN.) A variable for benchmarks and tests.
var amxSplitMinN = 8

// splitUsed reports whether a float32-activation product of n rows with w
// takes the split AMX path. Not below 32 columns: at 16 (a 16-wide expert
// of attnnode's dispatch benchmark) the split ran at 21-38 GFLOP/s against
// the FMA kernels' 93-106 on one thread, at 32 already 3-5x faster
// (BenchmarkMatMulSplitAMX with those shapes, 16 and 32 rows).
func splitUsed(w *Matrix, n int) bool {
	return amxOn && (n >= amxSplitMinN || n >= waMinN && waLayout(n, w.Cols)) && w.DType == BF16 && w.Cols >= 32 && impl.isa >= ISAAVX512
}

// splitSteps is the 16-pair steps of a split row of cols values.
func splitSteps(cols int) int { return ceilDiv((cols+1)/2, 16) }

// splitRowLen is the uint16 length of one split row: 96 per step.
func splitRowLen(cols int) int { return 96 * splitSteps(cols) }

// splitX is x split for the AMX path: n rows of splitRowLen(cols), and
// for rows scaled by 2^s (tiny values) the factor 2^-s that restores their
// outputs (inv nil: none scaled).
type splitX struct {
	a    []uint16
	inv  []float32
	n    int
	cols int
}

// splitTinyBits: a row whose largest |x| has bits below these (2^-32) is
// scaled up before splitting.
const splitTinyBits = 0x2f800000

// amxSplitRows splits rows [lo,hi) of x (cols each) into dst, the split
// of all n = len(dst)/splitRowLen(cols) rows (rows of splitRowLen(cols),
// or the transposed layout of amxwa_amd64.go where waLayout(n, cols)),
// and stores each row's largest |x| bits in mx[i] (>= 0x7f800000 where
// the row has Inf or NaN).
func amxSplitRows(dst []uint16, x []float32, cols, lo, hi int, mx []uint32) {
	rl := splitRowLen(cols)
	if n := len(dst) / rl; waLayout(n, cols) {
		buf := unsafe.Slice((*uint32)(unsafe.Pointer(&dst[0])), n*rl/2)
		for i := lo; i < hi; i += 16 {
			b1 := min(hi, i+16)
			splitRowsT(buf, n, cols, x, i, b1, 1, mx[i:b1])
		}
		return
	}
	for i := lo; i < hi; i++ {
		mx[i] = amxSplitRowScaled(dst[i*rl:(i+1)*rl], x[i*cols:(i+1)*cols], 1)
	}
}

// amxSplitRowScaled splits one row times scale into d and returns the
// largest |x*scale| bits.
func amxSplitRowScaled(d []uint16, x []float32, scale float32) uint32 {
	cols := len(x)
	full := cols / 32
	var m uint32
	if full > 0 {
		var lanes [16]uint32
		amxSplitRow(&d[0], &x[0], full, scale, &lanes)
		for _, v := range lanes {
			m = max(m, v)
		}
	}
	if full*32 < cols {
		// The last step: the remaining values, zeros after them.
		s := d[96*full : 96*full+96]
		clear(s)
		for j, v := range x[32*full:] {
			v *= scale
			m = max(m, math.Float32bits(v)&0x7fffffff)
			hi, lo, lo2 := splitBF16(v)
			s[j], s[32+j], s[64+j] = hi, lo, lo2
		}
	}
	return m
}

// splitBF16 is the three-part split of one value (see amxSplitRow).
func splitBF16(v float32) (hi, lo, lo2 uint16) {
	b := math.Float32bits(v)
	r := v - math.Float32frombits(b&0xffff0000)
	rb := math.Float32bits(r)
	r2 := r - math.Float32frombits(rb&0xffff0000)
	return uint16(b >> 16), uint16(rb >> 16), uint16(math.Float32bits(r2) >> 16)
}

// finishSplit checks the maxima of a split's rows: false if any row holds
// Inf or NaN; rows of tiny values are split again scaled up by 2^s into
// [1,2) and get inv[i] = 2^-s (inv, n floats, is used only then).
func finishSplit(s *splitX, x []float32, mx []uint32, inv []float32) bool {
	s.inv = nil
	for i, m := range mx[:s.n] {
		if m >= 0x7f800000 {
			return false
		}
		if m == 0 || m >= splitTinyBits {
			continue
		}
		if s.inv == nil {
			s.inv = inv[:s.n]
			for k := range s.inv {
				s.inv[k] = 1
			}
		}
		// 2^e <= max < 2^(e+1); scale by 2^-e, at most 2^126.
		e := max(-126, math.Ilogb(float64(math.Float32frombits(m))))
		rl := splitRowLen(s.cols)
		if waLayout(s.n, s.cols) {
			var scaled [1]uint32
			splitRowsT(waBuf(s), s.n, s.cols, x, i, i+1, float32(math.Ldexp(1, -e)), scaled[:])
		} else {
			amxSplitRowScaled(s.a[i*rl:(i+1)*rl], x[i*s.cols:(i+1)*s.cols], float32(math.Ldexp(1, -e)))
		}
		s.inv[i] = float32(math.Ldexp(1, e))
	}
	return true
}

// splitPanels is how many packed 32-row panels of W matMulSplitRows
// keeps at once: up to 512 KiB of them (4 at 2048 columns), so that with
// a block of splitXBlock split x rows (768 KiB at 2048 columns) they stay
// in L2 while every panel runs against the block.
func splitPanels(cols int) int {
	return max(1, min(splitGroupMax, (512<<10)/(4*amxNR*((cols+1)/2))))
}

// splitXBlock: split x rows run against a group of panels at a time;
// splitGroupMax: the most panels in a group. Variables for benchmarks.
var splitXBlock, splitGroupMax = 64, 4

// splitScratch is the scratch (floats) of matMulSplitRows.
func splitScratch(cols int) int {
	return max(matMulScratch(cols), splitPanels(cols)*amxNR*((cols+1)/2))
}

// matMulSplitRows: W (BF16) rows [lo,hi) against the split x rows through
// the split AMX kernels: splitPanels panels of 32 W rows packed at once,
// then every block of splitXBlock x rows against each of them, 32 rows
// (two A tiles) at a time. Without the blocks, every panel read all the
// split rows (6 MiB at 512 rows of 2048) from beyond L2: 1408x2048 at 512
// rows ran at 211 GFLOP/s against 343 at 128 (BenchmarkMatMulSplitAMX).
// scratch holds splitScratch(Cols) floats.
func matMulSplitRows(y []float32, w *Matrix, s *splitX, lo, hi int, scratch []float32) {
	n := s.n
	if lo >= hi || n == 0 {
		return
	}
	cols, rows := w.Cols, w.Rows
	if waLayout(n, cols) {
		matMulWARows(y, w, s, lo, hi, scratch)
		splitUnscale(y, s, rows, lo, hi)
		return
	}
	kp := (cols + 1) / 2
	kmain := kp &^ 15 // whole 16-pair steps
	kt := kp - kmain  // pairs of the tail step
	rl := splitRowLen(cols)
	g := splitPanels(cols)
	psize := amxNR * kp
	packed := unsafe.Slice((*uint32)(unsafe.Pointer(&scratch[0])), g*psize)
	_ = s.a[n*rl-1]
	_ = y[(n-1)*rows+hi-1]
	astride, bstride, cstride := uintptr(2*rl), uintptr(4*amxNR), uintptr(4*rows)
	full := amxSplitCfg(16, 16, 16, 16, 16)
	for r0 := lo; r0 < hi; r0 += g * amxNR {
		np := min(g, ceilDiv(hi-r0, amxNR))
		for q := 0; q < np; q++ {
			rq := r0 + q*amxNR
			packBF16Pairs(packed[q*psize:(q+1)*psize], w, rq, min(amxNR, hi-rq), amxNR)
		}
		for s0 := 0; s0 < n; s0 += splitXBlock {
			s1 := min(n, s0+splitXBlock)
			for q := 0; q < np; q++ {
				rq := r0 + q*amxNR
				cnt := min(amxNR, hi-rq)
				n0 := min(16, cnt)
				n1 := cnt - n0
				b := packed[q*psize:]
				for i0 := s0; i0 < s1; i0 += 32 {
					m0 := min(16, s1-i0)
					m1 := min(16, s1-i0-m0)
					c := &y[i0*rows+rq]
					if kmain > 0 {
						cfg := &full
						var tail amxConfig
						if m1 < 16 || n1 < 16 {
							tail = amxSplitCfg(m0, m1, n0, n1, 16)
							cfg = &tail
						}
						amxSplitRun(m1 > 0, n1 > 0, cfg, &s.a[i0*rl], astride, &b[0], bstride, kmain/16, c, cstride, 0)
					}
					if kt > 0 {
						cfg := amxSplitCfg(m0, m1, n0, n1, kt)
						amxSplitRun(m1 > 0, n1 > 0, &cfg, &s.a[i0*rl+96*(kmain/16)], astride, &b[kmain*amxNR], bstride, 1, c, cstride, b2i(kmain > 0))
					}
				}
			}
		}
	}
	splitUnscale(y, s, rows, lo, hi)
}

// splitUnscale scales the outputs [lo,hi) of the split's tiny rows back.
func splitUnscale(y []float32, s *splitX, rows, lo, hi int) {
	for i, f := range s.inv {
		if f != 1 {
			scaleGeneric(y[i*rows+lo:i*rows+hi], f)
		}
	}
}
