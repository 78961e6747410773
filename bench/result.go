package bench

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"os"
	"regexp"
	"sort"
	"strconv"
)

// Result is one run, as saved in the result JSON. Keys are vLLM's
// (`vllm bench serve --save-result --save-detailed`) where vLLM has the
// quantity, so tools that read vLLM's files read these; the rest are
// ours. Per-request arrays are in dispatch order and use seconds, as
// vLLM's do; summary statistics use milliseconds.
type Result struct {
	Date         string   `json:"date"` // vLLM's "%Y%m%d-%H%M%S", local time
	Backend      string   `json:"backend"`
	EndpointType string   `json:"endpoint_type"`
	Label        *string  `json:"label"`
	ModelID      string   `json:"model_id"`
	TokenizerID  *string  `json:"tokenizer_id"`
	NumPrompts   int      `json:"num_prompts"`
	RequestRate  Rate     `json:"request_rate"`
	Burstiness   float64  `json:"burstiness"`
	MaxConcur    *int     `json:"max_concurrency"`
	Duration     float64  `json:"duration"` // seconds, first send to last answer
	Completed    int      `json:"completed"`
	Failed       int      `json:"failed"`
	TotalInput   int      `json:"total_input_tokens"`
	TotalOutput  int      `json:"total_output_tokens"`
	ReqTput      float64  `json:"request_throughput"`
	ReqGoodput   *float64 `json:"request_goodput"` // null without --goodput
	OutTput      float64  `json:"output_throughput"`
	TotalTput    float64  `json:"total_token_throughput"`
	MaxOutPerS   float64  `json:"max_output_tokens_per_s"`
	MaxConcReqs  int      `json:"max_concurrent_requests"`

	InputLens  []int       `json:"input_lens"`
	OutputLens []int       `json:"output_lens"` // 0 for failed requests
	TTFTs      []float64   `json:"ttfts"`
	ITLs       [][]float64 `json:"itls"`
	Latencies  []float64   `json:"latencies"`
	StartTimes []float64   `json:"start_times"` // from the run's start
	Errors     []string    `json:"errors"`      // "" for requests that succeeded

	// Stats are the summary statistics by vLLM's key names: mean_ttft_ms,
	// median_ttft_ms, std_ttft_ms and one pNN_ttft_ms per percentile, for
	// each metric in --percentile-metrics. They sit at the top level of the
	// JSON.
	Stats map[string]float64 `json:"-"`

	// Ours.
	Endpoint        string `json:"endpoint"`
	BaseURL         string `json:"base_url"`
	DatasetName     string `json:"dataset_name"`
	RandomPrefixLen int    `json:"random_prefix_len,omitempty"`
	// TotalCached is how many input tokens of the completed requests the
	// server took from its prefix cache, by its
	// usage.prompt_tokens_details.cached_tokens (0 when it says nothing).
	TotalCached       int                `json:"total_cached_tokens"`
	IgnoreEOS         bool               `json:"ignore_eos"`
	Seed              int64              `json:"seed"`
	DurationLimit     float64            `json:"duration_limit_s,omitempty"` // --duration
	Warmup            int                `json:"warmup"`
	GoodputSLOs       map[string]float64 `json:"goodput_slos_ms,omitempty"`
	PercentileMetrics []string           `json:"percentile_metrics"`
	MetricPercentiles []float64          `json:"metric_percentiles"`
	// ErrorKinds is each request's error kind ("" when it succeeded);
	// ErrorsByKind counts them.
	ErrorKinds   []string        `json:"error_kinds"`
	ErrorsByKind map[string]int  `json:"errors_by_kind"`
	TimeSeries   TimeSeries      `json:"time_series"`
	CommandLine  []string        `json:"command_line"`
	ServerModels json.RawMessage `json:"server_models"` // GET /v1/models as answered, or null
	// ServerCluster is GET /v1/cluster as answered after the run, or null.
	ServerCluster json.RawMessage `json:"server_cluster"`
	// LayerBreakdown and ExpertLoad are null unless someone measured them
	// (GET /v1/cluster, or a trace); the report says "no data" then.
	LayerBreakdown *Breakdown  `json:"layer_breakdown"`
	ExpertLoad     *ExpertLoad `json:"expert_load"`
}

// TimeSeries is the run second by second: bucket k covers
// [k·BucketS, (k+1)·BucketS) from the run's start.
type TimeSeries struct {
	BucketS float64 `json:"bucket_s"`
	// OutputTokensPerS is output tokens received in the bucket (each
	// request's usage-reported tokens spread over its stream events).
	OutputTokensPerS []float64 `json:"output_tokens_per_s"`
	// Concurrency is the mean number of requests in flight (failed ones
	// included) over the bucket.
	Concurrency []float64 `json:"concurrency"`
	// Completed and Failed count requests that ended in the bucket.
	Completed []int `json:"completed"`
	Failed    []int `json:"failed"`
}

