// Regenerates ../oracle.json: reference encodings made by HuggingFace
// tokenizers (the Rust library, through its official Node binding) for the
// DeepSeek-V2 and -V3 tokenizer.json files in ../, and for the small
// tokenizer WriteByteLevel writes (../bytelevel-512, see
// TestWriteByteLevelGolden). Run:
//   npm install tokenizers@0.23.2 && node gen.js
// Inputs: a hand-written table (cases.txt, one case per block, see there)
// and random strings from a fixed-seed generator mixing the scripts and
// character classes the pre-tokenizer regexes distinguish.
const fs = require('fs');
const zlib = require('zlib');
const path = require('path');
const { Tokenizer } = require('tokenizers');

function loadTok(dir) {
  if (fs.existsSync(path.join(__dirname, '..', dir, 'tokenizer.json'))) return Tokenizer.fromFile(path.join(__dirname, '..', dir, 'tokenizer.json'));
  const tmp = path.join(require('os').tmpdir(), 'tok-' + path.basename(dir) + '.json');
  fs.writeFileSync(tmp, zlib.gunzipSync(fs.readFileSync(path.join(__dirname, '..', dir, 'tokenizer.json.gz'))));
  return Tokenizer.fromFile(tmp);
}

// xorshift32: a fixed sequence on every machine.
let seed = 0x9e3779b9;
function rnd(n) {
  seed ^= seed << 13; seed >>>= 0;
  seed ^= seed >>> 17;
  seed ^= seed << 5; seed >>>= 0;
  return seed % n;
}
const pick = (a) => a[rnd(a.length)];

const pools = [
  // ASCII words, capitals, contractions
  ['the', 'The', ' quick', 'brown', 'FOX', "'s", "'t", "'re", "don't", "I'll", 'x', 'Hello', 'world', 'a', 'I', 'ing', 'tion', 'ZZZ'],
  // ASCII punctuation and code
  ['.', ',', '!', '?', '(', ')', '{', '}', '[', ']', '<', '>', '=', '==', '=>', '->', '::', ';', ':', '"', "'", '`', '```', '#', '$', '%', '&', '*', '+', '-', '--', '/', '//', '\\', '^', '_', '|', '~', '@', '...', '.md', '_id', '-v', '#include', 'foo()', 'x+=1;', '0x1F', 'if (a<b) {'],
  // digits and numbers
  ['0', '1', '12', '123', '1234', '12345', '3.14', '1,000', '2024-01-01', '٣', '४२', '１２３', '½', '¾', 'Ⅷ', '①', '²', '০', '๓'],
  // whitespace
  [' ', ' ', '  ', '   ', '\t', '\n', '\n\n', '\r\n', '\r', ' \n', '\n ', '\t\t', '\u00a0', '\u3000', '\u2003', '\u2028', '\u0085', '\u000b', '\u000c', '    '],
  // CJK, kana, Korean
  ['中', '中文', '我想在', '工作', '天', '龥', '龦', '𠀀', '日本語', 'ひらがな', 'カタカナ', 'ー', '한국어', '가', '。', '，', '！', '、', '「', '」', '：', '（'],
  // other scripts, marks
  ['Привет', 'мир', 'Ελληνικά', 'עברית', 'العربية', 'हिन्दी', 'ไทย', 'កាន់', 'Türkçe', 'Ăn', 'Cửa', 'é', 'e\u0301', '\u0301', 'ß', 'ﬁ', 'Ω', 'Ω', 'K', 'µ', 'ǅ', 'ʼ', 'ᾈ'],
  // emoji and symbols
  ['😀', '🦙', '🚀', '👍🏽', '👨‍👩‍👧', '😶‍🌫️', '✅', '❤️', '🇫🇷', '©', '™', '€', '£', '→', '∑', '√', '°', '•', '…', '—', '–', '“', '”', '‘', '’', '«', '»', '\ufffd', '\u200b', '\u200d', '\ufeff'],
  // DeepSeek special token texts and near misses
  ['<｜begin▁of▁sentence｜>', '<｜end▁of▁sentence｜>', '<｜User｜>', '<｜Assistant｜>', '<|EOT|>', '<｜fim▁hole｜>', '<｜tool▁sep｜>', '<｜place▁holder▁no▁7｜>', '<｜Us', '｜>', '<｜', '<|', '▁'],
];

function randomText() {
  const n = 1 + rnd(24);
  let s = '';
  for (let i = 0; i < n; i++) {
    const pool = pools[rnd(pools.length)];
    s += pick(pool);
    if (rnd(3) === 0) s += ' ';
  }
  return s;
}

function readCases() {
  // cases.txt: cases separated by a line holding only "----"; escapes
  // \n \r \t \\ and \u{XXXX} are expanded so whitespace is visible.
  const raw = fs.readFileSync(path.join(__dirname, 'cases.txt'), 'utf8');
  return raw.split('\n----\n').map((c) => c.replace(/\\(n|r|t|\\|u\{([0-9A-Fa-f]+)\})/g, (m, e, hex) =>
    e === 'n' ? '\n' : e === 'r' ? '\r' : e === 't' ? '\t' : e === '\\' ? '\\' : String.fromCodePoint(parseInt(hex, 16))));
}

(async () => {
  const v2 = loadTok('deepseek-v2');
  const v3 = loadTok('deepseek-v3');
  const bl = loadTok('bytelevel-512');
  const texts = readCases();
  for (let i = 0; i < 1500; i++) texts.push(randomText());
  const entries = [];
  for (const text of texts) {
    const e2 = await v2.encode(text, undefined, { addSpecialTokens: false });
    const e3 = await v3.encode(text, undefined, { addSpecialTokens: false });
    const d3 = await v3.decode(e3.getIds(), false);
    if (d3 !== text) throw new Error('v3 round trip failed for ' + JSON.stringify(text));
    const eb = await bl.encode(text, undefined, { addSpecialTokens: false });
    entries.push({ text, v2: e2.getIds(), v3: e3.getIds(), bytelevel512: eb.getIds() });
  }
  const out = { generator: 'testdata/oracle/gen.js', tokenizers: require('tokenizers/package.json').version, add_special_tokens: false, entries };
  fs.writeFileSync(path.join(__dirname, '..', 'oracle.json'), JSON.stringify(out) + '\n');
  console.log(entries.length + ' entries');
})();
