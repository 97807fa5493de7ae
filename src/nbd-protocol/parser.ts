// Incremental parsers for both directions of an NBD connection.
//
// Input may be split at any byte. Each parser keeps a cursor over the bytes
// carried over from earlier chunks and emits whole messages. Large payloads
// (WRITE data, structured data chunks) are handed out as views when they
// arrived whole, else assembled once into a buffer of exactly their size.
// Payloads over the limit are skipped without allocating.
//
// States: a parser is in one phase at a time, chosen by the caller because
// the phase depends on what the caller answered (a GO can fail and leave the
// connection in option haggling). After a protocolError the parser is dead
// and ignores further input: the caller closes the connection.

import {
  Command,
  MAX_OPTION_LENGTH,
  MAX_PAYLOAD,
  NBD_IHAVEOPT,
  NBD_MAGIC,
  NBD_OPTION_REPLY_MAGIC,
  NBD_REQUEST_MAGIC,
  NBD_SIMPLE_REPLY_MAGIC,
  NBD_STRUCTURED_REPLY_MAGIC,
  ReplyType,
  WireSize,
} from './constants';
import type { ClientMessage, ServerMessage } from './messages';

const TWO_32 = 4294967296;

/** Reads a 64-bit big-endian unsigned as a number (exact below 2^53). */
export function readU64(buf: Buffer, at: number): number {
  return buf.readUInt32BE(at) * TWO_32 + buf.readUInt32BE(at + 4);
}

interface PayloadCollector<M> {
  /** Destination, or null when the bytes are being skipped. */
  target: Buffer | null;
  filled: number;
  need: number;
  finish: (payload: Buffer | null) => M;
}

abstract class IncrementalParser<M extends { type: string }> {
  private carry: Buffer | null = null;
  private collector: PayloadCollector<M> | null = null;
  protected dead = false;
  /**
   * The caller reuses its input buffers (one read buffer for every read):
   * payloads are always copied out, never handed out as views of the input.
   */
  inputReused = false;
  /**
   * With inputReused: hands out a payload that arrived whole as a view of
   * the input after all, when the caller keeps that part of its buffer until
   * the payload is given back (see socket-reads' read slabs); null means
   * copy it out as usual. Only for payloads the parser marks viewable
   * (WRITE data).
   */
  viewOfInput: ((buf: Buffer, start: number, length: number) => Buffer | null) | null = null;

  get isDead(): boolean {
    return this.dead;
  }

  /** Bytes held waiting for the rest of a message (for memory accounting). */
  get bufferedBytes(): number {
    return (this.carry?.length ?? 0) + (this.collector?.target ? this.collector.filled : 0);
  }

  /**
   * While a payload is being assembled in a buffer: the part of that buffer
   * still to fill, else null. A caller that can read its input straight into
   * memory (a socket with a read-buffer generator) may read there and report
   * the bytes with collected() instead of push(): no copy at all.
   */
  get collectingInto(): Buffer | null {
    const c = this.collector;
    return c && c.target && !this.dead ? c.target.subarray(c.filled, c.need) : null;
  }

  /** `n` bytes arrived straight into the buffer collectingInto returned. */
  collected(n: number, emit: (msg: M) => void): void {
    const c = this.collector;
    if (!c || !c.target || this.dead || n > c.need - c.filled) {
      throw new Error('collected() without a payload being assembled');
    }
    c.filled += n;
    if (c.filled === c.need) {
      this.collector = null;
      emit(c.finish(c.target));
    }
  }

  /** Feed bytes; `emit` is called once per complete message, in order. */
  push(chunk: Buffer, emit: (msg: M) => void): void {
    if (this.dead) return;
    let buf = chunk;
    if (this.carry) {
      buf = Buffer.concat([this.carry, chunk]);
      this.carry = null;
    }
    let pos = 0;
    while (pos < buf.length && !this.dead) {
      const c = this.collector;
      if (c) {
        const n = Math.min(c.need - c.filled, buf.length - pos);
        if (c.target) buf.copy(c.target, c.filled, pos, pos + n);
        c.filled += n;
        pos += n;
        if (c.filled === c.need) {
          this.collector = null;
          emit(c.finish(c.target));
        }
        continue;
      }
      const used = this.parseOne(buf, pos, emit);
      if (used === 0) break;
      pos += used;
    }
    // A copy, not a view: the caller may reuse `chunk` for its next read,
    // and a view would pin the whole chunk for the sake of a few bytes.
    if (pos < buf.length && !this.dead) this.carry = Buffer.from(buf.subarray(pos));
  }

