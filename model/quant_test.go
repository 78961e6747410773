package model

import (
	"bufio"
	"context"
	"math"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"

	"github.com/expertmesh/expertmesh/kernels"
)

func loadQuant(t testing.TB, preset, quant string) *Weights {
	t.Helper()
	opts := LoadOptions{}
	if err := ParseQuantize(quant, &opts); err != nil {
		t.Fatal(err)
	}
	w, err := Load(tinyCheckpoint(t, preset), opts)
	if err != nil {
		t.Fatalf("load %s %s: %v", preset, quant, err)
	}
	t.Cleanup(func() { w.Close() })
	return w
}

// TestQuantizedLoad: q4 puts routed experts in Q4_0 and the other linear
// weights in Q8_0, leaving the router and kv_b_proj as stored; every
// matrix is valid.
func TestQuantizedLoad(t *testing.T) {
	w := loadQuant(t, "tiny-v2", QuantQ4)
	for l, L := range w.Layers {
		if L.Attn.O.DType != kernels.Q8_0 || L.Attn.KVB.DType == kernels.Q8_0 {
			t.Fatalf("layer %d: o_proj %s, kv_b_proj %s", l, L.Attn.O.DType, L.Attn.KVB.DType)
		}
		if L.MoE == nil {
			continue
		}
		if L.MoE.Gate.DType == kernels.Q8_0 || L.MoE.Shared.Down.DType != kernels.Q8_0 {
			t.Fatalf("layer %d: router %s, shared down %s", l, L.MoE.Gate.DType, L.MoE.Shared.Down.DType)
		}
		for e, ex := range L.MoE.Experts {
			if ex.Gate.DType != kernels.Q4_0 || ex.Down.DType != kernels.Q4_0 {
				t.Fatalf("layer %d expert %d: %s/%s", l, e, ex.Gate.DType, ex.Down.DType)
			}
		}
	}
	for _, m := range w.matrices() {
		if err := m.Validate(); err != nil {
			t.Fatal(err)
		}
	}
	if err := ParseQuantize("q3", &LoadOptions{}); err == nil {
		t.Fatal("q3 accepted")
	}
}

// promptLogprobs is the teacher-forced logprob of each prompt token after
// the first under w with integer activations on or off.
func promptLogprobs(t *testing.T, w *Weights, intAct bool, prompt []int, chunk int) []float64 {
	t.Helper()
	w.SetIntActivations(intAct)
	defer w.SetIntActivations(false)
	pool := kernels.NewPool(2)
	defer pool.Close()
	cache, _ := NewLatentCache(w.Config, 16, 8)
	res, err := NewEngine(w, pool, nil).Generate(context.Background(), cache, GenerateRequest{Prompt: prompt, MaxTokens: 1, Logprobs: 0, Echo: true, PrefillChunk: chunk})
	if err != nil {
		t.Fatal(err)
	}
	out := make([]float64, len(prompt)-1)
	for p := 1; p < len(prompt); p++ {
		out[p-1] = res.PromptLogprobs[p].Logprob
	}
	return out
}

func maxDelta(a, b []float64) float64 {
	var m float64
	for i := range a {
		m = math.Max(m, math.Abs(a[i]-b[i]))
	}
	return m
}

