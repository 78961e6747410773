package model

import (
	"encoding/binary"
	"encoding/json"
	"fmt"
	"hash/fnv"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"sync"

	"github.com/expertmesh/expertmesh/kernels"
	"github.com/expertmesh/expertmesh/model/safetensors"
	"github.com/expertmesh/expertmesh/tokenizer"
)

// Preset is a named model shape gen-model can write.
type Preset struct {
	Name        string
	Description string
	Config      map[string]any // config.json, verbatim
	// ShardBytes bounds each safetensors shard.
	ShardBytes int64
}

func ptr[T any](v T) *T { return &v }

// Presets lists the shapes gen-model knows, by name.
func Presets() map[string]Preset {
	yarnV2 := map[string]any{"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
		"beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}
	base := func() map[string]any {
		return map[string]any{
			"architectures": []string{"DeepseekV2ForCausalLM"}, "model_type": "deepseek_v2",
			"hidden_act": "silu", "attention_bias": false, "attention_dropout": 0.0,
			"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 163840,
			"rope_scaling": yarnV2, "tie_word_embeddings": false, "torch_dtype": "bfloat16",
			"use_cache": true, "initializer_range": 0.02, "aux_loss_alpha": 0.001,
			"seq_aux": true, "ep_size": 1, "pretraining_tp": 1, "moe_layer_freq": 1,
			"bos_token_id": 0, "eos_token_id": 1,
		}
	}
	tinyV2 := base()
	merge(tinyV2, map[string]any{
		"vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
		"num_key_value_heads": 4, "q_lora_rank": 48, "kv_lora_rank": 32, "qk_nope_head_dim": 16,
		"qk_rope_head_dim": 8, "v_head_dim": 16, "intermediate_size": 160, "moe_intermediate_size": 32,
		"n_routed_experts": 160, "num_experts_per_tok": 6, "n_shared_experts": 2, "n_group": 8,
		"topk_group": 3, "topk_method": TopKGroupLimitedGreedy, "scoring_func": ScoreSoftmax,
		"norm_topk_prob": false, "routed_scaling_factor": 16.0, "first_k_dense_replace": 1,
	})
	tinyLite := base()
	merge(tinyLite, map[string]any{
		"vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
		"num_key_value_heads": 4, "q_lora_rank": nil, "kv_lora_rank": 32, "qk_nope_head_dim": 16,
		"qk_rope_head_dim": 8, "v_head_dim": 24, "intermediate_size": 160, "moe_intermediate_size": 32,
		"n_routed_experts": 64, "num_experts_per_tok": 6, "n_shared_experts": 2, "n_group": 1,
		"topk_group": 1, "topk_method": TopKGreedy, "scoring_func": ScoreSoftmax,
		"norm_topk_prob": false, "routed_scaling_factor": 1.0, "first_k_dense_replace": 1,
	})
	tinyV3 := base()
	merge(tinyV3, map[string]any{
		"architectures": []string{"DeepseekV3ForCausalLM"}, "model_type": "deepseek_v3",
		"vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
		"num_key_value_heads": 4, "q_lora_rank": 48, "kv_lora_rank": 32, "qk_nope_head_dim": 16,
		"qk_rope_head_dim": 8, "v_head_dim": 16, "intermediate_size": 160, "moe_intermediate_size": 16,
		"n_routed_experts": 256, "num_experts_per_tok": 8, "n_shared_experts": 1, "n_group": 8,
		"topk_group": 4, "topk_method": TopKNoAuxTC, "scoring_func": ScoreSigmoid,
		"norm_topk_prob": true, "routed_scaling_factor": 2.5, "first_k_dense_replace": 2,
		"num_nextn_predict_layers": 1,
		"rope_scaling": map[string]any{"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
			"beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
	})
	lite4 := base()
	merge(lite4, map[string]any{
		"vocab_size": 102400, "hidden_size": 2048, "num_hidden_layers": 4, "num_attention_heads": 16,
		"num_key_value_heads": 16, "q_lora_rank": nil, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
		"qk_rope_head_dim": 64, "v_head_dim": 128, "intermediate_size": 10944, "moe_intermediate_size": 1408,
		"n_routed_experts": 64, "num_experts_per_tok": 6, "n_shared_experts": 2, "n_group": 1,
		"topk_group": 1, "topk_method": TopKGreedy, "scoring_func": ScoreSoftmax,
		"norm_topk_prob": false, "routed_scaling_factor": 1.0, "first_k_dense_replace": 1,
		"bos_token_id": 100000, "eos_token_id": 100001,
	})
	return map[string]Preset{
		"tiny-v2":      {Name: "tiny-v2", Description: "DeepSeek-V2 in miniature: q LoRA, 160 experts (6/token, 2 shared), group_limited_greedy 8/3, scaling 16, YaRN", Config: tinyV2, ShardBytes: 1 << 20},
		"tiny-v2-lite": {Name: "tiny-v2-lite", Description: "DeepSeek-V2-Lite in miniature: no q LoRA, 64 experts, greedy, v_head_dim != qk_nope_head_dim", Config: tinyLite, ShardBytes: 1 << 20},
		"tiny-v3":      {Name: "tiny-v3", Description: "DeepSeek-V3 in miniature: noaux_tc sigmoid routing with correction bias, 256 experts (8/token, 1 shared), MTP layer", Config: tinyV3, ShardBytes: 1 << 20},
		"v2-lite-4l":   {Name: "v2-lite-4l", Description: "DeepSeek-V2-Lite's real dimensions with 4 layers (about 4.4 GB BF16), for benchmarks", Config: lite4, ShardBytes: 1 << 30},
	}
}

func merge(dst, src map[string]any) {
	for k, v := range src {
		dst[k] = v
	}
}

// PresetNames lists the presets, sorted.
func PresetNames() []string {
	var names []string
	for n := range Presets() {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

// GenOptions tune GenerateCheckpoint.
type GenOptions struct {
	Seed uint64
	// VocabSize, if > 0, overrides the preset's vocabulary (a real
	// tokenizer needs every one of its ids covered).
	VocabSize int
	// TokenizerDir, if set, is a model directory whose tokenizer.json and
	// tokenizer_config.json are copied in; the vocabulary then grows to
	// cover every id of that tokenizer. Empty means a small byte-level
	// tokenizer sized to the preset's vocabulary.
	TokenizerDir string
	// Zipf, if > 0, skews expert popularity: in every MoE layer the
	// expert of rank r is chosen by a fraction ∝ r^−Zipf of the tokens
	// (capped at 0.4: see genmodel_zipf.go), different experts hot in
	// each layer, under the model's own routing. Only the router gate
	// weights differ from the checkpoint without it (--zipf).
	Zipf float64
}

// GenerateCheckpoint writes a random-weight checkpoint of preset p into
// dir in HF's layout: config.json, generation_config.json and sharded BF16
// safetensors with model.safetensors.index.json. Weights are scaled so
// activations stay well-conditioned and logits are not degenerate.
func GenerateCheckpoint(dir string, p Preset, opt GenOptions) error {
	if opt.Zipf < 0 || math.IsNaN(opt.Zipf) || math.IsInf(opt.Zipf, 0) {
		return fmt.Errorf("--zipf %v: want an exponent >= 0", opt.Zipf)
	}
	cfgMap := map[string]any{}
	merge(cfgMap, p.Config)
	if opt.VocabSize > 0 {
		cfgMap["vocab_size"] = opt.VocabSize
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	// The tokenizer decides the special ids and, for a real one, the
	// vocabulary size.
	vocab, ok := asInt(cfgMap["vocab_size"])
	if !ok {
		return fmt.Errorf("preset %s: vocab_size %v is not an integer", p.Name, cfgMap["vocab_size"])
	}
	tok, err := writeTokenizer(dir, opt.TokenizerDir, vocab)
	if err != nil {
		return err
	}
	if opt.TokenizerDir != "" {
		cfgMap["vocab_size"] = max(vocab, PaddedVocab(tok.VocabSize()))
	}
	if id, ok := tok.BOS(); ok {
		cfgMap["bos_token_id"] = id
	}
	if id, ok := tok.EOS(); ok {
		cfgMap["eos_token_id"] = id
	}
	cfgJSON, err := json.MarshalIndent(cfgMap, "", "  ")
	if err != nil {
		return err
	}
	cfg, err := ParseConfig(cfgJSON)
	if err != nil {
		return fmt.Errorf("preset %s: %w", p.Name, err)
	}
	specs, init := checkpointSpecs(cfg)
	fill := func(s safetensors.TensorSpec, dst []byte) error {
		fillTensor(dst, s, init[s.Name], opt.Seed)
		return nil
	}
	if err := safetensors.WriteSharded(dir, specs, p.ShardBytes, fill); err != nil {
		return err
	}
	gen := map[string]any{"_from_model_config": true, "bos_token_id": *cfg.BOSTokenID,
		"eos_token_id": *cfg.EOSTokenID, "do_sample": true, "temperature": 0.3, "top_p": 0.95}
	if err := writeJSON(filepath.Join(dir, "generation_config.json"), gen); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "config.json"), append(cfgJSON, '\n'), 0o644); err != nil {
		return err
	}
	if opt.Zipf == 0 || cfg.NumExperts() == 0 {
		return nil
	}
	// Calibrate the routers on the checkpoint as written, then write the
	// weights again with the gate rows scaled (the same draws otherwise).
	scales, err := zipfGateScales(dir, opt.Zipf, opt.Seed)
	if err != nil {
		return err
	}
	return safetensors.WriteSharded(dir, specs, p.ShardBytes, func(s safetensors.TensorSpec, dst []byte) error {
		fillTensor(dst, s, init[s.Name], opt.Seed)
		if l, ok := gateLayer(s.Name, cfg.NumHiddenLayers); ok && scales[l] != nil {
			scaleGateRows(dst, scales[l])
		}
		return nil
	})
}

func writeJSON(path string, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, append(b, '\n'), 0o644)
}

// initSpec says how to draw a tensor: uniform with the given standard
// deviation around center.
type initSpec struct {
	std, center float64
}

// checkpointSpecs lists every tensor of cfg in HF naming order with its
// initialisation.
func checkpointSpecs(c *Config) ([]safetensors.TensorSpec, map[string]initSpec) {
	var specs []safetensors.TensorSpec
	init := map[string]initSpec{}
	add := func(name string, dt safetensors.DType, in initSpec, shape ...int) {
		specs = append(specs, safetensors.TensorSpec{Name: name, DType: dt, Shape: shape})
		init[name] = in
	}
	lin := func(name string, out, in int) {
		add(name, safetensors.BF16, initSpec{std: 1 / math.Sqrt(float64(in))}, out, in)
	}
	norm := func(name string, n int) {
		add(name, safetensors.BF16, initSpec{std: 0.05, center: 1}, n)
	}
	mlp := func(p string, inter int) {
		lin(p+"gate_proj.weight", inter, c.HiddenSize)
		lin(p+"up_proj.weight", inter, c.HiddenSize)
		lin(p+"down_proj.weight", c.HiddenSize, inter)
	}
	h := c.HiddenSize
	add("model.embed_tokens.weight", safetensors.BF16, initSpec{std: 1}, c.VocabSize, h)
	layer := func(i int) {
		p := fmt.Sprintf("model.layers.%d.", i)
		norm(p+"input_layernorm.weight", h)
		a := p + "self_attn."
		if c.QLoraRank == nil {
			lin(a+"q_proj.weight", c.NumAttentionHeads*c.QHeadDim(), h)
		} else {
			lin(a+"q_a_proj.weight", *c.QLoraRank, h)
			norm(a+"q_a_layernorm.weight", *c.QLoraRank)
			lin(a+"q_b_proj.weight", c.NumAttentionHeads*c.QHeadDim(), *c.QLoraRank)
		}
		lin(a+"kv_a_proj_with_mqa.weight", c.LatentDim(), h)
		norm(a+"kv_a_layernorm.weight", c.KVLoraRank)
		lin(a+"kv_b_proj.weight", c.NumAttentionHeads*(c.QKNopeHeadDim+c.VHeadDim), c.KVLoraRank)
		lin(a+"o_proj.weight", h, c.NumAttentionHeads*c.VHeadDim)
		norm(p+"post_attention_layernorm.weight", h)
		if !c.IsMoELayer(i) {
			mlp(p+"mlp.", c.IntermediateSize)
			return
		}
		lin(p+"mlp.gate.weight", c.NumExperts(), h)
		if c.TopKMethod == TopKNoAuxTC {
			add(p+"mlp.gate.e_score_correction_bias", safetensors.F32, initSpec{std: 0.05}, c.NumExperts())
		}
		for e := range c.NumExperts() {
			mlp(fmt.Sprintf("%smlp.experts.%d.", p, e), c.MoEIntermediateSize)
		}
		if n := c.SharedExperts(); n > 0 {
			mlp(p+"mlp.shared_experts.", n*c.MoEIntermediateSize)
		}
	}
	for i := range c.NumHiddenLayers {
		layer(i)
	}
	// DeepSeek-V3's multi-token-prediction module sits at layer index
	// num_hidden_layers; plain decoding ignores it, and so must we.
	for j := range c.NumNextNPredictLayers {
		p := fmt.Sprintf("model.layers.%d.", c.NumHiddenLayers+j)
		norm(p+"enorm.weight", h)
		norm(p+"hnorm.weight", h)
		lin(p+"eh_proj.weight", h, 2*h)
		norm(p+"shared_head.norm.weight", h)
	}
	norm("model.norm.weight", h)
	// Logit scale: sharper than 1/sqrt(h) so greedy choices are stable.
	add("lm_head.weight", safetensors.BF16, initSpec{std: 3 / math.Sqrt(float64(h))}, c.VocabSize, h)
	return specs, init
}

// fillTensor draws a tensor's values deterministically from (seed, name),
// in parallel chunks with independent streams.
func fillTensor(dst []byte, s safetensors.TensorSpec, in initSpec, seed uint64) {
	size := s.DType.Size()
	n := len(dst) / size
	hs := fnv.New64a()
	hs.Write([]byte(s.Name))
	key := hs.Sum64() ^ seed*0x9e3779b97f4a7c15
	const chunk = 1 << 20
	chunks := (n + chunk - 1) / chunk
	a := in.std * math.Sqrt(3) // uniform[-a, a] has this std
	var wg sync.WaitGroup
	sem := make(chan struct{}, runtime.GOMAXPROCS(0))
	for ci := range chunks {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer func() { <-sem; wg.Done() }()
			rng := rand.New(rand.NewPCG(key, uint64(ci)))
			lo, hi := ci*chunk, min((ci+1)*chunk, n)
			for i := lo; i < hi; i++ {
				v := float32(in.center + a*(2*rng.Float64()-1))
				switch s.DType {
				case safetensors.BF16:
					binary.LittleEndian.PutUint16(dst[2*i:], kernels.F32ToBF16(v))
				case safetensors.F32:
					binary.LittleEndian.PutUint32(dst[4*i:], math.Float32bits(v))
				}
			}
		}()
	}
	wg.Wait()
}

// PaddedVocab is the embedding-table size a model trained with a
// tokenizer of n ids has. DeepSeek pads its tables past the tokenizer:
// DeepSeek-V2's 100k-id tokenizer sits in a 102400-row table and V3's
// 128815 ids in 129280 rows; other sizes round up to a multiple of 128.
func PaddedVocab(n int) int {
	switch {
	case n > 100000 && n <= 102400:
		return 102400
	case n > 128000 && n <= 129280:
		return 129280
	}
	return (n + 127) / 128 * 128
}

func asInt(v any) (int, bool) {
	switch x := v.(type) {
	case int:
		return x, true
	case int64:
		return int(x), true
	case float64:
		return int(x), x == math.Trunc(x)
	case json.Number:
		i, err := x.Int64()
		return int(i), err == nil
	}
	return 0, false
}

// writeTokenizer puts tokenizer files into dir: a copy of src's, or a
// byte-level tokenizer of vocab ids, and loads them back.
func writeTokenizer(dir, src string, vocab int) (*tokenizer.Tokenizer, error) {
	if src == "" {
		if err := tokenizer.WriteByteLevel(dir, vocab); err != nil {
			return nil, err
		}
		return tokenizer.Load(dir)
	}
	for _, name := range []string{"tokenizer.json", "tokenizer_config.json"} {
		b, err := os.ReadFile(filepath.Join(src, name))
		if err != nil {
			return nil, fmt.Errorf("--tokenizer: %w", err)
		}
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o644); err != nil {
			return nil, err
		}
	}
	tok, err := tokenizer.Load(dir)
	if err != nil {
		return nil, fmt.Errorf("--tokenizer %s: %w", src, err)
	}
	return tok, nil
}

// IsPreset reports whether name is a known preset (case-insensitive).
func IsPreset(name string) (Preset, bool) {
	p, ok := Presets()[strings.ToLower(name)]
	return p, ok
}
