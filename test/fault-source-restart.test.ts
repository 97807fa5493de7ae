// The NBD source goes away under a busy guest: qemu-nbd is killed (SIGKILL)
// and started again on the same socket path while our own NBD client writes
// seeded random data through nbd-cbw and reads it back.
//
// - Restart inside the reconnect window (10 s): requests in flight and new
//   ones wait (their latency spans the outage), then all succeed; read-back
//   checks during the run match; at the end the disk (read through nbd-cbw,
//   and the image file read directly) holds exactly the acknowledged writes.
// - Source down past a short window (--reconnect-window 2s): requests fail
//   with EIO after waiting about the window, never earlier and never with a
//   silent success: every write that returned success is in the image file
//   (read directly once qemu-nbd is back), and a write that failed may or may
//   not be there. Once qemu-nbd is back nbd-cbw serves again without a restart.
//
// The guest (RegionGuest in helpers/faults.ts) keeps every region owned by
// one worker with one request in flight, so the check is exact per byte.

import t, { type Test } from 'tap';
import * as fs from 'node:fs';
import { NbdError } from '../src/nbd-protocol';
import {
  MiB,
  KiB,
  makeImage,
  readAt,
  run,
  sleep,
  startNbdCbw,
  startQemuNbd,
  tmpPath,
  waitFor,
  type Peer,
} from './helpers/peers';
import { RegionGuest, closeGuest, connectGuest, snapshotFile } from './helpers/faults';

const SIZE = 32 * MiB;
const REGION = 64 * KiB;
const REGIONS = 256; // 16 MiB of the disk is written

interface Rig {
  image: string;
  original: string;
  qemuSocket: string;
  qemu: Peer;
  cbw: Peer;
}

async function rig(t: Test, window: string, seed: number): Promise<Rig> {
  const image = tmpPath(t, 'disk', '.img');
  const original = tmpPath(t, 'orig', '.img');
  makeImage(image, SIZE, 'random', seed);
  snapshotFile(image, original);
  const qemuSocket = tmpPath(t, 'qemu-nbd', '.sock');
  const qemu = await startQemuNbd(t, image, { socket: qemuSocket });
  const cbw = await startNbdCbw(t, ['--source', qemu.uri, '--reconnect-window', window, '-v']);
  return { image, original, qemuSocket, qemu, cbw };
}

/** Start qemu-nbd again on the same socket path (the old socket file is left by SIGKILL). */
async function restartQemu(t: Test, r: Rig): Promise<Peer> {
  fs.rmSync(r.qemuSocket, { force: true });
  r.qemu = await startQemuNbd(t, r.image, { socket: r.qemuSocket });
  return r.qemu;
}

function origReader(file: string) {
  return (offset: number, length: number) => readAt(file, offset, length);
}

t.test('qemu-nbd restarted inside the reconnect window: requests wait, then succeed, data exact', async (t) => {
  const r = await rig(t, '10s', 101);
  const client = await connectGuest(r.cbw.socket);
  t.teardown(() => closeGuest(client));
  const guest = new RegionGuest(
    { regionSize: REGION, regionCount: REGIONS, workers: 8, seed: 7, minLength: 4 * KiB, maxLength: 64 * KiB, align: 4 * KiB, readEvery: 4 },
    origReader(r.original),
  );
  guest.start(client);
  await waitFor(() => guest.acked.length >= 200, { timeoutMs: 20_000, what: '200 acknowledged writes before the outage' });

  const killedAt = Date.now();
  await r.qemu.stop('SIGKILL');
  const outageMs = 2000;
  await sleep(outageMs);
  // Requests issued before or during the outage are stuck, not failed.
  t.ok(guest.ops.some((o) => o.status === 'pending'), 'writes are waiting while the source is down');
  t.equal(guest.failed.length, 0, 'no write failed while the source was down (inside the window)');
  await restartQemu(t, r);
  const backAt = Date.now();
  await waitFor(() => guest.acked.filter((o) => o.startedAt > backAt).length >= 200, {
    timeoutMs: 30_000,
    what: '200 acknowledged writes after qemu-nbd came back',
  });
  await guest.stop();

  const failed = guest.failed;
  t.equal(failed.length, 0, 'no write failed', { failed: failed.slice(0, 5) });
  const badReads = guest.reads.filter((x) => !x.ok);
  t.equal(badReads.length, 0, 'every read-back during the run matched', { badReads: badReads.slice(0, 5) });
  t.ok(guest.reads.length > 20, `read-backs ran (${guest.reads.length})`);
  // Some requests spanned the outage: issued before or during it, answered after the restart.
  const spanned = guest.ops.filter((o) => o.startedAt < backAt && o.endedAt >= backAt && o.status === 'acked');
  const spannedReads = guest.reads.filter((x) => x.startedAt < backAt && x.endedAt >= backAt && x.ok);
  t.ok(spanned.length + spannedReads.length > 0, `${spanned.length} writes and ${spannedReads.length} reads waited through the outage and succeeded`);
  const maxWait = Math.max(...guest.ops.map((o) => o.endedAt - o.startedAt));
  t.ok(maxWait >= outageMs * 0.8, `the longest write waited ${maxWait} ms (outage ${outageMs} ms)`);
  t.match(r.cbw.output(), /reconnected to/, 'nbd-cbw logged the reconnection');

  // Through nbd-cbw: every written region holds exactly the acknowledged data.
  const through = new Map<number, Buffer>();
  for (const reg of guest.regionsWritten()) {
    through.set(reg, Buffer.from(await client.read(guest.regionOffset(reg), REGION)));
  }
  const viaCbw = guest.verifyAll((off) => through.get((off - guest.base) / REGION) as Buffer);
  t.same(viaCbw.problems, [], 'read back through nbd-cbw: every acknowledged write is there');
  await client.close();

  // Directly from the image file, with everything stopped.
  await r.cbw.stop();
  await r.qemu.stop();
  const direct = guest.verifyAll(origReader(r.image));
  t.same(direct.problems, [], 'the image file holds every acknowledged write');
  t.equal(direct.ackedVerified, guest.acked.length, 'all acknowledged writes verified');
  t.comment(`inside the window: ${direct.ackedVerified} acknowledged writes verified, ${guest.reads.length} read-backs, longest wait ${maxWait} ms`);
});

