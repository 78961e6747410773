package coordinator

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"sync/atomic"
	"testing"

	"google.golang.org/grpc/codes"

	meshpb "github.com/expertmesh/expertmesh/proto"
)

// fmtStep renders a planned step compactly: "id[start:end]" per work item,
// "*" when it samples, "+" when it creates the sequence, then "rel(ids)".
func fmtStep(req *meshpb.StepRequest) string {
	if req == nil {
		return "-"
	}
	var parts []string
	for _, w := range req.Work {
		s := fmt.Sprintf("%d[%d:%d]", w.SeqId, w.StartPos, int(w.StartPos)+len(w.Tokens))
		if w.ReserveTokens > 0 {
			s += "+"
		}
		if w.Generated > 0 {
			s += fmt.Sprintf("g%d", w.Generated)
		}
		if w.Sample {
			s += "*"
		}
		parts = append(parts, s)
	}
	if len(req.Release) > 0 {
		parts = append(parts, fmt.Sprintf("rel%v", req.Release))
	}
	return strings.Join(parts, " ")
}

// fakeNode is a node's cache accounting as a real attention node keeps
// it: a sequence takes blocks as its positions grow (a work item the
// free blocks cannot cover is answered RESOURCE_EXHAUSTED and not
// applied), a release frees them, and every answer reports the free
// count. other is what something else (an older coordinator's sequences)
// holds. It does no prefix caching.
type fakeNode struct {
	total, bs, other int
	held             map[uint64]int
}

func newFakeNode(in *meshpb.NodeInfo) *fakeNode {
	return &fakeNode{total: int(in.TotalBlocks), bs: int(in.BlockSize), other: int(in.TotalBlocks - in.FreeBlocks), held: map[uint64]int{}}
}

func (f *fakeNode) free() int {
	n := f.total - f.other
	for _, b := range f.held {
		n -= b
	}
	return n
}

// answer replies to a step: each work item that samples gets token
// tok(id) and the rest an empty OK result.
func (f *fakeNode) answer(req *meshpb.StepRequest, tok func(id uint64) int) *meshpb.StepResponse {
	return f.answerRefusing(req, tok, nil)
}

// answerRefusing is answer with refuse(id) (when not 0) as the code of
// id's work, which is then not applied.
func (f *fakeNode) answerRefusing(req *meshpb.StepRequest, tok func(id uint64) int, refuse func(id uint64) int32) *meshpb.StepResponse {
	for _, id := range req.Release {
		delete(f.held, id)
	}
	resp := &meshpb.StepResponse{Step: req.Step}
	for _, w := range req.Work {
		r := &meshpb.SeqResult{SeqId: w.SeqId}
		resp.Results = append(resp.Results, r)
		if refuse != nil && refuse(w.SeqId) != 0 {
			r.Code = refuse(w.SeqId)
			continue
		}
		if need := blocksFor(int(w.StartPos)+len(w.Tokens), f.bs) - f.held[w.SeqId]; need > f.free() {
			r.Code = int32(codes.ResourceExhausted)
			continue
		} else if need > 0 {
			f.held[w.SeqId] += need
		}
		if w.Sample {
			r.Sampled, r.Token = true, int32(tok(w.SeqId))
		}
	}
	resp.FreeBlocks, resp.TotalBlocks = uint32(f.free()), uint32(f.total)
	return resp
}

// testScheduler has n nodes named n0, n1, … that answered infos; nodes[i]
// keeps node i's accounting.
func testScheduler(cfg schedConfig, infos ...*meshpb.NodeInfo) (*scheduler, []*fakeNode) {
	s := newScheduler(cfg)
	var nodes []*fakeNode
	for i, in := range infos {
		s.addNode(fmt.Sprintf("n%d", i))
		s.nodeUp(i, in)
		nodes = append(nodes, newFakeNode(in))
	}
	return s, nodes
}

func seqOf(id uint64, prompt, maxTokens int) *sequence {
	p := make([]int, prompt)
	for i := range p {
		p[i] = 10 + i
	}
	return &sequence{id: id, prompt: p, maxTokens: maxTokens, logprobs: -1, sampling: &meshpb.SamplingParams{}}
}

