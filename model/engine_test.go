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
