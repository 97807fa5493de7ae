// The copy engine: copies a disk's point-in-time content to a backup target
// while the disk is being written. It knows clusters, budgets and targets;
// it knows nothing of NBD connections. The cbw filter calls saveForWrite()
// before letting a guest write through.
//
// Cluster states:
//   to copy     bit set in `toCopy`; nobody has touched it since the start
//   reading     bit clear, in `reading` (cluster -> task); its old content is
//               being read. Anyone needing it waits on that task: each
//               cluster's old content is read once
//   saved       bit clear, not reading: the old content is in memory (the cow
//               buffer or a worker's in-flight run), in the spill file, or on
//               the target. Guest writes to it pass straight through
//   skipped     bit clear: block status said it reads as zero
// Bits only go from set to clear, except that a failed read sets them again.
//
// Job states: running <-> paused -> (finishing) -> completed, or failed /
// cancelled from anywhere. Pausing stops the background sweep only: guest
// writes still get their clusters saved and the buffer keeps draining.

import { EventEmitter } from 'node:events';
import type { BlockDevice } from '../device/types';
import type { BackupTarget } from '../targets/types';
import { ClusterBitmap } from './bitmap';
import { CowBuffer } from './cow-buffer';
import type { PayloadPool } from '../util/payload-pool';
import { IntKeyMap } from '../util/churn-tables';
import { Budget, Deferred, RateLimiter, backoffMs, sleep } from './sync';

export interface CopyEngineOptions {
  clusterSize: number;
  /** Background workers sweeping the disk. */
  workers: number;
  /** Largest coalesced read / target write. */
  maxChunk: number;
  /**
   * Bytes the background sweep may hold in memory (read, not yet on the
   * target). Out of bufferBytes when that is large enough (see sweepShare).
   */
  inFlightBytes: number;
  /** Background copy speed limit in bytes/s; 0 = unlimited. Guest-triggered copies ignore it. */
  speed: number;
  /** RAM for saved old data awaiting the target (--buffer). */
  bufferBytes: number;
  spillDir?: string;
  /** Target writes in flight at once. */
  targetWriters: number;
  retryAttempts: number;
  retryBaseMs: number;
  retryMaxMs: number;
  /** Consecutive failed source reads of one range before the job fails. */
  readAttempts: number;
}

export const DEFAULT_ENGINE_OPTIONS: CopyEngineOptions = {
  clusterSize: 64 * 1024,
  workers: 16,
  maxChunk: 4 * 1024 * 1024,
  inFlightBytes: 32 * 1024 * 1024,
  speed: 0,
  bufferBytes: 256 * 1024 * 1024,
  targetWriters: 8,
  retryAttempts: 8,
  retryBaseMs: 100,
  retryMaxMs: 5000,
  readAttempts: 5,
};

/**
 * The sweep's memory. A --buffer big enough to spare an eighth for at least
 * one full-size run includes the sweep's in-flight data (an eighth, at most
 * inFlightBytes), so that --buffer bounds all the RAM the job's data takes.
 * Smaller buffers (and --buffer 0) are for tests and for guests that must
 * wait: the sweep then has its own inFlightBytes beside them.
 */
export function sweepShare(
  bufferBytes: number,
  inFlightBytes: number,
  runBytes: number,
  clusterSize: number,
): { bytes: number; inBuffer: boolean } {
  const eighth = Math.floor(bufferBytes / 8 / clusterSize) * clusterSize;
  if (eighth >= runBytes) return { bytes: Math.max(runBytes, Math.min(inFlightBytes, eighth)), inBuffer: true };
  return { bytes: Math.max(inFlightBytes, runBytes), inBuffer: false };
}

/**
 * With a spill file, saved data also passes through RAM on its way into it
 * (one largest run at a time) and back out (the target writers' runs, at
 * most an eighth of --buffer). A --buffer that can spare an eighth for a
 * full-size run includes these too, as it does the sweep's share: RAM with
 * a spill file stays within --buffer as without one.
 */
export function spillShare(
  bufferBytes: number,
  runBytes: number,
  writers: number,
  clusterSize: number,
): { inBytes: number; outBytes: number; inBuffer: boolean } {
  const eighth = Math.floor(bufferBytes / 8 / clusterSize) * clusterSize;
  const inBuffer = eighth >= runBytes;
  return { inBytes: runBytes, outBytes: inBuffer ? Math.min(writers * runBytes, eighth) : writers * runBytes, inBuffer };
}

