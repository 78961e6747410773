package tokenizer

import (
	"bytes"
	"compress/gzip"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
)

// ErrUnsupported is wrapped by every Load error about a tokenizer feature
// this package does not implement (a model, normalizer, pre-tokenizer,
// post-processor or decoder type, or an option of one).
var ErrUnsupported = errors.New("tokenizer: unsupported")

// Tokenizer is a loaded HuggingFace byte-level BPE tokenizer.
type Tokenizer struct {
	vocab        map[string]int // model vocab, byte-level spelling -> id
	merges       map[uint64]merge
	byteID       [256]int32 // id of each single byte's token, -1 if absent
	ignoreMerges bool

	tokens  []string // id -> token text (model vocab, then added tokens); "" if unused
	known   []bool   // id has a token
	special []bool   // id is a special added token (skipped by skipSpecialTokens)
	// decoded[off[id]:off[id+1]] is the decoder's output for id.
	decoded []byte
	off     []int32

	added          map[string]int // added token content -> id
	nonNormalized  *addedMatcher  // added tokens with normalized=false, matched first
	normalizedToks *addedMatcher  // normalized=true ones, matched in what is left

	pre []preStep

	bos, eos       int // -1 when absent
	prefix, suffix []int

	chatTemplate string
	tmplVars     map[string]string // bos_token, eos_token, ... for the template
	tmpl         struct {
		once sync.Once
		t    *chatTmpl
		err  error
	}

	caches []wordCache // per pre-tokenizer level, plus the BPE leaf (encodePiece)
}

type merge struct{ rank, id int32 }

// maxTokenID bounds ids read from files (real vocabularies are < 2^18), so
// a corrupt file cannot make Load allocate gigabytes.
const maxTokenID = 1 << 21

func pairKey(a, b int32) uint64 { return uint64(uint32(a))<<32 | uint64(uint32(b)) }

// Load reads tokenizer.json (or tokenizer.json.gz) and tokenizer_config.json
// (optional) from a model directory.
func Load(dir string) (*Tokenizer, error) {
	tj, err := readMaybeGz(filepath.Join(dir, "tokenizer.json"))
	if err != nil {
		return nil, err
	}
	var cfg []byte
	if b, err := readMaybeGz(filepath.Join(dir, "tokenizer_config.json")); err == nil {
		cfg = b
	} else if !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	t, err := FromJSON(tj, cfg)
	if err != nil {
		return nil, fmt.Errorf("tokenizer: loading %s: %w", dir, err)
	}
	// Newer transformers versions save the template beside the config.
	if t.chatTemplate == "" {
		if b, err := os.ReadFile(filepath.Join(dir, "chat_template.jinja")); err == nil {
			t.chatTemplate = string(b)
		}
	}
	return t, nil
}

func readMaybeGz(path string) ([]byte, error) {
	b, err := os.ReadFile(path)
	if err == nil || !errors.Is(err, os.ErrNotExist) {
		return b, err
	}
	gz, err2 := os.ReadFile(path + ".gz")
	if err2 != nil {
		return nil, err // report the plain name: that is what users provide
	}
	zr, err := gzip.NewReader(bytes.NewReader(gz))
	if err != nil {
		return nil, fmt.Errorf("tokenizer: %s.gz: %w", path, err)
	}
	b, err = io.ReadAll(zr)
	if err != nil {
		return nil, fmt.Errorf("tokenizer: %s.gz: %w", path, err)
	}
	return b, nil
}

type jsonAddedToken struct {
	ID         int    `json:"id"`
	Content    string `json:"content"`
	SingleWord bool   `json:"single_word"`
	LStrip     bool   `json:"lstrip"`
	RStrip     bool   `json:"rstrip"`
	Normalized bool   `json:"normalized"`
	Special    bool   `json:"special"`
}

