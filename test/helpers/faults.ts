// Helpers for the fault, crash, load and security tests (on top of peers.ts):
// - a guest that writes seeded random data into disjoint regions through our
//   own NbdClient and keeps a log of every write with its outcome, and the
//   check that a disk holds exactly what that log allows;
// - the control API over HTTP (unix socket or loopback TCP), raw enough to
//   send malformed requests;
// - Prometheus text parsing, VmRSS sampling, nbdkit's pause filter.
//
// Every wait here is bounded, like in peers.ts.

import * as fs from 'node:fs';
import * as http from 'node:http';
import * as net from 'node:net';
import { NbdClient } from '../../src/client/client';
import { DeviceError } from '../../src/device/types';
import { mulberry32, randomBuffer, sleep, waitFor } from './peers';

// ------------------------------------------------------------ NBD guest

/** Our own NBD client on a unix socket (the guest). */
export function connectGuest(socketPath: string, exportName = 'disk', maxInFlight = 64): Promise<NbdClient> {
  return NbdClient.connect({ socketPath, exportName }, { maxInFlight, connectTimeoutMs: 10_000 });
}

/**
 * Close a guest connection at teardown, bounded: close() waits for the
 * requests in flight, which may be stuck on a dead peer (then the peer's
 * own teardown, which runs next, ends them).
 */
export async function closeGuest(client: NbdClient, timeoutMs = 5000): Promise<void> {
  await withTimeout(client.close(), timeoutMs, 'closing the guest connection').catch(() => undefined);
}

/** The NBD error number carried by an error (DeviceError), or null. */
export function nbdErrno(e: unknown): number | null {
  return e instanceof DeviceError ? e.nbdError : null;
}

/** Errors from the connection dying (as opposed to an error reply from the server). */
export function isConnectionLost(e: unknown): boolean {
  return e instanceof Error && e.name === 'ConnectionLostError';
}

export type OpStatus = 'pending' | 'acked' | 'failed';

/** One guest write: seeded data at offset..offset+length inside one region. */
export interface WriteOp {
  seq: number;
  worker: number;
  region: number;
  offset: number;
  length: number;
  seed: number;
  status: OpStatus;
  startedAt: number;
  endedAt: number;
  error: string | null;
  errno: number | null;
  connectionLost: boolean;
}

export interface ReadCheck {
  region: number;
  startedAt: number;
  endedAt: number;
  ok: boolean;
  error: string | null;
  errno: number | null;
  mismatch: string | null;
}

export interface RegionGuestOptions {
  /** Bytes per region; regions are [base + r*regionSize, +regionSize). */
  regionSize: number;
  regionCount: number;
  /** Offset of region 0 on the disk. Default 0. */
  base?: number;
  /** Concurrent writers; worker w owns the regions r with r % workers == w. */
  workers: number;
  seed: number;
  /** Write length range (multiples of `align`). Default align..regionSize. */
  minLength?: number;
  maxLength?: number;
  /** Offsets and lengths are multiples of this. Default 512. */
  align?: number;
  /** Every Nth operation of a worker is a read-back check of one of its regions (0 = never). */
  readEvery?: number;
  /** Pause between a worker's operations (ms). Default 0. */
  thinkMs?: number;
}

/**
 * A guest writing random data into disjoint regions: each region belongs to
 * one worker, and a worker has at most one request in flight, so there are
 * never two overlapping writes in flight and the order of the writes to a
 * region is the order of the log. Every write is logged with its outcome:
 * acked (the server said done), failed (an error reply or the connection
 * died: it may or may not have reached the disk), or still pending.
 */
export class RegionGuest {
  readonly ops: WriteOp[] = [];
  readonly reads: ReadCheck[] = [];
  private readonly byRegion = new Map<number, WriteOp[]>();
  private stopping = false;
  private running: Promise<void>[] = [];
  private seq = 0;
  readonly base: number;
  readonly align: number;
  readonly minLength: number;
  readonly maxLength: number;

