package safetensors

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"io/fs"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// fillPattern writes bytes that differ per tensor and per position, so a
// swapped, shifted or truncated tensor cannot read back equal.
func fillPattern(s TensorSpec, dst []byte) error {
	h := fnv.New32a()
	h.Write([]byte(s.Name))
	seed := h.Sum32()
	for i := range dst {
		dst[i] = byte(seed>>(8*(i%4))) ^ byte(i*31) ^ byte(i>>8)
	}
	return nil
}

func want(s TensorSpec) []byte {
	n, _ := byteSize(s.DType, s.Shape)
	b := make([]byte, n)
	fillPattern(s, b)
	return b
}

// everyDType has one tensor of each dtype, in awkward sizes, plus a scalar and
// zero-length tensors.
func everyDType() []TensorSpec {
	var specs []TensorSpec
	for i, dt := range AllDTypes {
		specs = append(specs, TensorSpec{Name: fmt.Sprintf("model.layers.%d.%s.weight", i, strings.ToLower(string(dt))), DType: dt, Shape: []int{3, i + 1}})
	}
	return append(specs,
		TensorSpec{Name: "scalar", DType: F32, Shape: []int{}},
		TensorSpec{Name: "empty", DType: BF16, Shape: []int{0, 7}},
		TensorSpec{Name: "big", DType: F64, Shape: []int{5, 9}},
		TensorSpec{Name: "empty.last", DType: I64, Shape: []int{4, 0}},
	)
}

func checkTensors(t *testing.T, get func(string) (*Tensor, error), specs []TensorSpec) {
	t.Helper()
	for _, s := range specs {
		tn, err := get(s.Name)
		if err != nil {
			t.Fatalf("Tensor(%q): %v", s.Name, err)
		}
		if tn.Name != s.Name || tn.DType != s.DType || !slices.Equal(tn.Shape, s.Shape) {
			t.Errorf("Tensor(%q) = %s %s%v, want %s%v", s.Name, tn.Name, tn.DType, tn.Shape, s.DType, s.Shape)
		}
		if w := want(s); !bytes.Equal(tn.Data, w) {
			t.Errorf("Tensor(%q).Data = %x, want %x", s.Name, tn.Data, w)
		}
		if n := tn.NumElements(); n*s.DType.Size() != len(tn.Data) {
			t.Errorf("Tensor(%q): %d elements of %d bytes but %d data bytes", s.Name, n, s.DType.Size(), len(tn.Data))
		}
		if cap(tn.Data) != len(tn.Data) {
			t.Errorf("Tensor(%q): cap %d > len %d lets an append overwrite the next tensor", s.Name, cap(tn.Data), len(tn.Data))
		}
		if err := tn.Check(s.DType, s.Shape...); err != nil {
			t.Errorf("Check: %v", err)
		}
	}
}

func TestDType(t *testing.T) {
	sizes := map[DType]int{F64: 8, F32: 4, F16: 2, BF16: 2, F8E4M3: 1, F8E5M2: 1, I64: 8, I32: 4, I16: 2, I8: 1, U8: 1, Bool: 1}
	if len(sizes) != len(AllDTypes) {
		t.Fatalf("AllDTypes has %d, table %d", len(AllDTypes), len(sizes))
	}
	for _, dt := range AllDTypes {
		if dt.Size() != sizes[dt] {
			t.Errorf("%s.Size() = %d, want %d", dt, dt.Size(), sizes[dt])
		}
		got, err := ParseDType(string(dt))
		if err != nil || got != dt {
			t.Errorf("ParseDType(%q) = %q, %v", dt, got, err)
		}
	}
	for _, s := range []string{"", "bf16", "F8_E4M3FN", "U16", "BOOL "} {
		if _, err := ParseDType(s); !errors.Is(err, ErrCorrupt) {
			t.Errorf("ParseDType(%q) err = %v, want ErrCorrupt", s, err)
		}
		if DType(s).Size() != 0 {
			t.Errorf("DType(%q).Size() != 0", s)
		}
	}
}

