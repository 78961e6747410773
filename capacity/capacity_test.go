package capacity

import (
	"bytes"
	"encoding/json"
	"flag"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/expertmesh/expertmesh/model"
)

var update = flag.Bool("update", false, "rewrite the golden files")

// goldenCases are the setups whose printed predictions are kept in
// testdata; review the diff when the model changes (go test -update).
var goldenCases = []struct {
	name  string
	model string
	setup func(*Setup)
}{
	{"v2-236b-4a8e", "deepseek-v2", func(s *Setup) {
		s.AttnNodes, s.ExpertNodes, s.Concurrency, s.Context, s.Redundant = 4, 8, 256, 4096, 32
		s.Attn, s.Expert = Rates{GBps: 300, GFLOPs: 6000}, Rates{GBps: 300, GFLOPs: 6000}
		s.Link = Link{Latency: 10 * time.Microsecond, Gbps: 200}
	}},
	{"v2-lite-1a2e", "deepseek-v2-lite", func(s *Setup) {
		s.ExpertNodes, s.Concurrency, s.Context = 2, 16, 1024
		s.Attn, s.Expert = Rates{GBps: 100, GFLOPs: 1500}, Rates{GBps: 100, GFLOPs: 1500}
	}},
	{"v3-8a16e", "deepseek-v3", func(s *Setup) {
		s.AttnNodes, s.ExpertNodes, s.Concurrency, s.Context, s.Redundant = 8, 16, 1024, 4096, 32
		s.Attn, s.Expert = Rates{GBps: 2000, GFLOPs: 400000}, Rates{GBps: 2000, GFLOPs: 400000}
		s.Link = Link{Latency: 5 * time.Microsecond, Gbps: 400}
	}},
	{"v2-lite-4l-shared-500us", "v2-lite-4l", func(s *Setup) {
		s.ExpertNodes, s.MicroBatches, s.Concurrency, s.Context = 3, 2, 8, 160
		s.Attn, s.Expert = Rates{GBps: 50, GFLOPs: 340}, Rates{GBps: 26, GFLOPs: 170}
		s.Shared, s.SharedCores = &Rates{GBps: 55, GFLOPs: 400}, 2
		s.Link = Link{Latency: 500 * time.Microsecond, Gbps: 10}
		s.DispatchOverhead = 300 * time.Microsecond
	}},
}

func TestGolden(t *testing.T) {
	for _, tc := range goldenCases {
		t.Run(tc.name, func(t *testing.T) {
			c, err := LoadModel(tc.model)
			if err != nil {
				t.Fatal(err)
			}
			s := DefaultSetup(c)
			tc.setup(&s)
			p, err := Predict(c, s)
			if err != nil {
				t.Fatal(err)
			}
			var b bytes.Buffer
			Write(&b, tc.model, p)
			path := filepath.Join("testdata", tc.name+".golden")
			if *update {
				if err := os.WriteFile(path, b.Bytes(), 0o644); err != nil {
					t.Fatal(err)
				}
				return
			}
			want, err := os.ReadFile(path)
			if err != nil {
				t.Fatalf("%v (go test -update writes it)", err)
			}
			if b.String() != string(want) {
				t.Errorf("prediction changed (go test -update after review):\n--- got\n%s\n--- want\n%s", b.String(), want)
			}
		})
	}
}

