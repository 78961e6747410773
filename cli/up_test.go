package cli

import (
	"io"
	"runtime"
	"slices"
	"strings"
	"testing"
)

// TestUpPassesSettings: up hands the coordinator's and the nodes' settings
// to the roles' command lines, prefix caching included.
func TestUpPassesSettings(t *testing.T) {
	cfg, quiet, err := upConfig([]string{"--max-running", "12", "--max-waiting", "3", "--request-timeout", "90s",
		"--step-timeout", "1m", "--retry-after", "2s", "--step-tokens", "256", "--cache-mb", "64", "--block-size", "32",
		"--prefix-caching=false", "--micro-batches", "2", "--expert-slots", "10", "--quiet",
		"--rebalance-interval", "30s", "--rebalance-threshold", "1.1", "--rebalance-margin", "0.05",
		"--load-report-interval", "2s", "--load-window", "1m"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		args []string
		want string
	}{
		{cfg.CoordinatorArgs, "--max-running 12 --max-waiting 3 --request-timeout 90s --step-timeout 1m --retry-after 2s --step-tokens 256"},
		{cfg.AttnArgs, "--cache-mb 64 --block-size 32 --prefix-caching=false --micro-batches 2"},
		{cfg.ExpertArgs, "--expert-slots 10"},
	} {
		if got := strings.Join(tt.args, " "); !strings.Contains(got, tt.want) {
			t.Errorf("passed %q, want it to hold %q", got, tt.want)
		}
	}
	if !quiet {
		t.Error("--quiet lost")
	}
	cfg, _, err = upConfig([]string{"--prefix-caching"}, io.Discard)
	if err != nil || !slices.Contains(cfg.AttnArgs, "--prefix-caching=true") {
		t.Errorf("--prefix-caching alone: %v %v", cfg.AttnArgs, err)
	}
	for _, bad := range [][]string{{"--max-running", "many"}, {"--rebalance-threshold", "high"}, {"--load-window", "5"}} {
		if _, _, err := upConfig(bad, io.Discard); err == nil {
			t.Errorf("a bad value passed: %q", bad)
		}
	}
}

// TestUpOneMicroBatchByDefault: up runs attention nodes with one
// micro-batch unless told otherwise (every role shares this machine's
// cores), and an explicit --micro-batches is what the node gets.
func TestUpOneMicroBatchByDefault(t *testing.T) {
	cfg, _, err := upConfig(nil, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(cfg.AttnArgs, " "); !strings.Contains(got, "--micro-batches 1") {
		t.Errorf("attention nodes get %q, want --micro-batches 1", got)
	}
	cfg, _, err = upConfig([]string{"--micro-batches", "2"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(cfg.AttnArgs, " "); strings.Count(got, "--micro-batches") != 1 || !strings.Contains(got, "--micro-batches 2") {
		t.Errorf("--micro-batches 2: attention nodes get %q", got)
	}
}

// TestUpExpertDefaults: up runs expert nodes with two threads (one on a
// single core) and, on Linux, under SCHED_BATCH; both can be set.
func TestUpExpertDefaults(t *testing.T) {
	cfg, _, err := upConfig(nil, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if want := min(2, runtime.NumCPU()); cfg.ExpertThreads != want {
		t.Errorf("expert threads %d by default, want %d", cfg.ExpertThreads, want)
	}
	if got := slices.Contains(cfg.ExpertArgs, "--sched-batch"); got != (runtime.GOOS == "linux") {
		t.Errorf("expert nodes get %q on %s", cfg.ExpertArgs, runtime.GOOS)
	}
	cfg, _, err = upConfig([]string{"--expert-threads", "1", "--expert-sched-batch=false"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.ExpertThreads != 1 || slices.Contains(cfg.ExpertArgs, "--sched-batch") {
		t.Errorf("--expert-threads 1 --expert-sched-batch=false: %d threads, args %q", cfg.ExpertThreads, cfg.ExpertArgs)
	}
}
