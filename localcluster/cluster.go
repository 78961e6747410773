// Package localcluster runs a whole expertmesh cluster on one machine as
// separate OS processes of the expertmesh binary: an etcd member, E expert
// nodes, A attention nodes and a coordinator, all on loopback. It is what
// `expertmesh up` runs and what the end-to-end failure tests start.
//
// The processes find each other through etcd, exactly as on a real
// cluster: nobody is told another's address. By default the etcd member
// runs embedded in this process (package controlplane), with its data in
// the data directory, so one machine needs nothing else; Config.Etcd
// points the roles at an external etcd instead, and Config.EtcdChild runs
// the member as a child process so that tests can stop and restart it.
//
// The launcher supervises: a child that dies is restarted with backoff
// under the same node id while the others keep serving (a node that
// exits by itself with status 0 after a drain is left stopped). Every
// child announces readiness with one stdout line ending in its address.
package localcluster

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/expertmesh/expertmesh/controlplane"
	"github.com/expertmesh/expertmesh/model"
)

// Config describes the cluster to launch.
type Config struct {
	// Binary is the expertmesh executable (default: this process's).
	Binary string
	// ModelDir is the checkpoint; empty means generate Preset into
	// CacheDir (once) and use that.
	ModelDir string
	Preset   string
	CacheDir string
	// AttnNodes and ExpertNodes count the processes of each role.
	AttnNodes, ExpertNodes int
	// Addr is the coordinator's HTTP address.
	Addr string
	// Threads per attention and expert process (0: all cores).
	AttnThreads, ExpertThreads int
	// Etcd lists external etcd endpoints ("host:port,…"); empty runs a
	// member here (embedded, or a child with EtcdChild).
	Etcd string
	// EtcdChild runs the etcd member as a child process (`expertmesh
	// etcd`) on a fixed port, so it can be stopped and restarted.
	EtcdChild bool
	// DataDir keeps the etcd member's data (default: CacheDir/up/etcd).
	DataDir string
	// ClusterName prefixes every etcd key (--cluster).
	ClusterName string
	// LeaseTTL is the members' lease TTL (0: the roles' default).
	LeaseTTL time.Duration
	// Ops gives every child an ops endpoint (/healthz, /readyz,
	// /metrics) on a free loopback port; the addresses are in Children.
	Ops bool
	// NoRestart leaves dead children dead (tests that need a node to stay
	// gone).
	NoRestart bool
	// CoordinatorArgs, AttnArgs and ExpertArgs are appended to each
	// child's flags (passed through by `up`).
	CoordinatorArgs, AttnArgs, ExpertArgs []string
	// Log receives every child's output, prefixed with its name.
	Log io.Writer
	// ReadyTimeout bounds the wait for each child's ready line.
	ReadyTimeout time.Duration
	// Net, when set, runs every child in a network of its own (NewNetns:
	// namespaces with emulated links); the embedded etcd listens on its
	// Host. Not with EtcdChild.
	Net Network
}

// DefaultConfig is one attention node and three expert nodes on the
// default tiny-v2 model.
func DefaultConfig() Config {
	return Config{Preset: "tiny-v2", AttnNodes: 1, ExpertNodes: 3, Addr: "127.0.0.1:8080", ExpertThreads: 1,
		ClusterName: "default", Ops: true, ReadyTimeout: 2 * time.Minute}
}

// Validate names the flag of the first bad field.
func (c Config) Validate() error {
	switch {
	case c.AttnNodes < 1:
		return fmt.Errorf("--attn-nodes must be >= 1, got %d", c.AttnNodes)
	case c.ExpertNodes < 1:
		return fmt.Errorf("--expert-nodes must be >= 1, got %d", c.ExpertNodes)
	case c.Addr == "":
		return errors.New("--addr is required")
	case c.ModelDir == "" && c.Preset == "":
		return errors.New("--model or --preset is required")
	case c.LeaseTTL < 0:
		return fmt.Errorf("--lease-ttl must be >= 0, got %v", c.LeaseTTL)
	case c.Etcd != "" && c.EtcdChild:
		return errors.New("--etcd names an external etcd; an etcd child makes no sense with it")
	}
	return nil
}

