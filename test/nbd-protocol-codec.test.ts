// Codec tests for src/nbd-protocol: serializer and parsers are checked against
// an independent byte builder (test/fixtures/nbd-bytes.ts) written from the
// NBD spec; parsers are fed every split of realistic streams; large and
// hostile payload lengths; malformed input.

import t from 'tap';
import {
  build,
  ClientStreamParser,
  ServerStreamParser,
  Command,
  CommandFlag,
  Option,
  OptionReply,
  InfoType,
  ReplyType,
  ReplyFlag,
  HandshakeFlag,
  ClientFlag,
  TransmissionFlag,
  NbdError,
  AllocationFlag,
  MAX_PAYLOAD,
  MAX_OPTION_LENGTH,
  MAX_STRING,
  BASE_ALLOCATION,
  decodeInfoRequest,
  decodeMetaContextRequest,
  decodeInfoReply,
  decodeServerListReply,
  decodeMetaContextReply,
  decodeOffsetData,
  decodeOffsetHole,
  decodeBlockStatus,
  decodeErrorChunk,
  isErrorChunk,
} from '../src/nbd-protocol/index';
import type { ClientMessage, ServerMessage } from '../src/nbd-protocol/index';
import * as B from './fixtures/nbd-bytes';

// ------------------------------------------------------------------ helpers

/** Deterministic PRNG (mulberry32). */
function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let x = a;
    x = Math.imul(x ^ (x >>> 15), x | 1);
    x ^= x + Math.imul(x ^ (x >>> 7), x | 61);
    return ((x ^ (x >>> 14)) >>> 0) / 4294967296;
  };
}

/** Deterministic non-trivial bytes. */
function pattern(n: number, seed = 1): Buffer {
  const r = rng(seed);
  const b = Buffer.allocUnsafe(n);
  for (let i = 0; i < n; i++) b[i] = (r() * 256) | 0;
  return b;
}

/** Replace Buffers by their hex so deep comparison shows readable diffs. */
function norm<M extends object>(m: M): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(m)) out[k] = Buffer.isBuffer(v) ? { hex: v.toString('hex') } : v;
  return out;
}

/** First difference between two message lists, or undefined. Buffers compared by content. */
function diffMessages(expected: readonly object[], actual: readonly object[]): string | undefined {
  if (expected.length !== actual.length) return `count ${actual.length} != ${expected.length}`;
  for (let i = 0; i < expected.length; i++) {
    const e = expected[i] as Record<string, unknown>;
    const a = actual[i] as Record<string, unknown>;
    const keys = new Set([...Object.keys(e), ...Object.keys(a)]);
    for (const k of keys) {
      const ev = e[k];
      const av = a[k];
      if (Buffer.isBuffer(ev) || Buffer.isBuffer(av)) {
        if (!Buffer.isBuffer(ev) || !Buffer.isBuffer(av) || !ev.equals(av)) return `message ${i} field ${k} differs`;
      } else if (ev !== av) {
        return `message ${i} field ${k}: ${String(av)} != ${String(ev)}`;
      }
    }
  }
  return undefined;
}

type ClientPhase = ClientStreamParser['phase'];
type ServerPhase = ServerStreamParser['phase'];

/** Parse client->server bytes in one push, starting in `phase`. */
function parseClient(
  bytes: Buffer | Buffer[],
  phase: ClientPhase = 'clientFlags',
  opts: ConstructorParameters<typeof ClientStreamParser>[0] = {},
): { msgs: ClientMessage[]; parser: ClientStreamParser } {
  const parser = new ClientStreamParser(opts);
  parser.phase = phase;
  const msgs: ClientMessage[] = [];
  for (const b of Array.isArray(bytes) ? bytes : [bytes]) parser.push(b, (m) => msgs.push(m));
  return { msgs, parser };
}

/** Parse server->client bytes in one push, starting in `phase`. */
function parseServer(
  bytes: Buffer | Buffer[],
  phase: ServerPhase = 'greeting',
  opts: ConstructorParameters<typeof ServerStreamParser>[0] = {},
  noZeroes = false,
): { msgs: ServerMessage[]; parser: ServerStreamParser } {
  const parser = new ServerStreamParser(opts);
  parser.phase = phase;
  parser.noZeroes = noZeroes;
  const msgs: ServerMessage[] = [];
  for (const b of Array.isArray(bytes) ? bytes : [bytes]) parser.push(b, (m) => msgs.push(m));
  return { msgs, parser };
}

const request = (
  flags: number,
  command: number,
  cookie: bigint,
  offset: number,
  length: number,
  payload: Buffer | null = null,
  payloadSkipped = false,
) => ({ type: 'request' as const, flags, command, cookie, offset, length, payload, payloadSkipped });

const chunk = (cookie: bigint, flags: number, chunkType: number, payload: Buffer) => ({
  type: 'structuredChunk' as const,
  cookie,
  flags,
  chunkType,
  payload,
});

const BIG_COOKIE = 0xfedcba9876543210n;
const MAX_SAFE = Number.MAX_SAFE_INTEGER; // 2^53 - 1

// ------------------------------------------------------- builder self-check

t.test('fixture builder writes network byte order', async (t) => {
  const b = new B.BufferList().add8(0xab).add16(0x1234).add32(0xdeadbeef).add64(0x0102030405060708n).add64(258);
  t.equal(b.join().toString('hex'), 'ab' + '1234' + 'deadbeef' + '0102030405060708' + '0000000000000102');
  t.equal(B.greeting(3).toString('hex'), Buffer.from('NBDMAGICIHAVEOPT').toString('hex') + '0003');
  t.equal(B.option(1, Buffer.from('x')).subarray(0, 8).toString('latin1'), 'IHAVEOPT');
  t.equal(B.exportNameReply(1, 1, false).length, 8 + 2 + 124);
  t.equal(B.exportNameReply(1, 1, true).length, 10);
  t.equal(B.request(0, 0, 0n, 0, 0).length, 28);
  t.equal(B.simpleReply(0n, 0).length, 16);
  t.equal(B.noneChunk(0n).length, 20);
  t.throws(() => new B.BufferList().add16(0x10000));
  t.throws(() => new B.BufferList().add32(-1));
});

// ------------------------------------------------- constants match the spec

t.test('constants match doc/proto.md', async (t) => {
  // Magics: the serializer's output starts with the spec's literals.
  t.equal(build.greeting(0).readBigUInt64BE(0), B.MAGIC_NBDMAGIC);
  t.equal(build.greeting(0).readBigUInt64BE(8), B.MAGIC_IHAVEOPT);
  t.equal(build.option(1).readBigUInt64BE(0), B.MAGIC_IHAVEOPT);
  t.equal(build.optionReply(1, 1).readBigUInt64BE(0), B.MAGIC_OPTION_REPLY);
  t.equal(build.requestHeader(0, 0, 0n, 0, 0).readUInt32BE(0), B.MAGIC_REQUEST);
  t.equal(build.simpleReplyHeader(0n, 0).readUInt32BE(0), B.MAGIC_SIMPLE_REPLY);
  t.equal(build.noneChunk(0n).readUInt32BE(0), B.MAGIC_STRUCTURED_REPLY);
  t.strictSame(
    [Option.ExportName, Option.Abort, Option.List, Option.StartTls, Option.Info, Option.Go, Option.StructuredReply,
      Option.ListMetaContext, Option.SetMetaContext, Option.ExtendedHeaders],
    [1, 2, 3, 5, 6, 7, 8, 9, 10, 11],
    'NBD_OPT_*',
  );
  t.strictSame([OptionReply.Ack, OptionReply.Server, OptionReply.Info, OptionReply.MetaContext], [1, 2, 3, 4], 'NBD_REP_*');
  t.strictSame(
    [OptionReply.ErrUnsup, OptionReply.ErrPolicy, OptionReply.ErrInvalid, OptionReply.ErrPlatform, OptionReply.ErrTlsReqd,
      OptionReply.ErrUnknown, OptionReply.ErrShutdown, OptionReply.ErrBlockSizeReqd],
    [1, 2, 3, 4, 5, 6, 7, 8].map((n) => 2 ** 31 + n),
    'NBD_REP_ERR_*',
  );
  t.strictSame(
    [Command.Read, Command.Write, Command.Disc, Command.Flush, Command.Trim, Command.Cache, Command.WriteZeroes,
      Command.BlockStatus, Command.Resize],
    [0, 1, 2, 3, 4, 5, 6, 7, 8],
    'NBD_CMD_*',
  );
  t.strictSame(
    [CommandFlag.Fua, CommandFlag.NoHole, CommandFlag.Df, CommandFlag.ReqOne, CommandFlag.FastZero, CommandFlag.PayloadLen],
    [1, 2, 4, 8, 16, 32],
    'NBD_CMD_FLAG_*',
  );
  t.strictSame(
    [TransmissionFlag.HasFlags, TransmissionFlag.ReadOnly, TransmissionFlag.SendFlush, TransmissionFlag.SendFua,
      TransmissionFlag.Rotational, TransmissionFlag.SendTrim, TransmissionFlag.SendWriteZeroes, TransmissionFlag.SendDf,
      TransmissionFlag.CanMultiConn, TransmissionFlag.SendResize, TransmissionFlag.SendCache,
      TransmissionFlag.SendFastZero, TransmissionFlag.BlockStatusPayload],
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12].map((b) => 2 ** b),
    'NBD_FLAG_* (transmission)',
  );
  t.strictSame([HandshakeFlag.FixedNewstyle, HandshakeFlag.NoZeroes, ClientFlag.FixedNewstyle, ClientFlag.NoZeroes], [1, 2, 1, 2]);
  t.strictSame(
    [ReplyType.None, ReplyType.OffsetData, ReplyType.OffsetHole, ReplyType.BlockStatus, ReplyType.Error, ReplyType.ErrorOffset],
    [B.CHUNK_NONE, B.CHUNK_OFFSET_DATA, B.CHUNK_OFFSET_HOLE, B.CHUNK_BLOCK_STATUS, B.CHUNK_ERROR, B.CHUNK_ERROR_OFFSET],
    'NBD_REPLY_TYPE_*',
  );
  t.equal(ReplyFlag.Done, 1);
  t.strictSame([InfoType.Export, InfoType.Name, InfoType.Description, InfoType.BlockSize], [0, 1, 2, 3], 'NBD_INFO_*');
  t.strictSame(
    [NbdError.EPERM, NbdError.EIO, NbdError.ENOMEM, NbdError.EINVAL, NbdError.ENOSPC, NbdError.EOVERFLOW, NbdError.ENOTSUP,
      NbdError.ESHUTDOWN],
    [1, 5, 12, 22, 28, 75, 95, 108],
    'error values',
  );
  t.strictSame([AllocationFlag.Hole, AllocationFlag.Zero], [1, 2], 'NBD_STATE_*');
});

