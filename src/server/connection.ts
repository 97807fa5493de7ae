// One client connection: fixed-newstyle handshake, then transmission.
//
// States:
//   handshake    greeting sent; options answered in order as they arrive
//   transmission requests dispatched as they arrive, replies written as each
//                completes (any order; cookies are opaque)
//   draining     DISC received or the socket half-closed: no new requests,
//                outstanding ones finish, then the socket is ended
//   closed       our side ended (reading on until the client closes, at most
//                DISCONNECT_LINGER_MS), or the socket gone; late completions
//                are dropped
//
// Backpressure: the socket is paused while requests in flight or their
// bytes exceed the per-connection bounds, or while the socket's write buffer
// is over its high-water mark; it resumes when both have room again.

import type { Socket } from 'node:net';
import tls from 'node:tls';
import {
  BASE_ALLOCATION,
  ClientFlag,
  ClientStreamParser,
  Command,
  CommandFlag,
  HandshakeFlag,
  InfoType,
  MAX_PAYLOAD,
  NbdError,
  Option,
  OptionReply,
  ReplyFlag,
  TransmissionFlag,
  build,
  commandName,
  decodeInfoRequest,
  decodeMetaContextRequest,
  type ClientMessage,
  type RequestMessage,
} from '../nbd-protocol';
import { corkForTick } from '../util/cork';
import { adoptWithReadHooks, slabReadHooks, type SlabReadHooks } from '../util/socket-reads';
import { PayloadPool } from '../util/payload-pool';
import { DeviceError, type BlockDevice, type Extent } from '../device/types';

export interface ExportSpec {
  name: string;
  description?: string;
  device: BlockDevice;
}

/** Looks up an export by the name a client asked for ("" is the default). */
export interface ExportRegistry {
  find(name: string): ExportSpec | undefined;
  list(): ExportSpec[];
}

/** Hooks for metrics and logs; all optional and called synchronously. */
export interface ConnectionObserver {
  requestStarted?(exp: ExportSpec, command: number): void;
  requestFinished?(exp: ExportSpec, command: number, bytes: number, seconds: number, error: number): void;
}

/** TLS on the guest-facing side: off, offered (on), or required. */
export interface ServerTls {
  mode: 'off' | 'on' | 'require';
  context: tls.SecureContext | null;
  /** Ask for and verify a client certificate against the CA. */
  verifyPeer: boolean;
}

export interface ConnectionOptions {
  exports: ExportRegistry;
  tls?: ServerTls;
  /** Requests executing at once per connection. */
  maxInFlight?: number;
  /** Payload bytes (write data and read buffers) held at once per connection. */
  maxInFlightBytes?: number;
  /** Drop clients that have not finished the handshake in this time. */
  handshakeTimeoutMs?: number;
  /**
   * Read the socket into one reused buffer, and WRITE payloads straight into
   * their own buffers, instead of Node's fresh allocation per read
   * (adoptWithReadHooks). Not with TLS, which needs ordinary reads.
   */
  reuseReadBuffer?: boolean;
  observer?: ConnectionObserver;
  log?: (msg: string) => void;
}

const BASE_ALLOCATION_ID = 1;
/** Said once per process: adoptWithReadHooks failed (a Node.js without its internals). */
let warnedOrdinaryReads = false;
/** Assembled WRITE payloads, shared by all connections (idle buffers capped at 16 MiB). */
const writePayloads = new PayloadPool(16 * 1024 * 1024);
/**
 * READ data buffers, back once the reply left for the kernel. A fresh large
 * buffer comes from mmap (page faults and zeroing on every read); from 4 KiB
 * up, where Buffer.allocUnsafe stops carving from Node's shared 8 KiB slab,
 * even a small one is a new ArrayBuffer per read: 4.8 % of nbd-cbw's busy
 * time in the 4k random read benchmark, plus the collections it feeds.
 */