// Event is something that happened to a child, for logs and tests.
type Event struct {
	Child string
	// Kind is "ready", "exited" or "restarting".
	Kind string
	Addr string // ready: the address it announced
	Err  error  // exited: how
	At   time.Time
}

// Cluster is a running, supervised set of child processes.
type Cluster struct {
	// URL is the coordinator's base URL; Model the checkpoint directory;
	// EtcdEndpoints what the roles were given as --etcd.
	URL, Model, EtcdEndpoints string

	cfg  Config
	etcd *controlplane.Etcd // embedded member, when one runs here

	events chan Event
	mu     sync.Mutex
	kids   map[string]*child
	order  []string
	// closing stops restarts; stopped is closed when Close begins.
	closing bool
	stopped chan struct{}
	wg      sync.WaitGroup
}

// child is one supervised process: its spec and its current incarnation.
type child struct {
	name, role string
	args       []string
	// ops: the child serves an ops endpoint on a port it picks, announced
	// on stderr ("ops endpoint on http://ADDR").
	ops bool
	// run is the current process; replaced on restart.
	run *process
	// restarts counts how often it was restarted.
	restarts int
	// left: it exited with status 0 on its own (drained); not restarted.
	left bool
}

type process struct {
	cmd      *exec.Cmd
	addr     string // announced on stdout
	opsAddr  string // announced on stderr
	ready    chan string
	opsReady chan string
	done     chan struct{}
	err      error
	// stderr keeps the last lines the process wrote to stderr, so that
	// an exit before it was ready names its cause even when the
	// cluster's log is discarded.
	stderr lastLines
}

// lastLines keeps the last few lines written to it.
type lastLines struct {
	mu    sync.Mutex
	lines []string
}

// stderrLines is how many of a child's last stderr lines its start
// error quotes, each cut at stderrLineMax bytes.
const (
	stderrLines   = 3
	stderrLineMax = 400
)

func (l *lastLines) add(line string) {
	if len(line) > stderrLineMax {
		line = line[:stderrLineMax] + "…"
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.lines) == stderrLines {
		l.lines = append(l.lines[:0], l.lines[1:]...)
	}
	l.lines = append(l.lines, line)
}

// String is the lines kept, joined by " | ", or "" when there are none.
func (l *lastLines) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return strings.Join(l.lines, " | ")
}

