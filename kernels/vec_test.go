package kernels

import (
	"fmt"
	"math"
	"math/rand/v2"
	"testing"
)

// vecLens are awkward on purpose: empty, below one vector, tails after
// one and several vectors of every width.
var vecLens = []int{0, 1, 7, 8, 15, 16, 17, 31, 33, 63, 64, 65, 100, 257, 2048 + 13}

// ulpClose reports whether got is within k float32 ulps (relative) of want.
func ulpClose(got float32, want float64, k float64) bool {
	if math.IsNaN(want) {
		return got != got
	}
	if math.IsInf(want, 0) {
		return float64(got) == want
	}
	return math.Abs(float64(got)-want) <= k*math.Max(math.Abs(want), 1e-37)*(1.0/(1<<23))
}

func TestVectorKernelsAgainstReference(t *testing.T) {
	rng := rand.New(rand.NewPCG(11, 12))
	for _, isa := range isas() {
		withISA(t, isa, func() {
			for _, n := range vecLens {
				for _, off := range []int{0, 1, 3} {
					name := fmt.Sprintf("%s/n%d/off%d", isa, n, off)
					a, b := randVec(rng, n, off), randVec(rng, n, off+1)
					testVectorKernels(t, name, a, b)
				}
			}
		})
	}
}

func testVectorKernels(t *testing.T, name string, a, b []float32) {
	t.Helper()
	n := len(a)
	var dot, mag, ss float64
	for i := range a {
		dot += float64(a[i]) * float64(b[i])
		mag += math.Abs(float64(a[i]) * float64(b[i]))
		ss += float64(a[i]) * float64(a[i])
	}
	if got := Dot(a, b); !closeRel(float64(got), dot, mag, 1e-6) {
		t.Fatalf("%s Dot=%g want %g", name, got, dot)
	}

	y, check := guarded(n)
	copy(y, b)
	Axpy(y, 0.75, a)
	check(t)
	for i := range y {
		if want := float64(b[i]) + 0.75*float64(a[i]); !closeRel(float64(y[i]), want, math.Abs(float64(b[i]))+math.Abs(0.75*float64(a[i])), 1e-6) {
			t.Fatalf("%s Axpy[%d]=%g want %g", name, i, y[i], want)
		}
	}

	copy(y, a)
	Scale(y, -1.5)
	check(t)
	for i := range y {
		if y[i] != a[i]*-1.5 {
			t.Fatalf("%s Scale[%d]=%g want %g", name, i, y[i], a[i]*-1.5)
		}
	}

	Add(y, a, b)
	check(t)
	for i := range y {
		if y[i] != a[i]+b[i] {
			t.Fatalf("%s Add[%d]=%g want %g", name, i, y[i], a[i]+b[i])
		}
	}

	if n > 0 {
		RMSNorm(y, a, b, 1e-6)
		check(t)
		inv := 1 / math.Sqrt(ss/float64(n)+1e-6)
		for i := range y {
			want := float64(b[i]) * float64(a[i]) * inv
			if !ulpClose(y[i], want, 8) && math.Abs(float64(y[i])-want) > 1e-6 {
				t.Fatalf("%s RMSNorm[%d]=%g want %g", name, i, y[i], want)
			}
		}
	}

	SiLUMul(y, a, b)
	check(t)
	for i := range y {
		g := float64(a[i])
		want := g / (1 + math.Exp(-g)) * float64(b[i])
		if !ulpClose(y[i], want, 8) && math.Abs(float64(y[i])-want) > 1e-30 {
			t.Fatalf("%s SiLUMul[%d]=%g want %g (gate %g)", name, i, y[i], want, g)
		}
	}

	copy(y, a)
	Sigmoid(y)
	check(t)
	for i := range y {
		want := 1 / (1 + math.Exp(-float64(a[i])))
		if !ulpClose(y[i], want, 6) {
			t.Fatalf("%s Sigmoid[%d]=%g want %g", name, i, y[i], want)
		}
	}

	copy(y, a)
	Softmax(y)
	check(t)
	if n > 0 {
		m := math.Inf(-1)
		for _, v := range a {
			m = math.Max(m, float64(v))
		}
		var sum float64
		for _, v := range a {
			sum += math.Exp(float64(v) - m)
		}
		for i := range y {
			want := math.Exp(float64(a[i])-m) / sum
			if !ulpClose(y[i], want, 16) {
				t.Fatalf("%s Softmax[%d]=%g want %g", name, i, y[i], want)
			}
		}
	}
}

// TestExpAccuracy sweeps the exp kernels over the float32 range that
// matters (softmax inputs are <= 0 after max subtraction, sigmoid/SiLU see
// both signs) and bounds the error against math.Exp in ulps.
func TestExpAccuracy(t *testing.T) {
	const n = 1 << 16
	x := make([]float32, n)
	for i := range x {
		x[i] = -100 + 190*float32(i)/n
	}
	x[0], x[1], x[2] = float32(math.Inf(-1)), -1e30, 0
	for _, isa := range isas() {
		withISA(t, isa, func() {
			y := append([]float32(nil), x...)
			impl.expSub(y, 0)
			worst := 0.0
			for i, v := range x {
				want := math.Exp(float64(v))
				if want > math.MaxFloat32 {
					continue
				}
				w32 := float64(float32(want))
				if w32 < 0x1p-126 { // subnormal results: absolute bound
					if math.Abs(float64(y[i])-want) > 0x1p-148 {
						t.Fatalf("%s exp(%g)=%g want %g", isa, v, y[i], want)
					}
					continue
				}
				e := math.Abs(float64(y[i])-want) / (w32 * 0x1p-23)
				worst = math.Max(worst, e)
				if e > 2.5 {
					t.Fatalf("%s exp(%g)=%g want %g (%.2f ulp)", isa, v, y[i], want, e)
				}
			}
			t.Logf("%s: worst %.2f ulp", isa, worst)
		})
	}
}

