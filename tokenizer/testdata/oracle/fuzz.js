// Writes a large JSON-lines file of random texts with HuggingFace
// tokenizers' encodings, for TestOracleFile (set TOKENIZER_ORACLE_FILE):
//   node fuzz.js OUT.jsonl [count] [seed]
// Code points are drawn from all of Unicode (no surrogates), weighted
// toward the classes and range edges the DeepSeek regexes test.
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

const out = process.argv[2];
const count = +(process.argv[3] || 20000);
let seed = +(process.argv[4] || 12345) >>> 0 || 1;
function rnd(n) {
  seed ^= seed << 13; seed >>>= 0;
  seed ^= seed >>> 17;
  seed ^= seed << 5; seed >>>= 0;
  return seed % n;
}
const edges = [0x9FA5, 0x9FA6, 0x4E00, 0x4DFF, 0x3040, 0x303F, 0x309F, 0x30A0, 0x30FF, 0x3100, 0x0800, 0x07FF, 0xAC00, 0xABFF, 0xD7FF, 0xD7A3,
  0xFF01, 0xFF0F, 0xFF10, 0xFF1A, 0xFF5E, 0x2018, 0x201F, 0x3000, 0x3002, 0x3003, 0x00B5, 0x00D7, 0x00F7, 0x1F7D, 0x1FBE, 0x2126, 0x212A];
const spaces = [0x20, 0x20, 0x20, 0x09, 0x0A, 0x0D, 0x0B, 0x0C, 0x85, 0xA0, 0x1680, 0x2000, 0x200A, 0x2028, 0x2029, 0x202F, 0x205F, 0x3000, 0x180E, 0x200B, 0x1C, 0x1F];
const special = ['<｜User｜>', '<｜Assistant｜>', '<｜begin▁of▁sentence｜>', '<|EOT|>', '<｜', "'s", "'ll", '\r\n'];
function cp() {
  switch (rnd(12)) {
    case 0: case 1: case 2: return 0x20 + rnd(0x5F); // printable ASCII
    case 3: return spaces[rnd(spaces.length)];
    case 4: return 0x30 + rnd(10);
    case 5: return 0x80 + rnd(0x780); // Latin-1 .. Arabic
    case 6: return edges[rnd(edges.length)] + rnd(3) - 1;
    case 7: return 0x300 + rnd(0x70); // combining marks
    case 8: { const c = rnd(0x10000); return c >= 0xD800 && c < 0xE000 ? 0x41 : c; }
    case 9: return 0x1F300 + rnd(0x400); // emoji
    case 10: return 0x10000 + rnd(0x100000); // astral, mostly unassigned
    default: return 0x4E00 + rnd(0x5200);
  }
}
function text() {
  const n = rnd(30);
  let s = '';
  for (let i = 0; i < n; i++) {
    s += rnd(25) === 0 ? special[rnd(special.length)] : String.fromCodePoint(cp());
  }
  return s;
}
(async () => {
  const v2 = loadTok('deepseek-v2');
  const v3 = loadTok('deepseek-v3');
  const lines = [];
  for (let i = 0; i < count; i++) {
    const t = text();
    const e2 = await v2.encode(t, undefined, { addSpecialTokens: false });
    const e3 = await v3.encode(t, undefined, { addSpecialTokens: false });
    lines.push(JSON.stringify({ text: t, v2: e2.getIds(), v3: e3.getIds() }));
  }
  fs.writeFileSync(out, lines.join('\n') + '\n');
  console.log(count + ' lines -> ' + out);
})();
