package controlplane

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/expertmesh/expertmesh/model"
	"github.com/expertmesh/expertmesh/placement"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m,
		// etcd's peer transport (HTTP between the members of a static
		// cluster) leaves connections open after every member closed:
		// embed.Etcd.Close gives peer connections one second to finish
		// and then leaves them. This package uses no net/http itself, so
		// these can only be etcd's; single-member tests have none.
		goleak.IgnoreAnyFunction("net/http.(*persistConn).readLoop"),
		goleak.IgnoreAnyFunction("net/http.(*persistConn).writeLoop"),
		goleak.IgnoreAnyFunction("net/http.(*conn).serve"),
		goleak.IgnoreAnyFunction("net/http.(*connReader).backgroundRead"),
	)
}

// testLogger logs to the test's output when -v is given, else nowhere.
func testLogger(t testing.TB) *slog.Logger {
	if testing.Verbose() {
		return slog.New(slog.NewTextHandler(tWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

type tWriter struct{ t testing.TB }

func (w tWriter) Write(b []byte) (int, error) {
	w.t.Log(string(b[:len(b)-1]))
	return len(b), nil
}

// testCtx bounds a test: every wait in it ends by d.
func testCtx(t testing.TB, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// startEtcd starts a single embedded member in dir serving clientAddr
// ("127.0.0.1:0" picks a port) and waits until it serves. It is closed
// when the test ends unless the test closes it first.
func startEtcd(t testing.TB, ctx context.Context, dir, clientAddr string) *Etcd {
	t.Helper()
	e, err := StartEtcd(ctx, EtcdConfig{Dir: dir, Name: "t", ClientAddr: clientAddr, PeerAddr: "127.0.0.1:0", Logger: testLogger(t)})
	if err != nil {
		t.Fatalf("StartEtcd: %v", err)
	}
	t.Cleanup(func() { e.Close() })
	if err := e.WaitReady(ctx); err != nil {
		t.Fatalf("etcd not ready: %v", err)
	}
	return e
}

// restartablePort returns a free loopback address outside the kernel's
// ephemeral port range, for an etcd that a test stops and starts again on
// the same address: while it is down, no outgoing connection or port-0
// listener of a parallel test can take the port.
func restartablePort(t testing.TB) string {
	t.Helper()
	for range 100 {
		addr := fmt.Sprintf("127.0.0.1:%d", 20000+rand.N(12000))
		if l, err := net.Listen("tcp", addr); err == nil {
			l.Close()
			return addr
		}
	}
	t.Fatal("no free port in 20000-31999")
	return ""
}

// connect opens a store on addr, closed when the test ends.
func connect(t testing.TB, ctx context.Context, addr string) *Store {
	t.Helper()
	s, err := Connect(ctx, Config{Endpoints: []string{addr}, DialTimeout: 2 * time.Second, RequestTimeout: time.Second, Logger: testLogger(t)})
	if err != nil {
		t.Fatalf("Connect: %v", err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// tinyModel writes a config-only checkpoint of the tiny-v2-lite preset
// (64 experts, MoE layers 1 and 2) into a new directory named name;
// extra entries change the config (and so the identity).
func tinyModel(t testing.TB, name string, extra map[string]any) string {
	t.Helper()
	p, _ := model.IsPreset("tiny-v2-lite")
	cfg := maps.Clone(p.Config)
	maps.Copy(cfg, extra)
	dir := filepath.Join(t.TempDir(), name)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	b, err := json.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "config.json"), b, 0o644); err != nil {
		t.Fatal(err)
	}
	return dir
}

func tinyIdentity(t testing.TB) ModelIdentity {
	t.Helper()
	id, err := IdentifyModel(tinyModel(t, "tiny", nil))
	if err != nil {
		t.Fatal(err)
	}
	return id
}

func tinyShape(t testing.TB) placement.Shape {
	t.Helper()
	c, err := model.LoadConfig(tinyModel(t, "shape", nil))
	if err != nil {
		t.Fatal(err)
	}
	return placement.ShapeOf(c)
}

func member(role Role, id string, mi ModelIdentity) Member {
	return Member{ID: id, Role: role, Addr: "127.0.0.1:1" + id, Model: mi, BuildVersion: "test"}
}

// waitFor waits until cond holds, re-checking whenever changed delivers,
// or fails the test when ctx ends.
func waitFor[T any](t testing.TB, ctx context.Context, what string, changed <-chan T, cond func() bool) {
	t.Helper()
	for !cond() {
		select {
		case <-changed:
		case <-ctx.Done():
			t.Fatalf("timed out waiting for %s", what)
		}
	}
}

// waitEvent waits for a registration event of kind.
func waitEvent(t testing.TB, ctx context.Context, r *Registration, kind EventKind) Event {
	t.Helper()
	for {
		select {
		case ev, ok := <-r.Events():
			if !ok {
				t.Fatalf("events closed waiting for %v", kind)
			}
			t.Logf("registration event %v lease %x err %v", ev.Kind, ev.Lease, ev.Err)
			if ev.Kind == kind {
				return ev
			}
		case <-ctx.Done():
			t.Fatalf("timed out waiting for registration event %v", kind)
		}
	}
}
