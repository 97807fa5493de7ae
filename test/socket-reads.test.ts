// adoptWithReadHooks on real unix sockets: reads land in our buffer, a
// half-close still ends the stream (the server drains on it), replies go
// out, the server's own count sees the accepted object go, and a socket that
// already read data is left alone. Then an NbdServer on a file, driven by
// qemu-io: its connections take the reused-buffer path (no fallback warning)
// and 32 KiB and 1 MiB patterns written through it read back.
// parserReadHooks' header-read limit: with a real ServerStreamParser fed the
// way a socket reads, READ data then lands in its destination (not copied
// out of the read buffer) and every other reply still parses; then NbdClient,
// which sets the limit while a large READ is in flight, against qemu-nbd
// (data, holes, mixed with small reads, block status and writes) and
// nbdkit's error filter (a failed large READ, then the next one on the same
// connection).

import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import t, { type Test } from 'tap';
import {
  SLABS_PER_CONNECTION,
  adoptWithReadHooks,
  parserReadHooks,
  slabReadHooks,
  type SlabReadHooks,
} from '../src/util/socket-reads';
import { FileDevice } from '../src/device/file';
import { NbdServer } from '../src/server/server';
import { NbdClient } from '../src/client/client';
import {
  ClientStreamParser,
  Command,
  ServerStreamParser,
  build,
  type ClientMessage,
  type RequestMessage,
  type ServerMessage,
} from '../src/nbd-protocol';
import { fillPattern, fillRandom, mulberry32, run, startNbdkit, startQemuNbd, tmpPath } from './helpers/peers';

function tmpSocket(t: Test): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nbd-cbw-adopt-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  return path.join(dir, 's.sock');
}

t.test('an adopted socket reads into our buffer, sees the half-close and replies', async (t) => {
  const sock = tmpSocket(t);
  const readBuffer = Buffer.alloc(7); // small: the message arrives over several reads
  const received: Buffer[] = [];
  let intoOurs = true;
  let adopted: net.Socket | null = null;
  let acceptedDestroyed = false;
  const server = net.createServer({ allowHalfOpen: true }, (s) => {
    adopted = adoptWithReadHooks(
      s,
      {
        buffer: () => readBuffer,
        callback: (n, buf) => {
          if (buf !== readBuffer) intoOurs = false;
          received.push(Buffer.from(buf.subarray(0, n)));
          return true;
        },
      },
      true,
    );
    acceptedDestroyed = s.destroyed;
    adopted?.on('end', () => adopted?.end(`got ${Buffer.concat(received).toString()}`));
  });
  await new Promise<void>((r) => server.listen(sock, r));
  t.teardown(() => server.close());

  const reply = await new Promise<string>((resolve, reject) => {
    const c = net.createConnection({ path: sock, allowHalfOpen: true }, () => c.end('hello, adopted world'));
    const parts: Buffer[] = [];
    // Bounded: without adoption nobody answers.
    const timer = setTimeout(() => {
      c.destroy();
      resolve('(no reply in 5 s)');
    }, 5000);
    c.on('data', (d: Buffer) => parts.push(d));
    c.on('end', () => {
      clearTimeout(timer);
      resolve(Buffer.concat(parts).toString());
    });
    c.on('error', (e) => {
      clearTimeout(timer);
      reject(e);
    });
  });
  t.ok(adopted, 'the socket was adopted');
  t.ok(acceptedDestroyed, 'the accepted socket object was let go');
  t.ok(intoOurs, 'every read landed in the buffer we gave');
  t.ok(received.length >= 3, `the message came in several reads (${received.length})`);
  t.equal(reply, 'got hello, adopted world', 'the reply reached the client after its half-close');
  const left = await new Promise<number>((r) => server.getConnections((_e, n) => r(n)));
  t.equal(left, 0, "net.Server's own count no longer includes it");
});

t.test('a socket that already read data is not adopted', async (t) => {
  const sock = tmpSocket(t);
  const result = new Promise<{ adopted: boolean; data: string }>((resolve) => {
    const server = net.createServer((s) => {
      s.once('data', (d: Buffer) => {
        const a = adoptWithReadHooks(s, { buffer: () => Buffer.alloc(16), callback: () => true }, false);
        resolve({ adopted: a !== null, data: d.toString() });
        s.destroy();
        server.close();
      });
    });
    server.listen(sock, () => {
      const c = net.createConnection(sock, () => c.write('early'));
      c.on('error', () => undefined);
      c.on('close', () => undefined);
    });
  });
  const r = await result;
  t.equal(r.data, 'early');
  t.equal(r.adopted, false, 'left to the ordinary reads it already started');
});

