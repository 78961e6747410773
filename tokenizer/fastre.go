package tokenizer

import (
	"sync"
	"unicode"
	"unicode/utf8"
)

// Character classes use unicode_hf.go's corrections so that they agree
// with HuggingFace's (newer) Unicode tables.
//
// Hand-written matchers for the regexes DeepSeek-V3's pre-tokenizer uses.
// The third one needs lookahead, which Go's regexp lacks, and regexp2 is a
// slow backtracker; these loops implement the exact leftmost-first
// backtracking semantics. fastre_test.go checks them against regexp2 on
// random text.

const (
	v3Digits = `\p{N}{1,3}`
	v3CJK    = "[一-龥぀-ゟ゠-ヿ]+"
	v3Main   = "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+"
	gpt2Pat  = `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`
)

var knownPatterns = map[string]matcher{
	v3Digits: digits3Matcher{},
	v3CJK:    cjkMatcher{},
	v3Main:   v3Matcher{},
	gpt2Pat:  gpt2Matcher{},
}

// decodeAt decodes the rune at s[i:]; an invalid byte is one U+FFFD.
func decodeAt(s string, i int) (rune, int) {
	if i >= len(s) {
		return -1, 0
	}
	if c := s[i]; c < utf8.RuneSelf {
		return rune(c), 1
	}
	return utf8.DecodeRuneInString(s[i:])
}

// runEnd returns the end of the run of runes satisfying f starting at i.
func runEnd(s string, i int, f func(rune) bool) int {
	for i < len(s) {
		r, w := decodeAt(s, i)
		if !f(r) {
			break
		}
		i += w
	}
	return i
}

// Character classes, as bits of charClass.
const (
	clsL       = 1 << iota // \p{L}
	clsM                   // \p{M}
	clsN                   // \p{N} (Oniguruma)
	clsPS                  // \p{P} or \p{S}
	clsSpace               // \s (White_Space)
	clsNumeric             // Rust's char::is_numeric
)

// classTable caches charClass for the first two planes, where almost all
// text (emoji included) lives: the unicode package's binary searches cost
// more than the rest of pre-tokenization. It is built on first use (~15 ms)
// rather than at init, so importing the package stays free.
var (
	classOnce  sync.Once
	classCache *[tableRunes]uint8
)

const tableRunes = 0x20000

func classTable() *[tableRunes]uint8 {
	classOnce.Do(func() {
		var t [tableRunes]uint8
		for r := rune(0); r < tableRunes; r++ {
			t[r] = slowClass(r)
		}
		classCache = &t
	})
	return classCache
}

func slowClass(r rune) uint8 {
	var c uint8
	if unicode.IsLetter(r) || unicode.Is(hfAddL, r) {
		c |= clsL
	}
	if unicode.IsMark(r) || unicode.Is(hfAddM, r) {
		c |= clsM
	}
	if unicode.IsNumber(r) || unicode.Is(hfAddN, r) {
		c |= clsN
	}
	if unicode.IsPunct(r) || unicode.IsSymbol(r) || unicode.Is(hfAddP, r) || unicode.Is(hfAddS, r) {
		c |= clsPS
	}
	if unicode.IsSpace(r) {
		c |= clsSpace
	}
	if unicode.IsNumber(r) || unicode.Is(hfAddNumeric, r) {
		c |= clsNumeric
	}
	return c
}

func charClass(r rune) uint8 {
	if uint32(r) < tableRunes {
		return classTable()[r]
	}
	if r < 0 { // decodeAt's "end of text"
		return 0
	}
	return slowClass(r)
}

func isSpace(r rune) bool         { return charClass(r)&clsSpace != 0 }
func isLetter(r rune) bool        { return charClass(r)&clsL != 0 }
func isLetterOrMark(r rune) bool  { return charClass(r)&(clsL|clsM) != 0 }
func isNumber(r rune) bool        { return charClass(r)&clsN != 0 }
func isNumeric(r rune) bool       { return charClass(r)&clsNumeric != 0 }
func isPunctOrSymbol(r rune) bool { return charClass(r)&clsPS != 0 }

func isASCIIPunct(r rune) bool {
	return r < utf8.RuneSelf && isPunctOrSymbol(r)
}

func isCRLF(r rune) bool { return r == '\r' || r == '\n' }

func isV3CJK(r rune) bool {
	return (r >= 0x4E00 && r <= 0x9FA5) || (r >= 0x3040 && r <= 0x30FF)
}

// runMatcher matches maximal runs of runes satisfying it: `[class]+`.
type runMatcher func(rune) bool

func (f runMatcher) findAll(s string, out []span) []span {
	for i := 0; i < len(s); {
		r, w := decodeAt(s, i)
		if f(r) {
			e := runEnd(s, i+w, f)
			out = append(out, span{i, e})
			i = e
			continue
		}
		i += w
	}
	return out
}

// digits3Matcher is \p{N}{1,3}: runs of numbers cut into threes from the left.
type digits3Matcher struct{}

