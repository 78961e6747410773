package cli

import (
	"context"
	"fmt"
	"io"
	"runtime"
	"slices"
	"strconv"
	"time"

	"github.com/expertmesh/expertmesh/attnnode"
	"github.com/expertmesh/expertmesh/internal/wire"
	"github.com/expertmesh/expertmesh/localcluster"
)

// runUp is `expertmesh up`: the whole cluster on this machine, every role
// its own process on loopback, joined through an embedded etcd (or
// --etcd), supervised until Ctrl-C: a child that dies is restarted while
// the others keep serving.
func runUp(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	cfg, quiet, err := upConfig(args, stderr)
	if err != nil {
		return err
	}
	cfg.Log = stderr
	if quiet {
		cfg.Log = io.Discard
	}
	fmt.Fprintf(stderr, "starting: etcd, %d expert node(s), %d attention node(s), coordinator (a new model is generated on first use)\n",
		cfg.ExpertNodes, cfg.AttnNodes)
	c, err := localcluster.Start(ctx, cfg)
	if err != nil {
		return err
	}
	defer c.Close()
	fmt.Fprintf(stdout, "expertmesh is up: coordinator %s, %d attention node(s), %d expert node(s), model %s, etcd %s\n",
		c.URL, cfg.AttnNodes, cfg.ExpertNodes, c.Model, c.EtcdEndpoints)
	for _, ch := range c.Children() {
		if ch.OpsAddr != "" {
			fmt.Fprintf(stdout, "  %-12s %-22s ops http://%s\n", ch.Name, ch.Addr, ch.OpsAddr)
		}
	}
	fmt.Fprintf(stdout, "try:\n  curl -s %s/v1/completions -H 'Content-Type: application/json' -d '{\"prompt\": \"Hello\", \"max_tokens\": 16}'\n", c.URL)
	fmt.Fprintf(stdout, "  expertmesh placement show --etcd %s --model %s\n", c.EtcdEndpoints, c.Model)
	<-ctx.Done()
	fmt.Fprintln(stdout, "stopping")
	return nil
}

