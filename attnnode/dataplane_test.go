package attnnode

import (
	"context"
	"encoding/binary"
	"errors"
	"io"
	"log/slog"
	"math"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"google.golang.org/grpc"

	"github.com/expertmesh/expertmesh/internal/dataplane"
	"github.com/expertmesh/expertmesh/internal/rpc"
	"github.com/expertmesh/expertmesh/internal/wire"
	"github.com/expertmesh/expertmesh/model"
	"github.com/expertmesh/expertmesh/placement"
	meshpb "github.com/expertmesh/expertmesh/proto"
)

// badExpert is a data-plane peer that misbehaves after the handshake in
// one of several ways, on a listener whose sockets have a small receive
// buffer (so that a peer that stops reading fills the sender's socket
// buffers quickly).
type badExpert struct {
	addr  string
	conns atomic.Int32 // data-plane connections handshaken
	reqs  atomic.Int32 // requests read
}

const (
	stall     = iota // never reads a request
	halfFrame        // reads a request, writes part of a reply frame, closes
	corrupt          // reads a request, answers with a frame that does not decode
	nonFinite        // answers every request with a well-formed reply (aligned F32 rows, viewed in place) holding a NaN
)

func startBadExpert(t *testing.T, how int) *badExpert {
	t.Helper()
	lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		c.Control(func(fd uintptr) { serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 4096) })
		return serr
	}}
	lis, err := lc.Listen(context.Background(), "tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	e := &badExpert{addr: lis.Addr().String()}
	release := make(chan struct{})
	var wg sync.WaitGroup
	serve := func(nc net.Conn) {
		defer wg.Done()
		defer nc.Close()
		hello := make([]byte, 24)
		if _, err := io.ReadFull(nc, hello); err != nil || string(hello[:4]) != dataplane.Magic {
			return
		}
		answer := []byte(dataplane.Magic + "\x00\x00\x00\x00")
		binary.LittleEndian.PutUint16(answer[4:], dataplane.Version)
		if _, err := nc.Write(answer); err != nil {
			return
		}
		e.conns.Add(1)
		if how == stall {
			<-release
			return
		}
		if how == nonFinite {
			var frame []byte
			var req meshpb.DispatchRequest
			for {
				head := make([]byte, 5)
				if _, err := io.ReadFull(nc, head); err != nil {
					return
				}
				b := make([]byte, binary.LittleEndian.Uint32(head[1:]))
				if _, err := io.ReadFull(nc, b); err != nil || wire.UnmarshalRequest(b, &req) != nil {
					return
				}
				e.reqs.Add(1)
				var x []float32
				frame, x = dataplane.ReplyFrame(frame, req.Id, int(req.Hidden.Shape[0]), int(req.Hidden.Shape[1]))
				x[len(x)/2] = float32(math.NaN())
				frame[0] = 1
				binary.LittleEndian.PutUint32(frame[1:], uint32(len(frame)-5))
				if _, err := nc.Write(frame); err != nil {
					return
				}
			}
		}
		head := make([]byte, 5)
		if _, err := io.ReadFull(nc, head); err != nil {
			return
		}
		if _, err := io.ReadFull(nc, make([]byte, binary.LittleEndian.Uint32(head[1:]))); err != nil {
			return
		}
		e.reqs.Add(1)
		switch how {
		case halfFrame:
			nc.Write([]byte{1, 100, 0, 0, 0, 8, 1, 16, 2})
			return
		case corrupt:
			nc.Write([]byte{1, 3, 0, 0, 0, 0xff, 0xff, 0xff})
		}
		<-release
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			nc, err := lis.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go serve(nc)
		}
	}()
	t.Cleanup(func() {
		close(release)
		lis.Close()
		wg.Wait()
	})
	return e
}

