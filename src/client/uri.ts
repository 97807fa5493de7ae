// NBD URIs as libnbd and qemu write them:
//   nbd://HOST[:PORT]/EXPORT
//   nbd+unix:///EXPORT?socket=PATH
// (nbds:// and nbds+unix:// need TLS, refused until TLS exists.)

export interface NbdAddress {
  socketPath?: string;
  host?: string;
  port?: number;
  exportName: string;
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
  switch (u.protocol) {
    case 'nbd:': {
      if (!u.hostname) throw new UriError(`bad NBD URI "${uri}": no host`);
      const port = u.port ? Number(u.port) : 10809;
      return { host: u.hostname.replace(/^\[|\]$/g, ''), port, exportName };
    }
    case 'nbd+unix:': {
      const socketPath = u.searchParams.get('socket');
      if (!socketPath) throw new UriError(`bad NBD URI "${uri}": nbd+unix:// needs ?socket=PATH`);
      return { socketPath, exportName };
    }
    case 'nbds:':
    case 'nbds+unix:':
      throw new UriError(`NBD URI "${uri}" asks for TLS, which this build does not support yet`);
    default:
      throw new UriError(`bad NBD URI "${uri}": scheme must be nbd:// or nbd+unix://`);
  }
}

export function formatNbdUri(addr: NbdAddress): string {
  const name = encodeURIComponent(addr.exportName);
  if (addr.socketPath) return `nbd+unix:///${name}?socket=${addr.socketPath}`;
  const host = addr.host?.includes(':') ? `[${addr.host}]` : addr.host;
  return `nbd://${host}:${addr.port ?? 10809}/${name}`;
}
