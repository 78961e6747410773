package cli

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"time"

	"github.com/expertmesh/expertmesh/controlplane"
	"github.com/expertmesh/expertmesh/expertnode"
	"github.com/expertmesh/expertmesh/internal/ops"
	"github.com/expertmesh/expertmesh/internal/schedpolicy"
	"github.com/expertmesh/expertmesh/model"
	"github.com/expertmesh/expertmesh/placement"
)

// The control plane's agent drives the node itself.
var _ controlplane.ExpertHolder = (*expertnode.Node)(nil)

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
	leaveTimeout := fs.Duration("leave-timeout", 60*time.Second, "with --etcd, on SIGTERM: how long to wait for the placement to move this node's experts elsewhere before it stops anyway")
	slots := fs.Int("expert-slots", 0, "with --etcd: the most routed experts (over all layers) this node may hold (0: any number)")
	cp := addControlPlaneFlags(fs)
	tel := addTelemetryFlags(fs)
	schedBatch := fs.Bool("sched-batch", false, "run every thread under SCHED_BATCH (Linux): a request that wakes the node does not preempt whatever runs on its core; for nodes that share cores with an attention node (`up` sets it)")
	advertise := fs.String("advertise-addr", "", "with --etcd: the host:port attention nodes dial (default: --listen's, with 0.0.0.0 replaced by this host's address; in Kubernetes $(POD_IP):PORT)")
	if err := parse(fs, args); err != nil {
		return err
	}
	if *schedBatch {
		// A scheduling hint, not a requirement: where the kernel or a
		// sandbox refuses it (gVisor, a strict seccomp profile) the node
		// serves as it would without it.
		if err := schedpolicy.Batch(); err != nil {
			fmt.Fprintf(stderr, "warning: --sched-batch not applied, running under the default policy: %v\n", err)
		}
	}
	expertsSet := false
	fs.Visit(func(f *flag.Flag) { expertsSet = expertsSet || f.Name == "experts" })
	if *drainTimeout < 0 {
		return fmt.Errorf("--drain-timeout %v: want >= 0", *drainTimeout)
	}
	if *slots < 0 {
		return fmt.Errorf("--expert-slots %d: want >= 0", *slots)
	}
	cfg := def
	cfg.Weights = model.Residency(*weights)
	cfg.ModelDir, cfg.ListenAddr, cfg.Experts = *modelDir, *listen, *experts
	if cp.enabled() {
		// The placement versions decide what the node holds; nobody who
		// merely reaches the port may Load or Drop.
		cfg.Managed = true
		if !expertsSet {
			cfg.Experts = ""
		}
	}
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
	var store *controlplane.Store
	var mid controlplane.ModelIdentity
	var shape placement.Shape
	var err error
	if cp.enabled() {
		if shape, _, err = shapeOf(cfg.ModelDir); err != nil {
			return err
		}
		if mid, err = controlplane.IdentifyModel(cfg.ModelDir); err != nil {
			return fmt.Errorf("--model: %w", err)
		}
		if store, err = cp.connect(ctx, cfg.Logger); err != nil {
			return err
		}
		defer store.Close()
	}
	flush, err := tel.setup(ctx, "expert", cfg.NodeID, stderr)
	if err != nil {
		return err
	}
	defer flush()
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
	var agent *controlplane.ExpertAgent
	var reg *controlplane.Registration
	var drained <-chan struct{}
	if cp.enabled() {
		id := node.ID()
		if controlplane.ValidateID(id) != nil {
			// No --node-id and a port picked at start: name the node by it.
			id = controlplane.DefaultNodeID(controlplane.RoleExpert, controlplane.PortOf(node.Addr()))
		}
		adv, err := advertised(*advertise, node.Addr())
		if err != nil {
			node.Close()
			return err
		}
		m := controlplane.Member{ID: id, Role: controlplane.RoleExpert, Addr: adv, Model: mid,
			BuildVersion: controlplane.BuildVersion(), State: controlplane.StateServing, Started: time.Now(), ExpertSlots: *slots}
		if *opsAddr != "" {
			m.OpsAddr = *opsAddr
		}
		if reg, err = controlplane.Register(ctx, store, m, cp.leaseTTL); err != nil {
			node.Close()
			return err
		}
		// The lease is revoked (the node leaves at once) after the agent
		// stopped and before the node closes.
		defer reg.Close(context.Background())
		if agent, err = controlplane.NewExpertAgent(ctx, store, reg, shape, node); err != nil {
			node.Close()
			return err
		}
		defer agent.Close()
		drained = agent.Drained()
	}
	fmt.Fprintf(stdout, "expert node %s listening on %s\n", node.ID(), node.Addr())
	select {
	case err := <-node.Err():
		// The node failed and stopped itself (err is nil only if it was
		// closed, which nothing here does); Close collects the rest.
		return errors.Join(err, node.Close())
	case <-drained:
		// `expertmesh placement drain`: the placement no longer uses the
		// node; it stops (exit status 0: `up` does not restart it).
		fmt.Fprintf(stderr, "expert node %s drained: no placement version in use assigns it anything\n", node.ID())
	case <-ctx.Done():
		if agent != nil && attentionNodesLive(store, shape) {
			// Make-before-break: leave the placement first, so no
			// dispatch finds the node gone. (With no attention node
			// alive nobody dispatches: the whole cluster is stopping.)
			fmt.Fprintf(stderr, "expert node %s leaving the placement (at most %v)\n", node.ID(), *leaveTimeout)
			lctx, cancel := context.WithTimeout(context.Background(), *leaveTimeout)
			err := agent.Drain(lctx)
			cancel()
			if err != nil {
				fmt.Fprintf(stderr, "expert node %s: --leave-timeout %v passed before its experts moved elsewhere: %v\n", node.ID(), *leaveTimeout, err)
			}
		}
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

// attentionNodesLive says whether some attention node is a member (it
// might dispatch here). When etcd does not answer it says yes: leaving
// the placement properly is then at worst slow.
func attentionNodesLive(store *controlplane.Store, shape placement.Shape) bool {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	st, err := controlplane.Show(ctx, store, shape)
	if err != nil {
		return true
	}
	for _, n := range st.Nodes {
		if n.Role == controlplane.RoleAttn && n.State != controlplane.StateGone {
			return true
		}
	}
	return false
}
