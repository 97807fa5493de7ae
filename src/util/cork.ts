// Writes issued in the same tick leave in one writev: cork the stream on the
// first, uncork on the next tick. Used for NBD replies (server) and requests
// (client), where many complete or are issued together.

import type { Writable } from 'node:stream';

const corked = new WeakSet<Writable>();

export function corkForTick(stream: Writable): void {
  if (corked.has(stream)) return;
  corked.add(stream);
  stream.cork();
  process.nextTick(() => {
    corked.delete(stream);
    stream.uncork();
  });
}
