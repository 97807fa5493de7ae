// Shared fuzzing code for test/fuzz-parser.test.ts, test/fuzz-network.test.ts,
// test/connection-hygiene.test.ts and scripts/fuzz/long-run:
//
// - a seeded PRNG, so every run (and every single session) replays exactly;
// - the seeds recorded from real clients by scripts/fuzz/record-seeds;
// - mutations (bit flips, interesting bytes, insert/delete/duplicate ranges,
//   splices, hostile length and offset fields, command and option swaps);
// - drivers that feed the wire parsers as the server and the client would;
// - a network fuzzer for a live nbd-cbw, a well-behaved client that runs
//   alongside it, connect/disconnect cycles, hostile-size probes;
// - measurements of the server process (fds, RSS from /proc).
//
// Nothing here waits without a deadline, and every loop is bounded in count
// and time. Traffic goes over unix sockets only. Wire values are spelled out
// from the NBD spec rather than imported, so the fuzzer does not share the
// server's idea of them.

import { spawn, type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import {
  ClientStreamParser,
  ServerStreamParser,
  build,
  decodeInfoRequest,
  type ClientMessage,
  type ClientParsePhase,
  type ServerMessage,
  type ServerParsePhase,
} from '../../src/nbd-protocol';
import { NbdClient } from '../../src/client/client';
import { probeNbd } from './peers';

export const KiB = 1024;
export const MiB = 1024 * KiB;
export const GiB = 1024 * MiB;

/** The server's limits (src/nbd-protocol/constants.ts): 32 MiB payloads, 64 KiB options. */
export const MAX_PAYLOAD = 32 * MiB;
export const MAX_OPTION_LENGTH = 64 * KiB;

/** The repository (NBD_CBW_REPO overrides it, for a copy compiled elsewhere by scripts/fuzz/long-run). */
export const REPO_ROOT = process.env.NBD_CBW_REPO ?? path.resolve(__dirname, '..', '..');
export const NBD_CBW_BIN = path.join(REPO_ROOT, 'bin', 'nbd-cbw');
export const SEED_DIR = path.join(REPO_ROOT, 'test', 'fixtures', 'fuzz-seeds');

// Wire values from NetworkBlockDevice/nbd doc/proto.md.
const IHAVEOPT = 0x49484156454f5054n;
const OPT_REPLY_MAGIC = 0x3e889045565a9n;
const REQUEST_MAGIC = 0x25609513;
const SIMPLE_MAGIC = 0x67446698;
const STRUCTURED_MAGIC = 0x668e33ef;
export const OPT = {
  EXPORT_NAME: 1,
  ABORT: 2,
  LIST: 3,
  STARTTLS: 5,
  INFO: 6,
  GO: 7,
  STRUCTURED_REPLY: 8,
  LIST_META_CONTEXT: 9,
  SET_META_CONTEXT: 10,
} as const;
export const REP_ACK = 1;
const REP_ERR_BIT = 0x80000000;
export const CMD = { READ: 0, WRITE: 1, DISC: 2, FLUSH: 3, TRIM: 4, CACHE: 5, WRITE_ZEROES: 6, BLOCK_STATUS: 7 } as const;
export const CF = { FUA: 1, NO_HOLE: 2, DF: 4, REQ_ONE: 8, FAST_ZERO: 16 } as const;
export const CHUNK = { NONE: 0, OFFSET_DATA: 1, OFFSET_HOLE: 2, BLOCK_STATUS: 5, ERROR: 0x8001, ERROR_OFFSET: 0x8002 } as const;
const INFO_BLOCK_SIZE = 3;
export const EINVAL = 22;

// -------------------------------------------------------------------- PRNG

/** mulberry32: small, fast, seeded; every draw is a deterministic function of the seed. */
export class Rng {
  private a: number;
  constructor(seed: number) {
    this.a = seed >>> 0;
  }
  u32(): number {
    this.a = (this.a + 0x6d2b79f5) >>> 0;
    let x = this.a;
    x = Math.imul(x ^ (x >>> 15), x | 1);
    x ^= x + Math.imul(x ^ (x >>> 7), x | 61);
    return (x ^ (x >>> 14)) >>> 0;
  }
  float(): number {
    return this.u32() / 4294967296;
  }
  /** 0 <= n < max (max <= 2^32). */
  int(max: number): number {
    return Math.floor(this.float() * max);
  }
  /** lo <= n <= hi. */
  range(lo: number, hi: number): number {
    return lo + this.int(hi - lo + 1);
  }
  chance(p: number): boolean {
    return this.float() < p;
  }
  pick<T>(items: readonly T[]): T {
    return items[this.int(items.length)];
  }
  bytes(n: number): Buffer {
    const b = Buffer.allocUnsafe(n);
    for (let i = 0; i < n; i++) b[i] = this.u32() & 0xff;
    return b;
  }
}

/** The seed of session `i` of a run: any session can be replayed on its own. */
export function sessionSeed(runSeed: number, i: number): number {
  let h = (runSeed ^ Math.imul(i + 1, 0x9e3779b1)) >>> 0;
  h = Math.imul(h ^ (h >>> 16), 0x85ebca6b) >>> 0;
  h = Math.imul(h ^ (h >>> 13), 0xc2b2ae35) >>> 0;
  return (h ^ (h >>> 16)) >>> 0;
}

// ------------------------------------------------------------------- seeds

export interface SeedMeta {
  client: string;
  connection: number;
  noZeroes?: boolean;
  exportName?: boolean;
  structured?: boolean;
  c2sHandshakeBytes?: number;
  s2cHandshakeBytes?: number;
  requests?: number;
  raw?: boolean;
}

export interface Seed {
  name: string;
  meta: SeedMeta;
  /** What the client sent (the mutation seed). */
  c2s: Buffer;
  /** What the server answered. */
  s2c: Buffer;
  /** Client bytes up to and including the option that entered transmission. */
  c2sHandshake: Buffer;
  /** Client bytes after it: the request stream (may be empty). */
  c2sRequests: Buffer;
  s2cHandshake: Buffer;
  s2cReplies: Buffer;
  /** The requests of c2sRequests, in order (the client side needs them to frame simple replies). */
  requests: ScannedRequest[];
  /** For EXPORT_NAME sessions: final option replies that precede the EXPORT_NAME reply. */
  exportNameAfterFinals: number | null;
}

/** Load NAME.c2s / NAME.s2c / NAME.json triples from `dir`, sorted by name. */
export function loadSeeds(dir: string = SEED_DIR): Seed[] {
  const names = fs
    .readdirSync(dir)
    .filter((f) => f.endsWith('.json'))
    .map((f) => f.slice(0, -'.json'.length))
    .sort();
  const seeds: Seed[] = [];
  for (const name of names) {
    const meta = JSON.parse(fs.readFileSync(path.join(dir, `${name}.json`), 'utf8')) as SeedMeta;
    const c2s = fs.readFileSync(path.join(dir, `${name}.c2s`));
    const s2c = fs.readFileSync(path.join(dir, `${name}.s2c`));
    const ch = Math.min(meta.c2sHandshakeBytes ?? c2s.length, c2s.length);
    const sh = Math.min(meta.s2cHandshakeBytes ?? s2c.length, s2c.length);
    const c2sHandshake = c2s.subarray(0, ch);
    const c2sRequests = c2s.subarray(ch);
    const requests = scanRequests(c2sRequests);
    let exportNameAfterFinals: number | null = null;
    if (meta.exportName) {
      let finals = 0;
      for (let at = 4; at + 16 <= c2sHandshake.length; ) {
        const opt = c2sHandshake.readUInt32BE(at + 8);
        if (opt === OPT.EXPORT_NAME) {
          exportNameAfterFinals = finals;
          break;
        }
        finals++;
        at += 16 + c2sHandshake.readUInt32BE(at + 12);
      }
    }
    seeds.push({
      name,
      meta,
      c2s,
      s2c,
      c2sHandshake,
      c2sRequests,
      s2cHandshake: s2c.subarray(0, sh),
      s2cReplies: s2c.subarray(sh),
      requests,
      exportNameAfterFinals,
    });
  }
  return seeds;
}

export interface ScannedRequest {
  at: number;
  flags: number;
  command: number;
  cookie: bigint;
  offset: bigint;
  length: number;
}

/** Requests of a well-formed request stream, in order (stops at the first bad magic or a short tail). */
export function scanRequests(buf: Buffer): ScannedRequest[] {
  const out: ScannedRequest[] = [];
  let at = 0;
  while (at + 28 <= buf.length && buf.readUInt32BE(at) === REQUEST_MAGIC) {
    const command = buf.readUInt16BE(at + 6);
    const length = buf.readUInt32BE(at + 24);
    out.push({
      at,
      flags: buf.readUInt16BE(at + 4),
      command,
      cookie: buf.readBigUInt64BE(at + 8),
      offset: buf.readBigUInt64BE(at + 16),
      length,
    });
    at += 28 + (command === CMD.WRITE ? length : 0);
  }
  return out;
}

// --------------------------------------------------------------- mutations

export const INTERESTING_BYTES = [0x00, 0xff, 0x7f, 0x80] as const;
/** Values written over 32-bit length fields. */
export const HOSTILE_LENGTHS = [
  0,
  1,
  0x7fffffff,
  0xffffffff,
  MAX_PAYLOAD + 1,
  MAX_PAYLOAD,
  MAX_OPTION_LENGTH + 1,
  0x80000000,
] as const;
/** Values written over 64-bit offset fields. */
export const HOSTILE_OFFSETS = [
  0n,
  1n,
  (1n << 63n) - 1n,
  1n << 63n,
  (1n << 64n) - 1n,
  1n << 53n,
  (1n << 63n) - (1n << 32n),
  16n * 1024n * 1024n - 1n,
  16n * 1024n * 1024n,
] as const;

export type MutationName =
  | 'bitflip'
  | 'interesting'
  | 'randomByte'
  | 'insert'
  | 'delete'
  | 'duplicate'
  | 'splice'
  | 'hostileLength'
  | 'hostileOffset'
  | 'command'
  | 'option'
  | 'truncate';

export const MUTATIONS: readonly MutationName[] = [
  'bitflip',
  'interesting',
  'randomByte',
  'insert',
  'delete',
  'duplicate',
  'splice',
  'hostileLength',
  'hostileOffset',
  'command',
  'option',
  'truncate',
];

/** Largest mutated input; mutations that would grow past it are cut. */
export const MAX_MUTATED = 64 * KiB;

interface Fields {
  /** Offsets of 32-bit length fields (option headers, requests, option replies, structured chunks). */
  lengths: number[];
  /** Offsets of 64-bit request offset fields. */
  offsets: number[];
  /** Offsets of 16-bit request command fields. */
  commands: number[];
  /** Offsets of 32-bit option code fields. */
  options: number[];
}

/** Where the structure-aware mutations can strike: every place a magic number appears. */
function findFields(buf: Buffer): Fields {
  const f: Fields = { lengths: [], offsets: [], commands: [], options: [] };
  for (let i = 0; i + 4 <= buf.length; i++) {
    const w = buf.readUInt32BE(i);
    if (w === REQUEST_MAGIC && i + 28 <= buf.length) {
      f.commands.push(i + 6);
      f.offsets.push(i + 16);
      f.lengths.push(i + 24);
    } else if (w === STRUCTURED_MAGIC && i + 20 <= buf.length) {
      f.lengths.push(i + 16);
    } else if (i + 16 <= buf.length && w === 0x49484156 && buf.readBigUInt64BE(i) === IHAVEOPT) {
      f.options.push(i + 8);
      f.lengths.push(i + 12);
    } else if (i + 20 <= buf.length && buf.readBigUInt64BE(i) === OPT_REPLY_MAGIC) {
      f.lengths.push(i + 16);
    }
  }
  return f;
}

function applyOne(buf: Buffer, m: MutationName, rng: Rng, other: Buffer | null): Buffer {
  const n = buf.length;
  switch (m) {
    case 'bitflip': {
      if (n === 0) return buf;
      const out = Buffer.from(buf);
      const i = rng.int(n);
      out[i] ^= 1 << rng.int(8);
      return out;
    }
    case 'interesting':
    case 'randomByte': {
      if (n === 0) return buf;
      const out = Buffer.from(buf);
      const count = rng.chance(0.8) ? 1 : rng.range(2, 4);
      for (let k = 0; k < count; k++) {
        out[rng.int(n)] = m === 'interesting' ? rng.pick(INTERESTING_BYTES) : rng.u32() & 0xff;
      }
      return out;
    }
    case 'insert': {
      const at = rng.int(n + 1);
      const len = rng.chance(0.8) ? rng.range(1, 16) : rng.range(17, 512);
      const ins = rng.chance(0.5)
        ? rng.bytes(len)
        : Buffer.alloc(len, rng.pick(INTERESTING_BYTES));
      return Buffer.concat([buf.subarray(0, at), ins, buf.subarray(at)]);
    }
    case 'delete': {
      if (n === 0) return buf;
      const at = rng.int(n);
      const len = Math.min(n - at, rng.chance(0.7) ? rng.range(1, 8) : rng.range(9, 256));
      return Buffer.concat([buf.subarray(0, at), buf.subarray(at + len)]);
    }
    case 'duplicate': {
      if (n === 0) return buf;
      const from = rng.int(n);
      const len = Math.min(n - from, rng.range(1, 128));
      const to = rng.int(n + 1);
      const times = rng.chance(0.8) ? 1 : rng.range(2, 16);
      const piece = buf.subarray(from, from + len);
      return Buffer.concat([buf.subarray(0, to), ...Array<Buffer>(times).fill(piece), buf.subarray(to)]);
    }
    case 'splice': {
      const b = other ?? buf;
      const cutA = rng.int(n + 1);
      const cutB = rng.int(b.length + 1);
      return Buffer.concat([buf.subarray(0, cutA), b.subarray(cutB)]);
    }
    case 'hostileLength': {
      const f = findFields(buf).lengths;
      const out = Buffer.from(buf);
      const at = f.length > 0 && rng.chance(0.9) ? rng.pick(f) : n >= 4 ? rng.int(n - 3) : -1;
      if (at < 0) return buf;
      out.writeUInt32BE(rng.pick(HOSTILE_LENGTHS) >>> 0, at);
      return out;
    }
    case 'hostileOffset': {
      const f = findFields(buf).offsets;
      if (f.length === 0) return buf;
      const out = Buffer.from(buf);
      const v = rng.chance(0.8) ? rng.pick(HOSTILE_OFFSETS) : BigInt(rng.u32()) * 512n;
      out.writeBigUInt64BE(v & 0xffffffffffffffffn, rng.pick(f));
      return out;
    }
    case 'command': {
      const f = findFields(buf).commands;
      if (f.length === 0) return buf;
      const out = Buffer.from(buf);
      out.writeUInt16BE(rng.chance(0.85) ? rng.int(10) : rng.u32() & 0xffff, rng.pick(f));
      return out;
    }
    case 'option': {
      const f = findFields(buf).options;
      if (f.length === 0) return buf;
      const out = Buffer.from(buf);
      out.writeUInt32BE(rng.chance(0.85) ? rng.int(13) : rng.u32(), rng.pick(f));
      return out;
    }
    case 'truncate':
      return n === 0 ? buf : buf.subarray(0, rng.int(n));
  }
}

export interface Mutated {
  data: Buffer;
  applied: MutationName[];
}

/** 1-4 mutations (or `rounds`) of `input`; `other` is the partner for splices. */
export function mutate(input: Buffer, rng: Rng, other: Buffer | null = null, rounds?: number): Mutated {
  let data = input;
  const applied: MutationName[] = [];
  const count = rounds ?? (rng.chance(0.5) ? 1 : rng.range(2, 4));
  for (let k = 0; k < count; k++) {
    const m = rng.pick(MUTATIONS);
    data = applyOne(data, m, rng, other);
    if (data.length > MAX_MUTATED) data = data.subarray(0, MAX_MUTATED);
    applied.push(m);
  }
  return { data, applied };
}

/** Chunk sizes (summing to `length`) for feeding a stream in pieces. */
export function splitSizes(rng: Rng, length: number): number[] {
  if (length === 0) return [];
  const mode = rng.int(10);
  if (mode === 0) return [length]; // whole
  if (mode === 1 && length <= 4096) return Array<number>(length).fill(1); // byte by byte
  if (mode <= 3) {
    // small fixed pieces
    const size = rng.range(1, 31);
    const out: number[] = [];
    for (let left = length; left > 0; left -= size) out.push(Math.min(size, left));
    return out;
  }
  // random cuts
  const cuts = new Set<number>();
  const k = rng.range(1, Math.min(12, length));
  for (let i = 0; i < k; i++) cuts.add(rng.range(1, length));
  const sorted = [...cuts].filter((c) => c < length).sort((a, b) => a - b);
  const out: number[] = [];
  let prev = 0;
  for (const c of sorted) {
    out.push(c - prev);
    prev = c;
  }
  out.push(length - prev);
  return out;
}

export function chunksOf(buf: Buffer, sizes: readonly number[]): Buffer[] {
  const out: Buffer[] = [];
  let at = 0;
  for (const s of sizes) {
    out.push(buf.subarray(at, at + s));
    at += s;
  }
  if (at < buf.length) out.push(buf.subarray(at));
  return out;
}

// ---------------------------------------------------------- parser drivers

export interface ParserRun {
  /** One line per message, with payloads hashed: compare runs with different splits. */
  summary: string[];
  /** Broken invariants, empty when all is well. */
  violations: string[];
  /** Largest bufferedBytes seen after a push. */
  maxBuffered: number;
  died: boolean;
}

function hashOf(b: Buffer | null): string {
  if (b === null) return 'null';
  if (b.length <= 32) return b.toString('hex');
  return `${b.length}:${createHash('sha1').update(b).digest('hex').slice(0, 16)}`;
}

export interface ClientParserConfig {
  startPhase: ServerParsePhase;
  maxPayload: number;
  maxOptionLength: number;
}

/**
 * Feed `chunks` to a ClientStreamParser the way the server does: a GO
 * naming an existing export ("" or "disk"), or an EXPORT_NAME naming one,
 * switches it to transmission from within the message callback. Checks the
 * invariants as it goes.
 */
export function runClientParser(chunks: readonly Buffer[], cfg: ClientParserConfig): ParserRun {
  const parser = new ClientStreamParser({ maxPayload: cfg.maxPayload, maxOptionLength: cfg.maxOptionLength });
  parser.phase = cfg.startPhase;
  const run: ParserRun = { summary: [], violations: [], maxBuffered: 0, died: false };
  const bound = Math.max(cfg.maxPayload, cfg.maxOptionLength) + 64;
  let errored = false;
  const emit = (m: ClientMessage): void => {
    if (errored) {
      run.violations.push(`message after protocolError: ${m.type}`);
      return;
    }
    switch (m.type) {
      case 'protocolError':
        errored = true;
        run.summary.push(`protocolError ${m.message}`);
        return;
      case 'clientFlags':
        run.summary.push(`flags ${m.flags}`);
        return;
      case 'option': {
        if (m.data.length > cfg.maxOptionLength) run.violations.push(`option data of ${m.data.length} bytes over the limit`);
        run.summary.push(`option ${m.option} ${hashOf(m.data)}`);
        if (m.option === OPT.GO || m.option === OPT.INFO) {
          const req = decodeInfoRequest(m.data);
          if (m.option === OPT.GO && req.ok && (req.value.exportName === '' || req.value.exportName === 'disk')) {
            parser.phase = 'transmission';
          }
        } else if (m.option === OPT.EXPORT_NAME) {
          const name = m.data.toString('utf8');
          if (name === '' || name === 'disk') parser.phase = 'transmission';
        }
        return;
      }
      case 'optionTooLarge':
        if (m.length <= cfg.maxOptionLength) run.violations.push(`optionTooLarge for ${m.length} bytes, within the limit`);
        run.summary.push(`optionTooLarge ${m.option} ${m.length}`);
        return;
      case 'request': {
        if (m.command === CMD.WRITE) {
          if (m.payloadSkipped) {
            if (m.payload !== null) run.violations.push('skipped WRITE payload is not null');
            if (m.length <= cfg.maxPayload) run.violations.push(`WRITE of ${m.length} bytes skipped though within the limit`);
          } else if (m.payload === null || m.payload.length !== m.length) {
            run.violations.push(`WRITE payload ${m.payload?.length ?? 'null'} bytes for length ${m.length}`);
          }
        } else if (m.payload !== null || m.payloadSkipped) {
          run.violations.push(`command ${m.command} carries a payload`);
        }
        run.summary.push(
          `request ${m.flags} ${m.command} ${m.cookie} ${m.offset} ${m.length} ${m.payloadSkipped} ${hashOf(m.payload)}`,
        );
        return;
      }
    }
  };
  for (const c of chunks) {
    try {
      parser.push(c, emit);
    } catch (e) {
      run.violations.push(`push threw: ${(e as Error).stack ?? String(e)}`);
      break;
    }
    const b = parser.bufferedBytes;
    if (b > run.maxBuffered) run.maxBuffered = b;
    if (b > bound) run.violations.push(`bufferedBytes ${b} over ${bound}`);
  }
  run.died = parser.isDead;
  if (errored !== parser.isDead) run.violations.push(`protocolError emitted=${errored} but isDead=${parser.isDead}`);
  return run;
}

export interface ServerParserConfig {
  startPhase: ClientParsePhase;
  maxPayload: number;
  maxOptionLength: number;
  noZeroes: boolean;
  /** Switch to 'exportNameReply' after this many final option replies (null: never). */
  exportNameAfterFinals: number | null;
  /** Requests the client sent, in order: a simple reply's data length is that of the READ it answers. */
  requests: ReadonlyArray<{ cookie: bigint; command: number; length: number }>;
}

/**
 * Feed `chunks` to a ServerStreamParser the way the client does: the ACK
 * to GO enters transmission; an EXPORT_NAME session expects the export
 * reply after the replies to the options before it.
 */
export function runServerParser(chunks: readonly Buffer[], cfg: ServerParserConfig): ParserRun {
  // Outstanding requests by cookie, oldest first: clients reuse a cookie
  // once its reply is complete, as the real client's pending map does.
  const pending = new Map<bigint, Array<{ command: number; length: number }>>();
  let maxRead = 0;
  for (const r of cfg.requests) {
    if (!pending.has(r.cookie)) pending.set(r.cookie, []);
    pending.get(r.cookie)?.push(r);
    if (r.command === CMD.READ) maxRead = Math.max(maxRead, r.length);
  }
  const head = (cookie: bigint) => pending.get(cookie)?.[0];
  const readLength = (cookie: bigint) => (head(cookie)?.command === CMD.READ ? (head(cookie)?.length ?? 0) : 0);
  const parser = new ServerStreamParser({
    maxPayload: cfg.maxPayload,
    maxOptionLength: cfg.maxOptionLength,
    readLengthOf: readLength,
  });
  parser.phase = cfg.startPhase;
  parser.noZeroes = cfg.noZeroes;
  const run: ParserRun = { summary: [], violations: [], maxBuffered: 0, died: false };
  const bound = Math.max(cfg.maxPayload + 8, cfg.maxOptionLength, maxRead) + 160;
  let errored = false;
  let finals = 0;
  const maybeExportName = () => {
    if (cfg.exportNameAfterFinals !== null && finals === cfg.exportNameAfterFinals && parser.phase === 'options') {
      parser.phase = 'exportNameReply';
    }
  };
  const emit = (m: ServerMessage): void => {
    if (errored) {
      run.violations.push(`message after protocolError: ${m.type}`);
      return;
    }
    switch (m.type) {
      case 'protocolError':
        errored = true;
        run.summary.push(`protocolError ${m.message}`);
        return;
      case 'greeting':
        run.summary.push(`greeting ${m.flags}`);
        maybeExportName();
        return;
      case 'optionReply': {
        if (m.data.length > cfg.maxOptionLength) run.violations.push(`option reply of ${m.data.length} bytes over the limit`);
        run.summary.push(`optionReply ${m.option} ${m.replyType} ${hashOf(m.data)}`);
        const final = m.replyType === REP_ACK || (m.replyType & REP_ERR_BIT) >>> 0 !== 0;
        if (final) finals++;
        if (m.option === OPT.GO && m.replyType === REP_ACK) parser.phase = 'transmission';
        else maybeExportName();
        return;
      }
      case 'exportNameReply':
        run.summary.push(`exportNameReply ${m.size} ${m.flags}`);
        return;
      case 'simpleReply': {
        const want = m.error === 0 ? readLength(m.cookie) : 0;
        const got = m.data?.length ?? 0;
        if (got !== want) run.violations.push(`simple reply with ${got} data bytes, expected ${want}`);
        run.summary.push(`simpleReply ${m.cookie} ${m.error} ${hashOf(m.data)}`);
        pending.get(m.cookie)?.shift();
        return;
      }
      case 'structuredChunk':
        if (m.payload.length > cfg.maxPayload + 8) run.violations.push(`chunk of ${m.payload.length} bytes over the limit`);
        run.summary.push(`chunk ${m.cookie} ${m.flags} ${m.chunkType} ${hashOf(m.payload)}`);
        if ((m.flags & 1) !== 0) pending.get(m.cookie)?.shift();
        return;
    }
  };
  for (const c of chunks) {
    try {
      parser.push(c, emit);
    } catch (e) {
      run.violations.push(`push threw: ${(e as Error).stack ?? String(e)}`);
      break;
    }
    const b = parser.bufferedBytes;
    if (b > run.maxBuffered) run.maxBuffered = b;
    if (b > bound) run.violations.push(`bufferedBytes ${b} over ${bound}`);
  }
  run.died = parser.isDead;
  if (errored !== parser.isDead) run.violations.push(`protocolError emitted=${errored} but isDead=${parser.isDead}`);
  return run;
}

// ------------------------------------------------------ process measurement

export function fdCount(pid: number): number {
  return fs.readdirSync(`/proc/${pid}/fd`).length;
}

/** The open files of `pid` as "fd -> target" (for diagnosing a leak). */
export function fdList(pid: number): string[] {
  return fs.readdirSync(`/proc/${pid}/fd`).map((fd) => {
    try {
      return `${fd} -> ${fs.readlinkSync(`/proc/${pid}/fd/${fd}`)}`;
    } catch {
      return fd;
    }
  });
}

/** Resident set size in KiB (VmRSS). */
export function rssKiB(pid: number): number {
  const m = /^VmRSS:\s+(\d+)\s+kB/m.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
  if (!m) throw new Error(`no VmRSS for pid ${pid}`);
  return Number(m[1]);
}

export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/** `p`, or undefined after `ms` (the timer is cleared either way, so nothing lingers). */
export async function withTimeout<T>(p: Promise<T>, ms: number): Promise<T | undefined> {
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([p, new Promise<undefined>((r) => (timer = setTimeout(() => r(undefined), ms)))]);
  } finally {
    clearTimeout(timer);
  }
}

