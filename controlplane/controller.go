package controlplane

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"math"
	"reflect"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/expertmesh/expertmesh/placement"
)

// ControllerConfig configures the placement controller.
type ControllerConfig struct {
	// Shape is the model's placement shape.
	Shape placement.Shape
	// Epoch is this coordinator's epoch (Store.NextEpoch); every write is
	// fenced by it.
	Epoch uint64
	// Redundant is how many extra replicas the planner may add
	// (--redundant-experts).
	Redundant int
	// Debounce is how long the controller waits after a membership change
	// before publishing, so that several nodes joining or leaving
	// together make one version (default 100 ms).
	Debounce time.Duration
	// RebalanceInterval is how often the controller checks whether the
	// observed expert load warrants a new placement
	// (--rebalance-interval). 0: no schedule; the placement then follows
	// the load only when membership changes and on `placement rebalance`.
	RebalanceInterval time.Duration
	// RebalanceThreshold: a scheduled check plans only when the current
	// placement's weighted imbalance under the observed load (see
	// LoadStatus) exceeds it (--rebalance-threshold; 0: 1.10, i.e. the
	// busiest expert node does 10% more than its part).
	RebalanceThreshold float64
	// RebalanceMargin: a scheduled check publishes the plan only when it
	// cuts the weighted imbalance by at least this fraction,
	// (before - after) / before >= margin (--rebalance-margin; 0: 0.02,
	// two percent of the MoE layers' expert time). Moving experts costs
	// loads on the expert nodes; a plan that buys less is left alone.
	RebalanceMargin float64
	// ExpertBytes is one routed expert's weight bytes, to report the
	// bytes a switch moves (0: reported as 0).
	ExpertBytes int64
	// Logger receives decisions; nil discards them.
	Logger *slog.Logger
}

// Defaults of the rebalance schedule (see ControllerConfig).
const (
	DefaultRebalanceThreshold = 1.10
	DefaultRebalanceMargin    = 0.02
)

// minTokensPerExpert: a scheduled check decides nothing on fewer routed
// tokens than this per (MoE layer, expert) on average: counts that small
// are noise, and a placement planned on noise only moves experts back and
// forth.
const minTokensPerExpert = 10

// Validate checks the config.
func (c ControllerConfig) Validate() error {
	if c.Epoch == 0 {
		return fmt.Errorf("%w: controller: epoch 0 (call Store.NextEpoch)", ErrConfig)
	}
	if len(c.Shape.MoELayers) == 0 || c.Shape.Experts <= 0 {
		return fmt.Errorf("%w: controller: the model has no routed experts to place", ErrConfig)
	}
	if c.Redundant < 0 {
		return fmt.Errorf("%w: --redundant-experts %d: must not be negative", ErrConfig, c.Redundant)
	}
	if c.Debounce < 0 {
		return fmt.Errorf("%w: controller: negative debounce", ErrConfig)
	}
	if c.RebalanceInterval < 0 {
		return fmt.Errorf("%w: --rebalance-interval %v: must not be negative", ErrConfig, c.RebalanceInterval)
	}
	if c.RebalanceThreshold < 0 || math.IsNaN(c.RebalanceThreshold) {
		return fmt.Errorf("%w: --rebalance-threshold %v: want an imbalance >= 1 (0: the default)", ErrConfig, c.RebalanceThreshold)
	}
	if c.RebalanceMargin < 0 || c.RebalanceMargin >= 1 || math.IsNaN(c.RebalanceMargin) {
		return fmt.Errorf("%w: --rebalance-margin %v: want a fraction in [0, 1)", ErrConfig, c.RebalanceMargin)
	}
	if c.ExpertBytes < 0 {
		return fmt.Errorf("%w: controller: negative expert bytes", ErrConfig)
	}
	return nil
}

// planLoad is the load plans are made for. It changes only when
// something asks for a new plan (membership, a command, the schedule),
// not with every load report: a plan stays the plan for its inputs, and
// planning again from it changes nothing.
type planLoad struct {
	load   [][]float64 // nil: uniform
	gen    uint64      // bumped at every refresh
	reason string      // what asked: initial, membership, command, schedule
}