// TestHandComputed checks one setup against figures worked out by hand:
// V2-Lite's MoE layer on the attention node reads 31.2M weights (q 6.29M,
// kv_a 1.18M, kv_b 2.10M, o 4.19M, router 0.13M, shared experts 17.3M).
func TestHandComputed(t *testing.T) {
	c, _ := LoadModel("deepseek-v2-lite")
	s := DefaultSetup(c)
	s.MicroBatches, s.Concurrency, s.Context = 1, 1, 1
	s.Attn, s.Expert = Rates{GBps: 1, GFLOPs: 1e9}, Rates{GBps: 1, GFLOPs: 1e9}
	s.Link, s.DispatchOverhead = Link{Latency: time.Millisecond}, 0
	p, err := Predict(c, s)
	if err != nil {
		t.Fatal(err)
	}
	moe := p.Layers[1]
	params := 2048.0*16*192 + 2048*576 + 512*16*256 + 16*128*2048 + 2*2048 + 512 + 64*2048 + 2*3*2048*1408
	// (weights·2 + one token's cache) at 1 GB/s, plus 2 flops a weight and
	// the attention core over one cached token at 1e9 GFLOP/s.
	core := 2.0 * 16 * 1 * (2*512 + 64)
	want := 1e3*(params*2+576*4)/1e9 + 1e3*(2*params+core)/1e18
	if math.Abs(moe.AttentionMs-want) > 1e-9 {
		t.Errorf("attention %.6f ms, want %.6f", moe.AttentionMs, want)
	}
	if math.Abs(moe.WireMs-2) > 1e-9 {
		t.Errorf("wire %.6f ms, want 2 (1 ms each way, no rate limit, no overhead)", moe.WireMs)
	}
	// One row touches 6 experts, all on the one node: 6 × 3·2048·1408 × 2 bytes.
	if w := 1e3 * 6 * 3 * 2048 * 1408 * 2 / 1e9; math.Abs(moe.ExpertMs-w) > 1e-6 {
		t.Errorf("expert %.6f ms, want %.6f", moe.ExpertMs, w)
	}
	if math.Abs(moe.LayerMs-(moe.AttentionMs+moe.WireMs+moe.ExpertMs)) > 1e-9 || moe.Hidden {
		t.Errorf("one micro-batch: the layer is attention + hop, exposed: %+v", moe)
	}
	if got := p.Memory.CachePerToken; got != 27*576*4 {
		t.Errorf("cache per token %v, want %v", got, 27*576*4)
	}
}

// TestPingPong: with attention longer than the hop two micro-batches hide
// it, and the step is then set by attention alone; with a slow link many
// more are needed (each micro-batch reads the weights again, so more of
// them lengthen the attention that covers the hop), and ping-pong still
// gives the fastest step.
func TestPingPong(t *testing.T) {
	c, _ := LoadModel("deepseek-v2-lite")
	s := DefaultSetup(c)
	s.ExpertNodes, s.Concurrency, s.Context = 8, 64, 4096
	s.Attn, s.Expert = Rates{GBps: 100, GFLOPs: 2000}, Rates{GBps: 100, GFLOPs: 2000}
	s.Link = Link{Latency: 5 * time.Microsecond, Gbps: 100}
	p, _ := Predict(c, s)
	if p.HideMicroBatches != 2 || !p.Layers[1].Hidden || p.Bound != "attention" {
		t.Errorf("fast link: hide with %d micro-batches, bound %s; want 2, attention", p.HideMicroBatches, p.Bound)
	}
	s.Link.Latency = 20 * time.Millisecond
	p, _ = Predict(c, s)
	if p.HideMicroBatches < 10 || p.Bound != "hop" {
		t.Errorf("a 20 ms link: hide with %d micro-batches, bound %s; want many, hop", p.HideMicroBatches, p.Bound)
	}
	if p.BestMicroBatches < 2 {
		t.Errorf("a slow link still wants ping-pong: best %d", p.BestMicroBatches)
	}
}

// TestMoreExpertNodes: more expert nodes cut each node's expert time and
// memory, and never make a step slower when the link is free.
func TestMoreExpertNodes(t *testing.T) {
	c, _ := LoadModel("deepseek-v2")
	prev := math.Inf(1)
	prevMem := math.Inf(1)
	for _, e := range []int{1, 2, 4, 8} {
		s := DefaultSetup(c)
		s.ExpertNodes, s.Concurrency, s.MicroBatches = e, 128, 1
		s.Attn, s.Expert = Rates{GBps: 300, GFLOPs: 6000}, Rates{GBps: 300, GFLOPs: 6000}
		s.Link, s.DispatchOverhead = Link{}, 0
		p, _ := Predict(c, s)
		if p.StepMs > prev+1e-9 || p.Memory.ExpertWeights >= prevMem {
			t.Errorf("%d expert nodes: step %.3f ms (before %.3f), expert memory %v (before %v)", e, p.StepMs, prev, p.Memory.ExpertWeights, prevMem)
		}
		prev, prevMem = p.StepMs, p.Memory.ExpertWeights
	}
}

