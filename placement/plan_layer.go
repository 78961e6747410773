package placement

import (
	"fmt"
	"slices"
)

// layer is one MoE layer being planned. Its replicas are units: a single
// replica of one expert, or (with whole groups) the primary replicas of a
// group's experts, which move together.
type layer struct {
	p  *planner
	li int
	w  []float64 // load per expert (uniform where none was observed)
	W  float64   // total load
	// eps absorbs float rounding when loads are compared.
	eps float64
	// minGain is moveThreshold × the mean node load: what loading a
	// replica somewhere new must buy.
	minGain float64
	c       []int // replicas per expert
	units   []unit
	load    []float64 // per node: Σ of its units' loads
	count   []int     // per node: replicas it holds
	groups  []int     // per node: group units it holds
	holds   []bool    // [n*E+e]: node n holds expert e
	// had[n*E+e]: node n holds expert e in the current placement; nil when
	// there is none, or none of it survives (a fresh layer).
	had    []bool
	placed []int // per expert: replicas placed
	// grouped: this layer keeps whole groups per node (see Plan).
	grouped bool
	home    []int // with whole groups, per group: its node, -1 while unplaced
	// frozen: the guard put the current placement's layer back; nothing
	// changes it after that.
	frozen bool
}

type unit struct {
	e, size int     // experts e .. e+size-1
	n       int     // node, -1 while unplaced
	load    float64 // Σ w_e / c_e over its experts
	group   bool
}

func (p *planner) newLayer(li int) *layer {
	N, E := len(p.ids), p.E
	w, W := layerLoad(p.in.Load, p.moe[li], E)
	return &layer{
		p: p, li: li, w: w, W: W,
		grouped: p.grouped && (p.ungrouped == nil || !p.ungrouped[li]),
		eps:     1e-9 * W,
		minGain: moveThreshold * W / float64(N),
		load:    make([]float64, N),
		count:   make([]int, N),
		groups:  make([]int, N),
		holds:   make([]bool, N*E),
		placed:  make([]int, E),
	}
}

// maxRep is the most replicas one expert may have in this layer: one per
// node that has room in it.
func (ly *layer) maxRep() int {
	k := 0
	for _, f := range ly.p.most[ly.li] {
		if f > 0 {
			k++
		}
	}
	return k
}

// replicate decides how many replicas each expert gets, R in all (fewer
// where maxRep caps them, or where no load is left to spread), following
// DeepSeek's replicate_experts: one more replica at a time to the expert
// with the most load per replica. On a tie (uniform load) the expert of
// the group (gs experts each) with the fewest extra replicas so far wins,
// then the lowest index: spread over groups, extras do not unload one
// group's node at the others' expense. Given current counts c0 it keeps
// them, trimming (from the experts that miss a replica least) or topping
// up to R; changing them further is improve's business.
func replicate(w []float64, c0 []int, R, maxRep, gs int) []int {
	E := len(w)
	c := make([]int, E)
	sum := 0
	for e := range c {
		c[e] = 1
		if c0 != nil && c0[e] > 1 {
			c[e] = min(c0[e], max(maxRep, 1))
		}
		sum += c[e]
	}
	per := func(e, k int) float64 { return w[e] / float64(k) }
	for sum > R {
		f := -1
		for e := E - 1; e >= 0; e-- {
			if c[e] > 1 && (f < 0 || per(e, c[e]-1) < per(f, c[f]-1)) {
				f = e
			}
		}
		c[f]--
		sum--
	}
	extras := make([]int, (E+gs-1)/gs) // per group
	for e, k := range c {
		extras[e/gs] += k - 1
	}
	for sum < R {
		e := -1
		for x := range E {
			if c[x] >= maxRep {
				continue
			}
			if e < 0 || per(x, c[x]) > per(e, c[e]) || (per(x, c[x]) == per(e, c[e]) && extras[x/gs] < extras[e/gs]) {
				e = x
			}
		}
		if e < 0 || w[e] <= 0 {
			break // nothing left to spread
		}
		c[e]++
		extras[e/gs]++
		sum++
	}
	return c
}

