package wire

import (
	"bytes"
	"math"
	"math/rand/v2"
	"slices"
	"testing"
	"unsafe"

	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/proto"

	meshpb "github.com/expertmesh/expertmesh/proto"
)

func randomRequest(rng *rand.Rand) *meshpb.DispatchRequest {
	rows, cols := 1+rng.IntN(5), 1+rng.IntN(9)
	x := make([]float32, rows*cols)
	for i := range x {
		x[i] = float32(rng.NormFloat64())
	}
	dt := []meshpb.DType{meshpb.DType_DTYPE_F32, meshpb.DType_DTYPE_BF16, meshpb.DType_DTYPE_F8_E4M3}[rng.IntN(3)]
	hidden := &meshpb.Tensor{Dtype: dt, Shape: []int64{int64(rows), int64(cols)}}
	if dt == meshpb.DType_DTYPE_F8_E4M3 {
		hidden.Data, hidden.Scales = AppendF8Rows(nil, nil, x, cols)
	} else {
		hidden.Data = AppendRows(nil, dt, x)
	}
	req := &meshpb.DispatchRequest{
		Id: rng.Uint64(), Layer: rng.Uint32N(64), K: uint32(1 + rng.IntN(6)),
		Hidden: hidden, PlacementVersion: rng.Uint64N(5), PartialDtype: meshpb.DType(rng.IntN(3)),
	}
	for range rows * int(req.K) {
		req.ExpertIds = append(req.ExpertIds, int32(rng.IntN(70))-1)
		req.GateWeights = append(req.GateWeights, rng.Float32())
	}
	if rng.IntN(2) == 0 {
		req.TraceContext = map[string]string{"traceparent": "00-0123-4567-01", "tracestate": ""}
	}
	if rng.IntN(4) == 0 {
		req.Hidden = nil
	}
	return req
}

func randomResponse(rng *rand.Rand) *meshpb.DispatchResponse {
	resp := &meshpb.DispatchResponse{Id: rng.Uint64(), ComputeUs: rng.Uint64N(1e6)}
	if rng.IntN(4) == 0 {
		resp.Code, resp.Message = int32(1+rng.IntN(15)), "expert node a: no"
		return resp
	}
	rows, cols := 1+rng.IntN(5), 1+rng.IntN(9)
	resp.Partial = F32Matrix(make([]float32, rows*cols), rows, cols)
	for i := range resp.Partial.Data {
		resp.Partial.Data[i] = byte(rng.IntN(256))
	}
	return resp
}

// TestCodecMatchesProto: decoding into a reused message gives what
// proto.Unmarshal gives into a fresh one, whatever the reused message held
// before (a bigger request, tracing on, an error reply).
func TestCodecMatchesProto(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	req, resp := new(meshpb.DispatchRequest), new(meshpb.DispatchResponse)
	reqV, respV := new(meshpb.DispatchRequest), new(meshpb.DispatchResponse)
	for i := range 500 {
		want := randomRequest(rng)
		b, err := proto.Marshal(want)
		if err != nil {
			t.Fatal(err)
		}
		if err := UnmarshalRequest(b, req); err != nil {
			t.Fatal(err)
		}
		if !proto.Equal(req, want) {
			t.Fatalf("request %d:\n got %v\nwant %v", i, req, want)
		}
		// The view: the same message, its data inside b.
		if err := UnmarshalRequestView(b, reqV); err != nil || !proto.Equal(reqV, want) {
			t.Fatalf("request %d view: %v", i, err)
		}
		if d := reqV.Hidden.GetData(); len(d) > 0 && !aliases(d, b) {
			t.Fatalf("request %d view: data not inside b", i)
		}
		wantR := randomResponse(rng)
		if b, err = proto.Marshal(wantR); err != nil {
			t.Fatal(err)
		}
		if err := UnmarshalResponse(b, resp); err != nil {
			t.Fatal(err)
		}
		if !proto.Equal(resp, wantR) {
			t.Fatalf("response %d:\n got %v\nwant %v", i, resp, wantR)
		}
		if err := UnmarshalResponseView(b, respV); err != nil || !proto.Equal(respV, wantR) {
			t.Fatalf("response %d view: %v", i, err)
		}
		if d := respV.Partial.GetData(); len(d) > 0 && !aliases(d, b) {
			t.Fatalf("response %d view: data not inside b", i)
		}
	}
}

