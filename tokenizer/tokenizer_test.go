package tokenizer

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"unicode/utf8"
)

func TestSpecialTokensAndSizes(t *testing.T) {
	for _, c := range []struct {
		dir              string
		bos, eos, vocab  int
		encodeWithBOS    []int // Encode("Hello!", true)
		encodeWithoutBOS []int
	}{
		// transformers' LlamaTokenizerFast (tokenizer_class of both) adds BOS
		// because tokenizer_config.json says add_bos_token: true.
		{v3Dir, 0, 1, 128815, []int{0, 19923, 3}, []int{19923, 3}},
		{v2Dir, 100000, 100001, 100002, []int{100000, 17464, 0}, []int{17464, 0}},
	} {
		t.Run(filepath.Base(c.dir), func(t *testing.T) {
			tok := load(t, c.dir)
			if id, ok := tok.BOS(); !ok || id != c.bos {
				t.Errorf("BOS = %d %v, want %d", id, ok, c.bos)
			}
			if id, ok := tok.EOS(); !ok || id != c.eos {
				t.Errorf("EOS = %d %v, want %d", id, ok, c.eos)
			}
			if n := tok.VocabSize(); n != c.vocab {
				t.Errorf("VocabSize = %d, want %d", n, c.vocab)
			}
			if got := tok.Encode("Hello!", true); !slices.Equal(got, c.encodeWithBOS) {
				t.Errorf("Encode(add special) = %v, want %v", got, c.encodeWithBOS)
			}
			if got := tok.Encode("Hello!", false); !slices.Equal(got, c.encodeWithoutBOS) {
				t.Errorf("Encode = %v, want %v", got, c.encodeWithoutBOS)
			}
			if got := tok.Encode("", true); !slices.Equal(got, []int{c.bos}) {
				t.Errorf("Encode(\"\", true) = %v", got)
			}
			if got := tok.Encode("", false); len(got) != 0 {
				t.Errorf("Encode(\"\", false) = %v", got)
			}
			// Round trip through the token tables.
			for _, id := range []int{c.bos, c.eos, 0, 1000, c.vocab - 1} {
				s, ok := tok.IDToken(id)
				if !ok {
					t.Errorf("IDToken(%d) missing", id)
					continue
				}
				if back, ok := tok.TokenID(s); !ok || back != id {
					t.Errorf("TokenID(IDToken(%d)=%q) = %d %v", id, s, back, ok)
				}
			}
			for _, id := range []int{-1, c.vocab, 1 << 30} {
				if _, ok := tok.IDToken(id); ok {
					t.Errorf("IDToken(%d) found", id)
				}
			}
			if !tok.IsSpecial(c.bos) || tok.IsSpecial(1000) {
				t.Errorf("IsSpecial wrong")
			}
		})
	}
}

func TestDecodeSkipsSpecialAndUnknown(t *testing.T) {
	v3 := load(t, v3Dir)
	ids := v3.Encode("<｜begin▁of▁sentence｜><｜User｜>Hi<｜Assistant｜>Yo<｜end▁of▁sentence｜>", false)
	want := []int{0, 128803, 23166, 128804, 76943, 1} // HF tokenizers 0.23.2
	if !slices.Equal(ids, want) {
		t.Fatalf("ids = %v, want %v", ids, want)
	}
	// <｜User｜> is an added but not special token: kept by skipSpecialTokens.
	if got := v3.Decode(ids, true); got != "<｜User｜>Hi<｜Assistant｜>Yo" {
		t.Errorf("Decode(skip) = %q", got)
	}
	if got := v3.Decode(ids, false); got != "<｜begin▁of▁sentence｜><｜User｜>Hi<｜Assistant｜>Yo<｜end▁of▁sentence｜>" {
		t.Errorf("Decode = %q", got)
	}
	// V2's model has 102400 rows but only 100002 tokens: ids in between, and
	// negative ones, decode to nothing (HF skips them too).
	v2 := load(t, v2Dir)
	if got := v2.Decode([]int{17464, 100002, 102399, -5, 0}, false); got != "Hello!" {
		t.Errorf("V2 Decode with padding ids = %q", got)
	}
}

