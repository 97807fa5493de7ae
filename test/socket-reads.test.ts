// adoptWithReadHooks on real unix sockets: reads land in our buffer, a
// half-close still ends the stream (the server drains on it), replies go
// out, the server's own count sees the accepted object go, and a socket that
// already read data is left alone. Then an NbdServer on a file, driven by
// qemu-io: its connections take the reused-buffer path (no fallback warning)
// and 32 KiB and 1 MiB patterns written through it read back.

import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import t, { type Test } from 'tap';
import { adoptWithReadHooks } from '../src/util/socket-reads';
import { FileDevice } from '../src/device/file';
import { NbdServer } from '../src/server/server';
import { run } from './helpers/peers';

function tmpSocket(t: Test): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nbd-cbw-adopt-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  return path.join(dir, 's.sock');
}

t.test('an adopted socket reads into our buffer, sees the half-close and replies', async (t) => {
  const sock = tmpSocket(t);
  const readBuffer = Buffer.alloc(7); // small: the message arrives over several reads
  const received: Buffer[] = [];
  let intoOurs = true;
  let adopted: net.Socket | null = null;
  let acceptedDestroyed = false;
  const server = net.createServer({ allowHalfOpen: true }, (s) => {
    adopted = adoptWithReadHooks(
      s,
      {
        buffer: () => readBuffer,
        callback: (n, buf) => {
          if (buf !== readBuffer) intoOurs = false;
          received.push(Buffer.from(buf.subarray(0, n)));
          return true;
        },
      },
      true,
    );
    acceptedDestroyed = s.destroyed;
    adopted?.on('end', () => adopted?.end(`got ${Buffer.concat(received).toString()}`));
  });
  await new Promise<void>((r) => server.listen(sock, r));
  t.teardown(() => server.close());

  const reply = await new Promise<string>((resolve, reject) => {
    const c = net.createConnection({ path: sock, allowHalfOpen: true }, () => c.end('hello, adopted world'));
    const parts: Buffer[] = [];
    // Bounded: without adoption nobody answers.
    const timer = setTimeout(() => {
      c.destroy();
      resolve('(no reply in 5 s)');
    }, 5000);
    c.on('data', (d: Buffer) => parts.push(d));
    c.on('end', () => {
      clearTimeout(timer);
      resolve(Buffer.concat(parts).toString());
    });
    c.on('error', (e) => {
      clearTimeout(timer);
      reject(e);
    });
  });
  t.ok(adopted, 'the socket was adopted');
  t.ok(acceptedDestroyed, 'the accepted socket object was let go');
  t.ok(intoOurs, 'every read landed in the buffer we gave');
  t.ok(received.length >= 3, `the message came in several reads (${received.length})`);
  t.equal(reply, 'got hello, adopted world', 'the reply reached the client after its half-close');
  const left = await new Promise<number>((r) => server.getConnections((_e, n) => r(n)));
  t.equal(left, 0, "net.Server's own count no longer includes it");
});

t.test('a socket that already read data is not adopted', async (t) => {
  const sock = tmpSocket(t);
  const result = new Promise<{ adopted: boolean; data: string }>((resolve) => {
    const server = net.createServer((s) => {
      s.once('data', (d: Buffer) => {
        const a = adoptWithReadHooks(s, { buffer: () => Buffer.alloc(16), callback: () => true }, false);
        resolve({ adopted: a !== null, data: d.toString() });
        s.destroy();
        server.close();
      });
    });
    server.listen(sock, () => {
      const c = net.createConnection(sock, () => c.write('early'));
      c.on('error', () => undefined);
      c.on('close', () => undefined);
    });
  });
  const r = await result;
  t.equal(r.data, 'early');
  t.equal(r.adopted, false, 'left to the ordinary reads it already started');
});

t.test('NbdServer connections read into reused buffers; data written through them reads back', async (t) => {
  const sock = tmpSocket(t);
  const image = path.join(path.dirname(sock), 'disk.img');
  fs.writeFileSync(image, Buffer.alloc(0));
  fs.truncateSync(image, 16 * 1024 * 1024);
  const device = await FileDevice.open(image);
  const logged: string[] = [];
  const server = new NbdServer({ exports: [{ name: 'disk', device }], log: (m) => logged.push(m) });
  await server.listen({ socketPath: sock });
  t.teardown(async () => {
    await server.close();
    await device.close();
  });
  const uri = `nbd+unix:///disk?socket=${sock}`;
  const io = (cmds: string[]) => run('qemu-io', ['-f', 'raw', uri, ...cmds.flatMap((c) => ['-c', c])], { timeoutMs: 30_000 });
  const w = await io(['write -P 0x61 0 32k', 'write -P 0x62 1M 1M', 'write -P 0x63 5000 70000']);
  t.equal(w.code, 0, `qemu-io writes (${w.stderr.trim()})`);
  const r = await io(['read -P 0x61 0 4096', 'read -P 0x62 1M 1M', 'read -P 0x63 5000 70000', 'read -P 0 75000 26072']);
  t.equal(r.code, 0, 'qemu-io reads every pattern back');
  t.notMatch(r.stdout, /Pattern verification failed/, 'no pattern mismatch');
  t.notOk(
    logged.some((m) => /fresh buffers/.test(m)),
    'no connection fell back to reads into fresh buffers',
  );
});