// --------------------------------------------------------------- round trips

t.test('clientFlags', async (t) => {
  for (const flags of [0, ClientFlag.FixedNewstyle, ClientFlag.FixedNewstyle | ClientFlag.NoZeroes, 0x80000001]) {
    const bytes = B.clientFlags(flags);
    t.ok(build.clientFlags(flags).equals(bytes), `serializer clientFlags(${flags})`);
    const { msgs, parser } = parseClient(bytes);
    t.strictSame(msgs, [{ type: 'clientFlags', flags }], `parse clientFlags(${flags})`);
    t.equal(parser.phase, 'options', 'moves to option haggling by itself');
  }
  t.ok(build.clientFlags().equals(B.clientFlags(3)), 'default is FIXED_NEWSTYLE|NO_ZEROES');
  // Only 3 bytes: nothing yet.
  const { msgs, parser } = parseClient(B.clientFlags(1).subarray(0, 3));
  t.strictSame(msgs, []);
  t.equal(parser.phase, 'clientFlags');
  t.equal(parser.bufferedBytes, 3);
});

t.test('options', async (t) => {
  const cases: [number, Buffer][] = [
    [Option.ExportName, Buffer.from('my-export', 'utf8')],
    [Option.ExportName, Buffer.alloc(0)],
    [Option.Abort, Buffer.alloc(0)],
    [Option.List, Buffer.alloc(0)],
    [Option.StartTls, Buffer.alloc(0)],
    [Option.Info, B.infoRequestPayload('disk', [InfoType.Export, InfoType.BlockSize])],
    [Option.Go, B.infoRequestPayload('', [])],
    [Option.StructuredReply, Buffer.alloc(0)],
    [Option.ListMetaContext, B.metaContextRequestPayload('disk', [])],
    [Option.SetMetaContext, B.metaContextRequestPayload('disk', [BASE_ALLOCATION, 'qemu:dirty-bitmap:b0'])],
    [Option.ExtendedHeaders, Buffer.alloc(0)],
    [0xdeadbeef, pattern(300, 7)],
  ];
  const all: Buffer[] = [];
  const expected: ClientMessage[] = [];
  for (const [opt, data] of cases) {
    const bytes = B.option(opt, data);
    t.ok(build.option(opt, data).equals(bytes), `serializer option ${opt} (${data.length} bytes)`);
    const { msgs } = parseClient(bytes, 'options');
    t.strictSame(msgs.map(norm), [norm({ type: 'option', option: opt, data })], `parse option ${opt}`);
    all.push(bytes);
    expected.push({ type: 'option', option: opt, data });
  }
  t.ok(build.option(Option.List).equals(B.option(3)), 'option() defaults to empty data');

  // All back to back in one chunk.
  const { msgs } = parseClient(Buffer.concat(all), 'options');
  t.strictSame(msgs.map(norm), expected.map(norm), 'back-to-back options in one chunk');

  // Option payload builders.
  t.ok(
    build.infoRequestData('disk', [InfoType.Name, InfoType.Description]).equals(B.infoRequestPayload('disk', [1, 2])),
    'infoRequestData',
  );
  t.ok(build.infoRequestData('', []).equals(B.infoRequestPayload('', [])), 'infoRequestData empty');
  t.ok(
    build.metaContextRequestData('dïsk', [BASE_ALLOCATION, 'x-a:b']).equals(
      B.metaContextRequestPayload('dïsk', ['base:allocation', 'x-a:b']),
    ),
    'metaContextRequestData (utf-8 name)',
  );
  t.ok(build.metaContextRequestData('d', []).equals(B.metaContextRequestPayload('d', [])), 'metaContextRequestData none');
});

t.test('requests, every command', async (t) => {
  const writeData = pattern(1000, 3);
  const cases = [
    request(CommandFlag.Df, Command.Read, 1n, 1_099_511_628_288, 65536),
    request(CommandFlag.Fua, Command.Write, BIG_COOKIE, 4096, writeData.length, writeData),
    request(0, Command.Disc, 0n, 0, 0),
    request(0, Command.Flush, 3n, 0, 0),
    request(CommandFlag.Fua, Command.Trim, 4n, MAX_SAFE, 0xffffffff),
    request(0, Command.Cache, 5n, 512, 1 << 20),
    request(CommandFlag.NoHole | CommandFlag.FastZero, Command.WriteZeroes, 6n, 8192, 1 << 16),
    request(CommandFlag.ReqOne, Command.BlockStatus, 7n, 0, 0x7fffffff),
    request(0xffff, 99, 0xffffffffffffffffn, 2 ** 52, 12345),
  ];
  for (const r of cases) {
    const bytes = B.request(r.flags, r.command, r.cookie, r.offset, r.length, r.payload ?? undefined);
    const ser = build.requestHeader(r.flags, r.command, r.cookie, r.offset, r.length);
    t.ok(
      (r.payload ? Buffer.concat([ser, r.payload]) : ser).equals(bytes),
      `serializer request command ${r.command}`,
    );
    const { msgs } = parseClient(bytes, 'transmission');
    t.strictSame(msgs.map(norm), [norm(r)], `parse request command ${r.command}`);
  }
  // A READ with a huge length carries no payload: the next request follows
  // straight after the 28-byte header.
  const two = Buffer.concat([B.request(0, 0, 1n, 0, 0xffffffff), B.request(0, 3, 2n, 0, 0)]);
  const { msgs, parser } = parseClient(two, 'transmission');
  t.strictSame(msgs.map(norm), [norm(request(0, 0, 1n, 0, 0xffffffff)), norm(request(0, 3, 2n, 0, 0))]);
  t.equal(parser.bufferedBytes, 0);

  // A WRITE whose payload arrived whole is a view of the input.
  const w = B.request(0, Command.Write, 9n, 0, 100, pattern(100));
  const got = parseClient(w, 'transmission').msgs[0];
  t.equal(got.type, 'request');
  if (got.type === 'request') {
    t.ok(got.payload && got.payload.buffer === w.buffer, 'payload shares the input ArrayBuffer');
    t.equal(got.payload?.byteOffset, w.byteOffset + 28);
  }
});

t.test('greeting', async (t) => {
  for (const flags of [0, HandshakeFlag.FixedNewstyle, HandshakeFlag.FixedNewstyle | HandshakeFlag.NoZeroes, 0xffff]) {
    const bytes = B.greeting(flags);
    t.ok(build.greeting(flags).equals(bytes), `serializer greeting(${flags})`);
    const { msgs, parser } = parseServer(bytes);
    t.strictSame(msgs, [{ type: 'greeting', flags }], `parse greeting(${flags})`);
    t.equal(parser.phase, 'options');
  }
  const { msgs } = parseServer(B.greeting(3).subarray(0, 17));
  t.strictSame(msgs, [], '17 bytes are not a greeting yet');
});

