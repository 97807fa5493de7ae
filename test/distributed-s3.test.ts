// Chunked backups to S3 on a real Ceph radosgw (single-node cluster on
// 127.0.0.1, started by scripts/ceph-cluster for this file):
// - point-in-time: seeded runs with random guest writes (qemu-io) during the
//   backup; each restored backup equals the snapshot taken before its job,
//   `verify` passes and `list` shows every backup;
// - serve-backup read by qemu-img compare and nbdcopy;
// - dedup: an unchanged disk's second backup uploads no chunk, and identical
//   chunks are stored once (both from job status and the bucket listing);
// - faults: verify catches deleted and corrupted chunks; 503s and slow
//   responses from a proxy in front of radosgw are retried to an exact
//   backup; radosgw killed mid-backup fails the job and leaves no manifest.

import t, { type Test } from 'tap';
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import {
  MiB,
  firstDifference,
  makeImage,
  mulberry32,
  startNbdCbw,
  tmpDir,
  tmpPath,
  waitFor,
  writeAt,
} from './helpers/peers';
import {
  backupStart,
  backupStatus,
  backupWait,
  deleteObject,
  getObject,
  guestSession,
  jobEnd,
  jobStatus,
  listBackups,
  listObjects,
  makeMixedImage,
  nbdCbwCli,
  putObject,
  qemuIo,
  startFaultProxy,
  useCephCluster,
  type JobStatusJson,
} from './helpers/ceph';

// A real Ceph cluster and ~20 backups: 2.5 minutes on a 2-CPU machine that
// was also running other work (load 6-8), 4 minutes at load 9-13. nbd-cbw
// shares the CPUs with radosgw and the OSD, so allow a busy machine some
// room beyond the runner's default 300 s (still bounded).
t.setTimeout(480_000);

const cluster = useCephCluster(t);
// Kept until the end of the file: snapshots the later subtests reuse.
const keep = tmpDir(t);

const S3_STYLE = ['--s3-force-path-style'];
const s3Url = (prefix: string) => `s3://${cluster.bucket}/${prefix}`;

interface PitResult {
  id: string;
  snapshot: string;
  status: JobStatusJson;
}

/**
 * One point-in-time backup under guest writes: a seeded disk served by
 * nbd-cbw, a snapshot of it, a backup to `location` with a speed limit so
 * the guest's qemu-io session (rounds of writes, zeroes and discards with
 * pauses between) overlaps the job, then the checks: completed, the guest's
 * writes hit clusters not yet copied, the disk changed, exactly one new
 * backup is listed, and it restores to the snapshot byte for byte and
 * verifies.
 */
