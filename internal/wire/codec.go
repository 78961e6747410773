package wire

import (
	"fmt"
	"math"
	"slices"
	"unicode/utf8"
	"unsafe"

	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/protoadapt"

	meshpb "github.com/expertmesh/expertmesh/proto"
)

// Codec is gRPC's "proto" codec with the Dispatch stream's two messages
// decoded into the caller's message in place, reusing what it already
// points at. proto.Unmarshal copies every bytes field into a new slice
// and Recv allocates a new message per call, so a receiver of a 32-row
// dispatch would allocate ~256 KiB per message; with Codec, a receiver
// that passes the same *DispatchRequest or *DispatchResponse to RecvMsg
// again and again allocates nothing once its buffers have grown:
// hidden/partial data, shape, expert ids and gate weights are appended
// into the existing slices, the Tensor is reused, the trace-context map is
// cleared and refilled (its strings are new: tracing on costs them).
//
// Semantics match proto.Unmarshal into a fresh message except that
// unknown fields are skipped rather than kept (nothing re-marshals these
// messages) and that a reused message keeps spare capacity. Every other
// message goes to the standard codec unchanged; marshalling is the
// standard codec's, except that every message, small ones too, is
// marshalled into a buffer of Pool.
//
// The wire format is protobuf's: peers that use the standard codec
// interoperate. rpc.NewServer and rpc.DialOptions install it.
type Codec struct{}

var _ encoding.CodecV2 = Codec{}

// Name is "proto": Codec replaces the standard codec without changing
// the content-subtype peers see.
func (Codec) Name() string { return "proto" }

// Marshal is the standard codec's, with every message in a buffer of Pool;
// an OutRequest or OutResponse has its rows encoded straight into it.
func (Codec) Marshal(v any) (mem.BufferSlice, error) {
	switch v := v.(type) {
	case *OutRequest:
		return marshalOut(v.Req, v.size(), v.appendHidden)
	case *OutResponse:
		return marshalOut(v.Resp, v.size(), v.appendPartial)
	}
	m := messageOf(v)
	if m == nil {
		return nil, fmt.Errorf("wire: cannot marshal %T: not a proto message", v)
	}
	size := proto.Size(m)
	pool := Pool
	buf := pool.Get(size)
	b, err := proto.MarshalOptions{UseCachedSize: true}.MarshalAppend((*buf)[:0], m)
	if err != nil {
		pool.Put(buf)
		return nil, err
	}
	*buf = b
	return mem.BufferSlice{mem.NewBuffer(buf, pool)}, nil
}

// Unmarshal decodes DispatchRequest and DispatchResponse in place and
// everything else with proto.Unmarshal.
func (Codec) Unmarshal(data mem.BufferSlice, v any) error {
	buf := data.MaterializeToBuffer(Pool)
	defer buf.Free()
	b := buf.ReadOnlyData()
	switch m := v.(type) {
	case *meshpb.DispatchRequest:
		return UnmarshalRequest(b, m)
	case *meshpb.DispatchResponse:
		return UnmarshalResponse(b, m)
	}
	m := messageOf(v)
	if m == nil {
		return fmt.Errorf("wire: cannot unmarshal into %T: not a proto message", v)
	}
	return proto.Unmarshal(b, m)
}

// marshalOut marshals m followed by the tensor field appendTensor writes,
// size bytes in all, into a buffer of Pool.
func marshalOut(m proto.Message, size int, appendTensor func([]byte) []byte) (mem.BufferSlice, error) {
	pool := Pool
	buf := pool.Get(size)
	b, err := appendOut((*buf)[:0], m, size, appendTensor)
	if err != nil {
		pool.Put(buf)
		return nil, err
	}
	*buf = b
	return mem.BufferSlice{mem.NewBuffer(buf, pool)}, nil
}

// appendOut appends m followed by the tensor field appendTensor writes,
// size bytes in all, to b. m's size must have been computed (UseCachedSize).
func appendOut(b []byte, m proto.Message, size int, appendTensor func([]byte) []byte) ([]byte, error) {
	start := len(b)
	b, err := proto.MarshalOptions{UseCachedSize: true}.MarshalAppend(b, m)
	if err != nil {
		return b[:start], err
	}
	b = appendTensor(b)
	if len(b)-start != size {
		return b[:start], fmt.Errorf("wire: marshalled %d bytes of %T, sized %d", len(b)-start, m, size)
	}
	return b, nil
}

