// Connection hygiene of a live nbd-cbw (node bin/nbd-cbw serve ... -U SOCK -f):
// the handshake deadline (--handshake-timeout) for silent and slow clients,
// the connection limit (--max-connections), half-closed sockets (replies to
// outstanding requests still arrive, then the server closes), sockets
// destroyed mid-request, and 2,000 connect/disconnect cycles with the
// server's fd count and RSS measured before and after (/proc/PID).
//
// Needs `npm run build` (it runs dist/). HYGIENE_CYCLES (default 2000) changes
// the cycle count; scripts/fuzz/long-run does 10,000.

import t, { type Test } from 'tap';
import * as fs from 'node:fs';
import { build } from '../src/nbd-protocol';
import {
  CMD,
  MiB,
  OPT,
  RawConn,
  Rng,
  fdCount,
  fdList,
  handshake,
  pollUntil,
  rssKiB,
  runCycles,
  settleFds,
  sleep,
  startServer,
  CRASH_PATTERNS,
  type ServerHandle,
} from './helpers/fuzz';

const CYCLES = Number(process.env.HYGIENE_CYCLES ?? 2000);

async function server(t: Test, opts: Parameters<typeof startServer>[0]): Promise<ServerHandle> {
  const srv = await startServer(opts);
  t.teardown(async () => {
    if (!t.passing()) t.comment(`nbd-cbw output:\n${srv.output().slice(-4000)}`);
    await srv.stop();
  });
  return srv;
}

/** The server is alive and its output shows no crash. */
function healthy(t: Test, srv: ServerHandle): void {
  t.ok(srv.alive(), 'nbd-cbw is still running', { exit: srv.exit });
  t.notOk(CRASH_PATTERNS.test(srv.output()), 'nothing alarming in its output', { output: srv.output().slice(-4000) });
}

/** A fresh client can do a full handshake, a write and a read-back. */
async function worksForNewClient(t: Test, srv: ServerHandle, what: string): Promise<void> {
  const c = await RawConn.connect(srv.socket);
  try {
    const hs = await handshake(c, 'go');
    t.ok(hs.ok, `${what}: a new client completes the handshake`, { reason: hs.reason });
    if (!hs.ok) return;
    const data = new Rng(99).bytes(4096);
    c.readLengths.set(2n, 4096);
    // READ only once the WRITE is answered: requests in flight together may run in any order.
    c.write(Buffer.concat([build.requestHeader(0, CMD.WRITE, 1n, 8192, 4096), data]));
    const w = await c.next((m) => m.type === 'simpleReply' && m.cookie === 1n, 5000);
    c.write(build.requestHeader(0, CMD.READ, 2n, 8192, 4096));
    const r = await c.next((m) => m.type === 'simpleReply' && m.cookie === 2n, 5000);
    t.match(w, { error: 0 }, `${what}: its WRITE succeeds`);
    t.ok(r && r.type === 'simpleReply' && r.error === 0 && r.data?.equals(data), `${what}: it reads back what it wrote`);
  } finally {
    c.destroy();
  }
}

