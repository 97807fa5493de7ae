// Helpers for tests that start REAL processes: nbd-cbw itself, qemu-nbd,
// nbdkit, and one-shot tools (qemu-io, qemu-img, nbdinfo, nbdcopy, fio).
//
// Rules these helpers keep, so that tests built on them do too:
// - every spawned process is registered with the test (t.teardown) and also
//   with a process-exit safety net, so it is killed even when the test fails,
//   throws or times out;
// - every wait is bounded (a timeout that fails loudly, never a hang);
// - traffic stays on unix sockets inside a per-test temporary directory.
//
// Teardowns run last-in first-out, so start servers before their clients
// (nbdkit, then nbd-cbw in front of it): clients are stopped first, which
// nbdkit needs (1.32 does not exit on SIGTERM while a client is connected).

import { execFileSync, spawn, type ChildProcess, type SpawnOptions } from 'node:child_process';
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import type { Test } from 'tap';

export const KiB = 1024;
export const MiB = 1024 * KiB;
export const GiB = 1024 * MiB;

/** Repository root (test/helpers/../..). */
export const REPO_ROOT = path.resolve(__dirname, '..', '..');
/** The CLI under test; it runs the compiled dist/ (npm run build). */
export const NBD_CBW_BIN = path.join(REPO_ROOT, 'bin', 'nbd-cbw');

// ------------------------------------------------------------ safety net

const live = new Set<ChildProcess>();
const liveDirs = new Set<string>();
let safetyNetInstalled = false;

/** Kill every child we started and remove our temporary directories (synchronous). */
function emergencyCleanup(): void {
  for (const c of live) {
    try {
      c.kill('SIGKILL');
    } catch {
      // already gone
    }
  }
  for (const d of liveDirs) {
    try {
      fs.rmSync(d, { recursive: true, force: true });
    } catch {
      // best effort
    }
  }
}

function installSafetyNet(): void {
  if (safetyNetInstalled) return;
  safetyNetInstalled = true;
  // Last resort when the test process ends without running teardowns (an
  // uncaught exception, or tap's timeout SIGTERM): no child may outlive us
  // (qemu-nbd has no --exit-with-parent). signal-exit, which tap itself
  // uses, also catches the signals without changing how the process dies.
  process.on('exit', emergencyCleanup);
  try {
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    const se = require('signal-exit') as { onExit?: (cb: () => void) => unknown };
    se.onExit?.(emergencyCleanup);
  } catch {
    // not installed: the 'exit' hook alone
  }
}

function track(child: ChildProcess): void {
  installSafetyNet();
  live.add(child);
  child.once('exit', () => live.delete(child));
}

function hasExited(child: ChildProcess): boolean {
  return child.exitCode !== null || child.signalCode !== null;
}

/** Resolves when the child has exited, or after `ms` (then false). */
function waitExit(child: ChildProcess, ms: number): Promise<boolean> {
  if (hasExited(child)) return Promise.resolve(true);
  return new Promise((resolve) => {
    const timer = setTimeout(() => {
      child.off('exit', onExit);
      resolve(false);
    }, ms);
    const onExit = () => {
      clearTimeout(timer);
      resolve(true);
    };
    child.once('exit', onExit);
  });
}

/** SIGTERM (or `signal`), then SIGKILL after `graceMs`; resolves once the child is gone (bounded). */
export async function killProcess(child: ChildProcess, graceMs = 5000, signal: NodeJS.Signals = 'SIGTERM'): Promise<void> {
  if (hasExited(child)) return;
  try {
    child.kill(signal);
  } catch {
    // already gone
  }
  if (await waitExit(child, graceMs)) return;
  try {
    child.kill('SIGKILL');
  } catch {
    // already gone
  }
  if (!(await waitExit(child, 5000))) {
    throw new Error(`process ${child.pid} (${child.spawnfile}) did not die after SIGKILL`);
  }
}

// ---------------------------------------------------------------- waiting

export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/**
 * Poll `check` until it returns a truthy value (returned) or `timeoutMs`
 * passes (throws, naming `what`). `check` may be async; a throw counts as "not yet".
 */