// AppendMessage appends v's encoding, the bytes Codec.Marshal produces
// (an OutRequest or OutResponse with its rows encoded straight from
// float32 memory, any other message as protobuf), to b: for transports
// that frame messages in their own reused buffers (internal/dataplane).
// On error b is returned unchanged.
func AppendMessage(b []byte, v any) ([]byte, error) {
	switch v := v.(type) {
	case *OutRequest:
		return appendOut(b, v.Req, v.size(), v.appendHidden)
	case *OutResponse:
		return appendOut(b, v.Resp, v.size(), v.appendPartial)
	}
	m := messageOf(v)
	if m == nil {
		return b, fmt.Errorf("wire: cannot marshal %T: not a proto message", v)
	}
	b2, err := proto.MarshalOptions{}.MarshalAppend(b, m)
	if err != nil {
		return b, err
	}
	return b2, nil
}

// MessageSize is the length of v's encoding (see AppendMessage).
func MessageSize(v any) int {
	switch v := v.(type) {
	case *OutRequest:
		return v.size()
	case *OutResponse:
		return v.size()
	}
	if m := messageOf(v); m != nil {
		return proto.Size(m)
	}
	return 0
}

// OutRequest is a DispatchRequest whose hidden rows Codec encodes
// straight from float32 memory into the message's buffer: rows Rows of X
// (each Cols values), as a [len(Rows), Cols] tensor of Dtype (F32, BF16,
// or F8_E4M3 with its scales, as AppendRows and AppendF8Rows encode
// them). That saves encoding the rows into a Tensor's bytes first, which
// marshalling would copy again. Req.Hidden must be nil: the tensor goes
// after Req's other fields, which protobuf allows (a parser takes fields
// in any order), so the bytes decode to the request with that Hidden.
// X is read while Send marshals, so it must not change before Send
// returns.
type OutRequest struct {
	Req   *meshpb.DispatchRequest
	Dtype meshpb.DType
	X     []float32
	Rows  []int32
	Cols  int
	// AlignRows has the rows' bytes start a multiple of RowAlign bytes
	// into the message: an unknown field (PadField, up to 63 bytes of
	// zeros and its 3-byte head, only where needed) goes before the
	// tensor, which every decoder skips. A receiver that reads the
	// message into a buffer aligned as well can view F32 rows in place
	// (ViewF32) instead of copying them, and its kernels load whole cache
	// lines (rows that straddle them computed ~1.5x slower).
	AlignRows bool

	scales []float32 // F8_E4M3: the scales, encoded after the data
	head   int       // proto.Size(Req), from size (called before marshalling)
}

// OutResponse is a DispatchResponse whose partial rows (Rows, rows of
// Cols values, in Dtype F32 or BF16) Codec encodes straight into the
// message's buffer, as OutRequest does. No rows: no Partial (an error
// reply). Resp.Partial must be nil.
type OutResponse struct {
	Resp  *meshpb.DispatchResponse
	Dtype meshpb.DType
	Rows  []float32
	Cols  int
}

// Field numbers of the tensor inside the two messages, and of a Tensor's
// own fields (proto/expertmesh.proto).
const (
	requestHiddenField   = 3
	responsePartialField = 2
	tensorDtypeField     = 1
	tensorShapeField     = 2
	tensorDataField      = 3
	tensorScalesField    = 4
)

// PadField is the field number of OutRequest's alignment padding; the
// Dispatch messages must never use it. RowAlign is the alignment.
const (
	PadField = 2047
	RowAlign = 64
)

// Size is the request's wire size.
func (o *OutRequest) Size() int { return o.size() }

func (o *OutRequest) size() int {
	o.head = proto.Size(o.Req)
	return o.head + o.padSize(o.head) + fieldSize(requestHiddenField, o.tensorSize())
}

// padSize is the size of the padding field that puts the rows at a
// multiple of RowAlign bytes, after head bytes of the request's other
// fields (0 without AlignRows or when they already are).
func (o *OutRequest) padSize(head int) int {
	if !o.AlignRows {
		return 0
	}
	rows := len(o.Rows)
	ts := o.tensorSize()
	// Everything before the rows: the tensor field's tag and length, its
	// dtype and shape, the data field's tag and length.
	off := head + protowire.SizeTag(requestHiddenField) + protowire.SizeVarint(uint64(ts)) +
		tensorSize(o.Dtype, rows, o.Cols, 0, 0) +
		protowire.SizeTag(tensorDataField) + protowire.SizeVarint(uint64(rows*o.Cols*Size(o.Dtype)))
	if off%RowAlign == 0 {
		return 0
	}
	pad := protowire.SizeTag(PadField) + 1 // tag and a one-byte length (< 128)
	return pad + (RowAlign-(off+pad)%RowAlign)%RowAlign
}