func TestRoundTripFile(t *testing.T) {
	specs := everyDType()
	path := filepath.Join(t.TempDir(), "x.safetensors")
	if err := WriteFile(path, specs, fillPattern); err != nil {
		t.Fatal(err)
	}
	f, err := OpenFile(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := f.Header()
	if h.DataOffset%8 != 0 {
		t.Errorf("DataOffset %d not 8-aligned", h.DataOffset)
	}
	if h.Metadata["format"] != "pt" {
		t.Errorf("metadata = %v, want format pt", h.Metadata)
	}
	if len(h.Tensors) != len(specs) {
		t.Fatalf("%d tensors, want %d", len(h.Tensors), len(specs))
	}
	if !slices.IsSortedFunc(h.Tensors, func(a, b TensorInfo) int { return cmpInt64(a.Begin, b.Begin) }) {
		t.Errorf("Tensors not sorted by Begin")
	}
	checkTensors(t, f.Tensor, specs)
	if err := f.Prefetch("big", "empty"); err != nil {
		t.Errorf("Prefetch: %v", err)
	}
	if _, err := f.Tensor("nope"); !errors.Is(err, ErrNotFound) || !strings.Contains(err.Error(), `"nope"`) {
		t.Errorf("missing tensor err = %v", err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := f.Tensor("big"); !errors.Is(err, fs.ErrClosed) {
		t.Errorf("Tensor after Close err = %v, want fs.ErrClosed", err)
	}
	if err := f.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	// The single file is also a checkpoint, by directory and by path.
	for _, p := range []string{filepath.Dir(path), path} {
		c, err := OpenCheckpoint(p)
		if err != nil {
			t.Fatal(err)
		}
		checkTensors(t, c.Tensor, specs)
		c.Close()
	}
}

func TestRoundTripSharded(t *testing.T) {
	specs := everyDType()
	var largest, total int64
	for _, s := range specs {
		n, _ := byteSize(s.DType, s.Shape)
		largest, total = max(largest, n), total+n
	}
	tests := []struct {
		name     string
		maxShard int64
	}{
		{"one shard", total},
		{"huge limit", 1 << 40},
		{"limit of the largest", largest},
		{"every tensor alone", 1},
		{"mid", 64},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			if err := WriteSharded(dir, specs, tt.maxShard, fillPattern); err != nil {
				t.Fatal(err)
			}
			var idx struct {
				Metadata  map[string]int64
				WeightMap map[string]string `json:"weight_map"`
			}
			b, err := os.ReadFile(filepath.Join(dir, IndexFile))
			if err != nil {
				t.Fatal(err)
			}
			if err := json.Unmarshal(b, &idx); err != nil {
				t.Fatal(err)
			}
			if idx.Metadata["total_size"] != total {
				t.Errorf("total_size = %d, want %d", idx.Metadata["total_size"], total)
			}
			ents, _ := os.ReadDir(dir)
			var shards []string
			for _, e := range ents {
				if e.Name() != IndexFile {
					shards = append(shards, e.Name())
				}
			}
			for i, s := range shards {
				if w := fmt.Sprintf("model-%05d-of-%05d.safetensors", i+1, len(shards)); s != w {
					t.Errorf("file %d is %q, want %q (no temporaries left)", i, s, w)
				}
			}
			// Shard sizes: each within the limit unless it holds one tensor;
			// and no two consecutive shards could have been merged.
			var sizes []int64
			for _, s := range shards {
				f, err := OpenFile(filepath.Join(dir, s))
				if err != nil {
					t.Fatal(err)
				}
				var sum int64
				nonEmpty := 0
				for _, ti := range f.Header().Tensors {
					sum += ti.ByteSize()
					if ti.ByteSize() > 0 {
						nonEmpty++
					}
					if idx.WeightMap[ti.Name] != s {
						t.Errorf("index puts %q in %q, found in %q", ti.Name, idx.WeightMap[ti.Name], s)
					}
				}
				if sum > tt.maxShard && nonEmpty > 1 {
					t.Errorf("%s: %d bytes of data in %d tensors exceeds %d", s, sum, nonEmpty, tt.maxShard)
				}
				sizes = append(sizes, sum)
				f.Close()
			}
			if tt.maxShard >= total && len(shards) != 1 {
				t.Errorf("%d shards, want 1", len(shards))
			}
			if tt.maxShard == 1 && len(shards) < len(specs)-2 { // zero-length tensors may share
				t.Errorf("%d shards for %d tensors with a 1-byte limit", len(shards), len(specs))
			}
			c, err := OpenCheckpoint(dir)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			if len(c.Files()) != len(shards) {
				t.Errorf("%d files open, want %d", len(c.Files()), len(shards))
			}
			checkTensors(t, c.Tensor, specs)
			names := c.Names()
			if len(names) != len(specs) || !slices.IsSorted(names) {
				t.Errorf("Names() = %v", names)
			}
			for _, s := range specs {
				ti, ok := c.Info(s.Name)
				if !ok || ti.DType != s.DType || !slices.Equal(ti.Shape, s.Shape) || !c.Has(s.Name) {
					t.Errorf("Info(%q) = %+v, %v", s.Name, ti, ok)
				}
			}
			if err := c.Prefetch(names...); err != nil {
				t.Errorf("Prefetch: %v", err)
			}
			if err := c.Prefetch("big", "nope"); !errors.Is(err, ErrNotFound) || !strings.Contains(err.Error(), `"nope"`) {
				t.Errorf("Prefetch(nope) err = %v", err)
			}
			if _, err := c.Tensor("nope"); !errors.Is(err, ErrNotFound) || !strings.Contains(err.Error(), `"nope"`) {
				t.Errorf("Tensor(nope) err = %v", err)
			}
			if c.Has("nope") {
				t.Error("Has(nope)")
			}
			if _, ok := c.Info("nope"); ok {
				t.Error("Info(nope) ok")
			}
		})
	}
}

func TestTensorCheck(t *testing.T) {
	tn := &Tensor{Name: "w", DType: BF16, Shape: []int{2, 3}, Data: make([]byte, 12)}
	for _, tt := range []struct {
		dt    DType
		shape []int
		ok    bool
	}{
		{BF16, []int{2, 3}, true},
		{F16, []int{2, 3}, false},
		{BF16, []int{3, 2}, false},
		{BF16, []int{6}, false},
		{BF16, nil, false},
	} {
		err := tn.Check(tt.dt, tt.shape...)
		if (err == nil) != tt.ok || (err != nil && (!errors.Is(err, ErrShape) || !strings.Contains(err.Error(), `"w"`))) {
			t.Errorf("Check(%s, %v) = %v, want ok=%v", tt.dt, tt.shape, err, tt.ok)
		}
	}
}

func TestWriteErrors(t *testing.T) {
	good := []TensorSpec{{Name: "a", DType: F32, Shape: []int{2}}}
	fillErr := errors.New("disk on fire")
	tests := []struct {
		name  string
		specs []TensorSpec
		fill  FillFunc
		is    error
	}{
		{"no tensors", nil, fillPattern, nil},
		{"unknown dtype", []TensorSpec{{Name: "a", DType: "F7", Shape: []int{1}}}, fillPattern, nil},
		{"negative dim", []TensorSpec{{Name: "a", DType: F32, Shape: []int{-1}}}, fillPattern, ErrShape},
		{"overflow", []TensorSpec{{Name: "a", DType: F64, Shape: []int{math.MaxInt / 2, 3}}}, fillPattern, ErrShape},
		{"duplicate", append(slices.Clone(good), good...), fillPattern, nil},
		{"empty name", []TensorSpec{{Name: "", DType: F32}}, fillPattern, nil},
		{"metadata name", []TensorSpec{{Name: metadataKey, DType: F32}}, fillPattern, nil},
		{"fill fails", good, func(TensorSpec, []byte) error { return fillErr }, fillErr},
		{"second shard fill fails", append(slices.Clone(good), TensorSpec{Name: "b", DType: F32, Shape: []int{4}}), func(s TensorSpec, b []byte) error {
			if s.Name == "b" {
				return fillErr
			}
			return nil
		}, fillErr},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			errs := []error{
				WriteSharded(dir, tt.specs, 8, tt.fill),
				WriteFile(filepath.Join(dir, SingleFile), tt.specs, tt.fill),
			}
			for _, err := range errs {
				if err == nil || (tt.is != nil && !errors.Is(err, tt.is)) {
					t.Errorf("err = %v, want an error wrapping %v", err, tt.is)
				}
			}
			// A failed write leaves nothing behind, temporaries included.
			if ents, _ := os.ReadDir(dir); len(ents) != 0 {
				t.Errorf("left %v", ents)
			}
		})
	}
	if err := WriteSharded(t.TempDir(), good, 0, fillPattern); err == nil {
		t.Error("maxShardBytes 0 accepted")
	}
}

