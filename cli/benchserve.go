package cli

import (
	"context"
	"flag"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/expertmesh/expertmesh/bench"
	"github.com/expertmesh/expertmesh/tokenizer"
)

// runBenchServe is `expertmesh bench`: load an OpenAI-compatible server
// with vLLM's `bench serve` options and report what it measured; `bench
// compare A.json B.json` and `bench report R.json` work on saved results.
func runBenchServe(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) > 0 {
		switch args[0] {
		case "compare":
			return runBenchCompare(args[1:], stdout, stderr)
		case "report":
			return runBenchReport(args[1:], stderr)
		case "sweep":
			return runBenchSweep(ctx, args[1:], stdout, stderr)
		}
	}
	fs := newFlags("bench", stderr)
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), `usage: expertmesh bench [flags]              load a server, print vLLM's summary, save JSON + HTML
       expertmesh bench compare A.json B.json [--result-dir D]
       expertmesh bench report R.json [--result-dir D]
       expertmesh bench sweep [--expert-nodes 1,2,3,4] [--micro-batches 1,2] [--links loopback,50us,500us] ...

flags:
`)
		fs.PrintDefaults()
	}
	cfg := bench.DefaultConfig()
	fs.StringVar(&cfg.BaseURL, "base-url", "", "server root URL, e.g. http://127.0.0.1:8080 (default: http://HOST:PORT)")
	fs.StringVar(&cfg.Host, "host", cfg.Host, "server host when --base-url is not given")
	fs.IntVar(&cfg.Port, "port", cfg.Port, "server port when --base-url is not given")
	fs.StringVar(&cfg.Endpoint, "endpoint", cfg.Endpoint, "API path: /v1/completions or /v1/chat/completions")
	fs.StringVar(&cfg.Model, "model", "", "model name to send (default: the first model GET /v1/models lists)")
	fs.StringVar(&cfg.APIKey, "api-key", "", "sent as Authorization: Bearer KEY (default: $OPENAI_API_KEY)")
	fs.StringVar(&cfg.Label, "label", "", "prefix of the result file name (default: the backend, openai or openai-chat)")
	fs.IntVar(&cfg.NumPrompts, "num-prompts", cfg.NumPrompts, "requests to send (with --duration: the size of the prompt pool cycled through)")
	fs.DurationVar(&cfg.Duration, "duration", 0, "run for this long (e.g. 60s) instead of --num-prompts requests, then wait for those in flight")
	fs.IntVar(&cfg.MaxConcurrency, "max-concurrency", 0, "most requests in flight at once (0: no cap)")
	fs.Float64Var(&cfg.RequestRate, "request-rate", cfg.RequestRate, "mean requests per second; inf sends them all at once")
	fs.Float64Var(&cfg.Burstiness, "burstiness", cfg.Burstiness, "shape of the gamma-distributed gaps between arrivals: 1 is Poisson, <1 burstier, >1 more regular")
	fs.IntVar(&cfg.Warmup, "warmup", 0, "requests sent first and not counted")
	fs.IntVar(&cfg.Warmup, "num-warmups", 0, "same as --warmup (vLLM's name)")
	fs.DurationVar(&cfg.RequestTimeout, "request-timeout", cfg.RequestTimeout, "limit per request; past it the request fails as \"timeout\" (0: none)")
	fs.StringVar(&cfg.DatasetName, "dataset-name", cfg.DatasetName, "random, or file (JSONL of {\"prompt\", \"output_len\"} or ShareGPT JSON; sharegpt and custom are accepted as names for it)")
	fs.StringVar(&cfg.DatasetPath, "dataset-path", "", "the file for --dataset-name file")
	fs.IntVar(&cfg.RandomInputLen, "random-input-len", cfg.RandomInputLen, "random dataset: prompt tokens")
	fs.IntVar(&cfg.RandomInputLen, "input-len", cfg.RandomInputLen, "same as --random-input-len")
	fs.IntVar(&cfg.RandomOutputLen, "random-output-len", cfg.RandomOutputLen, "random dataset: output tokens (max_tokens)")
	fs.Float64Var(&cfg.RandomRangeRatio, "random-range-ratio", 0, "random dataset: lengths drawn uniformly from [len*(1-r), len*(1+r)], r in [0, 1)")
	fs.IntVar(&cfg.RandomPrefixLen, "random-prefix-len", 0, "random dataset: a fixed random prefix of this many tokens before every prompt (chat: the system message), shared by all requests")
	fs.IntVar(&cfg.OutputLen, "output-len", 0, "output tokens of every request, whatever the dataset says (0: the dataset's)")
	fs.Int64Var(&cfg.Seed, "seed", 0, "seed of prompts, lengths and arrival times")
	tokDir := fs.String("tokenizer-dir", "", "model directory whose tokenizer counts text tokens (optional)")
	fs.StringVar(tokDir, "tokenizer", "", "same as --tokenizer-dir")
	fs.BoolVar(&cfg.IgnoreEOS, "ignore-eos", false, "send ignore_eos (always on for the random dataset, as in vLLM)")
	fs.Var(optFloat{&cfg.Temperature}, "temperature", "sampling temperature (default: the server's)")
	fs.Var(optFloat{&cfg.TopP}, "top-p", "top-p (default: the server's)")
	fs.Var(optInt{&cfg.TopK}, "top-k", "top-k (default: the server's)")
	var goodput goodputFlag
	fs.Var(&goodput, "goodput", "service level objectives in ms, e.g. --goodput ttft:200 tpot:50 e2el:5000")
	pm := fs.String("percentile-metrics", strings.Join(cfg.PercentileMetrics, ","), "metrics to report statistics of: ttft,tpot,itl,e2el")
	mp := fs.String("metric-percentiles", "99", "percentiles to report, e.g. 50,90,99,99.9")
	save := fs.Bool("save-result", false, "save the result JSON and HTML report (implied by --result-dir and --result-filename)")
	dir := fs.String("result-dir", "", "directory for the result JSON and HTML report")
	name := fs.String("result-filename", "", "result JSON file name (default: vLLM's LABEL-RATEqps[-concurrencyN]-MODEL-DATE.json)")
	fs.BoolVar(&cfg.ClusterStats, "cluster-stats", true, "read expert_load and layer_breakdown from GET /v1/cluster before and after the run, when the server has it")
	fs.StringVar(&cfg.OTLPListen, "otlp-listen", "", "run an OTLP receiver (HTTP /v1/traces and gRPC, one port) on HOST:PORT; a cluster exporting its traces there (--otlp-endpoint http://HOST:PORT) gives the report a per-layer breakdown and the expert load")
	fs.DurationVar(&cfg.TraceSettle, "otlp-settle", 3*time.Second, "with --otlp-listen: after the run, wait until no span arrived for this long")
	noBar := fs.Bool("disable-tqdm", false, "no progress bar (there is none anyway when stderr is not a terminal)")
	if err := parse(fs, joinGoodputArgs(args)); err != nil {
		return err
	}
	if cfg.APIKey == "" {
		// Read here rather than as the flag's default, which --help prints.
		cfg.APIKey = os.Getenv("OPENAI_API_KEY")
	}
	var err error
	if cfg.Goodput, err = bench.ParseGoodput(goodput); err != nil {
		return err
	}
	cfg.PercentileMetrics = bench.ParseList(*pm)
	if cfg.MetricPercentiles, err = bench.ParsePercentiles(*mp); err != nil {
		return err
	}
	if *tokDir != "" {
		tok, err := tokenizer.Load(*tokDir)
		if err != nil {
			return fmt.Errorf("--tokenizer-dir: %w", err)
		}
		cfg.Tokenizer, cfg.TokenizerID = tok, *tokDir
	}
	if err := cfg.Validate(); err != nil {
		return err
	}
	cfg.Log = stderr
	if !*noBar && isTerminal(stderr) {
		cfg.Progress = stderr
	}
	cfg.CommandLine = commandLine(args)

	res, err := bench.Run(ctx, cfg)
	if err != nil {
		return err
	}
	bench.WriteSummary(stdout, res)
	if *save || *dir != "" || *name != "" {
		jp, hp, err := bench.Save(res, *dir, *name)
		if err != nil {
			return fmt.Errorf("saving the result: %w", err)
		}
		fmt.Fprintf(stderr, "saved %s and %s\n", jp, hp)
	}
	return nil
}

