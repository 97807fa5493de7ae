// Helpers for the distributed tests: a real single-node Ceph cluster (mon,
// OSD, radosgw) on 127.0.0.1 started by scripts/ceph-cluster, once per test
// file; S3 access through the AWS SDK; RBD images served by qemu-nbd; and a
// fault-injecting HTTP proxy in front of radosgw.
//
// The cluster is started in t.before and stopped in t.teardown (and, as a
// last resort, when the test process exits). If it cannot start, the test
// FAILS with the script's output: these tests are never skipped.

import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as http from 'node:http';
import type { AddressInfo } from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import {
  DeleteObjectCommand,
  GetObjectCommand,
  ListObjectsV2Command,
  PutObjectCommand,
  S3Client,
} from '@aws-sdk/client-s3';
import type { Test } from 'tap';
import { getJob, waitJobEnd } from './faults';
import { NBD_CBW_BIN, REPO_ROOT, mulberry32, run, sleep, type RunOptions, type RunResult } from './peers';

export const CEPH_CLUSTER_SCRIPT = path.join(REPO_ROOT, 'scripts', 'ceph-cluster');

export interface CephEnv {
  CEPH_CONF: string;
  AWS_ENDPOINT_URL: string;
  AWS_ACCESS_KEY_ID: string;
  AWS_SECRET_ACCESS_KEY: string;
  AWS_REGION: string;
  RGW_PORT: string;
  BUCKET: string;
}

export interface CephCluster {
  /** The cluster's directory (ceph.conf, logs, pid files). */
  readonly dir: string;
  /** What DIR/env.sh exports. */
  readonly env: CephEnv;
  /** process.env plus the cluster's variables: for nbd-cbw and the tools. */
  readonly processEnv: NodeJS.ProcessEnv;
  /** The bucket the script created. */
  readonly bucket: string;
  /** http://127.0.0.1:PORT of radosgw. */
  readonly endpoint: string;
  /** An S3 client for radosgw (path style); destroyed at teardown. */
  readonly s3: S3Client;
  /** scripts/ceph-cluster SUBCOMMAND DIR ARGS (bounded); throws with the output on failure. */
  script(subcommand: string, args?: string[], timeoutMs?: number): Promise<RunResult>;
}

function parseEnvFile(file: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const line of fs.readFileSync(file, 'utf8').split('\n')) {
    const m = /^export ([A-Z_][A-Z0-9_]*)=(.*)$/.exec(line.trim());
    if (m) out[m[1]] = m[2];
  }
  return out;
}

const liveClusters = new Set<string>();
let exitHookInstalled = false;

function downSync(dir: string): void {
  // Last resort (the test process is exiting without its teardowns).
  spawnSync(CEPH_CLUSTER_SCRIPT, ['down', dir], { stdio: 'ignore', timeout: 60_000 });
}

/**
 * A Ceph cluster for this test file: started in t.before (the script may
 * install Ceph's Debian packages first), stopped in t.teardown. Read the
 * returned object's fields only inside subtests (after before() ran).
 */
