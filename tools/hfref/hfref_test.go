package hfref

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"

	"github.com/expertmesh/expertmesh/kernels"
	"github.com/expertmesh/expertmesh/model"
	"github.com/expertmesh/expertmesh/model/safetensors"
)

// tol bounds |Δ logprob| between the engine and the reference. Both run
// float32 over the same BF16 weights, so they agree to about 1e-5; 0.01
// leaves room for summation order while still catching any semantic slip
// (a wrong scale, norm or routing choice moves logprobs by 0.1 or more).
const tol = 0.01

// position and output mirror `expertmesh generate --json`, which hfref.py
// prints.
type position struct {
	Position    int                `json:"position"`
	TokenID     int                `json:"token_id"`
	Logprob     *float64           `json:"logprob"`
	TopLogprobs map[string]float64 `json:"top_logprobs"`
}

type output struct {
	PromptTokenIDs []int      `json:"prompt_token_ids"`
	TokenIDs       []int      `json:"token_ids"`
	FinishReason   string     `json:"finish_reason"`
	Logprobs       []position `json:"logprobs"`
}

type prompt struct {
	name  string
	ids   []int
	chunk int // engine prefill chunk; 0: whole prompt
	// maxTokens, if > 0, replaces the test's generation length (the
	// reference recomputes the whole sequence per token, so long prompts
	// generate few).
	maxTokens int
}

// shape is one checkpoint to compare on.
type shape struct {
	name    string
	preset  model.Preset
	seed    uint64
	prompts []prompt
	// fp8 rewrites the checkpoint's decoder linear weights as F8_E4M3 with
	// 128x128 weight_scale_inv blocks, as DeepSeek-V3's release ships them.
	fp8 bool
	// knownDiff names a reported, not yet fixed, engine disagreement: the
	// shape is skipped unless HFREF_STRICT=1. Delete it once fixed.
	knownDiff string
}

// script is hfref.py beside this file (go test runs in the package dir).
const script = "hfref.py"

// findPython returns a python3 that can import numpy. CI installs
// python3-numpy, so there its absence is a failure, not a skip.
func findPython(t *testing.T) string {
	t.Helper()
	cands := []string{"python3", "/usr/bin/python3"}
	if p := os.Getenv("HFREF_PYTHON"); p != "" {
		cands = append([]string{p}, cands...)
	}
	var tried []string
	for _, c := range cands {
		path, err := exec.LookPath(c)
		if err != nil {
			tried = append(tried, c+": not found")
			continue
		}
		if out, err := exec.Command(path, "-c", "import numpy").CombinedOutput(); err != nil {
			tried = append(tried, fmt.Sprintf("%s: %v %s", path, err, bytes.TrimSpace(out)))
			continue
		}
		return path
	}
	msg := "no python3 with numpy (apt-get install -y python3-numpy): " + strings.Join(tried, "; ")
	if os.Getenv("CI") == "true" {
		t.Fatal(msg)
	}
	t.Skip(msg)
	return ""
}

// derive makes a non-preset shape: a deep copy of a preset's config with
// edit applied (nil values delete keys).
func derive(t *testing.T, base, name string, edit map[string]any) model.Preset {
	t.Helper()
	p, ok := model.IsPreset(base)
	if !ok {
		t.Fatalf("no preset %q", base)
	}
	b, err := json.Marshal(p.Config)
	if err != nil {
		t.Fatal(err)
	}
	cfg := map[string]any{}
	if err := json.Unmarshal(b, &cfg); err != nil {
		t.Fatal(err)
	}
	// nil edits become JSON null, not an absent key: an absent key means
	// the config class's default (q_lora_rank 1536 for V3), null means none.
	for k, v := range edit {
		cfg[k] = v
	}
	return model.Preset{Name: name, Description: "hfref " + name, Config: cfg, ShardBytes: 1 << 20}
}

// ids returns n deterministic token ids in [2, vocab), away from BOS/EOS.
func ids(seed uint64, n, vocab int) []int {
	r := rand.New(rand.NewPCG(seed, 0x9e3779b97f4a7c15))
	out := make([]int, n)
	for i := range out {
		out[i] = 2 + r.IntN(vocab-2)
	}
	return out
}

