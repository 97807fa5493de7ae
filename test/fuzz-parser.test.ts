// Mutation fuzzing of the wire parsers (src/nbd-protocol/parser.ts), seeded
// with sessions recorded from real clients (test/fixtures/fuzz-seeds, made by
// scripts/fuzz/record-seeds): qemu-io, qemu-img, nbdinfo, nbdcopy and a
// kernel-style client.
//
// Every iteration is a deterministic function of (RUN_SEED, i): a failure
// prints i and the input, and replays alone. Per iteration the mutated bytes
// are fed in random pieces, and again whole; checked:
//   - push never throws;
//   - bufferedBytes stays within the payload limit (+ a header);
//   - nothing is emitted after a protocolError, and isDead agrees;
//   - messages are consistent with their lengths and the limits;
//   - the messages do not depend on where the input was split.
// Then hostile sizes: 4 GiB WRITE and option lengths are skipped (all
// 4 GiB of them) without allocating, and the stream carries on after them.
//
// FUZZ_PARSER_ITERATIONS (default 24000 for the server side, half that for
// the client side), FUZZ_PARSER_SECONDS (a cap per loop, default 8) and
// FUZZ_SEED change the run.

import t from 'tap';
import {
  ClientStreamParser,
  ServerStreamParser,
  build,
  type ClientMessage,
  type ServerMessage,
  type ClientParsePhase,
  type ServerParsePhase,
} from '../src/nbd-protocol';
import {
  CMD,
  MAX_OPTION_LENGTH,
  MAX_PAYLOAD,
  MiB,
  OPT,
  Rng,
  chunksOf,
  loadSeeds,
  mutate,
  runClientParser,
  runServerParser,
  sessionSeed,
  splitSizes,
  type ParserRun,
  type Seed,
} from './helpers/fuzz';

const RUN_SEED = Number(process.env.FUZZ_SEED ?? 0x5eed);
const ITERATIONS = Number(process.env.FUZZ_PARSER_ITERATIONS ?? 24_000);
/** Wall-clock cap per fuzz loop, so a slow machine still finishes in time. */
const LOOP_SECONDS = Number(process.env.FUZZ_PARSER_SECONDS ?? 8);

const seeds = loadSeeds();

t.test('the recorded seeds are real sessions and parse cleanly', async (t) => {
  const clients = new Set(seeds.map((s) => s.meta.client));
  for (const c of ['qemu-io-rw', 'qemu-img-info', 'qemu-img-map', 'nbdinfo-json', 'nbdinfo-map', 'nbdinfo-list', 'nbdcopy-read', 'nbdcopy-write', 'kernel-style']) {
    t.ok(clients.has(c), `seeds from ${c}`);
  }
  t.ok(seeds.some((s) => s.meta.exportName && !s.meta.noZeroes), 'a kernel-style seed: EXPORT_NAME without NO_ZEROES');
  t.ok(seeds.some((s) => s.requests.some((r) => r.command === CMD.WRITE)), 'some seed writes');
  t.ok(seeds.some((s) => s.requests.some((r) => r.command === CMD.BLOCK_STATUS)), 'some seed asks for block status');
  for (const s of seeds) {
    t.ok(s.c2s.length <= 16 * 1024 && s.s2c.length <= 16 * 1024, `${s.name}: seed is small (${s.c2s.length}/${s.s2c.length} bytes)`);
    // Every split point of the client stream, and of the server stream.
    for (let cut = 0; cut <= s.c2s.length; cut++) {
      const chunks = [s.c2s.subarray(0, cut), s.c2s.subarray(cut)];
      const r = runClientParser(chunks, { startPhase: 'clientFlags', maxPayload: MAX_PAYLOAD, maxOptionLength: MAX_OPTION_LENGTH });
      if (r.died || r.violations.length > 0) {
        t.fail(`${s.name}.c2s split at ${cut}`, { summary: r.summary.slice(-3), violations: r.violations });
        break;
      }
    }
    for (let cut = 0; cut <= s.s2c.length; cut++) {
      const chunks = [s.s2c.subarray(0, cut), s.s2c.subarray(cut)];
      const r = runServerParser(chunks, serverConfig(s, 'greeting'));
      if (r.died || r.violations.length > 0) {
        t.fail(`${s.name}.s2c split at ${cut}`, { summary: r.summary.slice(-3), violations: r.violations });
        break;
      }
    }
  }
  t.pass(`${seeds.length} seeds parse at every split point in both directions`);
});

