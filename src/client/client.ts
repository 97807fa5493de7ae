// An NBD client: fixed-newstyle handshake (structured replies, base:allocation,
// GO with a fallback to EXPORT_NAME), then pipelined requests with a bounded
// queue depth. Used for NBD sources and NBD backup targets.
//
// States: connecting -> handshaking -> ready -> closed. In `ready`, each
// request holds a cookie until its final reply (a simple reply, or a
// structured chunk with DONE); when the socket dies every pending request
// fails with EIO and new ones fail at once.

import net from 'node:net';
import tls from 'node:tls';
import type { ClientTlsOptions } from '../tls/credentials';
import { EventEmitter } from 'node:events';
import {
  BASE_ALLOCATION,
  ClientFlag,
  Command,
  CommandFlag,
  HandshakeFlag,
  InfoType,
  MAX_PAYLOAD,
  NBD_REP_ERR_BIT,
  NbdError,
  Option,
  OptionReply,
  ReplyFlag,
  ReplyType,
  ServerStreamParser,
  WireSize,
  build,
  decodeBlockStatus,
  decodeErrorChunk,
  decodeInfoReply,
  decodeMetaContextReply,
  decodeOffsetData,
  decodeOffsetHole,
  errorName,
  isErrorChunk,
  type BlockSizeInfo,
  type Extent,
  type ServerMessage,
} from '../nbd-protocol';
import { corkForTick } from '../util/cork';
import { DIRECT_READ_MIN, parserReadHooks } from '../util/socket-reads';
import { DeviceError } from '../device/types';
import type { NbdAddress } from './uri';
import { clientTlsFor, formatNbdUri } from './uri';
import { SlotTable } from '../util/churn-tables';

export interface NbdClientOptions {
  /** Requests on the wire at once (qemu uses 16). */
  maxInFlight?: number;
  /** Negotiate structured replies (default true). */
  structuredReplies?: boolean;
  /** Ask for base:allocation (default true; needs structured replies). */
  baseAllocation?: boolean;
  connectTimeoutMs?: number;
  /** Require TLS (STARTTLS) with these credentials; the server's chain is verified against `ca`. */
  tls?: ClientTlsOptions;
}

/** The request may or may not have reached the server: the connection died. */
export class ConnectionLostError extends DeviceError {
  constructor(message: string) {
    super(NbdError.EIO, message);
    this.name = 'ConnectionLostError';
  }
}

interface Pending {
  /** Sent as the request's cookie: the slot in the low 16 bits, a sequence number above. */
  cookie: bigint;
  slot: number;
  command: number;
  offset: number;
  length: number;
  resolve: (v: ReplyValue) => void;
  reject: (e: Error) => void;
  /** READ: the caller's buffer or one allocated here, never a view of socket input. */
  data: Buffer | null;
  extents: Extent[] | null;
  error: DeviceError | null;
}

type HandshakeWaiter = (msg: ServerMessage | Error) => void;

const noop = (): void => undefined;

/** Request slots per connection, and so the most requests in flight: the cookie's low 16 bits. */
const COOKIE_SLOTS = 0x10000;
/** Cookies stay below 2^52, exact as numbers. */
const COOKIE_SEQ_WRAP = 2 ** 36;

/** What a reply settles a request with: READ data, block-status extents, or null. */
type ReplyValue = Buffer | Extent[] | null;
/** A WRITE's data: one buffer or several sent back to back. */
type RequestPayload = Buffer | readonly Buffer[] | null;

export class NbdClient extends EventEmitter {
  size = 0;
  transmissionFlags = 0;
  blockSizes: BlockSizeInfo | null = null;
  structured = false;
  baseAllocationId: number | null = null;
  readonly uri: string;

  private socket: net.Socket;
  private readonly parser: ServerStreamParser;
  /** Requests in flight, in the slot their cookie names (not a Map: see util/churn-tables). */
  private readonly pending: SlotTable<Pending>;
  private cookieSeq = 0;
  /** Pending READs whose data can go straight to its destination (see headerReadLimit). */
  private largeReadsPending = 0;
  private readonly slotWaiters: Array<() => void> = [];
  private readonly maxInFlight: number;
  private ready = false;
  private closedError: Error | null = null;
  private handshakeQueue: Array<ServerMessage | Error> = [];
  private handshakeWaiter: HandshakeWaiter | null = null;

