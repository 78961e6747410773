package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"time"

	"github.com/expertmesh/expertmesh/controlplane"
	"github.com/expertmesh/expertmesh/expertnode"
	"github.com/expertmesh/expertmesh/internal/ops"
	"github.com/expertmesh/expertmesh/model"
)

// defaultDrainTimeout bounds the drain on SIGTERM. Once the control plane
// has taken the node out of the placement its streams are idle and the
// drain takes milliseconds; the bound is for a node still in use, and
// stays under the 10 s `up` waits before SIGKILL.
const defaultDrainTimeout = 5 * time.Second

// runExpert runs one expert node until ctx is cancelled (Ctrl-C, SIGTERM),
// then drains it (expertnode.Node.Shutdown) for at most --drain-timeout.
// The "listening on" line is the readiness signal `up` waits for, so it is
// printed only once the node serves.
func runExpert(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	def := expertnode.DefaultConfig()
	fs := newFlags("expert", stderr)
	modelDir := fs.String("model", "", "checkpoint directory in HF layout (required)")
	listen := fs.String("listen", def.ListenAddr, "gRPC listen address host:port (port 0 picks a free one)")
	experts := fs.String("experts", def.Experts, `experts held at start, in placement's grammar: "all", "0-53" (those of every MoE layer), "1:0-53,2:54-107" (per layer), or "" (none until Load)`)
	nodeID := fs.String("node-id", "", "stable node id in status, logs and placements (default HOSTNAME-expert-PORT; expert@ADDR when --listen picks the port)")
	threads := fs.Int("threads", def.Threads, "compute threads (0: all cores)")
	maxRows := fs.Int("max-rows", def.MaxRows, "most rows one dispatch may carry")
	opsAddr := fs.String("ops-listen", "", "HTTP address for /healthz, /readyz and /metrics (empty: off)")
	weights := fs.String("weights", "auto", "where compute reads held experts: resident (copied into huge-page memory on load, freed on drop), mmap (through the page cache), or auto (resident when they take at most half the available memory)")
	drainTimeout := fs.Duration("drain-timeout", defaultDrainTimeout, "on SIGTERM or Ctrl-C, how long open dispatch streams may take to answer what they received before the node stops hard")
	if err := parse(fs, args); err != nil {
		return err
	}
	if *drainTimeout < 0 {
		return fmt.Errorf("--drain-timeout %v: want >= 0", *drainTimeout)
	}
	cfg := def
	cfg.Weights = model.Residency(*weights)
	cfg.ModelDir, cfg.ListenAddr, cfg.Experts = *modelDir, *listen, *experts
	cfg.NodeID, cfg.Threads, cfg.MaxRows = *nodeID, *threads, *maxRows
	if cfg.NodeID == "" {
		// With a fixed port the id survives restarts; with port 0 it could
		// not, and the node names itself by its address once listening.
		if port := controlplane.PortOf(cfg.ListenAddr); port != 0 {
			cfg.NodeID = controlplane.DefaultNodeID(controlplane.RoleExpert, port)
		}
	}
	cfg.Logger = slog.New(slog.NewTextHandler(stderr, nil))
	if err := cfg.Validate(); err != nil {
		return err
	}
	node, err := expertnode.Start(ctx, cfg)
	if err != nil {
		return err
	}
	<-node.Ready() // closed before Start returns
	if *opsAddr != "" {
		o, err := ops.Start(*opsAddr, node.Serving, node.Registry())
		if err != nil {
			node.Close()
			return fmt.Errorf("--ops-listen: %w", err)
		}
		// Closed after the drain, so /readyz says why it is not ready
		// meanwhile.
		defer o.Close()
		fmt.Fprintf(stderr, "expert node %s ops endpoint on http://%s\n", node.ID(), o.Addr())
	}
	fmt.Fprintf(stdout, "expert node %s listening on %s\n", node.ID(), node.Addr())
	select {
	case err := <-node.Err():
		// The node failed and stopped itself (err is nil only if it was
		// closed, which nothing here does); Close collects the rest.
		return errors.Join(err, node.Close())
	case <-ctx.Done():
	}
	fmt.Fprintf(stderr, "expert node %s draining (at most %v)\n", node.ID(), *drainTimeout)
	dctx, cancel := context.WithTimeout(context.Background(), *drainTimeout)
	defer cancel()
	if err := node.Shutdown(dctx); err != nil {
		if errors.Is(err, context.DeadlineExceeded) {
			return fmt.Errorf("--drain-timeout %v passed with dispatch streams still busy; they were cut: %w", *drainTimeout, err)
		}
		return err
	}
	return nil
}
