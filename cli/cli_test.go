package cli

import (
	"bytes"
	"encoding/json"
	"path/filepath"
	"strings"
	"testing"
)

func run(t *testing.T, args ...string) (string, string, int) {
	t.Helper()
	var out, errb bytes.Buffer
	code := Main(args, &out, &errb)
	return out.String(), errb.String(), code
}

// TestGenerateJSON: gen-model then generate --json --echo gives one object
// with a logprob entry per position, the first prompt position empty.
func TestGenerateJSON(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "m")
	if _, e, code := run(t, "gen-model", "--preset", "tiny-v2-lite", "--out", dir, "--seed", "2"); code != 0 {
		t.Fatalf("gen-model: %s", e)
	}
	out, e, code := run(t, "generate", "--model", dir, "--prompt-ids", "5,6,7", "--max-tokens", "4", "--logprobs", "3", "--echo", "--json", "--ignore-eos", "--threads", "1")
	if code != 0 {
		t.Fatalf("generate: %s", e)
	}
	var res struct {
		Prompt   []int `json:"prompt_token_ids"`
		Tokens   []int `json:"token_ids"`
		Logprobs []struct {
			Position int                `json:"position"`
			TokenID  int                `json:"token_id"`
			Logprob  *float64           `json:"logprob"`
			Top      map[string]float64 `json:"top_logprobs"`
		} `json:"logprobs"`
	}
	if err := json.Unmarshal([]byte(out), &res); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	if len(res.Tokens) != 4 || len(res.Logprobs) != 3+4 {
		t.Fatalf("tokens %v, %d logprob entries", res.Tokens, len(res.Logprobs))
	}
	if res.Logprobs[0].Logprob != nil {
		t.Fatal("first prompt position has a logprob")
	}
	for i, p := range res.Logprobs[1:] {
		if p.Logprob == nil || *p.Logprob > 0 || len(p.Top) != 3 || p.Position != i+1 {
			t.Fatalf("position entry %+v", p)
		}
	}
	// Text round trip through the generated tokenizer.
	ids, e, code := run(t, "tokenize", "--model", dir, "--text", "Hello, world", "--add-special-tokens=false")
	if code != 0 {
		t.Fatalf("tokenize: %s", e)
	}
	var list []int
	if err := json.Unmarshal([]byte(ids), &list); err != nil || len(list) == 0 {
		t.Fatalf("tokenize printed %q", ids)
	}
	idArg, _ := json.Marshal(list)
	text, e, code := run(t, "detokenize", "--model", dir, "--ids", strings.Trim(string(idArg), "[]"))
	if code != 0 || strings.TrimRight(text, "\n") != "Hello, world" {
		t.Fatalf("detokenize: %q %s", text, e)
	}
}

func TestUsageErrors(t *testing.T) {
	cases := [][]string{
		{},
		{"no-such-command"},
		{"generate", "--bogus"},
		{"gen-model"},
	}
	for _, args := range cases {
		if _, _, code := run(t, args...); code == 0 {
			t.Errorf("%v exited 0", args)
		}
	}
	if _, e, code := run(t, "generate", "--model", t.TempDir(), "--prompt-ids", "x"); code != 1 || !strings.Contains(e, "--prompt-ids") {
		t.Errorf("bad ids: code %d: %s", code, e)
	}
}
