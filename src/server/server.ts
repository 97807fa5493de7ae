// Listeners (unix socket, TCP) feeding NbdConnections, with a connection cap
// and a clean shutdown that lets outstanding requests finish.
//
// The cap works as qemu-nbd's --shared does: a client beyond it is not
// refused but waits, connected and without a greeting, until a served one
// leaves. qemu-nbd leaves it in the listen backlog; Node always accepts, so
// it waits here, paused (nothing read from it), in a queue as long as the
// cap. Only a client beyond that queue is closed at once. Counting alone
// cannot tell a served client that has just gone from one still there: the
// server learns of a close only when it gets to that socket's event, and a
// client that connects, sends and closes in a loop can be dozens of
// connections ahead of a busy server. Refusing at the count turned valid
// clients away while the slots were really free.

import net from 'node:net';
import fs from 'node:fs';
import {
  NbdConnection,
  type ConnectionObserver,
  type ExportRegistry,
  type ExportSpec,
  type ServerTls,
} from './connection';

export interface ListenAddress {
  /** Unix socket path. */
  socketPath?: string;
  host?: string;
  /** TCP port; 0 picks a free one. */
  port?: number;
}

export interface NbdServerOptions {
  exports: ExportSpec[];
  maxConnections?: number;
  handshakeTimeoutMs?: number;
  maxInFlight?: number;
  tls?: ServerTls;
  /** Connections read into reused buffers (default; never with TLS): see NbdConnection. */
  reuseReadBuffer?: boolean;
  observer?: ConnectionObserver;
  log?: (msg: string) => void;
  /** Said to the operator whatever the verbosity: the connection limit reached. */
  notice?: (msg: string) => void;
}

/** Clients at this moment (served, waiting for a slot) and refused since the start. */
export interface ConnectionCounts {
  served: number;
  waiting: number;
  refused: number;
}

class StaticExports implements ExportRegistry {
  constructor(private readonly exports: ExportSpec[]) {}
  find(name: string): ExportSpec | undefined {
    // "" is the default export, as for qemu-nbd and nbdkit.
    if (name === '') return this.exports[0];
    return this.exports.find((e) => e.name === name);
  }
  list(): ExportSpec[] {
    return this.exports;
  }
}

export class NbdServer {
  private readonly servers: net.Server[] = [];
  private readonly connections = new Set<NbdConnection>();
  private readonly sockets = new Set<net.Socket>();
  /** Accepted clients waiting for a slot, oldest first; not read from until served. */
  private readonly waiting: net.Socket[] = [];
  private readonly registry: ExportRegistry;
  private closing = false;
  private refused = 0;
  /** Said once until the queue empties again / has room again. */
  private noticedWaiting = false;
  private noticedRefusing = false;

  constructor(private readonly opts: NbdServerOptions) {
    this.registry = new StaticExports(opts.exports);
  }

  private get maxConnections(): number {
    return this.opts.maxConnections ?? 256;
  }

  get connectionCounts(): ConnectionCounts {
    return { served: this.sockets.size, waiting: this.waiting.length, refused: this.refused };
  }

  /** Start listening; resolves with the bound address once accepting. */
  async listen(addr: ListenAddress): Promise<net.AddressInfo | string> {
    // allowHalfOpen: a client that half-closes after its requests still gets
    // their replies (the connection drains, then ends its side); without it
    // Node ends our side at once and the replies fail with EPIPE.
    // pauseOnConnect: a client that has to wait for a slot is not read from
    // (NbdConnection starts reading when it is served).
    const server = net.createServer({ pauseOnConnect: true, allowHalfOpen: true }, (s) => this.accept(s));
    if (addr.socketPath) removeStaleSocket(addr.socketPath);
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      const done = () => {
        server.off('error', reject);
        resolve();
      };
      if (addr.socketPath) server.listen(addr.socketPath, done);
      else server.listen(addr.port ?? 10809, addr.host ?? '127.0.0.1', done);
    });
    server.on('error', (e) => this.opts.log?.(`listener error: ${e.message}`));
    this.servers.push(server);
    const bound = server.address();
    if (bound === null) throw new Error('listener has no address');
    return bound;
  }

  private accept(accepted: net.Socket): void {
    if (this.closing) {
      accepted.destroy();
      return;
    }
    // Counted here: with reuseReadBuffer, net.Server sees the accepted
    // socket object go at once (the connection lives on in another).
    if (this.sockets.size < this.maxConnections) {
      this.serve(accepted);
      return;
    }
    const max = this.maxConnections;
    if (this.waiting.length >= max) {
      this.refused++;
      if (!this.noticedRefusing) {
        this.noticedRefusing = true;
        this.opts.notice?.(`connection limit: ${max} clients served and ${max} waiting; refusing new clients`);
      }
      accepted.destroy();
      return;
    }
    if (!this.noticedWaiting) {
      this.noticedWaiting = true;
      this.opts.notice?.(`connection limit: all ${max} slots are taken (--max-connections); new clients wait for one`);
    }
    // A waiting socket is paused: its client closing goes unnoticed until it
    // is served, and then it closes at once. An error (or our own destroy
    // in close()) is all that can happen to it meanwhile.
    accepted.on('error', () => undefined);
    this.waiting.push(accepted);
  }

  /** Serve waiting clients while there are free slots. */
  private serveWaiting(): void {
    while (!this.closing && this.sockets.size < this.maxConnections && this.waiting.length > 0) {
      const next = this.waiting.shift() as net.Socket;
      if (!next.destroyed) this.serve(next);
      this.noticedRefusing = false;
    }
    if (this.waiting.length === 0) this.noticedWaiting = false;
  }

  private serve(accepted: net.Socket): void {
    const conn = new NbdConnection(accepted, {
      exports: this.registry,
      handshakeTimeoutMs: this.opts.handshakeTimeoutMs,
      maxInFlight: this.opts.maxInFlight,
      tls: this.opts.tls,
      reuseReadBuffer: this.opts.reuseReadBuffer !== false,
      observer: this.opts.observer,
      log: this.opts.log,
    });
    const socket = conn.transport;
    this.sockets.add(socket);
    this.connections.add(conn);
    socket.on('close', () => {
      this.sockets.delete(socket);
      this.connections.delete(conn);
      this.serveWaiting();
    });
  }

  /** Stop accepting; let connections finish their requests; close. */
  async close(graceMs = 5000): Promise<void> {
    this.closing = true;
    for (const s of this.servers) s.close();
    for (const s of this.waiting.splice(0)) s.destroy();
    for (const c of this.connections) c.shutdown();
    const deadline = Date.now() + graceMs;
    while (this.sockets.size > 0 && Date.now() < deadline) {
      await new Promise((r) => setTimeout(r, 10));
    }
    for (const s of this.sockets) s.destroy();
  }
}

/** A socket file left by a dead server would make listen() fail with EADDRINUSE. */
function removeStaleSocket(path: string): void {
  try {
    if (fs.statSync(path).isSocket()) fs.unlinkSync(path);
  } catch {
    // missing: nothing to remove
  }
}
