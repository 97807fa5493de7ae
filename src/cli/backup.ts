// `nbd-cbw backup start|status|pause|resume|cancel|wait|set-speed`: drive
// backup jobs of a running `nbd-cbw serve` over its control API.

import fs from 'node:fs';
import type { Command } from 'commander';
import { MAX_WAIT_MS, controlRequest, parseControlAddress, type ControlAddress } from '../control/client';
import type { JobStatus } from '../jobs/job';
import { addBackupOptions, toBackupRequest, type BackupCliOptions } from './backup-options';
import { die, errorMessage } from './log';
import { formatSize, parseSize } from './sizes';
import { terminalProgressBar } from './progress';

interface ControlCliOptions {
  control?: string;
  controlTokenFile?: string;
  json?: boolean;
}

function addControlOptions(cmd: Command): Command {
  return cmd
    .option('--control <ADDR>', 'control API of the nbd-cbw serving the disk (default: $NBD_CBW_CONTROL)')
    .option('--control-token-file <FILE>', 'bearer token for a TCP control API');
}

function connection(o: ControlCliOptions): { addr: ControlAddress; token?: string } {
  const text = o.control ?? process.env.NBD_CBW_CONTROL;
  if (!text) die('no control address: pass --control ADDR or set NBD_CBW_CONTROL (it is set for --run commands)');
  try {
    const token = o.controlTokenFile ? fs.readFileSync(o.controlTokenFile, 'utf8').trim() : undefined;
    return { addr: parseControlAddress(text), token };
  } catch (e) {
    die(errorMessage(e));
  }
}

async function call(o: ControlCliOptions, method: string, path: string, body?: unknown): Promise<JobStatus> {
  const { addr, token } = connection(o);
  let r;
  try {
    r = await controlRequest(addr, method, path, body, token);
  } catch (e) {
    die(errorMessage(e));
  }
  if (r.status >= 400) {
    const msg = (r.body as { error?: string })?.error ?? JSON.stringify(r.body);
    die(msg);
  }
  return r.body as JobStatus;
}

function jobPath(job: string | undefined, action = ''): string {
  return `/v1/jobs/${encodeURIComponent(job ?? 'current')}${action ? `/${action}` : ''}`;
}

export function describeStatus(s: JobStatus): string {
  const pct = s.bytesTotal > 0 ? ((100 * s.bytesDone) / s.bytesTotal).toFixed(1) : '100.0';
  const lines = [
    `job ${s.id}: ${s.state}${s.error && s.error !== s.state ? ` (${s.error})` : ''}`,
    `  target:   ${s.target}`,
    `  progress: ${formatSize(s.bytesDone)} of ${formatSize(s.bytesTotal)} (${pct}%), ` +
      `${formatSize(s.bytesCopied)} copied, ${formatSize(s.bytesSkipped)} skipped as zero`,
    `  buffer:   ${formatSize(s.bufferBytes)} of ${formatSize(s.bufferCapacity)} (peak ${formatSize(s.bufferHighWater)})` +
      (s.spillBytes ? `, spill ${formatSize(s.spillBytes)}` : ''),
    `  rate:     ${formatSize(s.rate)}/s${s.etaSeconds !== null ? `, ETA ${s.etaSeconds}s` : ''}` +
      (s.speedLimit ? `, limit ${formatSize(s.speedLimit)}/s` : ''),
  ];
  return lines.join('\n');
}

const TERMINAL = new Set(['completed', 'failed', 'cancelled']);

