#!/usr/bin/env node
// A tiny recording proxy for NBD over unix sockets, used by
// scripts/fuzz/record-seeds to capture what real clients send.
//
//   node scripts/fuzz/record-proxy.js --listen SOCK --upstream SOCK \
//        --out DIR --name NAME [--cap BYTES] [--max-requests N] [--raw]
//
// Every accepted connection is forwarded to --upstream unchanged. When it
// closes, the bytes of each direction are written to DIR:
//   NAME-N.c2s    what the client sent (the fuzzing seed)
//   NAME-N.s2c    what the server answered (seed for the client-side parser)
//   NAME-N.json   where the handshake ends in each file, and the session's
//                 negotiated features (used by test/helpers/fuzz.ts)
// Unless --raw, the recording is trimmed so seeds stay small while keeping
// their framing valid: WRITE payloads and READ lengths are cut to --cap
// bytes (the matching replies are cut the same way), block-status replies
// to 16 extents, and at most --max-requests requests are kept (plus a final
// DISC). The proxy prints "ready" once listening and exits on SIGTERM/SIGINT
// after writing the connections still open. Plain JavaScript with no
// dependencies: it shares no code with the parser it produces seeds for.

'use strict';

const fs = require('node:fs');
const net = require('node:net');
const path = require('node:path');

// ------------------------------------------------------------ arguments

function parseArgs(argv) {
  const o = { cap: 512, maxRequests: 32, raw: false };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const val = () => {
      if (i + 1 >= argv.length) throw new Error(`${a} needs a value`);
      return argv[++i];
    };
    if (a === '--listen') o.listen = val();
    else if (a === '--upstream') o.upstream = val();
    else if (a === '--out') o.out = val();
    else if (a === '--name') o.name = val();
    else if (a === '--cap') o.cap = Number(val());
    else if (a === '--max-requests') o.maxRequests = Number(val());
    else if (a === '--raw') o.raw = true;
    else throw new Error(`unknown argument ${a}`);
  }
  for (const k of ['listen', 'upstream', 'out', 'name']) if (!o[k]) throw new Error(`--${k} is required`);
  if (!Number.isInteger(o.cap) || o.cap < 0) throw new Error('--cap must be a non-negative integer');
  if (!Number.isInteger(o.maxRequests) || o.maxRequests < 1) throw new Error('--max-requests must be >= 1');
  return o;
}

// --------------------------------------------------- wire values (spec)

const IHAVEOPT = 0x49484156454f5054n;
const OPT_REPLY_MAGIC = 0x3e889045565a9n;
const REQUEST_MAGIC = 0x25609513;
const SIMPLE_MAGIC = 0x67446698;
const STRUCTURED_MAGIC = 0x668e33ef;
const OPT_EXPORT_NAME = 1;
const OPT_ABORT = 2;
const OPT_STARTTLS = 5;
const OPT_GO = 7;
const OPT_STRUCTURED_REPLY = 8;
const REP_ACK = 1;
const REP_ERR_BIT = 0x80000000;
const CMD_READ = 0;
const CMD_WRITE = 1;
const CMD_DISC = 2;
const CHUNK_OFFSET_DATA = 1;
const CHUNK_OFFSET_HOLE = 2;
const CHUNK_BLOCK_STATUS = 5;
const MAX_EXTENTS_KEPT = 16;

// ------------------------------------------------------------- trimming

/**
 * Walk both directions of one recorded session and rebuild them trimmed.
 * Returns null when the session does not parse as a well-formed NBD session
 * (then the raw bytes are kept as they are).
 */
