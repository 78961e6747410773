package cli

import (
	"context"
	"flag"
	"fmt"
	"io"
	"strings"

	"github.com/expertmesh/expertmesh/attnnode"
	"github.com/expertmesh/expertmesh/coordinator"
)

// addCoordinatorFlags binds the coordinator's flags to cfg.
func addCoordinatorFlags(fs *flag.FlagSet, cfg *coordinator.Config) {
	fs.StringVar(&cfg.ModelDir, "model", "", "checkpoint directory in HF layout (required)")
	fs.StringVar(&cfg.ModelName, "model-name", "", "model id served by /v1/models (default: the model directory's name)")
	fs.StringVar(&cfg.Addr, "addr", cfg.Addr, "HTTP listen address (port 0 picks one)")
	fs.IntVar(&cfg.StepTokenBudget, "step-tokens", cfg.StepTokenBudget, "tokens per step per attention node; long prompts are prefilled in chunks of what decodes leave")
	fs.IntVar(&cfg.MaxRunningPerNode, "max-running", cfg.MaxRunningPerNode, "sequences one attention node runs at once")
	fs.IntVar(&cfg.MaxWaiting, "max-waiting", cfg.MaxWaiting, "requests waiting for a node before new ones get 429")
	fs.DurationVar(&cfg.RetryAfter, "retry-after", cfg.RetryAfter, "Retry-After of 429 and 503 answers")
	fs.DurationVar(&cfg.RequestTimeout, "request-timeout", cfg.RequestTimeout, "end-to-end limit per request (0: none)")
	fs.DurationVar(&cfg.StepTimeout, "step-timeout", cfg.StepTimeout, "limit per attention-node step; beyond it the node counts as failed")
}

// serveCoordinator starts a coordinator on nodes, prints the URL once every
// node answered, and serves until ctx ends or serving fails.
func serveCoordinator(ctx context.Context, cfg coordinator.Config, nodes map[string]coordinator.AttentionNode, stdout io.Writer) error {
	c, err := coordinator.Start(ctx, cfg, nodes)
	if err != nil {
		return err
	}
	defer c.Close()
	select {
	case <-c.Ready():
	case err := <-c.Err():
		return err
	case <-ctx.Done():
		return nil
	}
	fmt.Fprintf(stdout, "expertmesh listening on http://%s\n", c.Addr())
	select {
	case err := <-c.Err():
		return err
	case <-ctx.Done():
		return nil
	}
}

// runServe is `expertmesh serve`: the whole model in one process, an
// in-process attention node with local experts behind the coordinator's
// HTTP API, no gRPC. It is the baseline the cluster is compared with.
func runServe(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("serve", stderr)
	cfg := coordinator.DefaultConfig()
	addCoordinatorFlags(fs, &cfg)
	nc := attnnode.DefaultConfig()
	fs.IntVar(&nc.Threads, "threads", 0, "compute threads (0: all cores)")
	cacheMB := fs.Int64("cache-mb", nc.CacheBytes>>20, "latent cache size in MiB")
	fs.IntVar(&nc.BlockSize, "block-size", nc.BlockSize, "tokens per cache block")
	fs.StringVar(&nc.Quantize, "quantize", "", "convert weights at load: q8")
	if err := parse(fs, args); err != nil {
		return err
	}
	if err := cfg.Validate(); err != nil {
		return err
	}
	nc.ModelDir, nc.NodeID, nc.CacheBytes = cfg.ModelDir, "serve", *cacheMB<<20
	nc.MaxStepTokens = max(nc.MaxStepTokens, cfg.StepTokenBudget)
	nc.ListenAddr = "" // in-process: no gRPC
	node, err := attnnode.Start(ctx, nc)
	if err != nil {
		return err
	}
	defer node.Close() // after the coordinator's Close (deferred later, runs first)
	return serveCoordinator(ctx, cfg, map[string]coordinator.AttentionNode{"serve": node}, stdout)
}

// runCoordinator is `expertmesh coordinator`: the HTTP front door driving
// attention nodes over gRPC.
func runCoordinator(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("coordinator", stderr)
	cfg := coordinator.DefaultConfig()
	addCoordinatorFlags(fs, &cfg)
	attn := fs.String("attn", "", "attention node gRPC addresses, comma separated (required)")
	if err := parse(fs, args); err != nil {
		return err
	}
	if err := cfg.Validate(); err != nil {
		return err
	}
	var addrs []string
	for _, a := range strings.Split(*attn, ",") {
		if a = strings.TrimSpace(a); a != "" {
			addrs = append(addrs, a)
		}
	}
	if len(addrs) == 0 {
		return fmt.Errorf("--attn: at least one attention node address is required")
	}
	nodes := map[string]coordinator.AttentionNode{}
	for _, a := range addrs {
		cl, err := attnnode.Dial(ctx, a)
		if err != nil {
			return fmt.Errorf("--attn %s: %w", a, err)
		}
		defer cl.Close()
		nodes[a] = cl
	}
	return serveCoordinator(ctx, cfg, nodes, stdout)
}
