package model

import (
	"encoding/json"
	"errors"
	"strings"
	"testing"
)

func presetJSON(t testing.TB, name string, edit func(m map[string]any)) []byte {
	t.Helper()
	p, _ := IsPreset(name)
	m := map[string]any{}
	merge(m, p.Config)
	if edit != nil {
		edit(m)
	}
	b, err := json.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestParseConfigPresets(t *testing.T) {
	for _, name := range PresetNames() {
		c, err := ParseConfig(presetJSON(t, name, nil))
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if c.LatentDim() != c.KVLoraRank+c.QKRopeHeadDim {
			t.Fatalf("%s: latent dim", name)
		}
	}
	c, _ := ParseConfig(presetJSON(t, "tiny-v2", nil))
	// first_k_dense_replace 1: layer 0 dense, the rest MoE.
	if c.IsMoELayer(0) || !c.IsMoELayer(1) || !c.IsMoELayer(2) {
		t.Fatal("tiny-v2 layer kinds wrong")
	}
	c, _ = ParseConfig(presetJSON(t, "tiny-v2", func(m map[string]any) { m["moe_layer_freq"] = 2 }))
	if c.IsMoELayer(1) || !c.IsMoELayer(2) {
		t.Fatal("moe_layer_freq 2 must make odd layers dense")
	}
}

// TestConfigErrors: every unsupported or inconsistent config fails with an
// error that names the field.
func TestConfigErrors(t *testing.T) {
	cases := []struct {
		field string
		edit  func(m map[string]any)
	}{
		{"model_type", func(m map[string]any) { m["model_type"] = "llama" }},
		{"hidden_size", func(m map[string]any) { m["hidden_size"] = 0 }},
		{"num_key_value_heads", func(m map[string]any) { m["num_key_value_heads"] = 2 }},
		{"q_lora_rank", func(m map[string]any) { m["q_lora_rank"] = 0 }},
		{"qk_rope_head_dim", func(m map[string]any) { m["qk_rope_head_dim"] = 7 }},
		{"hidden_act", func(m map[string]any) { m["hidden_act"] = "gelu" }},
		{"attention_bias", func(m map[string]any) { m["attention_bias"] = true }},
		{"topk_method", func(m map[string]any) { m["topk_method"] = "random" }},
		{"scoring_func", func(m map[string]any) { m["scoring_func"] = "relu" }},
		{"n_group", func(m map[string]any) { m["n_group"] = 7 }},
		{"topk_group", func(m map[string]any) { m["topk_group"] = 9 }},
		{"topk_group", func(m map[string]any) { m["topk_group"] = 1; m["num_experts_per_tok"] = 30 }},
		{"num_experts_per_tok", func(m map[string]any) { m["num_experts_per_tok"] = 0 }},
		{"moe_intermediate_size", func(m map[string]any) { m["moe_intermediate_size"] = -1 }},
		{"routed_scaling_factor", func(m map[string]any) { m["routed_scaling_factor"] = 0 }},
		{"moe_layer_freq", func(m map[string]any) { m["moe_layer_freq"] = 0 }},
		{"rope_scaling.type", func(m map[string]any) { m["rope_scaling"] = map[string]any{"type": "linear", "factor": 2.0} }},
		{"rope_scaling.factor", func(m map[string]any) { m["rope_scaling"] = map[string]any{"type": "yarn", "factor": 0} }},
		{"eos_token_id", func(m map[string]any) { m["eos_token_id"] = 99999 }},
		{"bos_token_id", func(m map[string]any) { m["bos_token_id"] = -1 }},
		{"quantization_config.quant_method", func(m map[string]any) { m["quantization_config"] = map[string]any{"quant_method": "gptq"} }},
		{"quantization_config.weight_block_size", func(m map[string]any) {
			m["quantization_config"] = map[string]any{"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": []int{64, 64}}
		}},
		{"scoring_func", func(m map[string]any) { m["topk_method"] = "noaux_tc" }}, // noaux_tc with softmax
	}
	for _, tc := range cases {
		t.Run(tc.field, func(t *testing.T) {
			_, err := ParseConfig(presetJSON(t, "tiny-v2", tc.edit))
			if !errors.Is(err, ErrConfig) {
				t.Fatalf("err = %v, want ErrConfig", err)
			}
			if !strings.Contains(err.Error(), `"`+tc.field+`"`) {
				t.Fatalf("error %q does not name field %q", err, tc.field)
			}
		})
	}
	if _, err := ParseConfig([]byte("{not json")); !errors.Is(err, ErrConfig) {
		t.Fatalf("bad JSON: %v", err)
	}
}

func TestConfigDefaultsAndLists(t *testing.T) {
	b := presetJSON(t, "tiny-v2", func(m map[string]any) {
		delete(m, "rms_norm_eps")
		delete(m, "num_key_value_heads")
		m["eos_token_id"] = []int{1, 2}
		m["rope_scaling"] = map[string]any{"rope_type": "yarn", "factor": 4.0}
	})
	c, err := ParseConfig(b)
	if err != nil {
		t.Fatal(err)
	}
	if c.RMSNormEps != 1e-6 || c.NumKeyValueHeads != c.NumAttentionHeads || *c.EOSTokenID != 1 {
		t.Fatalf("defaults not applied: eps %g kv heads %d eos %d", c.RMSNormEps, c.NumKeyValueHeads, *c.EOSTokenID)
	}
	r := c.RopeScaling
	if r.Type != "yarn" || r.BetaFast != 32 || r.BetaSlow != 1 || r.Mscale != 1 || r.MscaleAllDim != 0 || r.OriginalMaxPositionEmbeddings != 4096 {
		t.Fatalf("yarn defaults wrong: %+v", r)
	}
	g, err := parseGenerationConfig([]byte(`{"bos_token_id": 0, "eos_token_id": [1, 5], "temperature": 0.3}`), c, &GenerationConfig{})
	if err != nil {
		t.Fatal(err)
	}
	if len(g.EOSTokenIDs) != 2 || g.EOSTokenIDs[1] != 5 || *g.BOSTokenID != 0 {
		t.Fatalf("generation config: %+v", g)
	}
	if _, err := parseGenerationConfig([]byte(`{"eos_token_id": "x"}`), c, &GenerationConfig{}); !errors.Is(err, ErrConfig) {
		t.Fatalf("bad eos: %v", err)
	}
	// Like HF, a stop id outside the vocabulary is accepted (and can never fire).
	g, err = parseGenerationConfig([]byte(`{"eos_token_id": [100000, 1]}`), c, &GenerationConfig{})
	if err != nil || len(g.EOSTokenIDs) != 1 || g.EOSTokenIDs[0] != 1 {
		t.Fatalf("eos outside vocab: %v %v", g, err)
	}
}

func FuzzParseConfig(f *testing.F) {
	for _, n := range PresetNames() {
		f.Add(presetJSON(f, n, nil))
	}
	f.Add([]byte(`{"model_type":"deepseek_v2","n_routed_experts":4,"n_group":0,"topk_method":"group_limited_greedy"}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		c, err := ParseConfig(b)
		if err != nil {
			return
		}
		// Whatever validates must be usable without panics.
		_ = c.SoftmaxScale()
		_ = NewRope(c)
		if c.HasMoE() {
			NewRouter(c, nil)
		}
	})
}

func TestPaddedVocab(t *testing.T) {
	for _, c := range []struct{ in, want int }{{100002, 102400}, {100015, 102400}, {128815, 129280}, {512, 512}, {513, 640}, {300, 384}} {
		if got := PaddedVocab(c.in); got != c.want {
			t.Errorf("PaddedVocab(%d) = %d, want %d", c.in, got, c.want)
		}
	}
}

// TestConfigClassDefaults: a config.json written by transformers'
// save_pretrained holds only values that differ from the class defaults;
// the rest must come from the right class (V3's gate is noaux_tc/sigmoid
// and its config has no field saying so).
func TestConfigClassDefaults(t *testing.T) {
	v3, err := ParseConfig([]byte(`{"model_type": "deepseek_v3", "hidden_size": 64, "num_hidden_layers": 2,
		"num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 512, "n_routed_experts": 32}`))
	if err != nil {
		t.Fatal(err)
	}
	if v3.TopKMethod != TopKNoAuxTC || v3.ScoringFunc != ScoreSigmoid || v3.Groups() != 8 || v3.TopKGroups() != 4 ||
		v3.TopK() != 8 || !v3.NormTopKProb || v3.RoutedScalingFactor != 2.5 || v3.FirstKDenseReplace != 3 ||
		v3.SharedExperts() != 1 || v3.QLoraRank == nil || *v3.QLoraRank != 1536 || v3.MoEIntermediateSize != 2048 {
		t.Fatalf("V3 class defaults not applied: %+v", v3)
	}
	// DeepSeek's V2 class: no routed experts unless the config names them;
	// an explicit null q_lora_rank means plain q_proj, an absent one 1536.
	v2, err := ParseConfig([]byte(`{"model_type": "deepseek_v2", "hidden_size": 64, "num_hidden_layers": 2,
		"num_attention_heads": 4, "vocab_size": 512, "q_lora_rank": null}`))
	if err != nil {
		t.Fatal(err)
	}
	if v2.HasMoE() || v2.QLoraRank != nil || v2.MoEIntermediateSize != 1407 || v2.NumKeyValueHeads != 4 {
		t.Fatalf("V2 class defaults not applied: %+v", v2)
	}
	v2, err = ParseConfig([]byte(`{"model_type": "deepseek_v2", "hidden_size": 64, "num_hidden_layers": 2,
		"num_attention_heads": 4, "vocab_size": 512, "n_routed_experts": 8, "num_experts_per_tok": 2}`))
	if err != nil || v2.TopKMethod != TopKGreedy || v2.ScoringFunc != ScoreSoftmax || v2.SharedExperts() != 0 ||
		v2.QLoraRank == nil || *v2.QLoraRank != 1536 {
		t.Fatalf("V2 MoE defaults: %v %+v", err, v2)
	}
	// transformers v5 keeps rope theta and scaling in rope_parameters.
	rp, err := ParseConfig(presetJSON(t, "tiny-v2", func(m map[string]any) {
		delete(m, "rope_scaling")
		delete(m, "rope_theta")
		m["rope_parameters"] = map[string]any{"rope_type": "yarn", "rope_theta": 50000.0, "factor": 8.0,
			"original_max_position_embeddings": 2048, "mscale": 1.0, "mscale_all_dim": 0.5}
	}))
	if err != nil {
		t.Fatal(err)
	}
	if rp.RopeTheta != 50000 || rp.RopeScaling == nil || rp.RopeScaling.Factor != 8 || rp.RopeScaling.OriginalMaxPositionEmbeddings != 2048 ||
		rp.RopeScaling.MscaleAllDim != 0.5 || rp.RopeScaling.BetaFast != 32 {
		t.Fatalf("rope_parameters not read: theta %g scaling %+v", rp.RopeTheta, rp.RopeScaling)
	}
	plain, err := ParseConfig(presetJSON(t, "tiny-v2", func(m map[string]any) {
		delete(m, "rope_scaling")
		delete(m, "rope_theta")
		m["rope_parameters"] = map[string]any{"rope_type": "default", "rope_theta": 20000.0}
	}))
	if err != nil || plain.RopeScaling != nil || plain.RopeTheta != 20000 {
		t.Fatalf("default rope_parameters: %v %+v", err, plain)
	}
}
