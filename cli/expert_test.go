package cli

import (
	"bytes"
	"context"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/expertmesh/expertmesh/internal/rpc"
	"github.com/expertmesh/expertmesh/internal/wire"
	"github.com/expertmesh/expertmesh/model"
	meshpb "github.com/expertmesh/expertmesh/proto"
)

// expertOutput is a bytes.Buffer a command writes while the test reads.
type expertOutput struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *expertOutput) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *expertOutput) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// awaitExpertOutput waits up to 30 s for re to match what buf received.
func awaitExpertOutput(t *testing.T, buf *expertOutput, re *regexp.Regexp) []string {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		if m := re.FindStringSubmatch(buf.String()); m != nil {
			return m
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Fatalf("no %q in:\n%s", re, buf.String())
	return nil
}

func expertHTTPGet(t *testing.T, url string) (int, string) {
	t.Helper()
	c := &http.Client{Timeout: 10 * time.Second}
	resp, err := c.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, string(b)
}

// TestExpertCommand runs `expertmesh expert` in process: it serves, its
// ops endpoint exposes the node's metrics, and cancelling its context (as
// SIGTERM does) drains and stops it.
func TestExpertCommand(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "m")
	p, _ := model.IsPreset("tiny-v2")
	if err := model.GenerateCheckpoint(dir, p, model.GenOptions{Seed: 1}); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var stdout, stderr expertOutput
	done := make(chan error, 1)
	go func() {
		done <- runExpert(ctx, []string{"--model", dir, "--listen", "127.0.0.1:0", "--experts", "1:0-9",
			"--threads", "1", "--ops-listen", "127.0.0.1:0", "--drain-timeout", "20s"}, &stdout, &stderr)
	}()
	m := awaitExpertOutput(t, &stdout, regexp.MustCompile(`expert node (\S+) listening on (\S+)\n`))
	id, addr := m[1], m[2]
	if id != "expert@"+addr {
		t.Errorf("node id %q with --listen port 0, want expert@%s", id, addr)
	}
	opsAddr := awaitExpertOutput(t, &stderr, regexp.MustCompile(`ops endpoint on http://(\S+)\n`))[1]

	cc, err := rpc.Dial(addr)
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	st, err := meshpb.NewExpertServiceClient(cc).Dispatch(ctx)
	if err != nil {
		t.Fatal(err)
	}
	x := make([]float32, 64)
	x[0] = 1
	if err := st.Send(&meshpb.DispatchRequest{Id: 1, Layer: 1, Hidden: wire.F32Matrix(x, 1, 64), K: 1, ExpertIds: []int32{3}, GateWeights: []float32{1}}); err != nil {
		t.Fatal(err)
	}
	if r, err := st.Recv(); err != nil || r.Code != 0 {
		t.Fatalf("dispatch: %v %v", r, err)
	}
	st.CloseSend()

	if code, body := expertHTTPGet(t, "http://"+opsAddr+"/readyz"); code != http.StatusOK {
		t.Errorf("/readyz: %d %s", code, body)
	}
	code, body := expertHTTPGet(t, "http://"+opsAddr+"/metrics")
	if code != http.StatusOK {
		t.Fatalf("/metrics: %d", code)
	}
	for _, want := range []string{
		`expertmesh_expert_dispatch_requests_total{code="OK"} 1`,
		`expertmesh_expert_rows_total{layer="1"} 1`,
		`expertmesh_expert_experts_held 10`,
		`expertmesh_expert_compute_seconds_count 1`,
	} {
		if !strings.Contains(body, want+"\n") {
			t.Errorf("/metrics lacks %q", want)
		}
	}

	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("expert command after cancel: %v\n%s", err, stderr.String())
		}
	case <-time.After(20 * time.Second):
		t.Fatal("expert command still running 20 s after cancel")
	}
	if !strings.Contains(stderr.String(), "draining") {
		t.Errorf("no drain in the log:\n%s", stderr.String())
	}
}

// TestExpertDefaultNodeID: with a fixed port and no --node-id, the node
// is named by host, role and port.
func TestExpertDefaultNodeID(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "m")
	p, _ := model.IsPreset("tiny-v2")
	if err := model.GenerateCheckpoint(dir, p, model.GenOptions{Seed: 1}); err != nil {
		t.Fatal(err)
	}
	// A free port: listen, note it, close. Another process may take it
	// meanwhile; the test then fails to start, not wrongly passes.
	port := expertFreePort(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var stdout, stderr expertOutput
	done := make(chan error, 1)
	go func() {
		done <- runExpert(ctx, []string{"--model", dir, "--listen", "127.0.0.1:" + port, "--experts", "", "--threads", "1"}, &stdout, &stderr)
	}()
	m := awaitExpertOutput(t, &stdout, regexp.MustCompile(`expert node (\S+) listening on`))
	if !strings.HasSuffix(m[1], "-expert-"+port) {
		t.Errorf("default node id %q, want HOST-expert-%s", m[1], port)
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("expert command still running 20 s after cancel")
	}
}

// expertFreePort returns a loopback port that was free a moment ago.
func expertFreePort(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	_, port, _ := net.SplitHostPort(l.Addr().String())
	return port
}
