package controlplane

import (
	"cmp"
	"encoding/json"
	"slices"
	"strings"

	"github.com/expertmesh/expertmesh/placement"
)

// clusterState is everything the placement protocol decides from, read
// from one consistent snapshot. It is plain data; the decisions made from
// it (keepFor, decide, status) are pure functions.
type clusterState struct {
	cluster string
	rev     int64
	model   *ModelIdentity
	// epoch is the cluster's coordinator epoch (0: no key).
	epoch   uint64
	members map[Role]map[string]Member
	// active and target are the placement versions (0: none).
	active, target uint64
	// versions are the stored tables that decode for the shape.
	versions map[uint64]*placement.Table
	// badVersions are stored versions that do not decode for the shape.
	badVersions map[uint64]error
	ready       map[string]uint64
	inuse       map[string]InUse
	drains      map[string]bool
	// rebalance is the mod revision of the rebalance key (0: none).
	rebalance int64
	// loads are the attention nodes' load reports, as stored (decoded on
	// demand: only the controller and Show need them).
	loads map[string]string
}

// tableCache keeps decoded tables across snapshots: stored versions never
// change, and decoding one is the costly part of reading a snapshot.
type tableCache map[uint64]cachedTable

type cachedTable struct {
	raw string
	t   *placement.Table
	err error
}

// readState reads a snapshot of the cluster's keys; cache (may be nil)
// saves re-decoding tables and is pruned to the stored versions.
func readState(k Keys, snap Snapshot, shape placement.Shape, cache tableCache) *clusterState {
	st := &clusterState{
		cluster:     strings.TrimSuffix(strings.TrimPrefix(k.Prefix(), Root), "/"),
		rev:         snap.Rev,
		members:     map[Role]map[string]Member{},
		versions:    map[uint64]*placement.Table{},
		badVersions: map[uint64]error{},
		ready:       map[string]uint64{},
		inuse:       map[string]InUse{},
		drains:      map[string]bool{},
		loads:       map[string]string{},
	}
	for _, r := range Roles {
		st.members[r] = map[string]Member{}
	}
	seen := map[uint64]bool{}
	for key, kv := range snap.KVs {
		switch {
		case key == k.Model():
			var m ModelIdentity
			if json.Unmarshal([]byte(kv.Value), &m) == nil {
				st.model = &m
			}
		case key == k.Epoch():
			st.epoch, _ = parseUint(kv.Value)
		case key == k.Active():
			st.active, _ = parseUint(kv.Value)
		case key == k.Target():
			st.target, _ = parseUint(kv.Value)
		case key == k.Rebalance():
			st.rebalance = kv.ModRev
		case strings.HasPrefix(key, k.Members()):
			rest := strings.TrimPrefix(key, k.Members())
			role, id, ok := strings.Cut(rest, "/")
			if m, err := decodeMember(kv.Value); ok && err == nil && Role(role).valid() {
				m.ID, m.Role = id, Role(role)
				st.members[Role(role)][id] = m
			}
		case strings.HasPrefix(key, k.Versions()):
			n, ok := k.versionOf(key)
			if !ok {
				continue
			}
			seen[n] = true
			c, hit := cache[n]
			if !hit || c.raw != kv.Value {
				t, err := placement.DecodeTable(shape, []byte(kv.Value))
				if err == nil && t.Version != n {
					err = ErrCorrupt
				}
				c = cachedTable{raw: kv.Value, t: t, err: err}
				if cache != nil {
					cache[n] = c
				}
			}
			if c.err != nil {
				st.badVersions[n] = c.err
			} else {
				st.versions[n] = c.t
			}
		case strings.HasPrefix(key, k.ReadyPrefix()):
			if n, err := parseUint(kv.Value); err == nil {
				st.ready[strings.TrimPrefix(key, k.ReadyPrefix())] = n
			}
		case strings.HasPrefix(key, k.InUsePrefix()):
			var u InUse
			if json.Unmarshal([]byte(kv.Value), &u) == nil {
				st.inuse[strings.TrimPrefix(key, k.InUsePrefix())] = u
			}
		case strings.HasPrefix(key, k.DrainPrefix()):
			st.drains[strings.TrimPrefix(key, k.DrainPrefix())] = true
		case strings.HasPrefix(key, k.LoadPrefix()):
			st.loads[strings.TrimPrefix(key, k.LoadPrefix())] = kv.Value
		}
	}
	for n := range cache {
		if !seen[n] {
			delete(cache, n)
		}
	}
	return st
}

// table returns stored version n (nil if absent or 0).
func (st *clusterState) table(n uint64) *placement.Table {
	if n == 0 {
		return nil
	}
	return st.versions[n]
}

// isMember reports whether any role has a live member id.
func (st *clusterState) isMember(id string) bool {
	for _, ms := range st.members {
		if _, ok := ms[id]; ok {
			return true
		}
	}
	return false
}

// liveAttn lists the attention nodes that may dispatch: members and
// holders of an in-use key (both live only under a live lease).
func (st *clusterState) liveAttn() []string {
	ids := map[string]bool{}
	for id := range st.members[RoleAttn] {
		ids[id] = true
	}
	for id := range st.inuse {
		ids[id] = true
	}
	out := make([]string, 0, len(ids))
	for id := range ids {
		out = append(out, id)
	}
	slices.Sort(out)
	return out
}

