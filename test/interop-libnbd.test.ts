// libnbd's tools (nbdinfo, nbdcopy) and fio's nbd engine (libnbd) against
// nbd-cbw: what the export advertises must be what the source can do, block
// status must be the source's, and data must survive whole-disk copies and
// verified random I/O.

import t, { type Test } from 'tap';
import * as fs from 'node:fs';
import {
  MiB,
  firstDifference,
  makeImage,
  randomBuffer,
  run,
  sha256File,
  startNbdCbw,
  startNbdkit,
  startQemuNbd,
  tmpPath,
  writeAt,
  type Peer,
} from './helpers/peers';

const CAPS = ['trim', 'zero', 'fast-zero', 'flush', 'fua', 'cache', 'multi-conn', 'df', 'write', 'structured-reply'];

/** `nbdinfo --can X` / `--is X`: 0 = yes, 2 = no (anything else is an error). */
async function nbdinfoFlag(kind: '--can' | '--is', what: string, uri: string): Promise<number | null> {
  const r = await run('nbdinfo', [kind, what, uri], { timeoutMs: 20_000 });
  if (r.code !== 0 && r.code !== 2) throw new Error(`nbdinfo ${kind} ${what} failed:\n${r.describe()}`);
  return r.code;
}

/** Every `--can` answer and `--is read-only` (the nbdinfo runs go in parallel). */
async function capabilities(uri: string): Promise<Record<string, number | null>> {
  const codes = await Promise.all([
    ...CAPS.map((c) => nbdinfoFlag('--can', c, uri)),
    nbdinfoFlag('--is', 'read-only', uri),
  ]);
  const out: Record<string, number | null> = {};
  CAPS.forEach((c, i) => (out[c] = codes[i]));
  out['read-only'] = codes[CAPS.length];
  return out;
}

async function nbdinfoJson(t: Test, args: string[]): Promise<Record<string, unknown> | null> {
  const r = await run('nbdinfo', ['--json', ...args], { timeoutMs: 20_000 });
  t.equal(r.code, 0, `nbdinfo --json ${args.join(' ')} exits 0`, { output: r.describe() });
  try {
    return JSON.parse(r.stdout) as Record<string, unknown>;
  } catch (e) {
    t.fail(`nbdinfo --json printed invalid JSON: ${(e as Error).message}`, { output: r.stdout });
    return null;
  }
}

type MapEntry = [offset: number, length: number, type: number];

async function nbdMap(t: Test, uri: string): Promise<MapEntry[]> {
  const r = await run('nbdinfo', ['--map', '--json', uri], { timeoutMs: 20_000 });
  t.equal(r.code, 0, `nbdinfo --map ${uri} exits 0`, { output: r.describe() });
  const list = JSON.parse(r.stdout || '[]') as Array<{ offset: number; length: number; type: number }>;
  return list.map((e) => [e.offset, e.length, e.type]);
}

/** The file's own allocation, from qemu-img map (SEEK_DATA/SEEK_HOLE), as base:allocation types. */
async function fileMap(t: Test, file: string): Promise<MapEntry[]> {
  const r = await run('qemu-img', ['map', '-U', '--output=json', '-f', 'raw', file], { timeoutMs: 20_000 });
  t.equal(r.code, 0, 'qemu-img map exits 0', { output: r.describe() });
  const list = JSON.parse(r.stdout || '[]') as Array<{ start: number; length: number; data: boolean; zero: boolean }>;
  return merge(list.map((e) => [e.start, e.length, (e.data ? 0 : 1) | (e.zero ? 2 : 0)]));
}

function merge(entries: MapEntry[]): MapEntry[] {
  const out: MapEntry[] = [];
  for (const e of entries) {
    const last = out[out.length - 1];
    if (last && last[2] === e[2] && last[0] + last[1] === e[0]) last[1] += e[1];
    else out.push([...e]);
  }
  return out;
}

// ------------------------------------------------------------------ info

