// Writes ../behaviors.json: HF tokenizers' ids for bytelevel-512's model
// behind a Split pre-tokenizer with each behaviour, inverted or not, and a
// Digits one (TestSplitBehaviors rebuilds the same tokenizers).
//   node behaviors.js
const fs = require('fs');
const path = require('path');
const { Tokenizer } = require('tokenizers');

const base = JSON.parse(fs.readFileSync(path.join(__dirname, '..', 'bytelevel-512', 'tokenizer.json'), 'utf8'));
const texts = ["I'm 12 o'clock: it's     fine!!\n\n  ok 'll 'S", 'a, b,, c ,d', '  lead and trail  ', 'x1y22z333', ',,,', '', 'no-delims', 'tab\tand\nnewline  end', '12 34'];
const pres = [];
for (const behavior of ['Removed', 'Isolated', 'MergedWithPrevious', 'MergedWithNext', 'Contiguous']) {
  for (const invert of [false, true]) {
    pres.push({ type: 'Split', pattern: { Regex: '\\s+' }, behavior, invert });
    pres.push({ type: 'Split', pattern: { String: ',' }, behavior, invert });
  }
}
pres.push({ type: 'Digits', individual_digits: false }, { type: 'Digits', individual_digits: true });
const bl = { type: 'ByteLevel', add_prefix_space: false, trim_offsets: true, use_regex: false };
const full = pres.map((p) => ({ type: 'Sequence', pretokenizers: [p, bl] }));
// GPT-2's split, built into ByteLevel.
full.push({ type: 'ByteLevel', add_prefix_space: false, trim_offsets: true, use_regex: true });
(async () => {
  const out = [];
  for (const pre of full) {
    const doc = JSON.parse(JSON.stringify(base));
    doc.pre_tokenizer = pre;
    const tok = Tokenizer.fromString(JSON.stringify(doc));
    for (const text of texts) {
      const e = await tok.encode(text, undefined, { addSpecialTokens: false });
      out.push({ pre, text, ids: e.getIds() });
    }
  }
  fs.writeFileSync(path.join(__dirname, '..', 'behaviors.json'), JSON.stringify(out) + '\n');
  console.log(out.length + ' encodings');
})();