func presetShape(t *testing.T, name string, seed uint64) shape {
	p, ok := model.IsPreset(name)
	if !ok {
		t.Fatalf("no preset %q", name)
	}
	return shape{name: name, preset: p, seed: seed, prompts: []prompt{
		{name: "short", ids: []int{0, 5, 9}},
		{name: "mid", ids: ids(seed, 11, 512)},
		{name: "long-chunked", ids: ids(seed+100, 48, 512), chunk: 16},
	}}
}

// withVeryLong adds a prompt long enough for rope phases and attention
// over several hundred positions to matter.
func withVeryLong(s shape) shape {
	s.prompts = append(s.prompts, prompt{name: "600-tokens", ids: ids(s.seed+200, 600, 512), chunk: 64, maxTokens: 3})
	return s
}

func shapes(t *testing.T) []shape {
	two := func(seed uint64) []prompt {
		return []prompt{
			{name: "short", ids: []int{0, 17, 4, 250}},
			{name: "long", ids: ids(seed, 41, 512)},
		}
	}
	return []shape{
		presetShape(t, "tiny-v2", 1),
		presetShape(t, "tiny-v2-lite", 2),
		withVeryLong(presetShape(t, "tiny-v3", 3)),
		{
			// DeepSeek's real rope width (64), where YaRN's correction
			// range ramps over many frequencies, and a wider latent.
			name: "v2-rope64", seed: 18, prompts: two(18),
			preset: derive(t, "tiny-v2", "v2-rope64", map[string]any{
				"qk_rope_head_dim": 64, "qk_nope_head_dim": 32, "v_head_dim": 32, "kv_lora_rank": 96,
			}),
		},
		{
			// Plain RoPE (no rope_scaling: no mscale anywhere), v_head_dim
			// != qk_nope_head_dim with q LoRA, 4 groups of 8 choosing 2,
			// MoE only on layers >= 1 with layer % 2 == 0 (so layers 1 and 3
			// are dense), another norm eps.
			name: "v2-plain-rope-freq2", seed: 11, prompts: two(11),
			preset: derive(t, "tiny-v2", "v2-plain-rope-freq2", map[string]any{
				"rope_scaling": nil, "v_head_dim": 24, "qk_nope_head_dim": 16, "qk_rope_head_dim": 16,
				"n_routed_experts": 32, "num_experts_per_tok": 4, "n_group": 4, "topk_group": 2,
				"moe_layer_freq": 2, "num_hidden_layers": 4, "first_k_dense_replace": 1,
				"rms_norm_eps": 1e-5, "routed_scaling_factor": 4.0,
			}),
		},
		{
			// V2 with norm_topk_prob: DeepSeek's V2 code normalises the
			// top-k weights and then does NOT apply routed_scaling_factor
			// (normalise OR scale).
			name: "v2-norm-topk", seed: 12, prompts: two(12),
			preset: derive(t, "tiny-v2-lite", "v2-norm-topk", map[string]any{
				"norm_topk_prob": true, "routed_scaling_factor": 3.0,
			}),
		},
		{
			// V3 with tied embeddings, no q LoRA, a YaRN whose cos/sin
			// factor mscale/mscale_all_dim is not 1, 4 groups choosing 2,
			// and every layer but the first MoE.
			name: "v3-tied-yarn-ratio", seed: 13, prompts: two(13),
			preset: derive(t, "tiny-v3", "v3-tied-yarn-ratio", map[string]any{
				"tie_word_embeddings": true, "q_lora_rank": nil, "qk_rope_head_dim": 16, "v_head_dim": 8,
				"n_routed_experts": 64, "num_experts_per_tok": 6, "n_group": 4, "topk_group": 2,
				"first_k_dense_replace": 1, "num_hidden_layers": 3,
				"rope_scaling": map[string]any{"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 4096,
					"beta_fast": 32, "beta_slow": 1, "mscale": 0.9, "mscale_all_dim": 0.6},
			}),
		},
		{
			// V3 with one expert per token: both HF variants skip the
			// normalisation when top_k == 1 (the weight is sigmoid x
			// routed_scaling_factor, not 1 x routed_scaling_factor).
			name: "v3-top1", seed: 14, prompts: two(14),
			preset: derive(t, "tiny-v3", "v3-top1", map[string]any{
				"num_experts_per_tok": 1, "n_group": 2, "topk_group": 1,
			}),
		},
		{
			// No shared experts, every layer MoE (first_k_dense_replace 0),
			// topk_group == n_group (group limiting selects everything).
			name: "v2-noshared-allmoe", seed: 16, prompts: two(16),
			preset: derive(t, "tiny-v2", "v2-noshared-allmoe", map[string]any{
				"n_shared_experts": nil, "first_k_dense_replace": 0,
				"n_group": 4, "topk_group": 4, "n_routed_experts": 16, "num_experts_per_tok": 3,
			}),
		},
		{
			// HF builds q_a_layernorm and kv_a_layernorm with RMSNorm's
			// default eps=1e-6 (DeepseekV2RMSNorm(config.q_lora_rank)), not
			// config.rms_norm_eps; a large rms_norm_eps makes that visible.
			// Real DeepSeek configs use 1e-6, where the two agree.
			name: "v2-latent-norm-eps", seed: 17, prompts: two(17),
			preset: derive(t, "tiny-v2", "v2-latent-norm-eps", map[string]any{"rms_norm_eps": 0.05}),
		},
		{
			// FP8 block-quantised V3, with dimensions that span several
			// 128x128 scale blocks in both directions (ragged at the edges).
			name: "v3-fp8-blocks", seed: 15, prompts: two(15)[1:], fp8: true,
			preset: derive(t, "tiny-v3", "v3-fp8-blocks", map[string]any{
				"hidden_size": 160, "intermediate_size": 288, "moe_intermediate_size": 136,
				"n_routed_experts": 32, "num_experts_per_tok": 4, "n_group": 4, "topk_group": 2,
				"num_hidden_layers": 3, "qk_nope_head_dim": 24, "v_head_dim": 40,
			}),
		},
	}
}