t.test('NbdServer connections read into reused buffers; data written through them reads back', async (t) => {
  const sock = tmpSocket(t);
  const image = path.join(path.dirname(sock), 'disk.img');
  fs.writeFileSync(image, Buffer.alloc(0));
  fs.truncateSync(image, 16 * 1024 * 1024);
  const device = await FileDevice.open(image);
  const logged: string[] = [];
  const server = new NbdServer({ exports: [{ name: 'disk', device }], log: (m) => logged.push(m) });
  await server.listen({ socketPath: sock });
  t.teardown(async () => {
    await server.close();
    await device.close();
  });
  const uri = `nbd+unix:///disk?socket=${sock}`;
  const io = (cmds: string[]) => run('qemu-io', ['-f', 'raw', uri, ...cmds.flatMap((c) => ['-c', c])], { timeoutMs: 30_000 });
  const w = await io(['write -P 0x61 0 32k', 'write -P 0x62 1M 1M', 'write -P 0x63 5000 70000']);
  t.equal(w.code, 0, `qemu-io writes (${w.stderr.trim()})`);
  const r = await io(['read -P 0x61 0 4096', 'read -P 0x62 1M 1M', 'read -P 0x63 5000 70000', 'read -P 0 75000 26072']);
  t.equal(r.code, 0, 'qemu-io reads every pattern back');
  t.notMatch(r.stdout, /Pattern verification failed/, 'no pattern mismatch');
  t.notOk(
    logged.some((m) => /fresh buffers/.test(m)),
    'no connection fell back to reads into fresh buffers',
  );
});

// ------------------------------------------------- header-read limit

const REPLY_MAGIC = 0x668e33ef;
/** A structured reply chunk, built byte by byte (not by the serializer). */
function chunk(cookie: bigint, type: number, flags: number, payload: Buffer): Buffer {
  const h = Buffer.alloc(20);
  h.writeUInt32BE(REPLY_MAGIC, 0);
  h.writeUInt16BE(flags, 4);
  h.writeUInt16BE(type, 6);
  h.writeBigUInt64BE(cookie, 8);
  h.writeUInt32BE(payload.length, 16);
  return Buffer.concat([h, payload]);
}
function u64(n: number): Buffer {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(BigInt(n));
  return b;
}
const DONE = 1;

interface FedResult {
  messages: ServerMessage[];
  /** Bytes the socket wrote straight into READ destinations. */
  direct: number;
  /** Reads that did not go straight into a destination, and their largest size. */
  otherReads: number;
  largestOther: number;
}

/**
 * Feed `stream` through parserReadHooks the way libuv does: each read asks
 * buffer(), gets at most `socketHolds` bytes (what a unix socket buffers),
 * and reports them with callback().
 */
function feedThroughHooks(
  stream: Buffer,
  requests: Map<bigint, Buffer>,
  offsetOf: (cookie: bigint) => number,
  limit: (() => number | null) | undefined,
  socketHolds = 200 * 1024,
): FedResult {
  const parser = new ServerStreamParser({
    readLengthOf: (c) => requests.get(c)?.length ?? 0,
    readInto: (c, offset, length) => {
      const d = requests.get(c);
      if (!d || offset === null) return d ?? null;
      return d.subarray(offset - offsetOf(c), offset - offsetOf(c) + length);
    },
  });
  parser.phase = 'transmission';
  const messages: ServerMessage[] = [];
  const hooks = parserReadHooks(parser, (m: ServerMessage) => messages.push(m), limit);
  const r: FedResult = { messages, direct: 0, otherReads: 0, largestOther: 0 };
  for (let at = 0; at < stream.length; ) {
    const buf = hooks.buffer();
    const n = Math.min(buf.length, socketHolds, stream.length - at);
    stream.copy(buf, 0, at, at + n);
    const intoDest = [...requests.values()].some((d) => d.buffer === buf.buffer && buf.byteOffset >= d.byteOffset && buf.byteOffset < d.byteOffset + d.length);
    if (intoDest) r.direct += n;
    else {
      r.otherReads++;
      r.largestOther = Math.max(r.largestOther, n);
    }
    hooks.callback(n, buf);
    at += n;
  }
  return r;
}

