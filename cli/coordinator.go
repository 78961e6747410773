package cli

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"time"

	"github.com/expertmesh/expertmesh/attnnode"
	"github.com/expertmesh/expertmesh/controlplane"
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
	fs.DurationVar(&cfg.NodeWait, "node-wait", cfg.NodeWait, "how long requests wait for an attention node while none is usable (one whose lease lapsed re-registers, one that died restarts) before they get 503 (0: at once)")
}

// serveCoordinator starts a coordinator on nodes, prints the URL once an
// attention node answered, and serves until ctx ends (then it drains:
// running requests finish within grace) or serving fails.
func serveCoordinator(ctx context.Context, cfg coordinator.Config, nodes map[string]coordinator.AttentionNode, grace time.Duration, stdout, stderr io.Writer) error {
	c, err := coordinator.Start(ctx, cfg, nodes)
	if err != nil {
		return err
	}
	return runCoordinatorUntil(ctx, c, grace, nil, stdout, stderr)
}

// runCoordinatorUntil announces c once ready and serves until ctx ends or
// a fatal error (serving, or fatal from the caller's channel); on ctx's
// end it drains for at most grace.
func runCoordinatorUntil(ctx context.Context, c *coordinator.Coordinator, grace time.Duration, fatal <-chan error, stdout, stderr io.Writer) error {
	defer c.Close()
	select {
	case <-c.Ready():
	case err := <-c.Err():
		return err
	case err := <-fatal:
		return err
	case <-ctx.Done():
		return nil
	}
	fmt.Fprintf(stdout, "expertmesh listening on http://%s\n", c.Addr())
	select {
	case err := <-c.Err():
		return err
	case err := <-fatal:
		return err
	case <-ctx.Done():
	}
	fmt.Fprintf(stderr, "coordinator draining: no new requests; running ones get at most %v\n", grace)
	dctx, cancel := context.WithTimeout(context.Background(), grace)
	defer cancel()
	if err := c.Drain(dctx); err != nil {
		return fmt.Errorf("--drain-timeout %v passed with requests still running; they were failed: %w", grace, err)
	}
	return nil
}

// runServe is `expertmesh serve`: the whole model in one process, an
// in-process attention node with local experts behind the coordinator's
// HTTP API, no gRPC. It is the baseline the cluster is compared with.
func runServe(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("serve", stderr)
	cfg := coordinator.DefaultConfig()
	addCoordinatorFlags(fs, &cfg)
	tel := addTelemetryFlags(fs)
	nc := attnnode.DefaultConfig()
	fs.IntVar(&nc.Threads, "threads", 0, "compute threads (0: all cores)")
	cacheMB := fs.Int64("cache-mb", nc.CacheBytes>>20, "latent cache size in MiB")
	fs.IntVar(&nc.BlockSize, "block-size", nc.BlockSize, "tokens per cache block")
	fs.BoolVar(&nc.PrefixCaching, "prefix-caching", nc.PrefixCaching, "share full cache blocks between sequences with the same token prefix (--prefix-caching=false: off)")
	fs.StringVar(&nc.Quantize, "quantize", "", "convert weights at load: q8")
	grace := fs.Duration("drain-timeout", 30*time.Second, "on SIGTERM, how long running requests may take to finish")
	if err := parse(fs, args); err != nil {
		return err
	}
	if err := cfg.Validate(); err != nil {
		return err
	}
	nc.ModelDir, nc.NodeID, nc.CacheBytes = cfg.ModelDir, "serve", *cacheMB<<20
	nc.MaxStepTokens = max(nc.MaxStepTokens, cfg.StepTokenBudget)
	nc.ListenAddr = "" // in-process: no gRPC
	flush, err := tel.setup(ctx, "serve", nc.NodeID, stderr)
	if err != nil {
		return err
	}
	defer flush()
	node, err := attnnode.Start(ctx, nc)
	if err != nil {
		return err
	}
	defer node.Close() // after the coordinator's Close (deferred later, runs first)
	return serveCoordinator(ctx, cfg, map[string]coordinator.AttentionNode{"serve": node}, *grace, stdout, stderr)
}