t.test('option replies', async (t) => {
  const cases: [string, number, number, Buffer, Buffer][] = [
    ['ACK', Option.StructuredReply, OptionReply.Ack, build.optionReply(Option.StructuredReply, OptionReply.Ack), Buffer.alloc(0)],
    ['SERVER', Option.List, OptionReply.Server, build.optionReply(Option.List, OptionReply.Server, build.serverListData('disk', 'A disk')), B.serverListPayload('disk', 'A disk')],
    ['SERVER no description', Option.List, OptionReply.Server, build.optionReply(Option.List, OptionReply.Server, build.serverListData('')), B.serverListPayload('', '')],
    ['INFO export', Option.Go, OptionReply.Info, build.optionReply(Option.Go, OptionReply.Info, build.infoExportData(2 ** 40 + 512, TransmissionFlag.HasFlags | TransmissionFlag.SendFlush | TransmissionFlag.SendFua)), B.infoExportPayload(2n ** 40n + 512n, 1 | 4 | 8)],
    ['INFO export max size', Option.Info, OptionReply.Info, build.optionReply(Option.Info, OptionReply.Info, build.infoExportData(MAX_SAFE, 0xffff)), B.infoExportPayload(MAX_SAFE, 0xffff)],
    ['INFO name', Option.Go, OptionReply.Info, build.optionReply(Option.Go, OptionReply.Info, build.infoNameData('dïsk')), B.infoNamePayload('dïsk')],
    ['INFO description', Option.Go, OptionReply.Info, build.optionReply(Option.Go, OptionReply.Info, build.infoDescriptionData('the disk')), B.infoDescriptionPayload('the disk')],
    ['INFO block size', Option.Go, OptionReply.Info, build.optionReply(Option.Go, OptionReply.Info, build.infoBlockSizeData({ minimum: 1, preferred: 4096, maximum: MAX_PAYLOAD })), B.infoBlockSizePayload(1, 4096, 32 * 1024 * 1024)],
    ['META_CONTEXT', Option.SetMetaContext, OptionReply.MetaContext, build.optionReply(Option.SetMetaContext, OptionReply.MetaContext, build.metaContextData(0xfffffffe, BASE_ALLOCATION)), B.metaContextReplyPayload(0xfffffffe, 'base:allocation')],
    ['ERR_UNSUP with message', Option.StartTls, OptionReply.ErrUnsup, build.optionError(Option.StartTls, OptionReply.ErrUnsup, 'no TLS here'), Buffer.from('no TLS here')],
    ['ERR_POLICY empty', Option.List, OptionReply.ErrPolicy, build.optionError(Option.List, OptionReply.ErrPolicy), Buffer.alloc(0)],
    ['ERR_INVALID', Option.Go, OptionReply.ErrInvalid, build.optionError(Option.Go, OptionReply.ErrInvalid, 'bad'), Buffer.from('bad')],
    ['ERR_UNKNOWN', Option.Go, OptionReply.ErrUnknown, build.optionError(Option.Go, OptionReply.ErrUnknown, 'no such export'), Buffer.from('no such export')],
    ['ERR_SHUTDOWN', Option.Go, OptionReply.ErrShutdown, build.optionError(Option.Go, OptionReply.ErrShutdown, 'bye'), Buffer.from('bye')],
    ['ERR_TOO_BIG', Option.Go, OptionReply.ErrTooBig, build.optionError(Option.Go, OptionReply.ErrTooBig, 'x'), Buffer.from('x')],
    ['ERR_EXT_HEADER_REQD', Option.Go, OptionReply.ErrExtHeaderReqd, build.optionError(Option.Go, OptionReply.ErrExtHeaderReqd), Buffer.alloc(0)],
  ];
  // The error reply types are 2^31 + n on the wire.
  t.equal(OptionReply.ErrUnsup, 2 ** 31 + 1);
  t.equal(OptionReply.ErrExtHeaderReqd, 2 ** 31 + 10);
  const all: Buffer[] = [];
  const expected: ServerMessage[] = [];
  for (const [name, opt, replyType, ser, data] of cases) {
    const bytes = B.optionReply(opt, replyType, data);
    t.ok(ser.equals(bytes), `serializer ${name}`);
    const { msgs } = parseServer(bytes, 'options');
    const exp = { type: 'optionReply' as const, option: opt, replyType, data };
    t.strictSame(msgs.map(norm), [norm(exp)], `parse ${name}`);
    all.push(bytes);
    expected.push(exp);
  }
  const { msgs } = parseServer(Buffer.concat([B.greeting(1), ...all]));
  t.strictSame(msgs.map(norm), [{ type: 'greeting', flags: 1 }, ...expected.map(norm)], 'greeting then all replies');
});

t.test('export-name reply, with and without NO_ZEROES', async (t) => {
  const size = 2 ** 40 + 4096;
  const flags = TransmissionFlag.HasFlags | TransmissionFlag.SendFlush | TransmissionFlag.SendTrim;
  for (const noZeroes of [false, true]) {
    const bytes = B.exportNameReply(size, flags, noZeroes);
    t.equal(bytes.length, noZeroes ? 10 : 134);
    t.ok(build.exportNameReply(size, flags, noZeroes).equals(bytes), `serializer noZeroes=${noZeroes}`);

    // Followed by a simple reply: the parser must consume exactly the reply.
    const stream = Buffer.concat([bytes, B.simpleReply(42n, NbdError.EIO)]);
    const { msgs, parser } = parseServer(stream, 'exportNameReply', {}, noZeroes);
    t.strictSame(
      msgs,
      [
        { type: 'exportNameReply', size, flags },
        { type: 'simpleReply', cookie: 42n, error: 5, data: null },
      ],
      `parse noZeroes=${noZeroes}`,
    );
    t.equal(parser.phase, 'transmission');

    // One byte short: nothing yet.
    const short = parseServer(bytes.subarray(0, bytes.length - 1), 'exportNameReply', {}, noZeroes);
    t.strictSame(short.msgs, [], `one byte short, noZeroes=${noZeroes}`);
    t.equal(short.parser.phase, 'exportNameReply');
  }
  t.ok(
    build.exportNameReply(MAX_SAFE, 0xffff, true).equals(B.exportNameReply(MAX_SAFE, 0xffff, true)),
    'size 2^53-1',
  );
  const { msgs } = parseServer(B.exportNameReply(MAX_SAFE, 0, true), 'exportNameReply', {}, true);
  t.strictSame(msgs, [{ type: 'exportNameReply', size: MAX_SAFE, flags: 0 }]);
});

t.test('simple replies', async (t) => {
  const readData = pattern(4096, 11);
  const lengths = new Map<bigint, number>([
    [BIG_COOKIE, readData.length],
    [2n, 1],
  ]);
  const readLengthOf = (c: bigint) => lengths.get(c) ?? 0;

  const cases: [bigint, number, Buffer | null][] = [
    [7n, 0, null], // not a READ: no data
    [8n, NbdError.EPERM, null],
    [9n, NbdError.ENOSPC, null],
    [BIG_COOKIE, 0, readData], // READ data follows
    [2n, 0, Buffer.from([0x5a])],
    [BIG_COOKIE, NbdError.EIO, null], // failed READ: no data follows
    [0xffffffffffffffffn, 0xffffffff, null],
  ];
  const all: Buffer[] = [];
  for (const [cookie, error, data] of cases) {
    const bytes = B.simpleReply(cookie, error, data ?? undefined);
    const ser = build.simpleReplyHeader(cookie, error);
    t.ok((data ? Buffer.concat([ser, data]) : ser).equals(bytes), `serializer simple reply ${cookie}/${error}`);
    const { msgs } = parseServer(bytes, 'transmission', { readLengthOf });
    t.strictSame(msgs.map(norm), [norm({ type: 'simpleReply', cookie, error, data })], `parse ${cookie}/${error}`);
    all.push(bytes);
  }
  const { msgs, parser } = parseServer(Buffer.concat(all), 'transmission', { readLengthOf });
  t.strictSame(
    msgs.map(norm),
    cases.map(([cookie, error, data]) => norm({ type: 'simpleReply', cookie, error, data })),
    'all simple replies back to back',
  );
  t.equal(parser.bufferedBytes, 0);

  // READ data in a single chunk is a view.
  const one = B.simpleReply(BIG_COOKIE, 0, readData);
  const m = parseServer(one, 'transmission', { readLengthOf }).msgs[0];
  t.ok(m.type === 'simpleReply' && m.data && m.data.buffer === one.buffer, 'READ data is a view');

  // Without readLengthOf, a successful reply never carries data.
  const noCb = parseServer(Buffer.concat([B.simpleReply(BIG_COOKIE, 0), B.simpleReply(1n, 0)]), 'transmission');
  t.strictSame(noCb.msgs, [
    { type: 'simpleReply', cookie: BIG_COOKIE, error: 0, data: null },
    { type: 'simpleReply', cookie: 1n, error: 0, data: null },
  ]);
});

