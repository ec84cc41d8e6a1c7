// node_workload: a few seconds of what a Node service does to native memory, for
// `cargo xtask bench`: Buffers of mixed sizes (some written, some not), JSON, strings, zlib,
// and a bounded set of retained Buffers.
//
// Usage: node node_workload.js [--wait] [ROUNDS]        (default 6000 rounds)
//
//   --wait   print "ready", then start only once a line arrives on stdin (so that a tracer
//            can attach to the running process first)
//
// Prints elapsed_ms=<float> (the rounds only, not node's start-up) and calls=<n>. Every run
// does the same work: sizes come from a fixed-seed generator.
'use strict';
const zlib = require('zlib');

const args = process.argv.slice(2);
const wait = args.includes('--wait');
const rest = args.filter((a) => a !== '--wait');
const rounds = rest.length > 0 ? Number(rest[0]) : 6000;
if (!Number.isInteger(rounds) || rounds <= 0 || rest.length > 1) {
  console.error('usage: node node_workload.js [--wait] [ROUNDS]');
  process.exit(2);
}

// xorshift32: the same sequence every run.
let seed = 0x9e3779b9;
function random() {
  seed ^= seed << 13;
  seed ^= seed >>> 17;
  seed ^= seed << 5;
  return (seed >>> 0) / 4294967296;
}
// Log-uniform between 64 bytes and 1 MiB: many small Buffers, a few large ones.
function bufferSize() {
  return Math.floor(64 * Math.pow(16384, random()));
}

const retained = [];
const RETAINED_MAX = 256;
const text = 'The quick brown fox jumps over the lazy dog. '.repeat(400);

function round(i) {
  // Buffers: zero-filled (calloc), uninitialized (malloc) and written.
  for (let k = 0; k < 8; k++) {
    const size = bufferSize();
    const b = k % 2 === 0 ? Buffer.alloc(size) : Buffer.allocUnsafeSlow(size);
    b.fill(i & 0xff, 0, Math.min(size, 4096));
    if ((i + k) % 37 === 0) {
      retained[(i + k) % RETAINED_MAX] = b;
    }
  }
  // JSON round trip of a medium object.
  const obj = { id: i, name: `item-${i}`, tags: [], nested: { a: i * 2, b: String(i) } };
  for (let k = 0; k < 20; k++) obj.tags.push(`tag-${k}-${i % 97}`);
  const parsed = JSON.parse(JSON.stringify(obj));
  // Strings: slicing, case changes, split and join, and a Buffer from one.
  const piece = text.slice(i % 100, 2000 + (i % 300)).toUpperCase();
  const words = piece.split(' ').reverse().join('_');
  const encoded = Buffer.from(words + parsed.name, 'utf8');
  // zlib: compress and inflate a few kilobytes (zlib's state and windows come from malloc).
  if (i % 4 === 0) {
    const packed = zlib.deflateSync(encoded, { level: 1 });
    const unpacked = zlib.inflateSync(packed);
    if (unpacked.length !== encoded.length) throw new Error('zlib round trip failed');
  }
  return encoded.length;
}

function run() {
  const start = process.hrtime.bigint();
  let total = 0;
  for (let i = 0; i < rounds; i++) total += round(i);
  const elapsed = Number(process.hrtime.bigint() - start) / 1e6;
  console.log(`elapsed_ms=${elapsed.toFixed(3)}`);
  console.log(`checksum=${total} retained=${retained.filter(Boolean).length}`);
  // Exit at once, holding the retained Buffers (they are live at the end).
  process.exit(0);
}

if (wait) {
  console.log('ready');
  process.stdin.once('data', () => {
    process.stdin.pause();
    run();
  });
} else {
  run();
}
