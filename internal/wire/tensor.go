// Package wire converts between in-memory float32 rows and the protobuf
// Tensor of proto/expertmesh.proto, validating everything received: a
// payload from the network is outside input.
package wire

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"unsafe"

	"github.com/expertmesh/expertmesh/kernels"
	meshpb "github.com/expertmesh/expertmesh/proto"
)

// ErrInvalidTensor is wrapped by every validation failure.
var ErrInvalidTensor = errors.New("invalid tensor")

// nativeLE is true on little-endian machines, where float32 slices and
// their wire bytes share a layout and conversion is a single copy.
var nativeLE = func() bool {
	x := uint16(1)
	return *(*byte)(unsafe.Pointer(&x)) == 1
}()

// F32Matrix encodes rows×cols float32 values as an F32 tensor. The bytes
// are a copy: the caller may reuse x at once.
func F32Matrix(x []float32, rows, cols int) *meshpb.Tensor {
	return &meshpb.Tensor{Dtype: meshpb.DType_DTYPE_F32, Shape: []int64{int64(rows), int64(cols)}, Data: AppendF32(nil, x[:rows*cols])}
}

// AppendF32 appends x as little-endian float32 bytes to b.
func AppendF32(b []byte, x []float32) []byte {
	n := len(b)
	b = append(b, make([]byte, 4*len(x))...)
	if nativeLE && len(x) > 0 {
		copy(b[n:], unsafe.Slice((*byte)(unsafe.Pointer(&x[0])), 4*len(x)))
		return b
	}
	for i, v := range x {
		binary.LittleEndian.PutUint32(b[n+4*i:], math.Float32bits(v))
	}
	return b
}

// Size is the bytes of one element of dt, 0 for a dtype the wire does
// not carry.
func Size(dt meshpb.DType) int {
	switch dt {
	case meshpb.DType_DTYPE_F32:
		return 4
	case meshpb.DType_DTYPE_BF16:
		return 2
	}
	return 0
}

// ParseDType maps a --wire flag value to the activation dtype: "f32"
// (exact, the default) or "bf16".
func ParseDType(s string) (meshpb.DType, error) {
	switch s {
	case "", "f32":
		return meshpb.DType_DTYPE_F32, nil
	case "bf16":
		return meshpb.DType_DTYPE_BF16, nil
	}
	return 0, fmt.Errorf("wire dtype %q: want f32 or bf16", s)
}

// ActivationDType resolves a requested activation dtype: UNSPECIFIED is
// F32; anything but F32 and BF16 is refused.
func ActivationDType(dt meshpb.DType) (meshpb.DType, error) {
	switch dt {
	case meshpb.DType_DTYPE_UNSPECIFIED, meshpb.DType_DTYPE_F32:
		return meshpb.DType_DTYPE_F32, nil
	case meshpb.DType_DTYPE_BF16:
		return dt, nil
	}
	return 0, fmt.Errorf("%w: activation dtype %v, want DTYPE_F32 or DTYPE_BF16", ErrInvalidTensor, dt)
}

// AppendRows appends x in dtype dt (F32 exactly, BF16 rounded to nearest
// even) to b. dt must be F32 or BF16.
func AppendRows(b []byte, dt meshpb.DType, x []float32) []byte {
	if dt != meshpb.DType_DTYPE_BF16 {
		return AppendF32(b, x)
	}
	n := len(b)
	b = append(b, make([]byte, 2*len(x))...)
	out := b[n:]
	for i, v := range x {
		binary.LittleEndian.PutUint16(out[2*i:], kernels.F32ToBF16(v))
	}
	return b
}

// CheckMatrix validates that t is an F32 or BF16 [rows, cols] tensor with
// cols == wantCols (rows free, 1 <= rows <= maxRows) and returns rows.
func CheckMatrix(t *meshpb.Tensor, wantCols, maxRows int) (int, error) {
	if t == nil {
		return 0, fmt.Errorf("%w: missing", ErrInvalidTensor)
	}
	size := Size(t.Dtype)
	if size == 0 {
		return 0, fmt.Errorf("%w: dtype %v, want DTYPE_F32 or DTYPE_BF16", ErrInvalidTensor, t.Dtype)
	}
	if len(t.Shape) != 2 {
		return 0, fmt.Errorf("%w: rank %d, want 2", ErrInvalidTensor, len(t.Shape))
	}
	rows, cols := t.Shape[0], t.Shape[1]
	if cols != int64(wantCols) {
		return 0, fmt.Errorf("%w: %d columns, want %d", ErrInvalidTensor, cols, wantCols)
	}
	if rows < 1 || rows > int64(maxRows) {
		return 0, fmt.Errorf("%w: %d rows, want 1..%d", ErrInvalidTensor, rows, maxRows)
	}
	if int64(len(t.Data)) != rows*cols*int64(size) {
		return 0, fmt.Errorf("%w: %d data bytes for shape [%d %d] %v, want %d", ErrInvalidTensor, len(t.Data), rows, cols, t.Dtype, rows*cols*int64(size))
	}
	return int(rows), nil
}

// Decode decodes a tensor CheckMatrix accepted into dst (len >= its
// elements), widening BF16 exactly, and rejects non-finite values.
func Decode(dst []float32, t *meshpb.Tensor) error {
	if t.Dtype != meshpb.DType_DTYPE_BF16 {
		return DecodeF32(dst, t.Data)
	}
	data := t.Data
	n := len(data) / 2
	if len(dst) < n {
		return fmt.Errorf("%w: %d values into a buffer of %d", ErrInvalidTensor, n, len(dst))
	}
	dst = dst[:n]
	for i := range dst {
		h := binary.LittleEndian.Uint16(data[2*i:])
		if h&0x7f80 == 0x7f80 { // exponent all ones: Inf or NaN
			return fmt.Errorf("%w: non-finite value at element %d", ErrInvalidTensor, i)
		}
		dst[i] = kernels.BF16ToF32(h)
	}
	return nil
}

// DecodeF32 decodes a validated F32 tensor's data into dst (len >= elements)
// and rejects non-finite values, which no healthy activation contains.
func DecodeF32(dst []float32, data []byte) error {
	n := len(data) / 4
	if len(dst) < n {
		return fmt.Errorf("%w: %d values into a buffer of %d", ErrInvalidTensor, n, len(dst))
	}
	if nativeLE && n > 0 {
		copy(unsafe.Slice((*byte)(unsafe.Pointer(&dst[0])), 4*n), data)
	} else {
		for i := range n {
			dst[i] = math.Float32frombits(binary.LittleEndian.Uint32(data[4*i:]))
		}
	}
	for i, v := range dst[:n] {
		if math.IsNaN(float64(v)) || math.IsInf(float64(v), 0) {
			return fmt.Errorf("%w: non-finite value at element %d", ErrInvalidTensor, i)
		}
	}
	return nil
}