t.test('nbdinfo --json: size, export name, description and capabilities of a file source', async (t) => {
  const size = 50 * MiB + 12345; // not a multiple of anything in particular
  const image = tmpPath(t, 'odd', '.img');
  makeImage(image, size, 'zero');
  const cbw = await startNbdCbw(t, ['--source', `file:${image}`, '-e', 'vm-disk-1']);
  const info = await nbdinfoJson(t, [cbw.uri]);
  const exps = (info?.exports ?? []) as Array<Record<string, unknown>>;
  t.equal(info?.protocol, 'newstyle-fixed', 'fixed newstyle');
  t.equal(info?.structured, true, 'structured replies');
  t.equal(exps.length, 1, 'one export');
  const e = exps[0] ?? {};
  t.equal(e['export-size'], size, 'export-size is the file size');
  t.equal(e['export-name'], 'vm-disk-1', 'export-name is the -e name');
  t.equal(e.description, `file ${image}`, 'description names the file');
  t.same(e.contexts, ['base:allocation'], 'base:allocation meta context');
  t.equal(e.is_read_only, false, 'writable');
  for (const c of ['can_cache', 'can_df', 'can_fast_zero', 'can_flush', 'can_fua', 'can_multi_conn', 'can_trim', 'can_zero']) {
    t.equal(e[c], true, `${c}: a file can`);
  }
  t.equal(e.block_size_minimum, 1, 'minimum block size 1');
  t.equal(e.block_size_preferred, 4096, 'preferred block size 4096');
  t.equal(e.block_size_maximum, 32 * MiB, 'maximum block size 32 MiB');

  // The default export "" reaches the same export, and LIST shows it.
  const dflt = await nbdinfoJson(t, [`nbd+unix:///?socket=${cbw.socket}`]);
  t.equal(((dflt?.exports ?? []) as Array<Record<string, unknown>>)[0]?.['export-size'], size, 'export "" is the default');
  const list = await nbdinfoJson(t, ['--list', cbw.uri]);
  t.same(
    ((list?.exports ?? []) as Array<Record<string, unknown>>).map((x) => x['export-name']),
    ['vm-disk-1'],
    'nbdinfo --list lists exactly the export',
  );
  const bad = await run('nbdinfo', [`nbd+unix:///no-such-export?socket=${cbw.socket}`], { timeoutMs: 20_000 });
  t.not(bad.code, 0, 'an unknown export name is refused');
  t.ok(cbw.running(), 'and nbd-cbw carries on');
});

// ------------------------------------------------------------ capabilities

interface CapCase {
  name: string;
  nbdkitArgs: string[];
  /** Capabilities (as nbdinfo exit codes) the source must NOT have, as a sanity check of the case. */
  lacks: string[];
}

const EVAL_ARGS = [
  'eval',
  `get_size=echo ${64 * MiB}`,
  'pread=dd if=/dev/zero count=$3 iflag=count_bytes status=none',
  'pwrite=cat >/dev/null',
];

const CAP_CASES: CapCase[] = [
  { name: 'nbdkit memory (can do everything)', nbdkitArgs: ['memory', '64M'], lacks: [] },
  { name: 'nbdkit --filter=nozero (no WRITE_ZEROES)', nbdkitArgs: ['--filter=nozero', 'memory', '64M'], lacks: ['zero', 'fast-zero'] },
  { name: 'nbdkit -r (read-only: no trim, zero, fua)', nbdkitArgs: ['-r', 'memory', '64M'], lacks: ['trim', 'zero', 'fua', 'write'] },
  {
    name: 'nbdkit --filter=nocache cachemode=none (no CACHE)',
    nbdkitArgs: ['--filter=nocache', 'memory', '64M', 'cachemode=none'],
    lacks: ['cache'],
  },
  { name: 'nbdkit full (no flush, no FUA)', nbdkitArgs: ['full', '64M'], lacks: ['flush', 'fua'] },
  {
    name: 'nbdkit eval with no trim/flush/cache (no TRIM, flush, FUA, cache, multi-conn)',
    nbdkitArgs: EVAL_ARGS,
    lacks: ['trim', 'flush', 'fua', 'cache', 'multi-conn'],
  },
];

