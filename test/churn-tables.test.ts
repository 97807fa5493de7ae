// The Map and Set stand-ins of src/util/churn-tables.ts: pure logic, so unit
// tests, checked against a Map or Set doing the same operations. Their users
// (the NBD client's requests in flight, the engine's clusters being read, the
// cow buffer's queues) are covered end to end by the interop and
// point-in-time tests.
import t from 'tap';
import { InsertionQueue, IntKeyMap, SlotTable } from '../src/util/churn-tables';

/** A small deterministic generator, so a failure can be replayed. */
function lcg(seed: number): () => number {
  let x = seed >>> 0;
  return () => {
    x = (Math.imul(x, 1664525) + 1013904223) >>> 0;
    return x / 2 ** 32;
  };
}

t.test('IntKeyMap does what a Map<number, V> does', async (t) => {
  const m = new IntKeyMap<{ v: number }>();
  const ref = new Map<number, { v: number }>();
  const rand = lcg(1);
  for (let i = 0; i < 20000; i++) {
    // Keys from small to past 2^32, where they stop being array indexes.
    const key = rand() < 0.1 ? 2 ** 33 + Math.floor(rand() * 50) : Math.floor(rand() * 500);
    if (rand() < 0.55) {
      const v = { v: i };
      m.set(key, v);
      ref.set(key, v);
    } else {
      if (m.delete(key) !== ref.delete(key)) {
        t.fail(`delete ${key} at step ${i} differs from a Map`);
        return;
      }
    }
    if (m.get(key) !== ref.get(key) || m.has(key) !== ref.has(key) || m.size !== ref.size) {
      t.fail(`differs from a Map at step ${i}, key ${key}`);
      return;
    }
  }
  t.equal(m.size, ref.size);
  t.same(
    m.values().map((x) => x.v).sort((a, b) => a - b),
    [...ref.values()].map((x) => x.v).sort((a, b) => a - b),
    'the same values',
  );
  m.clear();
  t.equal(m.size, 0);
  t.equal(m.values().length, 0);
  t.equal(m.get(3), undefined);
});

interface Item {
  id: number;
  pos: number;
}

t.test('InsertionQueue keeps insertion order through deletes from anywhere', async (t) => {
  const q = new InsertionQueue<'pos', Item>('pos');
  const ref = new Set<Item>();
  const rand = lcg(7);
  const items: Item[] = [];
  let checks = 0;
  for (let i = 0; i < 50000; i++) {
    const r = rand();
    if (r < 0.5 || items.length === 0) {
      const it = { id: i, pos: -1 };
      items.push(it);
      q.add(it);
      ref.add(it);
    } else {
      // Mostly the oldest (as writes to the target take them), sometimes any.
      const k = r < 0.8 ? 0 : Math.floor(rand() * items.length);
      const [it] = items.splice(k, 1);
      if (q.delete(it) !== true || q.delete(it) !== false) {
        t.fail(`delete of item ${it.id} at step ${i}: not once and once only`);
        return;
      }
      ref.delete(it);
    }
    if (i % 997 === 0) {
      checks++;
      const want = [...ref].map((x) => x.id);
      const got = [...q].map((x) => x.id);
      if (got.join() !== want.join()) {
        t.fail(`order differs at step ${i}`);
        return;
      }
      const firstOdd = [...ref].find((x) => x.id % 2 === 1) ?? null;
      t.equal(q.find((x) => x.id % 2 === 1), firstOdd, 'find() gives the oldest match');
    }
    if (q.size !== ref.size) {
      t.fail(`size differs at step ${i}`);
      return;
    }
  }
  t.ok(checks > 40);
  t.ok(items.every((it) => q.has(it)), 'every item left is in the queue');
  q.clear();
  t.equal(q.size, 0);
  t.equal([...q].length, 0);
  for (const it of items.slice(0, 5)) t.equal(q.has(it), false, 'gone after clear()');
  const again = { id: -1, pos: -1 };
  q.add(again);
  q.add(again);
  t.equal(q.size, 1, 'adding an item already queued does not add it twice');
});

t.test('SlotTable hands out each free slot once, up to its capacity', async (t) => {
  const s = new SlotTable<string>(4);
  const slots = ['a', 'b', 'c', 'd'].map((v) => s.insert(v));
  t.same([...slots].sort(), [0, 1, 2, 3]);
  t.equal(s.insert('e'), -1, 'full');
  t.equal(s.size, 4);
  s.remove(slots[2]);
  s.remove(slots[2]);
  t.equal(s.size, 3, 'a second remove changes nothing');
  t.equal(s.get(slots[2]), undefined);
  t.equal(s.insert('f'), slots[2], 'the freed slot is reused');
  t.equal(s.get(slots[2]), 'f');
  t.same(s.values().sort(), ['a', 'b', 'd', 'f']);
  s.clear();
  t.equal(s.size, 0);
  t.same(
    [1, 2, 3, 4].map((i) => s.insert(`x${i}`)).sort(),
    [0, 1, 2, 3],
    'every slot free again after clear()',
  );
});
