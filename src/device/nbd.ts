// A BlockDevice backed by an NBD export (qemu-nbd, nbdkit, an rbd export).
// Capabilities are exactly what the server advertised; requests larger than
// the server's maximum are split, and reads larger than 512 KiB too (see
// READ_REQUEST_MAX).
//
// Reconnection: when the connection drops, requests wait while we reconnect
// with backoff, for at most the reconnect window; then they are retried on
// the new connection (reads, writes, zeroes, trims and flushes are all safe
// to repeat: the same bytes land at the same place). Past the window they
// fail with EIO. A write is never reported done unless a server acknowledged
// it.

import { CommandFlag, NbdError, TransmissionFlag } from '../nbd-protocol';
import { ConnectionLostError, NbdClient, type NbdClientOptions } from '../client/client';
import type { NbdAddress } from '../client/uri';
import { backoffMs, sleep } from '../copy/sync';
import { settleAll } from '../util/settle';
import {
  DeviceError,
  type BlockDevice,
  type BlockSizes,
  type DeviceCapabilities,
  type Extent,
  type WriteOptions,
  type ZeroOptions,
} from './types';

const MAX_REQUEST = 32 * 1024 * 1024;

/**
 * Largest READ sent to the server as one request; longer reads go out as
 * several, in flight together. NBD servers read into a buffer allocated per
 * request, and multi-MiB ones cost them fresh memory each time (page
 * faults, zeroing): qemu-nbd spent 0.62-0.74 CPU-s per GiB read in 4 MiB
 * requests and 0.36-0.40 in 512 KiB ones, and through nbd-cbw fio's 1 MiB
 * sequential reads went from 0.62-0.73 of qemu-nbd's direct IOPS to
 * 0.85-1.02 (scripts/bench/passthrough). nbdcopy sends 256 KiB.
 */
const READ_REQUEST_MAX = 512 * 1024;

export interface NbdDeviceOptions extends NbdClientOptions {
  /** How long to keep reconnecting after the connection drops; 0 = fail at once. */
  reconnectWindowMs?: number;
  log?: (msg: string) => void;
}

export class NbdDevice implements BlockDevice {
  readonly size: number;
  readonly capabilities: DeviceCapabilities;
  readonly blockSizes: BlockSizes;
  readonly description: string;
  private readonly maxRequest: number;
  private readonly maxReadRequest: number;
  private client: NbdClient;
  private reconnecting: Promise<NbdClient> | null = null;
  private closed = false;

  constructor(
    client: NbdClient,
    private readonly addr: NbdAddress | null = null,
    private readonly opts: NbdDeviceOptions = {},
  ) {
    this.client = client;
    const f = client.transmissionFlags;
    this.size = client.size;
    this.capabilities = {
      readOnly: (f & TransmissionFlag.ReadOnly) !== 0,
      flush: (f & TransmissionFlag.SendFlush) !== 0,
      fua: (f & TransmissionFlag.SendFua) !== 0,
      trim: (f & TransmissionFlag.SendTrim) !== 0,
      zero: (f & TransmissionFlag.SendWriteZeroes) !== 0,
      fastZero: (f & TransmissionFlag.SendFastZero) !== 0,
      cache: (f & TransmissionFlag.SendCache) !== 0,
      blockStatus: client.baseAllocationId !== null,
      multiConn: (f & TransmissionFlag.CanMultiConn) !== 0,
    };
    const bs = client.blockSizes;
    this.blockSizes = {
      minimum: bs?.minimum ?? 1,
      preferred: bs?.preferred ?? 4096,
      maximum: Math.min(bs?.maximum || MAX_REQUEST, MAX_REQUEST),
    };
    this.maxRequest = this.blockSizes.maximum;
    this.maxReadRequest = Math.min(this.maxRequest, Math.max(READ_REQUEST_MAX, this.blockSizes.minimum));
    this.description = `nbd ${client.uri}`;
  }

  static async open(addr: NbdAddress, opts: NbdDeviceOptions = {}): Promise<NbdDevice> {
    return new NbdDevice(await NbdClient.connect(addr, opts), addr, opts);
  }

  nbdAddress(): NbdAddress {
    return this.client.address;
  }

  /**
   * Run `op` on a live connection, reconnecting within the window if it
   * drops. The common case (connected) adds no async frame of its own: this
   * is on every proxied request.
   */
  private withClient<T>(op: (c: NbdClient) => Promise<T>): Promise<T> {
    const windowMs = this.opts.reconnectWindowMs ?? 0;
    if (this.client.isClosed) return this.withClientRetrying(op, Date.now() + windowMs);
    const first = op(this.client);
    if (!this.addr || windowMs <= 0) return first;
    // The window counts from the drop (no clock read per request).
    return first.catch((e: unknown) => {
      if (!(e instanceof ConnectionLostError) || this.closed) throw e;
      return this.withClientRetrying(op, Date.now() + windowMs);
    });
  }

  private async withClientRetrying<T>(op: (c: NbdClient) => Promise<T>, deadline: number): Promise<T> {
    const windowMs = this.opts.reconnectWindowMs ?? 0;
    for (;;) {
      const client = this.client.isClosed ? await this.reconnect(deadline) : this.client;
      try {
        return await op(client);
      } catch (e) {
        if (!(e instanceof ConnectionLostError) || !this.addr || windowMs <= 0 || this.closed) throw e;
        if (Date.now() >= deadline) throw e;
      }
    }
  }