  constructor(
    readonly opts: RegionGuestOptions,
    /** The original content of a byte range of the disk (before any guest write). */
    private readonly original: (offset: number, length: number) => Buffer,
  ) {
    this.base = opts.base ?? 0;
    this.align = opts.align ?? 512;
    this.minLength = opts.minLength ?? this.align;
    this.maxLength = opts.maxLength ?? opts.regionSize;
    if (opts.regionSize % this.align || this.minLength % this.align || this.maxLength % this.align) {
      throw new Error('region size and lengths must be multiples of align');
    }
  }

  regionOffset(region: number): number {
    return this.base + region * this.opts.regionSize;
  }

  /** Start the workers on `client` (or a client per worker). */
  start(client: NbdClient | ((worker: number) => NbdClient)): void {
    this.stopping = false;
    for (let w = 0; w < this.opts.workers; w++) {
      const c = typeof client === 'function' ? client(w) : client;
      this.running.push(this.worker(w, c));
    }
  }

  /** Ask the workers to stop after their current request; resolves when they have (bounded). */
  async stop(timeoutMs = 30_000): Promise<void> {
    this.stopping = true;
    const all = Promise.all(this.running);
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new Error(`guest workers did not stop within ${timeoutMs} ms`)), timeoutMs);
    });
    try {
      await Promise.race([all, timeout]);
    } finally {
      clearTimeout(timer);
      this.running = [];
    }
  }

  get acked(): WriteOp[] {
    return this.ops.filter((o) => o.status === 'acked');
  }
  get failed(): WriteOp[] {
    return this.ops.filter((o) => o.status === 'failed');
  }
  get pending(): WriteOp[] {
    return this.ops.filter((o) => o.status === 'pending');
  }

  private async worker(w: number, client: NbdClient): Promise<void> {
    const rng = mulberry32((this.opts.seed * 7919 + w * 104729) >>> 0);
    const owned: number[] = [];
    for (let r = w; r < this.opts.regionCount; r += this.opts.workers) owned.push(r);
    if (owned.length === 0) return;
    const units = (n: number) => n / this.align;
    let n = 0;
    while (!this.stopping && !client.isClosed) {
      n++;
      const region = owned[rng() % owned.length];
      if (this.opts.readEvery && n % this.opts.readEvery === 0) {
        await this.readCheck(client, region);
      } else {
        const lenUnits = units(this.minLength) + (rng() % (units(this.maxLength) - units(this.minLength) + 1));
        const length = lenUnits * this.align;
        const at = (rng() % (units(this.opts.regionSize) - lenUnits + 1)) * this.align;
        const op: WriteOp = {
          seq: this.seq++,
          worker: w,
          region,
          offset: this.regionOffset(region) + at,
          length,
          seed: rng() || 1,
          status: 'pending',
          startedAt: Date.now(),
          endedAt: 0,
          error: null,
          errno: null,
          connectionLost: false,
        };
        this.ops.push(op);
        let list = this.byRegion.get(region);
        if (!list) this.byRegion.set(region, (list = []));
        list.push(op);
        try {
          await client.write(op.offset, randomBuffer(op.length, op.seed));
          op.status = 'acked';
        } catch (e) {
          op.status = 'failed';
          op.error = (e as Error).message;
          op.errno = nbdErrno(e);
          op.connectionLost = isConnectionLost(e);
        }
        op.endedAt = Date.now();
      }
      if (this.opts.thinkMs) await sleep(this.opts.thinkMs);
    }
  }

  private async readCheck(client: NbdClient, region: number): Promise<void> {
    const rc: ReadCheck = { region, startedAt: Date.now(), endedAt: 0, ok: false, error: null, errno: null, mismatch: null };
    this.reads.push(rc);
    try {
      const data = await client.read(this.regionOffset(region), this.opts.regionSize);
      const bad = this.checkRegion(region, Buffer.from(data));
      rc.mismatch = bad;
      rc.ok = bad === null;
    } catch (e) {
      rc.error = (e as Error).message;
      rc.errno = nbdErrno(e);
    }
    rc.endedAt = Date.now();
  }

  /**
   * Check one region's content against the log: every byte must hold the
   * latest acknowledged write to it (or the original content), except where
   * a later write that failed or is still pending may have landed: there it
   * may hold that write's byte instead. Returns null when it matches, else
   * a description of the first bad byte.
   */
  checkRegion(region: number, actual: Buffer): string | null {
    const size = this.opts.regionSize;
    const start = this.regionOffset(region);
    const expected = Buffer.from(this.original(start, size));
    const ops = this.byRegion.get(region) ?? [];
    const uncertain = ops.filter((o) => o.status !== 'acked');
    const lastAck = uncertain.length ? new Int32Array(size).fill(-1) : null;
    for (const o of ops) {
      if (o.status !== 'acked') continue;
      randomBuffer(o.length, o.seed).copy(expected, o.offset - start);
      lastAck?.fill(o.seq, o.offset - start, o.offset - start + o.length);
    }
    if (actual.length !== size) return `region ${region}: read ${actual.length} bytes, expected ${size}`;
    if (actual.equals(expected)) return null;
    const uncertainData = uncertain.map((o) => ({ o, data: randomBuffer(o.length, o.seed) }));
    for (let i = 0; i < size; i++) {
      if (actual[i] === expected[i]) continue;
      const at = start + i;
      const explained = uncertainData.some(
        ({ o, data }) => o.seq > (lastAck as Int32Array)[i] && at >= o.offset && at < o.offset + o.length && data[at - o.offset] === actual[i],
      );
      if (!explained) {
        const last = ops.filter((o) => o.status === 'acked' && at >= o.offset && at < o.offset + o.length).pop();
        return (
          `region ${region}: byte ${at} is 0x${actual[i].toString(16)}, expected 0x${expected[i].toString(16)} ` +
          (last ? `(from acknowledged write #${last.seq} at ${last.offset}+${last.length}, seed ${last.seed})` : '(original content)')
        );
      }
    }
    return null;
  }

  /** Regions any write touched. */
  regionsWritten(): number[] {
    return [...this.byRegion.keys()].sort((a, b) => a - b);
  }

  /**
   * Check every written region with `read(offset, length)`; returns the
   * problems (empty when all match) and how many acknowledged writes the
   * checked regions hold.
   */
  verifyAll(read: (offset: number, length: number) => Buffer): { problems: string[]; ackedVerified: number } {
    const problems: string[] = [];
    let ackedVerified = 0;
    for (const r of this.regionsWritten()) {
      const bad = this.checkRegion(r, read(this.regionOffset(r), this.opts.regionSize));
      if (bad) problems.push(bad);
      else ackedVerified += (this.byRegion.get(r) ?? []).filter((o) => o.status === 'acked').length;
    }
    return { problems, ackedVerified };
  }
}

