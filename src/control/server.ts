// The control API: HTTP + JSON, on a unix socket (mode 0600) by default, or
// on TCP with a bearer token. Routes:
//   GET  /v1/jobs                     all jobs of the export, oldest first
//   POST /v1/jobs                     start a backup: BackupRequest as JSON
//   GET  /v1/jobs/:id                 one job (:id may be "current"/"latest");
//        ?wait=MS answers once the job has ended or after MS ms (at most
//        20000, inside clients' 30 s timeout), so a waiting client learns of
//        the end at once, not a poll late
//   POST /v1/jobs/:id/pause|resume|cancel
//   POST /v1/jobs/:id/speed           {"bytesPerSecond": N}, 0 = unlimited
//   GET  /v1/export                   name and size of the export
//   GET  /metrics                     Prometheus text, when metrics are on

import fs from 'node:fs';
import http from 'node:http';
import crypto from 'node:crypto';
import type { AddressInfo } from 'node:net';
import { MAX_WAIT_MS, type ControlAddress } from './client';
import { JobManager, RequestError, type BackupJob, type BackupRequest } from '../jobs/job';

export interface ControlServerOptions {
  exportName: string;
  jobs: JobManager;
  token?: string;
  metrics?: () => Promise<{ contentType: string; body: string }>;
  log?: (m: string) => void;
}

const MAX_BODY = 64 * 1024;

export class ControlServer {
  private readonly server: http.Server;
  private address: ControlAddress | null = null;

  constructor(private readonly opts: ControlServerOptions) {
    this.server = http.createServer((req, res) => {
      this.handle(req, res).catch((e: unknown) => {
        const status = e instanceof RequestError ? e.status : 500;
        sendJson(res, status, { error: e instanceof Error ? e.message : String(e) });
      });
    });
    this.server.headersTimeout = 10_000;
    this.server.requestTimeout = 30_000;
  }

  async listen(addr: ControlAddress): Promise<ControlAddress> {
    if (!addr.socketPath && !this.opts.token) {
      throw new Error('a TCP control address needs --control-token-file (anyone on the network could cancel backups)');
    }
    if (addr.socketPath) {
      try {
        if (fs.statSync(addr.socketPath).isSocket()) fs.unlinkSync(addr.socketPath);
      } catch {
        // no stale socket
      }
    }
    await new Promise<void>((resolve, reject) => {
      this.server.once('error', reject);
      const done = () => {
        this.server.off('error', reject);
        resolve();
      };
      if (addr.socketPath) {
        // Created 0600: only the owner may drive backups.
        const old = process.umask(0o177);
        try {
          this.server.listen(addr.socketPath, done);
        } finally {
          process.umask(old);
        }
      } else this.server.listen(addr.port, addr.host, done);
    });
    if (addr.socketPath) fs.chmodSync(addr.socketPath, 0o600);
    const bound = this.server.address();
    this.address = addr.socketPath ? addr : { host: addr.host, port: (bound as AddressInfo).port };
    return this.address;
  }

  async close(): Promise<void> {
    await new Promise<void>((r) => this.server.close(() => r()));
    this.server.closeAllConnections?.();
    if (this.address?.socketPath) fs.rmSync(this.address.socketPath, { force: true });
  }

  private authorized(req: http.IncomingMessage): boolean {
    if (!this.opts.token) return true;
    const got = Buffer.from(req.headers.authorization ?? '');
    const want = Buffer.from(`Bearer ${this.opts.token}`);
    return got.length === want.length && crypto.timingSafeEqual(got, want);
  }

