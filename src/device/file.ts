// A local file or block device as a BlockDevice: the source disk of the proxy.
//
// This is on the hot path of every guest request, so it works on a raw fd with
// fs.read/fs.write callbacks wrapped in promises (measurably faster than
// FileHandle, especially with many requests in flight) and reads straight into
// the caller's buffer. The native addon supplies SEEK_DATA/SEEK_HOLE for block
// status and fallocate for TRIM and WRITE_ZEROES. Opened read-write, a file
// another process writes is refused, and an open one holds QEMU's image lock
// bytes as a writer that shares no writes (image-locks.ts): a write nbd-cbw
// does not see would break its backups' point in time.

import * as fs from 'node:fs';
import { AllocationFlag, NbdError } from '../nbd-protocol/constants';
import { loadFileOps, type FileOps } from './native';
import { QEMU_LOCK_WRITE, claimImageLocks } from './image-locks';
import {
  DeviceError,
  type BlockDevice,
  type BlockSizes,
  type DeviceCapabilities,
  type Extent,
  type FileIdentity,
  type WriteOptions,
  type ZeroOptions,
} from './types';

export interface FileDeviceOptions {
  readOnly?: boolean;
  /** Create a NEW sparse file of this size; fails if the path already exists. */
  create?: { size: number };
}

/** Most extents one blockStatus call returns. */
export const MAX_EXTENTS = 1024;
/** Longest single extent blockStatus returns (fits the 32-bit wire field with room to spare). */
export const MAX_EXTENT_LENGTH = 0x80000000;
/** Largest chunk written when zeros have to be written out. */
const ZERO_CHUNK = 1024 * 1024;

const HOLE_FLAGS = AllocationFlag.Hole | AllocationFlag.Zero;

let zeroBuffer: Buffer | undefined;
/** One shared, never-modified 1 MiB buffer of zeros. */
function zeros(): Buffer {
  if (!zeroBuffer) zeroBuffer = Buffer.alloc(ZERO_CHUNK);
  return zeroBuffer;
}

/** Map an errno name from fs or the addon onto an NBD error value. */
export function nbdErrorFor(code: string | undefined): number {
  switch (code) {
    case 'ENOSPC':
    case 'EDQUOT':
    case 'EFBIG':
      return NbdError.ENOSPC;
    case 'EROFS':
    case 'EPERM':
    case 'EACCES':
      return NbdError.EPERM;
    case 'EINVAL':
      return NbdError.EINVAL;
    case 'ENOMEM':
      return NbdError.ENOMEM;
    default:
      return NbdError.EIO;
  }
}

function errCode(err: unknown): string | undefined {
  const code = (err as { code?: unknown } | null)?.code;
  return typeof code === 'string' ? code : undefined;
}

/** fallocate failures that mean "not available here" rather than a real error. */
function isUnsupported(err: unknown): boolean {
  const code = errCode(err);
  if (code === 'EOPNOTSUPP' || code === 'ENOTSUP' || code === 'ENOSYS' || code === 'ENODEV') return true;
  // Block devices reject ranges not aligned to the logical block size with
  // EINVAL, and some file systems use EINVAL for modes they lack. The ranges
  // themselves were checked by the caller, so treat it as "cannot do it fast".
  if (code === 'EINVAL') return true;
  // The addon names errnos it does not know 'EUNKNOWN'; ENOSYS is 38.
  return code === 'EUNKNOWN' && (err as { errno?: unknown }).errno === 38;
}

function pread(fd: number, buf: Buffer, off: number, len: number, pos: number): Promise<number> {
  return new Promise((resolve, reject) => {
    fs.read(fd, buf, off, len, pos, (err, n) => (err ? reject(err) : resolve(n)));
  });
}

function pwrite(fd: number, buf: Buffer, off: number, len: number, pos: number): Promise<number> {
  return new Promise((resolve, reject) => {
    fs.write(fd, buf, off, len, pos, (err, n) => (err ? reject(err) : resolve(n)));
  });
}

