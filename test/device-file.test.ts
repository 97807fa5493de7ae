import t from 'tap';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { execFileSync } from 'node:child_process';
import { FileDevice, MAX_EXTENTS, MAX_EXTENT_LENGTH, nbdErrorFor } from '../src/device/file';
import { ADDON_PATH, loadFileOps } from '../src/device/native';
import { DeviceError, type Extent } from '../src/device/types';
import { NBD_CBW_BIN, canUseLoopDevices, makeImage, run, startQemuNbd } from './helpers/peers';

const KiB = 1024;
const MiB = 1024 * KiB;
const GiB = 1024 * MiB;
const HOLE = 3; // NBD_STATE_HOLE | NBD_STATE_ZERO
const DATA = 0;

function pattern(length: number, seed: number): Buffer {
  const b = Buffer.allocUnsafe(length);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < length; i++) {
    x = (Math.imul(x, 1103515245) + 12345) >>> 0;
    b[i] = (x >>> 16) & 0xff || 1; // never zero, so "reads as zero" is meaningful
  }
  return b;
}

/** Read bytes through an independent fd, bypassing the device. */
function readRaw(p: string, offset: number, length: number): Buffer {
  const fd = fs.openSync(p, 'r');
  try {
    const b = Buffer.alloc(length);
    let done = 0;
    while (done < length) {
      const n = fs.readSync(fd, b, done, length - done, offset + done);
      if (n === 0) break;
      done += n;
    }
    return b;
  } finally {
    fs.closeSync(fd);
  }
}

function isAllZero(b: Buffer): boolean {
  for (let i = 0; i < b.length; i++) if (b[i] !== 0) return false;
  return true;
}

function total(extents: Extent[]): number {
  return extents.reduce((s, e) => s + e.length, 0);
}

/** Merge adjacent extents with equal flags (the device may split at MAX_EXTENT_LENGTH). */
function normalise(extents: Extent[]): Array<[number, number]> {
  const out: Array<[number, number]> = [];
  for (const e of extents) {
    const last = out[out.length - 1];
    if (last && last[1] === e.flags) last[0] += e.length;
    else out.push([e.length, e.flags]);
  }
  return out;
}

async function expectRejectCode(t: tap.Test, p: Promise<unknown>, nbdError: number, what: string): Promise<void> {
  try {
    await p;
    t.fail(`${what}: expected a DeviceError ${nbdError}`);
  } catch (err) {
    t.ok(err instanceof DeviceError, `${what}: rejects with a DeviceError`);
    t.equal((err as DeviceError).nbdError, nbdError, `${what}: NBD error ${nbdError}`);
  }
}

t.test('native addon loads with all its operations', async (t) => {
  t.ok(fs.existsSync(ADDON_PATH), `addon exists at ${ADDON_PATH}`);
  const ops = loadFileOps();
  for (const name of ['seekData', 'seekHole', 'punchHole', 'zeroRange', 'lockHeld', 'lockShared'] as const) {
    t.type(ops[name], 'function', name);
  }
  t.equal(loadFileOps(), ops, 'cached');
});