// aliases reports whether d lies inside b.
func aliases(d, b []byte) bool {
	return uintptr(unsafe.Pointer(&d[0])) >= uintptr(unsafe.Pointer(&b[0])) && uintptr(unsafe.Pointer(&d[len(d)-1])) <= uintptr(unsafe.Pointer(&b[len(b)-1]))
}

// TestCodecReuseAllocs: once a message's buffers have grown, decoding
// another message of the same size into it allocates nothing, and the
// codec round trip (marshal into a pooled buffer, unmarshal in place)
// allocates only gRPC's one-element BufferSlice.
func TestCodecReuseAllocs(t *testing.T) {
	if raceEnabled {
		t.Skip("allocation counts differ under the race detector")
	}
	x := make([]float32, 32*2048)
	req := &meshpb.DispatchRequest{Id: 7, Layer: 3, K: 6, Hidden: F32Matrix(x, 32, 2048),
		ExpertIds: make([]int32, 32*6), GateWeights: make([]float32, 32*6)}
	resp := &meshpb.DispatchResponse{Id: 7, Partial: F32Matrix(x, 32, 2048), ComputeUs: 5}
	bq, _ := proto.Marshal(req)
	br, _ := proto.Marshal(resp)
	var q meshpb.DispatchRequest
	var r meshpb.DispatchResponse
	decode := func() {
		if err := UnmarshalRequest(bq, &q); err != nil {
			t.Fatal(err)
		}
		if err := UnmarshalResponse(br, &r); err != nil {
			t.Fatal(err)
		}
	}
	decode()
	if a := testing.AllocsPerRun(100, decode); a != 0 {
		t.Errorf("decoding into reused messages: %v allocations, want 0", a)
	}
	var c Codec
	roundTrip := func() {
		data, err := c.Marshal(resp)
		if err != nil {
			t.Fatal(err)
		}
		if err := c.Unmarshal(data, &r); err != nil {
			t.Fatal(err)
		}
		data.Free()
	}
	roundTrip()
	if a := testing.AllocsPerRun(100, roundTrip); a > 1 {
		t.Errorf("codec round trip: %v allocations, want at most 1 (the BufferSlice)", a)
	}
	if !proto.Equal(&r, resp) {
		t.Errorf("round trip changed the message")
	}
}

// TestCodecOtherMessages: every other message takes the standard path.
func TestCodecOtherMessages(t *testing.T) {
	var c Codec
	in := &meshpb.StepRequest{Step: 3, Work: []*meshpb.SeqWork{{SeqId: 1, Tokens: []int32{1, 2}}}}
	data, err := c.Marshal(in)
	if err != nil {
		t.Fatal(err)
	}
	out := new(meshpb.StepRequest)
	if err := c.Unmarshal(data, out); err != nil || !proto.Equal(in, out) {
		t.Fatalf("%v %v", out, err)
	}
	if _, err := c.Marshal(42); err == nil {
		t.Error("marshalled an int")
	}
	if err := c.Unmarshal(mem.BufferSlice{mem.SliceBuffer(nil)}, new(int)); err == nil {
		t.Error("unmarshalled into an int")
	}
}

// FuzzCodec: on any input the in-place decoders agree with proto.Unmarshal
// on success or failure, and on the decoded message.
func FuzzCodec(f *testing.F) {
	rng := rand.New(rand.NewPCG(3, 4))
	for range 8 {
		b, _ := proto.Marshal(randomRequest(rng))
		f.Add(b)
		b, _ = proto.Marshal(randomResponse(rng))
		f.Add(b)
	}
	req, resp := new(meshpb.DispatchRequest), new(meshpb.DispatchResponse)
	reqV, respV := new(meshpb.DispatchRequest), new(meshpb.DispatchResponse)
	f.Fuzz(func(t *testing.T, b []byte) {
		want := new(meshpb.DispatchRequest)
		werr := proto.Unmarshal(b, want)
		err := UnmarshalRequest(b, req)
		if (err == nil) != (werr == nil) {
			t.Fatalf("request: err %v, proto %v", err, werr)
		}
		dropUnknown(want, want.Hidden)
		if err == nil && !proto.Equal(req, want) {
			t.Fatalf("request:\n got %v\nwant %v", req, want)
		}
		if err := UnmarshalRequestView(b, reqV); (err == nil) != (werr == nil) || (err == nil && !proto.Equal(reqV, want)) {
			t.Fatalf("request view: err %v, proto %v", err, werr)
		}
		wantR := new(meshpb.DispatchResponse)
		werr = proto.Unmarshal(b, wantR)
		err = UnmarshalResponse(b, resp)
		if (err == nil) != (werr == nil) {
			t.Fatalf("response: err %v, proto %v", err, werr)
		}
		dropUnknown(wantR, wantR.Partial)
		if err == nil && !proto.Equal(resp, wantR) {
			t.Fatalf("response:\n got %v\nwant %v", resp, wantR)
		}
		if err := UnmarshalResponseView(b, respV); (err == nil) != (werr == nil) || (err == nil && !proto.Equal(respV, wantR)) {
			t.Fatalf("response view: err %v, proto %v", err, werr)
		}
	})
}

