// Turn a --source / --target string into a BlockDevice.

import { parseNbdUri } from '../client/uri';
import { NbdDevice } from './nbd';
import { FileDevice } from './file';
import type { BlockDevice } from './types';

export interface OpenOptions {
  readOnly?: boolean;
  /** Requests on the wire at once for NBD devices. */
  maxInFlight?: number;
  /** NBD sources: how long to keep reconnecting after the connection drops. */
  reconnectWindowMs?: number;
  log?: (msg: string) => void;
}

export async function openDevice(spec: string, opts: OpenOptions = {}): Promise<BlockDevice> {
  if (spec.startsWith('file:')) {
    const path = spec.slice('file:'.length);
    if (!path) throw new Error('file: needs a path, as in file:/var/lib/images/disk.raw');
    return FileDevice.open(path, { readOnly: opts.readOnly });
  }
  if (/^nbds?(\+unix)?:/.test(spec)) {
    const dev = await NbdDevice.open(parseNbdUri(spec), {
      maxInFlight: opts.maxInFlight,
      reconnectWindowMs: opts.reconnectWindowMs,
      log: opts.log,
    });
    if (opts.readOnly) return readOnlyView(dev);
    return dev;
  }
  throw new Error(`unrecognised source "${spec}": use file:PATH, nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH`);
}

/** Same device, advertised read-only (nbd sources opened with -r). */
function readOnlyView(dev: BlockDevice): BlockDevice {
  return Object.create(dev, {
    capabilities: { value: { ...dev.capabilities, readOnly: true } },
  }) as BlockDevice;
}
