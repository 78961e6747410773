package tokenizer

import (
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
)

var (
	loadOnce     sync.Map // dir -> *loaded
	v2Dir, v3Dir = filepath.Join("testdata", "deepseek-v2"), filepath.Join("testdata", "deepseek-v3")
)

type loaded struct {
	once sync.Once
	t    *Tokenizer
	err  error
}

// load returns the tokenizer in dir, parsed once per test binary.
func load(tb testing.TB, dir string) *Tokenizer {
	tb.Helper()
	v, _ := loadOnce.LoadOrStore(dir, &loaded{})
	l := v.(*loaded)
	l.once.Do(func() { l.t, l.err = Load(dir) })
	if l.err != nil {
		tb.Fatal(l.err)
	}
	return l.t
}

// TestV2Goldens checks the 98 encodings HF tokenizers 0.22.2 produced with
// the real DeepSeek-V2-Lite tokenizer.json (add_special_tokens=False).
func TestV2Goldens(t *testing.T) {
	tok := load(t, v2Dir)
	b, err := os.ReadFile(filepath.Join(v2Dir, "encodings.json"))
	if err != nil {
		t.Fatal(err)
	}
	var g struct {
		Entries []struct {
			Text string `json:"text"`
			IDs  []int  `json:"ids"`
		} `json:"entries"`
	}
	if err := json.Unmarshal(b, &g); err != nil {
		t.Fatal(err)
	}
	if len(g.Entries) != 98 {
		t.Fatalf("%d golden entries, want 98", len(g.Entries))
	}
	for i, e := range g.Entries {
		got := tok.Encode(e.Text, false)
		if !slices.Equal(got, e.IDs) {
			t.Errorf("entry %d %q:\n got  %v\n want %v", i, e.Text, got, e.IDs)
		}
		if d := tok.Decode(e.IDs, false); d != e.Text {
			t.Errorf("entry %d: Decode = %q, want %q", i, d, e.Text)
		}
	}
}

// TestLlamaCppVocabTests runs llama.cpp's test vectors for
// ggml-vocab-deepseek-llm.gguf (made with HF's deepseek-llm tokenizer,
// add_special_tokens=False), whose BPE vocab and merges are V2's.
func TestLlamaCppVocabTests(t *testing.T) {
	tok := load(t, v2Dir)
	inp, err := os.ReadFile(filepath.Join(v2Dir, "ggml-vocab-deepseek-llm.gguf.inp"))
	if err != nil {
		t.Fatal(err)
	}
	out, err := os.ReadFile(filepath.Join(v2Dir, "ggml-vocab-deepseek-llm.gguf.out"))
	if err != nil {
		t.Fatal(err)
	}
	texts := strings.Split(string(inp), "\n__ggml_vocab_test__\n")
	lines := strings.Split(string(out), "\n")
	texts, lines = texts[:len(texts)-1], lines[:len(lines)-1] // trailing separators
	if len(texts) != len(lines) || len(texts) < 40 {
		t.Fatalf("%d inputs, %d outputs", len(texts), len(lines))
	}
	for i, text := range texts {
		var want []int
		for _, f := range strings.Fields(lines[i]) {
			id, err := strconv.Atoi(f)
			if err != nil {
				t.Fatal(err)
			}
			want = append(want, id)
		}
		if got := tok.Encode(text, false); !slices.Equal(got, want) {
			t.Errorf("case %d %q:\n got  %v\n want %v", i, text, got, want)
		}
	}
}
