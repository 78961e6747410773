package tokenizer

import "unicode/utf8"

// DecodeLossy is Decode with invalid UTF-8 replaced as HuggingFace's
// decode does (Rust's String::from_utf8_lossy): each maximal invalid
// subpart becomes one U+FFFD, so the result is always valid UTF-8 and
// equals HF's decode(ids, skip_special_tokens) exactly.
func (t *Tokenizer) DecodeLossy(ids []int, skipSpecialTokens bool) string {
	s := t.Decode(ids, skipSpecialTokens)
	if utf8.ValidString(s) {
		return s
	}
	return string(appendLossy(make([]byte, 0, len(s)+8), []byte(s)))
}

// NewLossyStream is NewStream whose deltas are always valid UTF-8: an
// invalid sequence comes out as U+FFFD once it is certain to be invalid
// (an incomplete one at the end, in Flush). The concatenated deltas equal
// DecodeLossy of the ids.
func (t *Tokenizer) NewLossyStream(skipSpecialTokens bool) *Stream {
	return &Stream{t: t, skip: skipSpecialTokens, lossy: true}
}

// appendLossy appends b to dst with each maximal invalid subpart replaced
// by U+FFFD (the W3C/WHATWG "maximal subpart" rule Rust follows).
func appendLossy(dst, b []byte) []byte {
	for i := 0; i < len(b); {
		if c := b[i]; c < utf8.RuneSelf {
			dst = append(dst, c)
			i++
			continue
		}
		r, w := utf8.DecodeRune(b[i:])
		if r != utf8.RuneError || w > 1 {
			dst = append(dst, b[i:i+w]...)
			i += w
			continue
		}
		dst = append(dst, "\uFFFD"...)
		i += maximalSubpart(b[i:])
	}
	return dst
}

// maximalSubpart returns the length of the longest prefix of b (which
// starts with an invalid or incomplete sequence) that is a prefix of some
// valid UTF-8 encoding, at least 1.
func maximalSubpart(b []byte) int {
	need, lo, hi := 0, byte(0x80), byte(0xBF)
	switch c := b[0]; {
	case c >= 0xC2 && c <= 0xDF:
		need = 1
	case c == 0xE0:
		need, lo = 2, 0xA0
	case c == 0xED:
		need, hi = 2, 0x9F // no surrogates
	case c >= 0xE1 && c <= 0xEF:
		need = 2
	case c == 0xF0:
		need, lo = 3, 0x90
	case c >= 0xF1 && c <= 0xF3:
		need = 3
	case c == 0xF4:
		need, hi = 3, 0x8F // nothing above U+10FFFF
	default:
		return 1
	}
	n := 1
	for k := 0; k < need && n < len(b); k++ {
		x := b[n]
		if k > 0 {
			lo, hi = 0x80, 0xBF
		}
		if x < lo || x > hi {
			break
		}
		n++
	}
	return n
}