const readBuffers = new PayloadPool(16 * 1024 * 1024);
const POOLED_READ_MIN = 4096;
const MAX_EXTENTS_PER_REPLY = 1024;
/** How long a client may keep its side open once the server ended its own (after DISC or ABORT). */
const DISCONNECT_LINGER_MS = 2000;
/** Extent lengths are 32-bit on the wire; keep them block-aligned below 4 GiB. */
const MAX_EXTENT_LENGTH = 0x80000000;

type Phase = 'handshake' | 'transmission' | 'draining' | 'closed';

export class NbdConnection {
  private readonly parser = new ClientStreamParser({
    maxPayload: MAX_PAYLOAD,
    allocWritePayload: (length) => writePayloads.take(length),
  });
  private phase: Phase = 'handshake';
  private noZeroes = false;
  private structured = false;
  /** Export name the last SET_META_CONTEXT selected base:allocation for, or null. */
  private metaContextExport: string | null = null;
  private exp: ExportSpec | null = null;
  private transmissionFlags = 0;
  private inFlight = 0;
  private inFlightBytes = 0;
  private readonly queued: RequestMessage[] = [];
  private socketPaused = false;
  private handshakeTimer: NodeJS.Timeout | null = null;
  private lingerTimer: NodeJS.Timeout | null = null;
  private readonly maxInFlight: number;
  private readonly maxInFlightBytes: number;
  private tlsActive = false;
  private readonly onData = (chunk: Buffer) => this.parser.push(chunk, this.handle);
  private readonly onEnd = () => this.drain();
  private readonly onError = (err: Error) => this.log(`socket error: ${err.message}`);
  private readonly onClose = () => this.closed();
  private readonly onDrain = () => this.updateFlow();
  private socket: Socket;
  /** Reads go into slabs: WRITE payloads may be views of one, given back with release(). */
  private readSlabs: SlabReadHooks | null = null;

  constructor(
    socket: Socket,
    private readonly opts: ConnectionOptions,
  ) {
    this.socket = socket;
    if (opts.reuseReadBuffer && !opts.tls) {
      const hooks = slabReadHooks(this.parser, this.handle);
      const adopted = adoptWithReadHooks(socket, hooks, true);
      if (adopted) {
        this.socket = adopted;
        this.parser.inputReused = true;
        this.readSlabs = hooks;
      } else if (!warnedOrdinaryReads) {
        warnedOrdinaryReads = true;
        opts.log?.('guest sockets read into fresh buffers: this Node.js did not let nbd-cbw choose them (slower, more garbage)');
      }
    }
    this.maxInFlight = opts.maxInFlight ?? 64;
    this.maxInFlightBytes = opts.maxInFlightBytes ?? 2 * MAX_PAYLOAD;
    this.socket.setNoDelay?.(true);
    this.bind(this.socket);
    // NbdServer accepts paused (a client may wait for a slot first); an
    // adopted socket reads on its own, this one must be told to.
    if (this.socket.isPaused()) this.socket.resume();
    const timeout = opts.handshakeTimeoutMs ?? 10_000;
    if (timeout > 0) {
      this.handshakeTimer = setTimeout(() => {
        this.log('handshake timed out');
        this.socket.destroy();
      }, timeout);
      this.handshakeTimer.unref();
    }
    this.send(build.greeting(HandshakeFlag.FixedNewstyle | HandshakeFlag.NoZeroes));
  }

  private bind(s: Socket): void {
    s.on('data', this.onData);
    s.on('end', this.onEnd);
    s.on('error', this.onError);
    s.on('close', this.onClose);
    s.on('drain', this.onDrain);
  }

  private unbind(s: Socket): void {
    s.off('data', this.onData);
    s.off('end', this.onEnd);
    s.off('close', this.onClose);
    s.off('drain', this.onDrain);
    // keep onError: a late error on the raw socket must not go unhandled
  }

  /** After STARTTLS's ACK: the rest of the session runs inside TLS. */
  private startTls(): void {
    const t = this.opts.tls as ServerTls;
    const raw = this.socket;
    this.unbind(raw);
    const secure = new tls.TLSSocket(raw, {
      isServer: true,
      secureContext: t.context ?? undefined,
      requestCert: t.verifyPeer,
      rejectUnauthorized: t.verifyPeer,
    });
    secure.on('secure', () => this.log('TLS session established'));
    this.socket = secure;
    this.tlsActive = true;
    this.bind(secure);
  }

