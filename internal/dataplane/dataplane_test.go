package dataplane

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"slices"
	"strings"
	"testing"
	"time"
	"unsafe"

	"go.uber.org/goleak"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/expertmesh/expertmesh/internal/wire"
	meshpb "github.com/expertmesh/expertmesh/proto"
)

func TestMain(m *testing.M) {
	code := m.Run()
	if code == 0 {
		if err := goleak.Find(); err != nil {
			os.Stderr.WriteString("goroutine leak: " + err.Error() + "\n")
			code = 1
		}
	}
	os.Exit(code)
}

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// echoServer serves handle on a loopback listener until the test ends;
// a nil handle answers every request with a response carrying its id and
// its hidden rows as the partial rows.
func echoServer(t *testing.T, handle func(*Conn) error) (string, *Server) {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	if handle == nil {
		handle = func(c *Conn) error {
			var req meshpb.DispatchRequest
			for {
				if err := c.RecvMsg(&req); err != nil {
					if errors.Is(err, io.EOF) {
						return nil
					}
					return err
				}
				resp := &meshpb.DispatchResponse{Id: req.Id, Partial: req.Hidden, ComputeUs: 7}
				if err := c.SendMsg(resp); err != nil {
					return err
				}
			}
		}
	}
	s := NewServer(handle)
	done := make(chan error, 1)
	go func() { done <- s.Serve(lis) }()
	t.Cleanup(func() {
		lis.Close()
		<-done
		s.Close()
	})
	return lis.Addr().String(), s
}