t.test('create a sparse file, write and read back', async (t) => {
  const dir = t.testdir();
  const p = path.join(dir, 'disk.img');
  const dev = await FileDevice.open(p, { create: { size: 64 * MiB } });
  t.teardown(() => dev.close());

  t.equal(dev.size, 64 * MiB, 'size');
  t.equal(fs.statSync(p).size, 64 * MiB, 'file truncated to the size');
  t.equal(fs.statSync(p).blocks, 0, 'and sparse');
  t.equal(dev.description, `file ${p}`);
  t.same(dev.blockSizes, { minimum: 1, preferred: 4096, maximum: 32 * MiB });
  t.same(dev.capabilities, {
    readOnly: false,
    flush: true,
    fua: true,
    trim: true,
    zero: true,
    fastZero: true,
    cache: true,
    blockStatus: true,
    multiConn: true,
  });

  t.ok(isAllZero(await dev.read(0, MiB)), 'a fresh file reads as zeros');

  const a = pattern(128 * KiB, 1);
  await dev.write(4 * MiB, a);
  t.ok(readRaw(p, 4 * MiB, a.length).equals(a), 'write reaches the file');
  t.ok((await dev.read(4 * MiB, a.length)).equals(a), 'read returns what was written');

  // Unaligned, crossing page boundaries.
  const b = pattern(7777, 2);
  await dev.write(12345, b);
  t.ok(readRaw(p, 12345, b.length).equals(b), 'unaligned write reaches the file');
  t.ok((await dev.read(12345, b.length)).equals(b), 'unaligned read');
  t.ok(isAllZero(readRaw(p, 0, 12345)), 'bytes before the unaligned write untouched');
  t.ok(isAllZero(readRaw(p, 12345 + 7777, 4096)), 'bytes after the unaligned write untouched');
  t.ok((await dev.read(12346, 10)).equals(b.subarray(1, 11)), 'small unaligned read inside it');

  // Read into a caller's buffer.
  const into = Buffer.alloc(a.length);
  const r1 = await dev.read(4 * MiB, a.length, into);
  t.equal(r1, into, 'returns the given buffer when it is exactly the length');
  t.ok(into.equals(a), 'filled the given buffer');
  const big = Buffer.alloc(64 * KiB, 0xee);
  const r2 = await dev.read(4 * MiB + 100, 1000, big);
  t.equal(r2.length, 1000, 'returns a view of the requested length');
  t.equal(r2.buffer, big.buffer, 'a view of the given buffer');
  t.ok(r2.equals(a.subarray(100, 1100)), 'view content');
  t.equal(big[1000], 0xee, 'bytes past the request untouched');

  await expectRejectCode(t, dev.read(0, 100, Buffer.alloc(10)), 22, 'read into a too-short buffer');

  // Write at the very end of the device.
  const tail = pattern(4096 + 3, 3);
  await dev.write(64 * MiB - tail.length, tail);
  t.ok((await dev.read(64 * MiB - tail.length, tail.length)).equals(tail), 'write/read at the end');
  t.equal(fs.statSync(p).size, 64 * MiB, 'size unchanged');

  // Many concurrent requests.
  const writes = [];
  for (let i = 0; i < 64; i++) writes.push(dev.write(20 * MiB + i * 4096, pattern(4096, 100 + i)));
  await Promise.all(writes);
  const reads = await Promise.all(Array.from({ length: 64 }, (_, i) => dev.read(20 * MiB + i * 4096, 4096)));
  t.ok(reads.every((r, i) => r.equals(pattern(4096, 100 + i))), '64 concurrent writes and reads');

  await dev.write(30 * MiB, a, { fua: true });
  t.ok(readRaw(p, 30 * MiB, a.length).equals(a), 'FUA write');
  await dev.flush();
  await dev.cache(0, MiB);
});

t.test('create refuses an existing path; bad sizes', async (t) => {
  const dir = t.testdir({ 'exists.img': 'hello' });
  const p = path.join(dir, 'exists.img');
  await t.rejects(FileDevice.open(p, { create: { size: MiB } }), /^file source .*exists\.img: already exists/);
  t.equal(fs.readFileSync(p, 'utf8'), 'hello', 'existing file untouched');
  await t.rejects(FileDevice.open(path.join(dir, 'neg.img'), { create: { size: -1 } }), /invalid size/);
  t.notOk(fs.existsSync(path.join(dir, 'neg.img')));
  await t.rejects(
    FileDevice.open(path.join(dir, 'nodir', 'x.img'), { create: { size: MiB } }),
    /^file source .*: directory does not exist$/,
  );
});

t.test('open errors are one clear line', async (t) => {
  const dir = t.testdir({ sub: {} });
  const missing = path.join(dir, 'missing.img');
  await t.rejects(FileDevice.open(missing, {}), { message: `file source ${missing}: no such file` });
  await t.rejects(FileDevice.open(missing, { readOnly: true }), { message: `file source ${missing}: no such file` });
  await t.rejects(FileDevice.open(path.join(dir, 'sub'), {}), { message: `file source ${path.join(dir, 'sub')}: is a directory` });
  await t.rejects(FileDevice.open(path.join(dir, 'sub'), { readOnly: true }), /: is a directory$/);
  await t.rejects(FileDevice.open('/dev/null', { readOnly: true }), {
    message: 'file source /dev/null: not a regular file or block device',
  });
});

