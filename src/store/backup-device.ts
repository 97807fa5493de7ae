// A read-only BlockDevice over a chunked backup, for serve-backup: reads
// fetch the chunks they touch (each checked against its digest), keep the
// most recent few in memory, and share a fetch between concurrent readers.
// Zero chunks read as zeros and report as holes in block status.

import { NbdError } from '../nbd-protocol/constants';
import { DeviceError, type BlockDevice, type DeviceCapabilities, type Extent } from '../device/types';
import { chunkLength, fetchChunk, type Manifest } from './layout';
import type { ObjectStore } from './object-store';

export class BackupDevice implements BlockDevice {
  readonly size: number;
  readonly capabilities: DeviceCapabilities = {
    readOnly: true,
    flush: false,
    fua: false,
    trim: false,
    zero: false,
    fastZero: false,
    cache: false,
    blockStatus: true,
    multiConn: true,
  };
  readonly blockSizes = { minimum: 1, preferred: 4096, maximum: 32 * 1024 * 1024 };
  readonly description: string;
  private readonly chunkCache = new Map<number, Promise<Buffer>>();

  constructor(
    private readonly store: ObjectStore,
    readonly manifest: Manifest,
    private readonly cacheChunks = 16,
  ) {
    this.size = manifest.diskSize;
    this.description = `backup ${manifest.id} of ${manifest.source} in ${store.description}`;
  }

  private chunk(index: number): Promise<Buffer> {
    const hit = this.chunkCache.get(index);
    if (hit) {
      // Refresh its place in the LRU order.
      this.chunkCache.delete(index);
      this.chunkCache.set(index, hit);
      return hit;
    }
    const digest = this.manifest.chunks[index] as string;
    const p = fetchChunk(this.store, digest, chunkLength(this.manifest, index)).catch((e: unknown) => {
      this.chunkCache.delete(index);
      throw new DeviceError(NbdError.EIO, (e as Error).message);
    });
    this.chunkCache.set(index, p);
    while (this.chunkCache.size > this.cacheChunks) this.chunkCache.delete(this.chunkCache.keys().next().value as number);
    return p;
  }

  async read(offset: number, length: number, into?: Buffer): Promise<Buffer> {
    const out = into ?? Buffer.allocUnsafe(length);
    const cs = this.manifest.chunkSize;
    const parts: Promise<void>[] = [];
    for (let at = offset; at < offset + length; ) {
      const index = Math.floor(at / cs);
      const inChunk = at - index * cs;
      const n = Math.min(cs - inChunk, offset + length - at);
      const dest = at - offset;
      if (this.manifest.chunks[index] === null) out.fill(0, dest, dest + n);
      else parts.push(this.chunk(index).then((c) => void c.copy(out, dest, inChunk, inChunk + n)));
      at += n;
    }
    await Promise.all(parts);
    return out;
  }

  private refuse(): Promise<never> {
    return Promise.reject(new DeviceError(NbdError.EPERM, 'a backup is read-only'));
  }
  write(): Promise<void> {
    return this.refuse();
  }
  zero(): Promise<void> {
    return this.refuse();
  }
  trim(): Promise<void> {
    return this.refuse();
  }
  async flush(): Promise<void> {}
  async cache(): Promise<void> {}

  async blockStatus(offset: number, length: number): Promise<Extent[]> {
    const cs = this.manifest.chunkSize;
    const out: Extent[] = [];
    const end = Math.min(offset + length, this.size);
    for (let at = offset; at < end && out.length < 1024; ) {
      const index = Math.floor(at / cs);
      const n = Math.min((index + 1) * cs, end) - at;
      const flags = this.manifest.chunks[index] === null ? 3 : 0;
      const last = out[out.length - 1];
      if (last && last.flags === flags && last.length + n <= 0x80000000) last.length += n;
      else out.push({ length: n, flags });
      at += n;
    }
    return out;
  }

  async close(): Promise<void> {
    this.chunkCache.clear();
    await this.store.close();
  }
}