t.test('structured reply chunks', async (t) => {
  const data = pattern(777, 5);
  const extents = [
    { length: 65536, flags: 0 },
    { length: 4096, flags: AllocationFlag.Hole | AllocationFlag.Zero },
    { length: 0xffffffff, flags: 0xffffffff },
  ];
  const cases: [string, Buffer, Buffer, ReturnType<typeof chunk>][] = [
    [
      'OFFSET_DATA',
      Buffer.concat([build.offsetDataHeader(1n, 0, 2 ** 40, data.length), data]),
      B.offsetDataChunk(1n, 0, 2n ** 40n, data),
      chunk(1n, 0, ReplyType.OffsetData, B.offsetDataPayload(2 ** 40, data)),
    ],
    [
      'OFFSET_DATA done, 1 byte',
      Buffer.concat([build.offsetDataHeader(BIG_COOKIE, ReplyFlag.Done, MAX_SAFE - 1, 1), Buffer.from([9])]),
      B.offsetDataChunk(BIG_COOKIE, 1, MAX_SAFE - 1, Buffer.from([9])),
      chunk(BIG_COOKIE, 1, 1, B.offsetDataPayload(MAX_SAFE - 1, Buffer.from([9]))),
    ],
    [
      'OFFSET_HOLE',
      build.offsetHoleChunk(2n, ReplyFlag.Done, 512, 1 << 20),
      B.offsetHoleChunk(2n, 1, 512, 1 << 20),
      chunk(2n, 1, ReplyType.OffsetHole, B.offsetHolePayload(512, 1 << 20)),
    ],
    [
      'BLOCK_STATUS',
      build.blockStatusChunk(3n, ReplyFlag.Done, 1, extents),
      B.blockStatusChunk(3n, 1, 1, extents),
      chunk(3n, 1, ReplyType.BlockStatus, B.blockStatusPayload(1, extents)),
    ],
    [
      'BLOCK_STATUS one extent',
      build.blockStatusChunk(3n, 0, 0xfffffffe, [{ length: 512, flags: 2 }]),
      B.blockStatusChunk(3n, 0, 0xfffffffe, [{ length: 512, flags: 2 }]),
      chunk(3n, 0, 5, B.blockStatusPayload(0xfffffffe, [{ length: 512, flags: 2 }])),
    ],
    [
      'ERROR',
      build.errorChunk(4n, ReplyFlag.Done, NbdError.EIO, 'disk on fire'),
      B.errorChunk(4n, 1, 5, 'disk on fire'),
      chunk(4n, 1, ReplyType.Error, B.errorPayload(5, 'disk on fire')),
    ],
    [
      'ERROR empty message',
      build.errorChunk(4n, 0, NbdError.EINVAL),
      B.errorChunk(4n, 0, 22, ''),
      chunk(4n, 0, 32769, B.errorPayload(22, '')),
    ],
    [
      'ERROR_OFFSET',
      build.errorChunk(5n, 0, NbdError.EIO, 'bad sector ü', 123456789),
      B.errorOffsetChunk(5n, 0, 5, 'bad sector ü', 123456789),
      chunk(5n, 0, ReplyType.ErrorOffset, B.errorOffsetPayload(5, 'bad sector ü', 123456789)),
    ],
    [
      'ERROR_OFFSET empty message',
      build.errorChunk(5n, 0, NbdError.ENOSPC, '', 0),
      B.errorOffsetChunk(5n, 0, 28, '', 0),
      chunk(5n, 0, 32770, B.errorOffsetPayload(28, '', 0)),
    ],
    ['NONE', build.noneChunk(6n), B.noneChunk(6n), chunk(6n, 1, ReplyType.None, Buffer.alloc(0))],
    // An unknown chunk type is still framed by its length.
    ['unknown type', B.structuredChunk(7n, 0, 0x7777, pattern(33)), B.structuredChunk(7n, 0, 0x7777, pattern(33)), chunk(7n, 0, 0x7777, pattern(33))],
  ];
  for (const [name, ser, bytes, exp] of cases) {
    t.ok(ser.equals(bytes), `serializer ${name}`);
    const { msgs } = parseServer(bytes, 'transmission');
    t.strictSame(msgs.map(norm), [norm(exp)], `parse ${name}`);
  }
  const { msgs, parser } = parseServer(Buffer.concat(cases.map((c) => c[2])), 'transmission');
  t.strictSame(msgs.map(norm), cases.map((c) => norm(c[3])), 'all chunks back to back');
  t.equal(parser.bufferedBytes, 0);

  // Error messages longer than the spec's 4096-byte limit are truncated.
  const long = 'e'.repeat(5000);
  t.ok(
    build.errorChunk(1n, 1, 5, long).equals(B.errorChunk(1n, 1, 5, long.slice(0, MAX_STRING))),
    'serializer truncates error messages to 4096 bytes',
  );
  // ... and never in the middle of a UTF-8 sequence (the spec requires valid
  // UTF-8): 'a' + 2500 x 'ü' is 5001 bytes; byte 4096 is the second byte of a 'ü'.
  const wide = 'a' + '\u00fc'.repeat(2500);
  const cut = build.errorChunk(1n, 1, 5, wide, 77);
  const dec = decodeErrorChunk(ReplyType.ErrorOffset, cut.subarray(20));
  t.ok(dec.ok, 'truncated multi-byte message still decodes');
  if (dec.ok) {
    const msgBytes = cut.subarray(26, 26 + cut.readUInt16BE(24));
    t.ok(msgBytes.length <= MAX_STRING, `message is ${msgBytes.length} bytes`);
    t.doesNotThrow(() => new TextDecoder('utf-8', { fatal: true }).decode(msgBytes), 'message is valid UTF-8');
    t.equal(dec.value.message.length, 1 + 2047, 'cut after the last whole character');
    t.ok(dec.value.message === wide.slice(0, 1 + 2047), 'message is a prefix of the original');
    t.equal(dec.value.offset, 77);
  }
  t.ok(isErrorChunk(ReplyType.Error) && isErrorChunk(ReplyType.ErrorOffset) && isErrorChunk(0x8000 + 77));
  t.notOk(isErrorChunk(ReplyType.OffsetData) || isErrorChunk(ReplyType.None) || isErrorChunk(ReplyType.BlockStatus));
});

// ----------------------------------------------------------------- decoders

t.test('decodeInfoRequest', async (t) => {
  t.strictSame(decodeInfoRequest(B.infoRequestPayload('disk', [0, 3, 1, 2])), {
    ok: true,
    value: { exportName: 'disk', infoTypes: [0, 3, 1, 2] },
  });
  t.strictSame(decodeInfoRequest(B.infoRequestPayload('', [])), { ok: true, value: { exportName: '', infoTypes: [] } });
  t.strictSame(decodeInfoRequest(B.infoRequestPayload('dïsk', [])), {
    ok: true,
    value: { exportName: 'dïsk', infoTypes: [] },
  });
  const n4096 = 'n'.repeat(4096);
  t.strictSame(decodeInfoRequest(B.infoRequestPayload(n4096, [3])), {
    ok: true,
    value: { exportName: n4096, infoTypes: [3] },
  });

  const good = B.infoRequestPayload('disk', [0, 3]);
  t.match(decodeInfoRequest(Buffer.alloc(0)), { ok: false, error: /too short/ });
  t.match(decodeInfoRequest(good.subarray(0, 5)), { ok: false, error: /too short/ });
  t.match(decodeInfoRequest(B.infoRequestPayload('n'.repeat(4097), [])), { ok: false, error: /too long/ });
  // Name length claims more than is there.
  t.match(decodeInfoRequest(new B.BufferList().add32(100).addString('disk').add16(0).join()), {
    ok: false,
    error: /too short for its name/,
  });
  // Count does not match the number of types.
  t.match(decodeInfoRequest(good.subarray(0, good.length - 1)), { ok: false, error: /info count/ });
  t.match(decodeInfoRequest(Buffer.concat([good, Buffer.from([0, 1])])), { ok: false, error: /info count/ });
  t.match(decodeInfoRequest(new B.BufferList().add32(0).add16(0xffff).join()), { ok: false, error: /info count/ });
});

t.test('decodeMetaContextRequest', async (t) => {
  t.strictSame(decodeMetaContextRequest(B.metaContextRequestPayload('disk', [])), {
    ok: true,
    value: { exportName: 'disk', queries: [] },
  });
  t.strictSame(decodeMetaContextRequest(B.metaContextRequestPayload('disk', ['base:allocation'])), {
    ok: true,
    value: { exportName: 'disk', queries: ['base:allocation'] },
  });
  t.strictSame(decodeMetaContextRequest(B.metaContextRequestPayload('', ['base:', 'qemu:dirty-bitmap:x', ''])), {
    ok: true,
    value: { exportName: '', queries: ['base:', 'qemu:dirty-bitmap:x', ''] },
  });

  const good = B.metaContextRequestPayload('disk', ['base:allocation', 'x-y:z']);
  t.match(decodeMetaContextRequest(good.subarray(0, 7)), { ok: false, error: /too short/ });
  t.match(decodeMetaContextRequest(B.metaContextRequestPayload('n'.repeat(4097), [])), { ok: false, error: /too long/ });
  t.match(decodeMetaContextRequest(new B.BufferList().add32(50).addString('disk').add32(0).join()), {
    ok: false,
    error: /too short for its name/,
  });
  // Every truncation of the queries is detected.
  for (let cut = 12; cut < good.length; cut++) {
    const r = decodeMetaContextRequest(good.subarray(0, cut));
    if (r.ok) {
      t.fail(`truncated to ${cut} bytes decoded`);
      break;
    }
  }
  t.match(decodeMetaContextRequest(good.subarray(0, good.length - 1)), { ok: false, error: /truncated/ });
  // Count claims more queries than present (hostile count).
  t.match(decodeMetaContextRequest(new B.BufferList().add32(0).add32(0xffffffff).join()), {
    ok: false,
    error: /truncated/,
  });
  t.match(decodeMetaContextRequest(B.metaContextRequestPayload('d', ['q'.repeat(4097)])), {
    ok: false,
    error: /query too long/,
  });
  t.match(decodeMetaContextRequest(Buffer.concat([good, Buffer.from([0])])), { ok: false, error: /trailing/ });
});

t.test('decodeInfoReply', async (t) => {
  t.strictSame(decodeInfoReply(B.infoExportPayload(2n ** 40n, 0x1234)), {
    ok: true,
    value: { type: InfoType.Export, size: 2 ** 40, transmissionFlags: 0x1234 },
  });
  t.strictSame(decodeInfoReply(B.infoExportPayload(MAX_SAFE, 0)), {
    ok: true,
    value: { type: InfoType.Export, size: MAX_SAFE, transmissionFlags: 0 },
  });
  t.strictSame(decodeInfoReply(B.infoNamePayload('dïsk')), { ok: true, value: { type: InfoType.Name, name: 'dïsk' } });
  t.strictSame(decodeInfoReply(B.infoNamePayload('')), { ok: true, value: { type: InfoType.Name, name: '' } });
  t.strictSame(decodeInfoReply(B.infoDescriptionPayload('A disk')), {
    ok: true,
    value: { type: InfoType.Description, description: 'A disk' },
  });
  t.strictSame(decodeInfoReply(B.infoBlockSizePayload(512, 4096, 33554432)), {
    ok: true,
    value: { type: InfoType.BlockSize, blockSize: { minimum: 512, preferred: 4096, maximum: 33554432 } },
  });
  t.strictSame(decodeInfoReply(new B.BufferList().add16(99).add32(1).join()), {
    ok: true,
    value: { type: 'unknown', infoType: 99 },
  });
  // Type codes as the spec numbers them.
  t.equal(B.infoExportPayload(0, 0).readUInt16BE(0), InfoType.Export);
  t.equal(B.infoBlockSizePayload(1, 1, 1).readUInt16BE(0), InfoType.BlockSize);

  t.match(decodeInfoReply(Buffer.alloc(0)), { ok: false, error: /too short/ });
  t.match(decodeInfoReply(Buffer.from([0])), { ok: false, error: /too short/ });
  const exp = B.infoExportPayload(1, 1);
  t.match(decodeInfoReply(exp.subarray(0, 11)), { ok: false, error: /NBD_INFO_EXPORT/ });
  t.match(decodeInfoReply(Buffer.concat([exp, Buffer.from([0])])), { ok: false, error: /NBD_INFO_EXPORT/ });
  const bs = B.infoBlockSizePayload(1, 2, 3);
  t.match(decodeInfoReply(bs.subarray(0, 13)), { ok: false, error: /NBD_INFO_BLOCK_SIZE/ });
  t.match(decodeInfoReply(Buffer.concat([bs, Buffer.from([0])])), { ok: false, error: /NBD_INFO_BLOCK_SIZE/ });
});

