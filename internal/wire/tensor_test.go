package wire

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"
	"unsafe"

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

// TestNonFiniteScan holds the word-wise finiteness scans to their
// element-wise twins: every length up to a few blocks, unaligned starts,
// and each special value (±Inf, quiet and signalling NaN, and the
// largest finite values, which must pass) at every position, alone and
// after an earlier one.
func TestNonFiniteScan(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	f32 := []uint32{0x7f800000, 0xff800000, 0x7fc00000, 0x7f800001, 0xffffffff, 0x7f7fffff, 0xff7fffff, 0x00000001, 0x80000000}
	bf16 := []uint16{0x7f80, 0xff80, 0x7fc0, 0x7f81, 0xffff, 0x7f7f, 0xff7f, 0x0001, 0x8000}
	for n := 0; n <= 40; n++ {
		for off := range 3 {
			// F32: random finite values, then each special at each position.
			buf := make([]byte, off+4*n)
			data := buf[off:]
			for i := range n {
				v := rng.Uint32() &^ 0x40000000 // exponent below all ones
				binary.LittleEndian.PutUint32(data[4*i:], v)
			}
			check := func(what string, got, want int) {
				t.Helper()
				if got != want {
					t.Fatalf("%s n=%d off=%d: got %d, want %d", what, n, off, got, want)
				}
			}
			check("f32 finite", firstNonFiniteF32(data), -1)
			check("f32 plain finite", firstNonFiniteF32Plain(data), -1)
			for pos := range n {
				for _, sp := range f32 {
					old := binary.LittleEndian.Uint32(data[4*pos:])
					binary.LittleEndian.PutUint32(data[4*pos:], sp)
					check("f32", firstNonFiniteF32(data), firstNonFiniteF32Plain(data))
					if later := n - 1; later > pos {
						o2 := binary.LittleEndian.Uint32(data[4*later:])
						binary.LittleEndian.PutUint32(data[4*later:], 0x7f800000)
						check("f32 two", firstNonFiniteF32(data), firstNonFiniteF32Plain(data))
						binary.LittleEndian.PutUint32(data[4*later:], o2)
					}
					binary.LittleEndian.PutUint32(data[4*pos:], old)
				}
			}
			// BF16 likewise.
			buf = make([]byte, off+2*n)
			data = buf[off:]
			for i := range n {
				binary.LittleEndian.PutUint16(data[2*i:], uint16(rng.Uint32())&^0x4000)
			}
			check("bf16 finite", firstNonFiniteBF16(data), -1)
			wide := make([]float32, n)
			check("widen finite", widenBF16(wide, data), -1)
			for i := range n {
				if want := kernels.BF16ToF32(binary.LittleEndian.Uint16(data[2*i:])); math.Float32bits(wide[i]) != math.Float32bits(want) {
					t.Fatalf("widen n=%d off=%d [%d]: %v, want %v", n, off, i, wide[i], want)
				}
			}
			if enc := AppendRows(nil, meshpb.DType_DTYPE_BF16, wide); !slices.Equal(enc, data) {
				t.Fatalf("bf16 re-encoding n=%d off=%d differs", n, off)
			}
			for pos := range n {
				for _, sp := range bf16 {
					old := binary.LittleEndian.Uint16(data[2*pos:])
					binary.LittleEndian.PutUint16(data[2*pos:], sp)
					check("bf16", firstNonFiniteBF16(data), firstNonFiniteBF16Plain(data))
					check("widen", widenBF16(wide, data), firstNonFiniteBF16Plain(data))
					binary.LittleEndian.PutUint16(data[2*pos:], old)
				}
			}
		}
	}
	// The plain scans themselves against math.
	for _, sp := range f32 {
		v := math.Float32frombits(sp)
		want := math.IsNaN(float64(v)) || math.IsInf(float64(v), 0)
		b := binary.LittleEndian.AppendUint32(nil, sp)
		if got := firstNonFiniteF32Plain(b) == 0; got != want {
			t.Errorf("f32 %#x: non-finite %v, want %v", sp, got, want)
		}
	}
	for _, sp := range bf16 {
		v := kernels.BF16ToF32(sp)
		want := math.IsNaN(float64(v)) || math.IsInf(float64(v), 0)
		b := binary.LittleEndian.AppendUint16(nil, sp)
		if got := firstNonFiniteBF16Plain(b) == 0; got != want {
			t.Errorf("bf16 %#x: non-finite %v, want %v", sp, got, want)
		}
	}
}

