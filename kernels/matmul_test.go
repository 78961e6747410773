package kernels

import (
	"fmt"
	"math"
	"math/rand/v2"
	"testing"
)

// refMatMul is refMatVec per x row; round applies bf16 rounding to x first.
func refMatMul(w *Matrix, x []float32, n int, round bool) (y, mag []float64) {
	for i := 0; i < n; i++ {
		xi := append([]float32(nil), x[i*w.Cols:(i+1)*w.Cols]...)
		if round {
			for c, v := range xi {
				xi[c] = BF16ToF32(F32ToBF16(v))
			}
		}
		yi, mi := refMatVec(w, xi)
		y = append(y, yi...)
		mag = append(mag, mi...)
	}
	return y, mag
}

func TestMatMulMatchesReference(t *testing.T) {
	rng := rand.New(rand.NewPCG(5, 6))
	pools := []*Pool{NewPool(1), NewPool(2), NewPool(3)}
	defer func() {
		for _, p := range pools {
			p.Close()
		}
	}()
	shapes := [][2]int{{3, 5}, {1, 32}, {33, 64}, {70, 97}, {96, 160}, {130, 288}}
	for _, dt := range allDTypes {
		for _, sh := range shapes {
			rows, cols := sh[0], sh[1]
			if dt == Q8_0 {
				if cols &^= 31; cols == 0 {
					continue
				}
			}
			w := randMatrix(rng, dt, rows, cols, 3)
			for _, n := range []int{1, 2, 3, 5, 6, 7, 8, 11, 13, 15, 17} {
				x := randVec(rng, n*cols, 1)
				want, mag := refMatMul(w, x, n, false)
				wantR, magR := refMatMul(w, x, n, true)
				for _, isa := range isas() {
					for _, p := range pools {
						name := fmt.Sprintf("%s/%dx%d/n%d/%s/t%d", dt, rows, cols, n, isa, p.Threads())
						withISA(t, isa, func() {
							y, check := guarded(n * rows)
							p.MatMul(y, w, x, n)
							check(t)
							for i := range y {
								if !closeRel(float64(y[i]), want[i], mag[i], 1e-5) {
									t.Fatalf("MatMul %s: y[%d]=%g want %g", name, i, y[i], want[i])
								}
							}
							p.MatMulBF16Act(y, w, x, n)
							check(t)
							for i := range y {
								if !closeRel(float64(y[i]), wantR[i], magR[i], 1e-5) {
									t.Fatalf("MatMulBF16Act %s: y[%d]=%g want %g", name, i, y[i], wantR[i])
								}
							}
						})
					}
				}
			}
		}
	}
}

// TestMatMulBF16ActDeviation bounds how far the bf16-activation path
// strays from the exact one: each x element moves by at most 2^-9
// relative, so |Δy| <= 2^-9 * sum|w*x| (plus float32 accumulation).
func TestMatMulBF16ActDeviation(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 8))
	p := NewPool(2)
	defer p.Close()
	w := randMatrix(rng, BF16, 64, 256, 0)
	n := 16
	x := randVec(rng, n*256, 0)
	exact := make([]float32, n*64)
	approx := make([]float32, n*64)
	p.MatMul(exact, w, x, n)
	p.MatMulBF16Act(approx, w, x, n)
	_, mag := refMatMul(w, x, n, false)
	var worst float64
	for i := range exact {
		d := math.Abs(float64(exact[i]-approx[i])) / mag[i]
		worst = max(worst, d)
		if d > 1.0/512+1e-5 {
			t.Fatalf("y[%d]: exact %g bf16-act %g: deviation %g of sum|w*x| exceeds 2^-9", i, exact[i], approx[i], d)
		}
	}
	t.Logf("max |Δ|/sum|w*x| = %.2e", worst)
}

// TestMatMulLargeBatch covers the paths only large batches take: packed
// VDPBF16PS tiles for bf16 activations (n >= 256) and full 16-row packing
// groups for every dtype, with odd batch tails.
func TestMatMulLargeBatch(t *testing.T) {
	rng := rand.New(rand.NewPCG(23, 24))
	p := NewPool(2)
	defer p.Close()
	const n = 262
	for _, dt := range allDTypes {
		for _, sh := range [][2]int{{64, 256}, {48, 97}} {
			rows, cols := sh[0], sh[1]
			if dt == Q8_0 {
				cols = 256
			}
			w := randMatrix(rng, dt, rows, cols, 0)
			x := randVec(rng, n*cols, 0)
			want, mag := refMatMul(w, x, n, false)
			wantR, magR := refMatMul(w, x, n, true)
			for _, isa := range isas() {
				withISA(t, isa, func() {
					y, check := guarded(n * rows)
					p.MatMul(y, w, x, n)
					check(t)
					for i := range y {
						if !closeRel(float64(y[i]), want[i], mag[i], 1e-5) {
							t.Fatalf("MatMul %s %dx%d %s: y[%d]=%g want %g", dt, rows, cols, isa, i, y[i], want[i])
						}
					}
					p.MatMulBF16Act(y, w, x, n)
					check(t)
					for i := range y {
						if !closeRel(float64(y[i]), wantR[i], magR[i], 1e-5) {
							t.Fatalf("MatMulBF16Act %s %dx%d %s: y[%d]=%g want %g", dt, rows, cols, isa, i, y[i], wantR[i])
						}
					}
				})
			}
		}
	}
}
