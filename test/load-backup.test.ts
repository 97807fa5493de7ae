// Load under a running backup: 8 fio jobs (ioengine=nbd, one NBD connection
// each, iodepth 32) doing mixed random reads and writes of 4k-64k with
// crc32c verification (verify_backlog: written blocks are read back and
// checked during the run), for LOAD_SECONDS (default 60), while nbd-cbw backs
// the disk up to a slow target (nbdkit: delay + rate filters) with a 256 MiB
// buffer. The disk (512 MiB) is bigger than the buffer, so the buffer fills
// and guest writes wait for room: that is the case that must stay bounded.
//
// Checks: fio exits 0 with no job errors and no verify failures; nbd-cbw's
// RSS (VmRSS, sampled every second) stays under buffer + 200 MiB; the job
// never fails. The backup runs for about the whole fio run (the target rate
// is SIZE / LOAD_SECONDS; CBW copies go to the same target, so guest writes
// do not shorten it much); if it completes, the
// target must equal the disk as it was at the start; if it cannot finish
// within a bounded time after fio ends, it is cancelled (the test says
// which). Figures (IOPS, errors, max RSS) are printed as comments.

import t from 'tap';
import * as fs from 'node:fs';
import {
  MiB,
  firstDifference,
  makeImage,
  run,
  startNbdCbw,
  startNbdkit,
  tmpPath,
} from './helpers/peers';
import { RssSampler, controlSocketOf, getJob, jobAction, snapshotFile, startJob, waitJobEnd } from './helpers/faults';

const LOAD_SECONDS = Math.max(5, Number(process.env.LOAD_SECONDS ?? 60) || 60);
const JOBS = 8;
const PER_JOB = 64 * MiB;
const SIZE = JOBS * PER_JOB; // 512 MiB
const BUFFER = 256 * MiB;
const RSS_LIMIT = BUFFER + 200 * MiB;

