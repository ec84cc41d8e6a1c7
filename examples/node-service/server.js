// A small HTTP service whose memory grows outside the V8 heap, for `cargo xtask demo`.
// Plain node, no packages, no flags. It listens on 127.0.0.1 (an ephemeral port, printed as
// "listening on 127.0.0.1:PORT") and answers GET /item/ID with a compressed 8 KiB record.
//
// Two leaks, both native memory that a heap snapshot does not show:
//   - responseCache keeps the rendered body of every ID ever asked for, as a Buffer (8 KiB,
//     filled, so resident), and never evicts: node's ArrayBuffer allocator mallocs them.
//   - every 50th request opens a "resumable" deflate stream for the client, writes the first
//     chunk, and keeps it in openStreams; nobody ever ends or closes it, so zlib's state
//     (about 256 KiB per stream, malloc'd by node for zlib) stays.
// The JavaScript objects that hold them are small: the V8 heap stays nearly flat.
// SIGTERM or SIGINT closes the server and exits 0.
'use strict';
const http = require('http');
const zlib = require('zlib');

const RECORD_BYTES = 8 * 1024;
const responseCache = new Map();
const openStreams = [];
let requests = 0;

function render(id) {
  // The record: its ID repeated, as a real service would render a page or a row.
  return Buffer.alloc(RECORD_BYTES, `item ${id};`);
}

function cachedBody(id) {
  let body = responseCache.get(id);
  if (body === undefined) {
    body = render(id);
    responseCache.set(id, body);
  }
  return body;
}

function openResumableStream(body) {
  const stream = zlib.createDeflate();
  stream.write(body.subarray(0, 1024));
  openStreams.push(stream);
}

const server = http.createServer((req, res) => {
  const match = /^\/item\/(\d+)$/.exec(req.url);
  if (!match) {
    res.writeHead(404).end();
    return;
  }
  requests++;
  const body = cachedBody(match[1]);
  if (requests % 50 === 0) openResumableStream(body);
  zlib.deflate(body, (err, compressed) => {
    if (err) {
      res.writeHead(500).end();
      return;
    }
    res.writeHead(200, { 'content-encoding': 'deflate', 'content-length': compressed.length });
    res.end(compressed);
  });
});

server.listen(0, '127.0.0.1', () => {
  console.log(`listening on 127.0.0.1:${server.address().port}`);
});

for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => {
    server.close();
    server.closeAllConnections();
    console.log(`served ${requests} requests; cached ${responseCache.size} bodies, ${openStreams.length} streams open`);
    process.exit(0);
  });
}