func TestBF16Rows(t *testing.T) {
	x := []float32{1, -2.5, 3.0000002, 65504, 1e-30, 0, float32(math.Copysign(0, -1))}
	tn := &meshpb.Tensor{Dtype: meshpb.DType_DTYPE_BF16, Shape: []int64{1, int64(len(x))}, Data: AppendRows(nil, meshpb.DType_DTYPE_BF16, x)}
	if rows, err := CheckMatrix(tn, len(x), 1); err != nil || rows != 1 {
		t.Fatalf("rows %d err %v", rows, err)
	}
	got := make([]float32, len(x))
	if err := Decode(got, tn); err != nil {
		t.Fatal(err)
	}
	for i, v := range x {
		// BF16 keeps 8 significant bits: relative error at most 2^-9.
		if d := math.Abs(float64(got[i] - v)); d > math.Abs(float64(v))/512 {
			t.Errorf("element %d: %g -> %g", i, v, got[i])
		}
	}
	if math.Float32bits(got[6]) != math.Float32bits(x[6]) {
		t.Errorf("-0 became %g", got[6])
	}
	for _, bad := range []float32{float32(math.Inf(1)), float32(math.NaN()), 3.4e38} {
		tn.Data = AppendRows(nil, meshpb.DType_DTYPE_BF16, []float32{1, bad, 2, 3, 4, 5, 6})
		if err := Decode(got, tn); err == nil {
			t.Errorf("%g decoded without error", bad)
		}
	}
}

// dropUnknown clears the unknown fields proto.Unmarshal keeps and the
// in-place decoders skip.
func dropUnknown(m proto.Message, t *meshpb.Tensor) {
	m.ProtoReflect().SetUnknown(nil)
	if t != nil {
		t.ProtoReflect().SetUnknown(nil)
	}
}

func TestPool(t *testing.T) {
	p := newTieredPool(8, 12)
	for _, size := range []int{0, 1, 256, 257, 1000, 4096, 4097, 10000} {
		b := p.Get(size)
		if len(*b) != size {
			t.Fatalf("Get(%d): len %d", size, len(*b))
		}
		if size <= 4096 && (cap(*b) < size || cap(*b)&(cap(*b)-1) != 0) {
			t.Fatalf("Get(%d): cap %d", size, cap(*b))
		}
		p.Put(b)
	}
	odd := make([]byte, 300)
	p.Put(&odd) // not a power of two: dropped, never handed out
	if b := p.Get(300); cap(*b) != 512 {
		t.Fatalf("cap %d", cap(*b))
	}
}

// marshalled is Codec's encoding of v as one byte slice.
func marshalled(t *testing.T, v any) []byte {
	t.Helper()
	bs, err := Codec{}.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	defer bs.Free()
	return bs.Materialize()
}

// checkAppend: AppendMessage appends what Codec marshals after a prefix
// (the same message: a trace-context map's order varies), and
// MessageSize is its length.
func checkAppend(t *testing.T, v any, want []byte, decoded proto.Message) {
	t.Helper()
	got, err := AppendMessage([]byte("head"), v)
	if err != nil || string(got[:4]) != "head" || len(got)-4 != len(want) || MessageSize(v) != len(want) {
		t.Fatalf("AppendMessage(%T): %v, %d bytes after the prefix, MessageSize %d, want Codec's %d bytes", v, err, len(got)-4, MessageSize(v), len(want))
	}
	if decoded == nil {
		return
	}
	m := decoded.ProtoReflect().New().Interface()
	if err := proto.Unmarshal(got[4:], m); err != nil || !proto.Equal(m, decoded) {
		t.Fatalf("AppendMessage(%T) decodes to another message: %v", v, err)
	}
}