function serverConfig(s: Seed, startPhase: ClientParsePhase, maxPayload = MAX_PAYLOAD, maxOptionLength = MAX_OPTION_LENGTH) {
  return {
    startPhase,
    maxPayload,
    maxOptionLength,
    noZeroes: !!s.meta.noZeroes,
    exportNameAfterFinals: s.exportNameAfterFinals,
    requests: s.requests,
  };
}

interface Failure {
  iteration: number;
  seed: string;
  mutations: string[];
  config: unknown;
  violations: string[];
  inputBase64: string;
}

interface Coverage {
  [kind: string]: number;
}

function count(cov: Coverage, run: ParserRun): void {
  for (const line of run.summary) {
    const kind = line.split(' ', 1)[0];
    cov[kind] = (cov[kind] ?? 0) + 1;
    if (kind === 'request' && line.includes(' true ')) cov.skippedWrite = (cov.skippedWrite ?? 0) + 1;
  }
}

function compare(split: ParserRun, whole: ParserRun): string[] {
  if (split.summary.length !== whole.summary.length) {
    return [`split run gave ${split.summary.length} messages, whole run ${whole.summary.length}`];
  }
  for (let i = 0; i < split.summary.length; i++) {
    if (split.summary[i] !== whole.summary[i]) return [`message ${i} differs: "${split.summary[i]}" vs "${whole.summary[i]}"`];
  }
  return [];
}

t.test('mutation fuzz: ClientStreamParser (server side), every phase', async (t) => {
  const failures: Failure[] = [];
  const cov: Coverage = {};
  const arrayBuffersBefore = process.memoryUsage().arrayBuffers;
  let maxArrayBuffers = arrayBuffersBefore;
  let maxBuffered = 0;
  const deadline = Date.now() + LOOP_SECONDS * 1000;
  let i = 0;
  for (; i < ITERATIONS && Date.now() < deadline; i++) {
    const rng = new Rng(sessionSeed(RUN_SEED, i));
    const seed = rng.pick(seeds);
    const other = rng.pick(seeds);
    // What to start from: a whole session, its handshake, its requests, or two sessions' requests.
    let base: Buffer;
    let startPhase: ServerParsePhase;
    const form = rng.int(4);
    if (form === 0 || seed.c2sRequests.length === 0) {
      base = seed.c2s;
      startPhase = 'clientFlags';
    } else if (form === 1) {
      base = seed.c2sHandshake.subarray(4);
      startPhase = 'options';
    } else if (form === 2) {
      base = seed.c2sRequests;
      startPhase = 'transmission';
    } else {
      base = Buffer.concat([seed.c2sRequests, other.c2sRequests]);
      startPhase = 'transmission';
    }
    if (rng.chance(0.1)) startPhase = rng.pick<ServerParsePhase>(['clientFlags', 'options', 'transmission']);
    const { data, applied } = mutate(base, rng, other.c2s);
    const config = {
      startPhase,
      maxPayload: rng.chance(0.8) ? MAX_PAYLOAD : rng.pick([0, 1, 100, 512, 4096]),
      maxOptionLength: rng.chance(0.8) ? MAX_OPTION_LENGTH : rng.pick([0, 4, 16, 64]),
    };
    const split = runClientParser(chunksOf(data, splitSizes(rng, data.length)), config);
    const whole = runClientParser([data], config);
    const violations = [...split.violations, ...whole.violations];
    if (violations.length === 0) violations.push(...compare(split, whole));
    if (violations.length > 0 && failures.length < 5) {
      failures.push({ iteration: i, seed: seed.name, mutations: applied, config, violations, inputBase64: data.toString('base64') });
    }
    count(cov, split);
    maxBuffered = Math.max(maxBuffered, split.maxBuffered, whole.maxBuffered);
    if (i % 256 === 0) maxArrayBuffers = Math.max(maxArrayBuffers, process.memoryUsage().arrayBuffers);
  }
  t.comment(`ClientStreamParser: ${i} iterations (seed ${RUN_SEED}); messages: ${JSON.stringify(cov)}; max bufferedBytes ${maxBuffered}`);
  t.same(failures, [], 'no invariant broken');
  t.ok(i >= Math.min(ITERATIONS, 10_000), `at least ${Math.min(ITERATIONS, 10_000)} iterations ran (${i})`);
  t.ok(maxBuffered < 33 * MiB + 64, `bufferedBytes stayed under 33 MiB (max ${maxBuffered})`);
  t.ok(maxArrayBuffers - arrayBuffersBefore < 256 * MiB, `arrayBuffers grew by ${((maxArrayBuffers - arrayBuffersBefore) / MiB).toFixed(1)} MiB at most`);
  // The fuzzer reached the interesting paths.
  for (const k of ['flags', 'option', 'optionTooLarge', 'request', 'skippedWrite', 'protocolError']) {
    t.ok((cov[k] ?? 0) > 0, `reached ${k} (${cov[k] ?? 0})`);
  }
});

