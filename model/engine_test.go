package model

import (
	"context"
	"math"
	"path/filepath"
	"sync"
	"testing"

	"github.com/expertmesh/expertmesh/kernels"
)

var tinyPresets = []string{"tiny-v2", "tiny-v2-lite", "tiny-v3"}

var (
	genMu   sync.Mutex
	genDirs = map[string]string{}
)

// tinyCheckpoint generates preset once per test binary run.
func tinyCheckpoint(t testing.TB, preset string) string {
	t.Helper()
	genMu.Lock()
	defer genMu.Unlock()
	if d, ok := genDirs[preset]; ok {
		return d
	}
	p, ok := IsPreset(preset)
	if !ok {
		t.Fatalf("unknown preset %s", preset)
	}
	dir := filepath.Join(sharedTemp(t), preset)
	if err := GenerateCheckpoint(dir, p, GenOptions{Seed: 7}); err != nil {
		t.Fatalf("gen %s: %v", preset, err)
	}
	genDirs[preset] = dir
	return dir
}

func loadTiny(t testing.TB, preset string) *Weights {
	t.Helper()
	w, err := Load(tinyCheckpoint(t, preset), LoadOptions{})
	if err != nil {
		t.Fatalf("load %s: %v", preset, err)
	}
	t.Cleanup(func() { w.Close() })
	return w
}

// TestFastPathMatchesReference: prefill then token-by-token decode through
// the absorbed MLA + paged cache path equals the plain expanded recompute,
// logits within float32 tolerance and routing identical, on every preset.
func TestFastPathMatchesReference(t *testing.T) {
	for _, preset := range tinyPresets {
		t.Run(preset, func(t *testing.T) {
			w := loadTiny(t, preset)
			c := w.Config
			tokens := []int{3, 17, 250, 9, 101, 44, 5, 311, 77, 2, 480, 60}
			ref := NewReference(w)
			wantLogits, wantRoutes := ref.Forward(tokens)

			pool := kernels.NewPool(2)
			defer pool.Close()
			eng := NewEngine(w, pool, nil)
			gotRoutes := map[int][][]int32{}
			eng.Trace = func(layer int, ids []int32, _ []float32, n, k int) {
				for i := range n {
					gotRoutes[layer] = append(gotRoutes[layer], append([]int32(nil), ids[i*k:(i+1)*k]...))
				}
			}
			cache, err := NewLatentCache(c, 4, 64)
			if err != nil {
				t.Fatal(err)
			}
			seq := cache.NewSequence()
			if err := seq.Reserve(len(tokens)); err != nil {
				t.Fatal(err)
			}
			// Prefill the first 7 tokens in one step (all logits), then decode.
			split := 7
			var rows []Row
			bufs := make([][]float32, split)
			for p := range split {
				rows = append(rows, Row{Seq: seq, Token: tokens[p], Pos: p, Logits: true})
				bufs[p] = make([]float32, c.VocabSize)
			}
			if err := eng.Forward(context.Background(), rows, bufs); err != nil {
				t.Fatal(err)
			}
			got := bufs
			for p := split; p < len(tokens); p++ {
				out := [][]float32{make([]float32, c.VocabSize)}
				if err := eng.Forward(context.Background(), []Row{{Seq: seq, Token: tokens[p], Pos: p, Logits: true}}, out); err != nil {
					t.Fatal(err)
				}
				got = append(got, out[0])
			}
			for p := range tokens {
				if d := maxAbsDiff(got[p], wantLogits[p]); d > 2e-3 {
					t.Errorf("position %d: max |Δlogit| = %g", p, d)
				}
				if Argmax(got[p]) != Argmax(wantLogits[p]) {
					t.Errorf("position %d: argmax %d, reference %d", p, Argmax(got[p]), Argmax(wantLogits[p]))
				}
			}
			for l, rs := range wantRoutes {
				if rs == nil {
					continue
				}
				if len(gotRoutes[l]) != len(rs) {
					t.Fatalf("layer %d: %d routed tokens, reference %d", l, len(gotRoutes[l]), len(rs))
				}
				for p := range rs {
					for j, id := range rs[p].IDs {
						if int(gotRoutes[l][p][j]) != id {
							t.Fatalf("layer %d token %d: experts %v, reference %v", l, p, gotRoutes[l][p], rs[p].IDs)
						}
					}
				}
			}
			seq.Release()
			if cache.FreeBlocks() != cache.Capacity() {
				t.Errorf("blocks leaked: %d free of %d", cache.FreeBlocks(), cache.Capacity())
			}
		})
	}
}

