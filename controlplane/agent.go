package controlplane

import (
	"context"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/expertmesh/expertmesh/placement"
)

// ExpertHolder is the expert node as its agent drives it. Calls come from
// the agent's one goroutine, never concurrently.
type ExpertHolder interface {
	// Hold makes the node hold every expert of s in addition to what it
	// holds; it returns once they can be computed.
	Hold(ctx context.Context, s placement.Set) error
	// Release drops the experts of s (dispatches naming them get
	// FAILED_PRECONDITION afterwards).
	Release(s placement.Set) error
	// Held is what the node holds now.
	Held() placement.Set
}

// ExpertAgent runs beside an expert node and carries out its side of the
// make-before-break protocol (see the package doc): it holds what the
// target version assigns the node, then reports ready for it; it releases
// an expert only once no version that an attention node may still
// dispatch by, and neither the active version nor the target, assigns it
// to the node. It drains the node on Drain or on a drain request.
type ExpertAgent struct {
	store  *Store
	reg    *Registration
	shape  placement.Shape
	holder ExpertHolder
	log    *slog.Logger
	id     string
	w      *Watcher
	kick   chan struct{}

	drained chan struct{}
	mu      struct {
		sync.Mutex
		draining bool // Drain called or a drain request seen
		drained  bool
		ready    uint64
	}

	cancel context.CancelFunc
	done   chan struct{}
}

// NewExpertAgent starts the agent of the expert node registered by reg.
func NewExpertAgent(ctx context.Context, s *Store, reg *Registration, shape placement.Shape, h ExpertHolder) (*ExpertAgent, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	m := reg.Member()
	if m.Role != RoleExpert {
		return nil, fmt.Errorf("%w: an expert agent needs an expert node's registration, not %s's", ErrConfig, m.Role)
	}
	bg, cancel := context.WithCancel(context.Background())
	k := s.keys
	a := &ExpertAgent{
		store: s, reg: reg, shape: shape, holder: h, id: m.ID, log: s.log.With("agent", m.ID),
		// Everything the decision reads: versions, target, active, in-use
		// reports, attention members, this node's member key and drain
		// request.
		w: newWatcher(bg, s, k.Prefix(), k.Placement(), k.MembersOf(RoleAttn),
			k.Member(RoleExpert, m.ID), k.Drain(m.ID)),
		kick:    make(chan struct{}, 1),
		drained: make(chan struct{}),
		cancel:  cancel,
		done:    make(chan struct{}),
	}
	a.mu.draining = m.State == StateDraining
	go a.run(bg)
	return a, nil
}

// Ready is the newest version the node reported ready for (0: none).
func (a *ExpertAgent) Ready() uint64 {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.mu.ready
}

// Drained is closed once the node has left the placement after Drain or
// a drain request (`expertmesh placement drain ID`): no version an
// attention node may use assigns it anything and it released everything.
// The process may then close the node and exit.
func (a *ExpertAgent) Drained() <-chan struct{} { return a.drained }

// Drain takes the node out of the placement: it marks the member
// draining (the controller then plans without it) and waits until no
// version that is active, targeted or in use assigns anything to it. The
// caller then closes the node. ctx bounds the wait; a draining node stays
// draining.
func (a *ExpertAgent) Drain(ctx context.Context) error {
	a.mu.Lock()
	a.mu.draining = true
	a.mu.Unlock()
	a.poke()
	if err := a.reg.SetState(ctx, StateDraining); err != nil {
		return err
	}
	select {
	case <-a.drained:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	case <-a.done:
		return ErrClosed
	}
}

// Close stops the agent's goroutine (interrupting a Hold in progress) and
// its watcher. It neither releases experts nor leaves the cluster: close
// the registration after the agent.
func (a *ExpertAgent) Close() error {
	a.cancel()
	<-a.done
	a.w.Close()
	return nil
}

func (a *ExpertAgent) poke() {
	select {
	case a.kick <- struct{}{}:
	default:
	}
}

func (a *ExpertAgent) run(ctx context.Context) {
	defer close(a.done)
	var (
		snap  Snapshot
		have  bool
		cache = tableCache{}
		retry *time.Timer
		bo    = newBackoff()
	)
	defer func() {
		if retry != nil {
			retry.Stop()
		}
	}()
	for {
		var retryC <-chan time.Time
		if retry != nil {
			retryC = retry.C
		}
		select {
		case <-ctx.Done():
			return
		case snap = <-a.w.C():
			have = true
		case <-a.kick:
		case <-retryC:
			retry = nil
		}
		if !have {
			continue
		}
		if err := a.step(ctx, readState(a.store.keys, snap, a.shape, cache)); err != nil {
			if ctx.Err() != nil {
				return
			}
			a.log.Warn("expert agent step failed; retrying", "err", err)
			if retry == nil {
				retry = time.NewTimer(bo.next())
			}
		} else {
			bo.reset()
		}
	}
}

// step moves the node one step toward what st asks of it.
func (a *ExpertAgent) step(ctx context.Context, st *clusterState) error {
	a.mu.Lock()
	if st.drains[a.id] {
		a.mu.draining = true
	}
	draining := a.mu.draining
	a.mu.Unlock()
	me, member := st.members[RoleExpert][a.id]
	if draining && (!member || me.State != StateDraining) && a.reg.Member().State != StateDraining {
		if err := a.reg.setState(StateDraining); err != nil {
			return err
		}
	}

	// Make: hold what the target assigns, and anything a version still in
	// use assigns that the node lacks (a restarted node holds nothing),
	// then report ready for the target.
	keep, certain := st.keepFor(a.shape, a.id)
	if need := keep.Minus(a.holder.Held()); need.Len() > 0 {
		a.log.Info("loading experts", "target", st.target, "active", st.active, "experts", need.Len())
		if err := a.holder.Hold(ctx, need); err != nil {
			return fmt.Errorf("holding experts for version %d: %w", st.target, err)
		}
	}
	if st.table(st.target) != nil {
		a.mu.Lock()
		report := a.mu.ready != st.target
		a.mu.ready = st.target
		a.mu.Unlock()
		if report {
			if err := a.reg.Own(a.store.keys.Ready(a.id), formatUint(st.target)); err != nil {
				return err
			}
		}
	}

	// Break: release what nobody can route here any more.
	if certain {
		if drop := a.holder.Held().Minus(keep); drop.Len() > 0 {
			a.log.Info("releasing experts no version in use assigns here", "experts", drop.Len(), "active", st.active)
			if err := a.holder.Release(drop); err != nil {
				return fmt.Errorf("releasing experts: %w", err)
			}
		}
	}

	// Drained: the controller knows, and nothing routes here any more.
	seen := st.drains[a.id] || (member && me.State == StateDraining)
	if draining && seen && certain && keep.Len() == 0 {
		a.mu.Lock()
		if !a.mu.drained {
			a.mu.drained = true
			close(a.drained)
			a.log.Info("drained: no placement version in use assigns this node anything")
		}
		a.mu.Unlock()
	}
	return nil
}
