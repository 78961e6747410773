package localcluster

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestStartErrorQuotesStderr: a child that exits before it is ready
// fails Start with its last stderr lines in the error, also when the
// cluster's log is discarded (a sweep run quietly), and the lines before
// those are not quoted.
func TestStartErrorQuotesStderr(t *testing.T) {
	dir := t.TempDir()
	bin := filepath.Join(dir, "fake-expertmesh")
	script := "#!/bin/sh\nfor i in 1 2 3 4 5; do echo \"noise $i\" >&2; done\necho 'expertmesh expert: --etcd 10.0.0.1:1: etcd unavailable' >&2\nexit 1\n"
	if err := os.WriteFile(bin, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	cfg := DefaultConfig()
	cfg.Binary, cfg.ModelDir, cfg.DataDir = bin, dir, filepath.Join(dir, "etcd")
	cfg.Addr, cfg.ExpertNodes, cfg.NoRestart, cfg.Log = "127.0.0.1:0", 1, true, nil
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	c, err := Start(ctx, cfg)
	if err == nil {
		c.Close()
		t.Fatal("a cluster of children that exit at once started")
	}
	msg := err.Error()
	for _, want := range []string{"exited before it was ready: exit status 1", "noise 4 | noise 5 | expertmesh expert: --etcd 10.0.0.1:1: etcd unavailable"} {
		if !strings.Contains(msg, want) {
			t.Errorf("error %q lacks %q", msg, want)
		}
	}
	if strings.Contains(msg, "noise 3") {
		t.Errorf("error %q quotes more than the last %d lines", msg, stderrLines)
	}
}