// twoReplicas is a Routing in which the bad peer and a real node each
// hold every expert.
func twoReplicas(t *testing.T, dir string, bad string, good *expert) *placement.Routing {
	t.Helper()
	c, err := model.LoadConfig(dir)
	if err != nil {
		t.Fatal(err)
	}
	shape := placement.ShapeOf(c)
	all, _ := placement.ParseSet(shape, "all")
	tab := placement.NewTable(shape, 1)
	if err := tab.AddSet("bad", all); err != nil {
		t.Fatal(err)
	}
	if err := tab.AddSet(good.id, all); err != nil {
		t.Fatal(err)
	}
	return &placement.Routing{Table: tab, Addrs: []string{bad, good.proxy.Addr()}}
}

// closeTo reports whether got matches want within a relative 1e-5 (the
// partial sums of a retried dispatch add in another order).
func closeTo(got, want []float32) bool {
	for i := range want {
		if d := math.Abs(float64(got[i] - want[i])); d > 1e-5*(1+math.Abs(float64(want[i]))) {
			return false
		}
	}
	return true
}

// TestBadPeerFailsOver: a data-plane peer that handshakes and then never
// reads (frozen from the start), cuts a reply short, answers with a
// frame that does not decode, or answers with a NaN among rows the
// receiver views in place (checked there: refused as any bad reply)
// never blocks the dispatching goroutine
// (StartRoutedExperts, which runs under the engine's compute lock): its
// rows are served by the other replica, the frozen one's after one
// dispatch timeout (its request's deadline, as on gRPC), the others'
// after their redials, well within the timeout; the sums match a
// dispatch to the good node alone.
func TestBadPeerFailsOver(t *testing.T) {
	dir := genWide(t)
	c, err := model.LoadConfig(dir)
	if err != nil {
		t.Fatal(err)
	}
	good := startExpert(t, dir, "good", nil)
	// 1024 rows of 2048 floats, about half of them to each replica: a
	// 4 MiB request, sent inline to an idle connection (inlineMax raised
	// for it), more than a stalled peer's socket buffers take (loopback's
	// autotuned send buffer starts above 1 MiB), so that the write
	// blocks.
	const rows = 1024
	ref := NewRemoteExperts(newTestView(routing(t, dir, 1, good)), c.HiddenSize, RemoteConfig{})
	defer ref.Close()
	for _, tc := range []struct {
		name    string
		how     int
		timeout time.Duration
	}{{"stalled", stall, time.Second}, {"half frame", halfFrame, 20 * time.Second}, {"corrupt frame", corrupt, 20 * time.Second},
		{"non-finite rows", nonFinite, 20 * time.Second}} {
		t.Run(tc.name, func(t *testing.T) {
			timeout := tc.timeout
			bad := startBadExpert(t, tc.how)
			rt := twoReplicas(t, dir, bad.addr, good)
			r := NewRemoteExperts(newTestView(rt), c.HiddenSize, RemoteConfig{DispatchTimeout: timeout, ExpertWait: time.Minute})
			defer r.Close()
			r.inlineMax = 64 << 20
			want := make([]float32, rows*c.HiddenSize)
			for i := range 6 {
				b := newRoutedBatch(t, c, rt.Table, rows)
				b.x[0] = float32(i)
				clear(want)
				if err := ref.StartRoutedExperts(context.Background(), b.layer, b.x, b.n, b.k, b.ids, b.w, want)(); err != nil {
					t.Fatal(err)
				}
				var start time.Duration
				took := bounded(t, 10*time.Second, "dispatch with a bad replica", func() {
					t0 := time.Now()
					wait := r.StartRoutedExperts(context.Background(), b.layer, b.x, b.n, b.k, b.ids, b.w, b.out)
					start = time.Since(t0)
					if err := wait(); err != nil {
						t.Error(err)
					}
				})
				if start > 2*time.Second {
					t.Errorf("dispatch %d: StartRoutedExperts blocked for %v", i, start)
				}
				if !closeTo(b.out, want) {
					t.Fatalf("dispatch %d: sums differ from the good node's alone", i)
				}
				t.Logf("dispatch %d: start %v, all %v", i, start, took)
			}
			if bad.conns.Load() == 0 {
				t.Fatal("nothing was ever sent to the bad peer: the test proved nothing")
			}
			if tc.how != stall && bad.reqs.Load() == 0 {
				t.Fatal("the bad peer never received a request")
			}
			t.Logf("bad peer: %d connections, %d requests read", bad.conns.Load(), bad.reqs.Load())
		})
	}
}