t.test('existing files open with their size', async (t) => {
  const dir = t.testdir({ 'small.img': Buffer.from('0123456789') });
  const p = path.join(dir, 'small.img');
  const dev = await FileDevice.open(p, {});
  t.teardown(() => dev.close());
  t.equal(dev.size, 10);
  t.equal((await dev.read(2, 5)).toString(), '23456');
  t.equal(dev.capabilities.readOnly, false);
});

t.test('a file truncated under the device reads zeros past its new end', async (t) => {
  const dir = t.testdir();
  const p = path.join(dir, 'shrink.img');
  const dev = await FileDevice.open(p, { create: { size: 2 * MiB } });
  t.teardown(() => dev.close());
  const data = pattern(2 * MiB, 17);
  await dev.write(0, data);
  fs.truncateSync(p, 1 * MiB + 10);
  const into = Buffer.alloc(64 * KiB, 0xee);
  const r = await dev.read(1 * MiB, 64 * KiB, into);
  t.ok(r.subarray(0, 10).equals(data.subarray(1 * MiB, 1 * MiB + 10)), 'bytes before the new end');
  t.ok(isAllZero(r.subarray(10)), 'zeros after it (not stale buffer contents)');
  const ex = await dev.blockStatus(1 * MiB + 64 * KiB, 64 * KiB);
  t.same(ex, [{ length: 64 * KiB, flags: HOLE }], 'beyond the new end is a hole');
});

t.test('read-only devices reject writes with EPERM', async (t) => {
  const dir = t.testdir({ 'ro.img': Buffer.alloc(MiB, 7) });
  const p = path.join(dir, 'ro.img');
  const dev = await FileDevice.open(p, { readOnly: true });
  t.teardown(() => dev.close());
  t.equal(dev.capabilities.readOnly, true);
  t.same([...(await dev.read(100, 4))], [7, 7, 7, 7], 'reads work');
  await expectRejectCode(t, dev.write(0, Buffer.alloc(10)), 1, 'write');
  await expectRejectCode(t, dev.zero(0, 4096, { mayTrim: true }), 1, 'zero');
  await expectRejectCode(t, dev.trim(0, 4096), 1, 'trim');
  t.ok(readRaw(p, 0, MiB).equals(Buffer.alloc(MiB, 7)), 'file unchanged');
  await dev.flush();
});

t.test('block status: holes and data', async (t) => {
  const dir = t.testdir();
  const p = path.join(dir, 'bs.img');
  const size = 64 * MiB;
  const dev = await FileDevice.open(p, { create: { size } });
  t.teardown(() => dev.close());

  t.same(await dev.blockStatus(0, size), [{ length: size, flags: HOLE }], 'an empty sparse file is one hole');

  await dev.write(1 * MiB, pattern(1 * MiB, 5));
  await dev.write(10 * MiB, pattern(4 * KiB, 6));
  await dev.flush();

  // File systems report allocation in their block size; round as they do.
  const bs = fs.statSync(p).blksize;
  const down = (x: number) => Math.floor(x / bs) * bs;
  const up = (x: number) => Math.ceil(x / bs) * bs;
  const d1 = [down(1 * MiB), up(2 * MiB)];
  const d2 = [down(10 * MiB), up(10 * MiB + 4 * KiB)];
  const expected: Array<[number, number]> = [
    [d1[0], HOLE],
    [d1[1] - d1[0], DATA],
    [d2[0] - d1[1], HOLE],
    [d2[1] - d2[0], DATA],
    [size - d2[1], HOLE],
  ];

  const all = await dev.blockStatus(0, size);
  t.same(normalise(all), expected, 'hole, data, hole, data, hole');
  t.equal(total(all), size, 'covers the whole request');
  t.ok(all.every((e) => e.length > 0), 'no empty extents');

  // A window starting inside data and ending inside the following hole.
  const w = await dev.blockStatus(1.5 * MiB, 1 * MiB);
  t.same(normalise(w), [
    [d1[1] - 1.5 * MiB, DATA],
    [2.5 * MiB - d1[1], HOLE],
  ], 'window data then hole');
  t.equal(total(w), 1 * MiB, 'clamped to the requested length');

  // Entirely within a hole; entirely within data.
  t.same(await dev.blockStatus(3 * MiB, 5000), [{ length: 5000, flags: HOLE }], 'inside a hole');
  t.same(await dev.blockStatus(1 * MiB + 3, 100), [{ length: 100, flags: DATA }], 'inside data');
  // The last hole up to EOF (SEEK_DATA says ENXIO).
  t.same(await dev.blockStatus(20 * MiB, size - 20 * MiB), [{ length: size - 20 * MiB, flags: HOLE }], 'tail hole');
  // Requests beyond the end are clamped to the size.
  t.same(await dev.blockStatus(size - 10, 1000), [{ length: 10, flags: HOLE }], 'clamped to the device size');
});