t.test('header-read limit: READ data goes straight to its destination, other replies still parse', async (t) => {
  const size = 256 * 1024;
  const base = 1 << 30;
  const data = [1, 2, 3, 4].map((i) => fillRandom(Buffer.alloc(size), i));
  // Four large READs answered in one data chunk each, out of order.
  const large = Buffer.concat([2, 0, 3, 1].map((i) => chunk(BigInt(i + 1), 1, DONE, Buffer.concat([u64(base + i * size), data[i]]))));
  // Then a READ answered as a hole and data, a failed READ, a NONE reply.
  const hole = Buffer.alloc(12);
  hole.writeBigUInt64BE(BigInt(base), 0);
  hole.writeUInt32BE(64 * 1024, 8);
  const err = Buffer.alloc(6 + 4);
  err.writeUInt32BE(5, 0); // EIO
  err.writeUInt16BE(4, 4);
  err.write('oops', 6);
  const stream = Buffer.concat([
    large,
    chunk(5n, 2, 0, hole),
    chunk(5n, 1, DONE, Buffer.concat([u64(base + 64 * 1024), data[0].subarray(0, 64 * 1024)])),
    chunk(6n, 32769, DONE, err),
    chunk(7n, 0, DONE, Buffer.alloc(0)),
  ]);
  const requests = () =>
    new Map<bigint, Buffer>([
      [1n, Buffer.alloc(size)],
      [2n, Buffer.alloc(size)],
      [3n, Buffer.alloc(size)],
      [4n, Buffer.alloc(size)],
      [5n, Buffer.alloc(128 * 1024)],
      [6n, Buffer.alloc(size)],
      [7n, Buffer.alloc(0)],
    ]);
  const summary = (r: FedResult) =>
    r.messages.map((m) => (m.type === 'structuredChunk' ? `${m.type}:${m.cookie}:${m.chunkType}` : `${m.type}:${'cookie' in m ? m.cookie : ''}`));
  const expected = [
    'offsetDataDelivered:3',
    'offsetDataDelivered:1',
    'offsetDataDelivered:4',
    'offsetDataDelivered:2',
    'structuredChunk:5:2',
    'offsetDataDelivered:5',
    'structuredChunk:6:32769',
    'structuredChunk:7:0',
  ];

  // READ n (1-4) starts at base + (n - 1) * size; 5 at base.
  const offsetOf = (c: bigint) => (c <= 4n ? base + Number(c - 1n) * size : base);
  // The large READs alone: with the limit, reads outside their data take
  // only a header, and every data byte goes straight into place.
  const reqLarge = requests();
  const limitedLarge = feedThroughHooks(large, reqLarge, offsetOf, () => 28);
  t.strictSame(summary(limitedLarge), expected.slice(0, 4), 'limited, large READs: parsed in order');
  for (let i = 0; i < 4; i++) t.ok(reqLarge.get(BigInt(i + 1))?.equals(data[i]), `limited: READ ${i + 1} data in place`);
  t.equal(limitedLarge.largestOther, 28, 'limited: reads outside a payload take at most a header');
  t.equal(limitedLarge.otherReads, 4, 'limited: one header read per reply');
  t.equal(limitedLarge.direct, 4 * size, 'limited: every data byte read straight into its destination');
  const reqPlain = requests();
  const plain = feedThroughHooks(large, reqPlain, offsetOf, undefined);
  t.strictSame(summary(plain), expected.slice(0, 4), 'unlimited: the same replies');
  for (let i = 0; i < 4; i++) t.ok(reqPlain.get(BigInt(i + 1))?.equals(data[i]), `unlimited: READ ${i + 1} data in place`);
  t.ok(plain.direct < 2 * size, `unlimited: most data went through the read buffer (${plain.direct} of ${4 * size} bytes direct)`);

  // The whole stream, the limit asked all along: holes, errors and NONE
  // replies still parse (they just take more reads).
  const reqLimited = requests();
  const limited = feedThroughHooks(stream, reqLimited, offsetOf, () => 28);
  t.strictSame(summary(limited), expected, 'limited: every reply parsed, in order');
  for (let i = 0; i < 4; i++) t.ok(reqLimited.get(BigInt(i + 1))?.equals(data[i]), `limited, whole stream: READ ${i + 1} data in place`);
  t.ok(reqLimited.get(5n)?.subarray(64 * 1024).equals(data[0].subarray(0, 64 * 1024)), 'limited: data after the hole in place');

  // The limit may be asked mid-header too (a read returned part of one):
  // every split of the stream still parses the same.
  const reqSplit = requests();
  const split = feedThroughHooks(stream, reqSplit, offsetOf, () => 28, 7);
  t.strictSame(summary(split), expected, '7-byte socket reads: the same replies');
  for (let i = 0; i < 4; i++) t.ok(reqSplit.get(BigInt(i + 1))?.equals(data[i]), `7-byte socket reads: READ ${i + 1} data in place`);
});

