// A BlockDevice backed by an NBD export (qemu-nbd, nbdkit, an rbd export).
// Capabilities are exactly what the server advertised; requests larger than
// the server's maximum are split.

import { CommandFlag, NbdError, TransmissionFlag } from '../nbd-protocol';
import { NbdClient, type NbdClientOptions } from '../client/client';
import type { NbdAddress } from '../client/uri';
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

export class NbdDevice implements BlockDevice {
  readonly size: number;
  readonly capabilities: DeviceCapabilities;
  readonly blockSizes: BlockSizes;
  readonly description: string;
  private readonly maxRequest: number;

  constructor(readonly client: NbdClient) {
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
    this.description = `nbd ${client.uri}`;
  }

  static async open(addr: NbdAddress, opts?: NbdClientOptions): Promise<NbdDevice> {
    return new NbdDevice(await NbdClient.connect(addr, opts));
  }

  async read(offset: number, length: number, into?: Buffer): Promise<Buffer> {
    if (length <= this.maxRequest) return this.client.read(offset, length, into);
    const out = into ?? Buffer.allocUnsafe(length);
    const parts: Promise<Buffer>[] = [];
    for (let at = 0; at < length; at += this.maxRequest) {
      const n = Math.min(this.maxRequest, length - at);
      parts.push(this.client.read(offset + at, n, out.subarray(at, at + n)));
    }
    await Promise.all(parts);
    return out;
  }

  async write(offset: number, data: Buffer, opts?: WriteOptions): Promise<void> {
    const fua = !!opts?.fua && this.capabilities.fua;
    if (data.length <= this.maxRequest) return this.client.write(offset, data, fua);
    const parts: Promise<void>[] = [];
    for (let at = 0; at < data.length; at += this.maxRequest) {
      parts.push(this.client.write(offset + at, data.subarray(at, at + this.maxRequest), fua));
    }
    await Promise.all(parts);
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
    return this.client.zero(offset, length, flags);
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
    return this.client.trim(offset, length, !!opts?.fua && this.capabilities.fua);
  }

  async flush(): Promise<void> {
    if (this.capabilities.flush) await this.client.flush();
  }

  async cache(offset: number, length: number): Promise<void> {
    if (this.capabilities.cache) await this.client.cache(offset, length);
  }

  async blockStatus(offset: number, length: number): Promise<Extent[]> {
    if (!this.capabilities.blockStatus) return [{ length, flags: 0 }];
    // Lengths are 32-bit on the wire; ask for at most ~4 GiB at a time.
    return this.client.blockStatus(offset, Math.min(length, 0xffffffff - 0xffff));
  }

  async close(): Promise<void> {
    await this.client.close();
  }
}
