// The values of the Prometheus metrics, in-process (no child processes): an
// in-memory source device behind a real CbwFilter, served by a real NbdServer
// on a unix socket with the Metrics connection observer, driven by the real
// NbdClient; backup jobs run by the real JobManager, whose target opener is
// replaced (t.mockRequire) by in-memory targets the test controls: one whose
// writes block until released, one whose first writes fail.
//
// Each step checks the exposed numbers against what the test knows happened:
// buffer bytes = clusters saved and not yet on the target, CBW waits = guest
// writes that waited, request counters and bytes = what the client sent,
// target bytes = what the target received, job state = the job's state.

import t, { type Test } from 'tap';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import * as net from 'node:net';
import { Metrics } from '../src/metrics/metrics';
import { CbwFilter } from '../src/cbw/filter';
import { NbdServer } from '../src/server/server';
import { NbdClient } from '../src/client/client';
import { DeviceError, type BlockDevice, type DeviceCapabilities, type Extent } from '../src/device/types';
import type { BackupTarget } from '../src/targets/types';
import type { BackupJob, BackupRequest, JobManager as JobManagerType } from '../src/jobs/job';
import * as targetSpec from '../src/targets/spec';

const KiB = 1024;
const MiB = 1024 * KiB;
const CLUSTER = 64 * KiB;
const EIO = 5;

// ----------------------------------------------------------- test devices

class Gate {
  private waiters: Array<() => void> = [];
  closed = false;
  close(): void {
    this.closed = true;
  }
  open(): void {
    this.closed = false;
    for (const w of this.waiters.splice(0)) w();
  }
  pass(): Promise<void> {
    if (!this.closed) return Promise.resolve();
    return new Promise((r) => this.waiters.push(r));
  }
  get waiting(): number {
    return this.waiters.length;
  }
}

/** A RAM disk. Reads can be held at a gate (to make a copy-before-write time out). */
class MemoryDevice implements BlockDevice {
  readonly data: Buffer;
  readonly capabilities: DeviceCapabilities = {
    readOnly: false,
    flush: true,
    fua: true,
    trim: true,
    zero: true,
    fastZero: false,
    cache: false,
    // No block status: every cluster is data and gets read and copied.
    blockStatus: false,
    multiConn: true,
  };
  readonly readGate = new Gate();
  constructor(readonly size: number) {
    this.data = Buffer.alloc(size);
    // Non-zero everywhere, so no cluster is "zero detected".
    for (let i = 0; i < size; i += 4) this.data.writeUInt32LE((Math.imul(i, 2654435761) | 1) >>> 0, i);
  }
  async read(offset: number, length: number, into?: Buffer): Promise<Buffer> {
    await this.readGate.pass();
    const out = into ?? Buffer.alloc(length);
    this.data.copy(out, 0, offset, offset + length);
    return out.subarray(0, length);
  }
  async write(offset: number, data: Buffer): Promise<void> {
    data.copy(this.data, offset);
  }
  async zero(offset: number, length: number): Promise<void> {
    this.data.fill(0, offset, offset + length);
  }
  async trim(offset: number, length: number): Promise<void> {
    this.data.fill(0, offset, offset + length);
  }
  async flush(): Promise<void> {}
  async cache(): Promise<void> {}
  async blockStatus(_offset: number, length: number): Promise<Extent[]> {
    return [{ length, flags: 0 }];
  }
  async close(): Promise<void> {}
}

/** A backup target in RAM: writes can be held at a gate, and the first N can fail. */
class MemoryTarget implements BackupTarget {
  readonly description = 'memory target';
  readonly readsAsZero = false;
  readonly maxWrite = 32 * MiB;
  readonly gate = new Gate();
  readonly data: Buffer;
  failNext = 0;
  /** Successful write() calls and the bytes they carried. */
  writes = 0;
  bytes = 0;
  zeroBytes = 0;
  committed = false;
  closed: boolean | null = null;
  constructor(size: number) {
    this.data = Buffer.alloc(size);
  }
  async write(offset: number, data: readonly Buffer[]): Promise<void> {
    await this.gate.pass();
    if (this.failNext > 0) {
      this.failNext--;
      throw new DeviceError(EIO, 'injected target write failure');
    }
    let at = offset;
    for (const b of data) {
      b.copy(this.data, at);
      at += b.length;
    }
    this.writes++;
    this.bytes += at - offset;
  }
  async writeZeroes(offset: number, length: number): Promise<void> {
    await this.gate.pass();
    this.data.fill(0, offset, offset + length);
    this.zeroBytes += length;
  }
  async commit(): Promise<void> {
    this.committed = true;
  }
  async close(completed: boolean): Promise<void> {
    this.closed = completed;
  }
}

