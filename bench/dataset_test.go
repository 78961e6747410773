package bench

import (
	"encoding/json"
	"errors"
	"slices"
	"strings"
	"testing"
)

func TestParseDatasetJSONL(t *testing.T) {
	in := "\xef\xbb\xbf" + `{"prompt": "Hello there", "output_len": 12}

{"prompt": [1, 2, 3], "output_len": 4}
{"prompt": "no length"}
`
	es, err := ParseDataset([]byte(in))
	if err != nil {
		t.Fatal(err)
	}
	want := []Entry{{Prompt: "Hello there", OutputLen: 12}, {PromptIDs: []int{1, 2, 3}, OutputLen: 4}, {Prompt: "no length"}}
	if len(es) != len(want) {
		t.Fatalf("got %d entries", len(es))
	}
	for i := range want {
		if es[i].Prompt != want[i].Prompt || !slices.Equal(es[i].PromptIDs, want[i].PromptIDs) || es[i].OutputLen != want[i].OutputLen {
			t.Errorf("entry %d: %+v, want %+v", i, es[i], want[i])
		}
	}
}

// ShareGPT's file: the first turn is the prompt, the second the reply;
// shorter conversations are skipped as vLLM skips them.
func TestParseDatasetShareGPT(t *testing.T) {
	in := `[
 {"id": "a", "conversations": [{"from": "human", "value": "What is MoE?"}, {"from": "gpt", "value": "A mixture of experts."}, {"from": "human", "value": "more"}]},
 {"id": "b", "conversations": [{"from": "human", "value": "alone"}]},
 {"id": "c", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}
]`
	es, err := ParseDataset([]byte(in))
	if err != nil {
		t.Fatal(err)
	}
	if len(es) != 2 || es[0].Prompt != "What is MoE?" || es[0].Reply != "A mixture of experts." || es[1].Prompt != "Hi" {
		t.Fatalf("entries %+v", es)
	}
}

// Bad files get an error that wraps ErrDataset and says where and what.
func TestParseDatasetErrors(t *testing.T) {
	cases := []struct{ in, want string }{
		{"", "empty"},
		{"   \n\n", "empty"},
		{`{"prompt": "a", "output_len": 3}` + "\n" + `{"prompt": }`, "line 2"},
		{`{"output_len": 3}`, `no "prompt"`},
		{`{"prompt": ""}`, "prompt is empty"},
		{`{"prompt": []}`, "empty list"},
		{`{"prompt": 5}`, "want a string or a list of token ids"},
		{`{"prompt": [1, -2]}`, "not a token id"},
		{`{"prompt": [1, "a"]}`, "list of token ids"},
		{`{"prompt": "a", "output_len": 0}`, "output_len 0"},
		{`{"prompt": "a", "output_len": 1e30}`, "output_len"},
		{`{"prompt": "a", "output_len": 2.5}`, "output_len"},
		{`[{"prompt": "a"}, 7]`, "entry 1: want a JSON object"},
		{`[{"prompt": "a"}`, "not a valid JSON array"},
		{`[]`, "no usable entries"},
		{`[{"conversations": [{"from": "human", "value": "x"}]}]`, "no usable entries"},
		{`[{"conversations": [{"from": "human", "value": ""}, {"from": "gpt", "value": "y"}]}]`, "has no value"},
		{`[{"conversations": "x"}]`, "entry 0"},
		{`[{"prompt": "a", "conversations": []}]`, "both"},
		{"nonsense", "line 1: want a JSON object"},
	}
	for _, c := range cases {
		_, err := ParseDataset([]byte(c.in))
		if err == nil || !errors.Is(err, ErrDataset) || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%q: error %v, want one wrapping ErrDataset containing %q", c.in, err, c.want)
		}
	}
}

// FuzzDataset: any input gives entries that satisfy the documented
// invariants or an error wrapping ErrDataset; never a panic.
func FuzzDataset(f *testing.F) {
	for _, s := range []string{
		`{"prompt": "Hello", "output_len": 12}`,
		`{"prompt": [1, 2, 3], "output_len": 4}` + "\n" + `{"prompt": "x"}`,
		`[{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}]`,
		`[{"prompt": "a", "output_len": 1}]`,
		`{"prompt": [1, -2]}`,
		"\xef\xbb\xbf[",
		"",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		es, err := ParseDataset(data)
		if err != nil {
			if !errors.Is(err, ErrDataset) {
				t.Fatalf("error %v does not wrap ErrDataset", err)
			}
			if es != nil {
				t.Fatal("entries with an error")
			}
			return
		}
		if len(es) == 0 {
			t.Fatal("no entries and no error")
		}
		for _, e := range es {
			if (e.Prompt == "") == (e.PromptIDs == nil) {
				t.Fatalf("entry %+v: want exactly one of a text and a token-id prompt", e)
			}
			if e.OutputLen < 0 || e.OutputLen > maxOutputLen {
				t.Fatalf("output_len %d", e.OutputLen)
			}
			for _, id := range e.PromptIDs {
				if id < 0 {
					t.Fatalf("token id %d", id)
				}
			}
		}
	})
}

