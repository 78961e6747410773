package model

import (
	"context"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/expertmesh/expertmesh/kernels"
)

func TestZipfTargets(t *testing.T) {
	f := ZipfTargets(160, 6, 1.2)
	sum := 0.0
	for r, v := range f {
		sum += v
		if v > zipfCap || (r > 0 && v > f[r-1]) {
			t.Fatalf("rank %d: %v after %v", r+1, v, f[max(r-1, 0)])
		}
	}
	if math.Abs(sum-6) > 1e-9 {
		t.Fatalf("targets sum to %v, want 6", sum)
	}
	// Past the cap, the ratio of ranks r and 2r is 2^S.
	if got := f[39] / f[79]; math.Abs(got-math.Pow(2, 1.2)) > 1e-9 {
		t.Fatalf("f(40)/f(80) = %v", got)
	}
	// Zipf 0 is uniform.
	for _, v := range ZipfTargets(64, 6, 0) {
		if math.Abs(v-6.0/64) > 1e-12 {
			t.Fatalf("uniform target %v", v)
		}
	}
}

// TestGenerateZipf routes a few thousand random tokens (another draw
// than the calibration's) through the real engine on a --zipf 1.2
// checkpoint and checks that each MoE layer's rank-frequency slope, over
// the ranks below the cap, is -1.2; that different experts are hot in
// different layers; and that only the gate weights changed.
func TestGenerateZipf(t *testing.T) {
	if testing.Short() {
		t.Skip("calibrates a checkpoint")
	}
	const S = 1.2
	p, _ := IsPreset("tiny-v2")
	dir := filepath.Join(t.TempDir(), "zipf")
	if err := GenerateCheckpoint(dir, p, GenOptions{Seed: 3, Zipf: S}); err != nil {
		t.Fatal(err)
	}
	plain := filepath.Join(t.TempDir(), "plain")
	if err := GenerateCheckpoint(plain, p, GenOptions{Seed: 3}); err != nil {
		t.Fatal(err)
	}
	w, err := Load(dir, LoadOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	pw, err := Load(plain, LoadOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer pw.Close()
	c := w.Config
	for l := range w.Layers {
		if c.IsMoELayer(l) {
			if slices.Equal(matrixF32(w.Layers[l].MoE.Gate), matrixF32(pw.Layers[l].MoE.Gate)) {
				t.Errorf("layer %d: the gate did not change", l)
			}
			if !slices.Equal(matrixF32(w.Layers[l].MoE.Experts[3].Up), matrixF32(pw.Layers[l].MoE.Experts[3].Up)) {
				t.Errorf("layer %d: an expert's weights changed", l)
			}
		}
	}
	for _, name := range []string{"config.json", "model.safetensors.index.json"} {
		a, _ := os.ReadFile(filepath.Join(dir, name))
		b, _ := os.ReadFile(filepath.Join(plain, name))
		if string(a) != string(b) {
			t.Errorf("%s differs from the checkpoint without --zipf", name)
		}
	}

	E := c.NumExperts()
	counts := make([][]int, c.NumHiddenLayers)
	tokens := 0
	pool := kernels.NewPool(0)
	defer pool.Close()
	eng := NewEngine(w, pool, nil)
	eng.Trace = func(layer int, ids []int32, _ []float32, n, k int) {
		if counts[layer] == nil {
			counts[layer] = make([]int, E)
		}
		for _, id := range ids[:n*k] {
			counts[layer][id]++
		}
		if layer == c.NumHiddenLayers-1 {
			tokens += n
		}
	}
	rng := rand.New(rand.NewPCG(99, 1))
	for range 150 {
		cache, err := NewLatentCache(c, 16, 4)
		if err != nil {
			t.Fatal(err)
		}
		prompt := make([]int, 40)
		for i := range prompt {
			prompt[i] = rng.IntN(c.VocabSize)
		}
		if _, err := eng.Generate(context.Background(), cache, GenerateRequest{Prompt: prompt, MaxTokens: 1}); err != nil {
			t.Fatal(err)
		}
	}
	targets := ZipfTargets(E, c.TopK(), S)
	capped := 0
	for targets[capped] >= zipfCap {
		capped++
	}
	var hot [][]int
	for l, cnt := range counts {
		if cnt == nil {
			continue
		}
		order := make([]int, E)
		for e := range order {
			order[e] = e
		}
		slices.SortStableFunc(order, func(a, b int) int { return cnt[b] - cnt[a] })
		hot = append(hot, slices.Sorted(slices.Values(order[:5])))
		// Least-squares slope of log frequency on log rank, over the ranks
		// below the cap with at least a few tokens each.
		var xs, ys []float64
		for r := capped; r < E; r++ {
			if cnt[order[r]] >= 5 {
				xs = append(xs, math.Log(float64(r+1)))
				ys = append(ys, math.Log(float64(cnt[order[r]])/float64(tokens)))
			}
		}
		slope := fitSlope(xs, ys)
		// The same against the ranks the generator meant (its per-layer
		// permutation): sorting by observed counts steepens the noisy tail
		// a little, this does not.
		rank := zipfRanks(E, 3, l)
		xs, ys = xs[:0], ys[:0]
		for e, r := range rank {
			if r >= capped && cnt[e] > 0 {
				xs = append(xs, math.Log(float64(r+1)))
				ys = append(ys, math.Log(float64(cnt[e])/float64(tokens)))
			}
		}
		meant := fitSlope(xs, ys)
		top := float64(cnt[order[0]]) / float64(tokens)
		t.Logf("layer %d: %d tokens, hottest expert %d chosen by %.3f of them (cap %.2f); rank-frequency slope over ranks %d..%d: %.3f by observed rank, %.3f by intended rank (want %.2f)",
			l, tokens, order[0], top, zipfCap, capped+1, E, slope, meant, -S)
		if math.Abs(meant+S) > 0.1 {
			t.Errorf("layer %d: slope by intended rank %.3f, want %.2f ± 0.1", l, meant, -S)
		}
		// The tolerance: with about 4000 tokens the coldest ranks carry a
		// few dozen selections each (±15% noise), which moves a fitted
		// slope by a few hundredths; 0.1 leaves room for that and for the
		// engine's float32 routing against the calibration's reference.
		if math.Abs(slope+S) > 0.1 {
			t.Errorf("layer %d: slope %.3f, want %.2f ± 0.1", l, slope, -S)
		}
		if top < 0.8*zipfCap || top > 1.25*zipfCap {
			t.Errorf("layer %d: the hottest expert takes %.3f of the tokens, want about %.2f", l, top, zipfCap)
		}
		if len(xs) < E/2 {
			t.Errorf("layer %d: only %d ranks with tokens", l, len(xs))
		}
	}
	if len(hot) < 2 || slices.Equal(hot[0], hot[1]) {
		t.Errorf("hot experts per layer: %v, want different ones", hot)
	}
}

func fitSlope(xs, ys []float64) float64 {
	var mx, my float64
	for i := range xs {
		mx += xs[i]
		my += ys[i]
	}
	mx /= float64(len(xs))
	my /= float64(len(ys))
	var sxy, sxx float64
	for i := range xs {
		sxy += (xs[i] - mx) * (ys[i] - my)
		sxx += (xs[i] - mx) * (xs[i] - mx)
	}
	return sxy / sxx
}

func matrixF32(m *kernels.Matrix) []float32 {
	out := make([]float32, 0, m.Rows*m.Cols)
	row := make([]float32, m.Cols)
	for r := range m.Rows {
		m.RowF32(row, r)
		out = append(out, row...)
	}
	return out
}
