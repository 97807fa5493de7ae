// Backup jobs on one export: at most one running at a time, the rest kept as
// history so `status` can show the latest. A job is completed only when the
// engine saw every cluster reach the target and the target committed.

import { EventEmitter } from 'node:events';
import fs from 'node:fs';
import path from 'node:path';
import { CbwFilter, type CbwErrorPolicy } from '../cbw/filter';
import { makeSpillFile } from '../copy/cow-buffer';
import { CopyEngine, DEFAULT_ENGINE_OPTIONS, type CopyEngineOptions, type EngineProgress, type EngineState } from '../copy/engine';
import { openTarget } from '../targets/open';
import { mapTargetPaths, validateTargetSpec } from '../targets/spec';
import type { BackupTarget } from '../targets/types';
import type { ForbiddenExport } from '../targets/nbd-endpoint';
import type { NbdAddress } from '../client/uri';
import { VERSION } from '../version';

export interface BackupRequest {
  target: string;
  bufferBytes?: number;
  spillDir?: string;
  workers?: number;
  clusterSize?: number;
  maxChunk?: number;
  speed?: number;
  cbwTimeoutMs?: number;
  onCbwError?: CbwErrorPolicy;
  targetIsZero?: boolean;
  /** dir: and s3:// targets: chunk size (a power of two, default 4 MiB). */
  chunkSize?: number;
  s3Endpoint?: string;
  s3Region?: string;
  s3ForcePathStyle?: boolean;
}

/** A job as the control API reports it: the engine's progress plus the job's own fields. */
export interface JobStatus extends Omit<EngineProgress, 'state'> {
  id: string;
  state: EngineState | 'starting';
  error: string | null;
  target: string;
  startedAt: string;
  finishedAt: string | null;
  /** Bytes per second over the last few seconds. */
  rate: number;
  etaSeconds: number | null;
  speedLimit: number;
  clusterSize: number;
  onCbwError: CbwErrorPolicy;
  /** Target-specific counters (chunked targets: chunks uploaded, deduplicated, zero). */
  targetStats: Record<string, number>;
}

export class RequestError extends Error {
  constructor(
    readonly status: number,
    message: string,
  ) {
    super(message);
  }
}

export function validateRequest(req: BackupRequest): void {
  const bad = (m: string) => {
    throw new RequestError(400, m);
  };
  if (typeof req.target !== 'string' || req.target === '') bad('"target" is required');
  const nonNeg = (v: unknown, name: string) => {
    if (v !== undefined && (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 0)) bad(`"${name}" must be a non-negative integer`);
  };
  nonNeg(req.bufferBytes, 'bufferBytes');
  nonNeg(req.speed, 'speed');
  nonNeg(req.cbwTimeoutMs, 'cbwTimeoutMs');
  if (req.cbwTimeoutMs === 0) bad('"cbwTimeoutMs" must be at least 1');
  if (req.workers !== undefined && (!Number.isInteger(req.workers) || req.workers < 1 || req.workers > 256)) bad('"workers" must be 1-256');
  if (req.clusterSize !== undefined) {
    const c = req.clusterSize;
    if (!Number.isInteger(c) || c < 4096 || c > 64 * 1024 * 1024 || (c & (c - 1)) !== 0) {
      bad('"clusterSize" must be a power of two from 4K to 64M');
    }
  }
  if (req.maxChunk !== undefined && (!Number.isInteger(req.maxChunk) || req.maxChunk < 4096 || req.maxChunk > 32 * 1024 * 1024)) {
    bad('"maxChunk" must be from 4K to 32M');
  }
  if (req.onCbwError !== undefined && req.onCbwError !== 'break-snapshot' && req.onCbwError !== 'break-guest-write') {
    bad('"onCbwError" must be break-snapshot or break-guest-write');
  }
  if (req.spillDir !== undefined && typeof req.spillDir !== 'string') bad('"spillDir" must be a path');
  // The server's working directory is not the caller's: a relative path
  // would silently name another place (the CLI resolves them first).
  if (req.spillDir !== undefined && !path.isAbsolute(req.spillDir)) bad(`"spillDir" must be an absolute path, not "${req.spillDir}"`);
  const badTarget = validateTargetSpec(req.target);
  if (badTarget !== null) bad(badTarget);
  mapTargetPaths(req.target, (p) => {
    if (!path.isAbsolute(p)) bad(`paths in "target" must be absolute, not "${p}"`);
    return p;
  });
  if (req.chunkSize !== undefined) {
    const c = req.chunkSize;
    if (!Number.isInteger(c) || c < 64 * 1024 || c > 64 * 1024 * 1024 || (c & (c - 1)) !== 0) {
      bad('"chunkSize" must be a power of two from 64K to 64M');
    }
  }
  for (const k of ['s3Endpoint', 's3Region'] as const) {
    if (req[k] !== undefined && typeof req[k] !== 'string') bad(`"${k}" must be a string`);
  }
}

