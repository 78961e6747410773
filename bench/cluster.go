package bench

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"net/http"
	"time"
)

// Breakdown is where the time of one decode step goes, layer by layer, as
// seen by an attention node. The result JSON carries it as
// "layer_breakdown" and the report draws it as a timeline (each layer's
// phases laid end to end); whoever has the numbers fills it (from OTLP
// traces, or a server's GET /v1/cluster).
type Breakdown struct {
	// Source says where the numbers come from, e.g. "/v1/cluster" or a
	// trace id; free text shown in the report.
	Source string `json:"source,omitempty"`
	// Layers in the order the step runs them.
	Layers []LayerTiming `json:"layers"`
	// TailMs is the time after the last layer: final norm and LM head
	// (0 when unknown).
	TailMs float64 `json:"tail_ms,omitempty"`
	// OutsideMs is the step's time outside its micro-batches: admitting
	// new sequences before, sampling and bookkeeping after (0 when
	// unknown).
	OutsideMs float64 `json:"outside_ms,omitempty"`
	// StepMs is the measured step, for comparison with the layers plus
	// the tail; MicroBatchMs the measured micro-batch the layers are of
	// (the last to end in its step); Steps counts the steps the means are
	// over, MicroBatches the micro-batches per step (0 when unknown).
	StepMs       float64 `json:"step_ms,omitempty"`
	MicroBatchMs float64 `json:"micro_batch_ms,omitempty"`
	Steps        int     `json:"steps,omitempty"`
	MicroBatches int     `json:"micro_batches,omitempty"`
}

// LayerTiming is one layer of one step, in milliseconds. Dense layers have
// zero dispatch, expert and wait times.
type LayerTiming struct {
	Layer int `json:"layer"`
	// AttentionMs is the attention node's own work: norms, MLA, router,
	// shared experts (with ping-pong micro-batches, also the wait for the
	// other micro-batch's compute).
	AttentionMs float64 `json:"attention_ms"`
	// DispatchWireMs is time on the wire to and from expert nodes: the
	// mean round trip minus the mean expert compute (serialisation,
	// network, queueing on the expert node).
	DispatchWireMs float64 `json:"dispatch_wire_ms"`
	// ExpertComputeMs is the mean expert node's compute for the layer.
	ExpertComputeMs float64 `json:"expert_compute_ms"`
	// SlowestWaitMs is how much longer the layer's dispatch took than the
	// mean node's round trip: the cost of waiting for the slowest node.
	SlowestWaitMs float64 `json:"slowest_wait_ms"`
}

// Total is the layer's time end to end.
func (l LayerTiming) Total() float64 {
	return l.AttentionMs + l.DispatchWireMs + l.ExpertComputeMs + l.SlowestWaitMs
}

// Validate reports values the report cannot draw.
func (b *Breakdown) Validate() error {
	if len(b.Layers) == 0 {
		return fmt.Errorf("layer_breakdown has no layers")
	}
	for _, v := range []float64{b.TailMs, b.OutsideMs, b.StepMs, b.MicroBatchMs} {
		if math.IsNaN(v) || math.IsInf(v, 0) || v < 0 {
			return fmt.Errorf("layer_breakdown: tail_ms, outside_ms, step_ms and micro_batch_ms must be finite and non-negative")
		}
	}
	for i, l := range b.Layers {
		for _, v := range []float64{l.AttentionMs, l.DispatchWireMs, l.ExpertComputeMs, l.SlowestWaitMs} {
			if math.IsNaN(v) || math.IsInf(v, 0) || v < 0 {
				return fmt.Errorf("layer_breakdown.layers[%d]: times must be finite and non-negative", i)
			}
		}
	}
	return nil
}

// ExpertLoad is how many tokens each expert node processed per MoE layer:
// Tokens[i][j] is layer Layers[i] on node Nodes[j]. The result JSON carries
// it as "expert_load"; the report draws it as a heatmap. A server's GET
// /v1/cluster answers a field "expert_load" of this shape.
type ExpertLoad struct {
	Layers []int       `json:"layers"`
	Nodes  []string    `json:"nodes"`
	Tokens [][]float64 `json:"tokens"`
}

