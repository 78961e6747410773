package model

import (
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
)

// ErrConfig marks a config.json or generation_config.json that is malformed,
// inconsistent, or asks for something expertmesh does not implement.
var ErrConfig = errors.New("model config")

// Routing methods (HF `topk_method`).
const (
	TopKGreedy             = "greedy"
	TopKGroupLimitedGreedy = "group_limited_greedy"
	TopKNoAuxTC            = "noaux_tc"
)

// Scoring functions (HF `scoring_func`).
const (
	ScoreSoftmax = "softmax"
	ScoreSigmoid = "sigmoid"
)

// RopeScaling is HF's `rope_scaling` block. Only YaRN is supported (that is
// what every DeepSeek MLA checkpoint ships); nil means plain RoPE.
type RopeScaling struct {
	Type                          string  `json:"type"`
	Factor                        float64 `json:"factor"`
	OriginalMaxPositionEmbeddings int     `json:"original_max_position_embeddings"`
	BetaFast                      float64 `json:"beta_fast"`
	BetaSlow                      float64 `json:"beta_slow"`
	Mscale                        float64 `json:"mscale"`
	MscaleAllDim                  float64 `json:"mscale_all_dim"`
}

// QuantizationConfig is the subset of HF's `quantization_config` that
// DeepSeek-V3's FP8 release uses.
type QuantizationConfig struct {
	QuantMethod      string `json:"quant_method"`
	Fmt              string `json:"fmt"`
	WeightBlockSize  []int  `json:"weight_block_size"`
	ActivationScheme string `json:"activation_scheme"`
}

// Config is a DeepSeek-V2 / V2-Lite / V3 config.json, with HF's defaults
// applied for absent fields. Field names follow HF so the JSON maps 1:1.
type Config struct {
	ModelType             string              `json:"model_type"`
	HiddenSize            int                 `json:"hidden_size"`
	NumHiddenLayers       int                 `json:"num_hidden_layers"`
	NumAttentionHeads     int                 `json:"num_attention_heads"`
	NumKeyValueHeads      int                 `json:"num_key_value_heads"`
	QLoraRank             *int                `json:"q_lora_rank"`
	KVLoraRank            int                 `json:"kv_lora_rank"`
	QKNopeHeadDim         int                 `json:"qk_nope_head_dim"`
	QKRopeHeadDim         int                 `json:"qk_rope_head_dim"`
	VHeadDim              int                 `json:"v_head_dim"`
	IntermediateSize      int                 `json:"intermediate_size"`
	MoEIntermediateSize   int                 `json:"moe_intermediate_size"`
	NRoutedExperts        *int                `json:"n_routed_experts"`
	NSharedExperts        *int                `json:"n_shared_experts"`
	NumExpertsPerTok      *int                `json:"num_experts_per_tok"`
	NGroup                *int                `json:"n_group"`
	TopKGroup             *int                `json:"topk_group"`
	TopKMethod            string              `json:"topk_method"`
	ScoringFunc           string              `json:"scoring_func"`
	NormTopKProb          bool                `json:"norm_topk_prob"`
	RoutedScalingFactor   float64             `json:"routed_scaling_factor"`
	FirstKDenseReplace    int                 `json:"first_k_dense_replace"`
	MoELayerFreq          int                 `json:"moe_layer_freq"`
	RMSNormEps            float64             `json:"rms_norm_eps"`
	RopeTheta             float64             `json:"rope_theta"`
	RopeScaling           *RopeScaling        `json:"rope_scaling"`
	MaxPositionEmbeddings int                 `json:"max_position_embeddings"`
	VocabSize             int                 `json:"vocab_size"`
	BOSTokenID            *int                `json:"bos_token_id"`
	EOSTokenID            *int                `json:"eos_token_id"`
	TieWordEmbeddings     bool                `json:"tie_word_embeddings"`
	HiddenAct             string              `json:"hidden_act"`
	AttentionBias         bool                `json:"attention_bias"`
	NumNextNPredictLayers int                 `json:"num_nextn_predict_layers"`
	QuantizationConfig    *QuantizationConfig `json:"quantization_config"`
}