func TestValidateNamesFlags(t *testing.T) {
	c, _ := LoadModel("deepseek-v2-lite")
	for flagName, mod := range map[string]func(*Setup){
		"--attn-nodes":        func(s *Setup) { s.AttnNodes = 0 },
		"--expert-nodes":      func(s *Setup) { s.ExpertNodes = 0 },
		"--micro-batches":     func(s *Setup) { s.MicroBatches = 0 },
		"--concurrency":       func(s *Setup) { s.Concurrency = 0 },
		"--attn-gbps":         func(s *Setup) { s.Attn.GBps = 0 },
		"--expert-gbps":       func(s *Setup) { s.Expert.GFLOPs = -1 },
		"--redundant-experts": func(s *Setup) { s.Redundant = -1 },
	} {
		s := DefaultSetup(c)
		s.Attn, s.Expert = Rates{GBps: 1, GFLOPs: 1}, Rates{GBps: 1, GFLOPs: 1}
		mod(&s)
		if _, err := Predict(c, s); err == nil || !strings.Contains(err.Error(), flagName) {
			t.Errorf("%s: error %v", flagName, err)
		}
	}
}

func TestLoadModel(t *testing.T) {
	for _, name := range []string{"deepseek-v2", "v2", "deepseek-v2-lite", "deepseek-v3", "v2-lite-4l", "tiny-v2"} {
		if _, err := LoadModel(name); err != nil {
			t.Errorf("%s: %v", name, err)
		}
	}
	c, _ := LoadModel("deepseek-v2")
	if c.NumExperts() != 160 || c.HiddenSize != 5120 || c.NumHiddenLayers != 60 {
		t.Errorf("deepseek-v2: %d experts, hidden %d, %d layers", c.NumExperts(), c.HiddenSize, c.NumHiddenLayers)
	}
	dir := t.TempDir()
	b, _ := json.Marshal(map[string]any{"model_type": "deepseek_v2", "n_routed_experts": 8, "num_experts_per_tok": 2,
		"n_shared_experts": 1, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32,
		"moe_intermediate_size": 16, "vocab_size": 100, "q_lora_rank": nil, "kv_lora_rank": 16, "qk_nope_head_dim": 8,
		"qk_rope_head_dim": 8, "v_head_dim": 8})
	os.WriteFile(filepath.Join(dir, "config.json"), b, 0o644)
	if _, err := LoadModel(dir); err != nil {
		t.Errorf("checkpoint directory: %v", err)
	}
	if _, err := LoadModel("no-such-model"); err == nil || !strings.Contains(err.Error(), "deepseek-v2") {
		t.Errorf("unknown model: %v", err)
	}
	var _ = model.ErrConfig
}

// TestPingPongExpertBound: each expert node answers a layer's
// micro-batches one after another, so when its compute is longer than the
// attention node's, two micro-batches hide the wire but the layer still
// takes both micro-batches' expert work (the model took the longer of
// 2·attention and attention + hop, and bounded the expert nodes' work
// only over the whole step, as if the dense layer and the LM head
// overlapped it). One micro-batch is unchanged: attention + hop.
func TestPingPongExpertBound(t *testing.T) {
	c, _ := LoadModel("v2-lite-4l")
	s := DefaultSetup(c)
	s.ExpertNodes, s.Concurrency, s.Context = 1, 16, 64
	s.Attn, s.Expert = Rates{GBps: 100, GFLOPs: 2000}, Rates{GBps: 10, GFLOPs: 200}
	s.Link, s.DispatchOverhead = Link{Latency: 5 * time.Microsecond, Gbps: 100}, 0
	for _, m := range []int{1, 2, 4} {
		s.MicroBatches = m
		p, err := Predict(c, s)
		if err != nil {
			t.Fatal(err)
		}
		l := p.Layers[1]
		want := l.AttentionMs + l.WireMs + l.ExpertMs
		if m > 1 {
			want = float64(m) * l.ExpertMs
		}
		if !l.MoE || math.Abs(l.LayerMs-want) > 1e-9 || l.ExpertBound != (m > 1) {
			t.Errorf("%d micro-batches: layer %.3f ms (attention %.3f, wire %.3f, expert %.3f, experts bound %v), want %.3f",
				m, l.LayerMs, l.AttentionMs, l.WireMs, l.ExpertMs, l.ExpertBound, want)
		}
		if m > 1 && p.Bound != "experts" {
			t.Errorf("%d micro-batches: bound %s, want experts", m, p.Bound)
		}
		// The dense layer and the LM head do not overlap the expert work of
		// the same step: the step is more than the expert nodes' busy time.
		if m > 1 && p.StepMs < p.ExpertBusyMs+p.HeadMs+p.Layers[0].LayerMs-1e-9 {
			t.Errorf("%d micro-batches: step %.3f ms < expert busy %.3f + head %.3f + dense %.3f", m, p.StepMs, p.ExpertBusyMs, p.HeadMs, p.Layers[0].LayerMs)
		}
	}
}

