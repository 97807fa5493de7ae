// Protocol edge cases against a running nbd-cbw, over a raw unix socket: the
// requests are built with src/nbd-protocol/serializer.ts, the replies are
// parsed by hand here (independently of the server's own code), and every
// read from the socket has a deadline.

import t, { type Test } from 'tap';
import * as fs from 'node:fs';
import * as net from 'node:net';
import { build } from '../src/nbd-protocol';
import {
  KiB,
  MiB,
  makeImage,
  randomBuffer,
  readAt,
  startNbdCbw,
  tmpPath,
  waitFor,
  writeAt,
  type Peer,
} from './helpers/peers';

// Wire values, spelled out here rather than imported, so the test checks the
// server against the specification and not against its own constants.
const NBDMAGIC = 0x4e42444d41474943n;
const IHAVEOPT = 0x49484156454f5054n;
const OPT_REPLY_MAGIC = 0x3e889045565a9n;
const SIMPLE_MAGIC = 0x67446698;
const STRUCTURED_MAGIC = 0x668e33ef;

const OPT = { EXPORT_NAME: 1, ABORT: 2, LIST: 3, INFO: 6, GO: 7, STRUCTURED_REPLY: 8, LIST_META_CONTEXT: 9, SET_META_CONTEXT: 10 };
const REP = {
  ACK: 1,
  SERVER: 2,
  INFO: 3,
  META_CONTEXT: 4,
  ERR_UNSUP: 0x80000001,
  ERR_INVALID: 0x80000003,
  ERR_UNKNOWN: 0x80000006,
};
const CMD = { READ: 0, WRITE: 1, DISC: 2, FLUSH: 3, TRIM: 4, CACHE: 5, WRITE_ZEROES: 6, BLOCK_STATUS: 7 };
const CF = { FUA: 1, NO_HOLE: 2, DF: 4, REQ_ONE: 8 };
const TF = { HAS_FLAGS: 1, READ_ONLY: 2, SEND_FLUSH: 4, SEND_FUA: 8, SEND_TRIM: 32, SEND_WRITE_ZEROES: 64, SEND_DF: 128 };
const CHUNK = { NONE: 0, OFFSET_DATA: 1, OFFSET_HOLE: 2, BLOCK_STATUS: 5, ERROR: 0x8001 };
const EPERM = 1;
const EINVAL = 22;
const ENOSPC = 28;
const DONE = 1;

const SIZE = 16 * MiB;
const TIMEOUT = 5000;

// ------------------------------------------------------------- raw client

class RawClient {
  /** Received, not yet consumed (a list: concatenating on every chunk would be quadratic). */
  private chunks: Buffer[] = [];
  private length = 0;
  private ended = false;
  /** Set once STRUCTURED_REPLY was acked: READ replies are chunks, not simple reply + data. */
  structured = false;
  private wake: (() => void) | null = null;

  private constructor(readonly sock: net.Socket) {
    sock.on('data', (d: Buffer) => {
      this.chunks.push(d);
      this.length += d.length;
      this.notify();
    });
    sock.on('close', () => {
      this.ended = true;
      this.notify();
    });
    sock.on('end', () => {
      this.ended = true;
      this.notify();
    });
    sock.on('error', () => undefined);
  }

  static connect(path: string): Promise<RawClient> {
    return new Promise((resolve, reject) => {
      const s = net.createConnection({ path });
      const timer = setTimeout(() => {
        s.destroy();
        reject(new Error(`connect to ${path} timed out`));
      }, TIMEOUT);
      s.once('connect', () => {
        clearTimeout(timer);
        resolve(new RawClient(s));
      });
      s.once('error', (e) => {
        clearTimeout(timer);
        reject(e);
      });
    });
  }

  private notify(): void {
    const w = this.wake;
    this.wake = null;
    w?.();
  }

  send(...parts: Buffer[]): void {
    this.sock.write(parts.length === 1 ? parts[0] : Buffer.concat(parts));
  }

  get buffered(): number {
    return this.length;
  }

  /** Remove and return the first n buffered bytes (n <= this.length). */
  private take(n: number): Buffer {
    const out = Buffer.allocUnsafe(n);
    let filled = 0;
    while (filled < n) {
      const head = this.chunks[0];
      const k = Math.min(head.length, n - filled);
      head.copy(out, filled, 0, k);
      filled += k;
      if (k === head.length) this.chunks.shift();
      else this.chunks[0] = head.subarray(k);
    }
    this.length -= n;
    return out;
  }

