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
		m := &Matrix{DType: BF16, Rows: r, Cols: c, Data: make([]byte, 2*r*c)}
		for i := 0; i < r*c; i++ {
			var b uint16
			if len(seed) > 0 {
				b = uint16(seed[i%len(seed)]) ^ uint16(i*131) ^ uint16(seed[(i/len(seed))%len(seed)])<<8
			}
			binary.LittleEndian.PutUint16(m.Data[2*i:], b&0x83ff|0x3c00)
		}
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
