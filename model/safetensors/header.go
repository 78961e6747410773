package safetensors

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"slices"
	"strconv"
)

// MaxHeaderSize is the largest JSON header accepted, the same limit as the
// reference Rust implementation: it bounds what a hostile length prefix can make
// us allocate or parse.
const MaxHeaderSize = 100_000_000

const metadataKey = "__metadata__"

// TensorInfo is one header entry. Begin and End are byte offsets into the
// file's data section (the bytes after the header), End exclusive.
type TensorInfo struct {
	Name  string
	DType DType
	Shape []int
	Begin int64
	End   int64
}

// NumElements is the product of Shape (1 for a scalar).
func (ti TensorInfo) NumElements() int { return numElements(ti.Shape) }

// ByteSize is End-Begin.
func (ti TensorInfo) ByteSize() int64 { return ti.End - ti.Begin }

// Header is a parsed safetensors header.
type Header struct {
	// Tensors sorted by Begin (ties, which only zero-length tensors can make,
	// by End then Name).
	Tensors []TensorInfo
	// Metadata is the "__metadata__" map; nil when the header has none.
	Metadata map[string]string
	// DataOffset is where the data section starts in the file: 8 + header length.
	DataOffset int64

	index map[string]int
}

// Lookup returns the entry for name.
func (h *Header) Lookup(name string) (TensorInfo, bool) {
	if h.index == nil {
		h.buildIndex()
	}
	i, ok := h.index[name]
	if !ok {
		return TensorInfo{}, false
	}
	return h.Tensors[i], true
}

func (h *Header) buildIndex() {
	h.index = make(map[string]int, len(h.Tensors))
	for i, t := range h.Tensors {
		h.index[t.Name] = i
	}
}

// rawTensor is a header entry as it appears in JSON. Pointers tell a missing
// (or null) field from a zero one.
type rawTensor struct {
	DType       *string
	Shape       *[]int64
	DataOffsets *[]int64
}

// ParseHeader parses the 8-byte little-endian header length and the JSON header
// at the start of b, which holds (at least) the first bytes of a file of
// fileSize bytes. Everything is validated, following the format's rules as the
// reference implementation enforces them: the length is at most MaxHeaderSize
// and within the file; the header is one JSON object and nothing else but
// whitespace; names are unique; dtypes are known; dimensions are non-negative
// and their product times the element size equals End-Begin without overflow;
// and the tensors tile the data section exactly: no overlap, no hole, nothing
// after the last one (so a file cannot smuggle unindexed bytes, and a truncated
// file is always detected). Errors wrap ErrCorrupt (and ErrShape for shape
// problems) and name the tensor. ParseHeader never panics.
func ParseHeader(b []byte, fileSize int64) (*Header, error) {
	if fileSize < 8 || len(b) < 8 {
		return nil, fmt.Errorf("%w: truncated: %d bytes, need at least 8 for the header length", ErrCorrupt, min(fileSize, int64(len(b))))
	}
	n := binary.LittleEndian.Uint64(b[:8])
	if n > MaxHeaderSize {
		return nil, fmt.Errorf("%w: header length %d exceeds the %d limit", ErrCorrupt, n, MaxHeaderSize)
	}
	if int64(n) > fileSize-8 {
		return nil, fmt.Errorf("%w: header length %d runs past the end of the %d-byte file", ErrCorrupt, n, fileSize)
	}
	if uint64(len(b)-8) < n {
		return nil, fmt.Errorf("%w: truncated: header of %d bytes but only %d given", ErrCorrupt, n, len(b)-8)
	}
	h := &Header{DataOffset: 8 + int64(n)}
	dataSize := fileSize - h.DataOffset
	js := b[8 : 8+n]
	if len(js) == 0 || js[0] != '{' {
		return nil, fmt.Errorf("%w: header does not start with '{'", ErrCorrupt)
	}

	entries, err := decodeObject(js)
	if err != nil {
		return nil, fmt.Errorf("%w: header: %v", ErrCorrupt, err)
	}
	h.Tensors = make([]TensorInfo, 0, len(entries))
	for _, e := range entries {
		if e.key == metadataKey {
			md, err := parseMetadata(e.value)
			if err != nil {
				return nil, err
			}
			h.Metadata = md
			continue
		}
		ti, err := parseTensor(e.key, e.value, dataSize)
		if err != nil {
			return nil, err
		}
		h.Tensors = append(h.Tensors, ti)
	}

	slices.SortFunc(h.Tensors, func(a, b TensorInfo) int {
		if c := cmpInt64(a.Begin, b.Begin); c != 0 {
			return c
		}
		if c := cmpInt64(a.End, b.End); c != 0 {
			return c
		}
		if a.Name < b.Name {
			return -1
		}
		if a.Name > b.Name {
			return 1
		}
		return 0
	})
	var at int64
	var prev string
	for _, t := range h.Tensors {
		switch {
		case t.Begin < at:
			return nil, fmt.Errorf("%w: tensor %q [%d,%d) overlaps tensor %q ending at %d", ErrCorrupt, t.Name, t.Begin, t.End, prev, at)
		case t.Begin > at:
			return nil, fmt.Errorf("%w: hole in data section: bytes [%d,%d) before tensor %q belong to no tensor", ErrCorrupt, at, t.Begin, t.Name)
		}
		at, prev = t.End, t.Name
	}
	if at != dataSize {
		return nil, fmt.Errorf("%w: data section is %d bytes but tensors cover only %d (trailing bytes or truncated file)", ErrCorrupt, dataSize, at)
	}
	h.buildIndex()
	return h, nil
}

