// nbd-cbw killed with SIGKILL in the middle of a backup, under guest writes.
//
// The guest (our own NbdClient, 8 workers) writes seeded random data of
// random lengths at random offsets; each 64 KiB region belongs to one worker
// with one request in flight, so no two writes in flight overlap and the log
// orders the writes to each byte. Every write's outcome is logged: acked, or
// failed when the connection died (those may or may not have landed).
//
// After the kill, read the source file directly: every byte holds the latest
// acknowledged write to it (or the original data), except where a write that
// was in flight at the kill may have landed. "Acknowledged means on the
// source" has no exceptions, even for a proxy that dies without warning.
//
// Then nbd-cbw is started again on the same source and socket: it serves
// (qemu-io reads, qemu-img compare agrees with the file), it has no job
// history (`backup status` fails: no backup job has run), and the target the killed
// process left behind is incomplete (differs from the snapshot), so nothing
// could take it for a finished backup.

import t from 'tap';
import * as fs from 'node:fs';
import {
  KiB,
  MiB,
  NBD_CBW_BIN,
  firstDifference,
  makeImage,
  readAt,
  run,
  startNbdCbw,
  tmpPath,
  waitFor,
} from './helpers/peers';
import { RegionGuest, closeGuest, connectGuest, controlSocketOf, getJob, httpRequest, snapshotFile, startJob } from './helpers/faults';

const SIZE = 64 * MiB;
const REGION = 64 * KiB;
const REGIONS = 512; // the first 32 MiB get guest writes

t.test('SIGKILL during a backup under guest writes: every acknowledged write is on the source', async (t) => {
  const image = tmpPath(t, 'disk', '.img');
  const snapshot = tmpPath(t, 'snap', '.img');
  const targetFile = tmpPath(t, 'backup', '.raw');
  makeImage(image, SIZE, 'random', 401);
  snapshotFile(image, snapshot);

  const socket = tmpPath(t, 'cbw', '.sock');
  const cbw = await startNbdCbw(t, ['--source', `file:${image}`], { socket });
  const ctl = { socketPath: controlSocketOf(socket) };
  // 2 MiB/s background copy (guest-triggered copies are not limited): the
  // backup is still running when we kill it.
  const job = await startJob(ctl, { target: `file:${targetFile}`, speed: 2 * MiB });

  const client = await connectGuest(socket);
  t.teardown(() => closeGuest(client));
  const guest = new RegionGuest(
    { regionSize: REGION, regionCount: REGIONS, workers: 8, seed: 41, minLength: 512, maxLength: 64 * KiB, align: 512 },
    (o, n) => readAt(snapshot, o, n),
  );
  guest.start(client);
  const startedAt = Date.now();
  await waitFor(() => guest.acked.length >= 300 && Date.now() - startedAt > 1500, {
    timeoutMs: 30_000,
    what: '300 acknowledged guest writes',
  });
  const before = await getJob(ctl, job.id);
  t.equal(before.state, 'running', `backup running at the kill (${before.bytesDone} of ${before.bytesTotal} bytes done)`);
  t.ok(before.bytesDone < SIZE, 'and not complete');
  t.ok(before.guestCopies > 0, `guest writes triggered copies (${before.guestCopies})`);

  const inFlightAtKill = guest.pending.length;
  const res = await cbw.stop('SIGKILL');
  t.equal(res.signal, 'SIGKILL', 'nbd-cbw died of SIGKILL');
  await guest.stop(10_000);
  t.ok(client.isClosed, 'the guest saw its connection die');

  const acked = guest.acked.length;
  const uncertain = guest.failed;
  t.ok(uncertain.every((o) => o.connectionLost), 'the only failed writes are those cut off by the kill');
  t.ok(uncertain.length <= 8, `at most one write per worker was in flight at the kill (${uncertain.length})`);
  const direct = guest.verifyAll((o, n) => readAt(image, o, n));
  t.same(direct.problems, [], 'the source file holds every acknowledged write (the latest one per byte)');
  t.equal(direct.ackedVerified, acked, 'every acknowledged write verified');
  t.comment(
    `verified ${direct.ackedVerified} acknowledged writes in ${guest.regionsWritten().length} regions ` +
      `(${uncertain.length} writes in flight at the kill, ${inFlightAtKill} pending just before it)`,
  );
  // Bytes the guest never wrote are the original ones: check the rest of the disk too.
  t.ok(readAt(image, REGIONS * REGION, SIZE - REGIONS * REGION).equals(readAt(snapshot, REGIONS * REGION, SIZE - REGIONS * REGION)), 'the rest of the disk is untouched');

  // The partial target.
  t.ok(fs.existsSync(targetFile), 'the killed job left its target file');
  t.not(firstDifference(targetFile, snapshot), null, 'the target is incomplete: it differs from the snapshot');

  // Restart on the same source and socket.
  const cbw2 = await startNbdCbw(t, ['--source', `file:${image}`], { socket });
  const io = await run('qemu-io', ['-f', 'raw', '-c', 'read 0 64k', '-c', `read ${SIZE - 64 * KiB} 64k`, cbw2.uri], { timeoutMs: 30_000 });
  t.equal(io.code, 0, 'qemu-io reads through the restarted nbd-cbw', { out: io.describe() });
  t.notMatch(io.stdout + io.stderr, /error|failed/i, 'without errors');
  const cmp = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', cbw2.uri, image], { timeoutMs: 60_000 });
  t.equal(cmp.code, 0, 'qemu-img compare: it serves the source file as it is', { out: cmp.describe() });

  const status = await run(process.execPath, [NBD_CBW_BIN, 'backup', 'status', '--json', '--control', controlSocketOf(socket)], {
    timeoutMs: 20_000,
  });
  t.not(status.code, 0, '`backup status` fails after the restart', { out: status.describe() });
  t.match(status.stderr, /no backup job has run on this export yet/, 'saying no job has run');
  t.notMatch(status.stdout, /completed/, 'and shows no completed job');
  const list = await httpRequest(ctl, 'GET', '/v1/jobs');
  t.equal(list.status, 200, 'GET /v1/jobs answers');
  t.same(list.json, [], 'with an empty job history');
});