// GenerationConfig is the subset of generation_config.json that decoding uses.
type GenerationConfig struct {
	BOSTokenID  *int     `json:"-"`
	EOSTokenIDs []int    `json:"-"`
	Temperature *float64 `json:"temperature"`
	TopP        *float64 `json:"top_p"`
	TopK        *int     `json:"top_k"`
	DoSample    *bool    `json:"do_sample"`
}

// LoadConfig reads dir/config.json.
func LoadConfig(dir string) (*Config, error) {
	b, err := os.ReadFile(filepath.Join(dir, "config.json"))
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrConfig, err)
	}
	return ParseConfig(b)
}

// ParseConfig decodes a config.json, applies HF's defaults and validates it.
func ParseConfig(b []byte) (*Config, error) {
	var raw map[string]json.RawMessage
	if err := json.Unmarshal(b, &raw); err != nil {
		return nil, fmt.Errorf("%w: config.json: %v", ErrConfig, err)
	}
	// Some exports write eos_token_id as a list; the config keeps the first
	// (generation_config.json carries the full stop set).
	if eos, ok := raw["eos_token_id"]; ok && len(eos) > 0 && eos[0] == '[' {
		var ids []int
		if err := json.Unmarshal(eos, &ids); err != nil || len(ids) == 0 {
			return nil, cfgErr("eos_token_id", "want an int or a non-empty list of ints")
		}
		raw["eos_token_id"], _ = json.Marshal(ids[0])
		b, _ = json.Marshal(raw)
	}
	var mt struct {
		ModelType string `json:"model_type"`
	}
	_ = json.Unmarshal(b, &mt)
	c := defaultsFor(mt.ModelType)
	if err := json.Unmarshal(b, c); err != nil {
		return nil, fmt.Errorf("%w: config.json: %v", ErrConfig, err)
	}
	if err := applyRopeParameters(c, raw); err != nil {
		return nil, err
	}
	if c.NumKeyValueHeads == 0 {
		c.NumKeyValueHeads = c.NumAttentionHeads
	}
	if err := c.Validate(); err != nil {
		return nil, err
	}
	return c, nil
}

// DefaultConfig returns DeepSeek's DeepseekV2Config defaults for the
// fields a config.json may omit.
func DefaultConfig() *Config { return defaultsFor("deepseek_v2") }

// defaultsFor returns the config-class defaults for modelType, which is
// what an omitted field means (save_pretrained writes only values that
// differ from them). V3: DeepSeek's DeepseekV3Config, which transformers'
// native class matches; the native class has no topk_method or
// scoring_func because its gate is always noaux_tc with sigmoid. V2:
// DeepSeek's DeepseekV2Config, where an omitted n_routed_experts or
// n_shared_experts means none (transformers' native class would say 64 and
// 2; we follow DeepSeek's code, as everywhere the variants differ). Special
// token ids have no default here: a class default outside a small
// vocabulary would make a config that omits them invalid.
func defaultsFor(modelType string) *Config {
	if modelType == "deepseek_v3" {
		return &Config{
			VocabSize: 129280, HiddenSize: 7168, IntermediateSize: 18432, MoEIntermediateSize: 2048,
			NumHiddenLayers: 61, NumAttentionHeads: 128, NumKeyValueHeads: 128,
			NSharedExperts: ptr(1), NRoutedExperts: ptr(256), RoutedScalingFactor: 2.5,
			KVLoraRank: 512, QLoraRank: ptr(1536), QKRopeHeadDim: 64, VHeadDim: 128, QKNopeHeadDim: 128,
			NGroup: ptr(8), TopKGroup: ptr(4), NumExpertsPerTok: ptr(8), FirstKDenseReplace: 3,
			NormTopKProb: true, HiddenAct: "silu", MaxPositionEmbeddings: 4096, RMSNormEps: 1e-6,
			RopeTheta: 10000, MoELayerFreq: 1, TopKMethod: TopKNoAuxTC, ScoringFunc: ScoreSigmoid,
		}
	}
	return &Config{
		VocabSize: 102400, HiddenSize: 4096, IntermediateSize: 11008, MoEIntermediateSize: 1407,
		NumHiddenLayers: 30, NumAttentionHeads: 32, RoutedScalingFactor: 1.0,
		KVLoraRank: 512, QLoraRank: ptr(1536), QKRopeHeadDim: 64, VHeadDim: 128, QKNopeHeadDim: 128,
		HiddenAct: "silu", MaxPositionEmbeddings: 2048, RMSNormEps: 1e-6,
		RopeTheta: 10000, MoELayerFreq: 1, TopKMethod: TopKGreedy, ScoringFunc: ScoreSoftmax,
	}
}

