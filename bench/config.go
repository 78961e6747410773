package bench

import (
	"fmt"
	"io"
	"math"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/expertmesh/expertmesh/internal/telemetry"
)

// Config is one benchmark run. Field comments name the flag of `expertmesh
// bench` that sets them; names and meanings follow vLLM's `vllm bench serve`
// where it has the same option.
type Config struct {
	// BaseURL is the server root (--base-url), e.g. http://127.0.0.1:8000;
	// when empty, http://Host:Port (--host, --port).
	BaseURL string
	Host    string
	Port    int
	// Endpoint is the API path (--endpoint): /v1/completions or
	// /v1/chat/completions.
	Endpoint string
	// Model is the model name sent with every request (--model); empty
	// means the first model the server's /v1/models lists.
	Model string
	// APIKey, when set, is sent as "Authorization: Bearer APIKey"
	// (--api-key).
	APIKey string
	// Label names the run in the result file name (--label; vLLM's default
	// is the backend, "openai" or "openai-chat").
	Label string

	// NumPrompts is how many requests the run sends (--num-prompts). With
	// Duration set it is the size of the prompt pool the run cycles
	// through instead.
	NumPrompts int
	// Duration, when positive, runs for this long instead of a count
	// (--duration): requests are started until it has passed, then the run
	// waits for those in flight.
	Duration time.Duration
	// MaxConcurrency caps requests in flight (--max-concurrency); 0 means
	// no cap.
	MaxConcurrency int
	// RequestRate is the mean arrival rate in requests per second
	// (--request-rate); +Inf sends every request at time 0 (then only
	// MaxConcurrency limits them).
	RequestRate float64
	// Burstiness is the shape of the gamma distribution of the gaps between
	// arrivals (--burstiness): 1 is a Poisson process, below 1 burstier,
	// above 1 more regular. The mean gap stays 1/RequestRate.
	Burstiness float64
	// Warmup requests are sent (at MaxConcurrency) before the measured run
	// and not counted (--warmup).
	Warmup int
	// RequestTimeout bounds each request end to end (--request-timeout); a
	// request past it counts as failed with kind "timeout". 0: no limit.
	RequestTimeout time.Duration

	// DatasetName is "random" or "file" (--dataset-name); DatasetPath is the
	// file for "file" (--dataset-path): see ParseDataset for its formats.
	DatasetName string
	DatasetPath string
	// RandomInputLen, RandomOutputLen and RandomRangeRatio shape the random
	// dataset (--random-input-len, --random-output-len,
	// --random-range-ratio): each request's lengths are drawn uniformly from
	// [len·(1−r), len·(1+r)].
	RandomInputLen   int
	RandomOutputLen  int
	RandomRangeRatio float64
	// RandomPrefixLen, when positive, puts one fixed random prefix of this
	// many tokens before every random prompt (--random-prefix-len, as in
	// vLLM): for the completions API its token ids lead each prompt, for
	// chat it is every request's system message. The prefix is drawn once
	// from its own stream, so the prompts after it are those of a run
	// without it; it is not subject to --random-range-ratio.
	RandomPrefixLen int
	// OutputLen, when positive, replaces every request's output length
	// (--output-len), for any dataset.
	OutputLen int
	// Seed seeds prompts, lengths and arrival times (--seed).
	Seed int64
	// Tokenizer, when set (--tokenizer-dir), counts the tokens of text
	// prompts and of ShareGPT replies, keeps random token ids off its
	// special tokens, and counts output tokens from text for servers that
	// report no usage.
	Tokenizer Tokenizer
	// TokenizerID names the tokenizer in the result (vLLM's tokenizer_id).
	TokenizerID string

	// IgnoreEOS sends ignore_eos (--ignore-eos). As in vLLM, the random
	// dataset always sets it so outputs run to their requested length.
	IgnoreEOS bool
	// Temperature, TopP and TopK are sent when set (--temperature,
	// --top-p, --top-k); otherwise the server's defaults apply.
	Temperature *float64
	TopP        *float64
	TopK        *int

	// Goodput holds service level objectives in milliseconds by metric
	// name, "ttft", "tpot" or "e2el" (--goodput ttft:MS tpot:MS e2el:MS); a
	// request is good when it meets all of them.
	Goodput map[string]float64
	// PercentileMetrics are the metrics whose statistics are reported
	// (--percentile-metrics), from ttft, tpot, itl, e2el.
	PercentileMetrics []string
	// MetricPercentiles are the percentiles reported for each
	// (--metric-percentiles).
	MetricPercentiles []float64

	// ClusterStats fetches GET /v1/cluster before and after the run and
	// keeps its expert_load (the difference, when both have the same shape)
	// and layer_breakdown in the result (--cluster-stats). Servers without
	// the endpoint are skipped silently.
	ClusterStats bool

	// OTLPListen, when set, runs an OTLP receiver on this address for the
	// run (--otlp-listen; OTLP/HTTP on /v1/traces and OTLP/gRPC on one
	// port). A cluster exporting its traces to it (OTEL_EXPORTER_OTLP_ENDPOINT
	// or --otlp-endpoint http://ADDR) yields the per-layer breakdown and
	// the expert load of the measured requests (BreakdownFromSpans).
	OTLPListen string
	// Traces, when set, is a receiver the caller runs (sweeps keep one
	// across runs); it is used like OTLPListen's.
	Traces *telemetry.Receiver
	// TraceSettle is how long no span may arrive after the run before its
	// spans count as complete (default 3 s: above the exporters' 1 s
	// batch delay).
	TraceSettle time.Duration

	// Progress, when set, receives a live progress line ("\r"-rewritten).
	Progress io.Writer
	// Log receives what the run says while it runs (vLLM prints these
	// lines too: traffic settings, warmup). Nil discards them.
	Log io.Writer
	// CommandLine is recorded in the result as it was typed.
	CommandLine []string
}