// decision is what the controller does about one state: plain data, from
// the pure function decide.
type decision struct {
	// publish is a new plan that differs from the current one (nil: keep).
	publish *placement.Table
	// activate is the target, once every node it names is ready (0: none).
	activate uint64
	// collect lists versions nobody can use.
	collect []uint64
	// clearDrains lists drain requests of nodes that have left.
	clearDrains []string
}

// planMemo caches the last plan: planning is costly and the inputs change
// rarely (in-use reports change far more often).
type planMemo struct {
	key  string
	plan *placement.Table
	err  error
}

// planKey names the inputs of a plan: the current version, the rebalance
// key's revision, the eligible nodes and the load generation.
func planKey(st *clusterState, nodes []placement.Node, pl planLoad) string {
	var key strings.Builder
	curV := uint64(0)
	if cur := st.current(); cur != nil {
		curV = cur.Version
	}
	fmt.Fprintf(&key, "cur=%d rebalance=%d load=%d", curV, st.rebalance, pl.gen)
	for _, n := range nodes {
		fmt.Fprintf(&key, " %s/%d", n.ID, n.Slots)
	}
	return key.String()
}

// eligibleKey names a set of eligible nodes.
func eligibleKey(nodes []placement.Node) string {
	var key strings.Builder
	for _, n := range nodes {
		fmt.Fprintf(&key, "%s/%d ", n.ID, n.Slots)
	}
	return key.String()
}

// planFor is the plan for st's eligible nodes from its current placement
// and load pl.
func planFor(st *clusterState, cfg ControllerConfig, nodes []placement.Node, pl planLoad) (*placement.Table, error) {
	return placement.Plan(placement.PlanInput{Shape: cfg.Shape, Nodes: nodes, Current: st.current(), Version: st.nextVersion(), Redundant: cfg.Redundant, Load: pl.load})
}

// decide computes the controller's next steps from a state and the load
// plans are made for. Planning is skipped when memo already holds a plan
// for the same inputs.
func decide(st *clusterState, cfg ControllerConfig, memo *planMemo, pl planLoad) decision {
	var d decision
	cur := st.current()
	nodes := st.eligible()
	if len(nodes) > 0 {
		key := planKey(st, nodes, pl)
		if memo == nil || memo.key != key {
			p, err := planFor(st, cfg, nodes, pl)
			if memo == nil {
				memo = &planMemo{}
			}
			*memo = planMemo{key: key, plan: p, err: err}
		}
		if memo.err == nil && (cur == nil || !memo.plan.Equal(cur)) {
			d.publish = memo.plan
		}
	}
	if st.target > st.active && st.targetReady() {
		d.activate = st.target
	}
	d.collect = st.collectable()
	d.clearDrains = st.settledDrains()
	return d
}

// Controller is the only writer of the placement. It runs in the
// coordinator: it watches membership, readiness, in-use reports, drain and
// rebalance requests, publishes a new target when the eligible expert
// nodes change, activates it once every node it names is ready,
// collects versions nobody can use and clears drain requests of nodes
// that left. All its writes are fenced by its epoch: once a newer
// coordinator bumps the epoch it stops writing and reports ErrFenced on
// Err.
type Controller struct {
	store *Store
	cfg   ControllerConfig
	log   *slog.Logger
	w     *Watcher
	errc  chan error

	metrics *controllerMetrics

	mu struct {
		sync.Mutex
		status  ClusterStatus
		changed chan struct{}
		fenced  bool
		// processed is the revision of the last snapshot decided on and
		// pending whether a publish then waited for the debounce (tests
		// read them to see that nothing is about to happen).
		processed int64
		pending   bool
		// rebalance is the record of switches Status reports.
		rebalance RebalanceStatus
	}

	// Owned by run: published targets not yet activated, by version.
	switches map[uint64]pendingSwitch

	cancel context.CancelFunc
	done   chan struct{}
}

// pendingSwitch is a published target on its way to activation.
type pendingSwitch struct {
	reason    string
	published time.Time
	load      [][]float64
}

