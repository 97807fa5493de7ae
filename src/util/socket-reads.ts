// Sockets that read into memory we choose.
//
// parserReadHooks: the `onread` hooks of a connection whose bytes go to an
// incremental NBD parser: reads land in one reused buffer, or, while the
// parser assembles a large payload, straight into that payload (no copy).
//
// adoptWithReadHooks: Node reads every socket into a fresh 64 KiB allocation unless the socket
// was created with `onread`, and `net.Server` offers no way to pass that for
// the sockets it accepts. A busy guest then feeds V8 hundreds of MB/s of
// short-lived external memory: collections, and up to V8's 64 MiB external
// allocation allowance of garbage held as RSS. This moves a just-accepted
// socket's handle into a new net.Socket created with `onread`, the way Node
// itself builds sockets around handles. It relies on `_handle` and the
// `handle` constructor option, which Node does not document; when either is
// missing it returns null and the caller keeps the socket as it was.

import net from 'node:net';

export interface ReadHooks {
  /** The buffer the next read goes into (called before every read). */
  buffer: () => Buffer;
  /** `n` bytes arrived in `buf`; return false to pause reading. */
  callback: (n: number, buf: Buffer) => boolean;
}

/** The parts of an nbd-protocol parser the read hooks drive. */
export interface ReadableParser<M> {
  readonly collectingInto: Buffer | null;
  collected(n: number, emit: (msg: M) => void): void;
  push(chunk: Buffer, emit: (msg: M) => void): void;
}

/** Size of a connection's reused read buffer. */
const SOCKET_READ_BUFFER = 256 * 1024;
/** Smallest rest of a payload worth a read straight into its destination. */
export const DIRECT_READ_MIN = 16 * 1024;

/**
 * onread hooks feeding `parser`. The parser must not keep views of its
 * input past a push (it copies its carry; see inputReused / readInto).
 *
 * `headerReadLimit`, when given, is asked before each read that does not go
 * straight into a payload: a number means "the next message is a header
 * whose payload can go straight to its destination, read no more than
 * this". Without it, a read into the reused buffer takes the header and as
 * much payload as the socket holds (a few hundred KiB on a unix socket),
 * and all of that is then copied out: for a stream of 256 KiB READ
 * replies, most of the data. With it, the header comes alone and the
 * payload goes straight in. Any other message after it just takes more
 * reads; the parser accepts any split.
 */
export function parserReadHooks<M>(
  parser: ReadableParser<M>,
  emit: (msg: M) => void,
  headerReadLimit?: () => number | null,
): ReadHooks {
  let readBuffer: Buffer | null = null;
  let headerView: Buffer | null = null;
  /** The payload view handed out for the next read, if any. */
  let directRead: Buffer | null = null;
  return {
    buffer: () => {
      const into = parser.collectingInto;
      // Short remainders are left to the reused buffer, which takes them
      // together with the messages after them in one read.
      directRead = into !== null && into.length >= DIRECT_READ_MIN ? into : null;
      if (directRead) return directRead;
      readBuffer ??= Buffer.allocUnsafeSlow(SOCKET_READ_BUFFER);
      // A short remainder of a payload is read with the header after it
      // only: read in full, the next payload would be copied out too (a
      // 512 KiB reply arriving in socket-sized pieces often ends in one).
      const headerLimit = headerReadLimit?.() ?? null;
      const limit = headerLimit === null ? null : headerLimit + (into?.length ?? 0);
      if (limit === null || limit >= SOCKET_READ_BUFFER) return readBuffer;
      if (headerView?.length !== limit) headerView = readBuffer.subarray(0, limit);
      return headerView;
    },
    callback: (n, buf) => {
      if (buf === directRead) {
        directRead = null;
        parser.collected(n, emit);
      } else parser.push(buf.subarray(0, n), emit);
      return true;
    },
  };
}

interface SocketInternals {
  _handle?: object | null;
}

/**
 * Must be called in the 'connection' callback, before any I/O on `socket`.
 * On success `socket` is destroyed without closing the connection (the
 * server's bookkeeping sees it go) and the returned socket owns it.
 */
export function adoptWithReadHooks(socket: net.Socket, hooks: ReadHooks, allowHalfOpen: boolean): net.Socket | null {
  const internals = socket as unknown as SocketInternals;
  const handle = internals._handle;
  if (!handle || socket.destroyed || socket.readableLength > 0 || socket.bytesRead > 0) return null;
  let adopted: net.Socket;
  try {
    adopted = new net.Socket({ handle, allowHalfOpen, onread: hooks } as unknown as net.SocketConstructorOpts);
  } catch {
    return null;
  }
  if ((adopted as unknown as SocketInternals)._handle !== handle) {
    adopted.destroy();
    return null;
  }
  internals._handle = null;
  socket.destroy();
  return adopted;
}