func (digits3Matcher) findAll(s string, out []span) []span {
	for i := 0; i < len(s); {
		var w int
		if c := s[i]; c < utf8.RuneSelf {
			if c < '0' || c > '9' { // fast path: ASCII non-digits
				i++
				continue
			}
			w = 1
		} else {
			var r rune
			r, w = utf8.DecodeRuneInString(s[i:])
			if !isNumber(r) {
				i += w
				continue
			}
		}
		e := i + w
		for n := 1; n < 3; n++ {
			r, w := decodeAt(s, e)
			if w == 0 || !isNumber(r) {
				break
			}
			e += w
		}
		out = append(out, span{i, e})
		i = e
	}
	return out
}

// cjkMatcher is V3's `[一-龥぀-ゟ゠-ヿ]+`. Every rune of the class is
// three bytes long with a lead byte in E3..E9, so other bytes are skipped
// without decoding.
type cjkMatcher struct{}

func (cjkMatcher) findAll(s string, out []span) []span {
	for i := 0; i < len(s); {
		if c := s[i]; c < 0xE3 || c > 0xE9 {
			i++
			continue
		}
		r, w := utf8.DecodeRuneInString(s[i:])
		if !isV3CJK(r) {
			i += w
			continue
		}
		e := i + w
		for e < len(s) {
			r, w := utf8.DecodeRuneInString(s[e:])
			if !isV3CJK(r) {
				break
			}
			e += w
		}
		out = append(out, span{i, e})
		i = e
	}
	return out
}

// spaceTail handles the alternatives shared by V3's and GPT-2's patterns at
// a whitespace rune: `\s+(?!\S)|\s+`. The greedy run gives back its last
// character when a non-space follows, so that character can prefix the
// next word; a single space followed by a non-space falls to `\s+`.
func spaceTail(s string, i int) int {
	j := runEnd(s, i, isSpace)
	if j == len(s) {
		return j
	}
	_, lw := utf8.DecodeLastRuneInString(s[:j])
	if j-lw > i {
		return j - lw
	}
	return j
}

// v3Matcher is DeepSeek-V3's main split pattern:
//
//	A  [!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+
//	B  [^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+
//	C   ?[\p{P}\p{S}]+[\r\n]*
//	D  \s*[\r\n]+
//	E  \s+(?!\S)
//	F  \s+
type v3Matcher struct{}

func (v3Matcher) findAll(s string, out []span) []span {
	for i := 0; i < len(s); {
		r0, w0 := decodeAt(s, i)
		if e := v3MatchAt(s, i, r0, w0); e > i {
			out = append(out, span{i, e})
			i = e
			continue
		}
		i += w0
	}
	return out
}

// v3MatchAt returns the end of the match starting at i, or i if none.
func v3MatchAt(s string, i int, r0 rune, w0 int) int {
	r1, w1 := decodeAt(s, i+w0)
	// A
	if isASCIIPunct(r0) && r1 < utf8.RuneSelf && isLetter(r1) {
		return runEnd(s, i+w0, func(r rune) bool { return r < utf8.RuneSelf && isLetter(r) })
	}
	// B: with the optional prefix character, then without it.
	if !isCRLF(r0) && !isLetter(r0) && !isPunctOrSymbol(r0) && w1 > 0 && isLetterOrMark(r1) {
		return runEnd(s, i+w0+w1, isLetterOrMark)
	}
	if isLetterOrMark(r0) {
		return runEnd(s, i+w0, isLetterOrMark)
	}
	// C
	start := i
	if r0 == ' ' && w1 > 0 && isPunctOrSymbol(r1) {
		start = i + w0
	}
	if start > i || isPunctOrSymbol(r0) {
		e := runEnd(s, start, isPunctOrSymbol)
		return runEnd(s, e, isCRLF)
	}
	if !isSpace(r0) {
		return i
	}
	// D: \s* backtracks to just after the last CR/LF of the space run.
	j := runEnd(s, i, isSpace)
	for k := j; k > i; {
		r, w := utf8.DecodeLastRuneInString(s[:k])
		if isCRLF(r) {
			return k
		}
		k -= w
	}
	// E, F
	return spaceTail(s, i)
}

// gpt2Matcher is GPT-2's pattern, used by ByteLevel with use_regex:
//
//	's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
type gpt2Matcher struct{}

func isOther(r rune) bool { return !isSpace(r) && !isLetter(r) && !isNumber(r) }

func (gpt2Matcher) findAll(s string, out []span) []span {
	for i := 0; i < len(s); {
		r0, w0 := decodeAt(s, i)
		if e := gpt2MatchAt(s, i, r0, w0); e > i {
			out = append(out, span{i, e})
			i = e
			continue
		}
		i += w0
	}
	return out
}

func gpt2MatchAt(s string, i int, r0 rune, w0 int) int {
	if r0 == '\'' {
		rest := s[i+1:]
		for _, suf := range [...]string{"s", "t", "re", "ve", "m", "ll", "d"} {
			if len(rest) >= len(suf) && rest[:len(suf)] == suf {
				return i + 1 + len(suf)
			}
		}
	}
	start := i
	r, w := r0, w0
	if r0 == ' ' {
		if r1, w1 := decodeAt(s, i+w0); w1 > 0 && !isSpace(r1) {
			start, r, w = i+w0, r1, w1
		}
	}
	switch {
	case isLetter(r):
		return runEnd(s, start+w, isLetter)
	case isNumber(r):
		return runEnd(s, start+w, isNumber)
	case isOther(r):
		return runEnd(s, start+w, isOther)
	}
	if !isSpace(r0) {
		return i
	}
	return spaceTail(s, i)
}
