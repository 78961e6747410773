package testnet

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// echoServer answers every line with the same line.
func echoServer(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	var conns []net.Conn
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
			wg.Add(1)
			go func() {
				defer wg.Done()
				io.Copy(c, c)
				c.Close()
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	return ln.Addr().String()
}

// roundTrip writes a line and reads the echo, bounded by ctx.
func roundTrip(ctx context.Context, c net.Conn, r *bufio.Reader, line string) (string, error) {
	if d, ok := ctx.Deadline(); ok {
		c.SetDeadline(d)
	}
	if _, err := c.Write([]byte(line + "\n")); err != nil {
		return "", err
	}
	got, err := r.ReadString('\n')
	return got, err
}

func TestProxyForwardsFreezesThawsResets(t *testing.T) {
	p, err := Listen(echoServer(t))
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	c, err := net.Dial("tcp", p.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	r := bufio.NewReader(c)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if got, err := roundTrip(ctx, c, r, "hello"); err != nil || got != "hello\n" {
		t.Fatalf("forwarding: %q, %v", got, err)
	}

	// Frozen: the write is accepted, held, and unanswered until Thaw.
	p.Freeze()
	if _, err := c.Write([]byte("frozen\n")); err != nil {
		t.Fatal(err)
	}
	select {
	case <-p.Held():
	case <-ctx.Done():
		t.Fatal("bytes sent to a frozen proxy were never held")
	}
	c.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	if _, err := r.ReadString('\n'); !isTimeout(err) {
		t.Fatalf("a frozen proxy answered: %v", err)
	}
	// A new connection is accepted while frozen, but nothing answers it.
	c2, err := net.Dial("tcp", p.Addr())
	if err != nil {
		t.Fatalf("frozen proxy refused a connection: %v", err)
	}
	defer c2.Close()
	c2.Write([]byte("late\n"))
	p.Thaw()
	c.SetDeadline(time.Time{})
	if got, err := r.ReadString('\n'); err != nil || got != "frozen\n" {
		t.Fatalf("after thaw: %q, %v", got, err)
	}
	r2 := bufio.NewReader(c2)
	c2.SetDeadline(time.Now().Add(10 * time.Second))
	if got, err := r2.ReadString('\n'); err != nil || got != "late\n" {
		t.Fatalf("connection accepted while frozen, after thaw: %q, %v", got, err)
	}

	// Reset cuts the connection; a new one works.
	p.Reset()
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := r.ReadString('\n'); err == nil {
		t.Fatal("read on a reset connection succeeded")
	}
	c3, err := net.Dial("tcp", p.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer c3.Close()
	if got, err := roundTrip(ctx, c3, bufio.NewReader(c3), "again"); err != nil || got != "again\n" {
		t.Fatalf("after reset: %q, %v", got, err)
	}
}

// TestProxyCloseWhileFrozen: Close ends connections held by a freeze and
// leaves no goroutine behind (TestMain checks).
func TestProxyCloseWhileFrozen(t *testing.T) {
	p, err := Listen(echoServer(t))
	if err != nil {
		t.Fatal(err)
	}
	c, err := net.Dial("tcp", p.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	p.Freeze()
	c.Write([]byte("x\n"))
	<-p.Held()
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	if err := p.Close(); err != nil {
		t.Fatalf("second close: %v", err)
	}
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Read(make([]byte, 1)); err == nil {
		t.Fatal("connection survived Close")
	}
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}
