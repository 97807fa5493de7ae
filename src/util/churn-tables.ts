// Tables for entries that come and go many thousand times a second: a
// client's requests in flight, the clusters being read, the runs waiting for
// the target.
//
// Why not Map and Set: their backing table is replaced every so many
// inserts and deletes, and V8 leaves the old table pointing at the new one
// (for iterators). Once one table has lived long enough to reach the old
// generation, that dead table keeps its successor alive through the next
// scavenge, which promotes it, which keeps the next one alive, and so on,
// with every entry each of them held, until a full collection. A Map with
// churn in a long-running process thus promotes everything put in it. In a
// node script churning a Map of 8 entries this promoted 1.2 GB in 3 s (154
// full collections), against 0.1 MB for an array of slots; in nbd-cbw it
// was most of the 8-12 MB/s promoted while a backup ran. Arrays and plain
// dictionary objects drop their old storage without such a link.

/**
 * Entries keyed by a small integer (a cluster number, a run's first
 * cluster), in a dictionary object: like Map<number, V> without the
 * promotion chain described above.
 */
export class IntKeyMap<V> {
  private table: Record<number, V> = Object.create(null) as Record<number, V>;
  private count = 0;

  get size(): number {
    return this.count;
  }
  get(key: number): V | undefined {
    return this.table[key];
  }
  has(key: number): boolean {
    return this.table[key] !== undefined;
  }
  /** `value` must not be undefined. */
  set(key: number, value: V): void {
    if (this.table[key] === undefined) this.count++;
    this.table[key] = value;
  }
  delete(key: number): boolean {
    if (this.table[key] === undefined) return false;
    delete this.table[key];
    this.count--;
    return true;
  }
  values(): V[] {
    return Object.values(this.table);
  }
  clear(): void {
    this.table = Object.create(null) as Record<number, V>;
    this.count = 0;
  }
}

/**
 * A set in insertion order, oldest first, for objects that carry their own
 * position (the field named by `posKey`): add at the end, delete from
 * anywhere, find the oldest that matches. An array with a moving head;
 * deleted places are emptied at once and cut off in batches once the head
 * has passed them.
 */
export class InsertionQueue<K extends string, T extends Record<K, number>> {
  private items: Array<T | undefined> = [];
  /** Absolute position of items[0]. */
  private base = 0;
  /** items[0..head) are all empty. */
  private head = 0;
  private count = 0;

  constructor(private readonly posKey: K) {}

  get size(): number {
    return this.count;
  }
  has(item: T): boolean {
    const i = item[this.posKey] - this.base;
    return i >= this.head && i < this.items.length && this.items[i] === item;
  }
  add(item: T): void {
    if (this.has(item)) return;
    (item as Record<K, number>)[this.posKey] = this.base + this.items.length;
    this.items.push(item);
    this.count++;
  }
  delete(item: T): boolean {
    if (!this.has(item)) return false;
    const i = item[this.posKey] - this.base;
    this.items[i] = undefined;
    this.count--;
    if (i === this.head) this.advanceHead();
    return true;
  }
  /** The oldest item for which `pred` holds. */
  find(pred: (item: T) => boolean): T | null {
    for (let i = this.head; i < this.items.length; i++) {
      const item = this.items[i];
      if (item !== undefined && pred(item)) return item;
    }
    return null;
  }
  clear(): void {
    this.base += this.items.length;
    this.items = [];
    this.head = 0;
    this.count = 0;
  }
  [Symbol.iterator](): IterableIterator<T> {
    return (this.items.slice(this.head).filter((x) => x !== undefined) as T[])[Symbol.iterator]();
  }

  private advanceHead(): void {
    while (this.head < this.items.length && this.items[this.head] === undefined) this.head++;
    if (this.head === this.items.length) {
      this.base += this.items.length;
      this.items.length = 0;
      this.head = 0;
    } else if (this.head >= 64 && this.head * 2 >= this.items.length) {
      // In batches: a shift per item would move the whole array each time.
      this.items.splice(0, this.head);
      this.base += this.head;
      this.head = 0;
    }
  }
}

/**
 * Up to `capacity` entries, each in a numbered slot given out on insert:
 * requests in flight on one connection, looked up by the slot their cookie
 * carries.
 */
export class SlotTable<V> {
  private readonly slots: Array<V | undefined>;
  private readonly free: number[] = [];
  private count = 0;

  constructor(readonly capacity: number) {
    this.slots = new Array<V | undefined>(capacity).fill(undefined);
    for (let i = capacity - 1; i >= 0; i--) this.free.push(i);
  }

  get size(): number {
    return this.count;
  }
  /** The slot now holding `value`, or -1 when all are taken. */
  insert(value: V): number {
    const slot = this.free.pop();
    if (slot === undefined) return -1;
    this.slots[slot] = value;
    this.count++;
    return slot;
  }
  get(slot: number): V | undefined {
    return this.slots[slot];
  }
  remove(slot: number): void {
    if (this.slots[slot] === undefined) return;
    this.slots[slot] = undefined;
    this.free.push(slot);
    this.count--;
  }
  values(): V[] {
    return this.slots.filter((v): v is V => v !== undefined);
  }
  clear(): void {
    for (let i = 0; i < this.slots.length; i++) if (this.slots[i] !== undefined) this.remove(i);
  }
}
