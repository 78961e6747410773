// Package dataplane is the expert dispatch data plane: the Dispatch
// stream's two messages (DispatchRequest out, DispatchResponse back,
// encoded by internal/wire exactly as on the gRPC stream) carried as
// length-prefixed frames over a plain TCP connection, one stream per
// connection. gRPC stays the control plane; on the Dispatch stream its
// HTTP/2 machinery cost 2-4x a raw loopback round trip (a writer and a
// reader goroutine per connection: 6 goroutine wake-ups per exchange
// against raw TCP's 2, messages copied into 16 KiB frames). Here a
// message is marshalled straight into the connection's reused buffer
// behind its header and written with one write, and read straight into
// the connection's reused buffer, by the goroutines that send and
// receive (as MegaScale-Infer's M2N and DeepEP keep expert dispatch off
// the RPC layer).
//
// The expert node serves it on its gRPC port: a connection that begins
// with Magic is the data plane's (Matcher), any other gRPC's.
//
// # Protocol
//
// The client opens with a hello of helloSize (24) bytes, as long as
// HTTP/2's client preface, so that a gRPC-only server reads a whole
// (bogus) preface and closes the connection at once instead of waiting
// for more:
//
//	0  Magic "EMDP"
//	4  version, uint16 little-endian (Version)
//	6  reserved, zero
//	24
//
// The server answers with 8 bytes: Magic, its version (uint16 LE) and a
// status (uint16 LE): 0 accepted, 1 version not supported (the server
// then closes). Then frames flow both ways, each a 5-byte header (kind,
// then the payload length, uint32 little-endian) and the payload:
//
//	kindMessage  a protobuf DispatchRequest (client to server) or
//	             DispatchResponse (server to client)
//	kindStatus   the stream's end, server to client: a gRPC code
//	             (uint32 LE) and a UTF-8 message; the server closes after
//
// A payload longer than the connection's maximum (MaxFrame: the gRPC
// message limit, rpc.DefaultMaxMsgSize), an unknown kind or a payload
// that does not decode ends the connection with an error naming the
// problem.
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
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"
	"unsafe"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/expertmesh/expertmesh/internal/rpc"
	"github.com/expertmesh/expertmesh/internal/wire"
	meshpb "github.com/expertmesh/expertmesh/proto"
)

const (
	// Magic opens every data-plane connection.
	Magic = "EMDP"
	// Version is the protocol version this package speaks.
	Version = 1
	// MaxFrame bounds a frame's payload: the gRPC message limit, so that
	// whatever one transport carries the other does too.
	MaxFrame = rpc.DefaultMaxMsgSize

	helloSize  = 24
	answerSize = 8
	headerSize = 5

	kindMessage = 1
	kindStatus  = 2

	statusOK         = 0
	statusBadVersion = 1

	// HandshakeTimeout bounds the server's wait for a hello.
	HandshakeTimeout = 10 * time.Second

	// minRead is the read buffer's first size; it doubles while a frame
	// does not fit, never past the frame's size, so a header that claims
	// a huge payload costs only memory for bytes that actually arrived.
	minRead = 32 << 10
)

var (
	// ErrRefused means the peer does not speak the data plane: it
	// answered the hello with something else (an expert node that serves
	// only gRPC sends its HTTP/2 SETTINGS). Callers fall back to gRPC.
	ErrRefused = errors.New("dataplane: peer refused the data-plane handshake")
	// ErrVersion means the peer speaks another version of the data
	// plane (wrapped with both versions). Callers fall back to gRPC.
	ErrVersion = errors.New("dataplane: version not supported")
	// ErrFrame marks a malformed frame (wrapped with what is wrong); the
	// connection is closed.
	ErrFrame = errors.New("dataplane: malformed frame")
	// ErrClosed is returned by a Conn used after Close.
	ErrClosed = errors.New("dataplane: connection closed")
)

// Matcher reports whether a connection's first bytes are a data-plane
// hello (for a connection multiplexer such as cmux: it reads at most
// len(Magic) bytes).
func Matcher(r io.Reader) bool {
	var b [len(Magic)]byte
	if _, err := io.ReadFull(r, b[:]); err != nil {
		return false
	}
	return string(b[:]) == Magic
}