t.test('nbdinfo --can/--is through nbd-cbw match the source', async (t) => {
  for (const c of CAP_CASES) {
    await t.test(c.name, async (t) => {
      const k = await startNbdkit(t, c.nbdkitArgs);
      const cbw = await startNbdCbw(t, ['--source', k.uri]);
      const direct = await capabilities(k.uri);
      for (const cap of c.lacks) t.equal(direct[cap], 2, `(the source itself cannot ${cap})`);
      const proxied = await capabilities(cbw.uri);
      t.same(proxied, direct, 'every --can / --is answer equals the source\'s', { direct, proxied });
      for (const cap of c.lacks) t.equal(proxied[cap], 2, `nbd-cbw does not advertise ${cap}: nbdinfo --can ${cap} exits 2`);
    });
  }
});

t.test('-r makes the export read-only', async (t) => {
  const image = tmpPath(t, 'ro', '.img');
  makeImage(image, 16 * MiB, 'random', 5);
  const before = sha256File(image);
  const rw = await startNbdCbw(t, ['--source', `file:${image}`]);
  const ro = await startNbdCbw(t, ['--source', `file:${image}`, '-r', '-e', 'ro']);
  t.equal(await nbdinfoFlag('--is', 'read-only', rw.uri), 2, 'without -r: nbdinfo --is read-only exits 2');
  t.equal(await nbdinfoFlag('--is', 'read-only', ro.uri), 0, 'with -r: nbdinfo --is read-only exits 0');
  for (const cap of ['write', 'trim', 'zero', 'fast-zero', 'fua']) {
    t.equal(await nbdinfoFlag('--can', cap, ro.uri), 2, `with -r: nbdinfo --can ${cap} exits 2`);
  }
  for (const cap of ['flush', 'cache', 'df']) {
    t.equal(await nbdinfoFlag('--can', cap, ro.uri), 0, `with -r: nbdinfo --can ${cap} still exits 0`);
  }
  const src = tmpPath(t, 'other', '.img');
  makeImage(src, 16 * MiB, 'random', 6);
  const cp = await run('nbdcopy', [src, ro.uri], { timeoutMs: 30_000 });
  t.not(cp.code, 0, 'nbdcopy into the read-only export fails');
  const out = tmpPath(t, 'out', '.img');
  const cp2 = await run('nbdcopy', [ro.uri, out], { timeoutMs: 30_000 });
  t.equal(cp2.code, 0, 'reading it works', { output: cp2.describe() });
  t.equal(firstDifference(out, image), null, 'and returns the image');
  t.equal(sha256File(image), before, 'the image is unchanged');

  // An nbd source opened with -r is read-only too (the source itself is writable).
  const k = await startNbdkit(t, ['memory', '16M']);
  const cbw = await startNbdCbw(t, ['--source', k.uri, '-r']);
  t.equal(await nbdinfoFlag('--is', 'read-only', cbw.uri), 0, 'nbd source with -r: read-only');
  t.equal(await nbdinfoFlag('--can', 'trim', cbw.uri), 2, 'nbd source with -r: no trim');
  t.equal(await nbdinfoFlag('--can', 'zero', cbw.uri), 2, 'nbd source with -r: no zero');
});

// --------------------------------------------------------------------- map