export function useCephCluster(t: Test, opts: { upTimeoutMs?: number; env?: NodeJS.ProcessEnv } = {}): CephCluster {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nbd-cbw-ceph-'));
  let env: CephEnv | null = null;
  let s3: S3Client | null = null;
  let startError: string | null = null;
  const need = (): CephEnv => {
    if (!env) throw new Error(`the Ceph cluster is not up${startError ? `: ${startError}` : ''}`);
    return env;
  };
  const script = async (subcommand: string, args: string[] = [], timeoutMs = 120_000, extraEnv: NodeJS.ProcessEnv = {}): Promise<RunResult> => {
    const r = await run(CEPH_CLUSTER_SCRIPT, [subcommand, dir, ...args], {
      timeoutMs,
      env: { ...process.env, ...opts.env, ...extraEnv },
    });
    if (r.code !== 0) throw new Error(`scripts/ceph-cluster ${subcommand} failed:\n${r.describe()}`);
    return r;
  };

  t.before(async () => {
    liveClusters.add(dir);
    if (!exitHookInstalled) {
      exitHookInstalled = true;
      process.on('exit', () => {
        for (const d of liveClusters) downSync(d);
      });
    }
    try {
      // The script's watchdog tears the cluster down if this process dies
      // without running its teardowns (killed by tap's timeout, say).
      await script('up', [], opts.upTimeoutMs ?? 600_000, { CEPH_WATCH_PID: String(process.pid), CEPH_WATCH_RM_DIR: '1' });
    } catch (e) {
      startError = (e as Error).message;
      throw new Error(`could not start the Ceph cluster (the distributed tests need it):\n${startError}`);
    }
    const raw = parseEnvFile(path.join(dir, 'env.sh'));
    for (const k of ['CEPH_CONF', 'AWS_ENDPOINT_URL', 'AWS_ACCESS_KEY_ID', 'AWS_SECRET_ACCESS_KEY', 'AWS_REGION', 'RGW_PORT', 'BUCKET']) {
      if (!raw[k]) throw new Error(`${dir}/env.sh does not set ${k}`);
    }
    env = raw as unknown as CephEnv;
    s3 = new S3Client({
      endpoint: env.AWS_ENDPOINT_URL,
      region: env.AWS_REGION,
      forcePathStyle: true,
      credentials: { accessKeyId: env.AWS_ACCESS_KEY_ID, secretAccessKey: env.AWS_SECRET_ACCESS_KEY },
      requestChecksumCalculation: 'WHEN_REQUIRED',
      responseChecksumValidation: 'WHEN_REQUIRED',
    });
  });

  t.teardown(async () => {
    s3?.destroy();
    // Stops qemu-nbds and radosgw first, then the OSD, then the mon (by pid).
    const r = await run(CEPH_CLUSTER_SCRIPT, ['down', dir], { timeoutMs: 120_000 });
    if (r.code !== 0) t.comment(`ceph-cluster down failed:\n${r.describe()}`);
    liveClusters.delete(dir);
    fs.rmSync(dir, { recursive: true, force: true });
  });

  return {
    dir,
    get env() {
      return need();
    },
    get processEnv() {
      return { ...process.env, ...need(), AWS_EC2_METADATA_DISABLED: 'true' };
    },
    get bucket() {
      return need().BUCKET;
    },
    get endpoint() {
      return need().AWS_ENDPOINT_URL;
    },
    get s3() {
      need();
      return s3 as S3Client;
    },
    script,
  };
}

// ------------------------------------------------------------ the CLI

/** `node bin/nbd-cbw ARGS` with the cluster's environment (bounded). */
export function nbdCbwCli(cluster: CephCluster, args: string[], opts: RunOptions = {}): Promise<RunResult> {
  return run(process.execPath, ['--no-warnings', NBD_CBW_BIN, ...args], {
    timeoutMs: 120_000,
    cwd: REPO_ROOT,
    ...opts,
    env: { ...cluster.processEnv, ...opts.env },
  });
}

// ------------------------------------------------------------ S3 objects

export interface ObjectInfo {
  key: string;
  size: number;
}

/** Every object under `prefix` (ListObjectsV2, following continuation tokens). */
export async function listObjects(s3: S3Client, bucket: string, prefix: string): Promise<ObjectInfo[]> {
  const out: ObjectInfo[] = [];
  let token: string | undefined;
  do {
    const r = await s3.send(new ListObjectsV2Command({ Bucket: bucket, Prefix: prefix, ContinuationToken: token, MaxKeys: 1000 }));
    for (const o of r.Contents ?? []) if (o.Key) out.push({ key: o.Key, size: o.Size ?? 0 });
    token = r.IsTruncated ? r.NextContinuationToken : undefined;
  } while (token);
  return out;
}

