package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/expertmesh/expertmesh/attnnode"
	"github.com/expertmesh/expertmesh/controlplane"
	"github.com/expertmesh/expertmesh/internal/ops"
	"github.com/expertmesh/expertmesh/internal/wire"
	"github.com/expertmesh/expertmesh/model"
	"github.com/expertmesh/expertmesh/placement"
	meshpb "github.com/expertmesh/expertmesh/proto"
)

// runAttn is `expertmesh attn`: one attention node serving AttentionService.
// With --etcd it joins a cluster: it registers, routes by the placement the
// coordinator publishes, drops the sequences of coordinators that died,
// and drains on SIGTERM. With --placement it dispatches by a fixed table.
func runAttn(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("attn", stderr)
	cfg := attnnode.DefaultConfig()
	fs.StringVar(&cfg.ModelDir, "model", "", "checkpoint directory in HF layout (required)")
	id := fs.String("node-id", "", "stable node id in membership, logs and traces (default HOSTNAME-attn-PORT)")
	fs.StringVar(&cfg.ListenAddr, "listen", cfg.ListenAddr, "gRPC listen address (port 0 picks one)")
	fs.IntVar(&cfg.Threads, "threads", 0, "compute threads (0: all cores)")
	cacheMB := fs.Int64("cache-mb", cfg.CacheBytes>>20, "latent cache size in MiB")
	fs.IntVar(&cfg.BlockSize, "block-size", cfg.BlockSize, "tokens per cache block")
	fs.BoolVar(&cfg.PrefixCaching, "prefix-caching", cfg.PrefixCaching, "share full cache blocks between sequences with the same token prefix (--prefix-caching=false: off)")
	fs.IntVar(&cfg.MicroBatches, "micro-batches", 0, "micro-batches per step (0: 2 with expert nodes, else 1)")
	fs.StringVar(&cfg.Quantize, "quantize", "", "convert weights at load: q8")
	weights := fs.String("weights", "auto", weightsUsage)
	fs.DurationVar(&cfg.DispatchTimeout, "dispatch-timeout", cfg.DispatchTimeout, "deadline of one dispatch of up to 256 rows to an expert node (more rows get proportionally more); a node that misses it is skipped for another replica")
	wireDT := fs.String("wire", "f32", "activation dtype of dispatches to expert nodes: f32 (exact), bf16 (half the bytes both ways, every value rounded to 8 significant bits) or fp8 (E4M3 rows with a scale per 128 values out, BF16 back, as DeepSeek-V3)")
	transport := fs.String("dispatch-transport", string(attnnode.TransportTCP), "what carries dispatches to expert nodes: tcp (the data plane: framed messages on a plain TCP connection to the node's gRPC port; a node that refuses it is served over gRPC) or grpc (a gRPC Dispatch stream)")
	fs.DurationVar(&cfg.ExpertWait, "expert-wait", cfg.ExpertWait, "how long a step waits for some replica of an expert before it fails with UNAVAILABLE; keep it below the coordinator's --step-timeout")
	opsAddr := fs.String("ops-listen", "", "HTTP address for /healthz, /readyz and /metrics (empty: off)")
	spec := fs.String("placement", "", `fixed expert placement without etcd: "ADDR=EXPERTS;ADDR=EXPERTS" in --experts' grammar; empty (and no --etcd): all experts in-process`)
	grace := fs.Duration("drain-timeout", 60*time.Second, "on SIGTERM, how long running sequences may take to finish before the node leaves (the coordinator re-prefills the rest elsewhere)")
	cp := addControlPlaneFlags(fs)
	tel := addTelemetryFlags(fs)
	advertise := fs.String("advertise-addr", "", "with --etcd: the host:port other nodes dial (default: --listen's, with 0.0.0.0 replaced by this host's address; in Kubernetes $(POD_IP):PORT)")
	loadInterval := fs.Duration("load-report-interval", controlplane.DefaultLoadReportInterval, "with --etcd: how often the node publishes its expert load (routed tokens per layer and expert) for the placement controller: one etcd write per interval")
	loadWindow := fs.Duration("load-window", attnnode.DefaultLoadWindow, "how far back the published expert load reaches (a sliding window)")
	if err := parse(fs, args); err != nil {
		return err
	}
	if *loadInterval <= 0 || *loadWindow <= 0 {
		return fmt.Errorf("--load-report-interval %v, --load-window %v: want both > 0", *loadInterval, *loadWindow)
	}
	cfg.CacheBytes = *cacheMB << 20
	var err error
	if cfg.Weights, err = model.ParseResidency(*weights); err != nil {
		return err
	}
	if cfg.Wire, err = wire.ParseDType(*wireDT); err != nil {
		return fmt.Errorf("--wire: %w", err)
	}
	if cfg.DispatchTransport, err = attnnode.ParseTransport(*transport); err != nil {
		return fmt.Errorf("--dispatch-transport: %w", err)
	}
	if cfg.ModelDir == "" {
		return fmt.Errorf("--model is required")
	}
	if cp.enabled() && *spec != "" {
		return fmt.Errorf("--placement and --etcd: the placement comes from etcd; give one or the other")
	}
	log := roleLogger(stderr)
	shape, _, err := shapeOf(cfg.ModelDir)
	if err != nil {
		return err
	}
	late := newLateView()
	switch {
	case *spec != "":
		t, err := placement.ParseSpec(shape, *spec)
		if err != nil {
			return fmt.Errorf("--placement: %w", err)
		}
		cfg.Placement = placement.NewStatic(t)
	case cp.enabled():
		cfg.Placement = late
	}
	cfg.NodeID = nodeID(*id, controlplane.RoleAttn, cfg.ListenAddr)
	flush, err := tel.setup(ctx, "attn", cfg.NodeID, stderr)
	if err != nil {
		return err
	}
	defer flush()
	cfg.Metrics = attnnode.NewMetrics(cfg.Placement)
	var mid controlplane.ModelIdentity
	var store *controlplane.Store
	if cp.enabled() {
		if mid, err = controlplane.IdentifyModel(cfg.ModelDir); err != nil {
			return fmt.Errorf("--model: %w", err)
		}
		if store, err = cp.connect(ctx, log); err != nil {
			return err
		}
		defer store.Close()
	}
	s, err := attnnode.Start(ctx, cfg)
	if err != nil {
		return err
	}
	defer s.Close()
	if ls := s.LoadStats(); ls != nil {
		ls.SetWindow(*loadWindow)
	}
	if cfg.NodeID == "" {
		// No --node-id and a port picked at start: name the node by it.
		cfg.NodeID = controlplane.DefaultNodeID(controlplane.RoleAttn, controlplane.PortOf(s.Addr()))
	}
	var o *ops.Server
	if *opsAddr != "" {
		if o, err = startAttnOps(ctx, *opsAddr, s, cfg.Metrics); err != nil {
			return err
		}
		defer o.Close()
		fmt.Fprintf(stderr, "attention node %s ops endpoint on http://%s\n", cfg.NodeID, o.Addr())
	}
	var reg *controlplane.Registration
	if cp.enabled() {
		info, err := s.Info(ctx, 0)
		if err != nil {
			return err
		}
		adv, err := advertised(*advertise, s.Addr())
		if err != nil {
			return err
		}
		m := controlplane.Member{ID: cfg.NodeID, Role: controlplane.RoleAttn, Addr: adv, Model: mid,
			BuildVersion: controlplane.BuildVersion(), State: controlplane.StateStarting, Started: time.Now(),
			CacheBlocks: int(info.TotalBlocks), BlockSize: int(info.BlockSize)}
		if o != nil {
			m.OpsAddr = o.Addr()
		}
		if reg, err = controlplane.Register(ctx, store, m, cp.leaseTTL); err != nil {
			return err
		}
		// Leave the cluster (lease revoked) before the node closes.
		defer reg.Close(context.Background())
		view, err := controlplane.NewAttnView(ctx, store, reg, shape)
		if err != nil {
			return err
		}
		defer view.Close()
		late.set(view)
		fmt.Fprintf(stderr, "attention node %s registered; waiting for an active expert placement\n", cfg.NodeID)
		if err := view.Wait(ctx); err != nil {
			return nil // interrupted while waiting
		}
		view.OnCoordinators(expireDead(s))
		if err := reg.SetState(ctx, controlplane.StateServing); err != nil {
			return err
		}
		if ls := s.LoadStats(); ls != nil {
			lr := controlplane.StartLoadReporter(store, reg, shape, *loadInterval, func() controlplane.LoadReport {
				snap := ls.Snapshot()
				return controlplane.LoadReport{At: snap.At, Window: snap.Window, Routed: snap.Routed, Served: snap.Served}
			})
			defer lr.Close()
		}
	}
	fmt.Fprintf(stdout, "attention node %s listening on %s\n", cfg.NodeID, s.Addr())
	select {
	case <-ctx.Done():
	case err := <-s.Err():
		return err
	}
	if reg == nil {
		return nil
	}
	// Drain: take no new sequences, let the running ones finish (bounded),
	// then leave; the coordinator re-prefills whatever is left elsewhere.
	s.Drain()
	dctx, cancel := context.WithTimeout(context.Background(), *grace)
	defer cancel()
	if err := reg.SetState(dctx, controlplane.StateDraining); err != nil {
		log.Warn("could not mark the node draining in etcd", "err", err)
	}
	fmt.Fprintf(stderr, "attention node %s draining: %d sequences, at most %v\n", cfg.NodeID, s.Sequences(), *grace)
	select {
	case <-s.Idle():
	case <-dctx.Done():
		log.Warn("drain timeout: leaving with sequences the coordinator moves elsewhere", "sequences", s.Sequences())
	}
	return nil
}

