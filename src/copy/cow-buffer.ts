// The cow buffer: old cluster contents saved for guest writes, waiting to be
// written to the (slow) target. Guests wait only for a place in here.
//
// Where a run's bytes live:
//   ram     in `data`, counted against the RAM budget
//   spill   in the spill file at `slots` (cluster-sized slots), when RAM was
//           full and a spill directory was given; slots are punched out and
//           reused once the run reaches the target
//   zero    nothing held: the run read back as zeros
//
// A spilled run that touches a queued spilled run joins it (up to the
// largest write): a guest writing all over the disk while RAM is full
// leaves one small object per few MiB spilled, not one per cluster (a
// 100 GiB spill of 64 KiB runs would be 1.6 million objects).
//
// Runs leave oldest-first. A writer takes the oldest queued run and joins
// the queued runs that touch it on either side, up to the largest write, so
// the target sees few large requests. A failed write is retried from the
// buffered bytes with backoff, never by re-reading the source.

import fs from 'node:fs';
import path from 'node:path';
import { loadFileOps } from '../device/native';
import type { BackupTarget } from '../targets/types';
import { settleAll } from '../util/settle';
import { IntKeyMap, InsertionQueue } from '../util/churn-tables';
import { Budget, BudgetBuffers, Deferred, backoffMs, sleep } from './sync';

export interface BufferedRun {
  offset: number;
  length: number;
  where: 'ram' | 'spill' | 'zero';
  data: Buffer | null;
  slots: number[] | null;
  writing: boolean;
  /** Gives back the memory this run was counted against, once. */
  release: (() => void) | null;
  /** Settled when the run reached the target (or the buffer stopped). */
  written: (() => void) | null;
  /** Saved for a guest write: written before background runs. */
  urgent: boolean;
  /** Places in the two queues (InsertionQueue). */
  queuePos: number;
  urgentPos: number;
}

export interface RunToAdd {
  offset: number;
  length: number;
  where: 'ram' | 'spill' | 'zero';
  data: Buffer | null;
  release?: () => void;
  written?: () => void;
  urgent?: boolean;
}

export interface CowBufferOptions {
  /** RAM for guest-saved runs. */
  ramBytes: number;
  /** RAM for the background sweep's runs on their way to the target. */
  backgroundBytes: number;
  /** The background share was carved out of --buffer: report it as part of the buffer. */
  backgroundInBuffer: boolean;
  spillDir?: string;
  /** RAM for guest-saved runs on their way into the spill file. */
  spillInBytes: number;
  /** RAM for spilled runs read back for a target write. */
  spillOutBytes: number;
  /** The two spill shares were carved out of --buffer: report them as part of it. */
  spillInBuffer: boolean;
  clusterSize: number;
  /** Largest target write after coalescing. */
  maxWrite: number;
  /** Target writes in flight at once. */
  writers: number;
  /** Attempts per target write before the job fails. */
  retryAttempts: number;
  retryBaseMs: number;
  retryMaxMs: number;
}

export interface CowBufferEvents {
  /** Bytes reached the target (data or zeroes). */
  written(bytes: number, seconds: number, zero: boolean): void;
  retry(error: Error): void;
  /** A write failed for good: the job must fail. */
  fatal(error: Error): void;
  /** A guest had to wait for RAM: the buffer was full and there is no spill file. */
  fullWait(): void;
}

/**
 * A new spill file in `dir`, open read-write and already unlinked, so that
 * its space goes away with the process, even on a crash. Throws a one-line
 * reason when `dir` cannot hold one.
 */
export function makeSpillFile(dir: string): number {
  const p = path.join(dir, `nbd-cbw-spill-${process.pid}-${Date.now()}`);
  let fd: number;
  try {
    fd = fs.openSync(p, fs.constants.O_RDWR | fs.constants.O_CREAT | fs.constants.O_EXCL, 0o600);
  } catch (e) {
    throw new Error(`cannot create a spill file in ${dir}: ${(e as Error).message.replace(/, open .*$/, '')}`);
  }
  fs.unlinkSync(p);
  return fd;
}