  /** The socket this connection reads (another object than the accepted one with reuseReadBuffer). */
  get transport(): Socket {
    return this.socket;
  }

  /** Finish outstanding requests and close. */
  shutdown(): void {
    this.drain();
  }

  private log(msg: string): void {
    this.opts.log?.(msg);
  }

  private send(buf: Buffer): void {
    if (this.phase === 'closed') return;
    corkForTick(this.socket);
    this.socket.write(buf);
  }

  private readonly handle = (msg: ClientMessage): void => {
    // The parser may hold more messages from the same chunk after we dropped
    // the connection (ABORT, bad flags, unknown export): ignore them, or a GO
    // would clear the handshake deadline and requests would still execute.
    if (this.phase === 'closed' || this.socket.destroyed) return;
    switch (msg.type) {
      case 'protocolError':
        this.log(`protocol error: ${msg.message}`);
        this.socket.destroy();
        return;
      case 'clientFlags':
        // Known flags only; an unknown bit means a client we do not understand.
        if ((msg.flags & ~(ClientFlag.FixedNewstyle | ClientFlag.NoZeroes)) !== 0) {
          this.log(`unknown client flags 0x${msg.flags.toString(16)}`);
          this.socket.destroy();
          return;
        }
        this.noZeroes = (msg.flags & ClientFlag.NoZeroes) !== 0;
        return;
      case 'option':
        this.handleOption(msg.option, msg.data);
        this.updateFlow(); // a client flooding LIST must not grow our write buffer
        return;
      case 'optionTooLarge':
        this.send(build.optionError(msg.option, OptionReply.ErrTooBig, 'option payload too large'));
        return;
      case 'request':
        if (this.phase !== 'transmission') return; // after DISC: ignore
        if (this.queued.length > 0 || !this.admit(msg)) {
          this.queued.push(msg);
          this.updateFlow();
          return;
        }
        this.dispatch(msg);
        return;
    }
  };

  // ------------------------------------------------------------- handshake