// Start launches the cluster and returns once every process is ready: an
// etcd member (unless Etcd names one), expert nodes, attention nodes, the
// coordinator. On failure everything already started is stopped.
func Start(ctx context.Context, cfg Config) (*Cluster, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if cfg.Binary == "" {
		exe, err := os.Executable()
		if err != nil {
			return nil, err
		}
		cfg.Binary = exe
	}
	if cfg.Log == nil {
		cfg.Log = io.Discard
	}
	if cfg.ReadyTimeout == 0 {
		cfg.ReadyTimeout = 2 * time.Minute
	}
	if cfg.ClusterName == "" {
		cfg.ClusterName = "default"
	}
	dir, err := EnsureModel(cfg)
	if err != nil {
		return nil, err
	}
	c := &Cluster{Model: dir, cfg: cfg, events: make(chan Event, 1024), kids: map[string]*child{}, stopped: make(chan struct{})}
	if err := c.launch(ctx, dir); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

func (c *Cluster) launch(ctx context.Context, dir string) error {
	cfg := c.cfg
	switch {
	case cfg.Etcd != "":
		c.EtcdEndpoints = cfg.Etcd
	case cfg.EtcdChild:
		// Restarted on the same ports: pick them where no outgoing
		// connection or port-0 listener can take them while it is down.
		addr, err := restartablePort()
		if err != nil {
			return err
		}
		peer, err := restartablePort()
		if err != nil {
			return err
		}
		ch := c.add("etcd", "etcd", "--etcd-dir", c.dataDir(), "--etcd-listen", addr, "--etcd-peer", peer)
		if err := c.startAndWait(ctx, ch); err != nil {
			return err
		}
		c.EtcdEndpoints = addr
	default:
		ecfg := controlplane.DefaultEtcdConfig(c.dataDir())
		ecfg.ClientAddr, ecfg.PeerAddr = "127.0.0.1:0", "127.0.0.1:0"
		if cfg.Net != nil {
			ecfg.ClientAddr = cfg.Net.Host() + ":0"
		}
		e, err := controlplane.StartEtcd(ctx, ecfg)
		if err != nil {
			return fmt.Errorf("embedded etcd in %s: %w", c.dataDir(), err)
		}
		c.etcd = e
		select {
		case <-e.Ready():
		case err := <-e.Err():
			return fmt.Errorf("embedded etcd: %w", err)
		case <-ctx.Done():
			return ctx.Err()
		}
		c.EtcdEndpoints = e.ClientAddr()
		fmt.Fprintf(cfg.Log, "[etcd] embedded member serving on %s, data in %s\n", c.EtcdEndpoints, c.dataDir())
	}
	common := []string{"--model", dir, "--etcd", c.EtcdEndpoints, "--cluster", cfg.ClusterName}
	if cfg.LeaseTTL > 0 {
		common = append(common, "--lease-ttl", cfg.LeaseTTL.String())
	}
	// Expert nodes first: the coordinator places experts on whoever has
	// registered, and attention nodes wait for a placement.
	var starting []*child
	for i := range cfg.ExpertNodes {
		name := fmt.Sprintf("expert-%d", i)
		args := append(append([]string{}, common...), "--listen", "127.0.0.1:0", "--node-id", name,
			"--threads", strconv.Itoa(cfg.ExpertThreads))
		starting = append(starting, c.add(name, "expert", append(args, cfg.ExpertArgs...)...))
	}
	for i := range cfg.AttnNodes {
		name := fmt.Sprintf("attn-%d", i)
		args := append(append([]string{}, common...), "--listen", "127.0.0.1:0", "--node-id", name,
			"--threads", strconv.Itoa(cfg.AttnThreads))
		starting = append(starting, c.add(name, "attn", append(args, cfg.AttnArgs...)...))
	}
	args := append(append([]string{}, common...), "--addr", cfg.Addr, "--node-id", "coordinator")
	starting = append(starting, c.add("coordinator", "coordinator", append(args, cfg.CoordinatorArgs...)...))
	// Everyone starts at once (the expert nodes load while the coordinator
	// comes up); each waits for what it needs through etcd.
	for _, ch := range starting {
		if err := c.startChild(ch); err != nil {
			return err
		}
	}
	for _, ch := range starting {
		if err := c.waitReady(ctx, ch); err != nil {
			return err
		}
	}
	c.URL = "http://" + c.addrOf("coordinator")
	return nil
}

func (c *Cluster) dataDir() string {
	if c.cfg.DataDir != "" {
		return c.cfg.DataDir
	}
	return filepath.Join(cacheRoot(c.cfg.CacheDir), "up", "etcd")
}

// add registers a child (not started yet).
func (c *Cluster) add(name, role string, args ...string) *child {
	ch := &child{name: name, role: role, args: args}
	// The coordinator serves /healthz, /readyz and /metrics on its HTTP
	// address already.
	if c.cfg.Ops && role != "etcd" && role != "coordinator" {
		ch.ops = true
	}
	c.mu.Lock()
	c.kids[name] = ch
	c.order = append(c.order, name)
	c.mu.Unlock()
	return ch
}

// AddExpert starts one more expert node (it joins through etcd and takes
// a share of the experts) and returns its name once it is ready.
func (c *Cluster) AddExpert(ctx context.Context, extra ...string) (string, error) {
	c.mu.Lock()
	n := 0
	for _, ch := range c.kids {
		if ch.role == "expert" {
			n++
		}
	}
	c.mu.Unlock()
	name := fmt.Sprintf("expert-%d", n)
	args := []string{"--model", c.Model, "--etcd", c.EtcdEndpoints, "--cluster", c.cfg.ClusterName,
		"--listen", "127.0.0.1:0", "--node-id", name, "--threads", strconv.Itoa(c.cfg.ExpertThreads)}
	if c.cfg.LeaseTTL > 0 {
		args = append(args, "--lease-ttl", c.cfg.LeaseTTL.String())
	}
	ch := c.add(name, "expert", append(append(args, c.cfg.ExpertArgs...), extra...)...)
	return name, c.startAndWait(ctx, ch)
}

func (c *Cluster) startAndWait(ctx context.Context, ch *child) error {
	if err := c.startChild(ch); err != nil {
		return err
	}
	return c.waitReady(ctx, ch)
}

// startChild starts ch's next incarnation and supervises it.
func (c *Cluster) startChild(ch *child) error {
	args := append([]string{ch.role}, ch.args...)
	if ch.ops {
		// The child picks the port (no race with other processes for a
		// port chosen here) and announces it.
		args = append(args, "--ops-listen", "127.0.0.1:0")
	}
	argv := append([]string{c.cfg.Binary}, args...)
	if c.cfg.Net != nil {
		var err error
		if argv, err = c.cfg.Net.Command(ch.name, ch.role, argv); err != nil {
			return fmt.Errorf("start %s: %w", ch.name, err)
		}
	}
	cmd := exec.Command(argv[0], argv[1:]...)
	setParentDeathSignal(cmd)
	p := &process{ready: make(chan string, 1), opsReady: make(chan string, 1), done: make(chan struct{})}
	cmd.Stderr = &prefixWriter{w: c.cfg.Log, prefix: "[" + ch.name + "] ", onLine: func(line string) {
		p.stderr.add(line)
		if _, addr, ok := strings.Cut(line, "ops endpoint on http://"); ok {
			select {
			case p.opsReady <- strings.TrimSpace(addr):
			default:
			}
		}
	}}
	out, err := cmd.StdoutPipe()
	if err != nil {
		return err
	}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start %s: %w", ch.name, err)
	}
	p.cmd = cmd
	c.mu.Lock()
	ch.run = p
	c.mu.Unlock()
	go func() {
		sc := bufio.NewScanner(out)
		announced := false
		for sc.Scan() {
			line := sc.Text()
			fmt.Fprintf(c.cfg.Log, "[%s] %s\n", ch.name, line)
			if !announced && strings.Contains(line, "listening on ") {
				announced = true
				f := strings.Fields(line)
				addr := strings.TrimPrefix(f[len(f)-1], "http://")
				p.ready <- addr
			}
		}
	}()
	c.wg.Add(1)
	go c.supervise(ch, p)
	return nil
}

