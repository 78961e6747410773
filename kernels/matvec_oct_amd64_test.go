//go:build amd64 && !purego

package kernels

import (
	"fmt"
	"math/rand/v2"
	"testing"
)

// TestMatVecBF16Oct: the eight-row BF16 kernel (and the one-row kernel
// finishing the rows past a multiple of eight, and the Go tail past a
// multiple of 32 columns) against the reference, with the threshold
// lowered so short rows take it too, and at a real long-row shape.
func TestMatVecBF16Oct(t *testing.T) {
	if BestISA() < ISAAVX512 {
		t.Skip("no AVX-512")
	}
	defer func(c int) { bf16OctCols = c }(bf16OctCols)
	rng := rand.New(rand.NewPCG(5, 6))
	pools := []*Pool{NewPool(1), NewPool(2), NewPool(3)}
	defer func() {
		for _, p := range pools {
			p.Close()
		}
	}()
	for _, c := range []struct{ rows, cols, threshold int }{
		{8, 32, 32}, {5, 64, 32}, {7, 103, 32}, {9, 4096 + 33, 32}, {17, 160, 32}, {130, 288, 32},
		{37, 10944, 4096}, {3, 10944 + 5, 4096}, // fewer than eight rows: one-row kernel only
	} {
		bf16OctCols = c.threshold
		w := randMatrix(rng, BF16, c.rows, c.cols, 1)
		x := randVec(rng, c.cols, 1)
		want, mag := refMatVec(w, x)
		for _, p := range pools {
			name := fmt.Sprintf("%dx%d/t%d", c.rows, c.cols, p.Threads())
			y, check := guarded(c.rows)
			p.MatVec(y, w, x)
			check(t)
			for r := range y {
				if !closeRel(float64(y[r]), want[r], mag[r], 1e-5) {
					t.Fatalf("%s: y[%d]=%g want %g (mag %g)", name, r, y[r], want[r], mag[r])
				}
			}
		}
	}
}

// withLongRowThreshold lowers the column count from which the multi-row
// BF16 kernel runs, and returns the restore.
func withLongRowThreshold(cols int) func() {
	old := bf16OctCols
	bf16OctCols = cols
	return func() { bf16OctCols = old }
}
