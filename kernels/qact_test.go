package kernels

import (
	"fmt"
	"math"
	"math/rand/v2"
	"testing"
)

// qPaths runs f once per integer-activation kernel this machine can run:
// every ISA level, and at each SIMD level with and without the VNNI
// instructions it would use (the non-VNNI twins are what CPUs without
// them run).
func qPaths(t testing.TB, f func(name string)) {
	t.Helper()
	for _, isa := range isas() {
		for _, v := range qVariants() {
			if isa == ISAGeneric && v.name != "" {
				continue
			}
			restore := v.set()
			withISA(t, isa, func() { f(isa.String() + v.name) })
			restore()
		}
	}
}

// randQMatrix is a random Q8_0 (with integer activations) or Q4_0 matrix
// whose Data starts off bytes into its backing array.
func randQMatrix(rng *rand.Rand, dt DType, rows, cols, off int) *Matrix {
	size := rows * cols
	if dt == Q4_0 {
		size /= 2
	}
	buf := make([]byte, size+off)
	m := &Matrix{DType: dt, Rows: rows, Cols: cols, Data: buf[off:], ActQ8: dt == Q8_0}
	for i := range m.Data {
		m.Data[i] = byte(rng.IntN(256))
	}
	m.Scales = make([]float32, rows*cols/32)
	for i := range m.Scales {
		m.Scales[i] = float32(rng.Float64()*0.02 + 0.001)
	}
	return m
}

// refQDot is the float64 value of the integer-activation product and the
// sum of the magnitudes of its block terms.
func refQDot(w *Matrix, x []float32) (y, mag []float64) {
	q := make([]int8, len(x))
	d := make([]float32, len(x)/32)
	QuantizeAct(q, d, x)
	nb := w.Cols / 32
	y, mag = make([]float64, w.Rows), make([]float64, w.Rows)
	for r := 0; r < w.Rows; r++ {
		for b := 0; b < nb; b++ {
			var acc int64
			for j := 0; j < 32; j++ {
				c := b*32 + j
				var wv int64
				if w.DType == Q4_0 {
					wv = int64(q4At(w.Data[r*w.Cols/2:], c)) - 8
				} else {
					wv = int64(int8(w.Data[r*w.Cols+c]))
				}
				acc += wv * int64(q[c])
			}
			t := float64(w.Scales[r*nb+b]) * float64(d[b]) * float64(acc)
			y[r] += t
			mag[r] += math.Abs(t)
		}
	}
	return y, mag
}

// qCols covers block counts around the zmm (16) and ymm (8) groups and
// the model's shapes (44 blocks: 1408 columns; 342: 10944).
var qCols = []int{32, 64, 96, 224, 256, 288, 480, 512, 544, 992, 1024, 1408, 2048, 10944}

func TestQuantizeAct(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	x := randVec(rng, 256, 0)
	x[5] = 0.5 // exact tie after scaling below
	for i := 32; i < 64; i++ {
		x[i] = 0 // an all-zero block
	}
	x[64], x[65] = 127, 0.5 // d = 1: 0.5 rounds to 0 (ties to even)
	for i := 66; i < 96; i++ {
		x[i] = 1.5
	}
	q := make([]int8, len(x))
	d := make([]float32, len(x)/32)
	QuantizeAct(q, d, x)
	if d[1] != 0 {
		t.Fatalf("zero block: d=%g", d[1])
	}
	if d[2] != 1 || q[64] != 127 || q[65] != 0 || q[66] != 2 {
		t.Fatalf("block 2: d=%g q=%v, want 1 [127 0 2 ...]", d[2], q[64:67])
	}
	for b := range d {
		for j := 0; j < 32; j++ {
			v, qq := x[b*32+j], q[b*32+j]
			if qq < -127 || math.Abs(float64(v)-float64(d[b])*float64(qq)) > float64(d[b])/2*1.0001 {
				t.Fatalf("x[%d]=%g rounds to %d·%g", b*32+j, v, qq, d[b])
			}
		}
	}
}

