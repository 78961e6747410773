package attnnode

import (
	"context"
	"math"
	"testing"

	"google.golang.org/grpc/codes"

	meshpb "github.com/expertmesh/expertmesh/proto"
)

// cacheNode starts an in-process tiny-v2 node with block size 16 and the
// given cache and prefix caching.
func cacheNode(t *testing.T, dir string, cacheBytes int64, prefix bool) *Node {
	t.Helper()
	cfg := DefaultConfig()
	cfg.ModelDir, cfg.Threads, cfg.CacheBytes, cfg.PrefixCaching = dir, 1, cacheBytes, prefix
	n, err := Start(context.Background(), inProcess(cfg))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.Close() })
	return n
}

// stepOne runs one step and returns its answer, failing on a whole-step
// failure.
func stepOne(t *testing.T, n *Node, req *meshpb.StepRequest) *meshpb.StepResponse {
	t.Helper()
	resp := checkedStep(t, n, req)
	if resp.Code != 0 {
		t.Fatalf("step %d: %s: %s", req.Step, codes.Code(resp.Code), resp.Message)
	}
	return resp
}

func seqTokens(n, seed int) []int32 {
	out := make([]int32, n)
	for i := range out {
		out[i] = int32(2 + (i*31+seed*17)%500)
	}
	return out
}

// TestBlocksOnDemand: a sequence holds the blocks its positions need, not
// reserve_tokens' worth; growth the cache cannot cover is answered
// RESOURCE_EXHAUSTED with the work unapplied, and the same work succeeds
// once blocks are free.
func TestBlocksOnDemand(t *testing.T) {
	n := cacheNode(t, genTiny(t, "tiny-v2"), 64<<10, false)
	info, _ := n.Info(context.Background(), 0)
	total, bs := int(info.TotalBlocks), int(info.BlockSize)
	// Sequence 1 asks for a huge bound but holds one block.
	r := stepOne(t, n, &meshpb.StepRequest{Step: 1, Work: []*meshpb.SeqWork{
		{SeqId: 1, Tokens: seqTokens(bs-1, 1), Sample: true, ReserveTokens: 100000}}})
	if got := total - int(r.FreeBlocks); got != 1 {
		t.Fatalf("sequence holds %d blocks, want 1", got)
	}
	tok := r.Results[0].Token
	// Sequence 2 takes every other block.
	stepOne(t, n, &meshpb.StepRequest{Step: 2, Work: []*meshpb.SeqWork{
		{SeqId: 2, Tokens: seqTokens((total-1)*bs, 2), ReserveTokens: uint32(total * bs)}}})
	// Sequence 1's next token still fits its block; the one after needs
	// a block there is none of.
	r = stepOne(t, n, &meshpb.StepRequest{Step: 3, Work: []*meshpb.SeqWork{
		{SeqId: 1, Tokens: []int32{tok}, StartPos: uint32(bs - 1), Sample: true}}})
	tok = r.Results[0].Token
	grow := &meshpb.StepRequest{Step: 4, Work: []*meshpb.SeqWork{{SeqId: 1, Tokens: []int32{tok}, StartPos: uint32(bs), Sample: true}}}
	r = checkedStep(t, n, grow)
	if res := r.Results[0]; codes.Code(res.Code) != codes.ResourceExhausted || res.Sampled {
		t.Fatalf("growth past the cache: %+v", res)
	}
	// Unapplied: freeing blocks lets the very same work through.
	grow.Release, grow.Step = []uint64{2}, 5
	if r := stepOne(t, n, grow); r.Results[0].Code != 0 || !r.Results[0].Sampled || int(r.FreeBlocks) != total-2 {
		t.Fatalf("retried growth: %+v, %d free", r.Results[0], r.FreeBlocks)
	}
	stepOne(t, n, &meshpb.StepRequest{Step: 6, Release: []uint64{1}})
}

