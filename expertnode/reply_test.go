package expertnode

import (
	"context"
	"errors"
	"io"
	"strings"
	"sync/atomic"
	"testing"
	"time"
	"unsafe"

	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"

	"github.com/expertmesh/expertmesh/internal/dataplane"
	"github.com/expertmesh/expertmesh/internal/wire"
	meshpb "github.com/expertmesh/expertmesh/proto"
)

// TestReplyOut: the reply a stream sends, its partial rows encoded
// straight into gRPC's buffer (replyOut), decodes to the reply with the
// rows encoded into a Tensor first (reply): F32 and BF16, 1 and 32 rows,
// and a rejected request's reply, which has no rows.
func TestReplyOut(t *testing.T) {
	cfg := testConfig("all")
	cfg.Threads = 1
	node := startNode(t, cfg)
	for _, c := range []struct {
		rows int
		dt   meshpb.DType
		bad  bool
	}{{1, meshpb.DType_DTYPE_F32, false}, {32, meshpb.DType_DTYPE_F32, false}, {1, meshpb.DType_DTYPE_BF16, false}, {32, meshpb.DType_DTYPE_BF16, false}, {3, meshpb.DType_DTYPE_F32, true}} {
		req := benchRequest(c.rows)
		req.PartialDtype = c.dt
		if c.bad {
			req.K = 0
		}
		j := node.prepare(new(job), req)
		if j.code == 0 {
			node.run(context.Background(), j, false, nil)
		}
		decode := func(v any) *meshpb.DispatchResponse {
			bs, err := wire.Codec{}.Marshal(v)
			if err != nil {
				t.Fatal(err)
			}
			defer bs.Free()
			r := new(meshpb.DispatchResponse)
			if err := proto.Unmarshal(bs.Materialize(), r); err != nil {
				t.Fatal(err)
			}
			return r
		}
		got := decode(node.replyOut(j))
		want := decode(node.reply(j))
		if !proto.Equal(got, want) {
			t.Errorf("%v rows=%d bad=%v: replyOut decodes to %v, reply to %v", c.dt, c.rows, c.bad, got, want)
		}
		if (want.Partial == nil) != c.bad {
			t.Errorf("%v rows=%d bad=%v: partial %v, code %d", c.dt, c.rows, c.bad, want.Partial != nil, want.Code)
		}

		// Computed in place, on a stream that sends frames: F32 rows go
		// into the reply's frame, 64-byte aligned, and the frame decodes
		// to the same reply (but for its compute time); other replies
		// take replyOut's path.
		j2 := node.prepare(new(job), req)
		if j2.code == 0 {
			node.run(context.Background(), j2, true, nil)
		}
		if inFrame := c.dt == meshpb.DType_DTYPE_F32 && !c.bad; j2.inFrame != inFrame {
			t.Fatalf("%v rows=%d bad=%v: computed in the frame %v, want %v", c.dt, c.rows, c.bad, j2.inFrame, inFrame)
		}
		if !j2.inFrame {
			continue
		}
		if a := uintptr(unsafe.Pointer(&j2.out[0])); a%wire.RowAlign != 0 {
			t.Errorf("%v rows=%d: rows at %#x", c.dt, c.rows, a)
		}
		frame := node.replyFrame(j2)
		inPlace := new(meshpb.DispatchResponse)
		if err := proto.Unmarshal(frame[dataplane.HeaderSize:], inPlace); err != nil {
			t.Fatal(err)
		}
		inPlace.ProtoReflect().SetUnknown(nil) // the alignment padding
		if inPlace.ComputeUs != uint64(j2.compute.Microseconds()) {
			t.Errorf("rows=%d: compute_us %d, want %d", c.rows, inPlace.ComputeUs, j2.compute.Microseconds())
		}
		inPlace.ComputeUs, want.ComputeUs = 0, 0
		if !proto.Equal(inPlace, want) {
			t.Errorf("rows=%d: the frame decodes to %v, reply to %v", c.rows, inPlace, want)
		}
	}
}

// failingStream is a Dispatch stream whose requests come from reqs
// (closed: EOF) and whose every Send fails.
type failingStream struct {
	grpc.ServerStream
	ctx   context.Context
	reqs  chan *meshpb.DispatchRequest
	sends atomic.Int32
}

func (s *failingStream) Context() context.Context { return s.ctx }
func (s *failingStream) RecvMsg(m any) error {
	r, ok := <-s.reqs
	if !ok {
		return io.EOF
	}
	proto.Reset(m.(*meshpb.DispatchRequest))
	proto.Merge(m.(*meshpb.DispatchRequest), r)
	return nil
}
func (s *failingStream) SendMsg(any) error {
	s.sends.Add(1)
	return errors.New("connection reset")
}
func (s *failingStream) Recv() (*meshpb.DispatchRequest, error) {
	m := new(meshpb.DispatchRequest)
	return m, s.RecvMsg(m)
}
func (s *failingStream) Send(m *meshpb.DispatchResponse) error { return s.SendMsg(m) }

// TestSendFailureStopsWork: once a stream's Send has failed, requests
// still arriving are neither computed nor answered (no panic building a
// reply for a skipped computation), and the stream ends with Send's
// error once the client stops sending.
func TestSendFailureStopsWork(t *testing.T) {
	cfg := testConfig("all")
	cfg.Threads = 1
	node := startNode(t, cfg)
	st := &failingStream{ctx: context.Background(), reqs: make(chan *meshpb.DispatchRequest)}
	done := make(chan error, 1)
	go func() { done <- (&service{n: node}).Dispatch(st) }()
	st.reqs <- validRequest(1)
	deadline := time.Now().Add(10 * time.Second)
	for st.sends.Load() == 0 {
		if time.Now().After(deadline) {
			t.Fatal("the first reply was never sent")
		}
		time.Sleep(time.Millisecond)
	}
	for i := range 6 {
		st.reqs <- validRequest(uint64(2 + i))
	}
	close(st.reqs)
	select {
	case err := <-done:
		if err == nil || !strings.Contains(err.Error(), "connection reset") {
			t.Errorf("stream ended with %v, want Send's error", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Dispatch did not return after EOF")
	}
	if n := st.sends.Load(); n != 1 {
		t.Errorf("%d Sends after the first failed, want none", n-1)
	}
}