// Rate is a request rate that is written as vLLM writes it: a number, or
// the string "inf".
type Rate float64

func (r Rate) MarshalJSON() ([]byte, error) {
	if math.IsInf(float64(r), 1) {
		return []byte(`"inf"`), nil
	}
	return json.Marshal(float64(r))
}

func (r *Rate) UnmarshalJSON(b []byte) error {
	var s string
	if json.Unmarshal(b, &s) == nil {
		v, err := strconv.ParseFloat(s, 64)
		if err != nil {
			return fmt.Errorf("request_rate %q: %v", s, err)
		}
		*r = Rate(v)
		return nil
	}
	var v float64
	if err := json.Unmarshal(b, &v); err != nil {
		return err
	}
	*r = Rate(v)
	return nil
}

type resultAlias Result

// MarshalJSON writes the struct's fields, then Stats's keys in sorted
// order at the same level.
func (r Result) MarshalJSON() ([]byte, error) {
	b, err := json.Marshal((*resultAlias)(&r))
	if err != nil {
		return nil, err
	}
	if len(r.Stats) == 0 {
		return b, nil
	}
	keys := make([]string, 0, len(r.Stats))
	for k := range r.Stats {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var buf bytes.Buffer
	buf.Write(b[:len(b)-1])
	for _, k := range keys {
		v := r.Stats[k]
		if math.IsNaN(v) || math.IsInf(v, 0) {
			v = 0
		}
		kb, _ := json.Marshal(k)
		vb, _ := json.Marshal(v)
		buf.WriteByte(',')
		buf.Write(kb)
		buf.WriteByte(':')
		buf.Write(vb)
	}
	buf.WriteByte('}')
	return buf.Bytes(), nil
}

// statKey matches vLLM's summary keys: mean_ttft_ms, p99.9_e2el_ms, ...
var statKey = regexp.MustCompile(`^(mean|median|std|p[0-9]+(\.[0-9]+)?)_[a-z0-9_]+_ms$`)

// UnmarshalJSON reads the struct's fields and collects the summary keys
// into Stats. vLLM's own result files read too (fields they lack stay
// zero).
func (r *Result) UnmarshalJSON(b []byte) error {
	if err := json.Unmarshal(b, (*resultAlias)(r)); err != nil {
		return err
	}
	var all map[string]json.RawMessage
	if err := json.Unmarshal(b, &all); err != nil {
		return err
	}
	r.Stats = map[string]float64{}
	for k, v := range all {
		if !statKey.MatchString(k) {
			continue
		}
		var f float64
		if json.Unmarshal(v, &f) == nil {
			r.Stats[k] = f
		}
	}
	return nil
}

// ReadResult reads a result JSON file (ours or vLLM's).
func ReadResult(path string) (*Result, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return DecodeResult(f)
}

// DecodeResult reads a result JSON.
func DecodeResult(rd io.Reader) (*Result, error) {
	var r Result
	if err := json.NewDecoder(rd).Decode(&r); err != nil {
		return nil, fmt.Errorf("reading a result: %w", err)
	}
	return &r, nil
}

// TPOTs is each successful request's TPOT in seconds (requests with at
// most one output token have none), from the per-request arrays.
func (r *Result) TPOTs() []float64 {
	var out []float64
	for i := range r.OutputLens {
		if i >= len(r.Latencies) || i >= len(r.TTFTs) || !r.succeeded(i) {
			continue
		}
		if t, ok := TPOT(r.Latencies[i], r.TTFTs[i], r.OutputLens[i]); ok {
			out = append(out, t)
		}
	}
	return out
}

func (r *Result) succeeded(i int) bool {
	if i < len(r.Errors) && r.Errors[i] != "" {
		return false
	}
	return i >= len(r.ErrorKinds) || r.ErrorKinds[i] == ""
}

// Values returns a metric's per-request values in seconds: ttft, tpot, itl
// (all gaps of all requests) or e2el, over successful requests.
func (r *Result) Values(metric string) []float64 {
	var out []float64
	switch metric {
	case "ttft", "e2el":
		src := r.TTFTs
		if metric == "e2el" {
			src = r.Latencies
		}
		for i, v := range src {
			if r.succeeded(i) {
				out = append(out, v)
			}
		}
	case "tpot":
		out = r.TPOTs()
	case "itl":
		for i, l := range r.ITLs {
			if r.succeeded(i) {
				out = append(out, l...)
			}
		}
	}
	return out
}
