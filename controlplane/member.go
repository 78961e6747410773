package controlplane

import (
	"encoding/json"
	"fmt"
	"net"
	"os"
	"regexp"
	"runtime/debug"
	"strconv"
	"strings"
	"time"
)

// Role is what a member does in the cluster.
type Role string

// The three roles; they name the member key prefixes.
const (
	RoleCoordinator Role = "coordinator"
	RoleAttn        Role = "attn"
	RoleExpert      Role = "expert"
)

// Roles lists every role.
var Roles = []Role{RoleCoordinator, RoleAttn, RoleExpert}

func (r Role) valid() bool { return r == RoleCoordinator || r == RoleAttn || r == RoleExpert }

// State is a member's lifecycle state.
type State string

// Member states.
const (
	// StateServing: the member takes work.
	StateServing State = "serving"
	// StateDraining: the member finishes what it has and takes nothing
	// new; the controller plans without a draining expert node.
	StateDraining State = "draining"
	// StateStarting: registered (its keys can live under its lease) but
	// not taking work yet: an attention node waiting for its first
	// placement. The coordinator drives it once it turns serving; the
	// controller does not place experts on a starting expert node.
	StateStarting State = "starting"
)

func (s State) valid() bool {
	return s == StateServing || s == StateDraining || s == StateStarting
}

// Member is one node's registration: the value of
// /expertmesh/<c>/members/<role>/<id>, alive as long as its lease.
type Member struct {
	ID   string `json:"id"`
	Role Role   `json:"role"`
	// Addr is the gRPC host:port other nodes dial (attention and expert
	// nodes; the coordinator's gRPC address if it has one).
	Addr string `json:"addr,omitempty"`
	// HTTPAddr is the coordinator's OpenAI HTTP host:port.
	HTTPAddr string `json:"http_addr,omitempty"`
	// OpsAddr serves health, readiness and metrics.
	OpsAddr string `json:"ops_addr,omitempty"`
	// ExpertSlots is the most routed experts (over all layers) an expert
	// node may hold; 0 means any number.
	ExpertSlots int `json:"expert_slots,omitempty"`
	// CacheBlocks and BlockSize are an attention node's latent cache
	// capacity (blocks of BlockSize tokens).
	CacheBlocks int `json:"cache_blocks,omitempty"`
	BlockSize   int `json:"block_size,omitempty"`
	// Model is the identity of the checkpoint the node serves; Register
	// refuses one that differs from the cluster's.
	Model ModelIdentity `json:"model"`
	// BuildVersion is the binary's version (BuildVersion()).
	BuildVersion string `json:"build_version,omitempty"`
	State        State  `json:"state"`
	// Epoch is a coordinator's epoch (NextEpoch); 0 for other roles.
	Epoch uint64 `json:"epoch,omitempty"`
	// Started is when the process started (RFC 3339 in JSON).
	Started time.Time `json:"started"`
}

var idPattern = regexp.MustCompile(`^[A-Za-z0-9._-]{1,128}$`)

// ValidateID checks a node or cluster id: 1 to 128 of [A-Za-z0-9._-],
// since ids are path segments of etcd keys.
func ValidateID(id string) error {
	if !idPattern.MatchString(id) || id == "." || id == ".." {
		return fmt.Errorf("%w: --node-id %q: want 1 to 128 of [A-Za-z0-9._-]", ErrConfig, id)
	}
	return nil
}

// Validate checks the fields Register relies on.
func (m Member) Validate() error {
	if err := ValidateID(m.ID); err != nil {
		return err
	}
	if !m.Role.valid() {
		return fmt.Errorf("%w: member %s: role %q (want coordinator, attn or expert)", ErrConfig, m.ID, m.Role)
	}
	if m.Role != RoleCoordinator && m.Addr == "" {
		return fmt.Errorf("%w: member %s: an %s node needs its dispatch address (--listen)", ErrConfig, m.ID, m.Role)
	}
	if !m.State.valid() {
		return fmt.Errorf("%w: member %s: state %q", ErrConfig, m.ID, m.State)
	}
	if m.ExpertSlots < 0 || m.CacheBlocks < 0 || m.BlockSize < 0 {
		return fmt.Errorf("%w: member %s: negative capacity", ErrConfig, m.ID)
	}
	if m.Model.Hash == "" {
		return fmt.Errorf("%w: member %s: no model identity (IdentifyModel)", ErrConfig, m.ID)
	}
	return nil
}

func (m Member) marshal() string {
	b, err := json.Marshal(m)
	if err != nil {
		panic(err) // plain data: cannot fail
	}
	return string(b)
}

func decodeMember(v string) (Member, error) {
	var m Member
	if err := json.Unmarshal([]byte(v), &m); err != nil {
		return Member{}, fmt.Errorf("%w: member: %v", ErrCorrupt, err)
	}
	return m, nil
}

// DefaultNodeID is the id a node gets without --node-id: the host name
// (in Kubernetes, the pod name), role and port, sanitised to the id
// alphabet.
func DefaultNodeID(role Role, port int) string {
	host, err := os.Hostname()
	if err != nil || host == "" {
		host = "node"
	}
	id := sanitizeID(host) + "-" + string(role) + "-" + strconv.Itoa(port)
	if len(id) > 128 {
		id = id[len(id)-128:]
	}
	return id
}

// PortOf returns the port of a host:port listen address (0 if none).
func PortOf(addr string) int {
	_, p, err := net.SplitHostPort(addr)
	if err != nil {
		return 0
	}
	n, _ := strconv.Atoi(p)
	return n
}

func sanitizeID(s string) string {
	var b strings.Builder
	for _, r := range s {
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9', r == '.', r == '_', r == '-':
			b.WriteRune(r)
		default:
			b.WriteByte('-')
		}
	}
	if b.Len() == 0 {
		return "node"
	}
	return b.String()
}

// BuildVersion is the binary's main module version, or its VCS revision
// (with "+dirty" for a modified tree) for a development build.
func BuildVersion() string {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return "unknown"
	}
	if v := bi.Main.Version; v != "" && v != "(devel)" {
		return v
	}
	var rev, dirty string
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			rev = s.Value
		case "vcs.modified":
			if s.Value == "true" {
				dirty = "+dirty"
			}
		}
	}
	if rev == "" {
		return "(devel)"
	}
	if len(rev) > 12 {
		rev = rev[:12]
	}
	return rev + dirty
}
