// WrittenRanges (src/targets/nbd.ts): what a job wrote to an NBD target
// while the target's zero probe ran. Pure logic, so a unit test against a
// byte map doing the same; the probe itself is tested against nbdkit in
// test/cbw-job-control.test.ts.
import t from 'tap';
import { WrittenRanges } from '../src/targets/nbd';
import { mulberry32 } from './helpers/peers';

/** Seeded numbers in [0, 1), so a failure can be replayed. */
function seeded(seed: number): () => number {
  const next = mulberry32(seed);
  return () => next() / 2 ** 32;
}

t.test('covers() says what a byte map of the writes says', async (t) => {
  for (const seed of [1, 2, 3, 4, 5]) {
    const rand = seeded(seed);
    const size = 4096;
    const map = new Uint8Array(size);
    const ranges = new WrittenRanges();
    let mismatches = 0;
    let checks = 0;
    let coveredSeen = 0;
    for (let i = 0; i < 600; i++) {
      // Short writes, some touching or overlapping earlier ones.
      const start = Math.floor(rand() * size);
      const end = Math.min(size, start + 1 + Math.floor(rand() * 64));
      ranges.add(start, end);
      map.fill(1, start, end);
      for (let k = 0; k < 20; k++) {
        const a = Math.floor(rand() * size);
        const b = Math.min(size, a + 1 + Math.floor(rand() * 200));
        const want = map.subarray(a, b).every((v) => v === 1);
        if (want) coveredSeen++;
        checks++;
        if (ranges.covers(a, b) !== want) mismatches++;
      }
    }
    t.equal(mismatches, 0, `seed ${seed}: ${checks} checks, all as the byte map says (${coveredSeen} covered)`);
    t.ok(coveredSeen > 100, `seed ${seed}: the checks include covered ranges, not only gaps`);
  }
});

t.test('the sweep\'s writes one after another stay one run; a gap is seen', async (t) => {
  const r = new WrittenRanges();
  const MiB = 1024 * 1024;
  // Out of order within a window, as several writers complete them.
  for (let i = 0; i < 1000; i += 4) for (const k of [2, 0, 3, 1]) r.add((i + k) * 4 * MiB, (i + k + 1) * 4 * MiB);
  t.ok(r.covers(0, 4000 * MiB), 'all of the 4000 MiB written is covered');
  t.notOk(r.covers(0, 4000 * MiB + 1), 'one byte past it is not');
  const g = new WrittenRanges();
  g.add(0, 100);
  g.add(101, 200);
  t.notOk(g.covers(0, 200), 'a one-byte gap is not covered');
  t.ok(g.covers(101, 200), 'the part after the gap is');
  g.add(100, 101);
  t.ok(g.covers(0, 200), 'once the gap is written, all of it is');
});

t.test('past its limit of runs it covers nothing (the probe then says no)', async (t) => {
  const r = new WrittenRanges();
  for (let i = 0; i <= 65536; i++) r.add(i * 10, i * 10 + 5); // 65537 separate runs
  t.notOk(r.covers(0, 5), 'a range written early is no longer vouched for');
});