func TestMatchesHFReference(t *testing.T) {
	py := findPython(t)
	maxTokens := 10
	if testing.Short() {
		maxTokens = 6
	}
	pool := kernels.NewPool(runtime.GOMAXPROCS(0))
	defer pool.Close()
	for _, s := range shapes(t) {
		t.Run(s.name, func(t *testing.T) {
			if s.knownDiff != "" && os.Getenv("HFREF_STRICT") != "1" {
				t.Skipf("known disagreement (HFREF_STRICT=1 runs it): %s", s.knownDiff)
			}
			dir := t.TempDir()
			if err := model.GenerateCheckpoint(dir, s.preset, model.GenOptions{Seed: s.seed}); err != nil {
				t.Fatalf("GenerateCheckpoint: %v", err)
			}
			if s.fp8 {
				fp8 := t.TempDir()
				toFP8(t, dir, fp8)
				dir = fp8
			}
			for _, p := range s.prompts {
				t.Run(p.name, func(t *testing.T) {
					n := maxTokens
					if p.maxTokens > 0 {
						n = p.maxTokens
					}
					want := runRef(t, py, dir, p.ids, n, 5)
					got := runGo(t, pool, dir, p, n, 5)
					compare(t, got, want)
				})
			}
			if s.name == "tiny-v2" {
				// Stop ids come from generation_config.json (here a list):
				// make the third generated token an EOS and both sides must
				// stop there, keeping it, with finish_reason "stop".
				p := s.prompts[1]
				free := runRef(t, py, dir, p.ids, maxTokens, 0)
				eos := free.TokenIDs[2]
				writeGenConfig(t, dir, []int{1, eos})
				t.Run("eos-list", func(t *testing.T) {
					want := runRef(t, py, dir, p.ids, maxTokens, 3)
					if want.FinishReason != "stop" || want.TokenIDs[len(want.TokenIDs)-1] != eos {
						t.Fatalf("reference did not stop at EOS %d: %v %s", eos, want.TokenIDs, want.FinishReason)
					}
					compare(t, runGo(t, pool, dir, p, maxTokens, 3), want)
				})
			}
		})
	}
}

func writeGenConfig(t *testing.T, dir string, eos []int) {
	t.Helper()
	b, err := json.Marshal(map[string]any{"bos_token_id": 0, "eos_token_id": eos, "do_sample": false})
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "generation_config.json"), b, 0o644); err != nil {
		t.Fatal(err)
	}
}

func joinIDs(ids []int) string {
	s := make([]string, len(ids))
	for i, v := range ids {
		s[i] = strconv.Itoa(v)
	}
	return strings.Join(s, ",")
}

