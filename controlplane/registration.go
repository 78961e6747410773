package controlplane

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"strings"
	"sync"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// DefaultTTL is a member lease's time to live: a node that stops keeping
// its lease alive (killed, frozen, cut off) leaves the cluster this long
// after its last keepalive.
const DefaultTTL = 3 * time.Second

// EventKind says what happened to a Registration.
type EventKind int

// Registration events.
const (
	// EventRegistered: a new lease was granted and the member key and
	// every owned key written under it.
	EventRegistered EventKind = iota + 1
	// EventLost: the lease expired or was revoked, or the member key was
	// deleted; the registration re-registers by itself.
	EventLost
	// EventResumed: etcd answered again after keepalives failed and the
	// lease was still alive (etcd restarted on its data); nothing was
	// lost.
	EventResumed
	// EventConflict: another process registered the same id; this one
	// waits until that registration is gone.
	EventConflict
	// EventRefused: re-registration was refused because the cluster's
	// model differs (etcd lost its data and another model registered
	// first); it keeps retrying.
	EventRefused
)

func (k EventKind) String() string {
	switch k {
	case EventRegistered:
		return "registered"
	case EventLost:
		return "lost"
	case EventResumed:
		return "resumed"
	case EventConflict:
		return "conflict"
	case EventRefused:
		return "refused"
	}
	return fmt.Sprintf("EventKind(%d)", int(k))
}

// Event is one change of a registration's standing.
type Event struct {
	Kind  EventKind
	Lease clientv3.LeaseID // the lease in force after the event (0 if none)
	Err   error            // why, for EventLost, EventConflict and EventRefused
}

// Registration keeps one member registered: its member key and the keys
// it owns (Own) live under its lease, which a goroutine keeps alive. When
// the lease is lost the goroutine re-registers by itself (a new lease, the
// member key and every owned key written again), with backoff and jitter,
// for as long as the registration is open; etcd being unreachable only
// delays it.
type Registration struct {
	store *Store
	ttl   int64 // seconds
	key   string
	kick  chan struct{}

	events chan Event

	mu struct {
		sync.Mutex
		member Member
		// owned holds the desired value of every owned key, the member
		// key included.
		owned map[string]string
		// deleted are keys given up (Disown) not yet deleted in etcd.
		deleted map[string]bool
		// written is what etcd holds under the current lease.
		written map[string]string
		// want counts changes of owned; synced is the count etcd
		// reflects; syncedCh is closed (and replaced) when synced moves.
		want, synced uint64
		syncedCh     chan struct{}
		lease        clientv3.LeaseID
		closed       bool
	}

	cancel context.CancelFunc
	done   chan struct{}
}

// errConflict means another registration holds the member key.
var errConflict = errors.New("member key held by another registration")

// Register registers m under a new lease of ttl (DefaultTTL if 0; etcd
// counts whole seconds and may raise a short TTL to its minimum) and
// keeps it registered until Close. The cluster's model identity is
// created if absent; a node whose m.Model.Hash differs is refused with
// ErrModelMismatch. A live registration of the same id left by a previous
// process (a restart within the TTL) is revoked first, so nothing it
// owned (readiness, versions in use) outlives it. ctx bounds only this
// first registration.
func Register(ctx context.Context, s *Store, m Member, ttl time.Duration) (*Registration, error) {
	if ttl == 0 {
		ttl = DefaultTTL
	}
	if ttl < 0 {
		return nil, fmt.Errorf("%w: --lease-ttl %v: must be positive", ErrConfig, ttl)
	}
	if m.State == "" {
		m.State = StateServing
	}
	if m.Started.IsZero() {
		m.Started = time.Now()
	}
	m.Started = m.Started.UTC().Truncate(time.Second)
	if err := m.Validate(); err != nil {
		return nil, err
	}
	r := &Registration{
		store:  s,
		ttl:    max(int64((ttl+time.Second-1)/time.Second), 1),
		key:    s.keys.Member(m.Role, m.ID),
		kick:   make(chan struct{}, 1),
		events: make(chan Event, 64),
		done:   make(chan struct{}),
	}
	r.mu.member = m
	r.mu.owned = map[string]string{r.key: m.marshal()}
	r.mu.deleted = map[string]bool{}
	r.mu.written = map[string]string{}
	r.mu.want = 1
	r.mu.syncedCh = make(chan struct{})
	lease, rev, err := r.establish(ctx, true)
	if err != nil {
		return nil, err
	}
	s.log.Info("registered", "role", m.Role, "id", m.ID, "lease", fmt.Sprintf("%x", lease), "ttl_s", r.ttl)
	bg, cancel := context.WithCancel(context.Background())
	r.cancel = cancel
	go r.run(bg, lease, rev)
	return r, nil
}

