package localcluster

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// NetnsConfig configures NewNetns.
type NetnsConfig struct {
	// Link is what every node's link emulates.
	Link LinkSpec
	// Emulation is how the latency is made: "netem" (the kernel's qdisc
	// on every veth end: every link, both ways), "proxy" (a user-space
	// delay proxy in front of each expert node: the attention↔expert hop
	// only; the rate is still the kernel's tbf) or "auto" (netem when the
	// kernel has it, else proxy; the default).
	Emulation string
	// Log receives every command run (nil: none).
	Log io.Writer
}

// Netns runs each child of a cluster in a network namespace of its own,
// linked to the others through a bridge in this namespace by a veth pair
// whose ends emulate the link (tc netem delay and rate; or tbf for the
// rate and a delay proxy where the kernel lacks netem). The bridge has an
// address of this host (Host): the embedded etcd listens there, and the
// benchmark reaches the coordinator through it. Children listen on their
// namespace's address instead of loopback.
//
// Close deletes the namespaces, veths and bridge; a harness that died
// without closing is cleaned up by the next NewNetns (names carry the
// owner's pid). It needs root (CAP_NET_ADMIN) and iproute2's ip and tc.
type Netns struct {
	cfg    NetnsConfig
	owner  int
	subnet int
	bridge string
	host   string
	mode   string

	mu struct {
		sync.Mutex
		nodes   map[string]*nsNode
		proxies []*delayProxy
		closed  bool
	}
}

type nsNode struct {
	ns, ip, hostVeth string
	proxy            string // address others dial instead of the node (proxy mode, expert nodes)
}

// netnsPrefix starts every namespace and bridge alias this package makes.
const netnsPrefix = "emnet-"

// expertPort is where an expert node listens in its namespace when a
// delay proxy forwards to it.
const expertPort = 7000

// ErrNeedRoot: network namespaces need CAP_NET_ADMIN.
var ErrNeedRoot = errors.New("network namespaces need root (CAP_NET_ADMIN)")

// NewNetns makes the bridge (10.231.N.1/24) and returns the harness;
// namespaces are made as children start (Command).
func NewNetns(ctx context.Context, cfg NetnsConfig) (*Netns, error) {
	if os.Geteuid() != 0 {
		return nil, ErrNeedRoot
	}
	for _, tool := range []string{"ip", "tc"} {
		if _, err := exec.LookPath(tool); err != nil {
			return nil, fmt.Errorf("%s not found: install iproute2: %w", tool, err)
		}
	}
	switch cfg.Emulation {
	case "":
		cfg.Emulation = "auto"
	case "auto", "netem", "proxy":
	default:
		return nil, fmt.Errorf("--emulation %q: want auto, netem or proxy", cfg.Emulation)
	}
	if cfg.Link.Delay < 0 || cfg.Link.Gbit < 0 {
		return nil, errors.New("the link's delay and rate must not be negative")
	}
	n := &Netns{cfg: cfg, owner: os.Getpid()}
	n.mu.nodes = map[string]*nsNode{}
	CleanStaleNetns(ctx, cfg.Log)
	start := 20 + n.owner%200
	for i := range 230 {
		s := 20 + (start-20+i)%230
		name := fmt.Sprintf("emb%d", s)
		if n.run(ctx, "ip", "link", "add", name, "type", "bridge") == nil {
			n.subnet, n.bridge = s, name
			break
		}
	}
	if n.bridge == "" {
		return nil, errors.New("netns: no free bridge name emb20-emb249")
	}
	n.host = fmt.Sprintf("10.231.%d.1", n.subnet)
	for _, args := range [][]string{
		{"ip", "link", "set", "dev", n.bridge, "alias", n.alias()},
		// A bridge whose address is not set takes the lowest of its
		// ports' as they join: a namespace that resolved the host's
		// address before a later veth with a lower one joined sends to
		// a MAC the bridge no longer owns, and its connection to etcd
		// times out (an expert node exited before it was ready). A set
		// address stays (a locally administered one, per subnet).
		{"ip", "link", "set", "dev", n.bridge, "address", n.bridgeMAC()},
		{"ip", "addr", "add", n.host + "/24", "dev", n.bridge},
		{"ip", "link", "set", n.bridge, "up"},
	} {
		if err := n.run(ctx, args...); err != nil {
			n.Close()
			return nil, err
		}
	}
	n.mode = cfg.Emulation
	if n.mode == "auto" {
		// Does the kernel have netem? Try it on the bridge.
		n.mode = "proxy"
		if n.run(ctx, "tc", "qdisc", "add", "dev", n.bridge, "root", "netem", "delay", "1us") == nil {
			n.run(ctx, "tc", "qdisc", "del", "dev", n.bridge, "root")
			n.mode = "netem"
		}
	}
	return n, nil
}

