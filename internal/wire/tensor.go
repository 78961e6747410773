// Package wire converts between in-memory float32 rows and the protobuf
// Tensor of proto/expertmesh.proto, validating everything received: a
// payload from the network is outside input.
package wire

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"slices"
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
	// Grown without zeroing: every byte is written below.
	b = extend(b, 4*len(x))
	if nativeLE && len(x) > 0 {
		copy(b[n:], unsafe.Slice((*byte)(unsafe.Pointer(&x[0])), 4*len(x)))
		return b
	}
	for i, v := range x {
		binary.LittleEndian.PutUint32(b[n+4*i:], math.Float32bits(v))
	}
	return b
}

// extend returns b grown by n bytes whose contents are unspecified (the
// caller writes them all): unlike append(b, make([]byte, n)...), the
// spare capacity a reused buffer already has is not cleared first, a
// pass over a dispatch's bytes saved.
func extend(b []byte, n int) []byte {
	return slices.Grow(b, n)[:len(b)+n]
}

// Size is the bytes of one element of dt, 0 for a dtype the wire does
// not carry.
func Size(dt meshpb.DType) int {
	switch dt {
	case meshpb.DType_DTYPE_F32:
		return 4
	case meshpb.DType_DTYPE_BF16:
		return 2
	case meshpb.DType_DTYPE_F8_E4M3:
		return 1
	}
	return 0
}

// F8Block is how many consecutive values of a row share one scale in an
// F8_E4M3 tensor (DeepSeek-V3's 1×128 activation tiles).
const F8Block = 128

// f8Max is E4M3FN's largest finite value.
const f8Max = 448

// ScaleBlocks is the number of scales per row of cols values in an
// F8_E4M3 tensor.
func ScaleBlocks(cols int) int { return (cols + F8Block - 1) / F8Block }

// ParseDType maps a --wire flag value to the dtype of dispatched hidden
// rows: "f32" (exact, the default), "bf16" or "fp8" (E4M3, scaled per
// 128 values). See PartialFor for the replies'.
func ParseDType(s string) (meshpb.DType, error) {
	switch s {
	case "", "f32":
		return meshpb.DType_DTYPE_F32, nil
	case "bf16":
		return meshpb.DType_DTYPE_BF16, nil
	case "fp8":
		return meshpb.DType_DTYPE_F8_E4M3, nil
	}
	return 0, fmt.Errorf("wire dtype %q: want f32, bf16 or fp8", s)
}

// PartialFor is the dtype partial rows come back in when hidden rows go
// out in dt: F32 for F32, BF16 otherwise (DeepSeek combines in BF16).
func PartialFor(dt meshpb.DType) meshpb.DType {
	if dt == meshpb.DType_DTYPE_F32 || dt == meshpb.DType_DTYPE_UNSPECIFIED {
		return meshpb.DType_DTYPE_F32
	}
	return meshpb.DType_DTYPE_BF16
}

// ActivationDType resolves a requested partial-row dtype: UNSPECIFIED is
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

// AppendF8Rows appends rows of cols values of x as E4M3 bytes to b and
// their scales to scales: each block of F8Block values of a row is
// divided by its largest magnitude over 448 (1 for an all-zero block) and
// rounded to the nearest E4M3 value, ties to even. x must be finite.
func AppendF8Rows(b []byte, scales []float32, x []float32, cols int) ([]byte, []float32) {
	n := len(b)
	b = append(b, make([]byte, len(x))...)
	out := b[n:]
	for r := 0; r < len(x); r += cols {
		row := x[r : r+cols]
		for c := 0; c < cols; c += F8Block {
			blk := row[c:min(c+F8Block, cols)]
			amax := float32(0)
			for _, v := range blk {
				amax = max(amax, math.Float32frombits(math.Float32bits(v)&0x7fffffff))
			}
			scale := float32(1)
			if amax > 0 {
				// At least the smallest float32, so that a block of
				// subnormals keeps a positive scale.
				scale = max(amax/f8Max, math.SmallestNonzeroFloat32)
			}
			inv := 1 / float64(scale) // float64: 1/scale may overflow float32
			for i, v := range blk {
				out[r+c+i] = toE4M3(float32(float64(v) * inv))
			}
			scales = append(scales, scale)
		}
	}
	return b, scales
}