  private constructor(
    /** Where this connects (as given: paths and names are not resolved). */
    readonly address: NbdAddress,
    private readonly opts: NbdClientOptions,
  ) {
    super();
    this.uri = formatNbdUri(address);
    this.maxInFlight = opts.maxInFlight ?? 64;
    if (!(this.maxInFlight >= 1 && this.maxInFlight <= COOKIE_SLOTS)) {
      throw new RangeError(`maxInFlight must be 1..${COOKIE_SLOTS}, not ${this.maxInFlight}`);
    }
    this.pending = new SlotTable<Pending>(this.maxInFlight);
    this.parser = new ServerStreamParser({
      readLengthOf: (cookie) => {
        const p = this.lookup(cookie);
        return p && p.command === Command.Read ? p.length : 0;
      },
      readInto: this.readDestination,
    });
    // Without TLS the socket reads into memory we choose instead of a fresh
    // 64 KiB allocation per read: into one reused buffer, or, while a READ
    // reply's data is arriving, straight into the data's destination
    // (readDestination), so large reads cost no user-space copy at all. A
    // busy source then no longer feeds V8 hundreds of MB/s of short-lived
    // external memory, which drives its full collections. Nothing may keep a
    // view into the reused buffer past the callback (see onMessage). TLS
    // needs ordinary reads.
    const onread = opts.tls ? undefined : parserReadHooks(this.parser, this.onMessage, this.headerReadLimit);
    this.socket = address.socketPath
      ? net.createConnection({ path: address.socketPath, onread })
      : net.createConnection({ host: address.host, port: address.port ?? 10809, onread });
    this.socket.setNoDelay?.(true);
    this.bind(this.socket);
  }

  private readonly onData = (chunk: Buffer) => this.parser.push(chunk, this.onMessage);
  /**
   * The parser's readInto hook: READ data goes straight into the request's
   * buffer (the caller's, or one allocated here), never into a view of the
   * socket's read buffer.
   */
  private readonly readDestination = (cookie: bigint, offset: number | null, length: number): Buffer | null => {
    const p = this.lookup(cookie);
    if (!p || p.command !== Command.Read) return null;
    const at = offset === null ? 0 : offset - p.offset;
    if (at < 0 || at + length > p.length) return null; // onChunk reports the violation
    const whole = at === 0 && length === p.length;
    // Covered whole by this piece: no need to zero it first.
    p.data ??= whole ? Buffer.allocUnsafe(p.length) : Buffer.alloc(p.length);
    return whole ? p.data : p.data.subarray(at, at + length);
  };
  /**
   * While a large READ is in flight, read replies a header at a time, so
   * its data is read straight into place (readDestination) instead of into
   * the socket buffer and copied out (see parserReadHooks). Other replies in
   * between (a guest's WRITEs among the READs that save their clusters)
   * then cost a read each: a syscall against a copy of the READ's data.
   * Saving clusters for a guest with a 1 GiB buffer, the copy was 11 % of
   * nbd-cbw's CPU profile (440 ms in 3 s), and is 2.5 % with the limit.
   */
  private readonly headerReadLimit = (): number | null => {
    if (!this.ready || this.largeReadsPending === 0) return null;
    return this.structured ? WireSize.StructuredReplyHeader + 8 : WireSize.SimpleReplyHeader;
  };
  private static isLargeRead(p: Pending): boolean {
    return p.command === Command.Read && p.length >= DIRECT_READ_MIN;
  }
  /** The request a cookie from the server names, if it is one in flight. */
  private lookup(cookie: bigint): Pending | undefined {
    // Number() of a cookie past 2^53 rounds; the comparison catches it.
    const p = this.pending.get(Number(cookie) % COOKIE_SLOTS);
    return p !== undefined && p.cookie === cookie ? p : undefined;
  }
  private forget(p: Pending): void {
    this.pending.remove(p.slot);
    if (NbdClient.isLargeRead(p)) this.largeReadsPending--;
    this.slotWaiters.shift()?.();
  }
  private readonly onError = (err: Error) => this.fail(err);
  private readonly onClose = () => this.fail(new Error('connection closed by server'));

  private bind(s: net.Socket): void {
    s.on('data', this.onData);
    s.on('error', this.onError);
    s.on('close', this.onClose);
  }

