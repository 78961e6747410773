//go:build amd64 && !purego

package kernels

import (
	"encoding/binary"
	"fmt"
	"math"
	"math/rand/v2"
	"testing"
)

// withSplit runs f with the split AMX path on from every batch size (on)
// or off, restoring both afterwards.
func withSplit(t testing.TB, on bool, f func()) {
	t.Helper()
	withAMXFrom(t, on, &amxSplitMinN, f)
}

// exactTol: the float32 products' bound, amxTol: K*2^-24 * sum|w*x|
// against the float64 reference (closeRel adds 1e-30), for a sum of K
// exact products in any order.
func exactTol(cols int) float64 { return amxTol(cols) }

// splitTol: the split path sums 3K exact products (w·hi, w·lo, w·lo2,
// whose magnitudes add up to |w*x|) in float32, so its bound is that of 3K
// terms.
func splitTol(cols int) float64 { return exactTol(3 * cols) }

// TestSplitBF16 checks the three-part split, the assembly's and Go's: the
// parts are bf16 values whose sum is x exactly, and the maximum is |x|'s
// largest bits.
func TestSplitBF16(t *testing.T) {
	rng := rand.New(rand.NewPCG(51, 52))
	special := []float32{0, float32(math.Copysign(0, -1)), 1, -1, 0x1p-126, -0x1p-127, 0x1p-149, math.MaxFloat32, -math.MaxFloat32,
		math.SmallestNonzeroFloat32 * 3, 1 + 0x1p-23, -(1 + 0x1p-23), 3.1415927, 0x1.fffffep-100, 65504, 1e-20}
	for _, cols := range []int{1, 2, 31, 32, 33, 64, 95, 96, 128, 200} {
		x := make([]float32, cols)
		for i := range x {
			if i < len(special) && rng.IntN(2) == 0 {
				x[i] = special[i]
			} else {
				x[i] = float32(rng.NormFloat64() * math.Pow(2, float64(rng.IntN(60)-30)))
			}
		}
		d := make([]uint16, splitRowLen(cols)+8)
		for i := range d {
			d[i] = 0xdead
		}
		row := d[:splitRowLen(cols)]
		m := amxSplitRowScaled(row, x, 1)
		var want uint32
		for c, v := range x {
			want = max(want, math.Float32bits(v)&0x7fffffff)
			s, j := c/32, c%32
			hi, lo, lo2 := row[96*s+j], row[96*s+32+j], row[96*s+64+j]
			ghi, glo, glo2 := splitBF16(v)
			if hi != ghi || lo != glo || lo2 != glo2 {
				t.Fatalf("cols %d x[%d]=%g: asm %04x %04x %04x, Go %04x %04x %04x", cols, c, v, hi, lo, lo2, ghi, glo, glo2)
			}
			sum := float64(BF16ToF32(hi)) + float64(BF16ToF32(lo)) + float64(BF16ToF32(lo2))
			// Exact while lo2 is a bf16 value: its lowest bit, |x|'s
			// ulp, at or above bf16's smallest subnormal (2^-133).
			tol := 0.0
			if math.Abs(float64(v)) < 0x1p-110 {
				tol = 0x1p-133
			}
			if math.Abs(sum-float64(v)) > tol || math.Signbit(float64(v)) != math.Signbit(float64(BF16ToF32(hi))) {
				t.Fatalf("cols %d x[%d]=%g (%08x): parts %04x %04x %04x sum to %g", cols, c, v, math.Float32bits(v), hi, lo, lo2, sum)
			}
		}
		if m != want {
			t.Fatalf("cols %d: max bits %08x, want %08x", cols, m, want)
		}
		// Padding of the last step is zero; nothing past the row written.
		for c := cols; c < 32*splitSteps(cols); c++ {
			s, j := c/32, c%32
			if row[96*s+j]|row[96*s+32+j]|row[96*s+64+j] != 0 {
				t.Fatalf("cols %d: padding at %d not zero", cols, c)
			}
		}
		for _, v := range d[len(row):] {
			if v != 0xdead {
				t.Fatalf("cols %d: wrote past the row", cols)
			}
		}
	}
}