// TestInvalidUTF8 pins the documented behaviour for Go strings that are
// not UTF-8: each bad byte splits like U+FFFD, and is encoded as itself.
func TestInvalidUTF8(t *testing.T) {
	v3 := load(t, v3Dir)
	byteTok := func(b byte) int { id, _ := v3.TokenID(string(byteToRune[b])); return id }
	for _, c := range []struct {
		in   string
		want []int // nil: only the round trip is checked
	}{
		{"\xff", []int{byteTok(0xff)}},
		{"\x80", []int{byteTok(0x80)}},
		{"\xe4\xb8", []int{275}}, // truncated 中: both bytes in one piece, and BPE merges them ("ä¸")
		{"a\xffb", nil},
		{"Hello \xc3\x28 world", nil},
		{"\xed\xa0\x80 surrogate", nil},
		{"\xf4\x90\x80\x80 beyond U+10FFFF", nil},
		{"中\xe6\x96文", nil},
		{"<｜User｜>\xff<｜Assistant｜>", nil},
		{strings.Repeat("\xfe", 100), nil},
	} {
		ids := v3.Encode(c.in, false)
		if c.want != nil && !slices.Equal(ids, c.want) {
			t.Errorf("Encode(%q) = %v, want %v", c.in, ids, c.want)
		}
		if got := v3.Decode(ids, false); got != c.in {
			t.Errorf("Decode(Encode(%q)) = %q", c.in, got)
		}
	}
	// An invalid byte takes U+FFFD's class (a symbol): it joins a
	// following punctuation run like U+FFFD would.
	// HF pre-tokenizes "x \uFFFD!" as ["x", " \uFFFD!"].
	if got := v3.preTokenize("x \xff!"); !slices.Equal(got, []string{"x", " \xff!"}) {
		t.Errorf("pieces = %q", got)
	}
	if got := v3.preTokenize("x \uFFFD!"); !slices.Equal(got, []string{"x", " \uFFFD!"}) {
		t.Errorf("pieces = %q", got)
	}
	// 0x80 alone (a stray continuation byte) before letters: U+FFFD is a
	// symbol, so it does not prefix the word as a space would.
	if got := v3.preTokenize("\x80abc"); !slices.Equal(got, []string{"\x80", "abc"}) {
		t.Errorf("pieces = %q", got)
	}
}

func TestStream(t *testing.T) {
	entries := readOracle(t)
	for _, dir := range []string{v2Dir, v3Dir} {
		tok := load(t, dir)
		for _, skip := range []bool{false, true} {
			for _, e := range entries {
				ids := tok.Encode(e.Text, true)
				s := tok.NewStream(skip)
				var b strings.Builder
				for _, id := range ids {
					d := s.Add(id)
					if !utf8.ValidString(d) {
						t.Fatalf("%s: delta %q of %q splits a character", dir, d, e.Text)
					}
					b.WriteString(d)
				}
				b.WriteString(s.Flush())
				if want := tok.Decode(ids, skip); b.String() != want {
					t.Fatalf("%s skip=%v: streamed %q, Decode %q", dir, skip, b.String(), want)
				}
			}
		}
	}
}

func TestStreamHoldsIncompleteCharacter(t *testing.T) {
	v3 := load(t, v3Dir)
	byteTok := func(b byte) int { id, _ := v3.TokenID(string(byteToRune[b])); return id }
	s := v3.NewStream(false)
	// 😀 is F0 9F 98 80: nothing may come out until the fourth byte.
	for i, b := range []byte("😀") {
		got := s.Add(byteTok(b))
		if i < 3 && got != "" {
			t.Fatalf("byte %d: emitted %q early", i, got)
		}
		if i == 3 && got != "😀" {
			t.Fatalf("got %q, want 😀", got)
		}
	}
	// An impossible sequence is emitted at once, not held forever.
	if got := s.Add(byteTok(0xff)); got != "\xff" {
		t.Errorf("invalid byte: got %q", got)
	}
	// A truncated character at the end comes out in Flush.
	if got := s.Add(byteTok(0xe4)); got != "" {
		t.Errorf("lead byte emitted: %q", got)
	}
	if got := s.Flush(); got != "\xe4" {
		t.Errorf("Flush = %q", got)
	}
	if got := s.Flush(); got != "" {
		t.Errorf("second Flush = %q", got)
	}
	// Special tokens are skipped when asked; unknown ids give nothing.
	s = v3.NewStream(true)
	if got := s.Add(0) + s.Add(19923) + s.Add(-1) + s.Add(1<<30) + s.Add(1); got != "Hello" {
		t.Errorf("skip stream = %q", got)
	}
}

