// `nbd-cbw serve` when it runs: listen, open the source, the control API,
// metrics, the captive command. Loaded only by the commands that serve.

import fs from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { loadServerContext } from '../tls/credentials';
import type { ConnectionObserver, ExportSpec, ServerTls } from '../server/connection';
import { NbdServer, type ListenAddress } from '../server/server';
import { Metrics } from '../metrics/metrics';
import { openDevice } from '../device/open';
import type { BlockDevice } from '../device/types';
import { formatNbdUri } from '../client/uri';
import { backgroundSelf, exitWithParent, runCaptive, signalReady, writePidFile } from './daemon';
import { debug, die, errorMessage, info, setVerbose } from './log';
import { formatSize } from './sizes';
import { CbwFilter } from '../cbw/filter';
import { JobManager, validateRequest, type BackupJob, type BackupRequest } from '../jobs/job';
import { ControlServer } from '../control/server';
import { formatControlAddress, parseControlAddress, type ControlAddress } from '../control/client';
import { validateTargetSpec } from '../targets/spec';
import { parseDuration, toBackupRequest } from './backup-options';
import type { ListenOptions, ServeOptions } from './serve';

export interface RunningServer {
  server: NbdServer;
  uri: string;
  address: ListenAddress;
}

/**
 * Listen, write the pidfile, then either run the captive command or wait
 * for a signal. `onStarted` runs once accepting (for --backup-to and the
 * control API); `cleanup` runs at exit.
 */
export async function runServer(
  opts: ListenOptions,
  exportSpec: ExportSpec,
  hooks: {
    onStarted?: (r: RunningServer) => Promise<Record<string, string> | void>;
    cleanup?: () => Promise<void>;
    observer?: ConnectionObserver;
    /** The server, before it listens (for the metrics). */
    onServer?: (server: NbdServer) => void;
  } = {},
): Promise<never> {
  setVerbose(!!opts.verbose);
  const captive = opts.run !== undefined;
  let privateDir: string | null = null;
  const address: ListenAddress = {};
  if (opts.unix === '-') {
    privateDir = fs.mkdtempSync(path.join(os.tmpdir(), 'nbd-cbw-'));
    address.socketPath = path.join(privateDir, 'socket');
  } else if (opts.unix) {
    address.socketPath = path.resolve(opts.unix);
  } else {
    address.port = opts.port !== undefined ? parsePort(opts.port) : 10809;
    address.host = opts.ipaddr ?? '0.0.0.0';
  }
  let tlsConfig: ServerTls | undefined;
  const mode = (opts.tls ?? 'off') as ServerTls['mode'];
  if (mode !== 'off') {
    if (!opts.tlsCertificates) die(`--tls=${mode} needs --tls-certificates DIR`);
    try {
      tlsConfig = { mode, context: loadServerContext(opts.tlsCertificates, !!opts.tlsVerifyPeer), verifyPeer: !!opts.tlsVerifyPeer };
    } catch (e) {
      die(errorMessage(e));
    }
  }
  let handshakeTimeoutMs = 10_000;
  try {
    handshakeTimeoutMs = parseDuration(opts.handshakeTimeout ?? '10s');
  } catch (e) {
    die(`--handshake-timeout: ${errorMessage(e)}`);
  }
  const server = new NbdServer({
    exports: [exportSpec],
    tls: tlsConfig,
    maxConnections: Number(opts.maxConnections ?? 256),
    handshakeTimeoutMs,
    observer: hooks.observer,
    log: opts.verbose ? (m) => debug(m) : undefined,
    notice: (m) => info(m),
  });
  hooks.onServer?.(server);
  let bound;
  try {
    bound = await server.listen(address);
  } catch (e) {
    const where = address.socketPath ?? `${address.host}:${address.port}`;
    die(`cannot listen on ${where}: ${errorMessage(e)}`);
  }
  if (typeof bound !== 'string') address.port = bound.port;
  const uri = formatNbdUri({
    socketPath: address.socketPath,
    host: address.host === '0.0.0.0' || address.host === '::' ? 'localhost' : address.host,
    port: address.port,
    exportName: exportSpec.name,
  });

  let exiting = false;
  const shutdown = async (code: number) => {
    if (exiting) return;
    exiting = true;
    await server.close();
    await hooks.cleanup?.().catch((e) => info(`cleanup: ${errorMessage(e)}`));
    await exportSpec.device.close().catch(() => undefined);
    if (address.socketPath) fs.rmSync(address.socketPath, { force: true });
    if (privateDir) fs.rmSync(privateDir, { recursive: true, force: true });
    if (opts.pidfile) fs.rmSync(opts.pidfile, { force: true });
    process.exit(code);
  };
  process.on('SIGTERM', () => void shutdown(0));
  process.on('SIGINT', () => void shutdown(0));
  process.on('SIGHUP', () => void shutdown(0));
  if (opts.exitWithParent) exitWithParent(() => void shutdown(0));

  let extraEnv: Record<string, string> = {};
  try {
    extraEnv = (await hooks.onStarted?.({ server, uri, address })) ?? {};
  } catch (e) {
    info(errorMessage(e));
    await shutdown(1);
  }
  if (opts.pidfile) writePidFile(opts.pidfile);
  debug(`serving ${exportSpec.description ?? exportSpec.name} at ${uri}`);
  signalReady();

  if (captive) {
    const status = await runCaptive(opts.run as string, {
      uri,
      socketPath: address.socketPath,
      port: address.socketPath ? undefined : address.port,
      exportName: exportSpec.name,
      extra: extraEnv,
    });
    await shutdown(status);
  }
  return new Promise<never>(() => undefined);
}

