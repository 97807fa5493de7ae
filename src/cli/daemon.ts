// Process plumbing shared by the serving commands: backgrounding like
// nbdkit (unless -f), --exit-with-parent, -P pidfile, --run captive mode.

import { spawn } from 'node:child_process';
import fs from 'node:fs';

const READY_FD_ENV = 'NBD_CBW_READY_FD';

/**
 * Re-run this command in the background and exit once it is accepting
 * connections (it reports on a pipe), or with its status if it fails first.
 */
export function backgroundSelf(): Promise<never> {
  return new Promise(() => {
    const child = spawn(process.execPath, [...process.execArgv, process.argv[1], ...process.argv.slice(2), '-f'], {
      detached: true,
      stdio: ['ignore', 'inherit', 'inherit', 'pipe'],
      env: { ...process.env, [READY_FD_ENV]: '3' },
    });
    const pipe = child.stdio[3] as NodeJS.ReadableStream;
    pipe.on('data', () => {
      child.unref();
      (pipe as unknown as { destroy(): void }).destroy();
      process.exit(0);
    });
    child.on('exit', (code) => process.exit(code ?? 1));
  });
}

/** Tell a waiting parent (see backgroundSelf) that we are accepting. */
export function signalReady(): void {
  const fd = process.env[READY_FD_ENV];
  if (!fd) return;
  delete process.env[READY_FD_ENV];
  try {
    fs.writeSync(Number(fd), 'ready\n');
    fs.closeSync(Number(fd));
  } catch {
    // parent gone: nothing to tell
  }
}

/** Linux has PR_SET_PDEATHSIG; Node does not expose it, so watch our ppid. */
export function exitWithParent(onExit: () => void): void {
  const parent = process.ppid;
  const timer = setInterval(() => {
    if (process.ppid !== parent) onExit();
  }, 500);
  timer.unref();
}

export function writePidFile(path: string): void {
  const tmp = `${path}.tmp${process.pid}`;
  fs.writeFileSync(tmp, `${process.pid}\n`);
  fs.renameSync(tmp, path);
}

export interface CaptiveEnv {
  uri: string;
  socketPath?: string;
  port?: number;
  exportName: string;
  extra?: Record<string, string>;
}

/** Run CMD under sh with nbdkit's captive variables; resolves with its status. */
export function runCaptive(cmd: string, env: CaptiveEnv): Promise<number> {
  return new Promise((resolve) => {
    const child = spawn('/bin/sh', ['-c', cmd], {
      stdio: 'inherit',
      env: {
        ...process.env,
        uri: env.uri,
        nbd: env.uri,
        unixsocket: env.socketPath ?? '',
        port: env.port !== undefined ? String(env.port) : '',
        exportname: env.exportName,
        ...env.extra,
      },
    });
    child.on('exit', (code, signal) => resolve(code ?? (signal ? 128 + 15 : 1)));
    child.on('error', () => resolve(127));
  });
}
