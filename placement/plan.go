package placement

import (
	"fmt"
	"math"
	"slices"
	"strings"
)

// Node is an expert node the planner may assign experts to.
type Node struct {
	ID string
	// Slots is the most experts (replicas, counted over all layers) the
	// node may hold. 0 means no limit; a negative value means nothing at
	// all: a node that is live but drained keeps serving the version in
	// force, and the next version moves everything it held elsewhere.
	Slots int
}

// PlanInput is everything Plan decides from. It is plain data: no clock,
// no I/O.
type PlanInput struct {
	Shape Shape
	// Nodes are the live expert nodes that may hold experts (draining
	// nodes are left out by the caller, or given negative Slots). Their
	// order does not matter.
	Nodes []Node
	// Current is the placement in force (nil: none yet). Replicas on nodes
	// that are not in Nodes (or have negative Slots) are lost; everything
	// else stays where it is unless moving it buys enough balance.
	Current *Table
	// Version is the version the result carries.
	Version uint64
	// Load is the observed load per [layer][expert] (tokens routed); nil
	// means uniform, and so does a nil or all-zero row of an MoE layer.
	// Rows of dense layers are ignored.
	Load [][]float64
	// Redundant is how many extra replicas each MoE layer may have beyond
	// one per routed expert, as in DeepSeek's EPLB (num_replicas =
	// num_logical_experts + redundant, per layer). They go to the hottest
	// experts. Fewer are placed where the nodes' slots cannot take them
	// (every layer then gets the same smaller number) or where a node
	// would have to hold one expert twice.
	Redundant int
}

// moveThreshold is the migration-cost term. Keeping a replica where it is
// costs nothing; loading one where it was not costs 1 (every routed expert
// of a model has the same bytes). A rebalancing step that loads k replicas
// somewhere new is taken only if it cuts the busiest affected node's load
// by more than k × moveThreshold × the layer's mean node load: each expert
// copied must buy at least 1% of the layer's step time.
//
// The trade-off: at 0 the planner chases every fluctuation of the observed
// load, re-copying experts for gains the next measurement undoes; larger
// values leave more imbalance in place (a layer within about 1% per move
// of its best stays as it is, so a placement the planner made is stable
// under small changes of load), and a swap, which copies two experts,
// must buy 2%. Steps that membership forces pay no threshold: replicas
// lost with a node, a node over its slots, and filling a node that holds
// fewer replicas than its fair count (what a join is for; such a move
// must still lower the busier node's load).
const moveThreshold = 0.01

// countSlack bounds how far a node's replica count in a layer may stray
// from its fair count: by one in countSlack of it, rounded up (upwards
// only where the node's slots leave that room in every layer). Equal
// counts (DeepSeek's balanced_packing packs exactly n/m replicas per GPU)
// keep memory and per-step weight reads even across nodes, but pin a node
// that holds a hot expert to as many others as everyone; the slack lets
// it hand a cold one or two to a lighter node. Without an upper bound,
// experts with no observed load would pile onto the least loaded node;
// without a lower one, a node that joins would take a few hot experts and
// sit idle on memory, and its peers would read four times its weights.
const countSlack = 8