// Tokenizer is what the benchmark needs of a tokenizer; *tokenizer.Tokenizer
// from this module satisfies it.
type Tokenizer interface {
	Encode(text string, addSpecialTokens bool) []int
	Decode(ids []int, skipSpecialTokens bool) string
	VocabSize() int
	IsSpecial(id int) bool
	// IDToken reports whether id is a token at all (vocabularies have
	// padding ids that are none).
	IDToken(id int) (string, bool)
}

// Metric names accepted by --percentile-metrics and --goodput.
var (
	percentileMetricNames = []string{"ttft", "tpot", "itl", "e2el"}
	goodputMetricNames    = []string{"ttft", "tpot", "e2el"}
)

// DefaultConfig returns vLLM's defaults, except that end-to-end latency is
// reported with the other metrics.
func DefaultConfig() Config {
	return Config{
		Host:              "127.0.0.1",
		Port:              8000,
		Endpoint:          "/v1/completions",
		NumPrompts:        1000,
		RequestRate:       math.Inf(1),
		Burstiness:        1,
		RequestTimeout:    10 * time.Minute,
		DatasetName:       "random",
		RandomInputLen:    1024,
		RandomOutputLen:   128,
		PercentileMetrics: slices.Clone(percentileMetricNames),
		MetricPercentiles: []float64{99},
		ClusterStats:      true,
	}
}

// Chat reports whether the endpoint is the chat API.
func (c *Config) Chat() bool { return strings.HasSuffix(c.Endpoint, "/chat/completions") }

// Backend is vLLM's name for the request function the endpoint uses.
func (c *Config) Backend() string {
	if c.Chat() {
		return "openai-chat"
	}
	return "openai"
}

// Root is the server's root URL, without a trailing slash. A --base-url
// ending in /v1 loses it when the endpoint starts with /v1/, so both
// spellings users copy from client libraries work.
func (c *Config) Root() string {
	if c.BaseURL == "" {
		return "http://" + joinHostPort(c.Host, c.Port)
	}
	u := strings.TrimRight(c.BaseURL, "/")
	if strings.HasSuffix(u, "/v1") && strings.HasPrefix(c.Endpoint, "/v1/") {
		u = strings.TrimSuffix(u, "/v1")
	}
	return u
}

func joinHostPort(h string, p int) string {
	if strings.Contains(h, ":") && !strings.HasPrefix(h, "[") {
		h = "[" + h + "]"
	}
	return h + ":" + strconv.Itoa(p)
}

