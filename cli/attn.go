package cli

import (
	"context"
	"fmt"
	"io"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/expertmesh/expertmesh/attnnode"
	"github.com/expertmesh/expertmesh/internal/ops"
	"github.com/expertmesh/expertmesh/model"
	"github.com/expertmesh/expertmesh/placement"
	meshpb "github.com/expertmesh/expertmesh/proto"
)

// runAttn is `expertmesh attn`: one attention node serving AttentionService.
func runAttn(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("attn", stderr)
	cfg := attnnode.DefaultConfig()
	fs.StringVar(&cfg.ModelDir, "model", "", "checkpoint directory in HF layout (required)")
	fs.StringVar(&cfg.NodeID, "node-id", cfg.NodeID, "node name in logs, traces and Info")
	fs.StringVar(&cfg.ListenAddr, "listen", cfg.ListenAddr, "gRPC listen address (port 0 picks one)")
	fs.IntVar(&cfg.Threads, "threads", 0, "compute threads (0: all cores)")
	cacheMB := fs.Int64("cache-mb", cfg.CacheBytes>>20, "latent cache size in MiB")
	fs.IntVar(&cfg.BlockSize, "block-size", cfg.BlockSize, "tokens per cache block")
	fs.IntVar(&cfg.MicroBatches, "micro-batches", 0, "micro-batches per step (0: 2 with expert nodes, else 1)")
	fs.StringVar(&cfg.Quantize, "quantize", "", "convert weights at load: q8")
	weights := fs.String("weights", "auto", weightsUsage)
	fs.DurationVar(&cfg.DispatchTimeout, "dispatch-timeout", cfg.DispatchTimeout, "deadline of one dispatch of up to 256 rows to an expert node (more rows get proportionally more); a node that misses it is skipped for another replica")
	fs.DurationVar(&cfg.ExpertWait, "expert-wait", cfg.ExpertWait, "how long a step waits for some replica of an expert before it fails with UNAVAILABLE; keep it below the coordinator's --step-timeout")
	opsAddr := fs.String("ops-listen", "", "HTTP address for /healthz, /readyz and /metrics (empty: off)")
	spec := fs.String("placement", "", `expert placement "ADDR=EXPERTS;ADDR=EXPERTS" (EXPERTS: "0-53" or "1:0-53,2:54-107"); empty: all experts in-process`)
	if err := parse(fs, args); err != nil {
		return err
	}
	cfg.CacheBytes = *cacheMB << 20
	var err error
	if cfg.Weights, err = model.ParseResidency(*weights); err != nil {
		return err
	}
	if cfg.ModelDir == "" {
		return fmt.Errorf("--model is required")
	}
	if *spec != "" {
		c, err := model.LoadConfig(cfg.ModelDir)
		if err != nil {
			return err
		}
		t, err := placement.ParseSpec(placement.ShapeOf(c), *spec)
		if err != nil {
			return fmt.Errorf("--placement: %w", err)
		}
		cfg.Placement = placement.NewStatic(t)
	}
	s, err := attnnode.Start(ctx, cfg)
	if err != nil {
		return err
	}
	defer s.Close()
	if *opsAddr != "" {
		reg := prometheus.NewRegistry()
		info := func() *meshpb.NodeInfo { i, _ := s.Info(ctx, 0); return i }
		for _, g := range []struct {
			name, help string
			v          func(*meshpb.NodeInfo) float64
		}{
			{"expertmesh_attn_cache_blocks_total", "latent cache blocks", func(i *meshpb.NodeInfo) float64 { return float64(i.TotalBlocks) }},
			{"expertmesh_attn_cache_blocks_free", "free latent cache blocks", func(i *meshpb.NodeInfo) float64 { return float64(i.FreeBlocks) }},
			{"expertmesh_attn_sequences_active", "sequences holding cache", func(i *meshpb.NodeInfo) float64 { return float64(i.ActiveSequences) }},
		} {
			reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: g.name, Help: g.help}, func() float64 { return g.v(info()) }))
		}
		o, err := ops.Start(*opsAddr, func() error { return nil }, reg)
		if err != nil {
			return fmt.Errorf("--ops-listen: %w", err)
		}
		defer o.Close()
		fmt.Fprintf(stderr, "attention node %s ops endpoint on http://%s\n", cfg.NodeID, o.Addr())
	}
	fmt.Fprintf(stdout, "attention node %s listening on %s\n", cfg.NodeID, s.Addr())
	select {
	case <-ctx.Done():
		return nil
	case err := <-s.Err():
		return err
	}
}