func maxAbsDiff(a, b []float32) float64 {
	var m float64
	for i := range a {
		m = math.Max(m, math.Abs(float64(a[i])-float64(b[i])))
	}
	return m
}

// TestChunkedPrefillAndBatching: chunked prefill, and two sequences sharing
// Forward calls, give the same tokens and logprobs as one sequence alone.
func TestChunkedPrefillAndBatching(t *testing.T) {
	w := loadTiny(t, "tiny-v2")
	c := w.Config
	pool := kernels.NewPool(2)
	defer pool.Close()
	eng := NewEngine(w, pool, nil)
	cache, err := NewLatentCache(c, 4, 128)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	promptA := []int{5, 9, 200, 31, 7, 7, 400, 12, 90, 3, 44}
	promptB := []int{11, 300, 2}
	gen := func(prompt []int, chunk int) *GenerateResult {
		res, err := eng.Generate(ctx, cache, GenerateRequest{Prompt: prompt, MaxTokens: 6, Logprobs: 3, Echo: true, PrefillChunk: chunk})
		if err != nil {
			t.Fatal(err)
		}
		return res
	}
	whole := gen(promptA, 0)
	chunked := gen(promptA, 3)
	for i := range whole.Tokens {
		if whole.Tokens[i] != chunked.Tokens[i] || math.Abs(whole.Logprobs[i].Logprob-chunked.Logprobs[i].Logprob) > 1e-4 {
			t.Fatalf("chunked prefill diverges at %d", i)
		}
	}
	for p := 1; p < len(promptA); p++ {
		if math.Abs(whole.PromptLogprobs[p].Logprob-chunked.PromptLogprobs[p].Logprob) > 1e-4 {
			t.Fatalf("echo logprob at %d differs", p)
		}
	}
	aloneB := gen(promptB, 0)

	// Interleave: prefill B while A decodes, in the same Forward calls.
	sa, sb := cache.NewSequence(), cache.NewSequence()
	defer sa.Release()
	defer sb.Release()
	sa.Reserve(len(promptA) + 6)
	sb.Reserve(len(promptB) + 6)
	la, lb := make([]float32, c.VocabSize), make([]float32, c.VocabSize)
	var rows []Row
	for p, id := range promptA {
		rows = append(rows, Row{Seq: sa, Token: id, Pos: p, Logits: p == len(promptA)-1})
	}
	if err := eng.Forward(ctx, rows, [][]float32{la}); err != nil {
		t.Fatal(err)
	}
	tokA := []int{Argmax(la)}
	rows = []Row{{Seq: sa, Token: tokA[0], Pos: len(promptA), Logits: true}}
	for p, id := range promptB {
		rows = append(rows, Row{Seq: sb, Token: id, Pos: p, Logits: p == len(promptB)-1})
	}
	if err := eng.Forward(ctx, rows, [][]float32{la, lb}); err != nil {
		t.Fatal(err)
	}
	tokA = append(tokA, Argmax(la))
	tokB := []int{Argmax(lb)}
	for step := 0; step < 4; step++ {
		rows = []Row{
			{Seq: sb, Token: tokB[len(tokB)-1], Pos: len(promptB) + len(tokB) - 1, Logits: true},
			{Seq: sa, Token: tokA[len(tokA)-1], Pos: len(promptA) + len(tokA) - 1, Logits: true},
		}
		if err := eng.Forward(ctx, rows, [][]float32{lb, la}); err != nil {
			t.Fatal(err)
		}
		tokA, tokB = append(tokA, Argmax(la)), append(tokB, Argmax(lb))
	}
	for i := range tokB {
		if tokB[i] != aloneB.Tokens[i] {
			t.Fatalf("batched B %v, alone %v", tokB, aloneB.Tokens[:len(tokB)])
		}
	}
	for i := range tokA {
		if tokA[i] != whole.Tokens[i] {
			t.Fatalf("batched A %v, alone %v", tokA, whole.Tokens[:len(tokA)])
		}
	}
}