func TestQDotMatchesReference(t *testing.T) {
	rng := rand.New(rand.NewPCG(5, 6))
	pools := []*Pool{NewPool(1), NewPool(3)}
	defer func() {
		for _, p := range pools {
			p.Close()
		}
	}()
	old := guidedMinBytes
	guidedMinBytes = 1 // split even small products across threads
	defer func() { guidedMinBytes = old }()
	for _, dt := range []DType{Q8_0, Q4_0} {
		for _, cols := range qCols {
			for _, rows := range []int{1, 3, 33, 70} {
				if rows*cols > 1<<20 {
					continue
				}
				w := randQMatrix(rng, dt, rows, cols, 1+rows%3)
				if err := w.Validate(); err != nil {
					t.Fatal(err)
				}
				x := randVec(rng, cols, 1)
				want, mag := refQDot(w, x)
				qPaths(t, func(path string) {
					for _, p := range pools {
						name := fmt.Sprintf("%s/%dx%d/%s/t%d", dt, rows, cols, path, p.Threads())
						y, check := guarded(rows)
						p.MatVec(y, w, x)
						check(t)
						for r := range y {
							if !closeRel(float64(y[r]), want[r], mag[r], 1e-5) {
								t.Fatalf("%s: y[%d]=%g want %g (mag %g)", name, r, y[r], want[r], mag[r])
							}
						}
					}
				})
			}
		}
	}
}

// TestQMatMulEqualsMatVec: prefill (MatMul over many rows) and decode
// (MatVec, MatVecMany) round and sum exactly alike, on every path.
func TestQMatMulEqualsMatVec(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 8))
	p := NewPool(2)
	defer p.Close()
	for _, dt := range []DType{Q8_0, Q4_0} {
		for _, sh := range [][2]int{{70, 544}, {130, 1408}, {33, 2048}} {
			rows, cols := sh[0], sh[1]
			w := randQMatrix(rng, dt, rows, cols, 0)
			w2 := randQMatrix(rng, dt, 40, cols, 3)
			const n = 37
			x := randVec(rng, n*cols, 0)
			qPaths(t, func(path string) {
				got, check := guarded(n * rows)
				p.MatMul(got, w, x, n)
				check(t)
				one := make([]float32, rows)
				one2 := make([]float32, w2.Rows)
				bf := randMatrix(rng, BF16, 20, cols, 0) // a float product in the same call
				yb := make([]float32, 20)
				for i := 0; i < n; i++ {
					xi := x[i*cols : (i+1)*cols]
					p.MatVec(one, w, xi)
					for r := range one {
						if one[r] != got[i*rows+r] {
							t.Fatalf("%s %s %dx%d: MatMul row %d y[%d]=%g, MatVec %g", dt, path, rows, cols, i, r, got[i*rows+r], one[r])
						}
					}
					// Two products sharing x (rounded once) beside a float one.
					clear(one)
					p.MatVecMany([][]float32{one, yb, one2}, []*Matrix{w, bf, w2}, [][]float32{xi, xi, xi})
					for r := range one {
						if one[r] != got[i*rows+r] {
							t.Fatalf("%s %s: MatVecMany row %d y[%d]=%g, MatMul %g", dt, path, i, r, one[r], got[i*rows+r])
						}
					}
					ref := make([]float32, w2.Rows)
					p.MatVec(ref, w2, xi)
					for r := range ref {
						if ref[r] != one2[r] {
							t.Fatalf("%s %s: shared input product y[%d]=%g, alone %g", dt, path, r, one2[r], ref[r])
						}
					}
				}
			})
		}
	}
}

