package placement

import (
	"fmt"
	"strconv"
	"strings"
)

// Set is a set of routed experts: held[layer][expert], with nil rows for
// dense layers. It is what one expert node holds, or what a placement
// version assigns to one node.
type Set [][]bool

// NewSet returns the empty set for shape.
func NewSet(shape Shape) Set {
	s := make(Set, shape.Layers)
	for _, l := range shape.MoELayers {
		s[l] = make([]bool, shape.Experts)
	}
	return s
}

// Has reports whether expert e of layer l is in the set.
func (s Set) Has(l, e int) bool {
	return l >= 0 && l < len(s) && e >= 0 && e < len(s[l]) && s[l][e]
}

// Len counts the experts in the set.
func (s Set) Len() int {
	n := 0
	for _, row := range s {
		for _, h := range row {
			if h {
				n++
			}
		}
	}
	return n
}

// Pairs lists the set's (layer, expert) pairs in layer then expert order.
func (s Set) Pairs() [][2]int {
	var out [][2]int
	for l, row := range s {
		for e, h := range row {
			if h {
				out = append(out, [2]int{l, e})
			}
		}
	}
	return out
}

// Clone returns an independent copy.
func (s Set) Clone() Set {
	c := make(Set, len(s))
	for l, row := range s {
		if row != nil {
			c[l] = append([]bool(nil), row...)
		}
	}
	return c
}

// Union adds every expert of o to s (same shape) and returns s.
func (s Set) Union(o Set) Set {
	for l, row := range o {
		for e, h := range row {
			if h && l < len(s) && e < len(s[l]) {
				s[l][e] = true
			}
		}
	}
	return s
}

// Minus returns the experts of s that are not in o, as a new set.
func (s Set) Minus(o Set) Set {
	c := s.Clone()
	for l, row := range c {
		for e := range row {
			if o.Has(l, e) {
				row[e] = false
			}
		}
	}
	return c
}

// Range is experts [First, Last] of one layer.
type Range struct {
	Layer, First, Last int
}

// Ranges compresses the set into maximal runs, by layer then expert.
func (s Set) Ranges() []Range {
	var out []Range
	for l, row := range s {
		for x := 0; x < len(row); {
			if !row[x] {
				x++
				continue
			}
			y := x
			for y+1 < len(row) && row[y+1] {
				y++
			}
			out = append(out, Range{Layer: l, First: x, Last: y})
			x = y + 1
		}
	}
	return out
}

// String renders the set in the --experts grammar, one "L:a-b" entry per
// run ("" for the empty set); ParseSet reads it back.
func (s Set) String() string {
	var parts []string
	for _, r := range s.Ranges() {
		if r.First == r.Last {
			parts = append(parts, fmt.Sprintf("%d:%d", r.Layer, r.First))
		} else {
			parts = append(parts, fmt.Sprintf("%d:%d-%d", r.Layer, r.First, r.Last))
		}
	}
	return strings.Join(parts, ",")
}

// ParseSet reads the one grammar every --experts and --placement value
// uses:
//
//	spec   = "" | "none" | "all" | entry { "," entry }
//	entry  = [ range ":" ] ( range | "all" )    // layers ":" experts
//	range  = N | N "-" M                         // inclusive, N <= M
//
// An entry without layers means those experts of every MoE layer. A spec
// naming a dense layer, a layer past the model or an expert past the
// routed experts is an error: a typo in a placement must not silently
// hold nothing.
func ParseSet(shape Shape, spec string) (Set, error) {
	set := NewSet(shape)
	spec = strings.TrimSpace(spec)
	switch spec {
	case "", "none":
		return set, nil
	case "all":
		for _, l := range shape.MoELayers {
			for e := range set[l] {
				set[l][e] = true
			}
		}
		return set, nil
	}
	for part := range strings.SplitSeq(spec, ",") {
		part = strings.TrimSpace(part)
		if part == "" {
			return nil, fmt.Errorf("%w: experts %q: empty entry", ErrPlacement, spec)
		}
		layers := shape.MoELayers
		experts := part
		if ls, rest, ok := strings.Cut(part, ":"); ok {
			lo, hi, err := parseRange(ls)
			if err != nil {
				return nil, fmt.Errorf("%w: experts %q: layers of %q: %v", ErrPlacement, spec, part, err)
			}
			if hi >= shape.Layers {
				return nil, fmt.Errorf("%w: experts %q: layer %d, the model has %d layers", ErrPlacement, spec, hi, shape.Layers)
			}
			layers = nil
			for l := lo; l <= hi; l++ {
				if set[l] == nil {
					return nil, fmt.Errorf("%w: experts %q: layer %d is dense (no routed experts)", ErrPlacement, spec, l)
				}
				layers = append(layers, l)
			}
			experts = rest
		}
		first, last := 0, shape.Experts-1
		if strings.TrimSpace(experts) != "all" {
			var err error
			if first, last, err = parseRange(experts); err != nil {
				return nil, fmt.Errorf("%w: experts %q: experts of %q: %v", ErrPlacement, spec, part, err)
			}
			if last >= shape.Experts {
				return nil, fmt.Errorf("%w: experts %q: expert %d, the model has %d routed experts", ErrPlacement, spec, last, shape.Experts)
			}
		}
		for _, l := range layers {
			for e := first; e <= last; e++ {
				set[l][e] = true
			}
		}
	}
	return set, nil
}

// CheckSyntax checks a spec's grammar without a model, for config
// validation before the model is read.
func CheckSyntax(spec string) error {
	// The widest shape any index allows: every number parses, and only
	// syntax can fail.
	spec = strings.TrimSpace(spec)
	if spec == "" || spec == "none" || spec == "all" {
		return nil
	}
	for part := range strings.SplitSeq(spec, ",") {
		part = strings.TrimSpace(part)
		if part == "" {
			return fmt.Errorf("%w: experts %q: empty entry", ErrPlacement, spec)
		}
		experts := part
		if ls, rest, ok := strings.Cut(part, ":"); ok {
			if _, _, err := parseRange(ls); err != nil {
				return fmt.Errorf("%w: experts %q: layers of %q: %v", ErrPlacement, spec, part, err)
			}
			experts = rest
		}
		if strings.TrimSpace(experts) == "all" {
			continue
		}
		if _, _, err := parseRange(experts); err != nil {
			return fmt.Errorf("%w: experts %q: experts of %q: %v", ErrPlacement, spec, part, err)
		}
	}
	return nil
}

// maxIndex keeps parsed numbers far from overflow; no model has a million
// layers or experts.
const maxIndex = 1 << 20

func parseRange(s string) (lo, hi int, err error) {
	s = strings.TrimSpace(s)
	a, b, isRange := strings.Cut(s, "-")
	if lo, err = parseIndex(a); err != nil {
		return 0, 0, err
	}
	hi = lo
	if isRange {
		if hi, err = parseIndex(b); err != nil {
			return 0, 0, err
		}
	}
	if lo > hi {
		return 0, 0, fmt.Errorf("range %q is empty (%d > %d)", s, lo, hi)
	}
	return lo, hi, nil
}

func parseIndex(s string) (int, error) {
	s = strings.TrimSpace(s)
	v, err := strconv.Atoi(s)
	if err != nil || v < 0 || v > maxIndex {
		return 0, fmt.Errorf("%q is not an index (0..%d)", s, maxIndex)
	}
	return v, nil
}