// TestOutMessages: an OutRequest or OutResponse, its rows encoded straight
// into the message buffer, decodes (with proto.Unmarshal and with the
// in-place decoders) to the message whose Tensor was encoded first and
// marshalled as usual: every dtype, row subsets in any order (rows sent
// twice included), several widths, with and without trace context, and
// error replies without rows.
func TestOutMessages(t *testing.T) {
	rng := rand.New(rand.NewPCG(5, 6))
	for i := range 300 {
		cols := []int{1, 3, 127, 128, 129, 300}[i%6]
		n := 1 + rng.IntN(7)
		x := make([]float32, n*cols)
		for j := range x {
			x[j] = float32(rng.NormFloat64() * math.Pow(10, float64(rng.IntN(9)-4)))
		}
		var rows []int32
		for range 1 + rng.IntN(6) {
			rows = append(rows, int32(rng.IntN(n)))
		}
		sel := make([]float32, 0, len(rows)*cols)
		for _, r := range rows {
			sel = append(sel, x[int(r)*cols:int(r+1)*cols]...)
		}
		dt := []meshpb.DType{meshpb.DType_DTYPE_F32, meshpb.DType_DTYPE_BF16, meshpb.DType_DTYPE_F8_E4M3}[i%3]
		base := randomRequest(rng)
		base.Hidden = nil
		want := proto.Clone(base).(*meshpb.DispatchRequest)
		want.Hidden = &meshpb.Tensor{Dtype: dt, Shape: []int64{int64(len(rows)), int64(cols)}}
		if dt == meshpb.DType_DTYPE_F8_E4M3 {
			want.Hidden.Data, want.Hidden.Scales = AppendF8Rows(nil, nil, sel, cols)
		} else {
			want.Hidden.Data = AppendRows(nil, dt, sel)
		}
		out := &OutRequest{Req: base, Dtype: dt, X: x, Rows: rows, Cols: cols}
		if i%4 >= 2 {
			// Aligned: the rows start a multiple of RowAlign bytes in, and the
			// request decodes the same (the padding is skipped).
			out.AlignRows = true
			b := marshalled(t, out)
			checkAppend(t, out, b, nil)
			checkVectored(t, out, b)
			inPlace := new(meshpb.DispatchRequest)
			if err := UnmarshalRequestView(b, inPlace); err != nil || !proto.Equal(inPlace, want) || len(b) != out.Size() {
				t.Fatalf("aligned request %d: %v, %d bytes, Size %d", i, err, len(b), out.Size())
			}
			if off := uintptr(unsafe.Pointer(&inPlace.Hidden.Data[0])) - uintptr(unsafe.Pointer(&b[0])); off%RowAlign != 0 {
				t.Fatalf("aligned request %d: rows at offset %d", i, off)
			}
			got := new(meshpb.DispatchRequest)
			if err := proto.Unmarshal(b, got); err != nil {
				t.Fatal(err)
			}
			dropUnknown(got, got.Hidden)
			if !proto.Equal(got, want) {
				t.Fatalf("aligned request %d: proto.Unmarshal gives another message", i)
			}
			continue
		}
		b := marshalled(t, out)
		checkAppend(t, out, b, want)
		checkVectored(t, out, b)
		if len(b) != out.Size() || len(b) != proto.Size(want) {
			t.Fatalf("request %d: %d bytes, Size %d, proto.Size %d", i, len(b), out.Size(), proto.Size(want))
		}
		got := new(meshpb.DispatchRequest)
		if err := proto.Unmarshal(b, got); err != nil || !proto.Equal(got, want) {
			t.Fatalf("request %d (%v, rows %v, cols %d): proto.Unmarshal %v\n got %v\nwant %v", i, dt, rows, cols, err, got, want)
		}
		inPlace := randomRequest(rng)
		if err := UnmarshalRequest(b, inPlace); err != nil || !proto.Equal(inPlace, want) {
			t.Fatalf("request %d: UnmarshalRequest %v", i, err)
		}

		// The reply: F32 or BF16 partial rows, or an error without.
		pdt := PartialFor(dt)
		resp := &meshpb.DispatchResponse{Id: rng.Uint64(), ComputeUs: rng.Uint64N(1e6)}
		wantResp := proto.Clone(resp).(*meshpb.DispatchResponse)
		o := &OutResponse{Resp: resp, Dtype: pdt, Rows: sel, Cols: cols}
		if i%5 == 4 {
			resp.Code, resp.Message = 13, "no"
			wantResp.Code, wantResp.Message = 13, "no"
			o.Rows = nil
		} else {
			wantResp.Partial = &meshpb.Tensor{Dtype: pdt, Shape: []int64{int64(len(rows)), int64(cols)}, Data: AppendRows(nil, pdt, sel)}
		}
		b = marshalled(t, o)
		checkAppend(t, o, b, wantResp)
		checkAppend(t, wantResp, marshalled(t, wantResp), wantResp)
		gotResp := new(meshpb.DispatchResponse)
		if err := proto.Unmarshal(b, gotResp); err != nil || !proto.Equal(gotResp, wantResp) || len(b) != proto.Size(wantResp) {
			t.Fatalf("response %d: %v\n got %v\nwant %v", i, err, gotResp, wantResp)
		}
		inPlaceResp := randomResponse(rng)
		if err := UnmarshalResponse(b, inPlaceResp); err != nil || !proto.Equal(inPlaceResp, wantResp) {
			t.Fatalf("response %d: UnmarshalResponse %v", i, err)
		}
	}
}