// ----------------------------------------------------------- the rig

interface Rig {
  metrics: Metrics;
  source: MemoryDevice;
  filter: CbwFilter;
  jobs: JobManagerType;
  client: NbdClient;
  targets: Map<string, MemoryTarget>;
}

/**
 * Metrics + CbwFilter + JobManager wired as `nbd-cbw serve` wires them, an
 * NbdServer on a unix socket with the metrics observer, and a connected client.
 */
async function rig(t: Test, size: number): Promise<Rig> {
  const targets = new Map<string, MemoryTarget>();
  const { JobManager } = t.mockRequire('../src/jobs/job', {
    // Test targets are named "mem:N", which no real spec is.
    '../src/targets/spec': { ...targetSpec, validateTargetSpec: () => null },
    '../src/targets/open': {
      openTarget: async (spec: string) => {
        const target = targets.get(spec);
        if (!target) throw new Error(`no test target "${spec}"`);
        return target;
      },
    },
  }) as typeof import('../src/jobs/job');
  const metrics = new Metrics({ defaultMetrics: false });
  const source = new MemoryDevice(size);
  const filter = new CbwFilter(source);
  const jobs = new JobManager(filter);
  metrics.watchExport('disk', filter, jobs);
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nbd-cbw-mv-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const server = new NbdServer({ exports: [{ name: 'disk', device: filter }], observer: metrics.connectionObserver() });
  const socketPath = path.join(dir, 'nbd.sock');
  await server.listen({ socketPath });
  t.teardown(() => server.close(1000));
  const client = await NbdClient.connect({ socketPath, exportName: 'disk' }, { connectTimeoutMs: 5000 });
  t.teardown(async () => {
    // Let nothing hold the job (and its timers) open past the test.
    for (const j of jobs.list()) j.engine.cancel();
    source.readGate.open();
    for (const tg of targets.values()) tg.gate.open();
    await client.close().catch(() => undefined);
  });
  return { metrics, source, filter, jobs, client, targets };
}

// ------------------------------------------------------- reading metrics

type Labels = Record<string, string>;

/**
 * The value of one series: `name` is a metric or a histogram series
 * (`_bucket`, `_sum`, `_count`), `labels` must all match (others may be
 * present). undefined when the series does not exist.
 */
async function value(metrics: Metrics, name: string, labels: Labels = {}): Promise<number | undefined> {
  const all = await metrics.registry.getMetricsAsJSON();
  const base = all.find((m) => m.name === name) ?? all.find((m) => name.startsWith(`${m.name}_`) && String(m.type) === 'histogram');
  if (!base) throw new Error(`no metric ${name} in the registry`);
  const found = (base.values as Array<{ labels: Labels; value: number; metricName?: string }>).filter(
    (v) => (v.metricName ?? base.name) === name && Object.entries(labels).every(([k, want]) => String(v.labels[k]) === want),
  );
  if (found.length === 0) return undefined;
  if (found.length > 1) throw new Error(`${name}${JSON.stringify(labels)} matches ${found.length} series`);
  return found[0].value;
}

/** Like value(), 0 for a series that does not exist yet (a counter before its first event). */
async function count(metrics: Metrics, name: string, labels: Labels = {}): Promise<number> {
  return (await value(metrics, name, labels)) ?? 0;
}

async function states(metrics: Metrics): Promise<Record<string, number>> {
  const out: Record<string, number> = {};
  for (const s of ['starting', 'running', 'paused', 'completed', 'failed', 'cancelled']) {
    out[s] = (await value(metrics, 'nbd_cbw_backup_state', { export: 'disk', state: s })) as number;
  }
  return out;
}

