// Package testnet injects network faults in tests: a loopback TCP proxy in
// front of a real server that can freeze (what a SIGSTOPped peer looks
// like), thaw and reset the connections it carries.
//
// Tests put a Proxy between a client and a real in-process server and
// dial the proxy's address; the server itself is never mocked.
package testnet

import (
	"net"
	"sync"
)

// Proxy forwards every connection accepted on a loopback port to a target
// address. Its methods are safe for concurrent use.
type Proxy struct {
	ln     net.Listener
	target string
	wg     sync.WaitGroup // accept loop and every connection's goroutines

	mu struct {
		sync.Mutex
		frozen bool
		// thaw is closed when the proxy is not frozen; Freeze replaces it
		// with an open channel.
		thaw chan struct{}
		// held is closed once bytes wait behind a freeze; Freeze replaces
		// it with an open channel.
		held       chan struct{}
		heldClosed bool
		links      map[*link]struct{}
		closed     bool
	}
}

// link is one proxied connection: the accepted client side and, once
// dialled, the target side.
type link struct {
	client net.Conn
	once   sync.Once
	done   chan struct{} // closed by cut

	mu     sync.Mutex
	server net.Conn
}

// cut closes both sides once.
func (l *link) cut() {
	l.once.Do(func() {
		close(l.done)
		l.client.Close()
		l.mu.Lock()
		if l.server != nil {
			l.server.Close()
		}
		l.mu.Unlock()
	})
}

// Listen starts a proxy on 127.0.0.1 (a free port) forwarding to target.
func Listen(target string) (*Proxy, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	p := &Proxy{ln: ln, target: target}
	p.mu.thaw = make(chan struct{})
	close(p.mu.thaw)
	p.mu.held = make(chan struct{})
	p.mu.links = map[*link]struct{}{}
	p.wg.Add(1)
	go p.accept()
	return p, nil
}

// Addr is the proxy's listen address, what clients dial.
func (p *Proxy) Addr() string { return p.ln.Addr().String() }

// Freeze stops forwarding bytes in both directions while keeping every
// connection open; new connections are still accepted (the kernel of a
// stopped process accepts them) but nothing reaches the target. Freezing a
// frozen proxy does nothing.
func (p *Proxy) Freeze() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.mu.frozen {
		return
	}
	p.mu.frozen = true
	p.mu.thaw = make(chan struct{})
	p.mu.held = make(chan struct{})
	p.mu.heldClosed = false
}

// Thaw resumes forwarding; bytes held back by the freeze flow on.
func (p *Proxy) Thaw() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.mu.frozen {
		return
	}
	p.mu.frozen = false
	close(p.mu.thaw)
}

// Held is closed once something waits behind the current freeze: bytes
// (in either direction) or a connection accepted but not yet forwarded. A
// request or a dial is then provably in flight to the frozen peer. Before
// any Freeze it never closes.
func (p *Proxy) Held() <-chan struct{} {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.mu.held
}

// Reset cuts every connection the proxy carries now, once: both sides see
// the connection close, as after a network blip. Later connections are
// forwarded as usual.
func (p *Proxy) Reset() {
	p.mu.Lock()
	links := make([]*link, 0, len(p.mu.links))
	for l := range p.mu.links {
		links = append(links, l)
	}
	p.mu.Unlock()
	for _, l := range links {
		l.cut()
	}
}

// Close stops accepting, cuts every connection and waits for the proxy's
// goroutines to exit. It is idempotent.
func (p *Proxy) Close() error {
	p.mu.Lock()
	if p.mu.closed {
		p.mu.Unlock()
		return nil
	}
	p.mu.closed = true
	p.mu.Unlock()
	err := p.ln.Close()
	p.Reset()
	p.wg.Wait()
	return err
}

func (p *Proxy) accept() {
	defer p.wg.Done()
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return // closed
		}
		l := &link{client: c, done: make(chan struct{})}
		p.mu.Lock()
		if p.mu.closed {
			p.mu.Unlock()
			c.Close()
			return
		}
		p.mu.links[l] = struct{}{}
		p.wg.Add(1)
		p.mu.Unlock()
		go p.serve(l)
	}
}

// serve dials the target once the proxy is not frozen and copies both
// ways until either side closes or the link is cut.
func (p *Proxy) serve(l *link) {
	defer p.wg.Done()
	defer func() {
		l.cut()
		p.mu.Lock()
		delete(p.mu.links, l)
		p.mu.Unlock()
	}()
	if !p.gate(l.done, true) {
		return
	}
	s, err := net.Dial("tcp", p.target)
	if err != nil {
		return
	}
	l.mu.Lock()
	l.server = s
	l.mu.Unlock()
	select {
	case <-l.done: // cut while dialling
		s.Close()
		return
	default:
	}
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); p.copy(s, l.client, l) }()
	go func() { defer wg.Done(); p.copy(l.client, s, l) }()
	wg.Wait()
}

// copy forwards src to dst, holding each chunk while the proxy is frozen.
func (p *Proxy) copy(dst, src net.Conn, l *link) {
	defer l.cut()
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			if !p.gate(l.done, true) {
				return
			}
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return // EOF or the link was cut: either way the link ends
		}
	}
}

// gate waits until the proxy is not frozen; false if the link was cut
// first. holding says the caller holds something back (for Held).
func (p *Proxy) gate(done <-chan struct{}, holding bool) bool {
	p.mu.Lock()
	if !p.mu.frozen {
		p.mu.Unlock()
		return true
	}
	thaw := p.mu.thaw
	if holding && !p.mu.heldClosed {
		p.mu.heldClosed = true
		close(p.mu.held)
	}
	p.mu.Unlock()
	select {
	case <-thaw:
		return true
	case <-done:
		return false
	}
}