  /**
   * Parse one message at buf[pos]. Returns the bytes consumed, or 0 when more
   * input is needed. May start payload collection via `collectPayload`.
   */
  protected abstract parseOne(buf: Buffer, pos: number, emit: (msg: M) => void): number;

  /**
   * The header at buf[pos..pos+headerLen) announces `payloadLen` bytes after
   * it. If they are all here, finish with a view; otherwise collect them
   * (or skip them when `keep` is false). Returns bytes consumed.
   */
  protected takePayload(
    buf: Buffer,
    pos: number,
    headerLen: number,
    payloadLen: number,
    keep: boolean,
    emit: (msg: M) => void,
    finish: (payload: Buffer | null) => M,
    alloc: (length: number) => Buffer = Buffer.allocUnsafe,
    viewable = false,
  ): number {
    const start = pos + headerLen;
    const avail = buf.length - start;
    if (avail >= payloadLen) {
      let payload: Buffer | null = null;
      if (keep && this.inputReused) {
        payload = viewable && this.viewOfInput ? this.viewOfInput(buf, start, payloadLen) : null;
        if (payload === null) {
          payload = alloc(payloadLen);
          buf.copy(payload, 0, start, start + payloadLen);
        }
      } else if (keep) payload = buf.subarray(start, start + payloadLen);
      emit(finish(payload));
      return headerLen + payloadLen;
    }
    this.collector = {
      target: keep ? alloc(payloadLen) : null,
      filled: 0,
      need: payloadLen,
      finish,
    };
    return headerLen;
  }

  /**
   * Like takePayload, but the payload's bytes go into `dest` (exactly
   * payloadLen long), copied from the input as they arrive.
   */
  protected takePayloadInto(
    buf: Buffer,
    pos: number,
    headerLen: number,
    dest: Buffer,
    emit: (msg: M) => void,
    finish: () => M,
  ): number {
    const start = pos + headerLen;
    const payloadLen = dest.length;
    if (buf.length - start >= payloadLen) {
      buf.copy(dest, 0, start, start + payloadLen);
      emit(finish());
      return headerLen + payloadLen;
    }
    this.collector = { target: dest, filled: 0, need: payloadLen, finish: () => finish() };
    return headerLen;
  }

  protected fail(emit: (msg: M) => void, message: string): number {
    this.dead = true;
    this.carry = null;
    this.collector = null;
    emit({ type: 'protocolError', message } as unknown as M);
    return 0;
  }
}

export type ServerParsePhase = 'clientFlags' | 'options' | 'transmission';

export interface ClientStreamParserOptions {
  /** Largest WRITE payload to accept; larger ones are skipped. */
  maxPayload?: number;
  /** Largest option payload to buffer; larger ones are skipped. */
  maxOptionLength?: number;
  /**
   * Where a WRITE payload that arrived split is assembled (default: a new
   * buffer of exactly its length). Payloads that arrived whole are views,
   * unless inputReused.
   */
  allocWritePayload?: (length: number) => Buffer;
  /**
   * The caller feeds every chunk from one reused buffer: every payload is
   * copied out (WRITE payloads into allocWritePayload buffers).
   */
  inputReused?: boolean;
}

/** Parses the client-to-server byte stream (used by servers). */
export class ClientStreamParser extends IncrementalParser<ClientMessage> {
  phase: ServerParsePhase = 'clientFlags';
  readonly maxPayload: number;
  readonly maxOptionLength: number;
  private readonly allocWritePayload: (length: number) => Buffer;

  constructor(opts: ClientStreamParserOptions = {}) {
    super();
    this.maxPayload = opts.maxPayload ?? MAX_PAYLOAD;
    this.maxOptionLength = opts.maxOptionLength ?? MAX_OPTION_LENGTH;
    this.allocWritePayload = opts.allocWritePayload ?? Buffer.allocUnsafe;
    this.inputReused = !!opts.inputReused;
  }