  /** Exactly n bytes, or throws on timeout / EOF. */
  async read(n: number, timeoutMs = TIMEOUT): Promise<Buffer> {
    const deadline = Date.now() + timeoutMs;
    while (this.length < n) {
      if (this.ended) throw new Error(`connection closed with ${this.length}/${n} bytes read`);
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`timed out reading ${n} bytes (have ${this.length})`);
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, left);
        this.wake = () => {
          clearTimeout(timer);
          resolve();
        };
      });
    }
    return this.take(n);
  }

  /** True if the server closes the connection (EOF) within the time; unread bytes are discarded. */
  async closedWithin(timeoutMs = TIMEOUT): Promise<boolean> {
    const deadline = Date.now() + timeoutMs;
    while (!this.ended) {
      const left = deadline - Date.now();
      if (left <= 0) return false;
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, left);
        this.wake = () => {
          clearTimeout(timer);
          resolve();
        };
      });
    }
    return true;
  }

  /** No byte arrives within `ms`. */
  async silentFor(ms: number): Promise<boolean> {
    const before = this.length;
    await new Promise((r) => setTimeout(r, ms));
    return this.length === before;
  }

  destroy(): void {
    this.sock.destroy();
  }

  // ------------------------------------------------------------ handshake

  async greeting(): Promise<number> {
    const g = await this.read(18);
    if (g.readBigUInt64BE(0) !== NBDMAGIC || g.readBigUInt64BE(8) !== IHAVEOPT) throw new Error('bad greeting');
    return g.readUInt16BE(16);
  }

  clientFlags(flags: number): void {
    const b = Buffer.alloc(4);
    b.writeUInt32BE(flags, 0);
    this.send(b);
  }

  async optionReply(): Promise<{ option: number; type: number; data: Buffer }> {
    const h = await this.read(20);
    if (h.readBigUInt64BE(0) !== OPT_REPLY_MAGIC) throw new Error(`bad option reply magic ${h.toString('hex')}`);
    const len = h.readUInt32BE(16);
    return { option: h.readUInt32BE(8), type: h.readUInt32BE(12), data: await this.read(len) };
  }

  /** Option replies up to and including the final one (ACK or an error). */
  async optionReplies(): Promise<Array<{ option: number; type: number; data: Buffer }>> {
    const out = [];
    for (let i = 0; i < 100; i++) {
      const r = await this.optionReply();
      out.push(r);
      if (r.type === REP.ACK || r.type >= 0x80000000) return out;
    }
    throw new Error('more than 100 option replies');
  }

  /** GO for `name`; returns size and transmission flags from NBD_INFO_EXPORT. */
  async go(name = 'disk'): Promise<{ size: number; flags: number }> {
    this.send(build.option(OPT.GO, build.infoRequestData(name, [])));
    const replies = await this.optionReplies();
    const last = replies[replies.length - 1];
    if (last.type !== REP.ACK) throw new Error(`GO failed: 0x${last.type.toString(16)} ${last.data.toString()}`);
    const exp = replies.find((r) => r.type === REP.INFO && r.data.readUInt16BE(0) === 0);
    if (!exp) throw new Error('GO without NBD_INFO_EXPORT');
    return { size: Number(exp.data.readBigUInt64BE(2)), flags: exp.data.readUInt16BE(10) };
  }

  async setMetaContext(name = 'disk'): Promise<number> {
    this.send(build.option(OPT.SET_META_CONTEXT, build.metaContextRequestData(name, ['base:allocation'])));
    const replies = await this.optionReplies();
    const mc = replies.find((r) => r.type === REP.META_CONTEXT);
    if (!mc) throw new Error('no META_CONTEXT reply');
    return mc.data.readUInt32BE(0);
  }

  // --------------------------------------------------------- transmission

  request(flags: number, cmd: number, cookie: bigint, offset: number, length: number, payload?: Buffer): void {
    const h = build.requestHeader(flags, cmd, cookie, offset, length);
    if (payload) this.send(h, payload);
    else this.send(h);
  }

  /**
   * One reply. `readLen` says how many data bytes follow a successful simple
   * reply (non-structured READ); structured chunks carry their length.
   */
  async reply(readLen = 0): Promise<Reply> {
    const m = (await this.read(4)).readUInt32BE(0);
    if (m === SIMPLE_MAGIC) {
      const rest = await this.read(12);
      const error = rest.readUInt32BE(0);
      const cookie = rest.readBigUInt64BE(4);
      const data = error === 0 && readLen > 0 ? await this.read(readLen) : null;
      return { kind: 'simple', cookie, error, data };
    }
    if (m === STRUCTURED_MAGIC) {
      const rest = await this.read(16);
      const flags = rest.readUInt16BE(0);
      const type = rest.readUInt16BE(2);
      const cookie = rest.readBigUInt64BE(4);
      const len = rest.readUInt32BE(12);
      return { kind: 'chunk', cookie, flags, type, payload: await this.read(len) };
    }
    throw new Error(`bad reply magic 0x${m.toString(16)}`);
  }

  /** All chunks of one structured reply (up to DONE), or a single simple reply. */
  async fullReply(readLen = 0): Promise<Reply[]> {
    const out: Reply[] = [];
    for (let i = 0; i < 10_000; i++) {
      const r = await this.reply(readLen);
      out.push(r);
      if (r.kind === 'simple' || (r.flags & DONE) !== 0) return out;
    }
    throw new Error('structured reply never finished');
  }
}

type Reply =
  | { kind: 'simple'; cookie: bigint; error: number; data: Buffer | null }
  | { kind: 'chunk'; cookie: bigint; flags: number; type: number; payload: Buffer };

