package attnnode

import (
	"slices"
	"sync"
	"time"

	"github.com/expertmesh/expertmesh/placement"
)

// Replica choice in proportion to planned shares. The placement planner
// balances expert nodes assuming each replica of an expert serves its
// planned share of the expert's tokens (placement.Table.Share), so the
// attention nodes must split a replicated expert's rows in exactly those
// proportions, or a hot expert's load does not really split.
//
// The rule, per slot (a row's need for one expert), among the replicas a
// dispatch may use (usable, not avoided; those whose connection is down
// only if all are):
//
//  1. Every candidate is credited its share of one slot (the shares
//     renormalised over the candidates, so a replica that cannot be
//     used hands its part to the others); the credit is what it should
//     have served so far minus what it was given.
//  2. The slot goes to a candidate the row already goes to (its bytes
//     travel once either way) if that one's credit is not negative: it
//     is owed work. Otherwise it goes to the candidate with the most
//     credit (on a tie: fewest outstanding rows, then replica order).
//  3. Correction: if that candidate's node has at least
//     2 × (the least-loaded candidate's outstanding rows) + divertRows
//     outstanding (it is falling behind: slow, or far busier than the
//     plan expects), the least-loaded one takes the slot instead.
//  4. The chosen one is charged one slot.
//
// Credits start at 0 and sum to 0 over an expert's replicas. The one
// charged had the most credit (at least 1/m of m replicas after rule 1)
// or a credit of at least 0 (rule 2), so no credit falls below -1, and
// none rises above m-1: each replica serves its share of the expert's
// tokens to within a token or two however long the node runs (two
// replicas: within one), unless rule 3 steps in for a node in trouble
// (credits are then capped at ±creditBound). With equal shares this is a
// smooth round robin that keeps a row's slots together where it can.
const (
	// divertRows is the backlog margin of rule 3: a quarter of the rows a
	// dispatch deadline is sized for.
	divertRows = rowsPerTimeout / 4
	// creditBound caps credits so that a replica unusable for a while (or
	// corrected away from) does not take a burst of rows when it returns.
	creditBound = 4
)

// Whole experts. An expert's weights stream from memory once per
// dispatch on every node its rows go to, and at decode batch sizes that
// stream, not the rows, is most of its cost: about expertRowCost rows'
// worth of arithmetic. Splitting a few rows of an expert over two
// replicas streams its weights twice (measured: up with
// --redundant-experts 32 gave 0.72x serve against 0.79-0.82x without
// replicas, at 8 streams). So an expert with fewer than splitRows rows
// in a dispatch goes whole to one replica, chosen to even out this
// dispatch's work over the nodes (LPT, longest first): a node's work is
// its outstanding rows plus, per expert planned there, expertRowCost
// and the expert's rows. Experts with one candidate are counted first,
// then the others in falling row count (expert id on a tie) each go to
// the candidate with the least work; on equal work the planned-share
// credits decide (charged by rows, so equally loaded replicas take turns
// in proportion to their shares), then fewer outstanding rows, then
// replica order. An expert with splitRows rows or more (prefill) is
// split slot by slot by the rule above: there the rows are the cost.
const (
	expertRowCost = 16
	splitRows     = 2 * expertRowCost
)

// shareChoice holds the credits of the placement versions dispatches
// plan by: the newest two (a step pinned to the older one may still run
// while new steps use the newer). Safe for concurrent use.
type shareChoice struct {
	mu    sync.Mutex
	state [2]*shareState
	whole wholeScratch // plan's, under mu

	// splitRows overrides the const of that name when not 0 (tests).
	splitRows int
	// observe, when set (tests), sees each plan's slots: their experts
	// and destinations (the Routing's node index, or -1: not planned).
	observe func(layer int, ids, dest []int32)
}

// wholeScratch is plan's per-dispatch state for whole experts, kept
// across dispatches so that planning allocates nothing.
type wholeScratch struct {
	rows []int32 // per expert: slots in need
	pick []int32 // per expert: the node it goes to whole, or -1
	seen []int32 // experts with rows, in slot order
	flex []int32 // experts with a choice of replica
	cost []int64 // per node: its work in this dispatch so far
	dest []int32 // per slot: the node it went to, or -1
}

// reset readies w for a dispatch of slots slots over nodes nodes.
func (w *wholeScratch) reset(experts, nodes, slots int) {
	if len(w.rows) != experts {
		w.rows, w.pick = make([]int32, experts), make([]int32, experts)
		for i := range w.pick {
			w.pick[i] = -1
		}
	}
	for _, id := range w.seen {
		w.rows[id], w.pick[id] = 0, -1
	}
	w.seen, w.flex = w.seen[:0], w.flex[:0]
	w.cost = slices.Grow(w.cost[:0], nodes)[:nodes]
	clear(w.cost)
	w.dest = slices.Grow(w.dest[:0], slots)[:slots]
	for i := range w.dest {
		w.dest[i] = -1
	}
}

