package wire

import (
	"errors"
	"math"
	"math/rand/v2"
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/expertmesh/expertmesh/kernels"
	meshpb "github.com/expertmesh/expertmesh/proto"
)

func TestRoundTrip(t *testing.T) {
	x := []float32{1, -2.5, 3e-8, 7, 0, -0}
	tn := F32Matrix(x, 2, 3)
	rows, err := CheckMatrix(tn, 3, 4)
	if err != nil || rows != 2 {
		t.Fatalf("rows %d err %v", rows, err)
	}
	got := make([]float32, 6)
	if err := DecodeF32(got, tn.Data); err != nil {
		t.Fatal(err)
	}
	for i := range x {
		if math.Float32bits(got[i]) != math.Float32bits(x[i]) {
			t.Fatalf("element %d: %g != %g", i, got[i], x[i])
		}
	}
}

func TestCheckMatrixRejects(t *testing.T) {
	good := func() *meshpb.Tensor { return F32Matrix(make([]float32, 6), 2, 3) }
	cases := map[string]*meshpb.Tensor{
		"nil":        nil,
		"dtype":      func() *meshpb.Tensor { x := good(); x.Dtype = meshpb.DType_DTYPE_UNSPECIFIED; return x }(),
		"bf16 size":  func() *meshpb.Tensor { x := good(); x.Dtype = meshpb.DType_DTYPE_BF16; return x }(),
		"rank":       func() *meshpb.Tensor { x := good(); x.Shape = []int64{6}; return x }(),
		"cols":       func() *meshpb.Tensor { x := good(); x.Shape = []int64{3, 2}; return x }(),
		"zero rows":  func() *meshpb.Tensor { x := good(); x.Shape = []int64{0, 3}; x.Data = nil; return x }(),
		"too many":   F32Matrix(make([]float32, 15), 5, 3),
		"short data": func() *meshpb.Tensor { x := good(); x.Data = x.Data[:20]; return x }(),
		"negative":   func() *meshpb.Tensor { x := good(); x.Shape = []int64{-2, 3}; return x }(),
		"overflow":   func() *meshpb.Tensor { x := good(); x.Shape = []int64{math.MaxInt64 / 2, 3}; return x }(),
	}
	for name, tn := range cases {
		if _, err := CheckMatrix(tn, 3, 4); !errors.Is(err, ErrInvalidTensor) {
			t.Errorf("%s: err = %v", name, err)
		}
	}
	nan := F32Matrix([]float32{1, float32(math.NaN()), 3}, 1, 3)
	if err := DecodeF32(make([]float32, 3), nan.Data); !errors.Is(err, ErrInvalidTensor) {
		t.Errorf("NaN accepted: %v", err)
	}
}

func FuzzCheckMatrix(f *testing.F) {
	f.Add(int64(2), int64(3), []byte{})
	f.Add(int64(1), int64(3), make([]byte, 12))
	f.Fuzz(func(t *testing.T, rows, cols int64, data []byte) {
		tn := &meshpb.Tensor{Dtype: meshpb.DType_DTYPE_F32, Shape: []int64{rows, cols}, Data: data}
		n, err := CheckMatrix(tn, 3, 64)
		if err != nil {
			return
		}
		_ = DecodeF32(make([]float32, n*3), tn.Data)
	})
}

// TestE4M3: every finite E4M3 value encodes to itself, values between two
// neighbours go to the nearer (ties to the even code), and beyond 448
// saturate.
func TestE4M3(t *testing.T) {
	for c := range 256 {
		q := uint8(c)
		if q&0x7f == 0x7f {
			continue // NaN
		}
		v := kernels.E4M3ToF32(q)
		got := toE4M3(v)
		if v == 0 {
			if got&0x7f != 0 {
				t.Errorf("%g -> %#x", v, got)
			}
			continue
		}
		if got != q {
			t.Errorf("%#x (%g) -> %#x", q, v, got)
		}
		if q&0x7f == 0x7e || q&0x7f == 0 {
			continue
		}
		next := kernels.E4M3ToF32(q + 1)
		mid := (v + next) / 2 // exact in float32
		want := q
		if (q+1)&1 == 0 {
			want = q + 1
		}
		if got := toE4M3(mid); got != want {
			t.Errorf("midpoint of %#x and %#x (%g): %#x, want %#x", q, q+1, mid, got, want)
		}
	}
	for _, v := range []float32{1e6, 449, 464, math.MaxFloat32} {
		if toE4M3(v) != 0x7e || toE4M3(-v) != 0xfe {
			t.Errorf("%g: no saturation at ±448", v)
		}
	}
	// Just below the midpoints on either side of a code stay with it.
	if toE4M3(math.Nextafter32(1.0625, 0)) != 0x38 || toE4M3(math.Nextafter32(1.0625, 2)) != 0x39 {
		t.Error("rounding near 1.0625")
	}
	if toE4M3(1e6) != 0x7e || toE4M3(-500) != 0xfe {
		t.Error("no saturation at ±448")
	}
}

func TestF8Rows(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 1))
	const rows, cols = 3, 300 // blocks of 128, 128 and 44
	x := make([]float32, rows*cols)
	for i := range x {
		x[i] = float32(rng.NormFloat64() * math.Pow(10, float64(i%7-3)))
	}
	x[5], x[cols+1] = 0, float32(math.SmallestNonzeroFloat32)
	for i := 2 * cols; i < 2*cols+128; i++ {
		x[i] = 0 // an all-zero block
	}
	tn := &meshpb.Tensor{Dtype: meshpb.DType_DTYPE_F8_E4M3, Shape: []int64{rows, cols}}
	tn.Data, tn.Scales = AppendF8Rows(nil, nil, x, cols)
	if r, err := CheckMatrix(tn, cols, rows); err != nil || r != rows {
		t.Fatalf("rows %d err %v", r, err)
	}
	got := make([]float32, len(x))
	if err := Decode(got, tn); err != nil {
		t.Fatal(err)
	}
	for i, v := range x {
		// 3 mantissa bits: within 1/16 of the value, or of the
		// block's smallest normal step for tiny ones.
		s := float64(tn.Scales[(i/cols)*ScaleBlocks(cols)+(i%cols)/F8Block])
		if d := math.Abs(float64(got[i] - v)); d > math.Abs(float64(v))/16+s/512 {
			t.Fatalf("element %d: %g -> %g (scale %g)", i, v, got[i], s)
		}
	}
	bad := func(f func(*meshpb.Tensor)) {
		t.Helper()
		c := proto.Clone(tn).(*meshpb.Tensor)
		f(c)
		if _, err := CheckMatrix(c, cols, rows); err == nil {
			if err := Decode(got, c); err == nil {
				t.Error("accepted")
			}
		}
	}
	bad(func(c *meshpb.Tensor) { c.Scales = c.Scales[1:] })
	bad(func(c *meshpb.Tensor) { c.Scales[2] = 0 })
	bad(func(c *meshpb.Tensor) { c.Scales[2] = float32(math.Inf(1)) })
	bad(func(c *meshpb.Tensor) { c.Scales[2] = float32(math.NaN()) })
	bad(func(c *meshpb.Tensor) { c.Data[7] = 0x7f })
	bad(func(c *meshpb.Tensor) { c.Scales[0] = math.MaxFloat32 })
	bad(func(c *meshpb.Tensor) { c.Dtype = meshpb.DType_DTYPE_F32; c.Data = AppendF32(nil, x) })
}
