// Helpers for the copy-before-write tests that drive real processes:
// the backup CLI (`nbd-cbw backup ...` against a serve's control socket),
// seeded guest workloads for qemu-io, mixed images, reading a target back
// and comparing it with the point-in-time copy.
//
// Process lifetimes and bounded waits come from ./peers (startNbdCbw,
// startNbdkit, startQemuNbd, run): every process is killed at teardown and
// every run has a hard timeout.

import * as fs from 'node:fs';
import { controlRequest } from '../../src/control/client';
import type { Test } from 'tap';
import {
  KiB,
  MiB,
  NBD_CBW_BIN,
  REPO_ROOT,
  fillRandom,
  firstDifference,
  mulberry32,
  run,
  waitFor,
  type Peer,
  type RunResult,
} from './peers';

export type Rng = () => number;

export function rnd(rng: Rng): number {
  return rng() / 0x100000000;
}

export function randInt(rng: Rng, lo: number, hi: number): number {
  return lo + Math.floor(rnd(rng) * (hi - lo + 1));
}

export function pick<T>(rng: Rng, xs: readonly T[]): T {
  return xs[Math.floor(rnd(rng) * xs.length)];
}

// ------------------------------------------------------------- the CLI

/** The control socket of an nbd-cbw serve started with -U SOCKET. */
export function controlOf(cbw: Peer): string {
  return `${cbw.socket}.ctl`;
}

/** `nbd-cbw ARGS` (bounded); never rejects. */
export function cli(args: string[], timeoutMs = 30_000, env?: NodeJS.ProcessEnv): Promise<RunResult> {
  return run(process.execPath, [NBD_CBW_BIN, ...args], { timeoutMs, cwd: REPO_ROOT, env });
}

export interface JobJson {
  id: string;
  state: string;
  error: string | null;
  target: string;
  bytesTotal: number;
  bytesDone: number;
  bytesCopied: number;
  bytesSkipped: number;
  bytesZeroDetected: number;
  clustersRemaining: number;
  bufferBytes: number;
  bufferCapacity: number;
  bufferHighWater: number;
  spillBytes: number;
  targetRetries: number;
  guestCopies: number;
  speedLimit: number;
  [k: string]: unknown;
}

function lastJsonLine(text: string): JobJson {
  const lines = text.trim().split('\n').filter((l) => l.startsWith('{'));
  if (lines.length === 0) throw new Error(`no JSON in output: ${text.slice(0, 500)}`);
  return JSON.parse(lines[lines.length - 1]) as JobJson;
}

/** `backup start --json`; throws with the CLI's output when it fails. */
export async function backupStart(control: string, target: string, opts: string[] = []): Promise<JobJson> {
  const r = await cli(['backup', 'start', '--control', control, '--target', target, '--json', ...opts]);
  if (r.code !== 0) throw new Error(`backup start failed:\n${r.describe()}`);
  return lastJsonLine(r.stdout);
}

/** One request to the control API over its unix socket (bounded: 30 s). */
export function controlHttp(
  control: string,
  method: string,
  urlPath: string,
  body?: unknown,
): Promise<{ status: number; body: unknown }> {
  return controlRequest({ socketPath: control }, method, urlPath, body);
}

/**
 * POST /v1/jobs straight over the control socket: the same request `backup
 * start` makes, without a node start-up (~1 s here) between the point in
 * time and the guest. Throws on an HTTP error.
 */
export async function startJobHttp(control: string, body: Record<string, unknown>): Promise<JobJson> {
  const r = await controlHttp(control, 'POST', '/v1/jobs', body);
  if (r.status !== 201) throw new Error(`POST /v1/jobs: ${r.status} ${JSON.stringify(r.body)}`);
  return r.body as JobJson;
}

/** `backup status --json [JOB]`. */
export async function backupStatus(control: string, job?: string): Promise<JobJson> {
  const r = await cli(['backup', 'status', '--control', control, '--json', ...(job ? [job] : [])]);
  if (r.code !== 0) throw new Error(`backup status failed:\n${r.describe()}`);
  return lastJsonLine(r.stdout);
}

/** `backup ACTION [JOB] --json` for pause, resume, cancel. */
export async function backupAction(control: string, action: 'pause' | 'resume' | 'cancel', job?: string): Promise<JobJson> {
  const r = await cli(['backup', action, '--control', control, '--json', ...(job ? [job] : [])]);
  if (r.code !== 0) throw new Error(`backup ${action} failed:\n${r.describe()}`);
  return lastJsonLine(r.stdout);
}

/** `backup wait --json --interval 100 [JOB]`: the exit status and the last status line. */
export async function backupWait(
  control: string,
  job?: string,
  timeoutMs = 120_000,
): Promise<{ code: number | null; last: JobJson | null; result: RunResult }> {
  const r = await cli(['backup', 'wait', '--control', control, '--json', '--interval', '100', ...(job ? [job] : [])], timeoutMs);
  let last: JobJson | null = null;
  try {
    last = lastJsonLine(r.stdout);
  } catch {
    // none
  }
  return { code: r.code, last, result: r };
}

/**
 * Poll the current job's status until `pred` holds (bounded). Polls the
 * API directly: a CLI call costs a node start-up (seconds on a busy box).
 */