// TestRoundTrip: requests sent as OutRequest and as plain messages come
// back decoded as proto.Unmarshal decodes their bytes, on reused
// messages, for sizes that make the read buffer grow.
func TestRoundTrip(t *testing.T) {
	addr, _ := echoServer(t, nil)
	c, err := Dial(testCtx(t), addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var resp meshpb.DispatchResponse
	for i, rows := range []int{1, 8, 32, 3, 300, 1} {
		x := make([]float32, rows*64)
		for j := range x {
			x[j] = float32(i*1000 + j)
		}
		sel := make([]int32, rows)
		for j := range sel {
			sel[j] = int32(j)
		}
		req := &meshpb.DispatchRequest{Id: uint64(i + 1), Layer: 2, K: 1, ExpertIds: make([]int32, rows), GateWeights: make([]float32, rows)}
		var m any = &wire.OutRequest{Req: req, Dtype: meshpb.DType_DTYPE_F32, X: x, Rows: sel, Cols: 64}
		if i%2 == 1 {
			req.Hidden = &meshpb.Tensor{Dtype: meshpb.DType_DTYPE_F32, Shape: []int64{int64(rows), 64}, Data: wire.AppendRows(nil, meshpb.DType_DTYPE_F32, x)}
			m = req
		}
		if err := c.SendMsg(m); err != nil {
			t.Fatal(err)
		}
		if err := c.RecvMsg(&resp); err != nil {
			t.Fatal(err)
		}
		want := &meshpb.DispatchResponse{Id: uint64(i + 1), ComputeUs: 7,
			Partial: &meshpb.Tensor{Dtype: meshpb.DType_DTYPE_F32, Shape: []int64{int64(rows), 64}, Data: wire.AppendRows(nil, meshpb.DType_DTYPE_F32, x)}}
		if !proto.Equal(&resp, want) {
			t.Fatalf("round trip %d (%d rows): got a different response", i, rows)
		}
	}
}

// TestRecvMsgInto: requests received into the caller's buffers (two,
// used in turn, as the expert node's workers do) decode as proto.Unmarshal
// decodes them, their rows inside the buffer that received them and, sent
// aligned, at an aligned address; a request stays intact while the other
// buffer receives the next.
func TestRecvMsgInto(t *testing.T) {
	const cols = 64
	sizes := []int{1, 300, 8, 32, 1, 1000}
	want := make([]*meshpb.DispatchRequest, len(sizes))
	got := make(chan error, 1)
	addr, _ := echoServer(t, func(c *Conn) error {
		var bufs [2][]byte
		var reqs [2]meshpb.DispatchRequest
		for i := range sizes {
			k := i % 2
			if err := c.RecvMsgInto(&bufs[k], &reqs[k]); err != nil {
				got <- err
				return nil
			}
			if !proto.Equal(&reqs[k], want[i]) {
				got <- fmt.Errorf("request %d: decoded to another message", i)
				return nil
			}
			d := reqs[k].Hidden.Data
			if &d[0] != &bufs[k][len(bufs[k])-len(d)] || uintptr(unsafe.Pointer(&d[0]))%wire.RowAlign != 0 {
				got <- fmt.Errorf("request %d: rows not at the end of its buffer, aligned", i)
				return nil
			}
			if i > 0 && !proto.Equal(&reqs[1-k], want[i-1]) {
				got <- fmt.Errorf("request %d changed while %d was received", i-1, i)
				return nil
			}
		}
		got <- nil
		return nil
	})
	c, err := Dial(testCtx(t), addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	for i, rows := range sizes {
		x := make([]float32, rows*cols)
		sel := make([]int32, rows)
		for j := range x {
			x[j] = float32(i*7 + j)
		}
		for j := range sel {
			sel[j] = int32(j)
		}
		req := &meshpb.DispatchRequest{Id: uint64(i), Layer: 1, K: 1, ExpertIds: make([]int32, rows), GateWeights: make([]float32, rows),
			TraceContext: map[string]string{"traceparent": strings.Repeat("x", i)}}
		want[i] = proto.Clone(req).(*meshpb.DispatchRequest)
		want[i].Hidden = &meshpb.Tensor{Dtype: meshpb.DType_DTYPE_F32, Shape: []int64{int64(rows), cols}, Data: wire.AppendRows(nil, meshpb.DType_DTYPE_F32, x)}
		if err := c.SendMsg(&wire.OutRequest{Req: req, Dtype: meshpb.DType_DTYPE_F32, X: x, Rows: sel, Cols: cols, AlignRows: true}); err != nil {
			t.Fatal(err)
		}
	}
	if err := <-got; err != nil {
		t.Fatal(err)
	}
}

// TestStatusEndsStream: a handler's error reaches the client as its gRPC
// status, and the connection is closed.
func TestStatusEndsStream(t *testing.T) {
	addr, _ := echoServer(t, func(c *Conn) error {
		return status.Error(codes.Unavailable, "expert node x drained: dispatch to another replica")
	})
	c, err := Dial(testCtx(t), addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var resp meshpb.DispatchResponse
	err = c.RecvMsg(&resp)
	if status.Code(err) != codes.Unavailable || status.Convert(err).Message() != "expert node x drained: dispatch to another replica" {
		t.Fatalf("RecvMsg: %v, want the handler's UNAVAILABLE", err)
	}
	if err := c.SendMsg(&meshpb.DispatchRequest{}); !errors.Is(err, ErrClosed) {
		t.Errorf("SendMsg after the status: %v, want ErrClosed", err)
	}
}

// rawServer accepts one connection, answers its hello with answer (nil:
// closes at once) and then writes frames; it returns what the client
// does.
func rawServer(t *testing.T, answer []byte, frames []byte) string {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		nc, err := lis.Accept()
		if err != nil {
			return
		}
		defer nc.Close()
		b := make([]byte, helloSize)
		if _, err := io.ReadFull(nc, b); err != nil || answer == nil {
			return
		}
		nc.Write(answer)
		nc.Write(frames)
		io.Copy(io.Discard, nc) // until the client closes
	}()
	t.Cleanup(func() {
		lis.Close()
		<-done
	})
	return lis.Addr().String()
}

func answer(version, st uint16) []byte {
	b := []byte(Magic + "\x00\x00\x00\x00")
	binary.LittleEndian.PutUint16(b[4:], version)
	binary.LittleEndian.PutUint16(b[6:], st)
	return b
}

func frame(kind byte, p []byte) []byte {
	b := []byte{kind, 0, 0, 0, 0}
	binary.LittleEndian.PutUint32(b[1:], uint32(len(p)))
	return append(b, p...)
}

// TestHandshake: a peer that closes on the hello or answers something
// else is ErrRefused (fall back to gRPC), one of another version is
// ErrVersion, and the server refuses a client of another version.
func TestHandshake(t *testing.T) {
	ctx := testCtx(t)
	for _, tc := range []struct {
		name   string
		answer []byte
		want   error
	}{
		{"http2 settings", []byte{0, 0, 6, 4, 0, 0, 0, 0, 0, 0, 3}, ErrRefused},
		{"half an answer, then garbage", []byte("EMxx\x01\x00\x00\x00"), ErrRefused},
		{"other version", answer(Version+1, statusBadVersion), ErrVersion},
		{"refuses our version", answer(Version, statusBadVersion), ErrVersion},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := Dial(ctx, rawServer(t, tc.answer, nil))
			if !errors.Is(err, tc.want) || (tc.want == ErrRefused) != errors.Is(err, ErrRefused) {
				if c != nil {
					c.Close()
				}
				t.Fatalf("Dial: %v, want %v", err, tc.want)
			}
			t.Log(err)
		})
	}
	t.Run("server refuses version 2", func(t *testing.T) {
		addr, _ := echoServer(t, nil)
		nc, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer nc.Close()
		nc.Write(hello(Version + 1))
		b := make([]byte, answerSize)
		if _, err := io.ReadFull(nc, b); err != nil {
			t.Fatal(err)
		}
		if err := parseAnswer(b); !errors.Is(err, ErrVersion) {
			t.Fatalf("answer to version %d: %v, want ErrVersion", Version+1, err)
		}
		if _, err := nc.Read(b); err == nil {
			t.Error("the server kept the connection open")
		}
	})
	t.Run("closes: not a refusal", func(t *testing.T) {
		_, err := Dial(ctx, rawServer(t, nil, nil))
		if err == nil || errors.Is(err, ErrRefused) || errors.Is(err, ErrVersion) {
			t.Fatalf("Dial to a server that closes: %v, want a transport error", err)
		}
	})
	t.Run("silent server", func(t *testing.T) {
		lis, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer lis.Close()
		short, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
		defer cancel()
		_, err = Dial(short, lis.Addr().String()) // accepted by the backlog, never answered
		if err == nil || errors.Is(err, ErrRefused) || !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("Dial to a silent server: %v, want the context's deadline (not a refusal)", err)
		}
	})
}