// TestStalledPeerDoesNotBlockDispatch: a node that stops reading (frozen
// after its connection went idle) while a dispatch writes it a message
// larger than the socket buffers take does not hold the dispatching
// goroutine (StartRoutedExperts, under the engine's compute lock) past
// inlineWriteTimeout: the rest of the frame is left to the connection's
// goroutine, whose write gives up after the dispatch timeout, and the
// rows move to the other replica then, not at the request's deadline
// (9 dispatch timeouts for 2048 rows); the good replica, which takes its
// own 8 MiB inline just as well, is not failed by its slower reads. The
// sums match a dispatch to the good node alone.
func TestStalledPeerDoesNotBlockDispatch(t *testing.T) {
	dir := genWide(t)
	c, err := model.LoadConfig(dir)
	if err != nil {
		t.Fatal(err)
	}
	a, good := startExpert(t, dir, "a", nil), startExpert(t, dir, "good", nil)
	const timeout = 3 * time.Second
	ref := NewRemoteExperts(newTestView(routing(t, dir, 1, good)), c.HiddenSize, RemoteConfig{})
	defer ref.Close()
	r := NewRemoteExperts(newTestView(routing(t, dir, 1, a, good)), c.HiddenSize, RemoteConfig{DispatchTimeout: timeout, ExpertWait: time.Minute})
	defer r.Close()
	// 4096 rows of 2048 floats, about half to each replica: a 16 MiB
	// request, sent inline to an idle connection (inlineMax raised for
	// it), beyond what the proxy's and the sender's socket buffers hold.
	r.inlineMax = 64 << 20
	rt, _ := r.view.Routing()
	b := newRoutedBatch(t, c, rt.Table, 4096)
	want := make([]float32, len(b.out))
	if err := ref.StartRoutedExperts(context.Background(), b.layer, b.x, b.n, b.k, b.ids, b.w, want)(); err != nil {
		t.Fatal(err)
	}
	b.dispatch(t, context.Background(), r) // both connections open and idle
	inline := r.sentInline.Load()
	a.proxy.Freeze()
	clear(b.out)
	var start time.Duration
	deadline := r.deadline(2048)
	took := bounded(t, 2*deadline, "dispatch to a stalled replica", func() {
		t0 := time.Now()
		wait := r.StartRoutedExperts(context.Background(), b.layer, b.x, b.n, b.k, b.ids, b.w, b.out)
		start = time.Since(t0)
		if err := wait(); err != nil {
			t.Error(err)
		}
	})
	t.Logf("start %v, all %v (inline write bound %v, dispatch timeout %v, request deadline %v)", start, took, inlineWriteTimeout, timeout, deadline)
	if r.sentInline.Load() == inline {
		t.Fatal("nothing was sent inline after the freeze: the test proved nothing")
	}
	select {
	case <-a.proxy.Held():
	default:
		t.Fatal("nothing was held by the frozen proxy: the test proved nothing")
	}
	if start > timeout {
		t.Errorf("StartRoutedExperts took %v", start)
	}
	if took > deadline {
		t.Errorf("the dispatch took %v: its rows waited for the request's deadline %v, not the stalled write's %v", took, deadline, timeout)
	}
	if !closeTo(b.out, want) {
		t.Fatal("sums differ from the good node's alone")
	}
	if !r.conn(a.proxy.Addr()).down.Load() {
		t.Error("the stalled node is not marked down")
	}
}

// countWarns counts the records of a logger.
type countWarns struct {
	slog.Handler
	mu sync.Mutex
	n  int
}

