// Like fuzz.js, but the texts are real files (code, prose, any language):
//   find /usr/local/go/src -name '*.go' | head -2000 > list.txt
//   node files.js OUT.jsonl list.txt
// Each file (first 64 KB, if valid UTF-8) becomes one line.
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
(async () => {
  const v2 = loadTok('deepseek-v2');
  const v3 = loadTok('deepseek-v3');
  const files = fs.readFileSync(process.argv[3], 'utf8').split('\n').filter(Boolean);
  const out = fs.openSync(process.argv[2], 'w');
  let n = 0;
  for (const f of files) {
    const buf = fs.readFileSync(f).subarray(0, 65536);
    const text = new TextDecoder('utf-8', { fatal: false }).decode(buf);
    if (Buffer.from(text, 'utf8').compare(buf) !== 0) continue; // not valid UTF-8 (or cut mid-character)
    const e2 = await v2.encode(text, undefined, { addSpecialTokens: false });
    const e3 = await v3.encode(text, undefined, { addSpecialTokens: false });
    fs.writeSync(out, JSON.stringify({ text, v2: e2.getIds(), v3: e3.getIds() }) + '\n');
    n++;
  }
  console.log(n + ' files');
})();