/** The NBD error of a reply (simple error field, or an error chunk), 0 if none. */
function errorOf(replies: Reply[]): number {
  for (const r of replies) {
    if (r.kind === 'simple' && r.error !== 0) return r.error;
    if (r.kind === 'chunk' && (r.type & 0x8000) !== 0) return r.payload.readUInt32BE(0);
  }
  return 0;
}

/** Data of a structured READ reply (OFFSET_DATA / OFFSET_HOLE chunks). */
function readData(replies: Reply[], offset: number, length: number): Buffer {
  const out = Buffer.alloc(length, 0xee);
  for (const r of replies) {
    if (r.kind === 'simple') {
      if (r.data) r.data.copy(out);
      continue;
    }
    if (r.type === CHUNK.OFFSET_DATA) {
      const at = Number(r.payload.readBigUInt64BE(0)) - offset;
      r.payload.copy(out, at, 8);
    } else if (r.type === CHUNK.OFFSET_HOLE) {
      const at = Number(r.payload.readBigUInt64BE(0)) - offset;
      out.fill(0, at, at + r.payload.readUInt32BE(8));
    }
  }
  return out;
}

/** A client through GO, with structured replies and base:allocation. */
async function structuredClient(cbw: Peer): Promise<{ c: RawClient; size: number; flags: number }> {
  const c = await RawClient.connect(cbw.socket);
  await c.greeting();
  c.clientFlags(3);
  c.send(build.option(OPT.STRUCTURED_REPLY));
  const sr = await c.optionReplies();
  if (sr[0].type !== REP.ACK) throw new Error('STRUCTURED_REPLY refused');
  c.structured = true;
  await c.setMetaContext();
  const { size, flags } = await c.go();
  return { c, size, flags };
}

let cookieSeq = 1000n;
const nextCookie = () => ++cookieSeq;

async function doRead(c: RawClient, offset: number, length: number, flags = 0): Promise<{ error: number; data: Buffer; replies: Reply[] }> {
  const cookie = nextCookie();
  c.request(flags, CMD.READ, cookie, offset, length);
  const replies = await c.fullReply(c.structured ? 0 : length);
  for (const r of replies) if (r.cookie !== cookie) throw new Error(`reply for cookie ${r.cookie}, expected ${cookie}`);
  return { error: errorOf(replies), data: readData(replies, offset, length), replies };
}

async function doSimple(c: RawClient, flags: number, cmd: number, offset: number, length: number, payload?: Buffer): Promise<number> {
  const cookie = nextCookie();
  c.request(flags, cmd, cookie, offset, length, payload);
  const replies = await c.fullReply();
  for (const r of replies) if (r.cookie !== cookie) throw new Error(`reply for cookie ${r.cookie}, expected ${cookie}`);
  return errorOf(replies);
}

/** A READ that must succeed: proves the connection is alive and in step. */
async function checkAlive(t: Test, c: RawClient, image: string, what: string): Promise<void> {
  const off = 3 * MiB + 17;
  const r = await doRead(c, off, 4096);
  t.equal(r.error, 0, `${what}: a following READ succeeds`);
  t.ok(r.data.equals(readAt(image, off, 4096)), `${what}: and returns the right data`);
}

// ------------------------------------------------------------------ setup

// One server for the file; each case uses its own connection(s). The image
// is "fragmented" in its first MiB: 64 KiB data, 64 KiB hole, repeated.
const image = (() => {
  const p = tmpPath(t, 'edge', '.img');
  makeImage(p, SIZE, 'zero');
  for (let i = 0; i < 8; i++) writeAt(p, i * 128 * KiB, randomBuffer(64 * KiB, 500 + i));
  writeAt(p, 2 * MiB, randomBuffer(2 * MiB, 600));
  return p;
})();
let cbw: Peer;

t.before(async () => {
  cbw = await startNbdCbw(t, ['--source', `file:${image}`]);
});

// ------------------------------------------------------------- handshake

t.test('unknown option gets ERR_UNSUP and the handshake goes on (GO succeeds)', async (t) => {
  const c = await RawClient.connect(cbw.socket);
  t.teardown(() => c.destroy());
  await c.greeting();
  c.clientFlags(3);
  c.send(build.option(0x1234, Buffer.from('some payload the server must skip')));
  const r = await c.optionReply();
  t.equal(r.option, 0x1234, 'the reply names the unknown option');
  t.equal(r.type, REP.ERR_UNSUP, 'NBD_REP_ERR_UNSUP');
  const { size } = await c.go();
  t.equal(size, SIZE, 'then GO succeeds with the export size');
  const d = await doRead(c, 2 * MiB, 512);
  t.equal(d.error, 0, 'and a READ works (simple replies: no STRUCTURED_REPLY)');
  t.ok(d.data.equals(readAt(image, 2 * MiB, 512)), 'with the right data');
});

