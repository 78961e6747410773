package capacity

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/expertmesh/expertmesh/model"
)

// builtin are DeepSeek's published config.json files (the fields the
// planner and model.ParseConfig read), so `plan` answers for the real
// models without downloading anything.
var builtin = map[string]string{
	// deepseek-ai/DeepSeek-V2 (236B total, 21B active).
	"deepseek-v2": `{"architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
		"vocab_size": 102400, "hidden_size": 5120, "intermediate_size": 12288, "moe_intermediate_size": 1536,
		"num_hidden_layers": 60, "num_attention_heads": 128, "num_key_value_heads": 128,
		"n_shared_experts": 2, "n_routed_experts": 160, "num_experts_per_tok": 6, "routed_scaling_factor": 16.0,
		"kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128,
		"topk_method": "group_limited_greedy", "n_group": 8, "topk_group": 3, "first_k_dense_replace": 1,
		"moe_layer_freq": 1, "norm_topk_prob": false, "scoring_func": "softmax",
		"max_position_embeddings": 163840, "rms_norm_eps": 1e-6, "rope_theta": 10000,
		"rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
			"beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
		"bos_token_id": 100000, "eos_token_id": 100001, "tie_word_embeddings": false}`,
	// deepseek-ai/DeepSeek-V2-Lite (16B total, 2.4B active).
	"deepseek-v2-lite": `{"architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
		"vocab_size": 102400, "hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408,
		"num_hidden_layers": 27, "num_attention_heads": 16, "num_key_value_heads": 16,
		"n_shared_experts": 2, "n_routed_experts": 64, "num_experts_per_tok": 6, "routed_scaling_factor": 1.0,
		"kv_lora_rank": 512, "q_lora_rank": null, "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128,
		"topk_method": "greedy", "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1,
		"moe_layer_freq": 1, "norm_topk_prob": false, "scoring_func": "softmax",
		"max_position_embeddings": 163840, "rms_norm_eps": 1e-6, "rope_theta": 10000,
		"rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
			"beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
		"bos_token_id": 100000, "eos_token_id": 100001, "tie_word_embeddings": false}`,
	// deepseek-ai/DeepSeek-V3 (671B total, 37B active; FP8 weights).
	"deepseek-v3": `{"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
		"vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
		"num_hidden_layers": 61, "num_attention_heads": 128, "num_key_value_heads": 128,
		"n_shared_experts": 1, "n_routed_experts": 256, "num_experts_per_tok": 8, "routed_scaling_factor": 2.5,
		"kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128,
		"topk_method": "noaux_tc", "n_group": 8, "topk_group": 4, "first_k_dense_replace": 3,
		"moe_layer_freq": 1, "norm_topk_prob": true, "scoring_func": "sigmoid",
		"max_position_embeddings": 163840, "rms_norm_eps": 1e-6, "rope_theta": 10000,
		"rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
			"beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
		"num_nextn_predict_layers": 1,
		"quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]},
		"bos_token_id": 0, "eos_token_id": 1, "tie_word_embeddings": false}`,
}

// ModelNames lists the built-in model configs and the generated presets.
func ModelNames() []string {
	var names []string
	for n := range builtin {
		names = append(names, n)
	}
	names = append(names, model.PresetNames()...)
	slices.Sort(names)
	return names
}

// LoadModel returns a model config by name (a built-in DeepSeek config or
// a generated preset such as v2-lite-4l), or from a config.json path or a
// checkpoint directory holding one.
func LoadModel(spec string) (*model.Config, error) {
	key := strings.ToLower(spec)
	switch key {
	case "v2", "deepseek-v2-236b":
		key = "deepseek-v2"
	case "v2-lite":
		key = "deepseek-v2-lite"
	case "v3":
		key = "deepseek-v3"
	}
	if js, ok := builtin[key]; ok {
		return model.ParseConfig([]byte(js))
	}
	if p, ok := model.IsPreset(spec); ok {
		b, err := json.Marshal(p.Config)
		if err != nil {
			return nil, err
		}
		return model.ParseConfig(b)
	}
	path := spec
	if st, err := os.Stat(path); err == nil && st.IsDir() {
		path = filepath.Join(path, "config.json")
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("--model %q: not one of %s, and not a readable config.json: %v", spec, strings.Join(ModelNames(), ", "), err)
	}
	return model.ParseConfig(b)
}
