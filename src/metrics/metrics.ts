// Prometheus metrics (prom-client). Names follow Prometheus conventions:
// nbd_cbw_ prefix, base units (seconds, bytes), _total for counters. Label
// values are bounded: export names, operation names, error kinds, job states.
//
// Hot path: the per-request hooks only bump plain numbers in a slot per
// (export, operation): a request count, bytes, a latency sum and one latency
// bucket. prom-client's own inc()/observe() hash the label set and validate
// it on every call (about 2 us per request together, several percent of the
// proxy's CPU per request); here the slots become series at scrape time.

import client, { Counter, Gauge, Histogram, Registry, type HistogramConfiguration } from 'prom-client';
import { commandName, errorName } from '../nbd-protocol/constants';
import type { ConnectionObserver, ExportSpec } from '../server/connection';
import type { ConnectionCounts } from '../server/server';
import type { CbwFilter } from '../cbw/filter';
import type { JobManager, JobStatus } from '../jobs/job';
import type { CopyEngine } from '../copy/engine';

/** 20 us to 10 s, roughly x2.5 per step. */
export const LATENCY_BUCKETS = [
  0.00002, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
];

const JOB_STATES = ['starting', 'running', 'paused', 'completed', 'failed', 'cancelled'] as const;

/** Index of the first bucket whose upper bound holds `seconds`; LATENCY_BUCKETS.length for +Inf only. */
function latencyBucket(seconds: number): number {
  let i = 0;
  while (i < LATENCY_BUCKETS.length && seconds > LATENCY_BUCKETS[i]) i++;
  return i;
}

/** Latencies counted on a hot path, read by a SlotHistogram at scrape time. */
interface LatencySlot<L> {
  labels: L;
  requests: number;
  seconds: number;
  /** Per bucket, not cumulative; the last entry counts what is above every bound. */
  buckets: number[];
}

function latencySlot<L>(labels: L): LatencySlot<L> {
  return { labels, requests: 0, seconds: 0, buckets: new Array<number>(LATENCY_BUCKETS.length + 1).fill(0) };
}

function countLatency(slot: LatencySlot<unknown>, seconds: number): void {
  slot.requests++;
  slot.seconds += seconds;
  slot.buckets[latencyBucket(seconds)]++;
}

/** What the hot path counts for one (export, operation). */
interface OpSlot extends LatencySlot<{ export: string; operation: string }> {
  bytes: number;
}

/** What the cbw filter counts for one export: guest writes that waited. */
type WaitSlot = LatencySlot<{ export: string }>;

/** What an export's backup jobs count per target write. */
interface TargetSlot extends LatencySlot<{ export: string }> {
  dataBytes: number;
  zeroBytes: number;
}

/** Command numbers 0..MAX_COMMAND get their own slot; others share 'unknown'. */
const MAX_COMMAND = 15;

/**
 * A prom-client Histogram whose series are read at scrape time from slots
 * the caller keeps (observations never go through observe()); a slot's
 * `buckets` has one count per bound, not cumulative, plus one for above
 * every bound. The exposition
 * is what Histogram itself produces: cumulative _bucket series with `le`,
 * then _sum and _count.
 */
class SlotHistogram<T extends string> extends Histogram<T> {
  private readonly meta: { name: string; help: string; bounds: readonly number[]; aggregator: NonNullable<HistogramConfiguration<T>['aggregator']> };

  constructor(
    config: HistogramConfiguration<T> & { buckets: number[] },
    private readonly slots: () => Iterable<{ labels: Record<T, string>; seconds: number; requests: number; buckets: number[] }>,
  ) {
    super(config);
    this.meta = { name: config.name, help: config.help, bounds: [...config.buckets], aggregator: config.aggregator ?? 'sum' };
  }

