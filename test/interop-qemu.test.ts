// qemu's NBD client (qemu-io, qemu-img) through nbd-cbw, over three kinds of
// source: a local file, qemu-nbd serving a file, and nbdkit's memory plugin.
// Every write, zero, discard and flush goes through nbd-cbw; `read -P` checks
// the data (qemu-io exits 1 and prints "Pattern verification failed" on a
// mismatch), and at the end `qemu-img compare` checks that the source holds
// exactly what the clients see through nbd-cbw.
//
// Each source is driven twice: with qemu-io's default cache mode (writethrough:
// every write carries FUA) and with `-t none` (no FUA). For the nbdkit source
// the log filter records what reached the source, so the test also checks
// that FUA, NO_HOLE (write -z vs write -z -u), TRIM and FLUSH pass through.

import t, { type Test } from 'tap';
import * as fs from 'node:fs';
import {
  MiB,
  makeImage,
  run,
  startNbdCbw,
  startNbdkit,
  startQemuNbd,
  tmpPath,
  type Peer,
  type RunResult,
} from './helpers/peers';

const SIZE = 64 * MiB;
const K = 1024;
const M = MiB;

type SourceKind = 'file' | 'qemu-nbd' | 'nbdkit memory';

interface Setup {
  cbw: Peer;
  /** The backing image file (file and qemu-nbd sources). */
  image?: string;
  /** The source's own URI, bypassing nbd-cbw (qemu-nbd and nbdkit). */
  directUri?: string;
  /** nbdkit log filter output. */
  logFile?: string;
}

async function setup(t: Test, kind: SourceKind): Promise<Setup> {
  if (kind === 'file') {
    const image = tmpPath(t, 'disk', '.img');
    makeImage(image, SIZE, 'random', 11);
    const cbw = await startNbdCbw(t, ['--source', `file:${image}`]);
    return { cbw, image };
  }
  if (kind === 'qemu-nbd') {
    const image = tmpPath(t, 'disk', '.img');
    makeImage(image, SIZE, 'random', 12);
    const q = await startQemuNbd(t, image, { name: 'src' });
    const cbw = await startNbdCbw(t, ['--source', q.uri]);
    return { cbw, image, directUri: q.uri };
  }
  const logFile = tmpPath(t, 'nbdkit', '.log');
  const k = await startNbdkit(t, ['--filter=log', 'memory', `${SIZE}`, `logfile=${logFile}`]);
  const cbw = await startNbdCbw(t, ['--source', k.uri]);
  return { cbw, directUri: k.uri, logFile };
}

function qemuIo(uri: string, cmds: string[], cache?: 'none'): Promise<RunResult> {
  const args = ['-f', 'raw', ...(cache ? ['-t', cache] : [])];
  for (const c of cmds) args.push('-c', c);
  args.push(uri);
  return run('qemu-io', args, { timeoutMs: 30_000 });
}

function checkQemuIo(t: Test, r: RunResult, what: string): void {
  const out = r.stdout + r.stderr;
  t.equal(r.code, 0, `${what}: qemu-io exits 0`, { output: r.describe() });
  t.notMatch(out, /Pattern verification failed/, `${what}: every read -P matched`);
  t.notMatch(out, /failed|error/i, `${what}: no failed command`);
}

interface Step {
  name: string;
  cmds: string[];
}

/**
 * The I/O script for one cache mode. P and Q are the mode's fill bytes, so the
 * second mode really changes data the first one wrote.
 */
