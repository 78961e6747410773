// Writes ../decode.json: HF tokenizers' decode() of random id sequences for
// V2 and V3, with and without skip_special_tokens. The ids mix byte tokens
// (so many sequences are invalid UTF-8), whole-word tokens, special and
// added tokens, and ids that are no token (V2's padding range).
//   node decode.js
const fs = require('fs');
const zlib = require('zlib');
const path = require('path');
const os = require('os');
const { Tokenizer } = require('tokenizers');

function loadTok(dir) {
  const tmp = path.join(os.tmpdir(), 'tok-' + path.basename(dir) + '.json');
  fs.writeFileSync(tmp, zlib.gunzipSync(fs.readFileSync(path.join(__dirname, '..', dir, 'tokenizer.json.gz'))));
  return Tokenizer.fromFile(tmp);
}
let seed = 0xdecade;
function rnd(n) {
  seed ^= seed << 13; seed >>>= 0;
  seed ^= seed >>> 17;
  seed ^= seed << 5; seed >>>= 0;
  return seed % n;
}
(async () => {
  const out = [];
  for (const [name, special, vocab, rows] of [['deepseek-v2', [100000, 100001], 100000, 102400], ['deepseek-v3', [0, 1, 2, 128803, 128804, 128805], 128000, 129280]]) {
    const tok = loadTok(name);
    // Byte tokens: ids whose token is a single byte-level character.
    const byteIDs = [];
    for (let id = 0; id < 2000; id++) {
      const t = tok.idToToken(id);
      if (t && [...t].length === 1) byteIDs.push(id);
    }
    for (let i = 0; i < 400; i++) {
      const ids = [];
      for (let n = 1 + rnd(12); n > 0; n--) {
        switch (rnd(5)) {
          case 0: case 1: ids.push(byteIDs[rnd(byteIDs.length)]); break;
          case 2: ids.push(rnd(vocab)); break;
          case 3: ids.push(special[rnd(special.length)]); break;
          default: ids.push(vocab + rnd(rows - vocab)); break;
        }
      }
      for (const skip of [false, true]) {
        out.push({ model: name, ids, skip, text: await tok.decode(ids, skip) });
      }
    }
  }
  fs.writeFileSync(path.join(__dirname, '..', 'decode.json'), JSON.stringify(out) + '\n');
  console.log(out.length + ' decodes');
})();
