package tokenizer

import (
	"encoding/json"
	"fmt"
	"regexp"
	"slices"
	"strings"
	"unicode/utf8"

	"github.com/dlclark/regexp2"
)

// span is a piece of the input text, as byte offsets.
type span struct{ start, end int }

// preStep is one pre-tokenizer: it refines each piece into smaller pieces.
type preStep interface {
	// split appends to out the sub-pieces of s[p.start:p.end]; ms is
	// scratch space for matches, reused across calls.
	split(s string, p span, out []span, ms *[]span) []span
}

// matcher finds the non-overlapping matches of a pattern, leftmost-first
// like Oniguruma (HuggingFace's regex engine); offsets are relative to s.
type matcher interface {
	findAll(s string, out []span) []span
}

type behavior int

const (
	removed behavior = iota
	isolated
	mergedWithPrevious
	mergedWithNext
	contiguous
)

var behaviors = map[string]behavior{
	"Removed": removed, "Isolated": isolated, "MergedWithPrevious": mergedWithPrevious,
	"MergedWithNext": mergedWithNext, "Contiguous": contiguous,
}

// splitStep is HuggingFace's Split pre-tokenizer (and Digits, which is a
// Split on a character predicate).
type splitStep struct {
	m        matcher
	behavior behavior
	invert   bool
}

func (st *splitStep) split(s string, p span, out []span, ms *[]span) []span {
	if p.start == p.end {
		return out
	}
	sub := s[p.start:p.end]
	matches := st.m.findAll(sub, (*ms)[:0])
	*ms = matches
	if st.behavior == isolated {
		// The hot path: every gap and every match becomes a piece (invert
		// does not change that), so no intermediate list is needed.
		prev := 0
		for _, m := range matches {
			if prev < m.start {
				out = append(out, span{p.start + prev, p.start + m.start})
			}
			if m.start < m.end {
				out = append(out, span{p.start + m.start, p.start + m.end})
			}
			prev = m.end
		}
		if prev < len(sub) {
			out = append(out, span{p.start + prev, p.end})
		}
		return out
	}
	// pieces covers sub with alternating gaps and matches.
	type piece struct {
		span
		match bool
	}
	var pieces []piece
	prev := 0
	for _, m := range matches {
		if prev != m.start {
			pieces = append(pieces, piece{span{prev, m.start}, false})
		}
		pieces = append(pieces, piece{m, true})
		prev = m.end
	}
	if prev != len(sub) {
		pieces = append(pieces, piece{span{prev, len(sub)}, false})
	}
	if st.invert {
		for i := range pieces {
			pieces[i].match = !pieces[i].match
		}
	}
	var acc []span
	switch st.behavior {
	case removed:
		for _, pc := range pieces {
			if !pc.match {
				acc = append(acc, pc.span)
			}
		}
	case mergedWithPrevious:
		prevMatch := false
		for _, pc := range pieces {
			if pc.match && !prevMatch && len(acc) > 0 {
				acc[len(acc)-1].end = pc.end
			} else {
				acc = append(acc, pc.span)
			}
			prevMatch = pc.match
		}
	case mergedWithNext:
		prevMatch := false
		for i := len(pieces) - 1; i >= 0; i-- {
			pc := pieces[i]
			if pc.match && !prevMatch && len(acc) > 0 {
				acc[len(acc)-1].start = pc.start
			} else {
				acc = append(acc, pc.span)
			}
			prevMatch = pc.match
		}
		slices.Reverse(acc)
	case contiguous:
		prevMatch := false
		for _, pc := range pieces {
			if pc.match == prevMatch && len(acc) > 0 {
				acc[len(acc)-1].end = pc.end
			} else {
				acc = append(acc, pc.span)
			}
			prevMatch = pc.match
		}
	}
	for _, a := range acc {
		if a.start != a.end {
			out = append(out, span{p.start + a.start, p.start + a.end})
		}
	}
	return out
}

// runePred matches every single character for which f holds (HF's char
// patterns, used by Digits).
type runePred func(rune) bool

func (f runePred) findAll(s string, out []span) []span {
	for i := 0; i < len(s); {
		r, w := utf8.DecodeRuneInString(s[i:])
		if f(r) {
			out = append(out, span{i, i + w})
		}
		i += w
	}
	return out
}