t.test('block status: extent length and count limits', async (t) => {
  const dir = t.testdir();
  const p = path.join(dir, 'huge.img');
  const size = 5 * GiB + 12345;
  const dev = await FileDevice.open(p, { create: { size } });
  t.teardown(() => dev.close());
  const ex = await dev.blockStatus(0, size);
  t.ok(ex.every((e) => e.length > 0 && e.length <= MAX_EXTENT_LENGTH && e.flags === HOLE), 'each extent <= 2 GiB');
  t.same(ex.map((e) => e.length), [2 * GiB, 2 * GiB, 1 * GiB + 12345], 'split at 2 GiB');
  t.equal(MAX_EXTENT_LENGTH, 0x80000000);

  // Data right at a split point.
  await dev.write(3 * GiB, pattern(64 * KiB, 9));
  const ex2 = await dev.blockStatus(0, size);
  t.equal(total(ex2), size);
  t.ok(ex2.every((e) => e.length > 0 && e.length <= MAX_EXTENT_LENGTH));
  t.same(normalise(ex2), [
    [3 * GiB, HOLE],
    [64 * KiB, DATA],
    [size - 3 * GiB - 64 * KiB, HOLE],
  ]);

  // More fragments than MAX_EXTENTS: 600 islands of data = 1201 extents.
  const frag = path.join(dir, 'frag.img');
  const fdev = await FileDevice.open(frag, { create: { size: 64 * MiB } });
  t.teardown(() => fdev.close());
  const small = pattern(4 * KiB, 10);
  for (let i = 0; i < 600; i++) await fdev.write(i * 64 * KiB + 32 * KiB, small);
  const fx = await fdev.blockStatus(0, 64 * MiB);
  t.equal(fx.length, MAX_EXTENTS, `capped at ${MAX_EXTENTS} extents`);
  t.ok(fx.every((e) => e.length > 0), 'no empty extents');
  t.ok(total(fx) < 64 * MiB && total(fx) > 0, 'a prefix of the request');
  t.same(fx.slice(0, 3), [
    { length: 32 * KiB, flags: HOLE },
    { length: 4 * KiB, flags: DATA },
    { length: 60 * KiB, flags: HOLE },
  ]);
  t.ok(fx.every((e, i) => e.flags === (i % 2 === 0 ? HOLE : DATA)), 'alternating');
  // Continuing from where it stopped picks up the rest.
  const rest = await fdev.blockStatus(total(fx), 64 * MiB - total(fx));
  t.equal(total(fx) + total(rest), 64 * MiB, 'continuation covers the remainder');
});