// Conn is one data-plane stream. SendMsg and RecvMsg may run at the same
// time as each other, but each only on one goroutine at a time (as a
// gRPC stream's). Close may be called at any time, from any goroutine.
type Conn struct {
	c   net.Conn
	max int

	ctx    context.Context
	cancel context.CancelFunc
	closed atomic.Bool
	// cause is why the connection was closed on this side, when a failed
	// write or a bad frame closed it: what a receive blocked at the time
	// returns, rather than the closed socket's error.
	cause atomic.Pointer[error]

	// read side: rbuf[r:w] is received and not yet consumed.
	rbuf []byte
	r, w int
	// write side: the header and the message, written with one write;
	// wto bounds each write (SetWriteTimeout).
	wbuf []byte
	wto  time.Duration
	// pend is the unwritten rest of a frame TrySendMsg gave up on; Flush
	// (or the next SendMsg) writes it first.
	pend []byte
	// A frame written from several buffers (vectored): wbuf's header and
	// head, then the rows straight from the sender's memory; pbuf keeps a
	// copy of what TrySendMsg left unwritten of such a frame.
	vecs [][]byte    // the frame's buffers (kept: WriteTo consumes iov)
	iov  net.Buffers // vecs, as WriteTo consumes them
	pbuf []byte
}

func newConn(c net.Conn) *Conn {
	ctx, cancel := context.WithCancel(context.Background())
	return &Conn{c: c, max: MaxFrame, ctx: ctx, cancel: cancel}
}

// Context ends when the connection is closed.
func (c *Conn) Context() context.Context { return c.ctx }

// RemoteAddr is the peer's address.
func (c *Conn) RemoteAddr() net.Addr { return c.c.RemoteAddr() }

// Close closes the connection; blocked SendMsg and RecvMsg calls return
// ErrClosed, or the error that made the connection close itself.
func (c *Conn) Close() error {
	if c.closed.Swap(true) {
		return nil
	}
	c.cancel()
	return c.c.Close()
}

// fail closes the connection because of err and returns err.
func (c *Conn) fail(err error) error {
	c.cause.CompareAndSwap(nil, &err)
	c.Close()
	return err
}

// closedErr is what a call on a connection closed on this side returns.
func (c *Conn) closedErr() error {
	if e := c.cause.Load(); e != nil {
		return fmt.Errorf("%w: %w", ErrClosed, *e)
	}
	return ErrClosed
}

// SetWriteTimeout bounds each later SendMsg's write (not its marshalling)
// to d (0: unbounded). A write that cannot finish in time (the peer
// stopped reading and the socket buffers are full) fails with an error
// wrapping os.ErrDeadlineExceeded and closes the connection: part of the
// frame may have left. Only with SendMsg, from the same goroutine.
func (c *Conn) SetWriteTimeout(d time.Duration) { c.wto = d }

// SendMsg writes m (a *meshpb.DispatchRequest or *wire.OutRequest from
// the client, a *meshpb.DispatchResponse or *wire.OutResponse from the
// server: anything wire.AppendMessage encodes) as one frame with one
// write, marshalled behind its header into the connection's buffer. m is
// only read during the call. A failed write closes the connection (part
// of a frame may have left).
func (c *Conn) SendMsg(m any) error {
	if err := c.Flush(); err != nil {
		return err
	}
	if ok, err := c.frameVectored(m); ok || err != nil {
		if err != nil {
			return err
		}
		if c.wto > 0 {
			c.c.SetWriteDeadline(time.Now().Add(c.wto))
		}
		_, err := c.iov.WriteTo(c.c)
		clear(c.vecs)
		if err != nil {
			if c.closed.Load() {
				return c.closedErr()
			}
			return c.fail(fmt.Errorf("dataplane: write: %w", err))
		}
		return nil
	}
	if err := c.frame(m); err != nil {
		return err
	}
	return c.write(c.wbuf)
}

