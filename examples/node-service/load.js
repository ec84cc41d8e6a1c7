// Load for examples/node-service/server.js: GET /item/ID with a new ID each time, 250
// requests a second over 4 keep-alive connections, to 127.0.0.1 only, until COUNT requests
// (default 4000) or SECONDS (default 20) have passed, whichever comes first. Prints one
// line when done. Usage: node load.js PORT [COUNT] [SECONDS]
'use strict';
const http = require('http');

const port = Number(process.argv[2]);
const count = Number(process.argv[3] || 4000);
const seconds = Number(process.argv[4] || 20);
if (!Number.isInteger(port) || port <= 0) {
  console.error('usage: node load.js PORT [COUNT] [SECONDS]');
  process.exit(2);
}

const agent = new http.Agent({ keepAlive: true, maxSockets: 4 });
let sent = 0;
let answered = 0;
let failed = 0;

function get(id) {
  const req = http.get({ host: '127.0.0.1', port, path: `/item/${id}`, agent }, (res) => {
    res.resume();
    res.on('end', () => answered++);
  });
  req.on('error', () => failed++);
}

function finish() {
  clearInterval(timer);
  agent.destroy();
  console.log(`load: sent ${sent}, answered ${answered}, failed ${failed}`);
  process.exit(0);
}

// 5 requests every 20 ms.
const timer = setInterval(() => {
  for (let i = 0; i < 5 && sent < count; i++) get(sent++);
  if (sent >= count) setTimeout(finish, 1000);
}, 20);
setTimeout(finish, seconds * 1000);
process.on('SIGTERM', finish);