func cfgErr(field, format string, args ...any) error {
	return fmt.Errorf("%w: field %q: %s", ErrConfig, field, fmt.Sprintf(format, args...))
}

// Validate checks that the config describes a model this engine computes
// exactly, naming the offending field otherwise.
func (c *Config) Validate() error {
	switch c.ModelType {
	case "deepseek_v2", "deepseek_v3":
	default:
		return cfgErr("model_type", "%q is not supported (want deepseek_v2 or deepseek_v3)", c.ModelType)
	}
	pos := []struct {
		name string
		v    int
	}{
		{"hidden_size", c.HiddenSize}, {"num_hidden_layers", c.NumHiddenLayers},
		{"num_attention_heads", c.NumAttentionHeads}, {"kv_lora_rank", c.KVLoraRank},
		{"qk_nope_head_dim", c.QKNopeHeadDim}, {"qk_rope_head_dim", c.QKRopeHeadDim},
		{"v_head_dim", c.VHeadDim}, {"intermediate_size", c.IntermediateSize},
		{"vocab_size", c.VocabSize}, {"max_position_embeddings", c.MaxPositionEmbeddings},
	}
	for _, p := range pos {
		if p.v <= 0 {
			return cfgErr(p.name, "must be > 0, got %d", p.v)
		}
	}
	if c.NumKeyValueHeads != c.NumAttentionHeads {
		return cfgErr("num_key_value_heads", "MLA needs num_key_value_heads == num_attention_heads (%d), got %d", c.NumAttentionHeads, c.NumKeyValueHeads)
	}
	if c.QLoraRank != nil && *c.QLoraRank <= 0 {
		return cfgErr("q_lora_rank", "must be null or > 0, got %d", *c.QLoraRank)
	}
	if c.QKRopeHeadDim%2 != 0 {
		return cfgErr("qk_rope_head_dim", "must be even for pairwise RoPE, got %d", c.QKRopeHeadDim)
	}
	if c.HiddenAct != "silu" {
		return cfgErr("hidden_act", "%q is not supported (want silu)", c.HiddenAct)
	}
	if c.AttentionBias {
		return cfgErr("attention_bias", "true is not supported (DeepSeek checkpoints have no attention biases)")
	}
	if !(c.RMSNormEps > 0) {
		return cfgErr("rms_norm_eps", "must be > 0, got %g", c.RMSNormEps)
	}
	if !(c.RopeTheta > 0) {
		return cfgErr("rope_theta", "must be > 0, got %g", c.RopeTheta)
	}
	if c.FirstKDenseReplace < 0 {
		return cfgErr("first_k_dense_replace", "must be >= 0, got %d", c.FirstKDenseReplace)
	}
	if c.BOSTokenID != nil && (*c.BOSTokenID < 0 || *c.BOSTokenID >= c.VocabSize) {
		return cfgErr("bos_token_id", "%d outside vocab of %d", *c.BOSTokenID, c.VocabSize)
	}
	if c.EOSTokenID != nil && (*c.EOSTokenID < 0 || *c.EOSTokenID >= c.VocabSize) {
		return cfgErr("eos_token_id", "%d outside vocab of %d", *c.EOSTokenID, c.VocabSize)
	}
	if err := c.validateMoE(); err != nil {
		return err
	}
	if err := c.validateRope(); err != nil {
		return err
	}
	if q := c.QuantizationConfig; q != nil {
		if q.QuantMethod != "fp8" {
			return cfgErr("quantization_config.quant_method", "%q is not supported (want fp8)", q.QuantMethod)
		}
		if q.Fmt != "" && q.Fmt != "e4m3" {
			return cfgErr("quantization_config.fmt", "%q is not supported (want e4m3)", q.Fmt)
		}
		if len(q.WeightBlockSize) != 2 || q.WeightBlockSize[0] != 128 || q.WeightBlockSize[1] != 128 {
			return cfgErr("quantization_config.weight_block_size", "%v is not supported (want [128, 128])", q.WeightBlockSize)
		}
	}
	return nil
}

