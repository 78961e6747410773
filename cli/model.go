package cli

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"runtime/pprof"
	"strconv"
	"strings"

	"github.com/expertmesh/expertmesh/kernels"
	"github.com/expertmesh/expertmesh/model"
)

func runGenModel(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("gen-model", stderr)
	preset := fs.String("preset", "tiny-v2", "model shape: "+strings.Join(model.PresetNames(), ", "))
	out := fs.String("out", "", "directory to write the checkpoint into (required)")
	seed := fs.Uint64("seed", 1, "random seed of the weights")
	tok := fs.String("tokenizer", "", "model directory whose tokenizer to use (vocab grows to cover it); default: a small byte-level tokenizer")
	zipf := fs.Float64("zipf", 0, "skew expert popularity: in every MoE layer the expert of rank r is chosen by a fraction of tokens ∝ r^-S (capped at 0.4), other experts hot in each layer; only the router gates change (0: off)")
	if err := parse(fs, args); err != nil {
		return err
	}
	if *out == "" {
		fmt.Fprintln(stderr, "gen-model: --out is required")
		return errUsage
	}
	p, ok := model.IsPreset(*preset)
	if !ok {
		return fmt.Errorf("--preset %q: unknown (have %s)", *preset, strings.Join(model.PresetNames(), ", "))
	}
	if err := model.GenerateCheckpoint(*out, p, model.GenOptions{Seed: *seed, TokenizerDir: *tok, Zipf: *zipf}); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "wrote %s (%s) to %s\n", p.Name, p.Description, *out)
	return nil
}

const weightsUsage = "where compute reads weights: resident (copied into huge-page-backed memory: faster decode, costs their size in RAM), mmap (through the page cache), or auto (resident when they take at most half the available memory)"

// engineFlags are the flags every in-process engine command shares.
type engineFlags struct {
	model    *string
	threads  *int
	quantize *string
	weights  *string
	stderr   io.Writer // where load reports what it holds (nil: nowhere)
}

func addEngineFlags(fs interface {
	String(string, string, string) *string
	Int(string, int, string) *int
	Bool(string, bool, string) *bool
}) engineFlags {
	return engineFlags{
		model:    fs.String("model", "", "checkpoint directory in HF layout (required)"),
		threads:  fs.Int("threads", 0, "compute threads (0: all cores)"),
		quantize: fs.String("quantize", "", "convert weights at load: q8 (int8, per-32 block scales: every linear weight but the router and kv_b_proj) or q4 (routed experts 4-bit Q4_0, the rest as q8)"),
		weights:  fs.String("weights", "auto", weightsUsage),
	}
}

// load reads and places the weights; it stops when ctx is done (SIGTERM or
// Ctrl-C while a large checkpoint is copied or converted).
func (f engineFlags) load(ctx context.Context) (*model.Weights, *kernels.Pool, error) {
	if *f.model == "" {
		return nil, nil, fmt.Errorf("--model is required")
	}
	opts := model.LoadOptions{Threads: *f.threads}
	if err := model.ParseQuantize(*f.quantize, &opts); err != nil {
		return nil, nil, err
	}
	residency, err := model.ParseResidency(*f.weights)
	if err != nil {
		return nil, nil, err
	}
	w, err := model.LoadContext(ctx, *f.model, opts)
	if err != nil {
		return nil, nil, err
	}
	placed, err := w.PlaceContext(ctx, residency, *f.threads, model.MemAvailable())
	if err != nil {
		w.Close()
		return nil, nil, err
	}
	if f.stderr != nil {
		fmt.Fprintf(f.stderr, "weights: %.3f GB held (%s)\n", float64(w.HeldBytes())/1e9, placed)
	}
	return w, kernels.NewPool(*f.threads), nil
}