// toE4M3 rounds v to the nearest E4M3FN value, ties to even, saturating
// at ±448 (the format has no infinity). v must not be NaN.
func toE4M3(v float32) uint8 {
	bits := math.Float32bits(v)
	sign := uint8(bits>>24) & 0x80
	bits &= 0x7fffffff
	const minNormal = (127 - 6) << 23 // 2^-6, E4M3's smallest normal
	if bits < minNormal {
		// Subnormals step by 2^-9; rounding up to 8 steps gives the
		// smallest normal, whose code is 8 as well.
		return sign | uint8(math.RoundToEven(float64(math.Float32frombits(bits))*512))
	}
	// Round the 23-bit mantissa to 3 bits, ties to even, in the integer
	// bits: a carry moves into the exponent, as it should.
	bits += 1<<19 - 1 + (bits>>20)&1
	code := bits>>20 - (127-7)<<3
	if code > 0x7e {
		return sign | 0x7e
	}
	return sign | uint8(code)
}

// AppendRows appends x in dtype dt (F32 exactly, BF16 rounded to nearest
// even) to b. dt must be F32 or BF16.
func AppendRows(b []byte, dt meshpb.DType, x []float32) []byte {
	if dt != meshpb.DType_DTYPE_BF16 {
		return AppendF32(b, x)
	}
	n := len(b)
	b = extend(b, 2*len(x))
	out := b[n:]
	encodeBF16(out, x)
	return b
}

// encodeBF16 writes x as little-endian BF16 values to out (2*len(x)
// bytes), each kernels.F32ToBF16(v): round to nearest even, NaN kept
// quiet. The loop rounds every value without a branch and only notes
// whether any was NaN (with the sign masked off, adding 0x7fffff carries
// into bit 31 exactly for a NaN); a second pass fixes those, which
// healthy activations never have.
func encodeBF16(out []byte, x []float32) {
	if !nativeLE || len(x) == 0 {
		for i, v := range x {
			binary.LittleEndian.PutUint16(out[2*i:], kernels.F32ToBF16(v))
		}
		return
	}
	// out may start at an odd address (after a message's headers): amd64
	// and arm64 store unaligned halves at full speed, and checkptr only
	// requires alignment of types holding pointers.
	o := unsafe.Slice((*uint16)(unsafe.Pointer(&out[0])), len(out)/2)[:len(x)]
	u := unsafe.Slice((*uint32)(unsafe.Pointer(&x[0])), len(x))
	nan := uint32(0)
	for i, b := range u {
		o[i] = uint16((b + 0x7fff + (b>>16)&1) >> 16)
		nan |= b&0x7fffffff + 0x007fffff
	}
	if nan&0x80000000 != 0 {
		for i, b := range u {
			if b&0x7fffffff > 0x7f800000 {
				o[i] = uint16(b>>16) | 0x40
			}
		}
	}
}