func TestFromEntries(t *testing.T) {
	es := []Entry{{Prompt: "a", OutputLen: 3}, {PromptIDs: []int{5, 6}, OutputLen: 7}, {Prompt: "q", Reply: "twelve bytes"}}
	cfg := DefaultConfig()
	cfg.NumPrompts = 7
	var warn strings.Builder
	rs, err := FromEntries(&cfg, es, &warn)
	if err != nil {
		t.Fatal(err)
	}
	count := map[string]int{}
	for _, r := range rs {
		switch {
		case r.Text == "a":
			count["a"]++
			if r.OutputLen != 3 {
				t.Errorf("a: output %d", r.OutputLen)
			}
		case r.PromptIDs != nil:
			count["ids"]++
			if r.PromptLen != 2 || r.OutputLen != 7 {
				t.Errorf("ids: %+v", r)
			}
		case r.Text == "q":
			count["q"]++
			if r.OutputLen != 3 { // 12 bytes / 4
				t.Errorf("ShareGPT estimate %d, want 3", r.OutputLen)
			}
		}
	}
	// Cycled: 7 requests over 3 entries are 3, 2, 2 in some order.
	if count["a"]+count["ids"]+count["q"] != 7 || min(count["a"], count["ids"], count["q"]) < 2 {
		t.Errorf("cycling: %v", count)
	}
	if !strings.Contains(warn.String(), "estimated") {
		t.Error("no note about estimated output lengths")
	}
	cfg.OutputLen = 9
	rs, _ = FromEntries(&cfg, es, nil)
	for _, r := range rs {
		if r.OutputLen != 9 {
			t.Fatalf("--output-len not applied: %+v", r)
		}
	}
	cfg.OutputLen = 0
	if _, err := FromEntries(&cfg, []Entry{{Prompt: "x"}}, nil); err == nil || !strings.Contains(err.Error(), "--output-len") {
		t.Errorf("missing output length: %v", err)
	}
	cfg.Endpoint = "/v1/chat/completions"
	if _, err := FromEntries(&cfg, []Entry{{PromptIDs: []int{1}, OutputLen: 1}}, nil); err == nil || !strings.Contains(err.Error(), "--tokenizer-dir") {
		t.Errorf("token ids to chat without a tokenizer: %v", err)
	}
}

func TestRandomRequests(t *testing.T) {
	cfg := DefaultConfig()
	cfg.NumPrompts, cfg.RandomInputLen, cfg.RandomOutputLen, cfg.Seed = 200, 100, 20, 3
	exact := RandomRequests(&cfg)
	for _, r := range exact {
		if len(r.PromptIDs) != 100 || r.PromptLen != 100 || r.OutputLen != 20 {
			t.Fatalf("range ratio 0: %d ids, output %d", len(r.PromptIDs), r.OutputLen)
		}
		for _, id := range r.PromptIDs {
			if id < 32 || id >= 256 {
				t.Fatalf("id %d outside the byte range used without a tokenizer", id)
			}
		}
	}
	cfg.RandomRangeRatio = 0.5
	rs := RandomRequests(&cfg)
	var ins, outs []int
	for _, r := range rs {
		ins, outs = append(ins, len(r.PromptIDs)), append(outs, r.OutputLen)
	}
	if slices.Min(ins) < 50 || slices.Max(ins) > 150 || slices.Min(outs) < 10 || slices.Max(outs) > 30 {
		t.Errorf("lengths outside [len(1-r), len(1+r)]: in %d-%d out %d-%d", slices.Min(ins), slices.Max(ins), slices.Min(outs), slices.Max(outs))
	}
	if slices.Max(ins)-slices.Min(ins) < 60 {
		t.Errorf("input lengths barely spread: %d-%d", slices.Min(ins), slices.Max(ins))
	}
	again := RandomRequests(&cfg)
	for i := range rs {
		if !slices.Equal(rs[i].PromptIDs, again[i].PromptIDs) {
			t.Fatal("the same seed must give the same prompts")
		}
	}
	cfg.Endpoint = "/v1/chat/completions"
	cfg.RandomRangeRatio = 0
	for _, r := range RandomRequests(&cfg)[:5] {
		if r.PromptIDs != nil || len(strings.Fields(r.Text)) != 100 {
			t.Fatalf("chat prompt: %d words", len(strings.Fields(r.Text)))
		}
	}
}

// fakeTok is a tokenizer of single bytes with ids 0-9 special and 10-19
// no token at all.
type fakeTok struct{}

