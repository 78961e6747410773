//go:build amd64 && !purego

package kernels

// Generated in vec_amd64.s. n is a positive multiple of the vector width
// (16 for AVX512, 8 for AVX2); the wrappers below finish the tails in Go.

//go:noescape
func dotAVX512(a, b *float32, n int) float32

//go:noescape
func dotAVX2(a, b *float32, n int) float32

//go:noescape
func axpyAVX512(y *float32, a float32, x *float32, n int)

//go:noescape
func axpyAVX2(y *float32, a float32, x *float32, n int)

//go:noescape
func scaleAVX512(x *float32, a float32, n int)

//go:noescape
func scaleAVX2(x *float32, a float32, n int)

//go:noescape
func addAVX512(dst, a, b *float32, n int)

//go:noescape
func addAVX2(dst, a, b *float32, n int)

//go:noescape
func mulScaleAVX512(out, x, weight *float32, inv float32, n int)

//go:noescape
func mulScaleAVX2(out, x, weight *float32, inv float32, n int)

//go:noescape
func maxAVX512(x *float32, n int) float32

//go:noescape
func maxAVX2(x *float32, n int) float32

//go:noescape
func siluMulAVX512(out, gate, up *float32, n int)

//go:noescape
func sigmoidAVX512(x *float32, n int)

//go:noescape
func expSubAVX512(x *float32, m float32, n int) float32

//go:noescape
func dot8AVX512(out *float32, q *float32, qstride uintptr, c *float32, n int, pf *float32)

//go:noescape
func axpy8x2AVX512(out *float32, ostride uintptr, p *float32, pstride uintptr, c0, c1 *float32, n int, pf0, pf1 *float32)

//go:noescape
func axpy8AVX512(out *float32, ostride uintptr, p *float32, pstride uintptr, c *float32, n int)

//go:noescape
func dot8x2AVX512(out *float32, q *float32, qstride uintptr, c0, c1 *float32, n int, pf0, pf1 *float32)

//go:noescape
func mlaOut8AVX512(out *float32, ostride uintptr, p *float32, pstride uintptr, rows **float32, nt int, r int)

func dotV512(a, b []float32) float32 {
	m := len(a) &^ 15
	var s float32
	if m > 0 {
		s = dotAVX512(&a[0], &b[0], m)
	}
	return s + dotGeneric(a[m:], b[m:])
}

func dotV2(a, b []float32) float32 {
	m := len(a) &^ 7
	var s float32
	if m > 0 {
		s = dotAVX2(&a[0], &b[0], m)
	}
	return s + dotGeneric(a[m:], b[m:])
}

func axpyV512(y []float32, a float32, x []float32) {
	m := len(y) &^ 15
	if m > 0 {
		axpyAVX512(&y[0], a, &x[0], m)
	}
	axpyGeneric(y[m:], a, x[m:])
}

func axpyV2(y []float32, a float32, x []float32) {
	m := len(y) &^ 7
	if m > 0 {
		axpyAVX2(&y[0], a, &x[0], m)
	}
	axpyGeneric(y[m:], a, x[m:])
}

func scaleV512(x []float32, a float32) {
	m := len(x) &^ 15
	if m > 0 {
		scaleAVX512(&x[0], a, m)
	}
	scaleGeneric(x[m:], a)
}

func scaleV2(x []float32, a float32) {
	m := len(x) &^ 7
	if m > 0 {
		scaleAVX2(&x[0], a, m)
	}
	scaleGeneric(x[m:], a)
}

func addV512(dst, a, b []float32) {
	m := len(dst) &^ 15
	if m > 0 {
		addAVX512(&dst[0], &a[0], &b[0], m)
	}
	addGeneric(dst[m:], a[m:], b[m:])
}

func addV2(dst, a, b []float32) {
	m := len(dst) &^ 7
	if m > 0 {
		addAVX2(&dst[0], &a[0], &b[0], m)
	}
	addGeneric(dst[m:], a[m:], b[m:])
}

func maxV512(x []float32) float32 {
	m := len(x) &^ 15
	if m == 0 {
		return maxGeneric(x)
	}
	return max2(maxAVX512(&x[0], m), maxGeneric(x[m:]))
}

func maxV2(x []float32) float32 {
	m := len(x) &^ 7
	if m == 0 {
		return maxGeneric(x)
	}
	return max2(maxAVX2(&x[0], m), maxGeneric(x[m:]))
}

// max2 is the larger of a and b with maxGeneric's NaN rule (b is a
// maximum that already ignored NaNs; -Inf when empty).
func max2(a, b float32) float32 {
	if b > a {
		return b
	}
	return a
}

func sumSqV512(x []float32) float32 { return dotV512(x, x) }
func sumSqV2(x []float32) float32   { return dotV2(x, x) }

func mulScaleV512(out, x, weight []float32, inv float32) {
	m := len(out) &^ 15
	if m > 0 {
		mulScaleAVX512(&out[0], &x[0], &weight[0], inv, m)
	}
	mulScaleGeneric(out[m:], x[m:], weight[m:], inv)
}