// StartController starts the controller. It adopts the stored active
// placement when it fits the shape (a restarted coordinator does not
// reshuffle: while the nodes are the ones it names, it publishes nothing
// until a rebalance is requested or scheduled, even if the load changed
// since it was planned). It fails with ErrFenced when a newer epoch is
// already stored. ctx bounds only the start.
func StartController(ctx context.Context, s *Store, cfg ControllerConfig) (*Controller, error) {
	if cfg.Debounce == 0 {
		cfg.Debounce = 100 * time.Millisecond
	}
	if cfg.RebalanceThreshold == 0 {
		cfg.RebalanceThreshold = DefaultRebalanceThreshold
	}
	if cfg.RebalanceMargin == 0 {
		cfg.RebalanceMargin = DefaultRebalanceMargin
	}
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	log := cfg.Logger
	if log == nil {
		log = s.log
	}
	cur, _, err := s.readCounter(ctx, s.keys.Epoch())
	if err != nil {
		return nil, err
	}
	if cur > cfg.Epoch {
		return nil, fmt.Errorf("%w: controller epoch %d, cluster epoch %d", ErrFenced, cfg.Epoch, cur)
	}
	bg, cancel := context.WithCancel(context.Background())
	c := &Controller{store: s, cfg: cfg, log: log.With("epoch", cfg.Epoch), errc: make(chan error, 1), cancel: cancel, done: make(chan struct{}),
		switches: map[uint64]pendingSwitch{}}
	c.mu.changed = make(chan struct{})
	c.mu.rebalance = RebalanceStatus{IntervalSeconds: cfg.RebalanceInterval.Seconds(), Threshold: cfg.RebalanceThreshold,
		Margin: cfg.RebalanceMargin, Switches: map[string]int{}}
	c.metrics = newControllerMetrics(c)
	c.w = newWatcher(bg, s, s.keys.Prefix())
	go c.run(bg)
	return c, nil
}

// Status describes the cluster as of the controller's latest snapshot,
// with its record of placement switches.
func (c *Controller) Status() ClusterStatus {
	c.mu.Lock()
	defer c.mu.Unlock()
	st := c.mu.status
	rb := c.mu.rebalance
	rb.Switches = maps.Clone(rb.Switches)
	if rb.Last != nil {
		last := *rb.Last
		rb.Last = &last
	}
	st.Rebalance = &rb
	return st
}

// Changes returns a channel closed at the next change of Status (its
// rebalance record included). Take it
// before reading Status to never miss one.
func (c *Controller) Changes() <-chan struct{} {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.mu.changed
}

// Err delivers ErrFenced (wrapped) once a newer coordinator supersedes
// this one; the controller then writes nothing more.
func (c *Controller) Err() <-chan error { return c.errc }

// Close stops the controller: the decision loop first (no write starts
// after Close returns), then its watcher.
func (c *Controller) Close() error {
	c.cancel()
	<-c.done
	return nil
}

