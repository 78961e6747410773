package tokenizer

import "unicode/utf8"

// byteToRune is GPT-2's bytes_to_unicode table: byte-level BPE spells every
// byte as a printable character so that vocab entries are valid strings.
// Printable Latin-1 bytes stand for themselves; the other 68 bytes map, in
// order, to U+0100.. .
var (
	byteToRune [256]rune
	runeToByte = map[rune]byte{}
)

func init() {
	n := 0
	for b := 0; b < 256; b++ {
		if (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF) {
			byteToRune[b] = rune(b)
		} else {
			byteToRune[b] = rune(256 + n)
			n++
		}
		runeToByte[byteToRune[b]] = byte(b)
	}
}

// byteLevelString spells raw bytes in the byte-level alphabet.
func byteLevelString(raw string) string {
	buf := make([]byte, 0, 2*len(raw))
	for i := 0; i < len(raw); i++ {
		buf = utf8.AppendRune(buf, byteToRune[raw[i]])
	}
	return string(buf)
}

// byteLevelDecode undoes byteLevelString the way HuggingFace's ByteLevel
// decoder does for one token: if every character of the token belongs to the
// byte alphabet it yields those bytes, otherwise (added tokens such as
// "<｜User｜>") the token's own UTF-8 bytes.
func byteLevelDecode(tok string) []byte {
	out := make([]byte, 0, len(tok))
	for _, r := range tok {
		b, ok := runeToByte[r]
		if !ok {
			return []byte(tok)
		}
		out = append(out, b)
	}
	return out
}