// TestMatMulSplitAMX compares the split AMX path with the float32 FMA
// kernels (the same call with AMX off) and the plain twin
// (matMulRowsPlain), all against a float64 reference, for batch, row and
// column tails (tile rows and columns below 16, 16-pair tails of K, odd
// columns), 1-3 threads (bit-identical to each other), and MatMul and
// MatMulMany (inputs shared by two products, a product of one row;
// bit-identical to MatMul), in both forms (forSplitForms).
func TestMatMulSplitAMX(t *testing.T) { forSplitForms(t, testMatMulSplitAMX) }

func testMatMulSplitAMX(t *testing.T) {
	if ok, why := AMXAvailable(); !ok {
		t.Skip("AMX unavailable: " + why)
	}
	rng := rand.New(rand.NewPCG(53, 54))
	pools := []*Pool{NewPool(1), NewPool(2), NewPool(3)}
	defer func() {
		for _, p := range pools {
			p.Close()
		}
	}()
	shapes := [][2]int{{33, 64}, {48, 97}, {17, 31}, {70, 160}, {16, 40}, {100, 33}, {5, 2}, {64, 1024}, {40, 1}, {150, 64}}
	var ns []int
	for n := 1; n <= 40; n++ {
		ns = append(ns, n)
	}
	ns = append(ns, 47, 100, 512)
	for si, sh := range shapes {
		rows, cols := sh[0], sh[1]
		w := randMatrix(rng, BF16, rows, cols, 2*(si%2))
		w2 := randMatrix(rng, BF16, rows+3, cols, 0)
		scratch := make([]float32, matMulScratch(cols))
		for _, n := range ns {
			if n == 512 && cols > 160 {
				continue
			}
			x := randVec(rng, n*cols, si%2)
			want, mag := refMatMul(w, x, n, false)
			want2, mag2 := refMatMul(w2, x, n, false)
			plain := make([]float32, n*rows)
			matMulRowsPlain(plain, w, x, n, 0, rows, scratch, false)
			check := func(what string, y []float32, want, mag []float64) {
				t.Helper()
				for i := range y {
					if !closeRel(float64(y[i]), want[i], mag[i], splitTol(cols)) {
						t.Fatalf("%s %dx%d n=%d: y[%d]=%g want %g (sum|w*x| %g)", what, rows, cols, n, i, y[i], want[i], mag[i])
					}
				}
			}
			check("plain", plain, want, mag)
			var first []float32 // the split path on one thread
			for _, p := range pools {
				name := fmt.Sprintf("t%d", p.Threads())
				yFMA, checkFMA := guarded(n * rows)
				withSplit(t, false, func() { p.MatMul(yFMA, w, x, n) })
				checkFMA(t)
				check("FMA "+name, yFMA, want, mag)
				yAMX, checkAMX := guarded(n * rows)
				withSplit(t, true, func() { p.MatMul(yAMX, w, x, n) })
				checkAMX(t)
				check("split AMX "+name, yAMX, want, mag)
				// Which thread computes a row never changes its value.
				if first == nil {
					first = yAMX
				}
				for i := range yAMX {
					if math.Float32bits(yAMX[i]) != math.Float32bits(first[i]) {
						t.Fatalf("split AMX %s %dx%d n=%d: y[%d]=%g, one thread %g", name, rows, cols, n, i, yAMX[i], first[i])
					}
				}
				for i := range yAMX {
					if !closeRel(float64(yAMX[i]), float64(yFMA[i]), mag[i], exactTol(cols)+splitTol(cols)) {
						t.Fatalf("split/FMA %s %dx%d n=%d: y[%d] %g vs %g", name, rows, cols, n, i, yAMX[i], yFMA[i])
					}
				}
				// MatMulMany: w and w2 share x (one split), w again on
				// its first row alone (FMA kernels).
				ya, ca := guarded(n * rows)
				yb, cb := guarded(n * (rows + 3))
				yc, cc := guarded(rows)
				withSplit(t, true, func() {
					amxSplitMinN = 2
					p.MatMulMany([][]float32{ya, yb, yc}, []*Matrix{w, w2, w}, [][]float32{x, x, x[:cols]}, []int{n, n, 1})
				})
				ca(t)
				cb(t)
				cc(t)
				check("MatMulMany split "+name, ya, want, mag)
				for i := range ya {
					if n >= 2 && math.Float32bits(ya[i]) != math.Float32bits(yAMX[i]) {
						t.Fatalf("MatMulMany %s %dx%d n=%d: y[%d]=%g, MatMul %g", name, rows, cols, n, i, ya[i], yAMX[i])
					}
				}
				check("MatMulMany split (w2) "+name, yb, want2, mag2)
				check("MatMulMany one row "+name, yc, want[:rows], mag[:rows])
			}
		}
	}
}