t.test('nbdinfo --map through nbd-cbw equals the source map of a sparse image', async (t) => {
  const size = 64 * MiB;
  const image = tmpPath(t, 'sparse', '.img');
  makeImage(image, size, 'zero');
  const dataAt: Array<[number, number]> = [
    [1 * MiB, 1 * MiB],
    [5 * MiB, 2 * MiB],
    [20 * MiB, 1 * MiB],
    [63 * MiB, 1 * MiB],
  ];
  for (const [i, [off, len]] of dataAt.entries()) writeAt(image, off, randomBuffer(len, 100 + i));
  const expected: MapEntry[] = merge([
    [0, 1 * MiB, 3],
    [1 * MiB, 1 * MiB, 0],
    [2 * MiB, 3 * MiB, 3],
    [5 * MiB, 2 * MiB, 0],
    [7 * MiB, 13 * MiB, 3],
    [20 * MiB, 1 * MiB, 0],
    [21 * MiB, 42 * MiB, 3],
    [63 * MiB, 1 * MiB, 0],
  ]);
  t.same(await fileMap(t, image), expected, 'the file itself is allocated where written (the file system keeps holes)');

  const q = await startQemuNbd(t, image, { name: 'src', readOnly: true });
  const viaFile = await startNbdCbw(t, ['--source', `file:${image}`]);
  const viaQemu = await startNbdCbw(t, ['--source', q.uri, '-e', 'proxied']);

  const qemuMap = merge(await nbdMap(t, q.uri));
  t.same(qemuMap, expected, 'qemu-nbd reports the expected map');
  t.same(merge(await nbdMap(t, viaFile.uri)), qemuMap, 'nbd-cbw (file source) map equals qemu-nbd\'s');
  t.same(merge(await nbdMap(t, viaQemu.uri)), qemuMap, 'nbd-cbw (qemu-nbd source) map equals qemu-nbd\'s');

  // Block status is live: discard the 5M..7M data through nbd-cbw and every
  // view shows the hole.
  const r = await run('qemu-io', ['-f', 'raw', '-c', `discard ${5 * MiB} ${2 * MiB}`, viaFile.uri], { timeoutMs: 20_000 });
  t.equal(r.code, 0, 'discard through nbd-cbw', { output: r.describe() });
  // 2M..20M is now one hole.
  const after = merge(expected.map((e): MapEntry => (e[0] === 5 * MiB ? [e[0], e[1], 3] : [...e])));
  t.same(await fileMap(t, image), after, 'the file has the hole');
  t.same(merge(await nbdMap(t, viaFile.uri)), after, 'nbd-cbw (file source) shows it');
  t.same(merge(await nbdMap(t, viaQemu.uri)), after, 'nbd-cbw (qemu-nbd source) shows it');
  t.same(merge(await nbdMap(t, q.uri)), after, 'qemu-nbd shows it');
});

// ------------------------------------------------------------------ nbdcopy

async function copyRoundTrip(t: Test, cbw: Peer, backing: string | null, size: number): Promise<void> {
  const out = tmpPath(t, 'out', '.img');
  const r1 = await run('nbdcopy', [cbw.uri, out], { timeoutMs: 60_000 });
  t.equal(r1.code, 0, 'nbdcopy export -> file exits 0', { output: r1.describe() });
  if (backing) t.equal(firstDifference(out, backing), null, 'the copy is byte-exact with the backing image');

  // A different image, random data with a 3 MiB hole (nbdcopy zeroes that
  // range with WRITE_ZEROES), copied in.
  const input = tmpPath(t, 'in', '.img');
  makeImage(input, size, 'zero');
  writeAt(input, 0, randomBuffer(10 * MiB + 777, 31));
  writeAt(input, 13 * MiB, randomBuffer(size - 13 * MiB, 32));
  const r2 = await run('nbdcopy', ['--flush', input, cbw.uri], { timeoutMs: 60_000 });
  t.equal(r2.code, 0, 'nbdcopy file -> export exits 0', { output: r2.describe() });
  if (backing) t.equal(firstDifference(backing, input), null, 'the backing image now equals the input byte for byte');

  const back = tmpPath(t, 'back', '.img');
  const r3 = await run('nbdcopy', [cbw.uri, back], { timeoutMs: 60_000 });
  t.equal(r3.code, 0, 'nbdcopy export -> file again', { output: r3.describe() });
  t.equal(firstDifference(back, input), null, 'reading it back through nbd-cbw gives the input');
}