// TrySendMsg is SendMsg with its write bounded by d instead of
// SetWriteTimeout's bound: when the socket's buffers are full for d (the
// peer is slow to read, or stopped), it keeps the frame's unwritten rest
// and returns false; the caller must then Flush before anything else is
// sent, typically from another goroutine, since Flush waits for the peer.
// m may be changed once it returns, written or not.
func (c *Conn) TrySendMsg(m any, d time.Duration) (bool, error) {
	if err := c.Flush(); err != nil {
		return false, err
	}
	vectored, err := c.frameVectored(m)
	if err != nil {
		return false, err
	}
	if !vectored {
		if err := c.frame(m); err != nil {
			return false, err
		}
	}
	c.c.SetWriteDeadline(time.Now().Add(d))
	var n int
	if vectored {
		_, err = c.iov.WriteTo(c.c)
	} else {
		n, err = c.c.Write(c.wbuf)
	}
	if err == nil {
		clear(c.vecs)
		return true, nil
	}
	if c.closed.Load() {
		clear(c.vecs)
		return false, c.closedErr()
	}
	if errors.Is(err, os.ErrDeadlineExceeded) {
		if vectored {
			// What is left aliases m's rows, which the caller may
			// change once this returns: keep a copy.
			c.pbuf = c.pbuf[:0]
			for _, b := range c.iov {
				c.pbuf = append(c.pbuf, b...)
			}
			clear(c.vecs)
			c.pend = c.pbuf
		} else {
			c.pend = c.wbuf[n:]
		}
		return false, nil
	}
	clear(c.vecs)
	return false, c.fail(fmt.Errorf("dataplane: write: %w", err))
}

// frameVectored lays out m, when it is an F32 wire.OutRequest, as a
// frame of several buffers in iov (wire.OutRequest.AppendHead): the
// header and the request up to its rows in wbuf, then the rows straight
// from the request's float32 memory, for one vectored write (writev)
// that copies nothing into wbuf. false (and nothing done) for other
// messages, which frame encodes, and under the race detector
// (raceEnabled).
func (c *Conn) frameVectored(m any) (bool, error) {
	o, ok := m.(*wire.OutRequest)
	if !ok || raceEnabled {
		return false, nil
	}
	b, ok := o.AppendHead(append(c.wbuf[:0], 0, 0, 0, 0, 0))
	if !ok {
		return false, nil
	}
	c.wbuf = b
	c.vecs = o.AppendRowSpans(append(c.vecs[:0], c.wbuf))
	c.iov = c.vecs
	n := -headerSize
	for _, b := range c.vecs {
		n += len(b)
	}
	if n > c.max {
		clear(c.vecs)
		return true, status.Errorf(codes.ResourceExhausted, "dataplane: message of %d bytes exceeds the maximum of %d", n, c.max)
	}
	c.wbuf[0] = kindMessage
	binary.LittleEndian.PutUint32(c.wbuf[1:], uint32(n))
	return true, nil
}

// Flush writes what TrySendMsg left unwritten, bounded by
// SetWriteTimeout's bound; nothing if it left nothing.
func (c *Conn) Flush() error {
	if c.closed.Load() {
		return c.closedErr()
	}
	if len(c.pend) == 0 {
		return nil
	}
	p := c.pend
	c.pend = nil
	return c.write(p)
}

// HeaderSize is the frame header's size: the room SendFrame's frame
// leaves before the message.
const HeaderSize = headerSize

// SendFrame sends a message the caller encoded itself (wire.AppendMessage's
// bytes, or a reply laid out in place with wire.AppendResponseHead) as one
// frame: b[HeaderSize:] is the message, b[:HeaderSize] room for the frame
// header, which SendFrame writes there. One write, as SendMsg's (bounded
// by SetWriteTimeout, closing the connection when it fails), of the
// caller's buffer: nothing is copied. b is only used during the call.
func (c *Conn) SendFrame(b []byte) error {
	if err := c.Flush(); err != nil {
		return err
	}
	if len(b) < headerSize {
		return status.Errorf(codes.Internal, "dataplane: frame of %d bytes has no room for its header", len(b))
	}
	n := len(b) - headerSize
	if n > c.max {
		return status.Errorf(codes.ResourceExhausted, "dataplane: message of %d bytes exceeds the maximum of %d", n, c.max)
	}
	b[0] = kindMessage
	binary.LittleEndian.PutUint32(b[1:], uint32(n))
	return c.write(b)
}

