package tokenizer

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
)

// Special tokens of the tokenizers WriteByteLevel makes, spelled as
// DeepSeek's so prompts and templates look the same as with a real model.
const (
	BOSText       = "<｜begin▁of▁sentence｜>"
	EOSText       = "<｜end▁of▁sentence｜>"
	UserText      = "<｜User｜>"
	AssistantText = "<｜Assistant｜>"
)

// byteLevelChatTemplate is DeepSeek-V3's chat template without the tool
// branches: systems joined by blank lines after the BOS, then
// <｜User｜>/<｜Assistant｜> turns, each assistant turn closed by EOS.
const byteLevelChatTemplate = "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}" +
	"{% set ns = namespace(system_prompt='', is_first_sp=true) %}" +
	"{%- for message in messages %}{%- if message['role'] == 'system' %}{%- if ns.is_first_sp %}" +
	"{% set ns.system_prompt = ns.system_prompt + message['content'] %}{% set ns.is_first_sp = false %}" +
	"{%- else %}{% set ns.system_prompt = ns.system_prompt + '\\n\\n' + message['content'] %}{%- endif %}{%- endif %}{%- endfor %}" +
	"{{ bos_token }}{{ ns.system_prompt }}" +
	"{%- for message in messages %}{%- if message['role'] == 'user' %}{{ '" + UserText + "' + message['content'] }}" +
	"{%- elif message['role'] == 'assistant' %}{{ '" + AssistantText + "' + message['content'] + eos_token }}{%- endif %}{%- endfor %}" +
	"{% if add_generation_prompt %}{{ '" + AssistantText + "' }}{% endif %}"

// trainingText seeds the merges of WriteByteLevel's tokenizer so that
// common English, code and chat words take fewer tokens than bytes.
const trainingText = `The quick brown fox jumps over the lazy dog. You are a helpful assistant.
Hello, how are you today? I am fine, thank you. What is the capital of France? The capital of France is Paris.
Please answer the question in one sentence. Explain the answer step by step, and then give the final answer.
The model generates text one token at a time; each token is chosen from the probability distribution.
func main() { fmt.Println("hello, world") } for i := 0; i < n; i++ { sum += x[i] } return nil, err
def main():\n    print("hello world")\n    return 0\nif __name__ == "__main__":\n    main()
The mixture of experts layer routes each token to a few experts, and the attention layer reads the cache.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 2024. Once upon a time there was a little model that could.
中文的句子。我们今天学习语言模型。你好，世界！日本語のテキスト。`

// WriteByteLevel writes tokenizer.json and tokenizer_config.json for a small
// byte-level BPE into dir: the 256 byte tokens (ids 0-255), merges learned
// from a built-in text, letter n-grams that fill the vocab to vocabSize-4
// tokens, then BOS, EOS, <｜User｜> and <｜Assistant｜> as the last four ids
// (so VocabSize() == vocabSize and every id decodes to text). It uses DeepSeek-V3's
// pre-tokenizer, and the config carries a DeepSeek-V3-style chat template,
// so text prompts and chats work on tiny random models.
func WriteByteLevel(dir string, vocabSize int) error {
	if vocabSize < 256+4 {
		return fmt.Errorf("tokenizer: WriteByteLevel: vocabSize %d < 260 (256 bytes + 4 special tokens)", vocabSize)
	}
	tj, cfg, err := byteLevelFiles(vocabSize)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "tokenizer.json"), tj, 0o644); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, "tokenizer_config.json"), cfg, 0o644)
}

