package kernels

import (
	"os"
	"testing"
)

// TestRunBench runs the full machine report when asked:
// go test ./kernels -run RunBench -v -timeout 10m -args -runbench
func TestRunBench(t *testing.T) {
	if !*runBench {
		t.Skip("pass -runbench to run the machine report")
	}
	if err := RunBench(os.Stdout, nil); err != nil {
		t.Fatal(err)
	}
}