// lateView is the attention node's placement.View before etcd is joined:
// the node starts (loading weights) while it registers, and takes no step
// until its view has a routing (the coordinator drives it only once it
// turns serving). Until then Routing is nil, with a channel closed once
// the view is set.
type lateView struct {
	v     atomic.Pointer[controlplane.AttnView]
	once  sync.Once
	ready chan struct{}
}

func newLateView() *lateView { return &lateView{ready: make(chan struct{})} }

func (l *lateView) set(v *controlplane.AttnView) {
	l.v.Store(v)
	l.once.Do(func() { close(l.ready) })
}

func (l *lateView) Routing() (*placement.Routing, <-chan struct{}) {
	if v := l.v.Load(); v != nil {
		return v.Routing()
	}
	return nil, l.ready
}

func (l *lateView) InUse(oldest, newest uint64) {
	if v := l.v.Load(); v != nil {
		v.InUse(oldest, newest)
	}
}

// expireDead drops the sequences of coordinator epochs that were live
// and are no longer (that coordinator's lease ended), so a coordinator
// that died leaks no cache even before a new one starts; an epoch that is
// live again (its coordinator outlived its lease and re-registered) is
// served again, and the coordinator rebuilds what was dropped.
func expireDead(n *attnnode.Node) func(live []uint64) {
	var prev, expired []uint64
	return func(live []uint64) {
		for _, e := range prev {
			if !slices.Contains(live, e) {
				n.ExpireEpoch(e)
				expired = append(expired, e)
			}
		}
		expired = slices.DeleteFunc(expired, func(e uint64) bool {
			switch {
			case slices.Contains(live, e):
				n.ReviveEpoch(e)
				return true
			default:
				// A newer live epoch fences e on the node anyway.
				return len(live) > 0 && e < live[len(live)-1]
			}
		})
		prev = slices.Clone(live)
	}
}