// BenchmarkMarshalRows: a 32-row V2-Lite request marshalled by Codec,
// its rows encoded into a Tensor first (encoded) or straight into the
// message buffer (out), F32 and BF16.
func BenchmarkMarshalRows(b *testing.B) {
	const rows, cols = 32, 2048
	x := make([]float32, rows*cols)
	for i := range x {
		x[i] = float32(i%1013) * 0.5
	}
	sel := make([]int32, rows)
	for i := range sel {
		sel[i] = int32(i)
	}
	for _, dt := range []meshpb.DType{meshpb.DType_DTYPE_F32, meshpb.DType_DTYPE_BF16} {
		req := &meshpb.DispatchRequest{Id: 1, Layer: 1, K: 1, ExpertIds: make([]int32, rows), GateWeights: make([]float32, rows)}
		var data []byte
		var tn meshpb.Tensor
		b.Run("encoded/"+dt.String(), func(b *testing.B) {
			b.SetBytes(int64(rows * cols * Size(dt)))
			for b.Loop() {
				data = data[:0]
				for _, r := range sel {
					data = AppendRows(data, dt, x[int(r)*cols:int(r+1)*cols])
				}
				tn = meshpb.Tensor{Dtype: dt, Shape: []int64{rows, cols}, Data: data}
				req.Hidden = &tn
				bs, err := Codec{}.Marshal(req)
				if err != nil {
					b.Fatal(err)
				}
				bs.Free()
			}
		})
		b.Run("out/"+dt.String(), func(b *testing.B) {
			b.SetBytes(int64(rows * cols * Size(dt)))
			req.Hidden = nil
			out := &OutRequest{Req: req, Dtype: dt, X: x, Rows: sel, Cols: cols}
			for b.Loop() {
				bs, err := Codec{}.Marshal(out)
				if err != nil {
					b.Fatal(err)
				}
				bs.Free()
			}
		})
	}
}