t.test('decodeServerListReply and decodeMetaContextReply', async (t) => {
  t.strictSame(decodeServerListReply(B.serverListPayload('disk', 'A disk')), {
    ok: true,
    value: { name: 'disk', description: 'A disk' },
  });
  t.strictSame(decodeServerListReply(B.serverListPayload('dïsk', '')), {
    ok: true,
    value: { name: 'dïsk', description: '' },
  });
  t.strictSame(decodeServerListReply(B.serverListPayload('', '')), { ok: true, value: { name: '', description: '' } });
  t.match(decodeServerListReply(Buffer.from([0, 0, 0])), { ok: false, error: /too short/ });
  t.match(decodeServerListReply(new B.BufferList().add32(5).addString('disk').join()), {
    ok: false,
    error: /truncated/,
  });
  t.match(decodeServerListReply(new B.BufferList().add32(0xffffffff).join()), { ok: false, error: /truncated/ });

  t.strictSame(decodeMetaContextReply(B.metaContextReplyPayload(0xdeadbeef, 'base:allocation')), {
    ok: true,
    value: { contextId: 0xdeadbeef, name: 'base:allocation' },
  });
  t.strictSame(decodeMetaContextReply(B.metaContextReplyPayload(0, '')), { ok: true, value: { contextId: 0, name: '' } });
  t.match(decodeMetaContextReply(Buffer.from([0, 0, 1])), { ok: false, error: /too short/ });
});

t.test('decodeOffsetData, decodeOffsetHole, decodeBlockStatus', async (t) => {
  const data = pattern(100, 2);
  const p = B.offsetDataPayload(2n ** 52n + 8n, data);
  const r = decodeOffsetData(p);
  t.ok(r.ok);
  if (r.ok) {
    t.equal(r.value.offset, 2 ** 52 + 8);
    t.ok(r.value.data.equals(data));
    t.equal(r.value.data.buffer, p.buffer, 'data is a view of the payload');
    t.equal(r.value.data.byteOffset, p.byteOffset + 8);
  }
  const one = decodeOffsetData(B.offsetDataPayload(0, Buffer.from([1])));
  t.ok(one.ok && one.value.data.length === 1 && one.value.data[0] === 1 && one.value.offset === 0);
  // The spec requires length >= 9: at least one byte of data.
  t.match(decodeOffsetData(B.offsetDataPayload(0, Buffer.alloc(0))), { ok: false, error: /too short/ });
  t.match(decodeOffsetData(Buffer.alloc(3)), { ok: false, error: /too short/ });

  t.strictSame(decodeOffsetHole(B.offsetHolePayload(4096, 0xffffffff)), {
    ok: true,
    value: { offset: 4096, length: 0xffffffff },
  });
  t.strictSame(decodeOffsetHole(B.offsetHolePayload(MAX_SAFE, 1)), { ok: true, value: { offset: MAX_SAFE, length: 1 } });
  const hole = B.offsetHolePayload(1, 1);
  t.match(decodeOffsetHole(hole.subarray(0, 11)), { ok: false, error: /wrong length/ });
  t.match(decodeOffsetHole(Buffer.concat([hole, Buffer.alloc(1)])), { ok: false, error: /wrong length/ });

  const extents = [
    { length: 512, flags: 0 },
    { length: 1 << 20, flags: AllocationFlag.Hole },
    { length: 0xffffffff, flags: AllocationFlag.Hole | AllocationFlag.Zero },
  ];
  t.strictSame(decodeBlockStatus(B.blockStatusPayload(7, extents)), { ok: true, value: { contextId: 7, extents } });
  t.strictSame(decodeBlockStatus(B.blockStatusPayload(0xffffffff, extents.slice(0, 1))), {
    ok: true,
    value: { contextId: 0xffffffff, extents: extents.slice(0, 1) },
  });
  // 4 + a positive multiple of 8.
  t.match(decodeBlockStatus(B.blockStatusPayload(1, [])), { ok: false, error: /wrong length/ });
  const bs = B.blockStatusPayload(1, extents);
  t.match(decodeBlockStatus(bs.subarray(0, bs.length - 1)), { ok: false, error: /wrong length/ });
  t.match(decodeBlockStatus(bs.subarray(0, bs.length - 4)), { ok: false, error: /wrong length/ });
  t.match(decodeBlockStatus(Buffer.alloc(8)), { ok: false, error: /wrong length/ });
});

t.test('decodeErrorChunk', async (t) => {
  t.strictSame(decodeErrorChunk(ReplyType.Error, B.errorPayload(5, 'disk on fire')), {
    ok: true,
    value: { error: 5, message: 'disk on fire' },
  });
  t.strictSame(decodeErrorChunk(ReplyType.Error, B.errorPayload(22, '')), { ok: true, value: { error: 22, message: '' } });
  t.strictSame(decodeErrorChunk(ReplyType.ErrorOffset, B.errorOffsetPayload(5, 'bad sector ü', 2n ** 40n)), {
    ok: true,
    value: { error: 5, message: 'bad sector ü', offset: 2 ** 40 },
  });
  t.strictSame(decodeErrorChunk(ReplyType.ErrorOffset, B.errorOffsetPayload(28, '', 0)), {
    ok: true,
    value: { error: 28, message: '', offset: 0 },
  });

  t.match(decodeErrorChunk(ReplyType.Error, Buffer.alloc(5)), { ok: false, error: /too short/ });
  // Message length larger than the chunk.
  t.match(decodeErrorChunk(ReplyType.Error, new B.BufferList().add32(5).add16(10).addString('short').join()), {
    ok: false,
    error: /does not match/,
  });
  t.match(decodeErrorChunk(ReplyType.Error, new B.BufferList().add32(5).add16(0xffff).join()), {
    ok: false,
    error: /does not match/,
  });
  // ERROR_OFFSET with the offset missing or cut short.
  t.match(decodeErrorChunk(ReplyType.ErrorOffset, B.errorPayload(5, 'msg')), { ok: false, error: /does not match/ });
  const eo = B.errorOffsetPayload(5, 'msg', 1);
  t.match(decodeErrorChunk(ReplyType.ErrorOffset, eo.subarray(0, eo.length - 1)), {
    ok: false,
    error: /does not match/,
  });
  // The same bytes read as a plain ERROR have 8 unexplained trailing bytes.
  t.match(decodeErrorChunk(ReplyType.Error, eo), { ok: false, error: /does not match/ });
});

// --------------------------------------------------- split at every offset

/** The realistic client->server stream and what it parses to. */
function clientStream(): { bytes: Buffer; expected: ClientMessage[] } {
  const w1 = pattern(5000, 21);
  const w2 = Buffer.from([0xa5]);
  const metaReq = B.metaContextRequestPayload('disk', ['base:allocation']);
  const infoReq = B.infoRequestPayload('disk', [3, 0]);
  const parts: [Buffer, ClientMessage][] = [
    [B.clientFlags(3), { type: 'clientFlags', flags: 3 }],
    [B.option(8, Buffer.alloc(0)), { type: 'option', option: 8, data: Buffer.alloc(0) }],
    [B.option(10, metaReq), { type: 'option', option: 10, data: metaReq }],
    [B.option(6, infoReq), { type: 'option', option: 6, data: infoReq }],
    [B.option(7, infoReq), { type: 'option', option: 7, data: infoReq }], // GO: last option
    [B.request(8, 7, 1n, 0, 1 << 20), request(8, 7, 1n, 0, 1 << 20)],
    [B.request(0, 0, 2n, 4096, 65536), request(0, 0, 2n, 4096, 65536)],
    [B.request(1, 1, 3n, 8192, w1.length, w1), request(1, 1, 3n, 8192, w1.length, w1)],
    [B.request(0, 1, 4n, 2 ** 40, 1, w2), request(0, 1, 4n, 2 ** 40, 1, w2)],
    [B.request(0, 1, 5n, 0, 0, Buffer.alloc(0)), request(0, 1, 5n, 0, 0, Buffer.alloc(0))],
    [B.request(0, 4, 6n, 1 << 20, 1 << 20), request(0, 4, 6n, 1 << 20, 1 << 20)],
    [B.request(2, 6, 7n, 512, 4096), request(2, 6, 7n, 512, 4096)],
    [B.request(0, 3, 8n, 0, 0), request(0, 3, 8n, 0, 0)],
    [B.request(0, 5, 9n, 0, 4096), request(0, 5, 9n, 0, 4096)],
    [B.request(0, 2, 10n, 0, 0), request(0, 2, 10n, 0, 0)],
  ];
  return { bytes: Buffer.concat(parts.map((p) => p[0])), expected: parts.map((p) => p[1]) };
}

