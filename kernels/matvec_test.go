package kernels

import (
	"fmt"
	"math/rand/v2"
	"testing"
)

var allDTypes = []DType{F32, BF16, F16, F8E4M3, Q8_0}

// matShapes are awkward on purpose: row counts that are not multiples of
// the 4-row tile or the thread split, column counts with vector tails, and
// F8 shapes crossing 128-row/col scale blocks.
var matShapes = [][2]int{{2, 5}, {5, 12}, {1, 32}, {3, 64}, {5, 96}, {17, 160}, {33, 256}, {130, 288}, {7, 2048}, {260, 416}}

func TestMatVecMatchesReference(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	pools := []*Pool{NewPool(1), NewPool(3)}
	defer func() {
		for _, p := range pools {
			p.Close()
		}
	}()
	for _, dt := range allDTypes {
		for _, sh := range matShapes {
			for _, extra := range []int{0, 1, 7} {
				rows, cols := sh[0], sh[1]+extra
				if dt == Q8_0 {
					if sh[1]%Q8Block != 0 {
						continue
					}
					cols = sh[1]
				}
				w := randMatrix(rng, dt, rows, cols, 1)
				if err := w.Validate(); err != nil {
					t.Fatal(err)
				}
				x := randVec(rng, cols, 1)
				want, mag := refMatVec(w, x)
				for _, isa := range isas() {
					for _, p := range pools {
						name := fmt.Sprintf("%s/%dx%d/%s/t%d", dt, rows, cols, isa, p.Threads())
						withISA(t, isa, func() {
							y, check := guarded(rows)
							p.MatVec(y, w, x)
							check(t)
							for r := range y {
								if !closeRel(float64(y[r]), want[r], mag[r], 1e-5) {
									t.Fatalf("%s: y[%d]=%g want %g (mag %g)", name, r, y[r], want[r], mag[r])
								}
							}
						})
					}
				}
			}
		}
	}
}