export class CowBuffer {
  /** Guest-saved runs in RAM. */
  readonly ram: Budget;
  /** The background sweep's runs, read and not yet on the target. */
  readonly background: Budget;
  /** Buffers for guest-saved runs (their bytes reserved in `ram` first). */
  readonly ramBuffers: BudgetBuffers;
  /**
   * The guest share was reserved whole at the start, as cluster-sized
   * buffers (BudgetBuffers.preallocate): RAM runs are then one cluster
   * each, and take whole clusters from it.
   */
  readonly ramPreallocated: boolean;
  /** Buffers for the sweep's runs (their bytes acquired from `background` first). */
  readonly backgroundBuffers: BudgetBuffers;
  /**
   * Spilled data passes through RAM twice: a guest-saved run on its way into
   * the spill file (`spillIn`), and spilled runs read back for a target
   * write (`spillOut`). Two budgets, so a guest never waits behind target
   * writes for room; with a large --buffer both are part of it, so that
   * --buffer bounds the RAM with a spill file as without.
   */
  readonly spillIn: Budget;
  readonly spillOut: Budget;
  /** Buffers for guest-saved runs going into the spill file (bytes acquired from `spillIn` first). */
  readonly spillInBuffers: BudgetBuffers;
  private readonly spillOutBuffers: BudgetBuffers;
  // Queues and indexes of runs are not Sets and Maps: with a run added and
  // removed per cluster saved, those would promote every run and table they
  // ever held (see util/churn-tables).
  private readonly queue = new InsertionQueue<'queuePos', BufferedRun>('queuePos');
  /**
   * The guest-saved subset of `queue`: written first, so a guest waiting on
   * the target (--buffer 0) or for room in RAM is not stuck behind the
   * background sweep's data (seed 003's priority for awaited clusters).
   */
  private readonly urgentQueue = new InsertionQueue<'urgentPos', BufferedRun>('urgentPos');
  /** Queued runs by their first cluster (keyOf(offset)). */
  private readonly byStart = new IntKeyMap<BufferedRun>();
  /** Queued runs by the cluster after their last (keyOf(offset + length)). */
  private readonly byEnd = new IntKeyMap<BufferedRun>();
  private activeWriters = 0;
  private spillFd: number | null = null;
  private spillNextSlot = 0;
  private readonly spillFree: number[] = [];
  private spillUsed = 0;
  /** Spill-file operations in flight (writes, reads, punches). */
  private spillPending = 0;
  private spillClosing = false;
  private ramHighWater = 0;
  private stopped = false;
  private emptyWaiters: Deferred[] = [];

  constructor(
    private readonly target: BackupTarget,
    private readonly opts: CowBufferOptions,
    private readonly events: CowBufferEvents,
  ) {
    // The spill file is made now, not when RAM first runs out: a spill
    // directory that does not exist or cannot be written is then an error
    // at the backup's start, not a failed backup once the guest needs it.
    if (opts.spillDir !== undefined) this.openSpill();
    this.ram = new Budget(opts.ramBytes);
    this.background = new Budget(opts.backgroundBytes);
    this.ramBuffers = new BudgetBuffers(this.ram);
    this.ramPreallocated = opts.ramBytes > 0 && this.ramBuffers.preallocate(opts.clusterSize);
    this.backgroundBuffers = new BudgetBuffers(this.background);
    this.spillIn = new Budget(opts.spillInBytes);
    this.spillOut = new Budget(opts.spillOutBytes);
    this.spillInBuffers = new BudgetBuffers(this.spillIn);
    this.spillOutBuffers = new BudgetBuffers(this.spillOut);
  }

