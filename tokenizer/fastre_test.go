package tokenizer

import (
	"math/rand/v2"
	"regexp"
	"slices"
	"strings"
	"testing"
	"unicode"
	"unicode/utf8"

	"github.com/dlclark/regexp2"
)

// pool holds characters from every class the DeepSeek regexes tell apart,
// and the edges of their ranges.
var pool = func() []string {
	var p []string
	for r := rune(0x20); r < 0x7f; r++ {
		p = append(p, string(r))
	}
	for _, r := range []rune{
		'\t', '\n', '\r', '\v', '\f', 0x85, 0xA0, 0x1680, 0x2000, 0x2028, 0x202F, 0x3000, 0x200B, 0x200D, 0x180E, 0x1C,
		'é', 'ß', 'µ', 'ǅ', 'Ω', 'Ω', 'K', 'ᾈ', 0x1FBE, 'Ж', 'я', 'ע', 'ب', 'ह', 'ि', 0x0301, 0x0308, 0x20DD, 'ก', 0x0E31,
		'٣', '१', '１', '½', 'Ⅷ', '①', '²', '〇',
		'中', '龥', 0x9FA6, 0x4E00, 0x4DFF, 'あ', 0x3040, 0x309F, 0x30A0, 'ー', 0x30FF, 0x3100, 'ㄱ', '가', 0xD7A3, 0xD7FF, 0x0800, 0x07FF, 0xABFF,
		'！', '～', '。', '、', '「', '‘', '”', '‟', '·', '—', '…', '©', '€', '→', '∑', '😀', '🦙', 0x1F3FD, 0xFE0F, 0xFFFD,
		0xE000, 0x10FFFD, 0x40000, 0x1D400, 0x1D7D8,
	} {
		p = append(p, string(r))
	}
	return append(p, "\xff", "\x80", "\xe4\xb8", "\xf0\x9f", " ", " ", "  ", "\r\n", "'s", "'ll", "a", "b")
}()

func randomText(rng *rand.Rand, maxLen int) string {
	var b strings.Builder
	for n := rng.IntN(maxLen + 1); n > 0; n-- {
		b.WriteString(pool[rng.IntN(len(pool))])
	}
	return b.String()
}

// hasHFExtra reports whether s holds a code point that HF's newer Unicode
// tables classify differently from Go's (and so from regexp2's).
func hasHFExtra(s string) bool {
	for _, r := range s {
		for _, t := range []*unicode.RangeTable{hfAddL, hfAddM, hfAddN, hfAddP, hfAddS} {
			if unicode.Is(t, r) {
				return true
			}
		}
	}
	return false
}

// TestKnownPatternsMatchRegexp2 checks the hand-written matchers against
// regexp2, a backtracking engine with Oniguruma's semantics for these
// patterns (leftmost-first alternation, greedy backtracking, lookahead,
// Unicode \s and \p classes).
func TestKnownPatternsMatchRegexp2(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	n := 20000
	if testing.Short() {
		n = 3000
	}
	for pat, fast := range knownPatterns {
		ref := backtrackRegexp{regexp2.MustCompile(pat, regexp2.Multiline)}
		for i := 0; i < n; i++ {
			s := randomText(rng, 24)
			want := ref.findAll(s, nil)
			if got := fast.findAll(s, nil); !slices.Equal(got, want) {
				t.Fatalf("pattern %q on %q:\n fast   %v\n regexp2 %v", pat, s, got, want)
			}
		}
	}
}

// TestClassPatternsMatchRegexp checks the class-loop matchers, and the
// Oniguruma-to-RE2 translation under them, on DeepSeek-V2's patterns and
// a few more shapes.
func TestClassPatternsMatchRegexp(t *testing.T) {
	v2 := load(t, v2Dir)
	classLoops := 0
	for _, st := range v2.pre {
		if sp, ok := st.(*splitStep); ok {
			switch sp.m.(type) {
			case classSingle, classRun, classPrefixRun, classRunAtEnd:
				classLoops++
			}
		}
	}
	if classLoops != 5 {
		t.Fatalf("V2 uses %d class matchers, want 5 (all its regex splits)", classLoops)
	}
	pats := []string{
		"[\r\n]", `\s?[A-Za-zµÀ-ÖØ-öø-ƺ]+`, `\s?[!-/:-~！-／：-～‘-‟　-。]+`, `\s+$`, "[一-龥ࠀ-一가-퟿]+",
		`[a-c]`, `x+`, `\s+`, `[^\s]+`, `\d+$`,
	}
	rng := rand.New(rand.NewPCG(3, 4))
	for _, pat := range pats {
		tr, ok := translateToRE2(pat)
		if !ok {
			t.Fatalf("%q not translated", pat)
		}
		fast, ok := compileClassPattern(tr)
		if !ok {
			t.Fatalf("%q not a class pattern", pat)
		}
		re := goRegexp{regexp.MustCompile(tr)}
		onig := backtrackRegexp{regexp2.MustCompile(pat, regexp2.Multiline)}
		for i := 0; i < 5000; i++ {
			s := randomText(rng, 20)
			want := re.findAll(s, nil)
			if got := fast.findAll(s, nil); !slices.Equal(got, want) {
				t.Fatalf("%q on %q: class loop %v, regexp %v", pat, s, got, want)
			}
			if got := onig.findAll(s, nil); !slices.Equal(got, want) {
				t.Fatalf("%q on %q: regexp2 %v, translated regexp %v", pat, s, got, want)
			}
		}
	}
}

