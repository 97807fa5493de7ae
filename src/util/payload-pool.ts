// Reused buffers for WRITE payloads that arrive split across socket reads
// and so must be assembled. A guest writing 32 KiB blocks otherwise costs a
// fresh 32 KiB ArrayBuffer per request: allocation, V8's external-memory
// accounting, and a collection later. Buffers come back once their request
// has finished (the device no longer holds them); the pool keeps at most
// `maxBytes` of idle buffers and recognises only buffers it handed out.

export class PayloadPool {
  private readonly idle = new Map<number, Buffer[]>();
  private readonly mine = new WeakSet<Buffer>();
  private readonly isIdle = new WeakSet<Buffer>();
  private idleBytes = 0;

  constructor(private readonly maxBytes: number) {}

  take(length: number): Buffer {
    const b = this.idle.get(length)?.pop();
    if (b) {
      this.idleBytes -= length;
      this.isIdle.delete(b);
      return b;
    }
    const fresh = Buffer.allocUnsafeSlow(length);
    this.mine.add(fresh);
    return fresh;
  }

  /**
   * Give back a buffer from take(); anything else (views, others' buffers,
   * a buffer already given back) is ignored, so no buffer is ever handed to
   * two users at once.
   */
  give(b: Buffer): void {
    if (!this.mine.has(b) || this.isIdle.has(b) || this.idleBytes + b.length > this.maxBytes) return;
    this.isIdle.add(b);
    let list = this.idle.get(b.length);
    if (!list) this.idle.set(b.length, (list = []));
    list.push(b);
    this.idleBytes += b.length;
  }

  get idleByteCount(): number {
    return this.idleBytes;
  }
}
