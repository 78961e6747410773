package cli

import (
	"io"
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
