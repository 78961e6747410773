package tokenizer

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"unicode/utf8"
)

// TestDecodeMatchesHF compares with HF tokenizers' decode() of random id
// sequences, most of them invalid UTF-8 (testdata/oracle/decode.js).
func TestDecodeMatchesHF(t *testing.T) {
	b, err := os.ReadFile(filepath.Join("testdata", "decode.json"))
	if err != nil {
		t.Fatal(err)
	}
	var entries []struct {
		Model string `json:"model"`
		IDs   []int  `json:"ids"`
		Skip  bool   `json:"skip"`
		Text  string `json:"text"`
	}
	if err := json.Unmarshal(b, &entries); err != nil {
		t.Fatal(err)
	}
	if len(entries) < 1000 {
		t.Fatalf("%d entries", len(entries))
	}
	invalid := 0
	for _, e := range entries {
		tok := load(t, filepath.Join("testdata", e.Model))
		if !utf8.ValidString(tok.Decode(e.IDs, e.Skip)) {
			invalid++
		}
		if got := tok.DecodeLossy(e.IDs, e.Skip); got != e.Text {
			t.Errorf("%s %v skip=%v:\n got  %q\n want %q", e.Model, e.IDs, e.Skip, got, e.Text)
		}
		s := tok.NewLossyStream(e.Skip)
		var sb strings.Builder
		for _, id := range e.IDs {
			d := s.Add(id)
			if !utf8.ValidString(d) {
				t.Fatalf("lossy delta %q not valid UTF-8", d)
			}
			sb.WriteString(d)
		}
		if sb.WriteString(s.Flush()); sb.String() != e.Text {
			t.Errorf("%s %v: lossy stream %q, want %q", e.Model, e.IDs, sb.String(), e.Text)
		}
	}
	if invalid < 300 {
		t.Errorf("only %d sequences exercise invalid UTF-8", invalid)
	}
}

func TestAppendLossy(t *testing.T) {
	for _, c := range []struct{ in, want string }{
		{"abc", "abc"},
		{"\xff", "\uFFFD"},
		{"\xe4\xb8", "\uFFFD"},   // truncated: one maximal subpart
		{"\xe4\xb8a", "\uFFFDa"}, // ditto, then ASCII
		{"\xe4\xb8\xe4\xb8\xad", "\uFFFD中"},
		{"\xed\xa0\x80", "\uFFFD\uFFFD\uFFFD"}, // surrogate: ED A0 is not a valid prefix
		{"\xf4\x90\x80\x80", "\uFFFD\uFFFD\uFFFD\uFFFD"},
		{"\xf0\x9f\x98", "\uFFFD"},
		{"\xc0\x80", "\uFFFD\uFFFD"},
		{"\x80\x80", "\uFFFD\uFFFD"},
	} {
		if got := string(appendLossy(nil, []byte(c.in))); got != c.want {
			t.Errorf("appendLossy(%q) = %q, want %q", c.in, got, c.want)
		}
	}
}