// makeUnits builds the units for the counts in c, all unplaced: with whole
// groups, one unit per group first and then the extra replicas; otherwise
// every replica of expert 0, then of expert 1, and so on.
func (ly *layer) makeUnits() {
	p := ly.p
	ly.units = ly.units[:0]
	if ly.grouped {
		ly.home = make([]int, p.E/p.gs)
		for g := range ly.home {
			ly.home[g] = -1
		}
		for e := 0; e < p.E; e += p.gs {
			ly.units = append(ly.units, unit{e: e, size: p.gs, n: -1, group: true})
		}
		for e, k := range ly.c {
			for range k - 1 {
				ly.units = append(ly.units, unit{e: e, size: 1, n: -1})
			}
		}
	} else {
		for e, k := range ly.c {
			for range k {
				ly.units = append(ly.units, unit{e: e, size: 1, n: -1})
			}
		}
	}
	for i := range ly.units {
		ly.units[i].load = ly.unitLoad(&ly.units[i])
	}
}

func (ly *layer) unitLoad(u *unit) float64 {
	s := 0.0
	for e := u.e; e < u.e+u.size; e++ {
		s += ly.w[e] / float64(ly.c[e])
	}
	return s
}

// place puts unit i on node n. Single replicas take a slot; group units
// had theirs reserved when the planner started.
func (ly *layer) place(i, n int) {
	u := &ly.units[i]
	u.n = n
	ly.load[n] += u.load
	ly.count[n] += u.size
	if u.group {
		ly.groups[n]++
		ly.home[u.e/ly.p.gs] = n
	} else {
		ly.p.free[n] -= u.size
	}
	E := ly.p.E
	for e := u.e; e < u.e+u.size; e++ {
		ly.holds[n*E+e] = true
		ly.placed[e]++
	}
}

func (ly *layer) unplace(i int) {
	u := &ly.units[i]
	n := u.n
	u.n = -1
	ly.load[n] -= u.load
	ly.count[n] -= u.size
	if u.group {
		ly.groups[n]--
		ly.home[u.e/ly.p.gs] = -1
	} else {
		ly.p.free[n] += u.size
	}
	E := ly.p.E
	for e := u.e; e < u.e+u.size; e++ {
		ly.holds[n*E+e] = false
		ly.placed[e]--
	}
}

// canHost: node n holds none of unit u's experts, and with whole groups
// the home of every group stays the first node, in id order, that holds
// it whole, so that planning again from the table finds the same homes:
// an extra replica may complete a group only on a node after its home, a
// group may go to a node only if no node before it holds the group whole.
func (ly *layer) canHost(u *unit, n int) bool {
	E := ly.p.E
	for e := u.e; e < u.e+u.size; e++ {
		if ly.holds[n*E+e] {
			return false
		}
	}
	if !ly.grouped {
		return true
	}
	if u.group {
		for m := range n {
			if m != u.n && ly.wholeBut(u.e, -1, m) { // (u.n is where the group is now)
				return false
			}
		}
		return true
	}
	return !ly.completesBefore(u.e, n)
}

// completesBefore: with whole groups, an extra replica of e on node n
// would complete e's group there while n comes before the group's home
// (or the group has none yet).
func (ly *layer) completesBefore(e, n int) bool {
	p := ly.p
	if !ly.grouped {
		return false
	}
	g := e / p.gs
	return (ly.home[g] < 0 || n < ly.home[g]) && ly.wholeBut(g*p.gs, e, n)
}

// wholeBut: node n holds every expert of the group starting at first,
// except perhaps skip.
func (ly *layer) wholeBut(first, skip, n int) bool {
	E := ly.p.E
	for x := first; x < first+ly.p.gs; x++ {
		if x != skip && !ly.holds[n*E+x] {
			return false
		}
	}
	return true
}

