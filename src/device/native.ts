// Typed loader for the native fileops addon (native/fileops.c): lseek
// SEEK_DATA/SEEK_HOLE, fallocate PUNCH_HOLE/ZERO_RANGE and open file
// description locks, which Node's fs module lacks. Each call runs on libuv's
// thread pool and returns a promise.

import * as path from 'node:path';

export interface FileOps {
  /** lseek(fd, offset, SEEK_DATA): the next data offset >= offset. Rejects ENXIO when there is none. */
  seekData(fd: number, offset: number): Promise<number>;
  /** lseek(fd, offset, SEEK_HOLE): the next hole offset >= offset (EOF counts as a hole). */
  seekHole(fd: number, offset: number): Promise<number>;
  /** fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE). */
  punchHole(fd: number, offset: number, length: number): Promise<number>;
  /** fallocate(FALLOC_FL_ZERO_RANGE). */
  zeroRange(fd: number, offset: number, length: number): Promise<number>;
  /** 1 if another open file description holds a lock on any byte of the range (F_OFD_GETLK), else 0. */
  lockHeld(fd: number, offset: number, length: number): Promise<number>;
  /** Take a shared lock on the range without waiting (F_OFD_SETLK, F_RDLCK); rejects EAGAIN on a conflict. */
  lockShared(fd: number, offset: number, length: number): Promise<number>;
}

/** What the addon rejects with: `code` is the errno name ('EUNKNOWN' for names it does not know). */
export interface FileOpsError extends Error {
  code: string;
  errno: number;
}

/**
 * Where the built addon lives. This file runs as src/device/native.ts under
 * ts-node and as dist/device/native.js after tsc; both are two levels below
 * the repository root.
 */
export const ADDON_PATH = path.join(__dirname, '..', '..', 'native', 'build', 'Release', 'fileops.node');

let cached: FileOps | undefined;

/** Load (once) and return the addon; throws a clear Error when it is missing or broken. */
export function loadFileOps(): FileOps {
  if (cached) return cached;
  let mod: unknown;
  try {
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    mod = require(ADDON_PATH);
  } catch (err) {
    const reason = err instanceof Error ? err.message.split('\n')[0] : String(err);
    throw new Error(
      `cannot load the native fileops addon (${ADDON_PATH}): ${reason}; ` +
        'run `npm install` in the project directory to build it with node-gyp',
    );
  }
  const ops = mod as Partial<FileOps> | null;
  for (const name of ['seekData', 'seekHole', 'punchHole', 'zeroRange', 'lockHeld', 'lockShared'] as const) {
    if (!ops || typeof ops[name] !== 'function') {
      throw new Error(
        `native fileops addon (${ADDON_PATH}) does not export ${name}(); ` +
          'run `npm install` in the project directory to rebuild it',
      );
    }
  }
  cached = ops as FileOps;
  return cached;
}