// place sends expert id whole to node and counts its work there.
func (w *wholeScratch) place(id int32, node uint16) {
	w.pick[id] = int32(node)
	w.cost[node] += expertRowCost + int64(w.rows[id])
}

// shareState is one table's credits: credit[layer*experts+expert][r] for
// Replicas(layer, expert)[r], allocated on first use.
type shareState struct {
	t      *placement.Table
	credit [][]float64
}

// forTableLocked returns t's credits, creating them (and forgetting the oldest
// table's) when t is new. Caller holds mu.
func (c *shareChoice) forTableLocked(t *placement.Table) *shareState {
	for _, s := range c.state {
		if s != nil && s.t == t {
			return s
		}
	}
	sh := t.Shape()
	s := &shareState{t: t, credit: make([][]float64, sh.Layers*sh.Experts)}
	if c.state[0] != nil && (c.state[1] == nil || c.state[1].t.Version < c.state[0].t.Version) {
		c.state[1] = c.state[0]
	}
	c.state[0] = s
	return s
}

// credits returns expert e of layer l's credits, one per replica.
func (s *shareState) credits(l, e, replicas int) []float64 {
	i := l*s.t.Shape().Experts + e
	if len(s.credit[i]) != replicas {
		s.credit[i] = make([]float64, replicas)
	}
	return s.credit[i]
}

// candidate is a replica a slot may go to.
type candidate struct {
	r        int   // index into Replicas(layer, expert)
	load     int64 // outstanding rows at its node, this plan's included
	there    bool  // the row already goes to its node
	fallback bool  // its connection is down
}

// choose picks the replica of expert e of layer l for one slot by the
// rule above and charges it; cands is not empty. It returns an index
// into cands.
func (s *shareState) choose(l, e int, cands []candidate) int {
	credit := s.creditShares(l, e, cands, 1)
	best := -1
	better := func(i int) bool {
		a, b := cands[i], cands[best]
		switch {
		case credit[a.r] != credit[b.r]:
			return credit[a.r] > credit[b.r]
		case a.load != b.load:
			return a.load < b.load
		}
		return a.r < b.r
	}
	for i, c := range cands {
		if c.there && credit[c.r] >= 0 && (best < 0 || better(i)) {
			best = i
		}
	}
	if best < 0 {
		for i := range cands {
			if best < 0 || better(i) {
				best = i
			}
		}
	}
	least := 0
	for i, c := range cands {
		if c.load < cands[least].load {
			least = i
		}
	}
	if cands[best].load >= 2*cands[least].load+divertRows {
		best = least
	}
	charge(credit, cands[best].r, 1)
	return best
}

// creditShares credits each of expert e of layer l's candidates its share of
// amount (the planned shares renormalised over cands; equal parts where
// they sum to 0) and returns the expert's credits, one per replica.
func (s *shareState) creditShares(l, e int, cands []candidate, amount float64) []float64 {
	credit := s.credits(l, e, len(s.t.Replicas(l, e)))
	total := 0.0
	for _, c := range cands {
		total += s.t.Share(l, e, c.r)
	}
	for _, c := range cands {
		share := 1 / float64(len(cands))
		if total > 0 {
			share = s.t.Share(l, e, c.r) / total
		}
		credit[c.r] += share * amount
	}
	return credit
}

// charge takes amount from replica r's credit and keeps every credit
// within ±creditBound.
func charge(credit []float64, r int, amount float64) {
	credit[r] -= amount
	for i, v := range credit {
		credit[i] = min(max(v, -creditBound), creditBound)
	}
}

// chooseWhole picks the replica of expert e of layer l that takes all
// of its rows in this dispatch by the whole-expert rule: least work
// (cost, per node of the Routing), then most credit, then fewest
// outstanding rows, then replica order; cands has at least one. The
// candidates are credited their shares of rows and the chosen one is
// charged rows. It returns an index into cands.
func (s *shareState) chooseWhole(l, e int, cands []candidate, rows int, cost []int64) int {
	rs := s.t.Replicas(l, e)
	credit := s.creditShares(l, e, cands, float64(rows))
	best := 0
	for i := 1; i < len(cands); i++ {
		a, b := cands[i], cands[best]
		ca, cb := cost[rs[a.r]], cost[rs[b.r]]
		switch {
		case ca != cb:
			if ca < cb {
				best = i
			}
		case credit[a.r] != credit[b.r]:
			if credit[a.r] > credit[b.r] {
				best = i
			}
		case a.load != b.load:
			if a.load < b.load {
				best = i
			}
		case a.r < b.r:
			best = i
		}
	}
	charge(credit, cands[best].r, float64(rows))
	return best
}