function fdatasync(fd: number): Promise<void> {
  return new Promise((resolve, reject) => {
    fs.fdatasync(fd, (err) => (err ? reject(err) : resolve()));
  });
}

function openMessage(path: string, err: unknown, creating: boolean): string {
  const code = errCode(err);
  const prefix = `file source ${path}`;
  switch (code) {
    case 'ENOENT':
      return creating ? `${prefix}: directory does not exist` : `${prefix}: no such file`;
    case 'EEXIST':
      return `${prefix}: already exists (refusing to overwrite it when creating a new file)`;
    case 'EACCES':
    case 'EPERM':
      return `${prefix}: permission denied`;
    case 'EISDIR':
      return `${prefix}: is a directory`;
    case 'ENOTDIR':
      return `${prefix}: a component of the path is not a directory`;
    case 'EROFS':
      return `${prefix}: read-only file system (open it read-only)`;
    case 'EBUSY':
      return `${prefix}: device or resource busy`;
    case 'EFBIG':
    case 'EINVAL':
      return creating ? `${prefix}: cannot create a file of that size (${code})` : `${prefix}: ${code}`;
    default: {
      const msg = err instanceof Error ? err.message : String(err);
      return `${prefix}: ${msg}`;
    }
  }
}

/** Linux dev_t decoding (glibc gnu_dev_major/minor). */
function devMajorMinor(rdev: bigint): [bigint, bigint] {
  const major = ((rdev >> 8n) & 0xfffn) | ((rdev >> 32n) & ~0xfffn);
  const minor = (rdev & 0xffn) | ((rdev >> 12n) & ~0xffn);
  return [major, minor];
}

/**
 * A block device's size from sysfs (st_size is 0 for block devices).
 * `label` starts the error message (e.g. "file source /dev/sdb").
 */
export async function blockDeviceSize(label: string, rdev: bigint): Promise<number> {
  const [major, minor] = devMajorMinor(rdev);
  const sysfs = `/sys/dev/block/${major}:${minor}/size`;
  let text: string;
  try {
    text = await fs.promises.readFile(sysfs, 'utf8');
  } catch (err) {
    throw new Error(`${label}: cannot determine the block device's size (${sysfs}: ${errCode(err) ?? err})`);
  }
  const sectors = Number(text.trim());
  if (!Number.isSafeInteger(sectors) || sectors < 0) {
    throw new Error(`${label}: cannot determine the block device's size (${sysfs} says ${JSON.stringify(text.trim())})`);
  }
  return sectors * 512;
}

export class FileDevice implements BlockDevice {
  readonly capabilities: DeviceCapabilities;
  readonly blockSizes: BlockSizes = { minimum: 1, preferred: 4096, maximum: 32 * 1024 * 1024 };
  readonly description: string;

  private inflight = 0;
  private drained: (() => void) | undefined;
  private closing: Promise<void> | undefined;
  // Remembered EOPNOTSUPP-style answers, so unsupported calls are not retried
  // on every request. (EINVAL on block devices depends on alignment and is not
  // remembered.)
  private noPunchHole = false;
  private noZeroRange = false;
  private noSeekData = false;

  /** The file or block device served, to tell it from a backup target. */
  fileIdentity(): FileIdentity {
    const st = fs.fstatSync(this.fd, { bigint: true });
    return { dev: st.dev, ino: st.ino, rdev: st.rdev, isBlockDevice: st.isBlockDevice() };
  }

  /**
   * Read-write, this device's own lock bytes keep QEMU's writers out; read-
   * only, it shares writes (as qemu-nbd -r does), so ask who holds them.
   */
  async otherWriter(): Promise<string | null> {
    if (!this.readOnly) return null;
    try {
      if (await this.ops.lockHeld(this.fd, QEMU_LOCK_WRITE, 1)) {
        return `another process writes to ${this.path} (it holds QEMU's "write" lock)`;
      }
    } catch {
      // no OFD locks on this file system: nothing to tell
    }
    return null;
  }

