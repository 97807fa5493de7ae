// Driving backup jobs with the CLI (`nbd-cbw backup ...`) against a real
// nbd-cbw serving a file, with nbdkit targets and qemu-io as the guest:
//
// - cancel mid-way: `backup cancel`, then `backup wait` exits non-zero, the
//   status says cancelled (and stays so), the buffer is empty, the guest
//   writes freely, and a new job can start and completes exactly;
// - pause and resume (with --speed to keep it slow): bytesDone stands still
//   while paused, moves again after resume; the result is exact;
// - buffer full without spill: a one-cluster --buffer, a slow target and a
//   guest writing over unsaved clusters: writes wait, nothing is lost;
// - the same with a guest writing sequentially (fio, QD4) into --buffer 16M
//   over a 4 MiB/s target: it waits for room, never past the CBW timeout,
//   and the job ends exact;
// - a target failing every write (nbdkit error filter), under both
//   policies: break-snapshot, the guest sees no error and the job ends
//   failed with a reason; break-guest-write with --buffer 0, the guest write
//   fails with EIO (the source keeps its old data), the job ends failed;
// - CBW timeout: --cbw-timeout 200ms, --buffer 0, a target whose writes
//   hang (delay filter wdelay=30, i.e. 30 s; nbdkit 1.32 rejects "30s"): break-snapshot lets the write through after
//   ~200 ms and fails the job; break-guest-write fails the write, the job
//   keeps running;
// - an nbdkit memory target (log filter): fresh, its block status says all
//   zero and it gets no write-zeroes; written over first, it gets them;
//   both end exact;
// - nbd-cbw stopped (SIGTERM) during a backup, and right after a cancel, to
//   a slow nbdkit target with writes in flight: the target answers them and
//   sees a clean disconnect (no write cut off mid-sleep, no broken pipe;
//   nbdkit 1.32 could abort on one), nbdkit is still up, nbd-cbw exits 0;
// - a qemu-nbd source that takes one client (no --shared): the job's second
//   connection for the sweep times out, nbd-cbw says so and why, and the job
//   completes exactly over the guest's connection;
// - the disk's own NBD exports as targets (nbd-cbw's socket under any export
//   name, a symlink, a relative path; an NBD source's export) are refused,
//   no job started, the disk untouched;
// - relative target and spill paths given to the CLI are the caller's (the
//   backup lands in the caller's directory, exact); the API refuses them;
// - a file: target that qemu-nbd serves read-write (QEMU's "write" lock
//   held) is refused, untouched; one it serves read-only is written, and
//   qemu-io cannot open it for writing until the job has completed;
// - a backup of a read-only export whose file qemu-nbd serves read-write is
//   refused (nbd-cbw would not see those writes); with qemu-nbd gone, it
//   completes exact;
// - the disk itself as a file: target (its path, a symlink, a hard link; a
//   served loop device under its own node or another) is refused;
// - a loop device as a file: target (an LV or a disk in real use): one
//   smaller than the disk, and /dev/null, are refused before any job starts;
//   one a little larger ends exact under guest writes, zero ranges written
//   over its old bytes, nothing past the disk's size touched;
// - `status --json` fields; clear one-line errors for bad input (bad target
//   URI, --buffer 12Q, --cbw-timeout 0, --workers 1000, a --spill-dir that
//   does not exist, refused before a new target file is made, a second job
//   while one runs: 409).

import t, { type Test } from 'tap';
import * as fs from 'node:fs';
import { execFileSync } from 'node:child_process';
import {
  MiB,
  NBD_CBW_BIN,
  canUseLoopDevices,
  makeImage,
  nbdUnixUri,
  readAt,
  run,
  sleep,
  startNbdCbw,
  startNbdkit,
  startQemuNbd,
  tmpPath,
  type Peer,
} from './helpers/peers';
import {
  backupAction,
  backupStart,
  backupStatus,
  backupWait,
  cli,
  compareImages,
  controlHttp,
  controlOf,
  guestCommands,
  guestMustSucceed,
  makeMixedImage,
  nbdToFile,
  qemuIo,
  waitStatus,
  type JobJson,
} from './helpers/cbw';
import { mulberry32 } from './helpers/peers';
import { NbdTarget, TARGET_REQUEST_BYTES } from '../src/targets/nbd';

const SIZE = 64 * MiB;

interface Rig {
  image: string;
  snapshot: string;
  cbw: Peer;
  control: string;
}

/** An image, nbd-cbw serving it, and the point-in-time copy taken now. */
async function serve(t: Test, seed: number, size = SIZE): Promise<Rig> {
  const image = tmpPath(t, 'disk', '.raw');
  const snapshot = tmpPath(t, 'snap', '.raw');
  makeMixedImage(image, size, seed);
  const cbw = await startNbdCbw(t, ['--source', `file:${image}`]);
  fs.copyFileSync(image, snapshot);
  return { image, snapshot, cbw, control: controlOf(cbw) };
}

function memoryTarget(t: Test, filters: string[] = [], params: string[] = [], size = SIZE): Promise<Peer> {
  return startNbdkit(t, [...filters, 'memory', String(size), ...params]);
}

async function checkTarget(t: Test, targetUri: string, snapshot: string, what: string): Promise<void> {
  const out = tmpPath(t, 'readback', '.raw');
  await nbdToFile(targetUri, out);
  const diff = compareImages(snapshot, out);
  t.equal(diff, null, diff ? `${what}: target differs: ${diff}` : `${what}: target equals the point-in-time image`);
}

function oneLine(t: Test, stderr: string, re: RegExp, what: string): void {
  const lines = stderr.trim().split('\n');
  t.equal(lines.length, 1, `${what}: one line on stderr (${JSON.stringify(stderr.trim())})`);
  t.match(lines[0], re, `${what}: says why`);
}

// ------------------------------------------------------------------ cancel

