// Backup targets that fail, die or hang, with a guest writing through
// nbd-cbw all along.
//
// 1. Flaky target (nbdkit error filter, 5% of pwrites fail with EIO): the
//    job completes, the target equals the disk as it was at the start, the
//    job counts its retries (exactly the errors nbdkit injected), and the
//    source was never re-read for a retry: the source is nbdkit's file
//    plugin behind its log filter, and the reads nbd-cbw made cover the disk
//    exactly once (no byte twice); nbd_cbw_backup_copied_bytes agrees.
// 2. Target killed (SIGKILL) mid-backup, break-snapshot: the guest sees no
//    error at all, and the job ends failed with a reason naming the target
//    write and the lost connection.
// 3. Target hanging (delay filter, writes take 60 s), --buffer 0,
//    --cbw-timeout 500ms:
//    a. break-snapshot: a guest write to a cluster not yet saved waits the
//       500 ms, then goes through and succeeds; the job fails with a
//       timeout reason.
//    b. break-guest-write: the same write fails with EIO after ~500 ms and
//       is not forwarded (the source keeps its old data); the job keeps
//       running (the snapshot is still valid), until we cancel it.
// 4. Target slow but alive (writes take 1.5 s), break-guest-write, the
//    recovering case: the guest write fails with EIO after 500 ms; the copy
//    it started still lands, so the same write retried later succeeds at
//    once, and the job completes with the target equal to the snapshot.
//
// How we make sure the guest write hits a cluster that is not saved yet
// (scenarios 3 and 4): with --buffer 0 the background sweep still holds up
// to 32 MiB of read-ahead in memory (its own budget), and that read-ahead
// counts as saved. So the disk is 64 MiB, the sweep starts at offset 0, its
// first target writes never finish (3) or take 1.5 s (4), and in (4) we
// also pause the job right after it starts: the guest writes into the last
// cluster, which no worker can have claimed. The job's guestCopies counter
// proves the guest's own copy ran.

import t, { type Test } from 'tap';
import * as fs from 'node:fs';
import { NbdError } from '../src/nbd-protocol';
import {
  KiB,
  MiB,
  firstDifference,
  makeImage,
  randomBuffer,
  readAt,
  startNbdCbw,
  startNbdkit,
  tmpPath,
  waitFor,
  type Peer,
} from './helpers/peers';
import {
  RegionGuest,
  closeGuest,
  connectGuest,
  controlSocketOf,
  getJob,
  jobAction,
  nbdErrno,
  scrapeMetrics,
  snapshotFile,
  startJob,
  waitJobEnd,
  withTimeout,
  type HttpTarget,
} from './helpers/faults';

interface Disk {
  image: string;
  snapshot: string;
}

function disk(t: Test, size: number, seed: number): Disk {
  const image = tmpPath(t, 'disk', '.img');
  const snapshot = tmpPath(t, 'snap', '.img');
  makeImage(image, size, 'random', seed);
  snapshotFile(image, snapshot); // the backup's point in time: nothing writes before the job starts
  return { image, snapshot };
}

function sparseFile(t: Test, size: number, prefix = 'target'): string {
  const f = tmpPath(t, prefix, '.raw');
  fs.writeFileSync(f, '');
  fs.truncateSync(f, size);
  return f;
}

function ctlOf(cbw: Peer): HttpTarget {
  return { socketPath: controlSocketOf(cbw.socket) };
}

/** Sum and overlap of the Read requests in an nbdkit log file. */
function readsInLog(logFile: string): { bytes: number; requests: number; overlaps: number; gaps: number; covered: number } {
  const text = fs.readFileSync(logFile, 'utf8');
  const ranges: Array<[number, number]> = [];
  for (const m of text.matchAll(/ Read id=\d+ offset=0x([0-9a-f]+) count=0x([0-9a-f]+)/g)) {
    const off = parseInt(m[1], 16);
    ranges.push([off, off + parseInt(m[2], 16)]);
  }
  ranges.sort((a, b) => a[0] - b[0]);
  let bytes = 0;
  let overlaps = 0;
  let gaps = 0;
  let end = 0;
  for (const [s, e] of ranges) {
    bytes += e - s;
    if (s < end) overlaps++;
    else if (s > end) gaps++;
    end = Math.max(end, e);
  }
  return { bytes, requests: ranges.length, overlaps, gaps, covered: end };
}