func (c *Config) validateMoE() error {
	if !c.HasMoE() {
		return nil
	}
	e := *c.NRoutedExperts
	if e <= 0 {
		return cfgErr("n_routed_experts", "must be > 0 or null, got %d", e)
	}
	if c.MoEIntermediateSize <= 0 {
		return cfgErr("moe_intermediate_size", "must be > 0, got %d", c.MoEIntermediateSize)
	}
	if c.NumExpertsPerTok == nil || *c.NumExpertsPerTok <= 0 || *c.NumExpertsPerTok > e {
		return cfgErr("num_experts_per_tok", "must be in [1, n_routed_experts=%d]", e)
	}
	if c.NSharedExperts != nil && *c.NSharedExperts < 0 {
		return cfgErr("n_shared_experts", "must be >= 0, got %d", *c.NSharedExperts)
	}
	if c.MoELayerFreq <= 0 {
		return cfgErr("moe_layer_freq", "must be > 0, got %d", c.MoELayerFreq)
	}
	if !(c.RoutedScalingFactor > 0) || math.IsInf(c.RoutedScalingFactor, 0) {
		return cfgErr("routed_scaling_factor", "must be a positive number, got %g", c.RoutedScalingFactor)
	}
	switch c.ScoringFunc {
	case ScoreSoftmax, ScoreSigmoid:
	default:
		return cfgErr("scoring_func", "%q is not supported (want softmax or sigmoid)", c.ScoringFunc)
	}
	switch c.TopKMethod {
	case TopKGreedy:
	case TopKGroupLimitedGreedy, TopKNoAuxTC:
		if c.NGroup == nil || *c.NGroup <= 0 || e%*c.NGroup != 0 {
			return cfgErr("n_group", "must divide n_routed_experts=%d for %s", e, c.TopKMethod)
		}
		if c.TopKGroup == nil || *c.TopKGroup <= 0 || *c.TopKGroup > *c.NGroup {
			return cfgErr("topk_group", "must be in [1, n_group] for %s", c.TopKMethod)
		}
		if *c.TopKGroup*(e / *c.NGroup) < *c.NumExpertsPerTok {
			return cfgErr("topk_group", "topk_group*experts_per_group=%d < num_experts_per_tok=%d", *c.TopKGroup*(e / *c.NGroup), *c.NumExpertsPerTok)
		}
		if c.TopKMethod == TopKNoAuxTC && e / *c.NGroup < 2 {
			return cfgErr("n_group", "noaux_tc scores a group by its top two experts; groups of %d are too small", e / *c.NGroup)
		}
	default:
		return cfgErr("topk_method", "%q is not supported (want greedy, group_limited_greedy or noaux_tc)", c.TopKMethod)
	}
	if c.TopKMethod == TopKNoAuxTC && c.ScoringFunc != ScoreSigmoid {
		// HF's V3 gate only implements sigmoid scoring with noaux_tc.
		return cfgErr("scoring_func", "noaux_tc needs sigmoid scoring, got %q", c.ScoringFunc)
	}
	return nil
}