export async function getObject(s3: S3Client, bucket: string, key: string): Promise<Buffer> {
  const r = await s3.send(new GetObjectCommand({ Bucket: bucket, Key: key }));
  if (!r.Body) return Buffer.alloc(0);
  return Buffer.from(await r.Body.transformToByteArray());
}

export async function putObject(s3: S3Client, bucket: string, key: string, data: Buffer): Promise<void> {
  await s3.send(new PutObjectCommand({ Bucket: bucket, Key: key, Body: data, ContentLength: data.length }));
}

export async function deleteObject(s3: S3Client, bucket: string, key: string): Promise<void> {
  await s3.send(new DeleteObjectCommand({ Bucket: bucket, Key: key }));
}

// ------------------------------------------------------------ RBD over NBD

export interface RbdExport {
  image: string;
  socket: string;
  /** nbd+unix:///?socket=SOCK (qemu-nbd without -x exports the name ""). */
  uri: string;
  /** Stop qemu-nbd (by its pid file) and remove the image; idempotent. */
  stop(): Promise<void>;
}

/**
 * Create rbd/IMAGE (SIZE, e.g. "32M") and serve it with qemu-nbd on SOCK.
 * Stopped (and the image removed) at t's teardown; the cluster's own
 * teardown would stop qemu-nbd too, clients first.
 */
export async function startRbdNbd(t: Test, cluster: CephCluster, image: string, size: string, socket: string): Promise<RbdExport> {
  const r = await cluster.script('rbd-nbd', [image, size, socket], 90_000);
  const uri = r.stdout.trim().split('\n').pop() ?? '';
  if (uri !== `nbd+unix:///?socket=${socket}`) throw new Error(`unexpected URI from rbd-nbd: ${JSON.stringify(uri)}`);
  let stopped = false;
  const stop = async () => {
    if (stopped) return;
    stopped = true;
    await cluster.script('rbd-nbd-stop', [image, '--rm'], 90_000);
  };
  t.teardown(stop);
  return { image, socket, uri, stop };
}

// ------------------------------------------------------------ fault proxy

export interface FaultProxyOptions {
  /** Where to forward: radosgw's host:port on 127.0.0.1. */
  upstreamPort: number;
  /** Fraction of PUT requests answered 503 SlowDown without forwarding. */
  putErrorRate?: number;
  /** Fraction of requests whose response is held back by slowMs. */
  slowRate?: number;
  /** [min, max] ms of the delay for slow responses. */
  slowMs?: [number, number];
  seed?: number;
}

export interface FaultProxy {
  readonly port: number;
  readonly endpoint: string;
  readonly stats: { requests: number; puts: number; injected503: number; slowed: number; forwarded: number; upstreamErrors: number };
  close(): Promise<void>;
}

/**
 * An HTTP proxy on 127.0.0.1 in front of radosgw that answers a seeded share
 * of PUTs with 503 SlowDown (after reading the body, as S3 does) and delays a
 * share of responses. Everything else is forwarded byte for byte, Host header
 * included, so SigV4 signatures stay valid. Closed at t's teardown.
 */
