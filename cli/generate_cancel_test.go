package cli

import (
	"bytes"
	"context"
	"errors"
	"path/filepath"
	"strings"
	"testing"
)

// TestGenerateStopsDuringLoad: generate told to stop (SIGTERM's context)
// while it converts and copies the weights returns the context's error
// and generates nothing, rather than first finishing the load.
func TestGenerateStopsDuringLoad(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "m")
	if _, e, code := run(t, "gen-model", "--preset", "tiny-v2-lite", "--out", dir, "--seed", "2"); code != 0 {
		t.Fatalf("gen-model: %s", e)
	}
	for _, tc := range []struct {
		extra []string
		stage string // where the load stopped
	}{
		{[]string{"--quantize", "q8"}, "converting weights"},
		{[]string{"--weights", "resident"}, "resident weights"},
		{[]string{"--weights", "mmap"}, "warming weights"},
	} {
		extra := tc.extra
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		var out, errb bytes.Buffer
		args := append([]string{"--model", dir, "--prompt-ids", "5,6,7", "--max-tokens", "4"}, extra...)
		err := runGenerate(ctx, args, &out, &errb)
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("%v: err = %v, want context.Canceled", extra, err)
		}
		if !strings.Contains(err.Error(), tc.stage) {
			t.Fatalf("%v: err = %v, want it stopped while %s", extra, err, tc.stage)
		}
		if out.Len() != 0 {
			t.Fatalf("%v: generated %q after being stopped", extra, out.String())
		}
	}
}