// ---------------------------------------------------------- control API

export interface HttpTarget {
  socketPath?: string;
  host?: string;
  port?: number;
}

export interface HttpResult {
  status: number;
  headers: http.IncomingHttpHeaders;
  text: string;
  /** Parsed JSON body, or undefined when the body is not JSON. */
  json: any;
}

/**
 * One HTTP request to the control API. `body` is sent as is (a string or a
 * Buffer: malformed bodies are the point), or JSON-encoded when it is an
 * object. Bounded by `timeoutMs`; rejects on transport errors.
 */
export function httpRequest(
  to: HttpTarget,
  method: string,
  path: string,
  opts: { body?: unknown; token?: string; headers?: Record<string, string>; timeoutMs?: number } = {},
): Promise<HttpResult> {
  let payload: Buffer | undefined;
  const headers: Record<string, string> = { ...(opts.headers ?? {}) };
  if (opts.body !== undefined) {
    if (Buffer.isBuffer(opts.body)) payload = opts.body;
    else if (typeof opts.body === 'string') payload = Buffer.from(opts.body);
    else {
      payload = Buffer.from(JSON.stringify(opts.body));
      headers['content-type'] ??= 'application/json';
    }
    headers['content-length'] = String(payload.length);
  }
  if (opts.token !== undefined) headers.authorization = `Bearer ${opts.token}`;
  return new Promise((resolve, reject) => {
    const req = http.request(
      { socketPath: to.socketPath, host: to.host, port: to.port, method, path, headers, agent: false },
      (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('error', reject);
        res.on('end', () => {
          clearTimeout(timer);
          const text = Buffer.concat(chunks).toString('utf8');
          let json: any;
          try {
            json = JSON.parse(text);
          } catch {
            json = undefined;
          }
          resolve({ status: res.statusCode ?? 0, headers: res.headers, text, json });
        });
      },
    );
    const timer = setTimeout(() => req.destroy(new Error(`${method} ${path}: no answer within ${opts.timeoutMs ?? 10_000} ms`)), opts.timeoutMs ?? 10_000);
    req.on('error', (e) => {
      clearTimeout(timer);
      reject(e);
    });
    if (payload) req.write(payload);
    req.end();
  });
}