type jsonTokenizer struct {
	AddedTokens   []jsonAddedToken `json:"added_tokens"`
	Normalizer    json.RawMessage  `json:"normalizer"`
	PreTokenizer  json.RawMessage  `json:"pre_tokenizer"`
	PostProcessor json.RawMessage  `json:"post_processor"`
	Decoder       json.RawMessage  `json:"decoder"`
	Model         struct {
		Type                    string          `json:"type"`
		Dropout                 *float64        `json:"dropout"`
		UnkToken                *string         `json:"unk_token"`
		ContinuingSubwordPrefix *string         `json:"continuing_subword_prefix"`
		EndOfWordSuffix         *string         `json:"end_of_word_suffix"`
		ByteFallback            bool            `json:"byte_fallback"`
		IgnoreMerges            bool            `json:"ignore_merges"`
		Vocab                   map[string]int  `json:"vocab"`
		Merges                  json.RawMessage `json:"merges"`
	} `json:"model"`
}

// typed is the common shape of every pipeline component: a "type" tag.
type typed struct {
	Type string `json:"type"`
}

func isNull(m json.RawMessage) bool {
	return len(bytes.TrimSpace(m)) == 0 || string(bytes.TrimSpace(m)) == "null"
}

// FromJSON builds a Tokenizer from the contents of tokenizer.json and
// tokenizer_config.json (config may be nil).
func FromJSON(tokenizerJSON, configJSON []byte) (*Tokenizer, error) {
	var j jsonTokenizer
	if err := json.Unmarshal(tokenizerJSON, &j); err != nil {
		return nil, fmt.Errorf("tokenizer.json: %w", err)
	}
	t := &Tokenizer{bos: -1, eos: -1}
	if err := t.loadModel(&j); err != nil {
		return nil, err
	}
	if err := checkNormalizer(j.Normalizer); err != nil {
		return nil, err
	}
	pre, err := parsePreTokenizer(j.PreTokenizer)
	if err != nil {
		return nil, err
	}
	// Byte-level BPE maps bytes to its alphabet exactly once, after all
	// splitting; this package does that mapping inside BPE, so it needs the
	// ByteLevel pre-tokenizer once and last.
	for i, st := range pre {
		if _, ok := st.(byteLevelPre); ok != (i == len(pre)-1) {
			return nil, fmt.Errorf("%w pre_tokenizer: ByteLevel must appear once, as the last step", ErrUnsupported)
		}
	}
	if len(pre) == 0 {
		return nil, fmt.Errorf("%w pre_tokenizer without ByteLevel (only byte-level BPE)", ErrUnsupported)
	}
	t.pre = pre
	if err := checkDecoder(j.Decoder); err != nil {
		return nil, err
	}
	if err := t.loadAdded(j.AddedTokens); err != nil {
		return nil, err
	}
	t.buildDecodeTable()
	if err := t.loadConfig(j.PostProcessor, configJSON); err != nil {
		return nil, err
	}
	t.caches = make([]wordCache, len(t.pre)+1)
	for i := range t.caches {
		t.caches[i].init(1 << 16)
	}
	return t, nil
}

