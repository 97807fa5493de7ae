// Backups to Ceph RBD over NBD (qemu-nbd serving `rbd:rbd/IMAGE`, export
// name "" so the target is nbd+unix:///?socket=SOCK) on a real single-node
// cluster on 127.0.0.1 started by scripts/ceph-cluster for this file.
//
// Seeded point-in-time runs: random guest writes (qemu-io: writes, zeroes,
// discards) go through nbd-cbw while the backup runs; the RBD image is then
// read back twice, with nbdcopy from qemu-nbd's socket and with
// `rbd export`, and both must equal the snapshot taken before the job.
// Half of the runs also take their source disk from an RBD image (the
// rbd-backed export nbd-cbw is meant to sit in front of).

import t, { type Test } from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { MiB, firstDifference, mulberry32, run, startNbdCbw, tmpDir, tmpPath, type RunResult } from './helpers/peers';
import { backupStart, guestSession, jobEnd, jobStatus, makeMixedImage, qemuIo, startRbdNbd, useCephCluster } from './helpers/ceph';

const cluster = useCephCluster(t);

const SIZE = 32 * MiB;

async function mustRun(t: Test, what: string, cmd: string, args: string[], timeoutMs = 120_000): Promise<RunResult> {
  const r = await run(cmd, args, { timeoutMs, env: cluster.processEnv });
  if (r.code !== 0) throw new Error(`${what} failed:\n${r.describe()}`);
  return r;
}

interface RunSpec {
  seed: number;
  rbdSource: boolean;
  clusterSize: string;
  workers: number;
  targetIsZero: boolean;
}

async function rbdRun(t: Test, spec: RunSpec): Promise<void> {
  const { seed } = spec;
  const dir = tmpDir(t);
  const local = tmpPath(t, 'disk', '.raw');
  makeMixedImage(local, SIZE, MiB, seed);
  const snapshot = tmpPath(t, 'snap', '.raw');

  let sourceSpec: string;
  if (spec.rbdSource) {
    // The source disk is an RBD image too, filled from the local image.
    const src = await startRbdNbd(t, cluster, `src-${seed}`, '32M', path.join(dir, 'src.sock'));
    await mustRun(t, 'filling the source image', 'nbdcopy', [local, src.uri]);
    await mustRun(t, 'snapshot of the source image', 'nbdcopy', [src.uri, snapshot]);
    t.equal(firstDifference(snapshot, local), null, `seed ${seed}: the RBD source holds the seeded disk`);
    sourceSpec = src.uri;
  } else {
    fs.copyFileSync(local, snapshot);
    sourceSpec = `file:${local}`;
  }
  const target = await startRbdNbd(t, cluster, `backup-${seed}`, '32M', path.join(dir, 'tgt.sock'));
  t.equal(target.uri, `nbd+unix:///?socket=${target.socket}`, 'qemu-nbd without -x exports the name ""');
  const cbw = await startNbdCbw(t, ['--source', sourceSpec], { env: cluster.processEnv, nodeArgs: ['--no-warnings'] });

  const job = await backupStart(cluster, cbw.controlSocket, [
    '--target',
    target.uri,
    '--cluster-size',
    spec.clusterSize,
    '--workers',
    String(spec.workers),
    '--speed',
    '4M',
    ...(spec.targetIsZero ? ['--target-is-zero'] : []),
  ]);
  const atStart = await jobStatus(cbw.controlSocket, job.id);
  t.equal(atStart.state, 'running', `seed ${seed}: the job runs when the guest starts writing`);
  // Sparse rounds with pauses, so the guest and the (speed-limited) background
  // copy run side by side instead of the guest copying the disk by itself.
  await qemuIo(cbw.uri, guestSession(mulberry32(seed * 104729), SIZE, { rounds: 6, perRound: 4, gapMs: 500 }));
  const atEnd = await jobStatus(cbw.controlSocket, job.id);
  t.comment(`seed ${seed}: guest done at ${atEnd.bytesDone} of ${SIZE} bytes (${atEnd.state})`);
  const status = await jobEnd(cbw.controlSocket, job.id);
  t.equal(status.state, 'completed', `seed ${seed}: job completed`, { error: status.error });
  t.ok(status.guestCopies > 0, `seed ${seed}: guest writes hit uncopied clusters (${status.guestCopies} copy-before-writes)`);

  // What the guest sees now differs from the snapshot (the writes landed).
  const now = tmpPath(t, 'now', '.raw');
  await mustRun(t, 'reading the disk through nbd-cbw', 'nbdcopy', [cbw.uri, now]);
  t.not(firstDifference(now, snapshot), null, `seed ${seed}: the guest changed the disk`);
  await cbw.stop();

  // Read the RBD image back two ways.
  const viaNbd = tmpPath(t, 'via-nbd', '.raw');
  await mustRun(t, 'nbdcopy from qemu-nbd', 'nbdcopy', ['--request-size=1048576', target.uri, viaNbd]);
  t.equal(firstDifference(viaNbd, snapshot), null, `seed ${seed}: RBD image via qemu-nbd == snapshot before the job`);
  const viaRbd = tmpPath(t, 'via-rbd', '.raw');
  await mustRun(t, 'rbd export', 'rbd', ['-c', cluster.env.CEPH_CONF, 'export', '--no-progress', `rbd/backup-${seed}`, viaRbd]);
  t.equal(firstDifference(viaRbd, snapshot), null, `seed ${seed}: rbd export == snapshot before the job`);
}

t.test('point-in-time backups to RBD (qemu-nbd over rbd) under random guest writes (seeded)', async (t) => {
  const clusterSizes = ['64K', '256K', '1M'];
  for (let i = 0; i < 10; i++) {
    const spec: RunSpec = {
      seed: 301 + i,
      rbdSource: i % 2 === 1,
      clusterSize: clusterSizes[i % 3],
      workers: i % 4 === 0 ? 4 : 16,
      targetIsZero: i % 3 === 2,
    };
    await t.test(
      `seed ${spec.seed}: ${spec.rbdSource ? 'RBD' : 'file'} source, cluster ${spec.clusterSize}` +
        `${spec.targetIsZero ? ', --target-is-zero' : ''}`,
      (t) => rbdRun(t, spec),
    );
  }
});