/**
 * store()'s releaseFor for a run read into a pooled buffer: each piece gives
 * its bytes back with `release` as it reaches the target (or is found zero),
 * and the buffer goes back to `pool` with the last of them. `buf` may be
 * longer than the run (`length`, default all of it): the rest is released
 * with the last piece, when the buffer's memory is free again.
 */
function piecewiseRelease(
  pool: PayloadPool,
  buf: Buffer,
  release: (bytes: number) => void,
  length = buf.length,
): (bytes: number) => () => void {
  let left = length;
  return (n) => () => {
    left -= n;
    if (left === 0) {
      release(n + buf.length - length);
      pool.give(buf);
    } else release(n);
  };
}

export type EngineState = 'created' | 'running' | 'paused' | 'completed' | 'failed' | 'cancelled';

export interface EngineProgress {
  state: EngineState;
  bytesTotal: number;
  /** Bytes whose point-in-time content is final on the target (or known zero there). */
  bytesDone: number;
  /** Read from the source and written as data. */
  bytesCopied: number;
  /** Never read: block status said zero/unallocated. */
  bytesSkipped: number;
  /** Read, found all zero, written as zeroes (or nothing). */
  bytesZeroDetected: number;
  clustersRemaining: number;
  bufferBytes: number;
  bufferCapacity: number;
  bufferHighWater: number;
  spillBytes: number;
  targetRetries: number;
  guestCopies: number;
}

/** A range found zero, waiting for the target's zero probe. */
interface ZeroRange {
  offset: number;
  length: number;
  written?: () => void;
  urgent: boolean;
}

/** A claimed run of clusters whose old content is being read. */
interface Task {
  first: number;
  end: number;
  /** Resolves true when saved; false when the read failed and the range was re-dirtied. */
  saved: Deferred<boolean>;
}

export class CopyEngine extends EventEmitter {
  readonly clusters: number;
  private readonly toCopy: ClusterBitmap;
  private readonly reading = new IntKeyMap<Task>();
  private readonly buffer: CowBuffer;
  private readonly sweepBudget: Budget;
  /** Clusters the sweep reads at once. */
  private readonly sweepRunClusters: number;
  private readonly limiter: RateLimiter;
  private stateValue: EngineState = 'created';
  private failure: Error | null = null;
  private scannedTo = 0;
  private scanDone = false;
  private cursor = 0;
  private wake = new Deferred();
  private readonly finished = new Deferred();
  /** The target's close after a failure or cancel (requests in flight finish first). */
  private targetClosing: Promise<void> | null = null;
  private pendingAdds = 0;
  /**
   * Zero ranges held while the target's zero probe runs (null when none
   * runs): once it answers they are done (the target reads as zero) or go
   * into the buffer as write-zeroes. Data goes to the target meanwhile.
   */
  private zeroesAwaitingProbe: ZeroRange[] | null = null;
  private readFailures = 0;
  private finishing = false;
  private readonly zeroCluster: Buffer;
  private readonly stats = {
    bytesDone: 0,
    bytesCopied: 0,
    bytesSkipped: 0,
    bytesZeroDetected: 0,
    targetRetries: 0,
    guestCopies: 0,
  };

  /** Where the background sweep and the block-status scan read from. */
  private readonly sweepSource: BlockDevice;