  private handleOption(opt: number, data: Buffer): void {
    const reply = (type: number, payload?: Buffer) => this.send(build.optionReply(opt, type, payload));
    const error = (type: number, message: string) => this.send(build.optionError(opt, type, message));
    const tlsMode = this.opts.tls?.mode ?? 'off';
    if (tlsMode === 'require' && !this.tlsActive && opt !== Option.StartTls && opt !== Option.Abort) {
      if (opt === Option.ExportName) {
        // No error reply exists for EXPORT_NAME: hang up.
        this.log('client asked for an export without TLS; TLS is required');
        this.socket.destroy();
        return;
      }
      return error(OptionReply.ErrTlsReqd, 'TLS is required on this server: send STARTTLS first');
    }
    switch (opt) {
      case Option.ExportName: {
        const exp = this.opts.exports.find(data.toString('utf8'));
        if (!exp) {
          // EXPORT_NAME has no error reply: the only answer is to hang up.
          this.log(`unknown export "${data.toString('utf8')}"`);
          this.socket.destroy();
          return;
        }
        this.send(build.exportNameReply(exp.device.size, this.flagsFor(exp), this.noZeroes));
        this.enterTransmission(exp, false);
        return;
      }
      case Option.Abort:
        reply(OptionReply.Ack);
        this.phase = 'closed';
        this.endOurSide();
        return;
      case Option.List:
        if (data.length !== 0) return error(OptionReply.ErrInvalid, 'LIST takes no payload');
        for (const e of this.opts.exports.list()) reply(OptionReply.Server, build.serverListData(e.name, e.description));
        reply(OptionReply.Ack);
        return;
      case Option.StructuredReply:
        if (data.length !== 0) return error(OptionReply.ErrInvalid, 'STRUCTURED_REPLY takes no payload');
        this.structured = true;
        reply(OptionReply.Ack);
        return;
      case Option.Info:
      case Option.Go: {
        const req = decodeInfoRequest(data);
        if (!req.ok) return error(OptionReply.ErrInvalid, req.error);
        const exp = this.opts.exports.find(req.value.exportName);
        if (!exp) return error(OptionReply.ErrUnknown, `no export named "${req.value.exportName}"`);
        const wanted = new Set(req.value.infoTypes);
        reply(OptionReply.Info, build.infoExportData(exp.device.size, this.flagsFor(exp)));
        if (wanted.has(InfoType.Name)) reply(OptionReply.Info, build.infoNameData(exp.name));
        if (wanted.has(InfoType.Description) && exp.description) {
          reply(OptionReply.Info, build.infoDescriptionData(exp.description));
        }
        // Always sent, as qemu-nbd does: clients that did not ask may ignore it.
        reply(OptionReply.Info, build.infoBlockSizeData(blockSizesFor(exp.device)));
        reply(OptionReply.Ack);
        if (opt === Option.Go) {
          const keepContext = this.metaContextExport === req.value.exportName;
          this.enterTransmission(exp, keepContext);
        }
        return;
      }
      case Option.ListMetaContext:
      case Option.SetMetaContext: {
        if (!this.structured) {
          return error(OptionReply.ErrInvalid, 'meta contexts need STRUCTURED_REPLY first');
        }
        const req = decodeMetaContextRequest(data);
        if (!req.ok) return error(OptionReply.ErrInvalid, req.error);
        const exp = this.opts.exports.find(req.value.exportName);
        if (!exp) return error(OptionReply.ErrUnknown, `no export named "${req.value.exportName}"`);
        const list = opt === Option.ListMetaContext;
        // LIST with no queries means "all"; "base:" asks for the whole namespace.
        const matches = list
          ? req.value.queries.length === 0 || req.value.queries.some((q) => q === 'base:' || q === BASE_ALLOCATION)
          : req.value.queries.includes(BASE_ALLOCATION);
        if (matches) reply(OptionReply.MetaContext, build.metaContextData(BASE_ALLOCATION_ID, BASE_ALLOCATION));
        if (!list) this.metaContextExport = matches ? req.value.exportName : null;
        reply(OptionReply.Ack);
        return;
      }
      case Option.StartTls:
        if (tlsMode === 'off') return error(OptionReply.ErrUnsup, 'TLS is not enabled on this server');
        if (this.tlsActive) return error(OptionReply.ErrInvalid, 'TLS is already active');
        if (data.length !== 0) return error(OptionReply.ErrInvalid, 'STARTTLS takes no payload');
        reply(OptionReply.Ack);
        this.startTls();
        return;
      default:
        return error(OptionReply.ErrUnsup, `option ${opt} is not supported`);
    }
  }

  private flagsFor(exp: ExportSpec): number {
    const c = exp.device.capabilities;
    let f = TransmissionFlag.HasFlags;
    if (c.readOnly) f |= TransmissionFlag.ReadOnly;
    if (c.flush) f |= TransmissionFlag.SendFlush;
    if (c.fua && !c.readOnly) f |= TransmissionFlag.SendFua;
    if (c.trim && !c.readOnly) f |= TransmissionFlag.SendTrim;
    if (c.zero && !c.readOnly) {
      f |= TransmissionFlag.SendWriteZeroes;
      if (c.fastZero) f |= TransmissionFlag.SendFastZero;
    }
    if (c.cache) f |= TransmissionFlag.SendCache;
    if (c.multiConn) f |= TransmissionFlag.CanMultiConn;
    // Every READ is answered with one chunk, so DF is honoured trivially.
    if (this.structured) f |= TransmissionFlag.SendDf;
    return f;
  }

