//go:build amd64 && !purego

package kernels

import (
	"encoding/binary"
	"math"
)

// Generated in matvec_amd64.s. Each computes rows consecutive outputs
// y[j] = W[j]·x over the first n columns (n a multiple of the vector
// width, 32 for Q8), rows stride bytes apart, each row streamed in order.

//go:noescape
func mvF32RAVX512(y *float32, w *byte, stride uintptr, x *float32, n int, rows int)

//go:noescape
func mvBF16RAVX512(y *float32, w *byte, stride uintptr, x *float32, n int, rows int)

//go:noescape
func mvF16RAVX512(y *float32, w *byte, stride uintptr, x *float32, n int, rows int)

//go:noescape
func mvF8RAVX512(y *float32, w *byte, stride uintptr, x *float32, n int, rows int)

//go:noescape
func mvQ8RAVX512(y *float32, w *byte, stride uintptr, x *float32, n int, rows int, s *float32, sstride uintptr)

//go:noescape
func mvF32RAVX2(y *float32, w *byte, stride uintptr, x *float32, n int, rows int)

//go:noescape
func mvBF16RAVX2(y *float32, w *byte, stride uintptr, x *float32, n int, rows int)

//go:noescape
func mvF16RAVX2(y *float32, w *byte, stride uintptr, x *float32, n int, rows int)

//go:noescape
func mvF8RAVX2(y *float32, w *byte, stride uintptr, x *float32, n int, rows int)

//go:noescape
func mvBF16EORAVX512(y *float32, w *byte, stride uintptr, xp *float32, n int, rows int)

//go:noescape
func mvBF16EOR8AVX512(y *float32, w *byte, stride uintptr, xp *float32, n int, rows int)

//go:noescape
func mvBF16EORAVX2(y *float32, w *byte, stride uintptr, xp *float32, n int, rows int)

//go:noescape
func mvF8WRAVX512(y *float32, w *byte, stride uintptr, x *float32, n int, rows int)

//go:noescape
func permuteEOAVX512(dst, src *float32, n int)

//go:noescape
func permuteEOAVX2(dst, src *float32, n int)

//go:noescape
func mvQ8RAVX2(y *float32, w *byte, stride uintptr, x *float32, n int, rows int, s *float32, sstride uintptr)

type mvFunc func(y *float32, w *byte, stride uintptr, x *float32, n int, rows int)
type mvQ8Func func(y *float32, w *byte, stride uintptr, x *float32, n int, rows int, s *float32, sstride uintptr)

// mvSet is one ISA's matrix-vector row kernels.
type mvSet struct {
	lanes int
	rows  [Q8_0]mvFunc // indexed by DType (F32..F8E4M3)
	q8    mvQ8Func
	bf16  mvFunc // even/odd BF16 kernel taking x permuted by permuteEO
	// bf16x8 is bf16 over eight rows at once sharing the x loads, for
	// rows whose x does not stay in L1 (nil: bf16 everywhere).
	bf16x8 mvFunc
	f8w    mvFunc // FP8 kernel over 32 columns at a time (nil: use rows[F8E4M3])
}

// bf16OctCols is the row length from which the eight-row BF16 kernel
// runs: beyond it x (4 bytes a column) outgrows L1 next to the weight
// stream. (On 2048-column rows the multi-row kernels are slower.)
var bf16OctCols = 4096

var mvAVX512 = mvSet{
	lanes:  16,
	rows:   [Q8_0]mvFunc{mvF32RAVX512, mvBF16RAVX512, mvF16RAVX512, mvF8RAVX512},
	q8:     mvQ8RAVX512,
	bf16:   mvBF16EORAVX512,
	bf16x8: mvBF16EOR8AVX512,
	f8w:    mvF8WRAVX512,
}

var mvAVX2 = mvSet{
	lanes: 8,
	rows:  [Q8_0]mvFunc{mvF32RAVX2, mvBF16RAVX2, mvF16RAVX2, mvF8RAVX2},
	q8:    mvQ8RAVX2,
	bf16:  mvBF16EORAVX2,
}