// plan assigns every slot in need to a replica: among the usable ones not
// avoided, those with a healthy connection if there are any. An expert
// with fewer than splitRows rows here goes whole to the replica that
// balances this dispatch (see "Whole experts" above); a bigger one is
// split slot by slot in proportion to the planned shares (credits, a
// row's slots kept together where the credits allow, least outstanding
// work as the correction for a node falling behind). One attempt per
// node carries each of its rows once.
func (d *dispatch) plan(now time.Time) {
	if d.pending == 0 {
		return
	}
	rt := d.rt
	nodes := len(rt.Table.Nodes())
	batch := slices.Grow(d.batch[:0], nodes)[:nodes]
	conns := slices.Grow(d.conns[:0], nodes)[:nodes]
	load := slices.Grow(d.load[:0], nodes)[:nodes]
	clear(batch)
	clear(conns)
	clear(load)
	order := d.order[:0]
	cands := d.cands[:0]
	defer func() {
		clear(batch)
		clear(conns)
		clear(order)
		d.batch, d.conns, d.load, d.order, d.cands = batch, conns, load, order[:0], cands[:0]
	}()
	d.r.choice.mu.Lock()
	shares := d.r.choice.forTableLocked(rt.Table)
	wh := &d.r.choice.whole
	wh.reset(rt.Table.Shape().Experts, nodes, d.n*d.k)
	// candidates lists the replicas slot i*k+s of expert id may go to
	// (row i < 0: no row yet, as for a whole expert), dialling and
	// reading each node's outstanding rows on first use.
	candidates := func(id int32, i int) []candidate {
		rs := rt.Table.Replicas(d.layer, int(id))
		cands = cands[:0]
		up := false
		for r, ri16 := range rs {
			ri := int(ri16)
			addr := rt.Addrs[ri]
			if !d.usable[ri] || d.avoid[addr] {
				continue
			}
			if conns[ri] == nil {
				if conns[ri] = d.r.conn(addr); conns[ri] == nil {
					continue // closing
				}
				load[ri] = conns[ri].outstanding.Load()
				wh.cost[ri] += load[ri]
			}
			b := batch[ri]
			there := i >= 0 && b != nil && b.rows[len(b.rows)-1] == int32(i)
			down := conns[ri].down.Load()
			up = up || !down
			cands = append(cands, candidate{r: r, load: load[ri], there: there, fallback: down})
		}
		if up {
			cands = slices.DeleteFunc(cands, func(c candidate) bool { return c.fallback })
		}
		return cands
	}
	// Whole experts: those with one candidate are counted first, then
	// the others, largest first, each where it costs least.
	for _, id := range d.need[:d.n*d.k] {
		if id >= 0 {
			if wh.rows[id] == 0 {
				wh.seen = append(wh.seen, id)
			}
			wh.rows[id]++
		}
	}
	split := d.r.choice.splitRows
	if split == 0 {
		split = splitRows
	}
	for _, id := range wh.seen {
		rows := wh.rows[id]
		if rows >= int32(split) {
			continue
		}
		switch c := candidates(id, -1); len(c) {
		case 0: // stuck: the slots stay in need
		case 1:
			wh.place(id, rt.Table.Replicas(d.layer, int(id))[c[0].r])
		default:
			wh.flex = append(wh.flex, id)
		}
	}
	slices.SortFunc(wh.flex, func(a, b int32) int {
		if ra, rb := wh.rows[a], wh.rows[b]; ra != rb {
			return int(rb - ra)
		}
		return int(a - b)
	})
	for _, id := range wh.flex {
		c := candidates(id, -1)
		pick := c[shares.chooseWhole(d.layer, int(id), c, int(wh.rows[id]), wh.cost)]
		wh.place(id, rt.Table.Replicas(d.layer, int(id))[pick.r])
	}
	for i := range d.n {
		for s := range d.k {
			id := d.need[i*d.k+s]
			if id < 0 {
				continue
			}
			best := int(wh.pick[id])
			bestThere := best >= 0 && batch[best] != nil && batch[best].rows[len(batch[best].rows)-1] == int32(i)
			if best < 0 {
				if wh.rows[id] < int32(split) {
					continue // stuck
				}
				cands = candidates(id, i)
				if len(cands) == 0 {
					continue // stuck
				}
				pick := cands[shares.choose(d.layer, int(id), cands)]
				best, bestThere = int(rt.Table.Replicas(d.layer, int(id))[pick.r]), pick.there
			}
			b := batch[best]
			if b == nil {
				b = d.newAttempt()
				b.conn, b.addr, b.nodeID, b.version = conns[best], rt.Addrs[best], rt.Table.Nodes()[best], rt.Table.Version
				batch[best] = b
				order = append(order, b)
			}
			if !bestThere {
				b.rows = append(b.rows, int32(i))
				for range d.k {
					b.ids = append(b.ids, -1)
					b.w = append(b.w, 0)
				}
				load[best]++
			}
			j := (len(b.rows)-1)*d.k + s
			b.ids[j], b.w[j] = id, d.weights[i*d.k+s]
			d.need[i*d.k+s] = -1
			d.pending--
			wh.dest[i*d.k+s] = int32(best)
		}
	}
	if d.r.choice.observe != nil {
		d.r.choice.observe(d.layer, d.ids[:d.n*d.k], wh.dest)
	}
	d.r.choice.mu.Unlock()
	for _, a := range order {
		d.send(a, now, 1)
	}
}