func runRef(t *testing.T, py, dir string, ids []int, maxTokens, k int) output {
	t.Helper()
	args := []string{script, "--model", dir, "--prompt-ids", joinIDs(ids),
		"--max-tokens", strconv.Itoa(maxTokens), "--logprobs", strconv.Itoa(k), "--echo"}
	// HFREF_ARGS passes extra flags to the script, e.g. --norm-rule=v3 to
	// see this test fail when the reference takes the other HF variant.
	args = append(args, strings.Fields(os.Getenv("HFREF_ARGS"))...)
	cmd := exec.Command(py, args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("%s: %v\n%s", strings.Join(cmd.Args, " "), err, stderr.String())
	}
	var out output
	if err := json.Unmarshal(stdout.Bytes(), &out); err != nil {
		t.Fatalf("reference output: %v\n%s", err, stdout.String())
	}
	return out
}

// runGo drives the engine the way `expertmesh generate --json --echo` does
// and converts its result to the same JSON shape.
func runGo(t *testing.T, pool *kernels.Pool, dir string, p prompt, maxTokens, k int) output {
	t.Helper()
	w, err := model.Load(dir, model.LoadOptions{})
	if err != nil {
		t.Fatalf("model.Load: %v", err)
	}
	defer w.Close()
	gen, err := model.LoadGenerationConfig(dir, w.Config)
	if err != nil {
		t.Fatalf("LoadGenerationConfig: %v", err)
	}
	cache, err := model.NewLatentCache(w.Config, 16, (len(p.ids)+maxTokens+15)/16)
	if err != nil {
		t.Fatal(err)
	}
	res, err := model.NewEngine(w, pool, nil).Generate(context.Background(), cache, model.GenerateRequest{
		Prompt: p.ids, MaxTokens: maxTokens, Logprobs: k, Echo: true, StopIDs: gen.EOSTokenIDs,
		PrefillChunk: p.chunk,
	})
	if err != nil {
		t.Fatalf("Generate: %v", err)
	}
	out := output{PromptTokenIDs: res.Prompt, TokenIDs: res.Tokens, FinishReason: res.FinishReason}
	conv := func(pos, tok int, tl *model.TokenLogprob) position {
		q := position{Position: pos, TokenID: tok}
		if tl == nil {
			return q
		}
		lp := tl.Logprob
		q.Logprob = &lp
		q.TopLogprobs = map[string]float64{}
		for _, e := range tl.Top {
			q.TopLogprobs[strconv.Itoa(e.ID)] = e.Logprob
		}
		return q
	}
	for i, tl := range res.PromptLogprobs {
		out.Logprobs = append(out.Logprobs, conv(i, res.Prompt[i], tl))
	}
	for i := range res.Logprobs {
		out.Logprobs = append(out.Logprobs, conv(len(res.Prompt)+i, res.Tokens[i], &res.Logprobs[i]))
	}
	return out
}

func fmtTop(m map[string]float64) string {
	type kv struct {
		id string
		lp float64
	}
	var s []kv
	for k, v := range m {
		s = append(s, kv{k, v})
	}
	sort.Slice(s, func(i, j int) bool { return s[i].lp > s[j].lp })
	var b strings.Builder
	for _, e := range s {
		fmt.Fprintf(&b, " %s:%.4f", e.id, e.lp)
	}
	return b.String()
}