// Plan computes the next placement: every routed expert of every MoE
// layer on at least one node of in.Nodes, no node over its slots, no node
// holding one expert twice. It is deterministic: the same input gives the
// same table, byte for byte, whatever the order of in.Nodes; and planning
// again from its result, with nothing else changed, changes nothing.
//
// Per MoE layer it minimises the imbalance (the busiest node's load over
// the mean node's, see Imbalance), subject to the migration cost
// (moveThreshold). Replicas are placed as if each served an equal share
// of its expert's load; once the layout is final, each replicated
// expert's tokens are split over its replicas in planned shares, unequal
// where that evens the nodes out (see splitShares; the table carries
// them, Share reads them, attention nodes split an expert's rows by them
// where a dispatch has many, and send an expert with few whole to the
// replica that evens out that dispatch). Shares cost no
// migration: they change where rows go, not what any node holds. Where a
// layer's layout did not change, its stored shares stay unless new ones
// balance better.
//
//   - Replica counts follow DeepSeek's replicate_experts: one replica per
//     expert, and the layer's in.Redundant extra ones given one at a time
//     to the expert with the most load per replica. From a current
//     placement its counts are kept (topped up or trimmed to the budget);
//     rebalancing may then turn an extra replica of a cold expert into
//     one more of a hot one.
//   - Each node has a fair replica count per layer: the layer's replicas
//     spread evenly, nodes with few slots holding what they can and the
//     others sharing the rest. Counts may stray from it by countSlack.
//   - A layer with nothing to keep (no current placement, or none of it
//     survives) is packed as DeepSeek's balanced_packing does, heaviest
//     replica first onto the least loaded node that has room and lacks
//     that expert, and also cut into contiguous ranges (when the load is
//     near uniform, see contiguousSlack); both are improved by local
//     search and the better kept, the ranges on a tie.
//   - Otherwise replicas stay where they are. Replicas lost with nodes
//     that left go to the least loaded survivors; a node that joined is
//     filled to its fair count less the slack from the busiest nodes.
//     Then a local search moves or swaps replicas off the busiest node,
//     or turns an extra replica to a hotter expert, one step at a time,
//     while a step pays for itself. With the same nodes as the current
//     placement, no layer ends worse balanced than it was, both with
//     their shares (see guard).
//
// Group-limited routing (Shape.Groups > 1, 0 < TopKGroup < Groups): when
// the groups divide evenly among the nodes (Groups % nodes == 0, groups
// of two or more experts, slots enough for a node's share), and planned
// afresh that balances within groupTolerance of global packing, each node
// holds Groups/nodes whole groups, packed by group load, so a token's
// experts are on at most TopKGroup nodes. Only the extra replicas go
// wherever they balance best (DeepSeek replicates within a server node; a
// node of ours cannot hold two copies of one expert). Otherwise packing
// is global: with more nodes than groups, groups that do not divide
// evenly, or group loads too unequal. A group then spans as few nodes as
// the contiguous layout needs (nodes/Groups of them when that divides)
// where the load is near uniform, and whatever nodes balance best where
// it is not.
//
// The result carries in.Version. An error wraps ErrPlacement: no usable
// nodes, too few slots for one replica of every expert, or malformed input.
func Plan(in PlanInput) (*Table, error) {
	p, err := newPlanner(in)
	if err != nil {
		return nil, err
	}
	if p == nil { // no MoE layers: nothing to place
		return NewTable(in.Shape, in.Version), nil
	}
	return p.run()
}

// planner holds what every layer shares: the usable nodes, their slots,
// the fair replica counts and the group policy.
type planner struct {
	in    PlanInput
	shape Shape
	E     int
	moe   []int    // MoE layer indices
	ids   []string // usable nodes, sorted by id; "node n" below is ids[n]
	slots []int    // replicas node n may hold over all layers
	// free is what node n may still take, as the plan stands: slots less
	// the replicas it holds in every layer (and, with whole groups, less
	// every layer's group replicas, reserved up front).
	free []int
	R    int     // replicas per layer: E plus the extra ones that fit
	fair [][]int // fair[li][n]: node n's fair replica count in layer moe[li]
	// most[li][n] and least[li][n] bound node n's replica count in layer
	// moe[li]: its fair count, give or take countSlack.
	most, least [][]int
	// grouped: every node holds gpn whole groups of gs experts, in every
	// layer but those marked ungrouped.
	grouped   bool
	ungrouped []bool
	gs, gpn   int
	// curNode maps Current's node indexes to node numbers (-1: gone).
	curNode []int
	layers  []*layer
}

