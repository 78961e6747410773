package placement

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"
)

// randomInput draws a PlanInput of bounded size: up to maxE experts, 4
// layers, maxN nodes. Some nodes have slots (some too few, some negative),
// some loads are skewed or all on one expert, and Current is nil, an
// earlier plan for other nodes, load and redundancy, or a random table.
func randomInput(r *rand.Rand, maxE, maxN int) PlanInput {
	E := 1 + r.IntN(maxE)
	sh := Shape{Layers: 1 + r.IntN(4), Experts: E, Groups: 1}
	for l := range sh.Layers {
		if r.IntN(3) > 0 || (l == sh.Layers-1 && len(sh.MoELayers) == 0) {
			sh.MoELayers = append(sh.MoELayers, l)
		}
	}
	if r.IntN(2) == 0 {
		var divs []int
		for g := 2; g <= E; g++ {
			if E%g == 0 {
				divs = append(divs, g)
			}
		}
		if len(divs) > 0 {
			sh.Groups = divs[r.IntN(len(divs))]
			sh.TopKGroup = r.IntN(sh.Groups + 1)
		}
	}
	in := PlanInput{Shape: sh, Version: r.Uint64N(100), Redundant: r.IntN(E + 1)}
	N := 1 + r.IntN(maxN)
	for i := range N {
		n := Node{ID: fmt.Sprintf("n%02d", i)}
		switch r.IntN(8) {
		case 0:
			n.Slots = -1
		case 1:
			n.Slots = 1 + r.IntN(len(sh.MoELayers)*E)
		}
		in.Nodes = append(in.Nodes, n)
	}
	in.Load = randomLoad(r, sh)
	switch r.IntN(4) {
	case 1: // an earlier plan: other nodes, load and redundancy
		prev := randomInput(r, maxE, maxN)
		prev.Shape = sh
		prev.Load = randomLoad(r, sh)
		prev.Redundant = r.IntN(E + 1)
		if t, err := Plan(prev); err == nil {
			in.Current = t
		}
	case 2: // an earlier plan for these very nodes
		prev := in
		prev.Load = randomLoad(r, sh)
		prev.Redundant = r.IntN(in.Redundant + 1)
		if t, err := Plan(prev); err == nil {
			in.Current = t
		}
	case 3: // a random table over these nodes, some with random shares
		t := NewTable(sh, 0)
		shares := r.IntN(2) == 0
		for _, l := range sh.MoELayers {
			for e := range E {
				for range 1 + r.IntN(2) {
					_ = t.Add(l, e, in.Nodes[r.IntN(N)].ID)
				}
				if k := len(t.Replicas(l, e)); shares && k > 1 {
					parts := make([]float64, k)
					for i := range parts {
						parts[i] = float64(r.IntN(4))
					}
					parts[0]++
					_ = t.SetShares(l, e, parts)
				}
			}
		}
		in.Current = t
	}
	return in
}

func randomLoad(r *rand.Rand, sh Shape) [][]float64 {
	if r.IntN(4) == 0 {
		return nil
	}
	load := make([][]float64, sh.Layers)
	for _, l := range sh.MoELayers {
		row := make([]float64, sh.Experts)
		switch r.IntN(5) {
		case 0: // nil row: uniform
			continue
		case 1: // all on one expert
			row[r.IntN(sh.Experts)] = 1 + float64(r.IntN(1000))
		default:
			for e := range row {
				if r.IntN(6) > 0 {
					row[e] = float64(r.IntN(1000)) * float64(1+r.IntN(4)*r.IntN(4))
				}
			}
		}
		load[l] = row
	}
	return load
}