func (c *Config) validateRope() error {
	r := c.RopeScaling
	if r == nil {
		return nil
	}
	if r.Type != "yarn" {
		return cfgErr("rope_scaling.type", "%q is not supported (want yarn or no rope_scaling)", r.Type)
	}
	if !(r.Factor > 0) {
		return cfgErr("rope_scaling.factor", "must be > 0, got %g", r.Factor)
	}
	if r.OriginalMaxPositionEmbeddings <= 0 {
		return cfgErr("rope_scaling.original_max_position_embeddings", "must be > 0, got %d", r.OriginalMaxPositionEmbeddings)
	}
	if r.BetaFast <= 0 || r.BetaSlow <= 0 {
		return cfgErr("rope_scaling.beta_fast", "beta_fast and beta_slow must be > 0, got %g and %g", r.BetaFast, r.BetaSlow)
	}
	return nil
}

// applyRopeParameters reads transformers v5's "rope_parameters" (rope
// theta and scaling in one dict) when the older rope_theta / rope_scaling
// fields are absent.
func applyRopeParameters(c *Config, raw map[string]json.RawMessage) error {
	rp, ok := raw["rope_parameters"]
	if !ok || string(rp) == "null" {
		return nil
	}
	var p struct {
		RopeType  string   `json:"rope_type"`
		Type      string   `json:"type"`
		RopeTheta *float64 `json:"rope_theta"`
	}
	if err := json.Unmarshal(rp, &p); err != nil {
		return cfgErr("rope_parameters", "%v", err)
	}
	if _, set := raw["rope_theta"]; !set && p.RopeTheta != nil {
		c.RopeTheta = *p.RopeTheta
	}
	if _, set := raw["rope_scaling"]; set {
		return nil
	}
	kind := p.RopeType
	if kind == "" {
		kind = p.Type
	}
	if kind == "" || kind == "default" {
		c.RopeScaling = nil
		return nil
	}
	var rs RopeScaling
	if err := json.Unmarshal(rp, &rs); err != nil {
		return cfgErr("rope_parameters", "%v", err)
	}
	c.RopeScaling = &rs
	return nil
}

// UnmarshalJSON applies YaRN's defaults (HF DeepseekV2YarnRotaryEmbedding)
// for absent fields and accepts "rope_type" as an alias of "type".
func (r *RopeScaling) UnmarshalJSON(b []byte) error {
	type plain RopeScaling
	p := plain{BetaFast: 32, BetaSlow: 1, Mscale: 1, MscaleAllDim: 0, OriginalMaxPositionEmbeddings: 4096}
	if err := json.Unmarshal(b, &p); err != nil {
		return err
	}
	if p.Type == "" {
		var alias struct {
			RopeType string `json:"rope_type"`
		}
		_ = json.Unmarshal(b, &alias)
		p.Type = alias.RopeType
	}
	*r = RopeScaling(p)
	return nil
}

// HasMoE reports whether any layer is a mixture of experts.
func (c *Config) HasMoE() bool { return c.NRoutedExperts != nil }

// IsMoELayer reports whether layer i uses routed experts (HF: layer_idx >=
// first_k_dense_replace and layer_idx % moe_layer_freq == 0).
func (c *Config) IsMoELayer(i int) bool {
	return c.HasMoE() && i >= c.FirstKDenseReplace && i%c.MoELayerFreq == 0
}

// QHeadDim is the per-head query/key width: nope + rope.
func (c *Config) QHeadDim() int { return c.QKNopeHeadDim + c.QKRopeHeadDim }