  /** STARTTLS was acknowledged: continue the session inside TLS. */
  private async upgrade(creds: ClientTlsOptions): Promise<void> {
    const raw = this.socket;
    raw.off('data', this.onData);
    raw.off('close', this.onClose);
    const secure = tls.connect({
      socket: raw,
      ca: creds.ca,
      cert: creds.cert,
      key: creds.key,
      // Verify the chain against the CA; names are not checked, since unix
      // sockets have none (qemu does the same for unix sockets).
      checkServerIdentity: () => undefined,
    });
    this.socket = secure;
    this.bind(secure);
    await new Promise<void>((resolve, reject) => {
      secure.once('secureConnect', () => resolve());
      secure.once('error', reject);
    });
  }

  /** Connect and complete the handshake. */
  static async connect(addr: NbdAddress, opts: NbdClientOptions = {}): Promise<NbdClient> {
    if (addr.tls && !opts.tls) opts = { ...opts, tls: clientTlsFor(addr) };
    const c = new NbdClient(addr, opts);
    const timeoutMs = opts.connectTimeoutMs ?? 30_000;
    let timer: NodeJS.Timeout | undefined;
    try {
      await Promise.race([
        c.handshake(),
        new Promise<never>((_, reject) => {
          timer = setTimeout(() => reject(new Error(`timed out connecting to ${c.uri}`)), timeoutMs);
        }),
      ]);
      return c;
    } catch (e) {
      c.socket.destroy();
      throw describeConnectError(e, addr);
    } finally {
      clearTimeout(timer);
    }
  }

  get canFlush(): boolean {
    return (this.transmissionFlags & 4) !== 0;
  }

  private readonly onMessage = (msg: ServerMessage): void => {
    if (msg.type === 'protocolError') {
      this.fail(new Error(`NBD protocol error from ${this.uri}: ${msg.message}`));
      this.socket.destroy();
      return;
    }
    if (!this.ready) {
      // Handshake messages may wait in a queue: they must not point into the
      // socket's reused read buffer.
      if (msg.type === 'optionReply') msg = { ...msg, data: Buffer.from(msg.data) };
      if (this.handshakeWaiter) {
        const w = this.handshakeWaiter;
        this.handshakeWaiter = null;
        w(msg);
      } else this.handshakeQueue.push(msg);
      return;
    }
    if (msg.type === 'simpleReply') this.onSimpleReply(msg.cookie, msg.error, msg.data);
    else if (msg.type === 'structuredChunk') this.onChunk(msg.cookie, msg.flags, msg.chunkType, msg.payload);
    else if (msg.type === 'offsetDataDelivered') this.onDataDelivered(msg.cookie, msg.flags);
    else this.protocolViolation(`unexpected ${msg.type} in transmission`);
  };

  private next(): Promise<ServerMessage> {
    const queued = this.handshakeQueue.shift();
    if (queued) return queued instanceof Error ? Promise.reject(queued) : Promise.resolve(queued);
    if (this.closedError) return Promise.reject(this.closedError);
    return new Promise((resolve, reject) => {
      this.handshakeWaiter = (m) => (m instanceof Error ? reject(m) : resolve(m));
    });
  }

  private async nextOptionReply(opt: number): Promise<{ replyType: number; data: Buffer }> {
    const m = await this.next();
    if (m.type !== 'optionReply') throw new Error(`expected an option reply, got ${m.type}`);
    if (m.option !== opt) throw new Error(`option reply for ${m.option}, expected ${opt}`);
    return m;
  }