async function pitRun(
  t: Test,
  opts: {
    seed: number;
    size: number;
    chunkSize: number;
    speed: string;
    location: string;
    /** Backup IDs in `location` before this run. */
    known: string[];
    endpointArgs?: string[];
    workers?: number;
  },
): Promise<PitResult> {
  const { seed, size, chunkSize, location } = opts;
  const disk = tmpPath(t, 'disk', '.raw');
  makeMixedImage(disk, size, chunkSize, seed);
  const snapshot = path.join(keep, `snap-${seed}-${crypto.randomBytes(3).toString('hex')}.raw`);
  fs.copyFileSync(disk, snapshot);
  const cbw = await startNbdCbw(t, ['--source', `file:${disk}`], { env: cluster.processEnv, nodeArgs: ['--no-warnings'] });

  const job = await backupStart(cluster, cbw.controlSocket, [
    '--target',
    location,
    ...S3_STYLE,
    ...(opts.endpointArgs ?? []),
    '--chunk-size',
    String(chunkSize),
    '--speed',
    opts.speed,
    ...(opts.workers ? ['--workers', String(opts.workers)] : []),
  ]);
  const atGuestStart = await jobStatus(cbw.controlSocket, job.id);
  t.equal(atGuestStart.state, 'running', `seed ${seed}: the job runs when the guest starts writing`);
  // Few writes per round: with 1-2 MiB chunks each write that lands on an
  // uncopied chunk copies the whole chunk at once (not speed-limited), so a
  // dense guest would copy the disk by itself before the background copy
  // gets anywhere; sparse rounds keep both going side by side.
  const session = guestSession(mulberry32(seed * 7919), size, { rounds: 6, perRound: 3, gapMs: 500 });
  await qemuIo(cbw.uri, session);
  const atGuestEnd = await jobStatus(cbw.controlSocket, job.id);
  t.comment(`seed ${seed}: guest done at ${atGuestEnd.bytesDone} of ${size} bytes (${atGuestEnd.state})`);
  const status = await jobEnd(cbw.controlSocket, job.id);
  t.equal(status.state, 'completed', `seed ${seed}: job completed`, { error: status.error });
  t.ok(status.guestCopies > 0, `seed ${seed}: guest writes hit uncopied clusters (${status.guestCopies} copy-before-writes)`);
  const chunks = Math.ceil(size / chunkSize);
  const ts = status.targetStats;
  t.equal(ts.chunksUploaded + ts.chunksDeduplicated + ts.chunksZero, chunks, `seed ${seed}: every chunk accounted for`, { ts });
  t.not(firstDifference(disk, snapshot), null, `seed ${seed}: the guest changed the disk`);
  await cbw.stop();

  const after = (await listBackups(cluster, location, S3_STYLE)).map((b) => b.id);
  const added = after.filter((id) => !opts.known.includes(id));
  t.equal(added.length, 1, `seed ${seed}: list shows exactly one new backup`, { known: opts.known, after });
  t.equal(after.length, opts.known.length + 1, `seed ${seed}: and every earlier one`);
  const id = added[0];

  const restored = tmpPath(t, 'restored', '.raw');
  const r = await nbdCbwCli(cluster, ['restore', location, '--id', id, '--to', `file:${restored}`, ...S3_STYLE]);
  t.equal(r.code, 0, `seed ${seed}: restore exits 0`, { output: r.describe() });
  t.equal(firstDifference(restored, snapshot), null, `seed ${seed}: restored backup == snapshot before the job`);
  fs.rmSync(restored, { force: true });

  const v = await nbdCbwCli(cluster, ['verify', location, '--id', id, ...S3_STYLE]);
  t.equal(v.code, 0, `seed ${seed}: verify passes`, { output: v.describe() });
  t.match(v.stdout, /: OK$/m, `seed ${seed}: verify says OK`);
  return { id, snapshot, status };
}

const PIT_PREFIX = 'pit';
const pit: PitResult[] = [];

t.test('point-in-time backups to S3 under random guest writes (seeded)', async (t) => {
  const seeds = [101, 102, 103, 104, 105, 106, 107, 108, 109, 110];
  for (const [i, seed] of seeds.entries()) {
    await t.test(`seed ${seed}`, async (t) => {
      const res = await pitRun(t, {
        seed,
        size: 32 * MiB,
        chunkSize: i % 2 === 0 ? 1 * MiB : 2 * MiB,
        speed: '3M',
        location: s3Url(PIT_PREFIX),
        known: pit.map((p) => p.id),
        workers: i % 3 === 0 ? 4 : 16,
      });
      pit.push(res);
    });
  }
  const listed = (await listBackups(cluster, s3Url(PIT_PREFIX), S3_STYLE)).map((b) => b.id);
  t.same(
    listed,
    pit.map((p) => p.id).sort(),
    `list ${s3Url(PIT_PREFIX)} shows the ${pit.length} backups, oldest first`,
  );
  const manifests = await listObjects(cluster.s3, cluster.bucket, `${PIT_PREFIX}/backups/`);
  t.equal(manifests.length, seeds.length, 'one manifest object per backup');
  const text = await nbdCbwCli(cluster, ['list', s3Url(PIT_PREFIX), ...S3_STYLE]);
  t.equal(text.code, 0, 'list (table) exits 0');
  for (const p of pit) t.match(text.stdout, p.id, `the table shows ${p.id}`);
});