t.test('trim punches holes', async (t) => {
  const dir = t.testdir();
  const p = path.join(dir, 'trim.img');
  const dev = await FileDevice.open(p, { create: { size: 16 * MiB } });
  t.teardown(() => dev.close());
  const data = pattern(4 * MiB, 11);
  await dev.write(0, data);
  await dev.flush();
  const before = fs.statSync(p).blocks;
  t.ok(before >= (4 * MiB) / 512, 'data allocated');

  await dev.trim(1 * MiB, 2 * MiB);
  t.ok(isAllZero(await dev.read(1 * MiB, 2 * MiB)), 'trimmed range reads zeros');
  t.ok(isAllZero(readRaw(p, 1 * MiB, 2 * MiB)), 'also through another fd');
  t.ok((await dev.read(0, 1 * MiB)).equals(data.subarray(0, 1 * MiB)), 'before intact');
  t.ok((await dev.read(3 * MiB, 1 * MiB)).equals(data.subarray(3 * MiB)), 'after intact');
  const after = fs.statSync(p).blocks;
  t.ok(after <= before - (2 * MiB) / 512, `blocks freed (${before} -> ${after})`);
  t.same(normalise(await dev.blockStatus(0, 16 * MiB)), [
    [1 * MiB, DATA],
    [2 * MiB, HOLE],
    [1 * MiB, DATA],
    [12 * MiB, HOLE],
  ], 'block status shows the hole');

  // Unaligned trim: the partial blocks are zeroed, neighbours intact.
  await dev.trim(100, 5000, { fua: true });
  const head = await dev.read(0, 8192);
  t.ok(head.subarray(0, 100).equals(data.subarray(0, 100)), 'bytes before an unaligned trim intact');
  t.ok(isAllZero(head.subarray(100, 5100)), 'unaligned trim reads zeros');
  t.ok(head.subarray(5100).equals(data.subarray(5100, 8192)), 'bytes after an unaligned trim intact');

  await dev.trim(0, 0);
  t.ok(head.subarray(0, 100).equals((await dev.read(0, 100))), 'zero-length trim is a no-op');
});

t.test('zero with and without mayTrim, fastOnly', async (t) => {
  const dir = t.testdir();
  const p = path.join(dir, 'zero.img');
  const dev = await FileDevice.open(p, { create: { size: 16 * MiB } });
  t.teardown(() => dev.close());
  const data = pattern(8 * MiB, 12);
  await dev.write(0, data);
  await dev.flush();
  const before = fs.statSync(p).blocks;

  // mayTrim: a hole is punched.
  await dev.zero(1 * MiB, 1 * MiB, { mayTrim: true });
  t.ok(isAllZero(await dev.read(1 * MiB, 1 * MiB)), 'zero(mayTrim) reads zeros');
  t.ok((await dev.read(0, 1 * MiB)).equals(data.subarray(0, 1 * MiB)), 'before intact');
  t.ok((await dev.read(2 * MiB, 1 * MiB)).equals(data.subarray(2 * MiB, 3 * MiB)), 'after intact');
  t.ok(fs.statSync(p).blocks <= before - (1 * MiB) / 512, 'zero(mayTrim) freed blocks');
  t.same(await dev.blockStatus(1 * MiB, 1 * MiB), [{ length: 1 * MiB, flags: HOLE }], 'and is a hole');

  // Without mayTrim, unaligned.
  await dev.zero(3 * MiB + 77, 300 * KiB + 5, { fua: true });
  const z = await dev.read(3 * MiB, 1 * MiB);
  t.ok(z.subarray(0, 77).equals(data.subarray(3 * MiB, 3 * MiB + 77)), 'zero: bytes before intact');
  t.ok(isAllZero(z.subarray(77, 77 + 300 * KiB + 5)), 'zero (no trim) reads zeros');
  t.ok(z.subarray(77 + 300 * KiB + 5).equals(data.subarray(3 * MiB + 77 + 300 * KiB + 5, 4 * MiB)), 'zero: bytes after intact');
  t.ok(isAllZero(readRaw(p, 3 * MiB + 77, 300 * KiB + 5)), 'through another fd too');

  // fastOnly on a file system with fallocate (the test directory): succeeds.
  await dev.zero(5 * MiB, 64 * KiB, { fastOnly: true });
  t.ok(isAllZero(await dev.read(5 * MiB, 64 * KiB)), 'fast zero works here');
  await dev.zero(6 * MiB, 64 * KiB, { fastOnly: true, mayTrim: true });
  t.ok(isAllZero(await dev.read(6 * MiB, 64 * KiB)), 'fast zero with mayTrim works here');
  await dev.zero(0, 0, { fastOnly: true });
  t.ok((await dev.read(0, 16)).equals(data.subarray(0, 16)), 'zero-length zero is a no-op');
});

const shmOk = (() => {
  try {
    return fs.statSync('/dev/shm').isDirectory();
  } catch {
    return false;
  }
})();

