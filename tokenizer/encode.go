package tokenizer

import "strings"

// Encode returns the token ids of text, as HuggingFace's
// tokenizer(text, add_special_tokens=addSpecialTokens)["input_ids"]: added
// and special tokens written in the text are always recognised, and
// addSpecialTokens adds the BOS/EOS the post-processor (or, for Llama-class
// tokenizers, tokenizer_config.json's add_bos_token/add_eos_token) asks for.
func (t *Tokenizer) Encode(text string, addSpecialTokens bool) []int {
	out := make([]int, 0, len(text)/3+4)
	if addSpecialTokens {
		out = append(out, t.prefix...)
	}
	out = t.appendIDs(out, text)
	if addSpecialTokens {
		out = append(out, t.suffix...)
	}
	return out
}

func (t *Tokenizer) appendIDs(out []int, text string) []int {
	sc := scratchPool.Get().(*bpeScratch)
	defer sc.release()
	if len(sc.levels) < len(t.pre) {
		sc.levels = make([][]span, len(t.pre))
	}
	var segBuf [16]segment
	// Tokens with normalized=false are split out first, on the raw text;
	// the normalized ones in what is left (HF AddedVocabulary).
	segs := t.nonNormalized.split(text, 0, len(text), segBuf[:0])
	for _, sg := range segs {
		if sg.id >= 0 {
			out = append(out, sg.id)
			continue
		}
		var inner [8]segment
		for _, sg2 := range t.normalizedToks.split(text, sg.start, sg.end, inner[:0]) {
			if sg2.id >= 0 {
				out = append(out, sg2.id)
			} else if sg2.start < sg2.end {
				out = t.encodePiece(text, span{sg2.start, sg2.end}, 0, out, sc, false)
			}
		}
	}
	return out
}

// encodePiece runs pre-tokenizer steps level.. on p depth first, so each
// level's buffer holds only the sub-pieces of one piece, then BPE on the
// leaves.
//
// What a piece becomes from a given level on depends only on its text, so
// the first time a piece is short enough it is looked up in that level's
// cache, and on a miss the rest of its pipeline runs uncached (inCached)
// and the result is stored. For DeepSeek-V3 that level is the BPE leaf
// (words come out of the last split); for V2 it is after the letter split,
// which skips four more splits for every repeated word.
func (t *Tokenizer) encodePiece(text string, p span, level int, out []int, sc *bpeScratch, inCached bool) []int {
	w := text[p.start:p.end]
	if !inCached && len(w) <= maxCachedWord && len(w) > 1 {
		c := &t.caches[level]
		if ids, ok := c.get(w); ok {
			for _, id := range ids {
				out = append(out, int(id))
			}
			return out
		}
		start := len(out)
		out = t.encodePiece(text, p, level, out, sc, true)
		ids := make([]int32, len(out)-start)
		for i, id := range out[start:] {
			ids[i] = int32(id)
		}
		c.put(w, ids)
		return out
	}
	if level == len(t.pre) {
		return t.bpeWord(w, out, sc)
	}
	pieces := t.pre[level].split(text, p, sc.levels[level][:0], &sc.matches)
	sc.levels[level] = pieces // deeper levels use other buffers
	for _, q := range pieces {
		out = t.encodePiece(text, q, level+1, out, sc, inCached)
	}
	return out
}

// Decode returns the text of ids: the concatenated bytes of each token as
// the ByteLevel decoder spells them. Ids that are no token (such as the
// padding rows between the vocab and the model's vocab_size) are skipped, as
// HuggingFace skips them; so are special tokens when skipSpecialTokens.
func (t *Tokenizer) Decode(ids []int, skipSpecialTokens bool) string {
	var b strings.Builder
	b.Grow(4 * len(ids)) // ~4 bytes per token on average text; Builder grows if needed
	for _, id := range ids {
		if uint(id) >= uint(len(t.tokens)) || !t.known[id] || (skipSpecialTokens && t.special[id]) {
			continue
		}
		b.Write(t.decoded[t.off[id]:t.off[id+1]])
	}
	return b.String()
}

// tokenBytes returns the decoded bytes of one id.
func (t *Tokenizer) tokenBytes(id int, skipSpecial bool) ([]byte, bool) {
	if id < 0 || id >= len(t.tokens) || !t.known[id] || (skipSpecial && t.special[id]) {
		return nil, false
	}
	return t.decoded[t.off[id]:t.off[id+1]], true
}

// preTokenize returns the pieces the pre-tokenizer cuts text into (without
// added-token handling); tests compare it with HF's pre_tokenize_str.
func (t *Tokenizer) preTokenize(text string) []string {
	pieces := []span{{0, len(text)}}
	var ms []span
	for _, st := range t.pre {
		var next []span
		for _, p := range pieces {
			next = st.split(text, p, next, &ms)
		}
		pieces = next
	}
	out := make([]string, len(pieces))
	for i, p := range pieces {
		out[i] = text[p.start:p.end]
	}
	return out
}
