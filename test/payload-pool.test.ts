// PayloadPool (src/util/payload-pool.ts): pure logic, so a unit test. The
// server's use of it is covered end to end by the interop tests, whose WRITE
// payloads arrive split across socket reads and are verified byte for byte.
import t from 'tap';
import { PayloadPool } from '../src/util/payload-pool';

t.test('a given-back buffer is handed out again for the same length only', async (t) => {
  const pool = new PayloadPool(1 << 20);
  const a = pool.take(32768);
  t.equal(a.length, 32768);
  pool.give(a);
  t.equal(pool.idleByteCount, 32768);
  const other = pool.take(4096);
  t.not(other, a, 'another length gets a new buffer');
  t.equal(pool.take(32768), a, 'the same length reuses it');
  t.equal(pool.idleByteCount, 0);
  t.not(pool.take(32768), a, 'a buffer in use is not handed out twice');
});

t.test('only its own buffers are kept, and idle bytes stay under the cap', async (t) => {
  const pool = new PayloadPool(65536);
  pool.give(Buffer.alloc(4096));
  const mine = pool.take(8192);
  pool.give(mine.subarray(0, 4096));
  t.equal(pool.idleByteCount, 0, 'foreign buffers and views are ignored');
  const bufs = [pool.take(32768), pool.take(32768), pool.take(32768)];
  for (const b of bufs) pool.give(b);
  t.equal(pool.idleByteCount, 65536, 'the third buffer was over the cap and dropped');
});

t.test('a buffer given back twice is still handed out once', async (t) => {
  const pool = new PayloadPool(1 << 20);
  const a = pool.take(4096);
  pool.give(a);
  pool.give(a);
  t.equal(pool.idleByteCount, 4096);
  t.equal(pool.take(4096), a);
  t.not(pool.take(4096), a);
});