// ReplyFrame lays out, in buf's memory (reallocated when it is too
// small), a frame for a DispatchResponse with id, code OK and rows×cols
// F32 partial rows that the caller writes in place
// (wire.AppendResponseHead): the rows start 64-byte aligned in memory, for
// the kernels that compute them, and in the message, for a receiver that
// views them in place. It returns the frame so far (header room, the
// message up to the rows, the rows) and the rows; the caller writes
// them, appends wire.AppendComputeUs to the frame and sends it with
// SendFrame, which copies nothing. Pass the frame back as the next
// call's buf to reuse its memory. x is nil when the rows could not be
// laid out in place (not on a little-endian machine): encode them then.
func ReplyFrame(buf []byte, id uint64, rows, cols int) (frame []byte, x []float32) {
	// Alignment slack, the header, the message's fields before the rows
	// (an id, padding under 64 bytes, the tensor's heads: under 128) and
	// after them (compute_us: 11).
	need := headerSize + 128 + 4*rows*cols + 16
	start := 0
	for {
		if cap(buf) > 0 {
			base := uintptr(unsafe.Pointer(&buf[:1][0]))
			start = (wire.RowAlign - int((base+headerSize)%wire.RowAlign)) % wire.RowAlign
		}
		if cap(buf)-start >= need {
			break
		}
		buf = make([]byte, need+wire.RowAlign)
	}
	buf = buf[:cap(buf)]
	return wire.AppendResponseHead(buf[start:start+headerSize], headerSize, id, rows, cols)
}

// frame marshals m behind a frame header into wbuf.
func (c *Conn) frame(m any) error {
	c.wbuf = append(c.wbuf[:0], 0, 0, 0, 0, 0)
	var err error
	if c.wbuf, err = wire.AppendMessage(c.wbuf, m); err != nil {
		return status.Errorf(codes.Internal, "dataplane: %v", err)
	}
	n := len(c.wbuf) - headerSize
	if n > c.max {
		return status.Errorf(codes.ResourceExhausted, "dataplane: message of %d bytes exceeds the maximum of %d", n, c.max)
	}
	c.wbuf[0] = kindMessage
	binary.LittleEndian.PutUint32(c.wbuf[1:], uint32(n))
	return nil
}

func (c *Conn) write(b []byte) error {
	if c.wto > 0 {
		c.c.SetWriteDeadline(time.Now().Add(c.wto))
	}
	if _, err := c.c.Write(b); err != nil {
		if c.closed.Load() {
			return c.closedErr()
		}
		return c.fail(fmt.Errorf("dataplane: write: %w", err))
	}
	return nil
}

// sendStatus ends the stream with err's gRPC status (OK for nil).
func (c *Conn) sendStatus(err error) error {
	st := status.Convert(err)
	msg := st.Message()
	if len(msg) > 4096 {
		msg = msg[:4096]
	}
	c.wbuf = append(c.wbuf[:0], kindStatus, 0, 0, 0, 0)
	c.wbuf = binary.LittleEndian.AppendUint32(c.wbuf, uint32(st.Code()))
	c.wbuf = append(c.wbuf, msg...)
	binary.LittleEndian.PutUint32(c.wbuf[1:], uint32(len(c.wbuf)-headerSize))
	return c.write(c.wbuf)
}

// RecvMsg reads the next frame into m in place: a *meshpb.DispatchRequest
// (wire.UnmarshalRequest: its bytes copied), or a
// *meshpb.DispatchResponse whose partial rows' bytes alias the
// connection's read buffer (wire.UnmarshalResponseView), valid until the
// next RecvMsg: the receiver decodes them before it receives again. It
// returns io.EOF when the peer closed the connection between frames, the
// status carried by a status frame (a gRPC status error; nil's OK
// becomes io.EOF), and an error wrapping ErrFrame for a malformed frame,
// after which the connection is closed.
func (c *Conn) RecvMsg(m any) error {
	kind, p, err := c.readFrame()
	if err != nil {
		return err
	}
	if kind == kindStatus {
		return c.endStatus(p)
	}
	switch m := m.(type) {
	case *meshpb.DispatchRequest:
		err = wire.UnmarshalRequest(p, m)
	case *meshpb.DispatchResponse:
		err = wire.UnmarshalResponseView(p, m)
	default:
		return fmt.Errorf("dataplane: cannot receive into %T", m)
	}
	if err != nil {
		return c.fail(fmt.Errorf("%w: message: %v", ErrFrame, err))
	}
	return nil
}

// endStatus ends the stream with a status frame's status.
func (c *Conn) endStatus(p []byte) error {
	code, msg, err := parseStatus(p)
	if err != nil {
		return c.fail(err)
	}
	c.Close()
	if code == codes.OK {
		return io.EOF
	}
	return status.Error(code, msg)
}