// TestExpertFFNSplitAMX: ExpertFFN with the split path against the FMA
// kernels (gate and up, then down, each split once), in both forms.
func TestExpertFFNSplitAMX(t *testing.T) { forSplitForms(t, testExpertFFNSplitAMX) }

func testExpertFFNSplitAMX(t *testing.T) {
	if ok, why := AMXAvailable(); !ok {
		t.Skip("AMX unavailable: " + why)
	}
	rng := rand.New(rand.NewPCG(55, 56))
	p := NewPool(2)
	defer p.Close()
	const hidden, inter = 96, 80
	gate := randMatrix(rng, BF16, inter, hidden, 0)
	up := randMatrix(rng, BF16, inter, hidden, 0)
	down := randMatrix(rng, BF16, hidden, inter, 0)
	for _, n := range []int{1, 16, 17, 33, 64} {
		x := randVec(rng, n*hidden, 0)
		ref := make([]float32, n*hidden)
		got := make([]float32, n*hidden)
		scratch := make([]float32, FFNScratchSize(n, inter))
		withSplit(t, false, func() { p.ExpertFFN(ref, x, n, gate, up, down, scratch) })
		// The reference of down's input is the FMA path's h (g·u): the
		// bound is that of down's product over it, plus gate's and up's
		// deviations carried through (both within 2^-24*K relative).
		h := scratch[:n*inter]
		_, mag := refMatMul(down, h, n, false)
		withSplit(t, true, func() { p.ExpertFFN(got, x, n, gate, up, down, scratch) })
		for i := range got {
			if !closeRel(float64(got[i]), float64(ref[i]), 4*mag[i], 2*splitTol(hidden+inter)) {
				t.Fatalf("n=%d: out[%d] split %g, FMA %g", n, i, got[i], ref[i])
			}
		}
	}
}

// TestMatMulSplitAMXSpecial: subnormal, tiny and huge activations, signed
// zeros, Inf and NaN. Finite inputs stay within the float32 bound of the
// float64 reference (rows of tiny values are scaled, so their outputs keep
// full relative precision); any Inf or NaN in x makes the call take the
// FMA kernels, so the outputs equal theirs bit for bit. Both forms, with
// an odd (packed form only) and an even column count.
func TestMatMulSplitAMXSpecial(t *testing.T) {
	forSplitForms(t, func(t *testing.T) {
		for _, cols := range []int{97, 98} {
			testMatMulSplitAMXSpecial(t, cols)
		}
	})
}