  /** --buffer: the guest share, plus the background and spill shares when they were carved out of it. */
  get ramCapacity(): number {
    return (
      this.opts.ramBytes +
      (this.opts.backgroundInBuffer ? this.opts.backgroundBytes : 0) +
      (this.opts.spillInBuffer ? this.opts.spillInBytes + this.opts.spillOutBytes : 0)
    );
  }
  get ramUsed(): number {
    return (
      this.ram.inUse +
      (this.opts.backgroundInBuffer ? this.backgroundHeld : 0) +
      (this.opts.spillInBuffer ? this.spillIn.inUse + this.spillOut.inUse : 0)
    );
  }

  /**
   * Bytes the sweep read and holds (not its workers' passing reservations of
   * the background budget, which are not memory yet).
   */
  private backgroundHeld = 0;

  /** The sweep read `bytes` (positive) or let them go (negative). */
  noteBackground(bytes: number): void {
    this.backgroundHeld += bytes;
    this.noteUse();
  }
  get spillBytes(): number {
    return this.spillUsed;
  }
  get highWater(): number {
    return this.ramHighWater;
  }
  get queuedRuns(): number {
    return this.queue.size;
  }
  get hasSpill(): boolean {
    return this.opts.spillDir !== undefined;
  }
  /** With no RAM and no spill, guests wait for target writes (the slow case). */
  get isDirect(): boolean {
    return this.opts.ramBytes === 0 && !this.hasSpill;
  }

  /**
   * Room for `bytes` of saved data: RAM if it fits now, else the spill file
   * (RAM on the way there: waits only for other guests' spill writes), else
   * wait for RAM (the guest waits; its CBW timeout bounds that). Take the
   * buffer from buffersFor() of the answer.
   */
  async reserve(bytes: number): Promise<'ram' | 'spill'> {
    if (this.opts.ramBytes > 0 && this.ram.tryAcquire(bytes)) return this.noted('ram');
    if (this.hasSpill) {
      await this.spillIn.acquire(bytes);
      return this.noted('spill');
    }
    this.events.fullWait();
    await this.ram.acquire(bytes);
    return this.noted('ram');
  }

  buffersFor(where: 'ram' | 'spill'): BudgetBuffers {
    return where === 'ram' ? this.ramBuffers : this.spillInBuffers;
  }

  private noted<W>(r: W): W {
    this.noteUse();
    return r;
  }

  private noteUse(): void {
    this.ramHighWater = Math.max(this.ramHighWater, this.ramUsed);
  }

  /**
   * Give back a reservation that was not used (the read failed or was
   * zero), or, for 'spill', one whose run is now in the spill file.
   */
  unreserve(where: 'ram' | 'spill', bytes: number): void {
    (where === 'ram' ? this.ram : this.spillIn).release(bytes);
  }

  /**
   * Store a saved run. RAM runs come with the `release` of whatever budget
   * they were counted against; spill runs are written to the spill file
   * before this resolves (the guest may go on only then).
   */
  async add(r: RunToAdd): Promise<void> {
    const run: BufferedRun = {
      offset: r.offset,
      length: r.length,
      where: r.where,
      data: r.data,
      slots: null,
      writing: false,
      release: r.release ?? null,
      written: r.written ?? null,
      urgent: !!r.urgent,
      queuePos: -1,
      urgentPos: -1,
    };
    if (run.where === 'spill') {
      run.slots = await this.spillWrite(run.data as Buffer);
      run.data = null;
    }
    if (this.stopped) {
      this.free(run);
      return;
    }
    if (run.where === 'spill' && this.joinSpilled(run)) {
      this.pump();
      return;
    }
    this.queue.add(run);
    if (run.urgent) this.urgentQueue.add(run);
    this.byStart.set(this.keyOf(run.offset), run);
    this.byEnd.set(this.keyOf(run.offset + run.length), run);
    this.pump();
  }