  private constructor(
    readonly path: string,
    private readonly fd: number,
    readonly size: number,
    readonly readOnly: boolean,
    readonly isBlockDevice: boolean,
    private readonly ops: FileOps,
  ) {
    this.description = `file ${path}`;
    this.capabilities = {
      readOnly,
      flush: true,
      fua: true,
      trim: true,
      zero: true,
      fastZero: true,
      cache: true,
      blockStatus: true,
      multiConn: true,
    };
  }

  /**
   * Open a regular file or a block device. With `create`, make a new sparse
   * file of that size (failing if the path exists).
   */
  static async open(path: string, opts: FileDeviceOptions = {}): Promise<FileDevice> {
    const ops = loadFileOps();
    const readOnly = opts.readOnly ?? false;
    const create = opts.create;
    if (create && (!Number.isSafeInteger(create.size) || create.size < 0)) {
      throw new Error(`file source ${path}: invalid size ${create.size} for a new file`);
    }
    const { O_RDONLY, O_RDWR, O_CREAT, O_EXCL } = fs.constants;
    let fd: number | undefined;
    try {
      if (create) {
        fd = await openFd(path, O_RDWR | O_CREAT | O_EXCL, 0o644);
        try {
          await new Promise<void>((resolve, reject) =>
            fs.ftruncate(fd!, create.size, (err) => (err ? reject(err) : resolve())),
          );
        } catch (err) {
          await closeQuietly(fd);
          fd = undefined;
          await fs.promises.unlink(path).catch(() => undefined);
          throw err;
        }
      } else {
        fd = await openFd(path, readOnly ? O_RDONLY : O_RDWR);
      }
    } catch (err) {
      throw new Error(openMessage(path, err, !!create), { cause: err });
    }

    try {
      const st = await new Promise<fs.BigIntStats>((resolve, reject) =>
        fs.fstat(fd!, { bigint: true }, (err, s) => (err ? reject(err) : resolve(s))),
      );
      let size: number;
      let isBlock = false;
      if (st.isFile()) {
        size = Number(st.size);
      } else if (st.isBlockDevice()) {
        isBlock = true;
        size = await blockDeviceSize(`file source ${path}`, st.rdev);
      } else if (st.isDirectory()) {
        throw new Error(`file source ${path}: is a directory`);
      } else {
        throw new Error(`file source ${path}: not a regular file or block device`);
      }
      if (!Number.isSafeInteger(size)) throw new Error(`file source ${path}: size ${st.size} is too large`);
      // Read-only, it shares writes as `qemu-nbd -r` does: a second,
      // read-only export of a served image is a reader like any other.
      const inUse = readOnly ? null : await claimImageLocks(ops, fd);
      if (inUse) {
        throw new Error(`file source ${path} is in use: ${inUse}; nbd-cbw must see every write to the disk it serves, or its backups would miss them`);
      }
      return new FileDevice(path, fd, size, readOnly, isBlock, ops);
    } catch (err) {
      await closeQuietly(fd);
      throw err;
    }
  }

  async read(offset: number, length: number, into?: Buffer): Promise<Buffer> {
    const buf = into ?? Buffer.allocUnsafe(length);
    if (buf.length < length) {
      throw new DeviceError(NbdError.EINVAL, `${this.description}: read buffer of ${buf.length} bytes is shorter than ${length}`);
    }
    this.enter();
    try {
      let done = 0;
      while (done < length) {
        const n = await pread(this.fd, buf, done, length - done, offset + done);
        if (n === 0) {
          // Past the end of the file (it shrank under us): reads as zeros.
          buf.fill(0, done, length);
          break;
        }
        done += n;
      }
    } catch (err) {
      throw this.fail(err, 'read', offset, length);
    } finally {
      this.leave();
    }
    return buf.length === length ? buf : buf.subarray(0, length);
  }