// TestDecodeRejectsAt: Decode names the first non-finite element, F32
// and BF16, wherever it is.
func TestDecodeRejectsAt(t *testing.T) {
	const n = 70
	x := make([]float32, n)
	for i := range x {
		x[i] = float32(i) - 20
	}
	for _, dt := range []meshpb.DType{meshpb.DType_DTYPE_F32, meshpb.DType_DTYPE_BF16} {
		for _, pos := range []int{0, 7, 8, 31, 32, 63, 69} {
			y := slices.Clone(x)
			y[pos] = float32(math.Inf(-1))
			tn := &meshpb.Tensor{Dtype: dt, Shape: []int64{1, n}, Data: AppendRows(nil, dt, y)}
			err := Decode(make([]float32, n), tn)
			if !errors.Is(err, ErrInvalidTensor) || !strings.Contains(err.Error(), fmt.Sprintf("element %d", pos)) {
				t.Errorf("%v -Inf at %d: %v", dt, pos, err)
			}
		}
		tn := &meshpb.Tensor{Dtype: dt, Shape: []int64{1, n}, Data: AppendRows(nil, dt, x)}
		got := make([]float32, n)
		if err := Decode(got, tn); err != nil || !slices.Equal(got, x) {
			t.Errorf("%v: %v, %v", dt, err, got)
		}
	}
}