// TestBadFrames: each malformed stream gives a clear error and a closed
// connection, never a panic or an allocation of what a header claims.
func TestBadFrames(t *testing.T) {
	ctx := testCtx(t)
	ok := answer(Version, statusOK)
	resp := proto.Marshal
	good, _ := resp(&meshpb.DispatchResponse{Id: 3})
	huge := []byte{kindMessage, 0, 0, 0, 0}
	binary.LittleEndian.PutUint32(huge[1:], MaxFrame+1)
	claims := []byte{kindMessage, 0, 0, 0, 0}
	binary.LittleEndian.PutUint32(claims[1:], MaxFrame) // allowed, but never sent
	for _, tc := range []struct {
		name   string
		frames []byte
		want   error
	}{
		{"oversized", huge, ErrFrame},
		{"unknown kind", frame(9, good), ErrFrame},
		{"bad protobuf", frame(kindMessage, []byte{0xff, 0xff, 0xff}), ErrFrame},
		{"short status", frame(kindStatus, []byte{1}), ErrFrame},
		{"closed mid-header", []byte{kindMessage, 3}, io.ErrUnexpectedEOF},
		{"closed mid-frame", frame(kindMessage, good)[:6], io.ErrUnexpectedEOF},
		{"claims the maximum, sends 3 bytes", append(claims, 1, 2, 3), io.ErrUnexpectedEOF},
	} {
		t.Run(tc.name, func(t *testing.T) {
			lis, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			defer lis.Close()
			go func() {
				nc, err := lis.Accept()
				if err != nil {
					return
				}
				defer nc.Close()
				io.ReadFull(nc, make([]byte, helloSize))
				nc.Write(ok)
				nc.Write(frame(kindMessage, good))
				nc.Write(tc.frames)
			}()
			c, err := Dial(ctx, lis.Addr().String())
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			var m meshpb.DispatchResponse
			if err := c.RecvMsg(&m); err != nil || m.Id != 3 {
				t.Fatalf("first frame: %v, id %d", err, m.Id)
			}
			err = c.RecvMsg(&m)
			if !errors.Is(err, tc.want) {
				t.Fatalf("RecvMsg: %v, want %v", err, tc.want)
			}
			t.Log(err)
			if len(c.rbuf) > minRead {
				t.Errorf("read buffer grew to %d bytes for a frame that never came", len(c.rbuf))
			}
			if !c.closed.Load() {
				t.Error("connection left open")
			}
		})
	}
}

