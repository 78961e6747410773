package localcluster

import (
	"errors"
	"io"
	"net"
	"runtime"
	"slices"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// delayProxy forwards TCP connections to target, delaying every chunk of
// bytes by a fixed time in each direction: a link's latency where the
// kernel has no netem. Each direction has a writer goroutine on its own OS
// thread with a 1 ns timer slack, which sleeps in the kernel until a
// chunk is nearly due and spins the rest: Go's timers here wake up to a
// millisecond late, nanosleep some tens of microseconds late (that
// overshoot, measured once, is how long it spins). The spinning costs
// about that much CPU per chunk; the hand-off from reader to writer costs
// tens to hundreds of microseconds more on a loaded machine. Measure the
// link (the sweep records the dispatch wire time) rather than trusting
// the setting.
type delayProxy struct {
	ln     net.Listener
	target string
	delay  time.Duration

	wg sync.WaitGroup
	mu struct {
		sync.Mutex
		conns  map[net.Conn]struct{}
		closed bool
	}
}

// overshoot is how late nanosleep wakes up on this machine (median of a
// few sleeps on a thread with a 1 ns slack), measured once.
var overshoot = sync.OnceValue(func() time.Duration {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	_ = unix.Prctl(unix.PR_SET_TIMERSLACK, 1, 0, 0, 0)
	const d = 200 * time.Microsecond
	var over []time.Duration
	for range 25 {
		s := time.Now()
		ts := unix.NsecToTimespec(int64(d))
		unix.Nanosleep(&ts, nil)
		over = append(over, time.Since(s)-d)
	}
	slices.Sort(over)
	return min(max(over[len(over)/2], 0), d)
})

// startDelayProxy listens on addr and forwards to target.
func startDelayProxy(addr, target string, delay time.Duration) (*delayProxy, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, err
	}
	overshoot() // measured before any traffic
	p := &delayProxy{ln: ln, target: target, delay: delay}
	p.mu.conns = map[net.Conn]struct{}{}
	p.wg.Add(1)
	go p.accept()
	return p, nil
}

func (p *delayProxy) Addr() string { return p.ln.Addr().String() }

func (p *delayProxy) accept() {
	defer p.wg.Done()
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		s, err := net.DialTimeout("tcp", p.target, 5*time.Second)
		if err != nil {
			c.Close()
			continue
		}
		if !p.track(c, s) {
			c.Close()
			s.Close()
			return
		}
		p.wg.Add(2)
		go p.pipe(s, c)
		go p.pipe(c, s)
	}
}

func (p *delayProxy) track(cs ...net.Conn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.mu.closed {
		return false
	}
	for _, c := range cs {
		p.mu.conns[c] = struct{}{}
	}
	return true
}

type chunk struct {
	due  time.Time
	data []byte
}

// pipe copies src to dst, each chunk delayed by p.delay after it was
// read. When either side fails both are closed.
func (p *delayProxy) pipe(dst, src net.Conn) {
	defer p.wg.Done()
	q := make(chan chunk, 4096)
	done := make(chan struct{})
	go func() {
		defer close(done)
		runtime.LockOSThread() // the timer slack is per thread; the thread ends with the goroutine
		_ = unix.Prctl(unix.PR_SET_TIMERSLACK, 1, 0, 0, 0)
		for c := range q {
			waitUntil(c.due)
			if _, err := dst.Write(c.data); err != nil {
				src.Close()
				for range q {
				}
				return
			}
		}
		if tc, ok := dst.(*net.TCPConn); ok {
			tc.CloseWrite()
		}
	}()
	for {
		buf := make([]byte, 64<<10)
		n, err := src.Read(buf)
		if n > 0 {
			q <- chunk{due: time.Now().Add(p.delay), data: buf[:n]}
		}
		if err != nil {
			if !errors.Is(err, io.EOF) {
				dst.Close()
			}
			break
		}
	}
	close(q)
	<-done
}

// waitUntil sleeps in the kernel until nanosleep's overshoot before t,
// then spins.
func waitUntil(t time.Time) {
	if d := time.Until(t) - overshoot(); d > 0 {
		ts := unix.NsecToTimespec(int64(d))
		for unix.Nanosleep(&ts, &ts) == unix.EINTR {
		}
	}
	for time.Now().Before(t) {
	}
}

// Close stops accepting, cuts every connection and waits for the
// goroutines.
func (p *delayProxy) Close() {
	p.mu.Lock()
	p.mu.closed = true
	conns := p.mu.conns
	p.mu.conns = nil
	p.mu.Unlock()
	p.ln.Close()
	for c := range conns {
		c.Close()
	}
	p.wg.Wait()
}