func TestRoPEInterleaved(t *testing.T) {
	x := []float32{1, 2, 3, 4, 5}
	cos := []float32{0.5, -1}
	sin := []float32{0.25, 0}
	RoPEInterleaved(x, cos, sin)
	want := []float32{1*0.5 - 2*0.25, 1*0.25 + 2*0.5, -3, -4, 5}
	for i := range want {
		if x[i] != want[i] {
			t.Fatalf("x=%v want %v", x, want)
		}
	}
}

func TestTopK(t *testing.T) {
	nan := float32(math.NaN())
	tests := []struct {
		x    []float32
		k    int
		want []int
	}{
		{[]float32{1, 3, 2}, 2, []int{1, 2}},
		{[]float32{5, 5, 5, 1}, 2, []int{0, 1}},        // ties: lower index first
		{[]float32{1, 2, 2, 3}, 3, []int{3, 1, 2}},     // tie inside
		{[]float32{nan, 1, nan, 0}, 3, []int{1, 3, 0}}, // NaN ranks last
		{[]float32{1, 2}, 5, []int{1, 0}},              // k clamped
		{[]float32{1, 2}, 0, []int{}},
		{nil, 2, []int{}},
		{[]float32{-1, -3, -2, 4, -5}, 1, []int{3}},
	}
	dst := make([]int, 0, 8)
	for _, tc := range tests {
		got := TopK(dst, tc.x, tc.k)
		if fmt.Sprint(got) != fmt.Sprint(tc.want) {
			t.Errorf("TopK(%v, %d) = %v, want %v", tc.x, tc.k, got, tc.want)
		}
	}
}

// FuzzVectorKernels checks each SIMD level against the plain one on
// arbitrary finite inputs.
func FuzzVectorKernels(f *testing.F) {
	f.Add([]byte{1, 2, 3, 4, 5, 6, 7, 8}, uint8(0))
	f.Add(make([]byte, 4*70), uint8(3))
	f.Fuzz(func(t *testing.T, data []byte, off uint8) {
		n := len(data) / 8
		a := make([]float32, n+int(off%4))[off%4:]
		b := make([]float32, n)
		for i := 0; i < n; i++ {
			a[i] = clampFinite(math.Float32frombits(le32(data[8*i:])))
			b[i] = clampFinite(math.Float32frombits(le32(data[8*i+4:])))
		}
		type result struct {
			dot      float32
			add, sil []float32
			soft     []float32
		}
		run := func() result {
			r := result{dot: Dot(a, b), add: make([]float32, n), sil: make([]float32, n), soft: append([]float32(nil), a...)}
			Add(r.add, a, b)
			SiLUMul(r.sil, a, b)
			Softmax(r.soft)
			return r
		}
		var ref result
		withISA(t, ISAGeneric, func() { ref = run() })
		var mag float64
		for i := range a {
			mag += math.Abs(float64(a[i]) * float64(b[i]))
		}
		for _, isa := range isas()[1:] {
			withISA(t, isa, func() {
				got := run()
				if !closeRel(float64(got.dot), float64(ref.dot), mag, 1e-5) && !math.IsInf(mag, 0) {
					t.Fatalf("%s Dot %g vs generic %g", isa, got.dot, ref.dot)
				}
				for i := range got.add {
					if got.add[i] != ref.add[i] {
						t.Fatalf("%s Add[%d] %g vs %g", isa, i, got.add[i], ref.add[i])
					}
					if !ulpClose(got.sil[i], float64(ref.sil[i]), 8) && math.Abs(float64(got.sil[i]-ref.sil[i])) > 1e-30 {
						t.Fatalf("%s SiLUMul[%d] %g vs %g (gate %g up %g)", isa, i, got.sil[i], ref.sil[i], a[i], b[i])
					}
					if !ulpClose(got.soft[i], float64(ref.soft[i]), 16) && math.Abs(float64(got.soft[i]-ref.soft[i])) > 1e-37 {
						t.Fatalf("%s Softmax[%d] %g vs %g", isa, i, got.soft[i], ref.soft[i])
					}
				}
			})
		}
	})
}

func le32(b []byte) uint32 {
	return uint32(b[0]) | uint32(b[1])<<8 | uint32(b[2])<<16 | uint32(b[3])<<24
}

// clampFinite maps NaN/Inf to 0 and keeps magnitudes where products stay
// finite.
func clampFinite(v float32) float32 {
	if v != v || math.IsInf(float64(v), 0) || math.Abs(float64(v)) > 1e15 {
		return 0
	}
	return v
}

// TestExpEdges: overflow, underflow and infinities as math.Exp rounded to
// float32, at every level.
func TestExpEdges(t *testing.T) {
	in := []float32{89, 88.8, 88.7, -87, -104, -150, float32(math.Inf(1)), float32(math.Inf(-1)), 0}
	for _, isa := range isas() {
		withISA(t, isa, func() {
			x := make([]float32, 32) // one full vector plus a tail
			for i := range x {
				x[i] = in[i%len(in)]
			}
			y := append([]float32(nil), x...)
			impl.expSub(y, 0)
			for i, v := range x {
				want := float32(math.Exp(float64(v)))
				if !ulpClose(y[i], float64(want), 2) && !(want < 0x1p-126 && math.Abs(float64(y[i]-want)) <= 0x1p-148) {
					t.Fatalf("%s exp(%g) = %g, want %g", isa, v, y[i], want)
				}
			}
		})
	}
}
