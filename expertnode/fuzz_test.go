package expertnode

import (
	"context"
	"encoding/binary"
	"math"
	"testing"

	"google.golang.org/grpc/codes"

	"github.com/expertmesh/expertmesh/internal/wire"
	meshpb "github.com/expertmesh/expertmesh/proto"
)

// FuzzDispatchValidation feeds arbitrary requests to the node's validation
// and, when accepted, to compute and reply: nothing may panic, a rejection
// must carry InvalidArgument or FailedPrecondition with a message, and an
// accepted request must produce a well-formed [rows, 64] reply.
func FuzzDispatchValidation(f *testing.F) {
	cfg := testConfig("1:0-79,2:all")
	cfg.Threads = 1
	cfg.MaxRows = 64
	node := startNode(f, cfg)
	valid := validRequest(1)
	f.Add(uint32(1), int64(3), int64(64), uint32(6), valid.Hidden.Data, int32s(valid.ExpertIds), f32s(valid.GateWeights), uint8(1))
	f.Add(uint32(0), int64(1), int64(64), uint32(1), make([]byte, 256), int32s([]int32{3}), f32s([]float32{1}), uint8(1))
	f.Add(uint32(2), int64(1), int64(64), uint32(1), make([]byte, 256), int32s([]int32{-1}), f32s([]float32{1}), uint8(1))
	f.Add(uint32(1), int64(-1), int64(64), uint32(1), []byte{}, []byte{}, []byte{}, uint8(2))
	f.Fuzz(func(t *testing.T, layer uint32, rows, cols int64, k uint32, data, ids, weights []byte, dtype uint8) {
		req := &meshpb.DispatchRequest{Id: 9, Layer: layer, K: k,
			Hidden:    &meshpb.Tensor{Dtype: meshpb.DType(dtype), Shape: []int64{rows, cols}, Data: data},
			ExpertIds: fromInt32s(ids), GateWeights: fromF32s(weights)}
		j := node.prepare(new(job), req)
		if j.code != codes.OK {
			if (j.code != codes.InvalidArgument && j.code != codes.FailedPrecondition) || j.msg == "" {
				t.Fatalf("rejection code %v message %q", j.code, j.msg)
			}
			return
		}
		node.run(context.Background(), j, false, nil)
		r := node.reply(j)
		if r.Code != 0 {
			t.Fatalf("accepted request failed in compute: %v %s", codes.Code(r.Code), r.Message)
		}
		if n, err := wire.CheckMatrix(r.Partial, 64, cfg.MaxRows); err != nil || int64(n) != rows {
			t.Fatalf("reply %v rows %d: %v", r.Partial.Shape, n, err)
		}
	})
}

func int32s(v []int32) []byte {
	b := make([]byte, 4*len(v))
	for i, x := range v {
		binary.LittleEndian.PutUint32(b[4*i:], uint32(x))
	}
	return b
}

func fromInt32s(b []byte) []int32 {
	v := make([]int32, len(b)/4)
	for i := range v {
		v[i] = int32(binary.LittleEndian.Uint32(b[4*i:]))
	}
	return v
}

func f32s(v []float32) []byte {
	b := make([]byte, 4*len(v))
	for i, x := range v {
		binary.LittleEndian.PutUint32(b[4*i:], math.Float32bits(x))
	}
	return b
}

func fromF32s(b []byte) []float32 {
	v := make([]float32, len(b)/4)
	for i := range v {
		v[i] = math.Float32frombits(binary.LittleEndian.Uint32(b[4*i:]))
	}
	return v
}
