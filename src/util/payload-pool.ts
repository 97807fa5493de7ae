// Reused buffers, one idle list per length. Data that lives for a request
// (an assembled WRITE payload, a READ reply) or for seconds (old data on its
// way to a backup target) would otherwise be a fresh ArrayBuffer each time:
// allocation, V8's external-memory accounting, a collection later, and
// garbage held as RSS until then. Buffers come back once their user is done
// with them; the pool keeps at most `maxBytes` of idle buffers and
// recognises only buffers it handed out, so none is ever handed to two users.
//
// `idleRoom`, if given, is how many idle bytes may stay when a fresh buffer
// must be allocated: idle buffers of other lengths are dropped down to it
// first. BudgetBuffers (src/copy/sync.ts) uses it to keep buffers in use
// plus idle within a byte budget.

export class PayloadPool {
  private readonly idle = new Map<number, Buffer[]>();
  private readonly mine = new WeakSet<Buffer>();
  private readonly isIdle = new WeakSet<Buffer>();
  private idleBytes = 0;
  private closed = false;

  constructor(
    private readonly maxBytes: number,
    private readonly idleRoom?: () => number,
  ) {}

  take(length: number): Buffer {
    const b = this.idle.get(length)?.pop();
    if (b) {
      this.idleBytes -= length;
      this.isIdle.delete(b);
      return b;
    }
    if (this.idleRoom) this.dropIdleTo(this.idleRoom());
    const fresh = this.allocate(length);
    this.mine.add(fresh);
    return fresh;
  }

  /** A new buffer for take() when no idle one fits. */
  protected allocate(length: number): Buffer {
    return Buffer.allocUnsafeSlow(length);
  }

  /**
   * Give back a buffer from take(); anything else (views, others' buffers,
   * a buffer already given back) is ignored, so no buffer is ever handed to
   * two users at once.
   */
  give(b: Buffer): void {
    if (this.closed || !this.mine.has(b) || this.isIdle.has(b) || this.idleBytes + b.length > this.maxBytes) return;
    this.isIdle.add(b);
    let list = this.idle.get(b.length);
    if (!list) this.idle.set(b.length, (list = []));
    list.push(b);
    this.idleBytes += b.length;
  }

  /** Drop every idle buffer and keep none from now on. */
  close(): void {
    this.closed = true;
    this.idle.clear();
    this.idleBytes = 0;
  }

  get idleByteCount(): number {
    return this.idleBytes;
  }

  private dropIdleTo(room: number): void {
    for (const [length, list] of this.idle) {
      if (this.idleBytes <= room) return;
      while (list.length > 0 && this.idleBytes > room) {
        this.isIdle.delete(list.pop() as Buffer);
        this.idleBytes -= length;
      }
      if (list.length === 0) this.idle.delete(length);
    }
  }
}