func (t *Tokenizer) loadModel(j *jsonTokenizer) error {
	m := &j.Model
	if m.Type != "BPE" && !(m.Type == "" && m.Vocab != nil) {
		return fmt.Errorf("%w model type %q (only BPE)", ErrUnsupported, m.Type)
	}
	if m.Dropout != nil && *m.Dropout != 0 {
		return fmt.Errorf("%w BPE dropout %v", ErrUnsupported, *m.Dropout)
	}
	if m.ContinuingSubwordPrefix != nil && *m.ContinuingSubwordPrefix != "" {
		return fmt.Errorf("%w BPE continuing_subword_prefix", ErrUnsupported)
	}
	if m.EndOfWordSuffix != nil && *m.EndOfWordSuffix != "" {
		return fmt.Errorf("%w BPE end_of_word_suffix", ErrUnsupported)
	}
	if m.ByteFallback {
		return fmt.Errorf("%w BPE byte_fallback", ErrUnsupported)
	}
	if m.UnkToken != nil {
		return fmt.Errorf("%w BPE unk_token (byte-level BPE needs none)", ErrUnsupported)
	}
	if len(m.Vocab) == 0 {
		return errors.New("tokenizer.json: model.vocab is empty")
	}
	t.vocab = m.Vocab
	t.ignoreMerges = m.IgnoreMerges
	maxID := -1
	for tok, id := range m.Vocab {
		if id < 0 || id > maxTokenID {
			return fmt.Errorf("tokenizer.json: vocab id %d of %q out of range", id, tok)
		}
		maxID = max(maxID, id)
	}
	t.tokens = make([]string, maxID+1)
	t.known = make([]bool, maxID+1)
	for tok, id := range m.Vocab {
		if t.known[id] {
			return fmt.Errorf("tokenizer.json: vocab id %d used twice (%q, %q)", id, t.tokens[id], tok)
		}
		t.tokens[id], t.known[id] = tok, true
	}
	for b := 0; b < 256; b++ {
		t.byteID[b] = -1
		if id, ok := m.Vocab[string(byteToRune[b])]; ok {
			t.byteID[b] = int32(id)
		}
	}
	// Merges come either as "a b" strings (tokenizers < 0.20) or as
	// [a, b] pairs; rank is the position in the list.
	var pairs [][2]string
	if !isNull(m.Merges) {
		var strs []string
		if err := json.Unmarshal(m.Merges, &strs); err == nil {
			pairs = make([][2]string, len(strs))
			for i, s := range strs {
				a, b, ok := strings.Cut(s, " ")
				if !ok || strings.Contains(b, " ") {
					return fmt.Errorf("tokenizer.json: merge %d %q is not two tokens", i, s)
				}
				pairs[i] = [2]string{a, b}
			}
		} else if err := json.Unmarshal(m.Merges, &pairs); err != nil {
			return fmt.Errorf("tokenizer.json: model.merges: %w", err)
		}
	}
	t.merges = make(map[uint64]merge, len(pairs))
	for i, p := range pairs {
		a, okA := m.Vocab[p[0]]
		b, okB := m.Vocab[p[1]]
		n, okN := m.Vocab[p[0]+p[1]]
		if !okA || !okB || !okN {
			return fmt.Errorf("tokenizer.json: merge %d (%q %q) uses a token missing from the vocab", i, p[0], p[1])
		}
		k := pairKey(int32(a), int32(b))
		if _, dup := t.merges[k]; !dup { // HF keeps the first (lowest) rank
			t.merges[k] = merge{rank: int32(i), id: int32(n)}
		}
	}
	return nil
}

func checkNormalizer(raw json.RawMessage) error {
	if isNull(raw) {
		return nil
	}
	var n struct {
		typed
		Normalizers []json.RawMessage `json:"normalizers"`
	}
	if err := json.Unmarshal(raw, &n); err != nil {
		return fmt.Errorf("tokenizer.json: normalizer: %w", err)
	}
	if n.Type != "Sequence" {
		return fmt.Errorf("%w normalizer type %q", ErrUnsupported, n.Type)
	}
	for _, sub := range n.Normalizers {
		if err := checkNormalizer(sub); err != nil {
			return err
		}
	}
	return nil
}

func checkDecoder(raw json.RawMessage) error {
	if isNull(raw) {
		return fmt.Errorf("%w: no decoder (only ByteLevel)", ErrUnsupported)
	}
	var d struct {
		typed
		Decoders []json.RawMessage `json:"decoders"`
	}
	if err := json.Unmarshal(raw, &d); err != nil {
		return fmt.Errorf("tokenizer.json: decoder: %w", err)
	}
	switch d.Type {
	case "ByteLevel":
		// add_prefix_space/trim_offsets/use_regex only affect offsets.
		return nil
	case "Sequence":
		if len(d.Decoders) != 1 {
			return fmt.Errorf("%w decoder Sequence of %d decoders (only a single ByteLevel)", ErrUnsupported, len(d.Decoders))
		}
		return checkDecoder(d.Decoders[0])
	}
	return fmt.Errorf("%w decoder type %q (only ByteLevel)", ErrUnsupported, d.Type)
}