func runGenerate(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("generate", stderr)
	ef := addEngineFlags(fs)
	prompt := fs.String("prompt-ids", "", "prompt token ids, comma separated (required)")
	maxTokens := fs.Int("max-tokens", 16, "tokens to generate at most")
	temp := fs.Float64("temperature", 0, "sampling temperature (0: greedy)")
	topP := fs.Float64("top-p", 1, "nucleus sampling mass (1: off)")
	topK := fs.Int("top-k", 0, "sample among the k most likely tokens (0: off)")
	seed := fs.Uint64("seed", 0, "sampling seed")
	logprobs := fs.Int("logprobs", -1, "report the chosen token's logprob and the top K per position (default: none; 0 with --json)")
	echo := fs.Bool("echo", false, "also report the prompt positions")
	asJSON := fs.Bool("json", false, "print one JSON object")
	ignoreEOS := fs.Bool("ignore-eos", false, "do not stop at EOS")
	chunk := fs.Int("prefill-chunk", 512, "prompt tokens per prefill step")
	cpuProfile := fs.String("cpuprofile", "", "write a CPU profile of the generation to this file")
	roofline := fs.Bool("roofline", false, "also run a 128 MiB read probe after each decode step and report each step's weight streaming rate as a fraction of it (the bandwidth roofline); decode tokens/s then leaves the probes out")
	precision := fs.String("precision", "exact", "exact (float32 activations), bf16 (BF16 activations in prefill products; the router stays float32) or int8 (activations rounded to Q8_0 blocks in every product with quantised weights, prefill and decode: needs --quantize; Q4_0 experts always take int8 activations)")
	if err := parse(fs, args); err != nil {
		return err
	}
	if *asJSON && *logprobs < 0 {
		*logprobs = 0 // --json always reports the chosen token's logprob
	}
	ids, err := parseIDs(*prompt)
	if err != nil {
		return fmt.Errorf("--prompt-ids: %v", err)
	}
	if len(ids) == 0 {
		return fmt.Errorf("--prompt-ids: at least one token id is required")
	}
	ef.stderr = stderr
	w, pool, err := ef.load(ctx)
	if err != nil {
		return err
	}
	defer w.Close()
	defer pool.Close()
	gen, err := model.LoadGenerationConfig(*ef.model, w.Config)
	if err != nil {
		return err
	}
	total := len(ids) + *maxTokens
	cache, err := model.NewLatentCache(w.Config, 16, (total+15)/16)
	if err != nil {
		return err
	}
	req := model.GenerateRequest{
		Prompt: ids, MaxTokens: *maxTokens, Logprobs: *logprobs, Echo: *echo, PrefillChunk: *chunk,
		Sampling: model.SamplingParams{Temperature: *temp, TopP: *topP, TopK: *topK, Seed: *seed},
	}
	if !*ignoreEOS {
		req.StopIDs = gen.EOSTokenIDs
	}
	eng := model.NewEngine(w, pool, nil)
	switch *precision {
	case "exact":
	case "bf16":
		eng.BF16Prefill = true
		if r, ok := eng.Experts.(*model.ExpertRunner); ok {
			r.BF16Act = true
		}
	case "int8":
		if w.SetIntActivations(true) == 0 {
			return fmt.Errorf("--precision int8: no Q8_0 weights to use it with (add --quantize q8 or q4)")
		}
	default:
		return fmt.Errorf("--precision %q: want exact, bf16 or int8", *precision)
	}
	if *cpuProfile != "" {
		f, err := os.Create(*cpuProfile)
		if err != nil {
			return fmt.Errorf("--cpuprofile: %w", err)
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			return fmt.Errorf("--cpuprofile: %w", err)
		}
		defer pprof.StopCPUProfile()
	}
	if *roofline {
		meter, err := newRooflineMeter(pool)
		if err != nil {
			return err
		}
		defer meter.Close()
		req.AfterDecodeStep = meter.afterStep
		out := stdout
		if *asJSON {
			out = stderr // stdout holds one JSON object
		}
		defer meter.write(out)
	}
	res, err := eng.Generate(ctx, cache, req)
	if err != nil {
		return err
	}
	if *asJSON {
		return writeGenerateJSON(stdout, res)
	}
	fmt.Fprintf(stdout, "prompt %v\ntokens %v (%s)\n", res.Prompt, res.Tokens, res.FinishReason)
	fmt.Fprintf(stdout, "prefill %d tokens in %v (%.1f tok/s); decode %d tokens in %v (%.1f tok/s); %d threads\n",
		len(res.Prompt), res.PrefillTime, rate(len(res.Prompt), res.PrefillTime.Seconds()),
		max(len(res.Tokens)-1, 0), res.DecodeTime, rate(len(res.Tokens)-1, res.DecodeTime.Seconds()), pool.Threads())
	return nil
}

func rate(n int, s float64) float64 {
	if n <= 0 || s <= 0 {
		return 0
	}
	return float64(n) / s
}

// positionJSON is one position of generate --json's logprobs.
type positionJSON struct {
	Position    int                `json:"position"`
	TokenID     int                `json:"token_id"`
	Logprob     *float64           `json:"logprob"`
	TopLogprobs map[string]float64 `json:"top_logprobs"`
}

func toPosition(pos int, tl *model.TokenLogprob, token int) positionJSON {
	p := positionJSON{Position: pos, TokenID: token}
	if tl == nil {
		return p
	}
	lp := tl.Logprob
	p.Logprob = &lp
	p.TopLogprobs = map[string]float64{}
	for _, t := range tl.Top {
		p.TopLogprobs[strconv.Itoa(t.ID)] = t.Logprob
	}
	return p
}

func writeGenerateJSON(w io.Writer, res *model.GenerateResult) error {
	out := struct {
		PromptTokenIDs []int          `json:"prompt_token_ids"`
		TokenIDs       []int          `json:"token_ids"`
		FinishReason   string         `json:"finish_reason"`
		Logprobs       []positionJSON `json:"logprobs"`
		PrefillTPS     float64        `json:"prefill_tokens_per_s"`
		DecodeTPS      float64        `json:"decode_tokens_per_s"`
	}{PromptTokenIDs: res.Prompt, TokenIDs: res.Tokens, FinishReason: res.FinishReason, Logprobs: []positionJSON{}}
	if res.Tokens == nil {
		out.TokenIDs = []int{}
	}
	if res.PromptLogprobs != nil {
		for p, tl := range res.PromptLogprobs {
			out.Logprobs = append(out.Logprobs, toPosition(p, tl, res.Prompt[p]))
		}
	}
	for i := range res.Logprobs {
		out.Logprobs = append(out.Logprobs, toPosition(len(res.Prompt)+i, &res.Logprobs[i], res.Tokens[i]))
	}
	out.PrefillTPS = rate(len(res.Prompt), res.PrefillTime.Seconds())
	out.DecodeTPS = rate(len(res.Tokens)-1, res.DecodeTime.Seconds())
	enc := json.NewEncoder(w)
	return enc.Encode(out)
}
