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

// shareChoice holds the credits of the placement versions dispatches
// plan by: the newest two (a step pinned to the older one may still run
// while new steps use the newer). Safe for concurrent use.
type shareChoice struct {
	mu    sync.Mutex
	state [2]*shareState
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
	rs := s.t.Replicas(l, e)
	credit := s.credits(l, e, len(rs))
	total := 0.0
	for _, c := range cands {
		total += s.t.Share(l, e, c.r)
	}
	for _, c := range cands {
		share := 1 / float64(len(cands))
		if total > 0 {
			share = s.t.Share(l, e, c.r) / total
		}
		credit[c.r] += share
	}
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
	credit[cands[best].r]--
	for r, v := range credit {
		credit[r] = min(max(v, -creditBound), creditBound)
	}
	return best
}

// plan assigns every slot in need to a replica: among the usable ones not
// avoided, those with a healthy connection if there are any, chosen in
// proportion to the planned shares (see load_share.go: credits, a row's
// slots kept together where the credits allow, least outstanding work
// as the correction for a node falling behind). One attempt per node
// carries each of its rows once.
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
	for i := range d.n {
		for s := range d.k {
			id := d.need[i*d.k+s]
			if id < 0 {
				continue
			}
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
				}
				b := batch[ri]
				there := b != nil && b.rows[len(b.rows)-1] == int32(i)
				down := conns[ri].down.Load()
				up = up || !down
				cands = append(cands, candidate{r: r, load: load[ri], there: there, fallback: down})
			}
			if up {
				cands = slices.DeleteFunc(cands, func(c candidate) bool { return c.fallback })
			}
			if len(cands) == 0 {
				continue // stuck
			}
			pick := cands[shares.choose(d.layer, int(id), cands)]
			best, bestThere := int(rs[pick.r]), pick.there
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
		}
	}
	d.r.choice.mu.Unlock()
	for _, a := range order {
		d.send(a, now, 1)
	}
}