func (o *OutRequest) tensorSize() int {
	rows := len(o.Rows)
	n := rows * o.Cols
	data := n * Size(o.Dtype)
	scales := 0
	if o.Dtype == meshpb.DType_DTYPE_F8_E4M3 {
		scales = 4 * rows * ScaleBlocks(o.Cols)
	}
	return tensorSize(o.Dtype, rows, o.Cols, data, scales)
}

func (o *OutRequest) appendHidden(b []byte) []byte {
	b = o.appendHiddenHead(b)
	o.scales = o.scales[:0]
	for _, r := range o.Rows {
		x := o.X[int(r)*o.Cols : int(r+1)*o.Cols]
		if o.Dtype == meshpb.DType_DTYPE_F8_E4M3 {
			b, o.scales = AppendF8Rows(b, o.scales, x, o.Cols)
		} else {
			b = AppendRows(b, o.Dtype, x)
		}
	}
	if len(o.scales) > 0 {
		b = appendFloats(b, tensorScalesField, o.scales)
	}
	return b
}

// AppendHead appends the request up to its rows' bytes and reports true
// when the rows can be sent straight from X's memory after it (F32 on a
// little-endian machine: AppendRowSpans), so that a transport writes
// them with the head in one vectored write instead of copying them into
// its buffer; otherwise it appends nothing and reports false. The head
// and the rows make the bytes AppendMessage gives.
func (o *OutRequest) AppendHead(b []byte) ([]byte, bool) {
	if o.Dtype != meshpb.DType_DTYPE_F32 || !nativeLE {
		return b, false
	}
	o.size()
	start := len(b)
	b, err := proto.MarshalOptions{UseCachedSize: true}.MarshalAppend(b, o.Req)
	if err != nil {
		return b[:start], false
	}
	return o.appendHiddenHead(b), true
}

// AppendRowSpans appends to v the bytes of the rows AppendHead left out,
// in order, as slices of X's memory (rows that follow each other in X
// merged into one slice). They alias X: valid while X is.
func (o *OutRequest) AppendRowSpans(v [][]byte) [][]byte {
	rowBytes := 4 * o.Cols
	for i := 0; i < len(o.Rows); {
		j := i + 1
		for j < len(o.Rows) && o.Rows[j] == o.Rows[j-1]+1 {
			j++
		}
		if rowBytes > 0 {
			x := o.X[int(o.Rows[i])*o.Cols : int(o.Rows[j-1]+1)*o.Cols]
			v = append(v, unsafe.Slice((*byte)(unsafe.Pointer(&x[0])), len(x)*4))
		}
		i = j
	}
	return v
}

// appendHiddenHead appends the padding (AlignRows) and the tensor field
// up to its rows' bytes.
func (o *OutRequest) appendHiddenHead(b []byte) []byte {
	rows := len(o.Rows)
	if p := o.padSize(o.head); p > 0 {
		k := p - protowire.SizeTag(PadField) - 1
		b = protowire.AppendTag(b, PadField, protowire.BytesType)
		b = append(b, byte(k))
		for range k {
			b = append(b, 0)
		}
	}
	b = protowire.AppendTag(b, requestHiddenField, protowire.BytesType)
	b = protowire.AppendVarint(b, uint64(o.tensorSize()))
	b = appendTensorHead(b, o.Dtype, rows, o.Cols)
	b = protowire.AppendTag(b, tensorDataField, protowire.BytesType)
	return protowire.AppendVarint(b, uint64(rows*o.Cols*Size(o.Dtype)))
}

func (o *OutResponse) size() int {
	n := proto.Size(o.Resp)
	if len(o.Rows) > 0 {
		rows := len(o.Rows) / o.Cols
		n += fieldSize(responsePartialField, tensorSize(o.Dtype, rows, o.Cols, len(o.Rows)*Size(o.Dtype), 0))
	}
	return n
}