  private enterTransmission(exp: ExportSpec, keepMetaContext: boolean): void {
    if (this.handshakeTimer) clearTimeout(this.handshakeTimer);
    this.handshakeTimer = null;
    this.exp = exp;
    if (!keepMetaContext) this.metaContextExport = null;
    this.transmissionFlags = this.flagsFor(exp);
    this.phase = 'transmission';
    this.parser.phase = 'transmission';
  }

  // ---------------------------------------------------------- transmission

  private costOf(msg: RequestMessage): number {
    if (msg.command === Command.Read) return Math.min(msg.length, MAX_PAYLOAD);
    if (msg.command === Command.Write) return msg.payload?.length ?? 0;
    return 0;
  }

  private admit(msg: RequestMessage): boolean {
    if (this.inFlight === 0) return true;
    return this.inFlight < this.maxInFlight && this.inFlightBytes + this.costOf(msg) <= this.maxInFlightBytes;
  }

  private updateFlow(): void {
    while (this.queued.length > 0 && this.phase !== 'closed' && this.admit(this.queued[0])) {
      this.dispatch(this.queued.shift() as RequestMessage);
    }
    // Once our side is ended, reading must go on (see endOurSide).
    const stalled =
      this.phase !== 'closed' &&
      (this.queued.length > 0 ||
        this.inFlight >= this.maxInFlight ||
        this.inFlightBytes >= this.maxInFlightBytes ||
        this.socket.writableNeedDrain);
    if (stalled && !this.socketPaused) {
      this.socketPaused = true;
      this.socket.pause();
    } else if (!stalled && this.socketPaused) {
      this.socketPaused = false;
      this.socket.resume();
    }
    this.maybeFinishDrain();
  }

  private drain(): void {
    if (this.phase === 'closed' || this.phase === 'draining') return;
    if (this.phase === 'handshake') {
      this.socket.destroy();
      return;
    }
    this.phase = 'draining';
    this.queued.length = 0; // requests after DISC are not executed
    this.socket.off('data', this.onData);
    this.maybeFinishDrain();
  }

  private maybeFinishDrain(): void {
    if (this.phase === 'draining' && this.inFlight === 0) {
      this.phase = 'closed';
      this.endOurSide();
    }
  }

  /**
   * End our side and read on until the client closes its own. A socket
   * paused for a full write buffer must resume here: after end() Node
   * emits no 'drain' to resume it, and a paused socket never sees the
   * client's close (on a unix socket nothing else tells), so it stayed
   * open for good once the last replies had gone.
   */
  private endOurSide(): void {
    if (this.socketPaused) {
      this.socketPaused = false;
      this.socket.resume();
    }
    this.socket.end();
    // After DISC the server closes the session (proto.md). Ending our side
    // first lets the client read every reply; one that then never closes
    // its own side loses the socket after a short linger. Reading goes on
    // until then, so nothing unread turns the close into a reset.
    this.lingerTimer = setTimeout(() => this.socket.destroy(), DISCONNECT_LINGER_MS);
    this.lingerTimer.unref();
  }

  private closed(): void {
    this.phase = 'closed';
    this.queued.length = 0;
    if (this.handshakeTimer) clearTimeout(this.handshakeTimer);
    if (this.lingerTimer) clearTimeout(this.lingerTimer);
  }