// compare requires the same tokens and finish reason, and logprobs within
// tol at every position up to the first token that differs.
func compare(t *testing.T, got, want output) {
	t.Helper()
	if !slices.Equal(got.PromptTokenIDs, want.PromptTokenIDs) {
		t.Fatalf("prompt ids: engine %v, reference %v", got.PromptTokenIDs, want.PromptTokenIDs)
	}
	n := len(want.PromptTokenIDs)
	if !slices.Equal(got.TokenIDs, want.TokenIDs) || got.FinishReason != want.FinishReason {
		t.Errorf("greedy tokens: engine %v (%s), reference %v (%s)",
			got.TokenIDs, got.FinishReason, want.TokenIDs, want.FinishReason)
	}
	if len(got.Logprobs) != len(want.Logprobs) {
		t.Errorf("engine reports %d positions, reference %d", len(got.Logprobs), len(want.Logprobs))
	}
	bad := 0
	for i := 0; i < len(got.Logprobs) && i < len(want.Logprobs); i++ {
		g, w := got.Logprobs[i], want.Logprobs[i]
		where := fmt.Sprintf("position %d (prompt)", w.Position)
		if w.Position >= n {
			where = fmt.Sprintf("position %d (generated #%d)", w.Position, w.Position-n)
		}
		if g.Position != w.Position || g.TokenID != w.TokenID {
			t.Errorf("%s: engine token %d at %d, reference token %d\n engine top:%s\n reference top:%s",
				where, g.TokenID, g.Position, w.TokenID, fmtTop(g.TopLogprobs), fmtTop(w.TopLogprobs))
			return // everything after a different token is a different sequence
		}
		if (g.Logprob == nil) != (w.Logprob == nil) {
			t.Errorf("%s: engine logprob %v, reference %v", where, g.Logprob, w.Logprob)
			continue
		}
		if w.Logprob == nil {
			continue
		}
		msgs := comparePosition(g, w)
		if len(msgs) > 0 {
			bad++
			if bad <= 6 {
				t.Errorf("%s: %s\n engine top:%s\n reference top:%s", where, strings.Join(msgs, "; "),
					fmtTop(g.TopLogprobs), fmtTop(w.TopLogprobs))
			}
		}
	}
	if bad > 6 {
		t.Errorf("... %d positions differ in all", bad)
	}
}

// comparePosition checks one position's logprobs. An id in only one side's
// top-k is allowed only at the cut, as a near tie: its logprob must be
// within tol of the other side's smallest reported one.
func comparePosition(g, w position) []string {
	var msgs []string
	if d := math.Abs(*g.Logprob - *w.Logprob); d > tol {
		msgs = append(msgs, fmt.Sprintf("token %d logprob engine %.5f reference %.5f (Δ %.4f)", w.TokenID, *g.Logprob, *w.Logprob, d))
	}
	if len(g.TopLogprobs) != len(w.TopLogprobs) {
		msgs = append(msgs, fmt.Sprintf("top-k size engine %d reference %d", len(g.TopLogprobs), len(w.TopLogprobs)))
	}
	minOf := func(m map[string]float64) float64 {
		lo := math.Inf(1)
		for _, v := range m {
			lo = min(lo, v)
		}
		return lo
	}
	for id, wv := range w.TopLogprobs {
		gv, ok := g.TopLogprobs[id]
		switch {
		case ok && math.Abs(gv-wv) > tol:
			msgs = append(msgs, fmt.Sprintf("id %s engine %.5f reference %.5f (Δ %.4f)", id, gv, wv, math.Abs(gv-wv)))
		case !ok && wv-minOf(g.TopLogprobs) > tol:
			msgs = append(msgs, fmt.Sprintf("id %s (reference %.5f) missing from engine top-k", id, wv))
		}
	}
	for id, gv := range g.TopLogprobs {
		if _, ok := w.TopLogprobs[id]; !ok && gv-minOf(w.TopLogprobs) > tol {
			msgs = append(msgs, fmt.Sprintf("id %s (engine %.5f) missing from reference top-k", id, gv))
		}
	}
	return msgs
}

// isFP8Linear reports whether DeepSeek-V3's FP8 release stores tensor name
// as F8_E4M3: the decoder layers' projection weights (attention, dense MLP,
// experts, shared experts), not embeddings, norms, router or lm_head.
func isFP8Linear(name string, layers int) bool {
	if !strings.HasPrefix(name, "model.layers.") || !strings.HasSuffix(name, "_proj.weight") {
		return false
	}
	rest := strings.TrimPrefix(name, "model.layers.")
	l, err := strconv.Atoi(rest[:strings.IndexByte(rest, '.')])
	return err == nil && l < layers
}