export async function startFaultProxy(t: Test, opts: FaultProxyOptions): Promise<FaultProxy> {
  const rng = mulberry32(opts.seed ?? 1);
  const rand = () => rng() / 0x100000000;
  const stats = { requests: 0, puts: 0, injected503: 0, slowed: 0, forwarded: 0, upstreamErrors: 0 };
  const agent = new http.Agent({ keepAlive: true, maxSockets: 64 });
  const server = http.createServer((req, res) => {
    stats.requests++;
    const isPut = req.method === 'PUT';
    if (isPut) stats.puts++;
    const delay =
      rand() < (opts.slowRate ?? 0) ? (opts.slowMs?.[0] ?? 200) + rand() * ((opts.slowMs?.[1] ?? 1000) - (opts.slowMs?.[0] ?? 200)) : 0;
    if (delay) stats.slowed++;
    if (isPut && rand() < (opts.putErrorRate ?? 0)) {
      stats.injected503++;
      req.resume();
      req.on('end', () => {
        setTimeout(() => {
          const body =
            '<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>' +
            '<Message>Please reduce your request rate (injected by the test proxy).</Message></Error>';
          res.writeHead(503, { 'Content-Type': 'application/xml', 'Content-Length': Buffer.byteLength(body) });
          res.end(body);
        }, delay);
      });
      return;
    }
    stats.forwarded++;
    const up = http.request(
      { host: '127.0.0.1', port: opts.upstreamPort, method: req.method, path: req.url, headers: req.headers, agent },
      (ur) => {
        setTimeout(() => {
          res.writeHead(ur.statusCode ?? 502, ur.headers);
          ur.pipe(res);
        }, delay);
      },
    );
    up.on('error', (e) => {
      stats.upstreamErrors++;
      if (!res.headersSent) {
        res.writeHead(502, { 'Content-Type': 'text/plain' });
        res.end(`proxy: upstream error: ${e.message}`);
      } else res.destroy();
    });
    req.pipe(up);
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => resolve());
  });
  const port = (server.address() as AddressInfo).port;
  let closed = false;
  const close = async () => {
    if (closed) return;
    closed = true;
    server.closeAllConnections();
    agent.destroy();
    await Promise.race([new Promise<void>((r) => server.close(() => r())), sleep(5000)]);
  };
  t.teardown(close);
  return { port, endpoint: `http://127.0.0.1:${port}`, stats, close };
}

// ------------------------------------------------------------ backup jobs

/** The JSON a job's status has (the parts these tests read). */
export interface JobStatusJson {
  id: string;
  state: string;
  error: string | null;
  target: string;
  bytesTotal: number;
  bytesDone: number;
  guestCopies: number;
  targetRetries: number;
  targetStats: Record<string, number>;
}

function lastJsonLine<T>(r: RunResult): T {
  const lines = r.stdout.trim().split('\n').filter((l) => l.startsWith('{'));
  if (lines.length === 0) throw new Error(`no JSON in the output of:\n${r.describe()}`);
  return JSON.parse(lines[lines.length - 1]) as T;
}

/** `backup start --control CTL --json ARGS`; throws unless it started. */
export async function backupStart(cluster: CephCluster, control: string, args: string[]): Promise<JobStatusJson> {
  const r = await nbdCbwCli(cluster, ['backup', 'start', '--control', control, '--json', ...args], { timeoutMs: 60_000 });
  if (r.code !== 0) throw new Error(`backup start failed:\n${r.describe()}`);
  return lastJsonLine<JobStatusJson>(r);
}

/** `backup status --json` (current or latest job). */
export async function backupStatus(cluster: CephCluster, control: string, job?: string): Promise<JobStatusJson> {
  const r = await nbdCbwCli(cluster, ['backup', 'status', '--control', control, '--json', ...(job ? [job] : [])], { timeoutMs: 30_000 });
  if (r.code !== 0) throw new Error(`backup status failed:\n${r.describe()}`);
  return lastJsonLine<JobStatusJson>(r);
}

/** A job's status straight from the control API (no process start). */
export async function jobStatus(control: string, job: string): Promise<JobStatusJson> {
  return (await getJob({ socketPath: control }, job)) as unknown as JobStatusJson;
}

/** Poll the control API until the job completed, failed or was cancelled (bounded). */
export async function jobEnd(control: string, job: string, timeoutMs = 180_000): Promise<JobStatusJson> {
  return (await waitJobEnd({ socketPath: control }, job, timeoutMs, 100)) as unknown as JobStatusJson;
}

/** `backup wait --json` (bounded): the job's final status and wait's exit code. */
export async function backupWait(
  cluster: CephCluster,
  control: string,
  job: string,
  timeoutMs = 180_000,
): Promise<{ code: number | null; status: JobStatusJson; result: RunResult }> {
  const r = await nbdCbwCli(cluster, ['backup', 'wait', '--control', control, '--json', '--interval', '200', job], { timeoutMs });
  if (r.timedOut) throw new Error(`backup wait timed out:\n${r.describe()}`);
  return { code: r.code, status: lastJsonLine<JobStatusJson>(r), result: r };
}

