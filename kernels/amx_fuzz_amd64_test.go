//go:build amd64 && !purego

package kernels

import (
	"encoding/binary"
	"math"
	"testing"
)

// FuzzMatMulAMX: the AMX path of MatMulBF16Act against the plain twin
// (matMulRowsPlain with roundX) on fuzzer-chosen shapes, batch, weights
// and activations (weights masked to moderate finite bf16 values), within
// the summation-order bound of TestMatMulAMX.
func FuzzMatMulAMX(f *testing.F) {
	f.Add(uint8(33), uint8(97), uint8(37), []byte{1, 2, 3, 4, 5, 6, 7, 8, 9})
	f.Add(uint8(16), uint8(32), uint8(16), []byte{0xff, 0x7f, 0x80, 0x01})
	f.Add(uint8(5), uint8(1), uint8(8), []byte{0x55})
	f.Fuzz(func(t *testing.T, rows, cols, n uint8, seed []byte) {
		if ok, why := AMXAvailable(); !ok {
			t.Skip("AMX unavailable: " + why)
		}
		r, c, nn := int(rows%80)+1, int(cols)+1, int(n%70)+1
		m := fuzzBF16Matrix(r, c, seed)
		x := make([]float32, nn*c)
		for i := range x {
			x[i] = float32(math.Sin(float64(i)*0.37+float64(len(seed)))) * 3
		}
		want := make([]float32, nn*r)
		matMulRowsPlain(want, m, x, nn, 0, r, make([]float32, matMulScratch(c)), true)
		_, mag := refMatMul(m, x, nn, true)
		p := NewPool(2)
		defer p.Close()
		y, check := guarded(nn * r)
		withAMX(t, true, func() { p.MatMulBF16Act(y, m, x, nn) })
		check(t)
		for i := range y {
			if !closeRel(float64(y[i]), float64(want[i]), mag[i], 2*amxTol(c)) {
				t.Fatalf("%dx%d n=%d: y[%d]=%g, plain %g", r, c, nn, i, y[i], want[i])
			}
		}
	})
}

// FuzzMatMulSplitAMX: float32-activation MatMul through the split AMX
// path against the FMA kernels and the plain twin (matMulRowsPlain) on
// fuzzer-chosen shapes, batches (1-70 rows: every tile tail), weights
// (moderate finite bf16) and activations whose bits come from the input,
// so any float32 appears: subnormal, huge, signed zeros, Inf and NaN.
// Finite x: within the split's bound of the float64 reference (plus the
// rounding of subnormal results); x with Inf or NaN: bit for bit the FMA
// kernels' outputs (the call falls back to them). Both forms of the
// split path run (splitForms): packed, and transposed where the columns
// are even; their outputs agree bit for bit.
func FuzzMatMulSplitAMX(f *testing.F) {
	f.Add(uint8(33), uint8(97), uint8(37), []byte{1, 2, 3, 4, 5, 6, 7, 8, 9}, []byte{0x3f, 0x80, 0, 1})
	f.Add(uint8(16), uint8(32), uint8(16), []byte{0xff, 0x7f, 0x80, 0x01}, []byte{0, 0, 0x80, 0x7f})
	f.Add(uint8(5), uint8(1), uint8(8), []byte{0x55}, []byte{0x01, 0, 0, 0x80, 0xc3, 0xf5, 0x48, 0x40})
	f.Fuzz(func(t *testing.T, rows, cols, n uint8, seed, xbits []byte) {
		if ok, why := AMXAvailable(); !ok {
			t.Skip("AMX unavailable: " + why)
		}
		r, c, nn := int(rows%80)+1, int(cols)+1, int(n%70)+1
		m := fuzzBF16Matrix(r, c, seed)
		x := make([]float32, nn*c)
		for i := range x {
			v := float32(math.Sin(float64(i)*0.37+float64(len(seed)))) * 3
			if k := len(xbits) / 4; k > 0 && i%3 == 0 {
				// Every third value from the input's bits, scaled rows
				// and all: any float32.
				j := (i / 3) % k
				v = math.Float32frombits(binary.LittleEndian.Uint32(xbits[4*j:]))
			}
			x[i] = v
		}
		finite := true
		for _, v := range x {
			finite = finite && !math.IsInf(float64(v), 0) && !math.IsNaN(float64(v))
		}
		p := NewPool(2)
		defer p.Close()
		yFMA := make([]float32, nn*r)
		withSplit(t, false, func() { p.MatMul(yFMA, m, x, nn) })
		var want, mag []float64
		var plain []float32
		if finite {
			want, mag = refMatMul(m, x, nn, false)
			plain = make([]float32, nn*r)
			matMulRowsPlain(plain, m, x, nn, 0, r, make([]float32, matMulScratch(c)), false)
		}
		var first []float32
		for _, form := range splitForms {
			y, check := guarded(nn * r)
			withWAMax(form.maxN, func() {
				withSplit(t, true, func() { p.MatMul(y, m, x, nn) })
			})
			check(t)
			// The forms add the same products in the same order.
			if first == nil {
				first = y
			}
			for i := range y {
				if math.Float32bits(y[i]) != math.Float32bits(first[i]) {
					t.Fatalf("%dx%d n=%d: y[%d] %s %g, %s %g", r, c, nn, i, form.name, y[i], splitForms[0].name, first[i])
				}
			}
			if !finite {
				for i := range y {
					if math.Float32bits(y[i]) != math.Float32bits(yFMA[i]) {
						t.Fatalf("%s %dx%d n=%d, x with Inf/NaN: y[%d]=%g, FMA %g", form.name, r, c, nn, i, y[i], yFMA[i])
					}
				}
				continue
			}
			for i := range y {
				if math.IsInf(want[i], 0) || mag[i] > math.MaxFloat32/4 {
					continue // the float32 sum overflows on any path
				}
				tol := splitTol(c)*mag[i] + float64(c)*0x1p-149
				if d := math.Abs(float64(y[i]) - want[i]); d > tol {
					t.Fatalf("%s %dx%d n=%d: y[%d]=%g want %g (sum|w*x| %g, plain %g, FMA %g)", form.name, r, c, nn, i, y[i], want[i], mag[i], plain[i], yFMA[i])
				}
			}
		}
	})
}

// fuzzBF16Matrix is an r×c BF16 matrix of moderate finite values (bits
// 0x3c00-0xbfff with the middle exponent bits fixed) drawn from seed.
func fuzzBF16Matrix(r, c int, seed []byte) *Matrix {
	m := &Matrix{DType: BF16, Rows: r, Cols: c, Data: make([]byte, 2*r*c)}
	for i := 0; i < r*c; i++ {
		var b uint16
		if len(seed) > 0 {
			b = uint16(seed[i%len(seed)]) ^ uint16(i*131) ^ uint16(seed[(i/len(seed))%len(seed)])<<8
		}
		binary.LittleEndian.PutUint16(m.Data[2*i:], b&0x83ff|0x3c00)
	}
	return m
}