// RecvMsgInto is RecvMsg for a message whose bytes go into *buf (grown
// as they arrive; a new buffer is aligned to at least wire.RowAlign
// bytes) rather than the connection's buffer, and whose rows alias it
// (wire.UnmarshalRequestView, wire.UnmarshalResponseView), valid as long
// as the caller keeps that buffer: for receivers that take turns
// receiving and then work on their requests concurrently, each with a
// buffer of its own, and for a receiver that hands each reply's buffer to
// whoever uses its rows and receives the next into another. m is a
// *meshpb.DispatchRequest or *meshpb.DispatchResponse. A sender that
// aligns the rows (wire.OutRequest.AlignRows, wire.AppendResponseHead)
// lets F32 rows be viewed in place (wire.ViewF32). Errors are RecvMsg's.
func (c *Conn) RecvMsgInto(buf *[]byte, m any) error {
	switch m.(type) {
	case *meshpb.DispatchRequest, *meshpb.DispatchResponse:
	default:
		return fmt.Errorf("dataplane: cannot receive into %T", m)
	}
	kind, n, err := c.readHeader()
	if err != nil {
		return err
	}
	if kind == kindStatus {
		_, p, err := c.readPayload(n)
		if err != nil {
			return err
		}
		return c.endStatus(p)
	}
	// What was read ahead, then the rest straight from the socket.
	b := (*buf)[:0]
	have := min(c.w-c.r, n)
	b = grownTo(b, have)
	b = append(b, c.rbuf[c.r:c.r+have]...)
	c.r += have
	for len(b) < n {
		b = grownTo(b, len(b)+1)
		k, err := c.c.Read(b[len(b):min(cap(b), n)])
		b = b[:len(b)+k]
		if err != nil && len(b) < n {
			*buf = b
			if c.closed.Load() {
				return c.closedErr()
			}
			if errors.Is(err, io.EOF) {
				err = fmt.Errorf("%w: connection closed inside a frame", io.ErrUnexpectedEOF)
			}
			return c.fail(err)
		}
	}
	*buf = b
	switch m := m.(type) {
	case *meshpb.DispatchRequest:
		err = wire.UnmarshalRequestView(b, m)
	case *meshpb.DispatchResponse:
		err = wire.UnmarshalResponseView(b, m)
	}
	if err != nil {
		return c.fail(fmt.Errorf("%w: message: %v", ErrFrame, err))
	}
	return nil
}

// Buffered is how many bytes the connection has read past the last
// message received: the beginning of the next, if any. Only from the
// goroutine that receives.
func (c *Conn) Buffered() int { return c.w - c.r }

// grownTo returns b with room for need bytes: its capacity doubled from
// minRead/2 until it does, so that a length a peer claims is only
// allocated as its bytes arrive (callers ask for one byte more than they
// have). Powers of two from 16 KiB are Go size classes or page-sized
// spans: aligned far beyond wire.RowAlign.
func grownTo(b []byte, need int) []byte {
	if need <= cap(b) {
		return b
	}
	size := max(cap(b), minRead/2)
	for size < need {
		size *= 2
	}
	nb := make([]byte, len(b), size)
	copy(nb, b)
	return nb
}

// parseStatus decodes a status frame's payload.
func parseStatus(p []byte) (codes.Code, string, error) {
	if len(p) < 4 {
		return 0, "", fmt.Errorf("%w: status of %d bytes", ErrFrame, len(p))
	}
	code := binary.LittleEndian.Uint32(p)
	if code > uint32(codes.Unauthenticated) {
		return 0, "", fmt.Errorf("%w: status code %d", ErrFrame, code)
	}
	msg := p[4:]
	if !utf8.Valid(msg) {
		return 0, "", fmt.Errorf("%w: status message is not UTF-8", ErrFrame)
	}
	return codes.Code(code), string(msg), nil
}

// readFrame returns the next frame's kind and payload; the payload is
// valid until the next call.
func (c *Conn) readFrame() (byte, []byte, error) {
	_, n, err := c.readHeader()
	if err != nil {
		return 0, nil, err
	}
	return c.readPayload(n)
}