  /**
   * Append `run` to a queued spilled run it touches, if one can take it
   * (same kind, not being written, no callbacks, room under the largest
   * write). The joined run keeps its place in the queue.
   */
  private joinSpilled(run: BufferedRun): boolean {
    if (run.release !== null || run.written !== null) return false;
    const canJoin = (r: BufferedRun | undefined, extra: number): r is BufferedRun =>
      !!r &&
      r.where === 'spill' &&
      !r.writing &&
      r.release === null &&
      r.written === null &&
      r.urgent === run.urgent &&
      r.length + extra <= this.opts.maxWrite;
    const before = this.byEnd.get(this.keyOf(run.offset));
    if (canJoin(before, run.length) && before.length % this.opts.clusterSize === 0) {
      // Only a whole-cluster run takes one after it (slot i holds bytes
      // from i * clusterSize on).
      // Slots join in place (a new array per join was a copy of up to 64
      // slots each time, for a run that grows one cluster at a time).
      this.byEnd.delete(this.keyOf(before.offset + before.length));
      before.length += run.length;
      const slots = before.slots as number[];
      for (const slot of run.slots as number[]) slots.push(slot);
      // `run` may close the gap to the next run: that one joins too.
      const next = this.byStart.get(this.keyOf(before.offset + before.length));
      if (next !== before && canJoin(next, before.length) && run.length % this.opts.clusterSize === 0) {
        this.unqueue(next);
        before.length += next.length;
        for (const slot of next.slots as number[]) slots.push(slot);
      }
      this.byEnd.set(this.keyOf(before.offset + before.length), before);
      return true;
    }
    const after = this.byStart.get(this.keyOf(run.offset + run.length));
    if (canJoin(after, run.length) && run.length % this.opts.clusterSize === 0) {
      this.byStart.delete(this.keyOf(after.offset));
      after.offset = run.offset;
      after.length += run.length;
      (after.slots as number[]).unshift(...(run.slots as number[]));
      this.byStart.set(this.keyOf(after.offset), after);
      return true;
    }
    return false;
  }

  /** Resolves when nothing is queued or being written. */
  whenEmpty(): Promise<void> {
    if (this.queue.size === 0) return Promise.resolve();
    const d = new Deferred();
    this.emptyWaiters.push(d);
    return d.promise;
  }

  /** Drop everything (job failed or cancelled): frees RAM and the spill file. */
  stop(reason: Error): void {
    this.stopped = true;
    this.ramBuffers.close();
    this.backgroundBuffers.close();
    this.spillInBuffers.close();
    this.spillOutBuffers.close();
    for (const run of this.queue) this.free(run);
    this.queue.clear();
    this.urgentQueue.clear();
    this.byStart.clear();
    this.byEnd.clear();
    this.ram.abort(reason);
    this.background.abort(reason);
    this.spillIn.abort(reason);
    this.spillOut.abort(reason);
    for (const d of this.emptyWaiters.splice(0)) d.resolve();
    this.closeSpill();
  }

  private pump(): void {
    while (!this.stopped && this.activeWriters < this.opts.writers) {
      const group = this.takeGroup();
      if (!group) break;
      this.activeWriters++;
      void this.writeGroup(group).finally(() => {
        this.activeWriters--;
        if (this.queue.size === 0) for (const d of this.emptyWaiters.splice(0)) d.resolve();
        this.pump();
      });
    }
  }

  /**
   * The oldest queued run plus its queued neighbours on both sides; alone
   * while a guest waits for room in RAM.
   *
   * Why alone: room comes back only when a whole write is done, and a slow
   * target shares its rate among the writes in flight. A guest writing
   * sequentially saves adjacent clusters, joined into 4 MiB writes; eight of
   * them started together at 4 MiB/s all end about 8 s later, so waiting
   * guests got room in bursts that far apart, past the 5 s CBW timeout, and
   * the backup failed (test/cbw-job-control: sequential writes, --buffer
   * 16M, a 4 MiB/s target). One run per write gives room back a run at a
   * time: that guest then waited half a second at most.
   */
  private takeGroup(): BufferedRun[] | null {
    const first = this.urgentQueue.find(this.notWriting) ?? this.queue.find(this.notWriting);
    if (!first) return null;
    const zero = first.where === 'zero';
    const group = [first];
    let total = first.length;
    first.writing = true;
    if (this.ram.isWaitedOn && !zero) return group;
    const fits = (r: BufferedRun | undefined, total: number): r is BufferedRun =>
      !!r && !r.writing && (r.where === 'zero') === zero && (zero || total + r.length <= this.opts.maxWrite);
    for (
      let prev = this.byEnd.get(this.keyOf(first.offset));
      fits(prev, total);
      prev = this.byEnd.get(this.keyOf(prev.offset))
    ) {
      prev.writing = true;
      group.unshift(prev);
      total += prev.length;
    }
    for (
      let next = this.byStart.get(this.keyOf(first.offset + first.length));
      fits(next, total);
      next = this.byStart.get(this.keyOf(next.offset + next.length))
    ) {
      next.writing = true;
      group.push(next);
      total += next.length;
    }
    return group;
  }