t.test('serve-backup: qemu-img compare and nbdcopy read the backup byte for byte', async (t) => {
  if (pit.length === 0) {
    t.fail('needs the point-in-time backups');
    return;
  }
  for (const p of [pit[0], pit[pit.length - 1]]) {
    const cmp = await nbdCbwCli(cluster, [
      'serve-backup',
      s3Url(PIT_PREFIX),
      '--id',
      p.id,
      ...S3_STYLE,
      '-U',
      '-',
      '--run',
      `qemu-img compare -f raw -F raw "$uri" ${p.snapshot}`,
    ]);
    t.equal(cmp.code, 0, `qemu-img compare: backup ${p.id} == its snapshot`, { output: cmp.describe() });
    t.match(cmp.stdout, /Images are identical/, 'qemu-img says identical');

    const out = tmpPath(t, 'nbdcopy', '.raw');
    const cp = await nbdCbwCli(cluster, [
      'serve-backup',
      s3Url(PIT_PREFIX),
      '--id',
      p.id,
      ...S3_STYLE,
      '-U',
      '-',
      '--run',
      `nbdcopy --request-size=1048576 --requests=16 "$uri" ${out}`,
    ]);
    t.equal(cp.code, 0, 'nbdcopy from serve-backup exits 0', { output: cp.describe() });
    t.equal(firstDifference(out, p.snapshot), null, `nbdcopy of backup ${p.id} == its snapshot`);
  }
  // Without --id: the newest backup.
  const newest = pit.map((p) => p.id).sort()[pit.length - 1];
  const snap = pit.find((p) => p.id === newest)?.snapshot as string;
  const cmp = await nbdCbwCli(cluster, [
    'serve-backup',
    s3Url(PIT_PREFIX),
    ...S3_STYLE,
    '-U',
    '-',
    '--run',
    `qemu-img compare -f raw -F raw "$uri" ${snap}`,
  ]);
  t.equal(cmp.code, 0, 'serve-backup without --id serves the newest backup', { output: cmp.describe() });
});

/** A backup of a disk nobody writes: start, wait, return the final status. */
async function plainBackup(t: Test, disk: string, location: string, chunkSize: string, extra: string[] = []): Promise<JobStatusJson> {
  const cbw = await startNbdCbw(t, ['--source', `file:${disk}`], { env: cluster.processEnv, nodeArgs: ['--no-warnings'] });
  const job = await backupStart(cluster, cbw.controlSocket, ['--target', location, ...S3_STYLE, '--chunk-size', chunkSize, ...extra]);
  const status = await jobEnd(cbw.controlSocket, job.id);
  t.equal(status.state, 'completed', 'job completed', { error: status.error });
  // `backup status --json` reports what the control API does.
  const cli = await backupStatus(cluster, cbw.controlSocket, job.id);
  t.same(cli.targetStats, status.targetStats, 'backup status --json shows the same target stats');
  await cbw.stop();
  return cli;
}