  /** Check a request against the export; returns an NBD error or 0. */
  private validate(msg: RequestMessage): number {
    const exp = this.exp as ExportSpec;
    const caps = exp.device.capabilities;
    const f = this.transmissionFlags;
    const { command, flags, offset, length } = msg;
    let allowedFlags = 0;
    let writes = false;
    // With SEND_FUA the spec says the server MUST accept FUA on every command
    // (ignoring it where nothing is written); old qemu sets it on FLUSH.
    const fuaOk = f & TransmissionFlag.SendFua ? CommandFlag.Fua : 0;
    switch (command) {
      case Command.Read:
        allowedFlags = this.structured ? CommandFlag.Df : 0;
        break;
      case Command.Write:
        allowedFlags = CommandFlag.Fua;
        writes = true;
        break;
      case Command.Flush:
        if (!(f & TransmissionFlag.SendFlush)) return NbdError.EINVAL;
        return (flags & ~fuaOk) === 0 ? 0 : NbdError.EINVAL;
      case Command.Trim:
        if (!(f & TransmissionFlag.SendTrim) && !caps.readOnly) return NbdError.EINVAL;
        allowedFlags = CommandFlag.Fua;
        writes = true;
        break;
      case Command.WriteZeroes:
        if (!(f & TransmissionFlag.SendWriteZeroes) && !caps.readOnly) return NbdError.EINVAL;
        allowedFlags = CommandFlag.Fua | CommandFlag.NoHole;
        if (f & TransmissionFlag.SendFastZero) allowedFlags |= CommandFlag.FastZero;
        writes = true;
        break;
      case Command.Cache:
        if (!(f & TransmissionFlag.SendCache)) return NbdError.EINVAL;
        break;
      case Command.BlockStatus:
        // qemu drops a server that answers with a zero-length extent.
        if (this.metaContextExport === null || length === 0) return NbdError.EINVAL;
        allowedFlags = CommandFlag.ReqOne;
        break;
      default:
        return NbdError.EINVAL;
    }
    if ((flags & ~(allowedFlags | fuaOk)) !== 0) return NbdError.EINVAL;
    if (writes && caps.readOnly) return NbdError.EPERM;
    if ((command === Command.Write || command === Command.Read) && length > MAX_PAYLOAD) {
      return NbdError.EINVAL;
    }
    if (msg.payloadSkipped) return NbdError.EINVAL;
    if (offset + length > exp.device.size || offset > exp.device.size) {
      return command === Command.Write || command === Command.WriteZeroes ? NbdError.ENOSPC : NbdError.EINVAL;
    }
    return 0;
  }

  private dispatch(msg: RequestMessage): void {
    if (msg.command === Command.Disc) {
      this.drain();
      return;
    }
    const exp = this.exp as ExportSpec;
    const cost = this.costOf(msg);
    this.inFlight++;
    this.inFlightBytes += cost;
    this.opts.observer?.requestStarted?.(exp, msg.command);
    const started = process.hrtime.bigint();
    const finish = (error: number, bytes: number) => {
      this.inFlight--;
      this.inFlightBytes -= cost;
      // The device is done with the payload (a source acknowledges a write
      // only after receiving all of it): an assembled one can be reused.
      if (msg.payload && !this.readSlabs?.release(msg.payload)) writePayloads.give(msg.payload);
      const seconds = Number(process.hrtime.bigint() - started) / 1e9;
      this.opts.observer?.requestFinished?.(exp, msg.command, bytes, seconds, error);
      this.updateFlow();
    };
    const err = this.validate(msg);
    if (err !== 0) {
      this.replyError(msg, err, 'invalid request');
      finish(err, 0);
      return;
    }
    this.execute(exp.device, msg).then(
      (bytes) => finish(0, bytes),
      (e: unknown) => {
        const code = e instanceof DeviceError ? e.nbdError : NbdError.EIO;
        const message = e instanceof Error ? e.message : String(e);
        this.log(`${commandName(msg.command)} at ${msg.offset}+${msg.length} failed: ${message}`);
        this.replyError(msg, code, message);
        finish(code, 0);
      },
    );
  }

