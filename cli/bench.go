package cli

import (
	"context"
	"fmt"
	"io"

	"github.com/expertmesh/expertmesh/kernels"
)

// runBenchKernels is `expertmesh bench-kernels`: this machine's read
// bandwidth and FMA peak, and every kernel's fraction of them, measured in
// one run.
func runBenchKernels(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("bench-kernels", stderr)
	threads := fs.String("threads", "", "thread counts to measure, comma separated (default: 1 and all cores)")
	if err := parse(fs, args); err != nil {
		return err
	}
	var ts []int
	if *threads != "" {
		var err error
		if ts, err = parseIDs(*threads); err != nil {
			return fmt.Errorf("--threads: %v", err)
		}
	}
	return kernels.RunBench(stdout, ts)
}
