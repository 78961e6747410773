package cli

import (
	"context"
	"fmt"
	"io"
	"log/slog"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/expertmesh/expertmesh/expertnode"
	"github.com/expertmesh/expertmesh/internal/ops"
	"github.com/expertmesh/expertmesh/model"
)

// runExpert runs one expert node until ctx is cancelled (Ctrl-C, SIGTERM).
// The "listening on" line is the readiness signal `up` waits for, so it is
// printed only once the node serves.
func runExpert(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	def := expertnode.DefaultConfig()
	fs := newFlags("expert", stderr)
	modelDir := fs.String("model", "", "checkpoint directory in HF layout (required)")
	listen := fs.String("listen", def.ListenAddr, "gRPC listen address host:port (port 0 picks a free one)")
	experts := fs.String("experts", def.Experts, `experts held: "all", "0-53" (those of every MoE layer), "1:0-53,2:54-107" (per layer), or "" (none until Load)`)
	nodeID := fs.String("node-id", "", "node id in status and logs (default expert@ADDR)")
	threads := fs.Int("threads", def.Threads, "compute threads (0: all cores)")
	maxRows := fs.Int("max-rows", def.MaxRows, "most rows one dispatch may carry")
	opsAddr := fs.String("ops-listen", "", "HTTP address for /healthz, /readyz and /metrics (empty: off)")
	weights := fs.String("weights", "auto", "where compute reads held experts: resident (copied into huge-page memory on load, freed on drop), mmap (through the page cache), or auto (resident when they take at most half the available memory)")
	if err := parse(fs, args); err != nil {
		return err
	}
	cfg := def
	cfg.Weights = model.Residency(*weights)
	cfg.ModelDir, cfg.ListenAddr, cfg.Experts = *modelDir, *listen, *experts
	cfg.NodeID, cfg.Threads, cfg.MaxRows = *nodeID, *threads, *maxRows
	cfg.Logger = slog.New(slog.NewTextHandler(stderr, nil))
	if err := cfg.Validate(); err != nil {
		return err
	}
	node, err := expertnode.Start(ctx, cfg)
	if err != nil {
		return err
	}
	select {
	case <-node.Ready():
	case err := <-node.Err():
		node.Close()
		return err
	case <-ctx.Done():
		return node.Close()
	}
	if *opsAddr != "" {
		o, err := ops.Start(*opsAddr, func() error { return nil }, prometheus.NewRegistry())
		if err != nil {
			node.Close()
			return fmt.Errorf("--ops-listen: %w", err)
		}
		defer o.Close()
		fmt.Fprintf(stderr, "expert node %s ops endpoint on http://%s\n", node.ID(), o.Addr())
	}
	fmt.Fprintf(stdout, "expert node %s listening on %s\n", node.ID(), node.Addr())
	select {
	case err := <-node.Err():
		node.Close()
		return err
	case <-ctx.Done():
		return node.Close()
	}
}