// room: node n may take unit u: a group while it has fewer than its
// groups; a single replica while it has a free slot and, if capped is
// set, fewer replicas in this layer than most allows.
func (ly *layer) room(u *unit, n int, capped bool) bool {
	p := ly.p
	if u.group {
		return ly.groups[n] < p.gpn
	}
	return p.free[n] >= u.size && (!capped || ly.count[n]+u.size <= p.most[ly.li][n])
}

// cost is how many of unit u's experts node n would have to load: those it
// does not hold in the current placement.
func (ly *layer) cost(u *unit, n int) int {
	if ly.had == nil {
		return 0
	}
	E, k := ly.p.E, 0
	for e := u.e; e < u.e+u.size; e++ {
		if !ly.had[n*E+e] {
			k++
		}
	}
	return k
}

// pack places units as balanced_packing does: groups first, then the
// heaviest replica first, each on the least loaded node that may take it
// (fewest bytes to load, then lowest id, on a tie). It returns the units
// it could not place.
func (ly *layer) pack(idx []int) (failed []int) {
	order := slices.Clone(idx)
	slices.SortStableFunc(order, func(i, j int) int {
		a, b := &ly.units[i], &ly.units[j]
		switch {
		case a.group != b.group: // whole groups first: they need a node without any of theirs
			if a.group {
				return -1
			}
			return 1
		case a.load > b.load:
			return -1
		case a.load < b.load:
			return 1
		}
		return a.e - b.e
	})
	least := ly.p.least[ly.li]
	singles, short := 0, 0 // singles to place; replicas nodes with free slots lack to reach least
	for _, i := range order {
		if !ly.units[i].group {
			singles++
		}
	}
	for n, c := range ly.count {
		short += min(max(0, least[n]-c), max(0, ly.p.free[n]))
	}
	for _, i := range order {
		u := &ly.units[i]
		// When every replica left is needed to bring nodes up to their
		// least count, those nodes come first.
		needy := !u.group && singles <= short
		if !u.group {
			singles--
		}
		// A replica that is its expert's only one, or a group, may go over
		// a node's most where nothing else is left.
		mandatory := u.group || ly.placed[u.e] == 0
		best := -1
		for _, pass := range [...]struct{ needy, capped bool }{{true, true}, {true, false}, {false, true}, {false, false}} {
			if (pass.needy && !needy) || (!pass.capped && !mandatory) {
				continue
			}
			for n := range ly.load {
				if !ly.canHost(u, n) || !ly.room(u, n, pass.capped) || (pass.needy && ly.count[n] >= least[n]) {
					continue
				}
				if best < 0 || ly.load[n] < ly.load[best]-ly.eps ||
					(ly.load[n] <= ly.load[best]+ly.eps && ly.cost(u, n) < ly.cost(u, best)) {
					best = n
				}
			}
			if best >= 0 {
				break
			}
		}
		if best < 0 {
			failed = append(failed, i)
			continue
		}
		if !u.group && ly.count[best] < least[best] {
			short--
		}
		ly.place(i, best)
	}
	return failed
}

// fill brings every node up to its least replica count (a node that
// joined holds nothing), taking replicas from the most loaded nodes that
// can spare one: from each, the one that leaves the pair best balanced.
// These moves are forced by membership and pay no threshold.
func (ly *layer) fill() (changed bool) {
	least := ly.p.least[ly.li]
	N := len(ly.load)
	byLoad := make([]int, N)
	for n := range byLoad {
		byLoad[n] = n
	}
	for range len(ly.units) + 1 {
		ly.settleLoads()
		slices.SortStableFunc(byLoad, func(x, y int) int { return cmpFloat(ly.load[x], ly.load[y]) })
		moved := false
		// Needy nodes, least loaded first; sources, most loaded first.
		for _, b := range byLoad {
			if ly.count[b] >= least[b] {
				continue
			}
			for k := N - 1; k >= 0 && !moved; k-- {
				a := byLoad[k]
				if a == b || ly.count[a] <= least[a] {
					continue
				}
				bi, bestMax, bestDC := -1, 0.0, 0
				for i := range ly.units {
					u := &ly.units[i]
					if u.n != a || u.group || !ly.canHost(u, b) || !ly.room(u, b, false) {
						continue
					}
					m := max(ly.load[a]-u.load, ly.load[b]+u.load)
					dc := ly.cost(u, b) - ly.cost(u, a)
					if bi < 0 || m < bestMax-ly.eps || (m <= bestMax+ly.eps && dc < bestDC) {
						bi, bestMax, bestDC = i, m, dc
					}
				}
				if bi >= 0 {
					ly.unplace(bi)
					ly.place(bi, b)
					moved, changed = true, true
				}
			}
			if moved {
				break
			}
		}
		if !moved {
			return changed
		}
	}
	return changed
}