/**
 * Send raw bytes (a whole HTTP request) and collect what comes back until
 * the server closes or `timeoutMs` passes. Write errors are ignored: a
 * server may answer early and close while the request is still being sent
 * (413 for a huge body); like curl, we still read its answer. Node's own
 * http client reports EPIPE in that case instead of the response.
 */
export function rawHttp(to: HttpTarget, request: Buffer, timeoutMs = 10_000): Promise<{ status: number; text: string }> {
  return new Promise((resolve, reject) => {
    const s = to.socketPath
      ? net.createConnection({ path: to.socketPath })
      : net.createConnection({ host: to.host ?? '127.0.0.1', port: to.port ?? 80 });
    const chunks: Buffer[] = [];
    let done = false;
    const finish = () => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      s.destroy();
      const text = Buffer.concat(chunks).toString('utf8');
      const m = /^HTTP\/1\.[01] (\d{3})/.exec(text);
      if (!m) reject(new Error(`no HTTP response (got ${JSON.stringify(text.slice(0, 200))})`));
      else resolve({ status: Number(m[1]), text });
    };
    const timer = setTimeout(finish, timeoutMs);
    s.on('data', (d: Buffer) => {
      chunks.push(d);
      // A complete response with a content-length: no need to wait for the close.
      const text = Buffer.concat(chunks).toString('utf8');
      const head = text.indexOf('\r\n\r\n');
      const cl = /\r\ncontent-length: (\d+)/i.exec(text);
      if (head >= 0 && cl && Buffer.byteLength(text) >= head + 4 + Number(cl[1])) finish();
    });
    s.on('error', () => undefined); // EPIPE/ECONNRESET while writing: read what we got
    s.on('close', finish);
    s.write(request, () => undefined);
  });
}

/** The control socket nbd-cbw makes next to `-U SOCKET` by default. */
export function controlSocketOf(nbdSocket: string): string {
  return `${nbdSocket}.ctl`;
}

export interface JobStatusLike {
  id: string;
  state: string;
  error: string | null;
  bytesTotal: number;
  bytesDone: number;
  bytesCopied: number;
  bytesSkipped: number;
  bytesZeroDetected: number;
  targetRetries: number;
  guestCopies: number;
  bufferBytes: number;
  bufferHighWater: number;
  [k: string]: unknown;
}

/** POST /v1/jobs; throws with the server's message unless 201. */
export async function startJob(ctl: HttpTarget, request: Record<string, unknown>, token?: string): Promise<JobStatusLike> {
  const r = await httpRequest(ctl, 'POST', '/v1/jobs', { body: request, token });
  if (r.status !== 201) throw new Error(`POST /v1/jobs: ${r.status} ${r.text}`);
  return r.json as JobStatusLike;
}

export async function getJob(ctl: HttpTarget, id = 'latest', token?: string): Promise<JobStatusLike> {
  const r = await httpRequest(ctl, 'GET', `/v1/jobs/${encodeURIComponent(id)}`, { token });
  if (r.status !== 200) throw new Error(`GET /v1/jobs/${id}: ${r.status} ${r.text}`);
  return r.json as JobStatusLike;
}

export async function jobAction(ctl: HttpTarget, id: string, action: string, token?: string): Promise<HttpResult> {
  return httpRequest(ctl, 'POST', `/v1/jobs/${encodeURIComponent(id)}/${action}`, { token });
}