// readHeader reads and checks the next frame's header: its kind and
// payload length.
func (c *Conn) readHeader() (byte, int, error) {
	if c.w == c.r {
		c.r, c.w = 0, 0
	}
	if err := c.fill(headerSize); err != nil {
		return 0, 0, err
	}
	h := c.rbuf[c.r : c.r+headerSize]
	kind, n := h[0], binary.LittleEndian.Uint32(h[1:])
	if kind != kindMessage && kind != kindStatus {
		return 0, 0, c.fail(fmt.Errorf("%w: unknown kind %d", ErrFrame, kind))
	}
	if int64(n) > int64(c.max) {
		return 0, 0, c.fail(fmt.Errorf("%w: payload of %d bytes exceeds the maximum of %d", ErrFrame, n, c.max))
	}
	c.r += headerSize
	return kind, int(n), nil
}

// readPayload reads a payload of n bytes into the connection's buffer.
func (c *Conn) readPayload(n int) (byte, []byte, error) {
	kind := c.rbuf[c.r-headerSize]
	if err := c.fill(n); err != nil {
		if errors.Is(err, io.EOF) {
			err = fmt.Errorf("%w: connection closed inside a frame", io.ErrUnexpectedEOF)
		}
		return 0, nil, err
	}
	p := c.rbuf[c.r : c.r+n]
	c.r += n
	return kind, p, nil
}

// fill reads until rbuf[r:] holds need bytes, moving what it holds to
// the front and growing the buffer (doubling, up to need) only when it
// is full. io.EOF only when nothing of a frame had arrived.
func (c *Conn) fill(need int) error {
	for c.w-c.r < need {
		if c.r+need > len(c.rbuf) && c.r > 0 {
			c.w = copy(c.rbuf, c.rbuf[c.r:c.w])
			c.r = 0
		}
		if c.w == len(c.rbuf) {
			size := min(max(2*len(c.rbuf), minRead), max(need, headerSize))
			if size <= len(c.rbuf) {
				size = need
			}
			b := make([]byte, size)
			copy(b, c.rbuf[:c.w])
			c.rbuf = b
		}
		n, err := c.c.Read(c.rbuf[c.w:])
		c.w += n
		if err != nil {
			if c.w-c.r >= need {
				return nil
			}
			if c.closed.Load() {
				return c.closedErr()
			}
			if errors.Is(err, io.EOF) && c.w > c.r {
				err = fmt.Errorf("%w: connection closed inside a frame", io.ErrUnexpectedEOF)
			}
			return c.fail(err)
		}
	}
	return nil
}

// hello is the client's opening.
func hello(version uint16) []byte {
	b := make([]byte, helloSize)
	copy(b, Magic)
	binary.LittleEndian.PutUint16(b[4:], version)
	return b
}

// parseHello checks a client's hello: the version it asks for, or an
// error (wrapping ErrFrame for anything but a data-plane hello).
func parseHello(b []byte) (uint16, error) {
	if len(b) != helloSize || string(b[:len(Magic)]) != Magic {
		return 0, fmt.Errorf("%w: not a data-plane hello", ErrFrame)
	}
	return binary.LittleEndian.Uint16(b[4:]), nil
}

// parseAnswer checks a server's answer to the hello.
func parseAnswer(b []byte) error {
	if len(b) != answerSize || string(b[:len(Magic)]) != Magic {
		return ErrRefused
	}
	v, st := binary.LittleEndian.Uint16(b[4:]), binary.LittleEndian.Uint16(b[6:])
	switch {
	case st == statusOK && v == Version:
		return nil
	case st == statusBadVersion || v != Version:
		return fmt.Errorf("%w: this node speaks data-plane version %d, the peer %d", ErrVersion, Version, v)
	}
	return fmt.Errorf("%w: handshake status %d", ErrRefused, st)
}

// Dial connects to addr and handshakes; ctx bounds both. The error wraps
// ErrRefused or ErrVersion when the peer answers but does not speak this
// data plane (the caller falls back to gRPC), anything else is a
// transport failure.
func Dial(ctx context.Context, addr string) (*Conn, error) {
	var d net.Dialer
	nc, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	return Client(ctx, nc)
}

// Client handshakes over nc as the client; nc is closed on failure.
func Client(ctx context.Context, nc net.Conn) (*Conn, error) {
	stop := context.AfterFunc(ctx, func() { nc.SetDeadline(time.Unix(1, 0)) })
	err := clientHandshake(nc)
	if !stop() && err != nil {
		err = fmt.Errorf("dataplane: handshake with %s: %w", nc.RemoteAddr(), ctx.Err())
	}
	if err != nil {
		nc.Close()
		return nil, err
	}
	nc.SetDeadline(time.Time{})
	return newConn(nc), nil
}