func TestForwardRejectsBadInput(t *testing.T) {
	w := loadTiny(t, "tiny-v2-lite")
	pool := kernels.NewPool(1)
	defer pool.Close()
	eng := NewEngine(w, pool, nil)
	cache, _ := NewLatentCache(w.Config, 4, 4)
	ctx := context.Background()
	for _, req := range []GenerateRequest{
		{Prompt: nil, MaxTokens: 1},
		{Prompt: []int{1, w.Config.VocabSize}, MaxTokens: 1},
		{Prompt: []int{-1}, MaxTokens: 1},
		{Prompt: []int{1}, MaxTokens: w.Config.MaxPositionEmbeddings},
		{Prompt: []int{1}, MaxTokens: 1, Sampling: SamplingParams{TopP: 2}},
	} {
		if _, err := eng.Generate(ctx, cache, req); err == nil {
			t.Errorf("request %+v accepted", req)
		}
	}
	// Cache too small: a clean ErrCacheFull, no blocks lost.
	if _, err := eng.Generate(ctx, cache, GenerateRequest{Prompt: make([]int, 20), MaxTokens: 1}); err == nil {
		t.Error("oversized prompt accepted by a 16-token cache")
	}
	if cache.FreeBlocks() != cache.Capacity() {
		t.Fatal("failed requests leaked cache blocks")
	}
}

// TestBF16PrefillDeviation: the BF16-activation prefill path stays close
// to the exact path (its deviation is reported, not hidden).
func TestBF16PrefillDeviation(t *testing.T) {
	w := loadTiny(t, "tiny-v2-lite")
	pool := kernels.NewPool(2)
	defer pool.Close()
	prompt := []int{3, 17, 250, 9, 101, 44, 5, 311, 77, 2, 480, 60, 13, 14, 15, 16}
	run := func(bf16 bool) *GenerateResult {
		eng := NewEngine(w, pool, nil)
		eng.BF16Prefill = bf16
		eng.Experts.(*ExpertRunner).BF16Act = bf16
		cache, _ := NewLatentCache(w.Config, 16, 8)
		res, err := eng.Generate(context.Background(), cache, GenerateRequest{Prompt: prompt, MaxTokens: 1, Logprobs: 0, Echo: true})
		if err != nil {
			t.Fatal(err)
		}
		return res
	}
	exact, fast := run(false), run(true)
	var worst float64
	for p := 1; p < len(prompt); p++ {
		worst = math.Max(worst, math.Abs(exact.PromptLogprobs[p].Logprob-fast.PromptLogprobs[p].Logprob))
	}
	t.Logf("BF16-activation prefill: max |Δ logprob| over %d positions = %.4f", len(prompt)-1, worst)
	if worst == 0 {
		t.Fatal("BF16 path identical to exact: it is not in use")
	}
	if worst > 0.1 {
		t.Fatalf("BF16 prefill deviates by %.4f", worst)
	}
}

// TestResidentWeights: weights copied into resident memory compute exactly
// what the mapped checkpoint computes.
// generateSix greedily generates 6 tokens after a fixed prompt with
// their logprobs: what tests compare weights placed in different ways by.
func generateSix(t *testing.T, pool *kernels.Pool, w *Weights) *GenerateResult {
	t.Helper()
	cache, _ := NewLatentCache(w.Config, 16, 8)
	res, err := NewEngine(w, pool, nil).Generate(context.Background(), cache, GenerateRequest{Prompt: []int{4, 8, 15, 16, 23, 42}, MaxTokens: 6, Logprobs: 0})
	if err != nil {
		t.Fatal(err)
	}
	return res
}