function steps(P: string, Q: string): Step[] {
  return [
    {
      name: 'aligned write and read back',
      cmds: [`write -P ${P} 0 128k`, `read -P ${P} 0 128k`],
    },
    {
      name: 'partial overwrite leaves the neighbours intact',
      cmds: [`write -P ${Q} 4096 512`, `read -P ${P} 0 4096`, `read -P ${Q} 4096 512`, `read -P ${P} 4608 ${128 * K - 4608}`],
    },
    {
      name: 'unaligned write (odd offset and length)',
      cmds: [
        `write -P ${Q} 65537 3001`,
        `read -P ${Q} 65537 3001`,
        `read -P ${P} 65536 1`,
        `read -P ${P} 68538 100`,
        `read -P ${Q} 65600 17`,
      ],
    },
    {
      name: 'write -z (zero, no unmap)',
      cmds: [
        `write -P ${P} 1M 512k`,
        `write -z ${M + 4096} 256k`,
        `read -P ${P} 1M 4096`,
        `read -P 0 ${M + 4096} 256k`,
        `read -P ${P} ${M + 4096 + 256 * K} ${512 * K - 4096 - 256 * K}`,
      ],
    },
    {
      name: 'write -z -u (zero, may unmap)',
      cmds: [`write -P ${P} 2M 1M`, `write -z -u 2M 1M`, `read -P 0 2M 1M`],
    },
    {
      name: 'unaligned write -z and write -z -u',
      cmds: [
        `write -P ${P} 3M 64k`,
        `write -z ${3 * M + 1000} 3000`,
        `write -z -u ${3 * M + 10001} 5003`,
        `read -P ${P} 3M 1000`,
        `read -P 0 ${3 * M + 1000} 3000`,
        `read -P ${P} ${3 * M + 4000} 6001`,
        `read -P 0 ${3 * M + 10001} 5003`,
        `read -P ${P} ${3 * M + 15004} ${64 * K - 15004}`,
      ],
    },
    {
      // TRIM leaves the content unspecified by the protocol; all three sources
      // here punch a hole (file: fallocate, qemu-nbd --discard=unmap, nbdkit
      // memory), so reading zeros shows the discard reached the source.
      name: 'discard (aligned) reaches the source',
      cmds: [`write -P ${P} 4M 1M`, `discard 4M 1M`, `read -P 0 4M 1M`],
    },
    {
      name: 'discard (unaligned) succeeds',
      cmds: [`write -P ${Q} 5M 64k`, `discard ${5 * M + 100} 10000`],
    },
    {
      name: 'flush',
      cmds: [`write -P ${Q} 6M 4k`, 'flush', `read -P ${Q} 6M 4k`],
    },
    {
      // 33 MiB: qemu splits at the advertised 32 MiB maximum, so this sends a
      // maximum-size request plus a 1 MiB one.
      name: 'large write split at the 32 MiB maximum',
      cmds: [`write -P ${P} 16M 33M`, `read -P ${P} 16M 33M`, `read -P ${Q} 6M 4k`],
    },
    {
      name: 'write and read at the very end of the export',
      cmds: [
        `write -P ${Q} ${SIZE - 4096} 4096`,
        `write -P ${P} ${SIZE - 777} 777`,
        `read -P ${Q} ${SIZE - 4096} ${4096 - 777}`,
        `read -P ${P} ${SIZE - 777} 777`,
      ],
    },
    {
      name: 'many writes in flight (aio_write), then aio_flush',
      cmds: [
        ...Array.from({ length: 24 }, (_, i) => `aio_write -P ${i % 2 ? P : Q} ${8 * M + i * 64 * K + (i % 3) * 512} 4k`),
        'aio_flush',
        ...Array.from({ length: 24 }, (_, i) => `read -P ${i % 2 ? P : Q} ${8 * M + i * 64 * K + (i % 3) * 512} 4k`),
      ],
    },
  ];
}

interface LogRecord {
  op: string;
  fields: Record<string, string>;
}

/** Requests the nbdkit log filter recorded (the "..." opening lines only). */
function readLog(file: string): LogRecord[] {
  const text = fs.existsSync(file) ? fs.readFileSync(file, 'utf8') : '';
  const out: LogRecord[] = [];
  for (const line of text.split('\n')) {
    const m = / connection=\d+ (Read|Write|Zero|Trim|Flush|Cache|Extents) (.*) \.\.\.$/.exec(line);
    if (!m) continue;
    const fields: Record<string, string> = {};
    for (const kv of m[2].split(' ')) {
      const eq = kv.indexOf('=');
      if (eq > 0) fields[kv.slice(0, eq)] = kv.slice(eq + 1);
    }
    out.push({ op: m[1], fields });
  }
  return out;
}

const KINDS: SourceKind[] = ['file', 'qemu-nbd', 'nbdkit memory'];
const MODES = [
  { name: 'default cache mode (writes with FUA)', cache: undefined, P: '0xab', Q: '0xcd', fua: '1' },
  { name: '-t none (writes without FUA)', cache: 'none' as const, P: '0x5c', Q: '0x3e', fua: '0' },
];