t.test('cancel mid-way', async (t) => {
  // Target first: teardowns run in reverse, so nbd-cbw (its client) stops first.
  const target = await memoryTarget(t, ['--filter=rate'], ['rate=200M']);
  const r = await serve(t, 101);
  const job = await backupStart(r.control, target.uri, ['--speed', '2M']);
  t.match(job.state, /^(running|starting)$/, `started ${job.id}`);
  await waitStatus(r.control, (s) => s.bytesDone > 0, 'some progress');

  const c = await backupAction(r.control, 'cancel');
  t.equal(c.id, job.id, 'cancel answers for the job');
  t.equal(c.state, 'cancelled', '`backup cancel` reports cancelled');

  const w = await backupWait(r.control, job.id, 30_000);
  t.not(w.code, 0, `backup wait exits non-zero (${w.code})`);
  t.equal(w.last?.state, 'cancelled', 'wait saw cancelled');

  const s = await backupStatus(r.control, job.id);
  t.equal(s.state, 'cancelled', 'status: cancelled');
  t.match(s.error ?? '', /cancel/, `status has a reason (${s.error})`);
  t.ok(s.bytesDone < s.bytesTotal, `stopped mid-way (${s.bytesDone} of ${s.bytesTotal})`);
  await waitStatus(r.control, (x) => x.bufferBytes === 0, 'buffer released', 5000);
  await sleep(1000);
  const later = await backupStatus(r.control, job.id);
  t.equal(later.state, 'cancelled', 'a second later: still cancelled, never completed');
  t.equal(later.bytesDone, s.bytesDone, 'and no further progress');
  const human = await cli(['backup', 'status', '--control', r.control]);
  t.equal(human.stdout.split('\n')[0], `job ${job.id}: cancelled`, 'status says cancelled once, with no reason that repeats it');

  // The guest writes freely; pause/resume/cancel of an ended job are refused.
  const g = await qemuIo(r.cbw.uri, ['write -P 0x66 60M 1M', 'read -P 0x66 60M 1M']);
  t.equal(g.code, 0, 'guest writes after the cancel', { output: g.describe() });
  const again = await cli(['backup', 'cancel', job.id, '--control', r.control]);
  t.not(again.code, 0, 'cancelling an ended job fails');
  oneLine(t, again.stderr, /job is cancelled/, 'cancel again');

  // A new job can start at once and completes with the disk as it is now.
  const snap2 = tmpPath(t, 'snap2', '.raw');
  fs.copyFileSync(r.image, snap2);
  const target2 = tmpPath(t, 'target2', '.raw');
  const job2 = await backupStart(r.control, `file:${target2}`);
  t.not(job2.id, job.id, 'a new job');
  const w2 = await backupWait(r.control, job2.id, 60_000);
  t.equal(w2.code, 0, 'the new job completes');
  const diff = compareImages(snap2, target2);
  t.equal(diff, null, diff ? `second job: ${diff}` : 'second job: target equals the disk at its start');
});

// ------------------------------------------------------ stopping nbd-cbw

for (const how of ['SIGTERM mid-backup', 'SIGTERM just after a cancel'] as const) {
  t.test(`${how}: the target's writes in flight are answered, then a clean disconnect`, async (t) => {
    // 50 ms per write: there are always some in flight.
    const target = await memoryTarget(t, ['--filter=delay'], ['wdelay=50ms']);
    const r = await serve(t, 111);
    await backupStart(r.control, target.uri, ['--max-chunk', '256K']);
    await waitStatus(r.control, (s) => s.bytesDone > 2 * MiB, 'some progress');
    if (how === 'SIGTERM just after a cancel') await backupAction(r.control, 'cancel');
    const end = await r.cbw.stop('SIGTERM');
    t.strictSame(end, { code: 0, signal: null }, 'nbd-cbw exits 0');
    await sleep(300); // nbdkit reports a cut connection as it notices
    const out = target.output();
    t.notMatch(out, /aborting sleep|Broken pipe|reset by peer|Assertion/, 'nbdkit saw no request cut off', { output: out.slice(-2000) });
    t.ok(target.running(), 'nbdkit is still running');
  });
}

t.test('a qemu-nbd source that takes one client: nbd-cbw says why, the job completes exactly', async (t) => {
  const image = tmpPath(t, 'disk', '.raw');
  makeMixedImage(image, 16 * MiB, 121);
  const snapshot = tmpPath(t, 'snap', '.raw');
  fs.copyFileSync(image, snapshot);
  const q = await startQemuNbd(t, image, { shared: 1 });
  const cbw = await startNbdCbw(t, ['--source', q.uri]);
  const target = tmpPath(t, 'target', '.raw');
  const job = await backupStart(controlOf(cbw), `file:${target}`);
  const w = await backupWait(controlOf(cbw), job.id, 60_000);
  t.equal(w.code, 0, 'the job completes');
  const diff = compareImages(snapshot, target);
  t.equal(diff, null, diff ? `target differs: ${diff}` : 'target equals the disk at the start');
  t.match(cbw.output(), /no second connection to the source .*--shared=2/, 'nbd-cbw said why the sweep shares the connection');
});

// ------------------------------------------------------------ pause/resume

t.test('pause and resume', async (t) => {
  const target = await memoryTarget(t);
  const r = await serve(t, 202);
  const job = await backupStart(r.control, target.uri, ['--speed', '4M', '--max-chunk', '1M']);
  await waitStatus(r.control, (s) => s.bytesDone >= 2 * MiB, 'some progress');

  const p = await backupAction(r.control, 'pause');
  t.equal(p.state, 'paused', '`backup pause` reports paused');
  await sleep(600); // what was already read drains to the (fast) target
  const a = await backupStatus(r.control);
  await sleep(1500);
  const b = await backupStatus(r.control);
  t.equal(b.state, 'paused', 'still paused');
  t.equal(b.bytesDone, a.bytesDone, `bytesDone does not advance while paused (${a.bytesDone})`);
  t.ok(b.bytesDone < b.bytesTotal, 'not finished');

  const res = await backupAction(r.control, 'resume');
  t.equal(res.state, 'running', '`backup resume` reports running');
  const moved = await waitStatus(r.control, (s) => s.bytesDone > b.bytesDone, 'progress after resume', 10_000);
  t.ok(moved.bytesDone > b.bytesDone, `bytesDone moves again (${moved.bytesDone})`);

  // Now a guest writes (the checks above are done) and the job finishes.
  const g = await qemuIo(r.cbw.uri, guestCommands(mulberry32(202), SIZE, 150));
  t.equal(g.code, 0, 'guest writes', { output: g.code ? g.describe() : undefined });
  const sp = await cli(['backup', 'set-speed', '0', '--control', r.control]);
  t.equal(sp.code, 0, 'set-speed 0', { output: sp.code ? sp.describe() : undefined });
  const w = await backupWait(r.control, job.id, 60_000);
  t.equal(w.code, 0, 'completed');
  await checkTarget(t, target.uri, r.snapshot, 'after pause/resume');
});

// --------------------------------------------------------- buffer full

t.test('buffer full without spill: guest writes wait, nothing is lost', async (t) => {
  const rateFile = tmpPath(t, 'rate');
  const target = await memoryTarget(t, ['--filter=delay', '--filter=rate'], ['wdelay=5ms', 'rate=100M', 'burstiness=0.5', `rate-file=${rateFile}`]);
  const r = await serve(t, 303);
  const job = await backupStart(r.control, target.uri, ['--buffer', '64K', '--speed', '4M']);
  t.equal(job.bufferCapacity, 64 * 1024, 'buffer capacity 64 KiB (one cluster)');
  const started = Date.now();
  // Writes over the upper half, which the slow sweep reaches last.
  const cmds: string[] = [];
  for (let i = 0; i < 40; i++) cmds.push(`write -P 0x${(i + 1).toString(16)} ${32 * MiB + i * 800 * 1024} 128k`);
  const g = await qemuIo(r.cbw.uri, cmds);
  const guestMs = Date.now() - started;
  t.equal(g.code, 0, 'every guest write succeeded', { output: g.code ? g.describe() : undefined });
  const mid = await backupStatus(r.control);
  t.ok(mid.guestCopies > 0, `guest writes had clusters saved (${mid.guestCopies})`);
  t.ok(mid.bufferHighWater <= 64 * 1024, `the buffer never held more than 64 KiB (peak ${mid.bufferHighWater})`);
  t.equal(mid.spillBytes, 0, 'no spill');
  t.comment(`guest took ${guestMs} ms for 40 x 128 KiB writes`);
  await sleep(10); // let the sweep run a bit more, then lift the limits
  await cli(['backup', 'set-speed', '0', '--control', r.control]);
  fs.writeFileSync(`${rateFile}.new`, '10G\n');
  fs.renameSync(`${rateFile}.new`, rateFile);
  const w = await backupWait(r.control, job.id, 90_000);
  t.equal(w.code, 0, 'job completed');
  t.ok((w.last?.bufferHighWater ?? Infinity) <= 64 * 1024, `peak buffer ${w.last?.bufferHighWater} <= 64 KiB`);
  await checkTarget(t, target.uri, r.snapshot, 'tiny buffer');
});