// spare: node n may give up unit u without falling below its least count
// (groups only ever swap).
func (ly *layer) spare(u *unit, n int) bool {
	return u.group || ly.count[n]-u.size >= ly.p.least[ly.li][n]
}

// placeLost places what has no replica: groups without a home, experts
// whose every replica was lost.
func (ly *layer) placeLost() error {
	var lost []int
	for i, u := range ly.units {
		if u.n < 0 && (u.group || (!ly.grouped && ly.placed[u.e] == 0 && !slices.ContainsFunc(lost, func(j int) bool { return ly.units[j].e == u.e }))) {
			lost = append(lost, i)
		}
	}
	for _, i := range ly.pack(lost) {
		u := &ly.units[i]
		if !u.group {
			return fmt.Errorf("%w: internal: layer %d expert %d: no node has room", ErrPlacement, ly.p.moe[ly.li], u.e)
		}
		// Every node with room for a group holds an extra replica of one
		// of its experts: evict those from the least loaded such node;
		// they are placed again with the other extras.
		best := -1
		for n := range ly.load {
			if ly.groups[n] < ly.p.gpn && (best < 0 || ly.load[n] < ly.load[best]) {
				best = n
			}
		}
		for j := range ly.units {
			if v := ly.units[j]; v.n == best && !v.group && v.e >= u.e && v.e < u.e+u.size {
				ly.unplace(j)
			}
		}
		ly.place(i, best)
	}
	return nil
}

// placeExtras places the extra replicas still unplaced, within the nodes'
// most counts; those that fit nowhere are dropped (finish may top up).
func (ly *layer) placeExtras() {
	var rest []int
	for i, u := range ly.units {
		if u.n < 0 {
			rest = append(rest, i)
		}
	}
	ly.drop(ly.pack(rest))
}

// drop removes unplaced extra replicas and spreads their experts' load
// over the replicas left.
func (ly *layer) drop(idx []int) {
	if len(idx) == 0 {
		return
	}
	gone := make([]bool, len(ly.units))
	for _, i := range idx {
		if u := ly.units[i]; !u.group && ly.c[u.e] > 1 {
			gone[i] = true
			ly.c[u.e]--
		}
	}
	kept := ly.units[:0]
	for i, u := range ly.units {
		if !gone[i] {
			kept = append(kept, u)
		}
	}
	ly.units = kept
	ly.reload()
}

// contiguous lays a fresh layer out in ranges: with whole groups, node n
// takes groups n×gpn onwards; otherwise the experts are cut in proportion
// to the nodes' fair counts (as Even does). The extra replicas are then
// packed by load.
func (ly *layer) contiguous() {
	p := ly.p
	if ly.grouped {
		for g := range p.E / p.gs {
			ly.place(g, g/p.gpn)
		}
	} else {
		fair := p.fair[ly.li]
		total := 0
		for _, f := range fair {
			total += f
		}
		// Node n takes experts [cut[n-1], cut[n]).
		cut := make([]int, len(fair))
		cum := 0
		for n, f := range fair {
			cum += f
			cut[n] = p.E * cum / total
		}
		n := 0
		for i := range ly.units {
			u := &ly.units[i]
			if i > 0 && ly.units[i-1].e == u.e {
				continue // an extra replica
			}
			for cut[n] <= u.e {
				n++
			}
			if ly.room(u, n, false) {
				ly.place(i, n)
			}
		}
	}
	var rest []int
	for i, u := range ly.units {
		if u.n < 0 {
			rest = append(rest, i)
		}
	}
	ly.drop(ly.pack(rest))
}

