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
	"math"
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
	// shares[layer][expert] is nil while every replica of the expert
	// serves an equal part of its tokens; otherwise each replica's part in
	// ShareUnits, aligned with replicas[layer][expert] and summing to
	// ShareUnit. shares itself is nil while no expert has unequal parts.
	shares [][][]uint16
}

// ShareUnit is the resolution of planned shares: a replica's part of its
// expert's tokens is a whole number of thousandths.
const ShareUnit = 1000

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
		if t.shares != nil && t.shares[l] != nil {
			t.shares[l][e] = nil // a new replica: equal parts again
		}
	}
	return nil
}

// SetShares sets the part of expert e of layer l's tokens each of its
// replicas is planned to serve: parts[r] for Replicas(l, e)[r], in any
// non-negative units (they are normalised, and rounded to ShareUnits by
// largest remainder). Parts that round to equal ones, and nil parts,
// mean equal shares.
func (t *Table) SetShares(l, e int, parts []float64) error {
	rs := t.Replicas(l, e)
	if len(rs) == 0 {
		return fmt.Errorf("%w: layer %d expert %d has no replica to share its tokens", ErrPlacement, l, e)
	}
	if parts == nil {
		t.setShares(l, e, nil)
		return nil
	}
	if len(parts) != len(rs) {
		return fmt.Errorf("%w: layer %d expert %d: %d shares for %d replicas", ErrPlacement, l, e, len(parts), len(rs))
	}
	sum := 0.0
	for _, v := range parts {
		if v < 0 || math.IsNaN(v) || math.IsInf(v, 0) {
			return fmt.Errorf("%w: layer %d expert %d: share %v", ErrPlacement, l, e, v)
		}
		sum += v
	}
	if sum <= 0 {
		return fmt.Errorf("%w: layer %d expert %d: shares sum to 0", ErrPlacement, l, e)
	}
	t.setShares(l, e, quantizeShares(parts, sum))
	return nil
}

// setShares stores q (ShareUnits summing to ShareUnit, or nil), as nil
// when it is the equal split.
func (t *Table) setShares(l, e int, q []uint16) {
	if q != nil && slices.Equal(q, equalShares(len(q))) {
		q = nil
	}
	if q == nil {
		if t.shares != nil && t.shares[l] != nil {
			t.shares[l][e] = nil
		}
		return
	}
	if t.shares == nil {
		t.shares = make([][][]uint16, len(t.replicas))
	}
	if t.shares[l] == nil {
		t.shares[l] = make([][]uint16, t.shape.Experts)
	}
	t.shares[l][e] = q
}

// quantizeShares rounds parts/sum to ShareUnits summing to ShareUnit:
// each part rounded down, the units left over going to the largest
// remainders (the lower replica on a tie).
func quantizeShares(parts []float64, sum float64) []uint16 {
	q := make([]uint16, len(parts))
	rem := make([]float64, len(parts))
	left := ShareUnit
	for r, v := range parts {
		x := v / sum * ShareUnit
		f := math.Floor(x)
		q[r] = uint16(min(f, ShareUnit))
		rem[r] = x - f
		left -= int(q[r])
	}
	for ; left > 0; left-- {
		best := 0
		for r := range rem {
			if rem[r] > rem[best] {
				best = r
			}
		}
		q[best]++
		rem[best] = -1
	}
	return q
}

// equalShares is the equal split of ShareUnit over k replicas, as
// quantizeShares rounds it.
func equalShares(k int) []uint16 {
	parts := make([]float64, k)
	for r := range parts {
		parts[r] = 1
	}
	return quantizeShares(parts, float64(k))
}

// sharesOf is the stored parts of expert e of layer l (nil: equal).
func (t *Table) sharesOf(l, e int) []uint16 {
	if t.shares == nil || l < 0 || l >= len(t.shares) || t.shares[l] == nil || e < 0 || e >= len(t.shares[l]) {
		return nil
	}
	return t.shares[l][e]
}

// Unequal reports whether expert e of layer l has planned shares other
// than equal ones.
func (t *Table) Unequal(l, e int) bool { return t.sharesOf(l, e) != nil }

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

// Validate checks that every expert of every MoE layer has a replica,
// and that planned shares fit the replicas.
func (t *Table) Validate() error {
	for _, l := range t.shape.MoELayers {
		for e, r := range t.replicas[l] {
			if len(r) == 0 {
				return fmt.Errorf("%w: version %d: layer %d expert %d has no replica", ErrPlacement, t.Version, l, e)
			}
			if q := t.sharesOf(l, e); q != nil {
				sum := 0
				for _, v := range q {
					sum += int(v)
				}
				if len(q) != len(r) || sum != ShareUnit {
					return fmt.Errorf("%w: version %d: layer %d expert %d: shares %v for %d replicas", ErrPlacement, t.Version, l, e, q, len(r))
				}
			}
		}
	}
	return nil
}