func (h *countWarns) Enabled(context.Context, slog.Level) bool { return true }

func (h *countWarns) Handle(_ context.Context, r slog.Record) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if r.Level >= slog.LevelWarn {
		h.n++
	}
	return nil
}

// TestFallbackToGRPC: an expert node that serves only gRPC (an older
// one: it answers the data plane's hello with HTTP/2's SETTINGS and
// closes) is dispatched to over gRPC, with one warning however many
// dispatches and reconnections follow.
func TestFallbackToGRPC(t *testing.T) {
	const h = 64
	part := make([]float32, h)
	for i := range part {
		part[i] = float32(i) + 0.5
	}
	reply := &meshpb.DispatchResponse{Partial: &meshpb.Tensor{Dtype: meshpb.DType_DTYPE_F32, Shape: []int64{1, h}, Data: wire.AppendRows(nil, meshpb.DType_DTYPE_F32, part)}}
	srv := rpc.NewServer(rpc.ServerOptions{})
	meshpb.RegisterExpertServiceServer(srv.Server, &echoExperts{reply: reply})
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(lis)
	defer srv.Stop()

	// The raw exchange first: what the data plane's client sees.
	if _, err := dataplane.Dial(context.Background(), lis.Addr().String()); !errors.Is(err, dataplane.ErrRefused) {
		t.Fatalf("data-plane dial to a gRPC-only server: %v, want ErrRefused", err)
	}

	shape := placement.Shape{Layers: 2, Experts: 4, MoELayers: []int{1}}
	tab := placement.NewTable(shape, 1)
	all := placement.NewSet(shape)
	for e := range 4 {
		all[1][e] = true
	}
	if err := tab.AddSet("old", all); err != nil {
		t.Fatal(err)
	}
	logs := &countWarns{Handler: slog.DiscardHandler}
	var dials atomic.Int32
	r := NewRemoteExperts(newTestView(&placement.Routing{Table: tab, Addrs: []string{lis.Addr().String()}}), h, RemoteConfig{
		Logger: slog.New(logs), DispatchTimeout: 10 * time.Second,
		Dial: func(addr string) (*grpc.ClientConn, error) { dials.Add(1); return rpc.DialDispatch(addr) }})
	defer r.Close()
	x, out := make([]float32, h), make([]float32, h)
	for i := range 5 {
		clear(out)
		if err := r.StartRoutedExperts(context.Background(), 1, x, 1, 1, []int32{int32(i % 4)}, []float32{1}, out)(); err != nil {
			t.Fatal(err)
		}
		for j := range out {
			if out[j] != part[j] {
				t.Fatalf("dispatch %d: out[%d] = %v, want the node's %v", i, j, out[j], part[j])
			}
		}
		if i == 2 {
			// A reconnection tries the data plane again and falls back
			// again, without another warning.
			c := r.conn(lis.Addr().String())
			c.tx.Lock()
			c.st.fail(errors.New("test: cut"))
			c.tx.Unlock()
		}
	}
	if dials.Load() < 2 {
		t.Errorf("%d gRPC dials, want one before and one after the cut", dials.Load())
	}
	logs.mu.Lock()
	defer logs.mu.Unlock()
	if logs.n != 1 {
		t.Errorf("%d warnings, want 1", logs.n)
	}
}

