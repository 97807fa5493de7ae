// splitBuffers (src/targets/nbd.ts): a coalesced target write cut into NBD
// WRITE requests of at most TARGET_REQUEST_BYTES, as views. Pure logic, so
// a unit test; test/cbw-job-control.test.ts checks the requests nbdkit
// receives.
import t from 'tap';
import { splitBuffers } from '../src/targets/nbd';
import { mulberry32 } from './helpers/peers';

t.test('pieces are at most max bytes, in order, the same bytes, and views of the input', async (t) => {
  let checked = 0;
  for (const seed of [1, 2, 3, 4, 5, 6, 7, 8]) {
    const next = mulberry32(seed);
    const count = 1 + (next() % 6);
    const data: Buffer[] = [];
    for (let i = 0; i < count; i++) {
      const b = Buffer.alloc(1 + (next() % 5000));
      for (let k = 0; k < b.length; k++) b[k] = next() & 0xff;
      data.push(b);
    }
    const whole = Buffer.concat(data);
    for (const max of [1, 7, 512, 1024, 4096, whole.length, whole.length + 1]) {
      const pieces = splitBuffers(data, max);
      const lengths = pieces.map((p) => p.reduce((n, b) => n + b.length, 0));
      const what = `seed ${seed}, ${count} buffers of ${whole.length} bytes, max ${max}`;
      t.ok(lengths.every((n) => n > 0 && n <= max), `${what}: every piece 1..max bytes`);
      t.ok(lengths.slice(0, -1).every((n) => n === max), `${what}: all but the last piece full`);
      t.ok(Buffer.concat(pieces.flat()).equals(whole), `${what}: the same bytes in the same order`);
      const owners = new Set(data.map((b) => b.buffer));
      t.ok(pieces.flat().every((b) => owners.has(b.buffer)), `${what}: every part is a view of an input buffer`);
      checked++;
    }
  }
  t.equal(checked, 56, 'every case was checked');
  t.same(splitBuffers([], 4), [], 'nothing in, nothing out');
});
