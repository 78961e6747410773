//go:build amd64 && !purego

package kernels

import (
	"math"
	"math/rand/v2"
	"testing"
)

// splitForms: the two forms of the split path, by the waMaxN each needs:
// packed (W packed into B tiles, every batch) and transposed (W as the A
// tiles, every batch with an even column count).
var splitForms = []struct {
	name string
	maxN int
}{{"packed", 0}, {"wa", 1 << 30}}

// withWAMax runs f with waMaxN = maxN and waMaxNK unbounded, restoring
// both afterwards.
func withWAMax(maxN int, f func()) {
	was, wasNK := waMaxN, waMaxNK
	defer func() { waMaxN, waMaxNK = was, wasNK }()
	waMaxN, waMaxNK = maxN, 1<<62
	f()
}

// forSplitForms runs f as a subtest in each form of the split path.
func forSplitForms(t *testing.T, f func(t *testing.T)) {
	for _, form := range splitForms {
		t.Run(form.name, func(t *testing.T) { withWAMax(form.maxN, func() { f(t) }) })
	}
}

// TestSplitBF16T checks the transposed layout of the split (splitRowsT
// over blocks of 1-16 rows): each row's
// parts (those of splitBF16) land as bf16 pairs in pair row q of their
// part and step, column i, the tail step's pair rows past the last pair
// and everything past the layout untouched, and the maximum is |x|'s
// largest bits; scaled rows split x*scale.
func TestSplitBF16T(t *testing.T) {
	rng := rand.New(rand.NewPCG(61, 62))
	const guard = 0xdeadbeef
	for _, n := range []int{1, 3, 8, 16, 17, 40} {
		for _, cols := range []int{2, 30, 32, 34, 64, 96, 200, 290} {
			rl := splitRowLen(cols)
			buf := make([]uint32, n*rl/2+16)
			for i := range buf {
				buf[i] = guard
			}
			lay := buf[:n*rl/2]
			x := randVec(rng, n*cols, 0)
			scale := float32(1)
			if n == 3 {
				scale = 0x1p40
				for i := range x {
					x[i] *= 0x1p-40
				}
			}
			// Blocks of 1-16 rows, as the split job's ranges give them.
			mx := make([]uint32, n)
			for b0 := 0; b0 < n; {
				b1 := min(n, b0+1+rng.IntN(16))
				splitRowsT(lay, n, cols, x, b0, b1, scale, mx[b0:b1])
				b0 = b1
			}
			for i := 0; i < n; i++ {
				var want uint32
				for _, v := range x[i*cols : (i+1)*cols] {
					want = max(want, math.Float32bits(v*scale)&0x7fffffff)
				}
				if mx[i] != want {
					t.Fatalf("n %d cols %d row %d: max bits %08x, want %08x", n, cols, i, mx[i], want)
				}
			}
			kp := cols / 2
			for i := 0; i < n; i++ {
				for c := 0; c < cols; c++ {
					s, q := c/32, (c%32)/2
					hi, lo, lo2 := splitBF16(x[i*cols+c] * scale)
					for p, want := range []uint16{hi, lo, lo2} {
						got := uint16(lay[(3*s+p)*16*n+q*n+i] >> (16 * (c % 2)))
						if got != want {
							t.Fatalf("n %d cols %d x[%d][%d]: part %d %04x, want %04x", n, cols, i, c, p, got, want)
						}
					}
				}
			}
			// Pair rows past the tail step's pairs: untouched.
			if kt := kp % 16; kt > 0 {
				s := kp / 16
				for p := 0; p < 3; p++ {
					for q := kt; q < 16; q++ {
						for i := 0; i < n; i++ {
							if v := lay[(3*s+p)*16*n+q*n+i]; v != guard {
								t.Fatalf("n %d cols %d: pair row %d of the tail written (%08x)", n, cols, q, v)
							}
						}
					}
				}
			}
			for _, v := range buf[len(lay):] {
				if v != guard {
					t.Fatalf("n %d cols %d: wrote past the layout", n, cols)
				}
			}
		}
	}
}

