// nbd:// and nbd+unix:// targets (nbdkit, qemu-nbd, an rbd-backed export).

import { NbdClient } from '../client/client';
import { parseNbdUri } from '../client/uri';
import { settleAll } from '../util/settle';
import { forbiddenExportOf } from './nbd-endpoint';
import type { BackupTarget, TargetOpenOptions } from './types';

/** Block-status requests spent on asking whether a target reads as zeros. */
const ZERO_PROBE_REQUESTS = 1024;
/** Largest block-status request (lengths are 32-bit on the wire). */
const ZERO_PROBE_STEP = 0xffffffff - 0xffff;
/**
 * Probe requests in flight at once. A server may take a while per request
 * (nbdkit's memory plugin walks its sparse array page by page: 1.5 ms per
 * 4 GiB, 0.4 s for a 1 TiB target). One with several threads answers them
 * at once; nbdkit's memory plugin takes one lock per request, so there
 * only the round trips between them are saved.
 */
const ZERO_PROBE_PARALLEL = 8;

/**
 * Largest WRITE request sent to the target: the engine's coalesced writes
 * (up to --max-chunk, 4 MiB) go out as requests of this size, back to back
 * and in flight together. A server takes each request on one thread, which
 * receives the whole payload into its buffer and then writes it on: at
 * 4 MiB the payload has left that core's cache before it is written, and
 * the copy runs from memory. nbdkit's file plugin on tmpfs used 0.85-1.35
 * CPU-s for a 1 GiB backup in 4 MiB writes against 0.56-0.72 in 1 MiB
 * ones, and the job took 1.15-1.65 s against 0.84-1.17 (BENCHMARKS.md,
 * ninth session). QEMU's block-copy moves data in buffers of at most 1 MiB
 * too. Source reads stay up to --max-chunk: fewer, larger requests there.
 */
export const TARGET_REQUEST_BYTES = 1024 * 1024;

/**
 * `data` cut into pieces of at most `max` bytes each, as views: no byte is
 * copied, a buffer straddling a cut is split in two subarrays.
 */
export function splitBuffers(data: readonly Buffer[], max: number): Buffer[][] {
  const pieces: Buffer[][] = [];
  let piece: Buffer[] = [];
  let room = max;
  for (const b of data) {
    let at = 0;
    while (at < b.length) {
      const n = Math.min(room, b.length - at);
      piece.push(at === 0 && n === b.length ? b : b.subarray(at, at + n));
      at += n;
      room -= n;
      if (room === 0) {
        pieces.push(piece);
        piece = [];
        room = max;
      }
    }
  }
  if (piece.length > 0) pieces.push(piece);
  return pieces;
}

/**
 * True when the target's block status calls all of [0, size) zero (a fresh
 * nbdkit memory or sparse file, a new qcow2 behind qemu-nbd), leaving out
 * what this job wrote meanwhile (`ownWrites`): then ranges that are zero on
 * the disk need no write-zeroes there, as with --target-is-zero. Only this
 * job writes the target, so zero now is zero when the job completes.
 * Anything else, or no answer, means no. `stop()` true ends it with no.
 * The client must have negotiated base:allocation.
 */
async function readsAsZeroUpTo(
  client: NbdClient,
  size: number,
  ownWrites: WrittenRanges,
  stop: () => boolean,
): Promise<boolean> {
  let next = 0; // the start of the next step no prober has taken
  let requests = 0;
  let zero = true;
  // Each prober takes the next step of the disk and asks until it is
  // covered (a reply may describe less than was asked), while every answer
  // so far was zero.
  const prober = async (): Promise<void> => {
    while (zero && next < size) {
      let offset = next;
      const end = Math.min(size, next + ZERO_PROBE_STEP);
      next = end;
      while (zero && offset < end) {
        if (++requests > ZERO_PROBE_REQUESTS || stop()) {
          zero = false;
          return;
        }
        const extents = await client.blockStatus(offset, end - offset);
        if (extents.length === 0) zero = false;
        for (const e of extents) {
          if (e.length <= 0) zero = false;
          else if ((e.flags & 2) === 0 && !ownWrites.covers(offset, Math.min(offset + e.length, end))) zero = false;
          if (!zero) break;
          offset += e.length;
          if (offset >= end) break;
        }
      }
    }
  };
  try {
    await Promise.all(Array.from({ length: ZERO_PROBE_PARALLEL }, prober));
  } catch {
    return false;
  }
  return zero;
}

/** Distinct runs WrittenRanges keeps before the probe gives up (and says no). */
const ZERO_PROBE_MAX_OWN_RUNS = 65536;

/**
 * Byte ranges written to a target while its zero probe runs, kept sorted
 * and joined where they touch: the sweep's writes follow one another, so
 * a long probe holds few runs. Scattered guest-saved writes could make many:
 * past ZERO_PROBE_MAX_OWN_RUNS it stops keeping them and covers nothing.
 */
export class WrittenRanges {
  private readonly starts: number[] = [];
  private readonly ends: number[] = [];
  private overflowed = false;

  /** Index of the last run starting at or before `at`, or -1. */
  private runAtOrBefore(at: number): number {
    let lo = 0;
    let hi = this.starts.length - 1;
    let found = -1;
    while (lo <= hi) {
      const mid = (lo + hi) >> 1;
      if (this.starts[mid] <= at) {
        found = mid;
        lo = mid + 1;
      } else hi = mid - 1;
    }
    return found;
  }