  private async handle(req: http.IncomingMessage, res: http.ServerResponse): Promise<void> {
    if (!this.authorized(req)) return sendJson(res, 401, { error: 'missing or wrong bearer token' });
    const url = new URL(req.url ?? '/', 'http://control');
    const parts = url.pathname.split('/').filter(Boolean);
    const method = req.method ?? 'GET';
    const jobs = this.opts.jobs;

    if (url.pathname === '/metrics') {
      if (method !== 'GET') return sendJson(res, 405, { error: `${method} not allowed on /metrics` });
      if (!this.opts.metrics) return sendJson(res, 404, { error: 'metrics are not enabled' });
      const m = await this.opts.metrics();
      res.writeHead(200, { 'content-type': m.contentType });
      res.end(m.body);
      return;
    }
    if (parts[0] !== 'v1') return sendJson(res, 404, { error: `no route ${url.pathname}` });
    if (parts[1] === 'export' && parts.length === 2) {
      if (method !== 'GET') return sendJson(res, 405, { error: `${method} not allowed on /v1/export` });
      return sendJson(res, 200, { name: this.opts.exportName, size: jobs.filter.size });
    }
    if (parts[1] !== 'jobs') return sendJson(res, 404, { error: `no route ${url.pathname}` });
    if (parts.length === 2) {
      if (method === 'GET') return sendJson(res, 200, jobs.list().map((j) => j.status()));
      if (method === 'POST') {
        const body = (await readJson(req)) as BackupRequest;
        const job = await jobs.start(body);
        this.opts.log?.(`backup ${job.id} started to ${body.target}`);
        return sendJson(res, 201, job.status());
      }
      return sendJson(res, 405, { error: `${method} not allowed on /v1/jobs` });
    }
    const which = decodeURIComponent(parts[2]);
    const job = jobs.find(which);
    if (!job) {
      // `backup status` (and wait, pause, ...) without a JOB ask for "current".
      const error =
        which === 'current' || which === 'latest' ? 'no backup job has run on this export yet' : `no job "${which}"`;
      return sendJson(res, 404, { error });
    }
    if (parts.length === 3) {
      if (method !== 'GET') return sendJson(res, 405, { error: `${method} not allowed here` });
      const wait = url.searchParams.get('wait');
      if (wait !== null) {
        const ms = Number(wait);
        if (!/^\d+$/.test(wait) || ms > MAX_WAIT_MS) {
          return sendJson(res, 400, { error: `"wait" must be a whole number of milliseconds up to ${MAX_WAIT_MS}` });
        }
        if (!job.finishedAt && ms > 0) await untilEndOr(job, ms, req);
      }
      return sendJson(res, 200, job.status());
    }
    const actions = new Set(['pause', 'resume', 'cancel', 'speed']);
    if (parts.length === 4 && actions.has(parts[3]) && method !== 'POST') {
      return sendJson(res, 405, { error: `${method} not allowed on ${url.pathname}: use POST` });
    }
    if (parts.length === 4 && method === 'POST') {
      const active = job.engine.isIntercepting;
      switch (parts[3]) {
        case 'pause':
          if (!active) return sendJson(res, 409, { error: `job is ${job.status().state}` });
          job.engine.pause();
          return sendJson(res, 200, job.status());
        case 'resume':
          if (!active) return sendJson(res, 409, { error: `job is ${job.status().state}` });
          job.engine.resume();
          return sendJson(res, 200, job.status());
        case 'cancel':
          if (!active) return sendJson(res, 409, { error: `job is ${job.status().state}` });
          job.engine.cancel();
          return sendJson(res, 200, job.status());
        case 'speed': {
          const body = (await readJson(req)) as { bytesPerSecond?: unknown };
          const v = body.bytesPerSecond;
          if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 0) {
            return sendJson(res, 400, { error: '"bytesPerSecond" must be a non-negative integer' });
          }
          // A limit set on an ended job would only show in its status as if it applied.
          if (!active) return sendJson(res, 409, { error: `job is ${job.status().state}` });
          job.engine.setSpeed(v);
          return sendJson(res, 200, job.status());
        }
      }
    }
    return sendJson(res, 404, { error: `no route ${method} ${url.pathname}` });
  }
}

/** Resolves when `job` ends, `ms` pass, or the client goes away. */
function untilEndOr(job: BackupJob, ms: number, req: http.IncomingMessage): Promise<void> {
  return new Promise<void>((resolve) => {
    const done = () => {
      clearTimeout(timer);
      job.off('end', done);
      req.socket.off('close', done);
      resolve();
    };
    const timer = setTimeout(done, ms);
    job.once('end', done);
    req.socket.once('close', done);
  });
}

function sendJson(res: http.ServerResponse, status: number, body: unknown): void {
  const text = JSON.stringify(body);
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) });
  res.end(text);
}

async function readJson(req: http.IncomingMessage): Promise<unknown> {
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of req) {
    size += (chunk as Buffer).length;
    if (size > MAX_BODY) throw new RequestError(413, 'request body too large');
    chunks.push(chunk as Buffer);
  }
  const text = Buffer.concat(chunks).toString('utf8');
  if (!text) return {};
  try {
    const v = JSON.parse(text) as unknown;
    if (typeof v !== 'object' || v === null || Array.isArray(v)) throw new Error('not an object');
    return v;
  } catch {
    throw new RequestError(400, 'request body is not a JSON object');
  }
}