// runBenchCompare is `expertmesh bench compare A.json B.json`.
func runBenchCompare(args []string, stdout, stderr io.Writer) error {
	fs := newFlags("bench compare", stderr)
	dir := fs.String("result-dir", ".", "directory for the HTML comparison")
	pos, err := parseInterleaved(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 2 {
		fmt.Fprintln(stderr, "usage: expertmesh bench compare A.json B.json [--result-dir D]")
		return errUsage
	}
	a, err := bench.ReadResult(pos[0])
	if err != nil {
		return fmt.Errorf("%s: %w", pos[0], err)
	}
	b, err := bench.ReadResult(pos[1])
	if err != nil {
		return fmt.Errorf("%s: %w", pos[1], err)
	}
	bench.WriteCompare(stdout, bench.Compare(a, b), pos[0], pos[1])
	if err := os.MkdirAll(*dir, 0o755); err != nil {
		return err
	}
	path := filepath.Join(*dir, bench.CompareName(pos[0], pos[1]))
	if err := writeFileWith(path, func(w io.Writer) error {
		return bench.WriteCompareReport(w, a, b, filepath.Base(pos[0]), filepath.Base(pos[1]))
	}); err != nil {
		return err
	}
	fmt.Fprintf(stderr, "saved %s\n", path)
	return nil
}

// runBenchReport is `expertmesh bench report R.json`: the HTML report of a
// saved result again, e.g. after layer_breakdown or expert_load were added
// to it.
func runBenchReport(args []string, stderr io.Writer) error {
	fs := newFlags("bench report", stderr)
	dir := fs.String("result-dir", "", "directory for the HTML report (default: beside the JSON)")
	pos, err := parseInterleaved(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		fmt.Fprintln(stderr, "usage: expertmesh bench report R.json [--result-dir D]")
		return errUsage
	}
	r, err := bench.ReadResult(pos[0])
	if err != nil {
		return fmt.Errorf("%s: %w", pos[0], err)
	}
	d := *dir
	if d == "" {
		d = filepath.Dir(pos[0])
	} else if err := os.MkdirAll(d, 0o755); err != nil {
		return err
	}
	path := filepath.Join(d, strings.TrimSuffix(filepath.Base(pos[0]), ".json")+".html")
	if err := writeFileWith(path, func(w io.Writer) error { return bench.WriteReport(w, r) }); err != nil {
		return err
	}
	fmt.Fprintf(stderr, "saved %s\n", path)
	return nil
}

func writeFileWith(path string, write func(io.Writer) error) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if err := write(f); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// parseInterleaved parses flags that may come after positional arguments
// (the flag package stops at the first one) and returns the positionals.
func parseInterleaved(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			if err == flag.ErrHelp {
				return nil, err
			}
			return nil, errUsage
		}
		args = fs.Args()
		if len(args) == 0 {
			return pos, nil
		}
		pos = append(pos, args[0])
		args = args[1:]
	}
}

