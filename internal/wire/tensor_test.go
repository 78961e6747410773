package wire

import (
	"errors"
	"math"
	"testing"

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
