// Network fuzzing of a live nbd-cbw (the CI-short run; scripts/fuzz/long-run
// does 100,000+ sessions):
//
//   node bin/nbd-cbw serve --source file:IMG -U SOCK -f --handshake-timeout 2s --max-connections 64
//
// Many raw connections send the recorded seeds (test/fixtures/fuzz-seeds),
// mutated and split into random pieces with random small delays, both from
// the first byte (handshake phase) and after a valid handshake (transmission
// phase), and close in assorted ways. Meanwhile the NbdClient from
// src/client/client.ts writes and reads back its own region of the disk
// (fuzz requests are kept out of that region, see protectRegion). Then
// hostile sizes: a WRITE claiming 4 GiB followed by 128 MiB and a closed
// socket, an option claiming 2^32-1 bytes followed by 128 MiB, and
// BLOCK_STATUS over 2^63 and 2^32-1 byte ranges and over 2048 extents.
// At the end: nbd-cbw alive, nothing alarming in its output, the
// well-behaved client saw no error, RSS bounded, fds back to the baseline.
//
// Needs `npm run build` (it runs dist/). FUZZ_NETWORK_SESSIONS (default 4000),
// FUZZ_NETWORK_SECONDS (default 25) and FUZZ_SEED change the run.

import t from 'tap';
import * as fs from 'node:fs';
import {
  CRASH_PATTERNS,
  EINVAL,
  MiB,
  WellBehavedClient,
  fdCount,
  fdList,
  loadSeeds,
  probeBlockStatus,
  probeHugeOption,
  probeHugeWrite,
  rssKiB,
  runFuzz,
  pollUntil,
  settleFds,
  sleep,
  startServer,
  withRssSampling,
  type FuzzStats,
  type HostileResult,
  type ServerHandle,
} from './helpers/fuzz';

const RUN_SEED = Number(process.env.FUZZ_SEED ?? 0x5eed);
const SESSIONS = Number(process.env.FUZZ_NETWORK_SESSIONS ?? 4000);
const SECONDS = Number(process.env.FUZZ_NETWORK_SECONDS ?? 25);
const SIZE = 16 * MiB;
/** The well-behaved client's region: the last MiB. */
const PROTECT = { start: SIZE - MiB, end: SIZE };
const RSS_LIMIT_KIB = 300 * 1024;
/** RSS growth allowed across a hostile probe (the least of three runs, after a warm-up). */
const PROBE_GROWTH_KIB = 8 * 1024;
const JUNK = 128 * MiB;