t.test('header-read limit: a short payload remainder is read with the next header only', async (t) => {
  // 512 KiB replies arriving 170 KiB at a time end in a 2 KiB remainder,
  // too short to read straight into place. It must come with the next
  // header alone, not with the next reply's data (which would be copied).
  const size = 512 * 1024;
  const socketHolds = 170 * 1024;
  const remainder = size - 3 * socketHolds;
  const base = 1 << 20;
  const data = [1, 2, 3, 4].map((i) => fillRandom(Buffer.alloc(size), 10 + i));
  const stream = Buffer.concat(data.map((d, i) => chunk(BigInt(i + 1), 1, DONE, Buffer.concat([u64(base + i * size), d]))));
  const offsetOf = (c: bigint) => base + Number(c - 1n) * size;
  const run = (limit: (() => number | null) | undefined) => {
    const reqs = new Map<bigint, Buffer>([1n, 2n, 3n, 4n].map((c) => [c, Buffer.alloc(size)]));
    const r = feedThroughHooks(stream, reqs, offsetOf, limit, socketHolds);
    t.equal(r.messages.length, 4, 'four replies parsed');
    for (let i = 0; i < 4; i++) t.ok(reqs.get(BigInt(i + 1))?.equals(data[i]), `READ ${i + 1} data in place`);
    return r;
  };
  const limited = run(() => 28);
  t.ok(remainder > 0 && remainder < 16 * 1024, `the test's split leaves a short remainder (${remainder} bytes)`);
  t.equal(limited.largestOther, 28 + remainder, 'limited: a remainder read takes it and the next header, no more');
  t.equal(limited.direct, 4 * (size - remainder), 'limited: all but the remainders read straight into place');
  const plain = run(undefined);
  t.ok(plain.largestOther > 100 * 1024, `unlimited: a remainder read takes the next data too (${plain.largestOther} bytes)`);
});

t.test('NbdClient with only large READs in flight: qemu-nbd data and holes, mixed requests', async (t) => {
  const MiB = 1024 * 1024;
  const image = tmpPath(t, 'header-limit', '.img');
  const content = Buffer.alloc(24 * MiB);
  // Data with holes between: qemu-nbd answers READs over them with hole chunks.
  for (let at = 0; at < content.length; at += 3 * MiB) fillRandom(content.subarray(at, at + 2 * MiB), at);
  const fd = fs.openSync(image, 'w');
  for (let at = 0; at < content.length; at += 3 * MiB) fs.writeSync(fd, content, at, 2 * MiB, at);
  fs.ftruncateSync(fd, content.length);
  fs.closeSync(fd);
  const q = await startQemuNbd(t, image, { readOnly: true });
  const client = await NbdClient.connect({ socketPath: q.socket, exportName: 'disk' }, { connectTimeoutMs: 5000 });
  t.teardown(() => client.close());
  t.ok(client.structured, 'structured replies negotiated');

  // Only large READs in flight: 24 MiB in 256 KiB, 1 MiB and 4 MiB pieces at once.
  for (const piece of [256 * 1024, MiB, 4 * MiB]) {
    const out = Buffer.alloc(content.length, 0xee);
    await Promise.all(
      Array.from({ length: content.length / piece }, (_, i) => client.read(i * piece, piece, out.subarray(i * piece, (i + 1) * piece))),
    );
    t.ok(out.equals(content), `${piece / 1024} KiB READs all in flight: the image, holes as zeros`);
  }
  // Mixed: small READs and block status among large ones (the limit comes and goes).
  const out = Buffer.alloc(content.length, 0xee);
  const ops: Promise<unknown>[] = [];
  const smalls: Array<{ at: number; got: Promise<Buffer> }> = [];
  for (let i = 0; i < content.length / MiB; i++) {
    ops.push(client.read(i * MiB, MiB, out.subarray(i * MiB, (i + 1) * MiB)));
    if (i % 3 === 0) {
      const at = i * MiB + 4096 * i;
      smalls.push({ at, got: client.read(at, 512) });
    }
    if (i % 5 === 0) ops.push(client.blockStatus(i * MiB, MiB));
  }
  await Promise.all(ops);
  t.ok(out.equals(content), 'mixed: large READs right');
  for (const s of smalls) t.ok((await s.got).equals(content.subarray(s.at, s.at + 512)), `mixed: 512-byte READ at ${s.at} right`);
});

