package capacity

import (
	"errors"
	"fmt"
	"math"
	"time"

	"github.com/expertmesh/expertmesh/model"
)

// Rates are one node's effective rates for decode-shaped work, as
// `expertmesh bench-kernels` reports them for the node's thread count:
// the GB/s its matrix-vector kernels stream weights at (the "t1 GB/s"
// column for one thread) and the GFLOP/s its matrix products reach
// ("MatMul ... GFLOP/s").
type Rates struct {
	GBps   float64 `json:"gbps"`
	GFLOPs float64 `json:"gflops"`
}

// seconds is the time of work that reads bytes and does flops: the two
// added, not the roofline's larger of them. The rates are measured apart
// (bench-kernels' MatVec at one row, MatMul at 512), and a decode product
// of a few rows overlaps its weight stream and its FMAs poorly: on the
// v2-lite-4l sweep's idle-machine point (8 rows) the LM head took 30 ms
// against 13 as the larger and 24 as the sum, an expert node's layer 46
// ms against 35.5 and 40.7, the dense layer 12 ms against 5 and 9.
func (r Rates) seconds(bytes, flops float64) float64 {
	return bytes/(r.GBps*1e9) + flops/(r.GFLOPs*1e9)
}

// Scaled is r with both rates times f.
func (r Rates) Scaled(f float64) Rates { return Rates{GBps: r.GBps * f, GFLOPs: r.GFLOPs * f} }

// Link is the network between attention and expert nodes.
type Link struct {
	// Latency is one way.
	Latency time.Duration `json:"latency_ns"`
	// Gbps is each node's link rate in Gbit/s, each direction; 0: not a
	// limit.
	Gbps float64 `json:"gbps"`
}

// Setup is a cluster, its hardware and its load.
type Setup struct {
	AttnNodes   int `json:"attn_nodes"`
	ExpertNodes int `json:"expert_nodes"`
	// MicroBatches per attention-node step (1: no ping-pong).
	MicroBatches int `json:"micro_batches"`
	// Concurrency is the sequences decoding at once, cluster-wide
	// (spread evenly over the attention nodes).
	Concurrency int `json:"concurrency"`
	// Context is the mean number of tokens in a sequence's cache.
	Context int `json:"context"`
	// Redundant is the extra expert replicas per MoE layer (EPLB's
	// redundant experts), spread over the expert nodes.
	Redundant int `json:"redundant_experts"`

	Attn   Rates `json:"attn"`
	Expert Rates `json:"expert"`
	// Shared, when set, is one machine's total rates that every node
	// shares: all roles on one host (the emulated-link harness). Expert
	// nodes computing at once split it, and a step is never shorter than
	// the CPU time of all its processes over the machine's SharedCores
	// cores: all its work at these rates plus every dispatch's software
	// time.
	Shared      *Rates `json:"shared,omitempty"`
	SharedCores int    `json:"shared_cores,omitempty"`
	Link        Link   `json:"link"`
	// DispatchOverhead is the software cost of one dispatch round trip
	// besides the wire (encoding, gRPC both ways, wake-ups), as measured
	// on loopback.
	DispatchOverhead time.Duration `json:"dispatch_overhead_ns"`
	// DispatchNodeOverhead is added to it for every expert node the
	// dispatch reaches: the software of one message out and its answer
	// back (0: a dispatch costs the same to any number of nodes). On
	// the 2-core sweep machine the loopback wire time grows by 1.1 ms a
	// node (1.3, 2.1, 3.7, 4.5 ms for 1-4 expert nodes).
	DispatchNodeOverhead time.Duration `json:"dispatch_node_overhead_ns,omitempty"`
	// StepOverhead is a step's cost outside its layers (the scheduler
	// round trip, admission); SampleOverhead is added per sequence
	// (sampling over the vocabulary).
	StepOverhead   time.Duration `json:"step_overhead_ns"`
	SampleOverhead time.Duration `json:"sample_overhead_ns"`

	// Bytes per number: weights on attention and expert nodes (2: BF16,
	// 1: FP8, 1.0625: Q8_0), the latent cache (4: float32, as
	// expertmesh stores it) and hidden rows on the wire (4: float32).
	WeightBytes       float64 `json:"weight_bytes"`
	ExpertWeightBytes float64 `json:"expert_weight_bytes"`
	CacheBytes        float64 `json:"cache_bytes"`
	WireBytes         float64 `json:"wire_bytes"`
}