  private async writeGroup(group: BufferedRun[]): Promise<void> {
    const offset = group[0].offset;
    const length = group.reduce((n, r) => n + r.length, 0);
    const zero = group[0].where === 'zero';
    for (let attempt = 0; ; attempt++) {
      if (this.stopped) return;
      const started = process.hrtime.bigint();
      try {
        if (zero) await this.target.writeZeroes(offset, length);
        else await this.writeData(offset, group);
        this.events.written(length, Number(process.hrtime.bigint() - started) / 1e9, zero);
        break;
      } catch (e) {
        const err = e instanceof Error ? e : new Error(String(e));
        if (this.stopped) return;
        if (attempt + 1 >= this.opts.retryAttempts) {
          this.events.fatal(new Error(`target write at ${offset}+${length} failed after ${attempt + 1} attempts: ${err.message}`));
          return;
        }
        this.events.retry(err);
        await sleep(backoffMs(attempt, this.opts.retryBaseMs, this.opts.retryMaxMs));
      }
    }
    for (const r of group) {
      this.unqueue(r);
      this.free(r);
    }
  }

  private readonly notWriting = (r: BufferedRun): boolean => !r.writing;

  /**
   * The index key of a run boundary: its cluster. Runs start on cluster
   * boundaries and end on one, except at the end of the disk, which
   * rounds up to a cluster no run starts at.
   */
  private keyOf(offset: number): number {
    return Math.ceil(offset / this.opts.clusterSize);
  }

  private unqueue(r: BufferedRun): void {
    this.queue.delete(r);
    this.urgentQueue.delete(r);
    this.byStart.delete(this.keyOf(r.offset));
    this.byEnd.delete(this.keyOf(r.offset + r.length));
  }

  /**
   * Write a group's bytes, back to back: RAM runs as they are, spilled runs
   * read back into cluster-sized buffers paid for from `spillOut` first.
   */
  private async writeData(offset: number, group: BufferedRun[]): Promise<void> {
    let spilledBytes = 0;
    for (const r of group) if (r.where === 'spill') spilledBytes += (r.slots as number[]).length * this.opts.clusterSize;
    if (spilledBytes === 0) return this.target.write(offset, group.map((r) => r.data as Buffer));
    await this.spillOut.acquire(spilledBytes);
    this.noteUse();
    try {
      const parts = await Promise.all(
        group.map((r) => (r.where === 'ram' ? [r.data as Buffer] : this.spillRead(r.slots as number[], r.length))),
      );
      await this.target.write(offset, parts.flat());
      // Reusable now. (Not after a failure: part of the write might still be
      // on its way; those buffers are left to the collector.)
      group.forEach((r, i) => r.where === 'spill' && parts[i].forEach((b) => this.spillOutBuffers.give(b)));
    } finally {
      this.spillOut.release(spilledBytes);
    }
  }

  /** A reservation made with reserve() released as a run's `release`. */
  ramRelease(bytes: number): () => void {
    return () => this.ram.release(bytes);
  }

  private free(run: BufferedRun): void {
    run.release?.();
    run.release = null;
    if (run.where === 'spill' && run.slots) this.spillRelease(run.slots);
    run.data = null;
    run.slots = null;
    run.written?.();
    run.written = null;
  }

