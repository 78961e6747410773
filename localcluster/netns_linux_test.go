package localcluster

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

// needNetns skips the test unless it can make namespaces: as root, with
// iproute2. In CI (CI set) it never skips: CI runs as root with iproute2
// installed by .ci/run.
func needNetns(t *testing.T) {
	t.Helper()
	_, errIP := exec.LookPath("ip")
	if os.Geteuid() == 0 && errIP == nil {
		return
	}
	if os.Getenv("CI") != "" {
		t.Fatalf("CI must run the network-namespace tests as root with iproute2 (root %v, ip: %v)", os.Geteuid() == 0, errIP)
	}
	t.Skip("network namespaces need root and iproute2")
}

// The helper process: the test binary re-run inside a namespace as an
// echo server or a probing client (see helperCmd).
func TestNetnsHelper(t *testing.T) {
	mode := os.Getenv("NETNS_HELPER")
	if mode == "" {
		t.Skip("only run as a helper process")
	}
	args := flagValues(os.Args)
	switch mode {
	case "echo":
		ln, err := net.Listen("tcp", args["--listen"])
		if err != nil {
			fmt.Println("error", err)
			os.Exit(1)
		}
		fmt.Println("listening on", ln.Addr())
		for {
			c, err := ln.Accept()
			if err != nil {
				os.Exit(0)
			}
			go func() {
				defer c.Close()
				io.Copy(c, c)
			}()
		}
	case "probe":
		c, err := net.DialTimeout("tcp", args["--target"], 5*time.Second)
		if err != nil {
			fmt.Println("error", err)
			os.Exit(1)
		}
		// Round trips of 1 KB, then a bulk transfer one way and back.
		buf := make([]byte, 1024)
		var rtts []time.Duration
		for range 30 {
			s := time.Now()
			c.Write(buf)
			io.ReadFull(c, buf)
			rtts = append(rtts, time.Since(s))
		}
		slices.Sort(rtts)
		bulk, _ := strconv.Atoi(args["--bulk"])
		s := time.Now()
		go func() {
			chunk := make([]byte, 64<<10)
			for sent := 0; sent < bulk; sent += len(chunk) {
				c.Write(chunk)
			}
		}()
		io.ReadFull(c, make([]byte, bulk))
		fmt.Printf("rtt %d bulk %d\n", rtts[len(rtts)/2].Microseconds(), time.Since(s).Microseconds())
		os.Exit(0)
	}
}

func flagValues(args []string) map[string]string {
	out := map[string]string{}
	for i := 0; i+1 < len(args); i++ {
		if strings.HasPrefix(args[i], "--") {
			out[args[i]] = args[i+1]
		}
	}
	return out
}

// helperCmd is the test binary as a helper in mode, with args, wrapped by
// the harness as child (role) would be.
func helperCmd(t *testing.T, n *Netns, child, role, mode string, args ...string) *exec.Cmd {
	t.Helper()
	argv := append([]string{os.Args[0], "-test.run=^TestNetnsHelper$", "-test.short", "--"}, args...)
	argv, err := n.Command(child, role, argv)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env = append(os.Environ(), "NETNS_HELPER="+mode)
	return cmd
}

// TestNetnsLink runs an echo server in one namespace and a probe in
// another: the round trip shows the emulated latency twice (each way),
// a bulk transfer the rate; Close leaves no namespace, veth or bridge.
func TestNetnsLink(t *testing.T) {
	needNetns(t)
	const delay, gbit = 2 * time.Millisecond, 0.2
	ctx := context.Background()
	n, err := NewNetns(ctx, NetnsConfig{Link: LinkSpec{Delay: delay, Gbit: gbit}})
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close()
	t.Logf("emulation: %s", n.Mode())
	srv := helperCmd(t, n, "server", "expert", "echo", "--listen", "127.0.0.1:0")
	out, _ := srv.StdoutPipe()
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { srv.Process.Kill(); srv.Wait() }()
	sc := bufio.NewScanner(out)
	if !sc.Scan() || !strings.HasPrefix(sc.Text(), "listening on ") {
		t.Fatalf("echo server: %q", sc.Text())
	}
	target := strings.TrimPrefix(sc.Text(), "listening on ")
	if got := srv.Args; slices.Contains(got, "--advertise-addr") {
		target = got[slices.Index(got, "--advertise-addr")+1] // the delay proxy
	}
	if !strings.HasPrefix(target, "10.231.") {
		t.Fatalf("the server listens on %s, not its namespace's address", target)
	}
	const bulk = 4 << 20
	probe := helperCmd(t, n, "client", "attn", "probe", "--target", target, "--bulk", strconv.Itoa(bulk))
	res, err := probe.CombinedOutput()
	if err != nil {
		t.Fatalf("probe: %v\n%s", err, res)
	}
	var rttUs, bulkUs int64
	for _, l := range strings.Split(string(res), "\n") {
		if strings.HasPrefix(l, "rtt ") {
			fmt.Sscanf(l, "rtt %d bulk %d", &rttUs, &bulkUs)
		}
	}
	rtt := time.Duration(rttUs) * time.Microsecond
	t.Logf("round trip %v (want about %v), %d bytes out and back in %v", rtt, 2*delay, bulk, time.Duration(bulkUs)*time.Microsecond)
	if rtt < 2*delay*9/10 || rtt > 2*delay+20*time.Millisecond {
		t.Errorf("round trip %v: want about 2 × %v", rtt, delay)
	}
	// Each direction carries bulk bytes at gbit: at least bulk·8/rate.
	secs := float64(bulk*8) / (gbit * 1e9) * 0.9
	least := time.Duration(secs * float64(time.Second))
	if time.Duration(bulkUs)*time.Microsecond < least {
		t.Errorf("bulk transfer in %v: faster than the %v Gbit/s link allows (%v)", time.Duration(bulkUs)*time.Microsecond, gbit, least)
	}
	srv.Process.Kill()
	srv.Wait()
	if err := n.Close(); err != nil {
		t.Fatal(err)
	}
	assertNoTrace(t, n)
}