t.test(`fio ${JOBS} jobs x iodepth 32 randrw 4k-64k verify=crc32c for ${LOAD_SECONDS}s under a backup`, async (t) => {
  const image = tmpPath(t, 'disk', '.img');
  const snapshot = tmpPath(t, 'snap', '.img');
  const targetFile = tmpPath(t, 'target', '.raw');
  makeImage(image, SIZE, 'random', 501);
  snapshotFile(image, snapshot);
  fs.writeFileSync(targetFile, '');
  fs.truncateSync(targetFile, SIZE);

  // The backup should take about as long as the fio run: SIZE / rate = LOAD_SECONDS.
  const bytesPerSecond = Math.ceil(SIZE / LOAD_SECONDS);
  // nbdkit's rate is in bits per second, and its M means 2^20.
  const rateBits = `${Math.ceil((bytesPerSecond * 8) / MiB)}M`;
  const target = await startNbdkit(t, ['--filter=rate', '--filter=delay', 'file', targetFile, `rate=${rateBits}`, 'wdelay=5ms']);
  const cbw = await startNbdCbw(t, ['--source', `file:${image}`]);
  const ctl = { socketPath: controlSocketOf(cbw.socket) };
  const rss = new RssSampler(cbw.pid, 1000);
  t.teardown(() => rss.stop());

  const job = await startJob(ctl, { target: target.uri, bufferBytes: BUFFER });
  const fioOut = tmpPath(t, 'fio', '.json');
  const fioStarted = Date.now();
  const fio = await run(
    'fio',
    [
      '--name=load',
      '--ioengine=nbd',
      `--uri=${cbw.uri}`,
      '--rw=randrw',
      '--bsrange=4k-64k',
      '--iodepth=32',
      `--numjobs=${JOBS}`,
      `--size=${PER_JOB}`,
      `--offset_increment=${PER_JOB}`, // each job its own region: verification stays exact
      '--time_based',
      `--runtime=${LOAD_SECONDS}`,
      '--verify=crc32c',
      '--verify_backlog=512',
      '--verify_fatal=0',
      '--output-format=json',
      `--output=${fioOut}`,
    ],
    { timeoutMs: (LOAD_SECONDS + 60) * 1000 },
  );
  const fioSeconds = (Date.now() - fioStarted) / 1000;
  const atFioEnd = await getJob(ctl, job.id);

  t.equal(fio.code, 0, 'fio exits 0', { out: fio.describe() });
  t.notMatch(fio.stdout + fio.stderr, /verify: bad|bad magic|crc32c: verify failed|verify failed/i, 'fio reports no verify failure');
  const report = JSON.parse(fs.readFileSync(fioOut, 'utf8')) as {
    jobs: Array<{ error: number; total_err?: number; read: { iops: number; total_ios: number }; write: { iops: number; total_ios: number } }>;
  };
  t.equal(report.jobs.length, JOBS, `${JOBS} fio jobs ran`);
  const errors = report.jobs.reduce((n, j) => n + (j.error ? 1 : 0) + (j.total_err ?? 0), 0);
  t.equal(errors, 0, 'no fio job error', { errors: report.jobs.map((j) => ({ error: j.error, total_err: j.total_err })) });
  const readIops = report.jobs.reduce((n, j) => n + j.read.iops, 0);
  const writeIops = report.jobs.reduce((n, j) => n + j.write.iops, 0);
  const ios = report.jobs.reduce((n, j) => n + j.read.total_ios + j.write.total_ios, 0);
  t.ok(ios > 0 && report.jobs.every((j) => j.write.total_ios > 0 && j.read.total_ios > 0), `every job read and wrote (${ios} I/Os)`);

  t.comment(`backup at fio end: ${atFioEnd.state}, ${atFioEnd.bytesDone} of ${atFioEnd.bytesTotal} bytes, buffer peak ${atFioEnd.bufferHighWater}`);
  t.notOk(['failed', 'cancelled'].includes(atFioEnd.state), `the backup did not fail during the load (${atFioEnd.state}${atFioEnd.error ? `: ${atFioEnd.error}` : ''})`);

  // Let the backup finish, within a bound; else cancel it.
  const grace = Math.max(15, Math.ceil(LOAD_SECONDS * 0.3)) * 1000;
  let end = await waitJobEnd(ctl, job.id, grace).catch(() => null);
  const endedAfterFio = (Date.now() - fioStarted) / 1000 - fioSeconds;
  let outcome: string;
  if (!end) {
    const c = await jobAction(ctl, job.id, 'cancel');
    t.equal(c.status, 200, 'the unfinished backup is cancelled');
    end = await waitJobEnd(ctl, job.id, 10_000);
    t.equal(end.state, 'cancelled', 'and ends cancelled');
    outcome = `cancelled: not finished ${grace / 1000} s after fio (${end.bytesDone} of ${end.bytesTotal} bytes)`;
  } else {
    t.equal(end.state, 'completed', 'the backup completed', { status: end });
    outcome =
      `${atFioEnd.state === 'completed' ? 'completed before fio ended' : `completed ${endedAfterFio.toFixed(1)} s after fio`} ` +
      `(buffer peak ${(end.bufferHighWater / MiB).toFixed(0)} MiB, ${end.guestCopies} guest-triggered copies)`;
  }
  rss.stop();
  const maxRss = rss.max;
  t.ok(rss.samples.length >= Math.floor(fioSeconds) - 2, `RSS sampled every second (${rss.samples.length} samples)`);
  t.ok(maxRss < RSS_LIMIT, `nbd-cbw max RSS ${(maxRss / MiB).toFixed(1)} MiB < buffer + 200 MiB (${RSS_LIMIT / MiB} MiB)`);

  if (end.state === 'completed') {
    await cbw.stop();
    await target.stop();
    t.equal(firstDifference(targetFile, snapshot), null, 'the target equals the disk as it was when the backup started');
  }
  t.comment(
    `load ${LOAD_SECONDS}s: ${Math.round(readIops + writeIops)} IOPS (read ${Math.round(readIops)}, write ${Math.round(writeIops)}), ` +
      `${errors} errors, 0 verify failures, max RSS ${(maxRss / MiB).toFixed(1)} MiB (idle ${(rss.samples[0] / MiB).toFixed(1)} MiB), target ${rateBits}bit/s; backup ${outcome}`,
  );
});
