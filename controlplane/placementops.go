package controlplane

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/expertmesh/expertmesh/placement"
)

// NextEpoch bumps the cluster's coordinator epoch and returns the new
// value. Every coordinator start calls it once; placement writes carry the
// epoch and fail with ErrFenced once a newer coordinator has bumped it.
func (s *Store) NextEpoch(ctx context.Context) (uint64, error) {
	k := s.keys.Epoch()
	for {
		resp, err := s.client.Get(ctx, k)
		if err != nil {
			return 0, s.unavailable(ctx, "reading the epoch", err)
		}
		var cur uint64
		var mod int64
		if len(resp.Kvs) > 0 {
			if cur, err = parseUint(string(resp.Kvs[0].Value)); err != nil {
				return 0, fmt.Errorf("%s: %w", k, err)
			}
			mod = resp.Kvs[0].ModRevision
		}
		next := cur + 1
		tr, err := s.client.Txn(ctx).
			If(clientv3.Compare(clientv3.ModRevision(k), "=", mod)).
			Then(clientv3.OpPut(k, formatUint(next))).Commit()
		if err != nil {
			return 0, s.unavailable(ctx, "bumping the epoch", err)
		}
		if tr.Succeeded {
			return next, nil
		}
	}
}

// unavailable wraps an etcd error, passing context errors through.
func (s *Store) unavailable(ctx context.Context, what string, err error) error {
	if ctx.Err() != nil {
		return ctx.Err()
	}
	return fmt.Errorf("%w: %s: %v", ErrUnavailable, what, err)
}

// epochIs is the condition every placement write carries.
func (s *Store) epochIs(epoch uint64) clientv3.Cmp {
	return clientv3.Compare(clientv3.Value(s.keys.Epoch()), "=", formatUint(epoch))
}

// fenceCheck explains a failed conditional write: ErrFenced when the epoch
// moved on, else other.
func (s *Store) fenceCheck(ctx context.Context, epoch uint64, other error) error {
	resp, err := s.client.Get(ctx, s.keys.Epoch())
	if err != nil {
		return s.unavailable(ctx, "reading the epoch", err)
	}
	if len(resp.Kvs) == 0 || string(resp.Kvs[0].Value) != formatUint(epoch) {
		have := "none"
		if len(resp.Kvs) > 0 {
			have = string(resp.Kvs[0].Value)
		}
		return fmt.Errorf("%w: writer epoch %d, cluster epoch %s", ErrFenced, epoch, have)
	}
	return other
}

// restoreEpoch writes epoch when the epoch key is absent (etcd lost its
// data while this coordinator ran), so it can keep writing.
func (s *Store) restoreEpoch(ctx context.Context, epoch uint64) error {
	k := s.keys.Epoch()
	_, err := s.client.Txn(ctx).
		If(clientv3.Compare(clientv3.CreateRevision(k), "=", 0)).
		Then(clientv3.OpPut(k, formatUint(epoch))).Commit()
	if err != nil {
		return s.unavailable(ctx, "restoring the epoch", err)
	}
	return nil
}

// readCounter reads a decimal counter key (0, 0 if absent) and its mod
// revision.
func (s *Store) readCounter(ctx context.Context, key string) (uint64, int64, error) {
	resp, err := s.client.Get(ctx, key)
	if err != nil {
		return 0, 0, s.unavailable(ctx, "reading "+key, err)
	}
	if len(resp.Kvs) == 0 {
		return 0, 0, nil
	}
	n, err := parseUint(string(resp.Kvs[0].Value))
	if err != nil {
		return 0, 0, fmt.Errorf("%s: %w", key, err)
	}
	return n, resp.Kvs[0].ModRevision, nil
}

// LoadActive returns the active placement, or nil when none is active. A
// stored table that does not fit shape is an error (placement.ErrPlacement).
func (s *Store) LoadActive(ctx context.Context, shape placement.Shape) (*placement.Table, error) {
	n, _, err := s.readCounter(ctx, s.keys.Active())
	if err != nil || n == 0 {
		return nil, err
	}
	return s.LoadVersion(ctx, shape, n)
}