  add(start: number, end: number): void {
    if (this.overflowed || end <= start) return;
    let i = this.runAtOrBefore(start);
    if (i >= 0 && this.ends[i] >= start) {
      // Joins the run before it.
      if (end <= this.ends[i]) return;
      this.ends[i] = end;
    } else {
      i++;
      this.starts.splice(i, 0, start);
      this.ends.splice(i, 0, end);
    }
    // Swallow the runs it now reaches.
    let j = i + 1;
    while (j < this.starts.length && this.starts[j] <= this.ends[i]) {
      if (this.ends[j] > this.ends[i]) this.ends[i] = this.ends[j];
      j++;
    }
    if (j > i + 1) {
      this.starts.splice(i + 1, j - i - 1);
      this.ends.splice(i + 1, j - i - 1);
    }
    if (this.starts.length > ZERO_PROBE_MAX_OWN_RUNS) this.overflowed = true;
  }

  /** True if [start, end) lies within what was written. */
  covers(start: number, end: number): boolean {
    if (this.overflowed) return false;
    const i = this.runAtOrBefore(start);
    return i >= 0 && this.ends[i] >= end;
  }
}

export class NbdTarget implements BackupTarget {
  readonly description: string;
  readonly maxWrite: number;
  /** Pending while the zero probe runs (see BackupTarget.zeroProbe); null once answered or never asked. */
  zeroProbe: Promise<boolean> | null = null;
  private zero: boolean;
  /** What this job wrote while the probe ran; null when no probe runs. */
  private ownWrites: WrittenRanges | null = null;
  /** Largest NBD WRITE sent; a longer write() goes as several, pipelined. */
  private readonly requestBytes: number;
  private closing = false;

  private constructor(
    private readonly client: NbdClient,
    targetIsZero: boolean,
  ) {
    this.description = `nbd ${client.uri}`;
    this.maxWrite = Math.min(client.blockSizes?.maximum || 32 * 1024 * 1024, 32 * 1024 * 1024);
    this.requestBytes = Math.min(this.maxWrite, TARGET_REQUEST_BYTES);
    this.zero = targetIsZero;
  }

  get readsAsZero(): boolean {
    return this.zero;
  }

  /**
   * Opens the target without waiting for the zero probe: on a large target
   * it can take a while (nbdkit memory: 0.3-0.4 s for 1 TiB), and the copy
   * need not wait for it; only the decision on zero ranges does.
   */
  static async open(uri: string, opts: TargetOpenOptions): Promise<NbdTarget> {
    const address = parseNbdUri(uri);
    const forbidden = await forbiddenExportOf(address, opts.notNbdExports ?? []);
    if (forbidden) {
      throw new Error(`target ${uri} is ${forbidden.what}: the backup would overwrite the guest's writes with old data`);
    }
    const client = await NbdClient.connect(address, { maxInFlight: opts.maxInFlight ?? 16 });
    if (client.transmissionFlags & 2) {
      await client.close();
      throw new Error(`target ${uri} is read-only`);
    }
    if (client.size < opts.size) {
      await client.close();
      throw new Error(`target ${uri} is ${client.size} bytes, smaller than the ${opts.size}-byte disk`);
    }
    const target = new NbdTarget(client, !!opts.targetIsZero);
    if (!opts.targetIsZero && client.baseAllocationId !== null) {
      const ownWrites = new WrittenRanges();
      target.ownWrites = ownWrites;
      target.zeroProbe = readsAsZeroUpTo(client, opts.size, ownWrites, () => target.closing).then((zero) => {
        target.zero = zero;
        target.ownWrites = null;
        target.zeroProbe = null;
        return zero;
      });
    }
    return target;
  }

  async write(offset: number, data: readonly Buffer[]): Promise<void> {
    const total = data.reduce((n, b) => n + b.length, 0);
    this.ownWrites?.add(offset, offset + total);
    if (total <= this.requestBytes) return this.client.write(offset, data);
    // Every piece but the last is exactly requestBytes long.
    const parts = splitBuffers(data, this.requestBytes).map((piece, k) =>
      this.client.write(offset + k * this.requestBytes, piece),
    );
    // Not Promise.all: the caller reuses `data` once this settles, and a
    // piece still queued for a free request slot would then send whatever
    // the buffer holds by then.
    await settleAll(parts);
  }

  async writeZeroes(offset: number, length: number): Promise<void> {
    this.ownWrites?.add(offset, offset + length);
    const canZero = (this.client.transmissionFlags & (1 << 6)) !== 0;
    const step = 1024 * 1024 * 1024; // lengths are 32-bit on the wire
    for (let at = 0; at < length; at += step) {
      const n = Math.min(step, length - at);
      if (canZero) await this.client.zero(offset + at, n);
      else {
        const zeros = Buffer.alloc(Math.min(n, 4 * 1024 * 1024));
        for (let k = 0; k < n; k += zeros.length) {
          await this.client.write(offset + at + k, zeros.subarray(0, Math.min(zeros.length, n - k)));
        }
      }
    }
  }

  async commit(): Promise<void> {
    if (this.client.canFlush) await this.client.flush();
  }

  async close(): Promise<void> {
    this.closing = true;
    await this.zeroProbe;
    await this.client.close();
  }
}