// DefaultSetup is one attention and one expert node, two micro-batches,
// 32 sequences of 2048 tokens, on a 100 Gbit/s, 10 µs link; weights in the
// model's own precision (BF16, or FP8 for V3), the cache and the wire in
// float32 as expertmesh keeps them. Rates must be set.
func DefaultSetup(c *model.Config) Setup {
	wb := 2.0
	if c.FP8() {
		wb = 1
	}
	return Setup{AttnNodes: 1, ExpertNodes: 1, MicroBatches: 2, Concurrency: 32, Context: 2048,
		Link: Link{Latency: 10 * time.Microsecond, Gbps: 100}, WeightBytes: wb, ExpertWeightBytes: wb, CacheBytes: 4, WireBytes: 4}
}

// Validate names the flag of the first bad field.
func (s Setup) Validate() error {
	switch {
	case s.AttnNodes < 1:
		return fmt.Errorf("--attn-nodes %d: want >= 1", s.AttnNodes)
	case s.ExpertNodes < 1:
		return fmt.Errorf("--expert-nodes %d: want >= 1", s.ExpertNodes)
	case s.MicroBatches < 1:
		return fmt.Errorf("--micro-batches %d: want >= 1", s.MicroBatches)
	case s.Concurrency < s.AttnNodes:
		return fmt.Errorf("--concurrency %d: want at least one sequence per attention node (%d)", s.Concurrency, s.AttnNodes)
	case s.Context < 1:
		return fmt.Errorf("--context %d: want >= 1", s.Context)
	case s.Redundant < 0:
		return fmt.Errorf("--redundant-experts %d: want >= 0", s.Redundant)
	case !(s.Attn.GBps > 0 && s.Attn.GFLOPs > 0):
		return errors.New("--attn-gbps and --attn-gflops: want positive rates")
	case !(s.Expert.GBps > 0 && s.Expert.GFLOPs > 0):
		return errors.New("--expert-gbps and --expert-gflops: want positive rates")
	case s.Shared != nil && !(s.Shared.GBps > 0 && s.Shared.GFLOPs > 0):
		return errors.New("--shared-gbps and --shared-gflops: want positive rates")
	case s.Shared != nil && s.SharedCores < 1:
		return fmt.Errorf("--shared-cores %d: want the shared machine's cores (>= 1)", s.SharedCores)
	case s.Link.Latency < 0 || s.Link.Gbps < 0:
		return errors.New("--latency and --link-gbps: must not be negative")
	case s.DispatchOverhead < 0 || s.DispatchNodeOverhead < 0 || s.StepOverhead < 0 || s.SampleOverhead < 0:
		return errors.New("--dispatch-overhead, --dispatch-node-overhead, --step-overhead and --sample-overhead: must not be negative")
	case !(s.WeightBytes > 0 && s.ExpertWeightBytes > 0 && s.CacheBytes > 0 && s.WireBytes > 0):
		return errors.New("--weight-bytes, --expert-weight-bytes: want positive sizes")
	}
	return nil
}

// Layer is one layer of a decode step on one attention node.
type Layer struct {
	Layer int  `json:"layer"`
	MoE   bool `json:"moe"`
	// AttentionMs is one micro-batch's work for the layer on the
	// attention node: MLA against the latent cache, norms, router, shared
	// experts (or the dense MLP).
	AttentionMs float64 `json:"attention_ms"`
	// WireMs is one dispatch round trip's time on the wire: latency both
	// ways, serialisation at the link rate, software overhead.
	WireMs float64 `json:"wire_ms"`
	// ExpertMs is one dispatch's compute on the mean expert node;
	// SlowestWaitMs how much longer the slowest of the E nodes takes
	// (one dispatch's rows do not spread evenly), which the hop waits
	// for.
	ExpertMs      float64 `json:"expert_ms"`
	SlowestWaitMs float64 `json:"slowest_wait_ms"`
	// LayerMs is the layer's share of the step: all micro-batches,
	// pipelined.
	LayerMs float64 `json:"layer_ms"`
	// Hidden: with this many micro-batches the hop (wire + expert) is
	// covered by the other micro-batches' attention.
	Hidden bool `json:"hop_hidden"`
	// ExpertBound: the expert nodes' compute for all micro-batches is
	// the layer's longest part (ping-pong hides the wire, but each
	// expert node still answers the micro-batches one after another).
	ExpertBound bool `json:"experts_bound,omitempty"`
}