// prefixRun drives one sequence over steps: prompt chunks of `chunk`
// tokens, then decodes; it returns sampled tokens, their logprobs and the
// cached tokens reported.
func prefixRun(t *testing.T, n *Node, id uint64, prompt []int32, chunk, maxTokens int, sp *meshpb.SamplingParams, step *uint64) (toks []int32, lps []float64, cached int) {
	t.Helper()
	for fed := 0; fed < len(prompt); {
		end := min(fed+chunk, len(prompt))
		sw := &meshpb.SeqWork{SeqId: id, Tokens: prompt[fed:end], StartPos: uint32(fed), Sample: end == len(prompt)}
		if fed == 0 {
			sw.ReserveTokens, sw.Logprobs, sw.Sampling = uint32(len(prompt)+maxTokens), 1, sp
		}
		*step++
		res := stepOne(t, n, &meshpb.StepRequest{Step: *step, Work: []*meshpb.SeqWork{sw}}).Results[0]
		if res.Code != 0 {
			t.Fatalf("prefill: %s", res.Message)
		}
		cached += int(res.CachedTokens)
		if res.Sampled {
			toks, lps = append(toks, res.Token), append(lps, res.Logprob.Logprob)
		}
		fed = end
	}
	for len(toks) < maxTokens {
		*step++
		res := stepOne(t, n, &meshpb.StepRequest{Step: *step, Work: []*meshpb.SeqWork{
			{SeqId: id, Tokens: toks[len(toks)-1:], StartPos: uint32(len(prompt) + len(toks) - 1), Sample: true}}}).Results[0]
		toks, lps = append(toks, res.Token), append(lps, res.Logprob.Logprob)
	}
	return toks, lps, cached
}

// TestPrefixCaching: a second sequence with a common prefix takes its full
// blocks from the cache (reported in cached_tokens, across chunk
// boundaries, the sampled position always computed) and produces what a
// node without prefix caching produces, greedy and seeded.
func TestPrefixCaching(t *testing.T) {
	dir := genTiny(t, "tiny-v2")
	on, off := cacheNode(t, dir, 2<<20, true), cacheNode(t, dir, 2<<20, false)
	var sOn, sOff uint64
	for k, sp := range []*meshpb.SamplingParams{{}, {Temperature: 0.8, TopK: 50, Seed: 11}} {
		system := seqTokens(40, 7+k) // two full blocks of 16 and 8 tokens
		p1 := append(append([]int32{}, system...), seqTokens(9, 1)...)
		p2 := append(append([]int32{}, system...), seqTokens(30, 2)...)
		p3 := append([]int32{}, system[:32]...) // exactly the cached blocks
		base := uint64(100 * (k + 1))
		for i, tt := range []struct {
			prompt []int32
			chunk  int
			cached int
		}{
			{p1, 64, 0},
			// Chunks 0-20 and 20-40: a chunk only matches from a block
			// boundary, so 0-20 takes block 0 and 20-40 computes.
			{p2, 20, 16},
			// p2's four full blocks are cached now: chunks of 16 take
			// them whole (no rows at all), 64-70 samples.
			{p2, 16, 64},
			{p3, 64, 16}, // the last token is computed to sample: one block only
		} {
			id := base + uint64(i)
			got, gotLP, cached := prefixRun(t, on, id, tt.prompt, tt.chunk, 5, sp, &sOn)
			want, wantLP, wantCached := prefixRun(t, off, id, tt.prompt, tt.chunk, 5, sp, &sOff)
			if wantCached != 0 {
				t.Fatalf("prefix caching off reported %d cached tokens", wantCached)
			}
			if cached != tt.cached {
				t.Errorf("sampling %v, prompt %d (chunk %d): %d cached tokens, want %d", sp, i, tt.chunk, cached, tt.cached)
			}
			for j := range want {
				if got[j] != want[j] || math.Abs(gotLP[j]-wantLP[j]) > 1e-4 {
					t.Fatalf("sampling %v, prompt %d: tokens %v logprobs %v with prefix caching, %v %v without", sp, i, got, gotLP, want, wantLP)
				}
			}
			sOn++
			stepOne(t, on, &meshpb.StepRequest{Step: sOn, Release: []uint64{id}})
			sOff++
			stepOne(t, off, &meshpb.StepRequest{Step: sOff, Release: []uint64{id}})
		}
		// Every block is free again, the cached ones included.
		if info, _ := on.Info(context.Background(), 0); info.FreeBlocks != info.TotalBlocks || info.CachedBlocks == 0 || !info.PrefixCaching {
			t.Fatalf("after release: %d/%d free, %d cached, prefix caching %v", info.FreeBlocks, info.TotalBlocks, info.CachedBlocks, info.PrefixCaching)
		}
	}
}