  /**
   * `source` serves guest-triggered copies; `sweepSource`, if given, is a
   * separate handle for the bulk sweep (closed when the job ends).
   */
  constructor(
    private readonly source: BlockDevice,
    private readonly target: BackupTarget,
    private readonly opts: CopyEngineOptions,
    sweepSource?: BlockDevice,
  ) {
    super();
    this.sweepSource = sweepSource ?? source;
    if (sweepSource && sweepSource !== source) {
      this.finished.promise.then(
        () => sweepSource.close(),
        () => sweepSource.close(),
      ).catch(() => undefined);
    }
    const cs = opts.clusterSize;
    if (cs <= 0 || (cs & (cs - 1)) !== 0) throw new Error(`cluster size ${cs} is not a power of two`);
    if (opts.maxChunk < cs) throw new Error(`max chunk ${opts.maxChunk} is smaller than the cluster size ${cs}`);
    this.clusters = Math.ceil(source.size / cs);
    this.toCopy = new ClusterBitmap(this.clusters);
    this.toCopy.setRange(0, this.clusters);
    this.zeroCluster = Buffer.alloc(cs);
    const runBytes = Math.min(opts.maxChunk, target.maxWrite);
    const share = sweepShare(opts.bufferBytes, opts.inFlightBytes, runBytes, cs);
    const spill = spillShare(opts.bufferBytes, runBytes, opts.targetWriters, cs);
    const spillCarved = opts.spillDir !== undefined && spill.inBuffer;
    this.sweepRunClusters = Math.max(1, Math.floor(Math.min(runBytes, share.bytes) / cs));
    this.limiter = new RateLimiter(opts.speed);
    this.buffer = new CowBuffer(
      target,
      {
        ramBytes:
          opts.bufferBytes -
          (share.inBuffer ? share.bytes : 0) -
          (spillCarved ? spill.inBytes + spill.outBytes : 0),
        backgroundBytes: share.bytes,
        backgroundInBuffer: share.inBuffer,
        spillDir: opts.spillDir,
        spillInBytes: spill.inBytes,
        spillOutBytes: spill.outBytes,
        spillInBuffer: spillCarved,
        clusterSize: cs,
        maxWrite: Math.min(opts.maxChunk, target.maxWrite),
        writers: Math.min(opts.targetWriters, target.maxWritesInFlight ?? opts.targetWriters),
        retryAttempts: opts.retryAttempts,
        retryBaseMs: opts.retryBaseMs,
        retryMaxMs: opts.retryMaxMs,
      },
      {
        written: (bytes, seconds, zero) => {
          this.stats.bytesDone += bytes;
          this.emit('targetWrite', bytes, seconds, zero);
          this.kick();
        },
        retry: (err) => {
          this.stats.targetRetries++;
          this.emit('targetRetry', err);
        },
        fatal: (err) => this.fail(err),
        fullWait: () => this.emit('bufferFullWait'),
      },
    );
    this.sweepBudget = this.buffer.background;
    this.finished.promise.catch(() => undefined);
    const probe = target.zeroProbe;
    if (probe) {
      this.zeroesAwaitingProbe = [];
      void probe.then(() => this.zeroProbeAnswered());
    }
  }

  get state(): EngineState {
    return this.stateValue;
  }

  get error(): Error | null {
    return this.failure;
  }

  /** Settles when the job ends: resolves on completion, rejects otherwise. */
  get done(): Promise<void> {
    return this.finished.promise;
  }

  /**
   * Resolves once a failed or cancelled job's target connection is closed:
   * its requests in flight answered, then a clean disconnect. A server
   * shutting down waits for this (bounded) instead of cutting the target
   * off mid-request.
   */
  get targetClosed(): Promise<void> {
    return this.targetClosing ?? Promise.resolve();
  }

  get isActive(): boolean {
    return this.stateValue === 'running' || this.stateValue === 'paused';
  }

  /**
   * Guest writes must be intercepted from the moment the cbw filter attaches
   * the engine, which is before start() launches the sweep.
   */
  get isIntercepting(): boolean {
    return this.stateValue === 'created' || this.isActive;
  }

  progress(): EngineProgress {
    return {
      state: this.stateValue,
      bytesTotal: this.source.size,
      ...this.stats,
      clustersRemaining: this.toCopy.count + this.reading.size,
      bufferBytes: this.buffer.ramUsed,
      bufferCapacity: this.buffer.ramCapacity,
      bufferHighWater: this.buffer.highWater,
      spillBytes: this.buffer.spillBytes,
    };
  }

  start(): void {
    if (this.stateValue !== 'created') throw new Error('engine already started');
    this.stateValue = 'running';
    void this.scan();
    for (let i = 0; i < this.opts.workers; i++) void this.worker();
    this.kick();
  }

  pause(): void {
    if (this.stateValue === 'running') this.stateValue = 'paused';
  }

  resume(): void {
    if (this.stateValue === 'paused') {
      this.stateValue = 'running';
      this.kick();
    }
  }