  async write(offset: number, data: Buffer, opts?: WriteOptions): Promise<void> {
    this.checkWritable('write');
    this.enter();
    try {
      await this.writeAll(offset, data, data.length);
      if (opts?.fua) await fdatasync(this.fd);
    } catch (err) {
      throw this.fail(err, 'write', offset, data.length);
    } finally {
      this.leave();
    }
  }

  async trim(offset: number, length: number, opts?: WriteOptions): Promise<void> {
    this.checkWritable('trim');
    if (length === 0) return;
    this.enter();
    try {
      // TRIM is advisory: where holes cannot be punched, do nothing.
      await this.tryPunchHole(offset, length);
      if (opts?.fua) await fdatasync(this.fd);
    } catch (err) {
      throw this.fail(err, 'trim', offset, length);
    } finally {
      this.leave();
    }
  }

  async zero(offset: number, length: number, opts?: ZeroOptions): Promise<void> {
    this.checkWritable('zero');
    if (length === 0) return;
    this.enter();
    try {
      let done = false;
      if (opts?.mayTrim) done = await this.tryPunchHole(offset, length);
      if (!done) done = await this.tryZeroRange(offset, length);
      if (!done) {
        if (opts?.fastOnly) {
          throw new DeviceError(
            NbdError.ENOTSUP,
            `${this.description}: cannot zero ${offset}+${length} quickly (fallocate unsupported here)`,
          );
        }
        const z = zeros();
        let pos = offset;
        const end = offset + length;
        while (pos < end) {
          const n = Math.min(z.length, end - pos);
          await this.writeAll(pos, z, n);
          pos += n;
        }
      }
      if (opts?.fua) await fdatasync(this.fd);
    } catch (err) {
      throw this.fail(err, 'zero', offset, length);
    } finally {
      this.leave();
    }
  }

  async flush(): Promise<void> {
    this.enter();
    try {
      await fdatasync(this.fd);
    } catch (err) {
      throw this.fail(err, 'flush', 0, 0);
    } finally {
      this.leave();
    }
  }

  async cache(_offset: number, _length: number): Promise<void> {
    // Node has no posix_fadvise; the page cache does the work anyway.
    this.enter();
    this.leave();
  }

  async blockStatus(offset: number, length: number): Promise<Extent[]> {
    const end = Math.min(offset + length, this.size);
    if (end <= offset) return [];
    if (this.noSeekData) return [{ length: Math.min(end - offset, MAX_EXTENT_LENGTH), flags: 0 }];
    this.enter();
    try {
      const extents: Extent[] = [];
      let pos = offset;
      // Bounded so that a file rewritten under us cannot make this spin.
      for (let rounds = 0; pos < end && extents.length < MAX_EXTENTS && rounds < 4 * MAX_EXTENTS; rounds++) {
        let data: number;
        try {
          data = await this.ops.seekData(this.fd, pos);
        } catch (err) {
          const code = errCode(err);
          if (code === 'ENXIO') {
            data = end; // no data after pos: a hole to the end of the file
          } else if (code === 'EINVAL' || isUnsupported(err)) {
            if (extents.length === 0) this.noSeekData = true;
            break;
          } else {
            throw err;
          }
        }
        if (data > pos) {
          const holeEnd = Math.min(data, end);
          pos = pushExtent(extents, pos, holeEnd, HOLE_FLAGS);
          continue;
        }
        // Data at pos: find where it ends.
        let hole: number;
        try {
          hole = await this.ops.seekHole(this.fd, pos);
        } catch (err) {
          if (errCode(err) === 'ENXIO') continue; // file shrank under us: seekData will say ENXIO
          throw err;
        }
        if (hole <= pos) continue; // a hole appeared at pos meanwhile: look again
        pos = pushExtent(extents, pos, Math.min(hole, end), 0);
      }
      if (pos === offset) {
        // Nothing learned (SEEK_DATA unsupported, or the file kept changing):
        // "data" is always a correct answer.
        return [{ length: Math.min(end - offset, MAX_EXTENT_LENGTH), flags: 0 }];
      }
      return extents;
    } catch (err) {
      throw this.fail(err, 'block status', offset, length);
    } finally {
      this.leave();
    }
  }