t.test('handshake deadline (--handshake-timeout 1s)', async (t) => {
  const srv = await server(t, { handshakeTimeout: '1s' });

  t.test('a silent client is dropped after the timeout', async (t) => {
    const t0 = Date.now();
    const c = await RawConn.connect(srv.socket);
    const g = await c.next((m) => m.type === 'greeting', 2000);
    t.ok(g, 'it got the greeting');
    const closed = await c.waitClosed(3000);
    const ms = Date.now() - t0;
    t.ok(closed, `the server closed the socket (after ${ms} ms)`);
    t.ok(ms >= 900, `not before the timeout (${ms} ms)`);
    t.ok(ms <= 3000, `within ~3 s (${ms} ms)`);
    c.destroy();
  });

  t.test('a slow client dribbling one byte every 300 ms is dropped too', async (t) => {
    const t0 = Date.now();
    const c = await RawConn.connect(srv.socket);
    const g = await c.next((m) => m.type === 'greeting', 2000);
    t.ok(g, 'it got the greeting');
    const bytes = Buffer.concat([
      build.clientFlags(3),
      build.option(OPT.STRUCTURED_REPLY),
      build.option(OPT.GO, build.infoRequestData('disk', [])),
    ]);
    let sent = 0;
    while (sent < bytes.length && !c.closed && Date.now() - t0 < 5000) {
      c.write(bytes.subarray(sent, sent + 1));
      sent++;
      await c.waitUntil(() => c.closed, 300);
    }
    const closed = await c.waitClosed(3000);
    const ms = Date.now() - t0;
    t.ok(closed, `dropped after ${ms} ms, having sent ${sent} of ${bytes.length} bytes`);
    t.ok(ms >= 900 && ms <= 3000, `at the deadline, which data does not push back (${ms} ms)`);
    t.ok(sent < bytes.length, 'it never finished its handshake');
    c.destroy();
  });

  t.test('a client that finished its handshake is not dropped later', async (t) => {
    const c = await RawConn.connect(srv.socket);
    const hs = await handshake(c, 'go-structured');
    t.ok(hs.ok, 'handshake done');
    await sleep(1500);
    t.notOk(c.closed, 'still connected 1.5 s later');
    c.write(build.requestHeader(0, CMD.FLUSH, 9n, 0, 0));
    const r = await c.next((m) => m.type === 'simpleReply', 3000);
    t.match(r, { cookie: 9n, error: 0 }, 'and its requests are answered');
    c.destroy();
  });

  t.test('20 silent clients at once are all dropped; fds return to the baseline', async (t) => {
    const baseline = fdCount(srv.pid);
    const conns = await Promise.all(Array.from({ length: 20 }, () => RawConn.connect(srv.socket)));
    // The 1 s deadline may already drop the first ones while the last are
    // still connecting on a loaded machine, so look for the peak, not all 20.
    let peak = fdCount(srv.pid);
    await pollUntil(() => {
      peak = Math.max(peak, fdCount(srv.pid));
      return peak >= baseline + 20;
    }, 2000);
    t.ok(peak > baseline, `the server accepted them (fds ${baseline} -> peak ${peak})`);
    const closed = await Promise.all(conns.map((c) => c.waitClosed(3500)));
    t.ok(closed.every(Boolean), 'all dropped within ~3 s');
    for (const c of conns) c.destroy();
    const fds = await settleFds(srv.pid, baseline, 2, 5000);
    t.ok(fds <= baseline + 2, `fds back to the baseline (${baseline} -> ${fds})`);
  });

  t.test('a dropped connection does no more work with what it already sent', async (t) => {
    // Each of these is cut off by the server, but the same write carries a
    // valid GO and a WRITE after the offending part. Neither may take
    // effect: the GO would clear the handshake deadline (the socket would
    // stay open for good), the WRITE would change the disk.
    const cases = [
      { name: 'after ABORT (then GO only)', head: build.option(OPT.ABORT), flags: 3, at: -1 },
      { name: 'after ABORT', head: build.option(OPT.ABORT), flags: 3, at: 2 * MiB },
      { name: 'after EXPORT_NAME of an unknown export', head: build.option(OPT.EXPORT_NAME, Buffer.from('nope')), flags: 3, at: 3 * MiB },
      { name: 'after unknown client flags', head: Buffer.alloc(0), flags: 0x80000003, at: 4 * MiB },
    ];
    for (const c of cases) {
      const before = fdCount(srv.pid);
      const conn = await RawConn.connect(srv.socket, 5000, true); // half-open: we never close our side
      await conn.next((m) => m.type === 'greeting', 2000);
      conn.parse = false;
      conn.write(
        Buffer.concat([
          build.clientFlags(c.flags),
          c.head,
          build.option(OPT.GO, build.infoRequestData('disk', [])),
          ...(c.at >= 0 ? [build.requestHeader(0, CMD.WRITE, 1n, c.at, 4096), Buffer.alloc(4096, 0xee)] : []),
        ]),
      );
      const gone = await pollUntil(() => fdCount(srv.pid) <= before, 3000);
      t.ok(gone, `${c.name}: the server let go of the socket within the deadline`);
      if (c.at >= 0) {
        const onDisk = fsRead(srv.image, c.at, 4096);
        t.ok(onDisk.equals(Buffer.alloc(4096)), `${c.name}: the WRITE sent after it was not executed`);
      }
      conn.destroy();
    }
  });

  t.test('afterwards', async (t) => {
    healthy(t, srv);
    await worksForNewClient(t, srv, 'after the dropped clients');
  });
});