  private async handshake(): Promise<void> {
    const g = await this.next();
    if (g.type !== 'greeting') throw new Error('expected NBD greeting');
    const fixed = (g.flags & HandshakeFlag.FixedNewstyle) !== 0;
    const noZeroes = (g.flags & HandshakeFlag.NoZeroes) !== 0;
    this.socket.write(
      build.clientFlags((fixed ? ClientFlag.FixedNewstyle : 0) | (noZeroes ? ClientFlag.NoZeroes : 0)),
    );
    this.parser.noZeroes = noZeroes;
    const name = this.address.exportName;

    if (this.opts.tls) {
      if (!fixed) throw new Error('server cannot do TLS (no fixed newstyle)');
      this.socket.write(build.option(Option.StartTls));
      const r = await this.nextOptionReply(Option.StartTls);
      if (r.replyType !== OptionReply.Ack) {
        const text = r.data.toString('utf8');
        throw new Error(`server refused TLS${text ? `: ${text}` : ''}`);
      }
      await this.upgrade(this.opts.tls);
    }

    if (fixed && this.opts.structuredReplies !== false) {
      this.socket.write(build.option(Option.StructuredReply));
      const r = await this.nextOptionReply(Option.StructuredReply);
      this.structured = r.replyType === OptionReply.Ack;
    }
    if (this.structured && this.opts.baseAllocation !== false) {
      this.socket.write(build.option(Option.SetMetaContext, build.metaContextRequestData(name, [BASE_ALLOCATION])));
      for (;;) {
        const r = await this.nextOptionReply(Option.SetMetaContext);
        if (r.replyType === OptionReply.MetaContext) {
          const mc = decodeMetaContextReply(r.data);
          if (mc.ok && mc.value.name === BASE_ALLOCATION) this.baseAllocationId = mc.value.contextId;
        } else break; // ACK or an error: either way no more replies
      }
    }
    if (fixed) {
      this.socket.write(build.option(Option.Go, build.infoRequestData(name, [InfoType.BlockSize])));
      let gotExport = false;
      for (;;) {
        const r = await this.nextOptionReply(Option.Go);
        if (r.replyType === OptionReply.Info) {
          const info = decodeInfoReply(r.data);
          if (!info.ok) throw new Error(info.error);
          if (info.value.type === InfoType.Export) {
            this.size = info.value.size;
            this.transmissionFlags = info.value.transmissionFlags;
            gotExport = true;
          } else if (info.value.type === InfoType.BlockSize) {
            this.blockSizes = info.value.blockSize;
          }
          continue;
        }
        if (r.replyType === OptionReply.Ack) {
          if (!gotExport) throw new Error('server finished GO without NBD_INFO_EXPORT');
          this.enterTransmission();
          return;
        }
        if (r.replyType === OptionReply.ErrUnsup) break; // old server: use EXPORT_NAME
        const text = r.data.toString('utf8');
        if (r.replyType === OptionReply.ErrUnknown) throw new Error(`export "${name}" not found${text ? `: ${text}` : ''}`);
        if ((r.replyType & NBD_REP_ERR_BIT) !== 0) {
          throw new Error(`server refused export "${name}": ${text || `error 0x${r.replyType.toString(16)}`}`);
        }
        throw new Error(`unexpected reply 0x${r.replyType.toString(16)} to GO`);
      }
    }
    this.parser.phase = 'exportNameReply';
    this.socket.write(build.option(Option.ExportName, Buffer.from(name, 'utf8')));
    const m = await this.next();
    if (m.type !== 'exportNameReply') throw new Error('expected the EXPORT_NAME reply');
    this.size = m.size;
    this.transmissionFlags = m.flags;
    this.enterTransmission();
  }

  private enterTransmission(): void {
    this.parser.phase = 'transmission';
    this.ready = true;
    this.handshakeQueue = [];
  }

  private fail(err: Error): void {
    if (this.closedError) return;
    this.closedError = err;
    const w = this.handshakeWaiter;
    this.handshakeWaiter = null;
    w?.(err);
    const e = new ConnectionLostError(`${this.uri}: ${err.message}`);
    for (const p of this.pending.values()) p.reject(e);
    this.pending.clear();
    this.largeReadsPending = 0;
    for (const s of this.slotWaiters.splice(0)) s();
    this.emit('close', err);
  }

  private protocolViolation(msg: string): void {
    this.fail(new Error(`NBD protocol violation by ${this.uri}: ${msg}`));
    this.socket.destroy();
  }

  get isClosed(): boolean {
    return this.closedError !== null;
  }

  // ------------------------------------------------------------- requests

  private async slot(): Promise<void> {
    while (this.pending.size >= this.maxInFlight && !this.closedError) {
      await new Promise<void>((r) => this.slotWaiters.push(r));
    }
  }

  /**
   * Send a request; settles with its reply. Not an async function: a
   * request is several promise hops deep in the proxy already (connection,
   * device, here), and each async frame costs a promise, microtasks and a
   * thenable check of the result on every request.
   */
  private request(
    command: number,
    flags: number,
    offset: number,
    length: number,
    payload: RequestPayload,
    into: Buffer | null,
  ): Promise<ReplyValue> {
    const p: Pending = {
      cookie: 0n,
      slot: -1,
      command,
      offset,
      length,
      resolve: noop,
      reject: noop,
      data: into,
      extents: null,
      error: null,
    };
    if (this.pending.size >= this.maxInFlight || this.closedError) return this.sendAfterSlot(p, flags, payload);
    return this.send(p, flags, payload);
  }

