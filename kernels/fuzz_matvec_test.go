package kernels

import (
	"encoding/binary"
	"math"
	"testing"
)

// FuzzMatVec: every SIMD level against the plain kernels on fuzzer-chosen
// dtype, shape, weights and activations (weights masked to moderate finite
// values, FP8 NaN codes cleared: neither is a weight).
func FuzzMatVec(f *testing.F) {
	f.Add(uint8(1), uint8(3), uint8(70), []byte{1, 2, 3, 4, 5, 6, 7, 8, 9})
	f.Add(uint8(4), uint8(5), uint8(2), []byte{0xff, 0x7f, 0x80, 0x01})
	f.Add(uint8(3), uint8(40), uint8(9), []byte{0x55})
	f.Fuzz(func(t *testing.T, dt, rows, cols uint8, seed []byte) {
		d := DType(dt % 5)
		r, c := int(rows%40)+1, int(cols)+1
		if d == Q8_0 {
			c = (c%8 + 1) * Q8Block
		}
		m := &Matrix{DType: d, Rows: r, Cols: c, Data: make([]byte, r*c*elemBytesOf(d))}
		for i := range m.Data {
			if len(seed) > 0 {
				m.Data[i] = seed[i%len(seed)] ^ byte(i*131)
			}
		}
		switch d {
		case F32:
			for i := 0; i < r*c; i++ {
				v := binary.LittleEndian.Uint32(m.Data[4*i:])&0x83ffffff | 0x3c000000
				binary.LittleEndian.PutUint32(m.Data[4*i:], v)
			}
		case BF16:
			for i := 0; i < r*c; i++ {
				v := binary.LittleEndian.Uint16(m.Data[2*i:])&0x83ff | 0x3c00
				binary.LittleEndian.PutUint16(m.Data[2*i:], v)
			}
		case F16:
			for i := 0; i < r*c; i++ {
				v := binary.LittleEndian.Uint16(m.Data[2*i:]) & 0xbfff // exponent < 31
				binary.LittleEndian.PutUint16(m.Data[2*i:], v)
			}
		case F8E4M3:
			for i := range m.Data {
				if m.Data[i]&0x7f == 0x7f {
					m.Data[i] &^= 1
				}
			}
			m.Scales = make([]float32, ceilDiv(r, F8Block)*ceilDiv(c, F8Block))
		case Q8_0:
			m.Scales = make([]float32, r*(c/Q8Block))
		}
		for i := range m.Scales {
			m.Scales[i] = float32(i%7+1) * 0.01
		}
		if err := m.Validate(); err != nil {
			t.Fatal(err)
		}
		x := make([]float32, c)
		for i := range x {
			x[i] = float32(int(seed0(seed, i))-128) / 64
		}
		// Odd row counts also take the long-row (multi-row) kernels, with
		// their column threshold lowered to this matrix.
		if r%2 == 1 {
			defer withLongRowThreshold(32)()
		}
		p := NewPool(2)
		defer p.Close()
		want := make([]float32, r)
		withISA(t, ISAGeneric, func() { p.MatVec(want, m, x) })
		row := make([]float32, c)
		for _, isa := range isas()[1:] {
			withISA(t, isa, func() {
				got := make([]float32, r)
				p.MatVec(got, m, x)
				for i := range got {
					m.RowF32(row, i)
					var mag float64
					for k, v := range row {
						mag += math.Abs(float64(v) * float64(x[k]))
					}
					if !closeRel(float64(got[i]), float64(want[i]), mag, 1e-5) {
						t.Fatalf("%s %s %dx%d row %d: %g, plain %g", isa, d, r, c, i, got[i], want[i])
					}
				}
			})
		}
	})
}

func seed0(seed []byte, i int) byte {
	if len(seed) == 0 {
		return 128
	}
	return seed[(i*7)%len(seed)]
}