func mulScaleV2(out, x, weight []float32, inv float32) {
	m := len(out) &^ 7
	if m > 0 {
		mulScaleAVX2(&out[0], &x[0], &weight[0], inv, m)
	}
	mulScaleGeneric(out[m:], x[m:], weight[m:], inv)
}

func siluMulV512(out, gate, up []float32) {
	m := len(out) &^ 15
	if m > 0 {
		siluMulAVX512(&out[0], &gate[0], &up[0], m)
	}
	siluMulGeneric(out[m:], gate[m:], up[m:])
}

func sigmoidV512(x []float32) {
	m := len(x) &^ 15
	if m > 0 {
		sigmoidAVX512(&x[0], m)
	}
	sigmoidGeneric(x[m:])
}

func expSubV512(x []float32, mx float32) float32 {
	m := len(x) &^ 15
	var s float32
	if m > 0 {
		s = expSubAVX512(&x[0], mx, m)
	}
	return s + expSubGeneric(x[m:], mx)
}

// mlaHeadsAVX512 processes heads 8 at a time with every cache row read
// once per group: scores for 8 heads per token in one pass over the whole
// [latent | k_pe] row (dot8x2 against the heads' concatenated queries, two
// tokens per pass), softmax per head, then the weighted latent sum for 8
// heads with the outputs in registers (mlaOut8; axpy8x2 where R is not a
// multiple of 32). Falls back to the
// per-head loop for dimensions that are not multiples of 16.
func mlaHeadsAVX512(a *mlaArgs, h0, h1 int) {
	R, P, stride, nt := a.r, a.pe, a.r+a.pe, a.nTokens
	if R%16 != 0 || P%16 != 0 {
		mlaHeadsGeneric(a, h0, h1)
		return
	}
	row := a.rows // token t's cache row, built once per call by MLADecode
	h := h0
	for ; h+8 <= h1; h += 8 {
		// This thread's heads of the concatenated queries [qLat | qPE].
		qc := a.qc[h*stride : (h+8)*stride]
		for k := 0; k < 8; k++ {
			copy(qc[k*stride:], a.qLat[(h+k)*R:(h+k+1)*R])
			copy(qc[k*stride+R:], a.qPE[(h+k)*P:(h+k+1)*P])
		}
		var sc [16]float32
		s := a.scratch[h*nt : (h+8)*nt]
		t := 0
		for ; mlaScoresInPairs && t+2 <= nt; t += 2 {
			dot8x2AVX512(&sc[0], &qc[0], uintptr(4*stride), row[t], row[t+1], stride,
				row[min(t+mlaPrefetch, nt-1)], row[min(t+mlaPrefetch+1, nt-1)])
			for k := 0; k < 8; k++ {
				s[k*nt+t] = a.scale * sc[k]
				s[k*nt+t+1] = a.scale * sc[8+k]
			}
		}
		for ; t < nt; t++ {
			dot8AVX512(&sc[0], &qc[0], uintptr(4*stride), row[t], stride, row[min(t+mlaPrefetch, nt-1)])
			for k := 0; k < 8; k++ {
				s[k*nt+t] = a.scale * sc[k]
			}
		}
		for k := 0; k < 8; k++ {
			Softmax(s[k*nt : (k+1)*nt])
		}
		o := a.out[h*R : (h+8)*R]
		clear(o)
		if mlaOutInRegisters && R%32 == 0 {
			// Tiles of mlaTile tokens keep the rows each column chunk
			// re-reads in L2.
			for t0 := 0; t0 < nt; t0 += mlaTile {
				mlaOut8AVX512(&o[0], uintptr(4*R), &s[t0], uintptr(4*nt), &a.rows[t0], min(mlaTile, nt-t0), R)
			}
			continue
		}
		t = 0
		for ; t+2 <= nt; t += 2 {
			axpy8x2AVX512(&o[0], uintptr(4*R), &s[t], uintptr(4*nt), row[t], row[t+1], R,
				row[min(t+mlaPrefetch, nt-1)], row[min(t+mlaPrefetch+1, nt-1)])
		}
		if t < nt {
			axpy8AVX512(&o[0], uintptr(4*R), &s[t], uintptr(4*nt), row[t], R)
		}
	}
	if h < h1 {
		mlaHeadsGeneric(a, h, h1)
	}
}

// mlaPrefetch is how many tokens ahead the MLA kernels prefetch cache rows:
// at 4096 tokens (9.4 MB, from L3) +4 took the kernel from 47% to 66-68%
// of the FMA peak; +2 gave 61%, +8 59%.
const mlaPrefetch = 4

// mlaTile is the tokens per mlaOut8AVX512 call: 128 rows of a 576-float
// latent (288 KiB) stay in L2 across the 16 column chunks of R = 512.
const mlaTile = 128