t.test('a guest writing sequentially into a full buffer over a slow target waits for room, never past the CBW timeout', async (t) => {
  // Saved clusters that touch join into large target writes; a slow target
  // shares its rate among the writes in flight, so eight 4 MiB writes
  // started together ended together about 8 s later, and guests waiting for
  // room in RAM got it in bursts that far apart: past the 5 s CBW timeout,
  // and the backup failed. While a guest waits for room, runs go one per
  // write (CowBuffer.takeGroup).
  const size = 256 * MiB;
  const targetFile = tmpPath(t, 'target', '.raw');
  makeImage(targetFile, size); // sparse, all zero
  const rateFile = tmpPath(t, 'rate');
  // rate=32M is in bits: 4 MiB/s, until the rate file says otherwise.
  const target = await startNbdkit(t, ['--filter=rate', '--filter=delay', 'file', targetFile, 'rate=32M', `rate-file=${rateFile}`, 'wdelay=5ms']);
  const r = await serve(t, 311, size);
  const job = await backupStart(r.control, target.uri, ['--buffer', '16M']);
  const fio = await run(
    'fio',
    ['--name=seq', '--ioengine=nbd', `--uri=${r.cbw.uri}`, '--rw=write', '--bs=64k', '--iodepth=4', `--size=${size}`, '--time_based', '--runtime=12', '--output-format=json'],
    { timeoutMs: 90_000 },
  );
  t.equal(fio.code, 0, 'fio exits 0', { out: fio.code ? fio.describe() : undefined });
  const report = JSON.parse(fio.stdout.replace(/^[^{]*/, '')) as { jobs: Array<{ error: number; write: { total_ios: number; clat_ns: { max: number } } }> };
  const w = report.jobs[0].write;
  t.equal(report.jobs[0].error, 0, 'no fio error');
  const mid = await backupStatus(r.control, job.id);
  t.ok(mid.bufferHighWater >= 15 * MiB, `the buffer filled (peak ${(mid.bufferHighWater / MiB).toFixed(1)} MiB)`);
  t.equal(mid.error, null, `the backup did not fail while the guest waited for room (${mid.state}${mid.error ? `: ${mid.error}` : ''})`);
  t.equal(mid.state, 'running', 'still running: the target is slow');
  t.comment(`${w.total_ios} sequential 64 KiB writes in 12 s, longest ${(w.clat_ns.max / 1e6).toFixed(0)} ms`);
  fs.writeFileSync(`${rateFile}.new`, '10G\n');
  fs.renameSync(`${rateFile}.new`, rateFile);
  const end = await backupWait(r.control, job.id, 120_000);
  t.equal(end.code, 0, 'job completed');
  await checkTarget(t, target.uri, r.snapshot, 'sequential guest, full buffer');
});

// ------------------------------------------------------ failing target

const ERROR_TARGET = ['--filter=error'];
const ERROR_PARAMS = ['error=EIO', 'error-pwrite-rate=100%', 'error-zero-rate=100%'];

t.test('target failing every write, break-snapshot: the guest sees nothing, the job fails with a reason', async (t) => {
  const target = await memoryTarget(t, ERROR_TARGET, ERROR_PARAMS);
  const r = await serve(t, 404);
  const job = await backupStart(r.control, target.uri, ['--buffer', '256M', '--on-cbw-error', 'break-snapshot']);
  t.equal(job.onCbwError, 'break-snapshot', 'policy break-snapshot');
  const g = await qemuIo(r.cbw.uri, guestCommands(mulberry32(404), SIZE, 150));
  t.equal(g.code, 0, 'guest: no error', { output: g.code ? g.describe() : undefined });
  t.notMatch(g.stdout + g.stderr, /failed|error/i, 'no error in the guest output');
  const w = await backupWait(r.control, job.id, 60_000);
  t.not(w.code, 0, `backup wait exits non-zero (${w.code})`);
  const s = await backupStatus(r.control, job.id);
  t.equal(s.state, 'failed', 'job failed');
  t.match(s.error ?? '', /target write at \d+\+\d+ failed after \d+ attempts/, `with a reason: ${s.error}`);
  t.ok(s.targetRetries > 0, `retries counted (${s.targetRetries})`);
  const g2 = await qemuIo(r.cbw.uri, ['write -P 0x77 10M 1M', 'read -P 0x77 10M 1M']);
  t.equal(g2.code, 0, 'guest still fine after the job failed', { output: g2.code ? g2.describe() : undefined });
});

t.test('target failing every write, break-guest-write: the guest write fails with EIO, the source keeps its data', async (t) => {
  const target = await memoryTarget(t, ERROR_TARGET, ERROR_PARAMS);
  const r = await serve(t, 505);
  const job = await backupStart(r.control, target.uri, ['--buffer', '0', '--on-cbw-error', 'break-guest-write', '--cbw-timeout', '500ms']);
  t.equal(job.onCbwError, 'break-guest-write', 'policy break-guest-write');
  // The sweep reads at most 32 MiB ahead and its target writes fail: the
  // last cluster of the disk is not saved; writing it needs a target write.
  const off = SIZE - 64 * 1024;
  const before = readAt(r.image, off, 4096);
  const started = Date.now();
  const g = await qemuIo(r.cbw.uri, [`write -P 0x99 ${off} 4k`]);
  const ms = Date.now() - started;
  t.match(g.stdout + g.stderr, /write failed: Input\/output error/, `the guest write fails with EIO after ${ms} ms`);
  t.ok(readAt(r.image, off, 4096).equals(before), 'the write was not forwarded: the source keeps its old data');
  const st = await backupStatus(r.control, job.id);
  t.ok(st.state === 'running' || st.state === 'failed', `job state ${st.state}`);
  const w = await backupWait(r.control, job.id, 60_000);
  t.not(w.code, 0, 'backup wait exits non-zero');
  const s = await backupStatus(r.control, job.id);
  t.equal(s.state, 'failed', 'job failed');
  t.match(s.error ?? '', /target write at \d+\+\d+ failed after \d+ attempts/, `with a reason: ${s.error}`);
  const g2 = await qemuIo(r.cbw.uri, [`write -P 0x99 ${off} 4k`, `read -P 0x99 ${off} 4k`]);
  t.equal(g2.code, 0, 'once the job is over the same write succeeds', { output: g2.code ? g2.describe() : undefined });
});

// ---------------------------------------------------------- CBW timeout

for (const policy of ['break-snapshot', 'break-guest-write'] as const) {
  t.test(`CBW timeout 200ms on a hanging target, --buffer 0, ${policy}`, async (t) => {
    // nbdkit 1.32 may abort (raw_send_socket: Assertion `sock >= 0') when the
    // client hangs up while the delay filter sleeps in a request: a bug of
    // that peer, not a failure of this test, so its exit is not checked here.
    const target = await startNbdkit(t, ['--filter=delay', 'memory', String(SIZE), 'wdelay=30', 'delay-zero=30'], {
      failOnUnexpectedExit: false,
    });
    const r = await serve(t, 606);
    const job = await backupStart(r.control, target.uri, ['--buffer', '0', '--cbw-timeout', '200ms', '--on-cbw-error', policy]);
    await sleep(300); // the sweep reads ahead and hangs on the target
    const off = SIZE - 64 * 1024;
    const before = readAt(r.image, off, 4096);
    const started = Date.now();
    const g = await qemuIo(r.cbw.uri, [`write -P 0x42 ${off} 4k`], 20_000);
    const ms = Date.now() - started;
    t.ok(ms >= 200, `the guest write waited for the timeout (${ms} ms incl. qemu-io start)`);
    t.ok(ms < 10_000, 'but not for the hanging target');
    const s = await backupStatus(r.control, job.id);
    if (policy === 'break-snapshot') {
      t.equal(g.code, 0, 'the guest write succeeded', { output: g.code ? g.describe() : undefined });
      // qemu-io times the write itself: "4 KiB, 1 ops; 00.20 sec (...)".
      const m = /ops; (?:(\d+):)?(\d+\.\d+) sec/.exec(g.stdout);
      const secs = m ? Number(m[1] ?? 0) * 60 + Number(m[2]) : NaN;
      t.ok(secs >= 0.19 && secs < 5, `the write itself took ${secs} s: the 200 ms timeout, not the 30 s target`);
      t.notMatch(g.stdout, /failed/, 'no error reported to the guest');
      t.ok(readAt(r.image, off, 4096).equals(Buffer.alloc(4096, 0x42)), 'and reached the source');
      t.equal(s.state, 'failed', 'job failed');
      t.match(s.error ?? '', /copy-before-write failed \(copy-before-write timed out after 200 ms\)/, `reason: ${s.error}`);
      const w = await backupWait(r.control, job.id, 10_000);
      t.not(w.code, 0, 'backup wait exits non-zero');
    } else {
      t.match(g.stdout + g.stderr, /write failed: Input\/output error/, 'the guest write failed with EIO');
      t.ok(readAt(r.image, off, 4096).equals(before), 'the source keeps its old data');
      t.equal(s.state, 'running', 'the job keeps running (the snapshot is still valid)');
      t.equal(s.error, null, 'no error on the job');
      const c = await backupAction(r.control, 'cancel');
      t.equal(c.state, 'cancelled', 'cancelled to finish');
    }
  });
}

// ---------------------------------------------------------- status --json

t.test('status --json', async (t) => {
  const target = await memoryTarget(t);
  const r = await serve(t, 707);
  const job = await backupStart(r.control, target.uri, ['--speed', '4M', '--buffer', '32M']);
  const check = (s: JobJson, when: string) => {
    t.type(s.id, 'string', `${when}: id`);
    t.equal(s.id, job.id, `${when}: the job's id`);
    t.match(s.state, /^(starting|running|paused|completed|failed|cancelled)$/, `${when}: state ${s.state}`);
    t.type(s.bytesDone, 'number', `${when}: bytesDone`);
    t.equal(s.bytesTotal, SIZE, `${when}: bytesTotal is the disk size`);
    t.ok(s.bytesDone >= 0 && s.bytesDone <= s.bytesTotal, `${when}: 0 <= bytesDone <= bytesTotal`);
    t.type(s.bufferBytes, 'number', `${when}: bufferBytes`);
    t.equal(s.bufferCapacity, 32 * MiB, `${when}: bufferCapacity`);
    t.ok('error' in s, `${when}: error present`);
  };
  const running = await backupStatus(r.control);
  check(running, 'running');
  t.equal(running.error, null, 'running: error is null');
  const byId = await backupStatus(r.control, job.id);
  t.equal(byId.id, job.id, 'status JOB works too');
  // The human form is several lines naming the job.
  const human = await cli(['backup', 'status', '--control', r.control]);
  t.match(human.stdout, new RegExp(`job ${job.id}: (running|starting|completed)`), 'plain status names the job and state');
  await cli(['backup', 'set-speed', '0', '--control', r.control]);
  const w = await backupWait(r.control, job.id, 60_000);
  t.equal(w.code, 0, 'completed');
  const done = await backupStatus(r.control, job.id);
  check(done, 'completed');
  t.equal(done.state, 'completed', 'state completed');
  t.equal(done.bytesDone, done.bytesTotal, 'bytesDone = bytesTotal');
  t.equal(done.bufferBytes, 0, 'buffer empty');
  t.equal(done.error, null, 'no error');
});

t.test('backup start --wait on a terminal: a progress bar in sizes, then the outcome', async (t) => {
  // util-linux `script` gives the CLI a pseudo-terminal as stdin/stdout/stderr.
  const target = await memoryTarget(t);
  const r = await serve(t, 708);
  const cmd = [process.execPath, NBD_CBW_BIN, 'backup', 'start', '--wait', '--interval', '100', '--speed', '32M']
    .concat(['--target', target.uri, '--control', r.control])
    .map((a) => `'${a}'`)
    .join(' ');
  const res = await run('script', ['-qec', cmd, '/dev/null'], { timeoutMs: 60_000 });
  t.equal(res.code, 0, 'exit 0: the job completed', { output: res.stdout.slice(-2000) });
  // Each frame is redrawn over the last with escape sequences (cursor to
  // column 1, clear to the end): keep the text, one frame per line.
  const text = res.stdout.replace(/\x1b\[[0-9;?]*[A-Za-z]|\x1b[78]/g, '').replace(/\r/g, '\n');
  const frames = text
    .split(/(?=backup \|)|\n/)
    .filter((l) => l.startsWith('backup |'))
    .map((l) => l.replace(/[\u2588\u2591]/g, ''));
  t.ok(frames.length >= 2, `the bar was drawn and redrawn (${frames.length} frames)`);
  t.match(frames[frames.length - 1], /\| 100% 64(\.0)? MiB\/64(\.0)? MiB [\d.]+ \S*B\/s ETA \S+ buffer [\d.]+ \S*B$/, 'its last frame: 100%, done/total in sizes, rate, ETA, buffer');
  t.notOk(frames.some((f) => f.includes('{')), 'no placeholder is left unfilled in any frame', { frames: frames.slice(0, 3) });
  t.match(text, /job \S+: completed/, 'then the outcome in words');
  t.notMatch(text, /^\{/m, 'and no JSON (that is --json)');
  await checkTarget(t, target.uri, r.snapshot, 'backup under a terminal');
});

// ---------------------------------------------------- targets reading as zero

t.test('an NBD target whose block status says all zero gets no write-zeroes; a used one does', async (t) => {
  const r = await serve(t, 808); // holes and zero-filled runs among the data
  for (const used of [false, true]) {
    const log = tmpPath(t, used ? 'used-log' : 'fresh-log', '.txt');
    const target = await memoryTarget(t, ['--filter=log'], [`logfile=${log}`]);
    if (used) {
      const w = await qemuIo(target.uri, [`write -P 0x55 0 ${SIZE}`]);
      t.equal(w.code, 0, 'the used target was written all over first');
    }
    const job = await backupStart(r.control, target.uri, []);
    const done = await backupWait(r.control, job.id, 60_000);
    t.equal(done.code, 0, `${used ? 'used' : 'fresh'} target: completed`);
    await checkTarget(t, target.uri, r.snapshot, used ? 'used target' : 'fresh target');
    const zeroes = fs
      .readFileSync(log, 'utf8')
      .split('\n')
      .filter((l) => / Zero id=\d+ offset=/.test(l)).length;
    if (used) t.ok(zeroes > 0, `used target: zero ranges were written as zeroes (${zeroes} log lines)`);
    else t.equal(zeroes, 0, 'fresh target: reads as zero, so no write-zeroes at all');
  }
});

t.test('an NBD target gets WRITE requests of at most 1 MiB, pipelined from 4 MiB runs, each byte once', async (t) => {
  const r = await serve(t, 809);
  const log = tmpPath(t, 'writes-log', '.txt');
  const target = await memoryTarget(t, ['--filter=log'], [`logfile=${log}`]);
  const job = await backupStart(r.control, target.uri, ['--target-is-zero']);
  const done = await backupWait(r.control, job.id, 60_000);
  t.equal(done.code, 0, 'completed');
  await checkTarget(t, target.uri, r.snapshot, 'split writes');
  const writes = [...fs.readFileSync(log, 'utf8').matchAll(/ Write id=\d+ offset=0x([0-9a-f]+) count=0x([0-9a-f]+)/g)]
    .map((m) => [parseInt(m[1], 16), parseInt(m[2], 16)] as [number, number])
    .sort((a, b) => a[0] - b[0]);
  t.ok(writes.length > 0, `${writes.length} writes logged`);
  t.equal(Math.max(...writes.map(([, n]) => n)), TARGET_REQUEST_BYTES, 'the largest is 1 MiB: longer runs were cut');
  let overlaps = 0;
  let end = 0;
  for (const [o, n] of writes) {
    if (o < end) overlaps++;
    end = Math.max(end, o + n);
  }
  t.equal(overlaps, 0, 'no byte written twice');
  // Runs are cut at 1 MiB from their start, so a full 4 MiB run shows as
  // four requests back to back; at least one such set must be there.
  const at = new Set(writes.map(([o]) => o));
  const fullRun = writes.some(([o, n]) => n === TARGET_REQUEST_BYTES && [1, 2, 3].every((k) => at.has(o + k * TARGET_REQUEST_BYTES)));
  t.ok(fullRun, 'some run went out as four 1 MiB requests back to back');
});

t.test('a split target write that fails settles only after every piece has been answered', async (t) => {
  // One request in flight: the pieces of a 4 MiB write queue behind the
  // first. Every write fails; write() must not reject (and let the caller
  // reuse the buffer) while later pieces still wait to be sent from it.
  const log = tmpPath(t, 'failing-writes', '.log');
  const target = await memoryTarget(t, ['--filter=log', '--filter=error'], ['error-pwrite=EIO', 'error-pwrite-rate=100%', `logfile=${log}`]);
  const opened = await NbdTarget.open(target.uri, { size: SIZE, maxInFlight: 1, targetIsZero: true });
  t.teardown(() => opened.close().catch(() => undefined));
  const pieces = (4 * MiB) / TARGET_REQUEST_BYTES;
  await t.rejects(opened.write(0, [Buffer.alloc(4 * MiB, 0x5a)]), /Input\/output error|EIO/i, 'the write fails with the target\'s EIO');
  const answered = fs
    .readFileSync(log, 'utf8')
    .split('\n')
    .filter((l) => /\.\.\.Write id=\d+/.test(l) && /return=|error/i.test(l)).length;
  t.equal(answered, pieces, `all ${pieces} pieces were answered before write() rejected`);
});

t.test('a target past one block-status request reads as zero only if every part of it does', async (t) => {
  // 40 GiB: ten 4 GiB requests, asked several at a time (targets/nbd.ts).
  const size = 40 * 1024 * MiB;
  for (const at of [null, 0, 21 * 1024 * MiB + 12345, size - 512]) {
    const target = await memoryTarget(t, [], [], size);
    if (at !== null) {
      const w = await qemuIo(target.uri, [`write -P 0x7 ${at} 512`]);
      t.equal(w.code, 0, `wrote 512 bytes at ${at}`);
    }
    const opened = await NbdTarget.open(target.uri, { size });
    t.equal(opened.readsAsZero, false, 'not known to read as zero while the probe runs');
    t.ok(opened.zeroProbe, 'the probe runs after open returned');
    const answer = await opened.zeroProbe;
    t.equal(
      opened.readsAsZero,
      at === null,
      at === null ? 'a fresh 40 GiB target reads as zero' : `512 bytes at ${at}: does not read as zero`,
    );
    t.equal(answer, opened.readsAsZero, 'the probe settles with the answer readsAsZero then holds');
    t.equal(opened.zeroProbe, null, 'and is gone once answered');
    await opened.close();
  }
});

t.test('the zero probe runs beside the job\'s own writes and leaves them out', async (t) => {
  // The job writes data while the probe runs (targets/nbd.ts): what the job
  // wrote itself is no sign of a used target; anything else still is.
  const size = 40 * 1024 * MiB;
  const data = Buffer.alloc(MiB, 0x5a);
  const cases: Array<{ own: number[]; foreign: number | null; zero: boolean; what: string }> = [
    { own: [0, 21 * 1024 * MiB, size - MiB], foreign: null, zero: true, what: 'own writes at the start, middle and end only' },
    { own: [0, 21 * 1024 * MiB], foreign: 30 * 1024 * MiB + 4096, zero: false, what: 'own writes, and 512 foreign bytes elsewhere' },
    { own: [21 * 1024 * MiB], foreign: 21 * 1024 * MiB + MiB, zero: false, what: 'foreign bytes right after an own write' },
  ];
  for (const c of cases) {
    // Each answer held back 200 ms: the own writes have landed when the
    // probe looks, whichever part of the disk it asks about first.
    const target = await memoryTarget(t, ['--filter=delay'], ['delay-extents=200ms'], size);
    if (c.foreign !== null) {
      const w = await qemuIo(target.uri, [`write -P 0x7 ${c.foreign} 512`]);
      t.equal(w.code, 0, `${c.what}: wrote 512 foreign bytes at ${c.foreign}`);
    }
    const opened = await NbdTarget.open(target.uri, { size });
    t.ok(opened.zeroProbe, `${c.what}: the probe is running`);
    // The probe (ten 4 GiB requests, eight at a time) must find them and
    // leave them out.
    await Promise.all(c.own.map((at) => opened.write(at, [data])));
    await opened.zeroProbe;
    t.equal(opened.readsAsZero, c.zero, `${c.what}: ${c.zero ? 'reads as zero' : 'does not read as zero'}`);
    await opened.close();
  }
});

t.test('data goes to the target while its zero probe runs; zero ranges wait for the answer', async (t) => {
  // Block status held back 1 s by nbdkit's delay filter: the job's data
  // writes land meanwhile (and the probe then sees them as data, which it
  // must leave out); the disk's zero ranges wait and need no write-zeroes.
  const log = tmpPath(t, 'probe-log', '.txt');
  const target = await memoryTarget(t, ['--filter=log', '--filter=delay'], [`logfile=${log}`, 'delay-extents=1']);
  const r = await serve(t, 808); // holes and zero-filled runs among the data
  const job = await backupStart(r.control, target.uri, []);
  const done = await backupWait(r.control, job.id, 60_000);
  t.equal(done.code, 0, 'completed');
  await checkTarget(t, target.uri, r.snapshot, 'target probed during the copy');
  const lines = fs.readFileSync(log, 'utf8').split('\n');
  const firstWriteDone = lines.findIndex((l) => / \.\.\.Write id=\d+ return=0/.test(l));
  const probeDone = lines.findIndex((l) => / \.\.\.Extents id=\d+ /.test(l));
  t.ok(firstWriteDone >= 0 && probeDone >= 0, 'the log has the writes and the probe\'s answer');
  t.ok(firstWriteDone < probeDone, `data reached the target before the probe answered (log lines ${firstWriteDone} and ${probeDone})`);
  t.match(lines[probeDone], /extents=\(0x0 0x[0-9a-f]+ "(?!hole)/, 'the probe saw the job\'s own data');
  t.equal(lines.filter((l) => / Zero id=\d+ offset=/.test(l)).length, 0, 'no write-zeroes: it read as zero apart from the job\'s own writes');
});

// ------------------------------------------------------------ bad input

// A loop device stands in for an LV or a disk; it needs root and losetup.
const loopOk = canUseLoopDevices();

t.test('a block device as a file: target: a big enough one ends exact; a smaller one and /dev/null are refused at once', { skip: !loopOk && 'needs root and losetup' }, async (t) => {
  const r = await serve(t, 909);
  const loops: string[] = [];
  t.teardown(() => {
    for (const l of loops) execFileSync('losetup', ['-d', l]);
  });
  /** A loop device over a file of `size` bytes of 0xa5, so zero ranges the target is not told of would show. */
  const loopOver = (backing: string, size: number): string => {
    fs.writeFileSync(backing, Buffer.alloc(size, 0xa5));
    const dev = execFileSync('losetup', ['-f', '--show', backing], { encoding: 'utf8' }).trim();
    loops.push(dev);
    return dev;
  };

  const smallBacking = tmpPath(t, 'small', '.img');
  const small = loopOver(smallBacking, SIZE / 2);
  const refused = await cli(['backup', 'start', '--control', r.control, '--target', `file:${small}`]);
  t.not(refused.code, 0, 'a block device smaller than the disk: non-zero exit');
  oneLine(t, refused.stderr, new RegExp(`^nbd-cbw: error: target block device ${small} is ${SIZE / 2} bytes, smaller than the ${SIZE}-byte disk`), 'smaller block device');
  t.ok(fs.readFileSync(smallBacking).equals(Buffer.alloc(SIZE / 2, 0xa5)), 'nothing was written to it');

  const devNull = await cli(['backup', 'start', '--control', r.control, '--target', 'file:/dev/null']);
  t.not(devNull.code, 0, '/dev/null: non-zero exit');
  oneLine(t, devNull.stderr, /^nbd-cbw: error: target \/dev\/null is not a regular file or a block device, so it cannot hold the backup/, '/dev/null');
  t.same((await controlHttp(r.control, 'GET', '/v1/jobs')).body, [], 'neither refused start left a job behind');

  const bigBacking = tmpPath(t, 'big', '.img');
  const big = loopOver(bigBacking, SIZE + 4 * MiB);
  const started = await backupStart(r.control, `file:${big}`);
  // The guest writes over clusters the job may not have saved yet.
  await guestMustSucceed(t, r.cbw.uri, guestCommands(mulberry32(909), SIZE, 24), 'guest writes during the backup');
  const end = await backupWait(r.control, started.id);
  t.equal(end.code, 0, `the job completed (${end.last?.state} ${end.last?.error ?? ''})`);
  t.ok((end.last?.bytesSkipped ?? 0) > 0, 'the disk had zero ranges, written to the device as zeroes');
  execFileSync('losetup', ['-d', loops.pop() as string]);
  const onDevice = tmpPath(t, 'ondevice', '.raw');
  const fd = fs.openSync(bigBacking, 'r');
  const head = Buffer.alloc(SIZE);
  t.equal(fs.readSync(fd, head, 0, SIZE, 0), SIZE, 'read back the disk-sized head of the device');
  const tail = Buffer.alloc(4 * MiB);
  t.equal(fs.readSync(fd, tail, 0, tail.length, SIZE), tail.length, 'and the rest');
  fs.closeSync(fd);
  fs.writeFileSync(onDevice, head);
  const diff = compareImages(r.snapshot, onDevice);
  t.equal(diff, null, diff ? `device differs: ${diff}` : 'the device holds the point-in-time image');
  t.ok(tail.equals(Buffer.alloc(tail.length, 0xa5)), 'and nothing past the disk\'s size was touched');
});

t.test('the disk itself as a file: target is refused, whatever path names it', async (t) => {
  const r = await serve(t, 910);
  const symlink = tmpPath(t, 'disk-symlink', '.raw');
  fs.symlinkSync(r.image, symlink);
  const hardlink = tmpPath(t, 'disk-hardlink', '.raw');
  fs.linkSync(r.image, hardlink);
  for (const [what, p] of [['the same path', r.image], ['a symlink', symlink], ['a hard link', hardlink]] as const) {
    const res = await cli(['backup', 'start', '--control', r.control, '--target', `file:${p}`]);
    t.not(res.code, 0, `${what}: non-zero exit`);
    oneLine(t, res.stderr, /^nbd-cbw: error: target \S+ is the disk being backed up: the backup would overwrite the guest's writes with old data$/, what);
  }
  t.same((await controlHttp(r.control, 'GET', '/v1/jobs')).body, [], 'no job was started');
  t.equal(compareImages(r.snapshot, r.image), null, 'the disk is untouched');
});

t.test("the disk's own NBD exports are refused as targets: nbd-cbw's, under any spelling, and an NBD source's", async (t) => {
  // Written there, a backup would put the disk's old data over the guest's
  // acknowledged writes and still report completed: before this check it did.
  const r = await serve(t, 912);
  const link = tmpPath(t, 'cbw-link', '.sock');
  fs.symlinkSync(r.cbw.socket, link);
  const own = [
    ['its socket', nbdUnixUri(r.cbw.socket, 'disk')],
    ['another export name', nbdUnixUri(r.cbw.socket, 'other')],
    ['a symlink to its socket', nbdUnixUri(link)],
  ] as const;
  for (const [what, uri] of own) {
    const res = await cli(['backup', 'start', '--control', r.control, '--target', uri]);
    t.not(res.code, 0, `${what}: non-zero exit`);
    oneLine(t, res.stderr, /^nbd-cbw: error: target \S+ is nbd-cbw's own export of the disk being backed up: the backup would overwrite the guest's writes with old data$/, what);
  }
  // A relative socket path, from where the caller runs the CLI.
  const rel = await run(process.execPath, [NBD_CBW_BIN, 'backup', 'start', '--control', r.control, '--target', `nbd+unix:///?socket=${link.split('/').pop()}`], {
    cwd: link.slice(0, link.lastIndexOf('/')),
    timeoutMs: 30_000,
  });
  t.not(rel.code, 0, 'a relative path to the symlink: non-zero exit');
  oneLine(t, rel.stderr, /is nbd-cbw's own export of the disk being backed up/, 'a relative path to the symlink');
  t.same((await controlHttp(r.control, 'GET', '/v1/jobs')).body, [], 'no job was started');
  t.equal(compareImages(r.snapshot, r.image), null, 'the disk is untouched');

  // nbd-cbw in front of qemu-nbd: the same export of qemu-nbd is the disk too.
  const image = tmpPath(t, 'qdisk', '.raw');
  makeMixedImage(image, SIZE, 913);
  const before = tmpPath(t, 'qsnap', '.raw');
  fs.copyFileSync(image, before);
  const q = await startQemuNbd(t, image);
  const cbw = await startNbdCbw(t, ['--source', nbdUnixUri(q.socket, 'disk')]);
  const res = await cli(['backup', 'start', '--control', controlOf(cbw), '--target', nbdUnixUri(q.socket, 'disk')]);
  t.not(res.code, 0, 'the source export: non-zero exit');
  oneLine(t, res.stderr, /^nbd-cbw: error: target \S+ is the disk being backed up \(the source export\): the backup would overwrite/, 'the source export');
  t.same((await controlHttp(controlOf(cbw), 'GET', '/v1/jobs')).body, [], 'no job was started on the NBD source either');
  t.equal(compareImages(before, image), null, 'the NBD source is untouched');
});

t.test('target and spill paths are the caller\'s: the CLI resolves them; the API refuses relative ones', async (t) => {
  const r = await serve(t, 914);
  const dir = tmpPath(t, 'callers-dir');
  fs.mkdirSync(dir);
  fs.mkdirSync(`${dir}/spill`);
  const res = await run(
    process.execPath,
    [NBD_CBW_BIN, 'backup', 'start', '--control', r.control, '--target', 'file:backup.raw', '--spill-dir', 'spill', '--wait', '--json'],
    { cwd: dir, timeoutMs: 60_000 },
  );
  t.equal(res.code, 0, `relative target and spill dir: completed (${res.stderr.trim()})`);
  const first = JSON.parse(res.stdout.trim().split('\n')[0]) as JobJson;
  t.equal(first.target, `file:${dir}/backup.raw`, 'the job was given the absolute path');
  t.equal(compareImages(r.snapshot, `${dir}/backup.raw`), null, 'the backup is in the caller\'s directory, exact');
  for (const [what, body, re] of [
    ['file: target', { target: 'file:backup2.raw' }, /"target" must be absolute, not "backup2.raw"/],
    ['nbd+unix socket', { target: 'nbd+unix:///?socket=t.sock' }, /"target" must be absolute, not "t.sock"/],
    ['spill dir', { target: `file:${dir}/backup3.raw`, spillDir: 'spill' }, /"spillDir" must be an absolute path/],
  ] as const) {
    const api = await controlHttp(r.control, 'POST', '/v1/jobs', body);
    t.equal(api.status, 400, `API, relative ${what}: 400`);
    t.match((api.body as { error?: string }).error, re, `API, relative ${what}: says why`);
  }
  t.notOk(fs.existsSync(`${dir}/backup3.raw`), 'a refused request made no target file');
});

t.test("a file: target another process writes is refused; the job holds QEMU's lock bytes until it ends", async (t) => {
  const r = await serve(t, 915);
  // qemu-nbd serving an image read-write holds QEMU's "write" lock byte.
  const busy = tmpPath(t, 'busy', '.raw');
  makeImage(busy, SIZE, 'random', 915);
  const busyBefore = fs.readFileSync(busy);
  await startQemuNbd(t, busy);
  const res = await cli(['backup', 'start', '--control', r.control, '--target', `file:${busy}`]);
  t.not(res.code, 0, 'an image qemu-nbd serves read-write: non-zero exit');
  oneLine(t, res.stderr, /^nbd-cbw: error: target \S+ is in use: another process writes to it \(it holds QEMU's "write" lock\)/, 'an image qemu-nbd writes');
  t.ok(fs.readFileSync(busy).equals(busyBefore), 'that image is untouched');
  t.same((await controlHttp(r.control, 'GET', '/v1/jobs')).body, [], 'no job was started');

  // Served read-only, it may be written; while the job runs, QEMU cannot open it for writing.
  const shared = tmpPath(t, 'read-only-served', '.raw');
  makeImage(shared, SIZE, 'random', 916);
  await startQemuNbd(t, shared, { readOnly: true });
  const job = await backupStart(r.control, `file:${shared}`, ['--speed', '8M']);
  t.match(job.state, /^(running|starting)$/, 'an image qemu-nbd serves read-only: the job starts');
  const during = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 1 0 4k', shared], { timeoutMs: 30_000 });
  t.not(during.code, 0, 'qemu-io cannot write it while the job runs');
  t.match(during.stderr + during.stdout, /Failed to get "write" lock/, 'QEMU says the write lock is taken');
  const unlimited = await cli(['backup', 'set-speed', '0', '--control', r.control]);
  t.equal(unlimited.code, 0, 'set-speed 0');
  const w = await backupWait(r.control, job.id, 60_000);
  t.equal(w.last?.state, 'completed', 'the job completes');
  t.equal(compareImages(r.snapshot, shared), null, 'the target holds the point-in-time image');
  const after = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 1 0 4k', shared], { timeoutMs: 30_000 });
  t.equal(after.code, 0, `after the job, QEMU may write it again (${after.stderr.trim()})`);
});

t.test('a backup of a read-only export whose file another process writes is refused; once that stops, it runs exact', async (t) => {
  // A read-only file export shares writes (as qemu-nbd -r does), so here a
  // writer nbd-cbw cannot see is possible: its writes would never be saved first.
  const image = tmpPath(t, 'ro-disk', '.raw');
  makeMixedImage(image, SIZE, 917);
  const cbw = await startNbdCbw(t, ['--source', `file:${image}`, '-r']);
  const writer = await startQemuNbd(t, image);
  const target = tmpPath(t, 'ro-backup', '.raw');
  const res = await cli(['backup', 'start', '--control', controlOf(cbw), '--target', `file:${target}`]);
  t.not(res.code, 0, 'refused while qemu-nbd serves the file read-write');
  oneLine(t, res.stderr, /^nbd-cbw: error: cannot back up the disk: another process writes to \S+ \(it holds QEMU's "write" lock\), and this export does not see those writes/, 'a writer behind the export');
  t.notOk(fs.existsSync(target), 'no target file was made');
  await writer.stop();
  const snapshot = tmpPath(t, 'ro-snap', '.raw');
  fs.copyFileSync(image, snapshot);
  const ok = await cli(['backup', 'start', '--control', controlOf(cbw), '--target', `file:${target}`, '--wait', '--json'], 60_000);
  t.equal(ok.code, 0, 'with the writer gone, the backup completes', { output: ok.code ? ok.describe() : undefined });
  t.equal(compareImages(snapshot, target), null, 'and holds the disk');
});

t.test('a block device served as the disk is refused as its own target, under another device node too', { skip: !loopOk && 'needs root and losetup' }, async (t) => {
  const backing = tmpPath(t, 'served', '.img');
  makeMixedImage(backing, SIZE, 911);
  const loop = execFileSync('losetup', ['-f', '--show', backing], { encoding: 'utf8' }).trim();
  t.teardown(() => execFileSync('losetup', ['-d', loop]));
  const cbw = await startNbdCbw(t, ['--source', `file:${loop}`]);
  const control = controlOf(cbw);
  // A second node for the same device, as /dev/mapper and /dev/dm-N are.
  const [major, minor] = execFileSync('stat', ['-c', '%t %T', loop], { encoding: 'utf8' }).trim().split(' ').map((h) => parseInt(h, 16));
  const alias = tmpPath(t, 'alias', '.dev');
  execFileSync('mknod', [alias, 'b', String(major), String(minor)]);
  for (const [what, p] of [['the device', loop], ['another node for it', alias]] as const) {
    const res = await cli(['backup', 'start', '--control', control, '--target', `file:${p}`]);
    t.not(res.code, 0, `${what}: non-zero exit`);
    oneLine(t, res.stderr, /is the disk being backed up/, what);
  }
  t.same((await controlHttp(control, 'GET', '/v1/jobs')).body, [], 'no job was started');
});

t.test('bad input gets clear one-line errors', async (t) => {
  const target = await memoryTarget(t, ['--filter=rate'], ['rate=100M']);
  const r = await serve(t, 808);

  const bogus = await cli(['backup', 'start', '--control', r.control, '--target', 'bogus:xyz']);
  t.not(bogus.code, 0, 'bad target URI: non-zero exit');
  oneLine(t, bogus.stderr, /^nbd-cbw: error: unrecognised target "bogus:xyz"/, 'bad target URI');

  const missing = await cli(['backup', 'start', '--control', r.control, '--target', `nbd+unix:///?socket=${tmpPath(t, 'nothing', '.sock')}`]);
  t.not(missing.code, 0, 'target socket that does not exist: non-zero exit');
  oneLine(t, missing.stderr, /^nbd-cbw: error: .*(ENOENT|no such file|connect)/i, 'unreachable target');

  const q = await cli(['backup', 'start', '--control', r.control, '--target', target.uri, '--buffer', '12Q']);
  t.not(q.code, 0, '--buffer 12Q: non-zero exit');
  oneLine(t, q.stderr, /^nbd-cbw: error: bad --buffer "12Q"/, '--buffer 12Q');

  const cs = await cli(['backup', 'start', '--control', r.control, '--target', target.uri, '--cluster-size', '3K']);
  t.not(cs.code, 0, '--cluster-size 3K: non-zero exit');
  oneLine(t, cs.stderr, /power of two/, '--cluster-size 3K');

  const pol = await cli(['backup', 'start', '--control', r.control, '--target', target.uri, '--on-cbw-error', 'ignore']);
  t.not(pol.code, 0, '--on-cbw-error ignore: non-zero exit');
  t.match(pol.stderr, /ignore/, 'names the bad choice');

  const dur = await cli(['backup', 'start', '--control', r.control, '--target', target.uri, '--cbw-timeout', 'soon']);
  t.not(dur.code, 0, '--cbw-timeout soon: non-zero exit');
  oneLine(t, dur.stderr, /bad duration "soon"/, '--cbw-timeout soon');

  const zeroTimeout = await cli(['backup', 'start', '--control', r.control, '--target', target.uri, '--cbw-timeout', '0']);
  t.not(zeroTimeout.code, 0, '--cbw-timeout 0: non-zero exit');
  oneLine(t, zeroTimeout.stderr, /^nbd-cbw: error: bad --cbw-timeout "0": must be at least 1ms$/, '--cbw-timeout 0');
  const apiZero = await controlHttp(r.control, 'POST', '/v1/jobs', { target: target.uri, cbwTimeoutMs: 0 });
  t.equal(apiZero.status, 400, 'the API refuses cbwTimeoutMs 0 too');

  const manyWorkers = await cli(['backup', 'start', '--control', r.control, '--target', target.uri, '--workers', '1000']);
  t.not(manyWorkers.code, 0, '--workers 1000: non-zero exit');
  oneLine(t, manyWorkers.stderr, /^nbd-cbw: error: bad --workers "1000": expected an integer from 1 to 256$/, '--workers 1000');

  const spillTarget = tmpPath(t, 'spill-refused', '.raw');
  const spill = await cli(['backup', 'start', '--control', r.control, '--target', `file:${spillTarget}`, '--spill-dir', `${spillTarget}.nodir`]);
  t.not(spill.code, 0, '--spill-dir that does not exist: non-zero exit');
  oneLine(t, spill.stderr, /^nbd-cbw: error: cannot create a spill file in \S+\.nodir: ENOENT: no such file or directory$/, '--spill-dir that does not exist');
  t.notOk(fs.existsSync(spillTarget), 'and the new target file was not made');

  const noCtl = await cli(['backup', 'status'], 30_000, { ...process.env, NBD_CBW_CONTROL: '' });
  t.not(noCtl.code, 0, 'no control address: non-zero exit');
  oneLine(t, noCtl.stderr, /no control address/, 'no control address');

  // None of the refused starts left a job behind.
  const list = await controlHttp(r.control, 'GET', '/v1/jobs');
  t.same(list.body, [], 'no job was created by the bad requests');

  // A second job while one runs: 409.
  const first = await backupStart(r.control, target.uri, ['--speed', '4M']);
  const second = await cli(['backup', 'start', '--control', r.control, '--target', `file:${tmpPath(t, 't2', '.raw')}`]);
  t.not(second.code, 0, 'second start: non-zero exit');
  oneLine(t, second.stderr, /a backup job is already running on this export/, 'second start');
  const http2 = await controlHttp(r.control, 'POST', '/v1/jobs', { target: `file:${tmpPath(t, 't3', '.raw')}` });
  t.equal(http2.status, 409, 'the API answers 409 Conflict');
  t.match((http2.body as { error?: string }).error ?? '', /already running/, 'with the reason');
  const still = await backupStatus(r.control);
  t.equal(still.id, first.id, 'the first job is untouched');
  t.match(still.state, /^(running|starting)$/, 'and still running');
  await backupAction(r.control, 'cancel', first.id);

  // Unknown job ids.
  const unknown = await cli(['backup', 'status', 'no-such-job', '--control', r.control]);
  t.not(unknown.code, 0, 'unknown job: non-zero exit');
  oneLine(t, unknown.stderr, /no job "no-such-job"/, 'unknown job');
});