// Equal reports whether two tables assign the same experts to the same
// nodes with the same planned shares (versions aside; replica order
// aside).
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
	if t.shares == nil && o.shares == nil {
		return true
	}
	for _, l := range t.shape.MoELayers {
		for e := range t.shape.Experts {
			a, b := t.sharesOf(l, e), o.sharesOf(l, e)
			if (a == nil) != (b == nil) {
				return false
			}
			for r, v := range a {
				id := t.nodes[t.replicas[l][e][r]]
				if o.shareOfNode(l, e, id) != v {
					return false
				}
			}
		}
	}
	return true
}

// shareOfNode is node id's part of expert e of layer l in ShareUnits (0
// if it holds no replica; the equal split's part if shares are equal).
func (t *Table) shareOfNode(l, e int, id string) uint16 {
	rs := t.Replicas(l, e)
	for r, i := range rs {
		if t.nodes[i] == id {
			if q := t.sharesOf(l, e); q != nil {
				return q[r]
			}
			return equalShares(len(rs))[r]
		}
	}
	return 0
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

// nodeJSON is one node of the stored form. Shares, omitted when every
// expert the node holds splits its tokens equally among its replicas, is
// "L:E=Q,L:E=Q...": for each replicated expert with planned shares, the
// node's part in ShareUnits (thousandths). An expert with shares has one
// on every replica; they sum to ShareUnit. Tables written before shares
// existed have none and read back as equal shares.
type nodeJSON struct {
	ID      string `json:"id"`
	Experts string `json:"experts"`
	Shares  string `json:"shares,omitempty"`
}

// MarshalJSON encodes the table compactly: one --experts string per node,
// and its planned shares where they are not equal.
func (t *Table) MarshalJSON() ([]byte, error) {
	tj := tableJSON{Version: t.Version, Nodes: []nodeJSON{}}
	for i, id := range t.nodes {
		tj.Nodes = append(tj.Nodes, nodeJSON{ID: id, Experts: t.Spec(id), Shares: t.sharesSpec(uint16(i))})
	}
	return json.Marshal(tj)
}

// sharesSpec renders node i's planned shares (nodeJSON.Shares).
func (t *Table) sharesSpec(i uint16) string {
	if t.shares == nil {
		return ""
	}
	var b strings.Builder
	for _, l := range t.shape.MoELayers {
		for e := range t.shape.Experts {
			q := t.sharesOf(l, e)
			if q == nil {
				continue
			}
			if r := slices.Index(t.replicas[l][e], i); r >= 0 {
				if b.Len() > 0 {
					b.WriteByte(',')
				}
				fmt.Fprintf(&b, "%d:%d=%d", l, e, q[r])
			}
		}
	}
	return b.String()
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
	// Shares, once every replica is known: per (layer, expert), a part for
	// each replica, in replica order.
	type key struct{ l, e int }
	parts := map[key][]float64{}
	for _, n := range tj.Nodes {
		if n.Shares == "" {
			continue
		}
		i := t.nodeIndex(n.ID, false)
		for item := range strings.SplitSeq(n.Shares, ",") {
			var l, e, q int
			if _, err := fmt.Sscanf(item, "%d:%d=%d", &l, &e, &q); err != nil || fmt.Sprintf("%d:%d=%d", l, e, q) != item {
				return nil, fmt.Errorf("%w: version %d node %s: shares entry %q: want LAYER:EXPERT=THOUSANDTHS", ErrPlacement, tj.Version, n.ID, item)
			}
			rs := t.Replicas(l, e)
			r := slices.Index(rs, uint16(i))
			if r < 0 || q < 0 || q > ShareUnit {
				return nil, fmt.Errorf("%w: version %d node %s: shares entry %q names a replica the node does not hold", ErrPlacement, tj.Version, n.ID, item)
			}
			k := key{l, e}
			if parts[k] == nil {
				parts[k] = make([]float64, len(rs))
				for x := range parts[k] {
					parts[k][x] = -1
				}
			}
			parts[k][r] = float64(q)
		}
	}
	for k, p := range parts {
		if slices.Contains(p, -1) {
			return nil, fmt.Errorf("%w: version %d: layer %d expert %d has shares on some replicas only", ErrPlacement, tj.Version, k.l, k.e)
		}
		if err := t.SetShares(k.l, k.e, p); err != nil {
			return nil, fmt.Errorf("version %d: %w", tj.Version, err)
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
