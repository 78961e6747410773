package tokenizer

import (
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"testing"
)

type oracleEntry struct {
	Text string `json:"text"`
	V2   []int  `json:"v2"`
	V3   []int  `json:"v3"`
}

func readOracle(tb testing.TB) []oracleEntry {
	tb.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", "oracle.json"))
	if err != nil {
		tb.Fatal(err)
	}
	var o struct{ Entries []oracleEntry }
	if err := json.Unmarshal(b, &o); err != nil {
		tb.Fatal(err)
	}
	if len(o.Entries) < 1000 {
		tb.Fatalf("only %d oracle entries", len(o.Entries))
	}
	return o.Entries
}

// TestOracle compares with HuggingFace tokenizers' own output (see
// testdata/oracle/gen.js) on the hand-written table and random mixes.
func TestOracle(t *testing.T) {
	entries := readOracle(t)
	for _, m := range []struct {
		name string
		dir  string
		ids  func(oracleEntry) []int
	}{
		{"v2", v2Dir, func(e oracleEntry) []int { return e.V2 }},
		{"v3", v3Dir, func(e oracleEntry) []int { return e.V3 }},
	} {
		t.Run(m.name, func(t *testing.T) {
			tok := load(t, m.dir)
			fails := 0
			for i, e := range entries {
				want := m.ids(e)
				got := tok.Encode(e.Text, false)
				if !slices.Equal(got, want) {
					if fails++; fails <= 20 {
						t.Errorf("entry %d %q:\n got  %v\n want %v", i, e.Text, got, want)
					}
				}
				if d := tok.Decode(want, false); d != e.Text {
					t.Errorf("entry %d: Decode = %q, want %q", i, d, e.Text)
				}
			}
			if fails > 0 {
				t.Errorf("%d/%d entries differ", fails, len(entries))
			}
		})
	}
}
