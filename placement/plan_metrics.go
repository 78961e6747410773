package placement

// Imbalance measures how evenly t spreads load over its nodes, as issue 12
// defines it. For each MoE layer l,
//
//	served(n)    = Σ over experts e that node n holds of load[l][e] × Share(l, e, n's replica)
//	perLayer[l]  = max over nodes n of served(n) / mean over nodes n of served(n)
//
// with Share the table's planned shares (equal ones unless the planner
// set others), which attention nodes follow when they choose a replica.
//
// where the nodes are every node the table names (one that holds nothing
// in layer l counts, serving 0). 1 is perfect balance; k means the busiest
// node serves k times its fair part, so the layer's step takes k times as
// long as it would balanced. A layer whose load row is nil, of the wrong
// length, or all zero is taken as uniform (one token per expert), as Plan
// takes it. perLayer has Shape.Layers entries, 0 for dense layers.
//
// weightedMean is the headline figure: the mean of perLayer over the MoE
// layers weighted by each layer's tokens (Σ_e load[l][e]); with no tokens
// in any layer (or load nil) it is the plain mean.
func Imbalance(t *Table, load [][]float64) (perLayer []float64, weightedMean float64) {
	if t == nil {
		return nil, 0
	}
	sh := t.shape
	perLayer = make([]float64, sh.Layers)
	N := len(t.nodes)
	if N == 0 || len(sh.MoELayers) == 0 {
		return perLayer, 0
	}
	served := make([]float64, N)
	var sumW, sumWI, sumI float64
	for _, l := range sh.MoELayers {
		w, W := layerLoad(load, l, sh.Experts)
		clear(served)
		for e, rs := range t.replicas[l] {
			for r, i := range rs {
				served[i] += w[e] * t.Share(l, e, r)
			}
		}
		most := 0.0
		for _, s := range served {
			most = max(most, s)
		}
		imb := most / (W / float64(N))
		perLayer[l] = imb
		sumI += imb
		if l < len(load) && len(load[l]) == sh.Experts {
			observed := 0.0
			for _, v := range load[l] {
				if v > 0 {
					observed += v
				}
			}
			sumW += observed
			sumWI += float64(observed * imb) // (no fused multiply-add: same on every GOARCH)
		}
	}
	if sumW > 0 {
		return perLayer, sumWI / sumW
	}
	return perLayer, sumI / float64(len(sh.MoELayers))
}

// Moved counts the expert replicas to that a node must load because from
// did not have them there: (layer, expert, node id) in to and not in from.
// It is what switching from from to to costs, in experts' bytes; replicas
// dropped cost nothing. A nil from counts every replica of to.
func Moved(from, to *Table) int {
	if to == nil {
		return 0
	}
	fromIdx := make([]int, len(to.nodes))
	for i, id := range to.nodes {
		fromIdx[i] = -1
		if from != nil {
			fromIdx[i] = from.nodeIndex(id, false)
		}
	}
	moved := 0
	for _, l := range to.shape.MoELayers {
		for e, rs := range to.replicas[l] {
			var had []uint16
			if from != nil {
				had = from.Replicas(l, e)
			}
			for _, i := range rs {
				f := fromIdx[i]
				held := false
				for _, j := range had {
					if int(j) == f {
						held = true
						break
					}
				}
				if !held {
					moved++
				}
			}
		}
	}
	return moved
}

// Share is the part of expert e of layer l's tokens that its replica
// Replicas(l, e)[r] is planned to serve: the planned share where Plan (or
// SetShares) set one, in whole ShareUnits, else an equal share,
// 1/len(Replicas), for every replica (0 for a replica that does not
// exist). Attention nodes spread an expert's rows over its replicas in
// these proportions; Plan balances the nodes assuming they do.
func (t *Table) Share(l, e, r int) float64 {
	rs := t.Replicas(l, e)
	if r < 0 || r >= len(rs) {
		return 0
	}
	if q := t.sharesOf(l, e); q != nil {
		return float64(q[r]) / ShareUnit
	}
	return 1 / float64(len(rs))
}