let jobCounter = 0;

export class BackupJob extends EventEmitter {
  readonly id: string;
  readonly startedAt = new Date();
  finishedAt: Date | null = null;
  private samples: Array<{ t: number; done: number }> = [];
  private sampler: NodeJS.Timeout;

  constructor(
    readonly request: BackupRequest,
    readonly engine: CopyEngine,
    readonly target: BackupTarget,
    readonly settings: { clusterSize: number; onCbwError: CbwErrorPolicy },
  ) {
    super();
    this.id = `${Date.now().toString(36)}-${(++jobCounter).toString(36)}`;
    this.sampler = setInterval(() => this.sample(), 1000);
    this.sampler.unref();
    this.engine.done.then(
      () => this.finish(),
      () => this.finish(),
    );
  }

  private finish(): void {
    this.finishedAt = new Date();
    clearInterval(this.sampler);
    this.emit('end', this.engine.state);
  }

  private sample(): void {
    this.samples.push({ t: Date.now(), done: this.engine.progress().bytesDone });
    if (this.samples.length > 10) this.samples.shift();
  }

  status(): JobStatus {
    const p = this.engine.progress();
    let rate = 0;
    const now = { t: Date.now(), done: p.bytesDone };
    const first = this.samples[0];
    if (first && now.t > first.t) rate = ((now.done - first.done) * 1000) / (now.t - first.t);
    else if (now.t > this.startedAt.getTime()) rate = (p.bytesDone * 1000) / (now.t - this.startedAt.getTime());
    const left = p.bytesTotal - p.bytesDone;
    return {
      ...p,
      id: this.id,
      state: p.state === 'created' ? 'starting' : p.state,
      error: this.engine.error && p.state !== 'completed' ? this.engine.error.message : null,
      target: this.request.target,
      startedAt: this.startedAt.toISOString(),
      finishedAt: this.finishedAt?.toISOString() ?? null,
      rate: Math.round(rate),
      etaSeconds: p.state === 'running' && rate > 0 ? Math.ceil(left / rate) : p.state === 'completed' ? 0 : null,
      speedLimit: this.engine.speed,
      clusterSize: this.settings.clusterSize,
      onCbwError: this.settings.onCbwError,
      targetStats: this.target.targetStats?.() ?? {},
    };
  }
}

/** The jobs of one export; the filter is the export's device. */
export class JobManager extends EventEmitter {
  private readonly jobs: BackupJob[] = [];
  private starting = false;
  /** Where the export is served (servedAt): a target there is the disk itself. */
  private readonly servedAddresses: NbdAddress[] = [];

  constructor(
    readonly filter: CbwFilter,
    /** Recorded in chunked backups' manifests. */
    readonly sourceName = 'unknown',
  ) {
    super();
  }

  get current(): BackupJob | undefined {
    const last = this.jobs[this.jobs.length - 1];
    return last && last.engine.isIntercepting ? last : undefined;
  }

  /** The running job if any, else the most recent one. */
  get latest(): BackupJob | undefined {
    return this.jobs[this.jobs.length - 1];
  }

  list(): BackupJob[] {
    return [...this.jobs];
  }

  /** The export is served at `address` (any export name there is this disk). */
  servedAt(address: NbdAddress): void {
    this.servedAddresses.push(address);
  }