// TestSlowestExpertNode checks the slowest node's touched experts against
// a simulation of routing: every row picks k distinct experts uniformly,
// node j holds experts [j·N/E, (j+1)·N/E), and the mean over many
// dispatches of the largest per-node count of distinct touched experts.
func TestSlowestExpertNode(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for _, tc := range []struct{ n, k, rows, nodes int }{
		{64, 6, 4, 2}, {64, 6, 8, 2}, {64, 6, 4, 4}, {64, 6, 8, 4}, {64, 6, 32, 4}, {64, 6, 8, 8},
		{160, 6, 32, 8}, {256, 8, 16, 16},
	} {
		const trials = 4000
		per := tc.n / tc.nodes
		var sumMax, sumMean float64
		hit := make([]bool, tc.n)
		for range trials {
			clear(hit)
			for range tc.rows {
				for _, e := range rng.Perm(tc.n)[:tc.k] {
					hit[e] = true
				}
			}
			most, all := 0, 0
			for j := range tc.nodes {
				c := 0
				for _, h := range hit[j*per : (j+1)*per] {
					if h {
						c++
					}
				}
				most, all = max(most, c), all+c
			}
			sumMax += float64(most)
			sumMean += float64(all) / float64(tc.nodes)
		}
		mean, slowest := touchedPerNode(float64(tc.n), float64(tc.k), float64(tc.rows), tc.nodes)
		simMean, simMax := sumMean/trials, sumMax/trials
		if math.Abs(mean-simMean) > 0.02*simMean || math.Abs(slowest-simMax) > 0.05*simMax {
			t.Errorf("%+v: mean %.2f slowest %.2f experts; simulated %.2f and %.2f", tc, mean, slowest, simMean, simMax)
		}
	}
	if m, s := touchedPerNode(64, 6, 8, 1); m != s {
		t.Errorf("one node is its own slowest: %v %v", m, s)
	}
}

