// NBD URIs as libnbd and qemu write them:
//   nbd://HOST[:PORT]/EXPORT
//   nbd+unix:///EXPORT?socket=PATH
//   nbds://... and nbds+unix://...   the same over TLS; the client
//   credentials come from ?tls-certificates=DIR (qemu's layout), as in libnbd

import { loadClientCredentials, type ClientTlsOptions } from '../tls/credentials';

export interface NbdAddress {
  socketPath?: string;
  host?: string;
  port?: number;
  exportName: string;
  /** nbds: STARTTLS is required. */
  tls?: boolean;
  /** Directory with ca-cert.pem (and client-cert.pem, client-key.pem). */
  tlsCertificates?: string;
}

export class UriError extends Error {
  override name = 'UriError';
}

export function parseNbdUri(uri: string): NbdAddress {
  let u: URL;
  try {
    u = new URL(uri);
  } catch {
    throw new UriError(`bad NBD URI "${uri}": expected nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH`);
  }
  const exportName = decodeURIComponent(u.pathname.replace(/^\//, ''));
  const secure = u.protocol === 'nbds:' || u.protocol === 'nbds+unix:';
  const tlsFields = secure
    ? { tls: true, tlsCertificates: u.searchParams.get('tls-certificates') ?? undefined }
    : {};
  switch (u.protocol) {
    case 'nbd:':
    case 'nbds:': {
      if (!u.hostname) throw new UriError(`bad NBD URI "${uri}": no host`);
      const port = u.port ? Number(u.port) : 10809;
      return { host: u.hostname.replace(/^\[|\]$/g, ''), port, exportName, ...tlsFields };
    }
    case 'nbd+unix:':
    case 'nbds+unix:': {
      const socketPath = u.searchParams.get('socket');
      if (!socketPath) throw new UriError(`bad NBD URI "${uri}": ${u.protocol}// needs ?socket=PATH`);
      return { socketPath, exportName, ...tlsFields };
    }
    default:
      throw new UriError(`bad NBD URI "${uri}": scheme must be nbd:// or nbd+unix://`);
  }
}

export function formatNbdUri(addr: NbdAddress): string {
  const name = encodeURIComponent(addr.exportName);
  const s = addr.tls ? 's' : '';
  if (addr.socketPath) return `nbd${s}+unix:///${name}?socket=${addr.socketPath}`;
  const host = addr.host?.includes(':') ? `[${addr.host}]` : addr.host;
  return `nbd${s}://${host}:${addr.port ?? 10809}/${name}`;
}

/** Client TLS options for an address, or undefined for plain NBD. */
export function clientTlsFor(addr: NbdAddress): ClientTlsOptions | undefined {
  if (!addr.tls) return undefined;
  if (!addr.tlsCertificates) {
    throw new UriError('an nbds:// URI needs ?tls-certificates=DIR (a directory with ca-cert.pem)');
  }
  return loadClientCredentials(addr.tlsCertificates);
}