  private async sendAfterSlot(p: Pending, flags: number, payload: RequestPayload): Promise<ReplyValue> {
    if (this.pending.size >= this.maxInFlight) await this.slot();
    if (this.closedError) throw new ConnectionLostError(`${this.uri}: ${this.closedError.message}`);
    return this.send(p, flags, payload);
  }

  /** The slot is taken here and given back when the reply is complete (forget) or the connection fails. */
  private send(p: Pending, flags: number, payload: RequestPayload): Promise<ReplyValue> {
    const slot = this.pending.insert(p);
    if (slot < 0) return Promise.reject(new Error(`${this.uri}: internal error: no request slot free`));
    p.slot = slot;
    p.cookie = BigInt(this.cookieSeq * COOKIE_SLOTS + slot);
    this.cookieSeq = (this.cookieSeq + 1) % COOKIE_SEQ_WRAP;
    const cookie = p.cookie;
    return new Promise<ReplyValue>((resolve, reject) => {
      p.resolve = resolve;
      p.reject = reject;
      if (NbdClient.isLargeRead(p)) this.largeReadsPending++;
      const header = build.requestHeader(flags, p.command, cookie, p.offset, p.length);
      corkForTick(this.socket);
      this.socket.write(header);
      if (payload) {
        if (Buffer.isBuffer(payload)) this.socket.write(payload);
        else for (const b of payload) this.socket.write(b);
      }
    });
  }

  private onSimpleReply(cookie: bigint, error: number, data: Buffer | null): void {
    const p = this.lookup(cookie);
    if (!p) return this.protocolViolation(`reply to unknown cookie ${cookie}`);
    this.forget(p);
    if (error !== 0) return p.reject(new DeviceError(error, `${this.uri}: ${errorName(error)}`));
    if (p.command === Command.Read) {
      if (p.data && data && data !== p.data) data.copy(p.data, 0, 0, p.length);
      return p.resolve(p.data ?? (data ? Buffer.from(data) : Buffer.alloc(0)));
    }
    p.resolve(null);
  }

  private onChunk(cookie: bigint, flags: number, type: number, payload: Buffer): void {
    const p = this.lookup(cookie);
    if (!p) return this.protocolViolation(`chunk for unknown cookie ${cookie}`);
    if (type === ReplyType.OffsetData) {
      const d = decodeOffsetData(payload);
      if (!d.ok) return this.protocolViolation(d.error);
      const at = d.value.offset - p.offset;
      if (p.command !== Command.Read || at < 0 || at + d.value.data.length > p.length) {
        return this.protocolViolation('data chunk outside the request');
      }
      // (Only reached for pieces readDestination could not place.)
      this.ownedReadBuffer(p);
      d.value.data.copy(p.data as Buffer, at);
    } else if (type === ReplyType.OffsetHole) {
      const h = decodeOffsetHole(payload);
      if (!h.ok) return this.protocolViolation(h.error);
      const at = h.value.offset - p.offset;
      if (p.command !== Command.Read || at < 0 || at + h.value.length > p.length) {
        return this.protocolViolation('hole chunk outside the request');
      }
      this.ownedReadBuffer(p);
      (p.data as Buffer).fill(0, at, at + h.value.length);
    } else if (type === ReplyType.BlockStatus) {
      const b = decodeBlockStatus(payload);
      if (!b.ok) return this.protocolViolation(b.error);
      if (b.value.contextId === this.baseAllocationId) p.extents = b.value.extents;
    } else if (isErrorChunk(type)) {
      const e = decodeErrorChunk(type, payload);
      if (!e.ok) return this.protocolViolation(e.error);
      if (e.value.error === 0) return this.protocolViolation('error chunk with error 0');
      p.error ??= new DeviceError(
        e.value.error,
        `${this.uri}: ${errorName(e.value.error)}${e.value.message ? `: ${e.value.message}` : ''}`,
      );
    } else if (type !== ReplyType.None) {
      // Unknown non-error chunk types are to be ignored per the spec.
    }
    this.chunkDone(p, flags);
  }