// Member returns the registered member as last written.
func (r *Registration) Member() Member {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.mu.member
}

// Key is the member key.
func (r *Registration) Key() string { return r.key }

// Lease is the lease currently held (0 while re-registering).
func (r *Registration) Lease() clientv3.LeaseID {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.mu.lease
}

// Events reports changes of the registration's standing. The channel has
// a buffer; events are dropped when it is full (they inform, they do not
// control). It is closed by Close.
func (r *Registration) Events() <-chan Event { return r.events }

// Own makes key (under the cluster prefix) live under the registration's
// lease with value: written now in the background, written again after
// every re-registration, deleted with the lease. It never blocks on etcd;
// Flush waits for the write.
func (r *Registration) Own(key, value string) error {
	if !strings.HasPrefix(key, r.store.keys.Prefix()) || key == r.key {
		return fmt.Errorf("%w: key %q is not a cluster key a member may own", ErrConfig, key)
	}
	return r.set(key, value, false)
}

// Update changes the value of an owned key, like Own; it fails with
// ErrNotOwned for a key not owned.
func (r *Registration) Update(key, value string) error { return r.set(key, value, true) }

// Disown deletes an owned key and stops owning it.
func (r *Registration) Disown(key string) error {
	r.mu.Lock()
	if r.mu.closed {
		r.mu.Unlock()
		return ErrClosed
	}
	if _, ok := r.mu.owned[key]; !ok || key == r.key {
		r.mu.Unlock()
		return fmt.Errorf("%w: %s", ErrNotOwned, key)
	}
	delete(r.mu.owned, key)
	r.mu.deleted[key] = true
	r.mu.want++
	r.mu.Unlock()
	r.poke()
	return nil
}

func (r *Registration) set(key, value string, mustOwn bool) error {
	r.mu.Lock()
	if r.mu.closed {
		r.mu.Unlock()
		return ErrClosed
	}
	old, ok := r.mu.owned[key]
	if mustOwn && !ok {
		r.mu.Unlock()
		return fmt.Errorf("%w: %s", ErrNotOwned, key)
	}
	if ok && old == value {
		r.mu.Unlock()
		return nil
	}
	r.mu.owned[key] = value
	delete(r.mu.deleted, key)
	r.mu.want++
	r.mu.Unlock()
	r.poke()
	return nil
}

func (r *Registration) poke() {
	select {
	case r.kick <- struct{}{}:
	default:
	}
}

// Owned returns the value of an owned key.
func (r *Registration) Owned(key string) (string, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	v, ok := r.mu.owned[key]
	return v, ok
}

// SetState changes the member's state and waits until etcd holds it.
func (r *Registration) SetState(ctx context.Context, st State) error {
	if err := r.setState(st); err != nil {
		return err
	}
	return r.Flush(ctx)
}

// setState changes the member's state without waiting.
func (r *Registration) setState(st State) error {
	if !st.valid() {
		return fmt.Errorf("%w: state %q", ErrConfig, st)
	}
	r.mu.Lock()
	r.mu.member.State = st
	v := r.mu.member.marshal()
	r.mu.Unlock()
	return r.set(r.key, v, true)
}

// Flush waits until every change made before it (Own, Update, Disown,
// SetState) is in etcd under the current lease.
func (r *Registration) Flush(ctx context.Context) error {
	r.mu.Lock()
	want := r.mu.want
	for r.mu.synced < want {
		if r.mu.closed {
			r.mu.Unlock()
			return ErrClosed
		}
		ch := r.mu.syncedCh
		r.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		case <-r.done:
			return ErrClosed
		}
		r.mu.Lock()
	}
	r.mu.Unlock()
	return nil
}