t.test('network fuzz against a live nbd-cbw', async (t) => {
  const seeds = loadSeeds();
  const srv: ServerHandle = await startServer({ size: SIZE, handshakeTimeout: '2s', maxConnections: 64, fragmented: true });
  t.teardown(() => srv.stop());
  const pid = srv.pid;
  const fdsBefore = fdCount(pid);
  const fdsAtStart = fdList(pid);
  const rssBefore = rssKiB(pid);
  let rssPeak = rssBefore;
  const sampler = setInterval(() => {
    try {
      rssPeak = Math.max(rssPeak, rssKiB(pid));
    } catch {
      // exited: the checks below say so
    }
  }, 100);
  t.teardown(() => clearInterval(sampler));

  const wb = new WellBehavedClient(srv.socket, PROTECT, RUN_SEED, { maxIterations: 1_000_000, maxSeconds: 120, pauseMs: 1 });
  await wb.start();
  t.teardown(() => wb.stop());

  await t.test('mutated and split sessions, handshake and transmission phases', async (t) => {
    const s: FuzzStats = await runFuzz({
      socketPath: srv.socket,
      seeds,
      runSeed: RUN_SEED,
      sessions: SESSIONS,
      concurrency: 16,
      maxSeconds: SECONDS,
      protect: PROTECT,
      maxDelayMs: 5,
      shouldStop: () => (srv.alive() ? null : 'nbd-cbw exited'),
    });
    t.comment(
      `${s.sessions} sessions in ${(s.elapsedMs / 1000).toFixed(1)} s (${Math.round(s.sessions / (s.elapsedMs / 1000))}/s): ` +
        `${JSON.stringify(s.byMode)}; server closed ${s.serverClosed}; ${s.bytesSent} bytes sent, ${s.bytesReceived} received; ` +
        `${s.patched} requests kept out of the client's region; mutations ${JSON.stringify(s.byMutation)}`,
    );
    t.ok(srv.alive(), 'nbd-cbw is still running', { exit: srv.exit, output: srv.output().slice(-4000) });
    t.not(s.stoppedBy, 'nbd-cbw exited', 'the run was not stopped by a crash');
    t.ok(s.sessions >= Math.min(SESSIONS, 1000), `at least ${Math.min(SESSIONS, 1000)} sessions ran (${s.sessions})`);
    t.ok(s.byMode.handshake > 0 && s.byMode.transmission > 0, 'both phases fuzzed');
    t.equal(s.connectFailed, 0, 'every connection was accepted');
    t.equal(s.handshakeFailed, 0, 'every valid handshake succeeded (under the connection limit)', {
      firstFailures: s.handshakeFailures,
    });
    t.ok(wb.stats.iterations > 0, `the well-behaved client kept working (${wb.stats.iterations} write/read/verify rounds so far)`);
    t.same(wb.stats.errors, [], 'the well-behaved client saw no error');
  });

  await t.test('hostile sizes are refused without allocating', async (t) => {
    // Warm up (with the well-behaved client still running): the first
    // 128 MiB through a socket grows the heap once.
    await probeHugeWrite(srv.socket, JUNK);
    await probeHugeOption(srv.socket, JUNK);
    // Measure on a quiet server: the well-behaved client's own traffic
    // moves RSS by more than the few MiB looked for here.
    const wbStats = await wb.stop();
    t.comment(
      `well-behaved client: ${wbStats.iterations} rounds, ${(wbStats.bytesVerified / MiB).toFixed(1)} MiB verified, ` +
        `slowest request ${wbStats.maxLatencyMs} ms (${wbStats.slowest})`,
    );
    t.same(wbStats.errors, [], 'the well-behaved client never saw an error, through the fuzzing and the warm-up probes');
    t.ok(wbStats.iterations > 0, 'the well-behaved client made progress');
    await sleep(500);

    // Each probe three times: a server that buffered or allocated the
    // payload would grow by the 128 MiB sent every time; heap growth that is
    // not the probe's shows up at most once (a V8 page, a malloc arena).
    const growth = async (probe: () => Promise<HostileResult>, what: string) => {
      const runs: number[] = [];
      for (let k = 0; k < 3; k++) {
        const r = await withRssSampling(pid, probe);
        runs.push(r.peakKiB - r.beforeKiB);
        t.equal(r.result.junkSent, JUNK, `${what}: 128 MiB of its payload went through (run ${k + 1})`);
        t.same(r.result.replies, [], `${what}: no reply while it is being skipped (run ${k + 1})`);
        t.ok(r.result.closedAfterEnd, `${what}: the server closed once the client half-closed (run ${k + 1})`);
      }
      t.ok(Math.min(...runs) < PROBE_GROWTH_KIB, `${what}: RSS grew by a few MiB at most (${runs.join(', ')} KiB in three runs)`);
      t.ok(Math.max(...runs) < JUNK / 1024, `${what}: never by as much as the 128 MiB sent (max ${Math.max(...runs)} KiB)`);
    };
    await growth(() => probeHugeWrite(srv.socket, JUNK), 'WRITE of 4 GiB - 1');
    await growth(() => probeHugeOption(srv.socket, JUNK), 'option of 2^32-1 bytes');

    const b = await withRssSampling(pid, () =>
      probeBlockStatus(srv.socket, [
        { offset: 0n, length: 0xffffffff }, // 4 GiB on a 16 MiB export
        { offset: (1n << 63n) - (1n << 32n), length: 0xffffffff }, // the top of the 2^63 range
        { offset: (1n << 64n) - 1n, length: 1 }, // wraps past 2^64
        { offset: 0n, length: SIZE }, // the whole export: 2048+ extents
        { offset: 0n, length: SIZE, flags: 8 }, // REQ_ONE
      ]),
    );
    const [len32, top63, wrap, whole, one] = b.result;
    t.equal(len32.error, EINVAL, 'BLOCK_STATUS of 2^32-1 bytes on a 16 MiB export: EINVAL');
    t.equal(top63.error, EINVAL, 'BLOCK_STATUS at 2^63 - 2^32: EINVAL');
    t.equal(wrap.error, EINVAL, 'BLOCK_STATUS at 2^64-1: EINVAL');
    t.equal(whole.error, 0, 'BLOCK_STATUS of the whole export: answered');
    t.ok(whole.extents > 0 && whole.extents <= 1024, `...with at most 1024 extents (${whole.extents})`);
    t.ok(whole.payloadBytes <= 4 + 8 * 1024, `...in at most 8 KiB (${whole.payloadBytes} bytes)`);
    t.equal(one.extents, 1, 'REQ_ONE: one extent');
    t.ok(b.peakKiB - b.beforeKiB < PROBE_GROWTH_KIB, `RSS grew by ${b.peakKiB - b.beforeKiB} KiB at most (block status)`);
  });

  await t.test('afterwards', async (t) => {
    // A fresh well-behaved client still gets its work done.
    const after = new WellBehavedClient(srv.socket, PROTECT, RUN_SEED + 1, { maxIterations: 50, maxSeconds: 20, pauseMs: 0 });
    await after.start();
    await pollUntil(() => after.stats.iterations >= 50 || after.stats.errors.length > 0, 20_000);
    const a = await after.stop();
    t.same(a.errors, [], 'a new client after the probes: no error');
    t.equal(a.iterations, 50, 'a new client after the probes: 50 write/read/verify rounds');
    t.ok(srv.alive(), 'nbd-cbw is alive (pid exists, no exit code)');
    t.equal(srv.exit, null);
    t.ok(fs.existsSync(`/proc/${pid}`), `/proc/${pid} exists`);
    const out = srv.output();
    t.notOk(CRASH_PATTERNS.test(out), 'no crash, unhandled rejection or warning in its output', { output: out.slice(-4000) });
    const fdsAfter = await settleFds(pid, fdsBefore, 2, 10_000);
    // On a failure, which files stayed open (and which were open at the start).
    t.ok(fdsAfter <= fdsBefore + 2, `fds back to the baseline (${fdsBefore} -> ${fdsAfter})`, {
      fdsAtStart,
      fdsNow: fdList(pid),
    });
    const rssNow = rssKiB(pid);
    t.comment(`RSS: ${rssBefore} KiB at start, peak ${rssPeak} KiB, now ${rssNow} KiB`);
    t.ok(rssPeak < RSS_LIMIT_KIB, `RSS stayed under ${RSS_LIMIT_KIB / 1024} MiB (peak ${Math.round(rssPeak / 1024)} MiB)`);
  });
});