/** A plain HTTP listener for Prometheus: GET /metrics only. */
async function serveMetrics(metrics: Metrics, addr: { host: string; port: number }): Promise<http.Server> {
  const server = http.createServer((req, res) => {
    if (req.method !== 'GET' || (req.url ?? '/').split('?')[0] !== '/metrics') {
      res.writeHead(404, { 'content-type': 'text/plain' });
      res.end('only GET /metrics here\n');
      return;
    }
    metrics.render().then(
      (m) => {
        res.writeHead(200, { 'content-type': m.contentType });
        res.end(m.body);
      },
      (e: unknown) => {
        res.writeHead(500, { 'content-type': 'text/plain' });
        res.end(`${errorMessage(e)}\n`);
      },
    );
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', (e) => reject(new Error(`cannot serve metrics on ${addr.host}:${addr.port}: ${e.message}`)));
    server.listen(addr.port, addr.host, () => resolve());
  });
  return server;
}

/** The control socket lives next to the NBD socket, or in the temp dir. */
function defaultControlPath(address: ListenAddress): string {
  if (address.socketPath) return `${address.socketPath}.ctl`;
  return path.join(process.env.XDG_RUNTIME_DIR ?? os.tmpdir(), `nbd-cbw-${process.pid}.ctl`);
}

function parsePort(text: string): number {
  const n = Number(text);
  if (!Number.isInteger(n) || n < 0 || n > 65535) die(`bad port "${text}": expected 0-65535`);
  return n;
}

/** How long shutting down waits for a cancelled backup's target to close. */
const TARGET_CLOSE_GRACE_MS = 5000;

