// The one block-device interface everything sits on: sources (a local file,
// an NBD client), filters (copy-before-write, metrics, fault injection) and
// NBD backup targets. Offsets and lengths are bytes; callers have already
// checked ranges against `size`.

import type { NbdAddress } from '../client/uri';

export interface DeviceCapabilities {
  readOnly: boolean;
  flush: boolean;
  fua: boolean;
  trim: boolean;
  /** WRITE_ZEROES supported (possibly emulated by writing zeros). */
  zero: boolean;
  /** Can say quickly whether a zero request will be fast (FAST_ZERO). */
  fastZero: boolean;
  cache: boolean;
  /** Answers base:allocation block status from real allocation. */
  blockStatus: boolean;
  /** Safe for several connections to write concurrently (NBD_FLAG_CAN_MULTI_CONN). */
  multiConn: boolean;
}

export interface BlockSizes {
  minimum: number;
  preferred: number;
  maximum: number;
}

export interface WriteOptions {
  fua?: boolean;
}

export interface ZeroOptions {
  fua?: boolean;
  /** The device may punch a hole instead of writing zeros (NBD: NO_HOLE clear). */
  mayTrim?: boolean;
  /** Fail with ENOTSUP instead of doing a slow zero (NBD FAST_ZERO). */
  fastOnly?: boolean;
}

/** One run of base:allocation status. flags: bit 0 hole, bit 1 reads as zero. */
export interface Extent {
  length: number;
  flags: number;
}

/** An error that maps onto an NBD error code. */
export class DeviceError extends Error {
  constructor(
    readonly nbdError: number,
    message: string,
  ) {
    super(message);
    this.name = 'DeviceError';
  }
}

/** What makes a local file or block device itself, whatever path names it. */
export interface FileIdentity {
  dev: bigint;
  ino: bigint;
  /** The device number, for a block device. */
  rdev: bigint;
  isBlockDevice: boolean;
}

export interface BlockDevice {
  readonly size: number;
  readonly capabilities: DeviceCapabilities;
  readonly blockSizes?: BlockSizes;
  /** Human-readable description (NBD_INFO_DESCRIPTION). */
  readonly description?: string;

  /**
   * Read `length` bytes at `offset`. Writes into `into` when given (it must be
   * at least `length` long) and returns it or a view of it.
   */
  read(offset: number, length: number, into?: Buffer): Promise<Buffer>;
  write(offset: number, data: Buffer, opts?: WriteOptions): Promise<void>;
  zero(offset: number, length: number, opts?: ZeroOptions): Promise<void>;
  trim(offset: number, length: number, opts?: WriteOptions): Promise<void>;
  flush(): Promise<void>;
  /** Prefetch hint; may do nothing. */
  cache(offset: number, length: number): Promise<void>;
  /**
   * base:allocation extents starting at `offset`, covering at most `length`
   * bytes and at least one byte. Devices without allocation data report one
   * data extent.
   */
  blockStatus(offset: number, length: number): Promise<Extent[]>;
  close(): Promise<void>;
  /**
   * A second, independent handle on the same disk (another NBD connection),
   * so bulk background reads do not queue in front of guest requests.
   */
  reopen?(timeoutMs?: number): Promise<BlockDevice>;
  /** The local file or block device served, if that is what this is. */
  fileIdentity?(): FileIdentity;
  /** The NBD export served, if that is what this is. */
  nbdAddress?(): NbdAddress;
  /**
   * Why another process may be writing this disk behind the device's back
   * (a read-only file export shares writes), or null. Asked when a backup
   * starts: such writes are never copied first.
   */
  otherWriter?(): Promise<string | null>;
}
