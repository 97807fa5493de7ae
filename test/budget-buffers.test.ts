// BudgetBuffers (pure logic): reuse on a full budget, and the memory bound.

import t from 'tap';
import { Budget, BudgetBuffers } from '../src/copy/sync';

const K = 1024;

t.test('on a full budget, a waiter that got the released bytes reuses the buffer given back', async (t) => {
  const budget = new Budget(4 * 64 * K);
  const pool = new BudgetBuffers(budget);
  const held: Buffer[] = [];
  for (let i = 0; i < 4; i++) {
    await budget.acquire(64 * K);
    held.push(pool.take(64 * K));
  }
  const waiter = budget.acquire(64 * K); // full: waits
  const first = held.shift() as Buffer;
  budget.release(64 * K); // the waiter takes these bytes at once
  pool.give(first);
  await waiter;
  t.equal(budget.inUse, 4 * 64 * K, 'the budget is full again');
  t.equal(pool.take(64 * K), first, 'the waiter gets the same buffer, not a fresh one');
});

t.test('a fresh allocation first drops idle buffers until in use plus idle fit the limit', async (t) => {
  const budget = new Budget(256 * K);
  const pool = new BudgetBuffers(budget);
  await budget.acquire(128 * K);
  const a = pool.take(64 * K);
  const b = pool.take(64 * K);
  budget.release(128 * K);
  pool.give(a);
  pool.give(b); // idle 128K, in use 0
  await budget.acquire(192 * K);
  const big = pool.take(192 * K); // fresh: 192 + 128 idle > 256, so one 64K idle buffer goes
  t.equal(big.length, 192 * K);
  const again = pool.take(64 * K);
  t.ok(again === a || again === b, 'one idle 64K buffer was kept');
  await budget.acquire(64 * K);
  const fresh = pool.take(64 * K);
  t.ok(fresh !== a && fresh !== b, 'the other was dropped: this one is new');
});

t.test('close() drops idle buffers and keeps none after', async (t) => {
  const budget = new Budget(128 * K);
  const pool = new BudgetBuffers(budget);
  await budget.acquire(64 * K);
  const a = pool.take(64 * K);
  budget.release(64 * K);
  pool.close();
  pool.give(a);
  await budget.acquire(64 * K);
  t.not(pool.take(64 * K), a, 'nothing was kept');
});

t.test('preallocate: the whole budget reserved at once, carved into buffers as they are taken', async (t) => {
  const budget = new Budget(10 * 64 * K + 100); // 10 whole buffers fit
  const pool = new BudgetBuffers(budget);
  t.ok(pool.preallocate(64 * K), 'reserved');
  const taken: Buffer[] = [];
  for (let i = 0; i < 10; i++) {
    await budget.acquire(64 * K);
    taken.push(pool.take(64 * K));
  }
  const arena = taken[0].buffer;
  t.ok(
    taken.every((b, i) => b.buffer === arena && b.byteOffset === taken[0].byteOffset + i * 64 * K && b.length === 64 * K),
    'ten buffers side by side in one allocation',
  );
  taken[3].fill(7);
  t.ok(taken.filter((b) => b.every((x) => x === 7)).length === 1, 'exactly one buffer holds what was written into it');
  // Given back and taken again: the same memory, nothing new.
  budget.release(64 * K);
  pool.give(taken[5]);
  await budget.acquire(64 * K);
  t.equal(pool.take(64 * K), taken[5], 'a buffer given back is reused');
  // The reservation is used up: an eleventh buffer (an oversize budget
  // request on an empty budget can get one) is allocated on its own.
  const extra = pool.take(64 * K);
  t.not(extra.buffer, arena, 'past the reservation: a separate allocation');
  t.equal(extra.length, 64 * K);
});

t.test('preallocate: a budget smaller than one buffer reserves nothing', async (t) => {
  const pool = new BudgetBuffers(new Budget(32 * K));
  t.notOk(pool.preallocate(64 * K), 'nothing to reserve');
  t.equal(pool.take(32 * K).length, 32 * K, 'takes still work, allocated as they come');
});
