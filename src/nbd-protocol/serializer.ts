// Builders for every NBD message, both directions. Each returns a Buffer (or,
// for replies with data, just the header: the caller sends header and data
// together so the data is never copied).

import {
  ClientFlag,
  InfoType,
  NBD_IHAVEOPT,
  NBD_MAGIC,
  NBD_OPTION_REPLY_MAGIC,
  NBD_REQUEST_MAGIC,
  NBD_SIMPLE_REPLY_MAGIC,
  NBD_STRUCTURED_REPLY_MAGIC,
  ReplyType,
  WireSize,
} from './constants';
import type { BlockSizeInfo, Extent } from './messages';

const TWO_32 = 4294967296;

export function writeU64(buf: Buffer, value: number, at: number): void {
  buf.writeUInt32BE(Math.floor(value / TWO_32) >>> 0, at);
  buf.writeUInt32BE(value % TWO_32 >>> 0, at + 4);
}

function lengthPrefixed(str: string | Buffer, prefixBytes: 2 | 4): Buffer {
  const body = typeof str === 'string' ? Buffer.from(str, 'utf8') : str;
  const out = Buffer.allocUnsafe(prefixBytes + body.length);
  if (prefixBytes === 4) out.writeUInt32BE(body.length, 0);
  else out.writeUInt16BE(body.length, 0);
  body.copy(out, prefixBytes);
  return out;
}

// ---------------------------------------------------------------- handshake

export function greeting(handshakeFlags: number): Buffer {
  const b = Buffer.allocUnsafe(WireSize.Greeting);
  b.writeBigUInt64BE(NBD_MAGIC, 0);
  b.writeBigUInt64BE(NBD_IHAVEOPT, 8);
  b.writeUInt16BE(handshakeFlags, 16);
  return b;
}

export function clientFlags(flags: number = ClientFlag.FixedNewstyle | ClientFlag.NoZeroes): Buffer {
  const b = Buffer.allocUnsafe(4);
  b.writeUInt32BE(flags >>> 0, 0);
  return b;
}

export function option(opt: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const b = Buffer.allocUnsafe(WireSize.OptionHeader + data.length);
  b.writeBigUInt64BE(NBD_IHAVEOPT, 0);
  b.writeUInt32BE(opt >>> 0, 8);
  b.writeUInt32BE(data.length, 12);
  data.copy(b, WireSize.OptionHeader);
  return b;
}

/** Payload of INFO and GO: export name and the info types requested. */
export function infoRequestData(exportName: string, infoTypes: readonly number[]): Buffer {
  const name = lengthPrefixed(exportName, 4);
  const tail = Buffer.allocUnsafe(2 + 2 * infoTypes.length);
  tail.writeUInt16BE(infoTypes.length, 0);
  infoTypes.forEach((t, i) => tail.writeUInt16BE(t, 2 + 2 * i));
  return Buffer.concat([name, tail]);
}

/** Payload of LIST_META_CONTEXT and SET_META_CONTEXT. */
export function metaContextRequestData(exportName: string, queries: readonly string[]): Buffer {
  const parts = [lengthPrefixed(exportName, 4), Buffer.allocUnsafe(4)];
  parts[1].writeUInt32BE(queries.length, 0);
  for (const q of queries) parts.push(lengthPrefixed(q, 4));
  return Buffer.concat(parts);
}

export function optionReply(opt: number, replyType: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const b = Buffer.allocUnsafe(WireSize.OptionReplyHeader + data.length);
  b.writeBigUInt64BE(NBD_OPTION_REPLY_MAGIC, 0);
  b.writeUInt32BE(opt >>> 0, 8);
  b.writeUInt32BE(replyType >>> 0, 12);
  b.writeUInt32BE(data.length, 16);
  data.copy(b, WireSize.OptionReplyHeader);
  return b;
}

/** An error option reply; the message is human-readable text. */
export function optionError(opt: number, replyType: number, message = ''): Buffer {
  return optionReply(opt, replyType, Buffer.from(message, 'utf8'));
}

export function infoExportData(size: number, transmissionFlags: number): Buffer {
  const b = Buffer.allocUnsafe(12);
  b.writeUInt16BE(InfoType.Export, 0);
  writeU64(b, size, 2);
  b.writeUInt16BE(transmissionFlags, 10);
  return b;
}

export function infoNameData(name: string): Buffer {
  return Buffer.concat([u16(InfoType.Name), Buffer.from(name, 'utf8')]);
}

export function infoDescriptionData(description: string): Buffer {
  return Buffer.concat([u16(InfoType.Description), Buffer.from(description, 'utf8')]);
}

export function infoBlockSizeData(bs: BlockSizeInfo): Buffer {
  const b = Buffer.allocUnsafe(14);
  b.writeUInt16BE(InfoType.BlockSize, 0);
  b.writeUInt32BE(bs.minimum, 2);
  b.writeUInt32BE(bs.preferred, 6);
  b.writeUInt32BE(bs.maximum, 10);
  return b;
}

