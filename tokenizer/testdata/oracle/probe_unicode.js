// Asks HuggingFace tokenizers' own regex engine (Oniguruma) and Rust's
// char::is_numeric which code points are in \p{L}, \p{M}, \p{N}, \p{P},
// \p{S}, \s and numeric; writes them as ranges to OUT.json. gen_unicode.go
// turns the difference from Go's tables into ../../unicode_hf.go.
//   node probe_unicode.js OUT.json
const fs = require('fs');
const { Tokenizer, digitsPreTokenizer } = require('tokenizers');

// A Split with a Regex pattern can only be built from JSON.
function regexSplit(pat) {
  const tok = Tokenizer.fromString(JSON.stringify({
    version: '1.0', added_tokens: [], normalizer: null, post_processor: null, decoder: null,
    pre_tokenizer: { type: 'Split', pattern: { Regex: pat }, behavior: 'Removed', invert: true },
    model: { type: 'WordLevel', vocab: { '[UNK]': 0 }, unk_token: '[UNK]' },
  }));
  return tok.getPreTokenizer();
}

function all() {
  const cps = [];
  for (let c = 0; c <= 0x10FFFF; c++) {
    if (c >= 0xD800 && c <= 0xDFFF) continue;
    cps.push(c);
  }
  return cps;
}
const cps = all();

function toRanges(set) {
  const s = [...set].sort((a, b) => a - b);
  const r = [];
  for (const c of s) {
    if (r.length && r[r.length - 1][1] === c - 1) r[r.length - 1][1] = c;
    else r.push([c, c]);
  }
  return r;
}

function probeRegex(pat) {
  // invert + removed keeps exactly the single-character matches.
  const pre = regexSplit(pat);
  const set = new Set();
  const chunk = 65536;
  for (let i = 0; i < cps.length; i += chunk) {
    const s = String.fromCodePoint(...cps.slice(i, i + chunk));
    for (const [piece] of pre.preTokenizeString(s)) {
      for (const ch of piece) set.add(ch.codePointAt(0));
    }
  }
  return toRanges(set);
}

function probeNumeric() {
  const pre = digitsPreTokenizer(true);
  const set = new Set();
  const chunk = 32768;
  for (let i = 0; i < cps.length; i += chunk) {
    let s = '';
    for (const c of cps.slice(i, i + chunk)) s += 'a' + String.fromCodePoint(c);
    for (const [piece] of pre.preTokenizeString(s)) {
      const chars = [...piece];
      if (chars.length === 1 && piece !== 'a') set.add(piece.codePointAt(0));
    }
  }
  return toRanges(set);
}

const out = {};
for (const [k, pat] of [['L', '\\p{L}'], ['M', '\\p{M}'], ['N', '\\p{N}'], ['P', '\\p{P}'], ['S', '\\p{S}'], ['space', '\\s']]) {
  out[k] = probeRegex(pat);
}
out.numeric = probeNumeric();
fs.writeFileSync(process.argv[2], JSON.stringify(out));
for (const k in out) console.log(k, out[k].length, 'ranges');
