// dir:PATH and s3://BUCKET/PREFIX targets: the disk as content-addressed
// chunks plus a manifest written last (see src/store/layout.ts).
//
// The job runs with cluster size = chunk size for these targets, so every
// write the engine makes is whole chunks: a chunk's bytes are always read
// in one go, and no partly filled chunk ever waits in memory for the rest.
//
// Chunk states: unknown (not yet written) -> zero (null) or stored (digest,
// after its PUT succeeded or found it already there). commit() refuses to
// write a manifest while any chunk is unknown, so a manifest never names a
// chunk that is not stored.

import { chunkKey, manifestKey, newBackupId, sha256, MANIFEST_FORMAT, type Manifest } from '../store/layout';
import type { ObjectStore } from '../store/object-store';
import type { BackupTarget } from './types';

export interface ChunkedTargetOptions {
  size: number;
  chunkSize: number;
  source: string;
  version: string;
}

export interface ChunkStats {
  chunksUploaded: number;
  chunksDeduplicated: number;
  chunksZero: number;
  bytesUploaded: number;
}

const UNKNOWN = undefined;

export class ChunkedTarget implements BackupTarget {
  readonly description: string;
  // False, so the engine reports every zero range to writeZeroes(): that is
  // how a chunk becomes known-zero (null) rather than never written.
  readonly readsAsZero = false;
  readonly maxWrite: number;
  readonly requiredClusterSize: number;
  readonly id = newBackupId();
  private readonly chunks: Array<string | null | undefined>;
  private readonly createdAt = new Date();
  readonly stats: ChunkStats = { chunksUploaded: 0, chunksDeduplicated: 0, chunksZero: 0, bytesUploaded: 0 };

  constructor(
    private readonly store: ObjectStore,
    private readonly opts: ChunkedTargetOptions,
  ) {
    this.description = `${store.description} (backup ${this.id})`;
    this.maxWrite = opts.chunkSize;
    this.requiredClusterSize = opts.chunkSize;
    this.chunks = new Array<string | null | undefined>(Math.ceil(opts.size / opts.chunkSize)).fill(UNKNOWN);
  }

  private chunkBounds(index: number): number {
    return Math.min(this.opts.chunkSize, this.opts.size - index * this.opts.chunkSize);
  }

  async write(offset: number, data: readonly Buffer[]): Promise<void> {
    const cs = this.opts.chunkSize;
    const whole = data.length === 1 ? data[0] : Buffer.concat(data as Buffer[]);
    if (offset % cs !== 0) throw new Error(`chunked target: write at ${offset} is not chunk-aligned`);
    const puts: Promise<void>[] = [];
    for (let at = 0; at < whole.length; at += cs) {
      const index = (offset + at) / cs;
      const len = this.chunkBounds(index);
      if (at + len > whole.length) throw new Error(`chunked target: partial chunk ${index} written`);
      puts.push(this.putChunk(index, whole.subarray(at, at + len)));
    }
    await Promise.all(puts);
  }

  private async putChunk(index: number, bytes: Buffer): Promise<void> {
    const digest = await sha256(bytes);
    const stored = await this.store.putIfAbsent(chunkKey(digest), bytes);
    if (stored) {
      this.stats.chunksUploaded++;
      this.stats.bytesUploaded += bytes.length;
    } else this.stats.chunksDeduplicated++;
    this.chunks[index] = digest;
  }

  async writeZeroes(offset: number, length: number): Promise<void> {
    const cs = this.opts.chunkSize;
    if (offset % cs !== 0 || (length % cs !== 0 && offset + length !== this.opts.size)) {
      throw new Error(`chunked target: zero range ${offset}+${length} is not whole chunks`);
    }
    for (let i = offset / cs; i < Math.ceil((offset + length) / cs); i++) {
      this.chunks[i] = null;
      this.stats.chunksZero++;
    }
  }

  async commit(): Promise<void> {
    const missing = this.chunks.findIndex((c) => c === UNKNOWN);
    if (missing !== -1) throw new Error(`chunk ${missing} was never written; refusing to write a manifest`);
    const distinct = new Set<string>();
    let referencedBytes = 0;
    this.chunks.forEach((c, i) => {
      if (c && !distinct.has(c)) {
        distinct.add(c);
        referencedBytes += this.chunkBounds(i);
      }
    });
    const manifest: Manifest = {
      format: MANIFEST_FORMAT,
      id: this.id,
      createdAt: this.createdAt.toISOString(),
      completedAt: new Date().toISOString(),
      diskSize: this.opts.size,
      chunkSize: this.opts.chunkSize,
      chunks: this.chunks as Array<string | null>,
      source: this.opts.source,
      nbdCbwVersion: this.opts.version,
      uploadedBytes: this.stats.bytesUploaded,
      referencedBytes,
    };
    await this.store.put(manifestKey(this.id), Buffer.from(JSON.stringify(manifest)));
  }

  async close(): Promise<void> {
    await this.store.close();
  }

  targetStats(): Record<string, number> {
    return { ...this.stats };
  }
}