  private snapshot() {
    const { name, help, bounds, aggregator } = this.meta;
    const values: Array<{ labels: Record<string, string | number>; value: number; metricName: string }> = [];
    for (const s of this.slots()) {
      let acc = 0;
      for (let i = 0; i < bounds.length; i++) {
        acc += s.buckets[i];
        values.push({ labels: { le: bounds[i], ...s.labels }, value: acc, metricName: `${name}_bucket` });
      }
      values.push({ labels: { le: '+Inf', ...s.labels }, value: s.requests, metricName: `${name}_bucket` });
      values.push({ labels: { ...s.labels }, value: s.seconds, metricName: `${name}_sum` });
      values.push({ labels: { ...s.labels }, value: s.requests, metricName: `${name}_count` });
    }
    return { name, help, type: 'histogram', values, aggregator };
  }

  // The typings want more than a metric's data (a collect function) and
  // less in its labels (no `le`); this is the shape Histogram itself returns.
  override async get(): ReturnType<Histogram<T>['get']> {
    return this.snapshot() as unknown as Awaited<ReturnType<Histogram<T>['get']>>;
  }

  /** What the registry reads for the text format (it prefers this to get()). */
  async getForPromString(): ReturnType<Histogram<T>['get']> {
    return this.get();
  }
}

type JobStatusReader = (s: JobStatus) => number;

/** Job gauges, read from each export's latest job at scrape time. */
const JOB_GAUGES: Array<[string, string, JobStatusReader]> = [
  ['nbd_cbw_buffer_used_bytes', 'Cow buffer RAM holding saved old data not yet on the target', (s) => s.bufferBytes],
  ['nbd_cbw_buffer_capacity_bytes', 'Cow buffer RAM budget (--buffer)', (s) => s.bufferCapacity],
  ['nbd_cbw_buffer_spill_bytes', 'Saved old data in the spill file, not yet on the target', (s) => s.spillBytes],
  ['nbd_cbw_buffer_high_water_bytes', 'Highest cow buffer RAM use during the latest job', (s) => s.bufferHighWater],
  ['nbd_cbw_backup_size_bytes', 'Size of the disk being backed up by the latest job', (s) => s.bytesTotal],
  ['nbd_cbw_backup_done_bytes', 'Bytes of the latest job final on the target (or known zero there)', (s) => s.bytesDone],
  ['nbd_cbw_backup_copied_bytes', 'Bytes the latest job read from the source and wrote as data', (s) => s.bytesCopied],
  ['nbd_cbw_backup_skipped_bytes', 'Bytes the latest job never read: unallocated or zero per block status', (s) => s.bytesSkipped],
  ['nbd_cbw_backup_zero_detected_bytes', 'Bytes the latest job read and found all zero', (s) => s.bytesZeroDetected],
  ['nbd_cbw_backup_clusters_remaining', 'Clusters the latest job has still to copy', (s) => s.clustersRemaining],
  ['nbd_cbw_backup_speed_limit_bytes_per_second', 'Background copy speed limit of the latest job (0 = none)', (s) => s.speedLimit],
];

export class Metrics {
  readonly registry = new Registry();
  private readonly errors: Counter<'export' | 'operation' | 'error'>;
  private readonly inFlight: Gauge<'export'>;
  /** Per export: guest writes that waited for their old data, read at scrape time. */
  private readonly cbwWaitSlots = new Map<string, WaitSlot>();
  private readonly cbwFailures: Counter<'export'>;
  private readonly bufferFullWaits: Counter<'export'>;
  /** Per export: target writes of its backup jobs, read at scrape time. */
  private readonly targetSlots = new Map<string, TargetSlot>();
  private readonly targetRetries: Counter<'export'>;
  private readonly backupErrors: Counter<'export' | 'kind'>;
  private readonly jobsStarted: Counter<'export'>;
  private readonly jobsEnded: Counter<'export' | 'state'>;
  /** Export name -> slots indexed by command number (the last one: unknown commands). */
  private readonly slotsByExport = new Map<string, Array<OpSlot | undefined>>();
  private readonly inFlightByExport = new Map<string, number>();
  private readonly watched: Array<{ name: string; jobs: JobManager }> = [];
  private readonly servers: Array<{ readonly connectionCounts: ConnectionCounts }> = [];