t.test('unknown export in GO gets ERR_UNKNOWN, a GO for the real one then succeeds', async (t) => {
  const c = await RawClient.connect(cbw.socket);
  t.teardown(() => c.destroy());
  await c.greeting();
  c.clientFlags(3);
  c.send(build.option(OPT.GO, build.infoRequestData('no-such-export', [])));
  const r = await c.optionReplies();
  t.equal(r[r.length - 1].type, REP.ERR_UNKNOWN, 'NBD_REP_ERR_UNKNOWN');
  t.equal((await c.go()).size, SIZE, 'GO "disk" succeeds');
});

t.test('SET_META_CONTEXT before STRUCTURED_REPLY gets ERR_INVALID', async (t) => {
  const c = await RawClient.connect(cbw.socket);
  t.teardown(() => c.destroy());
  await c.greeting();
  c.clientFlags(3);
  c.send(build.option(OPT.SET_META_CONTEXT, build.metaContextRequestData('disk', ['base:allocation'])));
  const r = await c.optionReplies();
  t.equal(r.length, 1, 'one reply, no META_CONTEXT');
  t.equal(r[0].type, REP.ERR_INVALID, 'NBD_REP_ERR_INVALID');
  c.send(build.option(OPT.LIST_META_CONTEXT, build.metaContextRequestData('disk', [])));
  const l = await c.optionReplies();
  t.equal(l[l.length - 1].type, REP.ERR_INVALID, 'LIST_META_CONTEXT too');
  // After STRUCTURED_REPLY the same request works.
  c.send(build.option(OPT.STRUCTURED_REPLY));
  t.equal((await c.optionReplies())[0].type, REP.ACK, 'STRUCTURED_REPLY acked');
  c.structured = true;
  const id = await c.setMetaContext();
  t.ok(id > 0, `then SET_META_CONTEXT selects base:allocation (id ${id})`);
  const { flags } = await c.go();
  t.ok(flags & TF.SEND_DF, 'GO: DF offered with structured replies');
  const cookie = nextCookie();
  c.request(0, CMD.BLOCK_STATUS, cookie, 0, 1 * MiB);
  const bs = await c.fullReply();
  t.equal(errorOf(bs), 0, 'BLOCK_STATUS works');
});

t.test('LIST lists the export', async (t) => {
  const c = await RawClient.connect(cbw.socket);
  t.teardown(() => c.destroy());
  await c.greeting();
  c.clientFlags(3);
  c.send(build.option(OPT.LIST));
  const r = await c.optionReplies();
  const servers = r.filter((x) => x.type === REP.SERVER);
  t.equal(servers.length, 1, 'one NBD_REP_SERVER');
  const nameLen = servers[0]?.data.readUInt32BE(0) ?? 0;
  t.equal(servers[0]?.data.toString('utf8', 4, 4 + nameLen), 'disk', 'named "disk"');
  t.equal(r[r.length - 1].type, REP.ACK, 'then ACK');
  t.equal((await c.go()).size, SIZE, 'and the handshake goes on');
});

t.test('ABORT gets ACK and the server closes the connection', async (t) => {
  const c = await RawClient.connect(cbw.socket);
  t.teardown(() => c.destroy());
  await c.greeting();
  c.clientFlags(3);
  c.send(build.option(OPT.ABORT));
  const r = await c.optionReply();
  t.equal(r.option, OPT.ABORT, 'reply to ABORT');
  t.equal(r.type, REP.ACK, 'NBD_REP_ACK');
  t.ok(await c.closedWithin(), 'then the connection is closed');
});

t.test('unknown client flags close the connection', async (t) => {
  const c = await RawClient.connect(cbw.socket);
  t.teardown(() => c.destroy());
  await c.greeting();
  c.clientFlags(3 | 0x100);
  t.ok(await c.closedWithin(), 'closed');
});

t.test('bad option magic closes the connection', async (t) => {
  const c = await RawClient.connect(cbw.socket);
  t.teardown(() => c.destroy());
  await c.greeting();
  c.clientFlags(3);
  const opt = build.option(OPT.LIST);
  opt.write('IHAVEOPX', 0, 'latin1');
  c.send(opt);
  t.ok(await c.closedWithin(), 'closed');
});

// ------------------------------------------------------ old-style clients

