import type { FileIdentity } from '../device/types';
import type { S3Settings } from '../store/object-store';
import type { ForbiddenExport } from './nbd-endpoint';

// Backup targets behind one small interface. The copy engine writes each
// cluster's point-in-time content exactly once, in any order, and flushes
// once at the end; a target need not support reads.

export interface BackupTarget {
  /** For logs and status: where the backup goes. */
  readonly description: string;
  /** True when unwritten ranges of the target already read as zeros. */
  readonly readsAsZero: boolean;
  /**
   * Set while the target is still finding out whether it reads as zeros
   * (an NBD target's block-status probe): settles with the answer, which
   * readsAsZero then holds. Until then readsAsZero is false; writes may go
   * on meanwhile, and decisions on zero ranges wait for the answer.
   */
  readonly zeroProbe?: Promise<boolean> | null;
  /** Largest single write the target takes (the engine coalesces up to this). */
  readonly maxWrite: number;
  /**
   * How many write()s and writeZeroes() are worth having in flight at once
   * (more still work, they just wait): the copy engine keeps no more than
   * this, below its own limit of 8.
   */
  readonly maxWritesInFlight?: number;
  /** Data at `offset`, given as buffers to be written back to back (no concat). */
  write(offset: number, data: readonly Buffer[]): Promise<void>;
  /** Make [offset, offset+length) read as zeros. */
  writeZeroes(offset: number, length: number): Promise<void>;
  /** Durably commit everything written (the job completes only after this). */
  commit(): Promise<void>;
  /** Release resources; `completed` is false for failed or cancelled jobs. */
  close(completed: boolean): Promise<void>;
  /** The job must copy in clusters of exactly this size (chunked targets). */
  readonly requiredClusterSize?: number;
  /** Target-specific counters for status and metrics (e.g. chunks uploaded). */
  targetStats?(): Record<string, number>;
}

export interface TargetOpenOptions {
  /** Size of the disk being backed up. */
  size: number;
  /** The user says an existing target already reads as zeros (--target-is-zero). */
  targetIsZero?: boolean;
  maxInFlight?: number;
  /**
   * The disk's own file or block device, when it is local: a file: target
   * that is the same is refused, since the backup's old data would land on
   * the guest's new writes.
   */
  notSameFileAs?: FileIdentity;
  /**
   * NBD exports an nbd:// target must not be (nbd-cbw's own, the NBD
   * source's), for the same reason.
   */
  notNbdExports?: readonly ForbiddenExport[];
  /** Chunked targets: chunk size (default 4 MiB). */
  chunkSize?: number;
  /** Chunked targets: recorded in the manifest. */
  source?: string;
  version?: string;
  s3?: S3Settings;
}
