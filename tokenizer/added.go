package tokenizer

import (
	"unicode"
	"unicode/utf8"
)

// addedMatcher finds added tokens in text the way HuggingFace's
// AddedVocabulary does: an Aho-Corasick scan with leftmost-longest
// semantics, then the token's single_word/lstrip/rstrip rules.
type addedMatcher struct {
	nodes []trieNode
	toks  []jsonAddedToken
	// first[b] is the root's child for byte b (0 = none): the per-byte scan
	// of the whole input must not pay a map lookup.
	first [256]int32
}

type trieNode struct {
	next map[byte]int32
	tok  int32 // index into toks + 1; 0 when no token ends here
}

func newAddedMatcher(toks []jsonAddedToken) *addedMatcher {
	if len(toks) == 0 {
		return nil
	}
	m := &addedMatcher{nodes: []trieNode{{}}, toks: toks}
	for i, a := range toks {
		n := int32(0)
		for j := 0; j < len(a.Content); j++ {
			c := a.Content[j]
			nx, ok := m.nodes[n].next[c]
			if !ok {
				if m.nodes[n].next == nil {
					m.nodes[n].next = map[byte]int32{}
				}
				nx = int32(len(m.nodes))
				m.nodes[n].next[c] = nx
				m.nodes = append(m.nodes, trieNode{})
			}
			n = nx
		}
		if m.nodes[n].tok == 0 { // first declaration wins on duplicates
			m.nodes[n].tok = int32(i + 1)
		}
	}
	for b, n := range m.nodes[0].next {
		m.first[b] = n
	}
	return m
}

// longestAt returns the longest token that starts at s[i:].
func (m *addedMatcher) longestAt(s string, i int) (tok int, end int) {
	n, tok := int32(0), -1
	for j := i; j < len(s); j++ {
		nx, ok := m.nodes[n].next[s[j]]
		if !ok {
			break
		}
		n = nx
		if t := m.nodes[n].tok; t != 0 {
			tok, end = int(t-1), j+1
		}
	}
	return tok, end
}

// segment is a piece of the input: either text still to be tokenized
// (id < 0) or an added token that matched.
type segment struct {
	start, end int
	id         int
}

// split appends to out the segments of s[start:end] (HF find_matches).
func (m *addedMatcher) split(s string, start, end int, out []segment) []segment {
	if m == nil {
		return append(out, segment{start, end, -1})
	}
	sub := s[start:end]
	prev := 0
	for i := 0; i < len(sub); {
		if m.first[sub[i]] == 0 {
			i++
			continue
		}
		ti, e := m.longestAt(sub, i)
		if ti < 0 {
			i++
			continue
		}
		a := &m.toks[ti]
		ms, me := i, e
		if a.SingleWord {
			startOK := ms == 0 || !endsWithWord(sub[:ms])
			stopOK := me == len(sub) || !startsWithWord(sub[me:])
			if !startOK || !stopOK {
				// Leftmost-longest keeps scanning after the rejected
				// match, as Aho-Corasick's find_iter does.
				i = e
				continue
			}
		}
		if a.LStrip {
			ms = max(leftmostSpaceAtEnd(sub[:ms]), prev)
		}
		if a.RStrip {
			me += spaceRun(sub[me:])
		}
		if prev < ms {
			out = append(out, segment{start + prev, start + ms, -1})
		}
		out = append(out, segment{start + ms, start + me, a.ID})
		// The scan resumes at the raw match end, not after the stripped
		// spaces: HF's Aho-Corasick iterator does, so a token inside an
		// rstrip'd run is still emitted (its span overlaps; only ids matter).
		prev = me // even if that moves back, as HF does
		i = e
	}
	if prev < len(sub) {
		out = append(out, segment{start + prev, end, -1})
	}
	return out
}

// isWordChar is the regex crate's Unicode \w.
func isWordChar(r rune) bool {
	return r == '_' || isLetterOrMark(r) || unicode.Is(unicode.Nd, r) ||
		unicode.Is(unicode.Pc, r) || r == 0x200C || r == 0x200D
}

func endsWithWord(s string) bool {
	r, _ := utf8.DecodeLastRuneInString(s)
	return s != "" && isWordChar(r)
}

func startsWithWord(s string) bool {
	r, _ := utf8.DecodeRuneInString(s)
	return s != "" && isWordChar(r)
}

// leftmostSpaceAtEnd returns where the run of whitespace that ends s starts.
func leftmostSpaceAtEnd(s string) int {
	i := len(s)
	for i > 0 {
		r, w := utf8.DecodeLastRuneInString(s[:i])
		if !unicode.IsSpace(r) || (r == utf8.RuneError && w == 1) {
			break
		}
		i -= w
	}
	return i
}

// spaceRun returns the byte length of the whitespace that starts s.
func spaceRun(s string) int {
	i := 0
	for i < len(s) {
		r, w := utf8.DecodeRuneInString(s[i:])
		if !unicode.IsSpace(r) {
			break
		}
		i += w
	}
	return i
}
