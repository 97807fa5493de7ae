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
