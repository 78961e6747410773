// Package placement maps routed experts to the expert nodes that hold
// them. A Table is an immutable snapshot: (layer, expert) → replica
// addresses. A Source hands out the current table; the static source here
// serves a fixed table, and an etcd-backed source can swap versions
// make-before-break behind the same interface.
package placement

import (
	"errors"
	"fmt"
	"sort"
	"strconv"
	"strings"
)

// ErrPlacement marks an invalid or incomplete placement.
var ErrPlacement = errors.New("placement")

// Shape is what a table needs to know about the model.
type Shape struct {
	Layers    int   // decoder layers
	Experts   int   // routed experts per MoE layer
	Groups    int   // expert groups (1 when routing ignores groups)
	MoELayers []int // indices of MoE layers
}

// Table is one placement version. Safe for concurrent reads; never
// mutated after construction.
type Table struct {
	Version uint64
	shape   Shape
	// replicas[layer][expert] lists addresses; nil for dense layers.
	replicas [][][]string
}

// Source yields the placement currently in force.
type Source interface {
	Current() *Table
}

// Static is a Source that never changes.
type Static struct{ T *Table }

// Current implements Source.
func (s Static) Current() *Table { return s.T }

// NewTable returns an empty table for shape.
func NewTable(shape Shape, version uint64) *Table {
	t := &Table{Version: version, shape: shape, replicas: make([][][]string, shape.Layers)}
	for _, l := range shape.MoELayers {
		t.replicas[l] = make([][]string, shape.Experts)
	}
	return t
}

// Add records that addr holds expert e of layer l.
func (t *Table) Add(l, e int, addr string) error {
	if l < 0 || l >= len(t.replicas) || t.replicas[l] == nil {
		return fmt.Errorf("%w: layer %d is not an MoE layer", ErrPlacement, l)
	}
	if e < 0 || e >= t.shape.Experts {
		return fmt.Errorf("%w: expert %d outside [0,%d)", ErrPlacement, e, t.shape.Experts)
	}
	for _, a := range t.replicas[l][e] {
		if a == addr {
			return nil
		}
	}
	t.replicas[l][e] = append(t.replicas[l][e], addr)
	return nil
}

// Replicas lists the addresses holding expert e of layer l, preferred
// first. The slice must not be modified.
func (t *Table) Replicas(l, e int) []string {
	if l < 0 || l >= len(t.replicas) || e < 0 || e >= len(t.replicas[l]) {
		return nil
	}
	return t.replicas[l][e]
}

// Validate checks that every expert of every MoE layer has a replica.
func (t *Table) Validate() error {
	for _, l := range t.shape.MoELayers {
		for e, r := range t.replicas[l] {
			if len(r) == 0 {
				return fmt.Errorf("%w: layer %d expert %d has no replica", ErrPlacement, l, e)
			}
		}
	}
	return nil
}

// Nodes lists every address in the table, sorted.
func (t *Table) Nodes() []string {
	seen := map[string]bool{}
	for _, l := range t.shape.MoELayers {
		for _, r := range t.replicas[l] {
			for _, a := range r {
				seen[a] = true
			}
		}
	}
	out := make([]string, 0, len(seen))
	for a := range seen {
		out = append(out, a)
	}
	sort.Strings(out)
	return out
}

// Spec renders what addr holds in the expert node's --experts syntax:
// "L:a-b,L:c-d,...".
func (t *Table) Spec(addr string) string {
	var parts []string
	for _, l := range t.shape.MoELayers {
		start := -1
		for e := 0; e <= t.shape.Experts; e++ {
			held := e < t.shape.Experts && contains(t.replicas[l][e], addr)
			switch {
			case held && start < 0:
				start = e
			case !held && start >= 0:
				parts = append(parts, fmt.Sprintf("%d:%d-%d", l, start, e-1))
				start = -1
			}
		}
	}
	return strings.Join(parts, ",")
}

func contains(xs []string, s string) bool {
	for _, x := range xs {
		if x == s {
			return true
		}
	}
	return false
}

// Even splits every MoE layer's experts across nodes in contiguous ranges,
// cut on group boundaries when there are at least as many groups as nodes:
// with group-limited routing a token then reaches at most topk_group nodes.
func Even(shape Shape, nodes []string) (*Table, error) {
	if len(nodes) == 0 {
		return nil, fmt.Errorf("%w: no expert nodes", ErrPlacement)
	}
	t := NewTable(shape, 1)
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

// ParseSpec reads "ADDR=SPEC;ADDR=SPEC" where SPEC is the expert node's
// --experts syntax: "a-b" (those experts of every MoE layer) or
// "L:a-b,L:c-d". Repeating an expert on several addresses makes replicas.
func ParseSpec(shape Shape, s string) (*Table, error) {
	t := NewTable(shape, 1)
	for _, part := range strings.Split(s, ";") {
		part = strings.TrimSpace(part)
		if part == "" {
			continue
		}
		addr, spec, ok := strings.Cut(part, "=")
		if !ok || addr == "" {
			return nil, fmt.Errorf("%w: %q: want ADDR=EXPERTS", ErrPlacement, part)
		}
		held, err := ParseExperts(shape, spec)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", addr, err)
		}
		for _, le := range held {
			if err := t.Add(le[0], le[1], addr); err != nil {
				return nil, err
			}
		}
	}
	return t, t.Validate()
}

// ParseExperts reads an --experts spec into (layer, expert) pairs.
func ParseExperts(shape Shape, spec string) ([][2]int, error) {
	var out [][2]int
	for _, item := range strings.Split(spec, ",") {
		item = strings.TrimSpace(item)
		if item == "" {
			continue
		}
		layers := shape.MoELayers
		rng := item
		if l, r, ok := strings.Cut(item, ":"); ok {
			li, err := strconv.Atoi(l)
			if err != nil {
				return nil, fmt.Errorf("%w: layer %q in %q", ErrPlacement, l, item)
			}
			layers, rng = []int{li}, r
		}
		lo, hi, err := parseRange(rng)
		if err != nil {
			return nil, fmt.Errorf("%w: %q: %v", ErrPlacement, item, err)
		}
		if lo < 0 || hi >= shape.Experts || lo > hi {
			return nil, fmt.Errorf("%w: %q: experts must be within [0,%d)", ErrPlacement, item, shape.Experts)
		}
		for _, l := range layers {
			for e := lo; e <= hi; e++ {
				out = append(out, [2]int{l, e})
			}
		}
	}
	return out, nil
}

func parseRange(s string) (int, int, error) {
	a, b, ok := strings.Cut(s, "-")
	lo, err := strconv.Atoi(strings.TrimSpace(a))
	if err != nil {
		return 0, 0, err
	}
	if !ok {
		return lo, lo, nil
	}
	hi, err := strconv.Atoi(strings.TrimSpace(b))
	return lo, hi, err
}