func newPlanner(in PlanInput) (*planner, error) {
	sh := in.Shape
	if len(in.Nodes) == 0 {
		return nil, fmt.Errorf("%w: no expert nodes to place on", ErrPlacement)
	}
	if in.Redundant < 0 {
		return nil, fmt.Errorf("%w: %d redundant replicas", ErrPlacement, in.Redundant)
	}
	if sh.Experts < 0 || sh.Layers < 0 {
		return nil, fmt.Errorf("%w: shape with %d layers and %d experts", ErrPlacement, sh.Layers, sh.Experts)
	}
	for i, l := range sh.MoELayers {
		if l < 0 || l >= sh.Layers || (i > 0 && l <= sh.MoELayers[i-1]) {
			return nil, fmt.Errorf("%w: MoE layers %v: want increasing indexes below %d", ErrPlacement, sh.MoELayers, sh.Layers)
		}
	}
	nodes := slices.Clone(in.Nodes)
	slices.SortFunc(nodes, func(a, b Node) int { return strings.Compare(a.ID, b.ID) })
	for i, n := range nodes {
		if n.ID == "" {
			return nil, fmt.Errorf("%w: a node with an empty id", ErrPlacement)
		}
		if i > 0 && nodes[i-1].ID == n.ID {
			return nil, fmt.Errorf("%w: node %s listed twice", ErrPlacement, n.ID)
		}
	}
	if err := checkLoad(sh, in.Load); err != nil {
		return nil, err
	}
	if c := in.Current; c != nil && (c.shape.Experts != sh.Experts || c.shape.Layers != sh.Layers || !slices.Equal(c.shape.MoELayers, sh.MoELayers)) {
		return nil, fmt.Errorf("%w: the current placement (version %d) is for another model shape", ErrPlacement, c.Version)
	}
	if len(sh.MoELayers) == 0 || sh.Experts == 0 {
		return nil, nil
	}

	p := &planner{in: in, shape: sh, E: sh.Experts, moe: sh.MoELayers}
	L, E := len(p.moe), p.E
	perNode := L * E // nobody holds more than every expert once
	total := 0
	for _, n := range nodes {
		if n.Slots < 0 {
			continue
		}
		s := perNode
		if n.Slots > 0 && n.Slots < perNode {
			s = n.Slots
		}
		p.ids = append(p.ids, n.ID)
		p.slots = append(p.slots, s)
		total += s
	}
	N := len(p.ids)
	if N == 0 {
		return nil, fmt.Errorf("%w: no expert node may hold experts (%s, all with negative slots)", ErrPlacement, plural(len(nodes), "node"))
	}
	if N > 1<<16 {
		return nil, fmt.Errorf("%w: more than %d nodes", ErrPlacement, 1<<16)
	}
	if total < L*E {
		return nil, fmt.Errorf("%w: %d MoE layers × %d experts need %d slots; the nodes offer %d in all (%s)", ErrPlacement, L, E, L*E, total, plural(N, "usable node"))
	}

	// Extra replicas: as many per layer as asked, as the slots allow, and
	// no more than one replica of each expert per node.
	extra := min(in.Redundant, (total-L*E)/L, (N-1)*E)
	p.R = E + extra
	p.fair = fairCounts(p.slots, L, p.R)
	p.most, p.least = make([][]int, L), make([][]int, L)
	for li, fair := range p.fair {
		p.most[li], p.least[li] = make([]int, N), make([]int, N)
		for n, f := range fair {
			spare := p.slots[n]
			for _, fl := range p.fair {
				spare -= fl[n]
			}
			slack := (f + countSlack - 1) / countSlack
			p.most[li][n] = min(f+min(slack, spare/L), E)
			p.least[li][n] = f - slack
		}
	}

	p.free = slices.Clone(p.slots)
	if c := in.Current; c != nil {
		p.curNode = make([]int, len(c.nodes))
		for i, id := range c.nodes {
			n, ok := slices.BinarySearch(p.ids, id)
			if !ok {
				n = -1
			}
			p.curNode[i] = n
		}
	}
	return p, nil
}

func plural(n int, what string) string {
	if n == 1 {
		return "1 " + what
	}
	return fmt.Sprintf("%d %ss", n, what)
}

// checkLoad rejects a load that does not fit the shape or is not a count.
func checkLoad(sh Shape, load [][]float64) error {
	if load == nil {
		return nil
	}
	if len(load) != sh.Layers {
		return fmt.Errorf("%w: load has %d layers, the model %d", ErrPlacement, len(load), sh.Layers)
	}
	for _, l := range sh.MoELayers {
		row := load[l]
		if row == nil {
			continue
		}
		if len(row) != sh.Experts {
			return fmt.Errorf("%w: load of layer %d has %d experts, the model %d", ErrPlacement, l, len(row), sh.Experts)
		}
		for e, v := range row {
			if v < 0 || math.IsNaN(v) || math.IsInf(v, 0) {
				return fmt.Errorf("%w: load of layer %d expert %d is %v", ErrPlacement, l, e, v)
			}
		}
	}
	return nil
}

