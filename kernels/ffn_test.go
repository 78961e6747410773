package kernels

import (
	"fmt"
	"math"
	"math/rand/v2"
	"testing"
)

func TestExpertFFN(t *testing.T) {
	rng := rand.New(rand.NewPCG(17, 18))
	pools := []*Pool{NewPool(1), NewPool(2), NewPool(3)}
	defer func() {
		for _, p := range pools {
			p.Close()
		}
	}()
	for _, dt := range []DType{BF16, Q8_0, F32} {
		for _, sh := range [][2]int{{64, 96}, {96, 160}} { // hidden, inter
			hidden, inter := sh[0], sh[1]
			gate := randMatrix(rng, dt, inter, hidden, 0)
			up := randMatrix(rng, dt, inter, hidden, 1)
			down := randMatrix(rng, dt, hidden, inter, 0)
			for _, n := range []int{1, 3, 17} {
				x := randVec(rng, n*hidden, 0)
				// Reference in float64 from the widened weights.
				want := make([]float64, n*hidden)
				mag := make([]float64, n*hidden)
				for i := 0; i < n; i++ {
					gy, _ := refMatVec(gate, x[i*hidden:(i+1)*hidden])
					uy, _ := refMatVec(up, x[i*hidden:(i+1)*hidden])
					h := make([]float32, inter)
					for k := range h {
						h[k] = float32(gy[k] / (1 + math.Exp(-gy[k])) * uy[k])
					}
					dy, dm := refMatVec(down, h)
					copy(want[i*hidden:], dy)
					copy(mag[i*hidden:], dm)
				}
				for _, isa := range isas() {
					for _, p := range pools {
						name := fmt.Sprintf("%s/%dx%d/n%d/%s/t%d", dt, hidden, inter, n, isa, p.Threads())
						withISA(t, isa, func() {
							out, check := guarded(n * hidden)
							scratch := make([]float32, FFNScratchSize(n, inter))
							p.ExpertFFN(out, x, n, gate, up, down, scratch)
							check(t)
							for i := range out {
								if !closeRel(float64(out[i]), want[i], mag[i], 1e-4) {
									t.Fatalf("%s: out[%d]=%g want %g (mag %g)", name, i, out[i], want[i], mag[i])
								}
							}
						})
					}
				}
			}
		}
	}
}
