// Whether an NBD target is an export the backup must never be written to:
// nbd-cbw's own (the disk, through the filter) or the NBD source's. Either
// way the job would write the disk's old data over the guest's
// acknowledged writes, and still report a completed backup.
//
// Addresses are compared by what they reach, not by how they are spelled:
// a unix socket by its inode (symlinks, relative paths), a TCP address by
// its resolved IPs and port, where a listener on 0.0.0.0 or :: counts as
// every local address. A name that does not resolve matches nothing: the
// connection then fails with its own error.

import dns from 'node:dns/promises';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import type { NbdAddress } from '../client/uri';

/** An NBD export a target must not be. */
export interface ForbiddenExport {
  address: NbdAddress;
  /** Any export name at this address is it (nbd-cbw serves one export). */
  anyExportName: boolean;
  /** What it is, for the refusal ("nbd-cbw's own export of the disk"). */
  what: string;
}

/** The export in `forbidden` that `target` names, if any. */
export async function forbiddenExportOf(
  target: NbdAddress,
  forbidden: readonly ForbiddenExport[],
): Promise<ForbiddenExport | undefined> {
  for (const f of forbidden) {
    if (!f.anyExportName && f.address.exportName !== target.exportName) continue;
    if (await sameListener(target, f.address)) return f;
  }
  return undefined;
}

/** True when both addresses reach the same listening socket. */
export async function sameListener(a: NbdAddress, b: NbdAddress): Promise<boolean> {
  if (a.socketPath !== undefined || b.socketPath !== undefined) {
    return a.socketPath !== undefined && b.socketPath !== undefined && sameSocketFile(a.socketPath, b.socketPath);
  }
  if ((a.port ?? 10809) !== (b.port ?? 10809)) return false;
  const [x, y] = await Promise.all([reachedBy(a.host), reachedBy(b.host)]);
  if (x === 'any-local') return y === 'any-local' || y.some(isLocalAddress);
  if (y === 'any-local') return x.some(isLocalAddress);
  return x.some((ip) => y.includes(ip));
}

function sameSocketFile(a: string, b: string): boolean {
  try {
    const sa = fs.statSync(a, { bigint: true });
    const sb = fs.statSync(b, { bigint: true });
    return sa.dev === sb.dev && sa.ino === sb.ino;
  } catch {
    return path.resolve(a) === path.resolve(b);
  }
}

function isWildcard(host: string): boolean {
  return host === '' || host === '0.0.0.0' || host === '::' || host === '[::]';
}

/** The IPs a host name reaches; a wildcard listener reaches every local one. */
async function reachedBy(host: string | undefined): Promise<string[] | 'any-local'> {
  if (host === undefined || isWildcard(host)) return 'any-local';
  const bare = host.replace(/^\[|\]$/g, '');
  if (net.isIP(bare)) return [normalise(bare)];
  try {
    return (await dns.lookup(bare, { all: true })).map((r) => normalise(r.address));
  } catch {
    return [];
  }
}

/** IPv4-mapped IPv6 as plain IPv4, so 127.0.0.1 and ::ffff:127.0.0.1 compare equal. */
function normalise(ip: string): string {
  const mapped = /^::ffff:(\d+\.\d+\.\d+\.\d+)$/i.exec(ip);
  return (mapped ? mapped[1] : ip).toLowerCase();
}

function isLocalAddress(ip: string): boolean {
  if (ip.startsWith('127.') || ip === '::1') return true;
  for (const list of Object.values(os.networkInterfaces())) {
    for (const a of list ?? []) if (normalise(a.address) === ip) return true;
  }
  return false;
}
