// The copy-before-write filter: a BlockDevice over the source that, while a
// backup job is attached, makes every guest WRITE, TRIM and WRITE_ZEROES wait
// until the old content of the clusters it touches is saved. It decides only
// *when* to copy; the copy engine does the copying. It owns the CBW timeout
// and the error policy:
//   break-snapshot     saving failed or took too long: the backup fails and
//                      stops, the guest write goes on (default)
//   break-guest-write  the guest write fails with EIO and is not forwarded;
//                      the snapshot stays valid
// Reads are never delayed.
//
// Attaching a job is the backup's point in time: guest writes already on
// their way to the source are let finish first, and new ones wait for that,
// so no write straddles the start.

import { NbdError } from '../nbd-protocol/constants';
import type { CopyEngine } from '../copy/engine';
import { Deferred } from '../copy/sync';
import {
  DeviceError,
  type BlockDevice,
  type BlockSizes,
  type DeviceCapabilities,
  type Extent,
  type WriteOptions,
  type ZeroOptions,
} from '../device/types';

export type CbwErrorPolicy = 'break-snapshot' | 'break-guest-write';

export interface CbwSettings {
  policy: CbwErrorPolicy;
  timeoutMs: number;
}

export interface CbwObserver {
  /** A guest write had to wait for old data to be saved. */
  guestWaited?(seconds: number, ok: boolean): void;
}

export class CbwFilter implements BlockDevice {
  private engine: CopyEngine | null = null;
  private settings: CbwSettings = { policy: 'break-snapshot', timeoutMs: 5000 };
  /**
   * Writes forwarded to the source and not finished. A count, not a set of
   * them: a Set with this churn promotes everything put in it (see
   * util/churn-tables).
   */
  private forwarded = 0;
  /** Resolved when `forwarded` next reaches zero: the point in time of an attach. */
  private drained: Deferred | null = null;
  private barrier: Promise<void> | null = null;
  observer: CbwObserver | null = null;

  constructor(readonly next: BlockDevice) {}

  get size(): number {
    return this.next.size;
  }
  get capabilities(): DeviceCapabilities {
    return this.next.capabilities;
  }
  get blockSizes(): BlockSizes | undefined {
    return this.next.blockSizes;
  }
  get description(): string | undefined {
    return this.next.description;
  }
  get attached(): CopyEngine | null {
    return this.engine;
  }

  /**
   * Start intercepting for `engine`. Resolves at the point in time: when
   * the writes that were already forwarded have finished.
   */
  async attach(engine: CopyEngine, settings: CbwSettings): Promise<void> {
    // An engine that has ended but whose job has not yet detached is replaced.
    if (this.engine?.isIntercepting) throw new Error('a backup job is already attached to this export');
    this.engine = engine;
    this.settings = settings;
    // New writes wait for the barrier, so the count only falls until then.
    // A write that was waiting on an earlier engine and goes on meanwhile is
    // counted too, and so lands before the point in time.
    const barrier = this.forwarded === 0 ? Promise.resolve() : (this.drained ??= new Deferred()).promise;
    this.barrier = barrier;
    await barrier;
    if (this.barrier === barrier) this.barrier = null;
  }

  detach(engine: CopyEngine): void {
    if (this.engine === engine) this.engine = null;
  }

  private async beforeWrite(offset: number, length: number): Promise<void> {
    if (this.barrier) await this.barrier;
    const engine = this.engine;
    if (!engine || !engine.needsSave(offset, length)) return;
    const started = process.hrtime.bigint();
    const { policy, timeoutMs } = this.settings;
    let timer: NodeJS.Timeout | undefined;
    let ok = false;
    try {
      await Promise.race([
        engine.saveForWrite(offset, length),
        new Promise<never>((_, reject) => {
          timer = setTimeout(
            () => reject(new Error(`copy-before-write timed out after ${timeoutMs} ms`)),
            timeoutMs,
          );
        }),
      ]);
      ok = true;
    } catch (e) {
      const msg = e instanceof Error ? e.message : String(e);
      if (policy === 'break-guest-write' && engine.isIntercepting) {
        throw new DeviceError(NbdError.EIO, `write refused to keep the backup snapshot valid: ${msg}`);
      }
      engine.fail(new Error(`copy-before-write failed (${msg}); the backup was stopped so the guest could write`));
    } finally {
      clearTimeout(timer);
      this.observer?.guestWaited?.(Number(process.hrtime.bigint() - started) / 1e9, ok);
    }
  }

  private track<T>(p: Promise<T>): Promise<T> {
    this.forwarded++;
    p.then(this.untrack, this.untrack);
    return p;
  }

  private readonly untrack = (): void => {
    if (--this.forwarded === 0 && this.drained) {
      const d = this.drained;
      this.drained = null;
      d.resolve();
    }
  };

  read(offset: number, length: number, into?: Buffer): Promise<Buffer> {
    return this.next.read(offset, length, into);
  }

  /** The common case, no job or clusters already saved, costs no extra await. */
  private mustWait(offset: number, length: number): boolean {
    return this.barrier !== null || (this.engine !== null && this.engine.needsSave(offset, length));
  }

  write(offset: number, data: Buffer, opts?: WriteOptions): Promise<void> {
    if (!this.mustWait(offset, data.length)) return this.track(this.next.write(offset, data, opts));
    return this.beforeWrite(offset, data.length).then(() => this.track(this.next.write(offset, data, opts)));
  }

  zero(offset: number, length: number, opts?: ZeroOptions): Promise<void> {
    if (!this.mustWait(offset, length)) return this.track(this.next.zero(offset, length, opts));
    return this.beforeWrite(offset, length).then(() => this.track(this.next.zero(offset, length, opts)));
  }

  trim(offset: number, length: number, opts?: WriteOptions): Promise<void> {
    if (!this.mustWait(offset, length)) return this.track(this.next.trim(offset, length, opts));
    return this.beforeWrite(offset, length).then(() => this.track(this.next.trim(offset, length, opts)));
  }

  flush(): Promise<void> {
    return this.next.flush();
  }

  cache(offset: number, length: number): Promise<void> {
    return this.next.cache(offset, length);
  }

  blockStatus(offset: number, length: number): Promise<Extent[]> {
    return this.next.blockStatus(offset, length);
  }

  close(): Promise<void> {
    return this.next.close();
  }
}
