package kernels

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
)

// DType of a weight matrix as stored.
type DType uint8

// Stored weight formats.
const (
	F32    DType = iota // IEEE float32
	BF16                // bfloat16
	F16                 // IEEE half
	F8E4M3              // OCP E4M3FN with DeepSeek 128x128 block scales (weight_scale_inv)
	Q8_0                // int8 with one float32 scale per 32 consecutive values of a row
	Q4_0                // 4-bit with one float32 scale per 32 consecutive values of a row (ggml's Q4_0 nibble order)
)

// String names the dtype as safetensors/GGUF users know it.
func (d DType) String() string {
	switch d {
	case F32:
		return "F32"
	case BF16:
		return "BF16"
	case F16:
		return "F16"
	case F8E4M3:
		return "F8_E4M3"
	case Q8_0:
		return "Q8_0"
	case Q4_0:
		return "Q4_0"
	}
	return fmt.Sprintf("DType(%d)", uint8(d))
}

// F8Block is the side of DeepSeek's square FP8 scale blocks.
const F8Block = 128

// Q8Block is the number of consecutive row values sharing one Q8_0 scale.
const Q8Block = 32

// Q4Block is the number of consecutive row values sharing one Q4_0 scale.
const Q4Block = 32

// ErrInvalidMatrix is wrapped by every Validate error.
var ErrInvalidMatrix = errors.New("kernels: invalid matrix")

// Matrix is a row-major [Rows x Cols] weight in its stored format; y = W·x.
// Data is raw little-endian bytes (often a view into an mmapped file: the
// kernels never copy or modify it).
//
//	F32: 4*Rows*Cols bytes. BF16, F16: 2*Rows*Cols.
//	F8E4M3: Rows*Cols bytes (OCP E4M3FN: bias 7, no inf, 0x7f/0xff NaN) with
//	  Scales = DeepSeek's weight_scale_inv, block 128x128:
//	  len ceil(Rows/128)*ceil(Cols/128), row-major; w = fp8 * scale.
//	Q8_0: Data = Rows*Cols int8, Scales = Rows*(Cols/32) float32 (one per 32
//	  consecutive values in a row); requires Cols%32==0.
//	Q4_0: Data = Rows*Cols/2 bytes, 16 per block of 32 values: byte j holds
//	  value j in its low nibble and value j+16 in its high one (ggml's
//	  order), each an unsigned q with w = (q-8)*scale; Scales as Q8_0.
//
// ActQ8 selects integer activations for a Q8_0 matrix: products round x
// to Q8_0 blocks (per 32 values, scale absmax/127, round to nearest even)
// and multiply in integers, as llama.cpp's Q8_0×Q8_0 (see QuantizeAct).
// Q4_0 products always take integer activations. Every product with the
// matrix (MatVec, MatVecMany, MatMul, ExpertFFN, prefill and decode
// alike) rounds x the same way, so a sequence's cache does not depend on
// how its tokens were batched. It is an opt-in precision trade: results
// deviate from the float32-activation product by the activation rounding
// (relative 2^-8 per value at worst, about 2^-10 on average).
//
// Weights are assumed finite: the SIMD FP8 kernels read the NaN codes
// 0x7f/0xff as ±480 (RowF32 and the plain kernels give NaN). Products y=W·x
// must not write into x.
type Matrix struct {
	DType      DType
	Rows, Cols int
	Data       []byte
	Scales     []float32
	ActQ8      bool
}

// IntAct reports whether products with m take integer activations.
func (m *Matrix) IntAct() bool {
	return m.DType == Q4_0 || (m.DType == Q8_0 && m.ActQ8)
}

// rowBytes is the size of one row of Data.
func (m *Matrix) rowBytes() int {
	if m.DType == Q4_0 {
		return m.Cols / 2
	}
	return m.Cols * elemBytesOf(m.DType)
}