// TestServerCloseEndsConnections: Close ends a handler blocked receiving
// and a connection still in its handshake, and returns; the client sees
// its connection end.
func TestServerCloseEndsConnections(t *testing.T) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer lis.Close()
	handling := make(chan struct{})
	s := NewServer(func(c *Conn) error {
		close(handling)
		var req meshpb.DispatchRequest
		return c.RecvMsg(&req)
	})
	served := make(chan error, 1)
	go func() { served <- s.Serve(lis) }()
	c, err := Dial(testCtx(t), lis.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	silent, err := net.Dial("tcp", lis.Addr().String()) // never says hello
	if err != nil {
		t.Fatal(err)
	}
	defer silent.Close()
	<-handling
	for s.Conns() < 2 {
		time.Sleep(time.Millisecond) // the silent one is accepted asynchronously
	}
	start := time.Now()
	s.Close()
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("Close took %v", d)
	}
	var resp meshpb.DispatchResponse
	if err := c.RecvMsg(&resp); err == nil {
		t.Error("client still connected after Close")
	}
	lis.Close()
	<-served
}

// FuzzFrame: any bytes after a good handshake, read as frames, decode or
// fail with an error, never panic, and never make the read buffer larger
// than twice what arrived (or its first size); hellos and answers parse
// or fail likewise.
func FuzzFrame(f *testing.F) {
	good, _ := proto.Marshal(&meshpb.DispatchResponse{Id: 3, Partial: &meshpb.Tensor{Shape: []int64{1, 2}, Data: make([]byte, 8)}})
	f.Add(frame(kindMessage, good))
	f.Add(append(frame(kindMessage, good), frame(kindStatus, []byte{14, 0, 0, 0, 'x'})...))
	f.Add([]byte{kindMessage, 0xff, 0xff, 0xff, 0x7f})
	f.Add(hello(Version))
	f.Add(answer(Version, statusOK))
	f.Fuzz(func(t *testing.T, b []byte) {
		parseHello(b)
		parseAnswer(b)
		c := newConn(&readerConn{r: bytes.NewReader(b)})
		c.max = 1 << 20
		var m meshpb.DispatchResponse
		for range 64 {
			if err := c.RecvMsg(&m); err != nil {
				break
			}
		}
		if len(c.rbuf) > max(2*len(b), minRead) {
			t.Fatalf("read buffer of %d bytes for %d bytes of input", len(c.rbuf), len(b))
		}
		var req meshpb.DispatchRequest
		c = newConn(&readerConn{r: bytes.NewReader(b)})
		for range 64 {
			if err := c.RecvMsg(&req); err != nil {
				break
			}
		}
		c = newConn(&readerConn{r: bytes.NewReader(b)})
		c.max = 1 << 20
		var buf []byte
		for range 64 {
			if err := c.RecvMsgInto(&buf, &req); err != nil {
				break
			}
		}
		if cap(buf) > max(2*len(b), minRead) {
			t.Fatalf("receive buffer of %d bytes for %d bytes of input", cap(buf), len(b))
		}
		// Replies into the receiver's buffer, their rows viewed where
		// they are when aligned (as the attention node takes them).
		c = newConn(&readerConn{r: bytes.NewReader(b)})
		c.max = 1 << 20
		buf = buf[:0]
		for range 64 {
			if err := c.RecvMsgInto(&buf, &m); err != nil {
				break
			}
			if m.Partial != nil {
				if _, err := wire.CheckMatrix(m.Partial, 2, 64); err == nil {
					wire.ViewF32(m.Partial)
				}
			}
		}
	})
}

// readerConn is a net.Conn that reads from r and discards writes.
type readerConn struct {
	net.Conn
	r io.Reader
}

func (c *readerConn) Read(b []byte) (int, error)  { return c.r.Read(b) }
func (c *readerConn) Write(b []byte) (int, error) { return len(b), nil }
func (c *readerConn) Close() error                { return nil }

