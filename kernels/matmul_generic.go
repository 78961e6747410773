package kernels

// matMulXBlock is how many rows of x one pass over a thread's W rows
// serves: 32 rows of 2048 floats is 256 KiB, about an L2.
const matMulXBlock = 32

// matMulScratch is the per-thread scratch (floats) MatMul needs for Cols.
func matMulScratch(cols int) int { return max(cols, matMulScratchSIMD(cols)) }

// matMulRowsGeneric: W rows [lo,hi) against all n rows of x, one W row
// widened into scratch and reused against a block of x rows.
func matMulRowsGeneric(y []float32, w *Matrix, x []float32, n, lo, hi int, scratch []float32) {
	matMulRowsPlain(y, w, x, n, lo, hi, scratch, false)
}

// matMulBF16ActRowsGeneric is matMulRowsGeneric with x rounded to BF16.
func matMulBF16ActRowsGeneric(y []float32, w *Matrix, x []float32, n, lo, hi int, scratch []float32) {
	matMulRowsPlain(y, w, x, n, lo, hi, scratch, true)
}

// matMulRowsPlain is the plain product of both, rounding each x value to
// BF16 first when roundX is set.
func matMulRowsPlain(y []float32, w *Matrix, x []float32, n, lo, hi int, scratch []float32, roundX bool) {
	cols, rows := w.Cols, w.Rows
	wr := scratch[:cols]
	for i0 := 0; i0 < n; i0 += matMulXBlock {
		i1 := min(i0+matMulXBlock, n)
		for r := lo; r < hi; r++ {
			rowF32Generic(wr, w, r, 0, cols)
			for i := i0; i < i1; i++ {
				xi := x[i*cols : (i+1)*cols]
				var s float32
				for c, wv := range wr {
					xv := xi[c]
					if roundX {
						xv = BF16ToF32(F32ToBF16(xv))
					}
					s += wv * xv
				}
				y[i*rows+r] = s
			}
		}
	}
}