func (c *Controller) run(ctx context.Context) {
	defer close(c.done)
	defer c.w.Close()
	var (
		snap     Snapshot
		have     bool
		waitRev  int64 // ignore decisions on snapshots older than our last write
		cache    = tableCache{}
		loads    = loadCache{}
		memo     planMemo
		badPlan  string // memo key of the last plan failure logged
		debounce *time.Timer
		due      bool // the debounce timer fired: publish now
		retry    *time.Timer
		bo       = newBackoff()
		// The load plans are made for, and what it was last refreshed
		// for: the eligible nodes and the rebalance key's revision.
		pl            planLoad
		lastNodes     string
		lastRebalance int64
		seen          bool // lastNodes and lastRebalance hold a snapshot's
		// adopted: the placement found at start is kept as it is until
		// something asks for a plan (it was planned for a load this
		// controller never saw; planning again for today's would
		// reshuffle it on every coordinator restart).
		adopted  bool
		schedule *time.Ticker
		check    bool // the schedule ticked: check the load
	)
	if c.cfg.RebalanceInterval > 0 {
		schedule = time.NewTicker(c.cfg.RebalanceInterval)
		defer schedule.Stop()
	}
	timerC := func(t *time.Timer) <-chan time.Time {
		if t == nil {
			return nil
		}
		return t.C
	}
	var scheduleC <-chan time.Time
	if schedule != nil {
		scheduleC = schedule.C
	}
	defer func() {
		for _, t := range []*time.Timer{debounce, retry} {
			if t != nil {
				t.Stop()
			}
		}
	}()
	for {
		select {
		case <-ctx.Done():
			return
		case snap = <-c.w.C():
			have = true
		case <-timerC(debounce):
			debounce, due = nil, true
		case <-timerC(retry):
			retry = nil
		case <-scheduleC:
			check = true
		}
		if !have {
			continue
		}
		st := readState(c.store.keys, snap, c.cfg.Shape, cache)
		ol := st.observedLoad(c.cfg.Shape, loads, c.log)
		c.setStatus(st.status(c.cfg.Shape, ol))
		if c.fenced() || snap.Rev < waitRev || retry != nil {
			continue
		}
		if st.epoch != c.cfg.Epoch {
			if st.epoch == 0 {
				// etcd lost its data: restore our epoch and carry on.
				c.log.Warn("the epoch key is gone (etcd lost its data?); restoring it")
				rctx, cancel := c.store.reqCtx(ctx)
				err := c.store.restoreEpoch(rctx, c.cfg.Epoch)
				cancel()
				if err != nil {
					retry = time.NewTimer(bo.next())
				}
				continue
			}
			if st.epoch > c.cfg.Epoch {
				c.fence(fmt.Errorf("%w: controller epoch %d, cluster epoch %d", ErrFenced, c.cfg.Epoch, st.epoch))
				continue
			}
		}
		// What asks for a plan for the load observed now: the eligible
		// nodes changing, `placement rebalance`, or the schedule finding
		// the imbalance worth it.
		nodes := st.eligible()
		nodesKey := eligibleKey(nodes)
		refresh := func(reason string) {
			pl = planLoad{load: ol.routed, gen: pl.gen + 1, reason: reason}
		}
		switch {
		case !seen:
			seen, lastNodes, lastRebalance = true, nodesKey, st.rebalance
			refresh("membership")
			if cur := st.current(); cur != nil {
				ids := make([]string, len(nodes))
				for i, n := range nodes {
					ids[i] = n.ID
				}
				adopted = slices.Equal(ids, slices.Sorted(slices.Values(cur.Nodes())))
			}
		case nodesKey != lastNodes:
			lastNodes, adopted = nodesKey, false
			refresh("membership")
		case st.rebalance != lastRebalance:
			lastRebalance, adopted = st.rebalance, false
			refresh("command")
			c.decided(fmt.Sprintf("command: planning for %.0f routed tokens", ol.tokens))
		case check:
			if p, why := c.worthRebalancing(st, ol, nodes); p != nil {
				adopted = false
				refresh("schedule")
				memo = planMemo{key: planKey(st, nodes, pl), plan: p}
				c.decided(why)
				c.log.Info("scheduled rebalance", "decision", why)
			} else {
				c.decided(why)
				c.log.Debug("scheduled rebalance skipped", "decision", why)
			}
		}
		if st.active == 0 {
			pl.reason = "initial"
		}
		check = false
		d := decide(st, c.cfg, &memo, pl)
		if adopted {
			d.publish = nil
		}
		if memo.err != nil && memo.key != badPlan {
			badPlan = memo.key
			c.log.Error("planning failed; keeping the current placement", "err", memo.err)
		}
		if d.publish != nil && !due {
			if debounce == nil {
				debounce = time.NewTimer(c.cfg.Debounce)
			}
			d.publish = nil
		}
		if d.publish == nil {
			due = false
		}
		rev, err := c.apply(ctx, st, d, pl)
		if rev > 0 {
			waitRev = rev
		}
		c.setProcessed(snap.Rev, debounce != nil)
		switch {
		case err == nil:
			bo.reset()
			if d.publish != nil {
				due = false
			}
		case errors.Is(err, ErrFenced):
			c.fence(err)
		case ctx.Err() != nil:
			return
		default:
			c.log.Warn("placement write failed; retrying", "err", err)
			retry = time.NewTimer(bo.next())
		}
	}
}