t.test('EXPORT_NAME without STRUCTURED_REPLY and without NO_ZEROES: 124 zero bytes, simple replies', async (t) => {
  const c = await RawClient.connect(cbw.socket);
  t.teardown(() => c.destroy());
  const hs = await c.greeting();
  t.ok(hs & 1, 'server offers FIXED_NEWSTYLE');
  t.ok(hs & 2, 'server offers NO_ZEROES');
  c.clientFlags(1); // fixed newstyle, no NO_ZEROES
  c.send(build.option(OPT.EXPORT_NAME, Buffer.from('disk')));
  const r = await c.read(10 + 124);
  t.equal(Number(r.readBigUInt64BE(0)), SIZE, 'export size');
  const flags = r.readUInt16BE(8);
  t.ok(flags & TF.HAS_FLAGS, 'HAS_FLAGS');
  t.notOk(flags & TF.READ_ONLY, 'writable');
  t.notOk(flags & TF.SEND_DF, 'no DF without structured replies');
  t.ok(r.subarray(10).equals(Buffer.alloc(124)), '124 zero bytes follow');
  t.ok(await c.silentFor(100), 'and nothing more');

  // WRITE then READ with simple replies (as the Linux kernel client does).
  const data = randomBuffer(12345, 700);
  const off = 10 * MiB + 333;
  const wc = nextCookie();
  c.request(0, CMD.WRITE, wc, off, data.length, data);
  const w = await c.reply();
  t.same([w.kind, w.cookie, (w as { error: number }).error], ['simple', wc, 0], 'WRITE: simple reply, no error');
  t.ok(readAt(image, off, data.length).equals(data), 'the data is in the file');
  const rc = nextCookie();
  c.request(0, CMD.READ, rc, off, data.length);
  const rd = await c.reply(data.length);
  t.equal(rd.kind, 'simple', 'READ: a simple reply');
  t.equal(rd.cookie, rc, 'for our cookie');
  t.ok(rd.kind === 'simple' && rd.data?.equals(data), 'followed by exactly the data');
  // The stream is exactly in step: the next thing is the FLUSH's reply.
  const fc = nextCookie();
  c.request(0, CMD.FLUSH, fc, 0, 0);
  const f = await c.reply();
  t.same([f.kind, f.cookie], ['simple', fc], 'FLUSH reply comes next, in step');
  // Zero-length READ: a simple reply without data.
  const zc = nextCookie();
  c.request(0, CMD.READ, zc, 0, 0);
  const z = await c.reply();
  t.same([z.kind, z.cookie, (z as { error: number }).error], ['simple', zc, 0], 'zero-length READ: simple reply, no data');
  // Errors are simple replies too.
  c.request(0, CMD.READ, nextCookie(), SIZE, 4096);
  const e = await c.reply();
  t.same([e.kind, (e as { error: number }).error], ['simple', EINVAL], 'READ past the end: simple reply with EINVAL');
  t.ok(await c.silentFor(50), 'and no data after an error reply');
  await checkAlive(t, c, image, 'after the error');
});

t.test('EXPORT_NAME with NO_ZEROES: exactly 10 bytes', async (t) => {
  const c = await RawClient.connect(cbw.socket);
  t.teardown(() => c.destroy());
  await c.greeting();
  c.clientFlags(3);
  c.send(build.option(OPT.EXPORT_NAME, Buffer.from('disk')));
  const r = await c.read(10);
  t.equal(Number(r.readBigUInt64BE(0)), SIZE, 'export size');
  t.ok(await c.silentFor(100), 'no padding follows');
  const fc = nextCookie();
  c.request(0, CMD.FLUSH, fc, 0, 0);
  const f = await c.reply();
  t.same([f.kind, f.cookie], ['simple', fc], 'the next bytes are the FLUSH reply');
});

// ----------------------------------------------------------- transmission

t.test('unknown command gets EINVAL and the connection keeps working', async (t) => {
  const { c } = await structuredClient(cbw);
  t.teardown(() => c.destroy());
  t.equal(await doSimple(c, 0, 0x42, 0, 4096), EINVAL, 'command 0x42: EINVAL');
  t.equal(await doSimple(c, 0, 8 /* RESIZE, not offered */, 0, 0), EINVAL, 'RESIZE (not negotiated): EINVAL');
  await checkAlive(t, c, image, 'after unknown commands');
});

t.test('unknown command flags get EINVAL; FUA is accepted on every command', async (t) => {
  const { c, flags } = await structuredClient(cbw);
  t.teardown(() => c.destroy());
  t.ok(flags & TF.SEND_FUA, 'SEND_FUA offered');
  t.equal(await doSimple(c, 0x40, CMD.FLUSH, 0, 0), EINVAL, 'FLUSH with an undefined flag bit: EINVAL');
  t.equal((await doRead(c, 0, 512, CF.REQ_ONE)).error, EINVAL, 'READ with REQ_ONE (a BLOCK_STATUS flag): EINVAL');
  // "provided NBD_FLAG_SEND_FUA has been negotiated, the server MUST accept
  // all commands with this bit set (even by ignoring the bit)"; old qemu
  // clients set it on FLUSH.
  t.equal(await doSimple(c, CF.FUA, CMD.FLUSH, 0, 0), 0, 'FLUSH with FUA: ok');
  t.equal((await doRead(c, 0, 512, CF.FUA)).error, 0, 'READ with FUA: ok');
  t.equal(await doSimple(c, CF.FUA, CMD.CACHE, 0, 4096), 0, 'CACHE with FUA: ok');
  const cookie = nextCookie();
  c.request(CF.FUA | CF.REQ_ONE, CMD.BLOCK_STATUS, cookie, 0, 4096);
  t.equal(errorOf(await c.fullReply()), 0, 'BLOCK_STATUS with FUA: ok');
  await checkAlive(t, c, image, 'after flag checks');
});