  /** An OFFSET_DATA chunk the parser already copied into p.data. */
  private onDataDelivered(cookie: bigint, flags: number): void {
    const p = this.lookup(cookie);
    if (!p) return this.protocolViolation(`chunk for unknown cookie ${cookie}`);
    this.chunkDone(p, flags);
  }

  private chunkDone(p: Pending, flags: number): void {
    if ((flags & ReplyFlag.Done) === 0) return;
    this.forget(p);
    if (p.error) return p.reject(p.error);
    if (p.command === Command.Read) {
      if (!p.data) this.ownedReadBuffer(p); // zero-length, or answered only with NONE
      return p.resolve(p.data as Buffer);
    }
    if (p.command === Command.BlockStatus) {
      if (!p.extents || p.extents.length === 0) return p.reject(new DeviceError(NbdError.EIO, 'no extents returned'));
      return p.resolve(p.extents);
    }
    p.resolve(null);
  }

  /** Make sure p.data exists (the caller's buffer, or a new zeroed one). */
  private ownedReadBuffer(p: Pending): void {
    p.data ??= Buffer.alloc(p.length);
  }

  /** Settles with `into` when given (the reply is placed there), else a new buffer. */
  read(offset: number, length: number, into?: Buffer): Promise<Buffer> {
    if (length > MAX_PAYLOAD) {
      return Promise.reject(new DeviceError(NbdError.EINVAL, `read of ${length} bytes is over the 32 MiB limit`));
    }
    return this.request(Command.Read, 0, offset, length, null, into ?? null) as Promise<Buffer>;
  }

  /** Write one buffer, or several sent back to back as one request (no concat). */
  write(offset: number, data: Buffer | readonly Buffer[], fua = false): Promise<void> {
    const length = Buffer.isBuffer(data) ? data.length : data.reduce((n, b) => n + b.length, 0);
    // Settles with null, which nobody reads: no async frame on every guest write.
    const replied = this.request(Command.Write, fua ? CommandFlag.Fua : 0, offset, length, data, null);
    return replied as Promise<unknown> as Promise<void>;
  }

  async zero(offset: number, length: number, flags = 0): Promise<void> {
    await this.request(Command.WriteZeroes, flags, offset, length, null, null);
  }

  async trim(offset: number, length: number, fua = false): Promise<void> {
    await this.request(Command.Trim, fua ? CommandFlag.Fua : 0, offset, length, null, null);
  }

  async flush(): Promise<void> {
    await this.request(Command.Flush, 0, 0, 0, null, null);
  }

  async cache(offset: number, length: number): Promise<void> {
    await this.request(Command.Cache, 0, offset, length, null, null);
  }

  async blockStatus(offset: number, length: number, reqOne = false): Promise<Extent[]> {
    if (this.baseAllocationId === null) throw new DeviceError(NbdError.EINVAL, 'base:allocation not negotiated');
    return (await this.request(Command.BlockStatus, reqOne ? CommandFlag.ReqOne : 0, offset, length, null, null)) as Extent[];
  }

  /** Send DISC after outstanding requests finish, then close. */
  async close(): Promise<void> {
    if (this.closedError) return;
    if (this.ready) {
      while (this.pending.size > 0 && !this.closedError) await new Promise((r) => setTimeout(r, 1));
      // No reply comes to DISC: its cookie names no request.
      if (!this.closedError) this.socket.write(build.requestHeader(0, Command.Disc, 0n, 0, 0));
    }
    await new Promise<void>((resolve) => {
      if (this.socket.destroyed) return resolve();
      this.socket.once('close', () => resolve());
      this.socket.end();
      setTimeout(() => this.socket.destroy(), 2000).unref();
    });
  }
}

function describeConnectError(e: unknown, addr: NbdAddress): Error {
  const err = e as NodeJS.ErrnoException;
  const where = addr.socketPath ? `unix socket ${addr.socketPath}` : `${addr.host}:${addr.port ?? 10809}`;
  switch (err.code) {
    case 'ENOENT':
      return new Error(`cannot connect to NBD server at ${where}: no such socket`);
    case 'ECONNREFUSED':
      return new Error(`cannot connect to NBD server at ${where}: connection refused`);
    case 'EACCES':
      return new Error(`cannot connect to NBD server at ${where}: permission denied`);
    default:
      return new Error(`cannot connect to NBD server at ${where}: ${err.message ?? String(e)}`);
  }
}
