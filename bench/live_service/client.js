// A closed-loop load client for server.js: CONCURRENCY keep-alive connections, each with one
// request in flight, until REQUESTS requests have been answered. Every answer must be a 200
// whose body has the item's length (items.js, rendered once here at start-up); anything else,
// a connection error or an answer slower than 30 s counts as an error. Plain node.
//
// Usage: node client.js PORT REQUESTS CONCURRENCY [--wait]
//   --wait   print "ready" once set up, then start only when a line arrives on stdin (so that
//            whoever measures can read its counters right before the first request)
//
// Prints one JSON line at the end and exits 0 (the caller judges the errors):
//   {"requests":N,"ok":N,"errors":N,"wall_ms":F,"first_error":null|"..."}
// wall_ms runs from the first request sent to the last answer read. The items asked for
// come from a fixed-seed generator: every run asks for the same ones.
'use strict';
const http = require('http');
const zlib = require('zlib');
const items = require('./items');

const args = process.argv.slice(2);
const wait = args.includes('--wait');
const [port, requests, concurrency] = args.filter((a) => a !== '--wait').map(Number);
if (![port, requests, concurrency].every((n) => Number.isInteger(n) && n > 0)) {
  console.error('usage: node client.js PORT REQUESTS CONCURRENCY [--wait]');
  process.exit(2);
}
const TIMEOUT_MS = 30000;

// The body length of every item as it goes over the wire.
const expected = new Array(items.ITEMS);
for (let k = 0; k < items.ITEMS; k++) {
  const body = items.render(k);
  expected[k] = items.isDeflated(k) ? zlib.deflateSync(body, items.DEFLATE).length : body.length;
}

// xorshift32 over the items.
let seed = 0x6a09e667;
function nextItem() {
  seed ^= seed << 13;
  seed ^= seed >>> 17;
  seed ^= seed << 5;
  return (seed >>> 0) % items.ITEMS;
}

const agent = new http.Agent({ keepAlive: true, maxSockets: concurrency });
let sent = 0;
let ok = 0;
let errors = 0;
let firstError = null;

function fail(message) {
  errors++;
  if (firstError === null) firstError = message;
}

// One request; resolves when it is answered or has failed, never rejects.
function get(k) {
  return new Promise((resolve) => {
    let done = false;
    const finish = (error) => {
      if (done) return;
      done = true;
      if (error) fail(error);
      else ok++;
      resolve();
    };
    const req = http.get({ host: '127.0.0.1', port, path: `/item/${k}`, agent }, (res) => {
      let length = 0;
      res.on('data', (chunk) => {
        length += chunk.length;
      });
      res.on('end', () => {
        if (res.statusCode !== 200) finish(`GET /item/${k}: status ${res.statusCode}`);
        else if (length !== expected[k]) finish(`GET /item/${k}: ${length} bytes, expected ${expected[k]}`);
        else finish(null);
      });
      res.on('error', (e) => finish(`GET /item/${k}: ${e.message}`));
    });
    req.setTimeout(TIMEOUT_MS, () => {
      req.destroy(new Error(`no answer within ${TIMEOUT_MS} ms`));
    });
    req.on('error', (e) => finish(`GET /item/${k}: ${e.message}`));
  });
}

async function worker() {
  while (sent < requests) {
    sent++;
    await get(nextItem());
  }
}

async function run() {
  const start = process.hrtime.bigint();
  const workers = [];
  for (let i = 0; i < concurrency; i++) workers.push(worker());
  await Promise.all(workers);
  const wallMs = Number(process.hrtime.bigint() - start) / 1e6;
  agent.destroy();
  const result = { requests: sent, ok, errors, wall_ms: Number(wallMs.toFixed(3)), first_error: firstError };
  process.stdout.write(`${JSON.stringify(result)}\n`, () => process.exit(0));
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
