// CowBuffer's spill file (its own logic, a real spill file on disk, a
// recording target): spilled runs that touch join into one queued run up to
// the largest write, and every byte still reaches the target where it
// belongs.

import t from 'tap';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { CowBuffer } from '../src/copy/cow-buffer';
import type { BackupTarget } from '../src/targets/types';
import { openSpillFiles } from './helpers/peers';

const K = 1024;
const CS = 64 * K;

/** A target whose writes wait at a gate until opened, and land in memory. */
class GatedTarget implements BackupTarget {
  readonly description = 'gated memory target';
  readonly readsAsZero = true;
  readonly maxWrite = 32 * 1024 * K;
  readonly data: Buffer;
  readonly writes: { offset: number; length: number }[] = [];
  private open: Promise<void>;
  private opener: () => void = () => undefined;

  constructor(size: number) {
    this.data = Buffer.alloc(size);
    this.open = new Promise((r) => (this.opener = r));
  }
  release(): void {
    this.opener();
  }
  async write(offset: number, data: readonly Buffer[]): Promise<void> {
    await this.open;
    let at = offset;
    for (const b of data) {
      b.copy(this.data, at);
      at += b.length;
    }
    this.writes.push({ offset, length: at - offset });
  }
  async writeZeroes(offset: number, length: number): Promise<void> {
    await this.open;
    this.data.fill(0, offset, offset + length);
  }
  async commit(): Promise<void> {}
  async close(): Promise<void> {}
}

function pattern(offset: number, length: number): Buffer {
  const b = Buffer.alloc(length);
  for (let i = 0; i < length; i += 4) b.writeUInt32LE(((offset + i) * 2654435761) >>> 0, i);
  return b;
}

/** A buffer with no RAM, only a spill file in `dir`; runs and writes of up to `maxClusters`. */
function spillOnlyBuffer(
  target: BackupTarget,
  dir: string,
  maxClusters: number,
  writers: number,
  fatal: (e: Error) => void,
): CowBuffer {
  return new CowBuffer(
    target,
    {
      ramBytes: 0,
      backgroundBytes: 0,
      backgroundInBuffer: false,
      spillDir: dir,
      spillInBytes: maxClusters * CS,
      spillOutBytes: maxClusters * CS,
      spillInBuffer: false,
      clusterSize: CS,
      maxWrite: maxClusters * CS,
      writers,
      retryAttempts: 1,
      retryBaseMs: 1,
      retryMaxMs: 1,
    },
    { written: () => undefined, retry: () => undefined, fatal, fullWait: () => undefined },
  );
}

for (const [maxClusters, mostRuns] of [
  [64, 3],
  [4, 20],
] as const) {
  t.test(`spilled runs that touch join up to the largest write (${maxClusters} clusters); the bytes land in place`, async (t) => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cbw-spill-test-'));
    t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
    const clusters = 40;
    // The disk ends in a partial cluster, which can join the run before it.
    const size = clusters * CS - 512;
    const target = new GatedTarget(size);
    const buffer = spillOnlyBuffer(target, dir, maxClusters, 1, (e) => t.fail(e.message));
    t.equal(await buffer.reserve(CS), 'spill', 'no RAM: runs go to the spill file');

    // Clusters 0-39 in a shuffled order, one run each (the last one partial);
    // the target holds the first write at its gate meanwhile.
    const order = Array.from({ length: clusters }, (_, i) => i);
    for (let i = order.length - 1; i > 0; i--) {
      const j = (i * 7919 + 13) % (i + 1);
      [order[i], order[j]] = [order[j], order[i]];
    }
    const adds: Promise<void>[] = [];
    for (const c of order) {
      const length = Math.min(CS, size - c * CS);
      adds.push(buffer.add({ offset: c * CS, length, where: 'spill', data: pattern(c * CS, length), urgent: true }));
    }
    await Promise.all(adds);
    // The first run is already being written (it cannot grow), and the
    // others arrive in any order: with room for the whole disk in one write
    // they end as the runs before and after it.
    t.ok(buffer.queuedRuns <= mostRuns, `40 one-cluster runs make ${buffer.queuedRuns} queued runs (at most ${mostRuns})`);
    t.equal(buffer.spillBytes, size, 'every byte is in the spill file');

    target.release();
    await buffer.whenEmpty();
    t.ok(target.data.equals(pattern(0, size)), 'the target holds every byte in its place');
    t.ok(
      target.writes.every((w) => w.length <= maxClusters * CS),
      `no write over the largest write (${Math.max(...target.writes.map((w) => w.length))} bytes)`,
    );
    t.ok(target.writes.length <= mostRuns + 1, `${target.writes.length} target writes for 40 clusters`);
    t.equal(buffer.spillBytes, 0, 'the spill file gave every slot back');
    buffer.stop(new Error('test over'));
  });
}

t.test('stopping with runs still spilled closes the spill file and counts nothing spilled', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cbw-spill-test-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const clusters = 64;
  const target = new GatedTarget(clusters * CS); // never released: everything stays queued
  const buffer = spillOnlyBuffer(target, dir, 4, 2, () => undefined);
  const adds: Promise<void>[] = [];
  // Every other cluster, so the runs cannot join: 32 queued runs.
  for (let c = 0; c < clusters; c += 2) {
    adds.push(buffer.add({ offset: c * CS, length: CS, where: 'spill', data: pattern(c * CS, CS), urgent: true }));
  }
  await Promise.all(adds);
  t.equal(buffer.spillBytes, (clusters / 2) * CS, 'the runs are in the spill file');
  t.equal(openSpillFiles(dir).length, 1, 'one spill file is open');
  buffer.stop(new Error('cancelled'));
  t.equal(buffer.spillBytes, 0, 'nothing counts as spilled once stopped');
  t.equal(buffer.queuedRuns, 0, 'no run left queued');
  // The target writes still at the gate hold spill reads; the file closes
  // when the last operation on it has settled.
  target.release();
  for (let i = 0; i < 100 && openSpillFiles(dir).length > 0; i++) await new Promise((r) => setTimeout(r, 20));
  t.equal(openSpillFiles(dir).length, 0, 'the spill file is closed');
});