// Validate checks that Data and Scales have the sizes the dtype and shape
// imply. Kernels assume a valid matrix; call this on anything read from
// outside the process.
func (m *Matrix) Validate() error {
	if m == nil {
		return fmt.Errorf("%w: nil", ErrInvalidMatrix)
	}
	if m.Rows <= 0 || m.Cols <= 0 {
		return fmt.Errorf("%w: shape %dx%d must be positive", ErrInvalidMatrix, m.Rows, m.Cols)
	}
	n := int64(m.Rows) * int64(m.Cols)
	var wantData, wantScales int64
	switch m.DType {
	case F32:
		wantData = 4 * n
	case BF16, F16:
		wantData = 2 * n
	case F8E4M3:
		wantData = n
		wantScales = int64(ceilDiv(m.Rows, F8Block)) * int64(ceilDiv(m.Cols, F8Block))
	case Q8_0:
		if m.Cols%Q8Block != 0 {
			return fmt.Errorf("%w: Q8_0 needs Cols a multiple of %d, have %d", ErrInvalidMatrix, Q8Block, m.Cols)
		}
		wantData = n
		wantScales = int64(m.Rows) * int64(m.Cols/Q8Block)
	case Q4_0:
		if m.Cols%Q4Block != 0 {
			return fmt.Errorf("%w: Q4_0 needs Cols a multiple of %d, have %d", ErrInvalidMatrix, Q4Block, m.Cols)
		}
		wantData = n / 2
		wantScales = int64(m.Rows) * int64(m.Cols/Q4Block)
	default:
		return fmt.Errorf("%w: unknown dtype %d", ErrInvalidMatrix, uint8(m.DType))
	}
	if m.ActQ8 && m.DType != Q8_0 {
		return fmt.Errorf("%w: ActQ8 is for Q8_0, not %s", ErrInvalidMatrix, m.DType)
	}
	if int64(len(m.Data)) != wantData {
		return fmt.Errorf("%w: %s %dx%d needs %d data bytes, have %d", ErrInvalidMatrix, m.DType, m.Rows, m.Cols, wantData, len(m.Data))
	}
	if int64(len(m.Scales)) != wantScales {
		return fmt.Errorf("%w: %s %dx%d needs %d scales, have %d", ErrInvalidMatrix, m.DType, m.Rows, m.Cols, wantScales, len(m.Scales))
	}
	return nil
}

// Bytes is the number of bytes one full pass over the matrix reads (Data
// plus Scales), the numerator of GB/s figures.
func (m *Matrix) Bytes() int64 {
	return int64(len(m.Data)) + 4*int64(len(m.Scales))
}

// RowF32 widens row r to float32 into dst[:Cols] (the embedding lookup).
func (m *Matrix) RowF32(dst []float32, r int) {
	if r < 0 || r >= m.Rows {
		panic(fmt.Sprintf("kernels: RowF32 row %d out of range [0,%d)", r, m.Rows))
	}
	if len(dst) < m.Cols {
		panic(fmt.Sprintf("kernels: RowF32 dst has %d floats, need %d", len(dst), m.Cols))
	}
	rowF32Generic(dst[:m.Cols], m, r, 0, m.Cols)
}

// rowF32Generic widens columns [c0,c1) of row r into dst[:c1-c0].
func rowF32Generic(dst []float32, m *Matrix, r, c0, c1 int) {
	cols := m.Cols
	base := r * cols
	switch m.DType {
	case F32:
		d := m.Data[4*(base+c0) : 4*(base+c1)]
		for i := range dst[:c1-c0] {
			dst[i] = math.Float32frombits(binary.LittleEndian.Uint32(d[4*i:]))
		}
	case BF16:
		d := m.Data[2*(base+c0) : 2*(base+c1)]
		for i := range dst[:c1-c0] {
			dst[i] = BF16ToF32(binary.LittleEndian.Uint16(d[2*i:]))
		}
	case F16:
		d := m.Data[2*(base+c0) : 2*(base+c1)]
		for i := range dst[:c1-c0] {
			dst[i] = F16ToF32(binary.LittleEndian.Uint16(d[2*i:]))
		}
	case F8E4M3:
		d := m.Data[base+c0 : base+c1]
		srow := m.Scales[(r/F8Block)*ceilDiv(cols, F8Block):]
		for i, b := range d {
			dst[i] = e4m3Table[b] * srow[(c0+i)/F8Block]
		}
	case Q8_0:
		d := m.Data[base+c0 : base+c1]
		srow := m.Scales[r*(cols/Q8Block):]
		for i, b := range d {
			dst[i] = float32(int8(b)) * srow[(c0+i)/Q8Block]
		}
	case Q4_0:
		srow := m.Scales[r*(cols/Q4Block):]
		d := m.Data[r*cols/2:]
		for c := c0; c < c1; c++ {
			dst[c-c0] = float32(q4At(d, c)-8) * srow[c/Q4Block]
		}
	default:
		panic(fmt.Sprintf("kernels: unknown dtype %d", uint8(m.DType)))
	}
}