// CheckMatrix validates that t is an F32, BF16 or F8_E4M3 [rows, cols]
// tensor with cols == wantCols (rows free, 1 <= rows <= maxRows) and
// returns rows. An F8_E4M3 tensor needs rows*ScaleBlocks(cols) finite
// positive scales; any other tensor none.
func CheckMatrix(t *meshpb.Tensor, wantCols, maxRows int) (int, error) {
	if t == nil {
		return 0, fmt.Errorf("%w: missing", ErrInvalidTensor)
	}
	size := Size(t.Dtype)
	if size == 0 {
		return 0, fmt.Errorf("%w: dtype %v, want DTYPE_F32, DTYPE_BF16 or DTYPE_F8_E4M3", ErrInvalidTensor, t.Dtype)
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
	want := 0
	if t.Dtype == meshpb.DType_DTYPE_F8_E4M3 {
		want = int(rows) * ScaleBlocks(int(cols))
	}
	if len(t.Scales) != want {
		return 0, fmt.Errorf("%w: %d scales for shape [%d %d] %v, want %d", ErrInvalidTensor, len(t.Scales), rows, cols, t.Dtype, want)
	}
	for i, s := range t.Scales {
		if !(s > 0) || math.IsInf(float64(s), 0) {
			return 0, fmt.Errorf("%w: scales[%d] = %v: want finite and > 0", ErrInvalidTensor, i, s)
		}
	}
	return int(rows), nil
}

// Decode decodes a tensor CheckMatrix accepted into dst (len >= its
// elements), widening BF16 exactly and scaling E4M3, and rejects
// non-finite values.
func Decode(dst []float32, t *meshpb.Tensor) error {
	if t.Dtype == meshpb.DType_DTYPE_F8_E4M3 {
		return decodeF8(dst, t)
	}
	if t.Dtype != meshpb.DType_DTYPE_BF16 {
		return DecodeF32(dst, t.Data)
	}
	data := t.Data
	n := len(data) / 2
	if len(dst) < n {
		return fmt.Errorf("%w: %d values into a buffer of %d", ErrInvalidTensor, n, len(dst))
	}
	if i := widenBF16(dst[:n], data[:2*n]); i >= 0 {
		return fmt.Errorf("%w: non-finite value at element %d", ErrInvalidTensor, i)
	}
	return nil
}

// widenBF16 widens little-endian BF16 data into dst (len(data)/2 values)
// four at a time, checking finiteness word-wise as it goes, and returns
// the index of the first non-finite value (dst is then partly written)
// or -1.
func widenBF16(dst []float32, data []byte) int {
	var flags uint64
	i := 0
	for ; i+4 <= len(dst); i += 4 {
		w := binary.LittleEndian.Uint64(data[2*i:])
		flags |= (w & bf16ExpMask) + bf16ExpCarry
		d := dst[i : i+4 : i+4]
		d[0] = math.Float32frombits(uint32(w) << 16)
		d[1] = math.Float32frombits(uint32(w>>16) << 16)
		d[2] = math.Float32frombits(uint32(w>>32) << 16)
		d[3] = math.Float32frombits(uint32(w>>48) << 16)
	}
	for ; i < len(dst); i++ {
		h := binary.LittleEndian.Uint16(data[2*i:])
		flags |= uint64((h&0x7f80)+0x0080) & 0x8000
		dst[i] = kernels.BF16ToF32(h)
	}
	if flags&bf16TopBits != 0 {
		return firstNonFiniteBF16(data)
	}
	return -1
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
	// Checked where they landed, as floats: the SIMD scan.
	if i := firstNonFiniteFloat(dst[:n]); i >= 0 {
		return fmt.Errorf("%w: non-finite value at element %d", ErrInvalidTensor, i)
	}
	return nil
}

// ViewF32 returns an F32 tensor's data (CheckMatrix accepted it) as its
// float32 values without copying them, after checking they are finite,
// when the machine is little-endian and the bytes start 4-aligned (as a
// decoded message's do); ok is false when it cannot (Decode them
// instead). The values alias t.Data.
func ViewF32(t *meshpb.Tensor) (x []float32, ok bool, err error) {
	data := t.Data
	n := len(data) / 4
	if t.Dtype != meshpb.DType_DTYPE_F32 || !nativeLE || n == 0 || uintptr(unsafe.Pointer(&data[0]))%4 != 0 {
		return nil, false, nil
	}
	x = unsafe.Slice((*float32)(unsafe.Pointer(&data[0])), n)
	if i := firstNonFiniteFloat(x); i >= 0 {
		return nil, true, fmt.Errorf("%w: non-finite value at element %d", ErrInvalidTensor, i)
	}
	return x, true, nil
}

// finiteBlock is firstNonFiniteFloat's block of zeros: 4 KiB, so it stays
// in the L1 cache while the rows stream past it.
var finiteBlock [1024]float32

// firstNonFiniteFloat returns the index of the first non-finite value of
// x, or -1. It scans with the kernels' SIMD dot product against zeros: a
// finite value times zero is ±0 and a sum of zeros is zero, while ±Inf·0
// and NaN·0 are NaN and a NaN stays NaN through every later sum (an FMA
// included), so a block's x·0 is zero exactly when all its values are
// finite. That reads 16 values an instruction where the word-wise scan
// (firstNonFiniteF32, kept for bytes that are not float32-aligned and
// for the plain Go kernels, whose dot product is element-wise) takes two:
// 256 KiB (32 rows of V2-Lite) in ~3 µs instead of ~23. A flagged block
// is searched value by value.
func firstNonFiniteFloat(x []float32) int {
	if len(x) == 0 {
		return -1
	}
	if kernels.ActiveISA() == kernels.ISAGeneric {
		return firstNonFiniteF32(unsafe.Slice((*byte)(unsafe.Pointer(&x[0])), 4*len(x)))
	}
	for off := 0; off < len(x); off += len(finiteBlock) {
		blk := x[off:min(off+len(finiteBlock), len(x))]
		if kernels.Dot(blk, finiteBlock[:len(blk)]) != 0 {
			for i, v := range blk {
				if math.Float32bits(v)&0x7f800000 == 0x7f800000 {
					return off + i
				}
			}
		}
	}
	return -1
}

// Finiteness checks of received rows, on the wire bytes: a value is Inf
// or NaN exactly when its exponent bits are all ones. The checks test
// eight bytes at a time (SWAR): with the sign bit masked off, adding one
// to the lowest exponent bit of each lane carries into the lane's top
// bit only when every exponent bit is set, and never into the next lane.
// A hit is located by the element-wise twins, which are also the
// reference the tests hold the word-wise paths to.
const (
	f32ExpMask  = 0x7f800000_7f800000
	f32ExpCarry = 0x00800000_00800000
	f32TopBits  = 0x80000000_80000000

	bf16ExpMask  = 0x7f80_7f80_7f80_7f80
	bf16ExpCarry = 0x0080_0080_0080_0080
	bf16TopBits  = 0x8000_8000_8000_8000
)

// firstNonFiniteF32 returns the index of the first non-finite
// little-endian float32 in data (len a multiple of 4), or -1.
func firstNonFiniteF32(data []byte) int {
	return firstNonFinite(data, 4, f32ExpMask, f32ExpCarry, f32TopBits, firstNonFiniteF32Plain)
}

// firstNonFiniteBF16 is firstNonFiniteF32 for little-endian BF16 values
// (len a multiple of 2).
func firstNonFiniteBF16(data []byte) int {
	return firstNonFinite(data, 2, bf16ExpMask, bf16ExpCarry, bf16TopBits, firstNonFiniteBF16Plain)
}

// firstNonFinite scans data 32 bytes at a time, OR-ing each word's lane
// flags, and hands the block holding the first flagged lane (and the
// tail shorter than a block) to plain, the element-wise scan.
func firstNonFinite(data []byte, size int, mask, carry, top uint64, plain func([]byte) int) int {
	const block = 32
	i := 0
	for ; i+block <= len(data); i += block {
		w0 := binary.LittleEndian.Uint64(data[i:])
		w1 := binary.LittleEndian.Uint64(data[i+8:])
		w2 := binary.LittleEndian.Uint64(data[i+16:])
		w3 := binary.LittleEndian.Uint64(data[i+24:])
		f := ((w0 & mask) + carry) | ((w1 & mask) + carry) | ((w2 & mask) + carry) | ((w3 & mask) + carry)
		if f&top != 0 {
			break
		}
	}
	if j := plain(data[i:]); j >= 0 {
		return i/size + j
	}
	return -1
}

func firstNonFiniteF32Plain(data []byte) int {
	for i := 0; i+4 <= len(data); i += 4 {
		if binary.LittleEndian.Uint32(data[i:])&0x7f800000 == 0x7f800000 {
			return i / 4
		}
	}
	return -1
}

func firstNonFiniteBF16Plain(data []byte) int {
	for i := 0; i+2 <= len(data); i += 2 {
		if binary.LittleEndian.Uint16(data[i:])&0x7f80 == 0x7f80 {
			return i / 2
		}
	}
	return -1
}

func decodeF8(dst []float32, t *meshpb.Tensor) error {
	data := t.Data
	if len(dst) < len(data) {
		return fmt.Errorf("%w: %d values into a buffer of %d", ErrInvalidTensor, len(data), len(dst))
	}
	cols := int(t.Shape[1])
	blocks := ScaleBlocks(cols)
	for r := 0; r*cols < len(data); r++ {
		row, out := data[r*cols:(r+1)*cols], dst[r*cols:(r+1)*cols]
		for i, q := range row {
			if q&0x7f == 0x7f {
				return fmt.Errorf("%w: NaN at element %d", ErrInvalidTensor, r*cols+i)
			}
			v := kernels.E4M3ToF32(q) * t.Scales[r*blocks+i/F8Block]
			if math.IsInf(float64(v), 0) {
				return fmt.Errorf("%w: non-finite value at element %d", ErrInvalidTensor, r*cols+i)
			}
			out[i] = v
		}
	}
	return nil
}