  constructor(opts: { defaultMetrics?: boolean } = {}) {
    const r = [this.registry];
    if (opts.defaultMetrics !== false) client.collectDefaultMetrics({ register: this.registry, prefix: 'nbd_cbw_' });
    const slots = () => this.allSlots();
    // Counters filled from the slots at scrape time (reset, then the totals).
    new Counter({
      name: 'nbd_cbw_requests_total',
      help: 'NBD requests completed, by export and operation',
      labelNames: ['export', 'operation'],
      registers: r,
      collect() {
        this.reset();
        for (const s of slots()) if (s.requests > 0) this.inc(s.labels, s.requests);
      },
    });
    new Counter({
      name: 'nbd_cbw_request_bytes_total',
      help: 'Bytes moved by successful NBD requests (read, write, trim, write_zeroes), by export and operation',
      labelNames: ['export', 'operation'],
      registers: r,
      collect() {
        this.reset();
        for (const s of slots()) if (s.bytes > 0) this.inc(s.labels, s.bytes);
      },
    });
    new SlotHistogram<'export' | 'operation'>(
      {
        name: 'nbd_cbw_request_duration_seconds',
        help: 'NBD request latency from receipt to reply, by export and operation',
        labelNames: ['export', 'operation'],
        buckets: LATENCY_BUCKETS,
        registers: r,
      },
      slots,
    );
    this.errors = new Counter({
      name: 'nbd_cbw_request_errors_total',
      help: 'NBD requests answered with an error, by export, operation and NBD error',
      labelNames: ['export', 'operation', 'error'],
      registers: r,
    });
    const inFlightByExport = this.inFlightByExport;
    // Read at scrape time from a plain map: cheaper than a gauge update per request.
    this.inFlight = new Gauge({
      name: 'nbd_cbw_requests_in_flight',
      help: 'NBD requests being executed now',
      labelNames: ['export'],
      registers: r,
      collect() {
        for (const [exp, n] of inFlightByExport) this.labels(exp).set(n);
      },
    });
    const servers = this.servers;
    const connections = () => {
      const all = { served: 0, waiting: 0, refused: 0 };
      for (const srv of servers) {
        const c = srv.connectionCounts;
        all.served += c.served;
        all.waiting += c.waiting;
        all.refused += c.refused;
      }
      return all;
    };
    new Gauge({
      name: 'nbd_cbw_connections',
      help: 'NBD client connections: served, or waiting for a slot beyond --max-connections',
      labelNames: ['state'],
      registers: r,
      collect() {
        const c = connections();
        this.labels('served').set(c.served);
        this.labels('waiting').set(c.waiting);
      },
    });
    new Counter({
      name: 'nbd_cbw_connections_refused_total',
      help: 'NBD clients closed at once: --max-connections served and as many waiting',
      registers: r,
      collect() {
        this.reset();
        this.inc(connections().refused);
      },
    });
    const watched = this.watched;
    for (const [name, help, read] of JOB_GAUGES) {
      new Gauge({
        name,
        help,
        labelNames: ['export'],
        registers: r,
        collect() {
          for (const w of watched) {
            const job = w.jobs.latest;
            this.labels(w.name).set(job ? read(job.status()) : 0);
          }
        },
      });
    }
    new Gauge({
      name: 'nbd_cbw_backup_state',
      help: 'State of the latest backup job: 1 for its current state, 0 for the others',
      labelNames: ['export', 'state'],
      registers: r,
      collect() {
        for (const w of watched) {
          const st = w.jobs.latest?.status().state;
          for (const s of JOB_STATES) this.labels(w.name, s).set(st === s ? 1 : 0);
        }
      },
    });
    // Like the request metrics, filled from plain counts at scrape time: in
    // a backup's first seconds nearly every guest write waits, and
    // prom-client's observe() and inc() hash their labels each time (78 ms
    // of nbd-cbw's 2.2 busy seconds in the first 3 s of the cbw benchmark's
    // A(c)).
    const waitSlots = this.cbwWaitSlots;
    new Counter({
      name: 'nbd_cbw_cbw_guest_writes_waited_total',
      help: 'Guest writes, trims and zeroes that had to wait for old data to be saved first',
      labelNames: ['export'],
      registers: r,
      collect() {
        this.reset();
        for (const s of waitSlots.values()) this.inc(s.labels, s.requests);
      },
    });
    new SlotHistogram<'export'>(
      {
        name: 'nbd_cbw_cbw_wait_seconds',
        help: 'Time guest writes spent waiting for their old data to be saved',
        labelNames: ['export'],
        buckets: LATENCY_BUCKETS,
        registers: r,
      },
      () => waitSlots.values(),
    );
    this.cbwFailures = new Counter({
      name: 'nbd_cbw_cbw_failures_total',
      help: 'Copy-before-write saves that failed or timed out (the error policy then applied)',
      labelNames: ['export'],
      registers: r,
    });
    this.bufferFullWaits = new Counter({
      name: 'nbd_cbw_cbw_buffer_full_waits_total',
      help: 'Times a guest write had to wait for room in a full cow buffer',
      labelNames: ['export'],
      registers: r,
    });
    // Read at scrape time too: a job with small runs (--max-chunk 256K) makes
    // 4096 target writes per GiB, and observe() and inc() took 12 us each.
    const targetSlots = this.targetSlots;
    new SlotHistogram<'export'>(
      {
        name: 'nbd_cbw_backup_target_write_duration_seconds',
        help: 'Latency of writes to the backup target',
        labelNames: ['export'],
        buckets: LATENCY_BUCKETS,
        registers: r,
      },
      () => targetSlots.values(),
    );
    new Counter({
      name: 'nbd_cbw_backup_target_written_bytes_total',
      help: 'Bytes written to backup targets, by kind (data or zero)',
      labelNames: ['export', 'kind'],
      registers: r,
      collect() {
        this.reset();
        for (const s of targetSlots.values()) {
          this.inc({ ...s.labels, kind: 'data' }, s.dataBytes);
          this.inc({ ...s.labels, kind: 'zero' }, s.zeroBytes);
        }
      },
    });
    this.targetRetries = new Counter({
      name: 'nbd_cbw_backup_target_retries_total',
      help: 'Target writes retried after a failure',
      labelNames: ['export'],
      registers: r,
    });
    this.backupErrors = new Counter({
      name: 'nbd_cbw_backup_errors_total',
      help: 'Backup errors by kind: target_write, source_read, scan, cbw, job_failed',
      labelNames: ['export', 'kind'],
      registers: r,
    });
    this.jobsStarted = new Counter({
      name: 'nbd_cbw_backup_jobs_started_total',
      help: 'Backup jobs started',
      labelNames: ['export'],
      registers: r,
    });
    this.jobsEnded = new Counter({
      name: 'nbd_cbw_backup_jobs_ended_total',
      help: 'Backup jobs ended, by final state',
      labelNames: ['export', 'state'],
      registers: r,
    });
  }

