// X.509 credentials in qemu's directory layout (what `--object
// tls-creds-x509,dir=DIR` and nbdkit's --tls-certificates read):
//   ca-cert.pem                      the CA that signed the peer's certificate
//   server-cert.pem, server-key.pem  this server's identity
//   client-cert.pem, client-key.pem  a client's identity (optional)

import fs from 'node:fs';
import path from 'node:path';
import tls from 'node:tls';

export interface ClientTlsOptions {
  ca?: Buffer;
  cert?: Buffer;
  key?: Buffer;
}

function readIf(dir: string, name: string): Buffer | undefined {
  const p = path.join(dir, name);
  try {
    return fs.readFileSync(p);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw new Error(`cannot read ${p}: ${(e as Error).message}`);
  }
}

export function loadServerContext(dir: string, verifyPeer: boolean): tls.SecureContext {
  const cert = readIf(dir, 'server-cert.pem');
  const key = readIf(dir, 'server-key.pem');
  const ca = readIf(dir, 'ca-cert.pem');
  if (!cert || !key) throw new Error(`TLS certificates directory ${dir} needs server-cert.pem and server-key.pem`);
  if (verifyPeer && !ca) throw new Error(`--tls-verify-peer needs ${path.join(dir, 'ca-cert.pem')}`);
  try {
    return tls.createSecureContext({ cert, key, ca });
  } catch (e) {
    throw new Error(`bad TLS credentials in ${dir}: ${(e as Error).message}`);
  }
}

export function loadClientCredentials(dir: string): ClientTlsOptions {
  const ca = readIf(dir, 'ca-cert.pem');
  if (!ca) throw new Error(`TLS certificates directory ${dir} needs ca-cert.pem to verify the server`);
  return { ca, cert: readIf(dir, 'client-cert.pem'), key: readIf(dir, 'client-key.pem') };
}
