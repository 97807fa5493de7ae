// NbdDevice against nbdkit (pattern plugin behind the log filter): a READ
// longer than 512 KiB goes to the server as several requests of at most
// 512 KiB, in flight together, and the caller gets exactly the bytes asked
// for (into its own buffer, at an unaligned offset, with a short tail);
// shorter READs go as one request.

import * as fs from 'node:fs';
import t from 'tap';
import { NbdDevice } from '../src/device/nbd';
import { MiB, fillPattern, startNbdkit, tmpPath } from './helpers/peers';

/** nbdkit's pattern plugin (fillPattern, seed 0) over [at, at + n), at any alignment. */
function pattern(at: number, n: number): Buffer {
  const start = at - (at % 8);
  const words = fillPattern(Buffer.alloc(Math.ceil((n + at - start) / 8) * 8), start);
  return words.subarray(at - start, at - start + n);
}

/** The Read requests nbdkit's log filter saw: [offset, count]. */
function readsLogged(log: string): Array<[number, number]> {
  const out: Array<[number, number]> = [];
  for (const m of log.matchAll(/ Read id=\d+ offset=0x([0-9a-f]+) count=0x([0-9a-f]+)/g)) out.push([parseInt(m[1], 16), parseInt(m[2], 16)]);
  return out;
}

t.test('reads longer than 512 KiB go out as several requests', async (t) => {
  const logfile = tmpPath(t, 'reads', '.log');
  const kit = await startNbdkit(t, ['--filter=log', 'pattern', 'size=64M', `logfile=${logfile}`]);
  const dev = await NbdDevice.open({ socketPath: kit.socket, exportName: '' });
  t.teardown(() => dev.close());

  const at = 4096 + 3;
  const length = 3 * MiB + 100;
  const into = Buffer.alloc(length, 0xee);
  const got = await dev.read(at, length, into);
  t.equal(got, into, "read into the caller's buffer");
  t.ok(got.equals(pattern(at, length)), 'the bytes asked for');
  const small = await dev.read(40 * MiB + 5, 512 * 1024);
  t.ok(small.equals(pattern(40 * MiB + 5, 512 * 1024)), '512 KiB read right');
  await dev.close();

  const reads = readsLogged(fs.readFileSync(logfile, 'utf8'));
  const big = reads.filter(([o]) => o < 40 * MiB);
  t.equal(big.length, Math.ceil(length / (512 * 1024)), `the 3 MiB read went out as ${big.length} requests`);
  t.ok(big.every(([, n]) => n <= 512 * 1024), 'none over 512 KiB');
  t.equal(big.reduce((s, [, n]) => s + n, 0), length, 'covering it exactly');
  t.strictSame(
    big.map(([o]) => o).sort((a, b) => a - b),
    Array.from({ length: big.length }, (_, i) => at + i * 512 * 1024),
    'at consecutive offsets',
  );
  t.strictSame(reads.filter(([o]) => o >= 40 * MiB), [[40 * MiB + 5, 512 * 1024]], 'a 512 KiB read is one request');
});
