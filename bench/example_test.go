package bench_test

import (
	"context"
	"fmt"
	"os"

	"github.com/expertmesh/expertmesh/bench"
)

// A run of 100 random prompts, 8 at a time, against a local server; the
// summary goes to stdout and the JSON and HTML report to results/.
func Example() {
	cfg := bench.DefaultConfig()
	cfg.BaseURL = "http://127.0.0.1:8080"
	cfg.NumPrompts = 100
	cfg.MaxConcurrency = 8
	cfg.RandomInputLen, cfg.RandomOutputLen = 256, 64
	cfg.Log = os.Stderr
	res, err := bench.Run(context.Background(), cfg)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return
	}
	bench.WriteSummary(os.Stdout, res)
	if _, _, err := bench.Save(res, "results", ""); err != nil {
		fmt.Fprintln(os.Stderr, err)
	}
}