// TestTransportsAgree: the same prompts through an attention node with
// three remote expert nodes give bit-identical tokens and logprobs over
// the data plane and over gRPC, and the single-process reference's.
func TestTransportsAgree(t *testing.T) {
	dir := genTiny(t, "tiny-v2")
	// Each expert on one node: no replica choice, whose load correction
	// could split a row's slots differently from run to run and so sum
	// them in another order.
	table, nodes := startExperts(t, dir, 3)
	const maxTokens = 6
	var got [2][][]int
	var gotLP, gotEcho [2][][]float64
	for i, tr := range []Transport{TransportTCP, TransportGRPC} {
		cfg := DefaultConfig()
		cfg.ModelDir, cfg.Threads, cfg.CacheBytes, cfg.Placement = dir, 1, 8<<20, placement.NewStatic(table)
		cfg.ListenAddr, cfg.MicroBatches, cfg.DispatchTransport = "", 2, tr
		n, err := Start(context.Background(), cfg)
		if err != nil {
			t.Fatal(err)
		}
		got[i], gotLP[i], gotEcho[i] = drive(t, n, prompts, maxTokens, 4)
		n.Close()
	}
	for p := range prompts {
		if !equalInts(got[0][p], got[1][p]) {
			t.Fatalf("prompt %d: tokens %v over tcp, %v over grpc", p, got[0][p], got[1][p])
		}
		for j := range gotLP[0][p] {
			if math.Float64bits(gotLP[0][p][j]) != math.Float64bits(gotLP[1][p][j]) {
				t.Fatalf("prompt %d token %d: logprob %v over tcp, %v over grpc", p, j, gotLP[0][p][j], gotLP[1][p][j])
			}
		}
		for j := range gotEcho[0][p] {
			if math.Float64bits(gotEcho[0][p][j]) != math.Float64bits(gotEcho[1][p][j]) {
				t.Fatalf("prompt %d position %d: echo logprob %v over tcp, %v over grpc", p, j, gotEcho[0][p][j], gotEcho[1][p][j])
			}
		}
	}
	checkAgainstReference(t, dir, got[0], gotLP[0], gotEcho[0], maxTokens)
	for _, n := range nodes {
		if n.Held().Len() == 0 {
			t.Error("some expert node holds nothing")
		}
	}
}

// TestRepliesViewedInPlace: over the data plane, F32 replies' rows are
// used where they arrived (each attempt keeps the buffer its reply was
// read into, and its part views it), BF16 ones are widened into the
// attempt's own buffer; either way the sums are bit for bit those of
// gRPC, whose replies are always decoded into the attempt's buffer.
func TestRepliesViewedInPlace(t *testing.T) {
	dir := genWide(t)
	c, err := model.LoadConfig(dir)
	if err != nil {
		t.Fatal(err)
	}
	table, _ := startExperts(t, dir, 1)
	for _, dt := range []meshpb.DType{meshpb.DType_DTYPE_F32, meshpb.DType_DTYPE_BF16} {
		for _, rows := range []int{1, 8, 33} {
			var outs [2][]float32
			for i, tr := range []Transport{TransportTCP, TransportGRPC} {
				r := NewRemoteExperts(placement.NewStatic(table), c.HiddenSize, RemoteConfig{Wire: dt, Transport: tr})
				b := newRoutedBatch(t, c, table, rows)
				for range 3 {
					b.dispatch(t, context.Background(), r)
				}
				outs[i] = slices.Clone(b.out)
				r.free.Lock()
				var attempts []*attempt
				for _, d := range r.free.list {
					attempts = append(attempts, d.spare...)
				}
				r.free.Unlock()
				if len(attempts) == 0 {
					t.Fatal("no attempt to inspect")
				}
				for _, a := range attempts {
					inFrame := len(a.frame) > 0 && len(a.part) > 0 &&
						uintptr(unsafe.Pointer(&a.part[0])) >= uintptr(unsafe.Pointer(&a.frame[0])) &&
						uintptr(unsafe.Pointer(&a.part[len(a.part)-1])) < uintptr(unsafe.Pointer(&a.frame[0]))+uintptr(len(a.frame))
					if want := tr == TransportTCP && dt == meshpb.DType_DTYPE_F32; inFrame != want {
						t.Errorf("%v %v rows=%d: partial rows viewed in the reply's buffer: %v, want %v", tr, dt, rows, inFrame, want)
					}
				}
				r.Close()
			}
			if !slices.Equal(outs[0], outs[1]) {
				t.Errorf("%v rows=%d: sums over tcp differ from gRPC's", dt, rows)
			}
		}
	}
}