// inUseFloor is the oldest version any attention node may still dispatch
// by: the active version, lowered by every live attention node's
// in-use oldest; 0 when a live attention node has not reported yet (it
// may use anything stored). certain is false when an attention node
// reports a version that is not stored (etcd lost its data): then nobody
// can tell what it routes by.
func (st *clusterState) inUseFloor() (floor uint64, certain bool) {
	floor, certain = st.active, true
	if st.active != 0 && st.table(st.active) == nil {
		certain = false
	}
	for _, id := range st.liveAttn() {
		u, ok := st.inuse[id]
		if !ok {
			floor = 0
			continue
		}
		for _, v := range []uint64{u.Oldest, u.Newest} {
			if v != 0 && st.table(v) == nil {
				certain = false
			}
		}
		floor = min(floor, u.Oldest)
	}
	return floor, certain
}

// keepFor is what expert node id must hold: what the target assigns it
// (it is loading or has loaded that) and what every stored version from
// the in-use floor up to the active version assigns it (attention nodes
// may still route there). certain is false when that cannot be known;
// then nothing may be released.
func (st *clusterState) keepFor(shape placement.Shape, id string) (keep placement.Set, certain bool) {
	keep = placement.NewSet(shape)
	if t := st.table(st.target); t != nil {
		keep.Union(t.Set(id))
	}
	floor, certain := st.inUseFloor()
	for v, t := range st.versions {
		if v >= floor && v <= st.active {
			keep.Union(t.Set(id))
		}
	}
	return keep, certain
}

// nextVersion is above every version number the cluster has seen,
// including those nodes still report after etcd lost its data.
func (st *clusterState) nextVersion() uint64 {
	n := max(st.active, st.target)
	for v := range st.versions {
		n = max(n, v)
	}
	for v := range st.badVersions {
		n = max(n, v)
	}
	for _, v := range st.ready {
		n = max(n, v)
	}
	for _, u := range st.inuse {
		n = max(n, u.Newest, u.Oldest)
	}
	return n + 1
}

// eligible lists the expert nodes the planner may place on: live members,
// serving, not asked to drain; sorted by id.
func (st *clusterState) eligible() []placement.Node {
	var out []placement.Node
	for id, m := range st.members[RoleExpert] {
		if m.State == StateServing && !st.drains[id] {
			out = append(out, placement.Node{ID: id, Slots: m.ExpertSlots})
		}
	}
	slices.SortFunc(out, func(a, b placement.Node) int { return cmp.Compare(a.ID, b.ID) })
	return out
}

// current is the table the next plan starts from: the pending target, or
// the active version.
func (st *clusterState) current() *placement.Table {
	if st.target > st.active {
		if t := st.table(st.target); t != nil {
			return t
		}
	}
	return st.table(st.active)
}

// targetReady reports whether every node the target names is a live
// expert member that reported ready for exactly the target.
func (st *clusterState) targetReady() bool {
	t := st.table(st.target)
	if t == nil {
		return false
	}
	for _, id := range t.Nodes() {
		if _, live := st.members[RoleExpert][id]; !live || st.ready[id] != st.target {
			return false
		}
	}
	return true
}

// collectable lists stored versions nobody can use: below the in-use
// floor, or between the active version and the target (superseded before
// they were activated). Nothing is collected while the floor is
// uncertain.
func (st *clusterState) collectable() []uint64 {
	floor, certain := st.inUseFloor()
	if !certain {
		return nil
	}
	var out []uint64
	for v := range st.versions {
		if v < floor || (v > st.active && v < st.target) {
			out = append(out, v)
		}
	}
	for v := range st.badVersions {
		if v < floor || (v > st.active && v < st.target) {
			out = append(out, v)
		}
	}
	slices.Sort(out)
	return out
}

// settledDrains lists drain requests of nodes that are no longer members.
func (st *clusterState) settledDrains() []string {
	var out []string
	for id := range st.drains {
		if !st.isMember(id) {
			out = append(out, id)
		}
	}
	slices.Sort(out)
	return out
}

// ClusterStatus describes the cluster: membership and placement, for
// /v1/cluster and `expertmesh placement show`.
type ClusterStatus struct {
	Cluster string `json:"cluster"`
	// Revision is the etcd revision the status was read at.
	Revision int64          `json:"revision"`
	Model    *ModelIdentity `json:"model,omitempty"`
	// Epoch is the newest coordinator epoch.
	Epoch uint64 `json:"epoch"`
	// Active is the version attention nodes route by; Target the one
	// expert nodes load (equal once activated; 0: none).
	Active uint64 `json:"active_version"`
	Target uint64 `json:"target_version"`
	// Versions lists the stored placement versions.
	Versions []uint64     `json:"stored_versions"`
	Nodes    []NodeStatus `json:"nodes"`
	// Load is the expert load the attention nodes observe, with the
	// active placement's imbalance under it (nil before any report).
	Load *LoadStatus `json:"load,omitempty"`
	// ExpertLoad is the tokens each expert node served per MoE layer
	// (bench's expert_load shape; nil before any report).
	ExpertLoad *ExpertLoad `json:"expert_load,omitempty"`
	// Rebalance is the controller's record of placement switches (in
	// the coordinator's /v1/cluster only; Show has none).
	Rebalance *RebalanceStatus `json:"rebalance,omitempty"`
}