func TestLoadErrors(t *testing.T) {
	base := `{"model":{"type":"BPE","vocab":{"a":0,"b":1,"ab":2},"merges":["a b"]},
	 "pre_tokenizer":%s,"normalizer":%s,"decoder":%s,"post_processor":%s}`
	pre, norm, dec, post := `{"type":"ByteLevel","add_prefix_space":false,"use_regex":true}`, `null`, `{"type":"ByteLevel"}`, `null`
	f := func(p, n, d, pp string) string {
		return fmt.Sprintf(base, p, n, d, pp)
	}
	for _, c := range []struct {
		name        string
		json        string
		unsupported bool
	}{
		{"ok", f(pre, norm, dec, post), false},
		{"bad json", `{"model":`, false},
		{"wordpiece", `{"model":{"type":"WordPiece","vocab":{"a":0}},"decoder":{"type":"ByteLevel"}}`, true},
		{"nfkc", f(pre, `{"type":"NFKC"}`, dec, post), true},
		{"metaspace", f(`{"type":"Metaspace"}`, norm, dec, post), true},
		{"prefix space", f(`{"type":"ByteLevel","add_prefix_space":true}`, norm, dec, post), true},
		{"bad behavior", f(`{"type":"Split","pattern":{"Regex":"a"},"behavior":"Sideways"}`, norm, dec, post), true},
		{"bad regex", f(`{"type":"Split","pattern":{"Regex":"(a"},"behavior":"Isolated"}`, norm, dec, post), true},
		{"wordpiece decoder", f(pre, norm, `{"type":"WordPiece"}`, post), true},
		{"no decoder", f(pre, norm, `null`, post), true},
		{"bert processor", f(pre, norm, dec, `{"type":"BertProcessing"}`), true},
		{"merge of unknown token", `{"model":{"type":"BPE","vocab":{"a":0},"merges":["a c"]},"decoder":{"type":"ByteLevel"}}`, false},
		{"merge not a pair", `{"model":{"type":"BPE","vocab":{"a":0},"merges":["abc"]},"decoder":{"type":"ByteLevel"}}`, false},
		{"no pre-tokenizer", `{"model":{"type":"BPE","vocab":{"a":0}},"decoder":{"type":"ByteLevel"}}`, true},
		{"byte level twice", f(`{"type":"Sequence","pretokenizers":[{"type":"ByteLevel"},{"type":"ByteLevel"}]}`, norm, dec, post), true},
		{"split after byte level", f(`{"type":"Sequence","pretokenizers":[{"type":"ByteLevel"},{"type":"Digits"}]}`, norm, dec, post), true},
		{"empty vocab", `{"model":{"type":"BPE","vocab":{}},"decoder":{"type":"ByteLevel"}}`, false},
		{"negative id", `{"model":{"type":"BPE","vocab":{"a":-1}},"decoder":{"type":"ByteLevel"}}`, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			tok, err := FromJSON([]byte(c.json), nil)
			if c.name == "ok" {
				if err != nil {
					t.Fatal(err)
				}
				if got := tok.Encode("ab", false); !slices.Equal(got, []int{2}) {
					t.Errorf("Encode = %v", got)
				}
				return
			}
			if err == nil {
				t.Fatal("no error")
			}
			if errors.Is(err, ErrUnsupported) != c.unsupported {
				t.Errorf("errors.Is(ErrUnsupported) = %v: %v", !c.unsupported, err)
			}
		})
	}
	if _, err := Load(t.TempDir()); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("Load(empty dir) = %v", err)
	}
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "tokenizer.json.gz"), []byte("not gzip"), 0o644)
	if _, err := Load(dir); err == nil {
		t.Error("Load(bad gzip) succeeded")
	}
}

// TestAddedTokenFlags compares with HF tokenizers on added tokens with
// lstrip, rstrip, single_word, normalized and overlapping contents, and
// ids given out of order in the file (testdata/oracle/flags.js).
func TestAddedTokenFlags(t *testing.T) {
	dir := filepath.Join("testdata", "flags")
	tok, err := Load(dir)
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join(dir, "encodings.json"))
	if err != nil {
		t.Fatal(err)
	}
	var entries []struct {
		Text string `json:"text"`
		IDs  []int  `json:"ids"`
	}
	if err := json.Unmarshal(b, &entries); err != nil {
		t.Fatal(err)
	}
	if len(entries) < 40 {
		t.Fatalf("%d entries", len(entries))
	}
	for _, e := range entries {
		if got := tok.Encode(e.Text, false); !slices.Equal(got, e.IDs) {
			t.Errorf("%q:\n got  %v\n want %v", e.Text, got, e.IDs)
		}
	}
	if id, ok := tok.TokenID("<mask>"); !ok || id != 512 || !tok.IsSpecial(id) {
		t.Errorf("<mask> = %d %v (HF numbers added tokens after the vocab)", id, ok)
	}
}