// joinGoodputArgs lets --goodput take several values as vLLM's does
// (--goodput ttft:200 tpot:50): the words after it that are not flags
// become one comma-separated value.
func joinGoodputArgs(args []string) []string {
	var out []string
	for i := 0; i < len(args); i++ {
		a := args[i]
		out = append(out, a)
		if a != "--goodput" && a != "-goodput" {
			continue
		}
		var vals []string
		for i+1 < len(args) && !strings.HasPrefix(args[i+1], "-") {
			i++
			vals = append(vals, args[i])
		}
		if len(vals) > 0 {
			out = append(out, strings.Join(vals, ","))
		}
	}
	return out
}

// commandLine is the command as typed, with the API key's value hidden.
func commandLine(args []string) []string {
	out := []string{"expertmesh", "bench"}
	hideNext := false
	for _, a := range args {
		switch {
		case hideNext:
			a, hideNext = "REDACTED", false
		case a == "--api-key" || a == "-api-key":
			hideNext = true
		case strings.HasPrefix(a, "--api-key=") || strings.HasPrefix(a, "-api-key="):
			a = a[:strings.IndexByte(a, '=')+1] + "REDACTED"
		}
		out = append(out, a)
	}
	return out
}

// isTerminal reports whether w is a terminal (a character device), where a
// live progress line helps; in files and pipes it would be noise.
func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	st, err := f.Stat()
	return err == nil && st.Mode()&os.ModeCharDevice != 0
}

// goodputFlag collects --goodput values; repeated flags add up.
type goodputFlag []string

func (g *goodputFlag) String() string     { return strings.Join(*g, ",") }
func (g *goodputFlag) Set(s string) error { *g = append(*g, s); return nil }

// optFloat and optInt are flags that stay nil unless given.
type optFloat struct{ p **float64 }

func (o optFloat) String() string {
	if o.p == nil || *o.p == nil {
		return ""
	}
	return strconv.FormatFloat(**o.p, 'g', -1, 64)
}

func (o optFloat) Set(s string) error {
	v, err := strconv.ParseFloat(s, 64)
	if err != nil || math.IsNaN(v) {
		return fmt.Errorf("%q is not a number", s)
	}
	*o.p = &v
	return nil
}

type optInt struct{ p **int }

func (o optInt) String() string {
	if o.p == nil || *o.p == nil {
		return ""
	}
	return strconv.Itoa(**o.p)
}

func (o optInt) Set(s string) error {
	v, err := strconv.Atoi(s)
	if err != nil {
		return fmt.Errorf("%q is not an integer", s)
	}
	*o.p = &v
	return nil
}