func (o *OutResponse) appendPartial(b []byte) []byte {
	if len(o.Rows) == 0 {
		return b
	}
	return AppendRows(o.appendPartialHead(b), o.Dtype, o.Rows)
}

// appendPartialHead appends the partial field up to its rows' bytes.
func (o *OutResponse) appendPartialHead(b []byte) []byte {
	rows := len(o.Rows) / o.Cols
	data := len(o.Rows) * Size(o.Dtype)
	b = protowire.AppendTag(b, responsePartialField, protowire.BytesType)
	b = protowire.AppendVarint(b, uint64(tensorSize(o.Dtype, rows, o.Cols, data, 0)))
	b = appendTensorHead(b, o.Dtype, rows, o.Cols)
	b = protowire.AppendTag(b, tensorDataField, protowire.BytesType)
	return protowire.AppendVarint(b, uint64(data))
}

// fieldSize is the wire size of a length-delimited field of n bytes.
func fieldSize(num protowire.Number, n int) int {
	return protowire.SizeTag(num) + protowire.SizeBytes(n)
}

// tensorSize is the wire size of a [rows, cols] Tensor of dt with data
// and scales bytes (the dtype omitted when zero, as proto3 does).
func tensorSize(dt meshpb.DType, rows, cols, data, scales int) int {
	n := fieldSize(tensorShapeField, protowire.SizeVarint(uint64(rows))+protowire.SizeVarint(uint64(cols)))
	if dt != 0 {
		n += protowire.SizeTag(tensorDtypeField) + protowire.SizeVarint(uint64(dt))
	}
	if data > 0 {
		n += fieldSize(tensorDataField, data)
	}
	if scales > 0 {
		n += fieldSize(tensorScalesField, scales)
	}
	return n
}

// appendTensorHead appends a Tensor's dtype and packed shape.
func appendTensorHead(b []byte, dt meshpb.DType, rows, cols int) []byte {
	if dt != 0 {
		b = protowire.AppendTag(b, tensorDtypeField, protowire.VarintType)
		b = protowire.AppendVarint(b, uint64(dt))
	}
	b = protowire.AppendTag(b, tensorShapeField, protowire.BytesType)
	b = protowire.AppendVarint(b, uint64(protowire.SizeVarint(uint64(rows))+protowire.SizeVarint(uint64(cols))))
	b = protowire.AppendVarint(b, uint64(rows))
	return protowire.AppendVarint(b, uint64(cols))
}

// appendFloats appends a packed repeated float field.
func appendFloats(b []byte, num protowire.Number, v []float32) []byte {
	b = protowire.AppendTag(b, num, protowire.BytesType)
	b = protowire.AppendVarint(b, uint64(4*len(v)))
	for _, f := range v {
		b = protowire.AppendFixed32(b, math.Float32bits(f))
	}
	return b
}

func messageOf(v any) proto.Message {
	switch v := v.(type) {
	case protoadapt.MessageV2:
		return v
	case protoadapt.MessageV1:
		return protoadapt.MessageV2Of(v)
	}
	return nil
}

var errDecode = fmt.Errorf("wire: malformed protobuf")

// UnmarshalRequest decodes b into m, reusing m's slices, map and Hidden
// tensor (see Codec). On error m is left partly decoded.
func UnmarshalRequest(b []byte, m *meshpb.DispatchRequest) error {
	return unmarshalRequest(b, m, false)
}

// UnmarshalRequestView is UnmarshalRequest except that the hidden
// tensor's data aliases b instead of being copied: for a receiver that
// keeps b as long as it uses the request (a transport that reads each
// message into the receiver's own buffer). Do not mix it with
// UnmarshalRequest on one message: that would append into b.
func UnmarshalRequestView(b []byte, m *meshpb.DispatchRequest) error {
	return unmarshalRequest(b, m, true)
}

