//go:build amd64 && !purego

package kernels

import (
	"encoding/binary"
	"math"
)

// Generated in matvec_amd64.s. Each computes rows 4 (x4) or 1 (x1)
// consecutive outputs y[j] = W[j]·x over n columns, n a multiple of the
// vector width (32 for Q8), rows stride bytes apart.

//go:noescape
func mvF32x4AVX512(y *float32, w *byte, stride uintptr, x *float32, n int)

//go:noescape
func mvF32x1AVX512(y *float32, w *byte, stride uintptr, x *float32, n int)

//go:noescape
func mvBF16x4AVX512(y *float32, w *byte, stride uintptr, x *float32, n int)

//go:noescape
func mvBF16x1AVX512(y *float32, w *byte, stride uintptr, x *float32, n int)

//go:noescape
func mvF16x4AVX512(y *float32, w *byte, stride uintptr, x *float32, n int)

//go:noescape
func mvF16x1AVX512(y *float32, w *byte, stride uintptr, x *float32, n int)

//go:noescape
func mvF8x4AVX512(y *float32, w *byte, stride uintptr, x *float32, n int)

//go:noescape
func mvF8x1AVX512(y *float32, w *byte, stride uintptr, x *float32, n int)

//go:noescape
func mvQ8x4AVX512(y *float32, w *byte, stride uintptr, x *float32, n int, s *float32, sstride uintptr)

//go:noescape
func mvQ8x1AVX512(y *float32, w *byte, stride uintptr, x *float32, n int, s *float32, sstride uintptr)

//go:noescape
func mvF32x4AVX2(y *float32, w *byte, stride uintptr, x *float32, n int)

//go:noescape
func mvF32x1AVX2(y *float32, w *byte, stride uintptr, x *float32, n int)

//go:noescape
func mvBF16x4AVX2(y *float32, w *byte, stride uintptr, x *float32, n int)

//go:noescape
func mvBF16x1AVX2(y *float32, w *byte, stride uintptr, x *float32, n int)

//go:noescape
func mvF16x4AVX2(y *float32, w *byte, stride uintptr, x *float32, n int)

//go:noescape
func mvF16x1AVX2(y *float32, w *byte, stride uintptr, x *float32, n int)

//go:noescape
func mvF8x4AVX2(y *float32, w *byte, stride uintptr, x *float32, n int)

//go:noescape
func mvF8x1AVX2(y *float32, w *byte, stride uintptr, x *float32, n int)

//go:noescape
func mvQ8x4AVX2(y *float32, w *byte, stride uintptr, x *float32, n int, s *float32, sstride uintptr)

//go:noescape
func mvQ8x1AVX2(y *float32, w *byte, stride uintptr, x *float32, n int, s *float32, sstride uintptr)

type mvFunc func(y *float32, w *byte, stride uintptr, x *float32, n int)
type mvQ8Func func(y *float32, w *byte, stride uintptr, x *float32, n int, s *float32, sstride uintptr)

// mvSet is one ISA's matrix-vector row kernels.
type mvSet struct {
	lanes      int
	x4, x1     [Q8_0]mvFunc // indexed by DType (F32..F8E4M3)
	q8x4, q8x1 mvQ8Func
}

var mvAVX512 = mvSet{
	lanes: 16,
	x4:    [Q8_0]mvFunc{mvF32x4AVX512, mvBF16x4AVX512, mvF16x4AVX512, mvF8x4AVX512},
	x1:    [Q8_0]mvFunc{mvF32x1AVX512, mvBF16x1AVX512, mvF16x1AVX512, mvF8x1AVX512},
	q8x4:  mvQ8x4AVX512,
	q8x1:  mvQ8x1AVX512,
}

var mvAVX2 = mvSet{
	lanes: 8,
	x4:    [Q8_0]mvFunc{mvF32x4AVX2, mvBF16x4AVX2, mvF16x4AVX2, mvF8x4AVX2},
	x1:    [Q8_0]mvFunc{mvF32x1AVX2, mvBF16x1AVX2, mvF16x1AVX2, mvF8x1AVX2},
	q8x4:  mvQ8x4AVX2,
	q8x1:  mvQ8x1AVX2,
}

