package bench

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"slices"
	"strings"
	"unicode/utf8"
)

// Request is one prompt the benchmark sends.
type Request struct {
	// PromptIDs is a token-id prompt (completions API only); Text a text
	// prompt. Exactly one is set.
	PromptIDs []int
	Text      string
	// System, when set, is the chat API's system message, sent before the
	// user message Text (the shared prefix of --random-prefix-len).
	System string
	// PromptLen is the prompt's length in tokens as far as the client
	// knows it (exact for token ids, counted with --tokenizer-dir for text,
	// else 0); a server's usage.prompt_tokens replaces it.
	PromptLen int
	// OutputLen is max_tokens.
	OutputLen int
}

// Entry is one item of a dataset file, before the run's options apply.
type Entry struct {
	Prompt    string // a text prompt, or
	PromptIDs []int  // a token-id prompt
	// OutputLen is the file's output length; 0 when it gives none.
	OutputLen int
	// Reply is a ShareGPT conversation's reference answer: its token count
	// is the output length when the file gives none.
	Reply string
}

// ErrDataset marks every problem with a dataset file's contents.
var ErrDataset = errors.New("dataset")

func datasetErr(where, format string, args ...any) error {
	return fmt.Errorf("%w: %s: %s", ErrDataset, where, fmt.Sprintf(format, args...))
}

// maxOutputLen bounds output_len in a file; beyond it the number is
// certainly a mistake (no model has such a context).
const maxOutputLen = 1 << 24

// ParseDataset reads a dataset file. Two shapes are accepted, told apart by
// the first character:
//
//   - JSON Lines, one object per line (blank lines are skipped):
//     {"prompt": "text" or [token ids], "output_len": N}
//     output_len may be left out when --output-len is given.
//   - A JSON array of such objects, or of ShareGPT conversations:
//     {"conversations": [{"from": "human", "value": "prompt"},
//     {"from": "gpt", "value": "reply"}, ...]}
//     where the first turn is the prompt and the second the reply whose
//     length in tokens is the output length (as vLLM's sharegpt dataset
//     does); conversations with fewer than two turns are skipped.
//
// ShareGPT objects may also appear one per line. Every problem is an error
// wrapping ErrDataset that names the line or entry.
func ParseDataset(data []byte) ([]Entry, error) {
	data = bytes.TrimPrefix(data, []byte("\xef\xbb\xbf")) // UTF-8 BOM
	trimmed := bytes.TrimSpace(data)
	if len(trimmed) == 0 {
		return nil, datasetErr("file", "empty: want JSON Lines of {\"prompt\": ..., \"output_len\": N} or a JSON array")
	}
	var out []Entry
	if trimmed[0] == '[' {
		var items []json.RawMessage
		if err := json.Unmarshal(trimmed, &items); err != nil {
			return nil, datasetErr("file", "not a valid JSON array: %v", err)
		}
		for i, raw := range items {
			e, ok, err := parseEntry(raw)
			if err != nil {
				return nil, datasetErr(fmt.Sprintf("entry %d", i), "%v", err)
			}
			if ok {
				out = append(out, e)
			}
		}
	} else {
		for i, line := range bytes.Split(data, []byte("\n")) {
			line = bytes.TrimSpace(line)
			if len(line) == 0 {
				continue
			}
			e, ok, err := parseEntry(line)
			if err != nil {
				return nil, datasetErr(fmt.Sprintf("line %d", i+1), "%v", err)
			}
			if ok {
				out = append(out, e)
			}
		}
	}
	if len(out) == 0 {
		return nil, datasetErr("file", "no usable entries (ShareGPT conversations need at least two turns)")
	}
	return out, nil
}

type jsonEntry struct {
	Prompt        json.RawMessage `json:"prompt"`
	OutputLen     *int64          `json:"output_len"`
	Conversations *[]struct {
		From  string `json:"from"`
		Value string `json:"value"`
	} `json:"conversations"`
}