// improve rebalances the layer one step at a time, taking the step that
// gains most net of its migration cost, while one pays for itself (see
// moveThreshold). Steps: move a replica (or group) off a busiest node,
// swap one there for a lighter one elsewhere, or, when neither pays, turn
// an extra replica of a cold expert into one more replica of a hot one
// (dearer to evaluate, and rarely what pays). Moves and swaps must
// lower the higher of the two nodes' loads, a retarget the busiest node's,
// so every step lowers the sum of squared node loads and the loop ends;
// the cap on steps is a guard.
func (ly *layer) improve() (changed bool) {
	N := len(ly.load)
	if N < 2 {
		return false
	}
	on := make([][]int, N)
	scratch := make([]float64, N)
	var busiest []int
	for range 64*len(ly.units) + 64 {
		for n := range on {
			on[n] = on[n][:0]
		}
		for i, u := range ly.units {
			if u.n >= 0 {
				on[u.n] = append(on[u.n], i)
			}
		}
		ly.settleLoads()
		top := slices.Max(ly.load)
		var best step
		busiest = busiest[:0]
		for a := range N {
			if ly.load[a] >= top-ly.eps {
				busiest = append(busiest, a)
				ly.stepsFrom(a, on, &best)
			}
		}
		if !best.ok {
			ly.retargets(busiest, scratch, &best)
		}
		if !best.ok {
			return changed
		}
		ly.apply(best)
		changed = true
	}
	return changed
}

// stepsFrom considers the moves and swaps off node a, one of the busiest.
func (ly *layer) stepsFrom(a int, on [][]int, best *step) {
	La := ly.load[a]
	for _, i := range on[a] {
		u := &ly.units[i]
		ca := ly.cost(u, a)
		for b, Lb := range ly.load {
			// Nothing moving between a and b lowers the pair's maximum
			// unless b is lighter.
			if b == a || Lb >= La-ly.eps || !ly.canHost(u, b) {
				continue
			}
			cb := ly.cost(u, b)
			if ly.room(u, b, true) && ly.spare(u, a) {
				red := La - max(La-u.load, Lb+u.load)
				best.consider(ly, step{i: i, j: -1, from: a, to: b, red: red, dc: cb - ca, fill: ly.filling(b)})
			}
			for _, j := range on[b] {
				v := &ly.units[j]
				d := u.load - v.load
				if d <= ly.eps || Lb+d >= La-ly.eps || v.group != u.group || !ly.canHost(v, a) {
					continue
				}
				red := La - max(La-d, Lb+d)
				dc := cb + ly.cost(v, a) - ca - ly.cost(v, b)
				best.consider(ly, step{i: i, j: j, from: a, to: b, red: red, dc: dc})
			}
		}
	}
}

// step is one candidate rebalancing step: unit i moves from node from to
// node to, and unit j (if not -1) the other way; or, with retarget, unit i
// becomes a replica of expert e on node to.
type step struct {
	i, j, from, to int
	retarget       bool
	e              int
	red            float64 // how much the busiest affected node's load drops
	dc             int     // replicas loaded where the current placement lacks them
	fill           bool    // it fills a node below its fair count: no threshold
	ok             bool
	net            float64
}

// consider keeps s if it pays and beats the best so far.
func (best *step) consider(ly *layer, s step) {
	price := float64(float64(s.dc) * ly.minGain) // no fused multiply-add: same result on every GOARCH
	need := ly.eps
	if s.dc > 0 && !s.fill {
		need += price
	}
	if s.red <= need {
		return
	}
	s.ok, s.net = true, s.red-price
	if !best.ok || s.net > best.net {
		*best = s
	}
}