func TestIgnoreMerges(t *testing.T) {
	// "abc" is in the vocab but no merge builds it: BPE gives "ab" "c"
	// unless ignore_merges lets the whole word through.
	const tj = `{"model":{"type":"BPE","ignore_merges":%v,"vocab":{"a":0,"b":1,"c":2,"ab":3,"abc":4},"merges":[["a","b"]]},
		"pre_tokenizer":{"type":"ByteLevel","add_prefix_space":false,"use_regex":false},"decoder":{"type":"ByteLevel"}}`
	for _, c := range []struct {
		ignore bool
		want   []int
	}{{false, []int{3, 2}}, {true, []int{4}}} {
		tok, err := FromJSON([]byte(fmt.Sprintf(tj, c.ignore)), nil)
		if err != nil {
			t.Fatal(err)
		}
		if got := tok.Encode("abc", false); !slices.Equal(got, c.want) {
			t.Errorf("ignore_merges=%v: %v, want %v", c.ignore, got, c.want)
		}
	}
}

// TestEncodeConcurrent shares one Tokenizer (and its word cache) between
// goroutines; run with -race.
func TestEncodeConcurrent(t *testing.T) {
	tok := load(t, v3Dir)
	entries := readOracle(t)
	done := make(chan string, 4)
	for g := 0; g < 4; g++ {
		go func(g int) {
			for i := g; i < len(entries); i += 4 {
				if got := tok.Encode(entries[i].Text, false); !slices.Equal(got, entries[i].V3) {
					done <- fmt.Sprintf("%q: %v", entries[i].Text, got)
					return
				}
			}
			done <- ""
		}(g)
	}
	for g := 0; g < 4; g++ {
		if msg := <-done; msg != "" {
			t.Error(msg)
		}
	}
}

// FuzzFromJSON feeds arbitrary tokenizer.json / config contents: Load must
// return an error or a working tokenizer, never panic.
func FuzzFromJSON(f *testing.F) {
	f.Add(`{"model":{"type":"BPE","vocab":{"a":0,"b":1,"ab":2},"merges":["a b"]},"added_tokens":[{"id":5,"content":"<s>","special":true}],
		"pre_tokenizer":{"type":"Sequence","pretokenizers":[{"type":"Split","pattern":{"Regex":"\\s+(?!\\S)|\\p{L}+"},"behavior":"MergedWithNext","invert":true},{"type":"Digits","individual_digits":true},{"type":"ByteLevel","add_prefix_space":false,"use_regex":true}]},
		"post_processor":{"type":"TemplateProcessing","single":[{"SpecialToken":{"id":"<s>"}},{"Sequence":{"id":"A"}}],"special_tokens":{"<s>":{"ids":[5]}}},
		"decoder":{"type":"ByteLevel"}}`, `{"bos_token":"<s>","chat_template":"{% for m in messages %}{{ m.content }}{% endfor %}"}`, "ab ab12 <s>")
	f.Add(`{"model":{"type":"BPE","vocab":{"a":0}},"pre_tokenizer":{"type":"Split","pattern":{"String":"a"},"behavior":"Contiguous"},"decoder":{"type":"ByteLevel"}}`, `{}`, "aaa")
	f.Fuzz(func(t *testing.T, tj, cfg, text string) {
		tok, err := FromJSON([]byte(tj), []byte(cfg))
		if err != nil {
			return
		}
		ids := tok.Encode(text, true)
		tok.Decode(ids, false)
		s := tok.NewStream(true)
		for _, id := range ids {
			s.Add(id)
		}
		s.Flush()
		tok.ApplyChatTemplate([]Message{{"user", text}}, true)
	})
}