// TestWriteTimeout: a write to a peer that stopped reading gives up after
// SetWriteTimeout's bound with an error wrapping os.ErrDeadlineExceeded,
// closes the connection, and a receive blocked meanwhile returns that
// cause (not merely "closed").
func TestWriteTimeout(t *testing.T) {
	release := make(chan struct{})
	defer close(release)
	addr, _ := echoServer(t, func(c *Conn) error {
		select { // never reads
		case <-release:
		case <-c.Context().Done():
		}
		return nil
	})
	c, err := Dial(testCtx(t), addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	recvd := make(chan error, 1)
	go func() {
		var m meshpb.DispatchResponse
		recvd <- c.RecvMsg(&m)
	}()
	c.SetWriteTimeout(50 * time.Millisecond)
	big := &meshpb.DispatchRequest{Hidden: &meshpb.Tensor{Data: make([]byte, 64<<20)}}
	start := time.Now()
	err = c.SendMsg(big)
	if !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("SendMsg to a peer that never reads: %v after %v, want a deadline error", err, time.Since(start))
	}
	if err := <-recvd; !errors.Is(err, os.ErrDeadlineExceeded) || !errors.Is(err, ErrClosed) {
		t.Fatalf("blocked RecvMsg: %v, want ErrClosed wrapping the write's deadline", err)
	}
}

// BenchmarkRecv32Rows: a 32-row V2-Lite request (256 KiB of F32 rows)
// received by RecvMsg (its rows copied into the message) and by
// RecvMsgInto (read into the caller's buffer, rows viewed there), and
// its rows then read as float32 as the expert node does (wire.ViewF32,
// or a decode when the view declines).
func BenchmarkRecv32Rows(b *testing.B) {
	const rows, cols = 32, 2048
	x := make([]float32, rows*cols)
	sel := make([]int32, rows)
	for i := range sel {
		sel[i] = int32(i)
	}
	req := &meshpb.DispatchRequest{Id: 1, Layer: 1, K: 6, ExpertIds: make([]int32, rows*6), GateWeights: make([]float32, rows*6)}
	var frames []byte
	for range 64 {
		nc := newConn(&readerConn{r: bytes.NewReader(nil)})
		if err := nc.SendMsg(&wire.OutRequest{Req: req, Dtype: meshpb.DType_DTYPE_F32, X: x, Rows: sel, Cols: cols, AlignRows: true}); err != nil {
			b.Fatal(err)
		}
		frames = append(frames, nc.wbuf...)
	}
	for _, into := range []bool{false, true} {
		b.Run(fmt.Sprintf("into=%v", into), func(b *testing.B) {
			var m meshpb.DispatchRequest
			var buf []byte
			xs := make([]float32, rows*cols)
			b.SetBytes(int64(len(frames) / 64))
			r := bytes.NewReader(frames)
			c := newConn(&readerConn{r: r})
			for i := range b.N {
				if i%64 == 0 {
					r.Reset(frames)
					c.r, c.w = 0, 0
				}
				var err error
				if into {
					err = c.RecvMsgInto(&buf, &m)
				} else {
					err = c.RecvMsg(&m)
				}
				if err != nil {
					b.Fatal(err)
				}
				if v, ok, err := wire.ViewF32(m.Hidden); ok && err == nil {
					xs = v
				} else if err := wire.Decode(xs, m.Hidden); err != nil {
					b.Fatal(err)
				}
			}
			_ = xs
		})
	}
}