// filling: node n holds fewer replicas than its fair count in this layer.
func (ly *layer) filling(n int) bool { return ly.count[n] < ly.p.fair[ly.li][n] }

// retargetWidth is how many of the hottest and of the coldest experts
// retargets consider each step.
const retargetWidth = 4

// retargets considers turning an extra replica of a cold expert f into one
// more replica of a hot expert e, placed on the node that ends least
// loaded. It changes the load of every node holding e or f, so it is
// judged by the busiest node overall (busiest lists the nodes at the top).
func (ly *layer) retargets(busiest []int, scratch []float64, best *step) {
	E, N := ly.p.E, len(ly.load)
	top := ly.load[busiest[0]]
	maxRep := ly.maxRep()
	per := func(e, k int) float64 { return ly.w[e] / float64(k) }
	// The hottest experts overall, the hottest each busiest node holds
	// (only a replica of one of those can unload it), and the coldest that
	// have a replica to spare.
	var hot, cold []int
	hotter := func(a, b int) bool { return per(a, ly.c[a]) > per(b, ly.c[b]) }
	colder := func(a, b int) bool { return per(a, ly.c[a]-1) < per(b, ly.c[b]-1) }
	for e := range E {
		if ly.c[e] < maxRep && ly.w[e] > 0 {
			hot = topK(hot, e, retargetWidth, hotter)
		}
		if ly.c[e] > 1 {
			cold = topK(cold, e, retargetWidth, colder)
		}
	}
	if len(hot) == 0 || len(cold) == 0 {
		return
	}
	for _, a := range busiest {
		var mine []int
		for e := range E {
			if ly.holds[a*E+e] && ly.c[e] < maxRep && ly.w[e] > 0 {
				mine = topK(mine, e, retargetWidth, hotter)
			}
		}
		for _, e := range mine {
			if !slices.Contains(hot, e) && len(hot) < 4*retargetWidth {
				hot = append(hot, e)
			}
		}
	}
	for _, e := range hot {
		for _, f := range cold {
			if e == f || per(e, ly.c[e]) <= per(f, ly.c[f]-1)+ly.eps {
				continue
			}
			dE := per(e, ly.c[e]) - per(e, ly.c[e]+1) // each holder of e sheds this
			dF := per(f, ly.c[f]-1) - per(f, ly.c[f]) // each other holder of f takes this on
			for i := range ly.units {
				u := &ly.units[i]
				if u.group || u.e != f || u.n < 0 {
					continue
				}
				x := u.n
				copy(scratch, ly.load)
				for n := range N {
					if ly.holds[n*E+e] {
						scratch[n] -= dE
					}
					if ly.holds[n*E+f] && n != x {
						scratch[n] += dF
					}
				}
				scratch[x] -= per(f, ly.c[f])
				y := -1
				for n := range N {
					if ly.holds[n*E+e] || ly.completesBefore(e, n) || (n != x && (!ly.room(u, n, true) || !ly.spare(u, x))) {
						continue
					}
					if y < 0 || scratch[n] < scratch[y]-ly.eps {
						y = n
					}
				}
				if y < 0 {
					continue
				}
				scratch[y] += per(e, ly.c[e]+1)
				dc := 0
				if ly.had != nil && !ly.had[y*E+e] {
					dc = 1
				}
				best.consider(ly, step{i: i, j: -1, from: x, to: y, retarget: true, e: e,
					red: top - slices.Max(scratch), dc: dc, fill: y != x && ly.filling(y)})
			}
		}
	}
}

// topK inserts x into list, kept sorted by before and at most k long.
func topK(list []int, x, k int, before func(a, b int) bool) []int {
	i := len(list)
	for i > 0 && before(x, list[i-1]) {
		i--
	}
	if i >= k {
		return list
	}
	list = slices.Insert(list, i, x)
	if len(list) > k {
		list = list[:k]
	}
	return list
}