t.test('dedup: a second backup of an unchanged 256 MiB disk uploads no chunk', async (t) => {
  const size = 256 * MiB;
  const disk = tmpPath(t, 'dedup', '.raw');
  makeImage(disk, size, 'random', 4242);
  const loc = s3Url('dedup');
  const chunks = size / (4 * MiB);

  const first = await plainBackup(t, disk, loc, '4M');
  t.equal(first.targetStats.chunksUploaded, chunks, `first backup uploads all ${chunks} chunks`);
  const objects1 = await listObjects(cluster.s3, cluster.bucket, 'dedup/chunks/');
  t.equal(objects1.length, chunks, `the bucket holds ${chunks} chunk objects`);

  const second = await plainBackup(t, disk, loc, '4M');
  t.equal(second.targetStats.chunksUploaded, 0, 'second backup: targetStats.chunksUploaded == 0');
  t.equal(second.targetStats.bytesUploaded, 0, 'second backup: no bytes uploaded');
  t.equal(second.targetStats.chunksDeduplicated, chunks, `second backup: all ${chunks} chunks deduplicated`);
  const objects2 = await listObjects(cluster.s3, cluster.bucket, 'dedup/chunks/');
  t.same(
    objects2.map((o) => o.key),
    objects1.map((o) => o.key),
    'the chunk objects in the bucket are unchanged (ListObjectsV2)',
  );
  const listed = await listBackups(cluster, loc, S3_STYLE);
  t.equal(listed.length, 2, 'list shows both backups');
  t.equal(listed[1]?.uploadedBytes, 0, 'the second manifest records 0 uploaded bytes');
  t.equal(listed[1]?.referencedBytes, size, 'and references the whole disk');
  const chunkLists = await Promise.all(
    listed.map(async (b) => {
      const m = await getObject(cluster.s3, cluster.bucket, `dedup/backups/${b.id}.manifest.json`);
      return (JSON.parse(m.toString()) as { chunks: Array<string | null> }).chunks;
    }),
  );
  t.same(chunkLists[1], chunkLists[0], 'both manifests name the same chunks');
  t.same(
    [...new Set(chunkLists[0])].map((d) => `dedup/chunks/${d?.slice(0, 2)}/${d}`).sort(),
    objects1.map((o) => o.key).sort(),
    'and those are exactly the chunk objects in the bucket',
  );
});

t.test('dedup: identical 4 MiB regions are stored once', async (t) => {
  const size = 64 * MiB;
  const cs = 4 * MiB;
  const disk = tmpPath(t, 'ident', '.raw');
  makeImage(disk, size, 'zero');
  // 16 regions from 3 distinct contents, plus zero regions.
  const contents = [1, 2, 3].map((s) => {
    const b = Buffer.alloc(cs);
    const rng = mulberry32(9000 + s);
    for (let i = 0; i < cs; i += 4) b.writeUInt32LE(rng(), i);
    return b;
  });
  const layout = [0, 1, 2, 0, 0, -1, 1, 2, -1, 0, 1, 1, 2, -1, 0, 2];
  layout.forEach((k, i) => {
    if (k >= 0) writeAt(disk, i * cs, contents[k]);
  });
  const distinct = new Set(layout.filter((k) => k >= 0)).size;
  const nonZero = layout.filter((k) => k >= 0).length;
  const st = await plainBackup(t, disk, s3Url('ident'), '4M', ['--workers', '16']);
  const objects = await listObjects(cluster.s3, cluster.bucket, 'ident/chunks/');
  t.equal(objects.length, distinct, `object count under chunks/ == ${distinct} distinct chunks`);
  for (const o of objects) t.equal(o.size, cs, `${o.key} is one 4 MiB chunk`);
  t.equal(st.targetStats.chunksZero, layout.length - nonZero, 'zero regions are not stored');
  t.equal(
    st.targetStats.chunksUploaded + st.targetStats.chunksDeduplicated,
    nonZero,
    `uploaded + deduplicated == ${nonZero} non-zero chunks`,
  );
  t.comment(`chunksUploaded=${st.targetStats.chunksUploaded} chunksDeduplicated=${st.targetStats.chunksDeduplicated}`);
  const restored = tmpPath(t, 'restored', '.raw');
  const r = await nbdCbwCli(cluster, ['restore', s3Url('ident'), '--to', `file:${restored}`, ...S3_STYLE]);
  t.equal(r.code, 0, 'restore exits 0', { output: r.describe() });
  t.equal(firstDifference(restored, disk), null, 'restores byte for byte');
});

