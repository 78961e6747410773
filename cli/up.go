package cli

import (
	"context"
	"fmt"
	"io"
	"os"

	"github.com/expertmesh/expertmesh/localcluster"
)

// runUp is `expertmesh up`: the whole cluster as separate processes on
// loopback, until Ctrl-C or a child dies.
func runUp(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("up", stderr)
	cfg := localcluster.DefaultConfig()
	fs.StringVar(&cfg.ModelDir, "model", "", "checkpoint directory (default: generate --preset into the cache dir)")
	fs.StringVar(&cfg.Preset, "preset", cfg.Preset, "model to generate when --model is not given")
	fs.StringVar(&cfg.CacheDir, "cache-dir", "", "where generated models are kept (default: the user cache dir)")
	fs.IntVar(&cfg.AttnNodes, "attn-nodes", cfg.AttnNodes, "attention node processes")
	fs.IntVar(&cfg.ExpertNodes, "expert-nodes", cfg.ExpertNodes, "expert node processes")
	fs.StringVar(&cfg.Addr, "addr", cfg.Addr, "coordinator HTTP address")
	fs.IntVar(&cfg.AttnThreads, "attn-threads", 0, "threads per attention node (0: all cores)")
	fs.IntVar(&cfg.ExpertThreads, "expert-threads", cfg.ExpertThreads, "threads per expert node")
	quiet := fs.Bool("quiet", false, "do not print the children's logs")
	if err := parse(fs, args); err != nil {
		return err
	}
	cfg.Log = stderr
	if *quiet {
		cfg.Log = io.Discard
	}
	c, err := localcluster.Start(ctx, cfg)
	if err != nil {
		return err
	}
	defer c.Close()
	fmt.Fprintf(stdout, "expertmesh is up: coordinator %s, %d attention node(s), %d expert node(s), model %s\n",
		c.URL, cfg.AttnNodes, cfg.ExpertNodes, c.Model)
	fmt.Fprintf(stdout, "try:\n  curl -s %s/v1/completions -H 'Content-Type: application/json' -d '{\"prompt\": \"Hello\", \"max_tokens\": 16}'\n", c.URL)
	select {
	case <-ctx.Done():
		fmt.Fprintln(stdout, "stopping")
		return nil
	case err := <-c.Failed():
		fmt.Fprintln(os.Stderr, "a node died; stopping the cluster")
		return err
	}
}