const TERMINAL = new Set(['completed', 'failed', 'cancelled']);

/** Poll a job until it is completed, failed or cancelled (bounded). */
export async function waitJobEnd(ctl: HttpTarget, id: string, timeoutMs: number, intervalMs = 100): Promise<JobStatusLike> {
  let last: JobStatusLike | null = null;
  try {
    return await waitFor(
      async () => {
        last = await getJob(ctl, id);
        return TERMINAL.has(last.state) ? last : null;
      },
      { timeoutMs, intervalMs, what: `job ${id} to end` },
    );
  } catch (e) {
    throw new Error(`${(e as Error).message}; last status: ${JSON.stringify(last)}`);
  }
}

/** GET /metrics, parsed: "name{labels}" -> value (and bare "name" for the sum over labels). */
export async function scrapeMetrics(ctl: HttpTarget, token?: string): Promise<Map<string, number>> {
  const r = await httpRequest(ctl, 'GET', '/metrics', { token });
  if (r.status !== 200) throw new Error(`GET /metrics: ${r.status} ${r.text}`);
  return parseProm(r.text);
}

export function parseProm(text: string): Map<string, number> {
  const out = new Map<string, number>();
  for (const line of text.split('\n')) {
    if (!line || line.startsWith('#')) continue;
    const m = /^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)/.exec(line);
    if (!m) continue;
    const v = Number(m[3]);
    out.set(m[1] + (m[2] ?? ''), v);
    if (m[2]) out.set(m[1], (out.get(m[1]) ?? 0) + v);
  }
  return out;
}

// ------------------------------------------------------------- processes

/** VmRSS of a process in bytes, or null when it is gone. */
export function vmRssBytes(pid: number): number | null {
  try {
    const s = fs.readFileSync(`/proc/${pid}/status`, 'utf8');
    const m = /^VmRSS:\s+(\d+)\s+kB/m.exec(s);
    return m ? Number(m[1]) * 1024 : null;
  } catch {
    return null;
  }
}

/** Samples VmRSS every `intervalMs` until stopped. */
export class RssSampler {
  readonly samples: number[] = [];
  private timer: NodeJS.Timeout;
  constructor(
    readonly pid: number,
    intervalMs = 1000,
  ) {
    const take = () => {
      const v = vmRssBytes(pid);
      if (v !== null) this.samples.push(v);
    };
    take();
    this.timer = setInterval(take, intervalMs);
  }
  get max(): number {
    return this.samples.reduce((a, b) => Math.max(a, b), 0);
  }
  stop(): void {
    clearInterval(this.timer);
  }
}

/**
 * nbdkit's pause filter: send 'p' (pause) or 'r' (resume) to its control
 * socket and wait for the echo ('P' comes once in-flight requests are done).
 */
export function nbdkitPauseControl(controlSocket: string, cmd: 'p' | 'r', timeoutMs = 10_000): Promise<void> {
  return new Promise((resolve, reject) => {
    const s = net.createConnection({ path: controlSocket });
    const timer = setTimeout(() => {
      s.destroy();
      reject(new Error(`nbdkit pause filter: no '${cmd.toUpperCase()}' within ${timeoutMs} ms`));
    }, timeoutMs);
    s.on('connect', () => s.write(cmd));
    s.on('data', (d: Buffer) => {
      if (d.toString('latin1').includes(cmd.toUpperCase())) {
        clearTimeout(timer);
        s.end();
        resolve();
      }
    });
    s.on('error', (e) => {
      clearTimeout(timer);
      reject(e);
    });
  });
}

/** Copy a file (the snapshot of a disk at a point in time). */
export function snapshotFile(from: string, to: string): void {
  fs.copyFileSync(from, to);
}

/** Promise with a bound: rejects with `what` after `ms`. */
export async function withTimeout<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([
      p,
      new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(new Error(`${what}: no result within ${ms} ms`)), ms);
      }),
    ]);
  } finally {
    clearTimeout(timer);
  }
}
