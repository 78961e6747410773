package controlplane

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
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
	// Logger receives decisions; nil discards them.
	Logger *slog.Logger
}

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
	return nil
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

// decide computes the controller's next steps from a state. Planning is
// skipped when memo already holds a plan for the same inputs.
func decide(st *clusterState, cfg ControllerConfig, memo *planMemo) decision {
	var d decision
	cur := st.current()
	nodes := st.eligible()
	if len(nodes) > 0 {
		var key strings.Builder
		curV := uint64(0)
		if cur != nil {
			curV = cur.Version
		}
		fmt.Fprintf(&key, "cur=%d rebalance=%d", curV, st.rebalance)
		for _, n := range nodes {
			fmt.Fprintf(&key, " %s/%d", n.ID, n.Slots)
		}
		if memo == nil || memo.key != key.String() {
			p, err := placement.Plan(placement.PlanInput{Shape: cfg.Shape, Nodes: nodes, Current: cur, Version: st.nextVersion(), Redundant: cfg.Redundant})
			if memo == nil {
				memo = &planMemo{}
			}
			*memo = planMemo{key: key.String(), plan: p, err: err}
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
	}

	cancel context.CancelFunc
	done   chan struct{}
}

// StartController starts the controller. It adopts the stored active
// placement when it fits the shape (a restarted coordinator does not
// reshuffle: the planner starts from it and publishes nothing when the
// nodes did not change). It fails with ErrFenced when a newer epoch is
// already stored. ctx bounds only the start.
func StartController(ctx context.Context, s *Store, cfg ControllerConfig) (*Controller, error) {
	if cfg.Debounce == 0 {
		cfg.Debounce = 100 * time.Millisecond
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
	c := &Controller{store: s, cfg: cfg, log: log.With("epoch", cfg.Epoch), errc: make(chan error, 1), cancel: cancel, done: make(chan struct{})}
	c.mu.changed = make(chan struct{})
	c.w = newWatcher(bg, s, s.keys.Prefix())
	go c.run(bg)
	return c, nil
}

// Status describes the cluster as of the controller's latest snapshot.
func (c *Controller) Status() ClusterStatus {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.mu.status
}

// Changes returns a channel closed at the next change of Status. Take it
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
		memo     planMemo
		badPlan  string // memo key of the last plan failure logged
		debounce *time.Timer
		due      bool // the debounce timer fired: publish now
		retry    *time.Timer
		bo       = newBackoff()
	)
	timerC := func(t *time.Timer) <-chan time.Time {
		if t == nil {
			return nil
		}
		return t.C
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
		}
		if !have {
			continue
		}
		st := readState(c.store.keys, snap, c.cfg.Shape, cache)
		c.setStatus(st.status())
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
		d := decide(st, c.cfg, &memo)
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
		rev, err := c.apply(ctx, st, d)
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

// apply carries out a decision; it returns the revision of its last write
// (0: none).
func (c *Controller) apply(ctx context.Context, st *clusterState, d decision) (int64, error) {
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
	}
	if d.publish != nil {
		if err := do(func(ctx context.Context) (int64, error) { return s.publishTarget(ctx, epoch, d.publish) }); err != nil {
			return rev, err
		}
		c.log.Info("placement target published", "version", d.publish.Version, "nodes", d.publish.Nodes())
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
		!slices.Equal(a.Versions, b.Versions) || len(a.Nodes) != len(b.Nodes) || (a.Model == nil) != (b.Model == nil) {
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