  /** NBD exports that are this disk: where it is served, and an NBD source. */
  private exportsOfTheDisk(): ForbiddenExport[] {
    const own = this.servedAddresses.map((address) => ({
      address,
      anyExportName: true,
      what: "nbd-cbw's own export of the disk being backed up",
    }));
    const source = this.filter.next.nbdAddress?.();
    return source ? [...own, { address: source, anyExportName: false, what: 'the disk being backed up (the source export)' }] : own;
  }

  find(id: string): BackupJob | undefined {
    if (id === 'current' || id === 'latest') return this.latest;
    return this.jobs.find((j) => j.id === id);
  }

  async start(req: BackupRequest): Promise<BackupJob> {
    validateRequest(req);
    if (this.starting || this.current) throw new RequestError(409, 'a backup job is already running on this export');
    this.starting = true;
    let target: BackupTarget | null = null;
    try {
      const size = this.filter.size;
      const otherWriter = await this.filter.next.otherWriter?.();
      if (otherWriter) {
        throw new RequestError(409, `cannot back up the disk: ${otherWriter}, and this export does not see those writes, so the backup could not be point in time`);
      }
      // Before the target: a refused start must not leave a new target file.
      if (req.spillDir !== undefined) {
        try {
          fs.closeSync(makeSpillFile(req.spillDir));
        } catch (e) {
          throw new RequestError(400, (e as Error).message);
        }
      }
      try {
        target = await openTarget(req.target, {
          size,
          notSameFileAs: this.filter.next.fileIdentity?.(),
          notNbdExports: this.exportsOfTheDisk(),
          targetIsZero: req.targetIsZero,
          chunkSize: req.chunkSize,
          source: this.sourceName,
          version: VERSION,
          s3: { endpoint: req.s3Endpoint, region: req.s3Region, forcePathStyle: req.s3ForcePathStyle },
        });
      } catch (e) {
        throw new RequestError(400, (e as Error).message);
      }
      const opts: CopyEngineOptions = {
        ...DEFAULT_ENGINE_OPTIONS,
        ...(req.clusterSize !== undefined && { clusterSize: req.clusterSize }),
        ...(req.workers !== undefined && { workers: req.workers }),
        ...(req.maxChunk !== undefined && { maxChunk: req.maxChunk }),
        ...(req.speed !== undefined && { speed: req.speed }),
        ...(req.bufferBytes !== undefined && { bufferBytes: req.bufferBytes }),
        ...(req.spillDir !== undefined && { spillDir: req.spillDir }),
      };
      if (target.requiredClusterSize) opts.clusterSize = target.requiredClusterSize;
      if (opts.maxChunk < opts.clusterSize) opts.maxChunk = opts.clusterSize;
      let engine: CopyEngine;
      // A second connection for the bulk sweep, where the source takes one
      // (qemu-nbd needs --shared=2 or more): 4 MiB background reads must not
      // queue in front of guest requests. Without it the sweep shares the
      // guest's connection.
      const source = this.filter.next;
      const sweepSource = source.reopen
        ? await source.reopen(3000).catch((e: unknown) => {
            this.emit(
              'warning',
              `no second connection to the source (${(e as Error).message}); the background copy shares the guest's ` +
                '(qemu-nbd takes one client unless started with --shared=2 or more)',
            );
            return undefined;
          })
        : undefined;
      try {
        engine = new CopyEngine(source, target, opts, sweepSource);
      } catch (e) {
        await sweepSource?.close().catch(() => undefined);
        throw new RequestError(400, (e as Error).message);
      }
      const policy = req.onCbwError ?? 'break-snapshot';
      const job = new BackupJob(req, engine, target, { clusterSize: opts.clusterSize, onCbwError: policy });
      this.jobs.push(job);
      if (this.jobs.length > 32) this.jobs.shift();
      await this.filter.attach(engine, { policy, timeoutMs: req.cbwTimeoutMs ?? 5000 });
      job.on('end', () => this.filter.detach(engine));
      engine.start();
      this.emit('job', job);
      return job;
    } catch (e) {
      if (target && !(e instanceof RequestError && e.status === 409)) await target.close(false).catch(() => undefined);
      throw e;
    } finally {
      this.starting = false;
    }
  }
}