// checkProperties checks everything a plan must satisfy; it returns the
// plan (nil where the input rightly fails).
func checkProperties(t *testing.T, in PlanInput) *Table {
	t.Helper()
	sh := in.Shape
	L, E := len(sh.MoELayers), sh.Experts
	usable, capacity := 0, 0
	for _, n := range in.Nodes {
		if n.Slots >= 0 {
			usable++
			if n.Slots == 0 || n.Slots > L*E {
				capacity += L * E
			} else {
				capacity += n.Slots
			}
		}
	}
	tb, err := Plan(in)
	if err != nil {
		if !errors.Is(err, ErrPlacement) {
			t.Fatalf("error %v does not wrap ErrPlacement", err)
		}
		if usable > 0 && capacity >= L*E {
			t.Fatalf("Plan failed with %d usable nodes and %d slots for %d: %v", usable, capacity, L*E, err)
		}
		return nil
	}
	if usable == 0 || capacity < L*E {
		t.Fatalf("Plan succeeded with %d usable nodes and %d slots for %d", usable, capacity, L*E)
	}
	checkPlan(t, in, tb)
	if t.Failed() {
		t.FailNow()
	}

	// Deterministic, whatever the node order; survives its stored form.
	js, _ := json.Marshal(tb)
	shuffled := in
	shuffled.Nodes = slices.Clone(in.Nodes)
	slices.Reverse(shuffled.Nodes)
	again, err := Plan(shuffled)
	if err != nil {
		t.Fatal(err)
	}
	if js2, _ := json.Marshal(again); !bytes.Equal(js, js2) {
		t.Fatalf("not deterministic:\n%s\n%s", js, js2)
	}
	back, err := DecodeTable(sh, js)
	if err != nil || !back.Equal(tb) {
		t.Fatalf("stored form does not round-trip: %v", err)
	}

	// Planned shares never balance worse than equal ones would.
	equal, _ := DecodeTable(sh, js)
	for _, l := range sh.MoELayers {
		for e := range E {
			if err := equal.SetShares(l, e, nil); err != nil {
				t.Fatal(err)
			}
		}
	}
	withShares, _ := Imbalance(tb, in.Load)
	withoutShares, _ := Imbalance(equal, in.Load)
	for _, l := range sh.MoELayers {
		if withShares[l] > withoutShares[l]*(1+1e-6) {
			t.Fatalf("layer %d: imbalance %.6f with planned shares, %.6f with equal ones", l, withShares[l], withoutShares[l])
		}
	}

	// Never worse than a current placement valid for the same nodes.
	if c := in.Current; c != nil && sameNodes(c, in.Nodes) && withinBudget(in, c) {
		cur, _ := Imbalance(c, in.Load)
		got, _ := Imbalance(tb, in.Load)
		for _, l := range sh.MoELayers {
			if got[l] > cur[l]*(1+1e-6) {
				t.Fatalf("layer %d: imbalance %.6f, the current placement's %.6f", l, got[l], cur[l])
			}
		}
	}

	// Planning again from the result moves nothing.
	stay := in
	stay.Current = tb
	next, err := Plan(stay)
	if err != nil {
		t.Fatal(err)
	}
	if m := Moved(tb, next); m != 0 || !next.Equal(tb) {
		t.Fatalf("replanning from the result moves %d replicas", m)
	}
	return tb
}

// sameNodes: c uses exactly the nodes of ns that may hold experts.
func sameNodes(c *Table, ns []Node) bool {
	k := 0
	for _, n := range ns {
		if n.Slots >= 0 {
			k++
			if !c.Has(n.ID) {
				return false
			}
		}
	}
	return k == len(c.Nodes())
}

// withinBudget: c holds no more replicas per layer than in allows, and no
// node more than its slots.
func withinBudget(in PlanInput, c *Table) bool {
	sh := in.Shape
	L, E := len(sh.MoELayers), sh.Experts
	total, usable := 0, 0
	for _, n := range in.Nodes {
		if n.Slots < 0 {
			continue
		}
		usable++
		k := L * E
		if n.Slots > 0 && n.Slots < k {
			k = n.Slots
		}
		total += k
		if c.Set(n.ID).Len() > k {
			return false
		}
	}
	extra := min(in.Redundant, (total-L*E)/L, (usable-1)*E)
	for _, l := range sh.MoELayers {
		k := 0
		for e := range E {
			k += len(c.Replicas(l, e))
		}
		if k > E+extra {
			return false
		}
	}
	return true
}

func TestPlanProperties(t *testing.T) {
	iters := 3000
	if testing.Short() {
		iters = 300
	}
	r := rand.New(rand.NewPCG(12, 34))
	for i := range iters {
		in := randomInput(r, 40, 10)
		t.Run(fmt.Sprint(i), func(t *testing.T) { checkProperties(t, in) })
		if t.Failed() {
			return
		}
	}
}

