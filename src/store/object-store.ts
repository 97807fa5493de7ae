// Where chunked backups live: a directory (dir:PATH) or an S3 bucket
// (s3://BUCKET/PREFIX) behind one small key/value interface.

export interface StoredObject {
  key: string;
  size: number;
}

export interface ObjectStore {
  readonly description: string;
  /** The object's bytes, or null if there is none. */
  get(key: string): Promise<Buffer | null>;
  /** Store unless the key exists; true if stored, false if it was already there. */
  putIfAbsent(key: string, data: Buffer): Promise<boolean>;
  /** Store, replacing any object under the key. */
  put(key: string, data: Buffer): Promise<void>;
  /** Objects whose key starts with `prefix`, in key order. */
  list(prefix: string): AsyncIterable<StoredObject>;
  delete(key: string): Promise<void>;
  close(): Promise<void>;
}

export interface S3Settings {
  endpoint?: string;
  region?: string;
  forcePathStyle?: boolean;
}

export function isStoreSpec(spec: string): boolean {
  return spec.startsWith('dir:') || spec.startsWith('s3://');
}

export async function openStore(spec: string, s3: S3Settings = {}): Promise<ObjectStore> {
  if (spec.startsWith('dir:')) {
    const { DirStore } = await import('./dir-store');
    const path = spec.slice(4);
    if (!path) throw new Error('dir: needs a path, as in dir:/backups/vm1');
    return DirStore.open(path);
  }
  if (spec.startsWith('s3://')) {
    const { S3Store } = await import('./s3-store');
    return S3Store.open(spec, s3);
  }
  throw new Error(`unrecognised backup location "${spec}": use dir:PATH or s3://BUCKET/PREFIX`);
}