// Memory is what one node holds, in bytes.
type Memory struct {
	// AttnWeights is everything but the routed experts: embeddings, LM
	// head, attention, dense layers, shared experts, routers, norms.
	AttnWeights float64 `json:"attn_weights"`
	// CachePerToken is the latent cache of one token over all layers;
	// AttnCache that of the node's sequences at the given context.
	CachePerToken float64 `json:"cache_per_token"`
	AttnCache     float64 `json:"attn_cache"`
	AttnTotal     float64 `json:"attn_total"`
	// ExpertsPerNode is the routed experts (per MoE layer) one expert
	// node holds, redundant replicas included; ExpertWeights their bytes
	// over all MoE layers, ExpertRedundant the redundant replicas' part.
	ExpertsPerNode  float64 `json:"experts_per_node"`
	ExpertWeights   float64 `json:"expert_weights"`
	ExpertRedundant float64 `json:"expert_redundant"`
}

// Prediction is what Predict says about a setup.
type Prediction struct {
	Setup Setup `json:"setup"`
	// RowsPerMicroBatch is the sequences in one micro-batch of one
	// attention node.
	RowsPerMicroBatch int     `json:"rows_per_micro_batch"`
	Layers            []Layer `json:"layers"`
	// HeadMs is the LM head over all micro-batches; OverheadMs the step's
	// work outside the layers.
	HeadMs     float64 `json:"head_ms"`
	OverheadMs float64 `json:"overhead_ms"`
	// PipelineMs is the step the attention node's pipeline allows;
	// ExpertBusyMs each expert node's compute per step (all attention
	// nodes' dispatches). MachineMs, with Shared, is the CPU time of all
	// the step's processes over the machine's cores: MachineWorkMs (every
	// node's bytes and flops at the machine's total rates),
	// MachineDispatchMs (every dispatch's software time over the cores)
	// and the step's overhead.
	PipelineMs        float64 `json:"pipeline_ms"`
	ExpertBusyMs      float64 `json:"expert_busy_ms"`
	MachineMs         float64 `json:"machine_ms,omitempty"`
	MachineWorkMs     float64 `json:"machine_work_ms,omitempty"`
	MachineDispatchMs float64 `json:"machine_dispatch_ms,omitempty"`
	// StepMs is the predicted decode step, the largest of those; Bound
	// names which: attention, hop (wire and experts not hidden), experts
	// or machine.
	StepMs float64 `json:"step_ms"`
	Bound  string  `json:"bound"`
	// Tokens per second: each user's, the cluster's, per node and per
	// attention node.
	PerUserTokS     float64 `json:"per_user_tok_s"`
	TotalTokS       float64 `json:"total_tok_s"`
	PerNodeTokS     float64 `json:"per_node_tok_s"`
	PerAttnNodeTokS float64 `json:"per_attn_node_tok_s"`
	// HideMicroBatches is the fewest micro-batches that hide every MoE
	// layer's hop (0: none up to the rows a node has); BestMicroBatches
	// the count with the shortest step, BestStepMs that step.
	HideMicroBatches int     `json:"hide_micro_batches"`
	BestMicroBatches int     `json:"best_micro_batches"`
	BestStepMs       float64 `json:"best_step_ms"`
	Memory           Memory  `json:"memory"`
}

// Predict models a decode step of c on s. It is a pure function of its
// inputs; see the package documentation for the model.
func Predict(c *model.Config, s Setup) (*Prediction, error) {
	if err := s.Validate(); err != nil {
		return nil, err
	}
	if !c.HasMoE() {
		return nil, errors.New("--model: the model has no routed experts: nothing to place on expert nodes")
	}
	p := predictM(c, s)
	p.HideMicroBatches, p.BestMicroBatches, p.BestStepMs = 0, s.MicroBatches, p.StepMs
	perNode := ceilDiv(s.Concurrency, s.AttnNodes)
	for m := 1; m <= min(perNode, 64); m++ {
		t := s
		t.MicroBatches = m
		q := predictM(c, t)
		if p.HideMicroBatches == 0 && q.allHidden() {
			p.HideMicroBatches = m
		}
		if q.StepMs < p.BestStepMs-1e-9 {
			p.BestMicroBatches, p.BestStepMs = m, q.StepMs
		}
	}
	return p, nil
}