/** `list LOCATION --json`: the backups there, oldest first. */
export async function listBackups(
  cluster: CephCluster,
  location: string,
  extra: string[] = [],
): Promise<Array<{ id: string; diskSize: number; chunkSize: number; uploadedBytes: number; referencedBytes: number }>> {
  const r = await nbdCbwCli(cluster, ['list', location, '--json', ...extra], { timeoutMs: 60_000 });
  if (r.code !== 0) throw new Error(`list failed:\n${r.describe()}`);
  return r.stdout
    .trim()
    .split('\n')
    .filter((l) => l.startsWith('{'))
    .map((l) => JSON.parse(l));
}

// ------------------------------------------------------------ the guest

/**
 * Seeded random guest I/O for qemu-io: mostly `write -P`, some `write -z`
 * and `discard`, 512-aligned, 4 KiB - 1 MiB, anywhere on the disk (often
 * across chunk boundaries).
 */
export function guestCommands(rng: () => number, diskSize: number, count: number): string[] {
  const cmds: string[] = [];
  for (let i = 0; i < count; i++) {
    const len = (8 + (rng() % 2041)) * 512; // 4 KiB .. ~1 MiB
    const off = (rng() % Math.floor((diskSize - len) / 512)) * 512;
    const kind = rng() % 10;
    if (kind < 7) cmds.push(`write -P ${1 + (rng() % 254)} ${off} ${len}`);
    else if (kind < 9) cmds.push(`write -z ${off} ${len}`);
    else cmds.push(`discard ${off} ${len}`);
  }
  return cmds;
}

/** Run qemu-io commands against `uri` (raw, bounded); throws on failure. */
export async function qemuIo(uri: string, cmds: string[]): Promise<void> {
  const args = ['-f', 'raw'];
  for (const c of cmds) args.push('-c', c);
  args.push(uri);
  const r = await run('qemu-io', args, { timeoutMs: 60_000 });
  const out = r.stdout + r.stderr;
  if (r.code !== 0 || /failed|error/i.test(out)) throw new Error(`qemu-io failed:\n${r.describe()}`);
}

/**
 * A guest session for one qemu-io process: `rounds` rounds of `perRound`
 * seeded commands, with qemu-io's own `sleep` of `gapMs` between rounds, so
 * the writes spread over the backup without a process start per round.
 */
export function guestSession(rng: () => number, diskSize: number, opts: { rounds: number; perRound: number; gapMs: number }): string[] {
  const cmds: string[] = [];
  for (let r = 0; r < opts.rounds; r++) {
    if (r > 0) cmds.push(`sleep ${opts.gapMs}`);
    cmds.push(...guestCommands(rng, diskSize, opts.perRound));
  }
  return cmds;
}

/** Make a raw image of seeded random data with some all-zero chunks and holes. */
export function makeMixedImage(file: string, size: number, chunkSize: number, seed: number): void {
  const rng = mulberry32(seed);
  const fd = fs.openSync(file, 'w');
  try {
    fs.ftruncateSync(fd, size);
    const buf = Buffer.alloc(chunkSize);
    for (let off = 0; off < size; off += chunkSize) {
      const kind = rng() % 8;
      if (kind === 0) continue; // a hole
      if (kind === 1) {
        buf.fill(0); // written zeros
      } else {
        const u32 = new Uint32Array(buf.buffer, buf.byteOffset, buf.length / 4);
        for (let i = 0; i < u32.length; i++) u32[i] = rng();
        // Sometimes only part of the chunk is data (the rest a hole's zeros).
        if (kind === 2) buf.fill(0, buf.length / 2);
      }
      fs.writeSync(fd, buf, 0, Math.min(chunkSize, size - off), off);
    }
  } finally {
    fs.closeSync(fd);
  }
}