/** The realistic server->client stream and what it parses to. */
function serverStream(): { bytes: Buffer; expected: ServerMessage[]; readLengthOf: (c: bigint) => number } {
  const read = pattern(4096, 31);
  const sdata = pattern(3000, 32);
  const meta = B.metaContextReplyPayload(1, 'base:allocation');
  const infoExp = B.infoExportPayload(2n ** 34n, 0x0d);
  const infoBs = B.infoBlockSizePayload(1, 4096, 33554432);
  const ext = [
    { length: 65536, flags: 0 },
    { length: 4096, flags: 3 },
  ];
  const eoPayload = B.errorOffsetPayload(5, 'read failed', 8192);
  const ePayload = B.errorPayload(5, 'I/O error');
  const opt = (option: number, replyType: number, data: Buffer): ServerMessage => ({
    type: 'optionReply',
    option,
    replyType,
    data,
  });
  const parts: [Buffer, ServerMessage][] = [
    [B.greeting(3), { type: 'greeting', flags: 3 }],
    [B.optionReply(8, 1), opt(8, 1, Buffer.alloc(0))],
    [B.optionReply(10, 4, meta), opt(10, 4, meta)],
    [B.optionReply(10, 1), opt(10, 1, Buffer.alloc(0))],
    [B.optionReply(6, 0x80000001, Buffer.from('nope')), opt(6, 0x80000001, Buffer.from('nope'))],
    [B.optionReply(7, 3, infoExp), opt(7, 3, infoExp)],
    [B.optionReply(7, 3, infoBs), opt(7, 3, infoBs)],
    [B.optionReply(7, 1), opt(7, 1, Buffer.alloc(0))], // ACK to GO: transmission
    [B.simpleReply(1n, 0, read), { type: 'simpleReply', cookie: 1n, error: 0, data: read }],
    [B.simpleReply(5n, 0), { type: 'simpleReply', cookie: 5n, error: 0, data: null }],
    [B.offsetDataChunk(2n, 0, 1 << 20, sdata), chunk(2n, 0, 1, B.offsetDataPayload(1 << 20, sdata))],
    [B.offsetHoleChunk(2n, 0, (1 << 20) + 3000, 1096), chunk(2n, 0, 2, B.offsetHolePayload((1 << 20) + 3000, 1096))],
    [B.noneChunk(2n), chunk(2n, 1, 0, Buffer.alloc(0))],
    [B.blockStatusChunk(3n, 1, 1, ext), chunk(3n, 1, 5, B.blockStatusPayload(1, ext))],
    [B.structuredChunk(4n, 0, 32770, eoPayload), chunk(4n, 0, 32770, eoPayload)],
    [B.structuredChunk(4n, 1, 32769, ePayload), chunk(4n, 1, 32769, ePayload)],
    [B.simpleReply(1n, 5), { type: 'simpleReply', cookie: 1n, error: 5, data: null }],
    [B.simpleReply(6n, 0), { type: 'simpleReply', cookie: 6n, error: 0, data: null }],
  ];
  const lengths = new Map([[1n, read.length]]);
  return {
    bytes: Buffer.concat(parts.map((p) => p[0])),
    expected: parts.map((p) => p[1]),
    readLengthOf: (c) => lengths.get(c) ?? 0,
  };
}

/** Run the client stream through a fresh parser, fed as `pieces`. */
function runClient(pieces: Buffer[], opts: ConstructorParameters<typeof ClientStreamParser>[0] = {}): ClientMessage[] {
  const parser = new ClientStreamParser(opts);
  const msgs: ClientMessage[] = [];
  const emit = (m: ClientMessage) => {
    msgs.push(m);
    // The server switches to transmission once it has answered GO.
    if (m.type === 'option' && m.option === Option.Go) parser.phase = 'transmission';
  };
  for (const p of pieces) parser.push(p, emit);
  return msgs;
}

function runServer(pieces: Buffer[], readLengthOf: (c: bigint) => number): ServerMessage[] {
  const parser = new ServerStreamParser({ readLengthOf });
  const msgs: ServerMessage[] = [];
  const emit = (m: ServerMessage) => {
    msgs.push(m);
    if (m.type === 'optionReply' && m.option === Option.Go && m.replyType === OptionReply.Ack) {
      parser.phase = 'transmission';
    }
  };
  for (const p of pieces) parser.push(p, emit);
  return msgs;
}

function everySplit<M extends object>(
  t: tap.Test,
  name: string,
  bytes: Buffer,
  expected: M[],
  run: (pieces: Buffer[]) => M[],
): void {
  const whole = run([bytes]);
  t.strictSame(whole.map(norm), expected.map(norm), `${name}: unsplit parse is as expected`);

  const failures: string[] = [];
  for (let at = 0; at <= bytes.length; at++) {
    const d = diffMessages(whole, run([bytes.subarray(0, at), bytes.subarray(at)]));
    if (d) failures.push(`split at ${at}: ${d}`);
    if (failures.length > 10) break;
  }
  t.strictSame(failures, [], `${name}: every one of ${bytes.length + 1} two-piece splits parses the same`);

  const bytewise: Buffer[] = [];
  for (let i = 0; i < bytes.length; i++) bytewise.push(bytes.subarray(i, i + 1));
  t.equal(diffMessages(whole, run(bytewise)), undefined, `${name}: one byte at a time parses the same`);

  // Random multi-piece splits, fixed seed (and empty pieces thrown in).
  const r = rng(0xc0ffee);
  const randomFailures: string[] = [];
  for (let iter = 0; iter < 200; iter++) {
    const pieces: Buffer[] = [];
    let at = 0;
    while (at < bytes.length) {
      const n = r() < 0.1 ? 0 : 1 + Math.floor(r() * (r() < 0.5 ? 40 : 3000));
      pieces.push(bytes.subarray(at, Math.min(bytes.length, at + n)));
      at += n;
    }
    const d = diffMessages(whole, run(pieces));
    if (d) randomFailures.push(`iteration ${iter}: ${d}`);
  }
  t.strictSame(randomFailures, [], `${name}: 200 random multi-piece splits parse the same`);
}

t.test('client stream split at every offset', async (t) => {
  const { bytes, expected } = clientStream();
  t.ok(bytes.length > 5000);
  everySplit(t, 'client stream', bytes, expected, (pieces) => runClient(pieces));
});

t.test('server stream split at every offset', async (t) => {
  const { bytes, expected, readLengthOf } = serverStream();
  t.ok(bytes.length > 7000);
  everySplit(t, 'server stream', bytes, expected, (pieces) => runServer(pieces, readLengthOf));
});

/**
 * Feed `pieces` the way a socket with parserReadHooks reads: each piece is
 * copied into one reused input buffer that is scribbled over after every
 * push; with `direct`, while a payload is being assembled the bytes go
 * straight into it (collectingInto / collected).
 */
function feedReused<M>(
  parser: { collectingInto: Buffer | null; collected(n: number, emit: (m: M) => void): void; push(b: Buffer, emit: (m: M) => void): void },
  pieces: Buffer[],
  emit: (m: M) => void,
  direct: boolean,
): void {
  const reused = Buffer.alloc(Math.max(1, ...pieces.map((p) => p.length)));
  for (const p of pieces) {
    let at = 0;
    while (at < p.length) {
      const into = direct ? parser.collectingInto : null;
      if (into !== null && into.length > 0) {
        const n = Math.min(into.length, p.length - at);
        p.copy(into, 0, at, at + n);
        parser.collected(n, emit);
        at += n;
        continue;
      }
      p.copy(reused, 0, at);
      parser.push(reused.subarray(0, p.length - at), emit);
      reused.fill(0xee);
      at = p.length;
    }
  }
}

/**
 * The server stream parsed the way NbdClient reads a plain socket: each piece
 * is copied into one reused input buffer that is scribbled over after every
 * push, and READ data goes through the readInto hook. Messages are
 * snapshotted when emitted; the read destinations are appended at the end.
 */
function runServerInto(pieces: Buffer[], readLengthOf: (c: bigint) => number, direct = false): object[] {
  const dests = new Map<bigint, Buffer>([
    [1n, Buffer.alloc(4096)],
    [2n, Buffer.alloc(4096)],
  ]);
  const parser = new ServerStreamParser({
    readLengthOf,
    readInto: (cookie, offset, length) => {
      const d = dests.get(cookie);
      if (!d) return null;
      const at = offset === null ? 0 : offset - (1 << 20);
      return d.subarray(at, at + length);
    },
  });
  const msgs: object[] = [];
  const emit = (m: ServerMessage) => {
    const snap: Record<string, unknown> = {};
    for (const [k, v] of Object.entries(m)) snap[k] = Buffer.isBuffer(v) ? Buffer.from(v) : v;
    msgs.push(snap);
    if (m.type === 'optionReply' && m.option === Option.Go && m.replyType === OptionReply.Ack) {
      parser.phase = 'transmission';
    }
  };
  feedReused(parser, pieces, emit, direct);
  for (const [cookie, data] of dests) msgs.push({ type: 'dest', cookie, data });
  return msgs;
}

t.test('server stream with readInto through a reused input buffer, split at every offset', async (t) => {
  const { bytes, expected, readLengthOf } = serverStream();
  const sdata = pattern(3000, 32);
  const into: object[] = expected.map((m) =>
    m.type === 'structuredChunk' && m.chunkType === 1
      ? { type: 'offsetDataDelivered', cookie: 2n, flags: 0, offset: 1 << 20, length: sdata.length }
      : m,
  );
  const dest2 = Buffer.alloc(4096);
  sdata.copy(dest2);
  into.push({ type: 'dest', cookie: 1n, data: pattern(4096, 31) }, { type: 'dest', cookie: 2n, data: dest2 });
  everySplit(t, 'server stream into', bytes, into, (pieces) => runServerInto(pieces, readLengthOf));
  everySplit(t, 'server stream read straight into its destinations', bytes, into, (pieces) =>
    runServerInto(pieces, readLengthOf, true),
  );
});