// parseEntry reads one object; ok is false for a ShareGPT conversation too
// short to use.
func parseEntry(raw []byte) (e Entry, ok bool, err error) {
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 || raw[0] != '{' {
		return e, false, fmt.Errorf("want a JSON object, got %s", snippet(raw))
	}
	var j jsonEntry
	if err := json.Unmarshal(raw, &j); err != nil {
		return e, false, fmt.Errorf("%v", err)
	}
	if j.OutputLen != nil {
		if *j.OutputLen < 1 || *j.OutputLen > maxOutputLen {
			return e, false, fmt.Errorf("output_len %d: want 1 to %d", *j.OutputLen, maxOutputLen)
		}
		e.OutputLen = int(*j.OutputLen)
	}
	switch {
	case j.Conversations != nil:
		if len(j.Prompt) > 0 {
			return e, false, fmt.Errorf("has both prompt and conversations")
		}
		conv := *j.Conversations
		if len(conv) < 2 {
			return e, false, nil
		}
		if conv[0].Value == "" {
			return e, false, fmt.Errorf("conversations[0] (the prompt) has no value")
		}
		e.Prompt, e.Reply = conv[0].Value, conv[1].Value
	case len(j.Prompt) == 0 || string(j.Prompt) == "null":
		return e, false, fmt.Errorf(`no "prompt" (or ShareGPT "conversations")`)
	case j.Prompt[0] == '"':
		if err := json.Unmarshal(j.Prompt, &e.Prompt); err != nil {
			return e, false, fmt.Errorf("prompt: %v", err)
		}
		if e.Prompt == "" {
			return e, false, fmt.Errorf("prompt is empty")
		}
	case j.Prompt[0] == '[':
		if err := json.Unmarshal(j.Prompt, &e.PromptIDs); err != nil {
			return e, false, fmt.Errorf("prompt: want a string or a list of token ids: %v", err)
		}
		if len(e.PromptIDs) == 0 {
			return e, false, fmt.Errorf("prompt is an empty list")
		}
		for k, id := range e.PromptIDs {
			if id < 0 || id > math.MaxInt32 {
				return e, false, fmt.Errorf("prompt token %d is %d, not a token id", k, id)
			}
		}
	default:
		return e, false, fmt.Errorf("prompt: want a string or a list of token ids, got %s", snippet(j.Prompt))
	}
	return e, true, nil
}

func snippet(b []byte) string {
	const n = 40
	if len(b) > n {
		b = b[:n]
		for len(b) > 0 && !utf8.Valid(b) {
			b = b[:len(b)-1]
		}
		return fmt.Sprintf("%q...", b)
	}
	return fmt.Sprintf("%q", b)
}

// ReadDataset reads and parses a dataset file.
func ReadDataset(r io.Reader) ([]Entry, error) {
	b, err := io.ReadAll(r)
	if err != nil {
		return nil, err
	}
	return ParseDataset(b)
}

// newRand returns the generator for one purpose of the run: prompts and
// arrivals draw from separate streams so changing the rate does not change
// the prompts.
func newRand(seed int64, stream uint64) *rand.Rand {
	return rand.New(rand.NewPCG(uint64(seed), stream))
}

const (
	streamDataset  = 1
	streamArrivals = 2
	streamPrefix   = 3
)

// FromEntries turns file entries into cfg.NumPrompts requests: the entries
// are shuffled with the seed and taken in that order, cycling when the file
// holds fewer. warn receives notes on estimates (may be nil).
func FromEntries(cfg *Config, entries []Entry, warn io.Writer) ([]Request, error) {
	if len(entries) == 0 {
		return nil, datasetErr("file", "no entries")
	}
	rng := newRand(cfg.Seed, streamDataset)
	order := rng.Perm(len(entries))
	out := make([]Request, 0, cfg.NumPrompts)
	estimated := false
	for i := range cfg.NumPrompts {
		k := order[i%len(entries)]
		e := entries[k]
		var r Request
		switch {
		case e.PromptIDs != nil && cfg.Chat():
			if cfg.Tokenizer == nil {
				return nil, datasetErr(fmt.Sprintf("entry %d", k), "a token-id prompt cannot go to %s without --tokenizer-dir to turn it into text", cfg.Endpoint)
			}
			r.Text, r.PromptLen = cfg.Tokenizer.Decode(e.PromptIDs, true), len(e.PromptIDs)
		case e.PromptIDs != nil:
			r.PromptIDs, r.PromptLen = e.PromptIDs, len(e.PromptIDs)
		default:
			r.Text = e.Prompt
			if cfg.Tokenizer != nil {
				// The completions API adds the BOS to text; chat adds its
				// template, which only the server's usage counts.
				r.PromptLen = len(cfg.Tokenizer.Encode(e.Prompt, !cfg.Chat()))
			}
		}
		switch {
		case cfg.OutputLen > 0:
			r.OutputLen = cfg.OutputLen
		case e.OutputLen > 0:
			r.OutputLen = e.OutputLen
		case e.Reply != "" && cfg.Tokenizer != nil:
			r.OutputLen = max(1, len(cfg.Tokenizer.Encode(e.Reply, false)))
		case e.Reply != "":
			// About four bytes a token for English text with BPE vocabularies.
			r.OutputLen = max(1, (len(e.Reply)+3)/4)
			estimated = true
		default:
			return nil, datasetErr(fmt.Sprintf("entry %d", k), "no output_len; give one per entry or pass --output-len")
		}
		out = append(out, r)
	}
	if estimated && warn != nil {
		fmt.Fprintln(warn, "note: ShareGPT output lengths estimated as reply bytes / 4; pass --tokenizer-dir to count tokens or --output-len to fix them")
	}
	return out, nil
}

