// Backup options shared by `backup start` and `serve --backup-to`.

import path from 'node:path';
import { Option, type Command } from 'commander';
import type { BackupRequest } from '../jobs/job';
import { parseSize } from './sizes';
import { mapTargetPaths, validateTargetSpec } from '../targets/spec';

export interface BackupCliOptions {
  buffer?: string;
  spillDir?: string;
  workers?: string;
  clusterSize?: string;
  maxChunk?: string;
  speed?: string;
  cbwTimeout?: string;
  onCbwError?: string;
  targetIsZero?: boolean;
  chunkSize?: string;
  s3Endpoint?: string;
  s3Region?: string;
  s3ForcePathStyle?: boolean;
}

export function addBackupOptions(cmd: Command): Command {
  cmd
    .option('--buffer <SIZE>', 'RAM for old data awaiting the target, the background copy\'s reads included (from 32M up, an eighth of it, at most 32M); 0 = guest writes wait for the target', '256M')
    .option('--spill-dir <DIR>', 'when the RAM buffer is full, spill to a file here instead of making the guest wait (from 32M up, --buffer also holds the data passing to and from that file: one --max-chunk run in, up to an eighth out)')
    .option('--workers <N>', 'background copy workers (1-256)', '16')
    .option('--cluster-size <SIZE>', 'copy granularity (power of two)', '64K')
    .option('--max-chunk <SIZE>', 'largest coalesced read and target write (an NBD target gets it as WRITE requests of at most 1M)', '4M')
    .option('--speed <SIZE>', 'limit the background copy to SIZE bytes/s (guest-triggered copies are not limited); 0 = unlimited', '0')
    .option('--cbw-timeout <DURATION>', 'how long a guest write may wait for its old data to be saved (e.g. 5s, 500ms; at least 1ms)', '5s')
    .addOption(
      new Option('--on-cbw-error <POLICY>', 'when saving old data fails or times out: fail the backup, or fail the guest write')
        .choices(['break-snapshot', 'break-guest-write'])
        .default('break-snapshot'),
    )
    .option('--target-is-zero', 'the target already reads as zeros: skip writing zero ranges (found out without it for new file targets, and for NBD targets whose block status says all zero)')
    .option('--chunk-size <SIZE>', 'dir: and s3:// targets: chunk size (the copy cluster size follows it)', '4M');
  addS3Options(cmd);
  return cmd;
}

/** S3 settings; credentials come from the usual AWS environment variables. */
export function addS3Options(cmd: Command): Command {
  return cmd
    .option('--s3-endpoint <URL>', 'S3 endpoint (radosgw, MinIO); default $AWS_ENDPOINT_URL_S3 or $AWS_ENDPOINT_URL, else AWS')
    .option('--s3-region <REGION>', 'S3 region (default $AWS_REGION or us-east-1)')
    .option('--s3-force-path-style', 'address buckets as ENDPOINT/BUCKET (radosgw, MinIO)');
}

export function parseDuration(text: string): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*(ms|s|m)?\s*$/.exec(text);
  if (!m) throw new Error(`bad duration "${text}": use e.g. 5s, 500ms or 2m`);
  const v = Number(m[1]);
  const unit = m[2] ?? 's';
  return Math.round(unit === 'ms' ? v : unit === 'm' ? v * 60_000 : v * 1000);
}

function parseCount(text: string, what: string, max: number): number {
  const n = Number(text);
  if (!Number.isInteger(n) || n < 1 || n > max) throw new Error(`bad ${what} "${text}": expected an integer from 1 to ${max}`);
  return n;
}

/**
 * At least 1 ms: with 0 every guest write that must first save old data
 * would time out at once, failing the backup (or the write) on the spot.
 */
function parseCbwTimeout(text: string): number {
  const ms = parseDuration(text);
  if (ms < 1) throw new Error(`bad --cbw-timeout "${text}": must be at least 1ms`);
  return ms;
}

/**
 * Paths are resolved here, against the caller's working directory: the job
 * runs in the server, which would read them against its own.
 */
export function toBackupRequest(target: string, o: BackupCliOptions): BackupRequest {
  return {
    target: validateTargetSpec(target) === null ? mapTargetPaths(target, (p) => path.resolve(p)) : target,
    bufferBytes: parseSize(o.buffer ?? '256M', '--buffer'),
    spillDir: o.spillDir === undefined ? undefined : path.resolve(o.spillDir),
    workers: parseCount(o.workers ?? '16', '--workers', 256),
    clusterSize: parseSize(o.clusterSize ?? '64K', '--cluster-size'),
    maxChunk: parseSize(o.maxChunk ?? '4M', '--max-chunk'),
    speed: parseSize(o.speed ?? '0', '--speed'),
    cbwTimeoutMs: parseCbwTimeout(o.cbwTimeout ?? '5s'),
    onCbwError: (o.onCbwError ?? 'break-snapshot') as BackupRequest['onCbwError'],
    targetIsZero: !!o.targetIsZero,
    chunkSize: parseSize(o.chunkSize ?? '4M', '--chunk-size'),
    s3Endpoint: o.s3Endpoint,
    s3Region: o.s3Region,
    s3ForcePathStyle: !!o.s3ForcePathStyle,
  };
}
