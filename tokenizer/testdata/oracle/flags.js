// Writes ../flags/: bytelevel-512's tokenizer.json plus added tokens that
// exercise lstrip, rstrip, single_word, normalized and overlapping
// contents, and ../flags/encodings.json with HF tokenizers' ids for a
// table of texts (TestAddedTokenFlags).
//   node flags.js
const fs = require('fs');
const path = require('path');
const { Tokenizer } = require('tokenizers');

const base = JSON.parse(fs.readFileSync(path.join(__dirname, '..', 'bytelevel-512', 'tokenizer.json'), 'utf8'));
let id = 1000; // above every id of the base file: a sparse id space on purpose
const tok = (content, o) => Object.assign({ id: id++, content, single_word: false, lstrip: false, rstrip: false, normalized: false, special: false }, o);
base.added_tokens.push(
  tok('<mask>', { lstrip: true, special: true }),
  tok('[R]', { rstrip: true }),
  tok('<both>', { lstrip: true, rstrip: true }),
  tok('word', { single_word: true }),
  tok('über', { single_word: true, normalized: true }),
  tok('abc', {}),
  tok('ab', { normalized: true }),
  tok('bcd', { normalized: true }),
  tok('abcdef', { normalized: true }),
  tok('\n\n', { special: true }),
);
const dir = path.join(__dirname, '..', 'flags');
fs.mkdirSync(dir, { recursive: true });
fs.writeFileSync(path.join(dir, 'tokenizer.json'), JSON.stringify(base, null, 1) + '\n');

const texts = [
  'a <mask> b', 'a   <mask>b', '<mask>', '  <mask>  ', 'x<mask><mask>', ' <mask> <mask> ',
  'a [R]   b', '[R]', '[R]\n\nz', 'a <both>  b', '<both><both>', '\t<both>\t',
  'word', 'a word b', 'sword', 'words', 'word_', '_word', 'word.', '(word)', 'wordword', 'word word', 'éword', 'word1', '1word', 'word\u0301',
  'über', 'Xüber', 'über!', ' über ',
  'abc', 'abcd', 'abcdef', 'xabcdefx', 'bcd', 'abbcd', 'ab', 'aab', 'abcabc', 'ababc',
  'p\n\nq', '\n\n\n', 'a\n\n<mask>\n\n', '', 'plain text only',
];
(async () => {
  const t = Tokenizer.fromFile(path.join(dir, 'tokenizer.json'));
  const entries = [];
  for (const text of texts) {
    const e = await t.encode(text, undefined, { addSpecialTokens: false });
    entries.push({ text, ids: e.getIds() });
  }
  fs.writeFileSync(path.join(dir, 'encodings.json'), JSON.stringify(entries, null, 1) + '\n');
  console.log(entries.length + ' encodings');
})();