function trimSession(c2s, s2c, cap, maxRequests) {
  const outC = [];
  const outS = [];
  const meta = { noZeroes: false, exportName: false, structured: false, c2sHandshakeBytes: c2s.length, s2cHandshakeBytes: s2c.length, requests: 0, trimmed: false };
  if (c2s.length < 4 || s2c.length < 18) return null;
  const flags = c2s.readUInt32BE(0);
  meta.noZeroes = (flags & 2) !== 0;
  outC.push(c2s.subarray(0, 4));
  outS.push(s2c.subarray(0, 18));
  let c = 4;
  let s = 18;
  let transmission = false;
  // Handshake: options in order; each (but EXPORT_NAME) is answered by
  // replies for that option up to a final one (ACK or an error).
  while (c + 16 <= c2s.length) {
    if (c2s.readBigUInt64BE(c) !== IHAVEOPT) return null;
    const opt = c2s.readUInt32BE(c + 8);
    const len = c2s.readUInt32BE(c + 12);
    if (c + 16 + len > c2s.length) return null;
    outC.push(c2s.subarray(c, c + 16 + len));
    c += 16 + len;
    if (opt === OPT_EXPORT_NAME) {
      const n = 10 + (meta.noZeroes ? 0 : 124);
      if (s + n > s2c.length) return null;
      outS.push(s2c.subarray(s, s + n));
      s += n;
      meta.exportName = true;
      transmission = true;
      break;
    }
    let final = -1;
    while (final < 0) {
      if (s + 20 > s2c.length) break;
      if (s2c.readBigUInt64BE(s) !== OPT_REPLY_MAGIC) return null;
      const rtype = s2c.readUInt32BE(s + 12);
      const rlen = s2c.readUInt32BE(s + 16);
      if (s + 20 + rlen > s2c.length) return null;
      outS.push(s2c.subarray(s, s + 20 + rlen));
      s += 20 + rlen;
      if (rtype === REP_ACK || (rtype & REP_ERR_BIT) >>> 0 !== 0) final = rtype;
    }
    if (final < 0) break; // the session ended inside the handshake
    if (opt === OPT_STRUCTURED_REPLY && final === REP_ACK) meta.structured = true;
    if (opt === OPT_STARTTLS && final === REP_ACK) return null; // TLS: not recordable
    if (opt === OPT_ABORT) break;
    if (opt === OPT_GO && final === REP_ACK) {
      transmission = true;
      break;
    }
  }
  meta.c2sHandshakeBytes = outC.reduce((n, b) => n + b.length, 0);
  meta.s2cHandshakeBytes = outS.reduce((n, b) => n + b.length, 0);
  if (!transmission) {
    if (c !== c2s.length) outC.push(c2s.subarray(c));
    if (s !== s2c.length) outS.push(s2c.subarray(s));
    return { c2s: Buffer.concat(outC), s2c: Buffer.concat(outS), meta };
  }

  // Transmission, client side: requests, trimmed.
  // cookie (string) -> requests in the order sent; a cookie may be reused
  // once its reply is complete, so replies take them first-in first-out.
  const seen = new Map();
  let requests = 0;
  while (c + 28 <= c2s.length) {
    if (c2s.readUInt32BE(c) !== REQUEST_MAGIC) return null;
    const command = c2s.readUInt16BE(c + 6);
    const cookie = c2s.readBigUInt64BE(c + 8).toString();
    const length = c2s.readUInt32BE(c + 24);
    const payloadLen = command === CMD_WRITE ? length : 0;
    if (c + 28 + payloadLen > c2s.length) return null;
    const keep = requests < maxRequests || command === CMD_DISC;
    let newLength = length;
    if (keep) {
      const header = Buffer.from(c2s.subarray(c, c + 28));
      if ((command === CMD_WRITE || command === CMD_READ) && length > cap) {
        newLength = cap;
        header.writeUInt32BE(newLength, 24);
        meta.trimmed = true;
      }
      outC.push(header);
      if (command === CMD_WRITE) outC.push(c2s.subarray(c + 28, c + 28 + newLength));
      requests++;
    } else {
      meta.trimmed = true;
    }
    if (!seen.has(cookie)) seen.set(cookie, []);
    seen.get(cookie).push({ command, origLength: length, length: newLength, kept: keep });
    c += 28 + payloadLen;
  }
  if (c !== c2s.length) return null;
  meta.requests = requests;

  // Transmission, server side: replies to the requests kept, trimmed alike.
  while (s + 4 <= s2c.length) {
    const magic = s2c.readUInt32BE(s);
    if (magic === SIMPLE_MAGIC) {
      if (s + 16 > s2c.length) return null;
      const error = s2c.readUInt32BE(s + 4);
      const r = seen.get(s2c.readBigUInt64BE(s + 8).toString())?.shift();
      if (!r) return null;
      const dataLen = r.command === CMD_READ && error === 0 ? r.origLength : 0;
      if (s + 16 + dataLen > s2c.length) return null;
      if (r.kept) {
        outS.push(s2c.subarray(s, s + 16));
        if (dataLen) outS.push(s2c.subarray(s + 16, s + 16 + r.length));
      }
      s += 16 + dataLen;
      continue;
    }
    if (magic === STRUCTURED_MAGIC) {
      if (s + 20 > s2c.length) return null;
      const done = (s2c.readUInt16BE(s + 4) & 1) !== 0;
      const type = s2c.readUInt16BE(s + 6);
      const queue = seen.get(s2c.readBigUInt64BE(s + 8).toString());
      const r = done ? queue?.shift() : queue?.[0];
      const len = s2c.readUInt32BE(s + 16);
      if (!r || s + 20 + len > s2c.length) return null;
      if (r.kept) {
        const header = Buffer.from(s2c.subarray(s, s + 20));
        let payload = s2c.subarray(s + 20, s + 20 + len);
        if (type === CHUNK_OFFSET_DATA && payload.length > 8 + cap) {
          payload = payload.subarray(0, 8 + cap);
        } else if (type === CHUNK_OFFSET_HOLE && payload.length === 12 && payload.readUInt32BE(8) > cap) {
          payload = Buffer.from(payload);
          payload.writeUInt32BE(cap, 8);
        } else if (type === CHUNK_BLOCK_STATUS && payload.length > 4 + 8 * MAX_EXTENTS_KEPT) {
          payload = payload.subarray(0, 4 + 8 * MAX_EXTENTS_KEPT);
        }
        header.writeUInt32BE(payload.length, 16);
        outS.push(header, payload);
      }
      s += 20 + len;
      continue;
    }
    return null;
  }
  if (s !== s2c.length) return null;
  return { c2s: Buffer.concat(outC), s2c: Buffer.concat(outS), meta };
}