t.test('read past the end gets EINVAL', async (t) => {
  const { c } = await structuredClient(cbw);
  t.teardown(() => c.destroy());
  const a = await doRead(c, SIZE - 100, 200);
  t.equal(a.error, EINVAL, 'crossing the end: EINVAL');
  t.ok(a.replies.every((r) => r.kind === 'chunk'), 'as a structured error chunk (never a simple reply to a READ)');
  t.equal((await doRead(c, SIZE + 4096, 1)).error, EINVAL, 'starting past the end: EINVAL');
  t.equal((await doRead(c, 2 ** 52, 512)).error, EINVAL, 'a huge offset: EINVAL');
  const ok = await doRead(c, SIZE - 100, 100);
  t.equal(ok.error, 0, 'the last 100 bytes read fine');
  await checkAlive(t, c, image, 'after reads past the end');
});

t.test('write past the end gets ENOSPC, the payload is consumed', async (t) => {
  const { c } = await structuredClient(cbw);
  t.teardown(() => c.destroy());
  t.equal(await doSimple(c, 0, CMD.WRITE, SIZE - 100, 200, Buffer.alloc(200, 0x99)), ENOSPC, 'crossing the end: ENOSPC');
  t.equal(await doSimple(c, 0, CMD.WRITE, SIZE, 512, Buffer.alloc(512, 0x99)), ENOSPC, 'at the end: ENOSPC');
  t.equal(await doSimple(c, 0, CMD.WRITE_ZEROES, SIZE - 10, 20), ENOSPC, 'WRITE_ZEROES crossing the end: ENOSPC');
  t.equal(fs.statSync(image).size, SIZE, 'the file did not grow');
  t.notOk(readAt(image, SIZE - 100, 100).includes(0x99), 'the part inside the export was not written either');
  await checkAlive(t, c, image, 'after writes past the end');
});

t.test('zero-length read and write succeed', async (t) => {
  const { c } = await structuredClient(cbw);
  t.teardown(() => c.destroy());
  const r = await doRead(c, 4096, 0);
  t.equal(r.error, 0, 'zero-length READ: no error');
  t.equal(r.replies.length, 1, 'one chunk');
  const only = r.replies[0];
  t.ok(only.kind === 'chunk' && (only.flags & DONE) !== 0, 'a structured chunk with DONE');
  t.equal(await doSimple(c, 0, CMD.WRITE, 4096, 0, Buffer.alloc(0)), 0, 'zero-length WRITE: ok');
  t.equal(await doSimple(c, 0, CMD.WRITE_ZEROES, 4096, 0), 0, 'zero-length WRITE_ZEROES: ok');
  t.equal(await doSimple(c, 0, CMD.TRIM, 4096, 0), 0, 'zero-length TRIM: ok');
  t.equal(await doRead(c, SIZE, 0).then((x) => x.error), 0, 'zero-length READ at the very end: ok');
  await checkAlive(t, c, image, 'after zero-length requests');
});

t.test('oversize read (33 MiB) gets EINVAL and the connection stays usable', async (t) => {
  const { c } = await structuredClient(cbw);
  t.teardown(() => c.destroy());
  const r = await doRead(c, 0, 33 * MiB);
  t.equal(r.error, EINVAL, 'EINVAL');
  t.ok(r.replies.every((x) => x.kind === 'chunk' && x.type === CHUNK.ERROR), 'an error chunk, no data');
  const max = await doRead(c, 0, 16 * MiB);
  t.equal(max.error, 0, 'a 16 MiB read (the whole export) is fine');
  t.ok(max.data.equals(readAt(image, 0, 16 * MiB)), 'with the right data');
  await checkAlive(t, c, image, 'after the oversize read');
});

t.test('oversize write (33 MiB header, payload sent) gets EINVAL and the stream stays in step', async (t) => {
  const { c } = await structuredClient(cbw);
  t.teardown(() => c.destroy());
  const target = 12 * MiB;
  const before = readAt(image, target, 64 * KiB);
  const big = Buffer.alloc(33 * MiB, 0x77);
  const bigCookie = nextCookie();
  // Header and payload, then at once a normal WRITE behind them. (The READ
  // comes only after the WRITE's reply: requests in flight together may be
  // executed in any order.)
  const small = randomBuffer(4096, 800);
  const wCookie = nextCookie();
  c.send(
    build.requestHeader(0, CMD.WRITE, bigCookie, 0, big.length),
    big,
    build.requestHeader(0, CMD.WRITE, wCookie, target, small.length),
    small,
  );
  const got = new Map<bigint, Reply[]>();
  for (let i = 0; i < 2; i++) {
    const r = await c.fullReply();
    got.set(r[0].cookie, r);
  }
  t.equal(errorOf(got.get(bigCookie) ?? []), EINVAL, 'the 33 MiB WRITE: EINVAL');
  t.equal(errorOf(got.get(wCookie) ?? [{ kind: 'simple', cookie: 0n, error: -1, data: null }]), 0, 'the WRITE after it: ok');
  const rd = await doRead(c, target, small.length);
  t.equal(rd.error, 0, 'a READ then: ok');
  t.ok(rd.data.equals(small), 'and returns what the second WRITE wrote (its payload was parsed in step)');
  t.ok(readAt(image, target, small.length).equals(small), 'which is in the file');
  t.notOk(readAt(image, 0, 1 * MiB).includes(Buffer.alloc(64, 0x77)), 'nothing of the oversize payload was written');
  t.ok(readAt(image, target + 4096, 60 * KiB).equals(before.subarray(4096)), 'bytes after the small write untouched');
  t.ok(await c.silentFor(100), 'no stray replies');
  await checkAlive(t, c, image, 'after the oversize write');
});