  private slotFor(exp: string, command: number): OpSlot {
    let slots = this.slotsByExport.get(exp);
    if (!slots) {
      slots = new Array<OpSlot | undefined>(MAX_COMMAND + 2);
      this.slotsByExport.set(exp, slots);
    }
    const i = Number.isInteger(command) && command >= 0 && command <= MAX_COMMAND ? command : MAX_COMMAND + 1;
    let slot = slots[i];
    if (!slot) {
      slot = { ...latencySlot({ export: exp, operation: commandName(i <= MAX_COMMAND ? command : -1) }), bytes: 0 };
      slots[i] = slot;
    }
    return slot;
  }

  /** Every (export, operation) seen; commands that share a name are merged. */
  private *allSlots(): Generator<OpSlot> {
    for (const slots of this.slotsByExport.values()) {
      const byName = new Map<string, OpSlot>();
      for (const s of slots) {
        if (!s) continue;
        const seen = byName.get(s.labels.operation);
        if (!seen) {
          byName.set(s.labels.operation, s);
          continue;
        }
        byName.set(s.labels.operation, {
          labels: s.labels,
          requests: seen.requests + s.requests,
          bytes: seen.bytes + s.bytes,
          seconds: seen.seconds + s.seconds,
          buckets: seen.buckets.map((n, k) => n + s.buckets[k]),
        });
      }
      yield* byName.values();
    }
  }