// TestPrefixCacheFailedStep: a step that is not applied registers none of
// its blocks and gives back the cached blocks it took.
func TestPrefixCacheFailedStep(t *testing.T) {
	n := cacheNode(t, genTiny(t, "tiny-v2"), 2<<20, true)
	p := seqTokens(40, 3)
	cancelled, cancel := context.WithCancel(context.Background())
	cancel()
	req := &meshpb.StepRequest{Step: 1, Work: []*meshpb.SeqWork{{SeqId: 1, Tokens: p, Sample: true, ReserveTokens: 50}}}
	if _, err := n.Step(cancelled, req); err == nil {
		t.Fatal("a step under a cancelled context was applied")
	}
	var step uint64 = 1
	if _, _, cached := prefixRun(t, n, 2, p, 64, 1, &meshpb.SamplingParams{}, &step); cached != 0 {
		t.Fatalf("a failed step's blocks were cached: %d tokens", cached)
	}
	// Sequence 3 takes 2's blocks in a step that fails: nothing leaks.
	req = &meshpb.StepRequest{Step: 9, Work: []*meshpb.SeqWork{{SeqId: 3, Tokens: p, Sample: true, ReserveTokens: 50}}}
	if _, err := n.Step(cancelled, req); err == nil {
		t.Fatal("applied")
	}
	stepOne(t, n, &meshpb.StepRequest{Step: 10, Release: []uint64{2}})
	info, _ := n.Info(context.Background(), 0)
	if info.FreeBlocks != info.TotalBlocks || info.CachedBlocks != 2 || info.ActiveSequences != 0 {
		t.Fatalf("%d/%d free, %d cached, %d active; want all free, 2 cached", info.FreeBlocks, info.TotalBlocks, info.CachedBlocks, info.ActiveSequences)
	}
}

// TestPrefixCacheAcrossEpochs: blocks a newer coordinator's sequence
// shares with an older one's survive the older epoch's fencing.
func TestPrefixCacheAcrossEpochs(t *testing.T) {
	dir := genTiny(t, "tiny-v2")
	n, off := cacheNode(t, dir, 2<<20, true), cacheNode(t, dir, 2<<20, false)
	p := seqTokens(50, 4)
	// Epoch 1 computes the prefix and keeps running.
	stepOne(t, n, &meshpb.StepRequest{Step: 1, Epoch: 1, Work: []*meshpb.SeqWork{{SeqId: 1, Tokens: p, Sample: true, ReserveTokens: 60}}})
	// Epoch 2 takes it; its first step fences epoch 1's sequence.
	r := stepOne(t, n, &meshpb.StepRequest{Step: 2, Epoch: 2, Work: []*meshpb.SeqWork{{SeqId: 1, Tokens: p, Sample: true, ReserveTokens: 60}}})
	if r.Results[0].CachedTokens != 48 || n.Sequences() != 1 {
		t.Fatalf("cached %d tokens, %d sequences", r.Results[0].CachedTokens, n.Sequences())
	}
	want := stepOne(t, off, &meshpb.StepRequest{Step: 1, Work: []*meshpb.SeqWork{{SeqId: 1, Tokens: p, Sample: true, ReserveTokens: 60}}})
	toks := []int32{r.Results[0].Token}
	wantToks := []int32{want.Results[0].Token}
	for i := range 4 {
		r = stepOne(t, n, &meshpb.StepRequest{Step: uint64(3 + i), Epoch: 2, Work: []*meshpb.SeqWork{{SeqId: 1, Tokens: toks[i:], StartPos: uint32(50 + i), Sample: true}}})
		want = stepOne(t, off, &meshpb.StepRequest{Step: uint64(2 + i), Work: []*meshpb.SeqWork{{SeqId: 1, Tokens: wantToks[i:], StartPos: uint32(50 + i), Sample: true}}})
		toks, wantToks = append(toks, r.Results[0].Token), append(wantToks, want.Results[0].Token)
	}
	if !slicesEqual(toks, wantToks) {
		t.Fatalf("after the fence: %v, without prefix caching %v", toks, wantToks)
	}
	stepOne(t, n, &meshpb.StepRequest{Step: 20, Epoch: 2, Release: []uint64{1}})
	if info, _ := n.Info(context.Background(), 0); info.FreeBlocks != info.TotalBlocks {
		t.Fatalf("%d/%d free", info.FreeBlocks, info.TotalBlocks)
	}
}