// LoadVersion returns stored placement version n.
func (s *Store) LoadVersion(ctx context.Context, shape placement.Shape, n uint64) (*placement.Table, error) {
	resp, err := s.client.Get(ctx, s.keys.Version(n))
	if err != nil {
		return nil, s.unavailable(ctx, "reading a placement version", err)
	}
	if len(resp.Kvs) == 0 {
		return nil, fmt.Errorf("%w: version %d is not stored", placement.ErrPlacement, n)
	}
	t, err := placement.DecodeTable(shape, resp.Kvs[0].Value)
	if err != nil {
		return nil, err
	}
	if t.Version != n {
		return nil, fmt.Errorf("%w: %s holds version %d", ErrCorrupt, s.keys.Version(n), t.Version)
	}
	return t, nil
}

// PublishTarget stores t as version t.Version and makes it the target
// expert nodes load. The version must be new and above the current target
// and active versions; the write is fenced by epoch.
func (s *Store) PublishTarget(ctx context.Context, epoch uint64, t *placement.Table) error {
	_, err := s.publishTarget(ctx, epoch, t)
	return err
}

// publishTarget is PublishTarget returning the write's revision.
func (s *Store) publishTarget(ctx context.Context, epoch uint64, t *placement.Table) (int64, error) {
	if t == nil || t.Version == 0 {
		return 0, fmt.Errorf("%w: publishing a table without a version", ErrConfig)
	}
	if err := t.Validate(); err != nil {
		return 0, err
	}
	b, err := json.Marshal(t)
	if err != nil {
		return 0, fmt.Errorf("%w: %v", placement.ErrPlacement, err)
	}
	target, tmod, err := s.readCounter(ctx, s.keys.Target())
	if err != nil {
		return 0, err
	}
	active, amod, err := s.readCounter(ctx, s.keys.Active())
	if err != nil {
		return 0, err
	}
	if t.Version <= max(target, active) {
		return 0, fmt.Errorf("%w: version %d, target %d, active %d", ErrStale, t.Version, target, active)
	}
	vk := s.keys.Version(t.Version)
	resp, err := s.client.Txn(ctx).If(
		s.epochIs(epoch),
		clientv3.Compare(clientv3.CreateRevision(vk), "=", 0),
		clientv3.Compare(clientv3.ModRevision(s.keys.Target()), "=", tmod),
		clientv3.Compare(clientv3.ModRevision(s.keys.Active()), "=", amod),
	).Then(
		clientv3.OpPut(vk, string(b)),
		clientv3.OpPut(s.keys.Target(), formatUint(t.Version)),
	).Commit()
	if err != nil {
		return 0, s.unavailable(ctx, "publishing a placement", err)
	}
	if !resp.Succeeded {
		return 0, s.fenceCheck(ctx, epoch, fmt.Errorf("%w: version %d (or the target moved meanwhile)", ErrVersionExists, t.Version))
	}
	return resp.Header.Revision, nil
}

// Activate makes stored version n the one attention nodes route new steps
// by. Versions only move forward (activating the active version again is a
// no-op); the write is fenced by epoch. The caller (the controller)
// activates a version only once every node it names is ready for it.
func (s *Store) Activate(ctx context.Context, epoch, n uint64) error {
	_, err := s.activate(ctx, epoch, n)
	return err
}

// activate is Activate returning the write's revision (0: no write).
func (s *Store) activate(ctx context.Context, epoch, n uint64) (int64, error) {
	active, amod, err := s.readCounter(ctx, s.keys.Active())
	if err != nil {
		return 0, err
	}
	if n == active {
		return 0, nil
	}
	if n < active {
		return 0, fmt.Errorf("%w: activating %d, active %d", ErrStale, n, active)
	}
	vk := s.keys.Version(n)
	resp, err := s.client.Txn(ctx).If(
		s.epochIs(epoch),
		clientv3.Compare(clientv3.ModRevision(s.keys.Active()), "=", amod),
		clientv3.Compare(clientv3.CreateRevision(vk), ">", 0),
	).Then(clientv3.OpPut(s.keys.Active(), formatUint(n))).Commit()
	if err != nil {
		return 0, s.unavailable(ctx, "activating a placement", err)
	}
	if !resp.Succeeded {
		return 0, s.fenceCheck(ctx, epoch, fmt.Errorf("%w: version %d is not stored, or the active version moved", ErrStale, n))
	}
	return resp.Header.Revision, nil
}