func cmpFloat(a, b float64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// apply takes step s.
func (ly *layer) apply(s step) {
	if s.retarget {
		f := ly.units[s.i].e
		ly.unplace(s.i)
		ly.c[f]--
		ly.c[s.e]++
		ly.units[s.i].e = s.e
		ly.reload()
		ly.place(s.i, s.to)
		return
	}
	ly.unplace(s.i)
	if s.j >= 0 {
		ly.unplace(s.j)
		ly.place(s.j, s.from)
	}
	ly.place(s.i, s.to)
}

// finish is every layer's last stage: fill nodes to their least counts,
// rebalance, and give replicas the budget still allows (packing may have
// had to drop some that fit now) to the hottest experts, until nothing
// changes. It reports whether it changed anything.
func (ly *layer) finish() (changed bool) {
	for range ly.p.R + 1 {
		if ly.fill() {
			changed = true
		}
		if ly.improve() {
			changed = true
		}
		if !ly.topUp() {
			return changed
		}
		changed = true
	}
	return changed
}

// topUp adds replicas while the layer has fewer than its budget: to the
// expert with the most load per replica that some node can take, on the
// least loaded such node. It reports whether it added any.
func (ly *layer) topUp() bool {
	E := ly.p.E
	total := 0
	for _, k := range ly.c {
		total += k
	}
	maxRep := ly.maxRep()
	tried := make([]bool, E)
	added := false
	for total < ly.p.R {
		e := -1
		for x := range E {
			if !tried[x] && ly.c[x] < maxRep && ly.w[x] > 0 &&
				(e < 0 || ly.w[x]/float64(ly.c[x]) > ly.w[e]/float64(ly.c[e])) {
				e = x
			}
		}
		if e < 0 {
			break
		}
		tried[e] = true
		ly.c[e]++
		ly.units = append(ly.units, unit{e: e, size: 1, n: -1})
		i := len(ly.units) - 1
		ly.reload()
		best := -1
		for n := range ly.load {
			if ly.canHost(&ly.units[i], n) && ly.room(&ly.units[i], n, true) && (best < 0 || ly.load[n] < ly.load[best]-ly.eps) {
				best = n
			}
		}
		if best < 0 {
			ly.units = ly.units[:i]
			ly.c[e]--
			ly.reload()
			continue
		}
		ly.place(i, best)
		clear(tried)
		total++
		added = true
	}
	return added
}

// settleLoads recomputes the nodes' loads from what they hold, summing in
// expert order: a function of the state alone, not of the steps that led
// there, so that nodes with equal loads compare equal and planning again
// from a plan finds what the plan found.
func (ly *layer) settleLoads() {
	E := ly.p.E
	for n := range ly.load {
		s := 0.0
		for e, h := range ly.holds[n*E : (n+1)*E] {
			if h {
				s += ly.w[e] / float64(ly.c[e])
			}
		}
		ly.load[n] = s
	}
}

// reload recomputes every unit's load from the counts, and the nodes'.
func (ly *layer) reload() {
	for i := range ly.units {
		ly.units[i].load = ly.unitLoad(&ly.units[i])
	}
	ly.settleLoads()
}

func (ly *layer) maxLoad() float64 { return slices.Max(ly.load) }

// revertTo replaces the layer's plan with layer l of table c, every
// replica a single unit. The caller has accounted for the slots.
func (ly *layer) revertTo(c *Table, l int) {
	p := ly.p
	E := p.E
	clear(ly.load)
	clear(ly.count)
	clear(ly.groups)
	clear(ly.holds)
	clear(ly.placed)
	ly.grouped = false
	ly.units = ly.units[:0]
	for e := range E {
		rs := c.replicas[l][e]
		ly.c[e] = len(rs)
		for _, i := range rs {
			ly.units = append(ly.units, unit{e: e, size: 1, n: p.curNode[i]})
		}
	}
	for i := range ly.units {
		u := &ly.units[i]
		u.load = ly.unitLoad(u)
		ly.load[u.n] += u.load
		ly.count[u.n]++
		ly.holds[u.n*E+u.e] = true
		ly.placed[u.e]++
	}
}
