// file:PATH target: a raw image. A new file is created sparse at the disk's
// size and so reads as zeros; an existing file must be at least that size
// and is only trusted to read as zeros with --target-is-zero. PATH may also
// be a block device (an LV, a disk), which must be at least the disk's size
// and reads as zeros only with --target-is-zero; anything else (a character
// device such as /dev/null, a FIFO) is refused, since it cannot hold the
// backup that completion would report. A target that another process
// writes, or keeps others from writing (QEMU's image locks), is refused, and
// the job holds those locks itself until it lets the file go.

import fs from 'node:fs';
import { blockDeviceSize } from '../device/file';
import { loadFileOps } from '../device/native';
import { claimImageLocks } from '../device/image-locks';
import type { BackupTarget, TargetOpenOptions } from './types';

export class FileTarget implements BackupTarget {
  readonly maxWrite = 32 * 1024 * 1024;
  /**
   * Buffered writes to one file run one at a time under its inode lock
   * (tmpfs, ext4 and xfs alike). More in flight on libuv's threads only wait
   * for that lock, spinning on the other CPU, and each copies from a run
   * that has left the cache meanwhile: a 1 GiB backup to a file on tmpfs
   * took 0.82-0.94 s with 8 in flight against 0.72-0.77 with 2 (BENCHMARKS.md,
   * ninth session). Two: one in the kernel, the next queued behind it, so
   * the file never idles while the main thread answers a completion.
   */
  readonly maxWritesInFlight = 2;
  private closed = false;

  private constructor(
    private readonly fd: number,
    readonly description: string,
    readonly readsAsZero: boolean,
  ) {}

  static async open(path: string, opts: TargetOpenOptions): Promise<FileTarget> {
    let fd: number;
    let created = false;
    try {
      fd = fs.openSync(path, fs.constants.O_RDWR | fs.constants.O_CREAT | fs.constants.O_EXCL, 0o644);
      created = true;
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EEXIST') {
        throw new Error(`cannot create target file ${path}: ${(e as Error).message}`);
      }
      try {
        fd = fs.openSync(path, fs.constants.O_RDWR);
      } catch (e2) {
        throw new Error(`cannot open target file ${path}: ${(e2 as Error).message}`);
      }
    }
    // A new or empty file is sized here, and then reads as zeros.
    let zeroed = false;
    try {
      const st = fs.fstatSync(fd, { bigint: true });
      const disk = opts.notSameFileAs;
      if (
        disk &&
        ((st.dev === disk.dev && st.ino === disk.ino) || (st.isBlockDevice() && disk.isBlockDevice && st.rdev === disk.rdev))
      ) {
        throw new Error(`target ${path} is the disk being backed up: the backup would overwrite the guest's writes with old data`);
      }
      if (st.isBlockDevice()) {
        const size = await blockDeviceSize(`target block device ${path}`, st.rdev);
        if (size < opts.size) throw new Error(`target block device ${path} is ${size} bytes, smaller than the ${opts.size}-byte disk`);
      } else if (!st.isFile()) {
        throw new Error(`target ${path} is not a regular file or a block device, so it cannot hold the backup`);
      } else if (st.size !== 0n && st.size < BigInt(opts.size)) {
        throw new Error(`target file ${path} is ${st.size} bytes, smaller than the ${opts.size}-byte disk`);
      }
      // Locked only once it is known to be usable, and before anything is written.
      const inUse = await claimImageLocks(loadFileOps(), fd);
      if (inUse) throw new Error(`target ${path} is in use: ${inUse}; writing the backup there would corrupt it`);
      if (st.isFile() && st.size === 0n) {
        try {
          fs.ftruncateSync(fd, opts.size);
        } catch (e) {
          throw new Error(`cannot make target file ${path} ${opts.size} bytes long: ${(e as Error).message}`);
        }
        zeroed = true;
      }
    } catch (e) {
      fs.closeSync(fd);
      // A file this call created and could not size is of no use to anyone.
      if (created) fs.rmSync(path, { force: true });
      throw e;
    }
    return new FileTarget(fd, `file ${path}`, zeroed || !!opts.targetIsZero);
  }

  write(offset: number, data: readonly Buffer[]): Promise<void> {
    return new Promise((resolve, reject) => {
      const total = data.reduce((n, b) => n + b.length, 0);
      const go = (bufs: readonly Buffer[], at: number, left: number) => {
        fs.writev(this.fd, bufs as Buffer[], at, (err, written) => {
          if (err) return reject(err);
          if (written === left) return resolve();
          // Short write: continue after what was written.
          let skip = written;
          const rest: Buffer[] = [];
          for (const b of bufs) {
            if (skip >= b.length) skip -= b.length;
            else {
              rest.push(skip ? b.subarray(skip) : b);
              skip = 0;
            }
          }
          go(rest, at + written, left - written);
        });
      };
      go(data, offset, total);
    });
  }

  async writeZeroes(offset: number, length: number): Promise<void> {
    try {
      await loadFileOps().punchHole(this.fd, offset, length);
      return;
    } catch {
      // no hole punching here: write zeros
    }
    const zeros = Buffer.alloc(Math.min(length, 1024 * 1024));
    for (let at = 0; at < length; at += zeros.length) {
      await this.write(offset + at, [zeros.subarray(0, Math.min(zeros.length, length - at))]);
    }
  }

  commit(): Promise<void> {
    return new Promise((resolve, reject) => fs.fdatasync(this.fd, (e) => (e ? reject(e) : resolve())));
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    fs.closeSync(this.fd);
  }
}