function fsRead(file: string, offset: number, length: number): Buffer {
  const fd = fs.openSync(file, 'r');
  try {
    const b = Buffer.alloc(length);
    fs.readSync(fd, b, 0, length, offset);
    return b;
  } finally {
    fs.closeSync(fd);
  }
}

t.test('--max-connections 4: more clients wait for a slot (as with qemu-nbd --shared), then are refused', async (t) => {
  const N = 4;
  const srv = await server(t, { handshakeTimeout: '30s', maxConnections: N });
  const conns: RawConn[] = [];
  t.teardown(() => {
    for (const c of conns) c.destroy();
  });
  const connect = async (): Promise<RawConn> => {
    const c = await RawConn.connect(srv.socket);
    conns.push(c);
    return c;
  };
  const served: RawConn[] = [];
  for (let i = 0; i < N; i++) {
    const c = await connect();
    const hs = await handshake(c, 'go');
    t.ok(hs.ok, `connection ${i + 1} of ${N}: handshake done`);
    served.push(c);
  }
  // Beyond the limit: connected, but no greeting while every slot is taken.
  const waiting = [await connect(), await connect(), await connect()];
  await sleep(500);
  for (const [i, w] of waiting.entries()) {
    t.equal(w.bytesIn, 0, `waiting client ${i + 1}: no greeting while the ${N} slots are taken`);
    t.notOk(w.closed, `waiting client ${i + 1}: still connected`);
  }
  // The served ones still work.
  for (const [i, c] of served.entries()) {
    c.write(build.requestHeader(0, CMD.FLUSH, BigInt(100 + i), 0, 0));
    const r = await c.next((m) => m.type === 'simpleReply', 3000);
    t.match(r, { error: 0 }, `served connection ${i + 1} still answers`);
  }
  // One leaves (DISC): the oldest waiting client is served.
  served[0].write(build.requestHeader(0, CMD.DISC, 1n, 0, 0));
  t.ok(await served[0].waitClosed(3000), 'one served connection disconnects (DISC)');
  const first = await handshake(waiting[0], 'go');
  t.ok(first.ok, 'the first waiting client gets its greeting and completes its handshake', { reason: first.reason });
  t.equal(waiting[1].bytesIn, 0, 'the second still waits: all slots are taken again');
  // A waiting client that gave up is served, closes at once, and the next
  // one gets the slot.
  waiting[1].destroy();
  served[1].destroy();
  const third = await handshake(waiting[2], 'go');
  t.ok(third.ok, 'a served client went, the waiting one before it had given up: the third waiting client is served', {
    reason: third.reason,
  });
  // The queue holds N: with N waiting, one more is refused at once.
  const queue: RawConn[] = [];
  for (let i = 0; i < N; i++) queue.push(await connect());
  const extra = await connect();
  t.ok(await extra.waitClosed(2000), `with ${N} clients waiting, one more is closed by the server`);
  t.equal(extra.bytesIn, 0, '...without a greeting');
  t.ok(
    queue.every((q) => !q.closed && q.bytesIn === 0),
    `the ${N} waiting clients are still connected, without a greeting`,
  );
  t.match(srv.output(), /nbd-cbw: connection limit: all 4 slots are taken \(--max-connections\); new clients wait for one/, 'stderr says that clients wait');
  t.match(srv.output(), /nbd-cbw: connection limit: 4 clients served and 4 waiting; refusing new clients/, '...and that they are refused');
  // The served ones (two from the start, two that waited) still work.
  for (const [i, c] of [served[2], served[3], waiting[0], waiting[2]].entries()) {
    c.write(build.requestHeader(0, CMD.FLUSH, BigInt(200 + i), 0, 0));
    const r = await c.next((m) => m.type === 'simpleReply' && m.cookie === BigInt(200 + i), 3000);
    t.match(r, { error: 0 }, `served connection ${i + 1} of ${N} answers`);
  }
  healthy(t, srv);
});