// TestTrySendMsg: a message larger than the socket buffers, to a peer
// that reads only later, is left partly written by TrySendMsg (false,
// no error, within its bound); Flush then writes the rest once the peer
// reads, and the peer receives the message whole, with its rows as they
// were when TrySendMsg returned (they change right after), then the next
// one.
func TestTrySendMsg(t *testing.T) {
	read := make(chan struct{})
	got := make(chan error, 1)
	const rows, cols = 2048, 2048 // 16 MiB
	x := make([]float32, rows*cols)
	for i := range x {
		x[i] = float32(i)
	}
	sel := make([]int32, rows)
	for i := range sel {
		sel[i] = int32(i)
	}
	want := [2][]float32{slices.Clone(x), make([]float32, len(x))}
	addr, _ := echoServer(t, func(c *Conn) error {
		<-read
		var m meshpb.DispatchRequest
		for id := range uint64(2) {
			if err := c.RecvMsg(&m); err != nil {
				got <- err
				return nil
			}
			v, ok, err := wire.ViewF32(m.Hidden)
			if !ok || err != nil || m.Id != id || !slices.Equal(v, want[id]) {
				got <- fmt.Errorf("message %d arrived damaged (id %d)", id, m.Id)
				return nil
			}
		}
		got <- nil
		return nil
	})
	c, err := Dial(testCtx(t), addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	req := &meshpb.DispatchRequest{Id: 0, K: 1}
	start := time.Now()
	done, err := c.TrySendMsg(&wire.OutRequest{Req: req, Dtype: meshpb.DType_DTYPE_F32, X: x, Rows: sel, Cols: cols}, 20*time.Millisecond)
	if err != nil || done {
		t.Fatalf("TrySendMsg of 16 MiB to a peer not reading: %v, %v after %v; want false, nil", done, err, time.Since(start))
	}
	// The rows (sent from x's memory, vectored) may change once
	// TrySendMsg returns: what it left unwritten was copied.
	clear(x)
	close(read)
	c.SetWriteTimeout(20 * time.Second)
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	req.Id = 1
	if err := c.SendMsg(&wire.OutRequest{Req: req, Dtype: meshpb.DType_DTYPE_F32, X: x, Rows: sel, Cols: cols}); err != nil {
		t.Fatal(err)
	}
	if err := <-got; err != nil {
		t.Fatal(err)
	}
}

// TestReplyFrame: replies laid out by ReplyFrame, their rows written in
// place and sent with SendFrame, arrive through RecvMsgInto as the reply
// with those rows, viewable in place (aligned) in the receiver's buffer;
// a frame passed back to ReplyFrame is reused while the rows fit, and
// its rows are 64-byte aligned in memory every time. A frame with no
// room for its header is refused.
func TestReplyFrame(t *testing.T) {
	const cols = 64
	sizes := []int{1, 300, 8, 32, 1, 1000, 999}
	got := make(chan error, 1)
	addr, _ := echoServer(t, func(c *Conn) error {
		var frame []byte
		for i, rows := range sizes {
			old := frame
			var x []float32
			frame, x = ReplyFrame(frame, uint64(i+1), rows, cols)
			if x == nil {
				got <- fmt.Errorf("reply %d: no view", i)
				return nil
			}
			if a := uintptr(unsafe.Pointer(&x[0])); a%wire.RowAlign != 0 {
				got <- fmt.Errorf("reply %d: rows at %#x", i, a)
				return nil
			}
			if i > 0 && rows <= sizes[i-1] && &frame[:1][0] != &old[:1][0] {
				got <- fmt.Errorf("reply %d: %d rows after %d, frame reallocated", i, rows, sizes[i-1])
				return nil
			}
			for j := range x {
				x[j] = float32(i*7 + j)
			}
			if err := c.SendFrame(wire.AppendComputeUs(frame, uint64(i))); err != nil {
				got <- err
				return nil
			}
		}
		got <- c.SendFrame(make([]byte, HeaderSize-1))
		return nil
	})
	c, err := Dial(testCtx(t), addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var buf []byte
	var resp meshpb.DispatchResponse
	for i, rows := range sizes {
		if err := c.RecvMsgInto(&buf, &resp); err != nil {
			t.Fatal(err)
		}
		x := make([]float32, rows*cols)
		for j := range x {
			x[j] = float32(i*7 + j)
		}
		want := &meshpb.DispatchResponse{Id: uint64(i + 1), ComputeUs: uint64(i),
			Partial: &meshpb.Tensor{Dtype: meshpb.DType_DTYPE_F32, Shape: []int64{int64(rows), cols}, Data: wire.AppendRows(nil, meshpb.DType_DTYPE_F32, x)}}
		if !proto.Equal(&resp, want) {
			t.Fatalf("reply %d: decoded to another message", i)
		}
		v, ok, err := wire.ViewF32(resp.Partial)
		if !ok || err != nil || !slices.Equal(v, x) || &resp.Partial.Data[0] != &buf[len(buf)-len(resp.Partial.Data)-len(wire.AppendComputeUs(nil, uint64(i)))] {
			t.Fatalf("reply %d: view %v %v, or the rows are not in the buffer", i, ok, err)
		}
	}
	if err := <-got; status.Code(err) != codes.Internal {
		t.Errorf("a frame without room for its header: %v", err)
	}
}