// upConfig parses up's flags: its own, and the settings it passes through
// to the roles' command lines.
func upConfig(args []string, stderr io.Writer) (cfg localcluster.Config, quiet bool, err error) {
	fs := newFlags("up", stderr)
	cfg = localcluster.DefaultConfig()
	fs.StringVar(&cfg.ModelDir, "model", "", "checkpoint directory (default: generate --preset into the cache dir)")
	fs.StringVar(&cfg.Preset, "preset", cfg.Preset, "model to generate when --model is not given")
	fs.StringVar(&cfg.CacheDir, "cache-dir", "", "where generated models and the embedded etcd's data are kept (default: the user cache dir)")
	fs.IntVar(&cfg.AttnNodes, "attn-nodes", cfg.AttnNodes, "attention node processes")
	fs.IntVar(&cfg.ExpertNodes, "expert-nodes", cfg.ExpertNodes, "expert node processes")
	fs.StringVar(&cfg.Addr, "addr", cfg.Addr, "coordinator HTTP address")
	fs.IntVar(&cfg.AttnThreads, "attn-threads", 0, "threads per attention node (0: all cores)")
	// Two threads per expert node, where there are two cores: the nodes'
	// shares of a layer differ, and the second thread of the node still
	// computing takes the core the others left. On v2-lite-4l, 1 attention
	// + 3 expert nodes on 2 cores, both under SCHED_BATCH (below), 2
	// threads gave 1.03-1.06x (8 streams) and 1.05-1.08x (32) the output
	// tokens/s of 1.
	fs.IntVar(&cfg.ExpertThreads, "expert-threads", min(2, runtime.NumCPU()), "threads per expert node")
	expertBatch := fs.Bool("expert-sched-batch", true, "run expert nodes under SCHED_BATCH (Linux), so that the requests the attention node sends do not hand its core to the expert node they wake before it has sent the others (every role shares this machine's cores)")
	fs.StringVar(&cfg.Etcd, "etcd", "", "external etcd endpoints host:port[,…] (default: run an embedded member here)")
	fs.StringVar(&cfg.DataDir, "data-dir", "", "the embedded etcd member's data (default: CACHE-DIR/up/etcd)")
	fs.StringVar(&cfg.ClusterName, "cluster", cfg.ClusterName, "cluster name (prefix of every etcd key)")
	fs.DurationVar(&cfg.LeaseTTL, "lease-ttl", 0, "membership lease TTL of every node (0: the roles' default)")
	fs.BoolVar(&cfg.NoRestart, "no-restart", false, "leave a child that dies dead instead of restarting it")
	fs.BoolVar(&cfg.Ops, "ops", cfg.Ops, "give every node an ops endpoint (/healthz, /readyz, /metrics) on a free loopback port")
	q := fs.Bool("quiet", false, "do not print the children's logs")
	// Every role exports traces where these say (the OTEL_* environment
	// reaches the children too).
	tel := addTelemetryFlags(fs)
	// Settings passed through to the roles.
	// kind: 'd' a duration, 'f' a number, otherwise an integer.
	pass := func(dst *[]string, name, usage string, kind byte) {
		fs.Func(name, usage, func(v string) error {
			switch kind {
			case 'd':
				if _, err := time.ParseDuration(v); err != nil {
					return err
				}
			case 'f':
				if _, err := strconv.ParseFloat(v, 64); err != nil {
					return err
				}
			default:
				if _, err := strconv.Atoi(v); err != nil {
					return err
				}
			}
			*dst = append(*dst, "--"+name, v)
			return nil
		})
	}
	passBool := func(dst *[]string, name, usage string) {
		fs.BoolFunc(name, usage, func(v string) error {
			b, err := strconv.ParseBool(v)
			if err != nil {
				return err
			}
			*dst = append(*dst, fmt.Sprintf("--%s=%v", name, b))
			return nil
		})
	}
	for _, f := range []struct {
		name, usage string
		kind        byte
	}{
		{"max-running", "coordinator: sequences one attention node runs at once", 'i'},
		{"max-waiting", "coordinator: requests waiting for a node before new ones get 429", 'i'},
		{"step-tokens", "coordinator: tokens per step per attention node", 'i'},
		{"redundant-experts", "coordinator: extra replicas per MoE layer for the hottest experts", 'i'},
		{"request-timeout", "coordinator: end-to-end limit per request", 'd'},
		{"step-timeout", "coordinator: limit per attention-node step", 'd'},
		{"node-wait", "coordinator: how long requests wait for an attention node while none is usable", 'd'},
		{"retry-after", "coordinator: Retry-After of 429 and 503 answers", 'd'},
		{"rebalance-interval", "coordinator: how often to check whether the observed expert load warrants a new placement (0: never on a schedule)", 'd'},
		{"rebalance-threshold", "coordinator: a scheduled check plans only above this weighted expert imbalance", 'f'},
		{"rebalance-margin", "coordinator: a scheduled check switches only to a plan that cuts the imbalance by at least this fraction", 'f'},
	} {
		pass(&cfg.CoordinatorArgs, f.name, f.usage, f.kind)
	}
	for _, f := range []struct {
		name, usage string
		kind        byte
	}{
		{"cache-mb", "attention nodes: latent cache size in MiB", 'i'},
		{"block-size", "attention nodes: tokens per cache block", 'i'},
		{"micro-batches", "attention nodes: micro-batches per step (default 1 here: every role shares this machine's cores, where ping-pong's second micro-batch costs more CPU than the hop it hides)", 'i'},
		{"dispatch-timeout", "attention nodes: deadline of one dispatch of up to 256 rows", 'd'},
		{"expert-wait", "attention nodes: how long a step waits for some replica of an expert", 'd'},
		{"load-report-interval", "attention nodes: how often each publishes its expert load for the placement controller", 'd'},
		{"load-window", "attention nodes: how far back the published expert load reaches", 'd'},
	} {
		pass(&cfg.AttnArgs, f.name, f.usage, f.kind)
	}
	fs.Func("wire", "attention nodes: activation dtype of dispatches to expert nodes, f32 (exact, the default), bf16 or fp8 (fewer bytes, rounded)", func(v string) error {
		if _, err := wire.ParseDType(v); err != nil {
			return err
		}
		cfg.AttnArgs = append(cfg.AttnArgs, "--wire", v)
		return nil
	})
	fs.Func("dispatch-transport", "attention nodes: what carries dispatches to expert nodes, tcp (the data plane, the default) or grpc", func(v string) error {
		if _, err := attnnode.ParseTransport(v); err != nil {
			return err
		}
		cfg.AttnArgs = append(cfg.AttnArgs, "--dispatch-transport", v)
		return nil
	})
	passBool(&cfg.AttnArgs, "prefix-caching", "attention nodes: share full cache blocks between sequences with the same token prefix (on by default; --prefix-caching=false: off)")
	pass(&cfg.ExpertArgs, "expert-slots", "expert nodes: the most routed experts each may hold (0: any)", 'i')
	if err := parse(fs, args); err != nil {
		return cfg, false, err
	}
	if !slices.Contains(cfg.AttnArgs, "--micro-batches") {
		// Every role runs on this machine: a second micro-batch hides the
		// hop from the pipeline but adds a dispatch's software per MoE
		// layer on the same cores (plan's shared-machine bound). On
		// v2-lite-4l, 1 attention + 3 expert nodes on 2 cores, one
		// micro-batch gave 1.15x (8 streams) and 1.25x (32) the output
		// tokens/s of two. An attention node on its own host keeps 2.
		cfg.AttnArgs = append([]string{"--micro-batches", "1"}, cfg.AttnArgs...)
	}
	// Measured as the threads above: SCHED_BATCH alone gave 1.03-1.05x
	// (8 streams), both 1.08-1.10x (8) and 1.07-1.11x (32) the output
	// tokens/s of neither, at 3-4% less CPU per token.
	if *expertBatch && runtime.GOOS == "linux" {
		cfg.ExpertArgs = append(cfg.ExpertArgs, "--sched-batch")
	}
	for _, dst := range []*[]string{&cfg.CoordinatorArgs, &cfg.AttnArgs, &cfg.ExpertArgs} {
		*dst = append(*dst, tel.args()...)
	}
	return cfg, *q, nil
}