func info(blocks, free, bs int) *meshpb.NodeInfo {
	return &meshpb.NodeInfo{BlockSize: uint32(bs), TotalBlocks: uint32(blocks), FreeBlocks: uint32(free)}
}

func TestSchedulerSteps(t *testing.T) {
	always := func(tok int) func(uint64) int { return func(uint64) int { return tok } }
	tests := []struct {
		name   string
		cfg    schedConfig
		nodes  []*meshpb.NodeInfo
		seqs   []*sequence
		stopID []int
		tok    func(uint64) int
		// want is, per round, each node's planned step (after which the
		// fake node answers and the scheduler applies it).
		want [][]string
		// placed is each sequence's node after the first admit.
		placed []int
	}{
		{
			name:  "decode and finish at max_tokens",
			cfg:   schedConfig{budget: 16, maxSeqs: 4},
			nodes: []*meshpb.NodeInfo{info(8, 8, 4)},
			seqs:  []*sequence{seqOf(1, 3, 2)},
			tok:   always(7),
			want: [][]string{
				{"1[0:3]+*"},
				{"1[3:4]*"},
				{"rel[1]"},
				{"-"},
			},
			placed: []int{0},
		},
		{
			name:  "long prompt chunked under the budget while another decodes",
			cfg:   schedConfig{budget: 6, maxSeqs: 4},
			nodes: []*meshpb.NodeInfo{info(16, 16, 4)},
			seqs:  []*sequence{seqOf(1, 2, 4), seqOf(2, 12, 1)},
			tok:   always(7),
			// Chunks end on a block boundary where they can.
			want: [][]string{
				{"1[0:2]+* 2[0:4]+"},
				{"1[2:3]* 2[4:8]"},
				{"1[3:4]* 2[8:12]*"},
				{"1[4:5]* rel[2]"},
				{"rel[1]"},
			},
			placed: []int{0, 0},
		},
		{
			name:  "most free cache wins, ties to the lowest index",
			cfg:   schedConfig{budget: 64, maxSeqs: 4},
			nodes: []*meshpb.NodeInfo{info(8, 4, 4), info(8, 6, 4), info(8, 6, 4)},
			seqs:  []*sequence{seqOf(1, 4, 4), seqOf(2, 4, 4), seqOf(3, 4, 4)},
			tok:   always(7),
			// node1 6→4 free, node2 6→4, then node0 (4) ties node1 (4): node0.
			placed: []int{1, 2, 0},
			want:   [][]string{{"3[0:4]+*", "1[0:4]+*", "2[0:4]+*"}},
		},
		{
			name:   "stop token ends early and releases",
			cfg:    schedConfig{budget: 16, maxSeqs: 4},
			nodes:  []*meshpb.NodeInfo{info(8, 8, 4)},
			seqs:   []*sequence{seqOf(1, 2, 10)},
			stopID: []int{7},
			tok:    always(7),
			want:   [][]string{{"1[0:2]+*"}, {"rel[1]"}, {"-"}},
			placed: []int{0},
		},
		{
			name:  "a big request waits, a small one behind it overtakes it",
			cfg:   schedConfig{budget: 64, maxSeqs: 4},
			nodes: []*meshpb.NodeInfo{info(4, 4, 4)},
			// 1 takes 2 blocks (its prompt and one more token); 2 needs 3
			// (only 2 left) and waits, 3 needs 1 and runs; once 1 is
			// done its blocks go to 2, released in the step that starts
			// it.
			seqs:   []*sequence{seqOf(1, 4, 4), seqOf(2, 8, 4), seqOf(3, 2, 2)},
			tok:    always(7),
			placed: []int{0, -1, 0},
			want: [][]string{{"1[0:4]+* 3[0:2]+*"}, {"1[4:5]* 3[2:3]*"}, {"1[5:6]* rel[3]"}, {"1[6:7]*"},
				{"2[0:8]+* rel[1]"}, {"2[8:9]*"}},
		},
		{
			name:   "seat limit per node",
			cfg:    schedConfig{budget: 64, maxSeqs: 1},
			nodes:  []*meshpb.NodeInfo{info(64, 64, 4)},
			seqs:   []*sequence{seqOf(1, 2, 1), seqOf(2, 2, 1)},
			tok:    always(7),
			placed: []int{0, -1},
			// 1 finishes at once; its seat frees before its release is sent.
			want: [][]string{{"1[0:2]+*"}, {"2[0:2]+* rel[1]"}, {"rel[2]"}},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s, fn := testScheduler(tt.cfg, tt.nodes...)
			for _, q := range tt.seqs {
				q.stopIDs = tt.stopID
				s.enqueue(q)
			}
			if _, failed := s.admit(); len(failed) > 0 {
				t.Fatalf("admit failed %d sequences", len(failed))
			}
			for i, q := range tt.seqs {
				if q.node != tt.placed[i] {
					t.Errorf("sequence %d placed on node %d, want %d", q.id, q.node, tt.placed[i])
				}
			}
			for round, want := range tt.want {
				for i := range tt.nodes {
					req := s.plan(i)
					if got := fmtStep(req); got != want[i] {
						t.Fatalf("round %d node %d: step %q, want %q", round, i, got, want[i])
					}
					if req != nil {
						for _, u := range s.apply(i, fn[i].answer(req, tt.tok)) {
							if u.err != nil {
								t.Fatalf("round %d: sequence %d failed: %v", round, u.seq.id, u.err)
							}
						}
					}
				}
				s.admit()
			}
			for i, n := range s.nodes {
				if len(n.running) == 0 && len(n.release) == 0 && n.freeBlocks != int(tt.nodes[i].FreeBlocks) {
					t.Errorf("node %d idle with %d free blocks, want %d back", i, n.freeBlocks, tt.nodes[i].FreeBlocks)
				}
			}
		})
	}
}