// supervise waits for p to exit and restarts ch with backoff unless the
// cluster is closing, restarts are off, or the child left on its own
// (exit status 0: it drained). Backoff doubles from 500 ms to 30 s and
// resets after a run of a minute.
func (c *Cluster) supervise(ch *child, p *process) {
	defer c.wg.Done()
	backoff := 500 * time.Millisecond
	for {
		started := time.Now()
		p.err = p.cmd.Wait()
		close(p.done)
		c.emit(Event{Child: ch.name, Kind: "exited", Err: p.err})
		c.mu.Lock()
		stop := c.closing || c.cfg.NoRestart || p.err == nil
		if p.err == nil {
			ch.left = true
		}
		c.mu.Unlock()
		if stop {
			if p.err == nil && !c.isClosing() {
				fmt.Fprintf(c.cfg.Log, "[%s] left the cluster (exited cleanly); not restarting\n", ch.name)
			}
			return
		}
		if time.Since(started) > time.Minute {
			backoff = 500 * time.Millisecond
		}
		fmt.Fprintf(c.cfg.Log, "[%s] exited (%v); restarting in %v\n", ch.name, p.err, backoff)
		c.emit(Event{Child: ch.name, Kind: "restarting", Err: p.err})
		select {
		case <-c.stopped:
			return
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 30*time.Second)
		c.mu.Lock()
		ch.restarts++
		c.mu.Unlock()
		if c.isClosing() {
			return
		}
		if err := c.startChild(ch); err != nil {
			fmt.Fprintf(c.cfg.Log, "[%s] restart failed: %v\n", ch.name, err)
			continue
		}
		// startChild began a new supervisor for the new process.
		go c.announce(ch)
		return
	}
}

// announce emits the ready event of a restarted child.
func (c *Cluster) announce(ch *child) {
	c.mu.Lock()
	p := ch.run
	c.mu.Unlock()
	if c.await(context.Background(), ch, p, nil) == nil {
		c.emit(Event{Child: ch.name, Kind: "ready", Addr: p.addr})
	}
}