// TestAppendResponseHead: a reply laid out by AppendResponseHead, its rows
// written through the returned view and AppendComputeUs after them,
// decodes (proto.Unmarshal, UnmarshalResponseView) to the reply
// OutResponse encodes, with the rows a multiple of RowAlign bytes after
// the message's start wherever that is in the buffer, and appending the
// compute time never moves the rows: several widths and row counts, ids
// and compute times zero or not, buffers with and without room.
func TestAppendResponseHead(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 8))
	for i := range 400 {
		cols := []int{1, 3, 128, 300, 2048}[i%5]
		rows := 1 + rng.IntN(9)
		id := []uint64{0, 1, rng.Uint64()}[i%3]
		us := []uint64{0, 5, rng.Uint64N(1 << 40)}[i/3%3]
		prefix := rng.IntN(80)
		b := make([]byte, 0, prefix+64+4*rows*cols+[]int{0, 200}[i%2]) // grown by the call or not
		for range prefix {
			b = append(b, 0xee)
		}
		start := rng.IntN(prefix + 1)
		if i%4 == 3 && cap(b) > prefix+4*rows*cols+200 {
			// Misaligned in memory: declined, b unchanged.
			start -= int((uintptr(unsafe.Pointer(&b[:1][0])) + uintptr(start)) % 4)
			start++
			if start > prefix {
				start -= 4
			}
			if start >= 0 {
				if b2, x := AppendResponseHead(b, start, id, rows, cols); x != nil || len(b2) != len(b) {
					t.Fatalf("%d: misaligned start %d: view %v, %d bytes", i, start, x != nil, len(b2)-len(b))
				}
			}
			continue
		}
		start -= int((uintptr(unsafe.Pointer(&b[:1][0])) + uintptr(start)) % 4)
		if start < 0 {
			start += 4
			for len(b) < start {
				b = append(b, 0xee)
			}
			prefix = len(b)
		}
		b, x := AppendResponseHead(b, start, id, rows, cols)
		if x == nil || len(x) != rows*cols {
			t.Fatalf("%d: view of %d values, want %d", i, len(x), rows*cols)
		}
		for j := range x {
			x[j] = float32(rng.NormFloat64())
		}
		want := &meshpb.DispatchResponse{Id: id, ComputeUs: us,
			Partial: &meshpb.Tensor{Dtype: meshpb.DType_DTYPE_F32, Shape: []int64{int64(rows), int64(cols)}, Data: AppendF32(nil, x)}}
		first := &x[0]
		b = AppendComputeUs(b, us)
		if &x[0] != first || unsafe.Pointer(first) != unsafe.Pointer(&b[len(b)-len(AppendComputeUs(nil, us))-4*len(x)]) {
			t.Fatalf("%d: the rows moved or are not where the view is", i)
		}
		msg := b[start:]
		if off := uintptr(unsafe.Pointer(first)) - uintptr(unsafe.Pointer(&msg[0])); off%RowAlign != 0 {
			t.Fatalf("%d: rows at offset %d", i, off)
		}
		got := new(meshpb.DispatchResponse)
		if err := proto.Unmarshal(msg[prefix-start:], got); err != nil {
			t.Fatal(err)
		}
		dropUnknown(got, got.Partial)
		if !proto.Equal(got, want) {
			t.Fatalf("%d: proto.Unmarshal gives\n%v\nwant\n%v", i, got, want)
		}
		view := randomResponse(rng)
		if err := UnmarshalResponseView(msg[prefix-start:], view); err != nil || !proto.Equal(view, want) {
			t.Fatalf("%d: UnmarshalResponseView %v", i, err)
		}
		if o := (&OutResponse{Resp: &meshpb.DispatchResponse{Id: id, ComputeUs: us}, Dtype: meshpb.DType_DTYPE_F32, Rows: x, Cols: cols}); !proto.Equal(decodeOut(t, o), want) {
			t.Fatalf("%d: OutResponse decodes to another reply", i)
		}
	}
}

func decodeOut(t *testing.T, o *OutResponse) *meshpb.DispatchResponse {
	t.Helper()
	b, err := AppendMessage(nil, o)
	if err != nil {
		t.Fatal(err)
	}
	m := new(meshpb.DispatchResponse)
	if err := proto.Unmarshal(b, m); err != nil {
		t.Fatal(err)
	}
	return m
}

// checkVectored: an F32 request's head (AppendHead) and row spans
// (AppendRowSpans, slices of X) make its marshalled bytes b; other
// dtypes decline.
func checkVectored(t *testing.T, o *OutRequest, b []byte) {
	t.Helper()
	prefix := []byte{9, 9}
	head, ok := o.AppendHead(slices.Clone(prefix))
	if ok != (o.Dtype == meshpb.DType_DTYPE_F32) || (!ok && len(head) != len(prefix)) {
		t.Fatalf("%v: AppendHead %v, %d bytes", o.Dtype, ok, len(head)-len(prefix))
	}
	if !ok {
		return
	}
	got := head[len(prefix):]
	spans := o.AppendRowSpans(nil)
	for _, s := range spans {
		got = append(got, s...)
	}
	// The same bytes but for the order of the trace context's map
	// entries, which marshalling does not fix.
	m1, m2 := new(meshpb.DispatchRequest), new(meshpb.DispatchRequest)
	if err := UnmarshalRequest(got, m1); err != nil || len(got) != len(b) || UnmarshalRequest(b, m2) != nil || !proto.Equal(m1, m2) ||
		!bytes.Equal(got[len(got)-4*len(o.Rows)*o.Cols:], b[len(b)-4*len(o.Rows)*o.Cols:]) {
		t.Fatalf("rows %v: head and %d spans differ from the marshalled request (%v)", o.Rows, len(spans), err)
	}
	runs := 0
	for i, r := range o.Rows {
		if i == 0 || r != o.Rows[i-1]+1 {
			runs++
		}
	}
	if o.Cols > 0 && len(spans) != runs {
		t.Fatalf("rows %v: %d spans, want %d", o.Rows, len(spans), runs)
	}
}
