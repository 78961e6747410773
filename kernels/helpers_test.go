package kernels

import (
	"encoding/binary"
	"flag"
	"math"
	"math/rand/v2"
	"testing"
)

// isas is every level this machine can run, generic first.
func isas() []ISA {
	var out []ISA
	for i := ISAGeneric; i <= BestISA(); i++ {
		out = append(out, i)
	}
	return out
}

// withISA runs f with the kernels forced to isa, restoring the best level.
func withISA(t testing.TB, isa ISA, f func()) {
	t.Helper()
	if err := SetISA(isa); err != nil {
		t.Fatal(err)
	}
	defer SetISA(BestISA())
	f()
}

// randMatrix builds a valid matrix of dtype with finite random values;
// Data starts at byte offset off of its backing array (unaligned views).
func randMatrix(rng *rand.Rand, dt DType, rows, cols, off int) *Matrix {
	m := &Matrix{DType: dt, Rows: rows, Cols: cols}
	n := rows * cols
	var size int
	switch dt {
	case F32:
		size = 4 * n
	case BF16, F16:
		size = 2 * n
	default:
		size = n
	}
	buf := make([]byte, size+off)
	m.Data = buf[off:]
	for i := 0; i < n; i++ {
		v := float32(rng.NormFloat64())
		switch dt {
		case F32:
			binary.LittleEndian.PutUint32(m.Data[4*i:], math.Float32bits(v))
		case BF16:
			binary.LittleEndian.PutUint16(m.Data[2*i:], F32ToBF16(v))
		case F16:
			binary.LittleEndian.PutUint16(m.Data[2*i:], f32ToF16(v))
		case F8E4M3, Q8_0:
			b := byte(rng.IntN(256))
			if dt == F8E4M3 && b&0x7f == 0x7f {
				b &^= 1 // NaN is not a weight
			}
			m.Data[i] = b
		}
	}
	switch dt {
	case F8E4M3:
		m.Scales = make([]float32, ceilDiv(rows, F8Block)*ceilDiv(cols, F8Block))
	case Q8_0:
		m.Scales = make([]float32, rows*(cols/Q8Block))
	}
	for i := range m.Scales {
		m.Scales[i] = float32(rng.Float64()*0.02 + 0.001)
	}
	return m
}

// f32ToF16 rounds to the nearest half (test helper; finite inputs only).
func f32ToF16(f float32) uint16 {
	b := math.Float32bits(f)
	sign := uint16(b>>16) & 0x8000
	exp := int(b>>23&0xff) - 127 + 15
	man := b & 0x7fffff
	switch {
	case exp >= 31:
		return sign | 0x7bff
	case exp <= 0:
		if exp < -10 {
			return sign
		}
		man |= 0x800000
		shift := uint(14 - exp)
		h := man >> shift
		if rem := man & (1<<shift - 1); rem > 1<<(shift-1) || rem == 1<<(shift-1) && h&1 == 1 {
			h++
		}
		return sign | uint16(h)
	}
	h := uint32(exp)<<10 | man>>13
	if rem := man & 0x1fff; rem > 0x1000 || rem == 0x1000 && h&1 == 1 {
		h++
	}
	return sign | uint16(h)
}

func randVec(rng *rand.Rand, n, off int) []float32 {
	v := make([]float32, n+off)[off:]
	for i := range v {
		v[i] = float32(rng.NormFloat64())
	}
	return v
}

// guarded returns a slice of n floats with guard values on both sides in
// its backing array, and a check that the guards are intact.
func guarded(n int) ([]float32, func(t testing.TB)) {
	const g = 8
	buf := make([]float32, n+2*g)
	for i := range buf {
		buf[i] = 12345.5
	}
	return buf[g : g+n : g+n], func(t testing.TB) {
		t.Helper()
		for i := 0; i < g; i++ {
			if buf[i] != 12345.5 || buf[g+n+i] != 12345.5 {
				t.Fatalf("guard value overwritten around a %d-float buffer", n)
			}
		}
	}
}

// refMatVec is a float64 reference, returning values and the sum of
// |w*x| per row (the scale of float32 rounding error).
func refMatVec(w *Matrix, x []float32) (y, mag []float64) {
	row := make([]float32, w.Cols)
	y = make([]float64, w.Rows)
	mag = make([]float64, w.Rows)
	for r := 0; r < w.Rows; r++ {
		w.RowF32(row, r)
		for c, v := range row {
			y[r] += float64(v) * float64(x[c])
			mag[r] += math.Abs(float64(v) * float64(x[c]))
		}
	}
	return y, mag
}

func closeRel(got, want, mag float64, rel float64) bool {
	return math.Abs(got-want) <= rel*mag+1e-30
}

// fastMatrix fills a benchmark matrix quickly with moderate finite values
// on the Go heap.
func fastMatrix(seed uint64, dt DType, rows, cols int) *Matrix {
	return benchMatrix(nil, dt, rows, cols, seed)
}

var runBench = flag.Bool("runbench", false, "run RunBench's machine report in TestRunBench")