  /** Hooks for the NBD server. */
  connectionObserver(): ConnectionObserver {
    return {
      requestStarted: (exp: ExportSpec) => {
        this.inFlightByExport.set(exp.name, (this.inFlightByExport.get(exp.name) ?? 0) + 1);
      },
      requestFinished: (exp: ExportSpec, command: number, bytes: number, seconds: number, error: number) => {
        this.inFlightByExport.set(exp.name, (this.inFlightByExport.get(exp.name) ?? 1) - 1);
        const s = this.slotFor(exp.name, command);
        countLatency(s, seconds);
        if (error !== 0) this.errors.labels(exp.name, commandName(command), errorName(error)).inc();
        else if (bytes > 0) s.bytes += bytes;
      },
    };
  }

  /** Read a server's connection counts at scrape time. */
  watchConnections(server: { readonly connectionCounts: ConnectionCounts }): void {
    this.servers.push(server);
  }

  /** Watch an export's cbw filter and its backup jobs. */
  watchExport(exportName: string, filter: CbwFilter, jobs: JobManager): void {
    const waits = this.cbwWaitSlots.get(exportName) ?? latencySlot({ export: exportName });
    this.cbwWaitSlots.set(exportName, waits);
    const failures = this.cbwFailures.labels(exportName);
    // The help of nbd_cbw_backup_errors_total promises kind="cbw": a failed
    // or timed-out copy-before-write is a backup error under either policy
    // (the backup stops, or the guest write is refused to keep it valid).
    const cbwErrors = this.backupErrors.labels(exportName, 'cbw');
    filter.observer = {
      guestWaited: (seconds, ok) => {
        countLatency(waits, seconds);
        if (!ok) {
          failures.inc();
          cbwErrors.inc();
        }
      },
    };
    jobs.on('job', (job: { engine: CopyEngine; on(ev: 'end', f: (state: string) => void): void }) => {
      this.jobsStarted.labels(exportName).inc();
      this.watchEngine(exportName, job.engine);
      job.on('end', (state) => this.jobsEnded.labels(exportName, state).inc());
    });
    this.watched.push({ name: exportName, jobs });
    this.inFlightByExport.set(exportName, this.inFlightByExport.get(exportName) ?? 0);
  }

  private watchEngine(exp: string, engine: CopyEngine): void {
    const writes = this.targetSlots.get(exp) ?? { ...latencySlot({ export: exp }), dataBytes: 0, zeroBytes: 0 };
    this.targetSlots.set(exp, writes);
    engine.on('targetWrite', (bytes: number, s: number, isZero: boolean) => {
      countLatency(writes, s);
      if (isZero) writes.zeroBytes += bytes;
      else writes.dataBytes += bytes;
    });
    engine.on('targetRetry', () => {
      this.targetRetries.labels(exp).inc();
      this.backupErrors.labels(exp, 'target_write').inc();
    });
    engine.on('readError', () => this.backupErrors.labels(exp, 'source_read').inc());
    engine.on('scanError', () => this.backupErrors.labels(exp, 'scan').inc());
    engine.on('bufferFullWait', () => this.bufferFullWaits.labels(exp).inc());
    engine.done.catch(() => {
      if (engine.state === 'failed') this.backupErrors.labels(exp, 'job_failed').inc();
    });
  }

  async render(): Promise<{ contentType: string; body: string }> {
    return { contentType: this.registry.contentType, body: await this.registry.metrics() };
  }
}