t.test('half-closed socket: outstanding requests are answered, then the server closes', async (t) => {
  const srv = await server(t, {});
  for (const style of ['go', 'go-structured', 'export-name'] as const) {
    const c = await RawConn.connect(srv.socket);
    const hs = await handshake(c, style);
    t.ok(hs.ok, `${style}: handshake done`);
    const data = new Rng(5).bytes(65536);
    c.readLengths.set(2n, 65536);
    c.readLengths.set(3n, 4096);
    const replies = new Map<bigint, { error: number; data: Buffer | null }>();
    // The WRITE is answered before the READ of the same range is sent: NBD
    // lets a server run requests in flight together in any order.
    c.write(Buffer.concat([build.requestHeader(0, CMD.WRITE, 1n, 0, 65536), data]));
    const w = await c.next((m) => (m.type === 'simpleReply' || m.type === 'structuredChunk') && m.cookie === 1n, 5000);
    if (w?.type === 'simpleReply') replies.set(1n, { error: w.error, data: null });
    else if (w?.type === 'structuredChunk') replies.set(1n, { error: w.chunkType & 0x8000 ? w.payload.readUInt32BE(0) : 0, data: null });
    c.write(
      Buffer.concat([
        build.requestHeader(0, CMD.READ, 2n, 0, 65536),
        build.requestHeader(0, CMD.READ, 3n, MiB, 4096),
        build.requestHeader(0, CMD.FLUSH, 4n, 0, 0),
      ]),
    );
    c.end(); // half-close at once, no DISC: the requests are still in flight
    const deadline = Date.now() + 10_000;
    while (replies.size < 4 && Date.now() < deadline) {
      const m = await c.next(() => true, Math.max(1, deadline - Date.now()));
      if (!m) break;
      if (m.type === 'simpleReply') replies.set(m.cookie, { error: m.error, data: m.data });
      else if (m.type === 'structuredChunk') {
        const prev = replies.get(m.cookie);
        const chunkData = m.chunkType === 1 ? m.payload.subarray(8) : null;
        const error = (m.chunkType & 0x8000) !== 0 ? m.payload.readUInt32BE(0) : 0;
        if (m.flags & 1) replies.set(m.cookie, { error: prev?.error || error, data: chunkData ?? prev?.data ?? null });
      } else t.fail(`unexpected ${m.type}`);
    }
    t.equal(replies.size, 4, `${style}: all four requests answered after the half-close`);
    t.equal(replies.get(1n)?.error, 0, `${style}: WRITE ok`);
    t.ok(replies.get(2n)?.data?.equals(data), `${style}: READ returns the data written`);
    t.equal(replies.get(3n)?.data?.length, 4096, `${style}: second READ ok`);
    t.equal(replies.get(4n)?.error, 0, `${style}: FLUSH ok`);
    t.ok(await c.waitClosed(5000), `${style}: then the server closes its side`);
    t.ok(c.ended, `${style}: with an orderly EOF after the replies`);
    c.destroy();
  }
  // Half-close in the middle of the handshake: the server just drops it.
  const h = await RawConn.connect(srv.socket);
  await h.next((m) => m.type === 'greeting', 2000);
  h.write(build.clientFlags(3));
  h.end();
  t.ok(await h.waitClosed(3000), 'half-closed during the handshake: closed');
  h.destroy();
  healthy(t, srv);
  await worksForNewClient(t, srv, 'after half-closed clients');
});

t.test('DISC right behind large READs: the server lets go once the client closes', async (t) => {
  // The READs' replies fill the socket's write buffer, which pauses reading
  // until it drains; the DISC in the same write ends the session before it
  // has. A socket that stayed paused after the server ended its side never
  // saw the client's close: the fuzz test's fds left open.
  const srv = await server(t, {});
  const baseline = fdCount(srv.pid);
  const rng = new Rng(12);
  for (let i = 0; i < 10; i++) {
    const c = await RawConn.connect(srv.socket);
    const style = rng.pick(['go', 'go-structured', 'export-name'] as const);
    const hs = await handshake(c, style);
    t.ok(hs.ok, `round ${i} (${style}): handshake`);
    c.parse = false;
    const reqs: Buffer[] = [];
    const reads = rng.range(2, 8);
    for (let k = 0; k < reads; k++) reqs.push(build.requestHeader(0, CMD.READ, BigInt(k + 1), k * MiB, 256 * 1024));
    reqs.push(build.requestHeader(0, CMD.DISC, 99n, 0, 0));
    const bytesBefore = c.bytesIn;
    c.write(Buffer.concat(reqs));
    t.ok(await c.waitUntil(() => c.ended, 5000), `round ${i}: the server ended its side after the replies`);
    t.ok(c.bytesIn - bytesBefore >= reads * 256 * 1024, `round ${i}: all ${reads} READs were answered before that`);
    c.destroy();
  }
  const fds = await settleFds(srv.pid, baseline, 0, 5000);
  t.ok(fds <= baseline, `every socket was let go (${baseline} -> ${fds} fds)`, { fds: fdList(srv.pid) });

  // A client that never closes its side after DISC: the server closes the
  // session (proto.md: after DISC it closes the connection) after a linger.
  const stubborn = await RawConn.connect(srv.socket, 5000, true); // half-open: we never end our side
  t.ok((await handshake(stubborn, 'go')).ok, 'a client that will not close: handshake');
  const before = fdCount(srv.pid);
  stubborn.write(build.requestHeader(0, CMD.DISC, 1n, 0, 0));
  t.ok(await stubborn.waitUntil(() => stubborn.ended, 3000), 'after its DISC the server ends its side');
  t.notOk(stubborn.closed, '...while the client keeps its own open');
  const gone = await pollUntil(() => fdCount(srv.pid) < before, 10_000);
  t.ok(gone, `and the server lets the socket go a little later (${before} -> ${fdCount(srv.pid)} fds)`);
  stubborn.destroy();
  healthy(t, srv);
});