/**
 * The client stream parsed the way NbdConnection reads a plain socket
 * (feedReused, with inputReused). Messages are NOT snapshotted: a payload left as a view of the input would be garbage
 * by the time they are compared.
 */
function runClientReused(pieces: Buffer[], direct: boolean): ClientMessage[] {
  const parser = new ClientStreamParser({ inputReused: true });
  const msgs: ClientMessage[] = [];
  const emit = (m: ClientMessage) => {
    msgs.push(m);
    if (m.type === 'option' && m.option === Option.Go) parser.phase = 'transmission';
  };
  feedReused(parser, pieces, emit, direct);
  return msgs;
}

t.test('client stream through a reused input buffer, split at every offset', async (t) => {
  const { bytes, expected } = clientStream();
  everySplit(t, 'client stream, reused input', bytes, expected, (pieces) => runClientReused(pieces, false));
  everySplit(t, 'client stream, payloads read straight in', bytes, expected, (pieces) => runClientReused(pieces, true));
  // The check above can fail: without inputReused, whole payloads are views
  // of the scribbled-over input.
  const whole = [bytes];
  const parser = new ClientStreamParser();
  const msgs: ClientMessage[] = [];
  const reused = Buffer.from(bytes);
  parser.push(reused, (m) => {
    msgs.push(m);
    if (m.type === 'option' && m.option === Option.Go) parser.phase = 'transmission';
  });
  reused.fill(0xee);
  t.notSame(msgs, runClient(whole), 'without inputReused, payloads are views of the input');
});

t.test('oversized option stream split at every offset', async (t) => {
  const big = pattern(40, 9);
  const parts = Buffer.concat([B.clientFlags(1), B.option(6, big), B.option(3), B.option(1, Buffer.from('disk'))]);
  const expected: ClientMessage[] = [
    { type: 'clientFlags', flags: 1 },
    { type: 'optionTooLarge', option: 6, length: 40 },
    { type: 'option', option: 3, data: Buffer.alloc(0) },
    { type: 'option', option: 1, data: Buffer.from('disk') },
  ];
  everySplit(t, 'oversized option', parts, expected, (pieces) => runClient(pieces, { maxOptionLength: 16 }));
});

// ---------------------------------------------------------- large payloads

t.test('WRITE of exactly MAX_PAYLOAD', async (t) => {
  t.equal(MAX_PAYLOAD, 32 * 1024 * 1024);
  const payload = pattern(MAX_PAYLOAD, 77);
  const input = B.request(CommandFlag.Fua, Command.Write, 11n, 2 ** 33, MAX_PAYLOAD, payload);
  const next = B.request(0, Command.Flush, 12n, 0, 0);

  t.test('in one chunk: the payload is a view', async (t) => {
    const { msgs, parser } = parseClient(input, 'transmission');
    t.equal(msgs.length, 1);
    const m = msgs[0];
    t.equal(m.type, 'request');
    if (m.type !== 'request' || !m.payload) return t.fail('no payload');
    t.equal(m.length, MAX_PAYLOAD);
    t.equal(m.payloadSkipped, false);
    t.equal(m.payload.length, MAX_PAYLOAD);
    t.ok(m.payload.buffer === input.buffer, 'payload.buffer === chunk.buffer');
    t.equal(m.payload.byteOffset, input.byteOffset + 28);
    t.ok(m.payload.equals(payload));
    t.equal(parser.bufferedBytes, 0);
  });

  t.test('split over many chunks: correct bytes, accounted for', async (t) => {
    const parser = new ClientStreamParser();
    parser.phase = 'transmission';
    const msgs: ClientMessage[] = [];
    const stream = Buffer.concat([input, next]);
    const step = (1 << 20) + 7;
    let maxBuffered = 0;
    let accountingOk = true;
    for (let at = 0; at < stream.length; at += step) {
      const end = Math.min(stream.length, at + step);
      parser.push(stream.subarray(at, end), (m) => msgs.push(m));
      maxBuffered = Math.max(maxBuffered, parser.bufferedBytes);
      // While collecting, every payload byte received so far is held.
      if (msgs.length === 0 && parser.bufferedBytes !== end - 28) accountingOk = false;
    }
    t.ok(accountingOk, 'bufferedBytes counts the collected payload bytes');
    t.ok(maxBuffered <= MAX_PAYLOAD && maxBuffered > MAX_PAYLOAD - step, 'peak buffered is about the payload');
    t.equal(msgs.length, 2);
    const m = msgs[0];
    if (m.type !== 'request' || !m.payload) return t.fail('no payload');
    t.equal(m.payload.length, MAX_PAYLOAD);
    t.ok(m.payload.equals(payload), 'payload bytes are correct');
    t.equal(m.payloadSkipped, false);
    t.strictSame(msgs[1], request(0, Command.Flush, 12n, 0, 0), 'the next request follows');
    t.equal(parser.bufferedBytes, 0);
  });
});

t.test('oversized WRITE payloads are skipped without allocating', async (t) => {
  const next = B.request(0, Command.Flush, 99n, 0, 0);
  const filler = Buffer.alloc(1 << 20, 0xee);

  t.test('MAX_PAYLOAD + 1', async (t) => {
    const len = MAX_PAYLOAD + 1;
    const parser = new ClientStreamParser();
    parser.phase = 'transmission';
    const msgs: ClientMessage[] = [];
    parser.push(B.request(0, Command.Write, 1n, 0, len), (m) => msgs.push(m));
    let left = len;
    let maxBuffered = parser.bufferedBytes;
    while (left > 1 << 20) {
      parser.push(filler, (m) => msgs.push(m));
      left -= filler.length;
      maxBuffered = Math.max(maxBuffered, parser.bufferedBytes);
    }
    t.equal(msgs.length, 0, 'nothing emitted before the payload is fully skipped');
    t.ok(maxBuffered < 1 << 20, `bufferedBytes stays small (${maxBuffered})`);
    // Last payload bytes and the next request in one chunk.
    parser.push(Buffer.concat([filler.subarray(0, left), next]), (m) => msgs.push(m));
    t.strictSame(msgs, [request(0, Command.Write, 1n, 0, len, null, true), request(0, Command.Flush, 99n, 0, 0)]);
    t.notOk(parser.isDead);
    t.equal(parser.bufferedBytes, 0);
  });

  t.test('hostile 0xffffffff length', async (t) => {
    const len = 0xffffffff;
    const parser = new ClientStreamParser();
    parser.phase = 'transmission';
    const msgs: ClientMessage[] = [];
    const emit = (m: ClientMessage) => msgs.push(m);
    parser.push(Buffer.concat([B.request(1, Command.Write, 2n, 512, len), filler]), emit);
    let fed = filler.length;
    for (let i = 0; i < 4; i++) {
      parser.push(filler, emit);
      fed += filler.length;
      t.ok(parser.bufferedBytes < 1 << 20, `after ${fed} bytes bufferedBytes is ${parser.bufferedBytes}`);
    }
    t.equal(msgs.length, 0, 'nothing emitted after a few MiB');
    t.notOk(parser.isDead);
    // Feed the rest of the 4 GiB from one reused buffer: skipping copies nothing.
    const big = Buffer.alloc(64 << 20);
    let maxBuffered = 0;
    while (len - fed > big.length) {
      parser.push(big, emit);
      fed += big.length;
      maxBuffered = Math.max(maxBuffered, parser.bufferedBytes);
    }
    t.ok(maxBuffered < 1 << 20, 'bufferedBytes stays small over 4 GiB');
    t.equal(msgs.length, 0);
    parser.push(Buffer.concat([big.subarray(0, len - fed), next]), emit);
    t.strictSame(msgs, [request(1, Command.Write, 2n, 512, len, null, true), request(0, Command.Flush, 99n, 0, 0)]);
  });

  t.test('custom maxPayload, whole payload in one chunk', async (t) => {
    const data = pattern(1025);
    const { msgs, parser } = parseClient(
      Buffer.concat([B.request(0, 1, 1n, 0, 1025, data), B.request(0, 1, 2n, 0, 1024, data.subarray(0, 1024)), next]),
      'transmission',
      { maxPayload: 1024 },
    );
    t.strictSame(msgs.map(norm), [
      norm(request(0, 1, 1n, 0, 1025, null, true)),
      norm(request(0, 1, 2n, 0, 1024, data.subarray(0, 1024))),
      norm(request(0, 3, 99n, 0, 0)),
    ]);
    t.equal(parser.bufferedBytes, 0);
  });
});

t.test('options larger than maxOptionLength', async (t) => {
  t.equal(MAX_OPTION_LENGTH, 64 * 1024);

  t.test('small limit', async (t) => {
    const stream = Buffer.concat([
      B.option(Option.Info, pattern(17)),
      B.option(Option.Info, pattern(16)),
      B.option(Option.List),
    ]);
    const { msgs, parser } = parseClient(stream, 'options', { maxOptionLength: 16 });
    t.strictSame(msgs.map(norm), [
      { type: 'optionTooLarge', option: Option.Info, length: 17 },
      norm({ type: 'option', option: Option.Info, data: pattern(16) }),
      norm({ type: 'option', option: Option.List, data: Buffer.alloc(0) }),
    ]);
    t.equal(parser.bufferedBytes, 0);
  });

  t.test('header claiming 2^32-1 bytes', async (t) => {
    const len = 0xffffffff;
    const parser = new ClientStreamParser();
    parser.phase = 'options';
    const msgs: ClientMessage[] = [];
    const emit = (m: ClientMessage) => msgs.push(m);
    parser.push(B.optionHeader(Option.Go, len), emit);
    const big = Buffer.alloc(64 << 20);
    let fed = 0;
    let maxBuffered = 0;
    while (len - fed > big.length) {
      parser.push(big, emit);
      fed += big.length;
      maxBuffered = Math.max(maxBuffered, parser.bufferedBytes);
      if (fed === big.length) t.equal(msgs.length, 0, 'nothing emitted while skipping');
    }
    t.ok(maxBuffered < 1 << 20, `bufferedBytes stays small (${maxBuffered})`);
    t.equal(msgs.length, 0);
    parser.push(Buffer.concat([big.subarray(0, len - fed), B.option(Option.Abort)]), emit);
    t.strictSame(msgs.map(norm), [
      { type: 'optionTooLarge', option: Option.Go, length: len },
      norm({ type: 'option', option: Option.Abort, data: Buffer.alloc(0) }),
    ]);
    t.notOk(parser.isDead);
  });
});