/** Poll until `check` is true; bounded. */
async function until(what: string, check: () => boolean | Promise<boolean>, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

/** Start a job through the real JobManager; `paused` pauses it before its sweep claims anything. */
async function startJob(r: Rig, target: MemoryTarget, req: Omit<BackupRequest, 'target'>, paused: boolean): Promise<BackupJob> {
  const spec = `mem:${r.targets.size}`;
  r.targets.set(spec, target);
  // 'job' is emitted synchronously right after engine.start(): the sweep
  // workers have not run yet, so pausing here means no background copy at all.
  const pause = (job: BackupJob) => job.engine.pause();
  if (paused) r.jobs.once('job', pause);
  try {
    return await r.jobs.start({ target: spec, ...req });
  } finally {
    r.jobs.off('job', pause);
  }
}

const E = { export: 'disk' };

// ------------------------------------------------------------------ tests

t.test('buffer, CBW waits, requests, target bytes and job state follow a blocked backup', async (t) => {
  const SIZE = 4 * MiB;
  const r = await rig(t, SIZE);
  const { metrics, client } = r;

  // Before any job: the job gauges read 0, every state is 0, no request yet.
  t.equal(await value(metrics, 'nbd_cbw_buffer_used_bytes', E), 0);
  t.equal(await value(metrics, 'nbd_cbw_backup_size_bytes', E), 0);
  t.same(await states(metrics), { starting: 0, running: 0, paused: 0, completed: 0, failed: 0, cancelled: 0 });
  t.equal(await value(metrics, 'nbd_cbw_requests_in_flight', E), 0);
  t.equal(await count(metrics, 'nbd_cbw_requests_total', { ...E, operation: 'write' }), 0);

  // Guest I/O with no job: counted, never waits.
  await client.write(0, Buffer.alloc(8 * KiB, 1));
  await client.read(0, 16 * KiB);
  await client.flush();
  t.equal(await value(metrics, 'nbd_cbw_requests_total', { ...E, operation: 'write' }), 1);
  t.equal(await value(metrics, 'nbd_cbw_request_bytes_total', { ...E, operation: 'write' }), 8 * KiB);
  t.equal(await value(metrics, 'nbd_cbw_requests_total', { ...E, operation: 'read' }), 1);
  t.equal(await value(metrics, 'nbd_cbw_request_bytes_total', { ...E, operation: 'read' }), 16 * KiB);
  t.equal(await value(metrics, 'nbd_cbw_requests_total', { ...E, operation: 'flush' }), 1);
  t.equal(await value(metrics, 'nbd_cbw_request_bytes_total', { ...E, operation: 'flush' }), undefined, 'flush moves no bytes');
  t.equal(await value(metrics, 'nbd_cbw_request_duration_seconds_count', { ...E, operation: 'write' }), 1);
  t.equal(await value(metrics, 'nbd_cbw_request_duration_seconds_count', { ...E, operation: 'read' }), 1);
  t.equal(await value(metrics, 'nbd_cbw_request_duration_seconds_bucket', { ...E, operation: 'read', le: '+Inf' }), 1);
  t.equal(await count(metrics, 'nbd_cbw_cbw_guest_writes_waited_total', E), 0);

  // A job whose target blocks every write, paused so only guest writes copy.
  // The buffer holds exactly 3 clusters.
  const target = new MemoryTarget(SIZE);
  target.gate.close();
  const job = await startJob(r, target, { bufferBytes: 3 * CLUSTER, cbwTimeoutMs: 20_000, workers: 1 }, true);
  t.equal(await count(metrics, 'nbd_cbw_backup_jobs_started_total', E), 1);
  t.same(await states(metrics), { starting: 0, running: 0, paused: 1, completed: 0, failed: 0, cancelled: 0 });
  t.equal(await value(metrics, 'nbd_cbw_backup_size_bytes', E), SIZE);
  t.equal(await value(metrics, 'nbd_cbw_backup_done_bytes', E), 0);
  t.equal(await value(metrics, 'nbd_cbw_buffer_capacity_bytes', E), 3 * CLUSTER);
  t.equal(await value(metrics, 'nbd_cbw_backup_clusters_remaining', E), SIZE / CLUSTER);

  // 3 guest writes to 3 distinct clusters: each saves its 64 KiB cluster
  // into the buffer first (the target is blocked: nothing leaves).
  const clusters = [10, 20, 30];
  for (const c of clusters) await client.write(c * CLUSTER + 4 * KiB, Buffer.alloc(4 * KiB, 0xee));
  t.equal(await value(metrics, 'nbd_cbw_buffer_used_bytes', E), 196608, 'buffer = 3 saved clusters not yet written');
  t.equal(await value(metrics, 'nbd_cbw_buffer_high_water_bytes', E), 196608);
  t.equal(await value(metrics, 'nbd_cbw_buffer_spill_bytes', E), 0);
  t.equal(await value(metrics, 'nbd_cbw_cbw_guest_writes_waited_total', E), 3, 'each write waited for its save');
  t.equal(await value(metrics, 'nbd_cbw_cbw_wait_seconds_count', E), 3);
  t.ok(((await value(metrics, 'nbd_cbw_cbw_wait_seconds_sum', E)) as number) > 0);
  t.equal(await count(metrics, 'nbd_cbw_cbw_failures_total', E), 0);
  t.equal(await count(metrics, 'nbd_cbw_cbw_buffer_full_waits_total', E), 0);
  t.equal(await value(metrics, 'nbd_cbw_requests_total', { ...E, operation: 'write' }), 4);
  t.equal(await value(metrics, 'nbd_cbw_request_bytes_total', { ...E, operation: 'write' }), 8 * KiB + 3 * 4 * KiB);
  t.equal(await value(metrics, 'nbd_cbw_backup_done_bytes', E), 0, 'nothing reached the target');
  t.equal(await count(metrics, 'nbd_cbw_backup_target_written_bytes_total', { ...E, kind: 'data' }), 0);
  t.equal(await value(metrics, 'nbd_cbw_backup_copied_bytes', E), 3 * CLUSTER);
  t.equal(await value(metrics, 'nbd_cbw_backup_clusters_remaining', E), SIZE / CLUSTER - 3);
  t.equal(await value(metrics, 'nbd_cbw_requests_in_flight', E), 0);
  t.equal(target.gate.waiting, 3, 'the 3 saved clusters are waiting at the target');

  // A 4th write to a 4th cluster finds the buffer full: it waits in flight.
  const fourth = client.write(40 * CLUSTER, Buffer.alloc(4 * KiB, 0xdd));
  await until('the 4th write to wait for buffer room', async () => (await count(metrics, 'nbd_cbw_cbw_buffer_full_waits_total', E)) === 1);
  t.equal(await value(metrics, 'nbd_cbw_requests_in_flight', E), 1, 'the waiting write is in flight');
  t.equal(await value(metrics, 'nbd_cbw_buffer_used_bytes', E), 196608, 'still full');

  // Release the target: the buffer drains, the 4th write goes on.
  target.gate.open();
  await fourth;
  await until('the buffer to drain', async () => (await value(metrics, 'nbd_cbw_buffer_used_bytes', E)) === 0);
  t.equal(await value(metrics, 'nbd_cbw_cbw_guest_writes_waited_total', E), 4);
  t.equal(await value(metrics, 'nbd_cbw_requests_in_flight', E), 0);
  t.equal(await value(metrics, 'nbd_cbw_buffer_high_water_bytes', E), 196608);
  t.equal(await value(metrics, 'nbd_cbw_backup_target_written_bytes_total', { ...E, kind: 'data' }), 4 * CLUSTER);
  t.equal(await value(metrics, 'nbd_cbw_backup_done_bytes', E), 4 * CLUSTER);
  t.same(await states(metrics), { starting: 0, running: 0, paused: 1, completed: 0, failed: 0, cancelled: 0 });

  // Resume the sweep: the job copies the rest and completes.
  job.engine.resume();
  await job.engine.done;
  await until('the completed state', async () => (await states(metrics)).completed === 1);
  t.same(await states(metrics), { starting: 0, running: 0, paused: 0, completed: 1, failed: 0, cancelled: 0 });
  t.equal(target.bytes, SIZE, 'the target got the whole disk once');
  t.equal(target.zeroBytes, 0);
  t.ok(target.committed);
  t.equal(await value(metrics, 'nbd_cbw_backup_target_written_bytes_total', { ...E, kind: 'data' }), target.bytes);
  t.equal(await count(metrics, 'nbd_cbw_backup_target_written_bytes_total', { ...E, kind: 'zero' }), 0);
  t.equal(await value(metrics, 'nbd_cbw_backup_target_write_duration_seconds_count', E), target.writes, 'one observation per target write');
  t.equal(await value(metrics, 'nbd_cbw_backup_done_bytes', E), SIZE);
  t.equal(await value(metrics, 'nbd_cbw_backup_copied_bytes', E), SIZE);
  t.equal(await value(metrics, 'nbd_cbw_backup_skipped_bytes', E), 0);
  t.equal(await value(metrics, 'nbd_cbw_backup_zero_detected_bytes', E), 0);
  t.equal(await value(metrics, 'nbd_cbw_backup_clusters_remaining', E), 0);
  t.equal(await value(metrics, 'nbd_cbw_buffer_used_bytes', E), 0);
  t.equal(await value(metrics, 'nbd_cbw_backup_jobs_ended_total', { ...E, state: 'completed' }), 1);
  t.equal(await count(metrics, 'nbd_cbw_backup_target_retries_total', E), 0);
  t.equal(await count(metrics, 'nbd_cbw_backup_errors_total', { ...E, kind: 'target_write' }), 0);

  // The backup holds the disk as it was at the start: the guest's 0xee/0xdd
  // writes are not in it.
  const original = new MemoryDevice(SIZE).data;
  original.fill(1, 0, 8 * KiB); // the write before the job
  t.ok(target.data.equals(original), 'target = the disk at the start of the job');

  // After the job, guest writes no longer wait.
  await client.write(50 * CLUSTER, Buffer.alloc(4 * KiB, 0xcc));
  t.equal(await value(metrics, 'nbd_cbw_cbw_guest_writes_waited_total', E), 4);
  t.equal(await value(metrics, 'nbd_cbw_requests_total', { ...E, operation: 'write' }), 6);

  // The text exposition carries the same numbers.
  const text = (await metrics.render()).body;
  t.match(text, /^nbd_cbw_backup_state\{export="disk",state="completed"\} 1$/m);
  t.match(text, new RegExp(`^nbd_cbw_backup_target_written_bytes_total\\{export="disk",kind="data"\\} ${SIZE}$`, 'm'));
  t.match(text, /^nbd_cbw_cbw_guest_writes_waited_total\{export="disk"\} 4$/m);
});

t.test('errors: CBW timeout, failed job, target retries, guest request errors', async (t) => {
  const SIZE = 1 * MiB;
  const r = await rig(t, SIZE);
  const { metrics, client, source } = r;

  // A guest request the server refuses: a read past the end.
  await t.rejects(client.read(SIZE, 4 * KiB));
  t.equal(await value(metrics, 'nbd_cbw_request_errors_total', { ...E, operation: 'read', error: 'EINVAL' }), 1);
  t.equal(await value(metrics, 'nbd_cbw_requests_total', { ...E, operation: 'read' }), 1, 'an error reply is still a request');
  t.equal(await count(metrics, 'nbd_cbw_request_bytes_total', { ...E, operation: 'read' }), 0, 'and moved no bytes');

  // Job 1: the source read that saves a cluster hangs, the CBW times out,
  // break-guest-write: the guest write fails with EIO, the job goes on.
  const t1 = new MemoryTarget(SIZE);
  const job1 = await startJob(r, t1, { cbwTimeoutMs: 150, onCbwError: 'break-guest-write' }, true);
  source.readGate.close();
  await t.rejects(client.write(3 * CLUSTER, Buffer.alloc(4 * KiB, 7)), 'the guest write is refused');
  t.equal(await value(metrics, 'nbd_cbw_cbw_failures_total', E), 1);
  t.equal(await value(metrics, 'nbd_cbw_backup_errors_total', { ...E, kind: 'cbw' }), 1);
  t.equal(await value(metrics, 'nbd_cbw_request_errors_total', { ...E, operation: 'write', error: 'EIO' }), 1);
  t.equal(await value(metrics, 'nbd_cbw_cbw_guest_writes_waited_total', E), 1);
  t.equal((await states(metrics)).paused, 1, 'break-guest-write keeps the job');

  // Same again with break-snapshot: the guest write goes on, the job fails.
  source.readGate.open();
  job1.engine.cancel();
  await until('job 1 to end', async () => (await count(metrics, 'nbd_cbw_backup_jobs_ended_total', { ...E, state: 'cancelled' })) === 1);
  t.equal((await states(metrics)).cancelled, 1);
  const t2 = new MemoryTarget(SIZE);
  const job2 = await startJob(r, t2, { cbwTimeoutMs: 150, onCbwError: 'break-snapshot' }, true);
  source.readGate.close();
  await client.write(5 * CLUSTER, Buffer.alloc(4 * KiB, 8));
  source.readGate.open();
  await t.rejects(job2.engine.done);
  await until('job 2 to be counted as failed', async () => (await count(metrics, 'nbd_cbw_backup_errors_total', { ...E, kind: 'job_failed' })) === 1);
  t.same(await states(metrics), { starting: 0, running: 0, paused: 0, completed: 0, failed: 1, cancelled: 0 });
  t.equal(await value(metrics, 'nbd_cbw_cbw_failures_total', E), 2);
  t.equal(await value(metrics, 'nbd_cbw_backup_errors_total', { ...E, kind: 'cbw' }), 2);
  t.equal(await value(metrics, 'nbd_cbw_backup_jobs_ended_total', { ...E, state: 'failed' }), 1);
  t.equal(await value(metrics, 'nbd_cbw_request_errors_total', { ...E, operation: 'write', error: 'EIO' }), 1, 'the guest write succeeded');

  // Job 3: the target fails its first 2 writes; retried from the buffer, the job completes.
  const t3 = new MemoryTarget(SIZE);
  t3.failNext = 2;
  const job3 = await startJob(r, t3, {}, false);
  await job3.engine.done;
  await until('the completed state', async () => (await states(metrics)).completed === 1);
  t.equal(await value(metrics, 'nbd_cbw_backup_target_retries_total', E), 2);
  t.equal(await value(metrics, 'nbd_cbw_backup_errors_total', { ...E, kind: 'target_write' }), 2);
  t.equal(await value(metrics, 'nbd_cbw_backup_jobs_started_total', E), 3);
  t.equal(await value(metrics, 'nbd_cbw_backup_jobs_ended_total', { ...E, state: 'completed' }), 1);
  t.equal(await value(metrics, 'nbd_cbw_backup_target_written_bytes_total', { ...E, kind: 'data' }), t3.bytes);
  t.equal(t3.bytes, SIZE);
  t.equal(await value(metrics, 'nbd_cbw_backup_done_bytes', E), SIZE, 'the gauges follow the latest job');
  // The buffer's peak is the sweep's (its share is part of --buffer): job 3
  // saved nothing for guests.
  t.equal(job3.engine.progress().guestCopies, 0, 'job 3 saved nothing for guests');
  t.equal(
    await value(metrics, 'nbd_cbw_buffer_high_water_bytes', E),
    job3.engine.progress().bufferHighWater,
    "the high-water gauge is job 3's",
  );
});

t.test('in-flight gauge and per-operation children through the observer hooks', async (t) => {
  // The observer alone, called as the connection calls it.
  const metrics = new Metrics({ defaultMetrics: false });
  const obs = metrics.connectionObserver();
  const exp = { name: 'vm1', device: new MemoryDevice(64 * KiB) };
  const WRITE = 1;
  const TRIM = 4;
  const ZERO = 6;
  obs.requestStarted?.(exp, WRITE);
  obs.requestStarted?.(exp, WRITE);
  obs.requestStarted?.(exp, TRIM);
  t.equal(await value(metrics, 'nbd_cbw_requests_in_flight', { export: 'vm1' }), 3);
  obs.requestFinished?.(exp, WRITE, 4096, 0.0001, 0);
  obs.requestFinished?.(exp, WRITE, 0, 0.002, EIO);
  obs.requestFinished?.(exp, TRIM, 1 * MiB, 0.003, 0);
  obs.requestStarted?.(exp, ZERO);
  obs.requestFinished?.(exp, ZERO, 2 * MiB, 0.00001, 0);
  t.equal(await value(metrics, 'nbd_cbw_requests_in_flight', { export: 'vm1' }), 0);
  t.equal(await value(metrics, 'nbd_cbw_requests_total', { export: 'vm1', operation: 'write' }), 2);
  t.equal(await value(metrics, 'nbd_cbw_request_bytes_total', { export: 'vm1', operation: 'write' }), 4096, 'failed requests move no bytes');
  t.equal(await value(metrics, 'nbd_cbw_request_errors_total', { export: 'vm1', operation: 'write', error: 'EIO' }), 1);
  t.equal(await value(metrics, 'nbd_cbw_request_bytes_total', { export: 'vm1', operation: 'trim' }), 1 * MiB);
  t.equal(await value(metrics, 'nbd_cbw_request_bytes_total', { export: 'vm1', operation: 'write_zeroes' }), 2 * MiB);
  // Buckets are cumulative: 0.0001 s is in le=0.0001, 0.002 s is not.
  t.equal(await value(metrics, 'nbd_cbw_request_duration_seconds_bucket', { export: 'vm1', operation: 'write', le: '0.0001' }), 1);
  t.equal(await value(metrics, 'nbd_cbw_request_duration_seconds_bucket', { export: 'vm1', operation: 'write', le: '0.0025' }), 2);
  t.equal(await value(metrics, 'nbd_cbw_request_duration_seconds_bucket', { export: 'vm1', operation: 'write_zeroes', le: '0.00002' }), 1);
  const sum = (await value(metrics, 'nbd_cbw_request_duration_seconds_sum', { export: 'vm1', operation: 'write' })) as number;
  t.ok(Math.abs(sum - 0.0021) < 1e-12, `write latency sum ${sum}`);

  // Default metrics carry the nbd_cbw_ prefix (the dashboard uses the RSS).
  const withDefaults = new Metrics();
  const text = (await withDefaults.render()).body;
  t.match(text, /^nbd_cbw_process_resident_memory_bytes \d+/m);
});

t.test('connections: served, waiting beyond --max-connections, refused; the operator is told once', async (t) => {
  const metrics = new Metrics({ defaultMetrics: false });
  const notices: string[] = [];
  const server = new NbdServer({
    exports: [{ name: 'disk', device: new MemoryDevice(1 * MiB) }],
    maxConnections: 2,
    notice: (m) => notices.push(m),
  });
  metrics.watchConnections(server);
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nbd-cbw-mc-'));
  const socketPath = path.join(dir, 's.sock');
  await server.listen({ socketPath });
  const sockets: net.Socket[] = [];
  t.teardown(async () => {
    for (const s of sockets) s.destroy();
    await server.close(1000);
    fs.rmSync(dir, { recursive: true, force: true });
  });
  /** Connect; resolves with the socket and whether the server sent its greeting (or closed) within `ms`. */
  const connect = async (ms: number): Promise<{ sock: net.Socket; greeted: boolean; closed: boolean }> => {
    const sock = net.connect(socketPath);
    sockets.push(sock);
    let bytes = 0;
    let closed = false;
    sock.on('data', (d: Buffer) => (bytes += d.length));
    sock.on('close', () => (closed = true));
    sock.on('error', () => undefined);
    await new Promise<void>((resolve, reject) => sock.once('connect', resolve).once('error', reject));
    const deadline = Date.now() + ms;
    while (bytes < 18 && !closed && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
    return { sock, greeted: bytes >= 18, closed };
  };
  const counts = async () => ({
    served: await value(metrics, 'nbd_cbw_connections', { state: 'served' }),
    waiting: await value(metrics, 'nbd_cbw_connections', { state: 'waiting' }),
    refused: await value(metrics, 'nbd_cbw_connections_refused_total'),
  });

  t.same(await counts(), { served: 0, waiting: 0, refused: 0 }, 'none at first: the series exist at 0');
  const a = await connect(2000);
  const b = await connect(2000);
  t.ok(a.greeted && b.greeted, 'two clients get their greeting');
  t.same(await counts(), { served: 2, waiting: 0, refused: 0 }, 'two served');
  t.same(notices, [], 'nothing said yet');
  const c = await connect(300);
  const d = await connect(300);
  t.notOk(c.greeted || d.greeted || c.closed || d.closed, 'two more wait: connected, no greeting');
  t.same(await counts(), { served: 2, waiting: 2, refused: 0 }, 'two served, two waiting');
  const e = await connect(2000);
  const f = await connect(2000);
  t.ok(e.closed && f.closed && !e.greeted && !f.greeted, 'beyond the queue: closed at once, no greeting');
  t.same(await counts(), { served: 2, waiting: 2, refused: 2 }, 'two refused');
  t.equal(notices.length, 2, 'the operator is told once that clients wait and once that they are refused', { notices });
  t.match(notices[0], /all 2 slots are taken \(--max-connections\); new clients wait/, 'first: clients wait');
  t.match(notices[1], /2 clients served and 2 waiting; refusing new clients/, 'then: clients are refused');

  a.sock.destroy();
  await until('a waiting client served', async () => (await counts()).waiting === 1);
  t.same(await counts(), { served: 2, waiting: 1, refused: 2 }, 'one left: the oldest waiting client is served');
  b.sock.destroy();
  await until('the queue empty', async () => (await counts()).waiting === 0);
  t.same(await counts(), { served: 2, waiting: 0, refused: 2 }, 'another left: the queue is empty, the refusals stay counted');
  // A new wait is a new episode: said again.
  const g = await connect(300);
  t.notOk(g.greeted, 'one more waits');
  t.equal(notices.length, 3, 'and the operator is told again');
});