for (const kind of KINDS) {
  t.test(`${kind} source`, async (t) => {
    const s = await setup(t, kind);

    for (const mode of MODES) {
      await t.test(mode.name, async (t) => {
        const logBefore = s.logFile ? readLog(s.logFile).length : 0;
        for (const step of steps(mode.P, mode.Q)) {
          const r = await qemuIo(s.cbw.uri, step.cmds, mode.cache);
          checkQemuIo(t, r, step.name);
        }
        if (!s.logFile) return;
        // What reached nbdkit through nbd-cbw during this mode.
        const recs = readLog(s.logFile).slice(logBefore);
        const writes = recs.filter((r) => r.op === 'Write');
        const zeros = recs.filter((r) => r.op === 'Zero');
        // One source request per client request (nbd-cbw neither splits nor
        // merges), plus the second half of the 33 MiB write qemu split.
        const cmds = steps(mode.P, mode.Q).flatMap((st) => st.cmds);
        const expectedWrites = cmds.filter((c) => /^(aio_)?write -P/.test(c)).length + 1;
        t.equal(writes.length, expectedWrites, 'each write reached the source as one WRITE');
        t.equal(zeros.length, cmds.filter((c) => c.startsWith('write -z')).length, 'each write -z as one WRITE_ZEROES');
        t.equal(recs.filter((r) => r.op === 'Trim').length, 2, 'each discard as one TRIM');
        t.same(
          [...new Set(writes.map((w) => w.fields.fua))],
          [mode.fua],
          `every write reached the source with fua=${mode.fua}`,
        );
        t.ok(
          writes.some((w) => w.fields.count === '0x2000000'),
          'a 32 MiB write reached the source as one request',
        );
        t.ok(
          zeros.some((z) => z.fields.trim === '0'),
          'write -z reached the source as WRITE_ZEROES with NO_HOLE (trim=0)',
        );
        t.ok(
          zeros.some((z) => z.fields.trim === '1'),
          'write -z -u reached the source as WRITE_ZEROES without NO_HOLE (trim=1)',
        );
        t.same(
          [...new Set(zeros.map((z) => z.fields.fua))],
          [mode.fua],
          `zeroes reached the source with fua=${mode.fua}`,
        );
        t.ok(
          recs.some((r) => r.op === 'Trim' && r.fields.offset === '0x400000' && r.fields.count === '0x100000'),
          'discard reached the source as TRIM 4M+1M',
        );
        t.ok(
          recs.some((r) => r.op === 'Trim' && r.fields.offset === `0x${(5 * M + 100).toString(16)}` && r.fields.count === '0x2710'),
          'unaligned discard reached the source unchanged',
        );
        t.ok(recs.some((r) => r.op === 'Flush'), 'flush reached the source');
      });
    }

    await t.test('qemu-img compare: the source holds what nbd-cbw serves', async (t) => {
      const other = s.image ?? (s.directUri as string);
      const r = await run('qemu-img', ['compare', '-U', '-f', 'raw', '-F', 'raw', s.cbw.uri, other], {
        timeoutMs: 60_000,
      });
      t.equal(r.code, 0, `qemu-img compare exits 0 (identical) against ${s.image ? 'the image file' : 'nbdkit directly'}`, {
        output: r.describe(),
      });
      t.match(r.stdout, /Images are identical/, 'says identical');
      if (s.directUri && s.image) {
        const r2 = await run('qemu-img', ['compare', '-U', '-f', 'raw', '-F', 'raw', s.cbw.uri, s.directUri], {
          timeoutMs: 60_000,
        });
        t.equal(r2.code, 0, 'also identical to qemu-nbd read directly', { output: r2.describe() });
      }
      // And the comparison is not vacuous: a copy of the image with one byte
      // flipped is reported as different.
      if (s.image) {
        const copy = tmpPath(t, 'flipped', '.img');
        fs.copyFileSync(s.image, copy);
        const fd = fs.openSync(copy, 'r+');
        const b = Buffer.alloc(1);
        fs.readSync(fd, b, 0, 1, 40 * M + 3);
        b[0] ^= 0xff;
        fs.writeSync(fd, b, 0, 1, 40 * M + 3);
        fs.closeSync(fd);
        const r3 = await run('qemu-img', ['compare', '-U', '-f', 'raw', '-F', 'raw', s.cbw.uri, copy], {
          timeoutMs: 60_000,
        });
        t.equal(r3.code, 1, 'compare against a copy with one flipped byte reports a difference', {
          output: r3.describe(),
        });
        // qemu-img reports the start of the 512-byte sector holding it.
        const at = Number(/Content mismatch at offset (\d+)/.exec(r3.stdout)?.[1] ?? -1);
        t.ok(at <= 40 * M + 3 && at > 40 * M + 3 - 512, `at the flipped byte's sector (${at})`);
      }
    });

    await t.test('nbd-cbw still running after all of it', async (t) => {
      t.ok(s.cbw.running(), 'nbd-cbw is alive');
      const stopped = await s.cbw.stop();
      t.same(stopped, { code: 0, signal: null }, 'and exits 0 on SIGTERM');
    });
  });
}