// literal matches a fixed string (Split with a String pattern).
type literal string

func (l literal) findAll(s string, out []span) []span {
	if l == "" {
		return out
	}
	for i := 0; ; {
		j := strings.Index(s[i:], string(l))
		if j < 0 {
			return out
		}
		out = append(out, span{i + j, i + j + len(l)})
		i += j + len(l)
	}
}

// goRegexp runs a pattern that Go's RE2 engine can express; RE2 returns
// the match a backtracking engine would, so results equal Oniguruma's.
type goRegexp struct{ re *regexp.Regexp }

func (g goRegexp) findAll(s string, out []span) []span {
	// FindAll on the whole piece (not re-searching slices of it) keeps ^,
	// \b and the like anchored where Oniguruma would see them.
	for _, m := range g.re.FindAllStringIndex(s, -1) {
		out = append(out, span{m[0], m[1]})
	}
	return out
}

// backtrackRegexp runs patterns RE2 cannot (lookaround) on regexp2, a
// backtracking engine. It reports rune indices, converted here to bytes.
type backtrackRegexp struct{ re *regexp2.Regexp }

func (b backtrackRegexp) findAll(s string, out []span) []span {
	// Rune index -> byte offset; invalid bytes are one rune each, as in
	// regexp2's []rune(s) conversion.
	offs := make([]int, 0, len(s)+1)
	for i := 0; i < len(s); {
		_, w := utf8.DecodeRuneInString(s[i:])
		offs = append(offs, i)
		i += w
	}
	offs = append(offs, len(s))
	m, err := b.re.FindStringMatch(s)
	for err == nil && m != nil {
		out = append(out, span{offs[m.Index], offs[m.Index+m.Length]})
		m, err = b.re.FindNextMatch(m)
	}
	return out
}

// compilePattern picks the fastest faithful engine for an HF regex: a
// hand-written matcher for the patterns DeepSeek ships, else Go's regexp
// after translating Oniguruma's Unicode \s, \d, \w, ^ and $, else regexp2.
func compilePattern(pat string) (matcher, error) {
	if m, ok := knownPatterns[pat]; ok {
		return m, nil
	}
	return compileGeneric(pat)
}

func compileGeneric(pat string) (matcher, error) {
	if tr, ok := translateToRE2(pat); ok {
		if m, ok := compileClassPattern(tr); ok {
			return m, nil
		}
		if re, err := regexp.Compile(tr); err == nil {
			return goRegexp{re}, nil
		}
	}
	re, err := regexp2.Compile(pat, regexp2.Multiline)
	if err != nil {
		return nil, fmt.Errorf("%w regex %q: %v", ErrUnsupported, pat, err)
	}
	return backtrackRegexp{re}, nil
}

// onigSpace is Oniguruma's Unicode \s (the White_Space property).
const onigSpace = `\t\n\v\f\r \x{85}\x{A0}\x{1680}\x{2000}-\x{200A}\x{2028}\x{2029}\x{202F}\x{205F}\x{3000}`