// layerLoad is the load Plan and Imbalance balance layer l by: the
// observed row, or 1 per expert where there is none (nil, or no tokens).
func layerLoad(load [][]float64, l, experts int) (w []float64, total float64) {
	if l < len(load) && len(load[l]) == experts {
		for _, v := range load[l] {
			if v > 0 && !math.IsInf(v, 0) {
				total += v
			}
		}
		if total > 0 {
			w = make([]float64, experts)
			for e, v := range load[l] {
				if v > 0 && !math.IsInf(v, 0) {
					w[e] = v
				}
			}
			return w, total
		}
	}
	w = make([]float64, experts)
	for e := range w {
		w[e] = 1
	}
	return w, float64(experts)
}

// fairCounts spreads layers×R replicas over nodes with the given slots
// (each at most layers×E): water-filling gives node n a total Q_n (nodes
// with few slots hold all they can, the others share the rest evenly, the
// first in id order taking the remainder), and laying the totals out one
// after another along the layers, row by row, gives each node Q_n/layers
// per layer, rounded down or up, with every layer summing to R.
func fairCounts(slots []int, layers, R int) [][]int {
	T := layers * R
	// The largest level with Σ min(slots, level) <= T.
	lo, hi := 0, slices.Max(slots)
	for lo < hi {
		mid := (lo + hi + 1) / 2
		s := 0
		for _, k := range slots {
			s += min(k, mid)
		}
		if s <= T {
			lo = mid
		} else {
			hi = mid - 1
		}
	}
	q := make([]int, len(slots))
	left := T
	for n, k := range slots {
		q[n] = min(k, lo)
		left -= q[n]
	}
	for n, k := range slots {
		if left > 0 && k > q[n] {
			q[n]++
			left--
		}
	}
	fair := make([][]int, layers)
	for li := range fair {
		fair[li] = make([]int, len(slots))
	}
	pos := 0
	for n, k := range q {
		full, rem := k/layers, k%layers
		for li := range layers {
			fair[li][n] = full
		}
		// The run [pos, pos+k) wraps full times round the layers, then
		// covers rem more starting where it started.
		for j := range rem {
			fair[(pos+j)%layers][n]++
		}
		pos += k
	}
	return fair
}

// groupTolerance: whole groups per node are used only when, planned
// afresh for the load, they balance within this much of global packing.
// Whole groups cap the nodes a token reaches at TopKGroup, and so the
// bytes each token sends; a group-limited model whose groups carry
// unequal load pays for that in compute, and beyond 5% (one step in
// twenty) the compute is the dearer. The choice depends on the load and
// the nodes alone, not on the current placement (planning again from a
// plan must change nothing); a load near the line does not flip the
// layout back and forth, because with the same nodes a layer is only
// replaced by a better balanced one (see guard).
const groupTolerance = 0.05

// groupSize is the experts per routing group (1 when there are none).
func (p *planner) groupSize() int {
	if g := p.shape.Groups; g > 1 && p.E%g == 0 {
		return p.E / g
	}
	return 1
}

// canGroup: every node can hold Groups/nodes whole groups (see Plan).
func (p *planner) canGroup() bool {
	g, N := p.shape.Groups, len(p.ids)
	if g <= 1 || p.shape.TopKGroup <= 0 || p.shape.TopKGroup >= g || p.E%g != 0 || p.E/g < 2 || g%N != 0 {
		return false
	}
	for _, fair := range p.fair {
		for _, f := range fair {
			if f < p.E/N {
				return false
			}
		}
	}
	return true
}

// useGroups switches whole-group packing on or off. It resets the free
// slots: with whole groups, every layer's group replicas are reserved.
func (p *planner) useGroups(on bool) {
	p.grouped = on
	p.free = slices.Clone(p.slots)
	if !on {
		return
	}
	p.gs, p.gpn = p.E/p.shape.Groups, p.shape.Groups/len(p.ids)
	for li := range p.moe {
		if p.ungrouped == nil || !p.ungrouped[li] {
			for n := range p.free {
				p.free[n] -= p.gs * p.gpn
			}
		}
	}
}

// sameNodes: the current placement uses exactly the usable nodes.
func (p *planner) sameNodes() bool {
	c := p.in.Current
	return c != nil && len(c.nodes) == len(p.ids) && !slices.Contains(p.curNode, -1)
}