// Close stops re-registering and keeping the lease alive, then revokes the
// lease: the member key and every owned key vanish at once, a graceful
// leave. Order: the goroutine stops first (so nothing re-registers after
// the revoke), then the lease is revoked (bounded by ctx), then Events is
// closed. Closing after the store was closed only stops the goroutine.
func (r *Registration) Close(ctx context.Context) error {
	r.mu.Lock()
	if r.mu.closed {
		r.mu.Unlock()
		return nil
	}
	r.mu.closed = true
	r.mu.Unlock()
	r.cancel()
	<-r.done
	close(r.events)
	r.mu.Lock()
	lease := r.mu.lease
	r.mu.lease = 0
	r.mu.Unlock()
	if lease == 0 {
		return nil
	}
	select {
	case <-r.store.done():
		return nil
	default:
	}
	if _, err := r.store.client.Revoke(ctx, lease); err != nil && !errors.Is(err, rpctypes.ErrLeaseNotFound) {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		return fmt.Errorf("%w: revoking lease %x: %v", ErrUnavailable, lease, err)
	}
	return nil
}

func (r *Registration) emit(kind EventKind, lease clientv3.LeaseID, err error) {
	select {
	case r.events <- Event{Kind: kind, Lease: lease, Err: err}:
	default:
	}
}

// ensureModel creates the cluster's model identity if absent and refuses
// a different one.
func ensureModel(ctx context.Context, s *Store, id ModelIdentity) error {
	b, _ := json.Marshal(id)
	k := s.keys.Model()
	resp, err := s.client.Txn(ctx).
		If(clientv3.Compare(clientv3.CreateRevision(k), "=", 0)).
		Then(clientv3.OpPut(k, string(b))).
		Else(clientv3.OpGet(k)).Commit()
	if err != nil {
		return fmt.Errorf("%w: model identity: %v", ErrUnavailable, err)
	}
	if resp.Succeeded {
		return nil
	}
	kvs := resp.Responses[0].GetResponseRange().Kvs
	if len(kvs) == 0 {
		return fmt.Errorf("%w: model identity vanished", ErrUnavailable)
	}
	var have ModelIdentity
	if err := json.Unmarshal(kvs[0].Value, &have); err != nil {
		return fmt.Errorf("%w: %s: %v", ErrCorrupt, k, err)
	}
	if have.Hash != id.Hash {
		return fmt.Errorf("%w: cluster %q serves model %q (hash %s) but this node's model %q has hash %s",
			ErrModelMismatch, strings.TrimSuffix(strings.TrimPrefix(s.keys.Prefix(), Root), "/"), have.Name, have.Hash, id.Name, id.Hash)
	}
	return nil
}

// establish grants a new lease and writes the member key and every owned
// key under it in one transaction. takeOver revokes the lease of a live
// registration of the same id (a previous process); otherwise a held
// member key is a conflict.
func (r *Registration) establish(ctx context.Context, takeOver bool) (clientv3.LeaseID, int64, error) {
	s := r.store
	rctx, cancel := s.reqCtx(ctx)
	defer cancel()
	r.mu.Lock()
	model := r.mu.member.Model
	r.mu.Unlock()
	if err := ensureModel(rctx, s, model); err != nil {
		return 0, 0, err
	}
	g, err := s.client.Grant(rctx, r.ttl)
	if err != nil {
		return 0, 0, fmt.Errorf("%w: granting a lease: %v", ErrUnavailable, err)
	}
	ok := false
	defer func() {
		if !ok {
			rc, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Second)
			s.client.Revoke(rc, g.ID)
			cancel()
		}
	}()
	// The member key must be absent when the transaction runs, unless a
	// previous process left it without a lease (then it is overwritten
	// if unchanged).
	cmp := clientv3.Compare(clientv3.CreateRevision(r.key), "=", 0)
	if takeOver {
		cur, err := s.client.Get(rctx, r.key)
		if err != nil {
			return 0, 0, fmt.Errorf("%w: reading %s: %v", ErrUnavailable, r.key, err)
		}
		if len(cur.Kvs) > 0 {
			if old := clientv3.LeaseID(cur.Kvs[0].Lease); old != 0 {
				s.log.Warn("replacing a live registration of this id (a restart, or two nodes with one id)", "key", r.key, "old_lease", fmt.Sprintf("%x", old))
				if _, err := s.client.Revoke(rctx, old); err != nil && !errors.Is(err, rpctypes.ErrLeaseNotFound) {
					return 0, 0, fmt.Errorf("%w: revoking the previous registration: %v", ErrUnavailable, err)
				}
			} else {
				cmp = clientv3.Compare(clientv3.ModRevision(r.key), "=", cur.Kvs[0].ModRevision)
			}
		}
	}
	r.mu.Lock()
	owned := maps.Clone(r.mu.owned)
	want := r.mu.want
	r.mu.Unlock()
	ops := make([]clientv3.Op, 0, len(owned))
	for k, v := range owned {
		ops = append(ops, clientv3.OpPut(k, v, clientv3.WithLease(g.ID)))
	}
	resp, err := s.client.Txn(rctx).If(cmp).Then(ops...).Else(clientv3.OpGet(r.key)).Commit()
	if err != nil {
		return 0, 0, fmt.Errorf("%w: registering: %v", ErrUnavailable, err)
	}
	if !resp.Succeeded {
		return 0, 0, errConflict
	}
	ok = true
	r.mu.Lock()
	r.mu.lease = g.ID
	r.mu.written = owned
	clear(r.mu.deleted) // the old lease took them with it
	r.markSyncedLocked(want)
	r.mu.Unlock()
	return g.ID, resp.Header.Revision, nil
}