// QuantizeQ8 converts any valid matrix to Q8_0: per 32 values of a row the
// scale is absmax/127 and each value is rounded to the nearest int8 (ties
// away from zero, as ggml's roundf). The result owns fresh memory.
func QuantizeQ8(m *Matrix) (*Matrix, error) {
	if err := m.Validate(); err != nil {
		return nil, err
	}
	if m.Cols%Q8Block != 0 {
		return nil, fmt.Errorf("%w: Q8_0 needs Cols a multiple of %d, have %d", ErrInvalidMatrix, Q8Block, m.Cols)
	}
	out := &Matrix{
		DType:  Q8_0,
		Rows:   m.Rows,
		Cols:   m.Cols,
		Data:   make([]byte, m.Rows*m.Cols),
		Scales: make([]float32, m.Rows*(m.Cols/Q8Block)),
	}
	QuantizeQ8Into(out.Data, out.Scales, m)
	return out, nil
}

// QuantizeQ8Into is QuantizeQ8 writing into data (Rows*Cols bytes) and
// scales (Rows*Cols/32), so that callers can place the result (m must be
// valid with Cols a multiple of 32).
func QuantizeQ8Into(data []byte, scales []float32, m *Matrix) {
	row := make([]float32, m.Cols)
	nb := m.Cols / Q8Block
	for r := 0; r < m.Rows; r++ {
		rowF32Generic(row, m, r, 0, m.Cols)
		for b := 0; b < nb; b++ {
			blk := row[b*Q8Block : (b+1)*Q8Block]
			var amax float32
			for _, v := range blk {
				if a := float32(math.Abs(float64(v))); a > amax {
					amax = a
				}
			}
			d := amax / 127
			scales[r*nb+b] = d
			q := data[r*m.Cols+b*Q8Block:]
			if d == 0 {
				for i := range blk {
					q[i] = 0
				}
				continue
			}
			id := 1 / d
			for i, v := range blk {
				x := math.Round(float64(v * id))
				if x > 127 {
					x = 127
				} else if x < -127 {
					x = -127
				}
				q[i] = byte(int8(x))
			}
		}
	}
}

// q4At is the unsigned nibble of value c of a Q4_0 row.
func q4At(row []byte, c int) int {
	b := row[c/Q4Block*16+c%16]
	if c%Q4Block >= 16 {
		return int(b >> 4)
	}
	return int(b & 15)
}

// QuantizeQ4 converts any valid matrix to Q4_0 as ggml's reference
// quantizer does: per 32 values of a row, m is the value of largest
// magnitude, the scale is m/-8 and q = min(15, trunc(v/scale + 8.5)). The
// result owns fresh memory.
func QuantizeQ4(m *Matrix) (*Matrix, error) {
	if err := m.Validate(); err != nil {
		return nil, err
	}
	if m.Cols%Q4Block != 0 {
		return nil, fmt.Errorf("%w: Q4_0 needs Cols a multiple of %d, have %d", ErrInvalidMatrix, Q4Block, m.Cols)
	}
	out := &Matrix{DType: Q4_0, Rows: m.Rows, Cols: m.Cols,
		Data: make([]byte, m.Rows*m.Cols/2), Scales: make([]float32, m.Rows*(m.Cols/Q4Block))}
	QuantizeQ4Into(out.Data, out.Scales, m)
	return out, nil
}

// QuantizeQ4Into is QuantizeQ4 writing into data (Rows*Cols/2 bytes) and
// scales (Rows*Cols/32), so that callers can place the result (m must be
// valid with Cols a multiple of 32).
func QuantizeQ4Into(data []byte, scales []float32, m *Matrix) {
	row := make([]float32, m.Cols)
	nb := m.Cols / Q4Block
	for r := 0; r < m.Rows; r++ {
		rowF32Generic(row, m, r, 0, m.Cols)
		for b := 0; b < nb; b++ {
			blk := row[b*Q4Block : (b+1)*Q4Block]
			var amax, mx float32
			for _, v := range blk {
				if a := float32(math.Abs(float64(v))); a > amax {
					amax, mx = a, v
				}
			}
			d := mx / -8
			scales[r*nb+b] = d
			var id float32
			if d != 0 {
				id = 1 / d
			}
			q := data[(r*nb+b)*16 : (r*nb+b+1)*16]
			for j := 0; j < 16; j++ {
				lo := min(15, int8(blk[j]*id+8.5))
				hi := min(15, int8(blk[j+16]*id+8.5))
				q[j] = byte(lo) | byte(hi)<<4
			}
		}
	}
}

func ceilDiv(a, b int) int { return (a + b - 1) / b }

// elemBytesOf is the bytes per weight of Data for dt.
func elemBytesOf(dt DType) int {
	switch dt {
	case F32:
		return 4
	case BF16, F16:
		return 2
	}
	return 1
}