// worthRebalancing is the schedule's check: a plan for the observed load,
// when the current placement's weighted imbalance under it exceeds the
// threshold and the plan cuts it by the margin; otherwise nil. why says
// what was decided.
func (c *Controller) worthRebalancing(st *clusterState, ol observedLoad, nodes []placement.Node) (p *placement.Table, why string) {
	cur := st.current()
	switch {
	case st.target > st.active:
		return nil, "schedule: skipped, a placement switch is in progress"
	case cur == nil || len(nodes) == 0:
		return nil, "schedule: skipped, no placement yet"
	}
	if need := float64(minTokensPerExpert * len(c.cfg.Shape.MoELayers) * c.cfg.Shape.Experts); ol.tokens < need {
		return nil, fmt.Sprintf("schedule: skipped, %.0f routed tokens observed, fewer than the %.0f a plan needs", ol.tokens, need)
	}
	_, before := placement.Imbalance(cur, ol.routed)
	if before <= c.cfg.RebalanceThreshold {
		return nil, fmt.Sprintf("schedule: skipped, imbalance %.4f within the threshold %.2f", before, c.cfg.RebalanceThreshold)
	}
	p, err := planFor(st, c.cfg, nodes, planLoad{load: ol.routed})
	if err != nil {
		return nil, fmt.Sprintf("schedule: skipped, planning failed: %v", err)
	}
	_, after := placement.Imbalance(p, ol.routed)
	if before-after < c.cfg.RebalanceMargin*before {
		return nil, fmt.Sprintf("schedule: skipped, the plan would take imbalance %.4f to %.4f, less than the %.0f%% margin", before, after, 100*c.cfg.RebalanceMargin)
	}
	return p, fmt.Sprintf("schedule: rebalancing, imbalance %.4f to %.4f moving %d expert replicas", before, after, placement.Moved(cur, p))
}

// decided records a rebalance decision for Status.
func (c *Controller) decided(why string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.mu.rebalance.LastDecision = why
	c.changedLocked()
}

// changedLocked wakes everyone waiting on Changes.
func (c *Controller) changedLocked() {
	close(c.mu.changed)
	c.mu.changed = make(chan struct{})
}

// apply carries out a decision made for load pl; it returns the revision
// of its last write (0: none).
func (c *Controller) apply(ctx context.Context, st *clusterState, d decision, pl planLoad) (int64, error) {
	s, epoch := c.store, c.cfg.Epoch
	var rev int64
	do := func(f func(context.Context) (int64, error)) error {
		rctx, cancel := s.reqCtx(ctx)
		defer cancel()
		r, err := f(rctx)
		rev = max(rev, r)
		return err
	}
	if d.activate != 0 {
		if err := do(func(ctx context.Context) (int64, error) { return s.activate(ctx, epoch, d.activate) }); err != nil {
			return rev, err
		}
		c.log.Info("placement activated", "version", d.activate, "nodes", len(st.table(d.activate).Nodes()))
		c.switched(st, d.activate)
	}
	if d.publish != nil {
		if err := do(func(ctx context.Context) (int64, error) { return s.publishTarget(ctx, epoch, d.publish) }); err != nil {
			return rev, err
		}
		moved := placement.Moved(st.table(st.active), d.publish)
		_, before := placement.Imbalance(st.current(), pl.load)
		_, after := placement.Imbalance(d.publish, pl.load)
		c.log.Info("placement target published", "version", d.publish.Version, "nodes", d.publish.Nodes(), "reason", pl.reason,
			"moved_replicas", moved, "bytes_to_move", int64(moved)*c.cfg.ExpertBytes, "imbalance_before", before, "imbalance_after", after)
		c.switches[d.publish.Version] = pendingSwitch{reason: pl.reason, published: time.Now(), load: pl.load}
	}
	if len(d.collect) > 0 {
		if err := do(func(ctx context.Context) (int64, error) { return s.deleteVersions(ctx, epoch, d.collect) }); err != nil {
			return rev, err
		}
		c.log.Debug("placement versions collected", "versions", d.collect)
	}
	if len(d.clearDrains) > 0 {
		if err := do(func(ctx context.Context) (int64, error) { return s.clearDrains(ctx, epoch, d.clearDrains) }); err != nil {
			return rev, err
		}
		c.log.Info("drained nodes left", "ids", d.clearDrains)
	}
	return rev, nil
}