// holders lists, per expert of layer moe[li], the usable nodes that hold
// it in the current placement.
func (p *planner) holders(li int) [][]int {
	c, l := p.in.Current, p.moe[li]
	hs := make([][]int, p.E)
	for e := range p.E {
		for _, i := range c.replicas[l][e] {
			if n := p.curNode[i]; n >= 0 {
				hs[e] = append(hs[e], n)
			}
		}
		slices.Sort(hs[e])
	}
	return hs
}

// markUngrouped: with whole groups and the same nodes as the current
// placement, a layer stays grouped only if its current layout is one
// whole-group planning makes: every group whole on a home of its own,
// the first node in id order that holds it whole (see canHost). Any other
// layout (one kept as it was because it balanced better, see guard) stays
// ungrouped: regrouping would move most of it, for a layout that did not
// balance better. Deciding from the layout alone keeps planning again
// from a plan a no-op.
//
// forced marks layers ungrouped whatever their layout: run's second
// pass, for layers that whole groups left too far off.
func (p *planner) markUngrouped(forced []bool) {
	p.ungrouped = nil
	if !p.grouped {
		return
	}
	if !p.sameNodes() {
		if slices.Contains(forced, true) {
			p.ungrouped = slices.Clone(forced)
			p.useGroups(true)
		}
		return
	}
	p.ungrouped = make([]bool, len(p.moe))
	for li := range p.moe {
		if forced != nil && forced[li] {
			p.ungrouped[li] = true
			continue
		}
		hs := p.holders(li)
		holdsAll := func(n, g int) bool {
			for e := g * p.gs; e < (g+1)*p.gs; e++ {
				if !slices.Contains(hs[e], n) {
					return false
				}
			}
			return true
		}
		for g, h := range p.homes(hs) {
			if h < 0 || !holdsAll(h, g) {
				p.ungrouped[li] = true
				break
			}
			for m := range h {
				if holdsAll(m, g) {
					p.ungrouped[li] = true
				}
			}
		}
	}
	p.useGroups(true)
}

// freshPlan plans every layer afresh, with whole groups or without, on a
// copy of p, and returns it with its token-weighted mean imbalance.
func (p *planner) freshPlan(grouped bool) (*planner, float64) {
	q := *p
	q.useGroups(grouped)
	q.layers = make([]*layer, len(q.moe))
	var sw, swi float64
	N := float64(len(q.ids))
	for li := range q.moe {
		ly := q.fresh(li)
		q.layers[li] = ly
		sw += ly.W
		swi += float64(ly.W * (ly.maxLoad() / (ly.W / N))) // (no fused multiply-add: same on every GOARCH)
	}
	return &q, swi / sw
}

// run plans. With whole groups from a current placement, a layer planned
// with whole groups that ends more than groupTolerance worse balanced
// than whole groups planned afresh (its groups pair up badly, and
// swapping whole groups costs more than the balance it buys under the
// migration cost) is planned again without them: a few replicas move
// across groups instead. Planning again from that result finds a layout
// whole-group planning does not make (see markUngrouped), so it changes
// nothing.
func (p *planner) run() (*Table, error) {
	var forced []bool
	for {
		t, redo, err := p.runOnce(forced)
		if err != nil || redo == nil || forced != nil {
			return t, err
		}
		forced = redo
	}
}

