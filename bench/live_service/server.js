// The live service of `cargo xtask bench`'s live workload (and of tests that want a service
// to attach to): a node HTTP server, plain node without flags or packages, that does per
// request what services do to native memory. It listens on 127.0.0.1 and an ephemeral port,
// which it prints as its first line:
//   listening PORT
//
//   GET /item/K   K in 0..1023 (see items.js): the item's record through JSON both ways, string
//                 work, Buffers of 2-32 KiB (malloc/calloc under node's ArrayBuffer allocator),
//                 every 8th item deflated on libuv's thread pool; also a session Buffer kept
//                 in a bounded LRU and a line in a bounded access log.
//   anything else 404.
//
// Everything it keeps is bounded (256 sessions, 1024 log lines), so its memory stays flat
// however many requests it serves. SIGTERM or SIGINT closes it and exits 0.
'use strict';
const http = require('http');
const zlib = require('zlib');
const items = require('./items');

const SESSIONS_MAX = 256;
const sessions = new Map();
const LOG_MAX = 1024;
const log = new Array(LOG_MAX);
let served = 0;

// Least recently used first: a hit moves the session to the end of the Map's order.
function session(user) {
  let s = sessions.get(user);
  if (s !== undefined) {
    sessions.delete(user);
  } else {
    s = Buffer.allocUnsafe(2048 + (user % 8) * 512);
    s.fill(user & 0xff);
    if (sessions.size >= SESSIONS_MAX) sessions.delete(sessions.keys().next().value);
  }
  sessions.set(user, s);
  return s;
}

function reply(res, status, type, body, extra) {
  res.writeHead(status, { 'Content-Type': type, 'Content-Length': body.length, ...extra });
  res.end(body);
}

const server = http.createServer((req, res) => {
  res.sendDate = false;
  const m = /^\/item\/(\d{1,4})$/.exec(req.url);
  const k = m ? Number(m[1]) : -1;
  if (req.method !== 'GET' || k < 0 || k >= items.ITEMS) {
    reply(res, 404, 'text/plain', Buffer.from('no such item\n'));
    return;
  }
  const s = session((k * 13) % 320);
  served++;
  log[served % LOG_MAX] = `${req.method} ${req.url} ${s.length} ${served}`;
  const body = items.render(k);
  if (!items.isDeflated(k)) {
    reply(res, 200, 'application/octet-stream', body);
    return;
  }
  zlib.deflate(body, items.DEFLATE, (err, packed) => {
    if (err) {
      reply(res, 500, 'text/plain', Buffer.from(`${err.message}\n`));
      return;
    }
    reply(res, 200, 'application/octet-stream', packed, { 'Content-Encoding': 'deflate' });
  });
});

// Keep-alive connections stay open between a client's runs.
server.keepAliveTimeout = 120000;
server.headersTimeout = 125000;
server.listen(0, '127.0.0.1', () => {
  process.stdout.write(`listening ${server.address().port}\n`);
});
for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => {
    server.close();
    server.closeAllConnections();
    process.exit(0);
  });
}