func byteLevelFiles(vocabSize int) (tokenizerJSON, configJSON []byte, err error) {
	vocab := make(map[string]int, vocabSize)
	for b := 0; b < 256; b++ {
		vocab[string(byteToRune[b])] = b
	}
	merges := trainMerges(trainingText, vocabSize-4-256)
	for _, m := range merges {
		if _, dup := vocab[m[0]+m[1]]; !dup { // two merges may spell the same token
			vocab[m[0]+m[1]] = len(vocab)
		}
	}
	fillVocab(vocab, vocabSize-4)
	var added []jsonAddedToken
	for i, s := range []string{BOSText, EOSText, UserText, AssistantText} {
		added = append(added, jsonAddedToken{
			ID: len(vocab) + i, Content: s, Special: i < 2, Normalized: i >= 2,
		})
	}
	type rawMap = map[string]any
	preTok := rawMap{"type": "Sequence", "pretokenizers": []rawMap{
		{"type": "Split", "pattern": rawMap{"Regex": v3Digits}, "behavior": "Isolated", "invert": false},
		{"type": "Split", "pattern": rawMap{"Regex": v3CJK}, "behavior": "Isolated", "invert": false},
		{"type": "Split", "pattern": rawMap{"Regex": v3Main}, "behavior": "Isolated", "invert": false},
		{"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false},
	}}
	byteLevel := rawMap{"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true}
	mergeStrs := make([]string, len(merges))
	for i, m := range merges {
		mergeStrs[i] = m[0] + " " + m[1]
	}
	doc := rawMap{
		"version": "1.0", "truncation": nil, "padding": nil,
		"added_tokens":   added,
		"normalizer":     rawMap{"type": "Sequence", "normalizers": []any{}},
		"pre_tokenizer":  preTok,
		"post_processor": byteLevel,
		"decoder":        rawMap{"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
		"model": rawMap{
			"type": "BPE", "dropout": nil, "unk_token": nil, "continuing_subword_prefix": nil,
			"end_of_word_suffix": nil, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
			"vocab": vocab, "merges": mergeStrs,
		},
	}
	if tokenizerJSON, err = json.MarshalIndent(doc, "", " "); err != nil {
		return nil, nil, err
	}
	cfg := rawMap{
		"add_bos_token": true, "add_eos_token": false,
		"bos_token": BOSText, "eos_token": EOSText, "pad_token": EOSText, "unk_token": nil,
		"clean_up_tokenization_spaces": false, "legacy": true,
		"model_max_length": 16384, "tokenizer_class": "LlamaTokenizerFast",
		"chat_template": byteLevelChatTemplate,
	}
	if configJSON, err = json.MarshalIndent(cfg, "", " "); err != nil {
		return nil, nil, err
	}
	return tokenizerJSON, configJSON, nil
}

// fillVocab adds letter n-grams (space-prefixed or not, shortest first)
// until the vocab has n tokens. No merge produces them, so encoding is
// unchanged, but every id a tiny random model can emit decodes to text.
func fillVocab(vocab map[string]int, n int) {
	const letters = "etaoinshrdlucmfwypvbgkjqxz"
	grams := []string{""}
	for len(vocab) < n {
		var next []string
		for _, g := range grams {
			for i := 0; i < len(letters) && len(vocab) < n; i++ {
				w := g + letters[i:i+1]
				next = append(next, w)
				for _, tok := range []string{byteLevelString(" " + w), w} {
					if _, ok := vocab[tok]; !ok && len(vocab) < n && len(w) > 1 {
						vocab[tok] = len(vocab)
					}
				}
			}
		}
		grams = next
	}
}

// trainMerges learns up to n BPE merges from text, pre-tokenized with
// DeepSeek-V3's splits: repeatedly merge the most frequent adjacent pair
// (ties broken by the pair's spelling, so the output is deterministic).
func trainMerges(text string, n int) [][2]string {
	steps := []preStep{
		&splitStep{m: digits3Matcher{}, behavior: isolated},
		&splitStep{m: cjkMatcher{}, behavior: isolated},
		&splitStep{m: v3Matcher{}, behavior: isolated},
	}
	pieces := []span{{0, len(text)}}
	var ms []span
	for _, st := range steps {
		var next []span
		for _, p := range pieces {
			next = st.split(text, p, next, &ms)
		}
		pieces = next
	}
	counts := map[string]int{}
	for _, p := range pieces {
		counts[text[p.start:p.end]]++
	}
	type word struct {
		syms  []string
		count int
	}
	var words []word
	for w, c := range counts {
		syms := make([]string, 0, len(w))
		for i := 0; i < len(w); i++ {
			syms = append(syms, string(byteToRune[w[i]]))
		}
		words = append(words, word{syms, c})
	}
	sort.Slice(words, func(i, j int) bool {
		return strings.Join(words[i].syms, "") < strings.Join(words[j].syms, "")
	})
	var merges [][2]string
	for len(merges) < n {
		pairs := map[[2]string]int{}
		for _, w := range words {
			for i := 0; i+1 < len(w.syms); i++ {
				pairs[[2]string{w.syms[i], w.syms[i+1]}] += w.count
			}
		}
		var best [2]string
		bestN := 1 // a pair seen once compresses nothing worth a token
		for p, c := range pairs {
			if c > bestN || (c == bestN && bestN > 1 && (p[0]+" "+p[1]) < (best[0]+" "+best[1])) {
				best, bestN = p, c
			}
		}
		if bestN < 2 {
			break
		}
		merges = append(merges, best)
		for wi := range words {
			s := words[wi].syms
			out := s[:0]
			for i := 0; i < len(s); i++ {
				if i+1 < len(s) && s[i] == best[0] && s[i+1] == best[1] {
					out = append(out, best[0]+best[1])
					i++
				} else {
					out = append(out, s[i])
				}
			}
			words[wi].syms = out
		}
	}
	return merges
}