func TestSchedulerFinishReasons(t *testing.T) {
	s, fn := testScheduler(schedConfig{budget: 16, maxSeqs: 4}, info(8, 8, 4))
	a, b, c := seqOf(1, 2, 3), seqOf(2, 2, 3), seqOf(3, 2, 0)
	a.stopIDs, b.stopIDs = []int{5}, []int{5}
	for _, q := range []*sequence{a, b, c} {
		s.enqueue(q)
	}
	s.admit()
	toks := map[uint64][]int{1: {9, 5}, 2: {9, 9, 9}}
	got := map[uint64]string{}
	var seen map[uint64][]int = map[uint64][]int{}
	for range 5 {
		req := s.plan(0)
		if req == nil {
			break
		}
		resp := fn[0].answer(req, func(id uint64) int { return toks[id][len(seen[id])] })
		for _, u := range s.apply(0, resp) {
			if u.sampled {
				seen[u.seq.id] = append(seen[u.seq.id], u.token)
			}
			if u.finish != "" {
				got[u.seq.id] = u.finish
			}
		}
	}
	want := map[uint64]string{1: "stop", 2: "length", 3: "length"}
	for id, w := range want {
		if got[id] != w {
			t.Errorf("sequence %d finished %q, want %q (tokens %v)", id, got[id], w, seen[id])
		}
	}
	if fmt.Sprint(seen[1]) != "[9 5]" || fmt.Sprint(seen[2]) != "[9 9 9]" || len(seen[3]) != 0 {
		t.Errorf("tokens %v", seen)
	}
}