func (p *planner) runOnce(forced []bool) (t *Table, redo []bool, err error) {
	p.useGroups(false)
	p.ungrouped = nil
	var fresh []float64
	if p.canGroup() {
		global, gi := p.freshPlan(false)
		grouped, gg := p.freshPlan(true)
		use := gg <= gi*(1+groupTolerance)
		fresh = make([]float64, len(p.moe))
		for li, ly := range grouped.layers {
			fresh[li] = ly.maxLoad() / (ly.W / float64(len(p.ids)))
		}
		if p.in.Current == nil {
			q := global
			if use {
				q = grouped
			}
			*p = *q
			for _, ly := range p.layers {
				ly.p = p
			}
			p.settle()
			t, err := p.table()
			return t, nil, err
		}
		p.useGroups(use)
		p.markUngrouped(forced)
	}
	// Replica counts and what stays where it is.
	p.layers = make([]*layer, len(p.moe))
	for li := range p.moe {
		p.layers[li] = p.setup(li)
	}
	// A node over its slots (they shrank) sheds replicas; room is kept for
	// every expert left without a replica.
	p.shed()
	// What must be placed: layers with nothing kept are planned afresh,
	// elsewhere experts without a replica go to the least loaded nodes.
	for li, ly := range p.layers {
		if ly.had == nil {
			p.layers[li] = p.fresh(li)
			continue
		}
		if err := ly.placeLost(); err != nil {
			return nil, nil, err
		}
	}
	// Extra replicas and balance.
	for _, ly := range p.layers {
		if ly.had != nil {
			ly.placeExtras()
			ly.finish()
		}
	}
	p.settle()
	if p.guard() {
		p.settle()
	}
	if p.grouped {
		for li, ly := range p.layers {
			if !ly.grouped {
				continue
			}
			_, load := p.finalLoads(li, ly, ly.nodesOf())
			if slices.Max(load)/(ly.W/float64(len(p.ids))) > fresh[li]*(1+groupTolerance) {
				if redo == nil {
					redo = make([]bool, len(p.layers))
				}
				redo[li] = true
			}
		}
		if redo != nil && forced == nil {
			return nil, redo, nil
		}
	}
	t, err = p.table()
	return t, nil, err
}

// settle runs every layer's last stage again until none changes: a layer
// finished early may find slots that later layers freed. The bound on
// rounds is a guard.
func (p *planner) settle() {
	for range 8 {
		changed := false
		for _, ly := range p.layers {
			if !ly.frozen && ly.finish() {
				changed = true
			}
		}
		if !changed {
			return
		}
	}
}

// setup decides layer li's replica counts and, from the current
// placement, which replicas stay. A layer of which nothing survives gets
// had == nil and is planned afresh.
func (p *planner) setup(li int) *layer {
	ly := p.newLayer(li)
	E, N := p.E, len(p.ids)
	var holders [][]int // usable nodes holding each expert now
	if p.in.Current != nil {
		holders = p.holders(li)
		kept := 0
		for _, hs := range holders {
			kept += len(hs)
		}
		if kept > 0 {
			ly.had = make([]bool, N*E)
			for e, hs := range holders {
				for _, n := range hs {
					ly.had[n*E+e] = true
				}
			}
		}
	}
	if ly.had == nil {
		ly.c = replicate(ly.w, nil, p.R, ly.maxRep(), p.groupSize())
		ly.makeUnits()
		return ly
	}
	c0 := make([]int, E)
	for e := range E {
		c0[e] = len(holders[e])
	}
	ly.c = replicate(ly.w, c0, p.R, ly.maxRep(), p.groupSize())
	ly.makeUnits()

	// Which current replicas stay: with whole groups, each group's primary
	// replicas at the group's home, the node holding most of the group
	// now; everything else as (extra) single replicas, as many as the
	// counts allow, dropping from the busiest nodes.
	keep := holders
	want := slices.Clone(ly.c)
	var home []int
	if ly.grouped {
		home = p.homes(holders)
		keep = make([][]int, E)
		for gi, u := range ly.units[:E/p.gs] {
			if home[gi] >= 0 {
				ly.place(gi, home[gi])
			}
			for e := u.e; e < u.e+u.size; e++ {
				want[e]--
				for _, n := range holders[e] {
					if n != home[gi] {
						keep[e] = append(keep[e], n)
					}
				}
			}
		}
		// No node before its home may hold a group whole (see canHost).
		for g, h := range home {
			for n := range N {
				if h >= 0 && n >= h {
					break
				}
				whole := true
				for e := g * p.gs; e < (g+1)*p.gs && whole; e++ {
					whole = slices.Contains(keep[e], n)
				}
				if whole {
					last := (g+1)*p.gs - 1
					keep[last] = slices.DeleteFunc(keep[last], func(m int) bool { return m == n })
				}
			}
		}
	}
	tent := make([]float64, N)
	for e, hs := range keep {
		for _, n := range hs {
			tent[n] += ly.w[e] / float64(ly.c[e])
		}
	}
	for e := range keep {
		for len(keep[e]) > want[e] {
			j := 0
			for k, n := range keep[e] {
				if tent[n] >= tent[keep[e][j]] {
					j = k
				}
			}
			tent[keep[e][j]] -= ly.w[e] / float64(ly.c[e])
			keep[e] = slices.Delete(keep[e], j, j+1)
		}
	}
	for i := range ly.units {
		u := &ly.units[i]
		if u.group || len(keep[u.e]) == 0 {
			continue
		}
		ly.place(i, keep[u.e][0])
		keep[u.e] = keep[u.e][1:]
	}
	return ly
}