  setSpeed(bytesPerSecond: number): void {
    this.limiter.rate = bytesPerSecond;
    this.kick();
  }

  get speed(): number {
    return this.limiter.rate;
  }

  cancel(): void {
    this.end('cancelled', new Error('cancelled'));
  }

  fail(err: Error): void {
    this.end('failed', err);
  }

  private end(state: 'failed' | 'cancelled', err: Error): void {
    if (!this.isIntercepting) return;
    this.stateValue = state;
    this.failure = err;
    this.buffer.stop(err);
    const held = this.zeroesAwaitingProbe ?? [];
    this.zeroesAwaitingProbe = null;
    for (const z of held) z.written?.();
    // Waiting guest writes go on: the snapshot is no longer being kept.
    for (const t of this.reading.values()) t.saved.resolve(true);
    this.reading.clear();
    this.finished.reject(err);
    this.kick();
    this.targetClosing = this.target.close(false).catch(() => undefined);
  }

  private kick(): void {
    const w = this.wake;
    this.wake = new Deferred();
    w.resolve();
    this.maybeComplete();
  }

  private clusterRange(first: number, end: number): { offset: number; length: number } {
    const cs = this.opts.clusterSize;
    const offset = first * cs;
    return { offset, length: Math.min(end * cs, this.source.size) - offset };
  }

  // --------------------------------------------------------------- CBW side

  /** True if a write to [offset, offset+length) must wait for old data to be saved. */
  needsSave(offset: number, length: number): boolean {
    if (!this.isIntercepting || length <= 0) return false;
    const cs = this.opts.clusterSize;
    const first = Math.floor(offset / cs);
    const last = Math.min(Math.floor((offset + length - 1) / cs), this.clusters - 1);
    // Only the words of this range: a mostly-copied 1 TiB bitmap must not be
    // scanned on every guest write.
    if (this.toCopy.nextSetIn(first, last + 1) !== -1) return true;
    if (this.reading.size === 0) return false;
    for (let c = first; c <= last; c++) if (this.reading.has(c)) return true;
    return false;
  }

  /**
   * Resolves once every cluster touching [offset, offset+length) is saved.
   * Clusters nobody is copying yet are read right here, ahead of the sweep.
   * Rejects if a read for it fails.
   */
  async saveForWrite(offset: number, length: number): Promise<void> {
    const cs = this.opts.clusterSize;
    const first = Math.floor(offset / cs);
    const last = Math.min(Math.floor((offset + length - 1) / cs), this.clusters - 1);
    const maxRun = this.guestRunClusters();
    let started = 0;
    for (let round = 0; this.isIntercepting; round++) {
      const waits: Promise<boolean>[] = [];
      let c = first;
      while (c <= last) {
        if (this.toCopy.get(c)) {
          const end = Math.min(this.toCopy.nextClear(c), last + 1, c + maxRun);
          waits.push(this.claimForGuest(c, end));
          started++;
          c = end;
          continue;
        }
        const t = this.reading.get(c);
        if (t) {
          waits.push(t.saved.promise);
          c = t.end;
          continue;
        }
        c++;
      }
      if (waits.length === 0) break;
      const results = await Promise.all(waits);
      if (results.every((ok) => ok)) break;
      // A read failed and re-dirtied clusters: go round and claim them again.
    }
    if (started > 0) this.stats.guestCopies += started;
  }

  /**
   * Largest run read at once: a run reaches the target as one write, so it
   * must fit the target's largest write as well as maxChunk.
   */
  private runBytes(): number {
    return Math.min(this.opts.maxChunk, this.target.maxWrite);
  }

  private guestRunClusters(): number {
    // A preallocated guest share hands out single clusters (a guest write
    // over several then saves them as several runs, read at once).
    if (this.buffer.ramPreallocated) return 1;
    const cs = this.opts.clusterSize;
    let bytes = this.runBytes();
    if (this.buffer.ram.limit > 0 && !this.opts.spillDir) bytes = Math.min(bytes, this.buffer.ram.limit);
    return Math.max(1, Math.floor(bytes / cs));
  }

  private claim(first: number, end: number): Task {
    this.toCopy.clearRange(first, end);
    const task: Task = { first, end, saved: new Deferred<boolean>() };
    for (let c = first; c < end; c++) this.reading.set(c, task);
    return task;
  }

