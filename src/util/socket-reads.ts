// Sockets that read into memory we choose.
//
// parserReadHooks: the `onread` hooks of a connection whose bytes go to an
// incremental NBD parser: reads land in one reused buffer, or, while the
// parser assembles a large payload, straight into that payload (no copy).
//
// slabReadHooks: the same for a server, whose WRITE payloads that arrive
// whole stay where they were read (slabs) until released, instead of being
// copied out of the reused buffer.
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

/** Read hooks whose reads go into slabs (slabReadHooks). */
export interface SlabReadHooks extends ReadHooks {
  /**
   * The caller is done with a payload the parser handed out: true if it was
   * a view of a read slab (its place there may now be read into again),
   * false if it was not, and is the caller's to recycle.
   */
  release: (payload: Buffer) => boolean;
}

/** The parts of an nbd-protocol parser the read hooks drive. */
export interface ReadableParser<M> {
  readonly collectingInto: Buffer | null;
  collected(n: number, emit: (msg: M) => void): void;
  push(chunk: Buffer, emit: (msg: M) => void): void;
  viewOfInput?: ((buf: Buffer, start: number, length: number) => Buffer | null) | null;
}

/** Size of a connection's reused read buffer, and of a read slab. */
const SOCKET_READ_BUFFER = 256 * 1024;
/** A slab with less room left than this is not read into again until it is free. */
const SLAB_MIN_ROOM = 64 * 1024;
/**
 * Slabs per connection. They are allocated once and kept with the
 * connection: slabs dropped and allocated anew as views came and went
 * raised test/load-backup's peak RSS (8 connections) from about 400 to
 * 418-432 MiB.
 */
export const SLABS_PER_CONNECTION = 3;
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

/**
 * A server's read hooks, where WRITE payloads that arrive whole are not
 * copied out at all: reads go into slabs, and such a payload is handed out
 * as a view of its slab, which is not read into again until every payload
 * in it was released. Copying each payload out of one reused buffer was
 * 8 % of nbd-cbw's CPU under 32 KiB random writes (a memcpy per write).
 *
 * A connection has up to SLABS_PER_CONNECTION slabs, each:
 *   current   reads go into its free tail; views of it may be out
 *   pinned    not read into (too little room left), views still out
 *   free      no views out: the next to become current
 * When the current slab is short of room and every other one is pinned,
 * reads go into a spare buffer, from which payloads are copied out as
 * before. A view never released (a request dropped with its connection)
 * keeps its slab pinned: the slabs go with the connection.
 */
export function slabReadHooks<M>(parser: ReadableParser<M>, emit: (msg: M) => void): SlabReadHooks {
  interface Slab {
    buf: Buffer;
    /** Views handed out and not released. */
    views: number;
    /** Bytes read into it so far: the next read goes after them. */
    used: number;
  }
  const slabs: Slab[] = [];
  let current: Slab | null = null;
  let spare: Buffer | null = null;
  let directRead: Buffer | null = null;
  let slabRead: Buffer | null = null;
  /** The current slab if it can take a read, else a free or new one, else null. */
  const slabForRead = (): Slab | null => {
    if (current !== null && current.views === 0) current.used = 0;
    if (current !== null && current.buf.length - current.used >= SLAB_MIN_ROOM) return current;
    for (const idle of slabs) {
      if (idle.views === 0) {
        idle.used = 0;
        return idle;
      }
    }
    if (slabs.length >= SLABS_PER_CONNECTION) return null;
    const fresh = { buf: Buffer.allocUnsafeSlow(SOCKET_READ_BUFFER), views: 0, used: 0 };
    slabs.push(fresh);
    return fresh;
  };
  parser.viewOfInput = (buf, start, length) => {
    const ab = buf.buffer;
    if (current !== null && ab === current.buf.buffer) {
      current.views++;
      return buf.subarray(start, start + length);
    }
    // The spare buffer is read into again at once: copy. Anything else is
    // the parser's own buffer for a message split across reads, never
    // reused.
    if (spare !== null && ab === spare.buffer) return null;
    return buf.subarray(start, start + length);
  };
  return {
    buffer: () => {
      const into = parser.collectingInto;
      directRead = into !== null && into.length >= DIRECT_READ_MIN ? into : null;
      if (directRead) return directRead;
      const slab = slabForRead();
      if (slab === null) {
        slabRead = null;
        spare ??= Buffer.allocUnsafeSlow(SOCKET_READ_BUFFER);
        return spare;
      }
      current = slab;
      slabRead = slab.buf.subarray(slab.used);
      return slabRead;
    },
    callback: (n, buf) => {
      if (buf === directRead) {
        directRead = null;
        parser.collected(n, emit);
      } else {
        // Counted before the parser runs: views it hands out lie below `used`.
        if (buf === slabRead && current !== null) current.used += n;
        parser.push(buf.subarray(0, n), emit);
      }
      return true;
    },
    release: (payload) => {
      const ab = payload.buffer;
      for (const slab of slabs) {
        if (ab === slab.buf.buffer) {
          slab.views--;
          return true;
        }
      }
      return false;
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
