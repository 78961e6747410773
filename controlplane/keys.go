package controlplane

import (
	"fmt"
	"strconv"
	"strings"
)

// Root is the prefix of every key the package writes.
const Root = "/expertmesh/"

// DefaultCluster is the cluster name used when none is configured.
const DefaultCluster = "default"

// Keys builds the etcd keys of one cluster. The layout is documented in
// the package doc (doc.go), the one place it is described.
type Keys struct {
	prefix string // "/expertmesh/<cluster>/"
}

// KeysFor returns the key builder of cluster (DefaultCluster if empty).
func KeysFor(cluster string) Keys {
	if cluster == "" {
		cluster = DefaultCluster
	}
	return Keys{prefix: Root + cluster + "/"}
}

// Prefix is the cluster's prefix; every key of the cluster starts with it.
func (k Keys) Prefix() string { return k.prefix }

// Model is the cluster's ModelIdentity (JSON, no lease).
func (k Keys) Model() string { return k.prefix + "model" }

// Epoch is the coordinator epoch counter (decimal).
func (k Keys) Epoch() string { return k.prefix + "epoch" }

// Members is the prefix of all member keys.
func (k Keys) Members() string { return k.prefix + "members/" }

// MembersOf is the prefix of the member keys of role.
func (k Keys) MembersOf(role Role) string { return k.prefix + "members/" + string(role) + "/" }

// Member is the key of member id of role (JSON Member, under its lease).
func (k Keys) Member(role Role, id string) string { return k.MembersOf(role) + id }

// Placement is the prefix of every placement key.
func (k Keys) Placement() string { return k.prefix + "placement/" }

// Versions is the prefix of the stored placement tables.
func (k Keys) Versions() string { return k.prefix + "placement/versions/" }

// Version is the key of placement version n (placement.Table JSON). The
// number is zero-padded so that key order is version order.
func (k Keys) Version(n uint64) string { return fmt.Sprintf("%s%020d", k.Versions(), n) }

// Target is the version expert nodes should load (decimal).
func (k Keys) Target() string { return k.prefix + "placement/target" }

// Active is the version attention nodes route new steps by (decimal).
func (k Keys) Active() string { return k.prefix + "placement/active" }

// ReadyPrefix is the prefix of the expert nodes' readiness keys.
func (k Keys) ReadyPrefix() string { return k.prefix + "placement/ready/" }

// Ready is expert node id's readiness key (decimal, under its lease).
func (k Keys) Ready(id string) string { return k.ReadyPrefix() + id }

// InUsePrefix is the prefix of the attention nodes' in-use keys.
func (k Keys) InUsePrefix() string { return k.prefix + "placement/inuse/" }

// InUse is attention node id's in-use key (JSON InUse, under its lease).
func (k Keys) InUse(id string) string { return k.InUsePrefix() + id }

// DrainPrefix is the prefix of drain requests.
func (k Keys) DrainPrefix() string { return k.prefix + "drain/" }

// Drain is the drain request key of node id.
func (k Keys) Drain(id string) string { return k.DrainPrefix() + id }

// LoadPrefix is the prefix of the attention nodes' load reports.
func (k Keys) LoadPrefix() string { return k.prefix + "load/" }

// Load is attention node id's load report (LoadReport's stored form,
// under its lease).
func (k Keys) Load(id string) string { return k.LoadPrefix() + id }

// Rebalance is the key whose every write asks the controller to replan.
func (k Keys) Rebalance() string { return k.prefix + "rebalance" }

// versionOf parses a version key's number.
func (k Keys) versionOf(key string) (uint64, bool) {
	s, ok := strings.CutPrefix(key, k.Versions())
	if !ok {
		return 0, false
	}
	n, err := strconv.ParseUint(s, 10, 64)
	return n, err == nil
}

// InUse is the value of an attention node's in-use key: the placement
// versions its running steps still dispatch by.
type InUse struct {
	Oldest uint64 `json:"oldest"`
	Newest uint64 `json:"newest"`
}

func formatUint(n uint64) string { return strconv.FormatUint(n, 10) }

func parseUint(s string) (uint64, error) {
	n, err := strconv.ParseUint(strings.TrimSpace(s), 10, 64)
	if err != nil {
		return 0, fmt.Errorf("%w: %q is not a decimal counter", ErrCorrupt, s)
	}
	return n, nil
}