// NodeStatus is one node: a member, or a node a placement version still
// names after it left.
type NodeStatus struct {
	ID   string `json:"id"`
	Role Role   `json:"role"`
	Addr string `json:"addr,omitempty"`
	// HTTPAddr is a coordinator's HTTP address.
	HTTPAddr string `json:"http_addr,omitempty"`
	// State is the member's state, or "gone" for a node that is no
	// longer a member.
	State State `json:"state"`
	// DrainRequested: `placement drain` asked this node to leave.
	DrainRequested bool   `json:"drain_requested,omitempty"`
	BuildVersion   string `json:"build_version,omitempty"`
	// Epoch is a coordinator's epoch.
	Epoch uint64 `json:"epoch,omitempty"`

	// Expert nodes: what the active version assigns the node (count, in
	// the --experts grammar, and as a share of all replicas), what the
	// target assigns it, and the newest version it reported ready for.
	Experts       int     `json:"experts"`
	ExpertSpec    string  `json:"expert_spec,omitempty"`
	Share         float64 `json:"share"`
	TargetExperts int     `json:"target_experts"`
	Ready         uint64  `json:"ready_version,omitempty"`
	ExpertSlots   int     `json:"expert_slots,omitempty"`

	// Attention nodes: the versions running steps dispatch by.
	InUse *InUse `json:"in_use,omitempty"`
	// CacheBlocks is an attention node's cache capacity in blocks.
	CacheBlocks int `json:"cache_blocks,omitempty"`
}

// StateGone marks a node a placement names that is not a member.
const StateGone State = "gone"

// status describes the state, with the observed load ol
// (st.observedLoad).
func (st *clusterState) status(shape placement.Shape, ol observedLoad) ClusterStatus {
	cs := st.membershipStatus()
	cs.Load, cs.ExpertLoad = loadStatus(shape, ol, st.table(st.active))
	return cs
}

// membershipStatus describes the state's members and placement versions.
func (st *clusterState) membershipStatus() ClusterStatus {
	cs := ClusterStatus{Cluster: st.cluster, Revision: st.rev, Model: st.model, Epoch: st.epoch, Active: st.active, Target: st.target, Versions: []uint64{}, Nodes: []NodeStatus{}}
	for v := range st.versions {
		cs.Versions = append(cs.Versions, v)
	}
	for v := range st.badVersions {
		cs.Versions = append(cs.Versions, v)
	}
	slices.Sort(cs.Versions)
	active, target := st.table(st.active), st.table(st.target)
	total := 0
	if active != nil {
		for _, l := range active.Shape().MoELayers {
			for e := range active.Shape().Experts {
				total += len(active.Replicas(l, e))
			}
		}
	}
	expertIDs := map[string]bool{}
	for id := range st.members[RoleExpert] {
		expertIDs[id] = true
	}
	for _, t := range []*placement.Table{active, target} {
		if t != nil {
			for _, id := range t.Nodes() {
				expertIDs[id] = true
			}
		}
	}
	for _, role := range Roles {
		ids := map[string]bool{}
		for id := range st.members[role] {
			ids[id] = true
		}
		if role == RoleExpert {
			ids = expertIDs
		}
		if role == RoleAttn {
			for id := range st.inuse {
				ids[id] = true
			}
		}
		for id := range ids {
			m, live := st.members[role][id]
			ns := NodeStatus{ID: id, Role: role, State: StateGone, DrainRequested: st.drains[id]}
			if live {
				ns.Addr, ns.HTTPAddr, ns.State, ns.BuildVersion, ns.Epoch = m.Addr, m.HTTPAddr, m.State, m.BuildVersion, m.Epoch
				ns.CacheBlocks = m.CacheBlocks
				ns.ExpertSlots = m.ExpertSlots
			}
			switch role {
			case RoleExpert:
				if active != nil {
					s := active.Set(id)
					ns.Experts, ns.ExpertSpec = s.Len(), s.String()
					if total > 0 {
						ns.Share = float64(ns.Experts) / float64(total)
					}
				}
				if target != nil {
					ns.TargetExperts = target.Set(id).Len()
				}
				ns.Ready = st.ready[id]
			case RoleAttn:
				if u, ok := st.inuse[id]; ok {
					ns.InUse = &u
				}
			}
			cs.Nodes = append(cs.Nodes, ns)
		}
	}
	roleOrder := map[Role]int{RoleCoordinator: 0, RoleAttn: 1, RoleExpert: 2}
	slices.SortFunc(cs.Nodes, func(a, b NodeStatus) int {
		if c := cmp.Compare(roleOrder[a.Role], roleOrder[b.Role]); c != 0 {
			return c
		}
		return cmp.Compare(a.ID, b.ID)
	})
	return cs
}