// TestQExpertFFN: the fused expert on integer-activation weights equals
// its three products composed by hand.
func TestQExpertFFN(t *testing.T) {
	rng := rand.New(rand.NewPCG(9, 10))
	p := NewPool(2)
	defer p.Close()
	const hidden, inter = 288, 160
	for _, dt := range []DType{Q8_0, Q4_0} {
		gate := randQMatrix(rng, dt, inter, hidden, 0)
		up := randQMatrix(rng, dt, inter, hidden, 0)
		down := randQMatrix(rng, dt, hidden, inter, 0)
		for _, n := range []int{1, 5, 40} {
			x := randVec(rng, n*hidden, 0)
			qPaths(t, func(path string) {
				out := make([]float32, n*hidden)
				p.ExpertFFN(out, x, n, gate, up, down, make([]float32, FFNScratchSize(n, inter)))
				g, u, want := make([]float32, n*inter), make([]float32, n*inter), make([]float32, n*hidden)
				p.MatMul(g, gate, x, n)
				p.MatMul(u, up, x, n)
				SiLUMul(g, g, u)
				p.MatMul(want, down, g, n)
				for i := range out {
					if out[i] != want[i] {
						t.Fatalf("%s %s n=%d: out[%d]=%g want %g", dt, path, n, i, out[i], want[i])
					}
				}
			})
		}
	}
}

func TestQuantizeQ4(t *testing.T) {
	rng := rand.New(rand.NewPCG(11, 12))
	m := randMatrix(rng, F32, 5, 96, 0)
	q, err := QuantizeQ4(m)
	if err != nil {
		t.Fatal(err)
	}
	if err := q.Validate(); err != nil {
		t.Fatal(err)
	}
	a, b := make([]float32, 96), make([]float32, 96)
	for r := 0; r < 5; r++ {
		m.RowF32(a, r)
		q.RowF32(b, r)
		for blk := 0; blk < 3; blk++ {
			d := math.Abs(float64(q.Scales[r*3+blk]))
			for j := blk * 32; j < (blk+1)*32; j++ {
				// The value of largest magnitude is exact (q = 0 · -8);
				// others are within half a step, or clipped at +7.
				clipped := a[j]*b[j] > 0 && math.Abs(float64(a[j])) > math.Abs(float64(b[j]))
				if e := math.Abs(float64(a[j] - b[j])); e > d/2*1.0001 && !clipped {
					t.Fatalf("row %d col %d: %g -> %g (step %g)", r, j, a[j], b[j], d)
				}
			}
		}
	}
}

// TestQuantActPaths: the SIMD rounding of activations equals the plain
// one bit for bit: random blocks, ties, zero blocks, huge and tiny values.
func TestQuantActPaths(t *testing.T) {
	rng := rand.New(rand.NewPCG(31, 32))
	const nb = 300 // more than one chunk of quantRows
	x := randVec(rng, nb*32, 0)
	for i := 32; i < 64; i++ {
		x[i] = 0
	}
	for i := 64; i < 96; i++ {
		x[i] = float32(i-80) * 0.5 // halves: ties once scaled
	}
	x[64] = 127
	for i := 96; i < 128; i++ {
		x[i] = float32(rng.NormFloat64()) * 1e-38 // subnormal scales
	}
	for i := 128; i < 160; i++ {
		x[i] = float32(rng.NormFloat64()) * 3e37
	}
	wq, wd, ws := make([]int8, len(x)), make([]float32, nb), make([]int32, nb)
	quantGeneric(wq, wd, ws, x)
	for _, isa := range isas() {
		withISA(t, isa, func() {
			q, d, s := make([]int8, len(x)), make([]float32, nb), make([]int32, nb)
			quantBlocks(q, d, s, x)
			for b := 0; b < nb; b++ {
				if d[b] != wd[b] || s[b] != ws[b] {
					t.Fatalf("%s block %d: d=%g sum=%d, plain %g %d", isa, b, d[b], s[b], wd[b], ws[b])
				}
			}
			for i := range q {
				if q[i] != wq[i] {
					t.Fatalf("%s x[%d]=%g: q=%d, plain %d", isa, i, x[i], q[i], wq[i])
				}
			}
		})
	}
}