// homes gives each group the node that holds most of it now, each node at
// most gpn groups, biggest overlaps first; -1 where none is left.
func (p *planner) homes(holders [][]int) []int {
	G, N := p.E/p.gs, len(p.ids)
	overlap := make([]int, G*N)
	for e, hs := range holders {
		for _, n := range hs {
			overlap[(e/p.gs)*N+n]++
		}
	}
	pairs := make([]int, 0, G*N)
	for i, o := range overlap {
		if o > 0 {
			pairs = append(pairs, i)
		}
	}
	slices.SortStableFunc(pairs, func(a, b int) int { return overlap[b] - overlap[a] })
	home := make([]int, G)
	for g := range home {
		home[g] = -1
	}
	taken := make([]int, N)
	for _, i := range pairs {
		g, n := i/N, i%N
		if home[g] < 0 && taken[n] < p.gpn {
			home[g] = n
			taken[n]++
		}
	}
	return home
}

// shed brings every node within its slots, and leaves room for every
// expert that has no replica yet: extra replicas go first (latest layers
// first), then, only for a node over its own slots, sole ones.
func (p *planner) shed() {
	for n, f := range p.free {
		if f >= 0 {
			continue
		}
		for _, soleToo := range []bool{false, true} {
			for li := len(p.layers) - 1; li >= 0 && p.free[n] < 0; li-- {
				ly := p.layers[li]
				for i := len(ly.units) - 1; i >= 0 && p.free[n] < 0; i-- {
					u := ly.units[i]
					if u.n == n && !u.group && (soleToo || ly.placed[u.e] > 1) {
						ly.unplace(i)
					}
				}
			}
		}
	}
	need, room := 0, 0
	for _, ly := range p.layers {
		if ly.grouped {
			continue // group replicas have their slots reserved
		}
		if ly.had == nil {
			need += p.E
			continue
		}
		for e := range p.E {
			if ly.placed[e] == 0 {
				need++
			}
		}
	}
	for _, f := range p.free {
		room += f
	}
	for li := len(p.layers) - 1; li >= 0 && room < need; li-- {
		ly := p.layers[li]
		for i := len(ly.units) - 1; i >= 0 && room < need; i-- {
			if u := ly.units[i]; u.n >= 0 && !u.group && ly.placed[u.e] > 1 {
				ly.unplace(i)
				room++
			}
		}
	}
}

// fresh plans layer li with nothing to keep: balanced packing and the
// contiguous layout, each improved, the better kept.
func (p *planner) fresh(li int) *layer {
	free := slices.Clone(p.free)
	a := p.newLayer(li)
	c := replicate(a.w, nil, p.R, a.maxRep(), p.groupSize())
	a.c = slices.Clone(c)
	a.makeUnits()
	all := make([]int, len(a.units))
	for i := range all {
		all[i] = i
	}
	a.drop(a.pack(all))
	a.finish()
	freeA := p.free
	p.free = free

	b := p.newLayer(li)
	b.c = slices.Clone(c)
	b.makeUnits()
	b.contiguous()
	// Ranges are worth keeping only where the load is near uniform: as
	// cut, they must be within contiguousSlack of the packed layout.
	if b.maxLoad() <= a.maxLoad()*(1+contiguousSlack) {
		b.finish()
		if b.maxLoad() <= a.maxLoad()+a.eps {
			return b
		}
	}
	p.free = freeA
	return a
}

// contiguousSlack: a fresh layer's contiguous layout is refined and
// compared only when, as cut, it balances within 10% of the packed one.
// Refining a layout that starts far off scatters its ranges anyway, and
// costs as much again as the packing.
const contiguousSlack = 0.1

