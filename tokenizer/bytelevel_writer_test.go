package tokenizer

import (
	"bytes"
	"flag"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

var update = flag.Bool("update", false, "rewrite testdata/bytelevel-512 from WriteByteLevel")

func TestWriteByteLevel(t *testing.T) {
	entries := readOracle(t)
	for _, size := range []int{260, 300, 512, 4096, 129280} {
		dir := t.TempDir()
		if err := WriteByteLevel(dir, size); err != nil {
			t.Fatal(err)
		}
		tok, err := Load(dir)
		if err != nil {
			t.Fatalf("size %d: %v", size, err)
		}
		if tok.VocabSize() != size {
			t.Errorf("size %d: VocabSize %d", size, tok.VocabSize())
		}
		bos, okB := tok.BOS()
		eos, okE := tok.EOS()
		if !okB || !okE || bos >= size || eos >= size || !tok.IsSpecial(bos) {
			t.Errorf("size %d: bos %d eos %d", size, bos, eos)
		}
		for _, e := range entries {
			ids := tok.Encode(e.Text, true)
			if ids[0] != bos {
				t.Fatalf("size %d: no BOS: %v", size, ids)
			}
			for _, id := range ids {
				if id < 0 || id >= size {
					t.Fatalf("size %d: id %d out of range", size, id)
				}
			}
			if got := tok.Decode(ids[1:], false); got != e.Text {
				t.Fatalf("size %d: round trip %q -> %q", size, e.Text, got)
			}
		}
		p, err := tok.ApplyChatTemplate([]Message{{"system", "S"}, {"user", "Hi"}, {"assistant", "Yo"}, {"user", "Q"}}, true)
		if err != nil {
			t.Fatal(err)
		}
		if want := BOSText + "S" + UserText + "Hi" + AssistantText + "Yo" + EOSText + UserText + "Q" + AssistantText; p != want {
			t.Errorf("template: %q", p)
		}
		user, _ := tok.TokenID(UserText)
		asst, _ := tok.TokenID(AssistantText)
		if ids := tok.Encode(p, false); ids[0] != bos || ids[2] != user || ids[len(ids)-1] != asst || asst != size-1 {
			t.Errorf("size %d: prompt ids %v", size, ids)
		}
	}
	if err := WriteByteLevel(t.TempDir(), 259); err == nil {
		t.Error("vocabSize 259 accepted")
	}
}

// TestWriteByteLevelGolden pins the generated files: they are what the
// oracle (HF tokenizers) was run on, and tiny checkpoints depend on them.
func TestWriteByteLevelGolden(t *testing.T) {
	golden := filepath.Join("testdata", "bytelevel-512")
	dir := t.TempDir()
	if *update {
		dir = golden
	}
	if err := WriteByteLevel(dir, 512); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{"tokenizer.json", "tokenizer_config.json"} {
		got, err := os.ReadFile(filepath.Join(dir, f))
		if err != nil {
			t.Fatal(err)
		}
		want, err := os.ReadFile(filepath.Join(golden, f))
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			t.Errorf("%s differs from testdata (run with -update and review)", f)
		}
	}
	// HF's encodings of the oracle texts with this file.
	tok := load(t, golden)
	fails := 0
	for _, e := range readOracle(t) {
		if e.ByteLevel == nil {
			t.Fatal("oracle.json lacks bytelevel-512 encodings")
		}
		if got := tok.Encode(e.Text, false); !slices.Equal(got, e.ByteLevel) {
			if fails++; fails < 10 {
				t.Errorf("%q:\n got  %v\n want %v", e.Text, got, e.ByteLevel)
			}
		}
	}
	if got := strings.Count(tok.Decode(tok.Encode("hello hello", false), false), "hello"); got != 2 {
		t.Errorf("decode: %d", got)
	}
}