// TestSplitBehaviors compares every Split behaviour (and invert), both
// Digits modes and ByteLevel's GPT-2 regex with HF tokenizers
// (testdata/oracle/behaviors.js).
func TestSplitBehaviors(t *testing.T) {
	base, err := os.ReadFile(filepath.Join("testdata", "bytelevel-512", "tokenizer.json"))
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join("testdata", "behaviors.json"))
	if err != nil {
		t.Fatal(err)
	}
	var entries []struct {
		Pre  json.RawMessage `json:"pre"`
		Text string          `json:"text"`
		IDs  []int           `json:"ids"`
	}
	if err := json.Unmarshal(b, &entries); err != nil {
		t.Fatal(err)
	}
	if len(entries) < 100 {
		t.Fatalf("%d entries", len(entries))
	}
	toks := map[string]*Tokenizer{}
	for _, e := range entries {
		tok := toks[string(e.Pre)]
		if tok == nil {
			var doc map[string]json.RawMessage
			if err := json.Unmarshal(base, &doc); err != nil {
				t.Fatal(err)
			}
			doc["pre_tokenizer"] = e.Pre
			tj, _ := json.Marshal(doc)
			if tok, err = FromJSON(tj, nil); err != nil {
				t.Fatalf("%s: %v", e.Pre, err)
			}
			toks[string(e.Pre)] = tok
		}
		if got := tok.Encode(e.Text, false); !slices.Equal(got, e.IDs) {
			t.Errorf("%s %q:\n got  %v\n want %v", e.Pre, e.Text, got, e.IDs)
		}
	}
}

func TestAddSpecialTokensRules(t *testing.T) {
	const tj = `{"model":{"type":"BPE","vocab":{"a":0}},"added_tokens":[
		{"id":1,"content":"<s>","special":true},{"id":2,"content":"</s>","special":true}],
		"pre_tokenizer":{"type":"ByteLevel","use_regex":false},"decoder":{"type":"ByteLevel"},"post_processor":%s}`
	const template = `{"type":"TemplateProcessing","single":[{"SpecialToken":{"id":"<s>","type_id":0}},{"Sequence":{"id":"A","type_id":0}},{"SpecialToken":{"id":"</s>","type_id":0}}],
		"special_tokens":{"<s>":{"id":"<s>","ids":[1],"tokens":["<s>"]},"</s>":{"id":"</s>","ids":[2],"tokens":["</s>"]}}}`
	const byteLevel = `{"type":"ByteLevel"}`
	for _, c := range []struct {
		name, post, cfg string
		want            []int
	}{
		{"llama default adds bos", byteLevel, `{"tokenizer_class":"LlamaTokenizerFast","bos_token":"<s>","eos_token":"</s>"}`, []int{1, 0}},
		{"llama bos off", byteLevel, `{"tokenizer_class":"LlamaTokenizerFast","add_bos_token":false,"bos_token":"<s>"}`, []int{0}},
		{"llama eos on", byteLevel, `{"tokenizer_class":"LlamaTokenizerFast","add_eos_token":true,"bos_token":"<s>","eos_token":{"content":"</s>"}}`, []int{1, 0, 2}},
		{"llama overrides template", template, `{"tokenizer_class":"LlamaTokenizerFast","add_bos_token":false,"bos_token":"<s>"}`, []int{0}},
		{"other class follows byte level", byteLevel, `{"tokenizer_class":"PreTrainedTokenizerFast","add_bos_token":true,"bos_token":"<s>"}`, []int{0}},
		{"other class follows template", template, `{"tokenizer_class":"PreTrainedTokenizerFast"}`, []int{1, 0, 2}},
		{"no config, template", template, ``, []int{1, 0, 2}},
		{"sequence of processors", `{"type":"Sequence","processors":[` + byteLevel + `,` + template + `]}`, ``, []int{1, 0, 2}},
	} {
		t.Run(c.name, func(t *testing.T) {
			var cfg []byte
			if c.cfg != "" {
				cfg = []byte(c.cfg)
			}
			tok, err := FromJSON([]byte(fmt.Sprintf(tj, c.post)), cfg)
			if err != nil {
				t.Fatal(err)
			}
			if got := tok.Encode("a", true); !slices.Equal(got, c.want) {
				t.Errorf("Encode(a, true) = %v, want %v", got, c.want)
			}
			if got := tok.Encode("a", false); !slices.Equal(got, []int{0}) {
				t.Errorf("Encode(a, false) = %v", got)
			}
		})
	}
}
