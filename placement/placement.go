// Package placement decides and describes which expert node holds which
// routed expert. It does no I/O: a Table is one immutable placement
// version, (layer, expert) → replicas named by node id; Plan computes the
// next version from the current one and the live nodes; Set and ParseSet
// are the one grammar of --experts and --placement values. Where versions
// are stored and how nodes switch between them is the control plane's
// business (package controlplane).
package placement

import (
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
)

// ErrPlacement marks an invalid or incomplete placement.
var ErrPlacement = errors.New("placement")

// Shape is what a table needs to know about the model.
type Shape struct {
	Layers    int   // decoder layers
	Experts   int   // routed experts per MoE layer
	Groups    int   // expert groups (1 when routing ignores groups)
	TopKGroup int   // groups a token may reach (0: routing ignores groups)
	MoELayers []int // indices of MoE layers
}

// Table is one placement version. Safe for concurrent reads; never
// mutated once published (Add is for building one).
type Table struct {
	// Version increases with every published placement; 0 is a static
	// placement that never changes.
	Version uint64
	shape   Shape
	// nodes are the node ids the table names, in first-added order.
	nodes []string
	// replicas[layer][expert] indexes nodes; nil rows for dense layers.
	replicas [][][]uint16
}

// NewTable returns an empty table for shape.
func NewTable(shape Shape, version uint64) *Table {
	t := &Table{Version: version, shape: shape, replicas: make([][][]uint16, shape.Layers)}
	for _, l := range shape.MoELayers {
		t.replicas[l] = make([][]uint16, shape.Experts)
	}
	return t
}

// Shape is the model shape the table was built for.
func (t *Table) Shape() Shape { return t.shape }

// nodeIndex returns id's index, adding it when add is set (-1 if absent).
func (t *Table) nodeIndex(id string, add bool) int {
	if i := slices.Index(t.nodes, id); i >= 0 || !add {
		return i
	}
	t.nodes = append(t.nodes, id)
	return len(t.nodes) - 1
}

// Add records that node id holds expert e of layer l.
func (t *Table) Add(l, e int, id string) error {
	if l < 0 || l >= len(t.replicas) || t.replicas[l] == nil {
		return fmt.Errorf("%w: layer %d is not an MoE layer", ErrPlacement, l)
	}
	if e < 0 || e >= t.shape.Experts {
		return fmt.Errorf("%w: expert %d outside [0,%d)", ErrPlacement, e, t.shape.Experts)
	}
	if id == "" {
		return fmt.Errorf("%w: empty node id", ErrPlacement)
	}
	i := t.nodeIndex(id, true)
	if len(t.nodes) > 1<<16 {
		return fmt.Errorf("%w: more than %d nodes", ErrPlacement, 1<<16)
	}
	if !slices.Contains(t.replicas[l][e], uint16(i)) {
		t.replicas[l][e] = append(t.replicas[l][e], uint16(i))
	}
	return nil
}

// AddSet records that node id holds every expert of s.
func (t *Table) AddSet(id string, s Set) error {
	for _, p := range s.Pairs() {
		if err := t.Add(p[0], p[1], id); err != nil {
			return err
		}
	}
	return nil
}

// Replicas lists the indexes (into Nodes) of the nodes holding expert e of
// layer l, preferred first. The slice must not be modified.
func (t *Table) Replicas(l, e int) []uint16 {
	if l < 0 || l >= len(t.replicas) || e < 0 || e >= len(t.replicas[l]) {
		return nil
	}
	return t.replicas[l][e]
}

// ReplicaIDs lists the ids of the nodes holding expert e of layer l.
func (t *Table) ReplicaIDs(l, e int) []string {
	var out []string
	for _, i := range t.Replicas(l, e) {
		out = append(out, t.nodes[i])
	}
	return out
}

// Nodes lists the node ids the table names; Replicas indexes it. The slice
// must not be modified.
func (t *Table) Nodes() []string { return t.nodes }

// Has reports whether the table assigns anything to node id.
func (t *Table) Has(id string) bool { return t.nodeIndex(id, false) >= 0 }

// Set is what the table assigns to node id.
func (t *Table) Set(id string) Set {
	s := NewSet(t.shape)
	i := t.nodeIndex(id, false)
	if i < 0 {
		return s
	}
	for _, l := range t.shape.MoELayers {
		for e, r := range t.replicas[l] {
			if slices.Contains(r, uint16(i)) {
				s[l][e] = true
			}
		}
	}
	return s
}