t.test('NbdClient with large READs and WRITEs in flight together (guest writes and the READs saving their clusters)', async (t) => {
  // The header-read limit holds while any large READ is in flight: WRITE
  // replies then come a header at a time among the READs' data.
  const KiB = 1024;
  const cs = 64 * KiB;
  const clusters = 256;
  const image = tmpPath(t, 'header-limit-rw', '.img');
  const content = fillRandom(Buffer.alloc(clusters * cs), 77);
  fs.writeFileSync(image, content);
  const q = await startQemuNbd(t, image);
  const client = await NbdClient.connect({ socketPath: q.socket, exportName: 'disk' }, { connectTimeoutMs: 5000 });
  t.teardown(() => client.close());
  t.ok(client.structured, 'structured replies negotiated');
  // Even clusters: 64 KiB READs. Odd clusters: a 32 KiB WRITE into each,
  // and a 4 KiB READ of an odd cluster's untouched half now and then.
  const reads = new Map<number, Promise<Buffer>>();
  const smalls = new Map<number, Promise<Buffer>>();
  const writes: Promise<void>[] = [];
  const written = (c: number) => fillRandom(Buffer.alloc(32 * KiB), 1000 + c);
  for (let c = 0; c < clusters; c += 2) {
    reads.set(c, client.read(c * cs, cs));
    writes.push(client.write((c + 1) * cs, written(c + 1)));
    if (c % 8 === 0) smalls.set(c + 1, client.read((c + 1) * cs + 32 * KiB, 4 * KiB));
  }
  await Promise.all(writes);
  let readsRight = 0;
  for (const [c, got] of reads) if ((await got).equals(content.subarray(c * cs, (c + 1) * cs))) readsRight++;
  t.equal(readsRight, reads.size, `all ${reads.size} 64 KiB READs right`);
  let smallsRight = 0;
  for (const [c, got] of smalls) if ((await got).equals(content.subarray(c * cs + 32 * KiB, c * cs + 36 * KiB))) smallsRight++;
  t.equal(smallsRight, smalls.size, `all ${smalls.size} 4 KiB READs right`);
  const after = await client.read(0, clusters * cs);
  let writesRight = 0;
  for (let c = 1; c < clusters; c += 2) if (after.subarray(c * cs, c * cs + 32 * KiB).equals(written(c))) writesRight++;
  t.equal(writesRight, clusters / 2, `all ${clusters / 2} 32 KiB WRITEs landed`);
  t.ok(after.subarray(0, cs).equals(content.subarray(0, cs)), 'and the rest is as it was');
});

t.test('NbdClient with only large READs in flight: a failed READ, then the next on the same connection', async (t) => {
  const MiB = 1024 * 1024;
  const trigger = tmpPath(t, 'pread-fails', '');
  const kit = await startNbdkit(t, ['--filter=error', 'pattern', 'size=16M', 'error-pread=EIO', 'error-pread-rate=100%', `error-pread-file=${trigger}`]);
  const client = await NbdClient.connect({ socketPath: kit.socket, exportName: '' }, { connectTimeoutMs: 5000 });
  t.teardown(() => client.close());
  // nbdkit's pattern plugin is fillPattern with seed 0: every 8 bytes hold their own offset.
  const expect = (at: number, n: number) => fillPattern(Buffer.alloc(n), at);
  fs.writeFileSync(trigger, '');
  const failed = await Promise.allSettled([client.read(0, MiB), client.read(MiB, MiB), client.read(2 * MiB, 4 * MiB)]);
  t.strictSame(
    failed.map((r) => r.status),
    ['rejected', 'rejected', 'rejected'],
    'READs fail while the error filter is armed',
  );
  t.match(String((failed[0] as PromiseRejectedResult).reason), /EIO|Input\/output/, 'with EIO');
  fs.rmSync(trigger);
  const [a, b] = await Promise.all([client.read(0, MiB), client.read(3 * MiB, 4 * MiB)]);
  t.ok(a.equals(expect(0, MiB)), 'the connection is still in step: 1 MiB READ right');
  t.ok(b.equals(expect(3 * MiB, 4 * MiB)), '4 MiB READ right');
});