// ---------------------------------------------------------------- proxy

function main() {
  let o;
  try {
    o = parseArgs(process.argv.slice(2));
  } catch (e) {
    process.stderr.write(`record-proxy: ${e.message}\n`);
    process.exit(2);
  }
  fs.mkdirSync(o.out, { recursive: true });
  try {
    if (fs.statSync(o.listen).isSocket()) fs.unlinkSync(o.listen);
  } catch {
    // nothing there
  }
  let counter = 0;
  const open = new Set();

  const save = (n, c2sChunks, s2cChunks) => {
    const c2s = Buffer.concat(c2sChunks);
    const s2c = Buffer.concat(s2cChunks);
    if (c2s.length === 0) return;
    const base = path.join(o.out, `${o.name}-${n}`);
    const trimmed = o.raw ? null : trimSession(c2s, s2c, o.cap, o.maxRequests);
    const out = trimmed ?? { c2s, s2c, meta: { raw: true } };
    fs.writeFileSync(`${base}.c2s`, out.c2s);
    fs.writeFileSync(`${base}.s2c`, out.s2c);
    const meta = { client: o.name, connection: n, recordedBytes: { c2s: c2s.length, s2c: s2c.length }, ...out.meta };
    fs.writeFileSync(`${base}.json`, `${JSON.stringify(meta, null, 2)}\n`);
    process.stderr.write(
      `record-proxy: ${path.basename(base)}: c2s ${c2s.length} -> ${out.c2s.length} bytes, s2c ${s2c.length} -> ${out.s2c.length} bytes${trimmed ? '' : ' (kept raw)'}\n`,
    );
  };

  const server = net.createServer({ allowHalfOpen: true }, (down) => {
    const n = ++counter;
    const c2s = [];
    const s2c = [];
    const up = net.createConnection({ path: o.upstream, allowHalfOpen: true });
    const conn = { done: false, finish: null };
    open.add(conn);
    let closed = 0;
    const finish = () => {
      if (conn.done) return;
      conn.done = true;
      open.delete(conn);
      down.destroy();
      up.destroy();
      save(n, c2s, s2c);
    };
    conn.finish = finish;
    const onClosed = () => {
      if (++closed === 2) finish();
    };
    down.on('data', (d) => {
      c2s.push(Buffer.from(d));
      up.write(d);
    });
    up.on('data', (d) => {
      s2c.push(Buffer.from(d));
      down.write(d);
    });
    down.on('end', () => up.end());
    up.on('end', () => down.end());
    down.on('close', onClosed);
    up.on('close', onClosed);
    down.on('error', () => up.destroy());
    up.on('error', () => down.destroy());
  });
  server.listen(o.listen, () => process.stdout.write('ready\n'));
  const stop = () => {
    server.close();
    for (const c of [...open]) c.finish();
    process.exit(0);
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
}

if (require.main === module) main();
module.exports = { trimSession };