func TestResidentWeights(t *testing.T) {
	dir := tinyCheckpoint(t, "tiny-v2")
	mapped, err := Load(dir, LoadOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer mapped.Close()
	resident, err := Load(dir, LoadOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer resident.Close()
	if err := resident.MakeResident(2); err != nil {
		t.Fatal(err)
	}
	if &resident.LMHead.Data[0] == &mapped.LMHead.Data[0] {
		t.Fatal("not copied")
	}
	pool := kernels.NewPool(2)
	defer pool.Close()
	a, b := generateSix(t, pool, mapped), generateSix(t, pool, resident)
	for i := range a.Tokens {
		if a.Tokens[i] != b.Tokens[i] || a.Logprobs[i].Logprob != b.Logprobs[i].Logprob {
			t.Fatalf("token %d: mapped %d/%g, resident %d/%g", i, a.Tokens[i], a.Logprobs[i].Logprob, b.Tokens[i], b.Logprobs[i].Logprob)
		}
	}
}

// TestDecodeAllocations: a steady-state decode step allocates nothing in
// the engine (buffers are kept across steps).
func TestDecodeAllocations(t *testing.T) {
	w := loadTiny(t, "tiny-v2")
	pool := kernels.NewPool(2)
	defer pool.Close()
	eng := NewEngine(w, pool, nil)
	cache, _ := NewLatentCache(w.Config, 16, 64)
	seq := cache.NewSequence()
	defer seq.Release()
	seq.Reserve(512)
	out := [][]float32{make([]float32, w.Config.VocabSize)}
	row := []Row{{Seq: seq, Token: 1, Pos: 0, Logits: true}}
	ctx := context.Background()
	pos := 0
	step := func() {
		row[0].Pos = pos
		if err := eng.Forward(ctx, row, out); err != nil {
			t.Fatal(err)
		}
		pos++
	}
	for range 4 {
		step() // warm up buffers
	}
	if a := testing.AllocsPerRun(50, step); a > 0 {
		t.Fatalf("%.1f allocations per decode step", a)
	}
}

// opaqueExperts hides the local runner's type from the engine, so decode
// takes the general path (shared expert beside StartRoutedExperts) that a
// remote backend gets.
type opaqueExperts struct{ ExpertBackend }

// TestLocalDecodeFusionExact: single-row decode on local experts (router
// and shared gate/up in one pool call, shared down beside the routed
// experts) gives bit-identical logits to the general path, on every
// preset. (The tiny presets' products are too small to split across
// threads; the kernels' tests cover the split.)
func TestLocalDecodeFusionExact(t *testing.T) {
	for _, preset := range tinyPresets {
		w := loadTiny(t, preset)
		pool := kernels.NewPool(2)
		defer pool.Close()
		decode := func(backend ExpertBackend) [][]float32 {
			eng := NewEngine(w, pool, backend)
			cache, err := NewLatentCache(w.Config, 4, 16)
			if err != nil {
				t.Fatal(err)
			}
			seq := cache.NewSequence()
			defer seq.Release()
			if err := seq.Reserve(8); err != nil {
				t.Fatal(err)
			}
			var all [][]float32
			for p, tok := range []int{5, 99, 12, 7, 300, 41} {
				out := [][]float32{make([]float32, w.Config.VocabSize)}
				if err := eng.Forward(context.Background(), []Row{{Seq: seq, Token: tok, Pos: p, Logits: true}}, out); err != nil {
					t.Fatal(err)
				}
				all = append(all, out[0])
			}
			return all
		}
		fused, general := decode(nil), decode(opaqueExperts{NewLocalExperts(w, pool)})
		for p := range fused {
			for i := range fused[p] {
				if math.Float32bits(fused[p][i]) != math.Float32bits(general[p][i]) {
					t.Fatalf("%s, position %d: logit %d fused %g, general %g", preset, p, i, fused[p][i], general[p][i])
				}
			}
		}
	}
}