  /** Close the file once no request is in flight. Idempotent. */
  close(): Promise<void> {
    if (!this.closing) {
      this.closing = (async () => {
        if (this.inflight > 0) await new Promise<void>((resolve) => (this.drained = resolve));
        await new Promise<void>((resolve, reject) => fs.close(this.fd, (err) => (err ? reject(err) : resolve())));
      })();
    }
    return this.closing;
  }

  // --- internals ---

  private enter(): void {
    if (this.closing) throw new DeviceError(NbdError.ESHUTDOWN, `${this.description}: device is closed`);
    this.inflight++;
  }

  private leave(): void {
    if (--this.inflight === 0 && this.drained) {
      const drained = this.drained;
      this.drained = undefined;
      drained();
    }
  }

  private checkWritable(what: string): void {
    if (this.readOnly) throw new DeviceError(NbdError.EPERM, `${this.description}: ${what} on a read-only device`);
  }

  private async writeAll(offset: number, data: Buffer, length: number): Promise<void> {
    let done = 0;
    while (done < length) {
      const n = await pwrite(this.fd, data, done, length - done, offset + done);
      if (n <= 0) throw Object.assign(new Error('write made no progress'), { code: 'EIO' });
      done += n;
    }
  }

  /** Punch a hole; false when that is not possible here. */
  private async tryPunchHole(offset: number, length: number): Promise<boolean> {
    if (this.noPunchHole) return false;
    try {
      await this.ops.punchHole(this.fd, offset, length);
      return true;
    } catch (err) {
      if (!isUnsupported(err)) throw err;
      if (errCode(err) !== 'EINVAL') this.noPunchHole = true;
      return false;
    }
  }

  /** fallocate(ZERO_RANGE); false when that is not possible here. */
  private async tryZeroRange(offset: number, length: number): Promise<boolean> {
    if (this.noZeroRange) return false;
    try {
      await this.ops.zeroRange(this.fd, offset, length);
      return true;
    } catch (err) {
      if (!isUnsupported(err)) throw err;
      if (errCode(err) !== 'EINVAL') this.noZeroRange = true;
      return false;
    }
  }

  private fail(err: unknown, what: string, offset: number, length: number): DeviceError {
    if (err instanceof DeviceError) return err;
    const code = errCode(err);
    const msg = err instanceof Error ? err.message : String(err);
    const where = what === 'flush' ? '' : ` at ${offset}+${length}`;
    const detail = code && !msg.includes(code) ? `${code}: ${msg}` : msg;
    return new DeviceError(nbdErrorFor(code), `${this.description}: ${what}${where} failed: ${detail}`);
  }
}

/** Appends [start, end) with `flags`, merging and splitting at MAX_EXTENT_LENGTH; returns the new position. */
function pushExtent(extents: Extent[], start: number, end: number, flags: number): number {
  let pos = start;
  const last = extents[extents.length - 1];
  if (last && last.flags === flags && last.length < MAX_EXTENT_LENGTH) {
    const n = Math.min(end - pos, MAX_EXTENT_LENGTH - last.length);
    last.length += n;
    pos += n;
  }
  while (pos < end && extents.length < MAX_EXTENTS) {
    const n = Math.min(end - pos, MAX_EXTENT_LENGTH);
    extents.push({ length: n, flags });
    pos += n;
  }
  return pos;
}

/** A raw fd (not a FileHandle, which would close it behind our back when collected). */
function openFd(path: string, flags: number, mode?: number): Promise<number> {
  return new Promise((resolve, reject) => fs.open(path, flags, mode, (err, fd) => (err ? reject(err) : resolve(fd))));
}

async function closeQuietly(fd: number | undefined): Promise<void> {
  if (fd === undefined) return;
  await new Promise<void>((resolve) => fs.close(fd, () => resolve()));
}