// BenchmarkDecode: a 32-row V2-Lite dispatch's worth of rows, F32 and
// BF16 (copy or widen, and the finiteness check).
func BenchmarkDecode(b *testing.B) {
	x := make([]float32, 32*2048)
	for i := range x {
		x[i] = float32(i%977) * 0.25
	}
	dst := make([]float32, len(x))
	for _, dt := range []meshpb.DType{meshpb.DType_DTYPE_F32, meshpb.DType_DTYPE_BF16} {
		tn := &meshpb.Tensor{Dtype: dt, Shape: []int64{32, 2048}, Data: AppendRows(nil, dt, x)}
		b.Run(dt.String(), func(b *testing.B) {
			b.SetBytes(int64(len(tn.Data)))
			for b.Loop() {
				if err := Decode(dst, tn); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// TestAppendBF16Words: the word-wise BF16 encoder gives each value's
// kernels.F32ToBF16 (rounding, NaN quieting) at every length and offset
// into a reused buffer.
func TestAppendBF16Words(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	for n := range 400 {
		x := make([]float32, n%40)
		for i := range x {
			x[i] = math.Float32frombits(rng.Uint32())
			if i%5 == 1 { // NaNs, infinities, rounding carries and ties
				x[i] = math.Float32frombits([]uint32{0x7f800001, 0xffc00000, 0x7f800000, 0xff800000, 0x7f7fffff, 0x3f80ffff, 0x3f808000, 0x3f818000}[rng.IntN(8)])
			}
		}
		prefix := []byte{0xaa, 0xbb, 0xcc}[:n%2+2] // even and odd starts
		got := AppendRows(slices.Clone(prefix), meshpb.DType_DTYPE_BF16, x)
		want := slices.Clone(prefix)
		for _, v := range x {
			want = binary.LittleEndian.AppendUint16(want, kernels.F32ToBF16(v))
		}
		if !slices.Equal(got, want) {
			t.Fatalf("n=%d: %x, want %x", n, got, want)
		}
	}
}

// TestViewF32: the view has Decode's values and rejects what Decode
// rejects, naming the same element; it declines other dtypes and
// unaligned data, which Decode still takes.
func TestViewF32(t *testing.T) {
	x := []float32{1, -2.5, 3e-8, 7, 0, float32(math.Copysign(0, -1)), 65504, 1e30}
	tn := F32Matrix(x, 2, 4)
	v, ok, err := ViewF32(tn)
	if !ok || err != nil || !slices.Equal(v, x) || &v[0] != (*float32)(unsafe.Pointer(&tn.Data[0])) {
		t.Fatalf("view %v ok %v err %v", v, ok, err)
	}
	for pos := range x {
		bad := slices.Clone(x)
		bad[pos] = float32(math.NaN())
		tn := F32Matrix(bad, 2, 4)
		_, ok, err := ViewF32(tn)
		derr := Decode(make([]float32, 8), tn)
		if !ok || err == nil || derr == nil || err.Error() != derr.Error() {
			t.Errorf("NaN at %d: view %v %v, Decode %v", pos, ok, err, derr)
		}
	}
	odd := append([]byte{0}, tn.Data...)[1:]
	if _, ok, _ := ViewF32(&meshpb.Tensor{Dtype: meshpb.DType_DTYPE_F32, Shape: tn.Shape, Data: odd}); ok {
		t.Error("viewed unaligned data")
	}
	bf := &meshpb.Tensor{Dtype: meshpb.DType_DTYPE_BF16, Shape: tn.Shape, Data: AppendRows(nil, meshpb.DType_DTYPE_BF16, x)}
	if _, ok, _ := ViewF32(bf); ok {
		t.Error("viewed BF16 data")
	}
}

// TestNonFiniteFloat holds the SIMD finiteness scan (a dot product with
// zeros) to the element-wise one under every kernel level this machine
// has: lengths around the vector widths and the 1024-value blocks, each
// special value (±Inf, NaNs; the largest finite values, the smallest
// subnormal and -0 must pass) at the edges and at random places, alone
// and after an earlier one.
func TestNonFiniteFloat(t *testing.T) {
	defer kernels.SetISA(kernels.BestISA())
	specials := []uint32{0x7f800000, 0xff800000, 0x7fc00000, 0x7f800001, 0xffffffff, 0x7f7fffff, 0xff7fffff, 0x00000001, 0x80000000}
	rng := rand.New(rand.NewPCG(5, 6))
	var lengths []int
	for n := range 70 {
		lengths = append(lengths, n)
	}
	lengths = append(lengths, 1023, 1024, 1025, 1040, 2047, 2048, 2049, 3001)
	for isa := kernels.ISAGeneric; isa <= kernels.BestISA(); isa++ {
		if err := kernels.SetISA(isa); err != nil {
			t.Fatal(err)
		}
		for _, n := range lengths {
			x := make([]float32, n)
			for i := range x {
				x[i] = math.Float32frombits(rng.Uint32() &^ 0x40000000) // exponent below all ones
			}
			if got := firstNonFiniteFloat(x); got != -1 {
				t.Fatalf("%v n=%d finite: got %d", isa, n, got)
			}
			positions := []int{0, n - 1, n / 2, 1023, 1024, 15, 16, 63, 64}
			for range 4 {
				positions = append(positions, rng.IntN(max(n, 1)))
			}
			for _, pos := range positions {
				if pos < 0 || pos >= n {
					continue
				}
				for _, sp := range specials {
					old := x[pos]
					x[pos] = math.Float32frombits(sp)
					b := unsafe.Slice((*byte)(unsafe.Pointer(&x[0])), 4*n)
					if got, want := firstNonFiniteFloat(x), firstNonFiniteF32Plain(b); got != want {
						t.Fatalf("%v n=%d %#x at %d: got %d, want %d", isa, n, sp, pos, got, want)
					}
					if later := n - 1; later > pos {
						o2 := x[later]
						x[later] = float32(math.NaN())
						if got, want := firstNonFiniteFloat(x), firstNonFiniteF32Plain(b); got != want {
							t.Fatalf("%v n=%d %#x at %d, NaN at %d: got %d, want %d", isa, n, sp, pos, later, got, want)
						}
						x[later] = o2
					}
					x[pos] = old
				}
			}
		}
	}
}