func (p *Prediction) allHidden() bool {
	for _, l := range p.Layers {
		if l.MoE && !l.Hidden {
			return false
		}
	}
	return true
}

// predictM is the prediction for s.MicroBatches, without the searches.
func predictM(c *model.Config, s Setup) *Prediction {
	h := float64(c.HiddenSize)
	perNode := ceilDiv(s.Concurrency, s.AttnNodes)
	M := min(s.MicroBatches, perNode) // no empty micro-batches
	b := ceilDiv(perNode, M)          // rows of the largest micro-batch
	rows := float64(b)
	ctx := float64(s.Context)
	E := float64(s.ExpertNodes)
	N := float64(c.NumExperts())
	k := float64(c.TopK())
	mi := float64(c.MoEIntermediateSize)
	lat := float64(c.LatentDim())

	attnRates := s.Attn
	expertRates := s.Expert
	if s.Shared != nil {
		// Expert nodes answer one layer's dispatch at the same time and
		// share the machine.
		expertRates = Rates{GBps: min(s.Expert.GBps, s.Shared.GBps/E), GFLOPs: min(s.Expert.GFLOPs, s.Shared.GFLOPs/E)}
		attnRates = Rates{GBps: min(s.Attn.GBps, s.Shared.GBps), GFLOPs: min(s.Attn.GFLOPs, s.Shared.GFLOPs)}
	}

	// Per-row attention core (absorbed MLA against the latent cache):
	// scores over kv_lora+rope, values over kv_lora, every head.
	coreFlops := 2 * float64(c.NumAttentionHeads) * ctx * (2*float64(c.KVLoraRank) + float64(c.QKRopeHeadDim))
	cacheRead := ctx * lat * s.CacheBytes

	// One dispatch of b rows from one attention node: rows and experts
	// each expert node gets.
	pNode := nodeShare(c, s.ExpertNodes)
	rowsNode := rows * pNode
	touched, slowest := touchedPerNode(N, k, rows, s.ExpertNodes)
	expertBytes := touched * 3 * h * mi * s.ExpertWeightBytes
	expertFlops := 2 * 3 * h * mi * rows * k / E
	tExpert := expertRates.seconds(expertBytes, expertFlops)
	// The layer waits for the slowest expert node.
	// At the same rates as the others, also on one shared machine: the
	// sweep's breakdown shows the wait there as well (15%, 24%, 30% of
	// the mean node's compute for 2, 3, 4 expert nodes at 8 rows, close
	// to this estimate's 10%, 17%, 24%): what the nodes that finish first
	// leave goes to other work, not to the slowest node's one thread.
	tSlowest := expertRates.seconds(slowest*3*h*mi*s.ExpertWeightBytes, expertFlops*slowest/touched)
	wireOut := E * rowsNode * (h*s.WireBytes + k*8) // hidden rows + ids and gates
	wireIn := E * rowsNode * h * s.WireBytes        // partial sums
	// A dispatch's software: its own, and each reached node's message
	// (a node none of the rows route to gets none).
	reached := E * (1 - math.Pow(1-pNode, rows))
	tSoftware := s.DispatchOverhead.Seconds() + reached*s.DispatchNodeOverhead.Seconds()
	tWire := 2*s.Link.Latency.Seconds() + tSoftware
	if s.Link.Gbps > 0 {
		tWire += (wireOut + wireIn) / (s.Link.Gbps * 1e9 / 8)
	}

	p := &Prediction{Setup: s, RowsPerMicroBatch: b}
	// What every process of the step reads and computes, for the
	// shared machine's bound: the attention node's per micro-batch, the
	// expert nodes' per dispatch, summed over all nodes.
	var pipeline, expertBusy float64
	var attnBytesStep, attnFlopsStep, expertBytesStep, expertFlopsStep, dispatches float64
	for l := range c.NumHiddenLayers {
		params := attnParams(c)
		moe := c.IsMoELayer(l)
		if moe {
			params += N*h + float64(c.SharedExperts())*3*h*mi
		} else {
			params += 3 * h * float64(c.IntermediateSize)
		}
		wBytes := params * s.WeightBytes
		tAttn := attnRates.seconds(wBytes+rows*cacheRead, rows*(2*params+coreFlops))
		attnBytesStep += float64(M) * (wBytes + rows*cacheRead)
		attnFlopsStep += float64(M) * rows * (2*params + coreFlops)
		ly := Layer{Layer: l, MoE: moe, AttentionMs: 1e3 * tAttn}
		if !moe {
			ly.LayerMs = 1e3 * float64(M) * tAttn
		} else {
			tHop := tWire + tSlowest
			ly.WireMs, ly.ExpertMs, ly.SlowestWaitMs = 1e3*tWire, 1e3*tExpert, 1e3*(tSlowest-tExpert)
			// Two stages, M micro-batches sharing each: the attention
			// node computes them one after another, and so does every
			// expert node (one dispatch of this layer per micro-batch).
			// In steady state a layer takes the longest of all its
			// attention work, all its expert work, and one
			// micro-batch's attention plus its hop (it cannot start
			// its next layer before its experts answer). Other
			// attention nodes' dispatches interleave with these and
			// are bounded over the whole step (ExpertBusyMs).
			ly.LayerMs = 1e3 * max(float64(M)*tAttn, float64(M)*tExpert, tAttn+tHop)
			ly.Hidden = float64(M-1)*tAttn >= tHop
			ly.ExpertBound = float64(M)*tExpert > max(float64(M)*tAttn, tAttn+tHop)
			expertBusy += float64(s.AttnNodes*M) * tExpert
			expertBytesStep += float64(s.AttnNodes*M) * expertBytes * E
			expertFlopsStep += float64(s.AttnNodes*M) * expertFlops * E
			dispatches += float64(s.AttnNodes * M)
		}
		pipeline += ly.LayerMs / 1e3
		p.Layers = append(p.Layers, ly)
	}
	head := float64(c.VocabSize) * h
	tHead := attnRates.seconds(head*s.WeightBytes, rows*2*head)
	p.HeadMs = 1e3 * float64(M) * tHead
	attnBytesStep += float64(M) * head * s.WeightBytes
	attnFlopsStep += float64(M) * rows * 2 * head
	overhead := s.StepOverhead.Seconds() + float64(perNode)*s.SampleOverhead.Seconds()
	p.OverheadMs = 1e3 * overhead
	pipeline += float64(M)*tHead + overhead
	p.PipelineMs = 1e3 * pipeline
	p.ExpertBusyMs = 1e3 * expertBusy
	p.StepMs, p.Bound = p.PipelineMs, "attention"
	if !p.allHidden() {
		p.Bound = "hop"
	}
	for _, l := range p.Layers {
		if l.ExpertBound {
			p.Bound = "experts"
		}
	}
	if p.ExpertBusyMs > p.StepMs {
		p.StepMs, p.Bound = p.ExpertBusyMs, "experts"
	}
	if s.Shared != nil {
		// All processes take turns on the same cores, so a step is no
		// shorter than the CPU time of all of them over the cores:
		//   - every node's compute (the attention nodes' per micro-batch,
		//     the expert nodes' per dispatch, all of them, not just the
		//     slowest), at the machine's total rates, which are the
		//     cores' CPU time over the cores;
		//   - every dispatch's software (encoding, gRPC both ways,
		//     decoding, the hand-offs between goroutines): the dispatch
		//     overhead, which is that work in a row on loopback, is CPU
		//     time on one core at a time; each micro-batch of each
		//     attention node adds one dispatch a MoE layer, which
		//     ping-pong hides from the pipeline but not from the cores;
		//   - the step's overhead (scheduling, sampling), which nothing
		//     else overlaps.
		A := float64(s.AttnNodes)
		work := s.Shared.seconds(A*attnBytesStep+expertBytesStep, A*attnFlopsStep+expertFlopsStep)
		disp := dispatches * tSoftware / float64(s.SharedCores)
		p.MachineWorkMs, p.MachineDispatchMs = 1e3*work, 1e3*disp
		p.MachineMs = 1e3 * (work + disp + overhead)
		if p.MachineMs > p.StepMs {
			p.StepMs, p.Bound = p.MachineMs, "machine"
		}
	}
	step := p.StepMs / 1e3
	p.PerUserTokS = 1 / step
	p.TotalTokS = float64(s.Concurrency) / step
	p.PerNodeTokS = p.TotalTokS / float64(s.AttnNodes+s.ExpertNodes)
	p.PerAttnNodeTokS = float64(perNode) / step
	p.Memory = memory(c, s)
	return p
}