func (n *Netns) alias() string { return fmt.Sprintf("%s%d", netnsPrefix, n.owner) }

// bridgeMAC is the bridge's fixed, locally administered address.
func (n *Netns) bridgeMAC() string { return fmt.Sprintf("02:e3:6d:00:%02x:01", n.subnet) }

// Mode is how latency is emulated: netem or proxy.
func (n *Netns) Mode() string { return n.mode }

// Host is this host's address on the bridge.
func (n *Netns) Host() string { return n.host }

// IP is a child's address (empty before the child started).
func (n *Netns) IP(child string) string {
	n.mu.Lock()
	defer n.mu.Unlock()
	if nd := n.mu.nodes[child]; nd != nil {
		return nd.ip
	}
	return ""
}

// Command puts the child in its namespace (made on first use): loopback
// addresses in --listen, --addr and --ops-listen become the namespace's;
// in proxy mode an expert node listens on a fixed port and advertises
// its delay proxy.
func (n *Netns) Command(child, role string, argv []string) ([]string, error) {
	nd, err := n.node(context.Background(), child, role)
	if err != nil {
		return nil, err
	}
	out := []string{"ip", "netns", "exec", nd.ns}
	for i := 0; i < len(argv); i++ {
		a := argv[i]
		out = append(out, a)
		if i+1 >= len(argv) {
			continue
		}
		switch a {
		case "--listen", "--addr", "--ops-listen":
			v := argv[i+1]
			if strings.HasPrefix(v, "127.0.0.1:") {
				v = nd.ip + strings.TrimPrefix(v, "127.0.0.1")
			}
			if a == "--listen" && nd.proxy != "" {
				v = fmt.Sprintf("%s:%d", nd.ip, expertPort)
			}
			out = append(out, v)
			i++
		}
	}
	if nd.proxy != "" {
		out = append(out, "--advertise-addr", nd.proxy)
	}
	return out, nil
}

// node returns child's namespace, making it: namespace, veth pair (one
// end in the namespace with the next address, the other on the bridge),
// loopback up, and the link's qdisc on both ends.
func (n *Netns) node(ctx context.Context, child, role string) (*nsNode, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.mu.closed {
		return nil, errors.New("netns: closed")
	}
	if nd := n.mu.nodes[child]; nd != nil {
		return nd, nil
	}
	k := len(n.mu.nodes)
	if k > 250 {
		return nil, errors.New("netns: more than 250 nodes")
	}
	nd := &nsNode{
		ns:       fmt.Sprintf("%s%d-%d-%s", netnsPrefix, n.owner, n.subnet, child),
		ip:       fmt.Sprintf("10.231.%d.%d", n.subnet, k+2),
		hostVeth: fmt.Sprintf("em%dh%d", n.subnet, k),
	}
	inner := fmt.Sprintf("em%dc%d", n.subnet, k)
	in := func(args ...string) []string { return append([]string{"ip", "netns", "exec", nd.ns}, args...) }
	steps := [][]string{
		{"ip", "netns", "add", nd.ns},
		{"ip", "link", "add", nd.hostVeth, "type", "veth", "peer", "name", inner},
		{"ip", "link", "set", inner, "netns", nd.ns},
		{"ip", "link", "set", nd.hostVeth, "master", n.bridge},
		{"ip", "link", "set", nd.hostVeth, "up"},
		in("ip", "addr", "add", nd.ip+"/24", "dev", inner),
		in("ip", "link", "set", inner, "up"),
		in("ip", "link", "set", "lo", "up"),
	}
	for _, q := range n.qdisc() {
		steps = append(steps, append([]string{"tc", "qdisc", "add", "dev", nd.hostVeth, "root"}, q...))
		steps = append(steps, in(append([]string{"tc", "qdisc", "add", "dev", inner, "root"}, q...)...))
	}
	for _, s := range steps {
		if err := n.run(ctx, s...); err != nil {
			n.run(ctx, "ip", "netns", "del", nd.ns)
			n.run(ctx, "ip", "link", "del", nd.hostVeth)
			return nil, fmt.Errorf("netns for %s: %w", child, err)
		}
	}
	if n.mode == "proxy" && role == "expert" && n.cfg.Link.Delay > 0 {
		p, err := startDelayProxy(n.host+":0", fmt.Sprintf("%s:%d", nd.ip, expertPort), n.cfg.Link.Delay)
		if err != nil {
			n.run(ctx, "ip", "netns", "del", nd.ns)
			return nil, fmt.Errorf("delay proxy for %s: %w", child, err)
		}
		n.mu.proxies = append(n.mu.proxies, p)
		nd.proxy = p.Addr()
	}
	n.mu.nodes[child] = nd
	return nd, nil
}

