// The chunked backup layout, the same in a directory and in S3:
//
//   chunks/ab/abcdef...            a chunk, named by the SHA-256 of its bytes;
//                                  stored once however many backups use it
//   backups/<id>.manifest.json     written last: a backup without its
//                                  manifest is incomplete and never listed
//
// A chunk is `chunkSize` bytes (the last one may be shorter). All-zero
// chunks are not stored: the manifest lists them as null.

import crypto from 'node:crypto';
import type { ObjectStore } from './object-store';

export const MANIFEST_FORMAT = 'nbd-cbw-backup-v1';
export const DEFAULT_CHUNK_SIZE = 4 * 1024 * 1024;

export interface Manifest {
  format: typeof MANIFEST_FORMAT;
  id: string;
  createdAt: string;
  completedAt: string;
  diskSize: number;
  chunkSize: number;
  /** SHA-256 (hex) per chunk, or null for an all-zero chunk. */
  chunks: Array<string | null>;
  source: string;
  nbdCbwVersion: string;
  /** Bytes of chunks this backup stored that were not there before. */
  uploadedBytes: number;
  /** Bytes of all distinct non-zero chunks it references. */
  referencedBytes: number;
}

export function chunkKey(digest: string): string {
  return `chunks/${digest.slice(0, 2)}/${digest}`;
}

export function manifestKey(id: string): string {
  return `backups/${id}.manifest.json`;
}

export function newBackupId(now = new Date()): string {
  const stamp = now.toISOString().replace(/[-:]/g, '').replace(/\.\d+Z$/, 'Z');
  return `${stamp}-${crypto.randomBytes(3).toString('hex')}`;
}

/** SHA-256 off the main thread (WebCrypto runs on the thread pool). */
export async function sha256(data: Buffer): Promise<string> {
  const d = await crypto.webcrypto.subtle.digest('SHA-256', data);
  return Buffer.from(d).toString('hex');
}

export function validateManifest(m: unknown, where: string): Manifest {
  const bad = (why: string): never => {
    throw new Error(`${where} is not a valid nbd-cbw manifest: ${why}`);
  };
  if (typeof m !== 'object' || m === null) bad('not an object');
  const x = m as Manifest;
  if (x.format !== MANIFEST_FORMAT) bad(`unknown format ${JSON.stringify(x.format)}`);
  if (!Number.isSafeInteger(x.diskSize) || x.diskSize < 0) bad('bad diskSize');
  if (!Number.isSafeInteger(x.chunkSize) || x.chunkSize <= 0) bad('bad chunkSize');
  if (!Array.isArray(x.chunks) || x.chunks.length !== Math.ceil(x.diskSize / x.chunkSize)) bad('chunk list does not match the disk size');
  for (const c of x.chunks) if (c !== null && !/^[0-9a-f]{64}$/.test(c)) bad(`bad chunk digest ${JSON.stringify(c)}`);
  return x;
}

export async function readManifest(store: ObjectStore, id: string): Promise<Manifest> {
  const raw = await store.get(manifestKey(id));
  if (!raw) throw new Error(`no complete backup "${id}" in ${store.description}`);
  let parsed: unknown;
  try {
    parsed = JSON.parse(raw.toString('utf8'));
  } catch {
    throw new Error(`manifest of backup ${id} in ${store.description} is not JSON`);
  }
  return validateManifest(parsed, `manifest of backup ${id}`);
}

/** IDs of complete backups, oldest first (IDs sort by time). */
export async function listBackupIds(store: ObjectStore): Promise<string[]> {
  const ids: string[] = [];
  for await (const o of store.list('backups/')) {
    const m = /^backups\/(.+)\.manifest\.json$/.exec(o.key);
    if (m) ids.push(m[1]);
  }
  return ids.sort();
}

/** The backup `id`, or the newest complete one. */
export async function findManifest(store: ObjectStore, id?: string): Promise<Manifest> {
  if (id) return readManifest(store, id);
  const ids = await listBackupIds(store);
  if (ids.length === 0) throw new Error(`no complete backup in ${store.description}`);
  return readManifest(store, ids[ids.length - 1]);
}

/** Fetch a chunk and check it is what the manifest says. */
export async function fetchChunk(store: ObjectStore, digest: string, expectedLength: number): Promise<Buffer> {
  const data = await store.get(chunkKey(digest));
  if (!data) throw new Error(`chunk ${digest} is missing from ${store.description}`);
  if (data.length !== expectedLength) {
    throw new Error(`chunk ${digest} is ${data.length} bytes, expected ${expectedLength}: corrupt`);
  }
  const actual = await sha256(data);
  if (actual !== digest) throw new Error(`chunk ${digest} is corrupt: its content hashes to ${actual}`);
  return data;
}

export function chunkLength(m: Pick<Manifest, 'diskSize' | 'chunkSize'>, index: number): number {
  return Math.min(m.chunkSize, m.diskSize - index * m.chunkSize);
}