// Spec renders what node id holds in the --experts grammar.
func (t *Table) Spec(id string) string { return t.Set(id).String() }

// Validate checks that every expert of every MoE layer has a replica.
func (t *Table) Validate() error {
	for _, l := range t.shape.MoELayers {
		for e, r := range t.replicas[l] {
			if len(r) == 0 {
				return fmt.Errorf("%w: version %d: layer %d expert %d has no replica", ErrPlacement, t.Version, l, e)
			}
		}
	}
	return nil
}

// Equal reports whether two tables assign the same experts to the same
// nodes (versions aside; replica order aside).
func (t *Table) Equal(o *Table) bool {
	if t == nil || o == nil {
		return t == o
	}
	ids := slices.Clone(t.nodes)
	for _, id := range o.nodes {
		if !slices.Contains(ids, id) {
			ids = append(ids, id)
		}
	}
	for _, id := range ids {
		if t.Spec(id) != o.Spec(id) {
			return false
		}
	}
	return true
}

// ParseSpec reads "ID=EXPERTS;ID=EXPERTS", EXPERTS in the ParseSet
// grammar, as a static table (version 0). Repeating an expert on several
// nodes makes replicas.
func ParseSpec(shape Shape, s string) (*Table, error) {
	t := NewTable(shape, 0)
	for part := range strings.SplitSeq(s, ";") {
		part = strings.TrimSpace(part)
		if part == "" {
			continue
		}
		id, spec, ok := strings.Cut(part, "=")
		if !ok || strings.TrimSpace(id) == "" {
			return nil, fmt.Errorf("%w: %q: want NODE=EXPERTS", ErrPlacement, part)
		}
		set, err := ParseSet(shape, spec)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", id, err)
		}
		if err := t.AddSet(strings.TrimSpace(id), set); err != nil {
			return nil, err
		}
	}
	return t, t.Validate()
}

// tableJSON is a table's stored form: per node, its experts in the
// --experts grammar. Node order is replica preference order.
type tableJSON struct {
	Version uint64     `json:"version"`
	Nodes   []nodeJSON `json:"nodes"`
}

type nodeJSON struct {
	ID      string `json:"id"`
	Experts string `json:"experts"`
}

// MarshalJSON encodes the table compactly: one --experts string per node.
func (t *Table) MarshalJSON() ([]byte, error) {
	tj := tableJSON{Version: t.Version, Nodes: []nodeJSON{}}
	for _, id := range t.nodes {
		tj.Nodes = append(tj.Nodes, nodeJSON{ID: id, Experts: t.Spec(id)})
	}
	return json.Marshal(tj)
}

// DecodeTable reads a table MarshalJSON wrote, checking it against shape:
// a stored placement written for another model is an error, not a
// silently wrong routing.
func DecodeTable(shape Shape, data []byte) (*Table, error) {
	var tj tableJSON
	if err := json.Unmarshal(data, &tj); err != nil {
		return nil, fmt.Errorf("%w: decoding a stored table: %v", ErrPlacement, err)
	}
	t := NewTable(shape, tj.Version)
	for _, n := range tj.Nodes {
		set, err := ParseSet(shape, n.Experts)
		if err != nil {
			return nil, fmt.Errorf("version %d node %s: %w", tj.Version, n.ID, err)
		}
		if err := t.AddSet(n.ID, set); err != nil {
			return nil, err
		}
	}
	return t, t.Validate()
}

// Even splits every MoE layer's experts across nodes in contiguous ranges,
// cut on group boundaries when there are at least as many groups as nodes:
// with group-limited routing a token then reaches at most topk_group nodes.
func Even(shape Shape, nodes []string, version uint64) (*Table, error) {
	if len(nodes) == 0 {
		return nil, fmt.Errorf("%w: no expert nodes", ErrPlacement)
	}
	t := NewTable(shape, version)
	unit := 1
	if shape.Groups > 1 && shape.Groups >= len(nodes) && shape.Experts%shape.Groups == 0 {
		unit = shape.Experts / shape.Groups
	}
	units := shape.Experts / unit
	for _, l := range shape.MoELayers {
		for u := range units {
			node := nodes[u*len(nodes)/units]
			for e := u * unit; e < (u+1)*unit; e++ {
				if err := t.Add(l, e, node); err != nil {
					return nil, err
				}
			}
		}
	}
	return t, t.Validate()
}