// switched records the activation of version v (the active version of
// st is the one it replaces): what moved, how long the switch took since
// the target was published, the imbalance it was planned to cure. It is
// logged, kept for Status and exported.
func (c *Controller) switched(st *clusterState, v uint64) {
	p, ok := c.switches[v]
	for n := range c.switches {
		if n <= v {
			delete(c.switches, n)
		}
	}
	if !ok {
		return // published by an earlier coordinator
	}
	from, to := st.table(st.active), st.table(v)
	rec := RebalanceRecord{From: st.active, To: v, Reason: p.reason, Moved: placement.Moved(from, to), DurationSeconds: time.Since(p.published).Seconds(), At: time.Now()}
	rec.BytesMoved = int64(rec.Moved) * c.cfg.ExpertBytes
	if from != nil {
		_, rec.ImbalanceBefore = placement.Imbalance(from, p.load)
	}
	_, rec.ImbalanceAfter = placement.Imbalance(to, p.load)
	c.log.Info("placement switched", "from", rec.From, "to", rec.To, "reason", rec.Reason, "moved_replicas", rec.Moved,
		"bytes_moved", rec.BytesMoved, "took", time.Duration(rec.DurationSeconds*float64(time.Second)).Round(time.Millisecond),
		"imbalance_before", rec.ImbalanceBefore, "imbalance_after", rec.ImbalanceAfter)
	c.metrics.switched(rec)
	c.mu.Lock()
	c.mu.rebalance.Switches[rec.Reason]++
	c.mu.rebalance.Last = &rec
	c.changedLocked()
	c.mu.Unlock()
}

func (c *Controller) fenced() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.mu.fenced
}

func (c *Controller) fence(err error) {
	c.mu.Lock()
	already := c.mu.fenced
	c.mu.fenced = true
	c.mu.Unlock()
	if !already {
		c.log.Warn("superseded by a newer coordinator; no longer writing the placement", "err", err)
		c.errc <- err // buffered, sent once
	}
}

func (c *Controller) setProcessed(rev int64, pending bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.mu.processed, c.mu.pending = rev, pending
	close(c.mu.changed)
	c.mu.changed = make(chan struct{})
}

// processed reports the revision of the last snapshot decided on and
// whether a publish waits for the debounce.
func (c *Controller) processed() (int64, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.mu.processed, c.mu.pending
}

func (c *Controller) setStatus(s ClusterStatus) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if statusEqual(c.mu.status, s) {
		return
	}
	c.mu.status = s
	close(c.mu.changed)
	c.mu.changed = make(chan struct{})
}

func statusEqual(a, b ClusterStatus) bool {
	if a.Cluster != b.Cluster || a.Revision != b.Revision || a.Epoch != b.Epoch || a.Active != b.Active || a.Target != b.Target ||
		!slices.Equal(a.Versions, b.Versions) || len(a.Nodes) != len(b.Nodes) || (a.Model == nil) != (b.Model == nil) ||
		!reflect.DeepEqual(a.Load, b.Load) || !reflect.DeepEqual(a.ExpertLoad, b.ExpertLoad) {
		return false
	}
	for i := range a.Nodes {
		x, y := a.Nodes[i], b.Nodes[i]
		if (x.InUse == nil) != (y.InUse == nil) || (x.InUse != nil && *x.InUse != *y.InUse) {
			return false
		}
		x.InUse, y.InUse = nil, nil
		if x != y {
			return false
		}
	}
	return true
}
