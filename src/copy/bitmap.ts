// A flat bitmap of clusters, one bit each: 1 TiB at 64 KiB clusters is 16 Mi
// bits = 2 MiB. Searches skip whole zero words, so sweeping a mostly-copied
// or mostly-skipped disk costs a word scan, not a bit scan.

export class ClusterBitmap {
  private readonly words: Uint32Array;
  private setCount = 0;

  constructor(readonly length: number) {
    this.words = new Uint32Array(Math.ceil(length / 32));
  }

  get count(): number {
    return this.setCount;
  }

  get(i: number): boolean {
    return (this.words[i >>> 5] & (1 << (i & 31))) !== 0;
  }

  /** Set bits [start, end). */
  setRange(start: number, end: number): void {
    this.apply(start, end, true);
  }

  /** Clear bits [start, end); returns how many were set before. */
  clearRange(start: number, end: number): number {
    return this.apply(start, end, false);
  }

  private apply(start: number, end: number, value: boolean): number {
    let changed = 0;
    let i = Math.max(0, start);
    end = Math.min(end, this.length);
    while (i < end) {
      const w = i >>> 5;
      const bit = i & 31;
      const n = Math.min(32 - bit, end - i);
      const mask = n === 32 ? 0xffffffff : ((1 << n) - 1) << bit;
      const old = this.words[w];
      const next = value ? old | mask : old & ~mask;
      changed += popcount((old ^ next) >>> 0);
      this.words[w] = next;
      i += n;
    }
    this.setCount += value ? changed : -changed;
    return changed;
  }

  /** First set bit at or after `from`, or -1. */
  nextSet(from: number): number {
    if (from >= this.length) return -1;
    let w = from >>> 5;
    let word = this.words[w] & (0xffffffff << (from & 31));
    for (;;) {
      if (word !== 0) {
        const i = (w << 5) + ctz(word >>> 0);
        return i < this.length ? i : -1;
      }
      w++;
      if (w >= this.words.length) return -1;
      word = this.words[w];
    }
  }

  /** First set bit in [from, end), or -1; scans only that range. */
  nextSetIn(from: number, end: number): number {
    end = Math.min(end, this.length);
    if (from >= end) return -1;
    let w = from >>> 5;
    const lastWord = (end - 1) >>> 5;
    let word = this.words[w] & (0xffffffff << (from & 31));
    for (;;) {
      if (word !== 0) {
        const i = (w << 5) + ctz(word >>> 0);
        return i < end ? i : -1;
      }
      w++;
      if (w > lastWord) return -1;
      word = this.words[w];
    }
  }

  /** First clear bit in [from, end), or `end`; scans only that range. */
  nextClearIn(from: number, end: number): number {
    end = Math.min(end, this.length);
    if (from >= end) return end;
    let w = from >>> 5;
    const lastWord = (end - 1) >>> 5;
    let word = ~this.words[w] & (0xffffffff << (from & 31));
    for (;;) {
      if (word !== 0) return Math.min((w << 5) + ctz(word >>> 0), end);
      w++;
      if (w > lastWord) return end;
      word = ~this.words[w];
    }
  }

  /** First clear bit at or after `from`, or `length`. */
  nextClear(from: number): number {
    if (from >= this.length) return this.length;
    let w = from >>> 5;
    let word = ~this.words[w] & (0xffffffff << (from & 31));
    for (;;) {
      if (word !== 0) return Math.min((w << 5) + ctz(word >>> 0), this.length);
      w++;
      if (w >= this.words.length) return this.length;
      word = ~this.words[w];
    }
  }
}

function popcount(x: number): number {
  x -= (x >>> 1) & 0x55555555;
  x = (x & 0x33333333) + ((x >>> 2) & 0x33333333);
  x = (x + (x >>> 4)) & 0x0f0f0f0f;
  return Math.imul(x, 0x01010101) >>> 24;
}

function ctz(x: number): number {
  return 31 - Math.clz32(x & -x);
}