/** Poll until `check` is true or `timeoutMs` passes; returns the last result. */
export async function pollUntil(check: () => boolean, timeoutMs: number, intervalMs = 20): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (check()) return true;
    if (Date.now() >= deadline) return false;
    await sleep(intervalMs);
  }
}

/** Run `fn` while sampling the RSS of `pid` every `intervalMs`; returns before, peak and after (KiB). */
export async function withRssSampling<T>(
  pid: number,
  fn: () => Promise<T>,
  intervalMs = 10,
): Promise<{ result: T; beforeKiB: number; peakKiB: number; afterKiB: number }> {
  const beforeKiB = rssKiB(pid);
  let peakKiB = beforeKiB;
  const timer = setInterval(() => {
    try {
      peakKiB = Math.max(peakKiB, rssKiB(pid));
    } catch {
      // process gone: the caller notices
    }
  }, intervalMs);
  try {
    const result = await fn();
    const afterKiB = rssKiB(pid);
    return { result, beforeKiB, peakKiB: Math.max(peakKiB, afterKiB), afterKiB };
  } finally {
    clearInterval(timer);
  }
}

// ------------------------------------------------------------ the server

export interface ServerHandle {
  readonly proc: ChildProcess;
  readonly pid: number;
  readonly socket: string;
  readonly image: string;
  readonly size: number;
  readonly dir: string;
  /** Everything it wrote to stdout/stderr (the last 1 MiB). */
  output(): string;
  /** Set once it exited. */
  exit: { code: number | null; signal: NodeJS.Signals | null } | null;
  alive(): boolean;
  /** SIGTERM, SIGKILL after `graceMs`; removes the temporary directory. Idempotent. */
  stop(graceMs?: number): Promise<void>;
}