func (fakeTok) Encode(s string, _ bool) []int {
	out := make([]int, len(s))
	for i := range s {
		out[i] = int(s[i])
	}
	return out
}
func (fakeTok) Decode(ids []int, _ bool) string {
	b := make([]byte, len(ids))
	for i, id := range ids {
		b[i] = byte(id)
	}
	return string(b)
}
func (fakeTok) VocabSize() int        { return 40 }
func (fakeTok) IsSpecial(id int) bool { return id < 10 }
func (fakeTok) IDToken(id int) (string, bool) {
	return "", id >= 20 || id < 10
}

func TestRandomRequestsTokenizer(t *testing.T) {
	cfg := DefaultConfig()
	cfg.NumPrompts, cfg.RandomInputLen, cfg.RandomOutputLen = 20, 50, 5
	cfg.Tokenizer = fakeTok{}
	for _, r := range RandomRequests(&cfg) {
		for _, id := range r.PromptIDs {
			if id < 20 || id >= 40 {
				t.Fatalf("id %d is special or no token", id)
			}
		}
	}
	// Chat text is counted with the tokenizer: " word" is len(word)+1
	// tokens here, so the prompt reaches the length in fewer words.
	cfg.Endpoint = "/v1/chat/completions"
	r := RandomRequests(&cfg)[0]
	if r.PromptLen < 50 || len(strings.Fields(r.Text)) >= 50 {
		t.Errorf("chat prompt of %d words, counted %d tokens", len(strings.Fields(r.Text)), r.PromptLen)
	}
}

// TestRandomPrefix: --random-prefix-len puts one fixed prefix before every
// random prompt (token ids for completions, the system message for chat),
// leaving the prompts after it as they are without it.
func TestRandomPrefix(t *testing.T) {
	cfg := DefaultConfig()
	cfg.NumPrompts, cfg.RandomInputLen, cfg.RandomOutputLen, cfg.Seed = 10, 30, 5, 7
	cfg.RandomRangeRatio = 0.5
	plain := RandomRequests(&cfg)
	cfg.RandomPrefixLen = 40
	rs := RandomRequests(&cfg)
	prefix := rs[0].PromptIDs[:40]
	for i, r := range rs {
		if !slices.Equal(r.PromptIDs[:40], prefix) {
			t.Fatalf("request %d: prefix differs", i)
		}
		if !slices.Equal(r.PromptIDs[40:], plain[i].PromptIDs) {
			t.Errorf("request %d: the prompt after the prefix is not the one drawn without it", i)
		}
		if r.PromptLen != 40+len(plain[i].PromptIDs) || r.System != "" {
			t.Errorf("request %d: prompt_len %d for %d ids, system %q", i, r.PromptLen, len(r.PromptIDs), r.System)
		}
	}
	if slices.Equal(prefix, plain[0].PromptIDs[:min(40, len(plain[0].PromptIDs))]) {
		t.Error("the prefix repeats the first prompt: drawn from the prompts' stream")
	}
	cfg.Seed = 8
	if other := RandomRequests(&cfg); slices.Equal(other[0].PromptIDs[:40], prefix) {
		t.Error("another seed gives the same prefix")
	}

	cfg.Seed = 7
	cfg.Endpoint = "/v1/chat/completions"
	cfg.RandomPrefixLen = 0
	plain = RandomRequests(&cfg)
	cfg.RandomPrefixLen = 40
	rs = RandomRequests(&cfg)
	for i, r := range rs {
		if r.System != rs[0].System || len(strings.Fields(r.System)) != 40 {
			t.Fatalf("request %d: system message of %d words, or not shared", i, len(strings.Fields(r.System)))
		}
		if r.Text != plain[i].Text || r.PromptLen != plain[i].PromptLen+40 {
			t.Errorf("request %d: user message changed, or prompt_len %d for %d+40", i, r.PromptLen, plain[i].PromptLen)
		}
	}
	c := &client{model: "m", cfg: &cfg}
	b, err := c.body(&rs[0])
	if err != nil {
		t.Fatal(err)
	}
	var body struct {
		Messages []struct{ Role, Content string }
	}
	if err := json.Unmarshal(b, &body); err != nil {
		t.Fatal(err)
	}
	if len(body.Messages) != 2 || body.Messages[0].Role != "system" || body.Messages[0].Content != rs[0].System ||
		body.Messages[1].Role != "user" || body.Messages[1].Content != rs[0].Text {
		t.Errorf("chat messages: %+v", body.Messages)
	}
	if b, _ := c.body(&plain[0]); strings.Contains(string(b), `"system"`) {
		t.Errorf("a request without a prefix sends a system message: %s", b)
	}

	for _, tc := range []struct {
		mod  func(*Config)
		want string
	}{
		{func(c *Config) { c.RandomPrefixLen = -1 }, "--random-prefix-len -1"},
		{func(c *Config) { c.DatasetName, c.DatasetPath = "file", "x.jsonl" }, "--random-prefix-len is for --dataset-name random"},
	} {
		c := DefaultConfig()
		c.RandomPrefixLen = 10
		tc.mod(&c)
		if err := c.Validate(); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Validate: %v, want %q", err, tc.want)
		}
	}
}
