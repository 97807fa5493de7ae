// `nbd-cbw serve`: export a source over NBD, nbdkit-style command line.
// Only the options live here: the server and everything it needs load when
// the command runs (serve-run.ts), so `nbd-cbw backup ...` and `--help`
// start without them.

import { Option, type Command } from 'commander';
import { addBackupOptions, type BackupCliOptions } from './backup-options';

export interface ListenOptions {
  unix?: string;
  port?: string;
  ipaddr?: string;
  exportName: string;
  foreground?: boolean;
  verbose?: boolean;
  pidfile?: string;
  exitWithParent?: boolean;
  run?: string;
  maxConnections?: string;
  handshakeTimeout?: string;
  tls?: string;
  tlsCertificates?: string;
  tlsVerifyPeer?: boolean;
}

/** Options every serving command shares (serve, serve-backup). */
export function addListenOptions(cmd: Command): Command {
  return cmd
    .option('-U, --unix <SOCKET>', 'listen on a unix socket; "-" makes a private one (for --run)')
    .option('-p, --port <PORT>', 'listen on a TCP port (default 10809 when -U is not given)')
    .option('-i, --ipaddr <ADDR>', 'listen on this address only (default: all)')
    .option('-e, --export-name <NAME>', 'export name (clients may also ask for "")', 'disk')
    .option('-f, --foreground', 'stay in the foreground (default: detach once accepting, like nbdkit)')
    .option('-v, --verbose', 'log every connection and error to stderr')
    .option('-P, --pidfile <FILE>', 'write the pid here once accepting connections')
    .option('--exit-with-parent', 'exit when the parent process exits')
    .option('--run <CMD>', 'captive mode: run CMD with $uri, $nbd, $unixsocket, $port, $exportname set; exit with its status when it ends')
    .option('--max-connections <N>', 'serve this many clients at once; up to as many more wait for a slot without a greeting (as with qemu-nbd --shared), beyond that they are refused', '256')
    .option('--handshake-timeout <DURATION>', 'drop clients that have not finished the handshake in this time (e.g. 10s, 500ms; 0 = never)', '10s')
    .addOption(
      new Option('--tls <MODE>', 'TLS for clients: off, on (offered), require (plaintext refused)').choices(['off', 'on', 'require']).default('off'),
    )
    .option('--tls-certificates <DIR>', 'X.509 credentials in qemu\'s layout: ca-cert.pem, server-cert.pem, server-key.pem')
    .option('--tls-verify-peer', 'require clients to present a certificate signed by ca-cert.pem');
}

export interface ServeOptions extends ListenOptions, BackupCliOptions {
  source?: string;
  reconnectWindow?: string;
  readonly?: boolean;
  control?: string;
  controlTokenFile?: string;
  backupTo?: string;
  metrics?: string | boolean;
}

export function registerServe(program: Command): void {
  const cmd = program
    .command('serve')
    .summary('export a disk over NBD, pass-through')
    .description(
      'Export SOURCE over NBD. Every request is forwarded to the source; a write is\n' +
        'acknowledged only after the source acknowledged it. Only what the source can\n' +
        'do is advertised (trim, zero, fua, flush, cache, block status).',
    )
    .option('-s, --source <SOURCE>', 'the disk: file:PATH, nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH; served read-write, a file another process writes (QEMU\'s image lock) is refused, and a served one is locked against QEMU\'s writers')
    .option('-r, --readonly', 'export read-only')
    .option('--reconnect-window <DURATION>', 'NBD sources: if the connection drops, requests wait while nbd-cbw reconnects for this long, then fail with EIO (0 = fail at once)', '10s')
    .option('--control <ADDR>', 'control API address: a unix socket path, or HOST:PORT (needs --control-token-file); default: SOCKET.ctl next to -U SOCKET, else a socket in the temp dir')
    .option('--control-token-file <FILE>', 'require this bearer token (file contents) on the control API')
    .option('--backup-to <TARGET>', 'start a backup to TARGET (file:PATH, nbd://..., nbd+unix://...) as soon as the server is up')
    .option('--metrics <ADDR>', 'also serve Prometheus /metrics on HOST:PORT (it is always on the control API)')
    .option('--no-metrics', 'collect no metrics at all');
  addListenOptions(cmd);
  addBackupOptions(cmd);
  cmd.addHelpText(
    'after',
    '\nExamples:\n' +
      '  nbd-cbw serve --source file:disk.raw -U /run/disk.sock -f\n' +
      '  nbd-cbw serve --source nbd+unix:///disk?socket=/run/qemu-nbd.sock -U - --run \'qemu-img info "$uri"\'\n' +
      '  qemu-system-x86_64 -drive driver=nbd,server.type=unix,server.path=/run/disk.sock,export=disk,cache=none\n',
  );
  cmd.action(async (opts: ServeOptions) => (await import('./serve-run')).serve(opts));
}
