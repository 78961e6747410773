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
	// ByteLevel is the encoding with testdata/bytelevel-512 (WriteByteLevel).
	ByteLevel []int `json:"bytelevel512"`
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

// TestOracleFile runs a large differential check against a JSON-lines file
// written by testdata/oracle/fuzz.js; it is skipped unless
// TOKENIZER_ORACLE_FILE names one (the file is too big to commit).
func TestOracleFile(t *testing.T) {
	path := os.Getenv("TOKENIZER_ORACLE_FILE")
	if path == "" {
		t.Skip("TOKENIZER_ORACLE_FILE not set")
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	v2, v3 := load(t, v2Dir), load(t, v3Dir)
	dec := json.NewDecoder(f)
	n, fails := 0, 0
	for dec.More() {
		var e oracleEntry
		if err := dec.Decode(&e); err != nil {
			t.Fatal(err)
		}
		n++
		for _, c := range []struct {
			name string
			tok  *Tokenizer
			want []int
		}{{"v2", v2, e.V2}, {"v3", v3, e.V3}} {
			if got := c.tok.Encode(e.Text, false); !slices.Equal(got, c.want) {
				if fails++; fails <= 30 {
					t.Errorf("%s line %d %q (%+q):\n got  %v\n want %v", c.name, n, e.Text, e.Text, got, c.want)
				}
			}
		}
	}
	t.Logf("%d texts, %d mismatches", n, fails)
}