t.test('nbdcopy out and back in, byte-exact', async (t) => {
  const size = 48 * MiB;
  await t.test('file source', async (t) => {
    const image = tmpPath(t, 'disk', '.img');
    makeImage(image, size, 'random', 41);
    const cbw = await startNbdCbw(t, ['--source', `file:${image}`]);
    await copyRoundTrip(t, cbw, image, size);
  });
  await t.test('qemu-nbd source', async (t) => {
    const image = tmpPath(t, 'disk', '.img');
    makeImage(image, size, 'random', 42);
    const q = await startQemuNbd(t, image, { name: 'src' });
    const cbw = await startNbdCbw(t, ['--source', q.uri]);
    await copyRoundTrip(t, cbw, image, size);
  });
});

// ---------------------------------------------------------------------- fio

interface FioJob {
  jobname: string;
  error: number;
  total_err?: number;
  read: { io_bytes: number; total_ios: number };
  write: { io_bytes: number; total_ios: number };
}

async function fio(t: Test, uri: string, name: string, extra: string[]): Promise<FioJob | null> {
  const out = tmpPath(t, 'fio', '.json');
  const args = [
    `--name=${name}`,
    '--ioengine=nbd',
    `--uri=${uri}`,
    '--bs=4k',
    '--size=32M',
    '--iodepth=16',
    '--verify=crc32c',
    '--do_verify=1',
    '--verify_fatal=1',
    '--runtime=40',
    '--output-format=json',
    `--output=${out}`,
    ...extra,
  ];
  const r = await run('fio', args, { timeoutMs: 60_000 });
  t.equal(r.code, 0, `fio ${name} exits 0`, { output: r.describe() });
  t.notMatch(r.stdout + r.stderr, /verify:|verify failed|bad magic|bad header/i, 'fio reports no verify errors');
  let job: FioJob | null = null;
  try {
    job = (JSON.parse(fs.readFileSync(out, 'utf8')) as { jobs: FioJob[] }).jobs[0] ?? null;
  } catch (e) {
    t.fail(`fio JSON output unreadable: ${(e as Error).message}`);
  }
  if (job) {
    t.equal(job.error, 0, 'JSON: job error 0');
    t.equal(job.total_err ?? 0, 0, 'JSON: total_err 0');
  }
  return job;
}

async function fioSuite(t: Test, uri: string): Promise<void> {
  const w = await fio(t, uri, 'randwrite', ['--rw=randwrite']);
  if (w) {
    t.equal(w.write.io_bytes, 32 * MiB, 'wrote all 32 MiB');
    t.equal(w.read.io_bytes, 32 * MiB, 'and read all of it back to verify');
  }
  const m = await fio(t, uri, 'randrw', ['--rw=randrw', '--rwmixread=50', '--verify_backlog=256']);
  if (m) {
    t.ok(m.write.io_bytes > 8 * MiB, `mixed: wrote (${m.write.io_bytes} bytes)`);
    t.ok(m.read.io_bytes > m.write.io_bytes, `mixed: read, including verification reads (${m.read.io_bytes} bytes)`);
  }
}

t.test('fio --ioengine=nbd with verification', async (t) => {
  await t.test('file source', async (t) => {
    const image = tmpPath(t, 'disk', '.img');
    makeImage(image, 64 * MiB, 'zero');
    const cbw = await startNbdCbw(t, ['--source', `file:${image}`]);
    await fioSuite(t, cbw.uri);
    t.ok(cbw.running(), 'nbd-cbw still running');
  });
  await t.test('qemu-nbd source', async (t) => {
    const image = tmpPath(t, 'disk', '.img');
    makeImage(image, 64 * MiB, 'zero');
    const q = await startQemuNbd(t, image, { name: 'src' });
    const cbw = await startNbdCbw(t, ['--source', q.uri]);
    await fioSuite(t, cbw.uri);
    t.ok(cbw.running(), 'nbd-cbw still running');
  });
});
