package kernels

import (
	"encoding/binary"
	"math"
)

// matVecRowsGeneric computes y[r] for r in [lo,hi) one row at a time,
// widening on the fly. Sums run left to right in float32: this is the
// reference the SIMD versions are tested against.
func matVecRowsGeneric(y []float32, w *Matrix, x []float32, lo, hi int, _ []float32) {
	cols := w.Cols
	switch w.DType {
	case F32:
		for r := lo; r < hi; r++ {
			d := w.Data[4*r*cols : 4*(r+1)*cols]
			var s float32
			for c, xv := range x[:cols] {
				s += math.Float32frombits(binary.LittleEndian.Uint32(d[4*c:])) * xv
			}
			y[r] = s
		}
	case BF16:
		for r := lo; r < hi; r++ {
			d := w.Data[2*r*cols : 2*(r+1)*cols]
			var s float32
			for c, xv := range x[:cols] {
				s += math.Float32frombits(uint32(binary.LittleEndian.Uint16(d[2*c:]))<<16) * xv
			}
			y[r] = s
		}
	case F16:
		for r := lo; r < hi; r++ {
			d := w.Data[2*r*cols : 2*(r+1)*cols]
			var s float32
			for c, xv := range x[:cols] {
				s += F16ToF32(binary.LittleEndian.Uint16(d[2*c:])) * xv
			}
			y[r] = s
		}
	case F8E4M3:
		nb := ceilDiv(cols, F8Block)
		for r := lo; r < hi; r++ {
			d := w.Data[r*cols : (r+1)*cols]
			srow := w.Scales[(r/F8Block)*nb : (r/F8Block+1)*nb]
			var s float32
			for b, sc := range srow {
				c0, c1 := b*F8Block, min((b+1)*F8Block, cols)
				var bs float32
				for c := c0; c < c1; c++ {
					bs += e4m3Table[d[c]] * x[c]
				}
				s += bs * sc
			}
			y[r] = s
		}
	case Q8_0:
		nb := cols / Q8Block
		for r := lo; r < hi; r++ {
			d := w.Data[r*cols : (r+1)*cols]
			srow := w.Scales[r*nb : (r+1)*nb]
			var s float32
			for b, sc := range srow {
				var bs float32
				for c := b * Q8Block; c < (b+1)*Q8Block; c++ {
					bs += float32(int8(d[c])) * x[c]
				}
				s += bs * sc
			}
			y[r] = s
		}
	default:
		panic("kernels: unknown dtype")
	}
}
