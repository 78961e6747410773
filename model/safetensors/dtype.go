package safetensors

import "fmt"

// DType is a safetensors element type, spelled exactly as in the file header.
type DType string

// The dtypes of the safetensors format that this package reads and writes.
const (
	F64    DType = "F64"
	F32    DType = "F32"
	F16    DType = "F16"
	BF16   DType = "BF16"
	F8E4M3 DType = "F8_E4M3"
	F8E5M2 DType = "F8_E5M2"
	I64    DType = "I64"
	I32    DType = "I32"
	I16    DType = "I16"
	I8     DType = "I8"
	U8     DType = "U8"
	Bool   DType = "BOOL"
)

// AllDTypes lists every supported dtype, widest first.
var AllDTypes = []DType{F64, I64, F32, I32, F16, BF16, I16, F8E4M3, F8E5M2, I8, U8, Bool}

// Size returns the number of bytes per element, or 0 for an unknown dtype.
func (d DType) Size() int {
	switch d {
	case F64, I64:
		return 8
	case F32, I32:
		return 4
	case F16, BF16, I16:
		return 2
	case F8E4M3, F8E5M2, I8, U8, Bool:
		return 1
	}
	return 0
}

// ParseDType returns the DType spelled s. Spelling is case-sensitive, as in
// the format; anything else wraps ErrCorrupt.
func ParseDType(s string) (DType, error) {
	d := DType(s)
	if d.Size() == 0 {
		return "", fmt.Errorf("%w: unknown dtype %q", ErrCorrupt, s)
	}
	return d, nil
}