export interface StartServerOptions {
  /** Export size (a sparse file with a little data at the start). Default 16 MiB. */
  size?: number;
  handshakeTimeout?: string;
  maxConnections?: number;
  extraArgs?: string[];
  readyTimeoutMs?: number;
  /**
   * Also write 4 KiB every 8 KiB in [1 MiB, 9 MiB): 2048 extents, more than
   * one block-status reply may carry.
   */
  fragmented?: boolean;
}

const liveServers = new Set<ChildProcess>();
let exitHookInstalled = false;

/**
 * Patterns that must never appear in the server's output: crashes, unhandled
 * rejections, stack traces, V8 out-of-memory, listener leaks. (Deprecation
 * warnings from dependencies are not the server's doing and do not count.)
 */
export const CRASH_PATTERNS =
  /Unhandled|uncaught|TypeError|RangeError|ReferenceError|SyntaxError|FATAL|Allocation failed|out of memory|MaxListenersExceeded|memory leak detected|^\s+at .+:\d+:\d+\)?$/im;

/**
 * `bin/nbd-cbw serve --source file:IMG -U SOCK -f ...` in a fresh
 * temporary directory, resolved once it answers with the NBD greeting.
 */
export async function startServer(opts: StartServerOptions = {}): Promise<ServerHandle> {
  if (!fs.existsSync(path.join(REPO_ROOT, 'dist', 'cli', 'main.js'))) {
    throw new Error('dist/cli/main.js is missing: run `npm run build` first');
  }
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nbd-fz-'));
  const size = opts.size ?? 16 * MiB;
  const image = path.join(dir, 'disk.img');
  fs.writeFileSync(image, '');
  fs.truncateSync(image, size);
  const head = Buffer.alloc(Math.min(256 * KiB, size));
  new Rng(7).bytes(head.length).copy(head);
  fs.writeFileSync(image, head, { flag: 'r+' });
  if (opts.fragmented && size >= 9 * MiB) {
    const fd = fs.openSync(image, 'r+');
    try {
      const block = Buffer.alloc(4 * KiB, 0xc3);
      for (let off = MiB; off < 9 * MiB; off += 8 * KiB) fs.writeSync(fd, block, 0, block.length, off);
    } finally {
      fs.closeSync(fd);
    }
  }
  const socket = path.join(dir, 's.sock');
  const args = [
    'serve',
    '--source',
    `file:${image}`,
    '-U',
    socket,
    '-f',
    '--exit-with-parent',
    '--handshake-timeout',
    opts.handshakeTimeout ?? '2s',
    '--max-connections',
    String(opts.maxConnections ?? 64),
    ...(opts.extraArgs ?? []),
  ];
  const proc = spawn(NBD_CBW_BIN, args, { cwd: REPO_ROOT, stdio: ['ignore', 'pipe', 'pipe'] });
  liveServers.add(proc);
  if (!exitHookInstalled) {
    exitHookInstalled = true;
    process.on('exit', () => {
      for (const p of liveServers) {
        try {
          p.kill('SIGKILL');
        } catch {
          // gone
        }
      }
    });
  }
  let out = '';
  const append = (d: Buffer) => {
    out += d.toString('utf8');
    if (out.length > MiB) out = out.slice(-MiB / 2);
  };
  proc.stdout?.on('data', append);
  proc.stderr?.on('data', append);
  let spawnError: Error | null = null;
  proc.on('error', (e) => {
    spawnError = e;
  });
  const exited = new Promise<void>((resolve) => proc.once('exit', () => resolve()));
  const handle: ServerHandle = {
    proc,
    pid: proc.pid ?? -1,
    socket,
    image,
    size,
    dir,
    output: () => out,
    exit: null,
    alive: () => handle.exit === null && proc.exitCode === null && proc.signalCode === null,
    stop: async (graceMs = 5000) => {
      if (handle.alive()) {
        proc.kill('SIGTERM');
        const t = setTimeout(() => proc.kill('SIGKILL'), graceMs);
        await withTimeout(exited, graceMs + 5000);
        clearTimeout(t);
      }
      liveServers.delete(proc);
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
  proc.once('exit', (code, signal) => {
    handle.exit = { code, signal };
    liveServers.delete(proc);
  });
  const deadline = Date.now() + (opts.readyTimeoutMs ?? 20_000);
  for (;;) {
    if (spawnError) throw new Error(`cannot start nbd-cbw: ${(spawnError as Error).message}`);
    if (!handle.alive()) {
      await handle.stop();
      throw new Error(`nbd-cbw exited before accepting (code=${handle.exit?.code}):\n${out}`);
    }
    if (fs.existsSync(socket) && (await probeNbd(socket, 1000))) {
      await sleep(250); // the probe's connection is gone from the server's fds by then
      return handle;
    }
    if (Date.now() > deadline) {
      await handle.stop();
      throw new Error(`nbd-cbw did not accept on ${socket} in time:\n${out}`);
    }
    await sleep(25);
  }
}

// ------------------------------------------------------ raw connections

/**
 * A client socket that records what it receives, can parse it with a
 * ServerStreamParser (for handshakes and probes), and waits with deadlines.
 */
export class RawConn {
  /** READ lengths by cookie, for framing simple replies (set them before sending the READs). */
  readonly readLengths = new Map<bigint, number>();
  readonly parser = new ServerStreamParser({ readLengthOf: (cookie) => this.readLengths.get(cookie) ?? 0 });
  /** Parse incoming bytes into `messages` (off: only count them). */
  parse = true;
  readonly messages: ServerMessage[] = [];
  bytesIn = 0;
  closed = false;
  /** The server ended its side (FIN). */
  ended = false;
  error: Error | null = null;
  private waiters = new Set<() => void>();

  private constructor(readonly sock: net.Socket) {
    sock.on('data', (d: Buffer) => {
      this.bytesIn += d.length;
      if (this.parse) this.parser.push(d, (m) => this.messages.push(m));
      this.notify();
    });
    sock.on('end', () => {
      this.ended = true;
      this.notify();
    });
    sock.on('close', () => {
      this.closed = true;
      this.notify();
    });
    sock.on('error', (e) => {
      this.error = e;
    });
  }

  static connect(socketPath: string, timeoutMs = 5000, allowHalfOpen = false): Promise<RawConn> {
    return new Promise((resolve, reject) => {
      const s = net.createConnection({ path: socketPath, allowHalfOpen });
      const timer = setTimeout(() => {
        s.destroy();
        reject(new Error(`connect to ${socketPath} timed out`));
      }, timeoutMs);
      s.once('connect', () => {
        clearTimeout(timer);
        s.removeListener('error', onError);
        resolve(new RawConn(s));
      });
      const onError = (e: Error) => {
        clearTimeout(timer);
        reject(e);
      };
      s.once('error', onError);
    });
  }

  private notify(): void {
    for (const w of [...this.waiters]) w();
  }

  /** Resolves when `check` is true (returns true) or after `timeoutMs` (false). */
  waitUntil(check: () => boolean, timeoutMs: number): Promise<boolean> {
    if (check()) return Promise.resolve(true);
    return new Promise((resolve) => {
      const w = () => {
        if (!check()) return;
        finish(true);
      };
      const finish = (v: boolean) => {
        clearTimeout(timer);
        this.waiters.delete(w);
        resolve(v);
      };
      const timer = setTimeout(() => finish(check()), timeoutMs);
      this.waiters.add(w);
    });
  }

  /** The next parsed message matching `pred` (consumed with everything before it), or null on timeout/close. */
  async next(pred: (m: ServerMessage) => boolean, timeoutMs: number): Promise<ServerMessage | null> {
    const found = () => this.messages.findIndex(pred) >= 0;
    await this.waitUntil(() => found() || this.closed, timeoutMs);
    const i = this.messages.findIndex(pred);
    if (i < 0) return null;
    return this.messages.splice(0, i + 1)[i];
  }

  waitClosed(timeoutMs: number): Promise<boolean> {
    return this.waitUntil(() => this.closed, timeoutMs);
  }

  write(b: Buffer): boolean {
    if (this.sock.destroyed || !this.sock.writable) return false;
    return this.sock.write(b);
  }

  /** Write with backpressure: waits for 'drain' (bounded). */
  async writeAll(b: Buffer, timeoutMs = 10_000): Promise<boolean> {
    if (this.sock.destroyed || !this.sock.writable) return false;
    if (this.sock.write(b)) return true;
    return this.waitDrain(timeoutMs);
  }

  private waitDrain(timeoutMs: number): Promise<boolean> {
    return new Promise((resolve) => {
      const done = (v: boolean) => {
        clearTimeout(timer);
        this.sock.off('drain', onDrain);
        this.sock.off('close', onClose);
        resolve(v);
      };
      const onDrain = () => done(true);
      const onClose = () => done(false);
      const timer = setTimeout(() => done(false), timeoutMs);
      this.sock.on('drain', onDrain);
      this.sock.on('close', onClose);
    });
  }

  end(): void {
    if (!this.sock.destroyed) this.sock.end();
  }

  destroy(): void {
    this.sock.destroy();
  }
}

export type HandshakeStyle = 'go' | 'go-structured' | 'export-name' | 'export-name-zeroes';
export const HANDSHAKE_STYLES: readonly HandshakeStyle[] = ['go', 'go-structured', 'export-name', 'export-name-zeroes'];

export interface HandshakeResult {
  ok: boolean;
  reason?: string;
  size: number;
  transmissionFlags: number;
  structured: boolean;
  /** base:allocation context id, when negotiated. */
  contextId: number | null;
}

/** A valid handshake built with src/nbd-protocol's builders; leaves `conn.parser` in transmission. */
export async function handshake(conn: RawConn, style: HandshakeStyle, timeoutMs = 5000): Promise<HandshakeResult> {
  const res: HandshakeResult = { ok: false, size: 0, transmissionFlags: 0, structured: false, contextId: null };
  const deadline = Date.now() + timeoutMs;
  const left = () => Math.max(1, deadline - Date.now());
  const g = await conn.next((m) => m.type === 'greeting' || m.type === 'protocolError', left());
  if (!g || g.type !== 'greeting') return { ...res, reason: `no greeting (${g?.type ?? 'timeout/closed'})` };
  if (style === 'export-name' || style === 'export-name-zeroes') {
    const noZeroes = style === 'export-name';
    conn.parser.noZeroes = noZeroes;
    conn.parser.phase = 'exportNameReply';
    conn.write(Buffer.concat([build.clientFlags(noZeroes ? 3 : 1), build.option(OPT.EXPORT_NAME, Buffer.from('disk'))]));
    const r = await conn.next((m) => m.type === 'exportNameReply' || m.type === 'protocolError', left());
    if (!r || r.type !== 'exportNameReply') return { ...res, reason: `no EXPORT_NAME reply (${r?.type ?? 'timeout/closed'})` };
    return { ...res, ok: true, size: r.size, transmissionFlags: r.flags };
  }
  const parts = [build.clientFlags(3)];
  if (style === 'go-structured') {
    parts.push(build.option(OPT.STRUCTURED_REPLY));
    parts.push(build.option(OPT.SET_META_CONTEXT, build.metaContextRequestData('disk', ['base:allocation'])));
  }
  parts.push(build.option(OPT.GO, build.infoRequestData('disk', [INFO_BLOCK_SIZE])));
  conn.write(Buffer.concat(parts));
  for (;;) {
    const m = await conn.next(() => true, left());
    if (!m) return { ...res, reason: 'handshake timed out or the connection closed' };
    if (m.type !== 'optionReply') return { ...res, reason: `unexpected ${m.type} in the handshake` };
    if (m.option === OPT.STRUCTURED_REPLY && m.replyType === REP_ACK) res.structured = true;
    if (m.option === OPT.SET_META_CONTEXT && m.replyType === 4 && m.data.length >= 4) res.contextId = m.data.readUInt32BE(0);
    if (m.option === OPT.GO && m.replyType === 3 && m.data.length === 12 && m.data.readUInt16BE(0) === 0) {
      res.size = Number(m.data.readBigUInt64BE(2));
      res.transmissionFlags = m.data.readUInt16BE(10);
    }
    if (m.option === OPT.GO && m.replyType === REP_ACK) {
      conn.parser.phase = 'transmission';
      return { ...res, ok: true };
    }
    if ((m.replyType & REP_ERR_BIT) >>> 0 !== 0 && m.option === OPT.GO) {
      return { ...res, reason: `GO refused: 0x${m.replyType.toString(16)} ${m.data.toString('utf8')}` };
    }
  }
}

// ------------------------------------------------------ region protection

/** Commands that cannot change the disk: READ, DISC, FLUSH, CACHE, BLOCK_STATUS. */
const HARMLESS = new Set<number>([CMD.READ, CMD.DISC, CMD.FLUSH, CMD.CACHE, CMD.BLOCK_STATUS]);

/**
 * Make sure no request the server could parse out of `buf` writes into
 * [start, end). Every occurrence of the request magic, at any byte offset,
 * is a request under some reading of the stream; those whose command could
 * write and whose range touches the region become READs (command 0). Zero
 * bytes cannot form a magic, so patching only removes candidate requests;
 * it is repeated until nothing changes (a patch can alter an overlapping
 * candidate's fields). Returns the number of patches; modifies `buf`.
 */
export function protectRegion(buf: Buffer, start: number, end: number): number {
  const s = BigInt(start);
  const e = BigInt(end);
  let patches = 0;
  for (let changed = true; changed; ) {
    changed = false;
    for (let i = 0; i + 28 <= buf.length; i++) {
      if (buf.readUInt32BE(i) !== REQUEST_MAGIC) continue;
      const command = buf.readUInt16BE(i + 6);
      if (HARMLESS.has(command)) continue;
      const offset = buf.readBigUInt64BE(i + 16);
      const length = BigInt(buf.readUInt32BE(i + 24));
      if (offset < e && offset + length > s) {
        buf.writeUInt16BE(CMD.READ, i + 6);
        patches++;
        changed = true;
      }
    }
  }
  return patches;
}

// --------------------------------------------------------- network fuzzer

export type SessionMode = 'handshake' | 'transmission';
export type SessionEnding = 'end' | 'destroy' | 'linger' | 'disc';

export interface SessionResult {
  mode: SessionMode;
  seed: string;
  ending: SessionEnding;
  mutations: MutationName[];
  bytesSent: number;
  bytesReceived: number;
  /** The server closed the connection before we did. */
  serverClosed: boolean;
  /** No connection (refused, or the listener was full). */
  connectFailed: boolean;
  /** Transmission mode only: the valid handshake did not complete. */
  handshakeFailed: boolean;
  /** Why it did not, with how long it had been going. */
  handshakeFailure?: string;
  patched: number;
}

export interface SessionOptions {
  /** Region the well-behaved client owns: fuzz requests are kept out of it. */
  protect: { start: number; end: number };
  /** Longest pause between two pieces. */
  maxDelayMs?: number;
  /** Hard limit on one session. */
  timeoutMs?: number;
}

function delayFor(rng: Rng, maxDelayMs: number): number {
  const r = rng.float();
  if (r < 0.75) return 0;
  if (r < 0.97) return rng.range(0, 2);
  return rng.range(0, maxDelayMs);
}

/** Random valid requests, for seeds without a request stream. */
export function synthRequests(rng: Rng, count: number, size: number): Buffer {
  const parts: Buffer[] = [];
  for (let i = 0; i < count; i++) {
    const command = rng.pick([CMD.READ, CMD.WRITE, CMD.FLUSH, CMD.TRIM, CMD.CACHE, CMD.WRITE_ZEROES, CMD.BLOCK_STATUS]);
    const length = rng.pick([0, 1, 512, 4096, 65536]);
    const offset = rng.int(Math.max(1, Math.floor((size - length) / 512))) * 512;
    parts.push(build.requestHeader(rng.chance(0.2) ? CF.FUA : 0, command, BigInt(rng.u32()), offset, length));
    if (command === CMD.WRITE) parts.push(rng.bytes(length));
  }
  return Buffer.concat(parts);
}

/**
 * One fuzz session against a live server: either a mutated seed from the
 * first byte (handshake phase), or a valid handshake followed by a mutated
 * request stream (transmission phase). Sent in random pieces with random
 * small delays, then closed in one of several ways. Never rejects.
 */
export async function fuzzSession(
  socketPath: string,
  seeds: readonly Seed[],
  rng: Rng,
  opts: SessionOptions,
): Promise<SessionResult> {
  const mode: SessionMode = rng.chance(0.5) ? 'handshake' : 'transmission';
  const seed = rng.pick(seeds);
  const other = rng.pick(seeds);
  const ending = rng.pick<SessionEnding>(['end', 'destroy', 'linger', 'disc']);
  const res: SessionResult = {
    mode,
    seed: seed.name,
    ending,
    mutations: [],
    bytesSent: 0,
    bytesReceived: 0,
    serverClosed: false,
    connectFailed: false,
    handshakeFailed: false,
    patched: 0,
  };
  const maxDelayMs = opts.maxDelayMs ?? 5;
  const deadline = Date.now() + (opts.timeoutMs ?? 5000);
  let conn: RawConn;
  try {
    conn = await RawConn.connect(socketPath, 3000);
  } catch {
    res.connectFailed = true;
    return res;
  }
  try {
    let body: Buffer;
    if (mode === 'transmission') {
      const style = rng.pick(HANDSHAKE_STYLES);
      const hsStarted = Date.now();
      const hs = await handshake(conn, style, Math.max(1, deadline - Date.now()));
      if (!hs.ok) {
        res.handshakeFailed = true;
        res.handshakeFailure = `${hs.reason ?? 'failed'} after ${Date.now() - hsStarted} ms (${style})`;
        res.serverClosed = conn.closed;
        return res;
      }
      conn.parse = false;
      let base = seed.c2sRequests.length > 0 ? seed.c2sRequests : other.c2sRequests;
      if (base.length === 0 || rng.chance(0.15)) base = synthRequests(rng, rng.range(1, 8), hs.size || 16 * MiB);
      const partner = other.c2sRequests.length > 0 ? other.c2sRequests : other.c2s;
      const m = mutate(base, rng, partner);
      body = Buffer.from(m.data);
      res.mutations = m.applied;
    } else {
      conn.parse = false;
      const base = rng.chance(0.8) ? seed.c2s : seed.c2sHandshake;
      const m = mutate(base, rng, other.c2s);
      body = Buffer.from(m.data);
      res.mutations = m.applied;
      // Usually wait for the greeting, as a client would; sometimes talk first.
      if (rng.chance(0.7)) await conn.waitUntil(() => conn.bytesIn >= 18 || conn.closed, 1000);
    }
    if (ending === 'disc') body = Buffer.concat([body, build.requestHeader(0, CMD.DISC, 0n, 0, 0)]);
    res.patched = protectRegion(body, opts.protect.start, opts.protect.end);
    for (const piece of chunksOf(body, splitSizes(rng, body.length))) {
      if (conn.closed || Date.now() > deadline) break;
      // Waits for 'drain' when the server is not reading (paused, or gone).
      if (!(await conn.writeAll(piece, Math.max(1, deadline - Date.now())))) break;
      res.bytesSent += piece.length;
      const d = delayFor(rng, maxDelayMs);
      if (d > 0) await sleep(d);
    }
    switch (ending) {
      case 'destroy':
        break;
      case 'end':
      case 'disc':
        conn.end();
        await conn.waitClosed(Math.min(rng.range(20, 200), Math.max(1, deadline - Date.now())));
        break;
      case 'linger':
        await conn.waitClosed(Math.min(rng.range(0, 100), Math.max(1, deadline - Date.now())));
        break;
    }
    res.serverClosed = conn.closed || conn.ended;
    return res;
  } finally {
    res.bytesReceived = conn.bytesIn;
    conn.destroy();
  }
}

export interface FuzzStats {
  sessions: number;
  byMode: Record<SessionMode, number>;
  byMutation: Partial<Record<MutationName, number>>;
  bytesSent: number;
  bytesReceived: number;
  serverClosed: number;
  connectFailed: number;
  handshakeFailed: number;
  /** The first few handshake failures' reasons, for the report. */
  handshakeFailures: string[];
  patched: number;
  elapsedMs: number;
  /** Why the run stopped early, if it did. */
  stoppedBy: string | null;
  /** Sessions running when the run stopped (for replay with sessionSeed). */
  lastSessions: number[];
}

export interface FuzzRunOptions extends SessionOptions {
  socketPath: string;
  seeds: readonly Seed[];
  runSeed: number;
  /** First session index (for runs split around server restarts). */
  firstSession?: number;
  sessions: number;
  concurrency: number;
  maxSeconds: number;
  /** Checked between sessions; a string stops the run (e.g. "server exited"). */
  shouldStop?: () => string | null;
  onProgress?: (s: FuzzStats) => void;
  progressEveryMs?: number;
}

/** Run `sessions` fuzz sessions, `concurrency` at a time, bounded by `maxSeconds`. */
export async function runFuzz(o: FuzzRunOptions): Promise<FuzzStats> {
  const stats: FuzzStats = {
    sessions: 0,
    byMode: { handshake: 0, transmission: 0 },
    byMutation: {},
    bytesSent: 0,
    bytesReceived: 0,
    serverClosed: 0,
    connectFailed: 0,
    handshakeFailed: 0,
    handshakeFailures: [],
    patched: 0,
    elapsedMs: 0,
    stoppedBy: null,
    lastSessions: [],
  };
  const started = Date.now();
  const deadline = started + o.maxSeconds * 1000;
  const first = o.firstSession ?? 0;
  let next = first;
  const running = new Set<number>();
  let lastProgress = started;
  const worker = async () => {
    for (;;) {
      if (stats.stoppedBy) return;
      const reason = o.shouldStop?.() ?? null;
      if (reason) {
        stats.stoppedBy ??= reason;
        stats.lastSessions = [...running];
        return;
      }
      if (next >= first + o.sessions) return;
      if (Date.now() > deadline) {
        stats.stoppedBy ??= `time limit (${o.maxSeconds} s)`;
        return;
      }
      const i = next++;
      running.add(i);
      const r = await fuzzSession(o.socketPath, o.seeds, new Rng(sessionSeed(o.runSeed, i)), o);
      running.delete(i);
      stats.sessions++;
      stats.byMode[r.mode]++;
      for (const m of r.mutations) stats.byMutation[m] = (stats.byMutation[m] ?? 0) + 1;
      stats.bytesSent += r.bytesSent;
      stats.bytesReceived += r.bytesReceived;
      if (r.serverClosed) stats.serverClosed++;
      if (r.connectFailed) stats.connectFailed++;
      if (r.handshakeFailed) {
        stats.handshakeFailed++;
        if (stats.handshakeFailures.length < 5) stats.handshakeFailures.push(r.handshakeFailure ?? 'failed');
      }
      stats.patched += r.patched;
      if (o.onProgress && Date.now() - lastProgress >= (o.progressEveryMs ?? 10_000)) {
        lastProgress = Date.now();
        stats.elapsedMs = lastProgress - started;
        o.onProgress(stats);
      }
    }
  };
  await Promise.all(Array.from({ length: o.concurrency }, worker));
  stats.elapsedMs = Date.now() - started;
  return stats;
}

// --------------------------------------------------- well-behaved client

export interface WellBehavedStats {
  iterations: number;
  bytesVerified: number;
  errors: string[];
  maxLatencyMs: number;
  /** The request that took maxLatencyMs. */
  slowest: string;
}

/**
 * The NbdClient from src/client/client.ts, connected alongside the fuzzer:
 * writes seeded random data into its own region, reads it back and
 * compares; block status and flush now and then. Bounded in iterations
 * and time; stops at the first error (which is recorded).
 */
export class WellBehavedClient {
  readonly stats: WellBehavedStats = { iterations: 0, bytesVerified: 0, errors: [], maxLatencyMs: 0, slowest: '' };
  private stopped = false;
  private loop: Promise<void> | null = null;
  private client: NbdClient | null = null;

  constructor(
    private readonly socketPath: string,
    private readonly region: { start: number; end: number },
    private readonly seed = 1,
    private readonly limits = { maxIterations: 10_000_000, maxSeconds: 3600, pauseMs: 1 },
  ) {}

  async start(): Promise<void> {
    this.client = await NbdClient.connect({ socketPath: this.socketPath, exportName: 'disk' }, { connectTimeoutMs: 10_000 });
    this.client.on('close', (err: Error) => {
      if (!this.stopped) this.stats.errors.push(`connection closed: ${err.message}`);
    });
    this.loop = this.run();
  }

  private async timed<T>(what: string, p: Promise<T>): Promise<T> {
    const t0 = Date.now();
    let timer: NodeJS.Timeout | undefined;
    try {
      return await Promise.race([
        p,
        new Promise<never>((_, reject) => {
          timer = setTimeout(() => reject(new Error('request took more than 30 s')), 30_000);
        }),
      ]);
    } finally {
      clearTimeout(timer);
      const ms = Date.now() - t0;
      if (ms > this.stats.maxLatencyMs) {
        this.stats.maxLatencyMs = ms;
        this.stats.slowest = what;
      }
    }
  }

  private async run(): Promise<void> {
    const c = this.client as NbdClient;
    const rng = new Rng(this.seed);
    const deadline = Date.now() + this.limits.maxSeconds * 1000;
    const span = this.region.end - this.region.start;
    try {
      while (!this.stopped && this.stats.iterations < this.limits.maxIterations && Date.now() < deadline) {
        const len = rng.pick([512, 4096, 16384, 65536]);
        const off = this.region.start + rng.int(Math.floor((span - len) / 512) + 1) * 512;
        const data = rng.bytes(len);
        await this.timed(`write ${len}`, c.write(off, data));
        const back = await this.timed(`read ${len}`, c.read(off, len));
        if (!back.equals(data)) throw new Error(`data mismatch at ${off}+${len} (iteration ${this.stats.iterations})`);
        this.stats.bytesVerified += len;
        if (this.stats.iterations % 16 === 0) {
          const ext = await this.timed('block status', c.blockStatus(this.region.start, span));
          if (ext.length === 0) throw new Error('block status returned no extents');
          await this.timed('flush', c.flush());
        }
        this.stats.iterations++;
        if (this.limits.pauseMs > 0) await sleep(this.limits.pauseMs);
      }
    } catch (e) {
      if (!this.stopped || this.stats.errors.length === 0) this.stats.errors.push((e as Error).message);
    }
  }

  async stop(): Promise<WellBehavedStats> {
    this.stopped = true;
    if (this.loop) await withTimeout(this.loop, 35_000);
    const c = this.client;
    if (c && !c.isClosed) await withTimeout(c.close(), 5000);
    return this.stats;
  }
}

// ------------------------------------------------ connect/disconnect cycles

export type CycleKind = 'close-immediately' | 'handshake-disc' | 'handshake-destroy';
export const CYCLE_KINDS: readonly CycleKind[] = ['close-immediately', 'handshake-disc', 'handshake-destroy'];

export interface CycleStats {
  done: number;
  byKind: Record<CycleKind, number>;
  failures: string[];
  elapsedMs: number;
}

/** One connect/disconnect cycle; returns a failure description or null. */
export async function connectCycle(socketPath: string, kind: CycleKind, rng: Rng): Promise<string | null> {
  let conn: RawConn;
  try {
    conn = await RawConn.connect(socketPath, 5000);
  } catch (e) {
    return `${kind}: connect failed: ${(e as Error).message}`;
  }
  try {
    if (kind === 'close-immediately') {
      if (rng.chance(0.5)) conn.end();
      return null;
    }
    const hs = await handshake(conn, rng.pick(HANDSHAKE_STYLES), 5000);
    if (!hs.ok) return `${kind}: handshake failed: ${hs.reason}`;
    if (kind === 'handshake-disc') {
      if (rng.chance(0.5)) conn.write(build.requestHeader(0, CMD.READ, 1n, 0, 4096));
      conn.write(build.requestHeader(0, CMD.DISC, 2n, 0, 0));
      if (!(await conn.waitClosed(5000))) return `${kind}: the server did not close after DISC`;
      return null;
    }
    // handshake-destroy: sometimes with requests in flight
    if (rng.chance(0.5)) {
      conn.write(build.requestHeader(0, CMD.READ, 1n, 0, 65536));
      conn.write(Buffer.concat([build.requestHeader(0, CMD.WRITE, 2n, 0, 4096), Buffer.alloc(1000)]));
    }
    return null;
  } finally {
    conn.destroy();
  }
}

/** `count` cycles, `concurrency` at a time, kinds in random order; bounded by `maxSeconds`. */
export async function runCycles(
  socketPath: string,
  o: { count: number; concurrency: number; runSeed: number; maxSeconds: number; onProgress?: (s: CycleStats) => void },
): Promise<CycleStats> {
  const stats: CycleStats = {
    done: 0,
    byKind: { 'close-immediately': 0, 'handshake-disc': 0, 'handshake-destroy': 0 },
    failures: [],
    elapsedMs: 0,
  };
  const started = Date.now();
  const deadline = started + o.maxSeconds * 1000;
  let next = 0;
  let lastProgress = started;
  const worker = async () => {
    while (next < o.count && Date.now() < deadline && stats.failures.length < 50) {
      const i = next++;
      const rng = new Rng(sessionSeed(o.runSeed, i));
      const kind = rng.pick(CYCLE_KINDS);
      const failure = await connectCycle(socketPath, kind, rng);
      stats.done++;
      stats.byKind[kind]++;
      if (failure) stats.failures.push(`cycle ${i}: ${failure}`);
      if (o.onProgress && Date.now() - lastProgress > 10_000) {
        lastProgress = Date.now();
        stats.elapsedMs = lastProgress - started;
        o.onProgress(stats);
      }
    }
  };
  await Promise.all(Array.from({ length: o.concurrency }, worker));
  stats.elapsedMs = Date.now() - started;
  return stats;
}

/**
 * After a burst of connections: wait until the server's fd count is back
 * within `tolerance` of `baseline` (bounded); returns the last count.
 */
export async function settleFds(pid: number, baseline: number, tolerance = 2, timeoutMs = 10_000): Promise<number> {
  let n = fdCount(pid);
  await pollUntil(() => (n = fdCount(pid)) <= baseline + tolerance, timeoutMs, 50);
  return n;
}

// ------------------------------------------------------------ hostile sizes

/** Stream `total` bytes of junk in 1 MiB pieces with backpressure; returns bytes written. */
async function streamJunk(conn: RawConn, total: number, timeoutMs: number): Promise<number> {
  const piece = Buffer.alloc(MiB, 0x5a);
  const deadline = Date.now() + timeoutMs;
  let sent = 0;
  while (sent < total && !conn.closed && Date.now() < deadline) {
    const n = Math.min(piece.length, total - sent);
    if (!(await conn.writeAll(piece.subarray(0, n), Math.max(1, deadline - Date.now())))) break;
    sent += n;
  }
  return sent;
}

export interface HostileResult {
  junkSent: number;
  /** Messages the server sent after the hostile header (replies, errors). */
  replies: ServerMessage[];
  /** The server closed once we ended our side. */
  closedAfterEnd: boolean;
}

/** A WRITE claiming 0xffffffff bytes, followed by `junk` bytes, then our side closes. */
export async function probeHugeWrite(socketPath: string, junk: number): Promise<HostileResult> {
  const conn = await RawConn.connect(socketPath);
  try {
    const hs = await handshake(conn, 'go');
    if (!hs.ok) throw new Error(`handshake failed: ${hs.reason}`);
    conn.write(build.requestHeader(0, CMD.WRITE, 0xdeadn, 0, 0xffffffff));
    const junkSent = await streamJunk(conn, junk, 30_000);
    await sleep(50);
    const replies = conn.messages.splice(0);
    conn.end();
    const closedAfterEnd = await conn.waitClosed(5000);
    return { junkSent, replies, closedAfterEnd };
  } finally {
    conn.destroy();
  }
}

/** Client flags and an option header claiming 0xffffffff bytes, then `junk` bytes, then close. */
export async function probeHugeOption(socketPath: string, junk: number): Promise<HostileResult> {
  const conn = await RawConn.connect(socketPath);
  try {
    const g = await conn.next((m) => m.type === 'greeting', 5000);
    if (!g) throw new Error('no greeting');
    const header = Buffer.alloc(16);
    header.writeBigUInt64BE(IHAVEOPT, 0);
    header.writeUInt32BE(OPT.GO, 8);
    header.writeUInt32BE(0xffffffff, 12);
    conn.write(Buffer.concat([build.clientFlags(3), header]));
    const junkSent = await streamJunk(conn, junk, 30_000);
    await sleep(50);
    const replies = conn.messages.splice(0);
    conn.end();
    const closedAfterEnd = await conn.waitClosed(5000);
    return { junkSent, replies, closedAfterEnd };
  } finally {
    conn.destroy();
  }
}

export interface BlockStatusAnswer {
  /** NBD error (0 for success). */
  error: number;
  extents: number;
  /** Bytes of reply payload received for the request. */
  payloadBytes: number;
}

/** BLOCK_STATUS requests with hostile ranges on one structured connection. */
export async function probeBlockStatus(
  socketPath: string,
  requests: ReadonlyArray<{ offset: bigint; length: number; flags?: number }>,
): Promise<BlockStatusAnswer[]> {
  const conn = await RawConn.connect(socketPath);
  try {
    const hs = await handshake(conn, 'go-structured');
    if (!hs.ok || hs.contextId === null) throw new Error(`handshake failed: ${hs.reason ?? 'no base:allocation'}`);
    const out: BlockStatusAnswer[] = [];
    let cookie = 100n;
    for (const r of requests) {
      const h = build.requestHeader(r.flags ?? 0, CMD.BLOCK_STATUS, ++cookie, 0, r.length);
      h.writeBigUInt64BE(r.offset, 16);
      conn.write(h);
      const ans: BlockStatusAnswer = { error: 0, extents: 0, payloadBytes: 0 };
      for (;;) {
        const m = await conn.next((x) => x.type !== 'greeting', 10_000);
        if (!m) throw new Error('no reply to BLOCK_STATUS');
        if (m.type === 'simpleReply') {
          ans.error = m.error;
          break;
        }
        if (m.type !== 'structuredChunk' || m.cookie !== cookie) throw new Error(`unexpected ${m.type}`);
        ans.payloadBytes += m.payload.length;
        if (m.chunkType === CHUNK.BLOCK_STATUS) ans.extents += (m.payload.length - 4) / 8;
        if ((m.chunkType & 0x8000) !== 0 && m.payload.length >= 4) ans.error = m.payload.readUInt32BE(0);
        if ((m.flags & 1) !== 0) break;
      }
      out.push(ans);
    }
    conn.write(build.requestHeader(0, CMD.DISC, ++cookie, 0, 0));
    await conn.waitClosed(2000);
    return out;
  } finally {
    conn.destroy();
  }
}

// --------------------------------------------------------------- long run

/** The long run fails if the server's RSS ever reaches this. */
export const LONG_RUN_RSS_LIMIT_KIB = 300 * 1024;

export interface LongRunOptions {
  sessions: number;
  cycles: number;
  maxSeconds: number;
  concurrency: number;
  runSeed: number;
  log: (line: string) => void;
}

export interface LongRunReport {
  sessions: number;
  sessionsPerSecond: number;
  crashes: number;
  crashOutputs: string[];
  wellBehaved: WellBehavedStats;
  fuzz: FuzzStats[];
  cycles: CycleStats | null;
  fds: { before: number; afterFuzz: number; beforeCycles: number; afterCycles: number };
  rssKiB: { before: number; peak: number; afterFuzz: number; beforeCycles: number; afterCycles: number };
  /** The server's open files at the end, when there are more than at the start. */
  extraFds?: string[];
  ok: boolean;
}

/**
 * The long run (scripts/fuzz/long-run): `sessions` network fuzz sessions
 * with a well-behaved client alongside, then `cycles` connect/disconnect
 * cycles, all within `maxSeconds`. A crashed server is counted, its output
 * kept, and a fresh one started (up to 5 times).
 */
export async function longRun(o: LongRunOptions): Promise<LongRunReport> {
  const started = Date.now();
  const deadline = started + o.maxSeconds * 1000;
  const seeds = loadSeeds();
  const SIZE = 64 * MiB;
  const protect = { start: SIZE - 4 * MiB, end: SIZE };
  let server = await startServer({ size: SIZE, handshakeTimeout: '2s', maxConnections: 64 });
  const report: LongRunReport = {
    sessions: 0,
    sessionsPerSecond: 0,
    crashes: 0,
    crashOutputs: [],
    wellBehaved: { iterations: 0, bytesVerified: 0, errors: [], maxLatencyMs: 0, slowest: '' },
    fuzz: [],
    cycles: null,
    fds: { before: 0, afterFuzz: 0, beforeCycles: 0, afterCycles: 0 },
    rssKiB: { before: 0, peak: 0, afterFuzz: 0, beforeCycles: 0, afterCycles: 0 },
    ok: false,
  };
  const clients: WellBehavedClient[] = [];
  const startClient = async () => {
    const c = new WellBehavedClient(server.socket, protect, o.runSeed ^ clients.length, {
      maxIterations: 100_000_000,
      maxSeconds: o.maxSeconds,
      pauseMs: 2,
    });
    await c.start();
    clients.push(c);
    return c;
  };
  let peak = 0;
  const sampler = setInterval(() => {
    try {
      if (server.alive()) peak = Math.max(peak, rssKiB(server.pid));
    } catch {
      // exiting
    }
  }, 200);
  try {
    await sleep(500); // let start-up finish (control socket, first probe connection gone)
    report.fds.before = fdCount(server.pid);
    report.rssKiB.before = rssKiB(server.pid);
    let client = await startClient();
    let done = 0;
    // Keep time for the cycles at the end (they run at several hundred a second).
    const reserve = o.cycles > 0 ? Math.min(300, Math.max(30, o.cycles / 100)) : 0;
    const fuzzSeconds = () => Math.max(1, (deadline - Date.now()) / 1000 - reserve);
    while (done < o.sessions && Date.now() < deadline) {
      const stats = await runFuzz({
        socketPath: server.socket,
        seeds,
        runSeed: o.runSeed,
        firstSession: done,
        sessions: o.sessions - done,
        concurrency: o.concurrency,
        maxSeconds: fuzzSeconds(),
        protect,
        shouldStop: () => (server.alive() ? (client.stats.errors.length > 0 ? 'well-behaved client error' : null) : 'nbd-cbw exited'),
        onProgress: (s) =>
          o.log(
            `  ${done + s.sessions} sessions, ${Math.round(s.sessions / (s.elapsedMs / 1000))}/s, ` +
              `rss ${rssKiB(server.pid)} KiB, fds ${fdCount(server.pid)}, well-behaved iterations ${client.stats.iterations}`,
          ),
      });
      report.fuzz.push(stats);
      done += stats.sessions;
      if (!server.alive()) {
        await sleep(100);
        report.crashes++;
        report.crashOutputs.push(
          `exit ${JSON.stringify(server.exit)} after session ${done}; sessions in flight: ${stats.lastSessions.join(',')}\n${server.output().slice(-8000)}`,
        );
        o.log(`nbd-cbw exited (${JSON.stringify(server.exit)}); in-flight sessions ${stats.lastSessions.join(',')}`);
        const s = await client.stop();
        report.wellBehaved.iterations += s.iterations;
        report.wellBehaved.bytesVerified += s.bytesVerified;
        await server.stop();
        if (report.crashes >= 5) break;
        server = await startServer({ size: SIZE, handshakeTimeout: '2s', maxConnections: 64 });
        client = await startClient();
        continue;
      }
      if (client.stats.errors.length > 0 || stats.stoppedBy) break;
    }
    report.sessions = done;
    report.sessionsPerSecond = Math.round(done / ((Date.now() - started) / 1000));
    if (server.alive()) {
      await sleep(500);
      report.fds.afterFuzz = fdCount(server.pid);
      report.rssKiB.afterFuzz = rssKiB(server.pid);
    }
    const s = await client.stop();
    report.wellBehaved.iterations += s.iterations;
    report.wellBehaved.bytesVerified += s.bytesVerified;
    if (s.maxLatencyMs > report.wellBehaved.maxLatencyMs) {
      report.wellBehaved.maxLatencyMs = s.maxLatencyMs;
      report.wellBehaved.slowest = s.slowest;
    }
    for (const c of clients) report.wellBehaved.errors.push(...c.stats.errors);

    if (o.cycles > 0 && server.alive()) {
      // Cycles on a quiet server: warm up, take the baseline, run, settle, measure.
      await runCycles(server.socket, { count: 200, concurrency: 8, runSeed: o.runSeed + 1, maxSeconds: 60 });
      await sleep(500);
      report.fds.beforeCycles = fdCount(server.pid);
      report.rssKiB.beforeCycles = rssKiB(server.pid);
      report.cycles = await runCycles(server.socket, {
        count: o.cycles,
        concurrency: 8,
        runSeed: o.runSeed + 2,
        maxSeconds: Math.max(30, (deadline - Date.now()) / 1000),
        onProgress: (c) => o.log(`  ${c.done} cycles, fds ${fdCount(server.pid)}, rss ${rssKiB(server.pid)} KiB`),
      });
      report.fds.afterCycles = await settleFds(server.pid, report.fds.beforeCycles, 2, 10_000);
      await sleep(500);
      report.rssKiB.afterCycles = rssKiB(server.pid);
    }
    if (server.alive()) {
      const fds = fdList(server.pid);
      if (fds.length > report.fds.before + 2) report.extraFds = fds;
    }
    if (!server.alive() && report.crashes === 0) {
      report.crashes++;
      report.crashOutputs.push(`exit ${JSON.stringify(server.exit)}\n${server.output().slice(-8000)}`);
    }
    const out = server.output();
    if (CRASH_PATTERNS.test(out)) report.crashOutputs.push(`suspicious output:\n${out.slice(-8000)}`);
    report.rssKiB.peak = peak;
    report.ok =
      report.crashes === 0 &&
      report.crashOutputs.length === 0 &&
      report.wellBehaved.errors.length === 0 &&
      report.rssKiB.peak < LONG_RUN_RSS_LIMIT_KIB &&
      (report.cycles === null ||
        (report.cycles.failures.length === 0 &&
          Math.abs(report.fds.afterCycles - report.fds.beforeCycles) <= 2 &&
          report.rssKiB.afterCycles - report.rssKiB.beforeCycles < 30 * 1024));
    return report;
  } finally {
    clearInterval(sampler);
    for (const c of clients) await c.stop().catch(() => undefined);
    await server.stop();
  }
}