func assertNoTrace(t *testing.T, n *Netns) {
	t.Helper()
	ns, _ := exec.Command("ip", "netns", "list").Output()
	if strings.Contains(string(ns), fmt.Sprintf("%s%d-%d-", netnsPrefix, n.owner, n.subnet)) {
		t.Errorf("namespaces left after Close:\n%s", ns)
	}
	links, _ := exec.Command("ip", "-o", "link", "show").Output()
	for _, name := range []string{n.bridge + ":", fmt.Sprintf("em%dh", n.subnet)} {
		if strings.Contains(string(links), " "+name) {
			t.Errorf("link %s left after Close", name)
		}
	}
}

// TestNetnsStaleCleanup: namespaces and a bridge of a harness whose
// process died are removed by the next one; a live owner's are kept.
func TestNetnsStaleCleanup(t *testing.T) {
	needNetns(t)
	dead := deadPid(t)
	ctx := context.Background()
	stale := fmt.Sprintf("%s%d-251-x", netnsPrefix, dead)
	live := fmt.Sprintf("%s%d-251-y", netnsPrefix, os.Getpid())
	for _, args := range [][]string{{"ip", "netns", "add", stale}, {"ip", "netns", "add", live},
		{"ip", "link", "add", "emb251", "type", "bridge"}, {"ip", "link", "set", "dev", "emb251", "alias", fmt.Sprintf("%s%d", netnsPrefix, dead)}} {
		if err := runCmd(ctx, nil, args...); err != nil {
			t.Fatal(err)
		}
	}
	defer runCmd(ctx, nil, "ip", "netns", "del", live)
	CleanStaleNetns(ctx, nil)
	ns, _ := exec.Command("ip", "netns", "list").Output()
	if strings.Contains(string(ns), stale) {
		t.Errorf("stale namespace %s kept", stale)
	}
	if !strings.Contains(string(ns), live) {
		t.Errorf("a live harness's namespace %s was removed", live)
	}
	if exec.Command("ip", "link", "show", "emb251").Run() == nil {
		runCmd(ctx, nil, "ip", "link", "del", "emb251")
		t.Errorf("stale bridge emb251 kept")
	}
}

// deadPid is a pid no process has: a child that has exited and been
// reaped.
func deadPid(t *testing.T) int {
	cmd := exec.Command("true")
	if err := cmd.Run(); err != nil {
		t.Fatal(err)
	}
	return cmd.Process.Pid
}

// TestClusterInNetns starts the real cluster with every role in its own
// namespace over emulated links and completes a request through it.
func TestClusterInNetns(t *testing.T) {
	needNetns(t)
	if testing.Short() {
		t.Skip("starts processes")
	}
	n, err := NewNetns(context.Background(), NetnsConfig{Link: LinkSpec{Delay: 200 * time.Microsecond, Gbit: 10}})
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := n.Close(); err != nil {
			t.Error(err)
		}
		assertNoTrace(t, n)
	}()
	cfg := DefaultConfig()
	cfg.Binary, cfg.ModelDir, cfg.AttnNodes, cfg.ExpertNodes, cfg.Addr = binary, modelDir, 1, 2, "127.0.0.1:0"
	cfg.AttnThreads, cfg.ExpertThreads = 1, 1
	cfg.DataDir = t.TempDir()
	cfg.Net = n
	log := &testLog{}
	cfg.Log = log
	c, err := Start(context.Background(), cfg)
	if err != nil {
		t.Fatalf("start: %v\n%s", err, log.b.String())
	}
	defer c.Close()
	if !strings.HasPrefix(c.URL, "http://10.231.") || !strings.HasPrefix(c.EtcdEndpoints, n.Host()+":") {
		t.Fatalf("coordinator %s, etcd %s: not on the bridge", c.URL, c.EtcdEndpoints)
	}
	out := complete(t, c.URL, []int{1, 2, 3, 4}, 8)
	if len(out.Choices) != 1 || out.Usage.CompletionTokens != 8 {
		t.Fatalf("completion %+v", out)
	}
	for _, ch := range c.Children() {
		if ch.Role != "etcd" && !strings.HasPrefix(ch.Addr, "10.231.") {
			t.Errorf("%s announced %s, not its namespace's address", ch.Name, ch.Addr)
		}
	}
	c.Close()
}

// TestNetnsBridgeAddressStays: the bridge keeps its address as nodes
// join (a bridge takes its lowest port's otherwise, and a namespace that
// resolved the host before then loses its connections to it).
func TestNetnsBridgeAddressStays(t *testing.T) {
	needNetns(t)
	ctx := context.Background()
	n, err := NewNetns(ctx, NetnsConfig{Link: LinkSpec{Gbit: 10}})
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close()
	mac := func() string {
		b, err := os.ReadFile("/sys/class/net/" + n.bridge + "/address")
		if err != nil {
			t.Fatal(err)
		}
		return strings.TrimSpace(string(b))
	}
	want := mac()
	if want != n.bridgeMAC() {
		t.Fatalf("bridge address %s, want %s", want, n.bridgeMAC())
	}
	for i := range 8 {
		if _, err := n.Exec(ctx, fmt.Sprintf("node-%d", i), "true"); err != nil {
			t.Fatal(err)
		}
		if got := mac(); got != want {
			t.Fatalf("after %d nodes joined the bridge's address is %s, was %s", i+1, got, want)
		}
	}
}