// startAttnOps serves the node's health, readiness, cache gauges and
// dispatch and step metrics.
func startAttnOps(ctx context.Context, addr string, s *attnnode.Node, m *attnnode.Metrics) (*ops.Server, error) {
	reg := prometheus.NewRegistry()
	reg.MustRegister(m.Collectors()...)
	if ls := s.LoadStats(); ls != nil {
		reg.MustRegister(ls.Collector())
	}
	info := func() *meshpb.NodeInfo {
		i, err := s.Info(ctx, 0)
		if err != nil {
			return &meshpb.NodeInfo{}
		}
		return i
	}
	for _, g := range []struct {
		name, help string
		v          func(*meshpb.NodeInfo) float64
	}{
		{"expertmesh_attn_cache_blocks_total", "Latent cache blocks.", func(i *meshpb.NodeInfo) float64 { return float64(i.TotalBlocks) }},
		{"expertmesh_attn_cache_blocks_free", "Free latent cache blocks.", func(i *meshpb.NodeInfo) float64 { return float64(i.FreeBlocks) }},
		{"expertmesh_attn_sequences_active", "Sequences holding cache.", func(i *meshpb.NodeInfo) float64 { return float64(i.ActiveSequences) }},
	} {
		reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: g.name, Help: g.help}, func() float64 { return g.v(info()) }))
	}
	ready := func() error {
		if i := info(); i.Draining {
			return errors.New("draining")
		}
		return nil
	}
	o, err := ops.Start(addr, ready, reg)
	if err != nil {
		return nil, fmt.Errorf("--ops-listen: %w", err)
	}
	return o, nil
}