t.test('mutation fuzz: ServerStreamParser (client side), every phase', async (t) => {
  const failures: Failure[] = [];
  const cov: Coverage = {};
  let maxBuffered = 0;
  const deadline = Date.now() + LOOP_SECONDS * 1000;
  const iterations = Math.ceil(ITERATIONS / 2);
  let i = 0;
  for (; i < iterations && Date.now() < deadline; i++) {
    const rng = new Rng(sessionSeed(RUN_SEED ^ 0x5e5e, i));
    const seed = rng.pick(seeds);
    const other = rng.pick(seeds);
    let base: Buffer;
    let startPhase: ClientParsePhase;
    if (seed.s2cReplies.length > 0 && rng.chance(0.4)) {
      base = seed.s2cReplies;
      startPhase = 'transmission';
    } else {
      base = seed.s2c;
      startPhase = 'greeting';
    }
    if (rng.chance(0.1)) startPhase = rng.pick<ClientParsePhase>(['greeting', 'options', 'exportNameReply', 'transmission']);
    const { data, applied } = mutate(base, rng, other.s2c);
    const config = serverConfig(
      seed,
      startPhase,
      rng.chance(0.8) ? MAX_PAYLOAD : rng.pick([0, 8, 512]),
      rng.chance(0.8) ? MAX_OPTION_LENGTH : rng.pick([0, 16, 64]),
    );
    const split = runServerParser(chunksOf(data, splitSizes(rng, data.length)), config);
    const whole = runServerParser([data], config);
    const violations = [...split.violations, ...whole.violations];
    if (violations.length === 0) violations.push(...compare(split, whole));
    if (violations.length > 0 && failures.length < 5) {
      failures.push({
        iteration: i,
        seed: seed.name,
        mutations: applied,
        config: { ...config, requests: config.requests.length },
        violations,
        inputBase64: data.toString('base64'),
      });
    }
    count(cov, split);
    maxBuffered = Math.max(maxBuffered, split.maxBuffered, whole.maxBuffered);
  }
  t.comment(`ServerStreamParser: ${i} iterations (seed ${RUN_SEED}); messages: ${JSON.stringify(cov)}; max bufferedBytes ${maxBuffered}`);
  t.same(failures, [], 'no invariant broken');
  t.ok(i >= Math.min(iterations, 5_000), `at least ${Math.min(iterations, 5_000)} iterations ran (${i})`);
  t.ok(maxBuffered < 33 * MiB + 64, `bufferedBytes stayed under 33 MiB (max ${maxBuffered})`);
  for (const k of ['greeting', 'optionReply', 'exportNameReply', 'simpleReply', 'chunk', 'protocolError']) {
    t.ok((cov[k] ?? 0) > 0, `reached ${k} (${cov[k] ?? 0})`);
  }
});

// ------------------------------------------------------------ hostile sizes

/**
 * Push `total` junk bytes in 1 MiB pieces (one reused buffer), tracking the
 * largest bufferedBytes and arrayBuffers seen.
 */
