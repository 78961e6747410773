// Package tokenizer turns text into DeepSeek token ids and back, exactly as
// HuggingFace `tokenizers` (and transformers' fast tokenizers) do, and
// renders a model's Jinja chat template as transformers' apply_chat_template.
//
// It reads the two files every HuggingFace model directory ships:
// tokenizer.json (the pipeline: added tokens, normalizer, pre-tokenizer,
// BPE model, post-processor, decoder) and tokenizer_config.json (BOS/EOS
// flags, special-token strings, chat_template). Only the pieces DeepSeek's
// byte-level BPE tokenizers use are implemented; anything else fails in Load
// with an error naming the unsupported type rather than tokenizing wrongly.
//
// # Invalid UTF-8
//
// HuggingFace only ever sees valid Unicode (Python str). A Go string may hold
// any bytes, so Encode defines: every byte that is not part of a valid UTF-8
// sequence counts as one U+FFFD character when the pre-tokenizer decides
// where pieces split, but the byte itself is what byte-level BPE encodes.
// Hence for every string x, Decode(Encode(x, false), false) == x byte for
// byte, and for valid UTF-8 the ids equal HuggingFace's. Decode returns the
// raw bytes of the tokens; it does not replace invalid sequences with U+FFFD
// as HuggingFace's decode does (callers that need valid UTF-8 can apply
// strings.ToValidUTF8).
//
// A Tokenizer is safe for concurrent use.
package tokenizer