func (c *Cluster) waitReady(ctx context.Context, ch *child) error {
	c.mu.Lock()
	p := ch.run
	c.mu.Unlock()
	timer := time.NewTimer(c.cfg.ReadyTimeout)
	defer timer.Stop()
	if err := c.await(ctx, ch, p, timer.C); err != nil {
		return err
	}
	c.emit(Event{Child: ch.name, Kind: "ready", Addr: p.addr})
	return nil
}

// await waits for p's ready line (and its ops line when it serves one).
func (c *Cluster) await(ctx context.Context, ch *child, p *process, timeout <-chan time.Time) error {
	addr, ops := "", ""
	for addr == "" || (ch.ops && ops == "") {
		select {
		case addr = <-p.ready:
		case ops = <-p.opsReady:
		case <-p.done:
			// Wait, which closed done, has copied all of stderr.
			if last := p.stderr.String(); last != "" {
				return fmt.Errorf("%s exited before it was ready: %v; its last stderr: %s", ch.name, p.err, last)
			}
			return fmt.Errorf("%s exited before it was ready: %v", ch.name, p.err)
		case <-timeout:
			return fmt.Errorf("%s not ready after %v", ch.name, c.cfg.ReadyTimeout)
		case <-ctx.Done():
			return ctx.Err()
		case <-c.stopped:
			return errors.New("cluster closing")
		}
	}
	c.mu.Lock()
	p.addr, p.opsAddr = addr, ops
	c.mu.Unlock()
	return nil
}

func (c *Cluster) emit(e Event) {
	e.At = time.Now()
	select {
	case c.events <- e:
	default: // nobody reads: drop rather than block a supervisor
	}
}

// Events delivers what happens to children (ready, exited, restarting).
// It is buffered; events are dropped when nobody reads.
func (c *Cluster) Events() <-chan Event { return c.events }

func (c *Cluster) isClosing() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.closing
}

func (c *Cluster) addrOf(name string) string {
	c.mu.Lock()
	defer c.mu.Unlock()
	if ch := c.kids[name]; ch != nil && ch.run != nil {
		return ch.run.addr
	}
	return ""
}

// Child describes one child for tests and `up`'s banner.
type Child struct {
	Name, Role, Addr, OpsAddr string
	PID, Restarts             int
	Running                   bool
}

// Children lists the children in start order.
func (c *Cluster) Children() []Child {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []Child
	for _, name := range c.order {
		ch := c.kids[name]
		k := Child{Name: name, Role: ch.role, Restarts: ch.restarts}
		if p := ch.run; p != nil {
			k.Addr, k.OpsAddr, k.PID = p.addr, p.opsAddr, p.cmd.Process.Pid
			select {
			case <-p.done:
			default:
				k.Running = true
			}
		}
		out = append(out, k)
	}
	return out
}

// Signal sends sig to a child's current process: SIGKILL and SIGSTOP /
// SIGCONT for failure tests, SIGTERM for a drain.
func (c *Cluster) Signal(name string, sig syscall.Signal) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	ch := c.kids[name]
	if ch == nil || ch.run == nil {
		return fmt.Errorf("no child %q", name)
	}
	return ch.run.cmd.Process.Signal(sig)
}

// Kill stops one child abruptly (SIGKILL); the supervisor restarts it
// unless NoRestart.
func (c *Cluster) Kill(name string) error { return c.Signal(name, syscall.SIGKILL) }

// Restart starts a child again that left or was killed with restarts off.
func (c *Cluster) Restart(ctx context.Context, name string) error {
	c.mu.Lock()
	ch := c.kids[name]
	c.mu.Unlock()
	if ch == nil {
		return fmt.Errorf("no child %q", name)
	}
	select {
	case <-ch.run.done:
	default:
		return fmt.Errorf("%s is running", name)
	}
	return c.startAndWait(ctx, ch)
}

