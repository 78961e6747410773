package kernels

import (
	"errors"
	"math"
	"math/big"
	"math/rand/v2"
	"testing"
)

// TestE4M3Table checks all 256 codes against the OCP definition computed
// independently with math/big (exact).
func TestE4M3Table(t *testing.T) {
	for b := 0; b < 256; b++ {
		got := E4M3ToF32(uint8(b))
		e, m := b>>3&15, b&7
		if e == 15 && m == 7 {
			if got == got {
				t.Fatalf("E4M3 %#02x = %g, want NaN", b, got)
			}
			continue
		}
		v := new(big.Float)
		if e == 0 {
			v.SetMantExp(big.NewFloat(float64(m)), -9) // m/8 * 2^-6
		} else {
			v.SetMantExp(big.NewFloat(float64(8+m)), e-10) // (1+m/8) * 2^(e-7)
		}
		if b&0x80 != 0 {
			v.Neg(v)
		}
		want, _ := v.Float32()
		if got != want || math.Signbit(float64(got)) != (b&0x80 != 0) {
			t.Fatalf("E4M3 %#02x = %g, want %g", b, got, want)
		}
	}
	if E4M3ToF32(0x7e) != 448 || E4M3ToF32(0x01) != 0x1p-9 {
		t.Fatalf("E4M3 max/min subnormal wrong: %g %g", E4M3ToF32(0x7e), E4M3ToF32(0x01))
	}
}

func TestF16ToF32AllValues(t *testing.T) {
	for h := 0; h < 1<<16; h++ {
		got := F16ToF32(uint16(h))
		e, m := h>>10&31, h&1023
		var want float64
		switch {
		case e == 31 && m != 0:
			if got == got {
				t.Fatalf("F16 %#04x = %g, want NaN", h, got)
			}
			continue
		case e == 31:
			want = math.Inf(1)
		case e == 0:
			want = math.Ldexp(float64(m), -24)
		default:
			want = math.Ldexp(float64(1024+m), e-25)
		}
		if h&0x8000 != 0 {
			want = -want
		}
		if float64(got) != want {
			t.Fatalf("F16 %#04x = %g, want %g", h, got, want)
		}
		if f32ToF16(got) != uint16(h) && e != 31 {
			t.Fatalf("test helper f32ToF16 does not round-trip %#04x", h)
		}
	}
}

func TestF32ToBF16(t *testing.T) {
	tests := []struct {
		in   uint32
		want uint16
	}{
		{0x3f800000, 0x3f80}, // 1
		{0x3f808000, 0x3f80}, // tie, even stays
		{0x3f818000, 0x3f82}, // tie, odd rounds up
		{0x3f808001, 0x3f81}, // above half
		{0x7f7fffff, 0x7f80}, // max float rounds to inf
		{0xff800000, 0xff80}, // -inf
		{0x7fc00001, 0x7fc0}, // NaN stays NaN
		{0x7f800001, 0x7fc0}, // signalling NaN with low payload stays NaN
		{0x00000001, 0x0000}, // tiny subnormal to zero
		{0x80000000, 0x8000}, // -0
	}
	for _, tc := range tests {
		got := F32ToBF16(math.Float32frombits(tc.in))
		if got != tc.want {
			t.Errorf("F32ToBF16(%#08x) = %#04x, want %#04x", tc.in, got, tc.want)
		}
	}
	for h := 0; h < 1<<16; h++ {
		f := BF16ToF32(uint16(h))
		if f == f && F32ToBF16(f) != uint16(h) {
			t.Fatalf("bf16 %#04x does not round-trip", h)
		}
	}
	src := []uint16{0x3f80, 0xc000, 0x0001}
	dst := make([]float32, 3)
	WidenBF16(dst, src)
	if dst[0] != 1 || dst[1] != -2 || dst[2] != math.Float32frombits(0x10000) {
		t.Fatalf("WidenBF16 = %v", dst)
	}
}

// TestQuantizeQ8ErrorBound: each element of a Q8_0 row is within half a
// quantisation step (absmax/254) of the original, and matrix-vector
// products stay within the bound that implies.
func TestQuantizeQ8ErrorBound(t *testing.T) {
	rng := rand.New(rand.NewPCG(15, 16))
	for _, dt := range []DType{F32, BF16, F16, F8E4M3} {
		w := randMatrix(rng, dt, 37, 160, 0)
		q, err := QuantizeQ8(w)
		if err != nil {
			t.Fatal(err)
		}
		if err := q.Validate(); err != nil {
			t.Fatal(err)
		}
		orig, got := make([]float32, w.Cols), make([]float32, w.Cols)
		for r := 0; r < w.Rows; r++ {
			w.RowF32(orig, r)
			q.RowF32(got, r)
			for b := 0; b < w.Cols/Q8Block; b++ {
				var amax float64
				for _, v := range orig[b*Q8Block : (b+1)*Q8Block] {
					amax = math.Max(amax, math.Abs(float64(v)))
				}
				for c := b * Q8Block; c < (b+1)*Q8Block; c++ {
					if d := math.Abs(float64(got[c]) - float64(orig[c])); d > amax/254*1.0001+1e-30 {
						t.Fatalf("%s row %d col %d: |%g - %g| = %g > absmax/254 = %g", dt, r, c, got[c], orig[c], d, amax/254)
					}
				}
			}
		}
	}
	if _, err := QuantizeQ8(&Matrix{DType: F32, Rows: 1, Cols: 33, Data: make([]byte, 4*33)}); !errors.Is(err, ErrInvalidMatrix) {
		t.Fatalf("Cols 33: err = %v, want ErrInvalidMatrix", err)
	}
}

func TestValidate(t *testing.T) {
	ok := &Matrix{DType: F8E4M3, Rows: 130, Cols: 129, Data: make([]byte, 130*129), Scales: make([]float32, 4)}
	if err := ok.Validate(); err != nil {
		t.Fatalf("valid F8 matrix: %v", err)
	}
	if got := ok.Bytes(); got != 130*129+16 {
		t.Fatalf("Bytes = %d", got)
	}
	bad := []*Matrix{
		nil,
		{DType: BF16, Rows: 0, Cols: 4},
		{DType: BF16, Rows: 2, Cols: 4, Data: make([]byte, 15)},
		{DType: F8E4M3, Rows: 130, Cols: 129, Data: make([]byte, 130*129), Scales: make([]float32, 2)},
		{DType: Q8_0, Rows: 1, Cols: 48, Data: make([]byte, 48), Scales: make([]float32, 1)},
		{DType: Q8_0, Rows: 1, Cols: 64, Data: make([]byte, 64), Scales: make([]float32, 1)},
		{DType: DType(9), Rows: 1, Cols: 1, Data: make([]byte, 1)},
	}
	for i, m := range bad {
		if err := m.Validate(); !errors.Is(err, ErrInvalidMatrix) {
			t.Errorf("case %d: err = %v, want ErrInvalidMatrix", i, err)
		}
	}
}