// loadAdded registers the added tokens as HuggingFace's deserializer does
// (AddedVocabulary::add_tokens): the id in the file is not trusted (HF only
// warns on a mismatch); a token whose content is in the model vocab takes
// that id, any other the next free one after the vocab. A repeated content
// keeps its id and takes the later flags; empty contents are skipped.
func (t *Tokenizer) loadAdded(toks []jsonAddedToken) error {
	t.added = make(map[string]int, len(toks))
	vocabLen := len(t.vocab)
	maxAdded := -1
	byID := map[int]jsonAddedToken{}
	var order []int
	for _, a := range toks {
		if a.Content == "" {
			continue
		}
		id, ok := t.added[a.Content]
		if !ok {
			id, ok = t.vocab[a.Content]
		}
		if !ok {
			switch {
			case maxAdded < 0:
				id = vocabLen
			case maxAdded >= vocabLen || vocabLen == 0:
				id = maxAdded + 1
			default:
				id = vocabLen
			}
		}
		if id > maxTokenID {
			return fmt.Errorf("tokenizer.json: too many added tokens")
		}
		t.added[a.Content] = id
		maxAdded = max(maxAdded, id)
		if _, seen := byID[id]; !seen {
			order = append(order, id)
		}
		a.ID = id
		byID[id] = a
	}
	for len(t.tokens) <= maxAdded {
		t.tokens = append(t.tokens, "")
		t.known = append(t.known, false)
	}
	t.special = make([]bool, len(t.tokens))
	var norm, nonNorm []jsonAddedToken
	for _, id := range order {
		a := byID[id]
		t.tokens[id], t.known[id] = a.Content, true
		t.special[id] = a.Special
		if a.Normalized {
			norm = append(norm, a)
		} else {
			nonNorm = append(nonNorm, a)
		}
	}
	t.nonNormalized = newAddedMatcher(nonNorm)
	t.normalizedToks = newAddedMatcher(norm)
	return nil
}

func (t *Tokenizer) buildDecodeTable() {
	t.off = make([]int32, len(t.tokens)+1)
	for id, tok := range t.tokens {
		if t.known[id] {
			t.decoded = append(t.decoded, byteLevelDecode(tok)...)
		}
		t.off[id+1] = int32(len(t.decoded))
	}
}

// specialTokenField is tokenizer_config.json's bos_token/eos_token/...: a
// plain string or an AddedToken object.
type specialTokenField struct{ s *string }

func (f *specialTokenField) UnmarshalJSON(b []byte) error {
	if isNull(b) {
		return nil
	}
	var s string
	if err := json.Unmarshal(b, &s); err == nil {
		f.s = &s
		return nil
	}
	var o struct {
		Content string `json:"content"`
	}
	if err := json.Unmarshal(b, &o); err != nil {
		return err
	}
	f.s = &o.Content
	return nil
}

type jsonConfig struct {
	AddBOS         *bool             `json:"add_bos_token"`
	AddEOS         *bool             `json:"add_eos_token"`
	BOS            specialTokenField `json:"bos_token"`
	EOS            specialTokenField `json:"eos_token"`
	Pad            specialTokenField `json:"pad_token"`
	Unk            specialTokenField `json:"unk_token"`
	TokenizerClass string            `json:"tokenizer_class"`
	ChatTemplate   json.RawMessage   `json:"chat_template"`
}

// llamaClasses are the transformers tokenizer classes that rebuild the
// post-processor from add_bos_token/add_eos_token (LlamaTokenizerFast's
// update_post_processor), overriding tokenizer.json's post_processor.
var llamaClasses = map[string]bool{
	"LlamaTokenizerFast": true, "LlamaTokenizer": true,
	"CodeLlamaTokenizerFast": true, "CodeLlamaTokenizer": true,
}