// Wait waits for a child's current process to exit and returns how.
func (c *Cluster) Wait(ctx context.Context, name string) error {
	c.mu.Lock()
	ch := c.kids[name]
	c.mu.Unlock()
	if ch == nil {
		return fmt.Errorf("no child %q", name)
	}
	select {
	case <-ch.run.done:
		return ch.run.err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Close stops every child: SIGTERM in reverse start order (coordinator
// first, expert nodes and the etcd child last), each given 10 s to drain
// before SIGKILL; then the embedded etcd member, if any, stops.
func (c *Cluster) Close() error {
	c.mu.Lock()
	if c.closing {
		c.mu.Unlock()
		return nil
	}
	c.closing = true
	close(c.stopped)
	var kids []*child
	for i := len(c.order) - 1; i >= 0; i-- {
		kids = append(kids, c.kids[c.order[i]])
	}
	c.mu.Unlock()
	for _, ch := range kids {
		p := ch.run
		if p == nil {
			continue
		}
		_ = p.cmd.Process.Signal(syscall.SIGCONT) // a stopped child cannot drain
		_ = p.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-p.done:
		case <-time.After(10 * time.Second):
			_ = p.cmd.Process.Kill()
			<-p.done
		}
	}
	c.wg.Wait()
	if c.etcd != nil {
		return c.etcd.Close()
	}
	return nil
}

// restartablePort returns a free loopback address below the kernel's
// ephemeral port range (Linux's default starts at 32768), for a child
// that is stopped and started again on the same address.
func restartablePort() (string, error) {
	lo := 32768
	if b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range"); err == nil {
		if f := strings.Fields(string(b)); len(f) == 2 {
			if v, err := strconv.Atoi(f[0]); err == nil && v > 11000 {
				lo = v
			}
		}
	}
	for range 200 {
		addr := fmt.Sprintf("127.0.0.1:%d", 10000+rand.IntN(lo-10000))
		if l, err := net.Listen("tcp", addr); err == nil {
			l.Close()
			return addr, nil
		}
	}
	return "", fmt.Errorf("no free port below %d", lo)
}

func cacheRoot(dir string) string {
	if dir != "" {
		return dir
	}
	base, err := os.UserCacheDir()
	if err != nil {
		base = os.TempDir()
	}
	return filepath.Join(base, "expertmesh")
}

// EnsureModel returns cfg.ModelDir, or generates cfg.Preset into the
// cache directory the first time and returns that.
func EnsureModel(cfg Config) (string, error) {
	if cfg.ModelDir != "" {
		return cfg.ModelDir, nil
	}
	p, ok := model.IsPreset(cfg.Preset)
	if !ok {
		return "", fmt.Errorf("--preset %q: unknown (have %s)", cfg.Preset, strings.Join(model.PresetNames(), ", "))
	}
	dir := filepath.Join(cacheRoot(cfg.CacheDir), p.Name)
	// A complete model has its index and tokenizer (an older or
	// interrupted generation may lack them): regenerate otherwise.
	complete := true
	for _, f := range []string{"config.json", "model.safetensors.index.json", "tokenizer.json"} {
		if _, err := os.Stat(filepath.Join(dir, f)); err != nil {
			complete = false
		}
	}
	if complete {
		return dir, nil
	}
	os.RemoveAll(dir)
	// Generate beside and rename, so a crash never leaves a half model
	// that looks complete.
	tmp := dir + ".tmp"
	os.RemoveAll(tmp)
	if err := model.GenerateCheckpoint(tmp, p, model.GenOptions{Seed: 1}); err != nil {
		return "", err
	}
	if err := os.Rename(tmp, dir); err != nil {
		return "", err
	}
	return dir, nil
}

// prefixWriter prefixes every line written to w, and shows each to
// onLine (if set).
type prefixWriter struct {
	mu     sync.Mutex
	w      io.Writer
	prefix string
	onLine func(string)
	buf    []byte
}

func (p *prefixWriter) Write(b []byte) (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.buf = append(p.buf, b...)
	for {
		i := strings.IndexByte(string(p.buf), '\n')
		if i < 0 {
			break
		}
		fmt.Fprintf(p.w, "%s%s\n", p.prefix, p.buf[:i])
		if p.onLine != nil {
			p.onLine(string(p.buf[:i]))
		}
		p.buf = p.buf[i+1:]
	}
	return len(b), nil
}