/** The serve command's action. */
export async function serve(opts: ServeOptions): Promise<void> {
  let request: BackupRequest | null = null;
  let controlAddr: ControlAddress | null = null;
  let token: string | undefined;
  try {
    if (opts.backupTo) {
      const bad = validateTargetSpec(opts.backupTo);
      if (bad) throw new Error(bad);
      request = toBackupRequest(opts.backupTo, opts);
      validateRequest(request);
    }
    if (opts.control) controlAddr = parseControlAddress(opts.control);
    if (opts.controlTokenFile) {
      token = fs.readFileSync(opts.controlTokenFile, 'utf8').trim();
      if (!token) throw new Error(`control token file ${opts.controlTokenFile} is empty`);
    }
    if (controlAddr && !controlAddr.socketPath && !token) {
      throw new Error('a TCP --control address needs --control-token-file');
    }
  } catch (e) {
    die(errorMessage(e));
  }
  let metricsAddr: { host: string; port: number } | null = null;
  if (typeof opts.metrics === 'string') {
    const a = parseControlAddress(opts.metrics);
    if (a.socketPath || a.host === undefined || a.port === undefined) die(`bad --metrics address "${opts.metrics}": use HOST:PORT`);
    metricsAddr = { host: a.host, port: a.port };
  }
  const source = await prepareServe(opts);
  const filter = new CbwFilter(source.device);
  const exportSpec: ExportSpec = { ...source, device: filter };
  const jobs = new JobManager(filter, opts.source);
  jobs.on('warning', (m: string) => info(m));
  const metrics = opts.metrics === false ? null : new Metrics();
  metrics?.watchExport(exportSpec.name, filter, jobs);
  let control: ControlServer | null = null;
  let metricsServer: http.Server | null = null;
  await runServer(opts, exportSpec, {
    observer: metrics?.connectionObserver(),
    onServer: (server) => metrics?.watchConnections(server),
    onStarted: async ({ address }) => {
      jobs.servedAt({ ...address, exportName: exportSpec.name });
      const addr = controlAddr ?? { socketPath: defaultControlPath(address) };
      if (metrics && metricsAddr) metricsServer = await serveMetrics(metrics, metricsAddr);
      control = new ControlServer({
        exportName: exportSpec.name,
        jobs,
        token,
        metrics: metrics ? () => metrics.render() : undefined,
        log: (m) => debug(m),
      });
      try {
        await control.listen(addr);
      } catch (e) {
        throw new Error(`cannot start the control API on ${formatControlAddress(addr)}: ${errorMessage(e)}`);
      }
      jobs.on('job', (job: BackupJob) => {
        job.on('end', () => {
          const st = job.status();
          if (st.state === 'completed') info(`backup ${st.id} completed: ${formatSize(st.bytesTotal)} to ${st.target}`);
          else info(`backup ${st.id} ${st.state}${st.error ? `: ${st.error}` : ''}`);
        });
      });
      if (request) {
        const job = await jobs.start(request).catch((e: unknown) => {
          throw new Error(`cannot start the backup: ${errorMessage(e)}`);
        });
        info(`backup ${job.id} started to ${request.target}`);
      }
      return { NBD_CBW_CONTROL: formatControlAddress(addr) };
    },
    cleanup: async () => {
      jobs.current?.engine.cancel();
      // Let the target of a job that just ended (cancelled now or a moment
      // ago) answer what is in flight and see a clean disconnect (nbdkit
      // 1.32 can abort on a reply to a connection cut mid-request).
      const engine = jobs.latest?.engine;
      if (engine) await Promise.race([engine.targetClosed, new Promise((r) => setTimeout(r, TARGET_CLOSE_GRACE_MS).unref())]);
      await (control as ControlServer | null)?.close();
      (metricsServer as http.Server | null)?.close();
    },
  });
}

/** Validate the options and open the source (shared by serve and its backup mode). */
export async function prepareServe(opts: ServeOptions): Promise<ExportSpec> {
  if (!opts.source) die('serve needs --source (file:PATH, nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH)');
  if (opts.unix === '-' && opts.run === undefined) die('-U - (a private socket) only makes sense with --run');
  if (!opts.foreground && opts.run === undefined) await backgroundSelf();
  let device: BlockDevice;
  try {
    device = await openDevice(opts.source, {
      readOnly: !!opts.readonly,
      reconnectWindowMs: parseDuration(opts.reconnectWindow ?? '10s'),
      log: (m) => info(m),
    });
  } catch (e) {
    die(errorMessage(e));
  }
  debug(`source ${opts.source}: ${formatSize(device.size)}`);
  return { name: opts.exportName, description: device.description, device };
}