// RandomRequests is the random dataset: cfg.NumPrompts requests whose
// input and output lengths are drawn uniformly from
// [len·(1−r), len·(1+r)] (r = RandomRangeRatio, at least 1 token). For the
// completions API the prompt is token ids, so its length is exact without
// a tokenizer; ids are drawn from the tokenizer's ordinary (non-special)
// tokens, or from 32-255 without one, which every byte-level vocabulary
// holds. For chat the prompt is text of common English words, one word per
// token (counted exactly with a tokenizer; the chat template adds more,
// which the server's usage.prompt_tokens reports).
//
// With RandomPrefixLen every request starts with the same random prefix of
// that many tokens, drawn once: token ids before the prompt's for the
// completions API, the system message for chat. PromptLen counts it.
func RandomRequests(cfg *Config) []Request {
	rng := newRand(cfg.Seed, streamDataset)
	ids := randomVocab(cfg.Tokenizer)
	wordLens := wordTokenLens(cfg.Tokenizer)
	var (
		prefixIDs  []int
		prefixText string
	)
	if cfg.RandomPrefixLen > 0 {
		prng := newRand(cfg.Seed, streamPrefix)
		if cfg.Chat() {
			prefixText, _ = randomText(prng, cfg.RandomPrefixLen, wordLens)
		} else {
			prefixIDs = randomIDs(prng, cfg.RandomPrefixLen, ids)
		}
	}
	out := make([]Request, 0, cfg.NumPrompts)
	for range cfg.NumPrompts {
		in := drawLen(rng, cfg.RandomInputLen, cfg.RandomRangeRatio)
		outLen := drawLen(rng, cfg.RandomOutputLen, cfg.RandomRangeRatio)
		if cfg.OutputLen > 0 {
			outLen = cfg.OutputLen
		}
		r := Request{OutputLen: outLen}
		if cfg.Chat() {
			r.Text, r.PromptLen = randomText(rng, in, wordLens)
			if prefixText != "" {
				r.System = prefixText
				r.PromptLen += cfg.RandomPrefixLen
			}
		} else {
			r.PromptIDs = append(slices.Clip(prefixIDs), randomIDs(rng, in, ids)...)
			r.PromptLen = len(r.PromptIDs)
		}
		out = append(out, r)
	}
	return out
}

// randomIDs is n ids drawn uniformly from ids.
func randomIDs(rng *rand.Rand, n int, ids []int) []int {
	out := make([]int, n)
	for j := range out {
		out[j] = ids[rng.IntN(len(ids))]
	}
	return out
}

// randomText is words drawn from benchWords until they reach n tokens
// (wordLens[i] is word i's length), and the number of tokens they make.
func randomText(rng *rand.Rand, n int, wordLens []int) (string, int) {
	var b strings.Builder
	got := 0
	for got < n {
		w := rng.IntN(len(benchWords))
		if b.Len() > 0 {
			b.WriteByte(' ')
		}
		b.WriteString(benchWords[w])
		got += wordLens[w]
	}
	return b.String(), got
}

// drawLen is a uniform integer in [floor(n·(1−r)), ceil(n·(1+r))], at least 1.
func drawLen(rng *rand.Rand, n int, r float64) int {
	lo := max(1, int(math.Floor(float64(n)*(1-r))))
	hi := max(lo, int(math.Ceil(float64(n)*(1+r))))
	return lo + rng.IntN(hi-lo+1)
}

func randomVocab(tok Tokenizer) []int {
	var ids []int
	if tok != nil {
		for id := range tok.VocabSize() {
			if _, ok := tok.IDToken(id); ok && !tok.IsSpecial(id) {
				ids = append(ids, id)
			}
		}
	}
	if len(ids) == 0 {
		for id := 32; id < 256; id++ {
			ids = append(ids, id)
		}
	}
	return ids
}

// wordTokenLens is each benchWords word's length in tokens when it follows
// a space (how it appears in the prompt), 1 without a tokenizer.
func wordTokenLens(tok Tokenizer) []int {
	out := make([]int, len(benchWords))
	for i, w := range benchWords {
		out[i] = 1
		if tok != nil {
			out[i] = max(1, len(tok.Encode(" "+w, false)))
		}
	}
	return out
}

// benchWords are common English words, each one token in the usual BPE
// vocabularies.
var benchWords = strings.Fields(`the of and to in is was for on that with as by at from his it an were are
which this be or has had have not but first one their its new after who they two her she been other when
there all during into school time may years more most only over city some world would where later up such
used many can state about national out known university united then made year part all between people
war under government system number long three four five water house light small large music game`)
