package expertnode

import (
	"context"
	"io"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/expertmesh/expertmesh/internal/dataplane"
	"github.com/expertmesh/expertmesh/internal/wire"
	meshpb "github.com/expertmesh/expertmesh/proto"
)

// transports are the two ways a Dispatch stream reaches a node, on its
// one listening address.
var transports = []string{"grpc", "dataplane"}

// dispatchClient is the client side of a Dispatch stream on either
// transport.
type dispatchClient interface {
	Send(*meshpb.DispatchRequest) error
	Recv() (*meshpb.DispatchResponse, error)
}

type dpClient struct{ c *dataplane.Conn }

func (d dpClient) Send(r *meshpb.DispatchRequest) error { return d.c.SendMsg(r) }

func (d dpClient) Recv() (*meshpb.DispatchResponse, error) {
	m := new(meshpb.DispatchResponse)
	if err := d.c.RecvMsg(m); err != nil {
		return nil, err
	}
	return m, nil
}

// opener opens Dispatch streams to n over transport tr.
func opener(t testing.TB, n *Node, tr string) func(context.Context) (dispatchClient, error) {
	if tr == "grpc" {
		_, c := dial(t, n)
		return func(ctx context.Context) (dispatchClient, error) { return c.Dispatch(ctx) }
	}
	return func(ctx context.Context) (dispatchClient, error) {
		c, err := dataplane.Dial(ctx, n.Addr())
		if err != nil {
			return nil, err
		}
		t.Cleanup(func() { c.Close() })
		return dpClient{c}, nil
	}
}

// turnStream is a Dispatch stream fed by a test that reports, like a
// data-plane connection, whether bytes of a next request have arrived
// (Buffered, set by the test), and tells the test of every receive
// begun and every reply.
type turnStream struct {
	ctx      context.Context
	reqs     chan *meshpb.DispatchRequest // closed: EOF
	recvs    chan int                     // receives begun so far, at each
	replies  chan turnReply
	buffered atomic.Int32
	begun    atomic.Int32
}

func (s *turnStream) Context() context.Context { return s.ctx }
func (s *turnStream) Buffered() int            { return int(s.buffered.Load()) }
func (s *turnStream) RecvMsg(m any) error {
	s.recvs <- int(s.begun.Add(1))
	var r *meshpb.DispatchRequest
	var ok bool
	select {
	case r, ok = <-s.reqs:
	case <-s.ctx.Done():
		return s.ctx.Err()
	}
	if !ok {
		return io.EOF
	}
	proto.Reset(m.(*meshpb.DispatchRequest))
	proto.Merge(m.(*meshpb.DispatchRequest), r)
	return nil
}
func (s *turnStream) SendMsg(m any) error {
	b, err := wire.AppendMessage(nil, m)
	if err != nil {
		return err
	}
	r := new(meshpb.DispatchResponse)
	if err := proto.Unmarshal(b, r); err != nil {
		return err
	}
	s.replies <- turnReply{r, int(s.begun.Load())}
	return nil
}

// turnReply is a reply and the receives begun when it was sent.
type turnReply struct {
	*meshpb.DispatchResponse
	begun int
}

// TestIdleStreamKeepsTurn: on a stream that reports what it has
// buffered, a worker that receives a request while the node is idle
// computes and answers it without handing the receiving turn on (no
// other receive begins before its reply); it hands it on at once when
// the next request has begun to arrive, and before it waits when the
// compute lane is busy, so that others receive meanwhile.
func TestIdleStreamKeepsTurn(t *testing.T) {
	cfg := testConfig("all")
	cfg.Threads = 1
	node := startNode(t, cfg)
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel) // a failed test's stream ends, before the node closes
	st := &turnStream{ctx: ctx, reqs: make(chan *meshpb.DispatchRequest), recvs: make(chan int, 16), replies: make(chan turnReply, 16)}
	done := make(chan error, 1)
	go func() { done <- node.serveDispatch(st) }()
	reply := func(id uint64) int {
		t.Helper()
		select {
		case r := <-st.replies:
			if r.Id != id || r.Code != 0 {
				t.Fatalf("reply %d (want %d): code %d %s", r.Id, id, r.Code, r.Message)
			}
			return r.begun
		case <-time.After(10 * time.Second):
			t.Fatalf("no reply to %d", id)
		}
		return 0
	}
	receiveBegun := func(n int) {
		t.Helper()
		select {
		case got := <-st.recvs:
			if got != n {
				t.Fatalf("receive %d begun, want %d", got, n)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("receive %d never began", n)
		}
	}
	receiveBegun(1)
	// Idle: the same worker receives again only after answering.
	for i := range 3 {
		st.reqs <- validRequest(uint64(i + 1))
		if begun := reply(uint64(i + 1)); begun != i+1 {
			t.Fatalf("request %d: %d receives begun before its reply, want %d", i+1, begun, i+1)
		}
		select {
		case n := <-st.recvs:
			if n != i+2 {
				t.Fatalf("receive %d begun, want %d", n, i+2)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("no receive after the reply")
		}
	}
	// The next request arriving: the turn goes on at once.
	st.buffered.Store(1)
	st.reqs <- validRequest(10)
	receiveBegun(5)
	st.buffered.Store(0)
	reply(10)
	// The compute lane busy: the turn goes on before the wait.
	node.compute.Lock()
	st.reqs <- validRequest(11)
	receiveBegun(6)
	node.compute.Unlock()
	reply(11)
	close(st.reqs)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}