  private reconnect(deadline: number): Promise<NbdClient> {
    if (!this.reconnecting) {
      const windowEnd = Date.now() + (this.opts.reconnectWindowMs ?? 0);
      this.reconnecting = this.reconnectLoop(windowEnd).finally(() => {
        this.reconnecting = null;
      });
    }
    return this.reconnecting.then((c) => {
      if (Date.now() > deadline && c.isClosed) throw new DeviceError(NbdError.EIO, 'source connection lost');
      return c;
    });
  }

  private async reconnectLoop(windowEnd: number): Promise<NbdClient> {
    const addr = this.addr as NbdAddress;
    let lastError: unknown = null;
    for (let attempt = 0; Date.now() < windowEnd && !this.closed; attempt++) {
      try {
        const c = await NbdClient.connect(addr, {
          ...this.opts,
          connectTimeoutMs: Math.max(100, Math.min(5000, windowEnd - Date.now())),
        });
        if (c.size !== this.size) {
          await c.close();
          throw new Error(`source size changed from ${this.size} to ${c.size} bytes`);
        }
        this.client = c;
        this.opts.log?.(`reconnected to ${c.uri}`);
        return c;
      } catch (e) {
        lastError = e;
        await sleep(Math.min(backoffMs(attempt, 50, 2000), Math.max(0, windowEnd - Date.now())));
      }
    }
    const why = lastError instanceof Error ? `: ${lastError.message}` : '';
    throw new DeviceError(NbdError.EIO, `source connection lost and not back within the reconnect window${why}`);
  }

  read(offset: number, length: number, into?: Buffer): Promise<Buffer> {
    if (length <= this.maxReadRequest) return this.withClient((c) => c.read(offset, length, into));
    return this.readSplit(offset, length, into);
  }

  private async readSplit(offset: number, length: number, into?: Buffer): Promise<Buffer> {
    const max = this.maxReadRequest;
    const out = into ?? Buffer.allocUnsafe(length);
    const parts: Promise<Buffer>[] = [];
    for (let at = 0; at < length; at += max) {
      const n = Math.min(max, length - at);
      parts.push(this.withClient((c) => c.read(offset + at, n, out.subarray(at, at + n))));
    }
    // A caller reusing `into` after a failure must not have a late part still filling it.
    await settleAll(parts);
    return out;
  }

  write(offset: number, data: Buffer, opts?: WriteOptions): Promise<void> {
    const fua = !!opts?.fua && this.capabilities.fua;
    if (data.length <= this.maxRequest) return this.withClient((c) => c.write(offset, data, fua));
    return this.writeSplit(offset, data, fua);
  }

  private async writeSplit(offset: number, data: Buffer, fua: boolean): Promise<void> {
    const parts: Promise<void>[] = [];
    for (let at = 0; at < data.length; at += this.maxRequest) {
      const piece = data.subarray(at, at + this.maxRequest);
      parts.push(this.withClient((c) => c.write(offset + at, piece, fua)));
    }
    // Every part settled before this settles: the caller may reuse `data`
    // then (a read slab's view), and a late part must not still be sending it.
    await settleAll(parts);
  }

  async zero(offset: number, length: number, opts?: ZeroOptions): Promise<void> {
    if (!this.capabilities.zero) {
      if (opts?.fastOnly) throw new DeviceError(NbdError.ENOTSUP, 'source cannot zero quickly');
      return this.writeZeroBuffers(offset, length, opts);
    }
    let flags = 0;
    if (opts?.fua && this.capabilities.fua) flags |= CommandFlag.Fua;
    if (!opts?.mayTrim) flags |= CommandFlag.NoHole;
    if (opts?.fastOnly) {
      if (!this.capabilities.fastZero) throw new DeviceError(NbdError.ENOTSUP, 'source cannot zero quickly');
      flags |= CommandFlag.FastZero;
    }
    return this.withClient((c) => c.zero(offset, length, flags));
  }

  private async writeZeroBuffers(offset: number, length: number, opts?: ZeroOptions): Promise<void> {
    const zeros = Buffer.alloc(Math.min(length, 1024 * 1024));
    for (let at = 0; at < length; at += zeros.length) {
      const n = Math.min(zeros.length, length - at);
      await this.write(offset + at, zeros.subarray(0, n), opts);
    }
  }

  async trim(offset: number, length: number, opts?: WriteOptions): Promise<void> {
    if (!this.capabilities.trim) return; // advisory
    return this.withClient((c) => c.trim(offset, length, !!opts?.fua && this.capabilities.fua));
  }

  async flush(): Promise<void> {
    if (this.capabilities.flush) await this.withClient((c) => c.flush());
  }

  async cache(offset: number, length: number): Promise<void> {
    if (this.capabilities.cache) await this.withClient((c) => c.cache(offset, length));
  }

  async blockStatus(offset: number, length: number): Promise<Extent[]> {
    if (!this.capabilities.blockStatus) return [{ length, flags: 0 }];
    // Lengths are 32-bit on the wire; ask for at most ~4 GiB at a time.
    return this.withClient((c) => c.blockStatus(offset, Math.min(length, 0xffffffff - 0xffff)));
  }

  /**
   * Bounded in time: a server that takes one client at a time (qemu-nbd's
   * default --shared=1) accepts the connection but never answers it.
   */
  async reopen(timeoutMs = 3000): Promise<BlockDevice> {
    if (!this.addr) throw new Error('no address to reconnect to');
    const dev = await NbdDevice.open(this.addr, { ...this.opts, connectTimeoutMs: timeoutMs });
    if (dev.size !== this.size) {
      await dev.close();
      throw new Error(`source size changed from ${this.size} to ${dev.size} bytes`);
    }
    return dev;
  }

  async close(): Promise<void> {
    this.closed = true;
    await this.client.close();
  }
}
