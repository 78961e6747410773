package placement

import (
	"math"
	"slices"
)

// shareRounds bounds the rounds of splitShares' coordinate descent; it
// stops earlier once no share moves by more than a millionth of the
// layer's load, far below the ShareUnit it rounds to.
const shareRounds = 200

// splitShares decides how each replicated expert of one layer splits its
// tokens over its replicas: w[e] is expert e's load, on[e] the nodes
// (0..N-1, sorted) holding it. It returns, per expert, the replicas'
// parts in ShareUnits aligned with on[e] (nil where they are equal, or
// the expert has one replica or no load), and each node's load with
// those parts, summed in expert order as Imbalance sums it.
//
// The split minimises Σ_n load(n)², whose minimiser on these constraints
// (each expert's load spread over its own nodes) also has the smallest
// possible maximum: it is the lexicographically most even split (the
// min-norm base of a polymatroid, Fujishige). It is found by block
// coordinate descent: in turn, each expert's load is poured over its
// nodes as water fills vessels (the least loaded first, up to a common
// level), the others held still. Loads only ever move from a busier node
// to a lighter one, so the experts with one replica, which cannot move,
// are balanced around; a node busy with those gets less of a shared one.
func splitShares(w []float64, on [][]int, N int) (parts [][]uint16, load []float64) {
	E := len(w)
	load = make([]float64, N)
	x := make([][]float64, E)
	var shared []int
	total := 0.0
	for e, ns := range on {
		if w[e] <= 0 || len(ns) == 0 {
			continue
		}
		total += w[e]
		x[e] = make([]float64, len(ns))
		for r, n := range ns {
			x[e][r] = w[e] / float64(len(ns))
			load[n] += x[e][r]
		}
		if len(ns) > 1 {
			shared = append(shared, e)
		}
	}
	if len(shared) > 0 {
		var others []float64
		var order []int
		for range shareRounds {
			moved := 0.0
			for _, e := range shared {
				ns := on[e]
				others = others[:0]
				for r, n := range ns {
					others = append(others, load[n]-x[e][r])
				}
				level := waterLevel(others, w[e], &order)
				for r, n := range ns {
					v := max(0, level-others[r])
					moved = max(moved, math.Abs(v-x[e][r]))
					x[e][r] = v
					load[n] = others[r] + v
				}
			}
			if moved <= 1e-6*total {
				break
			}
		}
	}
	parts = make([][]uint16, E)
	for _, e := range shared {
		q := quantizeShares(x[e], w[e])
		if !slices.Equal(q, equalShares(len(q))) {
			parts[e] = q
		}
	}
	load = sharedLoads(w, on, parts, N)
	// Rounding to ShareUnits can cost a hair of balance; where equal
	// shares balance as well, they are the ones kept.
	if equal := sharedLoads(w, on, nil, N); slices.Max(equal) <= slices.Max(load) {
		return make([][]uint16, E), equal
	}
	return parts, load
}

// waterLevel is the level λ with Σ_r max(0, λ − base[r]) = amount
// (amount > 0). order is scratch.
func waterLevel(base []float64, amount float64, order *[]int) float64 {
	o := (*order)[:0]
	for r := range base {
		o = append(o, r)
	}
	slices.SortStableFunc(o, func(a, b int) int { return cmpFloat(base[a], base[b]) })
	*order = o
	sum := 0.0
	for j, r := range o {
		sum += base[r]
		level := (sum + amount) / float64(j+1)
		if j == len(o)-1 || level <= base[o[j+1]] {
			return level
		}
	}
	return math.Inf(1) // unreachable: the last vessel always takes the rest
}

// sharedLoads is each node's load when expert e's replicas on on[e]
// serve parts[e] (ShareUnits; nil: equal parts), summed in expert order
// with the products Table.Share gives, as Imbalance computes it.
func sharedLoads(w []float64, on [][]int, parts [][]uint16, N int) []float64 {
	load := make([]float64, N)
	for e, ns := range on {
		for r, n := range ns {
			share := 1 / float64(len(ns))
			if parts != nil && parts[e] != nil {
				share = float64(parts[e][r]) / ShareUnit
			}
			load[n] += w[e] * share
		}
	}
	return load
}

// nodesOf lists, per expert, the nodes that hold it in the layer as
// planned, sorted.
func (ly *layer) nodesOf() [][]int {
	E, N := ly.p.E, len(ly.load)
	on := make([][]int, E)
	for n := range N {
		for e := range E {
			if ly.holds[n*E+e] {
				on[e] = append(on[e], n)
			}
		}
	}
	return on
}

// currentLayout returns, when layer moe[li] of the current placement
// holds exactly what on says on usable nodes, its planned parts aligned
// with on (nil rows: equal); ok is false otherwise.
func (p *planner) currentLayout(li int, on [][]int) (parts [][]uint16, ok bool) {
	c, l := p.in.Current, p.moe[li]
	if c == nil {
		return nil, false
	}
	parts = make([][]uint16, p.E)
	for e := range p.E {
		rs := c.replicas[l][e]
		if len(rs) != len(on[e]) {
			return nil, false
		}
		q := c.sharesOf(l, e)
		if q != nil {
			parts[e] = make([]uint16, len(rs))
		}
		for r, i := range rs {
			n := p.curNode[i]
			k := slices.Index(on[e], n)
			if n < 0 || k < 0 {
				return nil, false
			}
			if q != nil {
				parts[e][k] = q[r]
			}
		}
	}
	return parts, true
}