export function registerBackup(program: Command): void {
  const backup = program
    .command('backup')
    .summary('start and control backup jobs on a running nbd-cbw serve')
    .description(
      'Start and control backup jobs. The control address comes from --control or the\n' +
        'NBD_CBW_CONTROL environment variable (set for `serve --run` commands). JOB is a\n' +
        'job id; by default the export\'s current or latest job.',
    );

  const start = backup
    .command('start')
    .description('start a backup: the target ends up holding the disk exactly as it is now')
    .requiredOption(
      '-t, --target <TARGET>',
      'file:PATH (a file, created sparse if new, or a block device), nbd[s]://HOST[:PORT]/EXPORT, ' +
        'nbd[s]+unix:///EXPORT?socket=PATH, or a chunk store: dir:PATH or s3://BUCKET/PREFIX; ' +
        'relative paths are resolved here; the disk itself (its file, nbd-cbw\'s export, an NBD source\'s) is refused',
    )
    .option('--json', 'print the job as JSON (with --wait: a JSON line per update, as `backup wait --json`)')
    .option('-w, --wait', 'then wait for the job to end, as `backup wait` does: progress, exit status 0 only if it completed')
    .option('--interval <MS>', 'with --wait: progress update interval in milliseconds', '1000');
  addBackupOptions(start);
  addControlOptions(start);
  start.action(async (o: BackupCliOptions & ControlCliOptions & { target: string; wait?: boolean; interval: string }) => {
    let req;
    try {
      req = toBackupRequest(o.target, o);
    } catch (e) {
      die(errorMessage(e));
    }
    const s = await call(o, 'POST', '/v1/jobs', req);
    if (!o.wait) {
      console.log(o.json ? JSON.stringify(s) : `started backup job ${s.id} to ${s.target}`);
      return;
    }
    if (!o.json) console.error(`started backup job ${s.id} to ${s.target}`);
    await follow(o, s, o.interval);
  });

  const status = backup.command('status [JOB]').description('show a job').option('--json', 'print one JSON object');
  addControlOptions(status);
  status.action(async (job: string | undefined, o: ControlCliOptions) => {
    const s = await call(o, 'GET', jobPath(job));
    console.log(o.json ? JSON.stringify(s) : describeStatus(s));
  });

  for (const [name, text] of [
    ['pause', 'pause the background copy (guest writes are still protected)'],
    ['resume', 'resume a paused job'],
    ['cancel', 'cancel a job; the target is left incomplete'],
  ] as const) {
    const c = backup.command(`${name} [JOB]`).description(text).option('--json', 'print the job as JSON');
    addControlOptions(c);
    c.action(async (job: string | undefined, o: ControlCliOptions) => {
      const s = await call(o, 'POST', jobPath(job, name));
      console.log(o.json ? JSON.stringify(s) : `job ${s.id}: ${s.state}`);
    });
  }

  const speed = backup
    .command('set-speed <SPEED> [JOB]')
    .description('limit the background copy to SPEED bytes/s (K, M, G suffixes); 0 = unlimited')
    .option('--json', 'print the job as JSON');
  addControlOptions(speed);
  speed.action(async (text: string, job: string | undefined, o: ControlCliOptions) => {
    let bytesPerSecond;
    try {
      bytesPerSecond = parseSize(text, 'speed');
    } catch (e) {
      die(errorMessage(e));
    }
    const s = await call(o, 'POST', jobPath(job, 'speed'), { bytesPerSecond });
    console.log(o.json ? JSON.stringify(s) : `job ${s.id}: speed limit ${bytesPerSecond ? `${formatSize(bytesPerSecond)}/s` : 'none'}`);
  });

  const wait = backup
    .command('wait [JOB]')
    .description('wait for a job to end, with a progress bar on a terminal; exits 0 only if it completed')
    .option('--json', 'print a JSON line per second instead of a progress bar')
    .option('--interval <MS>', 'progress update interval in milliseconds (the end is reported at once)', '1000');
  addControlOptions(wait);
  wait.action(async (job: string | undefined, o: ControlCliOptions & { interval: string }) => {
    await follow(o, await call(o, 'GET', jobPath(job)), o.interval);
  });
}

/**
 * Show `first`'s job until it ends (JSON lines or a progress bar on a
 * terminal), then exit: 0 only if it completed.
 */
async function follow(o: ControlCliOptions, first: JobStatus, intervalText: string): Promise<never> {
  const id = first.id; // follow this job even if another starts later
  const interval = Math.max(50, Number(intervalText) || 1000);
  // Payload keys must not be cli-progress's own ({total} is its raw total).
  const bar = o.json
    ? null
    : terminalProgressBar('backup |{bar}| {percentage}% {doneSize}/{totalSize} {rateSize}/s ETA {eta_formatted} buffer {bufferSize}');
  const sizes = (st: JobStatus) => ({
    doneSize: formatSize(st.bytesDone),
    totalSize: formatSize(st.bytesTotal),
    rateSize: formatSize(st.rate),
    bufferSize: formatSize(st.bufferBytes),
  });
  bar?.start(first.bytesTotal, first.bytesDone, sizes(first));
  let s = first;
  for (;;) {
    if (o.json) console.log(JSON.stringify(s));
    bar?.update(s.bytesDone, sizes(s));
    if (TERMINAL.has(s.state)) break;
    // The server holds the request until the job ends or `interval`
    // passes: the end is seen at once, progress every interval.
    s = await call(o, 'GET', `${jobPath(id)}?wait=${Math.min(interval, MAX_WAIT_MS)}`);
  }
  bar?.stop();
  if (!o.json) console.error(describeStatus(s));
  process.exit(s.state === 'completed' ? 0 : 1);
}