func TestTranslateToRE2(t *testing.T) {
	for _, c := range []struct {
		in, out string
		ok      bool
	}{
		{`\s+`, "[" + onigSpace + "]+", true},
		{`[^\s\p{L}]`, "[^" + onigSpace + `\p{L}]`, true},
		{`\S`, "[^" + onigSpace + "]", true},
		{`[\S]`, "", false},
		{`a$`, `a(?m:$)`, true},
		{`^a`, `(?m:^)a`, true},
		{`[$^]`, `[$^]`, true},
		{`\d\w`, `\p{Nd}[\p{L}\p{M}\p{Nd}\p{Pc}]`, true},
		{`\\s`, `\\s`, true},
		{`[]a]`, `[\]a]`, true},
		{`\s+(?!\S)`, "", false},
		{`\bword`, "", false},
	} {
		got, ok := translateToRE2(c.in)
		if ok != c.ok || (ok && got != c.out) {
			t.Errorf("translateToRE2(%q) = %q, %v; want %q, %v", c.in, got, ok, c.out, c.ok)
		}
	}
}

// TestGenericRegexFallback runs a lookahead pattern that is not one of the
// known ones through regexp2 and compares with HF's behaviour reasoned by
// hand (Qwen2's pre-tokenizer pattern).
func TestGenericRegexFallback(t *testing.T) {
	pat := `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`
	m, err := compilePattern(pat)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := m.(backtrackRegexp); !ok {
		t.Fatalf("compiled to %T, want regexp2", m)
	}
	s := "I'LL buy 12 apples!!\n\n  ok"
	var got []string
	for _, sp := range m.findAll(s, nil) {
		got = append(got, s[sp.start:sp.end])
	}
	want := []string{"I", "'LL", " buy", " ", "1", "2", " apples", "!!\n\n", " ", " ok"}
	if !slices.Equal(got, want) {
		t.Errorf("pieces %q, want %q", got, want)
	}
}

// TestMissingByteTokens pins which bytes have no token of their own: V3
// covers all 256; the V2 file lacks the 13 bytes that never occur in UTF-8
// (C0, C1, F5-FF), so those are dropped from invalid input (as HF drops
// characters missing from a vocab without unk_token).
func TestMissingByteTokens(t *testing.T) {
	for _, c := range []struct {
		dir  string
		want []int
	}{
		{v3Dir, nil},
		{v2Dir, []int{0xC0, 0xC1, 0xF5, 0xF6, 0xF7, 0xF8, 0xF9, 0xFA, 0xFB, 0xFC, 0xFD, 0xFE, 0xFF}},
	} {
		tok := load(t, c.dir)
		var missing []int
		for b := 0; b < 256; b++ {
			if tok.byteID[b] < 0 {
				missing = append(missing, b)
			}
		}
		if !slices.Equal(missing, c.want) {
			t.Errorf("%s: missing bytes %x, want %x", c.dir, missing, c.want)
		}
	}
}

func canRoundTrip(tok *Tokenizer, s string) bool {
	for i := 0; i < len(s); i++ {
		if tok.byteID[s[i]] < 0 {
			return false
		}
	}
	return true
}

func FuzzV3Matcher(f *testing.F) {
	for _, s := range []string{"Hello world", " \n\n  x", "a1b2", "!!!abc", " 'll", "\xff\xfe", "中文x", "e\u0301"} {
		f.Add(s)
	}
	ref := backtrackRegexp{regexp2.MustCompile(v3Main, regexp2.Multiline)}
	f.Fuzz(func(t *testing.T, s string) {
		if hasHFExtra(s) {
			return
		}
		if got, want := (v3Matcher{}).findAll(s, nil), ref.findAll(s, nil); !slices.Equal(got, want) {
			t.Fatalf("%q: fast %v, regexp2 %v", s, got, want)
		}
	})
}

// FuzzRoundTrip checks decode(encode(x)) == x for any bytes, that
// streaming gives the same bytes without splitting characters, and that a
// lossy stream gives DecodeLossy's text in valid UTF-8 deltas.
func FuzzRoundTrip(f *testing.F) {
	for _, s := range []string{"", "Hello world", "<｜User｜>hi", "😀\xff", "  \n\t中文 123", "\xe4\xb8"} {
		f.Add(s)
	}
	v2, v3 := load(f, v2Dir), load(f, v3Dir)
	f.Fuzz(func(t *testing.T, s string) {
		for _, tok := range []*Tokenizer{v3, v2} {
			if !canRoundTrip(tok, s) {
				continue
			}
			ids := tok.Encode(s, false)
			if got := tok.Decode(ids, false); got != s {
				t.Fatalf("Decode(Encode(%q)) = %q (ids %v)", s, got, ids)
			}
			st := tok.NewStream(false)
			var b strings.Builder
			for _, id := range ids {
				d := st.Add(id)
				if utf8.ValidString(s) && !utf8.ValidString(d) {
					t.Fatalf("%q: delta %q splits a character", s, d)
				}
				b.WriteString(d)
			}
			if b.WriteString(st.Flush()); b.String() != s {
				t.Fatalf("stream of %q = %q", s, b.String())
			}
			lossy := tok.NewLossyStream(false)
			b.Reset()
			for _, id := range ids {
				d := lossy.Add(id)
				if !utf8.ValidString(d) {
					t.Fatalf("%q: lossy delta %q invalid", s, d)
				}
				b.WriteString(d)
			}
			if b.WriteString(lossy.Flush()); b.String() != tok.DecodeLossy(ids, false) {
				t.Fatalf("lossy stream of %q = %q, DecodeLossy %q", s, b.String(), tok.DecodeLossy(ids, false))
			}
		}
	})
}
