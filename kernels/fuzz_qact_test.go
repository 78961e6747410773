package kernels

import "testing"

// FuzzQDot: every integer-activation kernel (each SIMD level, with and
// without VNNI) against the plain one on fuzzer-chosen format, shape,
// weights and activations; MatMul against MatVec on the same rows.
func FuzzQDot(f *testing.F) {
	f.Add(false, uint8(3), uint8(17), []byte{1, 2, 3, 4, 5, 6, 7, 8, 9})
	f.Add(true, uint8(1), uint8(44), []byte{0xff, 0x80, 0x7f, 0x01})
	f.Add(true, uint8(33), uint8(3), []byte{0x55})
	f.Fuzz(func(t *testing.T, q4 bool, rows, blocks uint8, seed []byte) {
		r, nb := int(rows%40)+1, int(blocks%48)+1
		c := nb * 32
		dt := Q8_0
		size := r * c
		if q4 {
			dt, size = Q4_0, size/2
		}
		m := &Matrix{DType: dt, Rows: r, Cols: c, Data: make([]byte, size), Scales: make([]float32, r*nb), ActQ8: !q4}
		for i := range m.Data {
			if len(seed) > 0 {
				m.Data[i] = seed[i%len(seed)] ^ byte(i*131)
			}
		}
		for i := range m.Scales {
			m.Scales[i] = float32(i%7+1) * 0.01
		}
		x := make([]float32, 2*c)
		for i := range x {
			x[i] = float32(int(seed0(seed, i))-128) / 64
			if i%97 == 5 {
				x[i] *= 1000 // a large value: the rest of its block rounds to few levels
			}
		}
		p := NewPool(2)
		defer p.Close()
		want, mag := refQDot(m, x[:c])
		want2, mag2 := refQDot(m, x[c:])
		qPaths(t, func(path string) {
			y := make([]float32, r)
			y2 := make([]float32, 2*r)
			p.MatVec(y, m, x[:c])
			p.MatMul(y2, m, x, 2)
			for i := range y {
				if !closeRel(float64(y[i]), want[i], mag[i], 1e-5) {
					t.Fatalf("%s %s %dx%d: y[%d]=%g, want %g (mag %g)", dt, path, r, c, i, y[i], want[i], mag[i])
				}
				if !closeRel(float64(y2[r+i]), want2[i], mag2[i], 1e-5) {
					t.Fatalf("%s %s %dx%d: MatMul y[%d]=%g, want %g (mag %g)", dt, path, r, c, i, y2[r+i], want2[i], mag2[i])
				}
				if y2[i] != y[i] {
					t.Fatalf("%s %s: MatMul row 0 y[%d]=%g, MatVec %g", dt, path, i, y2[i], y[i])
				}
			}
		})
	})
}