  // ------------------------------------------------------------ spill file

  private openSpill(): number {
    if (this.spillFd === null) this.spillFd = makeSpillFile(this.opts.spillDir as string);
    return this.spillFd;
  }

  private async spillWrite(data: Buffer): Promise<number[]> {
    const fd = this.openSpill();
    const cs = this.opts.clusterSize;
    // Sized up front: an array grown by push() from empty reserves room for
    // 17 elements, 152 bytes of heap per one-cluster run, and a large spill
    // holds tens of thousands of them.
    const slots = new Array<number>(Math.ceil(data.length / cs));
    const writes: Promise<void>[] = [];
    for (let at = 0, i = 0; at < data.length; at += cs, i++) {
      const slot = this.spillFree.pop() ?? this.spillNextSlot++;
      slots[i] = slot;
      const piece = data.subarray(at, Math.min(data.length, at + cs));
      this.spillPending++;
      writes.push(
        new Promise<void>((resolve, reject) =>
          fs.write(fd, piece, 0, piece.length, slot * cs, (e) => (e ? reject(e) : resolve())),
        ).finally(() => this.spillOpDone()),
      );
    }
    this.spillUsed += data.length;
    try {
      // Every piece settled before the slots can be given back: a late write
      // would land in a slot already reused.
      await settleAll(writes);
    } catch (e) {
      this.spillRelease(slots);
      throw new Error(`spill file write failed: ${(e as Error).message}`);
    }
    return slots;
  }

  /**
   * Read a spilled run back into staging buffers of one cluster each: one
   * size, so the pool reuses them whatever the runs' lengths (a buffer per
   * run length meant fresh allocations and garbage). Only the disk's last
   * cluster can be shorter: a view, which the pool does not take back.
   */
  private spillRead(slots: number[], length: number): Promise<Buffer[]> {
    const fd = this.spillFd as number;
    const cs = this.opts.clusterSize;
    return Promise.all(
      slots.map(
        (slot, i) =>
          new Promise<Buffer>((resolve, reject) => {
            const n = Math.min(cs, length - i * cs);
            const into = this.spillOutBuffers.take(cs);
            this.spillPending++;
            fs.read(fd, into, 0, n, slot * cs, (e) => {
              this.spillOpDone();
              if (e) reject(e);
              else resolve(n === cs ? into : into.subarray(0, n));
            });
          }),
      ),
    );
  }

  private spillRelease(slots: number[]): void {
    const cs = this.opts.clusterSize;
    this.spillUsed -= Math.min(this.spillUsed, slots.length * cs);
    // Stopped: the file goes away whole when it is closed (it is unlinked),
    // and no slot will be used again. A punch per slot would be a promise
    // and a thread-pool job each, all at once: 24 MiB more RSS when a job
    // with 3 GiB spilled was cancelled.
    if (this.spillFd === null || this.stopped) return;
    const fd = this.spillFd;
    for (const s of slots) {
      // Give the disk space back. The slot is reused only after the punch
      // finished, or a late punch could wipe newer data in it.
      this.spillPending++;
      loadFileOps()
        .punchHole(fd, s * cs, cs)
        .catch(() => undefined)
        .finally(() => {
          this.spillFree.push(s);
          this.spillOpDone();
        });
    }
  }

  /**
   * Close the spill file once no I/O on it is pending: closing earlier could
   * let the descriptor number be reused by another file that a late punch
   * or write would then hit.
   */
  private closeSpill(): void {
    this.spillClosing = true;
    this.maybeCloseSpill();
  }

  private spillOpDone(): void {
    this.spillPending--;
    this.maybeCloseSpill();
  }

  private maybeCloseSpill(): void {
    if (this.spillClosing && this.spillPending === 0 && this.spillFd !== null) {
      const fd = this.spillFd;
      this.spillFd = null;
      fs.close(fd, () => undefined);
    }
  }
}
