// Turn a --target string into a BackupTarget.

import { FileTarget } from './file';
import { NbdTarget } from './nbd';
import type { BackupTarget, TargetOpenOptions } from './types';
import { validateTargetSpec } from './spec';
import { ChunkedTarget } from './chunked';
import { isStoreSpec, openStore } from '../store/object-store';
import { DEFAULT_CHUNK_SIZE } from '../store/layout';

export async function openTarget(spec: string, opts: TargetOpenOptions): Promise<BackupTarget> {
  const bad = validateTargetSpec(spec);
  if (bad) throw new Error(bad);
  if (spec.startsWith('file:')) return FileTarget.open(spec.slice(5), opts);
  if (isStoreSpec(spec)) {
    const store = await openStore(spec, opts.s3);
    return new ChunkedTarget(store, {
      size: opts.size,
      chunkSize: opts.chunkSize ?? DEFAULT_CHUNK_SIZE,
      source: opts.source ?? 'unknown',
      version: opts.version ?? 'unknown',
    });
  }
  return NbdTarget.open(spec, opts);
}