func slicesEqual(a, b []int32) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// TestRecreatedSequenceContinues: a sequence created again with its
// generated tokens (generated = 3) samples what the original sampled
// next: the seeded random stream continues.
func TestRecreatedSequenceContinues(t *testing.T) {
	n := cacheNode(t, genTiny(t, "tiny-v2"), 2<<20, false)
	sp := &meshpb.SamplingParams{Temperature: 1.2, Seed: 5}
	p := seqTokens(10, 5)
	var step uint64
	orig, _, _ := prefixRun(t, n, 1, p, 64, 6, sp, &step)
	again := append(append([]int32{}, p...), orig[:3]...)
	r := stepOne(t, n, &meshpb.StepRequest{Step: 50, Work: []*meshpb.SeqWork{
		{SeqId: 2, Tokens: again, Sample: true, ReserveTokens: 16, Sampling: sp, Generated: 3}}})
	if got := r.Results[0].Token; got != orig[3] {
		t.Fatalf("re-created sequence sampled %d, the original %d (tokens %v)", got, orig[3], orig)
	}
}

// TestMinTokens: under min_tokens a stop id is never sampled, even when it
// is the greedy choice; its logprob is still the model's.
func TestMinTokens(t *testing.T) {
	n := cacheNode(t, genTiny(t, "tiny-v2"), 2<<20, false)
	p := seqTokens(6, 6)
	r := stepOne(t, n, &meshpb.StepRequest{Step: 1, Work: []*meshpb.SeqWork{{SeqId: 1, Tokens: p, Sample: true, ReserveTokens: 10, Logprobs: 2}}})
	greedy := r.Results[0].Token
	r = stepOne(t, n, &meshpb.StepRequest{Step: 2, Work: []*meshpb.SeqWork{
		{SeqId: 2, Tokens: p, Sample: true, ReserveTokens: 10, Logprobs: 2, MinTokens: 1, StopIds: []int32{greedy, greedy}}}})
	res := r.Results[0]
	if res.Token == greedy {
		t.Fatalf("sampled stop id %d under min_tokens", greedy)
	}
	if top := res.Logprob.Top; len(top) == 0 || top[0].Token != greedy {
		t.Fatalf("logprobs were masked too: %+v", res.Logprob)
	}
	// Past min_tokens the stop id is allowed again (same logits: feed the
	// same prompt to a sequence that has already sampled once).
	r = stepOne(t, n, &meshpb.StepRequest{Step: 3, Work: []*meshpb.SeqWork{
		{SeqId: 3, Tokens: p, Sample: true, ReserveTokens: 10, MinTokens: 1, Generated: 1, StopIds: []int32{greedy}}}})
	if r.Results[0].Token != greedy {
		t.Fatalf("past min_tokens: %d, want %d", r.Results[0].Token, greedy)
	}
}
