// NBD wire constants, mirroring doc/proto.md of the NetworkBlockDevice/nbd
// project. Plain `const enum`s so they inline to numbers.

export const NBD_MAGIC = 0x4e42444d41474943n; // "NBDMAGIC"
export const NBD_IHAVEOPT = 0x49484156454f5054n; // "IHAVEOPT"
export const NBD_OPTION_REPLY_MAGIC = 0x3e889045565a9n;
export const NBD_REQUEST_MAGIC = 0x25609513;
export const NBD_EXTENDED_REQUEST_MAGIC = 0x21e41c71;
export const NBD_SIMPLE_REPLY_MAGIC = 0x67446698;
export const NBD_STRUCTURED_REPLY_MAGIC = 0x668e33ef;

/** Sizes of fixed wire structures, in bytes. */
export const enum WireSize {
  Greeting = 18, // NBDMAGIC, IHAVEOPT, handshake flags
  ClientFlags = 4,
  OptionHeader = 16, // IHAVEOPT, option, length
  OptionReplyHeader = 20, // magic, option, reply type, length
  ExportNameReply = 10, // size, transmission flags
  ExportNameZeroPad = 124,
  RequestHeader = 28,
  SimpleReplyHeader = 16,
  StructuredReplyHeader = 20,
}

/** Handshake flags the server sends in its greeting. */
export const enum HandshakeFlag {
  FixedNewstyle = 1 << 0,
  NoZeroes = 1 << 1,
}

/** Flags the client answers the greeting with. */
export const enum ClientFlag {
  FixedNewstyle = 1 << 0,
  NoZeroes = 1 << 1,
}

/** Per-export transmission flags. */
export const enum TransmissionFlag {
  HasFlags = 1 << 0,
  ReadOnly = 1 << 1,
  SendFlush = 1 << 2,
  SendFua = 1 << 3,
  Rotational = 1 << 4,
  SendTrim = 1 << 5,
  SendWriteZeroes = 1 << 6,
  SendDf = 1 << 7,
  CanMultiConn = 1 << 8,
  SendResize = 1 << 9,
  SendCache = 1 << 10,
  SendFastZero = 1 << 11,
  BlockStatusPayload = 1 << 12,
}

export const enum Option {
  ExportName = 1,
  Abort = 2,
  List = 3,
  PeekExport = 4,
  StartTls = 5,
  Info = 6,
  Go = 7,
  StructuredReply = 8,
  ListMetaContext = 9,
  SetMetaContext = 10,
  ExtendedHeaders = 11,
}

export const NBD_REP_ERR_BIT = 0x80000000;

export const enum OptionReply {
  Ack = 1,
  Server = 2,
  Info = 3,
  MetaContext = 4,
  ErrUnsup = NBD_REP_ERR_BIT + 1,
  ErrPolicy = NBD_REP_ERR_BIT + 2,
  ErrInvalid = NBD_REP_ERR_BIT + 3,
  ErrPlatform = NBD_REP_ERR_BIT + 4,
  ErrTlsReqd = NBD_REP_ERR_BIT + 5,
  ErrUnknown = NBD_REP_ERR_BIT + 6,
  ErrShutdown = NBD_REP_ERR_BIT + 7,
  ErrBlockSizeReqd = NBD_REP_ERR_BIT + 8,
  ErrTooBig = NBD_REP_ERR_BIT + 9,
  ErrExtHeaderReqd = NBD_REP_ERR_BIT + 10,
}

export const enum InfoType {
  Export = 0,
  Name = 1,
  Description = 2,
  BlockSize = 3,
}

export const enum Command {
  Read = 0,
  Write = 1,
  Disc = 2,
  Flush = 3,
  Trim = 4,
  Cache = 5,
  WriteZeroes = 6,
  BlockStatus = 7,
  Resize = 8,
}

export const enum CommandFlag {
  Fua = 1 << 0,
  NoHole = 1 << 1,
  Df = 1 << 2,
  ReqOne = 1 << 3,
  FastZero = 1 << 4,
  PayloadLen = 1 << 5,
}

export const enum ReplyFlag {
  Done = 1 << 0,
}

export const enum ReplyType {
  None = 0,
  OffsetData = 1,
  OffsetHole = 2,
  BlockStatus = 5,
  BlockStatusExt = 6,
  Error = (1 << 15) + 1,
  ErrorOffset = (1 << 15) + 2,
}

/** Error values on the wire (not the host's errno numbering). */
export const enum NbdError {
  Ok = 0,
  EPERM = 1,
  EIO = 5,
  ENOMEM = 12,
  EINVAL = 22,
  ENOSPC = 28,
  EOVERFLOW = 75,
  ENOTSUP = 95,
  ESHUTDOWN = 108,
}

/** base:allocation status flags. */
export const enum AllocationFlag {
  Hole = 1 << 0,
  Zero = 1 << 1,
}

export const BASE_ALLOCATION = 'base:allocation';

/** Largest payload we accept or send in one request (qemu splits at 32 MiB). */
export const MAX_PAYLOAD = 32 * 1024 * 1024;
/** Options larger than this are not buffered (the spec suggests a few KiB). */
export const MAX_OPTION_LENGTH = 64 * 1024;
/** Longest export name or description string the spec allows. */
export const MAX_STRING = 4096;

export function commandName(type: number): string {
  switch (type) {
    case Command.Read: return 'read';
    case Command.Write: return 'write';
    case Command.Disc: return 'disc';
    case Command.Flush: return 'flush';
    case Command.Trim: return 'trim';
    case Command.Cache: return 'cache';
    case Command.WriteZeroes: return 'write_zeroes';
    case Command.BlockStatus: return 'block_status';
    case Command.Resize: return 'resize';
    default: return 'unknown';
  }
}

export function errorName(err: number): string {
  switch (err) {
    case NbdError.Ok: return 'OK';
    case NbdError.EPERM: return 'EPERM';
    case NbdError.EIO: return 'EIO';
    case NbdError.ENOMEM: return 'ENOMEM';
    case NbdError.EINVAL: return 'EINVAL';
    case NbdError.ENOSPC: return 'ENOSPC';
    case NbdError.EOVERFLOW: return 'EOVERFLOW';
    case NbdError.ENOTSUP: return 'ENOTSUP';
    case NbdError.ESHUTDOWN: return 'ESHUTDOWN';
    default: return `error ${err}`;
  }
}