  private release(task: Task, ok: boolean): void {
    for (let c = task.first; c < task.end; c++) if (this.reading.get(c) === task) this.reading.delete(c);
    if (!ok && this.isIntercepting) this.toCopy.setRange(task.first, task.end);
    task.saved.resolve(ok);
    this.kick();
  }

  private claimForGuest(first: number, end: number): Promise<boolean> {
    const task = this.claim(first, end);
    this.pendingAdds++;
    void this.copyForGuest(task).finally(() => {
      this.pendingAdds--;
      this.kick();
    });
    return task.saved.promise.then((ok) => {
      if (!ok && this.readFailureError) throw this.readFailureError;
      return ok;
    });
  }

  private readFailureError: Error | null = null;

  private async copyForGuest(task: Task): Promise<void> {
    const { offset, length } = this.clusterRange(task.first, task.end);
    if (this.buffer.isDirect) {
      // --buffer 0: the guest waits for the target write (the slow case).
      let data: Buffer;
      try {
        data = await this.source.read(offset, length);
      } catch (e) {
        this.readFailed(task, e);
        return;
      }
      const written = new Deferred();
      await this.store(task.first, data, null, written, 'ram', true);
      await written.promise;
      this.release(task, true);
      return;
    }
    // A preallocated guest share has whole clusters only: the disk's last,
    // partial cluster is read into the front of one.
    const bytes = this.buffer.ramPreallocated ? (task.end - task.first) * this.opts.clusterSize : length;
    let where: 'ram' | 'spill';
    try {
      where = await this.buffer.reserve(bytes);
    } catch {
      this.release(task, true); // the buffer stopped: the job is over
      return;
    }
    // RAM runs read into a pooled buffer that goes back to the pool when the
    // last piece of it reached the target; spill runs into one that goes back
    // (with its reservation) once the run is in the spill file.
    const pool = this.buffer.buffersFor(where);
    const pooled = pool.take(bytes);
    let data: Buffer;
    try {
      data = await this.source.read(offset, length, bytes === length ? pooled : pooled.subarray(0, length));
    } catch (e) {
      this.buffer.unreserve(where, bytes);
      pool.give(pooled);
      this.readFailed(task, e);
      return;
    }
    try {
      if (where === 'ram') {
        const releaseFor = piecewiseRelease(pool, pooled, (n) => this.buffer.ram.release(n), length);
        await this.store(task.first, data, releaseFor, null, 'ram', true);
      } else {
        try {
          await this.store(task.first, data, null, null, 'spill', true);
          pool.give(pooled); // (not after a failed spill write: it may still be in flight)
        } finally {
          this.buffer.unreserve('spill', bytes);
        }
      }
    } catch (e) {
      this.fail(e instanceof Error ? e : new Error(String(e)));
    }
    this.release(task, true);
  }

  private readFailed(task: Task, e: unknown): void {
    const err = e instanceof Error ? e : new Error(String(e));
    this.readFailureError = new Error(`source read failed: ${err.message}`);
    this.emit('readError', err);
    this.release(task, false);
  }

  /**
   * Queue a read run for the target, split into data and all-zero clusters.
   * `releaseFor(bytes)` makes the release of the budget a data piece was
   * counted against; zero pieces give theirs back at once.
   */
  private async store(
    first: number,
    data: Buffer,
    releaseFor: ((bytes: number) => () => void) | null,
    written: Deferred | null,
    where: 'ram' | 'spill' = 'ram',
    urgent = false,
  ): Promise<void> {
    const cs = this.opts.clusterSize;
    const base = first * cs;
    const adds: Promise<void>[] = [];
    let pendingWrites = 0;
    const onWritten = written
      ? () => {
          if (--pendingWrites === 0) written.resolve();
        }
      : undefined;
    const emit = (from: number, to: number, zero: boolean) => {
      const length = to - from;
      if (zero) {
        this.stats.bytesZeroDetected += length;
        releaseFor?.(length)();
        if (this.target.readsAsZero) {
          this.stats.bytesDone += length;
          return;
        }
        pendingWrites++;
        adds.push(this.addZeroes({ offset: base + from, length, written: onWritten, urgent }));
        return;
      }
      this.stats.bytesCopied += length;
      pendingWrites++;
      adds.push(
        this.buffer.add({
          offset: base + from,
          length,
          where,
          data: data.subarray(from, to),
          release: releaseFor?.(length),
          written: onWritten,
          urgent,
        }),
      );
    };
    let runStart = 0;
    let runZero: boolean | null = null;
    for (let at = 0; at < data.length; at += cs) {
      const end = Math.min(at + cs, data.length);
      const zero = data.subarray(at, end).equals(this.zeroCluster.subarray(0, end - at));
      if (runZero === null) runZero = zero;
      else if (zero !== runZero) {
        emit(runStart, at, runZero);
        runStart = at;
        runZero = zero;
      }
    }
    if (runZero !== null) emit(runStart, data.length, runZero);
    if (written && pendingWrites === 0) written.resolve();
    await Promise.all(adds);
  }

