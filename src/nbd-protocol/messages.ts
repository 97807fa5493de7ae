// Messages as the parsers hand them out. Payloads are `subarray` views of the
// bytes received whenever the whole payload arrived in one chunk; they are
// only valid to keep as long as the caller keeps the Buffer alive (always,
// in Node: chunks are never reused).

/** What a client sends; parsed on the server side. */
export type ClientMessage =
  | { type: 'clientFlags'; flags: number }
  | { type: 'option'; option: number; data: Buffer }
  /** An option whose payload exceeded the parser's limit; its bytes were skipped. */
  | { type: 'optionTooLarge'; option: number; length: number }
  | RequestMessage
  | ProtocolErrorMessage;

export interface RequestMessage {
  type: 'request';
  flags: number;
  command: number;
  cookie: bigint;
  /** Byte offset; exact below 2^53, which is past the end of any export. */
  offset: number;
  length: number;
  /** WRITE payload; null for other commands or when the payload was skipped. */
  payload: Buffer | null;
  /** True when a WRITE's payload was larger than allowed and was discarded unread. */
  payloadSkipped: boolean;
}

export interface ProtocolErrorMessage {
  type: 'protocolError';
  message: string;
}

/** What a server sends; parsed on the client side. */
export type ServerMessage =
  | { type: 'greeting'; flags: number }
  | { type: 'optionReply'; option: number; replyType: number; data: Buffer }
  | { type: 'exportNameReply'; size: number; flags: number }
  | SimpleReplyMessage
  | StructuredChunkMessage
  | OffsetDataDeliveredMessage
  | ProtocolErrorMessage;

export interface SimpleReplyMessage {
  type: 'simpleReply';
  cookie: bigint;
  error: number;
  /** READ data when error is 0 and the request was a READ. */
  data: Buffer | null;
}

export interface StructuredChunkMessage {
  type: 'structuredChunk';
  cookie: bigint;
  flags: number;
  chunkType: number;
  payload: Buffer;
}

/**
 * An NBD_REPLY_TYPE_OFFSET_DATA chunk whose data the parser copied straight
 * into the buffer its `readInto` hook chose (see ServerStreamParserOptions).
 */
export interface OffsetDataDeliveredMessage {
  type: 'offsetDataDelivered';
  cookie: bigint;
  flags: number;
  /** Offset of the data on the export. */
  offset: number;
  length: number;
}

export interface Extent {
  length: number;
  flags: number;
}

export interface ExportInfo {
  size: number;
  transmissionFlags: number;
}

export interface BlockSizeInfo {
  minimum: number;
  preferred: number;
  maximum: number;
}