func TestSchedulerCancel(t *testing.T) {
	tests := []struct {
		name string
		// cancelAt: rounds planned+applied before the cancel; inflight:
		// cancel between plan and apply of that round.
		rounds   int
		inflight bool
		want     []string // steps after the cancel
	}{
		{name: "waiting never reaches the node", rounds: -1, want: []string{"-"}},
		{name: "placed but never sent", rounds: 0, want: []string{"-"}},
		{name: "running", rounds: 1, want: []string{"rel[1]", "-"}},
		{name: "in flight: result dropped, released next", rounds: 1, inflight: true, want: []string{"rel[1]", "-"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s, fn := testScheduler(schedConfig{budget: 16, maxSeqs: 4}, info(8, 8, 4))
			q := seqOf(1, 3, 8)
			s.enqueue(q)
			if tt.rounds >= 0 {
				s.admit()
			}
			for range tt.rounds {
				req := s.plan(0)
				if tt.inflight {
					if node := s.cancel(q); node != 0 {
						t.Fatalf("cancel returned node %d, want 0", node)
					}
					if ups := s.apply(0, fn[0].answer(req, func(uint64) int { return 1 })); len(ups) != 0 {
						t.Fatalf("cancelled sequence got %d updates", len(ups))
					}
					break
				}
				s.apply(0, fn[0].answer(req, func(uint64) int { return 1 }))
			}
			if !tt.inflight {
				s.cancel(q)
			}
			for i, w := range tt.want {
				req := s.plan(0)
				if got := fmtStep(req); got != w {
					t.Fatalf("step %d after cancel: %q, want %q", i, got, w)
				}
				if req != nil {
					s.apply(0, fn[0].answer(req, func(uint64) int { return 1 }))
				}
			}
			if n := s.nodes[0]; n.freeBlocks != 8 || len(n.running) != 0 || len(s.waiting) != 0 {
				t.Errorf("after cancel: free %d running %d waiting %d, want 8 0 0", n.freeBlocks, len(n.running), len(s.waiting))
			}
		})
	}
}

func TestSchedulerNodeFailure(t *testing.T) {
	s, fn := testScheduler(schedConfig{budget: 16, maxSeqs: 4}, info(8, 8, 4), info(8, 2, 4))
	a, b := seqOf(1, 3, 4), seqOf(2, 3, 4)
	s.enqueue(a)
	s.enqueue(b)
	s.admit()
	if a.node != 0 || b.node != 0 {
		t.Fatalf("placed on %d, %d, want 0, 0", a.node, b.node)
	}
	// a gets two tokens on node 0, then node 0 fails mid-step.
	s.apply(0, fn[0].answer(s.plan(0), func(uint64) int { return 7 }))
	s.apply(0, fn[0].answer(s.plan(0), func(uint64) int { return 8 }))
	s.plan(0)
	boom := errors.New("boom")
	if ups := s.fail(0, boom); len(ups) != 0 {
		t.Fatalf("first failure failed %d sequences, want them rebuilt", len(ups))
	}
	if s.plan(0) != nil {
		t.Fatal("a down node was planned")
	}
	// Rebuilt at the head of the queue: a fits node 1, b waits.
	s.admit()
	if a.node != 1 || b.node != -1 {
		t.Fatalf("after rebuild: a on %d, b on %d; want 1, -1", a.node, b.node)
	}
	// a re-prefills prompt + its first generated token, then decodes the
	// second as if nothing happened.
	req := s.plan(1)
	if got := fmtStep(req); got != "1[0:4]+g2" {
		t.Fatalf("rebuild step %q", got)
	}
	s.apply(1, fn[1].answer(req, nil))
	if got := fmtStep(s.plan(1)); got != "1[4:5]*" {
		t.Fatalf("after rebuild %q", got)
	}
	// A second failure of the same sequence is final, and with no node
	// left the waiting one fails too instead of hanging.
	ups := s.fail(1, boom)
	if len(ups) != 1 || ups[0].seq != a || !errors.Is(ups[0].err, boom) {
		t.Fatalf("second failure: %+v", ups)
	}
	if _, failed := s.admit(); len(failed) != 1 || failed[0].seq != b || !errors.Is(failed[0].err, ErrNoNodes) {
		t.Fatalf("admit with no nodes: %+v", failed)
	}
	if err := s.check(seqOf(4, 2, 2)); !errors.Is(err, ErrNoNodes) {
		t.Fatalf("check with no nodes: %v", err)
	}
	// Back up: Info counts the blocks a and b still hold there; the
	// failed sequences are released and the next answer says so.
	s.nodeUp(0, info(8, fn[0].free(), 4))
	if held := 8 - fn[0].free(); held != 2 || s.nodes[0].freeBlocks != 6 {
		t.Fatalf("free after Info %d, want 6 (a and b still hold %d blocks there, want 2)", s.nodes[0].freeBlocks, held)
	}
	req = s.plan(0)
	if got := fmtStep(req); got != "rel[1 2]" {
		t.Fatalf("after recovery %q, want rel[1 2]", got)
	}
	s.apply(0, fn[0].answer(req, nil))
	if s.nodes[0].freeBlocks != 8 {
		t.Errorf("free %d, want 8", s.nodes[0].freeBlocks)
	}
}