t.test('tmpfs (/dev/shm): punch hole works, zero range does not', { skip: !shmOk && 'no /dev/shm' }, async (t) => {
  const dir = fs.mkdtempSync('/dev/shm/nbd-cbw-test-');
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const p = path.join(dir, 'shm.img');
  const dev = await FileDevice.open(p, { create: { size: 8 * MiB } });
  t.teardown(() => dev.close());
  const data = pattern(8 * MiB, 13);
  await dev.write(0, data);
  const before = fs.statSync(p).blocks;

  await dev.trim(0, 1 * MiB);
  t.ok(isAllZero(await dev.read(0, 1 * MiB)), 'trim on tmpfs reads zeros');
  t.ok(fs.statSync(p).blocks < before, 'and frees pages');
  t.same(normalise(await dev.blockStatus(0, 2 * MiB)), [
    [1 * MiB, HOLE],
    [1 * MiB, DATA],
  ], 'block status on tmpfs');

  await dev.zero(1 * MiB, 1 * MiB, { mayTrim: true, fastOnly: true });
  t.ok(isAllZero(await dev.read(1 * MiB, 1 * MiB)), 'fast zero with mayTrim punches a hole');

  // No ZERO_RANGE on tmpfs: a fast zero that may not trim must fail ENOTSUP
  // and leave the data alone.
  await expectRejectCode(t, dev.zero(2 * MiB, 1 * MiB, { fastOnly: true }), 95, 'fast zero without trim on tmpfs');
  t.ok((await dev.read(2 * MiB, 1 * MiB)).equals(data.subarray(2 * MiB, 3 * MiB)), 'data untouched after ENOTSUP');
  // ... and again (the unsupported answer is remembered).
  await expectRejectCode(t, dev.zero(2 * MiB, 4096, { fastOnly: true }), 95, 'second fast zero');

  // Slow path: zeros written in 1 MiB chunks, more than one chunk, unaligned.
  await dev.zero(2 * MiB + 5, 3 * MiB + 7);
  const r = await dev.read(2 * MiB, 4 * MiB);
  t.ok(r.subarray(0, 5).equals(data.subarray(2 * MiB, 2 * MiB + 5)), 'before intact');
  t.ok(isAllZero(r.subarray(5, 5 + 3 * MiB + 7)), 'slow zero reads zeros');
  t.ok(r.subarray(5 + 3 * MiB + 7).equals(data.subarray(5 * MiB + 12, 6 * MiB)), 'after intact');
  t.equal(fs.statSync(p).size, 8 * MiB, 'size unchanged');
});

t.test('close: idempotent, waits for in-flight requests, then refuses', async (t) => {
  const dir = t.testdir();
  const p = path.join(dir, 'close.img');
  const dev = await FileDevice.open(p, { create: { size: 4 * MiB } });
  const data = pattern(1 * MiB, 14);
  await dev.write(0, data);
  const pending = dev.read(0, 1 * MiB);
  const c1 = dev.close();
  const c2 = dev.close();
  t.equal(c1, c2, 'same close promise');
  t.ok((await pending).equals(data), 'a read in flight at close completes correctly');
  await c1;
  await expectRejectCode(t, dev.read(0, 10), 108, 'read after close');
  await expectRejectCode(t, dev.write(0, Buffer.alloc(1)), 108, 'write after close');
  await expectRejectCode(t, dev.flush(), 108, 'flush after close');
  await expectRejectCode(t, dev.blockStatus(0, 10), 108, 'block status after close');
  await dev.close();
});

t.test('fs error codes map onto NBD errors', async (t) => {
  t.equal(nbdErrorFor('ENOSPC'), 28);
  t.equal(nbdErrorFor('EDQUOT'), 28);
  t.equal(nbdErrorFor('EROFS'), 1);
  t.equal(nbdErrorFor('EPERM'), 1);
  t.equal(nbdErrorFor('EACCES'), 1);
  t.equal(nbdErrorFor('EINVAL'), 22);
  t.equal(nbdErrorFor('EIO'), 5);
  t.equal(nbdErrorFor('EBADF'), 5);
  t.equal(nbdErrorFor(undefined), 5);
});

// Block devices need root and a loop device; skipped elsewhere.
const loopOk = canUseLoopDevices();