// touchedPerNode is the experts one dispatch of rows rows touches on the
// mean expert node of nodes, and on the slowest. Placement balances the
// nodes' expected load, not one dispatch's draw: a node's count of
// touched experts is about binomial (N/E experts, each touched with
// chance q = 1 − (1 − k/N)^rows), and the largest of E such counts is
// about maxNormal(E) standard deviations above the mean.
func touchedPerNode(N, k, rows float64, nodes int) (mean, slowest float64) {
	per := N / float64(nodes)
	q := 1 - math.Pow(1-k/N, rows)
	mean, slowest = per*q, per*q
	if nodes > 1 {
		slowest = min(per, mean+math.Sqrt(per*q*(1-q))*maxNormal(nodes))
	}
	return mean, slowest
}

// maxNormal is the expected largest of n independent standard normal
// draws, by Blom's approximation Φ⁻¹((n − 0.375)/(n + 0.25)) (within
// 0.03 of the exact figure for n ≤ 64: 0.56 for 2, 1.03 for 4, 1.42
// for 8).
func maxNormal(n int) float64 {
	if n < 2 {
		return 0
	}
	p := (float64(n) - 0.375) / (float64(n) + 0.25)
	return math.Sqrt2 * math.Erfinv(2*p-1)
}

// attnParams is one layer's attention weights: q (with or without its
// LoRA), kv_a, kv_b, o, and the norms.
func attnParams(c *model.Config) float64 {
	h := float64(c.HiddenSize)
	H := float64(c.NumAttentionHeads)
	qhd := float64(c.QHeadDim())
	q := h * H * qhd
	if c.QLoraRank != nil {
		r := float64(*c.QLoraRank)
		q = h*r + r*H*qhd + r
	}
	kvA := h * float64(c.LatentDim())
	kvB := float64(c.KVLoraRank) * H * float64(c.QKNopeHeadDim+c.VHeadDim)
	o := H * float64(c.VHeadDim) * h
	return q + kvA + kvB + o + 2*h + float64(c.KVLoraRank)
}