func clientHandshake(nc net.Conn) error {
	if _, err := nc.Write(hello(Version)); err != nil {
		return err
	}
	var b [answerSize]byte
	if n, err := io.ReadFull(nc, b[:]); err != nil {
		// Only bytes that are not an answer are a refusal (a gRPC server
		// sends its SETTINGS frame first); a connection that ends with
		// none is a transport failure, retried as any other.
		if n > 0 && !bytes.HasPrefix([]byte(Magic), b[:min(n, len(Magic))]) {
			return fmt.Errorf("%s: %w", nc.RemoteAddr(), ErrRefused)
		}
		return err
	}
	if err := parseAnswer(b[:]); err != nil {
		return fmt.Errorf("%s: %w", nc.RemoteAddr(), err)
	}
	return nil
}

// Server accepts data-plane connections and runs a handler per
// connection. Close ends every connection and waits for the handlers.
type Server struct {
	handle func(*Conn) error

	mu struct {
		sync.Mutex
		conns  map[net.Conn]*Conn // nil until the handshake is done
		closed bool
	}
	wg sync.WaitGroup
}

// NewServer serves each accepted connection with handle on a goroutine
// of its own. When handle returns, the connection ends with its error's
// gRPC status (a status frame; none for nil) and is closed.
func NewServer(handle func(*Conn) error) *Server {
	s := &Server{handle: handle}
	s.mu.conns = map[net.Conn]*Conn{}
	return s
}

// Serve accepts connections from l until it fails or is closed, and
// returns that error.
func (s *Server) Serve(l net.Listener) error {
	for {
		nc, err := l.Accept()
		if err != nil {
			return err
		}
		s.mu.Lock()
		if s.mu.closed {
			s.mu.Unlock()
			nc.Close()
			continue
		}
		s.mu.conns[nc] = nil
		s.wg.Add(1)
		s.mu.Unlock()
		go s.serveConn(nc)
	}
}

func (s *Server) serveConn(nc net.Conn) {
	defer s.wg.Done()
	defer func() {
		s.mu.Lock()
		delete(s.mu.conns, nc)
		s.mu.Unlock()
	}()
	c, err := s.accept(nc)
	if err != nil {
		nc.Close()
		return
	}
	s.mu.Lock()
	if s.mu.closed {
		s.mu.Unlock()
		c.Close()
		return
	}
	s.mu.conns[nc] = c
	s.mu.Unlock()
	err = s.handle(c)
	if err != nil && !c.closed.Load() {
		c.c.SetWriteDeadline(time.Now().Add(time.Second))
		c.sendStatus(err)
	}
	c.Close()
}

// accept reads the hello and answers it.
func (s *Server) accept(nc net.Conn) (*Conn, error) {
	nc.SetDeadline(time.Now().Add(HandshakeTimeout))
	b := make([]byte, helloSize)
	if _, err := io.ReadFull(nc, b); err != nil {
		return nil, err
	}
	v, err := parseHello(b)
	if err != nil {
		return nil, err
	}
	ans := make([]byte, answerSize)
	copy(ans, Magic)
	binary.LittleEndian.PutUint16(ans[4:], Version)
	if v != Version {
		binary.LittleEndian.PutUint16(ans[6:], statusBadVersion)
		nc.Write(ans)
		return nil, fmt.Errorf("%w: peer asked for version %d", ErrVersion, v)
	}
	if _, err := nc.Write(ans); err != nil {
		return nil, err
	}
	nc.SetDeadline(time.Time{})
	return newConn(nc), nil
}

// Close ends every connection (their handlers see their reads fail) and
// waits for every handler to return. Connections accepted later are
// closed at once. It does not close listeners.
func (s *Server) Close() {
	s.mu.Lock()
	s.mu.closed = true
	for nc, c := range s.mu.conns {
		if c != nil {
			c.Close()
		} else {
			nc.Close()
		}
	}
	s.mu.Unlock()
	s.wg.Wait()
}

// Conns is the number of open connections.
func (s *Server) Conns() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.mu.conns)
}
