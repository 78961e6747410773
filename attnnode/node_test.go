package attnnode

import (
	"context"
	"errors"
	"math"
	"path/filepath"
	"testing"

	"google.golang.org/grpc/codes"

	"github.com/expertmesh/expertmesh/kernels"
	"github.com/expertmesh/expertmesh/model"
	meshpb "github.com/expertmesh/expertmesh/proto"
)

func genTiny(t testing.TB, preset string) string {
	t.Helper()
	p, ok := model.IsPreset(preset)
	if !ok {
		t.Fatalf("no preset %s", preset)
	}
	dir := filepath.Join(t.TempDir(), preset)
	if err := model.GenerateCheckpoint(dir, p, model.GenOptions{Seed: 3}); err != nil {
		t.Fatal(err)
	}
	return dir
}

// reference runs the single-process engine on one prompt.
func reference(t testing.TB, dir string, prompt []int, maxTokens int) *model.GenerateResult {
	t.Helper()
	w, err := model.Load(dir, model.LoadOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	pool := kernels.NewPool(1)
	defer pool.Close()
	cache, _ := model.NewLatentCache(w.Config, 16, 64)
	res, err := model.NewEngine(w, pool, nil).Generate(context.Background(), cache, model.GenerateRequest{Prompt: prompt, MaxTokens: maxTokens, Logprobs: 2, Echo: true})
	if err != nil {
		t.Fatal(err)
	}
	return res
}

// inProcess is cfg without gRPC, as serve runs a node.
func inProcess(cfg Config) Config {
	cfg.ListenAddr = ""
	return cfg
}

type stepper interface {
	Step(context.Context, *meshpb.StepRequest) (*meshpb.StepResponse, error)
}

// drive runs prompts to completion on a node the way a coordinator does:
// prompts prefilled in chunks of `chunk` tokens, all sequences sharing
// steps, greedy decoding of maxTokens each.
func drive(t testing.TB, node stepper, prompts [][]int, maxTokens, chunk int) (tokens [][]int, lps [][]float64, echo [][]float64) {
	t.Helper()
	return driveWith(t, node, prompts, maxTokens, chunk, &meshpb.SamplingParams{})
}

// driveWith is drive with every sequence sampled by sp.
func driveWith(t testing.TB, node stepper, prompts [][]int, maxTokens, chunk int, sp *meshpb.SamplingParams) (tokens [][]int, lps [][]float64, echo [][]float64) {
	t.Helper()
	n := len(prompts)
	tokens, lps, echo = make([][]int, n), make([][]float64, n), make([][]float64, n)
	fed := make([]int, n) // prompt tokens sent
	var release []uint64
	for step := uint64(1); ; step++ {
		req := &meshpb.StepRequest{Step: step, Release: release}
		release = nil
		for i, p := range prompts {
			switch {
			case fed[i] < len(p):
				end := min(fed[i]+chunk, len(p))
				sw := &meshpb.SeqWork{SeqId: uint64(i + 1), Tokens: toI32(p[fed[i]:end]), StartPos: uint32(fed[i]), Sample: end == len(p), EchoLogprobs: true}
				if fed[i] == 0 {
					sw.ReserveTokens, sw.Logprobs, sw.Sampling = uint32(len(p)+maxTokens), 2, sp
				}
				req.Work = append(req.Work, sw)
				fed[i] = end
			case len(tokens[i]) < maxTokens:
				last := tokens[i][len(tokens[i])-1]
				req.Work = append(req.Work, &meshpb.SeqWork{SeqId: uint64(i + 1), Tokens: []int32{int32(last)}, StartPos: uint32(len(p) + len(tokens[i]) - 1), Sample: true})
			}
		}
		if len(req.Work) == 0 {
			if len(req.Release) > 0 {
				if _, err := node.Step(context.Background(), req); err != nil {
					t.Fatalf("final release: %v", err)
				}
			}
			return tokens, lps, echo
		}
		resp, err := node.Step(context.Background(), req)
		if err != nil {
			t.Fatalf("step %d: %v", step, err)
		}
		if resp.Code != 0 {
			t.Fatalf("step %d: code %v: %s", step, codes.Code(resp.Code), resp.Message)
		}
		for _, r := range resp.Results {
			i := int(r.SeqId - 1)
			if r.Code != 0 {
				t.Fatalf("sequence %d: code %d: %s", r.SeqId, r.Code, r.Message)
			}
			for _, pl := range r.PromptLogprobs {
				echo[i] = append(echo[i], pl.Logprob)
			}
			if r.Sampled {
				tokens[i] = append(tokens[i], int(r.Token))
				lps[i] = append(lps[i], r.Logprob.Logprob)
				if len(tokens[i]) == maxTokens {
					release = append(release, r.SeqId)
				}
			}
		}
	}
}

func toI32(x []int) []int32 {
	out := make([]int32, len(x))
	for i, v := range x {
		out[i] = int32(v)
	}
	return out
}

var prompts = [][]int{
	{1, 5, 9, 200, 31},
	{7},
	{3, 17, 250, 9, 101, 44, 5, 311, 77, 2, 480, 60, 13, 14, 15, 16, 99, 98, 97},
	{42, 43},
}

func checkAgainstReference(t *testing.T, dir string, tokens [][]int, lps, echo [][]float64, maxTokens int) {
	t.Helper()
	checkPromptsAgainstReference(t, dir, prompts, tokens, lps, echo, maxTokens)
}

// checkPromptsAgainstReference is checkAgainstReference for the outputs
// of ps.
func checkPromptsAgainstReference(t *testing.T, dir string, ps [][]int, tokens [][]int, lps, echo [][]float64, maxTokens int) {
	t.Helper()
	for i, p := range ps {
		ref := reference(t, dir, p, maxTokens)
		for j := range ref.Tokens {
			if tokens[i][j] != ref.Tokens[j] {
				t.Fatalf("prompt %d: tokens %v, single-process %v", i, tokens[i], ref.Tokens)
			}
			if math.Abs(lps[i][j]-ref.Logprobs[j].Logprob) > 1e-4 {
				t.Fatalf("prompt %d token %d: logprob %g, single-process %g", i, j, lps[i][j], ref.Logprobs[j].Logprob)
			}
		}
		for j := 1; j < len(p); j++ {
			if math.Abs(echo[i][j]-ref.PromptLogprobs[j].Logprob) > 1e-4 {
				t.Fatalf("prompt %d position %d: echo logprob %g, single-process %g", i, j, echo[i][j], ref.PromptLogprobs[j].Logprob)
			}
		}
	}
}

// TestNodeMatchesEngine: sequences sharing steps, with chunked prefill,
// produce exactly the single-process engine's tokens and logprobs.
func TestNodeMatchesEngine(t *testing.T) {
	dir := genTiny(t, "tiny-v2")
	cfg := DefaultConfig()
	cfg.ModelDir, cfg.Threads, cfg.CacheBytes, cfg.MicroBatches = dir, 2, 8<<20, 2
	node, err := Start(context.Background(), inProcess(cfg))
	if err != nil {
		t.Fatal(err)
	}
	defer node.Close()
	const maxTokens = 6
	tokens, lps, echo := drive(t, node, prompts, maxTokens, 4)
	checkAgainstReference(t, dir, tokens, lps, echo, maxTokens)
	info, _ := node.Info(context.Background(), 0)
	if info.FreeBlocks != info.TotalBlocks || info.ActiveSequences != 0 {
		t.Fatalf("after release: %d/%d blocks free, %d active", info.FreeBlocks, info.TotalBlocks, info.ActiveSequences)
	}
}

// TestNodeRejectsBadWork: per-sequence problems are reported per sequence
// and leave the others running.
func TestNodeRejectsBadWork(t *testing.T) {
	dir := genTiny(t, "tiny-v2-lite")
	cfg := DefaultConfig()
	cfg.ModelDir, cfg.CacheBytes = dir, 1<<20
	node, err := Start(context.Background(), inProcess(cfg))
	if err != nil {
		t.Fatal(err)
	}
	defer node.Close()
	info, _ := node.Info(context.Background(), 0)
	capTokens := info.TotalBlocks * info.BlockSize
	req := &meshpb.StepRequest{Step: 1, Work: []*meshpb.SeqWork{
		{SeqId: 1, Tokens: []int32{1, 2}, Sample: true, ReserveTokens: 8},
		{SeqId: 2, Tokens: []int32{1, 9999}, Sample: true},                                         // outside vocab
		{SeqId: 3, Tokens: []int32{1}, StartPos: 4, Sample: true},                                  // unknown sequence
		{SeqId: 4, Tokens: make([]int32, capTokens+1), Sample: true, ReserveTokens: capTokens + 2}, // cache cannot hold it
		{SeqId: 5, Tokens: nil, Sample: true},
		{SeqId: 6, Tokens: []int32{1}, Sample: true, Sampling: &meshpb.SamplingParams{TopP: 3}},
	}}
	resp, err := node.Step(context.Background(), req)
	if err != nil {
		t.Fatal(err)
	}
	want := []int32{0, 3, 5, 8, 3, 3} // OK, InvalidArgument, NotFound, ResourceExhausted, ...
	for i, r := range resp.Results {
		if r.Code != want[i] {
			t.Errorf("sequence %d: code %d (%s), want %d", r.SeqId, r.Code, r.Message, want[i])
		}
	}
	if !resp.Results[0].Sampled {
		t.Fatal("the valid sequence did not advance")
	}
	// Re-creating an existing sequence, or a wrong start position, is refused.
	resp, _ = node.Step(context.Background(), &meshpb.StepRequest{Step: 2, Work: []*meshpb.SeqWork{
		{SeqId: 1, Tokens: []int32{1}, Sample: true},
		{SeqId: 1, Tokens: []int32{1}, StartPos: 7, Sample: true},
	}})
	for _, r := range resp.Results {
		if r.Code == 0 {
			t.Errorf("bad work accepted: %+v", r)
		}
	}
	node.Step(context.Background(), &meshpb.StepRequest{Step: 3, Release: []uint64{1}})
	info, _ = node.Info(context.Background(), 0)
	if info.FreeBlocks != info.TotalBlocks {
		t.Fatalf("blocks leaked: %d of %d free", info.FreeBlocks, info.TotalBlocks)
	}
}

// TestStepAfterClose: a step that arrives after Close is refused, never
// run against unmapped weights.
func TestStepAfterClose(t *testing.T) {
	cfg := DefaultConfig()
	cfg.ModelDir, cfg.CacheBytes = genTiny(t, "tiny-v2-lite"), 1<<20
	node, err := Start(context.Background(), inProcess(cfg))
	if err != nil {
		t.Fatal(err)
	}
	if err := node.Close(); err != nil {
		t.Fatal(err)
	}
	_, err = node.Step(context.Background(), &meshpb.StepRequest{Step: 1, Work: []*meshpb.SeqWork{{SeqId: 1, Tokens: []int32{1}, Sample: true}}})
	if !errors.Is(err, ErrClosed) {
		t.Fatalf("step after close: %v", err)
	}
	if err := node.Close(); err != nil {
		t.Fatalf("second close: %v", err)
	}
}
