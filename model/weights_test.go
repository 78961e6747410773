package model

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/expertmesh/expertmesh/kernels"
	"github.com/expertmesh/expertmesh/model/safetensors"
)

// copyDir copies a generated checkpoint so a test can damage its copy.
func copyDir(t *testing.T, src string) string {
	t.Helper()
	dst := t.TempDir()
	ents, err := os.ReadDir(src)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join(src, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dst, e.Name()), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dst
}

func editJSON(t *testing.T, path string, edit func(m map[string]any)) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	m := map[string]any{}
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatal(err)
	}
	edit(m)
	b, _ = json.Marshal(m)
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

// TestCorruptCheckpoints: every damage gives a clear error naming what is
// wrong, never a panic and never a half-loaded model.
func TestCorruptCheckpoints(t *testing.T) {
	src := tinyCheckpoint(t, "tiny-v2")
	firstShard := "model-00001-of-00005.safetensors"
	cases := []struct {
		name    string
		damage  func(t *testing.T, dir string)
		want    error
		mention string
	}{
		{"config shape mismatch", func(t *testing.T, dir string) {
			editJSON(t, filepath.Join(dir, "config.json"), func(m map[string]any) { m["intermediate_size"] = 96 })
		}, ErrWeights, "model.layers.0.mlp.gate_proj.weight"},
		{"missing config", func(t *testing.T, dir string) {
			os.Remove(filepath.Join(dir, "config.json"))
		}, ErrConfig, "config.json"},
		{"truncated shard", func(t *testing.T, dir string) {
			p := filepath.Join(dir, firstShard)
			st, _ := os.Stat(p)
			os.Truncate(p, st.Size()-100)
		}, safetensors.ErrCorrupt, firstShard},
		{"bad header", func(t *testing.T, dir string) {
			p := filepath.Join(dir, firstShard)
			f, _ := os.OpenFile(p, os.O_WRONLY, 0)
			f.WriteAt([]byte("{{{{"), 8)
			f.Close()
		}, safetensors.ErrCorrupt, firstShard},
		{"missing shard", func(t *testing.T, dir string) {
			os.Remove(filepath.Join(dir, "model-00003-of-00005.safetensors"))
		}, safetensors.ErrNotFound, "model-00003-of-00005.safetensors"},
		{"tensor missing from index", func(t *testing.T, dir string) {
			editJSON(t, filepath.Join(dir, "model.safetensors.index.json"), func(m map[string]any) {
				delete(m["weight_map"].(map[string]any), "model.layers.2.mlp.experts.17.up_proj.weight")
			})
		}, safetensors.ErrNotFound, "model.layers.2.mlp.experts.17.up_proj.weight"},
		{"vocab larger than embeddings", func(t *testing.T, dir string) {
			editJSON(t, filepath.Join(dir, "config.json"), func(m map[string]any) { m["vocab_size"] = 1024 })
		}, ErrWeights, "model.embed_tokens.weight"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dir := copyDir(t, src)
			tc.damage(t, dir)
			w, err := Load(dir, LoadOptions{})
			if err == nil {
				w.Close()
				t.Fatal("loaded a damaged checkpoint")
			}
			if !errors.Is(err, tc.want) {
				t.Fatalf("err = %v, want %v", err, tc.want)
			}
			if !strings.Contains(err.Error(), tc.mention) {
				t.Fatalf("error %q does not mention %q", err, tc.mention)
			}
		})
	}
}

// TestExpertsOnlyLoad: an expert node binds only its experts.
func TestExpertsOnlyLoad(t *testing.T) {
	dir := tinyCheckpoint(t, "tiny-v2")
	w, err := Load(dir, LoadOptions{ExpertsOnly: true, Expert: func(l, e int) bool { return e%3 == l%3 }})
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	if w.Embed != nil || w.LMHead != nil || w.Layers[1].MoE.Gate != nil || w.Layers[1].Attn.KVA != nil {
		t.Fatal("experts-only load bound attention-side tensors")
	}
	for l, L := range w.Layers {
		if L.MoE == nil {
			continue
		}
		for e, ex := range L.MoE.Experts {
			if (ex != nil) != (e%3 == l%3) {
				t.Fatalf("layer %d expert %d loaded=%v", l, e, ex != nil)
			}
		}
	}
}

// TestFusedExpertLayout: a checkpoint whose experts are stored fused, as
// transformers v5 saves them (gate_up_proj [E, 2I, H], down_proj [E, H, I]),
// computes exactly what the per-expert layout does.
func TestFusedExpertLayout(t *testing.T) {
	src := tinyCheckpoint(t, "tiny-v2-lite")
	orig, err := Load(src, LoadOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer orig.Close()
	c := orig.Config
	E, I, H := c.NumExperts(), c.MoEIntermediateSize, c.HiddenSize
	dir := t.TempDir()
	for _, f := range []string{"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} {
		b, _ := os.ReadFile(filepath.Join(src, f))
		os.WriteFile(filepath.Join(dir, f), b, 0o644)
	}
	// Rewrite the checkpoint with fused experts.
	var specs []safetensors.TensorSpec
	data := map[string][]byte{}
	for _, name := range orig.ckpt.Names() {
		if strings.Contains(name, ".mlp.experts.") {
			continue
		}
		info, _ := orig.ckpt.Info(name)
		tn, _ := orig.ckpt.Tensor(name)
		specs = append(specs, safetensors.TensorSpec{Name: name, DType: info.DType, Shape: info.Shape})
		data[name] = tn.Data
	}
	for l := range c.NumHiddenLayers {
		if !c.IsMoELayer(l) {
			continue
		}
		var gu, down []byte
		for e := range E {
			ex := orig.Layers[l].MoE.Experts[e]
			gu = append(append(gu, ex.Gate.Data...), ex.Up.Data...)
			down = append(down, ex.Down.Data...)
		}
		p := fmt.Sprintf("model.layers.%d.mlp.experts.", l)
		specs = append(specs, safetensors.TensorSpec{Name: p + "gate_up_proj", DType: safetensors.BF16, Shape: []int{E, 2 * I, H}},
			safetensors.TensorSpec{Name: p + "down_proj", DType: safetensors.BF16, Shape: []int{E, H, I}})
		data[p+"gate_up_proj"], data[p+"down_proj"] = gu, down
	}
	if err := safetensors.WriteFile(filepath.Join(dir, "model.safetensors"), specs, func(s safetensors.TensorSpec, dst []byte) error {
		copy(dst, data[s.Name])
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	fused, err := Load(dir, LoadOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer fused.Close()
	pool := kernels.NewPool(1)
	defer pool.Close()
	gen := func(w *Weights) *GenerateResult {
		cache, _ := NewLatentCache(w.Config, 16, 8)
		res, err := NewEngine(w, pool, nil).Generate(context.Background(), cache, GenerateRequest{Prompt: []int{7, 70, 300}, MaxTokens: 6, Logprobs: 0})
		if err != nil {
			t.Fatal(err)
		}
		return res
	}
	a, b := gen(orig), gen(fused)
	for i := range a.Tokens {
		if a.Tokens[i] != b.Tokens[i] || a.Logprobs[i].Logprob != b.Logprobs[i].Logprob {
			t.Fatalf("token %d: per-expert %d/%g, fused %d/%g", i, a.Tokens[i], a.Logprobs[i].Logprob, b.Tokens[i], b.Logprobs[i].Logprob)
		}
	}
}