// TestPlanMembership checks the two membership changes on random loads.
// A node that leaves: every expert it alone held gets a new replica, and
// under uniform load without extra replicas exactly its experts move. A
// node that joins: it gets at least its least count, the busiest node's
// load does not grow, and under uniform load only the newcomer's replicas
// move.
func TestPlanMembership(t *testing.T) {
	r := rand.New(rand.NewPCG(5, 6))
	for i := range 300 {
		sh := Shape{Layers: 3, Experts: 8 * (1 + r.IntN(8)), Groups: 8, TopKGroup: 3, MoELayers: []int{1, 2}}
		if r.IntN(2) == 0 {
			sh.Groups, sh.TopKGroup = 1, 0
		}
		var nodes []Node
		for k := range 2 + r.IntN(8) {
			nodes = append(nodes, Node{ID: fmt.Sprintf("n%d", k)})
		}
		in := PlanInput{Shape: sh, Nodes: nodes, Load: randomLoad(r, sh), Redundant: r.IntN(sh.Experts / 4)}
		if r.IntN(3) == 0 {
			in.Load, in.Redundant = nil, 0
		}
		// Exactly the joiner's or leaver's share moves under uniform load,
		// unless packing switches to or from whole groups (which moves
		// groups home).
		uniform := in.Load == nil && in.Redundant == 0 && sh.Groups == 1
		before, err := Plan(in)
		if err != nil {
			t.Fatal(err)
		}
		// Leave.
		gone := nodes[r.IntN(len(nodes))].ID
		leave := in
		leave.Nodes = slices.DeleteFunc(slices.Clone(nodes), func(n Node) bool { return n.ID == gone })
		leave.Current = before
		after, err := Plan(leave)
		if err != nil {
			t.Fatal(err)
		}
		sole := 0
		for _, l := range sh.MoELayers {
			for e := range sh.Experts {
				if ids := before.ReplicaIDs(l, e); len(ids) == 1 && ids[0] == gone {
					sole++
				}
			}
		}
		lost := before.Set(gone).Len()
		if m := Moved(before, after); m < sole || (uniform && m != lost) {
			t.Fatalf("case %d: %s left holding %d (%d alone), %d moved", i, gone, lost, sole, m)
		}
		// Join.
		join := in
		join.Nodes = append(slices.Clone(nodes), Node{ID: "new"})
		join.Current = before
		joined, err := Plan(join)
		if err != nil {
			t.Fatal(err)
		}
		got := joined.Set("new").Len()
		for _, l := range sh.MoELayers {
			// Its share of the replicas the layer has (extra replicas of
			// experts without load are left out), less the slack and one
			// for rounding.
			total, mine := 0, 0
			for e := range sh.Experts {
				ids := joined.ReplicaIDs(l, e)
				total += len(ids)
				if slices.Contains(ids, "new") {
					mine++
				}
			}
			share := total / len(join.Nodes)
			if least := share - (share+countSlack-1)/countSlack - 1; mine < least {
				t.Fatalf("case %d layer %d: the new node holds %d of %d, its least is %d", i, l, mine, total, least)
			}
		}
		if m := Moved(before, joined); m < got || (uniform && m != got) {
			t.Fatalf("case %d: the new node took %d and %d moved", i, got, m)
		}
		was, _ := Imbalance(before, in.Load)
		now, _ := Imbalance(joined, in.Load)
		for _, l := range sh.MoELayers {
			// Busiest node's load: imbalance × mean.
			if now[l]/float64(len(joined.Nodes())) > was[l]/float64(len(before.Nodes()))*(1+1e-9) {
				t.Fatalf("case %d layer %d: the busiest node's load grew with a node more (%.4f over %d nodes, was %.4f over %d)",
					i, l, now[l], len(joined.Nodes()), was[l], len(before.Nodes()))
			}
		}
	}
}

func FuzzPlan(f *testing.F) {
	for _, s := range []uint64{1, 2, 3, 42, 1234} {
		f.Add(s, uint8(16), uint8(6))
	}
	f.Fuzz(func(t *testing.T, seed uint64, maxE, maxN uint8) {
		r := rand.New(rand.NewPCG(seed, 7))
		checkProperties(t, randomInput(r, 1+int(maxE)%64, 1+int(maxN)%16))
	})
}

// v3Input is DeepSeek-V3's shape: 61 layers, the first 3 dense, 256
// routed experts in 8 groups (topk_group 4), with 32 extra replicas per
// layer on 64 nodes, and a skewed load that differs per layer.
func v3Input() PlanInput {
	sh := Shape{Layers: 61, Experts: 256, Groups: 8, TopKGroup: 4}
	load := make([][]float64, sh.Layers)
	for l := 3; l < sh.Layers; l++ {
		sh.MoELayers = append(sh.MoELayers, l)
		load[l] = zipfRow(sh.Experts, 0.8, uint64(l))
	}
	in := PlanInput{Shape: sh, Load: load, Redundant: 32, Version: 1}
	for i := range 64 {
		in.Nodes = append(in.Nodes, Node{ID: fmt.Sprintf("expert-%02d", i)})
	}
	return in
}

func TestPlanV3(t *testing.T) {
	in := v3Input()
	tb := checkProperties(t, in)
	_, imb := Imbalance(tb, in.Load)
	if imb > 1.05 {
		t.Errorf("V3 imbalance %.4f", imb)
	}
	t.Logf("V3, 64 nodes, 32 redundant: imbalance %.4f", imb)
}

func BenchmarkPlanV3(b *testing.B) {
	in := v3Input()
	first, err := Plan(in)
	if err != nil {
		b.Fatal(err)
	}
	b.Run("fresh", func(b *testing.B) {
		for b.Loop() {
			if _, err := Plan(in); err != nil {
				b.Fatal(err)
			}
		}
	})
	// The load shifts: every layer's hot experts move.
	shifted := in
	shifted.Current = first
	shifted.Load = make([][]float64, len(in.Load))
	for _, l := range in.Shape.MoELayers {
		shifted.Load[l] = zipfRow(in.Shape.Experts, 0.8, uint64(l+1000))
	}
	b.Run("rebalance", func(b *testing.B) {
		for b.Loop() {
			if _, err := Plan(shifted); err != nil {
				b.Fatal(err)
			}
		}
	})
	lost := in
	lost.Current = first
	lost.Nodes = in.Nodes[1:]
	b.Run("node-lost", func(b *testing.B) {
		for b.Loop() {
			if _, err := Plan(lost); err != nil {
				b.Fatal(err)
			}
		}
	})
}