// guard: when the nodes are the ones the current placement uses, a layer
// is never left worse balanced than it is now (where the current layer is
// within the replica budget): rebalancing only takes steps that help, but
// whole groups, topping replica counts up to in.Redundant, dropping some,
// or filling a node up to its least count may not; such a layer stays
// exactly as it is. With nodes joining or leaving there is no such
// promise: a new node must get its share, a lost one's experts must go
// somewhere.
func (p *planner) guard() (reverted bool) {
	if !p.sameNodes() {
		return false
	}
	c := p.in.Current
	for li, ly := range p.layers {
		if ly.had == nil {
			continue
		}
		l, E, N := p.moe[li], p.E, len(p.ids)
		total := 0
		for e := range E {
			total += len(c.replicas[l][e])
		}
		if total > p.R {
			continue
		}
		cur := make([]float64, N)
		count := make([]int, N)
		for e := range E {
			rs := c.replicas[l][e]
			for r, i := range rs {
				n := p.curNode[i]
				cur[n] += ly.w[e] * c.Share(l, e, r)
				count[n]++
			}
		}
		// Both sides with their shares: the current layer's as stored, the
		// plan's as table will split them.
		_, planned := splitShares(ly.w, ly.nodesOf(), N)
		if slices.Max(planned) <= slices.Max(cur)+ly.eps || !p.revert(ly, count) {
			continue
		}
		ly.frozen, reverted = true, true
	}
	return reverted
}

// revert puts layer ly back as the current placement has it (count
// replicas per node), if the slots allow. (With whole groups, ly.count
// includes the layer's reserved group slots, so this hands those back.)
func (p *planner) revert(ly *layer, count []int) bool {
	for n := range p.free {
		if p.free[n]+ly.count[n]-count[n] < 0 {
			return false
		}
	}
	for n := range p.free {
		p.free[n] += ly.count[n] - count[n]
	}
	ly.revertTo(p.in.Current, p.moe[ly.li])
	return true
}

// finalLoads is the planned shares of layer li as table writes them, for
// its layout on (per expert, its nodes, sorted), and the nodes' loads
// with them: split by splitShares, or the stored shares where the layout
// did not change and they balance as well (rounding to ShareUnits could
// otherwise make a layer a hair worse than it was).
func (p *planner) finalLoads(li int, ly *layer, on [][]int) ([][]uint16, []float64) {
	N := len(p.ids)
	parts, load := splitShares(ly.w, on, N)
	if kept, ok := p.currentLayout(li, on); ok {
		if k := sharedLoads(ly.w, on, kept, N); slices.Max(k) <= slices.Max(load)+ly.eps {
			return kept, k
		}
	}
	return parts, load
}

// table writes the plan out: nodes in id order, replicas in node order.
func (p *planner) table() (*Table, error) {
	t := NewTable(p.shape, p.in.Version)
	N, E := len(p.ids), p.E
	used := make([]bool, N)
	for _, ly := range p.layers {
		for _, u := range ly.units {
			if u.n >= 0 {
				used[u.n] = true
			}
		}
	}
	index := make([]uint16, N)
	for n, id := range p.ids {
		if used[n] {
			index[n] = uint16(t.nodeIndex(id, true))
		}
	}
	for li, ly := range p.layers {
		l := p.moe[li]
		on := make([][]int, E)
		for _, u := range ly.units {
			if u.n < 0 {
				return nil, fmt.Errorf("%w: internal: layer %d expert %d: a replica left unplaced", ErrPlacement, l, u.e)
			}
			for e := u.e; e < u.e+u.size; e++ {
				on[e] = append(on[e], u.n)
			}
		}
		for e, ns := range on {
			slices.Sort(ns)
			if len(ns) != ly.c[e] || len(slices.Compact(slices.Clone(ns))) != len(ns) {
				return nil, fmt.Errorf("%w: internal: layer %d expert %d on nodes %v, want %d distinct", ErrPlacement, l, e, ns, ly.c[e])
			}
			rs := make([]uint16, len(ns))
			for k, n := range ns {
				rs[k] = index[n]
			}
			t.replicas[l][e] = rs
		}
		// Replicas are in node order (index grows with n), so parts
		// aligned with on are aligned with the table's replicas.
		parts, _ := p.finalLoads(li, ly, on)
		for e, q := range parts {
			if q != nil {
				t.setShares(l, e, q)
			}
		}
	}
	for n := range N {
		if p.free[n] < 0 {
			return nil, fmt.Errorf("%w: internal: node %s over its slots", ErrPlacement, p.ids[n])
		}
	}
	return t, t.Validate()
}