// -------------------------------------------------------------- bad input

/** Push `bytes` and then a valid follow-up; expect exactly one protocolError. */
function expectOneProtocolError(
  t: tap.Test,
  name: string,
  parser: ClientStreamParser | ServerStreamParser,
  before: Buffer,
  bad: Buffer,
  valid: Buffer,
  expectBefore: number,
): void {
  const msgs: { type: string }[] = [];
  const emit = (m: { type: string }) => msgs.push(m);
  (parser.push as (b: Buffer, e: typeof emit) => void).call(parser, Buffer.concat([before, bad, valid]), emit);
  t.equal(msgs.length, expectBefore + 1, `${name}: messages before, then exactly one error`);
  t.match(msgs[expectBefore], { type: 'protocolError', message: String }, `${name}: protocolError`);
  t.ok(msgs.slice(0, expectBefore).every((m) => m.type !== 'protocolError'), `${name}: valid messages first`);
  t.ok(parser.isDead, `${name}: parser is dead`);
  t.equal(parser.bufferedBytes, 0, `${name}: nothing held`);
  (parser.push as (b: Buffer, e: typeof emit) => void).call(parser, valid, emit);
  (parser.push as (b: Buffer, e: typeof emit) => void).call(parser, Buffer.concat([before, valid]), emit);
  t.equal(msgs.length, expectBefore + 1, `${name}: further input ignored`);
}

t.test('bad input emits one protocolError and kills the parser', async (t) => {
  const badOpt = Buffer.from(B.option(Option.List));
  badOpt.write('IHAVEOPX', 0, 'latin1');
  {
    const p = new ClientStreamParser();
    expectOneProtocolError(t, 'bad IHAVEOPT', p, Buffer.concat([B.clientFlags(3), B.option(8)]), badOpt, B.option(3), 2);
  }
  {
    const p = new ClientStreamParser();
    p.phase = 'transmission';
    const badReq = B.request(0, 0, 1n, 0, 512);
    badReq[3] ^= 1;
    expectOneProtocolError(t, 'bad request magic', p, B.request(0, 3, 1n, 0, 0), badReq, B.request(0, 3, 2n, 0, 0), 1);
  }
  {
    // The extended request magic is not accepted (extended headers are not negotiated here).
    const p = new ClientStreamParser();
    p.phase = 'transmission';
    const ext = new B.BufferList().add32(0x21e41c71).add16(0).add16(0).add64(1n).add64(0).add64(0).join();
    expectOneProtocolError(t, 'extended request magic', p, Buffer.alloc(0), ext, B.request(0, 3, 2n, 0, 0), 0);
  }
  {
    const p = new ServerStreamParser();
    const bad = B.greeting(3);
    bad[0] = 0x4f;
    expectOneProtocolError(t, 'bad NBDMAGIC', p, Buffer.alloc(0), bad, B.greeting(3), 0);
  }
  {
    // Oldstyle server: NBDMAGIC followed by cliserv_magic instead of IHAVEOPT.
    const p = new ServerStreamParser();
    const old = new B.BufferList().add64(0x4e42444d41474943n).add64(0x00420281861253n).add16(0).join();
    expectOneProtocolError(t, 'oldstyle greeting', p, Buffer.alloc(0), old, B.greeting(3), 0);
  }
  {
    const p = new ServerStreamParser();
    const bad = B.optionReply(7, 1);
    bad[7] ^= 0xff;
    expectOneProtocolError(t, 'bad option reply magic', p, Buffer.concat([B.greeting(1), B.optionReply(8, 1)]), bad, B.optionReply(7, 1), 2);
  }
  {
    const p = new ServerStreamParser();
    p.phase = 'options';
    const tooBig = B.optionReply(3, 2, Buffer.alloc(MAX_OPTION_LENGTH + 1));
    expectOneProtocolError(t, 'option reply over limit', p, Buffer.alloc(0), tooBig.subarray(0, 20), B.optionReply(7, 1), 0);
  }
  {
    const p = new ServerStreamParser();
    p.phase = 'transmission';
    const bad = B.simpleReply(1n, 0);
    bad.writeUInt32BE(0xdeadbeef, 0);
    expectOneProtocolError(t, 'bad reply magic', p, B.noneChunk(1n), bad, B.simpleReply(2n, 0), 1);
  }
  {
    const p = new ServerStreamParser();
    p.phase = 'transmission';
    const hdr = new B.BufferList().add32(0x668e33ef).add16(0).add16(1).add64(1n).add32(MAX_PAYLOAD + 9).join();
    expectOneProtocolError(t, 'structured chunk over limit', p, B.simpleReply(1n, 0), hdr, B.simpleReply(2n, 0), 1);
  }
  {
    // The largest allowed data chunk (MAX_PAYLOAD of data plus its offset) is not an error.
    const p = new ServerStreamParser();
    p.phase = 'transmission';
    const msgs: ServerMessage[] = [];
    p.push(new B.BufferList().add32(0x668e33ef).add16(1).add16(1).add64(1n).add32(MAX_PAYLOAD + 8).join(), (m) =>
      msgs.push(m),
    );
    t.strictSame(msgs, []);
    t.notOk(p.isDead, 'MAX_PAYLOAD + 8 chunk accepted');
  }
  {
    // A bad magic split across pushes is detected once the header is complete.
    const p = new ClientStreamParser();
    p.phase = 'transmission';
    const msgs: ClientMessage[] = [];
    const bad = Buffer.alloc(28, 0x41);
    for (const b of bad) p.push(Buffer.from([b]), (m) => msgs.push(m));
    t.equal(msgs.length, 1);
    t.equal(msgs[0].type, 'protocolError');
    t.ok(p.isDead);
  }
});

t.test('random bytes never make push throw', async (t) => {
  const r = rng(12345);
  const prefixes: Record<string, Buffer[]> = {
    clientFlags: [],
    options: [B.optionHeader(0, 0).subarray(0, 8)],
    transmission: [new B.BufferList().add32(0x25609513).join()],
  };
  const serverPrefixes: Record<string, Buffer[]> = {
    greeting: [new B.BufferList().add64(0x4e42444d41474943n).join(), B.greeting(0).subarray(0, 16)],
    options: [new B.BufferList().add64(0x3e889045565a9n).join()],
    exportNameReply: [],
    transmission: [new B.BufferList().add32(0x67446698).join(), new B.BufferList().add32(0x668e33ef).join()],
  };
  let throws = 0;
  let firstThrow = '';
  let protocolErrors = 0;
  let other = 0;
  let afterDeath = 0;
  const randomBytes = () => {
    const b = Buffer.allocUnsafe(Math.floor(r() * 201));
    for (let i = 0; i < b.length; i++) b[i] = (r() * 256) | 0;
    return b;
  };
  const withPrefix = (list: Buffer[]) => {
    const body = randomBytes();
    return list.length && r() < 0.6 ? Buffer.concat([list[Math.floor(r() * list.length)], body]) : body;
  };
  const feed = (parser: ClientStreamParser | ServerStreamParser, bytes: Buffer) => {
    let died = false;
    const emit = (m: { type: string }) => {
      if (died) afterDeath++;
      if (m.type === 'protocolError') {
        protocolErrors++;
        died = true;
      } else other++;
    };
    // Random split into up to three pieces.
    const a = Math.floor(r() * (bytes.length + 1));
    const b = a + Math.floor(r() * (bytes.length - a + 1));
    try {
      for (const piece of [bytes.subarray(0, a), bytes.subarray(a, b), bytes.subarray(b)]) {
        (parser.push as (b: Buffer, e: typeof emit) => void).call(parser, piece, emit);
      }
    } catch (e) {
      throws++;
      if (!firstThrow) firstThrow = String((e as Error).stack);
    }
    if (died && !parser.isDead) afterDeath++;
  };
  for (const phase of ['clientFlags', 'options', 'transmission'] as const) {
    for (let i = 0; i < 2000; i++) {
      const p = new ClientStreamParser({ maxOptionLength: 1 + Math.floor(r() * 300) });
      p.phase = phase;
      feed(p, withPrefix(prefixes[phase]));
    }
  }
  for (const phase of ['greeting', 'options', 'exportNameReply', 'transmission'] as const) {
    for (let i = 0; i < 2000; i++) {
      const p = new ServerStreamParser({ readLengthOf: (c) => Number(c % 300n) });
      p.phase = phase;
      p.noZeroes = r() < 0.5;
      feed(p, withPrefix(serverPrefixes[phase]));
    }
  }
  t.equal(throws, 0, `push never throws ${firstThrow}`);
  t.equal(afterDeath, 0, 'nothing is emitted after a protocolError, and the parser reports dead');
  t.ok(protocolErrors > 1000, `random input was rejected (${protocolErrors} protocol errors)`);
  t.ok(other > 1000, `prefixed random input also got parsed (${other} messages)`);
});