func unmarshalRequest(b []byte, m *meshpb.DispatchRequest, alias bool) error {
	hidden := m.Hidden
	ids, weights, tc := m.ExpertIds[:0], m.GateWeights[:0], m.TraceContext
	clear(tc)
	m.Reset()
	m.ExpertIds, m.GateWeights = ids, weights
	seenHidden, seenTrace := false, false
	for len(b) > 0 {
		num, typ, n := consumeTag(b)
		if n < 0 {
			return errDecode
		}
		b = b[n:]
		switch {
		case num == 1 && typ == protowire.VarintType:
			v, n := protowire.ConsumeVarint(b)
			if n < 0 {
				return errDecode
			}
			m.Id, b = v, b[n:]
		case num == 2 && typ == protowire.VarintType:
			v, n := protowire.ConsumeVarint(b)
			if n < 0 {
				return errDecode
			}
			m.Layer, b = uint32(v), b[n:]
		case num == 3 && typ == protowire.BytesType:
			v, n := protowire.ConsumeBytes(b)
			if n < 0 {
				return errDecode
			}
			if hidden == nil {
				hidden = new(meshpb.Tensor)
			}
			if err := unmarshalTensor(v, hidden, !seenHidden, alias); err != nil {
				return err
			}
			seenHidden, b = true, b[n:]
		case num == 4 && typ == protowire.VarintType:
			v, n := protowire.ConsumeVarint(b)
			if n < 0 {
				return errDecode
			}
			m.K, b = uint32(v), b[n:]
		case num == 5:
			var err error
			if m.ExpertIds, n, err = consumeInt32s(b, num, typ, m.ExpertIds); err != nil {
				return err
			}
			b = b[n:]
		case num == 6:
			var err error
			if m.GateWeights, n, err = consumeFloats(b, num, typ, m.GateWeights); err != nil {
				return err
			}
			b = b[n:]
		case num == 7 && typ == protowire.BytesType:
			v, n := protowire.ConsumeBytes(b)
			if n < 0 {
				return errDecode
			}
			if tc == nil {
				tc = map[string]string{}
			}
			if err := consumeMapEntry(v, tc); err != nil {
				return err
			}
			seenTrace, b = true, b[n:]
		case num == 8 && typ == protowire.VarintType:
			v, n := protowire.ConsumeVarint(b)
			if n < 0 {
				return errDecode
			}
			m.PlacementVersion, b = v, b[n:]
		case num == 9 && typ == protowire.VarintType:
			v, n := protowire.ConsumeVarint(b)
			if n < 0 {
				return errDecode
			}
			m.PartialDtype, b = meshpb.DType(int32(v)), b[n:]
		default:
			n := protowire.ConsumeFieldValue(num, typ, b)
			if n < 0 {
				return errDecode
			}
			b = b[n:]
		}
	}
	if seenHidden {
		m.Hidden = hidden
	}
	if seenTrace {
		m.TraceContext = tc
	}
	return nil
}

// UnmarshalResponse decodes b into m, reusing m's Partial tensor and its
// buffers (see Codec). Partial is nil afterwards when b has none; a
// caller that wants to keep reusing the tensor holds on to it.
func UnmarshalResponse(b []byte, m *meshpb.DispatchResponse) error {
	return unmarshalResponse(b, m, false)
}

// UnmarshalResponseView is UnmarshalResponse with the partial tensor's
// data aliasing b (see UnmarshalRequestView).
func UnmarshalResponseView(b []byte, m *meshpb.DispatchResponse) error {
	return unmarshalResponse(b, m, true)
}

func unmarshalResponse(b []byte, m *meshpb.DispatchResponse, alias bool) error {
	part := m.Partial
	m.Reset()
	seenPart := false
	for len(b) > 0 {
		num, typ, n := consumeTag(b)
		if n < 0 {
			return errDecode
		}
		b = b[n:]
		switch {
		case num == 1 && typ == protowire.VarintType:
			v, n := protowire.ConsumeVarint(b)
			if n < 0 {
				return errDecode
			}
			m.Id, b = v, b[n:]
		case num == 2 && typ == protowire.BytesType:
			v, n := protowire.ConsumeBytes(b)
			if n < 0 {
				return errDecode
			}
			if part == nil {
				part = new(meshpb.Tensor)
			}
			if err := unmarshalTensor(v, part, !seenPart, alias); err != nil {
				return err
			}
			seenPart, b = true, b[n:]
		case num == 3 && typ == protowire.VarintType:
			v, n := protowire.ConsumeVarint(b)
			if n < 0 {
				return errDecode
			}
			m.Code, b = int32(v), b[n:]
		case num == 4 && typ == protowire.BytesType:
			v, n := protowire.ConsumeBytes(b)
			if n < 0 || !utf8.Valid(v) {
				return errDecode
			}
			m.Message, b = string(v), b[n:]
		case num == 5 && typ == protowire.VarintType:
			v, n := protowire.ConsumeVarint(b)
			if n < 0 {
				return errDecode
			}
			m.ComputeUs, b = v, b[n:]
		default:
			n := protowire.ConsumeFieldValue(num, typ, b)
			if n < 0 {
				return errDecode
			}
			b = b[n:]
		}
	}
	if seenPart {
		m.Partial = part
	}
	return nil
}