func TestSchedulerPerSequenceErrors(t *testing.T) {
	s, fn := testScheduler(schedConfig{budget: 16, maxSeqs: 4}, info(8, 8, 4))
	a, b, c := seqOf(1, 2, 2), seqOf(2, 2, 2), seqOf(3, 2, 2)
	for _, q := range []*sequence{a, b, c} {
		s.enqueue(q)
	}
	s.admit()
	req := s.plan(0)
	resp := fn[0].answer(req, func(uint64) int { return 3 })
	resp.Results[0].Code, resp.Results[0].Message = int32(codes.Internal), "boom"
	resp.Results[1].Sampled = false
	resp.Results = resp.Results[:2] // 3 has no result
	ups := s.apply(0, resp)
	var errs []string
	for _, u := range ups {
		var nse *NodeSeqError
		switch {
		case errors.As(u.err, &nse) && nse.Code == codes.Internal:
			errs = append(errs, fmt.Sprintf("%d:internal", u.seq.id))
		case errors.Is(u.err, ErrNodeFailed):
			errs = append(errs, fmt.Sprintf("%d:failed", u.seq.id))
		default:
			errs = append(errs, fmt.Sprintf("%d:%v", u.seq.id, u.err))
		}
	}
	if got := strings.Join(errs, " "); got != "1:internal 2:failed 3:failed" {
		t.Fatalf("errors %q", got)
	}
	if got := fmtStep(s.plan(0)); got != "rel[1 2 3]" {
		t.Fatalf("next step %q, want rel[1 2 3]", got)
	}
}

func TestSchedulerCheck(t *testing.T) {
	s, _ := testScheduler(schedConfig{budget: 16, maxSeqs: 4}, info(4, 4, 4), info(8, 1, 2))
	for _, tt := range []struct {
		prompt, max int
		ok          bool
	}{{10, 6, true}, {10, 7, false}, {1, 0, true}} {
		err := s.check(seqOf(1, tt.prompt, tt.max))
		if (err == nil) != tt.ok || (err != nil && !errors.Is(err, ErrTooLong)) {
			t.Errorf("check(%d+%d) = %v, want ok=%v", tt.prompt, tt.max, err, tt.ok)
		}
	}
}