func (r *Registration) markSyncedLocked(want uint64) {
	if want > r.mu.synced {
		r.mu.synced = want
		close(r.mu.syncedCh)
		r.mu.syncedCh = make(chan struct{})
	}
}

// sync writes owned keys whose value etcd lacks and deletes disowned ones,
// under lease.
func (r *Registration) sync(ctx context.Context, lease clientv3.LeaseID) error {
	r.mu.Lock()
	want := r.mu.want
	var ops []clientv3.Op
	puts := map[string]string{}
	for k, v := range r.mu.owned {
		if w, ok := r.mu.written[k]; !ok || w != v {
			ops = append(ops, clientv3.OpPut(k, v, clientv3.WithLease(lease)))
			puts[k] = v
		}
	}
	dels := make([]string, 0, len(r.mu.deleted))
	for k := range r.mu.deleted {
		ops = append(ops, clientv3.OpDelete(k))
		dels = append(dels, k)
	}
	if len(ops) == 0 {
		r.markSyncedLocked(want)
		r.mu.Unlock()
		return nil
	}
	r.mu.Unlock()
	rctx, cancel := r.store.reqCtx(ctx)
	defer cancel()
	if _, err := r.store.client.Txn(rctx).Then(ops...).Commit(); err != nil {
		return err
	}
	r.mu.Lock()
	if r.mu.lease == lease {
		maps.Copy(r.mu.written, puts)
		for _, k := range dels {
			delete(r.mu.written, k)
			delete(r.mu.deleted, k)
		}
		r.markSyncedLocked(want)
	}
	r.mu.Unlock()
	return nil
}

// loss says why serve returned.
type loss int

const (
	lossNone      loss = iota // ctx ended or the store closed
	lossKeepAlive             // keepalives stopped: the lease may be gone
	lossDeleted               // the member key was deleted behind our back
	lossTaken                 // another lease wrote the member key
)

func (r *Registration) run(ctx context.Context, lease clientv3.LeaseID, rev int64) {
	defer close(r.done)
	for {
		why := r.serve(ctx, lease, rev)
		if why == lossNone || ctx.Err() != nil {
			return
		}
		lease, rev = r.recover(ctx, lease, why)
		if lease == 0 {
			return
		}
	}
}

