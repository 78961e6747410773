package expertnode

import (
	"context"
	"errors"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
)

// waitFor polls cond until it holds or 10 s pass.
func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

// errClosed waits for Err to be closed, failing on an error or a timeout.
func errClosed(t testing.TB, n *Node) {
	t.Helper()
	select {
	case err, ok := <-n.Err():
		if ok {
			t.Fatalf("Err delivered %v, want it closed without an error", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Err not closed 10 s after the node stopped")
	}
}

// TestShutdownAnswersReceived holds the compute lock so that requests pile
// up inside open streams' pipelines, then shuts the node down: every
// request received before Shutdown is answered, then each stream ends
// with UNAVAILABLE; an idle stream ends at once, a new stream is refused,
// and Shutdown returns without waiting for its deadline.
func TestShutdownAnswersReceived(t *testing.T) {
	for _, tr := range transports {
		t.Run(tr, func(t *testing.T) { testShutdownAnswersReceived(t, tr) })
	}
}

func testShutdownAnswersReceived(t *testing.T, tr string) {
	node := startNode(t, testConfig("all"))
	cc, _ := dial(t, node)
	open := opener(t, node, tr)
	ctx := testCtx(t)

	// Three busy streams with three requests each: one waits for the
	// compute lock, two in the queue behind it; the reader has received
	// all three. One idle stream.
	const streams, perStream = 3, 3
	node.compute.Lock()
	locked := true
	defer func() {
		if locked {
			node.compute.Unlock()
		}
	}()
	var busy []dispatchClient
	for s := range streams {
		st, err := open(ctx)
		if err != nil {
			t.Fatal(err)
		}
		for i := range perStream {
			if err := st.Send(validRequest(uint64(s*100 + i))); err != nil {
				t.Fatal(err)
			}
		}
		busy = append(busy, st)
	}
	idle, err := open(ctx)
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, "every request to be received", func() bool { return node.requests.Load() == streams*perStream })
	waitFor(t, "the idle stream's handler", func() bool {
		node.streams.Lock()
		defer node.streams.Unlock()
		return node.streams.open == streams+1
	})

	sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	shut := make(chan error, 1)
	start := time.Now()
	go func() { shut <- node.Shutdown(sctx) }()
	waitFor(t, "draining", func() bool { return node.Serving() != nil })

	// The idle stream ends at once, while the busy ones still wait.
	if _, err := idle.Recv(); status.Code(err) != codes.Unavailable {
		t.Errorf("idle stream: %v, want Unavailable", err)
	}
	// A new stream is refused.
	late, err := open(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := late.Recv(); status.Code(err) != codes.Unavailable {
		t.Errorf("stream opened while draining: %v, want Unavailable", err)
	}
	// Health says NOT_SERVING.
	if r, err := healthpb.NewHealthClient(cc).Check(ctx, &healthpb.HealthCheckRequest{}); err == nil && r.Status != healthpb.HealthCheckResponse_NOT_SERVING {
		t.Errorf("health while draining: %v", r.Status)
	}
	select {
	case err := <-shut:
		t.Fatalf("Shutdown returned %v with requests unanswered", err)
	default:
	}

	node.compute.Unlock()
	locked = false
	for s, st := range busy {
		got := map[uint64]bool{}
		for {
			r, err := st.Recv()
			if err != nil {
				if status.Code(err) != codes.Unavailable {
					t.Errorf("stream %d ended with %v, want Unavailable", s, err)
				}
				break
			}
			if r.Code != 0 {
				t.Errorf("stream %d reply %d: %v %s", s, r.Id, codes.Code(r.Code), r.Message)
			}
			got[r.Id] = true
		}
		if len(got) != perStream {
			t.Errorf("stream %d: %d replies before the stream ended, want %d (every received request)", s, len(got), perStream)
		}
	}
	select {
	case err := <-shut:
		if err != nil {
			t.Fatalf("Shutdown: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Shutdown did not return 10 s after the last request was answered")
	}
	if d := time.Since(start); d > 20*time.Second {
		t.Errorf("Shutdown took %v: it waited for its deadline", d)
	}
	errClosed(t, node)
	if err := node.Close(); err != nil {
		t.Errorf("Close after Shutdown: %v", err)
	}
}

// TestShutdownDeadline: a stream that cannot finish in time is cut when
// Shutdown's context ends; Shutdown reports the context's error and the
// node is stopped.
func TestShutdownDeadline(t *testing.T) {
	node := startNode(t, testConfig("all"))
	_, c := dial(t, node)
	ctx := testCtx(t)
	st, err := c.Dispatch(ctx)
	if err != nil {
		t.Fatal(err)
	}
	node.compute.Lock()
	if err := st.Send(validRequest(1)); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the request to be received", func() bool { return node.requests.Load() == 1 })
	// Running compute cannot be interrupted: the lock is let go once
	// Shutdown's deadline has passed, as a long batch would finish.
	sctx, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
	defer cancel()
	go func() {
		<-sctx.Done()
		time.Sleep(50 * time.Millisecond)
		node.compute.Unlock()
	}()
	if err := node.Shutdown(sctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Shutdown: %v, want DeadlineExceeded", err)
	}
	for {
		if _, err := st.Recv(); err != nil {
			if c := status.Code(err); c != codes.Unavailable && c != codes.Canceled {
				t.Errorf("stream after a hard stop: %v", err)
			}
			break
		}
	}
	errClosed(t, node)
}

// TestErrClosedAfterClose: Err is closed, with no error, once Close has
// stopped the node.
func TestErrClosedAfterClose(t *testing.T) {
	node, err := Start(context.Background(), testConfig("1:0-3"))
	if err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-node.Err():
		t.Fatalf("Err before Close: %v", err)
	default:
	}
	if err := node.Close(); err != nil {
		t.Fatal(err)
	}
	errClosed(t, node)
	if err := node.Serving(); !errors.Is(err, ErrClosed) {
		t.Errorf("Serving after Close: %v", err)
	}
}

// TestErrAfterFatal: when the listener fails under the server the node
// stops itself: Err delivers the error, then is closed, and Close is
// still safe.
func TestErrAfterFatal(t *testing.T) {
	node, err := Start(context.Background(), testConfig("1:0-3"))
	if err != nil {
		t.Fatal(err)
	}
	node.lis.Close()
	select {
	case err, ok := <-node.Err():
		if !ok || err == nil {
			t.Fatalf("Err: %v, %v; want the serve error", err, ok)
		}
		t.Log(err)
	case <-time.After(10 * time.Second):
		t.Fatal("no error 10 s after the listener failed")
	}
	errClosed(t, node)
	if err := node.Hold(context.Background(), mustSet(t, "1:5")); !errors.Is(err, ErrClosed) {
		t.Errorf("Hold after a fatal error: %v, want ErrClosed", err)
	}
	if err := node.Close(); err != nil {
		t.Errorf("Close after a fatal error: %v", err)
	}
}

// TestShutdownWithHealthWatch: a health Watch stream never ends by itself;
// it neither delays Shutdown past the linger bound nor makes it fail, and
// the watcher sees NOT_SERVING.
func TestShutdownWithHealthWatch(t *testing.T) {
	node := startNode(t, testConfig("1:0-3"))
	cc, _ := dial(t, node)
	ctx := testCtx(t)
	w, err := healthpb.NewHealthClient(cc).Watch(ctx, &healthpb.HealthCheckRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if r, err := w.Recv(); err != nil || r.Status != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("watch: %v %v", r, err)
	}
	sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	start := time.Now()
	if err := node.Shutdown(sctx); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d > lingerTimeout+5*time.Second {
		t.Errorf("Shutdown took %v with a health watcher", d)
	}
	if r, err := w.Recv(); err == nil && r.Status != healthpb.HealthCheckResponse_NOT_SERVING {
		t.Errorf("watcher saw %v, want NOT_SERVING or the stream ending", r.Status)
	}
	errClosed(t, node)
}
