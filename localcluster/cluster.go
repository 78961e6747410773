// Package cluster launches a whole expertmesh cluster on one machine as
// separate OS processes of the expertmesh binary: E expert nodes, A
// attention nodes and a coordinator, all on loopback. It is what
// `expertmesh up` runs, and what end-to-end tests start.
//
// Start order follows the data path backwards: expert nodes first (their
// addresses go into the placement), then attention nodes (given the
// placement), then the coordinator (given the attention nodes). Every child
// announces readiness with one stdout line ending in its address.
package localcluster

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/expertmesh/expertmesh/model"
	"github.com/expertmesh/expertmesh/placement"
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
	// ExtraCoordinatorArgs are appended to the coordinator's flags.
	ExtraCoordinatorArgs []string
	// Log receives every child's output, prefixed with its name.
	Log io.Writer
	// ReadyTimeout bounds the wait for each child's ready line.
	ReadyTimeout time.Duration
}

// DefaultConfig is one attention node and three expert nodes on the
// default tiny-v2 model.
func DefaultConfig() Config {
	return Config{Preset: "tiny-v2", AttnNodes: 1, ExpertNodes: 3, Addr: "127.0.0.1:8080", ExpertThreads: 1, ReadyTimeout: 2 * time.Minute}
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
	}
	return nil
}

// Cluster is a running set of child processes.
type Cluster struct {
	URL   string
	Model string

	mu       sync.Mutex
	children []*child
	failed   chan error // first unexpected child exit
	closing  bool
}

type child struct {
	name string
	cmd  *exec.Cmd
	addr string
	done chan struct{}
	err  error
}

// Start launches the cluster and returns once every process is ready. On
// failure every child already started is stopped.
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
	dir, err := EnsureModel(cfg)
	if err != nil {
		return nil, err
	}
	mc, err := model.LoadConfig(dir)
	if err != nil {
		return nil, err
	}
	c := &Cluster{Model: dir, failed: make(chan error, 1)}
	if err := c.launch(ctx, cfg, dir, mc); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

func (c *Cluster) launch(ctx context.Context, cfg Config, dir string, mc *model.Config) error {
	shape := placement.ShapeOf(mc)
	names := make([]string, cfg.ExpertNodes)
	for i := range names {
		names[i] = fmt.Sprintf("expert-%d", i)
	}
	plan, err := placement.Even(shape, names, 0)
	if err != nil {
		return err
	}
	var specs []string
	for i, name := range names {
		ch, err := c.spawn(ctx, cfg, name, "expert", "--model", dir, "--listen", "127.0.0.1:0",
			"--experts", plan.Spec(name), "--node-id", name, "--threads", strconv.Itoa(cfg.ExpertThreads))
		if err != nil {
			return err
		}
		specs = append(specs, ch.addr+"="+plan.Spec(names[i]))
	}
	var attn []string
	for i := range cfg.AttnNodes {
		name := fmt.Sprintf("attn-%d", i)
		ch, err := c.spawn(ctx, cfg, name, "attn", "--model", dir, "--listen", "127.0.0.1:0",
			"--placement", strings.Join(specs, ";"), "--node-id", name, "--threads", strconv.Itoa(cfg.AttnThreads))
		if err != nil {
			return err
		}
		attn = append(attn, ch.addr)
	}
	args := append([]string{"--model", dir, "--addr", cfg.Addr, "--attn", strings.Join(attn, ",")}, cfg.ExtraCoordinatorArgs...)
	ch, err := c.spawn(ctx, cfg, "coordinator", "coordinator", args...)
	if err != nil {
		return err
	}
	c.URL = ch.addr
	return nil
}

// spawn starts one child and waits for its ready line.
func (c *Cluster) spawn(ctx context.Context, cfg Config, name, role string, args ...string) (*child, error) {
	cmd := exec.Command(cfg.Binary, append([]string{role}, args...)...)
	setParentDeathSignal(cmd)
	cmd.Stderr = &prefixWriter{w: cfg.Log, prefix: "[" + name + "] "}
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	ch := &child{name: name, cmd: cmd, done: make(chan struct{})}
	ready := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(out)
		announced := false
		for sc.Scan() {
			line := sc.Text()
			fmt.Fprintf(cfg.Log, "[%s] %s\n", name, line)
			if !announced && strings.Contains(line, "listening on ") {
				announced = true
				f := strings.Fields(line)
				ready <- f[len(f)-1]
			}
		}
	}()
	go func() {
		ch.err = cmd.Wait()
		close(ch.done)
		c.mu.Lock()
		closing := c.closing
		c.mu.Unlock()
		if !closing {
			select {
			case c.failed <- fmt.Errorf("%s exited: %v", name, ch.err):
			default:
			}
		}
	}()
	c.mu.Lock()
	c.children = append(c.children, ch)
	c.mu.Unlock()
	timer := time.NewTimer(cfg.ReadyTimeout)
	defer timer.Stop()
	select {
	case ch.addr = <-ready:
		return ch, nil
	case <-ch.done:
		return nil, fmt.Errorf("%s exited before it was ready: %v", name, ch.err)
	case <-timer.C:
		return nil, fmt.Errorf("%s not ready after %v", name, cfg.ReadyTimeout)
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// Failed yields the first unexpected child exit.
func (c *Cluster) Failed() <-chan error { return c.failed }

// Children names the running processes with their addresses.
func (c *Cluster) Children() map[string]string {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := map[string]string{}
	for _, ch := range c.children {
		out[ch.name] = ch.addr
	}
	return out
}

// Kill stops one child abruptly (SIGKILL), for failure tests.
func (c *Cluster) Kill(name string) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, ch := range c.children {
		if ch.name == name {
			return ch.cmd.Process.Kill()
		}
	}
	return fmt.Errorf("no child %q", name)
}

// Close stops every child: SIGTERM in reverse start order (coordinator
// first, expert nodes last), then SIGKILL for any still alive after 10 s.
func (c *Cluster) Close() error {
	c.mu.Lock()
	c.closing = true
	children := append([]*child(nil), c.children...)
	c.mu.Unlock()
	for i := len(children) - 1; i >= 0; i-- {
		ch := children[i]
		_ = ch.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-ch.done:
		case <-time.After(10 * time.Second):
			_ = ch.cmd.Process.Kill()
			<-ch.done
		}
	}
	return nil
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
	root := cfg.CacheDir
	if root == "" {
		base, err := os.UserCacheDir()
		if err != nil {
			base = os.TempDir()
		}
		root = filepath.Join(base, "expertmesh")
	}
	dir := filepath.Join(root, p.Name)
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

// prefixWriter prefixes every line written to w.
type prefixWriter struct {
	mu     sync.Mutex
	w      io.Writer
	prefix string
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
		p.buf = p.buf[i+1:]
	}
	return len(b), nil
}