// runCoordinator is `expertmesh coordinator`: the HTTP front door and the
// cluster's brain. It takes an epoch from etcd (fencing older
// coordinators), runs the placement controller, follows the attention
// nodes' membership (each one that registers is driven at once; one whose
// lease ends has its sequences moved) and registers itself.
func runCoordinator(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("coordinator", stderr)
	cfg := coordinator.DefaultConfig()
	addCoordinatorFlags(fs, &cfg)
	cp := addControlPlaneFlags(fs)
	tel := addTelemetryFlags(fs)
	id := fs.String("node-id", "", "stable coordinator id (default HOSTNAME-coordinator-PORT)")
	redundant := fs.Int("redundant-experts", 0, "extra replicas per MoE layer the placement may give the hottest experts")
	rebalanceEvery := fs.Duration("rebalance-interval", 0, "how often to check whether the observed expert load warrants a new placement (0: never on a schedule; membership changes and `placement rebalance` still plan for the load)")
	rebalanceThreshold := fs.Float64("rebalance-threshold", controlplane.DefaultRebalanceThreshold, "a scheduled check plans only above this weighted expert imbalance (max over expert nodes of tokens served / mean)")
	rebalanceMargin := fs.Float64("rebalance-margin", controlplane.DefaultRebalanceMargin, "a scheduled check switches only to a plan that cuts the imbalance by at least this fraction")
	grace := fs.Duration("drain-timeout", 30*time.Second, "on SIGTERM, how long running requests may take to finish")
	advertise := fs.String("advertise-addr", "", "the HTTP host:port recorded in membership (default: --addr's, with 0.0.0.0 replaced by this host's address)")
	if err := parse(fs, args); err != nil {
		return err
	}
	if err := cfg.Validate(); err != nil {
		return err
	}
	if !cp.enabled() {
		return fmt.Errorf("--etcd is required: attention and expert nodes find the coordinator through etcd (`expertmesh up` runs one; `expertmesh serve` needs none)")
	}
	if *redundant < 0 {
		return fmt.Errorf("--redundant-experts %d: want >= 0", *redundant)
	}
	log := roleLogger(stderr)
	cfg.Logger = log
	shape, mc, err := shapeOf(cfg.ModelDir)
	if err != nil {
		return err
	}
	mid, err := controlplane.IdentifyModel(cfg.ModelDir)
	if err != nil {
		return fmt.Errorf("--model: %w", err)
	}
	store, err := cp.connect(ctx, log)
	if err != nil {
		return err
	}
	defer store.Close()
	epoch, err := store.NextEpoch(ctx)
	if err != nil {
		return err
	}
	cfg.Epoch = epoch
	ctrl, err := controlplane.StartController(ctx, store, controlplane.ControllerConfig{Shape: shape, Epoch: epoch, Redundant: *redundant, Logger: log,
		RebalanceInterval: *rebalanceEvery, RebalanceThreshold: *rebalanceThreshold, RebalanceMargin: *rebalanceMargin,
		// One routed expert: gate, up and down projections in BF16.
		ExpertBytes: int64(3 * mc.HiddenSize * mc.MoEIntermediateSize * 2)})
	if err != nil {
		return err
	}
	defer ctrl.Close()
	cfg.Collectors = append(cfg.Collectors, ctrl.Collectors()...)
	cfg.Cluster = func(context.Context) (any, error) { return ctrl.Status(), nil }
	flush, err := tel.setup(ctx, "coordinator", *id, stderr)
	if err != nil {
		return err
	}
	defer flush()
	c, err := coordinator.Start(ctx, cfg, nil)
	if err != nil {
		return err
	}
	if *id == "" {
		*id = nodeID("", controlplane.RoleCoordinator, c.Addr())
	}
	httpAdv, err := advertised(*advertise, c.Addr())
	if err != nil {
		c.Close()
		return err
	}
	reg, err := controlplane.Register(ctx, store, controlplane.Member{ID: *id, Role: controlplane.RoleCoordinator,
		HTTPAddr: httpAdv, Model: mid, BuildVersion: controlplane.BuildVersion(), State: controlplane.StateServing,
		Epoch: epoch, Started: time.Now()}, cp.leaseTTL)
	if err != nil {
		c.Close()
		return err
	}
	defer reg.Close(context.Background())
	log.Info("coordinator registered", "id", *id, "epoch", epoch, "http", c.Addr())
	// Follow the attention nodes: the coordinator drives whoever is a
	// member, keyed by id. Not under ctx: the nodes must stay driven while
	// the coordinator drains after SIGTERM.
	fctx, stopFollow := context.WithCancel(context.WithoutCancel(ctx))
	followed := make(chan struct{})
	go func() {
		defer close(followed)
		followAttention(fctx, store, c, log)
	}()
	defer func() { stopFollow(); <-followed }()
	fatal := make(chan error, 1)
	go func() {
		select {
		case err := <-ctrl.Err():
			fatal <- fmt.Errorf("superseded by a newer coordinator: %w", err)
		case <-fctx.Done():
		}
	}()
	return runCoordinatorUntil(ctx, c, *grace, fatal, stdout, stderr)
}

// followAttention keeps c's attention nodes equal to the attention members
// in etcd: a new member is dialled and added, one that left is removed
// (its sequences move elsewhere), one that restarted at another address is
// replaced, and a draining one takes no new sequences.
func followAttention(ctx context.Context, store *controlplane.Store, c *coordinator.Coordinator, log *slog.Logger) {
	w := store.Watch(ctx, store.Keys().MembersOf(controlplane.RoleAttn))
	defer w.Close()
	type known struct {
		addr   string
		client *attnnode.Client
	}
	nodes := map[string]*known{}
	defer func() {
		for _, k := range nodes {
			k.client.Close()
		}
	}()
	for {
		var snap controlplane.Snapshot
		select {
		case <-ctx.Done():
			return
		case snap = <-w.C():
		}
		members := store.Members(snap, controlplane.RoleAttn)
		for id, k := range nodes {
			if m, ok := members[id]; !ok || m.Addr != k.addr {
				c.RemoveNode(id, fmt.Errorf("its membership ended"))
				k.client.Close()
				delete(nodes, id)
				log.Info("attention node left", "id", id, "addr", k.addr)
			}
		}
		for id, m := range members {
			if m.State == controlplane.StateStarting {
				continue // registered, waiting for its placement
			}
			if _, ok := nodes[id]; !ok {
				cl, err := attnnode.Dial(ctx, m.Addr)
				if err != nil {
					log.Error("dialling attention node", "id", id, "addr", m.Addr, "err", err)
					continue
				}
				nodes[id] = &known{addr: m.Addr, client: cl}
				c.AddNode(id, cl)
				log.Info("attention node joined", "id", id, "addr", m.Addr)
			}
			c.SetNodeDraining(id, m.State == controlplane.StateDraining)
		}
	}
}