func matVecRowsAVX512(y []float32, w *Matrix, x []float32, lo, hi int, scratch []float32) {
	matVecRowsSIMD(&mvAVX512, y, w, x, lo, hi, scratch)
}

func matVecRowsAVX2(y []float32, w *Matrix, x []float32, lo, hi int, scratch []float32) {
	matVecRowsSIMD(&mvAVX2, y, w, x, lo, hi, scratch)
}

// matVecRowsSIMD runs the 4-row kernel over [lo,hi), the 1-row kernel on
// the last rows, and finishes columns beyond the vector width in Go.
func matVecRowsSIMD(s *mvSet, y []float32, w *Matrix, x []float32, lo, hi int, scratch []float32) {
	if lo >= hi {
		return
	}
	cols := w.Cols
	_ = y[hi-1]
	_ = x[cols-1]
	switch w.DType {
	case Q8_0:
		nb := cols / Q8Block
		stride := uintptr(cols)
		r := lo
		for ; r+4 <= hi; r += 4 {
			s.q8x4(&y[r], &w.Data[r*cols], stride, &x[0], cols, &w.Scales[r*nb], uintptr(4*nb))
		}
		for ; r < hi; r++ {
			s.q8x1(&y[r], &w.Data[r*cols], stride, &x[0], cols, &w.Scales[r*nb], uintptr(4*nb))
		}
	case F8E4M3:
		// Fold the block scale (and the 2^8 of the kernel's half trick)
		// into x once per 128-row block: the rows then need no scaling.
		xs := scratch[:cols]
		nb := ceilDiv(cols, F8Block)
		for r0 := lo; r0 < hi; {
			rb := r0 / F8Block
			r1 := min(hi, (rb+1)*F8Block)
			srow := w.Scales[rb*nb : (rb+1)*nb]
			for c := range xs {
				xs[c] = x[c] * (srow[c/F8Block] * 256)
			}
			mvRange(s, y, w, xs, r0, r1)
			r0 = r1
		}
	default:
		mvRange(s, y, w, x, lo, hi)
	}
}

func mvRange(s *mvSet, y []float32, w *Matrix, x []float32, lo, hi int) {
	cols := w.Cols
	main := cols &^ (s.lanes - 1)
	eb := elemBytes(w.DType)
	stride := uintptr(eb * cols)
	k4, k1 := s.x4[w.DType], s.x1[w.DType]
	r := lo
	if main > 0 {
		for ; r+4 <= hi; r += 4 {
			k4(&y[r], &w.Data[r*cols*eb], stride, &x[0], main)
		}
		for ; r < hi; r++ {
			k1(&y[r], &w.Data[r*cols*eb], stride, &x[0], main)
		}
	} else {
		clear(y[lo:hi])
	}
	if main < cols {
		for r := lo; r < hi; r++ {
			y[r] += dotTail(w, r, x, main, cols)
		}
	}
}

func elemBytes(d DType) int {
	switch d {
	case F32:
		return 4
	case BF16, F16:
		return 2
	}
	return 1
}

// dotTail is the dot of columns [c0,c1) of row r with x, for the columns
// past the vector width. For F8E4M3, x is the pre-scaled copy (factor 256).
func dotTail(w *Matrix, r int, x []float32, c0, c1 int) float32 {
	base := r * w.Cols
	var s float32
	switch w.DType {
	case F32:
		for c := c0; c < c1; c++ {
			s += math.Float32frombits(binary.LittleEndian.Uint32(w.Data[4*(base+c):])) * x[c]
		}
	case BF16:
		for c := c0; c < c1; c++ {
			s += BF16ToF32(binary.LittleEndian.Uint16(w.Data[2*(base+c):])) * x[c]
		}
	case F16:
		for c := c0; c < c1; c++ {
			s += F16ToF32(binary.LittleEndian.Uint16(w.Data[2*(base+c):])) * x[c]
		}
	case F8E4M3:
		for c := c0; c < c1; c++ {
			s += e4m3Table[w.Data[base+c]] * (x[c] * (1.0 / 256))
		}
	}
	return s
}