// qdisc is the tc qdisc (after "root") each veth end gets: netem with half
// the one-way delay per end (a packet crosses two ends node to node) and
// the rate; in proxy mode tbf for the rate alone.
func (n *Netns) qdisc() [][]string {
	l := n.cfg.Link
	rate := fmt.Sprintf("%gmbit", l.Gbit*1000)
	if n.mode == "netem" {
		if l.Delay == 0 && l.Gbit == 0 {
			return nil
		}
		q := []string{"netem", "delay", fmt.Sprintf("%dus", (l.Delay / 2).Microseconds()), "limit", "100000"}
		if l.Gbit > 0 {
			q = append(q, "rate", rate)
		}
		return [][]string{q}
	}
	if l.Gbit == 0 {
		return nil
	}
	// Burst: at least a 64 KB GSO segment (else tbf drops it), and a
	// millisecond at the rate.
	burst := max(int(l.Gbit*1e9/8/1000), 256<<10)
	return [][]string{{"tbf", "rate", rate, "burst", strconv.Itoa(burst), "latency", "50ms"}}
}

// Exec runs a command inside child's namespace (tests, probes).
func (n *Netns) Exec(ctx context.Context, child string, argv ...string) ([]byte, error) {
	nd, err := n.node(ctx, child, "")
	if err != nil {
		return nil, err
	}
	cmd := exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", nd.ns}, argv...)...)
	return cmd.CombinedOutput()
}

// Close stops the delay proxies and deletes every namespace, veth and the
// bridge. Stop the children first (Cluster.Close): a namespace outlives
// its name while a process runs in it. Safe to call more than once.
func (n *Netns) Close() error {
	n.mu.Lock()
	if n.mu.closed {
		n.mu.Unlock()
		return nil
	}
	n.mu.closed = true
	nodes, proxies := n.mu.nodes, n.mu.proxies
	n.mu.Unlock()
	for _, p := range proxies {
		p.Close()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var errs []error
	for _, nd := range nodes {
		// Deleting the namespace destroys the veth end in it, and with
		// it the pair.
		if err := n.run(ctx, "ip", "netns", "del", nd.ns); err != nil {
			errs = append(errs, err)
		}
		n.run(ctx, "ip", "link", "del", nd.hostVeth) // gone already, normally
	}
	if n.bridge != "" {
		if err := n.run(ctx, "ip", "link", "del", n.bridge); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// run runs one command, bounded; its error carries the output.
func (n *Netns) run(ctx context.Context, args ...string) error {
	return runCmd(ctx, n.cfg.Log, args...)
}

func runCmd(ctx context.Context, log io.Writer, args ...string) error {
	ctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	if log != nil {
		fmt.Fprintf(log, "[netns] %s\n", strings.Join(args, " "))
	}
	out, err := exec.CommandContext(ctx, args[0], args[1:]...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s: %v: %s", strings.Join(args, " "), err, bytes.TrimSpace(out))
	}
	return nil
}

// CleanStaleNetns deletes the namespaces and bridges of harnesses whose
// process is gone (killed before Close).
func CleanStaleNetns(ctx context.Context, log io.Writer) {
	out, _ := exec.CommandContext(ctx, "ip", "netns", "list").Output()
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		if len(f) == 0 || !strings.HasPrefix(f[0], netnsPrefix) {
			continue
		}
		if pid, ok := ownerPid(strings.TrimPrefix(f[0], netnsPrefix)); ok && !alive(pid) {
			runCmd(ctx, log, "ip", "netns", "del", f[0])
		}
	}
	out, _ = exec.CommandContext(ctx, "ip", "-o", "link", "show", "type", "bridge").Output()
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		name := strings.TrimSuffix(f[1], ":")
		i := strings.Index(line, "alias "+netnsPrefix)
		if !strings.HasPrefix(name, "emb") || i < 0 {
			continue
		}
		rest := strings.Fields(line[i+len("alias "+netnsPrefix):])
		if len(rest) == 0 {
			continue
		}
		if pid, err := strconv.Atoi(rest[0]); err == nil && !alive(pid) {
			runCmd(ctx, log, "ip", "link", "del", name)
		}
	}
}

func ownerPid(s string) (int, bool) {
	p, _, ok := strings.Cut(s, "-")
	if !ok {
		return 0, false
	}
	pid, err := strconv.Atoi(p)
	return pid, err == nil
}

func alive(pid int) bool {
	return syscall.Kill(pid, 0) == nil || errors.Is(syscall.Kill(pid, 0), syscall.EPERM)
}