function pushJunk<M>(
  parser: { push(c: Buffer, emit: (m: M) => void): void; bufferedBytes: number },
  total: number,
  emit: (m: M) => void,
): { maxBuffered: number; maxArrayBuffers: number } {
  const piece = Buffer.alloc(MiB, 0x5a);
  let maxBuffered = 0;
  let maxArrayBuffers = 0;
  for (let left = total, k = 0; left > 0; k++) {
    const n = Math.min(left, piece.length);
    parser.push(piece.subarray(0, n), emit);
    left -= n;
    maxBuffered = Math.max(maxBuffered, parser.bufferedBytes);
    if (k % 64 === 0) maxArrayBuffers = Math.max(maxArrayBuffers, process.memoryUsage().arrayBuffers);
  }
  return { maxBuffered, maxArrayBuffers };
}

const FOUR_GIB_MINUS_1 = 0xffffffff;

t.test('hostile sizes are skipped without allocating', async (t) => {
  t.test('an option claiming 2^32-1 bytes: skipped to the last byte, the next option parses', async (t) => {
    const parser = new ClientStreamParser();
    parser.phase = 'options';
    const got: ClientMessage[] = [];
    const emit = (m: ClientMessage) => got.push(m);
    const before = process.memoryUsage().arrayBuffers;
    const header = Buffer.alloc(16);
    header.writeBigUInt64BE(0x49484156454f5054n, 0);
    header.writeUInt32BE(OPT.GO, 8);
    header.writeUInt32BE(FOUR_GIB_MINUS_1, 12);
    for (const b of header) parser.push(Buffer.from([b]), emit); // even byte by byte
    const j = pushJunk(parser, FOUR_GIB_MINUS_1, emit);
    t.equal(j.maxBuffered, 0, 'nothing buffered while skipping');
    t.ok(j.maxArrayBuffers - before < 16 * MiB, `arrayBuffers grew by ${((j.maxArrayBuffers - before) / MiB).toFixed(1)} MiB, not GiBs`);
    parser.push(build.option(OPT.LIST), emit);
    t.same(
      got.map((m) => m.type),
      ['optionTooLarge', 'option'],
      'optionTooLarge once all 4 GiB passed, then the next option',
    );
    t.match(got[0], { type: 'optionTooLarge', option: OPT.GO, length: FOUR_GIB_MINUS_1 });
    t.match(got[1], { type: 'option', option: OPT.LIST });
    t.notOk(parser.isDead);
  });

  t.test('a WRITE claiming 4 GiB - 1: payload skipped, reported once, the next request parses', async (t) => {
    const parser = new ClientStreamParser();
    parser.phase = 'transmission';
    const got: ClientMessage[] = [];
    const emit = (m: ClientMessage) => got.push(m);
    const before = process.memoryUsage().arrayBuffers;
    const header = build.requestHeader(0, CMD.WRITE, 7n, 0, FOUR_GIB_MINUS_1);
    parser.push(header.subarray(0, 27), emit);
    parser.push(header.subarray(27), emit);
    const j = pushJunk(parser, FOUR_GIB_MINUS_1, emit);
    t.equal(j.maxBuffered, 0, 'nothing buffered while skipping');
    t.ok(j.maxArrayBuffers - before < 16 * MiB, `arrayBuffers grew by ${((j.maxArrayBuffers - before) / MiB).toFixed(1)} MiB, not GiBs`);
    parser.push(build.requestHeader(0, CMD.READ, 8n, 4096, 512), emit);
    t.equal(got.length, 2);
    t.match(got[0], { type: 'request', command: CMD.WRITE, cookie: 7n, length: FOUR_GIB_MINUS_1, payload: null, payloadSkipped: true });
    t.match(got[1], { type: 'request', command: CMD.READ, cookie: 8n, offset: 4096, length: 512 });
  });

  t.test('WRITE lengths at the limit: 32 MiB + 1 is skipped, 32 MiB is kept', async (t) => {
    for (const [len, skipped] of [
      [MAX_PAYLOAD + 1, true],
      [MAX_PAYLOAD, false],
    ] as const) {
      const parser = new ClientStreamParser();
      parser.phase = 'transmission';
      const got: ClientMessage[] = [];
      const emit = (m: ClientMessage) => got.push(m);
      parser.push(build.requestHeader(0, CMD.WRITE, 1n, 0, len), emit);
      const j = pushJunk(parser, len, emit);
      t.ok(j.maxBuffered <= (skipped ? 0 : MAX_PAYLOAD), `${len}: buffered at most ${j.maxBuffered}`);
      t.equal(got.length, 1, `${len}: one request`);
      const m = got[0] as Extract<ClientMessage, { type: 'request' }>;
      t.equal(m.payloadSkipped, skipped, `${len}: skipped=${skipped}`);
      t.equal(m.payload?.length ?? null, skipped ? null : len, `${len}: payload`);
    }
  });

  t.test('BLOCK_STATUS and READ with hostile ranges carry no payload and allocate nothing', async (t) => {
    const parser = new ClientStreamParser();
    parser.phase = 'transmission';
    const got: ClientMessage[] = [];
    const before = process.memoryUsage().arrayBuffers;
    const reqs: Buffer[] = [];
    for (let k = 0; k < 1000; k++) {
      const h = build.requestHeader(0, k % 2 ? CMD.BLOCK_STATUS : CMD.READ, BigInt(k), 0, FOUR_GIB_MINUS_1);
      h.writeBigUInt64BE((1n << 63n) - 1n, 16);
      reqs.push(h);
    }
    parser.push(Buffer.concat(reqs), (m) => got.push(m));
    t.equal(got.length, 1000);
    t.ok(got.every((m) => m.type === 'request' && m.payload === null && !m.payloadSkipped), 'no payloads');
    t.equal(parser.bufferedBytes, 0);
    t.ok(process.memoryUsage().arrayBuffers - before < 4 * MiB, 'nothing allocated');
  });

  t.test('client side: oversized option replies and chunks are protocol errors at once', async (t) => {
    const cases: Array<{ name: string; phase: ClientParsePhase; bytes: Buffer; dies: boolean }> = [];
    const optReply = (len: number) => {
      const b = Buffer.alloc(20);
      b.writeBigUInt64BE(0x3e889045565a9n, 0);
      b.writeUInt32BE(OPT.GO, 8);
      b.writeUInt32BE(1, 12);
      b.writeUInt32BE(len >>> 0, 16);
      return b;
    };
    const chunk = (len: number) => {
      const b = Buffer.alloc(20);
      b.writeUInt32BE(0x668e33ef, 0);
      b.writeUInt16BE(1, 4);
      b.writeUInt16BE(1, 6);
      b.writeBigUInt64BE(1n, 8);
      b.writeUInt32BE(len >>> 0, 16);
      return b;
    };
    cases.push({ name: 'option reply of 2^32-1 bytes', phase: 'options', bytes: optReply(FOUR_GIB_MINUS_1), dies: true });
    cases.push({ name: 'option reply of 64 KiB + 1', phase: 'options', bytes: optReply(MAX_OPTION_LENGTH + 1), dies: true });
    cases.push({ name: 'option reply of 64 KiB', phase: 'options', bytes: optReply(MAX_OPTION_LENGTH), dies: false });
    cases.push({ name: 'chunk of 2^32-1 bytes', phase: 'transmission', bytes: chunk(FOUR_GIB_MINUS_1), dies: true });
    cases.push({ name: 'chunk of 32 MiB + 9', phase: 'transmission', bytes: chunk(MAX_PAYLOAD + 9), dies: true });
    cases.push({ name: 'chunk of 32 MiB + 8 (data chunk at the limit)', phase: 'transmission', bytes: chunk(MAX_PAYLOAD + 8), dies: false });
    for (const c of cases) {
      const parser = new ServerStreamParser();
      parser.phase = c.phase;
      const got: ServerMessage[] = [];
      const before = process.memoryUsage().arrayBuffers;
      parser.push(c.bytes, (m) => got.push(m));
      t.equal(parser.isDead, c.dies, `${c.name}: ${c.dies ? 'refused' : 'accepted'}`);
      if (c.dies) {
        t.same(got.map((m) => m.type), ['protocolError'], `${c.name}: one protocolError`);
        t.equal(parser.bufferedBytes, 0, `${c.name}: nothing buffered`);
        t.ok(process.memoryUsage().arrayBuffers - before < MiB, `${c.name}: nothing allocated`);
        parser.push(Buffer.alloc(100), (m) => got.push(m));
        t.equal(got.length, 1, `${c.name}: nothing after the error`);
      }
    }
  });
});
