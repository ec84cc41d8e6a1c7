// node_hold: a node process that holds a few MiB of Buffers and keeps allocating a little,
// for the latency part of `cargo xtask bench` (how fast the tracer attaches to it, and lets
// it go and exits after SIGINT). Prints "ready" once the Buffers are held, then runs until
// killed: every 5 ms it allocates Buffers of mixed sizes and a JSON string and retires the
// oldest, so a recording has node's own stacks to name at the end.
'use strict';

const held = [];
for (let i = 0; i < 64; i++) {
  held.push(Buffer.alloc(64 * 1024, i));
}

// xorshift32: the same sizes every run.
let seed = 0x2545f491;
function random() {
  seed ^= seed << 13;
  seed ^= seed >>> 17;
  seed ^= seed << 5;
  return (seed >>> 0) / 4294967296;
}

const churn = [];
setInterval(() => {
  for (let i = 0; i < 8; i++) {
    const size = Math.floor(128 * Math.pow(1024, random()));
    churn.push(random() < 0.5 ? Buffer.alloc(size) : Buffer.allocUnsafe(size).fill(1));
    churn.push(JSON.stringify({ i, size, at: Date.now() }));
  }
  while (churn.length > 512) {
    churn.shift();
  }
}, 5);

console.log('ready');