t.test('BLOCK_STATUS: REQ_ONE returns exactly one extent, without it several on a fragmented image', async (t) => {
  const { c } = await structuredClient(cbw);
  t.teardown(() => c.destroy());
  const status = async (flags: number, off: number, len: number) => {
    const cookie = nextCookie();
    c.request(flags, CMD.BLOCK_STATUS, cookie, off, len);
    const rs = await c.fullReply();
    const chunks = rs.filter((r): r is Extract<Reply, { kind: 'chunk' }> => r.kind === 'chunk' && r.type === CHUNK.BLOCK_STATUS);
    const extents: Array<[number, number]> = [];
    for (const ch of chunks) {
      for (let at = 4; at + 8 <= ch.payload.length; at += 8) extents.push([ch.payload.readUInt32BE(at), ch.payload.readUInt32BE(at + 4)]);
    }
    return { error: errorOf(rs), chunks: chunks.length, extents };
  };
  const one = await status(CF.REQ_ONE, 0, 1 * MiB);
  t.equal(one.error, 0, 'REQ_ONE: ok');
  t.equal(one.chunks, 1, 'REQ_ONE: one block status chunk');
  t.same(one.extents, [[64 * KiB, 0]], 'REQ_ONE: exactly one extent: the first 64 KiB, data');
  const oneHole = await status(CF.REQ_ONE, 64 * KiB, 1 * MiB);
  t.same(oneHole.extents, [[64 * KiB, 3]], 'REQ_ONE from a hole: one extent, hole+zero');

  const all = await status(0, 0, 1 * MiB);
  t.equal(all.error, 0, 'without REQ_ONE: ok');
  const expected: Array<[number, number]> = [];
  for (let i = 0; i < 8; i++) expected.push([64 * KiB, 0], [64 * KiB, 3]);
  t.same(all.extents, expected, 'without REQ_ONE: 16 extents alternating data / hole+zero');
  const tail = await status(0, SIZE - 4096, 4096);
  t.same(tail.extents, [[4096, 3]], 'the last 4 KiB: one hole extent ending at the end of the export');
  // "The server SHOULD return NBD_EINVAL if it receives a
  // NBD_CMD_BLOCK_STATUS request including one or more sectors beyond the
  // size of the device."
  t.equal((await status(0, SIZE - 4096, 1 * MiB)).error, EINVAL, 'a request past the end: EINVAL');

  // Unaligned offset inside a data extent.
  const mid = await status(CF.REQ_ONE, 1000, 1 * MiB);
  t.same(mid.extents, [[64 * KiB - 1000, 0]], 'REQ_ONE at an unaligned offset: the rest of the extent');

  // Without SET_META_CONTEXT, BLOCK_STATUS is invalid.
  const plain = await RawClient.connect(cbw.socket);
  t.teardown(() => plain.destroy());
  await plain.greeting();
  plain.clientFlags(3);
  plain.send(build.option(OPT.STRUCTURED_REPLY));
  await plain.optionReplies();
  plain.structured = true;
  await plain.go();
  const cookie = nextCookie();
  plain.request(0, CMD.BLOCK_STATUS, cookie, 0, 4096);
  t.equal(errorOf(await plain.fullReply()), EINVAL, 'no meta context negotiated: EINVAL');
});

t.test('write to a read-only export gets EPERM', async (t) => {
  const ro = await startNbdCbw(t, ['--source', `file:${image}`, '-r']);
  const { c, flags } = await structuredClient(ro);
  t.teardown(() => c.destroy());
  t.ok(flags & TF.READ_ONLY, 'READ_ONLY flag');
  t.notOk(flags & (TF.SEND_TRIM | TF.SEND_WRITE_ZEROES | TF.SEND_FUA), 'no TRIM, WRITE_ZEROES or FUA offered');
  const before = readAt(image, 0, 4096);
  t.equal(await doSimple(c, 0, CMD.WRITE, 0, 4096, Buffer.alloc(4096, 0x42)), EPERM, 'WRITE: EPERM');
  t.equal(await doSimple(c, 0, CMD.TRIM, 0, 4096), EPERM, 'TRIM: EPERM');
  t.equal(await doSimple(c, 0, CMD.WRITE_ZEROES, 0, 4096), EPERM, 'WRITE_ZEROES: EPERM');
  t.ok(readAt(image, 0, 4096).equals(before), 'nothing changed');
  await checkAlive(t, c, image, 'read-only export');
});

