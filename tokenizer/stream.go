package tokenizer

import "unicode/utf8"

// Stream turns ids into text incrementally. A byte-level token may end in
// the middle of a multi-byte character (emoji and CJK are often split over
// two or three tokens), so Stream holds back an incomplete trailing UTF-8
// sequence until the bytes that complete it arrive. Concatenating every
// Add result and the final Flush gives exactly Decode(ids, skip): no byte is
// dropped or repeated, and no delta splits a valid character.
//
// A Stream is not safe for concurrent use.
type Stream struct {
	t       *Tokenizer
	skip    bool
	lossy   bool // replace invalid sequences (NewLossyStream)
	pending []byte
}

// NewStream starts a streaming decode.
func (t *Tokenizer) NewStream(skipSpecialTokens bool) *Stream {
	return &Stream{t: t, skip: skipSpecialTokens}
}

// Add feeds one id and returns the text that is now complete ("" if none).
func (s *Stream) Add(id int) string {
	b, ok := s.t.tokenBytes(id, s.skip)
	if !ok || len(b) == 0 {
		return ""
	}
	s.pending = append(s.pending, b...)
	cut := len(s.pending)
	// Only the last up-to-3 bytes can start a sequence still waiting for
	// continuation bytes; FullRune is false exactly for such a prefix of a
	// valid encoding (an impossible sequence is emitted as it is).
	for p := max(0, len(s.pending)-3); p < len(s.pending); p++ {
		if s.pending[p] >= 0xC0 && !utf8.FullRune(s.pending[p:]) {
			cut = p
			break
		}
	}
	if cut == 0 {
		return ""
	}
	out := s.text(s.pending[:cut])
	s.pending = append(s.pending[:0], s.pending[cut:]...)
	return out
}

func (s *Stream) text(b []byte) string {
	if s.lossy && !utf8.Valid(b) {
		return string(appendLossy(nil, b))
	}
	return string(b)
}

// Flush returns whatever is held back (an incomplete final character: raw
// bytes, or U+FFFD in a lossy stream) and resets the stream for reuse.
func (s *Stream) Flush() string {
	out := s.text(s.pending)
	s.pending = s.pending[:0]
	return out
}