// DeleteVersions removes stored placement versions nobody can use any
// more (the controller decides which), fenced by epoch.
func (s *Store) DeleteVersions(ctx context.Context, epoch uint64, versions []uint64) error {
	_, err := s.deleteVersions(ctx, epoch, versions)
	return err
}

func (s *Store) deleteVersions(ctx context.Context, epoch uint64, versions []uint64) (int64, error) {
	ops := make([]clientv3.Op, 0, len(versions))
	for _, v := range versions {
		ops = append(ops, clientv3.OpDelete(s.keys.Version(v)))
	}
	return s.fencedWrite(ctx, epoch, "deleting placement versions", ops...)
}

// clearDrains deletes the drain requests of nodes that have left, fenced
// by epoch.
func (s *Store) clearDrains(ctx context.Context, epoch uint64, ids []string) (int64, error) {
	ops := make([]clientv3.Op, 0, len(ids))
	for _, id := range ids {
		ops = append(ops, clientv3.OpDelete(s.keys.Drain(id)))
	}
	return s.fencedWrite(ctx, epoch, "clearing drain requests", ops...)
}

// fencedWrite runs ops if epoch is still the cluster's; it returns the
// write's revision.
func (s *Store) fencedWrite(ctx context.Context, epoch uint64, what string, ops ...clientv3.Op) (int64, error) {
	if len(ops) == 0 {
		return 0, nil
	}
	resp, err := s.client.Txn(ctx).If(s.epochIs(epoch)).Then(ops...).Commit()
	if err != nil {
		return 0, s.unavailable(ctx, what, err)
	}
	if !resp.Succeeded {
		return 0, s.fenceCheck(ctx, epoch, fmt.Errorf("%w: %s", ErrFenced, what))
	}
	return resp.Header.Revision, nil
}

// RequestDrain asks the controller to move node id's experts away; the
// node's agent then leaves the placement and reports Drained, and the
// request is deleted once the node has left (`expertmesh placement drain
// ID`). The node must be a member.
func RequestDrain(ctx context.Context, s *Store, id string) error {
	if err := ValidateID(id); err != nil {
		return err
	}
	found := false
	for _, r := range Roles {
		resp, err := s.client.Get(ctx, s.keys.Member(r, id), clientv3.WithCountOnly())
		if err != nil {
			return s.unavailable(ctx, "reading members", err)
		}
		found = found || resp.Count > 0
	}
	if !found {
		return fmt.Errorf("%w: %s", ErrUnknownNode, id)
	}
	if _, err := s.client.Put(ctx, s.keys.Drain(id), time.Now().UTC().Format(time.RFC3339)); err != nil {
		return s.unavailable(ctx, "requesting a drain", err)
	}
	return nil
}

// RequestRebalance asks the controller to recompute the placement
// (`expertmesh placement rebalance`).
func RequestRebalance(ctx context.Context, s *Store) error {
	if _, err := s.client.Put(ctx, s.keys.Rebalance(), time.Now().UTC().Format(time.RFC3339Nano)); err != nil {
		return s.unavailable(ctx, "requesting a rebalance", err)
	}
	return nil
}

// Show reads the cluster once and describes it: the same facts as
// Controller.Status (`expertmesh placement show`).
func Show(ctx context.Context, s *Store, shape placement.Shape) (ClusterStatus, error) {
	resp, err := s.client.Get(ctx, s.keys.Prefix(), clientv3.WithPrefix())
	if err != nil {
		return ClusterStatus{}, s.unavailable(ctx, "reading the cluster", err)
	}
	snap := Snapshot{Rev: resp.Header.Revision, KVs: make(map[string]KV, len(resp.Kvs))}
	for _, kv := range resp.Kvs {
		snap.KVs[string(kv.Key)] = KV{Value: string(kv.Value), Lease: kv.Lease, ModRev: kv.ModRevision}
	}
	st := readState(s.keys, snap, shape, nil)
	return st.status(shape, st.observedLoad(shape, nil, nil)), nil
}