// Validate reports a shape the report cannot draw.
func (e *ExpertLoad) Validate() error {
	if len(e.Layers) == 0 || len(e.Nodes) == 0 {
		return fmt.Errorf("expert_load needs layers and nodes")
	}
	if len(e.Tokens) != len(e.Layers) {
		return fmt.Errorf("expert_load.tokens has %d rows for %d layers", len(e.Tokens), len(e.Layers))
	}
	for i, row := range e.Tokens {
		if len(row) != len(e.Nodes) {
			return fmt.Errorf("expert_load.tokens[%d] has %d values for %d nodes", i, len(row), len(e.Nodes))
		}
		for _, v := range row {
			if math.IsNaN(v) || math.IsInf(v, 0) || v < 0 {
				return fmt.Errorf("expert_load.tokens[%d]: values must be finite and non-negative", i)
			}
		}
	}
	return nil
}

// sub returns e − before when both have the same layers and nodes (the
// load of the run alone, from cumulative counters), else e.
func (e *ExpertLoad) sub(before *ExpertLoad) *ExpertLoad {
	if before == nil || e.Validate() != nil || before.Validate() != nil ||
		fmt.Sprint(e.Layers, e.Nodes) != fmt.Sprint(before.Layers, before.Nodes) {
		return e
	}
	out := &ExpertLoad{Layers: e.Layers, Nodes: e.Nodes, Tokens: make([][]float64, len(e.Tokens))}
	for i := range e.Tokens {
		out.Tokens[i] = make([]float64, len(e.Tokens[i]))
		for j := range e.Tokens[i] {
			out.Tokens[i][j] = max(0, e.Tokens[i][j]-before.Tokens[i][j])
		}
	}
	return out
}

// ClusterStats is what the benchmark keeps of GET /v1/cluster.
type ClusterStats struct {
	ExpertLoad     *ExpertLoad
	LayerBreakdown *Breakdown
	// Raw is the whole answer.
	Raw json.RawMessage
}

// FetchCluster reads GET root/v1/cluster. A server without the endpoint
// (404, 405, 501) answers nil, nil. A field of another shape than
// ExpertLoad's or Breakdown's is left out rather than failing the rest.
func FetchCluster(ctx context.Context, client *http.Client, root, apiKey string) (*ClusterStats, error) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, root+"/v1/cluster", nil)
	if err != nil {
		return nil, err
	}
	setAuth(req, apiKey)
	resp, err := client.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	switch resp.StatusCode {
	case http.StatusOK:
	case http.StatusNotFound, http.StatusMethodNotAllowed, http.StatusNotImplemented:
		io.Copy(io.Discard, io.LimitReader(resp.Body, 1<<16))
		return nil, nil
	default:
		return nil, fmt.Errorf("GET /v1/cluster: %s", resp.Status)
	}
	b, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return nil, fmt.Errorf("GET /v1/cluster: %w", err)
	}
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(b, &fields); err != nil {
		return nil, fmt.Errorf("GET /v1/cluster: not a JSON object: %w", err)
	}
	cs := &ClusterStats{Raw: b}
	// expertmesh's coordinator nests its control plane's view (expert_load
	// among it) under control_plane; a server may also answer it at the top.
	if _, ok := fields["expert_load"]; !ok {
		var cp map[string]json.RawMessage
		if raw, ok := fields["control_plane"]; ok && json.Unmarshal(raw, &cp) == nil {
			if raw, ok := cp["expert_load"]; ok {
				fields["expert_load"] = raw
			}
		}
	}
	var el ExpertLoad
	if raw, ok := fields["expert_load"]; ok && json.Unmarshal(raw, &el) == nil && el.Validate() == nil {
		cs.ExpertLoad = &el
	}
	var bd Breakdown
	if raw, ok := fields["layer_breakdown"]; ok && json.Unmarshal(raw, &bd) == nil && bd.Validate() == nil {
		cs.LayerBreakdown = &bd
	}
	return cs, nil
}

func setAuth(req *http.Request, apiKey string) {
	if apiKey != "" {
		req.Header.Set("Authorization", "Bearer "+apiKey)
	}
}