// Validate checks the config; its errors name the flag to fix.
func (c *Config) Validate() error {
	if c.BaseURL != "" {
		u, err := url.Parse(c.BaseURL)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			return fmt.Errorf("--base-url %q: want http://HOST:PORT or https://HOST:PORT", c.BaseURL)
		}
	} else if c.Port <= 0 || c.Port > 65535 {
		return fmt.Errorf("--port %d: want 1-65535", c.Port)
	}
	if c.Endpoint != "/v1/completions" && c.Endpoint != "/v1/chat/completions" {
		return fmt.Errorf("--endpoint %q: want /v1/completions or /v1/chat/completions", c.Endpoint)
	}
	if c.NumPrompts <= 0 {
		return fmt.Errorf("--num-prompts %d: want at least 1", c.NumPrompts)
	}
	if c.Duration < 0 {
		return fmt.Errorf("--duration %v: must not be negative", c.Duration)
	}
	if c.MaxConcurrency < 0 {
		return fmt.Errorf("--max-concurrency %d: must not be negative (0: no cap)", c.MaxConcurrency)
	}
	if math.IsNaN(c.RequestRate) || c.RequestRate <= 0 {
		return fmt.Errorf("--request-rate %v: want a positive rate or inf", c.RequestRate)
	}
	if math.IsNaN(c.Burstiness) || c.Burstiness <= 0 || math.IsInf(c.Burstiness, 0) {
		return fmt.Errorf("--burstiness %v: want a positive number", c.Burstiness)
	}
	if c.Duration > 0 && math.IsInf(c.RequestRate, 1) && c.MaxConcurrency == 0 {
		return fmt.Errorf("--duration with --request-rate inf needs --max-concurrency: otherwise requests would start without end")
	}
	if c.Warmup < 0 {
		return fmt.Errorf("--warmup %d: must not be negative", c.Warmup)
	}
	if c.RequestTimeout < 0 {
		return fmt.Errorf("--request-timeout %v: must not be negative", c.RequestTimeout)
	}
	switch c.DatasetName {
	case "random":
		if c.DatasetPath != "" {
			return fmt.Errorf("--dataset-path is for --dataset-name file, not random")
		}
		if c.RandomInputLen <= 0 {
			return fmt.Errorf("--random-input-len %d: want at least 1", c.RandomInputLen)
		}
		if c.RandomOutputLen <= 0 && c.OutputLen <= 0 {
			return fmt.Errorf("--random-output-len %d: want at least 1", c.RandomOutputLen)
		}
		if c.RandomPrefixLen < 0 {
			return fmt.Errorf("--random-prefix-len %d: must not be negative", c.RandomPrefixLen)
		}
	case "file", "sharegpt", "custom":
		if c.DatasetPath == "" {
			return fmt.Errorf("--dataset-name %s needs --dataset-path", c.DatasetName)
		}
		if c.RandomPrefixLen != 0 {
			return fmt.Errorf("--random-prefix-len is for --dataset-name random, not %s", c.DatasetName)
		}
	default:
		return fmt.Errorf("--dataset-name %q: want random or file", c.DatasetName)
	}
	if math.IsNaN(c.RandomRangeRatio) || c.RandomRangeRatio < 0 || c.RandomRangeRatio >= 1 {
		return fmt.Errorf("--random-range-ratio %v: want a number in [0, 1)", c.RandomRangeRatio)
	}
	if c.OutputLen < 0 {
		return fmt.Errorf("--output-len %d: must not be negative", c.OutputLen)
	}
	for name, v := range c.Goodput {
		if !slices.Contains(goodputMetricNames, name) {
			return fmt.Errorf("--goodput %s:%v: the objective must be one of %s", name, v, strings.Join(goodputMetricNames, ", "))
		}
		if math.IsNaN(v) || v < 0 {
			return fmt.Errorf("--goodput %s:%v: want a non-negative number of milliseconds", name, v)
		}
	}
	for _, m := range c.PercentileMetrics {
		if !slices.Contains(percentileMetricNames, m) {
			return fmt.Errorf("--percentile-metrics %q: want names from %s", m, strings.Join(percentileMetricNames, ","))
		}
	}
	for _, p := range c.MetricPercentiles {
		if math.IsNaN(p) || p <= 0 || p > 100 {
			return fmt.Errorf("--metric-percentiles %v: want numbers in (0, 100]", p)
		}
	}
	if c.Temperature != nil && (math.IsNaN(*c.Temperature) || *c.Temperature < 0) {
		return fmt.Errorf("--temperature %v: must not be negative", *c.Temperature)
	}
	return nil
}

// ParseGoodput reads vLLM's KEY:VALUE objectives ("ttft:200", "tpot:50");
// an argument may also hold several separated by commas or spaces.
func ParseGoodput(args []string) (map[string]float64, error) {
	out := map[string]float64{}
	for _, a := range args {
		for _, f := range strings.FieldsFunc(a, func(r rune) bool { return r == ',' || r == ' ' }) {
			k, v, ok := strings.Cut(f, ":")
			if !ok {
				return nil, fmt.Errorf("--goodput %q: want KEY:VALUE pairs such as ttft:200 (milliseconds)", f)
			}
			ms, err := strconv.ParseFloat(strings.TrimSpace(v), 64)
			if err != nil {
				return nil, fmt.Errorf("--goodput %q: %q is not a number of milliseconds", f, v)
			}
			out[strings.ToLower(strings.TrimSpace(k))] = ms
		}
	}
	return out, nil
}

// ParseList splits a comma-separated flag value, dropping empty items.
func ParseList(s string) []string {
	var out []string
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}

// ParsePercentiles reads --metric-percentiles ("50,90,99").
func ParsePercentiles(s string) ([]float64, error) {
	var out []float64
	for _, f := range ParseList(s) {
		p, err := strconv.ParseFloat(f, 64)
		if err != nil {
			return nil, fmt.Errorf("--metric-percentiles %q: %q is not a number", s, f)
		}
		out = append(out, p)
	}
	return out, nil
}

// percentileWord is vLLM's spelling of a percentile in result keys: 99 as
// "99", 99.9 as "99.9".
func percentileWord(p float64) string {
	return strconv.FormatFloat(p, 'f', -1, 64)
}

// pyFloat formats a float as Python's str() does for the values a rate
// takes: 2 as "2.0", inf as "inf". vLLM's result file names use it.
func pyFloat(v float64) string {
	switch {
	case math.IsInf(v, 1):
		return "inf"
	case v == math.Trunc(v) && math.Abs(v) < 1e16:
		return strconv.FormatFloat(v, 'f', 1, 64)
	}
	return strconv.FormatFloat(v, 'g', -1, 64)
}