// LatentDim is what the cache stores per token and layer.
func (c *Config) LatentDim() int { return c.KVLoraRank + c.QKRopeHeadDim }

// NumExperts, TopK, SharedExperts, Groups and TopKGroups return the MoE shape
// with nil fields read as zero / one.
func (c *Config) NumExperts() int    { return deref(c.NRoutedExperts, 0) }
func (c *Config) TopK() int          { return deref(c.NumExpertsPerTok, 0) }
func (c *Config) SharedExperts() int { return deref(c.NSharedExperts, 0) }
func (c *Config) Groups() int        { return deref(c.NGroup, 1) }
func (c *Config) TopKGroups() int    { return deref(c.TopKGroup, 1) }

func deref(p *int, def int) int {
	if p == nil {
		return def
	}
	return *p
}

// FP8 reports whether linear weights are F8_E4M3 with block scales.
func (c *Config) FP8() bool { return c.QuantizationConfig != nil }

// SoftmaxScale is the attention logit scale: q_head_dim^-0.5, times
// yarn_get_mscale(factor, mscale_all_dim)^2 when YaRN sets mscale_all_dim
// (HF DeepseekV2Attention.__init__).
func (c *Config) SoftmaxScale() float64 {
	s := 1 / math.Sqrt(float64(c.QHeadDim()))
	if r := c.RopeScaling; r != nil && r.MscaleAllDim != 0 {
		m := yarnGetMscale(r.Factor, r.MscaleAllDim)
		s *= m * m
	}
	return s
}

// LoadGenerationConfig reads dir/generation_config.json. A missing file
// yields the config.json's bos/eos ids.
func LoadGenerationConfig(dir string, c *Config) (*GenerationConfig, error) {
	g := &GenerationConfig{BOSTokenID: c.BOSTokenID}
	if c.EOSTokenID != nil {
		g.EOSTokenIDs = []int{*c.EOSTokenID}
	}
	b, err := os.ReadFile(filepath.Join(dir, "generation_config.json"))
	if errors.Is(err, os.ErrNotExist) {
		return g, nil
	}
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrConfig, err)
	}
	return parseGenerationConfig(b, c, g)
}

func parseGenerationConfig(b []byte, c *Config, g *GenerationConfig) (*GenerationConfig, error) {
	if err := json.Unmarshal(b, g); err != nil {
		return nil, fmt.Errorf("%w: generation_config.json: %v", ErrConfig, err)
	}
	var ids struct {
		BOS json.RawMessage `json:"bos_token_id"`
		EOS json.RawMessage `json:"eos_token_id"`
	}
	if err := json.Unmarshal(b, &ids); err != nil {
		return nil, fmt.Errorf("%w: generation_config.json: %v", ErrConfig, err)
	}
	if len(ids.BOS) > 0 && string(ids.BOS) != "null" {
		var v int
		if err := json.Unmarshal(ids.BOS, &v); err != nil {
			return nil, fmt.Errorf("%w: generation_config.json: field \"bos_token_id\": %v", ErrConfig, err)
		}
		g.BOSTokenID = &v
	}
	if len(ids.EOS) > 0 && string(ids.EOS) != "null" {
		var one int
		var many []int
		if err := json.Unmarshal(ids.EOS, &one); err == nil {
			g.EOSTokenIDs = []int{one}
		} else if err := json.Unmarshal(ids.EOS, &many); err == nil {
			g.EOSTokenIDs = many
		} else {
			return nil, fmt.Errorf("%w: generation_config.json: field \"eos_token_id\": want an int or a list of ints", ErrConfig)
		}
	}
	// HF accepts stop ids outside the vocabulary; they can never be
	// sampled, so they are dropped rather than refused.
	kept := g.EOSTokenIDs[:0]
	for _, id := range g.EOSTokenIDs {
		if id >= 0 && id < c.VocabSize {
			kept = append(kept, id)
		}
	}
	g.EOSTokenIDs = kept
	return g, nil
}