// TestRewriteReplacesIndex: writing a checkpoint over an older one with more
// shards leaves a consistent checkpoint whose index names only the new shards.
func TestRewriteReplacesIndex(t *testing.T) {
	dir := t.TempDir()
	specs := everyDType()
	if err := WriteSharded(dir, specs, 1, fillPattern); err != nil {
		t.Fatal(err)
	}
	if err := WriteSharded(dir, specs[:2], 1<<20, fillPattern); err != nil {
		t.Fatal(err)
	}
	c, err := OpenCheckpoint(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if len(c.Names()) != 2 || len(c.Files()) != 1 {
		t.Errorf("names %v in %d files", c.Names(), len(c.Files()))
	}
	checkTensors(t, c.Tensor, specs[:2])
}

// validFile is a small valid file whose header bytes the corruption tests
// edit: a.w is BF16 [2,3] at [0,12), b.w F32 [4] at [12,28), c.w I8 [0,5]
// at [28,28).
func validFile(t testing.TB) []byte {
	t.Helper()
	specs := []TensorSpec{
		{Name: "a.w", DType: BF16, Shape: []int{2, 3}},
		{Name: "b.w", DType: F32, Shape: []int{4}},
		{Name: "c.w", DType: I8, Shape: []int{0, 5}},
	}
	path := filepath.Join(t.TempDir(), "v.safetensors")
	if err := WriteFile(path, specs, fillPattern); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// edit replaces old with new in b's header (exactly once) and fixes the
// length prefix if the header's length changed.
func edit(t testing.TB, b []byte, old, new string) []byte {
	t.Helper()
	n := binary.LittleEndian.Uint64(b)
	hdr := b[8 : 8+n]
	if bytes.Count(hdr, []byte(old)) != 1 {
		t.Fatalf("%q is not in the header exactly once: %s", old, hdr)
	}
	hdr = bytes.Replace(hdr, []byte(old), []byte(new), 1)
	out := binary.LittleEndian.AppendUint64(nil, uint64(len(hdr)))
	out = append(out, hdr...)
	return append(out, b[8+n:]...)
}

func setLen(b []byte, n uint64) []byte {
	b = slices.Clone(b)
	binary.LittleEndian.PutUint64(b, n)
	return b
}

func TestCorruptFiles(t *testing.T) {
	v := validFile(t)
	hdrLen := binary.LittleEndian.Uint64(v)
	tests := []struct {
		name   string
		data   []byte
		msg    string // a substring the error must contain, besides the path
		isShap bool   // also wraps ErrShape
	}{
		{"empty file", nil, "truncated", false},
		{"shorter than the length", v[:7], "truncated", false},
		{"truncated in the header", v[:20], "past the end", false},
		{"truncated in the data", v[:len(v)-1], "outside", false},
		{"trailing bytes", append(slices.Clone(v), 0), "cover", false},
		{"length beyond file", setLen(v, uint64(len(v))), "past the end", false},
		{"length over 100 MB", setLen(v, 100_000_001), "limit", false},
		{"length huge", setLen(v, 1<<63), "limit", false},
		{"length short", setLen(v, hdrLen-8), "header", false},
		{"not an object", edit(t, v, `{"__metadata__"`, `["__metadata__"`), "'{'", false},
		{"bad JSON", edit(t, v, `"a.w":{`, `"a.w":[`), `"a.w"`, false},
		{"data after object", edit(t, v, `]}}`, `]}}x`), "after", false},
		{"unknown dtype", edit(t, v, `"BF16"`, `"BX16"`), `"a.w"`, false},
		{"dtype not a string", edit(t, v, `"BF16"`, `16`), `"a.w"`, false},
		{"missing dtype", edit(t, v, `"dtype":"BF16",`, ``), `"a.w"`, false},
		{"missing shape", edit(t, v, `"shape":[4],`, ``), `"b.w"`, false},
		{"missing offsets", edit(t, v, `,"data_offsets":[12,28]`, ``), `"b.w"`, false},
		{"upper-case field", edit(t, v, `"dtype":"BF16"`, `"DTYPE":"BF16"`), `"a.w"`, false},
		{"duplicate field", edit(t, v, `"dtype":"BF16"`, `"dtype":"BF16","dtype":"F16"`), `duplicate key "dtype"`, false},
		{"null shape", edit(t, v, `[2,3]`, `null`), `"a.w"`, false},
		{"three offsets", edit(t, v, `[12,28]`, `[12,28,28]`), `"b.w"`, false},
		{"shape/size mismatch", edit(t, v, `[2,3]`, `[3,3]`), `"a.w"`, true},
		{"negative dim", edit(t, v, `[2,3]`, `[-2,3]`), `"a.w"`, true},
		{"fractional dim", edit(t, v, `[2,3]`, `[2.5,3]`), `"a.w"`, false},
		{"overflowing shape", edit(t, v, `[2,3]`, `[4294967296,4294967296,4]`), `"a.w"`, true},
		{"overflow then zero", edit(t, v, `[0,5]`, `[4294967296,4294967296,4,0]`), `"c.w"`, true},
		{"dim beyond int64", edit(t, v, `[2,3]`, `[99999999999999999999,3]`), `"a.w"`, false},
		{"end out of range", edit(t, v, `[12,28]`, `[12,99]`), `"b.w"`, false},
		{"begin after end", edit(t, v, `[12,28]`, `[28,12]`), `"b.w"`, false},
		{"negative begin", edit(t, v, `[0,12]`, `[-1,11]`), `"a.w"`, false},
		{"overlap", edit(t, v, `[12,28]`, `[10,26]`), "overlaps", false},
		{"hole", edit(t, edit(t, v, `[12,28]`, `[14,30]`), `[28,28]`, `[30,30]`), "hole", false},
		{"duplicate name", edit(t, v, `"b.w"`, `"a.w"`), `duplicate key "a.w"`, false},
		{"metadata not strings", edit(t, v, `{"format":"pt"}`, `{"format":1}`), "format", false},
		{"metadata not an object", edit(t, v, `{"format":"pt"}`, `"pt"`), "__metadata__", false},
		{"entry not an object", edit(t, v, `"c.w":{"dtype":"I8","shape":[0,5],"data_offsets":[28,28]}`, `"c.w":7`), `"c.w"`, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "bad.safetensors")
			if err := os.WriteFile(path, tt.data, 0o644); err != nil {
				t.Fatal(err)
			}
			f, err := OpenFile(path)
			if err == nil {
				f.Close()
				t.Fatalf("OpenFile accepted it")
			}
			if !errors.Is(err, ErrCorrupt) {
				t.Errorf("err = %v, want ErrCorrupt", err)
			}
			if errors.Is(err, ErrShape) != tt.isShap {
				t.Errorf("err = %v, ErrShape: %v, want %v", err, errors.Is(err, ErrShape), tt.isShap)
			}
			if !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), tt.msg) {
				t.Errorf("err = %q, want it to name %s and contain %q", err, path, tt.msg)
			}
		})
	}
}