// unmarshalTensor decodes b into t: reset first when fresh, merged into
// what an earlier occurrence of the same field decoded otherwise (proto's
// rule for a repeated message field: scalars replaced, repeated appended).
func unmarshalTensor(b []byte, t *meshpb.Tensor, fresh, alias bool) error {
	if fresh {
		shape, data, scales := t.Shape[:0], t.Data[:0], t.Scales[:0]
		t.Reset()
		t.Shape, t.Data, t.Scales = shape, data, scales
	}
	for len(b) > 0 {
		num, typ, n := consumeTag(b)
		if n < 0 {
			return errDecode
		}
		b = b[n:]
		switch {
		case num == 1 && typ == protowire.VarintType:
			v, n := protowire.ConsumeVarint(b)
			if n < 0 {
				return errDecode
			}
			t.Dtype, b = meshpb.DType(int32(v)), b[n:]
		case num == 2 && typ == protowire.VarintType:
			v, n := protowire.ConsumeVarint(b)
			if n < 0 {
				return errDecode
			}
			t.Shape, b = append(t.Shape, int64(v)), b[n:]
		case num == 2 && typ == protowire.BytesType:
			v, n := protowire.ConsumeBytes(b)
			if n < 0 {
				return errDecode
			}
			for len(v) > 0 {
				x, k := protowire.ConsumeVarint(v)
				if k < 0 {
					return errDecode
				}
				t.Shape, v = append(t.Shape, int64(x)), v[k:]
			}
			b = b[n:]
		case num == 3 && typ == protowire.BytesType:
			v, n := protowire.ConsumeBytes(b)
			if n < 0 {
				return errDecode
			}
			if alias {
				t.Data = v[:len(v):len(v)]
			} else {
				t.Data = append(t.Data[:0], v...)
			}
			b = b[n:]
		case num == 4:
			var err error
			if t.Scales, n, err = consumeFloats(b, num, typ, t.Scales); err != nil {
				return err
			}
			b = b[n:]
		default:
			n := protowire.ConsumeFieldValue(num, typ, b)
			if n < 0 {
				return errDecode
			}
			b = b[n:]
		}
	}
	return nil
}

// consumeInt32s appends a repeated int32 field's value (packed or one
// element) to s and returns the bytes consumed.
func consumeInt32s(b []byte, num protowire.Number, typ protowire.Type, s []int32) ([]int32, int, error) {
	switch typ {
	case protowire.VarintType:
		v, n := protowire.ConsumeVarint(b)
		if n < 0 {
			return s, 0, errDecode
		}
		return append(s, int32(v)), n, nil
	case protowire.BytesType:
		v, n := protowire.ConsumeBytes(b)
		if n < 0 {
			return s, 0, errDecode
		}
		for len(v) > 0 {
			x, k := protowire.ConsumeVarint(v)
			if k < 0 {
				return s, 0, errDecode
			}
			s, v = append(s, int32(x)), v[k:]
		}
		return s, n, nil
	}
	n := protowire.ConsumeFieldValue(num, typ, b)
	if n < 0 {
		return s, 0, errDecode
	}
	return s, n, nil
}

// consumeFloats is consumeInt32s for a repeated float field.
func consumeFloats(b []byte, num protowire.Number, typ protowire.Type, s []float32) ([]float32, int, error) {
	switch typ {
	case protowire.Fixed32Type:
		v, n := protowire.ConsumeFixed32(b)
		if n < 0 {
			return s, 0, errDecode
		}
		return append(s, math.Float32frombits(v)), n, nil
	case protowire.BytesType:
		v, n := protowire.ConsumeBytes(b)
		if n < 0 || len(v)%4 != 0 {
			return s, 0, errDecode
		}
		for ; len(v) > 0; v = v[4:] {
			x, _ := protowire.ConsumeFixed32(v)
			s = append(s, math.Float32frombits(x))
		}
		return s, n, nil
	}
	n := protowire.ConsumeFieldValue(num, typ, b)
	if n < 0 {
		return s, 0, errDecode
	}
	return s, n, nil
}