/** NBD_REP_SERVER payload for LIST. */
export function serverListData(name: string, description = ''): Buffer {
  return Buffer.concat([lengthPrefixed(name, 4), Buffer.from(description, 'utf8')]);
}

/** NBD_REP_META_CONTEXT payload. */
export function metaContextData(contextId: number, name: string): Buffer {
  const b = Buffer.allocUnsafe(4);
  b.writeUInt32BE(contextId >>> 0, 0);
  return Buffer.concat([b, Buffer.from(name, 'utf8')]);
}

/** The reply to EXPORT_NAME (no option reply header). */
export function exportNameReply(size: number, transmissionFlags: number, noZeroes: boolean): Buffer {
  const b = Buffer.alloc(WireSize.ExportNameReply + (noZeroes ? 0 : WireSize.ExportNameZeroPad));
  writeU64(b, size, 0);
  b.writeUInt16BE(transmissionFlags, 8);
  return b;
}

function u16(v: number): Buffer {
  const b = Buffer.allocUnsafe(2);
  b.writeUInt16BE(v, 0);
  return b;
}

// ------------------------------------------------------------- transmission

export function requestHeader(
  flags: number,
  command: number,
  cookie: bigint,
  offset: number,
  length: number,
): Buffer {
  const b = Buffer.allocUnsafe(WireSize.RequestHeader);
  b.writeUInt32BE(NBD_REQUEST_MAGIC, 0);
  b.writeUInt16BE(flags, 4);
  b.writeUInt16BE(command, 6);
  b.writeBigUInt64BE(cookie, 8);
  writeU64(b, offset, 16);
  b.writeUInt32BE(length >>> 0, 24);
  return b;
}

export function simpleReplyHeader(cookie: bigint, error: number): Buffer {
  const b = Buffer.allocUnsafe(WireSize.SimpleReplyHeader);
  b.writeUInt32BE(NBD_SIMPLE_REPLY_MAGIC, 0);
  b.writeUInt32BE(error >>> 0, 4);
  b.writeBigUInt64BE(cookie, 8);
  return b;
}

export function structuredReplyHeader(
  cookie: bigint,
  flags: number,
  chunkType: number,
  payloadLength: number,
  extra = 0,
): Buffer {
  const b = Buffer.allocUnsafe(WireSize.StructuredReplyHeader + extra);
  b.writeUInt32BE(NBD_STRUCTURED_REPLY_MAGIC, 0);
  b.writeUInt16BE(flags, 4);
  b.writeUInt16BE(chunkType, 6);
  b.writeBigUInt64BE(cookie, 8);
  b.writeUInt32BE(payloadLength >>> 0, 16);
  return b;
}

/** Header and offset of an OFFSET_DATA chunk; the data follows on the wire. */
export function offsetDataHeader(cookie: bigint, flags: number, offset: number, dataLength: number): Buffer {
  const b = structuredReplyHeader(cookie, flags, ReplyType.OffsetData, 8 + dataLength, 8);
  writeU64(b, offset, WireSize.StructuredReplyHeader);
  return b;
}

export function offsetHoleChunk(cookie: bigint, flags: number, offset: number, holeLength: number): Buffer {
  const b = structuredReplyHeader(cookie, flags, ReplyType.OffsetHole, 12, 12);
  writeU64(b, offset, 20);
  b.writeUInt32BE(holeLength >>> 0, 28);
  return b;
}

export function noneChunk(cookie: bigint): Buffer {
  return structuredReplyHeader(cookie, 1 /* DONE */, ReplyType.None, 0);
}

export function blockStatusChunk(
  cookie: bigint,
  flags: number,
  contextId: number,
  extents: readonly Extent[],
): Buffer {
  const len = 4 + 8 * extents.length;
  const b = structuredReplyHeader(cookie, flags, ReplyType.BlockStatus, len, len);
  let at = WireSize.StructuredReplyHeader;
  b.writeUInt32BE(contextId >>> 0, at);
  at += 4;
  for (const e of extents) {
    b.writeUInt32BE(e.length >>> 0, at);
    b.writeUInt32BE(e.flags >>> 0, at + 4);
    at += 8;
  }
  return b;
}

export function errorChunk(cookie: bigint, flags: number, error: number, message = '', offset?: number): Buffer {
  let msg = Buffer.from(message, 'utf8');
  if (msg.length > 4096) {
    // Cut at a character boundary: the message must stay valid UTF-8.
    let cut = 4096;
    while (cut > 0 && (msg[cut] & 0xc0) === 0x80) cut--;
    msg = msg.subarray(0, cut);
  }
  const withOffset = offset !== undefined;
  const len = 6 + msg.length + (withOffset ? 8 : 0);
  const b = structuredReplyHeader(
    cookie,
    flags,
    withOffset ? ReplyType.ErrorOffset : ReplyType.Error,
    len,
    len,
  );
  let at = WireSize.StructuredReplyHeader;
  b.writeUInt32BE(error >>> 0, at);
  b.writeUInt16BE(msg.length, at + 4);
  msg.copy(b, at + 6);
  if (withOffset) writeU64(b, offset, at + 6 + msg.length);
  return b;
}
