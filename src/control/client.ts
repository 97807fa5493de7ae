// The control API's addresses and a client for it (`nbd-cbw backup ...`).
// Kept apart from the server so the CLI's client commands load no more.

import http from 'node:http';

/** The longest GET /v1/jobs/:id?wait=MS the server holds (under the client's 30 s timeout). */
export const MAX_WAIT_MS = 20_000;

export interface ControlAddress {
  socketPath?: string;
  host?: string;
  port?: number;
}

/** ADDR is a unix socket path (unix:PATH or anything with a '/'), or HOST:PORT. */
export function parseControlAddress(text: string): ControlAddress {
  if (text.startsWith('unix:')) return { socketPath: text.slice(5) };
  if (text.includes('/')) return { socketPath: text };
  const m = /^(?:tcp:)?(\[[^\]]+\]|[^:]+):(\d+)$/.exec(text);
  if (!m) throw new Error(`bad control address "${text}": use a socket path, unix:PATH, or HOST:PORT`);
  const port = Number(m[2]);
  if (port > 65535) throw new Error(`bad control address "${text}": port out of range`);
  return { host: m[1].replace(/^\[|\]$/g, ''), port };
}

export function formatControlAddress(a: ControlAddress): string {
  if (a.socketPath) return `unix:${a.socketPath}`;
  return `${a.host?.includes(':') ? `[${a.host}]` : a.host}:${a.port}`;
}

/** A client for the control API, used by `nbd-cbw backup ...`. */
export async function controlRequest(
  addr: ControlAddress,
  method: string,
  path: string,
  body?: unknown,
  token?: string,
): Promise<{ status: number; body: unknown }> {
  return new Promise((resolve, reject) => {
    const payload = body === undefined ? undefined : JSON.stringify(body);
    const req = http.request(
      {
        socketPath: addr.socketPath,
        host: addr.host,
        port: addr.port,
        method,
        path,
        headers: {
          ...(payload && { 'content-type': 'application/json', 'content-length': Buffer.byteLength(payload) }),
          ...(token && { authorization: `Bearer ${token}` }),
        },
        timeout: 30_000,
      },
      (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('end', () => {
          const text = Buffer.concat(chunks).toString('utf8');
          let parsed: unknown = text;
          try {
            parsed = JSON.parse(text);
          } catch {
            // not JSON: keep the text
          }
          resolve({ status: res.statusCode ?? 0, body: parsed });
        });
      },
    );
    req.on('timeout', () => req.destroy(new Error('control request timed out')));
    req.on('error', (e: NodeJS.ErrnoException) => {
      const where = formatControlAddress(addr);
      if (e.code === 'ENOENT' || e.code === 'ECONNREFUSED') reject(new Error(`no nbd-cbw control API at ${where} (${e.code})`));
      else reject(new Error(`control API at ${where}: ${e.message}`));
    });
    if (payload) req.write(payload);
    req.end();
  });
}
