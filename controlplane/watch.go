package controlplane

import (
	"context"
	"errors"
	"maps"
	"strings"

	"go.etcd.io/etcd/api/v3/mvccpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// KV is one key's value in a Snapshot.
type KV struct {
	Value string
	// Lease is the key's lease (0: none).
	Lease int64
	// ModRev is the revision of the key's last write.
	ModRev int64
}

// Snapshot is every key under a watcher's prefixes at one revision of
// etcd. It is immutable: the watcher builds a new map for every change.
type Snapshot struct {
	Rev int64
	KVs map[string]KV
}

// Get returns key's value.
func (s Snapshot) Get(key string) (string, bool) {
	kv, ok := s.KVs[key]
	return kv.Value, ok
}

// sameContent reports whether two snapshots hold the same keys and values
// (revisions aside).
func (s Snapshot) sameContent(o Snapshot) bool {
	return maps.Equal(s.KVs, o.KVs)
}

// Watcher keeps a consistent view of the keys under a set of prefixes of
// one etcd range: it reads them (Get), then follows a Watch from the read's
// revision + 1, and re-reads whenever the watch fails (compaction, lost
// leader, closed channel) or the connection to etcd comes back (a
// restarted etcd may have lost its data; a re-read is always safe). Every
// new snapshot replaces the undelivered one on C: a consumer sees the
// latest state, never a stale one, and never blocks the watcher.
//
// The watcher's goroutine is started by Store.Watch and stopped by Close.
type Watcher struct {
	store    *Store
	rng      string   // the watched range (a prefix)
	prefixes []string // keys kept: those under one of these
	out      chan Snapshot
	cancel   context.CancelFunc
	done     chan struct{}
}

// Watch follows the cluster's keys under prefixes (full keys, from Keys;
// every key of the cluster when none are given) until Close or ctx ends.
// All of them share one etcd watch, so every snapshot is consistent
// across them.
func (s *Store) Watch(ctx context.Context, prefixes ...string) *Watcher {
	return newWatcher(ctx, s, s.keys.Prefix(), prefixes...)
}

// newWatcher watches every key under rng, keeping those under one of
// prefixes (all of rng when none are given).
func newWatcher(ctx context.Context, s *Store, rng string, prefixes ...string) *Watcher {
	if len(prefixes) == 0 {
		prefixes = []string{rng}
	}
	ctx, cancel := context.WithCancel(ctx)
	w := &Watcher{store: s, rng: rng, prefixes: prefixes, out: make(chan Snapshot, 1), cancel: cancel, done: make(chan struct{})}
	go w.run(ctx)
	return w
}

// C delivers snapshots, the first one at once; a snapshot not yet
// received is replaced by a newer one, so a slow reader skips states but
// never sees a stale one.
func (w *Watcher) C() <-chan Snapshot { return w.out }

// Close stops the watcher and waits for its goroutine.
func (w *Watcher) Close() {
	w.cancel()
	<-w.done
}

func (w *Watcher) keep(key string) bool {
	for _, p := range w.prefixes {
		if strings.HasPrefix(key, p) {
			return true
		}
	}
	return false
}

// publish hands s to the consumer, replacing an undelivered snapshot. The
// watcher is the only sender, so after draining the buffer the send
// cannot block.
func (w *Watcher) publish(s Snapshot) {
	select {
	case w.out <- s:
	default:
		select {
		case <-w.out:
		default:
		}
		w.out <- s
	}
}

func (w *Watcher) run(ctx context.Context) {
	defer close(w.done)
	var last Snapshot
	delivered := false
	bo := newBackoff()
	for {
		// Take the reconnect signal before reading: a reconnection
		// during the read is then seen as a reason to read again.
		reconnected := w.store.reconnected()
		snap, err := w.read(ctx)
		if err != nil {
			if ctx.Err() != nil || w.closedStore() {
				return
			}
			w.store.log.Debug("watch: re-read failed", "prefix", w.rng, "err", err)
			if !sleepCtx(ctx, bo.next(), w.store.done()) {
				return
			}
			continue
		}
		if !delivered || !snap.sameContent(last) || snap.Rev < last.Rev {
			w.publish(snap)
			delivered = true
		}
		last = snap
		var progressed bool
		last, progressed, err = w.follow(ctx, last, reconnected)
		if ctx.Err() != nil || w.closedStore() {
			return
		}
		if progressed {
			bo.reset()
		}
		if err != nil {
			w.store.log.Debug("watch: re-reading", "prefix", w.rng, "err", err)
			if !sleepCtx(ctx, bo.next(), w.store.done()) {
				return
			}
		}
	}
}

func (w *Watcher) closedStore() bool {
	select {
	case <-w.store.done():
		return true
	default:
		return false
	}
}

// read takes a full snapshot.
func (w *Watcher) read(ctx context.Context) (Snapshot, error) {
	rctx, cancel := w.store.reqCtx(ctx)
	defer cancel()
	resp, err := w.store.client.Get(rctx, w.rng, clientv3.WithPrefix())
	if err != nil {
		return Snapshot{}, err
	}
	s := Snapshot{Rev: resp.Header.Revision, KVs: make(map[string]KV, len(resp.Kvs))}
	for _, kv := range resp.Kvs {
		if k := string(kv.Key); w.keep(k) {
			s.KVs[k] = KV{Value: string(kv.Value), Lease: kv.Lease, ModRev: kv.ModRevision}
		}
	}
	return s, nil
}

// errWatchClosed reports a watch channel closed without an error.
var errWatchClosed = errors.New("watch channel closed")

// follow applies watch events to snap until the watch fails, the
// connection comes back or ctx ends; it returns the last snapshot and
// whether any watch response arrived. A nil error means a re-read is due
// at once (compaction, reconnection); an error asks for a backoff first.
func (w *Watcher) follow(ctx context.Context, snap Snapshot, reconnected <-chan struct{}) (_ Snapshot, progressed bool, _ error) {
	wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
	defer cancel()
	wch := w.store.client.Watch(wctx, w.rng, clientv3.WithPrefix(), clientv3.WithRev(snap.Rev+1))
	for {
		select {
		case <-ctx.Done():
			return snap, progressed, ctx.Err()
		case <-reconnected:
			return snap, progressed, nil
		case resp, ok := <-wch:
			if !ok {
				return snap, progressed, errWatchClosed
			}
			if err := resp.Err(); err != nil {
				if errors.Is(err, rpctypes.ErrCompacted) {
					return snap, progressed, nil
				}
				return snap, progressed, err
			}
			progressed = true
			if resp.IsProgressNotify() || len(resp.Events) == 0 {
				continue
			}
			var next map[string]KV
			for _, ev := range resp.Events {
				k := string(ev.Kv.Key)
				if !w.keep(k) {
					continue
				}
				if next == nil {
					next = maps.Clone(snap.KVs)
				}
				if ev.Type == mvccpb.DELETE {
					delete(next, k)
				} else {
					next[k] = KV{Value: string(ev.Kv.Value), Lease: ev.Kv.Lease, ModRev: ev.Kv.ModRevision}
				}
			}
			if next == nil {
				snap.Rev = resp.Header.Revision
				continue
			}
			snap = Snapshot{Rev: resp.Header.Revision, KVs: next}
			w.publish(snap)
		}
	}
}

// Members returns the members of role in snap (a snapshot of a Watch that
// covers Keys.MembersOf(role)), by id. The coordinator follows its
// attention nodes this way.
func (s *Store) Members(snap Snapshot, role Role) map[string]Member {
	out := map[string]Member{}
	p := s.keys.MembersOf(role)
	for k, kv := range snap.KVs {
		id, ok := strings.CutPrefix(k, p)
		if !ok || strings.Contains(id, "/") {
			continue
		}
		if m, err := decodeMember(kv.Value); err == nil {
			m.ID, m.Role = id, role
			out[id] = m
		}
	}
	return out
}