t.test('reset socket: destroyed mid-request with replies and writes pending', async (t) => {
  const srv = await server(t, {});
  const baseline = fdCount(srv.pid);
  const rng = new Rng(11);
  for (let i = 0; i < 20; i++) {
    const c = await RawConn.connect(srv.socket);
    const hs = await handshake(c, rng.pick(['go', 'go-structured', 'export-name'] as const));
    t.ok(hs.ok, `round ${i}: handshake`);
    c.parse = false;
    // Reads whose replies (32 MiB) cannot all be buffered, and a WRITE cut in half.
    const reqs: Buffer[] = [];
    for (let k = 0; k < 32; k++) reqs.push(build.requestHeader(0, CMD.READ, BigInt(k + 1), (k % 15) * MiB, MiB));
    reqs.push(build.requestHeader(0, CMD.WRITE, 99n, 0, 65536), Buffer.alloc(32768, 1));
    c.write(Buffer.concat(reqs));
    const wait = rng.pick([0, 0, 1, 5, 20]);
    if (wait) await sleep(wait);
    c.destroy();
  }
  await sleep(200);
  healthy(t, srv);
  const fds = await settleFds(srv.pid, baseline, 2, 5000);
  t.ok(fds <= baseline + 2, `fds back to the baseline (${baseline} -> ${fds})`);
  await worksForNewClient(t, srv, 'after 20 resets');
});

t.test(`${CYCLES} connect/disconnect cycles: no fd or memory leak`, async (t) => {
  const srv = await server(t, {});
  // Warm up (JIT, pools), then take the baseline on a quiet server.
  const warm = await runCycles(srv.socket, { count: 200, concurrency: 8, runSeed: 1, maxSeconds: 30 });
  t.same(warm.failures, [], 'warm-up cycles ok');
  await sleep(500);
  const fdsBefore = await settleFds(srv.pid, fdCount(srv.pid), 0, 2000);
  const rssBefore = rssKiB(srv.pid);
  const stats = await runCycles(srv.socket, { count: CYCLES, concurrency: 8, runSeed: 2, maxSeconds: 120 });
  t.comment(`${stats.done} cycles in ${(stats.elapsedMs / 1000).toFixed(1)} s: ${JSON.stringify(stats.byKind)}`);
  t.equal(stats.done, CYCLES, `all ${CYCLES} cycles ran`);
  t.same(stats.failures, [], 'every cycle behaved (handshakes completed, DISC closed the connection)');
  t.ok(Object.values(stats.byKind).every((n) => n > 0), 'all three kinds of cycle were exercised');
  const fdsAfter = await settleFds(srv.pid, fdsBefore, 2, 10_000);
  await sleep(500);
  const rssAfter = rssKiB(srv.pid);
  t.comment(`fds ${fdsBefore} -> ${fdsAfter}; RSS ${rssBefore} KiB -> ${rssAfter} KiB (${((rssAfter - rssBefore) / 1024).toFixed(1)} MiB)`);
  t.ok(Math.abs(fdsAfter - fdsBefore) <= 2, `fd count back to the baseline ±2 (${fdsBefore} -> ${fdsAfter})`);
  t.ok(rssAfter - rssBefore < 30 * 1024, `RSS grew by less than 30 MiB (${((rssAfter - rssBefore) / 1024).toFixed(1)} MiB)`);
  healthy(t, srv);
});