  protected parseOne(buf: Buffer, pos: number, emit: (msg: ClientMessage) => void): number {
    const avail = buf.length - pos;
    switch (this.phase) {
      case 'clientFlags': {
        if (avail < WireSize.ClientFlags) return 0;
        // Options follow immediately; the caller may switch back if it must.
        this.phase = 'options';
        emit({ type: 'clientFlags', flags: buf.readUInt32BE(pos) });
        return WireSize.ClientFlags;
      }
      case 'options': {
        if (avail < WireSize.OptionHeader) return 0;
        if (buf.readBigUInt64BE(pos) !== NBD_IHAVEOPT) {
          return this.fail(emit, 'bad option magic (expected IHAVEOPT)');
        }
        const option = buf.readUInt32BE(pos + 8);
        const length = buf.readUInt32BE(pos + 12);
        const keep = length <= this.maxOptionLength;
        return this.takePayload(buf, pos, WireSize.OptionHeader, length, keep, emit, (data) =>
          data ? { type: 'option', option, data } : { type: 'optionTooLarge', option, length },
        );
      }
      case 'transmission': {
        if (avail < WireSize.RequestHeader) return 0;
        const magic = buf.readUInt32BE(pos);
        if (magic !== NBD_REQUEST_MAGIC) {
          return this.fail(emit, `bad request magic 0x${magic.toString(16)}`);
        }
        const flags = buf.readUInt16BE(pos + 4);
        const command = buf.readUInt16BE(pos + 6);
        const cookie = buf.readBigUInt64BE(pos + 8);
        const offset = readU64(buf, pos + 16);
        const length = buf.readUInt32BE(pos + 24);
        if (command !== Command.Write) {
          emit({ type: 'request', flags, command, cookie, offset, length, payload: null, payloadSkipped: false });
          return WireSize.RequestHeader;
        }
        const keep = length <= this.maxPayload;
        return this.takePayload(buf, pos, WireSize.RequestHeader, length, keep, emit, (payload) => ({
          type: 'request',
          flags,
          command,
          cookie,
          offset,
          length,
          payload,
          payloadSkipped: !keep,
        }), this.allocWritePayload, true);
      }
    }
  }
}

export type ClientParsePhase = 'greeting' | 'options' | 'exportNameReply' | 'transmission';

export interface ServerStreamParserOptions {
  maxPayload?: number;
  maxOptionLength?: number;
  /**
   * For simple replies: how many data bytes follow a successful reply to
   * this cookie (the READ length), or 0. Simple replies do not say.
   */
  readLengthOf?: (cookie: bigint) => number;
  /**
   * Where READ data should land: return a buffer of exactly `length` bytes
   * and the parser copies the data straight into it from the input (no
   * payload assembled on the side, no view into the input kept), or null to
   * get the data as an ordinary payload. `offset` is the export offset of an
   * OFFSET_DATA chunk's data, or null for a simple reply's data.
   * Delivered OFFSET_DATA chunks arrive as 'offsetDataDelivered' messages;
   * delivered simple replies carry the chosen buffer as their data.
   */
  readInto?: (cookie: bigint, offset: number | null, length: number) => Buffer | null;
}

/** Parses the server-to-client byte stream (used by clients). */
export class ServerStreamParser extends IncrementalParser<ServerMessage> {
  phase: ClientParsePhase = 'greeting';
  /** Set when the client negotiated NO_ZEROES (affects the EXPORT_NAME reply). */
  noZeroes = false;
  readonly maxPayload: number;
  readonly maxOptionLength: number;
  private readonly readLengthOf: (cookie: bigint) => number;
  private readonly readInto: ServerStreamParserOptions['readInto'] | null;

  constructor(opts: ServerStreamParserOptions = {}) {
    super();
    this.maxPayload = opts.maxPayload ?? MAX_PAYLOAD;
    this.maxOptionLength = opts.maxOptionLength ?? MAX_OPTION_LENGTH;
    this.readLengthOf = opts.readLengthOf ?? (() => 0);
    this.readInto = opts.readInto ?? null;
  }