// serve keeps lease alive and owned keys written until the lease or the
// member key is lost.
func (r *Registration) serve(ctx context.Context, lease clientv3.LeaseID, rev int64) loss {
	s := r.store
	kctx, cancel := context.WithCancel(ctx)
	defer cancel()
	ka, err := s.client.KeepAlive(kctx, lease)
	if err != nil {
		s.log.Warn("lease keepalive refused", "key", r.key, "err", err)
		return lossKeepAlive
	}
	mw := newWatcher(kctx, s, r.key)
	defer mw.Close()
	var retry <-chan time.Time
	var retryTimer *time.Timer
	defer func() {
		if retryTimer != nil {
			retryTimer.Stop()
		}
	}()
	bo := newBackoff()
	r.poke() // write anything changed while re-registering
	for {
		select {
		case <-ctx.Done():
			return lossNone
		case <-s.done():
			return lossNone
		case _, ok := <-ka:
			if !ok {
				return lossKeepAlive
			}
		case snap := <-mw.C():
			if snap.Rev < rev {
				continue // from before our registration (or a wiped etcd; keepalives tell)
			}
			kv, ok := snap.KVs[r.key]
			switch {
			case !ok:
				return lossDeleted
			case clientv3.LeaseID(kv.Lease) != lease:
				return lossTaken
			}
		case <-r.kick:
			retry = nil
		case <-retry:
			retry = nil
		}
		if retry != nil {
			continue
		}
		if err := r.sync(kctx, lease); err != nil {
			if ctx.Err() != nil {
				return lossNone
			}
			if errors.Is(err, rpctypes.ErrLeaseNotFound) {
				return lossKeepAlive
			}
			s.log.Debug("writing owned keys failed; retrying", "key", r.key, "err", err)
			retryTimer = time.NewTimer(bo.next())
			retry = retryTimer.C
		} else {
			bo.reset()
		}
	}
}

// recover re-establishes the registration after a loss: it resumes the
// old lease when etcd still holds it (an etcd restart on its data), or
// registers anew. It returns 0 when ctx ends or the store closes.
func (r *Registration) recover(ctx context.Context, old clientv3.LeaseID, why loss) (clientv3.LeaseID, int64) {
	s := r.store
	bo := newBackoff()
	stop := s.done()
	if why == lossKeepAlive {
		for {
			rctx, cancel := s.reqCtx(ctx)
			ttl, err := s.client.TimeToLive(rctx, old)
			var cur *clientv3.GetResponse
			if err == nil && ttl.TTL > 0 {
				cur, err = s.client.Get(rctx, r.key)
			}
			cancel()
			if err == nil {
				if ttl.TTL > 0 && len(cur.Kvs) > 0 && clientv3.LeaseID(cur.Kvs[0].Lease) == old {
					s.log.Info("etcd answered again; lease still alive", "key", r.key, "lease", fmt.Sprintf("%x", old))
					r.mu.Lock()
					clear(r.mu.written) // write everything again: cheap, and covers failed writes
					r.mu.Unlock()
					r.emit(EventResumed, old, nil)
					return old, cur.Header.Revision
				}
				break
			}
			if !sleepCtx(ctx, bo.next(), stop) {
				return 0, 0
			}
		}
	}
	lostErr := map[loss]string{lossKeepAlive: "lease expired or revoked", lossDeleted: "member key deleted", lossTaken: "member key taken by another lease"}[why]
	s.log.Warn("registration lost; re-registering", "key", r.key, "why", lostErr)
	r.mu.Lock()
	r.mu.lease = 0
	r.mu.Unlock()
	r.emit(EventLost, 0, errors.New(lostErr))
	// Drop whatever the old lease may still hold: nothing it owned may
	// outlive the loss (usually it is gone already).
	rctx, cancel := s.reqCtx(ctx)
	s.client.Revoke(rctx, old)
	cancel()
	bo.reset()
	var lastKind EventKind
	for {
		lease, rev, err := r.establish(ctx, false)
		if err == nil {
			s.log.Info("re-registered", "key", r.key, "lease", fmt.Sprintf("%x", lease))
			r.emit(EventRegistered, lease, nil)
			return lease, rev
		}
		if ctx.Err() != nil {
			return 0, 0
		}
		kind := EventKind(0)
		switch {
		case errors.Is(err, errConflict):
			kind = EventConflict
		case errors.Is(err, ErrModelMismatch):
			kind = EventRefused
		}
		if kind != 0 && kind != lastKind {
			s.log.Error("re-registration refused; retrying", "key", r.key, "err", err)
			r.emit(kind, 0, err)
		}
		lastKind = kind
		if !sleepCtx(ctx, bo.next(), stop) {
			return 0, 0
		}
	}
}