// TestSharedMachineCPU checks the shared machine's bound against the
// per-layer figures: with the attention node's rates the machine's and
// E expert nodes splitting it, a micro-batch's attention (and the LM
// head) is its work at the machine's rates, and one dispatch's expert
// time on the mean node is all E nodes' work at the machine's rates; so
// the step's CPU over the cores is M·(attention + head) + M·(MoE layers)·
// expert + every dispatch's software over the cores + the overhead.
// Without a shared machine the bound is absent and the step is the
// pipeline's.
func TestSharedMachineCPU(t *testing.T) {
	c, _ := LoadModel("v2-lite-4l")
	for _, tc := range []struct{ e, m, cores int }{{1, 1, 2}, {2, 2, 2}, {4, 2, 2}, {3, 4, 8}} {
		s := DefaultSetup(c)
		s.ExpertNodes, s.MicroBatches, s.Concurrency, s.Context = tc.e, tc.m, 8, 96
		sh := Rates{GBps: 30, GFLOPs: 280}
		s.Attn, s.Expert, s.Shared, s.SharedCores = sh, sh, &sh, tc.cores
		s.Link, s.DispatchOverhead, s.StepOverhead = Link{Latency: 50 * time.Microsecond, Gbps: 10}, 3*time.Millisecond, 1500*time.Microsecond
		p, err := Predict(c, s)
		if err != nil {
			t.Fatal(err)
		}
		M := float64(tc.m)
		var work, dispatches float64
		for _, l := range p.Layers {
			work += M * l.AttentionMs
			if l.MoE {
				work += M * l.ExpertMs
				dispatches += M
			}
		}
		work += p.HeadMs
		disp := dispatches * 3 / float64(tc.cores)
		if math.Abs(p.MachineWorkMs-work) > 1e-6*work || math.Abs(p.MachineDispatchMs-disp) > 1e-9 ||
			math.Abs(p.MachineMs-(work+disp+1.5)) > 1e-6*work {
			t.Errorf("%+v: machine %.3f = work %.3f + dispatch %.3f; want %.3f + %.3f + 1.5", tc, p.MachineMs, p.MachineWorkMs, p.MachineDispatchMs, work, disp)
		}
		if p.StepMs < p.MachineMs-1e-9 || p.StepMs < p.PipelineMs-1e-9 || (p.Bound == "machine") != (p.MachineMs > max(p.PipelineMs, p.ExpertBusyMs)) {
			t.Errorf("%+v: step %.3f bound %s; pipeline %.3f, machine %.3f", tc, p.StepMs, p.Bound, p.PipelineMs, p.MachineMs)
		}
		s.Shared = nil
		q, _ := Predict(c, s)
		if q.MachineMs != 0 || q.StepMs != max(q.PipelineMs, q.ExpertBusyMs) {
			t.Errorf("%+v without a shared machine: machine %.3f, step %.3f, pipeline %.3f", tc, q.MachineMs, q.StepMs, q.PipelineMs)
		}
	}
	s := DefaultSetup(c)
	s.Attn, s.Expert, s.Shared = Rates{GBps: 1, GFLOPs: 1}, Rates{GBps: 1, GFLOPs: 1}, &Rates{GBps: 1, GFLOPs: 1}
	if _, err := Predict(c, s); err == nil || !strings.Contains(err.Error(), "--shared-cores") {
		t.Errorf("a shared machine without cores: %v", err)
	}
}

// TestDispatchNodeOverhead: each expert node a dispatch reaches adds its
// message's software to the wire time and, on a shared machine, to the
// cores' dispatch time; at 8 rows of v2-lite-4l every node is reached.
func TestDispatchNodeOverhead(t *testing.T) {
	c, _ := LoadModel("v2-lite-4l")
	for _, e := range []int{1, 2, 4} {
		s := DefaultSetup(c)
		s.ExpertNodes, s.MicroBatches, s.Concurrency, s.Context = e, 1, 8, 64
		sh := Rates{GBps: 30, GFLOPs: 280}
		s.Attn, s.Expert, s.Shared, s.SharedCores = sh, sh, &sh, 2
		s.Link, s.DispatchOverhead = Link{}, time.Millisecond
		base, _ := Predict(c, s)
		s.DispatchNodeOverhead = 2 * time.Millisecond
		p, err := Predict(c, s)
		if err != nil {
			t.Fatal(err)
		}
		reached := float64(e) * (1 - math.Pow(1-nodeShare(c, e), 8))
		if reached < float64(e)-0.01 {
			t.Errorf("%d nodes: %.3f reached by 8 rows", e, reached)
		}
		if d := p.Layers[1].WireMs - base.Layers[1].WireMs; math.Abs(d-2*reached) > 1e-9 {
			t.Errorf("%d nodes: wire +%.3f ms, want +%.3f", e, d, 2*reached)
		}
		if d := p.MachineDispatchMs - base.MachineDispatchMs; math.Abs(d-3*2*reached/2) > 1e-9 {
			t.Errorf("%d nodes: machine dispatch +%.3f ms, want +%.3f (3 MoE layers over 2 cores)", e, d, 3*2*reached/2)
		}
	}
}