  /**
   * A zero range on a target not known to read as zero: write-zeroes through
   * the buffer, or held until the target's zero probe answers. Resolves once
   * the buffer took it (at once when held: a held range takes no memory).
   */
  private addZeroes(z: ZeroRange): Promise<void> {
    if (this.zeroesAwaitingProbe) {
      this.zeroesAwaitingProbe.push(z);
      return Promise.resolve();
    }
    return this.buffer.add({ offset: z.offset, length: z.length, where: 'zero', data: null, written: z.written, urgent: z.urgent });
  }

  private zeroProbeAnswered(): void {
    const held = this.zeroesAwaitingProbe;
    this.zeroesAwaitingProbe = null;
    if (!held) return; // the job ended: end() settled them
    for (const z of held) {
      if (this.target.readsAsZero) {
        this.stats.bytesDone += z.length;
        z.written?.();
      } else void this.addZeroes(z);
    }
    this.kick();
  }

  // ---------------------------------------------------------- background

  /** Walk block status once, in large extents, and drop ranges that read as zero. */
  private async scan(): Promise<void> {
    const size = this.source.size;
    if (!this.source.capabilities.blockStatus) {
      this.scannedTo = this.clusters;
      this.scanDone = true;
      return;
    }
    const cs = this.opts.clusterSize;
    let offset = 0;
    try {
      while (offset < size && this.isActive) {
        const extents = await this.sweepSource.blockStatus(offset, Math.min(size - offset, 0x80000000));
        if (extents.length === 0) break;
        for (const e of extents) {
          if (e.length <= 0) break;
          const end = Math.min(offset + e.length, size);
          if (e.flags & 2) this.skipZeroRange(offset, end);
          offset = end;
          if (offset >= size) break;
        }
        this.scannedTo = offset >= size ? this.clusters : Math.floor(offset / cs);
        this.kick();
      }
    } catch (e) {
      // Block status is an optimisation: without it every cluster is read.
      this.emit('scanError', e);
    }
    this.scannedTo = this.clusters;
    this.scanDone = true;
    this.kick();
  }

  private skipZeroRange(start: number, end: number): void {
    const cs = this.opts.clusterSize;
    const first = Math.ceil(start / cs);
    const last = end >= this.source.size ? this.clusters : Math.floor(end / cs);
    // Only clusters still untouched: a set bit means no guest write has
    // reached them since the start, so "zero now" is "zero at the start".
    for (let c = this.toCopy.nextSet(first); c !== -1 && c < last; ) {
      // Bounded: past `last` every unscanned cluster is still set, and an
      // unbounded search would walk them all on each block-status reply.
      const runEnd = this.toCopy.nextClearIn(c, last);
      this.toCopy.clearRange(c, runEnd);
      const { offset, length } = this.clusterRange(c, runEnd);
      this.stats.bytesSkipped += length;
      if (this.target.readsAsZero) this.stats.bytesDone += length;
      else void this.addZeroes({ offset, length, urgent: false });
      c = runEnd < last ? this.toCopy.nextSet(runEnd) : -1;
    }
  }

  /** The next run of clusters to sweep, or null; claims nothing. */
  private nextRun(maxRun: number): { first: number; end: number } | null {
    let c = this.toCopy.nextSet(this.cursor);
    if (c === -1 && this.cursor > 0) {
      this.cursor = 0;
      c = this.toCopy.nextSet(0);
    }
    if (c === -1) return null;
    if (c >= this.scannedTo) {
      // Nothing set in [cursor, scannedTo) now: start there next time, or
      // every wake-up during the scan rescans the skipped (cleared) part of
      // the bitmap, quadratic on a large sparse disk.
      this.cursor = this.scannedTo;
      return null;
    }
    return { first: c, end: Math.min(this.toCopy.nextClear(c), c + maxRun, this.scannedTo) };
  }