// toFP8 copies the BF16 checkpoint in src to dst with FP8 linear weights:
// per 128x128 block, scale = amax/448 and each weight is rounded to the
// nearest E4M3 value of w/scale; weight_scale_inv holds the scales.
func toFP8(t *testing.T, src, dst string) {
	t.Helper()
	raw, err := os.ReadFile(filepath.Join(src, "config.json"))
	if err != nil {
		t.Fatal(err)
	}
	cfg := map[string]any{}
	if err := json.Unmarshal(raw, &cfg); err != nil {
		t.Fatal(err)
	}
	cfg["quantization_config"] = map[string]any{"activation_scheme": "dynamic", "fmt": "e4m3",
		"quant_method": "fp8", "weight_block_size": []int{128, 128}}
	layers := int(cfg["num_hidden_layers"].(float64))
	ck, err := safetensors.OpenCheckpoint(src)
	if err != nil {
		t.Fatal(err)
	}
	defer ck.Close()
	var specs []safetensors.TensorSpec
	data := map[string][]byte{}
	for _, name := range ck.Names() {
		tn, err := ck.Tensor(name)
		if err != nil {
			t.Fatal(err)
		}
		if !isFP8Linear(name, layers) {
			specs = append(specs, safetensors.TensorSpec{Name: name, DType: tn.DType, Shape: tn.Shape})
			data[name] = tn.Data
			continue
		}
		if tn.DType != safetensors.BF16 || len(tn.Shape) != 2 {
			t.Fatalf("%s: %s%v, want a BF16 matrix", name, tn.DType, tn.Shape)
		}
		q, scales, br, bc := quantizeE4M3(tn.Data, tn.Shape[0], tn.Shape[1])
		specs = append(specs,
			safetensors.TensorSpec{Name: name, DType: safetensors.F8E4M3, Shape: tn.Shape},
			safetensors.TensorSpec{Name: name + "_scale_inv", DType: safetensors.F32, Shape: []int{br, bc}})
		data[name] = q
		data[name+"_scale_inv"] = scales
	}
	err = safetensors.WriteSharded(dst, specs, 1<<20, func(s safetensors.TensorSpec, b []byte) error {
		copy(b, data[s.Name])
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	out, err := json.MarshalIndent(cfg, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dst, "config.json"), out, 0o644); err != nil {
		t.Fatal(err)
	}
	gen, err := os.ReadFile(filepath.Join(src, "generation_config.json"))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dst, "generation_config.json"), gen, 0o644); err != nil {
		t.Fatal(err)
	}
}

// e4m3Pos lists the finite non-negative E4M3FN values by code 0x00..0x7e,
// which is also ascending order.
var e4m3Pos = func() []float64 {
	v := make([]float64, 0x7f)
	for b := range v {
		e, m := b>>3, b&7
		if e == 0 {
			v[b] = float64(m) / 8 * math.Exp2(-6)
		} else {
			v[b] = (1 + float64(m)/8) * math.Exp2(float64(e-7))
		}
	}
	return v
}()

func toE4M3(x float64) byte {
	var sign byte
	if x < 0 {
		sign, x = 0x80, -x
	}
	i := sort.SearchFloat64s(e4m3Pos, x)
	switch {
	case i == len(e4m3Pos):
		i--
	case i > 0 && x-e4m3Pos[i-1] < e4m3Pos[i]-x:
		i--
	}
	return sign | byte(i)
}

func quantizeE4M3(bf []byte, rows, cols int) (q, scales []byte, br, bc int) {
	const blk = 128
	br, bc = (rows+blk-1)/blk, (cols+blk-1)/blk
	w := make([]float64, rows*cols)
	for i := range w {
		w[i] = float64(math.Float32frombits(uint32(binary.LittleEndian.Uint16(bf[2*i:])) << 16))
	}
	q = make([]byte, rows*cols)
	scales = make([]byte, 4*br*bc)
	for bi := 0; bi < br; bi++ {
		for bj := 0; bj < bc; bj++ {
			amax := 0.0
			for r := bi * blk; r < min(rows, (bi+1)*blk); r++ {
				for c := bj * blk; c < min(cols, (bj+1)*blk); c++ {
					amax = max(amax, math.Abs(w[r*cols+c]))
				}
			}
			s := float32(1)
			if amax > 0 {
				s = float32(amax / 448)
			}
			binary.LittleEndian.PutUint32(scales[4*(bi*bc+bj):], math.Float32bits(s))
			for r := bi * blk; r < min(rows, (bi+1)*blk); r++ {
				for c := bj * blk; c < min(cols, (bj+1)*blk); c++ {
					q[r*cols+c] = toE4M3(w[r*cols+c] / float64(s))
				}
			}
		}
	}
	return q, scales, br, bc
}
