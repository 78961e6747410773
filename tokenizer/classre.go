package tokenizer

import (
	"regexp/syntax"
	"sort"
	"unicode/utf8"
)

// Most pre-tokenizer regexes are a character class with a quantifier
// (DeepSeek-V2's are `[\r\n]`, `\s?[letters]+`, `\s?[punct]+`, `\s+$` and
// `[CJK]+`). compileClassPattern recognises these shapes in the parsed RE2
// syntax tree and runs them as simple loops over a class lookup, several
// times faster than a general engine; fastre_test.go checks them against
// Go's regexp on random text.

// runeClass is a set of runes: a bitmap over the BMP (8 KB), sorted
// ranges above it.
type runeClass struct {
	bmp    [0x10000 / 64]uint64
	ranges []rune // lo, hi pairs, sorted, all > 0xFFFF
}

func newRuneClass(pairs []rune) *runeClass {
	c := &runeClass{}
	for i := 0; i+1 < len(pairs); i += 2 {
		lo, hi := pairs[i], pairs[i+1]
		for r := lo; r <= hi && r <= 0xFFFF; r++ {
			c.bmp[r>>6] |= 1 << (r & 63)
		}
		if hi > 0xFFFF {
			c.ranges = append(c.ranges, max(lo, 0x10000), hi)
		}
	}
	return c
}

func (c *runeClass) has(r rune) bool {
	if uint32(r) <= 0xFFFF {
		return c.bmp[r>>6]&(1<<(r&63)) != 0
	}
	if r < 0 {
		return false
	}
	// Index of the first range whose hi >= r.
	n := len(c.ranges) / 2
	i := sort.Search(n, func(i int) bool { return c.ranges[2*i+1] >= r })
	return i < n && c.ranges[2*i] <= r
}

// classOf returns the class a node matches if it is exactly one character
// from a class (a literal single rune counts).
func classOf(re *syntax.Regexp) (*runeClass, bool) {
	switch re.Op {
	case syntax.OpCharClass:
		return newRuneClass(re.Rune), true
	case syntax.OpLiteral:
		if len(re.Rune) == 1 && re.Flags&syntax.FoldCase == 0 {
			return newRuneClass([]rune{re.Rune[0], re.Rune[0]}), true
		}
	}
	return nil, false
}

// plusClass matches `X+` (greedy).
func plusClass(re *syntax.Regexp) (*runeClass, bool) {
	if re.Op != syntax.OpPlus || re.Flags&syntax.NonGreedy != 0 {
		return nil, false
	}
	return classOf(re.Sub[0])
}

func compileClassPattern(re2 string) (matcher, bool) {
	re, err := syntax.Parse(re2, syntax.Perl)
	if err != nil {
		return nil, false
	}
	re = re.Simplify()
	if c, ok := classOf(re); ok {
		return classSingle{c}, true
	}
	if c, ok := plusClass(re); ok {
		return classRun{c}, true
	}
	if re.Op != syntax.OpConcat || len(re.Sub) != 2 {
		return nil, false
	}
	a, b := re.Sub[0], re.Sub[1]
	if a.Op == syntax.OpQuest && a.Flags&syntax.NonGreedy == 0 {
		pre, ok1 := classOf(a.Sub[0])
		run, ok2 := plusClass(b)
		if ok1 && ok2 {
			return classPrefixRun{pre, run}, true
		}
	}
	if run, ok := plusClass(a); ok {
		switch b.Op {
		case syntax.OpEndText:
			return classRunAtEnd{run, false}, true
		case syntax.OpEndLine:
			return classRunAtEnd{run, true}, true
		}
	}
	return nil, false
}

// classSingle is `[X]`: every character of X alone.
type classSingle struct{ c *runeClass }

func (m classSingle) findAll(s string, out []span) []span {
	for i := 0; i < len(s); {
		r, w := decodeAt(s, i)
		if m.c.has(r) {
			out = append(out, span{i, i + w})
		}
		i += w
	}
	return out
}

// classRun is `[X]+`.
type classRun struct{ c *runeClass }

func (m classRun) findAll(s string, out []span) []span {
	return runMatcher(m.c.has).findAll(s, out)
}

// classPrefixRun is `[P]?[X]+`: the optional character is taken when a
// run follows it, else the run must start at the character itself.
type classPrefixRun struct{ pre, run *runeClass }

func (m classPrefixRun) findAll(s string, out []span) []span {
	for i := 0; i < len(s); {
		r0, w0 := decodeAt(s, i)
		if m.pre.has(r0) {
			if r1, w1 := decodeAt(s, i+w0); w1 > 0 && m.run.has(r1) {
				e := runEnd(s, i+w0+w1, m.run.has)
				out = append(out, span{i, e})
				i = e
				continue
			}
		}
		if m.run.has(r0) {
			e := runEnd(s, i+w0, m.run.has)
			out = append(out, span{i, e})
			i = e
			continue
		}
		i += w0
	}
	return out
}

// classRunAtEnd is `[X]+$` (multiLine: `$` also matches before "\n", as
// Oniguruma's Ruby syntax always does). The greedy run gives back
// characters until `$` holds; if no end inside the run works, no start
// inside it can work either, so the scan skips the run.
type classRunAtEnd struct {
	c         *runeClass
	multiLine bool
}

func (m classRunAtEnd) findAll(s string, out []span) []span {
	for i := 0; i < len(s); {
		r0, w0 := decodeAt(s, i)
		if !m.c.has(r0) {
			i += w0
			continue
		}
		j := runEnd(s, i+w0, m.c.has)
		k := -1
		if j == len(s) {
			k = j
		} else if m.multiLine {
			for e := j; e > i; {
				if s[e] == '\n' || e == len(s) {
					k = e
					break
				}
				_, w := utf8.DecodeLastRuneInString(s[:e])
				e -= w
			}
			if k == i {
				k = -1
			}
		}
		if k < 0 {
			i = j
			continue
		}
		out = append(out, span{i, k})
		i = k
	}
	return out
}