func testMatMulSplitAMXSpecial(t *testing.T, cols int) {
	if ok, why := AMXAvailable(); !ok {
		t.Skip("AMX unavailable: " + why)
	}
	rng := rand.New(rand.NewPCG(57, 58))
	p := NewPool(2)
	defer p.Close()
	const rows, n = 40, 37
	w := randMatrix(rng, BF16, rows, cols, 0)
	finite := []struct {
		name string
		mod  func(x []float32)
	}{
		{"subnormal", func(x []float32) {
			for i := range x {
				if rng.IntN(4) == 0 {
					x[i] = float32(rng.NormFloat64() * 0x1p-135)
				}
			}
		}},
		{"tiny rows", func(x []float32) {
			for i := 3 * cols; i < 6*cols; i++ {
				x[i] *= 0x1p-100 // normal, but their parts would not be
			}
			for i := 7 * cols; i < 8*cols; i++ {
				x[i] = float32(rng.NormFloat64() * 0x1p-140) // all subnormal
			}
		}},
		{"mixed range", func(x []float32) {
			for i := range x {
				x[i] *= float32(math.Ldexp(1, rng.IntN(200)-100))
			}
		}},
		{"huge", func(x []float32) {
			for i := range x {
				x[i] *= 0x1p100
			}
		}},
		{"signed zeros", func(x []float32) {
			for i := range x {
				if rng.IntN(3) == 0 {
					x[i] = float32(math.Copysign(0, -1))
				}
			}
			for i := 9 * cols; i < 10*cols; i++ {
				x[i] = float32(math.Copysign(0, -1))
			}
		}},
	}
	for _, c := range finite {
		name := c.name
		x := randVec(rng, n*cols, 0)
		c.mod(x)
		want, mag := refMatMul(w, x, n, false)
		y := make([]float32, n*rows)
		withSplit(t, true, func() { p.MatMul(y, w, x, n) })
		for i := range y {
			// Relative, with no absolute slack beyond the rounding of a
			// subnormal result (2^-150 a step on any path).
			if math.Abs(float64(y[i])-want[i]) > splitTol(cols)*mag[i]+float64(cols)*0x1p-149 {
				t.Fatalf("%s: y[%d]=%g want %g (sum|w*x| %g)", name, i, y[i], want[i], mag[i])
			}
		}
		if name == "signed zeros" {
			for r := 0; r < rows; r++ {
				if v := y[9*rows+r]; v != 0 || math.Signbit(float64(v)) {
					t.Fatalf("all -0 row: y[%d]=%g, want +0 as the FMA kernels", r, v)
				}
			}
		}
	}
	for _, v := range []float32{float32(math.Inf(1)), float32(math.Inf(-1)), float32(math.NaN())} {
		x := randVec(rng, n*cols, 0)
		x[5*cols+rng.IntN(cols)] = v
		yFMA := make([]float32, n*rows)
		ySplit := make([]float32, n*rows)
		withSplit(t, false, func() { p.MatMul(yFMA, w, x, n) })
		withSplit(t, true, func() { p.MatMul(ySplit, w, x, n) })
		for i := range yFMA {
			if math.Float32bits(yFMA[i]) != math.Float32bits(ySplit[i]) {
				t.Fatalf("x with %g: y[%d] split %g, FMA %g", v, i, ySplit[i], yFMA[i])
			}
		}
		// MatMulMany: the product over the non-finite x falls back, a
		// product over a finite x beside it keeps the split path.
		x2 := randVec(rng, n*cols, 0)
		want2, mag2 := refMatMul(w, x2, n, false)
		ya, yb := make([]float32, n*rows), make([]float32, n*rows)
		withSplit(t, true, func() {
			p.MatMulMany([][]float32{ya, yb}, []*Matrix{w, w}, [][]float32{x, x2}, []int{n, n})
		})
		for i := range ya {
			if math.Float32bits(yFMA[i]) != math.Float32bits(ya[i]) {
				t.Fatalf("MatMulMany x with %g: y[%d] %g, FMA %g", v, i, ya[i], yFMA[i])
			}
			if !closeRel(float64(yb[i]), want2[i], mag2[i], splitTol(cols)) {
				t.Fatalf("MatMulMany finite x beside %g: y[%d]=%g want %g", v, i, yb[i], want2[i])
			}
		}
	}
	// Inf and NaN weights (which Matrix assumes absent) reach non-finite
	// outputs where the FMA kernels' are: NaN, or the same Inf, or NaN for
	// Inf (a zero part of x times Inf).
	w2 := randMatrix(rng, BF16, rows, cols, 0)
	put := func(r, c int, v uint16) { binary.LittleEndian.PutUint16(w2.Data[2*(r*cols+c):], v) }
	put(3, 5, 0x7f80)
	put(7, 90, 0xff80)
	put(11, 0, 0x7fc0)
	x := randVec(rng, n*cols, 0)
	yFMA := make([]float32, n*rows)
	ySplit := make([]float32, n*rows)
	withSplit(t, false, func() { p.MatMul(yFMA, w2, x, n) })
	withSplit(t, true, func() { p.MatMul(ySplit, w2, x, n) })
	_, mag := refMatMul(w2, x, n, false)
	for i := range yFMA {
		a, b := float64(ySplit[i]), float64(yFMA[i])
		if math.IsNaN(b) || math.IsInf(b, 0) {
			if !math.IsNaN(a) && a != b {
				t.Fatalf("Inf/NaN weights: y[%d] split %g, FMA %g", i, a, b)
			}
			continue
		}
		if !closeRel(a, b, mag[i], exactTol(cols)+splitTol(cols)) {
			t.Fatalf("y[%d] split %g, FMA %g", i, a, b)
		}
	}
}