  private async worker(): Promise<void> {
    const maxRun = this.sweepRunClusters;
    while (this.isActive) {
      if (this.stateValue === 'paused') {
        await this.wake.promise;
        continue;
      }
      const wake = this.wake.promise;
      const budgetBytes = maxRun * this.opts.clusterSize;
      try {
        await this.sweepBudget.acquire(budgetBytes);
      } catch {
        return; // job ended
      }
      let run = this.stateValue === 'running' ? this.nextRun(maxRun) : null;
      if (run && this.limiter.rate > 0) {
        // Throttle before claiming: a guest write must never wait on the
        // speed limit for clusters a throttled worker has claimed.
        await this.limiter.take(this.clusterRange(run.first, run.end).length, () => !this.isActive);
        run = this.stateValue === 'running' ? this.nextRun(maxRun) : null;
      }
      if (!run) {
        // Nothing to do now; a failed read may re-dirty clusters later, so
        // stay until the job ends.
        this.sweepBudget.release(budgetBytes);
        await wake;
        continue;
      }
      const { first: c, end } = run;
      this.cursor = end;
      const { offset, length } = this.clusterRange(c, end);
      const task = this.claim(c, end);
      this.pendingAdds++;
      // Every run reads into a reused buffer of the full run size (a shorter
      // run uses the front of it), which goes back once the run's last piece
      // reached the target (or was found zero). One size: runs cut short by
      // guest-saved clusters come in every length, and a buffer per length
      // meant a fresh allocation for most runs, and garbage for V8 to find.
      // The budget stays charged for the whole buffer until then.
      const into = this.buffer.backgroundBuffers.take(budgetBytes);
      this.buffer.noteBackground(budgetBytes);
      const letGo = (n: number) => {
        this.buffer.noteBackground(-n);
        this.sweepBudget.release(n);
      };
      try {
        const data = await this.sweepSource.read(offset, length, into.subarray(0, length));
        this.readFailures = 0;
        const releaseFor = piecewiseRelease(this.buffer.backgroundBuffers, into, letGo, data.length);
        // Saved once read: the bytes are in memory on their way to the target.
        const stored = this.store(c, data, releaseFor, null);
        this.release(task, true);
        await stored;
      } catch (e) {
        letGo(budgetBytes);
        this.buffer.backgroundBuffers.give(into);
        this.release(task, false);
        if (!this.isActive) return;
        this.readFailures++;
        this.emit('readError', e);
        if (this.readFailures >= this.opts.readAttempts) {
          this.fail(new Error(`source read at ${offset}+${length} failed: ${(e as Error).message}`));
          return;
        }
        await sleep(backoffMs(this.readFailures, this.opts.retryBaseMs, this.opts.retryMaxMs));
      } finally {
        this.pendingAdds--;
        // The last run may have needed no target write (all zero on a
        // target that reads as zero): nothing else would check for the end.
        this.maybeComplete();
      }
    }
  }

  private maybeComplete(): void {
    if (!this.isActive || this.finishing) return;
    if (!this.scanDone || this.toCopy.count > 0 || this.reading.size > 0 || this.pendingAdds > 0) return;
    if ((this.zeroesAwaitingProbe?.length ?? 0) > 0) return;
    this.finishing = true;
    void (async () => {
      try {
        await this.buffer.whenEmpty();
        if (!this.isActive) return;
        await this.target.commit();
        if (!this.isActive) return;
        await this.target.close(true);
        if (!this.isActive) return;
        this.stateValue = 'completed';
        // Let go of the buffer's memory and spill file now: the server keeps
        // ended jobs for their status, and with them this engine.
        this.buffer.stop(new Error('the backup completed'));
        this.finished.resolve();
        this.emit('completed');
        this.kick(); // let idle workers see the end
      } catch (e) {
        this.fail(new Error(`finishing the backup failed: ${(e as Error).message}`));
      }
    })();
  }
}