t.test('verify catches a deleted chunk and a corrupted chunk', async (t) => {
  const size = 16 * MiB;
  const disk = tmpPath(t, 'fault', '.raw');
  makeImage(disk, size, 'random', 777);
  const loc = s3Url('fault');
  await plainBackup(t, disk, loc, '1M');
  const [b] = await listBackups(cluster, loc, S3_STYLE);
  const manifest = JSON.parse((await getObject(cluster.s3, cluster.bucket, `fault/backups/${b.id}.manifest.json`)).toString()) as {
    chunks: Array<string | null>;
  };
  const digests = manifest.chunks.filter((c): c is string => c !== null);
  t.equal(digests.length, 16, '16 data chunks');
  const key = (d: string) => `fault/chunks/${d.slice(0, 2)}/${d}`;

  const ok = await nbdCbwCli(cluster, ['verify', loc, ...S3_STYLE]);
  t.equal(ok.code, 0, 'verify passes before the damage', { output: ok.describe() });

  const gone = digests[3];
  await deleteObject(cluster.s3, cluster.bucket, key(gone));
  const v1 = await nbdCbwCli(cluster, ['verify', loc, ...S3_STYLE]);
  t.equal(v1.code, 1, 'verify exits 1 with a chunk deleted', { output: v1.describe() });
  t.match(v1.stderr, new RegExp(`chunk ${gone} is missing`), 'and names the missing chunk');
  t.match(v1.stdout, /1 PROBLEM/, 'and counts one problem');
  const r1 = await nbdCbwCli(cluster, ['restore', loc, '--to', `file:${tmpPath(t, 'r', '.raw')}`, ...S3_STYLE]);
  t.not(r1.code, 0, 'restore fails too', { output: r1.describe() });
  t.match(r1.stderr, gone, 'restore names the missing chunk');

  const bad = digests[9];
  const original = await getObject(cluster.s3, cluster.bucket, key(bad));
  const corrupted = Buffer.from(original);
  corrupted[12345] ^= 0x01; // one bit, same length
  await putObject(cluster.s3, cluster.bucket, key(bad), corrupted);
  const v2 = await nbdCbwCli(cluster, ['verify', loc, '--json', ...S3_STYLE]);
  t.equal(v2.code, 1, 'verify exits 1 with a chunk corrupted', { output: v2.describe() });
  const res = JSON.parse(v2.stdout.trim()) as { ok: boolean; problems: string[] };
  t.equal(res.ok, false, 'verify --json: ok false');
  t.equal(res.problems.length, 2, 'two problems: the deleted and the corrupted chunk');
  t.ok(
    res.problems.some((p) => p.includes(bad) && /corrupt/.test(p)),
    'the corrupted chunk is named as corrupt',
    { problems: res.problems },
  );
  t.ok(res.problems.some((p) => p.includes(gone) && /missing/.test(p)), 'the deleted chunk is still named');
  const v3 = await nbdCbwCli(cluster, ['verify', loc, ...S3_STYLE]);
  t.match(v3.stderr, new RegExp(`chunk ${bad} is corrupt`), 'text verify names the corrupted chunk');

  // Repair both and verify passes again.
  await putObject(cluster.s3, cluster.bucket, key(bad), original);
  const idx = manifest.chunks.indexOf(gone);
  const data = Buffer.alloc(MiB);
  const fd = fs.openSync(disk, 'r');
  fs.readSync(fd, data, 0, MiB, idx * MiB);
  fs.closeSync(fd);
  await putObject(cluster.s3, cluster.bucket, key(gone), data);
  const v4 = await nbdCbwCli(cluster, ['verify', loc, ...S3_STYLE]);
  t.equal(v4.code, 0, 'verify passes once both chunks are repaired', { output: v4.describe() });
});