  /** Run one valid request and send its successful reply; returns bytes moved. */
  private async execute(dev: BlockDevice, msg: RequestMessage): Promise<number> {
    const { command, flags, offset, length, cookie } = msg;
    const fua = (flags & CommandFlag.Fua) !== 0;
    switch (command) {
      case Command.Read: {
        if (length === 0) {
          // Structured clients never get a simple reply to a READ.
          this.send(this.structured ? build.noneChunk(cookie) : build.simpleReplyHeader(cookie, 0));
          return 0;
        }
        const into = length >= POOLED_READ_MIN ? readBuffers.take(length) : undefined;
        const giveBack = into && (() => readBuffers.give(into));
        let data: Buffer;
        try {
          data = await dev.read(offset, length, into);
        } catch (e) {
          giveBack?.();
          throw e;
        }
        if (this.phase === 'closed') {
          giveBack?.();
          return length;
        }
        if (this.structured) {
          this.sendPair(build.offsetDataHeader(cookie, ReplyFlag.Done, offset, data.length), data, giveBack);
        } else {
          this.sendPair(build.simpleReplyHeader(cookie, 0), data, giveBack);
        }
        return length;
      }
      case Command.Write:
        if (length > 0) await dev.write(offset, msg.payload as Buffer, { fua });
        this.replyOk(cookie);
        return length;
      case Command.Flush:
        await dev.flush();
        this.replyOk(cookie);
        return 0;
      case Command.Trim:
        if (length > 0) await dev.trim(offset, length, { fua });
        this.replyOk(cookie);
        return length;
      case Command.WriteZeroes:
        if (length > 0) {
          await dev.zero(offset, length, {
            fua,
            mayTrim: (flags & CommandFlag.NoHole) === 0,
            fastOnly: (flags & CommandFlag.FastZero) !== 0,
          });
        }
        this.replyOk(cookie);
        return length;
      case Command.Cache:
        if (length > 0) await dev.cache(offset, length);
        this.replyOk(cookie);
        return 0;
      case Command.BlockStatus: {
        const reqOne = (flags & CommandFlag.ReqOne) !== 0;
        const extents = clipExtents(await dev.blockStatus(offset, length), length, reqOne);
        if (extents.length === 0) throw new DeviceError(NbdError.EIO, 'device returned no extents');
        this.send(build.blockStatusChunk(cookie, ReplyFlag.Done, BASE_ALLOCATION_ID, extents));
        return 0;
      }
      default:
        throw new DeviceError(NbdError.EINVAL, 'unknown command');
    }
  }

  /**
   * Header and payload leave in one write so the kernel sees them together.
   * `written` runs once the payload is no longer needed (sent or failed).
   */
  private sendPair(header: Buffer, data: Buffer, written?: () => void): void {
    if (this.phase === 'closed') return written?.();
    corkForTick(this.socket);
    this.socket.write(header);
    this.socket.write(data, written);
  }

  private replyOk(cookie: bigint): void {
    this.send(build.simpleReplyHeader(cookie, 0));
  }

  private replyError(msg: RequestMessage, error: number, message: string): void {
    if (this.structured && (msg.command === Command.Read || msg.command === Command.BlockStatus)) {
      this.send(build.errorChunk(msg.cookie, ReplyFlag.Done, error, message));
    } else {
      this.send(build.simpleReplyHeader(msg.cookie, error));
    }
  }
}

export function blockSizesFor(dev: BlockDevice): { minimum: number; preferred: number; maximum: number } {
  const bs = dev.blockSizes;
  return {
    minimum: bs?.minimum ?? 1,
    preferred: bs?.preferred ?? 4096,
    maximum: Math.min(bs?.maximum ?? MAX_PAYLOAD, MAX_PAYLOAD),
  };
}

/**
 * Trim device extents to the request: never past `length`, never empty,
 * merged where adjacent runs share flags, at most one with REQ_ONE.
 */
export function clipExtents(extents: readonly Extent[], length: number, reqOne: boolean): Extent[] {
  const out: Extent[] = [];
  let covered = 0;
  for (const e of extents) {
    if (covered >= length) break;
    let len = Math.min(e.length, length - covered);
    if (len <= 0) continue;
    covered += len;
    const last = out[out.length - 1];
    if (last && last.flags === e.flags && last.length + len <= MAX_EXTENT_LENGTH) {
      last.length += len;
      continue;
    }
    while (len > MAX_EXTENT_LENGTH) {
      out.push({ length: MAX_EXTENT_LENGTH, flags: e.flags });
      len -= MAX_EXTENT_LENGTH;
    }
    out.push({ length: len, flags: e.flags });
    if (reqOne || out.length >= MAX_EXTENTS_PER_REPLY) break;
  }
  if (reqOne && out.length > 1) out.length = 1;
  return out;
}
