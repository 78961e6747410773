package safetensors

import (
	"encoding/binary"
	"errors"
	"math"
	"slices"
	"testing"
)

// FuzzParseHeader feeds arbitrary bytes and file sizes to ParseHeader. It must
// never panic, must fail only with ErrCorrupt, and whatever it accepts must
// satisfy the invariants Tensor relies on to slice the mapping safely.
func FuzzParseHeader(f *testing.F) {
	v := validFile(f)
	f.Add(v, int64(len(v)))
	f.Add(v, int64(len(v)+1))
	f.Add(v[:len(v)-1], int64(len(v)))
	f.Add([]byte{}, int64(0))
	f.Add(setLen(v, 1<<63), int64(len(v)))
	f.Add(setLen(v, 3), int64(len(v)))
	for _, e := range [][2]string{
		{`[2,3]`, `[3,3]`},
		{`[2,3]`, `[-2,3]`},
		{`[2,3]`, `[4294967296,4294967296,4]`},
		{`[12,28]`, `[10,26]`},
		{`[12,28]`, `[12,99]`},
		{`"b.w"`, `"a.w"`},
		{`"BF16"`, `"BX16"`},
		{`{"format":"pt"}`, `{"format":1}`},
		{`]}}`, `]}}x`},
		{`[0,5]`, `[]`},
	} {
		b := edit(f, v, e[0], e[1])
		f.Add(b, int64(len(b)))
	}
	for _, js := range []string{
		`{}`,
		`{"__metadata__":null}`,
		`{"a":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},"b":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}`,
		`{"a":{"dtype":"BOOL","shape":[],"data_offsets":[0,1]}}`,
		`{"a":{"dtype":"F8_E4M3","shape":[2,2],"data_offsets":[0,4]},"b":{"dtype":"I64","shape":[1],"data_offsets":[4,12]}}`,
		`{"a":{}}`, `{"a":null}`, `[]`, `{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}`,
	} {
		b := binary.LittleEndian.AppendUint64(nil, uint64(len(js)))
		b = append(b, js...)
		b = append(b, make([]byte, 12)...)
		f.Add(b, int64(len(b)))
	}

	f.Fuzz(func(t *testing.T, b []byte, fileSize int64) {
		h, err := ParseHeader(b, fileSize)
		if err != nil {
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("error %v does not wrap ErrCorrupt", err)
			}
			return
		}
		if h.DataOffset < 8 || h.DataOffset > fileSize || h.DataOffset > int64(len(b)) {
			t.Fatalf("DataOffset %d with %d bytes of a %d-byte file", h.DataOffset, len(b), fileSize)
		}
		dataSize := fileSize - h.DataOffset
		var at int64
		seen := map[string]bool{}
		for _, ti := range h.Tensors {
			if seen[ti.Name] {
				t.Fatalf("duplicate %q accepted", ti.Name)
			}
			seen[ti.Name] = true
			if ti.Begin != at || ti.End < ti.Begin || ti.End > dataSize {
				t.Fatalf("tensor %q [%d,%d) after %d in a %d-byte data section", ti.Name, ti.Begin, ti.End, at, dataSize)
			}
			at = ti.End
			n := int64(ti.DType.Size())
			for _, d := range ti.Shape {
				if d < 0 {
					t.Fatalf("tensor %q: negative dim in %v", ti.Name, ti.Shape)
				}
				if d > 0 && n > math.MaxInt64/int64(d) {
					// Only reachable with a zero dimension elsewhere.
					n = math.MaxInt64
				} else {
					n *= int64(d)
				}
			}
			if slices.Contains(ti.Shape, 0) {
				n = 0
			}
			if n != ti.ByteSize() {
				t.Fatalf("tensor %q: %s%v in %d bytes", ti.Name, ti.DType, ti.Shape, ti.ByteSize())
			}
			if got, ok := h.Lookup(ti.Name); !ok || got.Begin != ti.Begin {
				t.Fatalf("Lookup(%q) = %+v, %v", ti.Name, got, ok)
			}
		}
		if at != dataSize {
			t.Fatalf("tensors cover %d of %d bytes", at, dataSize)
		}
	})
}