t.test('503s and slow responses from S3 are retried to an exact backup', async (t) => {
  const proxy = await startFaultProxy(t, {
    upstreamPort: Number(cluster.env.RGW_PORT),
    putErrorRate: 0.2,
    slowRate: 0.15,
    slowMs: [100, 700],
    seed: 31337,
  });
  const known: string[] = [];
  for (const seed of [201, 202]) {
    await t.test(`seed ${seed} through the fault proxy`, async (t) => {
      const res = await pitRun(t, {
        seed,
        size: 32 * MiB,
        chunkSize: 1 * MiB,
        speed: '3M',
        location: s3Url('flaky'),
        known,
        endpointArgs: ['--s3-endpoint', proxy.endpoint],
      });
      known.push(res.id);
      t.comment(`job retries seen by the engine: ${res.status.targetRetries}`);
    });
  }
  t.comment(`proxy: ${JSON.stringify(proxy.stats)}`);
  t.ok(proxy.stats.injected503 >= 5, `the proxy answered ${proxy.stats.injected503} of ${proxy.stats.puts} PUTs with 503`);
  t.ok(proxy.stats.slowed >= 5, `and slowed ${proxy.stats.slowed} responses`);
});

t.test('radosgw killed mid-backup: the job fails and no manifest is written', async (t) => {
  const size = 32 * MiB;
  const disk = tmpPath(t, 'killed', '.raw');
  makeImage(disk, size, 'random', 555);
  const loc = s3Url('killed');
  // A complete backup first, so "list shows no new backup" has something to show.
  await plainBackup(t, disk, loc, '1M');
  const before = (await listBackups(cluster, loc, S3_STYLE)).map((b) => b.id);
  const manifestsBefore = (await listObjects(cluster.s3, cluster.bucket, 'killed/backups/')).map((o) => o.key);
  const chunksBefore = (await listObjects(cluster.s3, cluster.bucket, 'killed/chunks/')).length;
  t.equal(before.length, 1, 'one complete backup before');
  // Change the disk so the next backup must upload new chunks.
  makeImage(disk, size, 'random', 556);

  const cbw = await startNbdCbw(t, ['--source', `file:${disk}`], { env: cluster.processEnv, nodeArgs: ['--no-warnings'] });
  const job = await backupStart(cluster, cbw.controlSocket, ['--target', loc, ...S3_STYLE, '--chunk-size', '1M', '--speed', '4M']);
  const mid = await waitFor(
    async () => {
      const s = await jobStatus(cbw.controlSocket, job.id);
      return s.bytesDone >= size / 4 ? s : null;
    },
    { timeoutMs: 60_000, intervalMs: 200, what: 'a quarter of the backup' },
  );
  t.equal(mid.state, 'running', `killing radosgw at ${mid.bytesDone} of ${size} bytes`);
  await cluster.script('rgw-stop', ['--kill']);
  const started = Date.now();
  const { code, status } = await backupWait(cluster, cbw.controlSocket, job.id, 200_000);
  t.comment(`the job ended ${((Date.now() - started) / 1000).toFixed(1)} s after radosgw died: ${status.error}`);
  t.not(code, 0, 'backup wait exits non-zero');
  t.equal(status.state, 'failed', 'the job failed');
  t.match(status.error ?? '', /S3|ECONNREFUSED|connect|socket/i, 'with an error naming the S3 failure');
  t.ok(status.bytesDone < size, 'before everything was copied');
  await cbw.stop();

  await cluster.script('rgw-start');
  const after = (await listBackups(cluster, loc, S3_STYLE)).map((b) => b.id);
  t.same(after, before, 'list shows no new backup');
  const manifestsAfter = (await listObjects(cluster.s3, cluster.bucket, 'killed/backups/')).map((o) => o.key);
  t.same(manifestsAfter, manifestsBefore, 'no new manifest object in the bucket');
  const chunksAfter = (await listObjects(cluster.s3, cluster.bucket, 'killed/chunks/')).length;
  t.ok(chunksAfter > chunksBefore, `the failed job had stored ${chunksAfter - chunksBefore} new chunks, none of them referenced by a manifest`);
  // What was uploaded before the failure is only unreferenced chunks; the old backup is intact.
  const v = await nbdCbwCli(cluster, ['verify', loc, ...S3_STYLE]);
  t.equal(v.code, 0, 'the earlier backup still verifies', { output: v.describe() });
});