func TestParseHeaderValid(t *testing.T) {
	tests := []struct {
		name   string
		js     string
		data   int64
		tensor []string // in Begin order
	}{
		{"no tensors", `{}`, 0, nil},
		{"null metadata", `{"__metadata__":null}`, 0, nil},
		{"whitespace around", "{ \n}   ", 0, nil},
		{"zero-length tensors share an offset", `{"z":{"dtype":"F32","shape":[0],"data_offsets":[4,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]},"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"y":{"dtype":"F32","shape":[0],"data_offsets":[4,4]}}  `, 8, []string{"a", "y", "z", "b"}},
		{"extra fields ignored", `{"a":{"dtype":"BOOL","shape":[],"data_offsets":[0,1],"extra":1}}`, 1, []string{"a"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := binary.LittleEndian.AppendUint64(nil, uint64(len(tt.js)))
			b = append(b, tt.js...)
			h, err := ParseHeader(b, int64(len(b))+tt.data)
			if err != nil {
				t.Fatal(err)
			}
			var got []string
			for _, ti := range h.Tensors {
				got = append(got, ti.Name)
			}
			if !slices.Equal(got, tt.tensor) || h.DataOffset != int64(8+len(tt.js)) {
				t.Errorf("tensors %v offset %d, want %v %d", got, h.DataOffset, tt.tensor, 8+len(tt.js))
			}
		})
	}
}

