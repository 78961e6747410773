package sweep

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/expertmesh/expertmesh/bench"
	"github.com/expertmesh/expertmesh/model"
)

// TestStartFailureRetried: a point whose cluster fails to start (here
// every expert node exits at once, saying why on stderr) is tried
// StartAttempts times, each failure kept with the child's own words, and
// the sweep goes on; a failure once the cluster runs is not retried.
func TestStartFailureRetried(t *testing.T) {
	dir := t.TempDir()
	p, _ := model.IsPreset("tiny-v2")
	b, _ := json.Marshal(p.Config)
	if err := os.WriteFile(filepath.Join(dir, "config.json"), b, 0o644); err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "fake-expertmesh")
	script := "#!/bin/sh\necho 'expertmesh expert: --etcd: controlplane: etcd unavailable' >&2\nexit 1\n"
	if err := os.WriteFile(bin, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	links, _ := ParseLinks("loopback", 0)
	var log bytes.Buffer
	cfg := Config{Binary: bin, ModelDir: dir, ExpertNodes: []int{1, 2}, AttnNodes: []int{1}, MicroBatches: []int{1},
		Concurrency: []int{1}, Links: links, StartAttempts: 3, Bench: bench.DefaultConfig(),
		ResultDir: filepath.Join(dir, "out"), Log: &log}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	res, err := Run(ctx, cfg)
	if err != nil {
		t.Fatalf("%v\n%s", err, log.String())
	}
	if len(res.Points) != 2 {
		t.Fatalf("%d points, want 2 (the sweep goes on after a point fails)", len(res.Points))
	}
	for _, p := range res.Points {
		if p.Attempts != 3 || len(p.StartErrors) != 3 || p.Error != p.StartErrors[2] {
			t.Errorf("e%d: %d attempts, start errors %q, error %q; want 3, 3, the last", p.ExpertNodes, p.Attempts, p.StartErrors, p.Error)
		}
		for _, e := range p.StartErrors {
			if !strings.Contains(e, "exited before it was ready") || !strings.Contains(e, "etcd unavailable") {
				t.Errorf("start error %q does not quote the child's stderr", e)
			}
		}
	}
	if n := strings.Count(log.String(), "failed to start, trying again"); n != 4 {
		t.Errorf("%d retries logged, want 4:\n%s", n, log.String())
	}

	// Only start failures are tried again.
	var q Point
	calls := 0
	measured := errors.New("bench: 3 of 8 requests failed")
	if err := runAttempts(ctx, Config{}, &log, func() error { calls++; return measured }, &q); !errors.Is(err, measured) || calls != 1 || q.Attempts != 1 || q.StartErrors != nil {
		t.Errorf("a failure after the start: %v, %d calls, %+v", err, calls, q)
	}
	q, calls = Point{}, 0
	if err := runAttempts(ctx, Config{}, &log, func() error {
		calls++
		if calls == 1 {
			return &startError{errors.New("expert-3 exited before it was ready")}
		}
		return nil
	}, &q); err != nil || q.Attempts != 2 || len(q.StartErrors) != 1 {
		t.Errorf("a start that succeeds the second time (default 2 attempts): %v, %+v", err, q)
	}
}
