// What the live service answers for each item, shared by server.js (which renders it on every
// request) and client.js (which renders each item once at start-up, to know the body length
// every answer must have). Plain node, no packages.
//
// Item K (0 <= K < ITEMS) is a JSON record, a block of text made from it, and a payload of
// 2-32 KiB; every 8th item is sent deflated (zlib level 1, Content-Encoding: deflate). The
// bytes depend on K alone, so every answer to the same path has the same length.
'use strict';

const ITEMS = 1024;
const DEFLATE = { level: 1 };

function isDeflated(k) {
  return k % 8 === 0;
}

function record(k) {
  const tags = [];
  for (let t = 0; t < 16; t++) tags.push(`tag-${(k * 31 + t) % 97}`);
  const values = [];
  for (let v = 0; v < 32; v++) values.push((k * 40503 + v * 9973) % 100000);
  return {
    id: k,
    name: `item-${k}`,
    owner: `user-${k % 53}`,
    tags,
    values,
    nested: { a: k * 2, b: String(k), even: k % 2 === 0 },
  };
}

// The uncompressed body of item `k`: JSON both ways, string work, and Buffers large enough
// that node's allocator takes them from malloc/calloc rather than its pool.
function render(k) {
  const rec = JSON.parse(JSON.stringify(record(k)));
  const text = rec.tags
    .map((t) => `${rec.name}:${rec.owner}:${t}`)
    .join(' ')
    .toUpperCase()
    .split(' ')
    .reverse()
    .join('\n');
  const head = Buffer.from(JSON.stringify(rec) + '\n', 'utf8');
  const words = Buffer.from(text + '\n', 'utf8');
  const size = 1024 * (2 + ((k * 7919) % 31));
  const payload = Buffer.alloc(size, k % 251);
  for (let off = 0; off + 64 <= size; off += 4096) payload.write(rec.name, off, 'latin1');
  return Buffer.concat([head, words, payload]);
}

module.exports = { ITEMS, DEFLATE, isDeflated, render };