t.test('flaky target (5% of writes fail with EIO): retries complete the backup exactly, no source re-reads', async (t) => {
  const SIZE = 32 * MiB;
  const d = disk(t, SIZE, 301);
  const srcLog = tmpPath(t, 'source', '.log');
  const targetFile = sparseFile(t, SIZE);
  // Servers first, clients later: teardown stops nbd-cbw before the nbdkits.
  const source = await startNbdkit(t, ['--filter=log', 'file', d.image, `logfile=${srcLog}`]);
  const target = await startNbdkit(t, ['--filter=error', 'file', targetFile, 'error=EIO', 'error-pwrite-rate=5%']);
  const cbw = await startNbdCbw(t, ['--source', source.uri]);
  const ctl = ctlOf(cbw);

  // 64K target writes (one cluster each): ~512 writes, ~25 injected errors.
  const job = await startJob(ctl, { target: target.uri, maxChunk: 64 * KiB, workers: 4 });
  const client = await connectGuest(cbw.socket);
  t.teardown(() => closeGuest(client));
  // Guest writes only (no guest reads): every source read in the log is the backup's.
  const guest = new RegionGuest(
    { regionSize: 64 * KiB, regionCount: SIZE / (64 * KiB), workers: 4, seed: 3, minLength: 4 * KiB, maxLength: 64 * KiB, align: 4 * KiB },
    (o, n) => readAt(d.snapshot, o, n),
  );
  guest.start(client);
  const end = await waitJobEnd(ctl, job.id, 120_000);
  await guest.stop();
  await client.close();

  t.equal(end.state, 'completed', 'the job completed', { status: end });
  t.equal(guest.failed.length, 0, 'no guest write failed');
  t.ok(guest.acked.length > 0, `${guest.acked.length} guest writes during the backup`);
  const injected = (target.output().match(/injecting EIO error into pwrite/g) ?? []).length;
  t.ok(end.targetRetries > 0, `the job retried target writes (targetRetries ${end.targetRetries})`);
  t.equal(end.targetRetries, injected, `one retry per injected error (${injected} injected by nbdkit)`);
  t.equal(firstDifference(targetFile, d.snapshot), null, 'the target equals the disk as it was when the backup started');

  // The source was read once per cluster: the retries came from the buffer.
  const m = await scrapeMetrics(ctl);
  t.equal(m.get('nbd_cbw_backup_copied_bytes'), SIZE, 'nbd_cbw_backup_copied_bytes equals the disk size (all data, read once)');
  t.equal(end.bytesCopied, SIZE, 'bytesCopied equals the disk size');
  await cbw.stop(); // flushes the log: nbd-cbw's connection to the source is closed
  await source.stop();
  const reads = readsInLog(srcLog);
  t.equal(reads.overlaps, 0, 'no byte of the source was read twice');
  t.equal(reads.bytes, SIZE, `source reads add up to the disk size exactly (${reads.requests} reads)`);
  t.equal(reads.gaps, 0, 'and cover it without gaps');
  t.comment(
    `flaky target: ${injected} injected EIOs, ${end.targetRetries} retries, ${reads.requests} source reads = ${reads.bytes} bytes, ` +
      `${end.guestCopies} guest-triggered copies`,
  );
});

t.test('target killed mid-backup, break-snapshot: the guest sees nothing, the job fails with a clear reason', async (t) => {
  const SIZE = 32 * MiB;
  const d = disk(t, SIZE, 302);
  // ~4 MB/s: the backup takes ~8 s, long enough to kill the target in the middle.
  const target = await startNbdkit(t, ['--filter=rate', 'memory', `${SIZE}`, 'rate=32M']);
  const cbw = await startNbdCbw(t, ['--source', `file:${d.image}`]);
  const ctl = ctlOf(cbw);
  const job = await startJob(ctl, { target: target.uri, onCbwError: 'break-snapshot', maxChunk: 256 * KiB });
  const client = await connectGuest(cbw.socket);
  t.teardown(() => closeGuest(client));
  const guest = new RegionGuest(
    { regionSize: 64 * KiB, regionCount: SIZE / (64 * KiB), workers: 4, seed: 5, minLength: 4 * KiB, maxLength: 64 * KiB, align: 4 * KiB, thinkMs: 2 },
    (o, n) => readAt(d.snapshot, o, n),
  );
  guest.start(client);
  const mid = await waitFor(
    async () => {
      const s = await getJob(ctl, job.id);
      return s.bytesDone > 2 * MiB ? s : null;
    },
    { timeoutMs: 30_000, what: 'the backup to get going' },
  );
  t.equal(mid.state, 'running', `backup running (${mid.bytesDone} of ${mid.bytesTotal} bytes done) when the target dies`);
  t.ok(mid.bytesDone < SIZE, 'and not finished');
  await target.stop('SIGKILL');
  const killedAt = Date.now();
  const end = await waitJobEnd(ctl, job.id, 60_000);
  const ackedAtEnd = guest.acked.length;
  // The guest goes on after the job ended, too.
  await waitFor(() => guest.acked.length >= ackedAtEnd + 50, { timeoutMs: 20_000, what: 'guest writes after the job failed' });
  await guest.stop();
  await client.close();

  t.equal(end.state, 'failed', 'the job failed');
  t.match(end.error ?? '', /target write .*failed after \d+ attempts/, `the reason names the target write: ${end.error}`);
  // "connection closed by server", or the socket's own ECONNRESET/EPIPE,
  // depending on whether nbd-cbw was reading or writing when nbdkit died.
  t.match(end.error ?? '', /connection closed|closed by server|connection lost|ECONNRESET|EPIPE/i, 'and the lost connection');
  t.comment(`job failed ${Date.now() - killedAt} ms after the kill (retries with backoff): ${end.error}`);
  t.equal(guest.failed.length, 0, `no guest write failed (${guest.acked.length} acknowledged)`);
  await cbw.stop();
  const direct = guest.verifyAll((o, n) => readAt(d.image, o, n));
  t.same(direct.problems, [], 'every acknowledged guest write is on the source');
});