// translateToRE2 rewrites the escapes whose meaning differs between
// Oniguruma (Ruby syntax, Unicode) and RE2 (ASCII \s\d\w, $ = end of text).
// It reports false for constructs it cannot translate faithfully.
func translateToRE2(pat string) (string, bool) {
	var b strings.Builder
	inClass := false
	for i := 0; i < len(pat); i++ {
		c := pat[i]
		switch {
		case c == '\\' && i+1 < len(pat):
			i++
			e := pat[i]
			switch e {
			case 's':
				if inClass {
					b.WriteString(onigSpace)
				} else {
					b.WriteString("[" + onigSpace + "]")
				}
			case 'S':
				if inClass {
					return "", false
				}
				b.WriteString("[^" + onigSpace + "]")
			case 'd':
				b.WriteString(`\p{Nd}`)
			case 'D':
				b.WriteString(`\P{Nd}`)
			case 'w':
				if inClass {
					b.WriteString(`\p{L}\p{M}\p{Nd}\p{Pc}`)
				} else {
					b.WriteString(`[\p{L}\p{M}\p{Nd}\p{Pc}]`)
				}
			case 'W':
				if inClass {
					return "", false
				}
				b.WriteString(`[^\p{L}\p{M}\p{Nd}\p{Pc}]`)
			case 'b', 'B', 'h', 'H', 'R', 'X', 'K', 'G', 'A', 'Z', 'z':
				return "", false
			default:
				b.WriteByte('\\')
				b.WriteByte(e)
			}
		case inClass:
			if c == ']' {
				inClass = false
			} else if c == '[' {
				return "", false // nested classes / set operations
			}
			b.WriteByte(c)
		case c == '[':
			inClass = true
			b.WriteByte(c)
			// A ']' right after '[' or '[^' is a literal.
			if i+1 < len(pat) && pat[i+1] == '^' {
				i++
				b.WriteByte('^')
			}
			if i+1 < len(pat) && pat[i+1] == ']' {
				i++
				b.WriteString(`\]`)
			}
		case c == '$':
			b.WriteString(`(?m:$)`)
		case c == '^':
			b.WriteString(`(?m:^)`)
		case c == '(' && i+1 < len(pat) && pat[i+1] == '?':
			return "", false // lookaround, atomic groups, inline options
		default:
			b.WriteByte(c)
		}
	}
	return b.String(), true
}

// byteLevelPre is HF's ByteLevel pre-tokenizer. Mapping bytes to the
// byte-level alphabet is left to the BPE step; with use_regex it first
// splits with GPT-2's pattern.
type byteLevelPre struct{ regex bool }

var gpt2Split = &splitStep{m: gpt2Matcher{}, behavior: isolated}

func (b byteLevelPre) split(s string, p span, out []span, ms *[]span) []span {
	if !b.regex {
		if p.start != p.end {
			out = append(out, p)
		}
		return out
	}
	return gpt2Split.split(s, p, out, ms)
}

func parsePreTokenizer(raw json.RawMessage) ([]preStep, error) {
	if isNull(raw) {
		return nil, nil
	}
	var p struct {
		typed
		PreTokenizers []json.RawMessage `json:"pretokenizers"`
		Pattern       struct {
			Regex  *string `json:"Regex"`
			String *string `json:"String"`
		} `json:"pattern"`
		Behavior         string `json:"behavior"`
		Invert           bool   `json:"invert"`
		IndividualDigits bool   `json:"individual_digits"`
		AddPrefixSpace   bool   `json:"add_prefix_space"`
		UseRegex         *bool  `json:"use_regex"`
	}
	if err := json.Unmarshal(raw, &p); err != nil {
		return nil, fmt.Errorf("tokenizer.json: pre_tokenizer: %w", err)
	}
	switch p.Type {
	case "Sequence":
		var steps []preStep
		for _, sub := range p.PreTokenizers {
			s, err := parsePreTokenizer(sub)
			if err != nil {
				return nil, err
			}
			steps = append(steps, s...)
		}
		return steps, nil
	case "Split":
		bh, ok := behaviors[p.Behavior]
		if !ok {
			return nil, fmt.Errorf("%w Split behavior %q", ErrUnsupported, p.Behavior)
		}
		var m matcher
		switch {
		case p.Pattern.Regex != nil:
			var err error
			if m, err = compilePattern(*p.Pattern.Regex); err != nil {
				return nil, err
			}
		case p.Pattern.String != nil:
			m = literal(*p.Pattern.String)
		default:
			return nil, fmt.Errorf("tokenizer.json: Split pre-tokenizer without a pattern")
		}
		return []preStep{&splitStep{m: m, behavior: bh, invert: p.Invert}}, nil
	case "Digits":
		bh := contiguous
		if p.IndividualDigits {
			bh = isolated
		}
		// Rust's char::is_numeric: categories Nd, Nl, No.
		return []preStep{&splitStep{m: runePred(isNumeric), behavior: bh}}, nil
	case "ByteLevel":
		if p.AddPrefixSpace {
			return nil, fmt.Errorf("%w ByteLevel pre-tokenizer with add_prefix_space", ErrUnsupported)
		}
		return []preStep{byteLevelPre{regex: p.UseRegex == nil || *p.UseRegex}}, nil
	}
	return nil, fmt.Errorf("%w pre_tokenizer type %q", ErrUnsupported, p.Type)
}