export async function waitFor<T>(
  check: () => T | Promise<T>,
  opts: { timeoutMs?: number; intervalMs?: number; what?: string; abort?: () => string | null } = {},
): Promise<NonNullable<T>> {
  const timeoutMs = opts.timeoutMs ?? 10_000;
  const deadline = Date.now() + timeoutMs;
  let lastError: unknown;
  for (;;) {
    const reason = opts.abort?.();
    if (reason) throw new Error(`${opts.what ?? 'condition'}: gave up: ${reason}`);
    try {
      const v = await check();
      if (v) return v as NonNullable<T>;
    } catch (e) {
      lastError = e;
    }
    if (Date.now() >= deadline) {
      const last = lastError instanceof Error ? ` (last error: ${lastError.message})` : '';
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${opts.what ?? 'condition'}${last}`);
    }
    await sleep(opts.intervalMs ?? 50);
  }
}

/**
 * Connect to a unix socket and wait for the NBD greeting magic ("NBDMAGIC"):
 * true when a server is really answering there. Bounded by `timeoutMs`.
 */
export function probeNbd(socketPath: string, timeoutMs = 1000): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.createConnection({ path: socketPath });
    let got = Buffer.alloc(0);
    const done = (ok: boolean) => {
      clearTimeout(timer);
      s.destroy();
      resolve(ok);
    };
    const timer = setTimeout(() => done(false), timeoutMs);
    s.on('data', (d: Buffer) => {
      got = Buffer.concat([got, d]);
      if (got.length >= 8) done(got.subarray(0, 8).toString('latin1') === 'NBDMAGIC');
    });
    s.on('error', () => done(false));
    s.on('close', () => done(false));
  });
}

// ------------------------------------------------------- temporary dirs

const tmpDirs = new WeakMap<Test, string>();

/**
 * A fresh directory for this test, removed in t.teardown (after the
 * processes started later in the test, as teardowns run last-in first-out).
 * Short paths: unix socket paths are limited to 107 bytes. Repeated calls
 * with the same `t` return the same directory.
 */
export function tmpDir(t: Test): string {
  const existing = tmpDirs.get(t);
  if (existing) return existing;
  installSafetyNet();
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nbd-cbw-t-'));
  tmpDirs.set(t, dir);
  liveDirs.add(dir);
  t.teardown(() => {
    fs.rmSync(dir, { recursive: true, force: true });
    liveDirs.delete(dir);
  });
  return dir;
}

let uniqueCounter = 0;
/** A path in the test's tmp dir that nothing has used yet: `prefix-N.ext`. */
/**
 * Whether this machine can make loop devices (root, losetup, the loop
 * driver): tests of block devices use them, and say why they skip without.
 */
export function canUseLoopDevices(): boolean {
  if (process.getuid?.() !== 0) return false;
  try {
    execFileSync('losetup', ['--version'], { stdio: 'ignore' });
    return fs.existsSync('/dev/loop-control');
  } catch {
    return false;
  }
}

/** Open descriptors of this process on spill files in `dir` (unlinked at once, so "(deleted)"). */
export function openSpillFiles(dir: string): string[] {
  const out: string[] = [];
  for (const fd of fs.readdirSync('/proc/self/fd')) {
    try {
      const to = fs.readlinkSync(`/proc/self/fd/${fd}`);
      if (to.startsWith(path.join(dir, 'nbd-cbw-spill-'))) out.push(to);
    } catch {
      // closed meanwhile (the readdir's own descriptor)
    }
  }
  return out;
}

export function tmpPath(t: Test, prefix: string, ext = ''): string {
  return path.join(tmpDir(t), `${prefix}-${++uniqueCounter}${ext}`);
}

export function nbdUnixUri(socketPath: string, exportName = ''): string {
  return `nbd+unix:///${encodeURIComponent(exportName)}?socket=${socketPath}`;
}

// ---------------------------------------------------------- one-shot runs

export interface RunResult {
  /** Exit status; null when killed by a signal (see `signal`). 127 when it could not be started. */
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
  timedOut: boolean;
  /** For messages: the command line and its output. */
  describe(): string;
}

export interface RunOptions {
  /** Hard limit: SIGTERM at the limit, SIGKILL 2 s later. Default 60 s. */
  timeoutMs?: number;
  input?: string | Buffer;
  env?: NodeJS.ProcessEnv;
  cwd?: string;
}

/** Run a command to completion with a hard timeout; never rejects. */
export function run(cmd: string, args: readonly string[], opts: RunOptions = {}): Promise<RunResult> {
  const timeoutMs = opts.timeoutMs ?? 60_000;
  const started = Date.now();
  return new Promise((resolve) => {
    let child: ChildProcess;
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    let timedOut = false;
    let settled = false;
    const finish = (code: number | null, signal: NodeJS.Signals | null, extraErr = '') => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      clearTimeout(killTimer);
      clearTimeout(exitTimer);
      const stdout = Buffer.concat(out).toString('utf8');
      const stderr = Buffer.concat(err).toString('utf8') + extraErr;
      const line = [cmd, ...args].map(shellQuote).join(' ');
      resolve({
        code,
        signal,
        stdout,
        stderr,
        timedOut,
        describe: () =>
          `$ ${line}\n=> ${timedOut ? `TIMED OUT after ${timeoutMs} ms, ` : ''}code=${code} signal=${signal} ` +
          `(${Date.now() - started} ms)\n--- stdout ---\n${tail(stdout)}\n--- stderr ---\n${tail(stderr)}`,
      });
    };
    let killTimer: NodeJS.Timeout | undefined;
    let exitTimer: NodeJS.Timeout | undefined;
    const timer = setTimeout(() => {
      timedOut = true;
      child.kill('SIGTERM');
      killTimer = setTimeout(() => child.kill('SIGKILL'), 2000);
    }, timeoutMs);
    try {
      child = spawn(cmd, args as string[], {
        cwd: opts.cwd,
        env: opts.env ?? process.env,
        stdio: [opts.input !== undefined ? 'pipe' : 'ignore', 'pipe', 'pipe'],
      });
    } catch (e) {
      finish(127, null, `spawn failed: ${(e as Error).message}`);
      return;
    }
    track(child);
    child.stdout?.on('data', (d: Buffer) => out.push(d));
    child.stderr?.on('data', (d: Buffer) => err.push(d));
    child.on('error', (e) => finish(127, null, `\nspawn ${cmd} failed: ${e.message}`));
    child.on('close', (code, signal) => finish(code, signal));
    // 'close' waits for stdout/stderr to close, which a grandchild holding
    // them could delay forever: settle shortly after the exit regardless.
    child.on('exit', (code, signal) => {
      exitTimer = setTimeout(() => {
        child.stdout?.destroy();
        child.stderr?.destroy();
        finish(code, signal);
      }, 2000);
    });
    if (opts.input !== undefined) {
      child.stdin?.on('error', () => undefined);
      child.stdin?.end(opts.input);
    }
  });
}

function tail(s: string, max = 4000): string {
  return s.length <= max ? s : `...${s.slice(-max)}`;
}

export function shellQuote(s: string): string {
  return /^[\w@%+=:,./-]+$/.test(s) ? s : `'${s.replace(/'/g, `'\\''`)}'`;
}

// ------------------------------------------------------ long-running peers

export interface Peer {
  readonly name: string;
  readonly proc: ChildProcess;
  readonly pid: number;
  /** Unix socket the peer listens on. */
  readonly socket: string;
  readonly exportName: string;
  /** nbd+unix URI of the export. */
  readonly uri: string;
  /** Everything the peer wrote to stdout and stderr so far (bounded). */
  output(): string;
  /** True while the process runs. */
  running(): boolean;
  /**
   * Stop it (SIGTERM, SIGKILL after the grace period) and resolve with how
   * it ended. Idempotent; also done automatically at teardown.
   */
  stop(signal?: NodeJS.Signals): Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
}

export interface PeerOptions {
  /** Unix socket path; default a fresh one in the test's tmp dir. */
  socket?: string;
  /** How long to wait for the peer to accept connections. Default 20 s. */
  readyTimeoutMs?: number;
  /** SIGTERM grace period before SIGKILL at stop/teardown. */
  graceMs?: number;
  env?: NodeJS.ProcessEnv;
  /**
   * Fail the test if the process exits with a non-zero status (or a signal)
   * before stop() or teardown. Default true.
   */
  failOnUnexpectedExit?: boolean;
}

const MAX_OUTPUT = 256 * KiB;

interface SpawnPeerSpec {
  name: string;
  cmd: string;
  args: string[];
  socket: string;
  exportName: string;
  pidfile?: string;
  spawnOptions?: SpawnOptions;
}

async function spawnPeer(t: Test, spec: SpawnPeerSpec, opts: PeerOptions, defaultGraceMs: number): Promise<Peer> {
  const graceMs = opts.graceMs ?? defaultGraceMs;
  const failOnExit = opts.failOnUnexpectedExit ?? true;
  let output = '';
  const child = spawn(spec.cmd, spec.args, {
    env: opts.env ?? process.env,
    stdio: ['ignore', 'pipe', 'pipe'],
    ...spec.spawnOptions,
  });
  track(child);
  const append = (d: Buffer) => {
    output += d.toString('utf8');
    if (output.length > MAX_OUTPUT) output = output.slice(-MAX_OUTPUT / 2);
  };
  child.stdout?.on('data', append);
  child.stderr?.on('data', append);
  let spawnError: Error | null = null;
  child.on('error', (e) => {
    spawnError = e;
  });

  let starting = true;
  let stopping = false;
  let testOver = false;
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => {
    child.on('exit', (code, signal) => resolve({ code, signal }));
    child.on('error', () => resolve({ code: 127, signal: null }));
  });
  const cmdline = [spec.cmd, ...spec.args].map(shellQuote).join(' ');
  child.on('exit', (code, signal) => {
    // While starting, the failed start rejects with the details instead.
    if (starting || stopping || testOver || !failOnExit) return;
    if (code === 0) {
      t.comment(`${spec.name} (pid ${child.pid}) exited by itself with status 0`);
      return;
    }
    t.fail(`${spec.name} exited unexpectedly: code=${code} signal=${signal}`, {
      command: cmdline,
      output: tail(output),
    });
  });

  const stop = async (signal: NodeJS.Signals = 'SIGTERM') => {
    stopping = true;
    if (!hasExited(child) && child.pid !== undefined) await killProcess(child, graceMs, signal);
    return exited;
  };
  t.teardown(async () => {
    // Show what the peer said when the test failed: the first place to look.
    if (!t.passing()) t.comment(`${spec.name} output:\n${tail(output)}`);
    await stop();
    testOver = true;
  });

  const peer: Peer = {
    name: spec.name,
    proc: child,
    get pid() {
      return child.pid ?? -1;
    },
    socket: spec.socket,
    exportName: spec.exportName,
    uri: nbdUnixUri(spec.socket, spec.exportName),
    output: () => output,
    running: () => !hasExited(child),
    stop,
  };

  await waitFor(
    async () => {
      if (spec.pidfile && !fs.existsSync(spec.pidfile)) return false;
      if (!fs.existsSync(spec.socket)) return false;
      return probeNbd(spec.socket);
    },
    {
      timeoutMs: opts.readyTimeoutMs ?? 20_000,
      intervalMs: 25,
      what: `${spec.name} to accept on ${spec.socket}`,
      abort: () => {
        if (spawnError) return `cannot start ${spec.cmd}: ${(spawnError as Error).message}`;
        if (hasExited(child)) {
          return `${spec.name} exited (code=${child.exitCode} signal=${child.signalCode}) before accepting\n$ ${cmdline}\n${tail(output)}`;
        }
        return null;
      },
    },
  ).catch(async (e: Error) => {
    stopping = true;
    await stop();
    throw e;
  });
  starting = false;
  return peer;
}

export interface NbdCbwPeer extends Peer {
  /** The control API socket: --control if given, else nbd-cbw's default SOCKET.ctl. */
  readonly controlSocket: string;
}

export interface NbdCbwOptions extends PeerOptions {
  /** Extra arguments for node itself (e.g. --cpu-prof). */
  nodeArgs?: string[];
  /** Pass --exit-with-parent (default true: a crashed test leaves no server behind). */
  exitWithParent?: boolean;
}

/**
 * `bin/nbd-cbw serve ARGS -f -U SOCKET -P PIDFILE`, resolved once it
 * accepts NBD connections. ARGS are the serve options under test (e.g.
 * ['--source', 'file:/x.img', '-r']); -e in ARGS sets the export name in the
 * returned URI (default "disk"). Killed at teardown: SIGTERM, SIGKILL after 5 s.
 */
export async function startNbdCbw(t: Test, args: string[], opts: NbdCbwOptions = {}): Promise<NbdCbwPeer> {
  if (!fs.existsSync(path.join(REPO_ROOT, 'dist', 'cli', 'main.js'))) {
    throw new Error('dist/cli/main.js is missing: run `npm run build` first');
  }
  const socket = opts.socket ?? tmpPath(t, 'cbw', '.sock');
  const pidfile = tmpPath(t, 'cbw', '.pid');
  let exportName = 'disk';
  let controlSocket = `${socket}.ctl`;
  for (let i = 0; i < args.length; i++) {
    if ((args[i] === '-e' || args[i] === '--export-name') && i + 1 < args.length) exportName = args[i + 1];
    else if (args[i].startsWith('--export-name=')) exportName = args[i].slice('--export-name='.length);
    else if (args[i] === '--control' && i + 1 < args.length) controlSocket = args[i + 1];
    else if (args[i].startsWith('--control=')) controlSocket = args[i].slice('--control='.length);
  }
  // Run the launcher itself (as users do), so the server gets its tuned V8
  // options; extra node options travel in NBD_CBW_NODE_ARGS.
  const full = [
    'serve',
    ...args,
    '-f',
    '-U',
    socket,
    '-P',
    pidfile,
    ...(opts.exitWithParent === false ? [] : ['--exit-with-parent']),
  ];
  const peer = await spawnPeer(
    t,
    { name: 'nbd-cbw', cmd: NBD_CBW_BIN, args: full, socket, exportName, pidfile, spawnOptions: { cwd: REPO_ROOT } },
    opts.nodeArgs ? { ...opts, env: { ...(opts.env ?? process.env), NBD_CBW_NODE_ARGS: opts.nodeArgs.join(' ') } } : opts,
    5000,
  );
  return Object.assign(peer, { controlSocket });
}

export interface QemuNbdOptions extends PeerOptions {
  /** Export name (-x); default "disk". */
  name?: string;
  /** Clients allowed at once (-e); default 8 (qemu-nbd's own default, 1, would block a second client). */
  shared?: number;
  readOnly?: boolean;
  /** --discard mode; default "unmap" so TRIM punches holes in the file. */
  discard?: 'ignore' | 'unmap';
  format?: string;
  extraArgs?: string[];
}

/**
 * `qemu-nbd -f raw -t -x NAME -k SOCKET -e N IMAGE` in the foreground,
 * resolved once it accepts. Killed at teardown (SIGTERM, SIGKILL after 5 s).
 */
export async function startQemuNbd(t: Test, image: string, opts: QemuNbdOptions = {}): Promise<Peer> {
  const socket = opts.socket ?? tmpPath(t, 'qemu-nbd', '.sock');
  const name = opts.name ?? 'disk';
  const args = [
    '-f',
    opts.format ?? 'raw',
    '-t',
    '-x',
    name,
    '-k',
    socket,
    '-e',
    String(opts.shared ?? 8),
    `--discard=${opts.discard ?? 'unmap'}`,
    ...(opts.readOnly ? ['-r'] : []),
    ...(opts.extraArgs ?? []),
    image,
  ];
  return spawnPeer(t, { name: 'qemu-nbd', cmd: 'qemu-nbd', args, socket, exportName: name }, opts, 5000);
}

export interface NbdkitOptions extends PeerOptions {
  /** Export name clients should ask for (nbdkit serves any name); default "". */
  exportName?: string;
}

/**
 * `nbdkit -f -U SOCKET -P PIDFILE --exit-with-parent ARGS`, e.g. ARGS =
 * ['memory', '64M'] or ['--filter=nozero', 'memory', '64M']. nbdkit 1.32
 * ignores SIGTERM while a client is connected, so stop clients first (start
 * nbdkit before them); after a 3 s grace it is SIGKILLed.
 */
export async function startNbdkit(t: Test, args: string[], opts: NbdkitOptions = {}): Promise<Peer> {
  const socket = opts.socket ?? tmpPath(t, 'nbdkit', '.sock');
  const pidfile = tmpPath(t, 'nbdkit', '.pid');
  const full = ['-f', '-U', socket, '-P', pidfile, '--exit-with-parent', ...args];
  return spawnPeer(
    t,
    { name: 'nbdkit', cmd: 'nbdkit', args: full, socket, exportName: opts.exportName ?? '', pidfile },
    opts,
    3000,
  );
}

// ------------------------------------------------------------ data, images

/** mulberry32: a tiny, fast, seeded 32-bit PRNG. Returns a function giving uint32s. */
export function mulberry32(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let x = a;
    x = Math.imul(x ^ (x >>> 15), x | 1);
    x ^= x + Math.imul(x ^ (x >>> 7), x | 61);
    return (x ^ (x >>> 14)) >>> 0;
  };
}

/** Fill `buf` with the seeded stream (same seed -> same bytes). Returns `buf`. */
export function fillRandom(buf: Buffer, seedOrRng: number | (() => number)): Buffer {
  const next = typeof seedOrRng === 'number' ? mulberry32(seedOrRng) : seedOrRng;
  const words = Math.floor(buf.length / 4);
  if (buf.byteOffset % 4 === 0) {
    const u32 = new Uint32Array(buf.buffer, buf.byteOffset, words);
    for (let i = 0; i < words; i++) u32[i] = next();
  } else {
    for (let i = 0; i < words; i++) buf.writeUInt32LE(next(), i * 4);
  }
  for (let i = words * 4; i < buf.length; i++) buf[i] = next() & 0xff;
  return buf;
}

export function randomBuffer(length: number, seed: number): Buffer {
  return fillRandom(Buffer.alloc(length), seed);
}

/**
 * Pattern fill: every 8-byte word holds (its own byte offset + seed) as a
 * big-endian u64, so misplaced data shows where it came from. `base` is the
 * offset of buf[0] in the image (must be a multiple of 8).
 */
export function fillPattern(buf: Buffer, base: number, seed = 0): Buffer {
  const words = Math.floor(buf.length / 8);
  for (let i = 0; i < words; i++) buf.writeBigUInt64BE(BigInt(base + i * 8 + seed), i * 8);
  for (let i = words * 8; i < buf.length; i++) buf[i] = 0xa5;
  return buf;
}

export type ImageFill = 'zero' | 'random' | 'pattern';

/**
 * Create (or replace) a raw image of `size` bytes. 'zero' is fully sparse;
 * 'random' (seeded, deterministic) and 'pattern' are fully written.
 */
export function makeImage(file: string, size: number, fill: ImageFill = 'zero', seed = 1): void {
  fs.rmSync(file, { force: true });
  const fd = fs.openSync(file, 'w');
  try {
    fs.ftruncateSync(fd, size);
    if (fill === 'zero') return;
    const chunk = Buffer.alloc(Math.min(size, 4 * MiB));
    const rng = mulberry32(seed);
    for (let off = 0; off < size; off += chunk.length) {
      const n = Math.min(chunk.length, size - off);
      const part = chunk.subarray(0, n);
      if (fill === 'random') fillRandom(part, rng);
      else fillPattern(part, off, seed);
      let done = 0;
      while (done < n) done += fs.writeSync(fd, part, done, n - done, off + done);
    }
  } finally {
    fs.closeSync(fd);
  }
}

/** Write `data` into an existing file at `offset` (no truncation). */
export function writeAt(file: string, offset: number, data: Buffer): void {
  const fd = fs.openSync(file, 'r+');
  try {
    let done = 0;
    while (done < data.length) done += fs.writeSync(fd, data, done, data.length - done, offset + done);
  } finally {
    fs.closeSync(fd);
  }
}

/** Read `length` bytes at `offset` straight from a file (short at EOF). */
export function readAt(file: string, offset: number, length: number): Buffer {
  const fd = fs.openSync(file, 'r');
  try {
    const b = Buffer.alloc(length);
    let done = 0;
    while (done < length) {
      const n = fs.readSync(fd, b, done, length - done, offset + done);
      if (n === 0) break;
      done += n;
    }
    return b.subarray(0, done);
  } finally {
    fs.closeSync(fd);
  }
}

export function sha256File(file: string): string {
  const h = createHash('sha256');
  const fd = fs.openSync(file, 'r');
  try {
    const b = Buffer.alloc(4 * MiB);
    for (;;) {
      const n = fs.readSync(fd, b, 0, b.length, null);
      if (n === 0) break;
      h.update(b.subarray(0, n));
    }
  } finally {
    fs.closeSync(fd);
  }
  return h.digest('hex');
}

/**
 * Compare two files byte by byte; null when identical, else a description
 * of the first difference (offset, or the sizes).
 */
export function firstDifference(a: string, b: string): string | null {
  const sa = fs.statSync(a).size;
  const sb = fs.statSync(b).size;
  if (sa !== sb) return `sizes differ: ${a} is ${sa} bytes, ${b} is ${sb}`;
  const fa = fs.openSync(a, 'r');
  const fb = fs.openSync(b, 'r');
  try {
    const ba = Buffer.alloc(4 * MiB);
    const bb = Buffer.alloc(4 * MiB);
    for (let off = 0; off < sa; off += ba.length) {
      const n = Math.min(ba.length, sa - off);
      const na = fs.readSync(fa, ba, 0, n, off);
      const nb = fs.readSync(fb, bb, 0, n, off);
      if (na !== n || nb !== n) return `short read at ${off}`;
      if (!ba.subarray(0, n).equals(bb.subarray(0, n))) {
        for (let i = 0; i < n; i++) if (ba[i] !== bb[i]) return `first difference at byte ${off + i}`;
      }
    }
    return null;
  } finally {
    fs.closeSync(fa);
    fs.closeSync(fb);
  }
}