/** One 4K write at `offset`, timed. */
async function timedWrite(client: Awaited<ReturnType<typeof connectGuest>>, offset: number, data: Buffer) {
  const started = Date.now();
  try {
    await withTimeout(client.write(offset, data), 30_000, 'guest write');
    return { ok: true, ms: Date.now() - started, errno: null as number | null, error: '' };
  } catch (e) {
    return { ok: false, ms: Date.now() - started, errno: nbdErrno(e), error: (e as Error).message };
  }
}

t.test('hanging target, --buffer 0 --cbw-timeout 500ms, break-snapshot: the guest write succeeds, the job fails', async (t) => {
  const SIZE = 64 * MiB;
  const d = disk(t, SIZE, 303);
  const target = await startNbdkit(t, ['--filter=delay', 'memory', `${SIZE}`, 'wdelay=60'], {
    // nbdkit 1.32 may abort when a client hangs up during a delayed request (its bug).
    failOnUnexpectedExit: false,
  });
  const cbw = await startNbdCbw(t, ['--source', `file:${d.image}`]);
  const ctl = ctlOf(cbw);
  const job = await startJob(ctl, {
    target: target.uri,
    bufferBytes: 0,
    cbwTimeoutMs: 500,
    onCbwError: 'break-snapshot',
  });
  const client = await connectGuest(cbw.socket);
  t.teardown(() => closeGuest(client));
  // The last cluster: the sweep (32 MiB of read-ahead from offset 0, stuck on the target) cannot have it.
  const at = SIZE - 64 * KiB;
  const data = randomBuffer(4 * KiB, 77);
  const w = await timedWrite(client, at, data);
  t.ok(w.ok, `the guest write succeeded (${w.error || 'no error'})`);
  t.ok(w.ms >= 450, `it waited for the CBW timeout first (${w.ms} ms)`);
  t.ok(w.ms < 5000, 'but not for the target');
  const end = await waitJobEnd(ctl, job.id, 10_000);
  t.equal(end.state, 'failed', 'the job failed');
  t.match(end.error ?? '', /timed out after 500 ms/, `with a timeout reason: ${end.error}`);
  t.equal(end.guestCopies, 1, 'the guest write had started its own copy');
  const w2 = await timedWrite(client, at + 8 * KiB, data);
  t.ok(w2.ok && w2.ms < 450, `later writes pass straight through (${w2.ms} ms)`);
  t.ok(Buffer.from(await client.read(at, 4 * KiB)).equals(data), 'the write is on the disk');
  await client.close();
  await cbw.stop();
  t.ok(readAt(d.image, at, 4 * KiB).equals(data), 'and in the source file');
});