export function waitStatus(control: string, pred: (s: JobJson) => boolean, what: string, timeoutMs = 30_000): Promise<JobJson> {
  let last: JobJson | null = null;
  return waitFor(
    async () => {
      const r = await controlHttp(control, 'GET', '/v1/jobs/current');
      if (r.status !== 200) throw new Error(`GET /v1/jobs/current: ${r.status} ${JSON.stringify(r.body)}`);
      last = r.body as JobJson;
      return pred(last) ? last : null;
    },
    { timeoutMs, intervalMs: 50, what: `${what} (last status: ${JSON.stringify(last)})` },
  );
}

// ------------------------------------------------------------ images

/**
 * A raw image of `size` bytes: seeded random data in most `chunk`-sized
 * pieces, holes in some, allocated zeros in a few, so the backup meets data,
 * unallocated ranges and zero detection. The data comes from an 8 MiB
 * seeded pool (cheap for 256 MiB images) with every 4 KiB block stamped with
 * its own offset, so no two blocks are alike and misplaced data shows.
 */
export function makeMixedImage(file: string, size: number, seed: number, chunk = 1 * MiB): void {
  fs.rmSync(file, { force: true });
  const fd = fs.openSync(file, 'w');
  try {
    fs.ftruncateSync(fd, size);
    const rng = mulberry32(seed);
    const pool = fillRandom(Buffer.alloc(8 * MiB + chunk), rng);
    const buf = Buffer.alloc(chunk);
    for (let off = 0; off < size; off += chunk) {
      const n = Math.min(chunk, size - off);
      const r = rnd(rng);
      if (r < 0.15) continue; // hole
      const part = buf.subarray(0, n);
      if (r < 0.22) part.fill(0);
      else {
        const from = Math.floor(rnd(rng) * (8 * MiB)) & ~7;
        pool.copy(part, 0, from, from + n);
        for (let b = 0; b + 8 <= n; b += 4 * KiB) part.writeBigUInt64LE(BigInt(off + b) ^ 0x5a5a5a5a5a5an, b);
      }
      let done = 0;
      while (done < n) done += fs.writeSync(fd, part, done, n - done, off + done);
    }
  } finally {
    fs.closeSync(fd);
  }
}

// ------------------------------------------------------------- guests

/**
 * Seeded qemu-io commands for a guest writing while a backup runs: data
 * writes (sync and aio), WRITE_ZEROES with and without NO_HOLE, discards,
 * small and large, aligned and not, many of them on a handful of hot spots
 * so requests overlap, and biased towards the end of the disk, which the
 * sweep reaches last (so most writes land on clusters not yet saved).
 */
export function guestCommands(rng: Rng, size: number, count: number): string[] {
  const cmds: string[] = [];
  const hot = Array.from({ length: 8 }, () => Math.floor(rnd(rng) * (size / (64 * KiB)))).map((c) => c * 64 * KiB);
  let aio = 0;
  for (let i = 0; i < count; i++) {
    let off: number;
    const where = rnd(rng);
    if (where < 0.35) off = pick(rng, hot) + randInt(rng, -4, 4) * 4 * KiB;
    else if (where < 0.75) off = Math.floor(size / 2 + rnd(rng) * (size / 2));
    else off = Math.floor(rnd(rng) * size);
    const lenKind = rnd(rng);
    let len =
      lenKind < 0.4 ? randInt(rng, 1, 16) * 512 : lenKind < 0.8 ? randInt(rng, 1, 32) * 4 * KiB : randInt(rng, 1, 8) * 64 * KiB + randInt(rng, 0, 7) * 512;
    off = Math.max(0, Math.floor(off / 512) * 512);
    if (off >= size) off = size - 512;
    len = Math.min(len, size - off);
    const pat = `0x${randInt(rng, 1, 255).toString(16)}`;
    const k = rnd(rng);
    if (k < 0.35) cmds.push(`write -P ${pat} ${off} ${len}`);
    else if (k < 0.6) {
      cmds.push(`aio_write -P ${pat} ${off} ${len}`);
      if (++aio % 8 === 0) cmds.push('aio_flush');
    } else if (k < 0.72) cmds.push(`write -z ${off} ${len}`);
    else if (k < 0.84) cmds.push(`write -z -u ${off} ${len}`);
    else if (k < 0.96) cmds.push(`discard ${off} ${len}`);
    else cmds.push('flush');
  }
  cmds.push('aio_flush');
  return cmds;
}

/** qemu-io on `uri` running `cmds` (cache=none: no FUA on every write). */
export function qemuIo(uri: string, cmds: string[], timeoutMs = 60_000): Promise<RunResult> {
  return run('qemu-io', ['-f', 'raw', '-t', 'none', uri, ...cmds.flatMap((c) => ['-c', c])], { timeoutMs });
}

// ---------------------------------------------------------- read back

/** Copy an NBD export to a local file with nbdcopy (bounded). */
export async function nbdToFile(uri: string, file: string): Promise<void> {
  fs.rmSync(file, { force: true });
  const r = await run('nbdcopy', [uri, file], { timeoutMs: 60_000 });
  if (r.code !== 0) throw new Error(`nbdcopy failed:\n${r.describe()}`);
}

/** null when identical; else the first differing offset, spelled out. */
export function compareImages(expected: string, actual: string): string | null {
  return firstDifference(expected, actual);
}

/** A guest qemu-io run that must succeed; returns its result. */
export async function guestMustSucceed(t: Test, uri: string, cmds: string[], what: string, timeoutMs = 60_000): Promise<RunResult> {
  const r = await qemuIo(uri, cmds, timeoutMs);
  const failed = r.code !== 0 || /failed|error/i.test(r.stdout + r.stderr);
  if (failed) t.fail(`${what}: qemu-io reported a failure`, { output: r.describe() });
  return r;
}