func (t *Tokenizer) loadConfig(post json.RawMessage, configJSON []byte) error {
	var c jsonConfig
	if configJSON != nil {
		if err := json.Unmarshal(configJSON, &c); err != nil {
			return fmt.Errorf("tokenizer_config.json: %w", err)
		}
	}
	t.tmplVars = map[string]string{}
	for name, f := range map[string]specialTokenField{"bos_token": c.BOS, "eos_token": c.EOS, "pad_token": c.Pad, "unk_token": c.Unk} {
		if f.s != nil {
			t.tmplVars[name] = *f.s
		}
	}
	if c.BOS.s != nil {
		id, ok := t.added[*c.BOS.s]
		if !ok {
			id, ok = t.vocab[*c.BOS.s]
		}
		if !ok {
			return fmt.Errorf("tokenizer_config.json: bos_token %q is not a token", *c.BOS.s)
		}
		t.bos = id
	}
	if c.EOS.s != nil {
		id, ok := t.added[*c.EOS.s]
		if !ok {
			id, ok = t.vocab[*c.EOS.s]
		}
		if !ok {
			return fmt.Errorf("tokenizer_config.json: eos_token %q is not a token", *c.EOS.s)
		}
		t.eos = id
	}
	if !isNull(c.ChatTemplate) {
		if err := json.Unmarshal(c.ChatTemplate, &t.chatTemplate); err != nil {
			// transformers also allows a list of named templates.
			var named []struct{ Name, Template string }
			if err2 := json.Unmarshal(c.ChatTemplate, &named); err2 != nil {
				return fmt.Errorf("tokenizer_config.json: chat_template: %w", err)
			}
			for _, n := range named {
				if n.Name == "default" {
					t.chatTemplate = n.Template
				}
			}
		}
	}

	if llamaClasses[c.TokenizerClass] {
		// LlamaTokenizerFast.__init__ always rebuilds the post-processor:
		// add_bos_token defaults to true, add_eos_token to false; a missing
		// bos/eos token turns its flag off (transformers 5; 4.x raised).
		if (c.AddBOS == nil || *c.AddBOS) && t.bos >= 0 {
			t.prefix = []int{t.bos}
		}
		if c.AddEOS != nil && *c.AddEOS && t.eos >= 0 {
			t.suffix = []int{t.eos}
		}
		return nil
	}
	return t.parsePostProcessor(post)
}

func (t *Tokenizer) parsePostProcessor(raw json.RawMessage) error {
	if isNull(raw) {
		return nil
	}
	var p struct {
		typed
		Processors []json.RawMessage `json:"processors"`
		Single     []struct {
			SpecialToken *struct{ ID string } `json:"SpecialToken"`
			Sequence     *struct{ ID string } `json:"Sequence"`
		} `json:"single"`
		SpecialTokens map[string]struct {
			IDs []int `json:"ids"`
		} `json:"special_tokens"`
	}
	if err := json.Unmarshal(raw, &p); err != nil {
		return fmt.Errorf("tokenizer.json: post_processor: %w", err)
	}
	switch p.Type {
	case "ByteLevel":
		return nil // only adjusts offsets
	case "Sequence":
		for _, sub := range p.Processors {
			if err := t.parsePostProcessor(sub); err != nil {
				return err
			}
		}
		return nil
	case "TemplateProcessing":
		seen := false
		for _, piece := range p.Single {
			switch {
			case piece.Sequence != nil:
				if seen {
					return fmt.Errorf("%w TemplateProcessing with two sequences in single", ErrUnsupported)
				}
				seen = true
			case piece.SpecialToken != nil:
				st, ok := p.SpecialTokens[piece.SpecialToken.ID]
				if !ok {
					return fmt.Errorf("tokenizer.json: post_processor special token %q undefined", piece.SpecialToken.ID)
				}
				if seen {
					t.suffix = append(t.suffix, st.IDs...)
				} else {
					t.prefix = append(t.prefix, st.IDs...)
				}
			}
		}
		return nil
	}
	return fmt.Errorf("%w post_processor type %q", ErrUnsupported, p.Type)
}

// VocabSize is one more than the largest id of any token (vocab or added).
func (t *Tokenizer) VocabSize() int { return len(t.tokens) }

// TokenID returns the id of a token given in its vocab spelling (byte-level
// alphabet for BPE tokens, plain text for added tokens).
func (t *Tokenizer) TokenID(s string) (int, bool) {
	if id, ok := t.added[s]; ok {
		return id, true
	}
	id, ok := t.vocab[s]
	return id, ok
}

// IDToken returns the vocab spelling of id.
func (t *Tokenizer) IDToken(id int) (string, bool) {
	if id < 0 || id >= len(t.tokens) || !t.known[id] {
		return "", false
	}
	return t.tokens[id], true
}

// BOS returns the beginning-of-sequence token named by tokenizer_config.json.
func (t *Tokenizer) BOS() (int, bool) { return t.bos, t.bos >= 0 }

// EOS returns the end-of-sequence token named by tokenizer_config.json.
func (t *Tokenizer) EOS() (int, bool) { return t.eos, t.eos >= 0 }

// IsSpecial reports whether id is a special added token.
func (t *Tokenizer) IsSpecial(id int) bool {
	return id >= 0 && id < len(t.special) && t.special[id]
}