// consumeMapEntry decodes one map<string, string> entry into m.
func consumeMapEntry(b []byte, m map[string]string) error {
	var key, val string
	for len(b) > 0 {
		num, typ, n := consumeTag(b)
		if n < 0 {
			return errDecode
		}
		b = b[n:]
		if (num == 1 || num == 2) && typ == protowire.BytesType {
			v, n := protowire.ConsumeBytes(b)
			if n < 0 || !utf8.Valid(v) {
				return errDecode
			}
			if num == 1 {
				key = string(v)
			} else {
				val = string(v)
			}
			b = b[n:]
			continue
		}
		n = protowire.ConsumeFieldValue(num, typ, b)
		if n < 0 {
			return errDecode
		}
		b = b[n:]
	}
	m[key] = val
	return nil
}

// consumeTag is protowire.ConsumeTag refusing field numbers beyond
// protobuf's range, as proto.Unmarshal does.
func consumeTag(b []byte) (protowire.Number, protowire.Type, int) {
	num, typ, n := protowire.ConsumeTag(b)
	if n >= 0 && num > protowire.MaxValidNumber {
		return 0, 0, -1
	}
	return num, typ, n
}

// AppendResponseHead appends the start of a DispatchResponse with id,
// code OK and F32 partial rows of rows×cols values whose bytes the caller
// writes in place, where they will be sent: its id, alignment padding
// (PadField) that puts the rows a multiple of RowAlign bytes after
// start (where the message begins in b), the partial field up to its
// data, and room for the rows. It returns b and the rows as float32
// values aliasing it, or a nil view (and b unchanged) when they would
// not be 4-byte aligned in memory. b has capacity left for
// AppendComputeUs, so that appending it does not move the rows. The
// message, with AppendComputeUs after the rows, decodes to the response
// with that Partial and ComputeUs (fields may come in any order): an
// expert node computes its partial sums straight into the frame it
// sends, with no pass to encode them.
func AppendResponseHead(b []byte, start int, id uint64, rows, cols int) ([]byte, []float32) {
	data := 4 * rows * cols
	ts := tensorSize(meshpb.DType_DTYPE_F32, rows, cols, data, 0)
	// The id, then the partial field up to its rows' bytes.
	head := 0
	if id != 0 {
		head = protowire.SizeTag(1) + protowire.SizeVarint(id)
	}
	off := len(b) - start + head + protowire.SizeTag(responsePartialField) + protowire.SizeVarint(uint64(ts)) +
		tensorSize(meshpb.DType_DTYPE_F32, rows, cols, 0, 0) + protowire.SizeTag(tensorDataField) + protowire.SizeVarint(uint64(data))
	pad := 0
	if off%RowAlign != 0 {
		pad = protowire.SizeTag(PadField) + 1
		pad += (RowAlign - (off+pad)%RowAlign) % RowAlign
	}
	const tail = 1 + 10 // AppendComputeUs: a one-byte tag and a varint
	orig := b
	b = slices.Grow(b, off-(len(b)-start)+pad+data+tail)
	if id != 0 {
		b = protowire.AppendTag(b, 1, protowire.VarintType)
		b = protowire.AppendVarint(b, id)
	}
	if pad > 0 {
		b = protowire.AppendTag(b, PadField, protowire.BytesType)
		k := pad - protowire.SizeTag(PadField) - 1
		b = append(b, byte(k))
		for range k {
			b = append(b, 0)
		}
	}
	b = protowire.AppendTag(b, responsePartialField, protowire.BytesType)
	b = protowire.AppendVarint(b, uint64(ts))
	b = appendTensorHead(b, meshpb.DType_DTYPE_F32, rows, cols)
	b = protowire.AppendTag(b, tensorDataField, protowire.BytesType)
	b = protowire.AppendVarint(b, uint64(data))
	n := len(b)
	b = b[:n+data]
	if data == 0 {
		return b, []float32{}
	}
	p := unsafe.Pointer(&b[n])
	if uintptr(p)%4 != 0 || !nativeLE {
		return orig, nil
	}
	return b, unsafe.Slice((*float32)(p), rows*cols)
}

// AppendComputeUs appends a DispatchResponse's compute_us field.
func AppendComputeUs(b []byte, us uint64) []byte {
	if us == 0 {
		return b
	}
	b = protowire.AppendTag(b, 5, protowire.VarintType)
	return protowire.AppendVarint(b, us)
}