// TestSchedulerRandomWorkloads drives the scheduler with random arrivals,
// lengths and cancellations against fake nodes whose caches are far too
// small to hold every request's prompt + max_tokens at once, and checks
// what the design promises: nothing fails for lack of cache, every
// request that is not cancelled gets all its tokens, the nodes never
// hold more than their caches, and every block comes back.
func TestSchedulerRandomWorkloads(t *testing.T) {
	var preemptions atomic.Int64
	defer func() {
		if !t.Failed() && preemptions.Load() == 0 {
			t.Error("no workload preempted anything: the test proves nothing")
		}
		t.Logf("%d preemptions", preemptions.Load())
	}()
	for seed := range uint64(40) {
		t.Run(fmt.Sprint(seed), func(t *testing.T) {
			rng := rand.New(rand.NewPCG(seed, 1))
			var infos []*meshpb.NodeInfo
			for range 1 + rng.IntN(3) {
				infos = append(infos, info(8+rng.IntN(24), 0, 4))
				infos[len(infos)-1].FreeBlocks = infos[len(infos)-1].TotalBlocks
			}
			smallest := 1 << 30
			for _, in := range infos {
				smallest = min(smallest, int(in.TotalBlocks)*4)
			}
			s, fn := testScheduler(schedConfig{budget: 8 + rng.IntN(24), maxSeqs: 2 + rng.IntN(6)}, infos...)
			var all []*sequence
			got := map[uint64]int{}
			cancelled := map[uint64]bool{}
			next := uint64(1)
			for round := 0; round < 4000; round++ {
				if round < 300 && rng.IntN(3) == 0 {
					total := 2 + rng.IntN(smallest-1)
					p := 1 + rng.IntN(min(total-1, 40))
					q := seqOf(next, p, total-p)
					next++
					if err := s.check(q); err != nil {
						t.Fatalf("request of %d tokens refused: %v", total, err)
					}
					s.enqueue(q)
					all = append(all, q)
				}
				if len(all) > 0 && rng.IntN(40) == 0 {
					q := all[rng.IntN(len(all))]
					if !q.done {
						s.cancel(q)
						cancelled[q.id] = true
					}
				}
				if _, failed := s.admit(); len(failed) > 0 {
					t.Fatalf("round %d: admit failed %d", round, len(failed))
				}
				for i := range fn {
					req := s.plan(i)
					if req == nil {
						continue
					}
					for _, u := range s.apply(i, fn[i].answer(req, func(uint64) int { return 7 })) {
						if u.err != nil {
							t.Fatalf("round %d: sequence %d failed: %v", round, u.seq.id, u.err)
						}
						if u.sampled {
							got[u.seq.id]++
						}
					}
					if free := fn[i].free(); free < 0 {
						t.Fatalf("round %d: node %d over its cache by %d blocks", round, i, -free)
					}
				}
				done := round >= 300
				for _, q := range all {
					done = done && q.done
				}
				if done && len(s.waiting) == 0 {
					break
				}
			}
			for _, q := range all {
				if !q.done {
					t.Fatalf("sequence %d (prompt %d, max %d) never finished: node %d, sent %d, generated %d; waiting %d",
						q.id, len(q.prompt), q.maxTokens, q.node, q.sent, len(q.generated), len(s.waiting))
				}
				if !cancelled[q.id] && got[q.id] != q.maxTokens {
					t.Fatalf("sequence %d got %d tokens, want %d", q.id, got[q.id], q.maxTokens)
				}
			}
			preemptions.Add(int64(s.preempted))
			for i := range fn {
				for range 3 { // trailing releases
					if req := s.plan(i); req != nil {
						s.apply(i, fn[i].answer(req, nil))
					}
				}
				if fn[i].free() != fn[i].total || s.nodes[i].freeBlocks != fn[i].total {
					t.Fatalf("node %d: %d blocks free, view %d, of %d", i, fn[i].free(), s.nodes[i].freeBlocks, fn[i].total)
				}
			}
		})
	}
}

// TestSchedulerHoldsForNode: while the driver holds for a node (hold),
// a failed node's sequences and new ones wait instead of failing, a new
// one is checked against the caches the scheduler knew, and they are
// placed when a node is up again; without hold they fail.
func TestSchedulerHoldsForNode(t *testing.T) {
	s, fn := testScheduler(schedConfig{budget: 16, maxSeqs: 4}, info(8, 8, 4))
	a := seqOf(1, 3, 4)
	s.enqueue(a)
	s.admit()
	s.apply(0, fn[0].answer(s.plan(0), func(uint64) int { return 7 }))
	s.plan(0)
	s.hold = true
	if ups := s.fail(0, errors.New("boom")); len(ups) != 0 {
		t.Fatalf("failure failed %d sequences, want them rebuilt", len(ups))
	}
	if woken, failed := s.admit(); len(woken) != 0 || len(failed) != 0 || a.node != -1 {
		t.Fatalf("admit holding for a node: woken %v, failed %+v, a on %d", woken, failed, a.node)
	}
	b := seqOf(2, 2, 2)
	if err := s.check(b); err != nil {
		t.Fatalf("check holding for a node: %v", err)
	}
	if err := s.check(seqOf(3, 20, 20)); !errors.Is(err, ErrTooLong) {
		t.Fatalf("check of a request no known cache holds, holding for a node: %v", err)
	}
	s.enqueue(b)
	s.nodeUp(0, info(8, fn[0].free(), 4))
	if woken, _ := s.admit(); len(woken) != 1 || a.node != 0 || b.node != 0 {
		t.Fatalf("node back: woken %v, a on %d, b on %d", woken, a.node, b.node)
	}
	// Without hold the same loss fails what waits.
	s.plan(0)
	s.hold = false
	s.fail(0, errors.New("boom"))
	if _, failed := s.admit(); len(failed) != 1 || failed[0].seq != b || !errors.Is(failed[0].err, ErrNoNodes) {
		t.Fatalf("admit not holding: %+v", failed)
	}
}