t.test('DISC with requests outstanding: all are answered before the close', async (t) => {
  const { c } = await structuredClient(cbw);
  t.teardown(() => c.destroy());
  const base = 6 * MiB;
  const n = 8;
  const datas = Array.from({ length: n }, (_, i) => randomBuffer(256 * KiB, 900 + i));
  const cookies: bigint[] = [];
  const parts: Buffer[] = [];
  for (let i = 0; i < n; i++) {
    const cookie = nextCookie();
    cookies.push(cookie);
    parts.push(build.requestHeader(0, CMD.WRITE, cookie, base + i * 256 * KiB, datas[i].length), datas[i]);
  }
  parts.push(build.requestHeader(0, CMD.DISC, nextCookie(), 0, 0));
  c.send(...parts); // all in one write
  const answered = new Map<bigint, number>();
  for (let i = 0; i < n; i++) {
    const r = await c.reply();
    answered.set(r.cookie, r.kind === 'simple' ? r.error : -1);
  }
  t.same([...answered.keys()].sort(), [...cookies].sort(), 'every WRITE got a reply');
  t.ok([...answered.values()].every((e) => e === 0), 'all succeeded');
  t.ok(await c.closedWithin(), 'then the server closed the connection');
  t.equal(c.buffered, 0, 'nothing after the replies (DISC itself gets no reply)');
  for (let i = 0; i < n; i++) {
    t.ok(readAt(image, base + i * 256 * KiB, 256 * KiB).equals(datas[i]), `write ${i} is in the file`);
  }
});

t.test('client disconnecting mid-request: the server stays up, a new client works', async (t) => {
  const c = (await structuredClient(cbw)).c;
  const target = 14 * MiB;
  const before = readAt(image, target, 1 * MiB);
  c.send(build.requestHeader(0, CMD.WRITE, nextCookie(), target, 1 * MiB), Buffer.alloc(512 * KiB, 0x66));
  await new Promise((r) => setTimeout(r, 100));
  c.destroy();
  // A header alone, too.
  const c2 = (await structuredClient(cbw)).c;
  c2.send(build.requestHeader(0, CMD.READ, nextCookie(), 0, 4096).subarray(0, 13));
  await new Promise((r) => setTimeout(r, 50));
  c2.destroy();
  await new Promise((r) => setTimeout(r, 100));
  t.ok(cbw.running(), 'nbd-cbw is still running');
  const { c: c3 } = await structuredClient(cbw);
  t.teardown(() => c3.destroy());
  await checkAlive(t, c3, image, 'a new client');
  t.ok(readAt(image, target, 1 * MiB).equals(before), 'the half-sent WRITE was not executed');
});

t.test('bad request magic closes the connection', async (t) => {
  const { c } = await structuredClient(cbw);
  t.teardown(() => c.destroy());
  const h = build.requestHeader(0, CMD.READ, nextCookie(), 0, 4096);
  h.writeUInt32BE(0xdeadbeef, 0);
  c.send(h);
  t.ok(await c.closedWithin(), 'closed');
  t.equal(c.buffered, 0, 'without a reply');
  const { c: c2 } = await structuredClient(cbw);
  t.teardown(() => c2.destroy());
  await checkAlive(t, c2, image, 'a new client after the bad one');
});

t.test('many connections at once, each with pipelined requests', async (t) => {
  const clients = await Promise.all(Array.from({ length: 8 }, () => structuredClient(cbw)));
  t.teardown(() => clients.forEach(({ c }) => c.destroy()));
  await Promise.all(
    clients.map(async ({ c }, i) => {
      const off = 8 * MiB + i * 64 * KiB;
      const data = randomBuffer(64 * KiB, 1000 + i);
      const wc = nextCookie();
      const rc = nextCookie();
      c.send(build.requestHeader(0, CMD.WRITE, wc, off, data.length), data, build.requestHeader(0, CMD.READ, rc, off, data.length));
      // Replies may come in any order; the READ was sent after the WRITE on
      // the same connection but may still be answered first, so only check
      // both arrive and the file holds the data.
      const got = new Map<bigint, Reply[]>();
      for (let k = 0; k < 2; k++) {
        const r = await c.fullReply();
        got.set(r[0].cookie, r);
      }
      t.equal(errorOf(got.get(wc) ?? []), 0, `client ${i}: WRITE ok`);
      t.equal(errorOf(got.get(rc) ?? []), 0, `client ${i}: READ ok`);
      t.ok(readAt(image, off, data.length).equals(data), `client ${i}: data in the file`);
    }),
  );
});

t.test('nbd-cbw survived all of it and exits 0 on SIGTERM', async (t) => {
  await waitFor(() => cbw.running(), { timeoutMs: 1000, what: 'nbd-cbw running' });
  const end = await cbw.stop();
  t.same(end, { code: 0, signal: null }, 'exit status 0');
  t.notOk(fs.existsSync(cbw.socket), 'the socket file is removed');
});