  protected parseOne(buf: Buffer, pos: number, emit: (msg: ServerMessage) => void): number {
    const avail = buf.length - pos;
    switch (this.phase) {
      case 'greeting': {
        if (avail < WireSize.Greeting) return 0;
        if (buf.readBigUInt64BE(pos) !== NBD_MAGIC) return this.fail(emit, 'not an NBD server (bad magic)');
        if (buf.readBigUInt64BE(pos + 8) !== NBD_IHAVEOPT) {
          return this.fail(emit, 'server does not speak newstyle NBD');
        }
        this.phase = 'options';
        emit({ type: 'greeting', flags: buf.readUInt16BE(pos + 16) });
        return WireSize.Greeting;
      }
      case 'options': {
        if (avail < WireSize.OptionReplyHeader) return 0;
        if (buf.readBigUInt64BE(pos) !== NBD_OPTION_REPLY_MAGIC) {
          return this.fail(emit, 'bad option reply magic');
        }
        const option = buf.readUInt32BE(pos + 8);
        const replyType = buf.readUInt32BE(pos + 12);
        const length = buf.readUInt32BE(pos + 16);
        if (length > this.maxOptionLength) return this.fail(emit, `option reply too large (${length} bytes)`);
        return this.takePayload(buf, pos, WireSize.OptionReplyHeader, length, true, emit, (data) => ({
          type: 'optionReply',
          option,
          replyType,
          data: data as Buffer,
        }));
      }
      case 'exportNameReply': {
        const need = WireSize.ExportNameReply + (this.noZeroes ? 0 : WireSize.ExportNameZeroPad);
        if (avail < need) return 0;
        this.phase = 'transmission';
        emit({ type: 'exportNameReply', size: readU64(buf, pos), flags: buf.readUInt16BE(pos + 8) });
        return need;
      }
      case 'transmission': {
        if (avail < 4) return 0;
        const magic = buf.readUInt32BE(pos);
        if (magic === NBD_SIMPLE_REPLY_MAGIC) {
          if (avail < WireSize.SimpleReplyHeader) return 0;
          const error = buf.readUInt32BE(pos + 4);
          const cookie = buf.readBigUInt64BE(pos + 8);
          const dataLen = error === 0 ? this.readLengthOf(cookie) : 0;
          if (dataLen === 0) {
            emit({ type: 'simpleReply', cookie, error, data: null });
            return WireSize.SimpleReplyHeader;
          }
          const dest = this.readInto?.(cookie, null, dataLen) ?? null;
          if (dest && dest.length === dataLen) {
            return this.takePayloadInto(buf, pos, WireSize.SimpleReplyHeader, dest, emit, () => ({
              type: 'simpleReply',
              cookie,
              error,
              data: dest,
            }));
          }
          return this.takePayload(buf, pos, WireSize.SimpleReplyHeader, dataLen, true, emit, (data) => ({
            type: 'simpleReply',
            cookie,
            error,
            data,
          }));
        }
        if (magic === NBD_STRUCTURED_REPLY_MAGIC) {
          if (avail < WireSize.StructuredReplyHeader) return 0;
          const flags = buf.readUInt16BE(pos + 4);
          const chunkType = buf.readUInt16BE(pos + 6);
          const cookie = buf.readBigUInt64BE(pos + 8);
          const length = buf.readUInt32BE(pos + 16);
          // Data chunks carry an 8-byte offset before the data.
          if (length > this.maxPayload + 8) return this.fail(emit, `reply chunk too large (${length} bytes)`);
          if (this.readInto && chunkType === ReplyType.OffsetData && length > 8) {
            // Wait for the data offset too, then ask where the data goes.
            const headerLen = WireSize.StructuredReplyHeader + 8;
            if (avail < headerLen) return 0;
            const offset = readU64(buf, pos + WireSize.StructuredReplyHeader);
            const dataLen = length - 8;
            const dest = this.readInto(cookie, offset, dataLen);
            if (dest && dest.length === dataLen) {
              return this.takePayloadInto(buf, pos, headerLen, dest, emit, () => ({
                type: 'offsetDataDelivered',
                cookie,
                flags,
                offset,
                length: dataLen,
              }));
            }
          }
          return this.takePayload(buf, pos, WireSize.StructuredReplyHeader, length, true, emit, (payload) => ({
            type: 'structuredChunk',
            cookie,
            flags,
            chunkType,
            payload: payload as Buffer,
          }));
        }
        return this.fail(emit, `bad reply magic 0x${magic.toString(16)}`);
      }
    }
  }
}