func TestCheckpointErrors(t *testing.T) {
	specs := everyDType()
	// The fixture puts every non-empty tensor in a shard of its own.
	nShards := 0
	for _, s := range specs {
		if n, _ := byteSize(s.DType, s.Shape); n > 0 {
			nShards++
		}
	}
	sh := func(k int) string { return fmt.Sprintf("model-%05d-of-%05d.safetensors", k, nShards) }
	sharded := func(t *testing.T) string {
		dir := t.TempDir()
		if err := WriteSharded(dir, specs, 1, fillPattern); err != nil {
			t.Fatal(err)
		}
		if ents, _ := os.ReadDir(dir); len(ents) != nShards+1 {
			t.Fatalf("fixture has %d files, want %d shards and an index", len(ents), nShards)
		}
		return dir
	}
	editIndex := func(t *testing.T, dir string, f func(m map[string]string)) {
		b, err := os.ReadFile(filepath.Join(dir, IndexFile))
		if err != nil {
			t.Fatal(err)
		}
		var idx struct {
			Metadata  map[string]any    `json:"metadata"`
			WeightMap map[string]string `json:"weight_map"`
		}
		if err := json.Unmarshal(b, &idx); err != nil {
			t.Fatal(err)
		}
		f(idx.WeightMap)
		b, _ = json.Marshal(idx)
		if err := os.WriteFile(filepath.Join(dir, IndexFile), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	writeIndex := func(s string) func(t *testing.T, dir string) {
		return func(t *testing.T, dir string) {
			if err := os.WriteFile(filepath.Join(dir, IndexFile), []byte(s), 0o644); err != nil {
				t.Fatal(err)
			}
		}
	}
	tests := []struct {
		name  string
		setup func(t *testing.T, dir string)
		is    error
		msg   []string
	}{
		{"missing shard", func(t *testing.T, dir string) {
			os.Remove(filepath.Join(dir, sh(2)))
		}, ErrNotFound, []string{sh(2)}},
		{"tensor missing from its shard", func(t *testing.T, dir string) {
			editIndex(t, dir, func(m map[string]string) { m["big"] = sh(1) })
		}, ErrNotFound, []string{`"big"`, sh(1)}},
		{"corrupt shard", func(t *testing.T, dir string) {
			os.WriteFile(filepath.Join(dir, sh(3)), []byte("garbage!!"), 0o644)
		}, ErrCorrupt, []string{sh(3)}},
		{"shard outside dir", func(t *testing.T, dir string) {
			editIndex(t, dir, func(m map[string]string) { m["big"] = "../" + sh(1) })
		}, ErrCorrupt, []string{`"big"`, "../"}},
		{"shard is a dir", func(t *testing.T, dir string) {
			os.Mkdir(filepath.Join(dir, "sub"), 0o755)
			editIndex(t, dir, func(m map[string]string) { m["big"] = "sub" })
		}, ErrNotFound, []string{`"big"`, "sub"}},
		{"bad index JSON", writeIndex(`{"weight_map":`), ErrCorrupt, []string{IndexFile}},
		{"no weight_map", writeIndex(`{"metadata":{}}`), ErrCorrupt, []string{"weight_map"}},
		{"empty weight_map", writeIndex(`{"weight_map":{}}`), ErrCorrupt, []string{"empty"}},
		{"weight_map not strings", writeIndex(`{"weight_map":{"big":1}}`), ErrCorrupt, []string{`"big"`}},
		{"duplicate in weight_map", writeIndex(`{"weight_map":{"big":"` + sh(1) + `","big":"` + sh(2) + `"}}`), ErrCorrupt, []string{`duplicate key "big"`}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := sharded(t)
			tt.setup(t, dir)
			c, err := OpenCheckpoint(dir)
			if err == nil {
				c.Close()
				t.Fatal("OpenCheckpoint accepted it")
			}
			if !errors.Is(err, tt.is) {
				t.Errorf("err = %v, want %v", err, tt.is)
			}
			for _, m := range tt.msg {
				if !strings.Contains(err.Error(), m) {
					t.Errorf("err = %q, want it to contain %q", err, m)
				}
			}
		})
	}
}

// TestIndexSubset: an index may name a subset of its shards' tensors; only
// those are the checkpoint's.
func TestIndexSubset(t *testing.T) {
	dir := t.TempDir()
	specs := everyDType()
	if err := WriteSharded(dir, specs, 1<<20, fillPattern); err != nil {
		t.Fatal(err)
	}
	idx := `{"metadata":{"total_size":1},"weight_map":{"big":"model-00001-of-00001.safetensors"}}`
	if err := os.WriteFile(filepath.Join(dir, IndexFile), []byte(idx), 0o644); err != nil {
		t.Fatal(err)
	}
	c, err := OpenCheckpoint(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if !slices.Equal(c.Names(), []string{"big"}) || c.Has("scalar") {
		t.Errorf("Names() = %v", c.Names())
	}
	if c.Metadata()["total_size"] != 1.0 {
		t.Errorf("Metadata() = %v", c.Metadata())
	}
}

func TestCheckpointSingleFileChoice(t *testing.T) {
	a := []TensorSpec{{Name: "a", DType: F32, Shape: []int{1}}}
	b := []TensorSpec{{Name: "b", DType: F32, Shape: []int{1}}}
	tests := []struct {
		name  string
		files map[string][]TensorSpec
		want  string // the tensor found, or "" for an error
		is    error
	}{
		{"empty dir", nil, "", ErrNotFound},
		{"one odd name", map[string][]TensorSpec{"weights.safetensors": a}, "a", nil},
		{"model.safetensors preferred", map[string][]TensorSpec{"consolidated.safetensors": a, SingleFile: b}, "b", nil},
		{"several, no index", map[string][]TensorSpec{"x.safetensors": a, "y.safetensors": b}, "", ErrNotFound},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			for name, specs := range tt.files {
				if err := WriteFile(filepath.Join(dir, name), specs, fillPattern); err != nil {
					t.Fatal(err)
				}
			}
			c, err := OpenCheckpoint(dir)
			if tt.want == "" {
				if !errors.Is(err, tt.is) || !strings.Contains(err.Error(), dir) {
					t.Fatalf("err = %v, want %v naming %s", err, tt.is, dir)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			if !slices.Equal(c.Names(), []string{tt.want}) {
				t.Errorf("Names() = %v, want [%s]", c.Names(), tt.want)
			}
		})
	}
	if _, err := OpenCheckpoint(filepath.Join(t.TempDir(), "nope")); !errors.Is(err, ErrNotFound) {
		t.Errorf("missing dir err = %v", err)
	}
}
