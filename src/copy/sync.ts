// Small async primitives the copy engine is built from.

import { PayloadPool } from '../util/payload-pool';

/** A promise with its resolve/reject exposed. */
export class Deferred<T = void> {
  readonly promise: Promise<T>;
  resolve!: (v: T) => void;
  reject!: (e: Error) => void;
  settled = false;
  constructor() {
    this.promise = new Promise<T>((res, rej) => {
      this.resolve = (v) => {
        this.settled = true;
        res(v);
      };
      this.reject = (e) => {
        this.settled = true;
        rej(e);
      };
    });
    // Rejections are observed by whoever awaits; never crash on an unawaited one.
    this.promise.catch(() => undefined);
  }
}

/** A counting budget (bytes, slots): acquire waits FIFO until there is room. */
export class Budget {
  private used = 0;
  private readonly waiters: Array<{ n: number; d: Deferred }> = [];

  constructor(private capacity: number) {}

  get inUse(): number {
    return this.used;
  }

  /** Someone is waiting for room. */
  get isWaitedOn(): boolean {
    return this.waiters.length > 0;
  }

  get limit(): number {
    return this.capacity;
  }

  /** Take n now if it fits (an oversize request fits an empty budget). */
  tryAcquire(n: number): boolean {
    if (this.waiters.length === 0 && (this.used + n <= this.capacity || this.used === 0)) {
      this.used += n;
      return true;
    }
    return false;
  }

  acquire(n: number): Promise<void> {
    if (this.tryAcquire(n)) return Promise.resolve();
    const d = new Deferred();
    this.waiters.push({ n, d });
    return d.promise;
  }

  release(n: number): void {
    this.used -= n;
    this.wake();
  }

  setCapacity(c: number): void {
    this.capacity = c;
    this.wake();
  }

  /** Fail everyone waiting (the job ended). */
  abort(e: Error): void {
    for (const w of this.waiters.splice(0)) w.d.reject(e);
  }

  private wake(): void {
    while (this.waiters.length > 0) {
      const w = this.waiters[0];
      if (this.used + w.n > this.capacity && this.used !== 0) break;
      this.waiters.shift();
      this.used += w.n;
      w.d.resolve();
    }
  }
}

/**
 * Buffers paid for from a Budget, reused once given back. Saved data lives
 * for seconds, long enough to reach V8's old generation if freshly
 * allocated each time: reuse keeps the copy path from feeding the expensive
 * collections, and keeps the memory held at what the budget says instead of
 * the budget plus garbage not yet collected.
 *
 * Memory bound: a fresh buffer is allocated only after idle buffers were
 * dropped until idle plus the budget's in-use bytes fit its limit, and giving
 * back allocates nothing, so buffers in use plus idle never exceed the limit.
 * A buffer given back is kept even when a waiter has already taken its bytes
 * from the budget: that waiter's take() is what reuses it. (Dropping it there
 * made every guest write on a full buffer allocate afresh.) take() is for
 * bytes the caller already acquired from the budget.
 */
export class BudgetBuffers extends PayloadPool {
  /** Memory reserved by preallocate(), carved into `arenaLength`-byte buffers as take() needs them. */
  private arena: Buffer[] = [];
  private arenaLength = 0;
  private arenaChunk = 0;
  private arenaOffset = 0;

  constructor(private readonly budget: Budget) {
    super(budget.limit, () => budget.limit - budget.inUse);
  }

  /**
   * Reserve the whole budget now, in a few large allocations (at most 1 GiB
   * each), for a pool that is only ever asked for `length`: take() then
   * carves buffers out of it instead of allocating each. A budget filling
   * up (a backup's first seconds) then neither allocates per buffer nor
   * grows V8's external memory 64 MiB at a time, each step of which started
   * a mark-compact. Pages become resident only as buffers are first used,
   * and a buffer is an object only once taken. False, and nothing changed,
   * if the memory cannot be reserved (the pool then allocates as it goes).
   */
  preallocate(length: number): boolean {
    const count = Math.floor(this.budget.limit / length);
    if (count === 0) return false;
    const perChunk = Math.max(1, Math.floor(PREALLOCATE_CHUNK / length));
    const chunks: Buffer[] = [];
    try {
      for (let left = count; left > 0; left -= perChunk) chunks.push(Buffer.allocUnsafeSlow(Math.min(left, perChunk) * length));
    } catch {
      return false; // e.g. strict overcommit: allocate as we go instead
    }
    this.arena = chunks;
    this.arenaLength = length;
    return true;
  }

  protected override allocate(length: number): Buffer {
    if (length === this.arenaLength) {
      while (this.arenaChunk < this.arena.length) {
        const chunk = this.arena[this.arenaChunk];
        if (this.arenaOffset + length <= chunk.length) {
          const b = chunk.subarray(this.arenaOffset, this.arenaOffset + length);
          this.arenaOffset += length;
          return b;
        }
        this.arenaChunk++;
        this.arenaOffset = 0;
      }
    }
    return super.allocate(length);
  }

  override close(): void {
    super.close();
    this.arena = [];
  }
}

/** Largest single allocation preallocate() makes. */
const PREALLOCATE_CHUNK = 1024 * 1024 * 1024;

/** Token bucket for a bytes/second limit; 0 means unlimited. */
export class RateLimiter {
  private allowance = 0;
  private last = Date.now();

  constructor(private bytesPerSecond: number) {}

  set rate(v: number) {
    this.bytesPerSecond = v;
  }

  get rate(): number {
    return this.bytesPerSecond;
  }

  /** Resolves when `bytes` may be sent; waits are bounded by the bucket size. */
  async take(bytes: number, isCancelled: () => boolean): Promise<void> {
    for (;;) {
      if (this.bytesPerSecond <= 0 || isCancelled()) return;
      const now = Date.now();
      // Allow bursts of at most one second's worth.
      this.allowance = Math.min(this.bytesPerSecond, this.allowance + ((now - this.last) / 1000) * this.bytesPerSecond);
      this.last = now;
      if (this.allowance >= bytes || this.allowance >= this.bytesPerSecond) {
        this.allowance -= bytes;
        return;
      }
      const waitMs = Math.min(1000, ((bytes - this.allowance) / this.bytesPerSecond) * 1000);
      await sleep(Math.max(1, waitMs));
    }
  }
}

export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/** Exponential backoff with jitter: base * 2^attempt, capped. */
export function backoffMs(attempt: number, baseMs: number, maxMs: number): number {
  const exp = Math.min(maxMs, baseMs * 2 ** attempt);
  return exp / 2 + Math.random() * (exp / 2);
}