t.test("QEMU's image locks: an image qemu-nbd writes is not served read-write; a served one is locked against QEMU's writers until closed", async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nbd-cbw-locks-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const busy = path.join(dir, 'busy.img');
  makeImage(busy, 8 * MiB, 'random', 31);
  await startQemuNbd(t, busy);
  const inUse = /^file source \S+busy\.img is in use: another process writes to it \(it holds QEMU's "write" lock\); nbd-cbw must see every write/;
  await t.rejects(FileDevice.open(busy), inUse, 'read-write: refused');
  const reader = await FileDevice.open(busy, { readOnly: true });
  t.pass('read-only: served, sharing writes as qemu-nbd -r does');
  await reader.close();
  const serve = await run(process.execPath, [NBD_CBW_BIN, 'serve', '--source', `file:${busy}`, '-U', path.join(dir, 's.sock'), '-f'], { timeoutMs: 30_000 });
  t.not(serve.code, 0, 'nbd-cbw serve exits non-zero');
  t.match(serve.stderr.trim(), new RegExp(`^nbd-cbw: error: ${inUse.source.slice(1)}`), 'and says why in one line');
  t.equal(serve.stderr.trim().split('\n').length, 1, 'one line');

  const mine = path.join(dir, 'mine.img');
  makeImage(mine, 8 * MiB, 'random', 32);
  const dev = await FileDevice.open(mine);
  const qemuWrite = () => run('qemu-io', ['-f', 'raw', '-c', 'write -P 7 0 4k', mine], { timeoutMs: 30_000 });
  const during = await qemuWrite();
  t.not(during.code, 0, 'qemu-io cannot open the served image for writing');
  t.match(during.stderr + during.stdout, /Failed to get "write" lock/, 'QEMU says why');
  const info = await run('qemu-img', ['info', mine], { timeoutMs: 30_000 });
  t.equal(info.code, 0, 'qemu-img info still reads it', { output: info.code ? info.describe() : undefined });
  await t.rejects(FileDevice.open(mine), /mine\.img is in use: another process writes to it/, 'a second read-write nbd-cbw cannot serve it');
  const ro = await FileDevice.open(mine, { readOnly: true });
  t.pass('a read-only one can');
  await ro.close();
  await dev.close();
  const after = await qemuWrite();
  t.equal(after.code, 0, 'once closed, QEMU may write it', { output: after.code ? after.describe() : undefined });
});

t.test('block device (loop)', { skip: !loopOk && 'needs root and losetup' }, async (t) => {
  const backing = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'nbd-cbw-loop-')), 'backing.img');
  t.teardown(() => fs.rmSync(path.dirname(backing), { recursive: true, force: true }));
  fs.writeFileSync(backing, pattern(8 * MiB, 15));
  let loop: string;
  try {
    loop = execFileSync('losetup', ['-f', '--show', backing], { encoding: 'utf8' }).trim();
  } catch (err) {
    t.skip(`losetup failed: ${(err as Error).message.split("\n")[0]}`, () => {});
    return;
  }
  t.teardown(() => execFileSync('losetup', ['-d', loop]));
  const dev = await FileDevice.open(loop, {});
  t.teardown(() => dev.close());
  t.equal(dev.size, 8 * MiB, 'size from sysfs');
  t.ok((await dev.read(0, 4096)).equals(pattern(8 * MiB, 15).subarray(0, 4096)), 'reads the backing file');
  const w = pattern(10000, 16);
  await dev.write(4097, w, { fua: true });
  t.ok((await dev.read(4097, 10000)).equals(w), 'unaligned write/read');
  t.same(await dev.blockStatus(0, 8 * MiB), [{ length: 8 * MiB, flags: DATA }], 'no SEEK_DATA: one data extent');
  await dev.zero(1 * MiB, 64 * KiB, { fastOnly: true });
  t.ok(isAllZero(await dev.read(1 * MiB, 64 * KiB)), 'aligned fast zero');
  await expectRejectCode(t, dev.zero(2 * MiB + 1, 1000, { fastOnly: true }), 95, 'unaligned fast zero');
  await dev.zero(2 * MiB + 1, 1000);
  t.ok(isAllZero(await dev.read(2 * MiB + 1, 1000)), 'unaligned slow zero');
  await dev.trim(3 * MiB, 64 * KiB);
  t.ok(isAllZero(await dev.read(3 * MiB, 64 * KiB)), 'aligned trim on a loop device discards');
  await dev.trim(4 * MiB + 1, 1000); // advisory; must not fail
  await dev.flush();
});