t.test('qemu-nbd down past --reconnect-window 2s: EIO after the window, never a silent success', async (t) => {
  const r = await rig(t, '2s', 202);
  const client = await connectGuest(r.cbw.socket);
  t.teardown(() => closeGuest(client));
  const guest = new RegionGuest(
    { regionSize: REGION, regionCount: REGIONS, workers: 8, seed: 9, minLength: 4 * KiB, maxLength: 64 * KiB, align: 4 * KiB, readEvery: 4 },
    origReader(r.original),
  );
  guest.start(client);
  await waitFor(() => guest.acked.length >= 200, { timeoutMs: 20_000, what: '200 acknowledged writes before the outage' });

  const killedAt = Date.now();
  await r.qemu.stop('SIGKILL');
  // Keep the source down well past the window: several rounds of EIO.
  await waitFor(() => guest.failed.length >= 16 && Date.now() - killedAt > 5000, {
    timeoutMs: 20_000,
    what: 'writes failing while the source stays down',
  });
  const downFor = Date.now() - killedAt;
  await restartQemu(t, r);
  const backAt = Date.now();
  await waitFor(() => guest.acked.filter((o) => o.startedAt > backAt + 100).length >= 100, {
    timeoutMs: 30_000,
    what: 'nbd-cbw serving again once qemu-nbd is back',
  });
  await guest.stop();
  t.comment(`source down for ${downFor} ms`);

  const failed = guest.failed;
  t.ok(failed.length > 0, `${failed.length} writes failed during the outage`);
  t.same(
    failed.filter((o) => o.errno !== NbdError.EIO || o.connectionLost),
    [],
    'every failed write got an EIO reply from nbd-cbw (the guest connection stayed up)',
  );
  // Nothing failed before the window could have run out, and nothing failed outside the outage.
  const early = failed.filter((o) => o.endedAt < killedAt + 2000 - 150);
  t.same(early, [], 'no write failed before the 2 s window was used up');
  const late = failed.filter((o) => o.startedAt > backAt + 2500);
  t.same(late, [], 'no write failed once the source was back');
  const minWait = Math.min(...failed.map((o) => o.endedAt - Math.max(o.startedAt, killedAt)));
  t.comment(`failed writes: ${failed.length}, shortest wait before EIO ${minWait} ms`);
  const failedReads = guest.reads.filter((x) => x.error !== null);
  t.same(
    failedReads.filter((x) => x.errno !== NbdError.EIO),
    [],
    `failed reads (${failedReads.length}) failed with EIO`,
  );
  const badReads = guest.reads.filter((x) => x.error === null && !x.ok);
  t.same(badReads, [], 'every read that succeeded returned the right data');

  // The source itself: restart done, now read the file directly (stop the
  // proxy and qemu-nbd first so nothing is half written).
  await client.close();
  await r.cbw.stop();
  await r.qemu.stop();
  const direct = guest.verifyAll(origReader(r.image));
  t.same(direct.problems, [], 'every acknowledged write is in the image file; failed ones may or may not be');
  t.equal(direct.ackedVerified, guest.acked.length, 'all acknowledged writes verified');
  // qemu-img agrees that nbd-cbw served the file as it is (spot check with a fresh proxy).
  const q = await startQemuNbd(t, r.image);
  const cbw2 = await startNbdCbw(t, ['--source', q.uri, '--reconnect-window', '2s']);
  const cmp = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', cbw2.uri, r.image], { timeoutMs: 60_000 });
  t.equal(cmp.code, 0, 'qemu-img compare: nbd-cbw serves the image file as it is', { out: cmp.describe() });
  t.comment(`past the window: ${direct.ackedVerified} acknowledged writes verified, ${failed.length} failed writes (EIO)`);
});