// nodeShare is the chance that a row's routed experts touch a given
// expert node. With group-limited routing and whole groups per node a
// token reaches topk_group groups; otherwise its k experts are spread
// over all experts, placed evenly.
func nodeShare(c *model.Config, nodes int) float64 {
	E := float64(nodes)
	if g, tg := c.Groups(), c.TopKGroups(); g > 1 && tg < g && nodes <= g {
		G := float64(g)
		per := G / E
		miss := 1.0
		for i := range tg {
			miss *= max(G-per-float64(i), 0) / (G - float64(i))
		}
		return 1 - miss
	}
	N := float64(c.NumExperts())
	per := N / E
	miss := 1.0
	for i := range c.TopK() {
		miss *= max(N-per-float64(i), 0) / (N - float64(i))
	}
	return 1 - miss
}

func memory(c *model.Config, s Setup) Memory {
	h := float64(c.HiddenSize)
	mi := float64(c.MoEIntermediateSize)
	var params float64
	params += float64(c.VocabSize) * h // embedding
	if !c.TieWordEmbeddings {
		params += float64(c.VocabSize) * h
	}
	params += h // final norm
	moeLayers := 0.0
	for l := range c.NumHiddenLayers {
		params += attnParams(c) + 2*h
		if c.IsMoELayer(l) {
			moeLayers++
			params += float64(c.NumExperts())*h + float64(c.SharedExperts())*3*h*mi
		} else {
			params += 3 * h * float64(c.IntermediateSize)
		}
	}
	m := Memory{AttnWeights: params * s.WeightBytes}
	m.CachePerToken = float64(c.NumHiddenLayers) * float64(c.LatentDim()) * s.CacheBytes
	m.AttnCache = m.CachePerToken * float64(ceilDiv(s.Concurrency, s.AttnNodes)) * float64(s.Context)
	m.AttnTotal = m.AttnWeights + m.AttnCache
	expert := 3 * h * mi * s.ExpertWeightBytes
	m.ExpertsPerNode = float64(c.NumExperts()+s.Redundant) / float64(s.ExpertNodes)
	m.ExpertWeights = moeLayers * m.ExpertsPerNode * expert
	m.ExpertRedundant = moeLayers * float64(s.Redundant) / float64(s.ExpertNodes) * expert
	return m
}

func ceilDiv(a, b int) int { return (a + b - 1) / b }