// TestMatMulWAForms: the two forms of the split path on the same inputs
// (shapes with W row, x row and K tails, odd columns staying packed, x
// blocks and W groups of the transposed form), each within the split's
// bound of the float64 reference and of each other, 1 and 2 threads
// bit-identical within a form; and the default choice (waMaxN) gives the
// form it names.
func TestMatMulWAForms(t *testing.T) {
	if ok, why := AMXAvailable(); !ok {
		t.Skip("AMX unavailable: " + why)
	}
	rng := rand.New(rand.NewPCG(63, 64))
	pools := []*Pool{NewPool(1), NewPool(2)}
	defer func() {
		for _, p := range pools {
			p.Close()
		}
	}()
	was := waGroupRows
	defer func() { waGroupRows = was }()
	waGroupRows = 64 // several groups in the 200-row shape
	for _, sh := range [][2]int{{200, 64}, {31, 2048}, {17, 50}, {48, 96}, {33, 61}} {
		rows, cols := sh[0], sh[1]
		w := randMatrix(rng, BF16, rows, cols, 0)
		for _, n := range []int{8, 15, 32, 33, 65, 130} {
			x := randVec(rng, n*cols, 0)
			want, mag := refMatMul(w, x, n, false)
			var got [2][]float32
			for f, form := range splitForms {
				var first []float32
				for _, p := range pools {
					y, check := guarded(n * rows)
					withWAMax(form.maxN, func() {
						withSplit(t, true, func() { p.MatMul(y, w, x, n) })
					})
					check(t)
					for i := range y {
						if !closeRel(float64(y[i]), want[i], mag[i], splitTol(cols)) {
							t.Fatalf("%s t%d %dx%d n=%d: y[%d]=%g want %g", form.name, p.Threads(), rows, cols, n, i, y[i], want[i])
						}
					}
					if first == nil {
						first = y
					}
					for i := range y {
						if math.Float32bits(y[i]) != math.Float32bits(first[i]) {
							t.Fatalf("%s t%d %dx%d n=%d: y[%d]=%g, one thread %g", form.name, p.Threads(), rows, cols, n, i, y[i], first[i])
						}
					}
				}
				got[f] = first
			}
			// TDPBF16PS adds the same products (w·part is x·w) in the
			// same order of pairs and steps with either operand as A,
			// so the two forms agree bit for bit.
			for i := range got[0] {
				if math.Float32bits(got[1][i]) != math.Float32bits(got[0][i]) {
					t.Fatalf("%dx%d n=%d: y[%d] wa %g, packed %g", rows, cols, n, i, got[1][i], got[0][i])
				}
			}
			// The default threshold picks one of the two, bit for bit.
			y := make([]float32, n*rows)
			withSplit(t, true, func() { pools[1].MatMul(y, w, x, n) })
			f := 0
			if waLayout(n, cols) {
				f = 1
			}
			for i := range y {
				if math.Float32bits(y[i]) != math.Float32bits(got[f][i]) {
					t.Fatalf("%dx%d n=%d default: y[%d]=%g, %s %g", rows, cols, n, i, y[i], splitForms[f].name, got[f][i])
				}
			}
		}
	}
}

// TestSplitChoice: which products take the split path, and in which form,
// at the default thresholds: the transposed form from waMinN rows (even
// columns, up to waMaxN rows and waMaxNK values), the packed form from
// amxSplitMinN (odd columns, larger batches), the FMA kernels below.
func TestSplitChoice(t *testing.T) {
	if ok, why := AMXAvailable(); !ok {
		t.Skip("AMX unavailable: " + why)
	}
	if impl.isa < ISAAVX512 {
		t.Skip("no AVX-512")
	}
	was := amxOn
	defer func() { amxOn = was }()
	amxOn = true
	for _, c := range []struct {
		n, cols   int
		split, wa bool
	}{
		{5, 2048, false, true}, {6, 2048, true, true}, {8, 2048, true, true}, {64, 2048, true, true},
		{65, 2048, true, false}, {512, 2048, true, false}, {6, 2047, false, false}, {8, 2047, true, false},
		{32, 10944, true, true}, {47, 10944, true, true}, {48, 10944, true, false}, {6, 16, false, true},
	} {
		w := &Matrix{DType: BF16, Rows: 32, Cols: c.cols}
		if got := splitUsed(w, c.n); got != c.split {
			t.Errorf("n=%d cols=%d: split %v, want %v", c.n, c.cols, got, c.split)
		}
		if got := waLayout(c.n, c.cols); got != c.wa {
			t.Errorf("n=%d cols=%d: transposed %v, want %v", c.n, c.cols, got, c.wa)
		}
	}
	amxOn = false
	if splitUsed(&Matrix{DType: BF16, Rows: 32, Cols: 2048}, 64) {
		t.Error("split path with AMX off")
	}
}