// TestIntActivationsDeviation: integer activations stay close to float
// ones on the same weights (the deviation is reported, not hidden), and
// a prompt prefilled whole rounds as one fed token by token (decode).
func TestIntActivationsDeviation(t *testing.T) {
	prompt := []int{3, 17, 250, 9, 101, 44, 5, 311, 77, 2, 480, 60, 13, 14, 15, 16}
	exact := promptLogprobs(t, loadTiny(t, "tiny-v2-lite"), false, prompt, 0)
	q8 := loadQuant(t, "tiny-v2-lite", QuantQ8)
	q8f := promptLogprobs(t, q8, false, prompt, 0)
	q8i := promptLogprobs(t, q8, true, prompt, 0)
	q8iTok := promptLogprobs(t, q8, true, prompt, 1)
	q4 := promptLogprobs(t, loadQuant(t, "tiny-v2-lite", QuantQ4), true, prompt, 0)
	t.Logf("max |Δ logprob| vs BF16 over %d positions: q8 float act %.4f, q8 int8 act %.4f, q4 %.4f; q8 int8 act vs float act %.4f",
		len(exact), maxDelta(exact, q8f), maxDelta(exact, q8i), maxDelta(exact, q4), maxDelta(q8f, q8i))
	if maxDelta(q8f, q8i) == 0 {
		t.Fatal("integer activations identical to float ones: not in use")
	}
	for name, d := range map[string]float64{"q8 float": maxDelta(exact, q8f), "q8 int8": maxDelta(exact, q8i), "q4": maxDelta(exact, q4)} {
		if d > 0.5 || math.IsNaN(d) {
			t.Fatalf("%s deviates by %.4f", name, d)
		}
	}
	if d := maxDelta(q8i, q8iTok); d > 1e-4 {
		t.Fatalf("int8 prefill whole vs token by token: %.2e", d)
	}
}

// TestIntActDecodeAllocations: decode with integer activations allocates
// nothing in the steady state either.
func TestIntActDecodeAllocations(t *testing.T) {
	w := loadQuant(t, "tiny-v2", QuantQ4)
	w.SetIntActivations(true)
	pool := kernels.NewPool(2)
	defer pool.Close()
	eng := NewEngine(w, pool, nil)
	cache, _ := NewLatentCache(w.Config, 16, 64)
	seq := cache.NewSequence()
	defer seq.Release()
	seq.Reserve(512)
	out := [][]float32{make([]float32, w.Config.VocabSize)}
	row := []Row{{Seq: seq, Token: 1, Pos: 0, Logits: true}}
	pos := 0
	step := func() {
		row[0].Pos = pos
		if err := eng.Forward(context.Background(), row, out); err != nil {
			t.Fatal(err)
		}
		pos++
	}
	for range 4 {
		step()
	}
	if a := testing.AllocsPerRun(50, step); a > 0 {
		t.Fatalf("%.1f allocations per decode step", a)
	}
}

// mappedRss sums the resident set of this process's mappings of files in
// dir (from /proc/self/smaps).
func mappedRss(t *testing.T, dir string) int64 {
	f, err := os.Open("/proc/self/smaps")
	if err != nil {
		t.Skip("no /proc/self/smaps")
	}
	defer f.Close()
	var total int64
	in := false
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := sc.Text()
		fields := strings.Fields(line)
		if len(fields) == 0 {
			continue
		}
		if strings.Contains(fields[0], "-") && len(fields) >= 5 {
			in = len(fields) >= 6 && strings.HasPrefix(fields[5], dir)
			continue
		}
		if in && fields[0] == "Rss:" {
			kb, _ := strconv.ParseInt(fields[1], 10, 64)
			total += kb << 10
		}
	}
	return total
}

// TestResidentDropsMapping: once the weights are copied (or quantised)
// into resident memory, the checkpoint's pages no longer count in the
// process's resident set; the copies still compute what the mapping did.
func TestResidentDropsMapping(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("smaps is Linux's")
	}
	dir, err := filepath.EvalSymlinks(tinyCheckpoint(t, "tiny-v2"))
	if err != nil {
		t.Fatal(err)
	}
	for _, quant := range []string{"", QuantQ8} {
		opts := LoadOptions{}
		ParseQuantize(quant, &opts)
		w, err := Load(dir, opts)
		if err != nil {
			t.Fatal(err)
		}
		w.Warm(2)
		before := mappedRss(t, dir)
		if err := w.MakeResident(2); err != nil {
			t.Fatal(err)
		}
		after := mappedRss(t, dir)
		t.Logf("quantize %q: checkpoint pages resident %d KiB after warming, %d KiB after MakeResident", quant, before>>10, after>>10)
		if after > before/10 {
			t.Fatalf("quantize %q: %d of %d bytes of the mapping still resident", quant, after, before)
		}
		w.Close()
	}
}