func cmpInt64(a, b int64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

func parseMetadata(raw json.RawMessage) (map[string]string, error) {
	if string(raw) == "null" {
		return nil, nil
	}
	entries, err := decodeObject(raw)
	if err != nil {
		return nil, fmt.Errorf("%w: %s: %v", ErrCorrupt, metadataKey, err)
	}
	md := make(map[string]string, len(entries))
	for _, e := range entries {
		var s string
		if err := json.Unmarshal(e.value, &s); err != nil {
			return nil, fmt.Errorf("%w: %s[%q]: value is not a string", ErrCorrupt, metadataKey, e.key)
		}
		md[e.key] = s
	}
	return md, nil
}

func parseTensor(name string, raw json.RawMessage, dataSize int64) (TensorInfo, error) {
	// Exact, case-sensitive field names with duplicates rejected:
	// json.Unmarshal into a struct would accept "DTYPE" and let a second
	// "dtype" silently override the first.
	fields, err := decodeObject(raw)
	if err != nil {
		return TensorInfo{}, fmt.Errorf("%w: tensor %q: %v", ErrCorrupt, name, err)
	}
	var rt rawTensor
	for _, fl := range fields {
		var dst any
		switch fl.key {
		case "dtype":
			dst = &rt.DType
		case "shape":
			dst = &rt.Shape
		case "data_offsets":
			dst = &rt.DataOffsets
		default:
			continue // unknown fields are ignored, as by the reference reader
		}
		if err := json.Unmarshal(fl.value, dst); err != nil {
			return TensorInfo{}, fmt.Errorf("%w: tensor %q: %s: %v", ErrCorrupt, name, fl.key, err)
		}
	}
	if rt.DType == nil || rt.Shape == nil || rt.DataOffsets == nil {
		return TensorInfo{}, fmt.Errorf("%w: tensor %q: needs dtype, shape and data_offsets", ErrCorrupt, name)
	}
	dt, err := ParseDType(*rt.DType)
	if err != nil {
		return TensorInfo{}, fmt.Errorf("tensor %q: %w", name, err)
	}
	offs := *rt.DataOffsets
	if len(offs) != 2 {
		return TensorInfo{}, fmt.Errorf("%w: tensor %q: data_offsets has %d entries, want 2", ErrCorrupt, name, len(offs))
	}
	begin, end := offs[0], offs[1]
	if begin < 0 || end < begin || end > dataSize {
		return TensorInfo{}, fmt.Errorf("%w: tensor %q: data_offsets [%d,%d) outside the %d-byte data section", ErrCorrupt, name, begin, end, dataSize)
	}
	shape := make([]int, len(*rt.Shape))
	for i, d := range *rt.Shape {
		if d < 0 || d > math.MaxInt {
			return TensorInfo{}, fmt.Errorf("%w: %w: tensor %q: dimension %d is %d", ErrCorrupt, ErrShape, name, i, d)
		}
		shape[i] = int(d)
	}
	size, ok := byteSize(dt, shape)
	if !ok {
		return TensorInfo{}, fmt.Errorf("%w: %w: tensor %q: shape %v of %s overflows", ErrCorrupt, ErrShape, name, shape, dt)
	}
	if size != end-begin {
		return TensorInfo{}, fmt.Errorf("%w: %w: tensor %q: shape %v of %s needs %d bytes but data_offsets [%d,%d) span %d", ErrCorrupt, ErrShape, name, shape, dt, size, begin, end, end-begin)
	}
	return TensorInfo{Name: name, DType: dt, Shape: shape, Begin: begin, End: end}, nil
}

// byteSize returns the byte size of a tensor, false if it does not fit an
// int64 (or an int, so that it can be sliced) or the dtype is unknown.
func byteSize(dt DType, shape []int) (int64, bool) {
	size := int64(dt.Size())
	if size == 0 {
		return 0, false
	}
	for _, d := range shape {
		if d < 0 {
			return 0, false
		}
		if d == 0 {
			// Zero elements: still reject a later overflowing or negative
			// dimension, so keep checking signs but not products.
			size = 0
			continue
		}
		if size > math.MaxInt64/int64(d) {
			return 0, false
		}
		size *= int64(d)
	}
	if size > math.MaxInt {
		return 0, false
	}
	return size, true
}

func numElements(shape []int) int {
	n := 1
	for _, d := range shape {
		n *= d
	}
	return n
}

type jsonEntry struct {
	key   string
	value json.RawMessage
}

// decodeObject decodes one JSON object into its entries in file order,
// rejecting duplicate keys (encoding/json would silently keep the last, which
// for a header means two tensors claiming one name) and anything after the
// closing brace other than whitespace.
func decodeObject(js []byte) ([]jsonEntry, error) {
	dec := json.NewDecoder(bytes.NewReader(js))
	dec.UseNumber()
	tok, err := dec.Token()
	if err != nil {
		return nil, err
	}
	if d, ok := tok.(json.Delim); !ok || d != '{' {
		return nil, errors.New("not a JSON object")
	}
	var out []jsonEntry
	seen := make(map[string]bool)
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return nil, err
		}
		key, ok := tok.(string)
		if !ok {
			return nil, fmt.Errorf("object key is %v, not a string", tok)
		}
		if seen[key] {
			return nil, fmt.Errorf("duplicate key %s", strconv.Quote(key))
		}
		seen[key] = true
		var v json.RawMessage
		if err := dec.Decode(&v); err != nil {
			return nil, fmt.Errorf("value of %s: %v", strconv.Quote(key), err)
		}
		out = append(out, jsonEntry{key, v})
	}
	if _, err := dec.Token(); err != nil { // the closing '}'
		return nil, err
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, errors.New("data after the JSON object")
	}
	return out, nil
}