// ------------------------------------------------------ read slabs

/** A server-side parser in transmission, fed through slab read hooks; its requests land in `got`. */
function slabFedParser(): { hooks: SlabReadHooks; got: RequestMessage[] } {
  const parser = new ClientStreamParser({ maxPayload: 32 * 1024 * 1024 });
  parser.phase = 'transmission';
  parser.inputReused = true;
  const got: RequestMessage[] = [];
  const hooks = slabReadHooks(parser, (m: ClientMessage) => {
    if (m.type === 'request') got.push(m);
  });
  return { hooks, got };
}

t.test('read slabs: WRITE payloads stay intact as views until released, however reads and releases interleave', async (t) => {
  const rand = mulberry32(4242);
  const { hooks, got } = slabFedParser();
  // 400 WRITEs of 1 byte to 40 KiB, each payload filled from its cookie.
  const payloadOf = (cookie: number, length: number) => {
    const b = Buffer.alloc(length);
    for (let i = 0; i < length; i++) b[i] = (cookie * 31 + i * 7) & 0xff;
    return b;
  };
  const parts: Buffer[] = [];
  for (let cookie = 0; cookie < 400; cookie++) {
    const length = 1 + (rand() % (40 * 1024));
    parts.push(build.requestHeader(0, Command.Write, BigInt(cookie), cookie * 65536, length), payloadOf(cookie, length));
  }
  const stream = Buffer.concat(parts);
  const held: RequestMessage[] = [];
  let views = 0;
  let corrupt = 0;
  const intact = (m: RequestMessage) => (m.payload as Buffer).equals(payloadOf(Number(m.cookie), m.length));
  const release = (m: RequestMessage) => {
    if (!intact(m)) corrupt++;
    if (hooks.release(m.payload as Buffer)) views++;
  };
  for (let at = 0; at < stream.length; ) {
    const buf = hooks.buffer();
    // What a unix socket would hand over: up to 200 KiB, often less.
    const n = Math.min(buf.length, 1 + (rand() % (200 * 1024)), stream.length - at);
    stream.copy(buf, 0, at, at + n);
    hooks.callback(n, buf);
    at += n;
    for (const m of got.splice(0)) {
      if (!intact(m)) corrupt++;
      held.push(m);
    }
    // Requests finish in any order; up to 24 stay in flight.
    while (held.length > 24 || (held.length > 0 && rand() % 3 === 0)) release(held.splice(rand() % held.length, 1)[0]);
  }
  for (const m of held.splice(0)) release(m);
  t.equal(corrupt, 0, 'every payload held its bytes from arrival to release');
  // The rest arrived split across reads, or while slabs were pinned to the cap:
  // those are copies.
  t.ok(views >= 100, `payloads handed out as views of a slab, not copies: ${views} of 400`);
});

t.test('read slabs: with many payloads held, the rest are copied out (a few slabs pinned at most)', async (t) => {
  const { hooks, got } = slabFedParser();
  // 100 WRITEs of 60 KiB, each read alone, none released.
  for (let cookie = 0; cookie < 100; cookie++) {
    const msg = Buffer.concat([
      build.requestHeader(0, Command.Write, BigInt(cookie), 0, 60 * 1024),
      Buffer.alloc(60 * 1024, cookie),
    ]);
    const buf = hooks.buffer();
    t.ok(buf.length >= msg.length, 'a read has room for a whole request');
    msg.copy(buf);
    hooks.callback(msg.length, buf);
  }
  t.equal(got.length, 100);
  t.ok(
    got.every((m) => (m.payload as Buffer).equals(Buffer.alloc(60 * 1024, Number(m.cookie)))),
    'every payload intact',
  );
  const slabs = new Set(got.filter((m) => hooks.release(m.payload as Buffer)).map((m) => (m.payload as Buffer).buffer));
  t.ok(
    slabs.size >= 1 && slabs.size <= SLABS_PER_CONNECTION,
    `views sat in ${slabs.size} slabs (a connection has ${SLABS_PER_CONNECTION}); the other payloads were copied`,
  );
});