func matVecRowsAVX512(y []float32, w *Matrix, x []float32, lo, hi int, scratch []float32) {
	matVecRowsSIMD(&mvAVX512, y, w, x, lo, hi, scratch)
}

func matVecRowsAVX2(y []float32, w *Matrix, x []float32, lo, hi int, scratch []float32) {
	matVecRowsSIMD(&mvAVX2, y, w, x, lo, hi, scratch)
}

// matVecRowsSIMD runs the row kernel over [lo,hi) and finishes columns
// beyond the vector width in Go.
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
		s.q8(&y[lo], &w.Data[lo*cols], uintptr(cols), &x[0], cols, hi-lo, &w.Scales[lo*nb], uintptr(4*nb))
	case F8E4M3:
		// Fold the block scale (and the 2^8 of the kernel's half trick)
		// into x once per 128-row block: the rows then need no scaling.
		xs := scratch[:cols]
		nb := ceilDiv(cols, F8Block)
		for r0 := lo; r0 < hi; {
			rb := r0 / F8Block
			r1 := min(hi, (rb+1)*F8Block)
			srow := w.Scales[rb*nb : (rb+1)*nb]
			copy(xs, x[:cols])
			for b, sc := range srow {
				impl.scale(xs[b*F8Block:min((b+1)*F8Block, cols)], sc*256)
			}
			if main := cols &^ 31; s.f8w != nil && main > 0 {
				s.f8w(&y[r0], &w.Data[r0*cols], uintptr(cols), &xs[0], main, r1-r0)
				for r := r0; r < r1 && main < cols; r++ {
					y[r] += dotTail(w, r, xs, main, cols)
				}
			} else {
				mvRange(s, y, w, xs, r0, r1)
			}
			r0 = r1
		}
	case BF16:
		if s.bf16 == nil || cols < 2*s.lanes {
			mvRange(s, y, w, x, lo, hi)
			return
		}
		main := cols &^ (2*s.lanes - 1)
		xp := scratch[:main]
		permuteEO(xp, x[:main], s.lanes)
		r := lo
		if octs := (hi - lo) &^ 7; s.bf16x8 != nil && cols >= bf16OctCols && octs > 0 {
			s.bf16x8(&y[lo], &w.Data[2*lo*cols], uintptr(2*cols), &xp[0], main, octs)
			r += octs
		}
		if r < hi {
			s.bf16(&y[r], &w.Data[2*r*cols], uintptr(2*cols), &xp[0], main, hi-r)
		}
		if main < cols {
			for r := lo; r < hi; r++ {
				y[r] += dotTail(w, r, x, main, cols)
			}
		}
	default:
		mvRange(s, y, w, x, lo, hi)
	}
}

// permuteEO reorders x per block of 2*lanes as [even elements | odd
// elements], the order the even/odd BF16 kernel produces weights in.
func permuteEO(dst, x []float32, lanes int) {
	if n := len(x) &^ (2*lanes - 1); n > 0 {
		if lanes == 16 {
			permuteEOAVX512(&dst[0], &x[0], n)
		} else {
			permuteEOAVX2(&dst[0], &x[0], n)
		}
		return
	}
	for b := 0; b+2*lanes <= len(x); b += 2 * lanes {
		blk, d := x[b:b+2*lanes], dst[b:b+2*lanes]
		for i := 0; i < lanes; i++ {
			d[i] = blk[2*i]
			d[lanes+i] = blk[2*i+1]
		}
	}
}

func mvRange(s *mvSet, y []float32, w *Matrix, x []float32, lo, hi int) {
	cols := w.Cols
	main := cols &^ (s.lanes - 1)
	eb := elemBytesOf(w.DType)
	stride := uintptr(eb * cols)
	if main > 0 {
		s.rows[w.DType](&y[lo], &w.Data[lo*cols*eb], stride, &x[0], main, hi-lo)
	} else {
		clear(y[lo:hi])
	}
	if main < cols {
		for r := lo; r < hi; r++ {
			y[r] += dotTail(w, r, x, main, cols)
		}
	}
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
