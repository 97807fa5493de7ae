// Decoders for option payloads and structured reply payloads. They validate
// lengths and return either the value or a string saying what is wrong, so
// the caller chooses between an error reply and closing the connection.

import { InfoType, MAX_STRING, ReplyType } from './constants';
import type { BlockSizeInfo, Extent } from './messages';
import { readU64 } from './parser';

export type Decoded<T> = { ok: true; value: T } | { ok: false; error: string };

const ok = <T>(value: T): Decoded<T> => ({ ok: true, value });
const bad = <T>(error: string): Decoded<T> => ({ ok: false, error });

export interface InfoRequest {
  exportName: string;
  infoTypes: number[];
}

/** INFO / GO option payload. */
export function decodeInfoRequest(data: Buffer): Decoded<InfoRequest> {
  if (data.length < 6) return bad('INFO/GO payload too short');
  const nameLen = data.readUInt32BE(0);
  if (nameLen > MAX_STRING) return bad('export name too long');
  if (data.length < 4 + nameLen + 2) return bad('INFO/GO payload too short for its name');
  const exportName = data.toString('utf8', 4, 4 + nameLen);
  const count = data.readUInt16BE(4 + nameLen);
  if (data.length !== 4 + nameLen + 2 + 2 * count) return bad('INFO/GO payload length does not match its info count');
  const infoTypes: number[] = [];
  for (let i = 0; i < count; i++) infoTypes.push(data.readUInt16BE(6 + nameLen + 2 * i));
  return ok({ exportName, infoTypes });
}

export interface MetaContextRequest {
  exportName: string;
  queries: string[];
}

/** LIST_META_CONTEXT / SET_META_CONTEXT option payload. */
export function decodeMetaContextRequest(data: Buffer): Decoded<MetaContextRequest> {
  if (data.length < 8) return bad('meta context payload too short');
  const nameLen = data.readUInt32BE(0);
  if (nameLen > MAX_STRING) return bad('export name too long');
  if (data.length < 4 + nameLen + 4) return bad('meta context payload too short for its name');
  const exportName = data.toString('utf8', 4, 4 + nameLen);
  const count = data.readUInt32BE(4 + nameLen);
  let at = 8 + nameLen;
  const queries: string[] = [];
  for (let i = 0; i < count; i++) {
    if (data.length < at + 4) return bad('meta context query truncated');
    const qLen = data.readUInt32BE(at);
    if (qLen > MAX_STRING) return bad('meta context query too long');
    if (data.length < at + 4 + qLen) return bad('meta context query truncated');
    queries.push(data.toString('utf8', at + 4, at + 4 + qLen));
    at += 4 + qLen;
  }
  if (at !== data.length) return bad('meta context payload has trailing bytes');
  return ok({ exportName, queries });
}

export type InfoReply =
  | { type: InfoType.Export; size: number; transmissionFlags: number }
  | { type: InfoType.Name; name: string }
  | { type: InfoType.Description; description: string }
  | { type: InfoType.BlockSize; blockSize: BlockSizeInfo }
  | { type: 'unknown'; infoType: number };

/** Payload of an NBD_REP_INFO reply. */
export function decodeInfoReply(data: Buffer): Decoded<InfoReply> {
  if (data.length < 2) return bad('NBD_REP_INFO too short');
  const t = data.readUInt16BE(0);
  switch (t) {
    case InfoType.Export:
      if (data.length !== 12) return bad('NBD_INFO_EXPORT has wrong length');
      return ok({ type: InfoType.Export, size: readU64(data, 2), transmissionFlags: data.readUInt16BE(10) });
    case InfoType.Name:
      return ok({ type: InfoType.Name, name: data.toString('utf8', 2) });
    case InfoType.Description:
      return ok({ type: InfoType.Description, description: data.toString('utf8', 2) });
    case InfoType.BlockSize:
      if (data.length !== 14) return bad('NBD_INFO_BLOCK_SIZE has wrong length');
      return ok({
        type: InfoType.BlockSize,
        blockSize: { minimum: data.readUInt32BE(2), preferred: data.readUInt32BE(6), maximum: data.readUInt32BE(10) },
      });
    default:
      return ok({ type: 'unknown', infoType: t });
  }
}

/** Payload of NBD_REP_SERVER (LIST). */
export function decodeServerListReply(data: Buffer): Decoded<{ name: string; description: string }> {
  if (data.length < 4) return bad('NBD_REP_SERVER too short');
  const n = data.readUInt32BE(0);
  if (data.length < 4 + n) return bad('NBD_REP_SERVER name truncated');
  return ok({ name: data.toString('utf8', 4, 4 + n), description: data.toString('utf8', 4 + n) });
}

/** Payload of NBD_REP_META_CONTEXT. */
export function decodeMetaContextReply(data: Buffer): Decoded<{ contextId: number; name: string }> {
  if (data.length < 4) return bad('NBD_REP_META_CONTEXT too short');
  return ok({ contextId: data.readUInt32BE(0), name: data.toString('utf8', 4) });
}

/** OFFSET_DATA payload: the data is a view. */
export function decodeOffsetData(payload: Buffer): Decoded<{ offset: number; data: Buffer }> {
  if (payload.length < 9) return bad('OFFSET_DATA chunk too short');
  return ok({ offset: readU64(payload, 0), data: payload.subarray(8) });
}

export function decodeOffsetHole(payload: Buffer): Decoded<{ offset: number; length: number }> {
  if (payload.length !== 12) return bad('OFFSET_HOLE chunk has wrong length');
  return ok({ offset: readU64(payload, 0), length: payload.readUInt32BE(8) });
}

export function decodeBlockStatus(payload: Buffer): Decoded<{ contextId: number; extents: Extent[] }> {
  if (payload.length < 12 || (payload.length - 4) % 8 !== 0) return bad('BLOCK_STATUS chunk has wrong length');
  const contextId = payload.readUInt32BE(0);
  const extents: Extent[] = [];
  for (let at = 4; at < payload.length; at += 8) {
    extents.push({ length: payload.readUInt32BE(at), flags: payload.readUInt32BE(at + 4) });
  }
  return ok({ contextId, extents });
}

export function decodeErrorChunk(
  chunkType: number,
  payload: Buffer,
): Decoded<{ error: number; message: string; offset?: number }> {
  if (payload.length < 6) return bad('error chunk too short');
  const error = payload.readUInt32BE(0);
  const msgLen = payload.readUInt16BE(4);
  const extra = chunkType === ReplyType.ErrorOffset ? 8 : 0;
  if (payload.length !== 6 + msgLen + extra) return bad('error chunk length does not match its message');
  const message = payload.toString('utf8', 6, 6 + msgLen);
  if (extra) return ok({ error, message, offset: readU64(payload, 6 + msgLen) });
  return ok({ error, message });
}

export function isErrorChunk(chunkType: number): boolean {
  return (chunkType & 0x8000) !== 0;
}