t.test('hanging target, --buffer 0 --cbw-timeout 500ms, break-guest-write: EIO, the snapshot is kept', async (t) => {
  const SIZE = 64 * MiB;
  const d = disk(t, SIZE, 304);
  const target = await startNbdkit(t, ['--filter=delay', 'memory', `${SIZE}`, 'wdelay=60'], {
    // nbdkit 1.32 may abort when a client hangs up during a delayed request (its bug).
    failOnUnexpectedExit: false,
  });
  const cbw = await startNbdCbw(t, ['--source', `file:${d.image}`, '-v']);
  const ctl = ctlOf(cbw);
  const job = await startJob(ctl, {
    target: target.uri,
    bufferBytes: 0,
    cbwTimeoutMs: 500,
    onCbwError: 'break-guest-write',
  });
  const client = await connectGuest(cbw.socket);
  t.teardown(() => closeGuest(client));
  const at = SIZE - 64 * KiB;
  const data = randomBuffer(4 * KiB, 78);
  const w = await timedWrite(client, at, data);
  t.notOk(w.ok, 'the guest write failed');
  t.equal(w.errno, NbdError.EIO, `with EIO (${w.error})`);
  t.ok(w.ms >= 450 && w.ms < 5000, `after the CBW timeout (${w.ms} ms)`);
  // A write error goes back as a bare NBD error number (simple reply): the
  // reason is in nbd-cbw's log.
  await waitFor(() => /write refused to keep the backup snapshot valid: copy-before-write timed out after 500 ms/.test(cbw.output()), {
    timeoutMs: 5000,
    what: 'nbd-cbw to log why the write was refused',
  });
  t.pass('nbd-cbw logged why: the write was refused to keep the snapshot valid (timed out)');
  const s = await getJob(ctl, job.id);
  t.equal(s.state, 'running', 'the job is still running: its snapshot is still valid');
  t.equal(s.error, null, 'with no error');
  t.ok(Buffer.from(await client.read(at, 4 * KiB)).equals(readAt(d.snapshot, at, 4 * KiB)), 'the refused write was not forwarded');
  const c = await jobAction(ctl, job.id, 'cancel');
  t.equal(c.status, 200, 'the job can be cancelled');
  const end = await waitJobEnd(ctl, job.id, 10_000);
  t.equal(end.state, 'cancelled', 'and ends cancelled');
  const w2 = await timedWrite(client, at, data);
  t.ok(w2.ok && w2.ms < 450, `with no job, the write passes (${w2.ms} ms)`);
  await client.close();
  await cbw.stop();
  t.ok(readAt(d.image, at, 4 * KiB).equals(data), 'and is in the source file');
});

t.test('slow target (writes take 1.5 s), break-guest-write: EIO now, exact snapshot once the target catches up', async (t) => {
  const SIZE = 64 * MiB;
  const d = disk(t, SIZE, 305);
  const targetFile = sparseFile(t, SIZE);
  const target = await startNbdkit(t, ['--filter=delay', 'file', targetFile, 'wdelay=1500ms']);
  const cbw = await startNbdCbw(t, ['--source', `file:${d.image}`]);
  const ctl = ctlOf(cbw);
  const job = await startJob(ctl, {
    target: target.uri,
    bufferBytes: 0,
    cbwTimeoutMs: 500,
    onCbwError: 'break-guest-write',
  });
  // Stop the sweep so that the last cluster stays unclaimed (see the top comment).
  const p = await jobAction(ctl, job.id, 'pause');
  t.equal(p.status, 200, 'job paused');
  const client = await connectGuest(cbw.socket);
  t.teardown(() => closeGuest(client));
  const at = SIZE - 64 * KiB;
  const data = randomBuffer(16 * KiB, 79);
  const w = await timedWrite(client, at, data);
  t.notOk(w.ok, 'the guest write failed');
  t.equal(w.errno, NbdError.EIO, `with EIO (${w.error})`);
  t.ok(w.ms >= 450 && w.ms < 1400, `after the CBW timeout, before the target write finished (${w.ms} ms)`);
  t.ok(Buffer.from(await client.read(at, data.length)).equals(readAt(d.snapshot, at, data.length)), 'the refused write was not forwarded');
  let s = await getJob(ctl, job.id);
  t.equal(s.state, 'paused', 'the job is still on (paused)');
  t.equal(s.error, null, 'with no error');
  // The copy the guest started lands on the (slow) target; then the cluster
  // is saved (guestCopies counts a guest's copy once it is saved).
  s = await waitFor(
    async () => {
      const x = await getJob(ctl, job.id);
      return x.guestCopies >= 1 ? x : null;
    },
    { timeoutMs: 10_000, what: 'the guest-triggered copy to reach the target' },
  );
  t.equal(s.guestCopies, 1, 'the guest write had started its own copy, and it finished');
  const w2 = await timedWrite(client, at, data);
  t.ok(w2.ok, `the same write, retried, succeeds (${w2.ms} ms)`);
  t.ok(w2.ms < 450, 'without waiting: its cluster is saved');
  const r = await jobAction(ctl, job.id, 'resume');
  t.equal(r.status, 200, 'job resumed');
  s = await waitJobEnd(ctl, job.id, 60_000);
  t.equal(s.state, 'completed', 'the job completed', { status: s });
  await client.close();
  await cbw.stop();
  t.equal(firstDifference(targetFile, d.snapshot), null, 'the target equals the disk as it was when the backup started');
  t.ok(readAt(d.image, at, data.length).equals(data), 'the source has the retried write');
});
