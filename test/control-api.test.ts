// The control API's security and error handling, against a real nbd-cbw:
// - the default control socket (SOCKET.ctl) and an explicit --control path
//   are mode 0600 whatever the umask;
// - a TCP control address without --control-token-file: serve exits
//   non-zero with a clear message, before serving anything;
// - with a token (TCP on 127.0.0.1): no token or a wrong one gets 401 on
//   every route, the right one 200;
// - bad requests get a clear 4xx with a JSON {"error": ...}: bad sizes,
//   unknown job, bad target URI, non-JSON body, oversized body, unknown
//   route, wrong method; a second job while one runs gets
//   409, and so do pause, cancel and a speed limit on an ended job.
// - GET /v1/jobs/:id?wait=MS: on a paused job it answers after MS with the
//   job still paused; held while the job runs, it answers as soon as the job
//   is cancelled (well before its 20 s wait); bad values get 400; `backup
//   wait` with a long --interval returns as soon as the job completes.

import t, { type Test } from 'tap';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import { MiB, NBD_CBW_BIN, makeImage, run, startNbdCbw, tmpPath, type Peer } from './helpers/peers';
import { controlSocketOf, getJob, httpRequest, rawHttp, waitJobEnd, type HttpResult, type HttpTarget } from './helpers/faults';

const SIZE = 16 * MiB;

async function server(t: Test, extra: string[] = [], opts: { umask?: number } = {}): Promise<{ cbw: Peer; image: string }> {
  const image = tmpPath(t, 'disk', '.img');
  makeImage(image, SIZE, 'random', 701);
  // spawn() happens synchronously inside startNbdCbw: the child inherits this umask.
  const old = opts.umask !== undefined ? process.umask(opts.umask) : null;
  let started: Promise<Peer>;
  try {
    started = startNbdCbw(t, ['--source', `file:${image}`, ...extra]);
  } finally {
    if (old !== null) process.umask(old);
  }
  return { cbw: await started, image };
}

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const port = (s.address() as net.AddressInfo).port;
      s.close(() => resolve(port));
    });
  });
}

/** A 4xx with a JSON body {"error": "<non-empty>"} matching `re`. */
function clientError(t: Test, r: HttpResult, status: number, re: RegExp, what: string): void {
  t.equal(r.status, status, `${what}: ${status}`, { body: r.text });
  t.match(String(r.headers['content-type']), /application\/json/, `${what}: JSON`);
  t.type(r.json?.error, 'string', `${what}: has an error message`);
  t.match(r.json?.error ?? '', re, `${what}: "${r.json?.error}"`);
}

t.test('control sockets are created 0600, whatever the umask', async (t) => {
  const { cbw } = await server(t, [], { umask: 0 });
  const ctl = controlSocketOf(cbw.socket);
  const st = fs.statSync(ctl);
  t.ok(st.isSocket(), `${path.basename(ctl)} is a socket`);
  t.equal((st.mode & 0o777).toString(8), '600', 'the default control socket is mode 0600 (umask 0)');
  const r = await httpRequest({ socketPath: ctl }, 'GET', '/v1/export');
  t.equal(r.status, 200, 'GET /v1/export answers');
  t.same(r.json, { name: 'disk', size: SIZE }, 'with the export name and size');

  const explicit = tmpPath(t, 'explicit', '.ctl');
  await server(t, ['--control', explicit], { umask: 0 });
  t.equal((fs.statSync(explicit).mode & 0o777).toString(8), '600', 'an explicit --control socket is mode 0600 too');
});

t.test('a TCP control address without --control-token-file is refused', async (t) => {
  const image = tmpPath(t, 'disk', '.img');
  makeImage(image, SIZE, 'zero');
  const port = await freePort();
  const sock = tmpPath(t, 'cbw', '.sock');
  const r = await run(
    process.execPath,
    [NBD_CBW_BIN, 'serve', '--source', `file:${image}`, '-f', '-U', sock, '--control', `127.0.0.1:${port}`],
    { timeoutMs: 20_000 },
  );
  t.not(r.code, 0, 'serve exits non-zero', { out: r.describe() });
  t.notOk(r.timedOut, 'at once');
  t.match(r.stderr, /--control-token-file/, `naming the missing option: ${r.stderr.trim()}`);
  t.notOk(fs.existsSync(sock), 'and never served the disk');
});

t.test('TCP control with a bearer token: 401 without it or with a wrong one, 200 with it', async (t) => {
  const port = await freePort();
  const tokenFile = tmpPath(t, 'token', '.txt');
  const token = 'c0ntrol-t0ken-for-tests';
  fs.writeFileSync(tokenFile, `${token}\n`, { mode: 0o600 });
  const { cbw } = await server(t, ['--control', `127.0.0.1:${port}`, '--control-token-file', tokenFile]);
  t.notOk(fs.existsSync(controlSocketOf(cbw.socket)), 'no unix control socket when --control is TCP');
  const ctl: HttpTarget = { host: '127.0.0.1', port };
  for (const [method, route] of [
    ['GET', '/v1/export'],
    ['GET', '/v1/jobs'],
    ['POST', '/v1/jobs'],
    ['GET', '/v1/jobs/current'],
    ['POST', '/v1/jobs/current/cancel'],
    ['GET', '/metrics'],
    ['GET', '/nowhere'],
  ] as const) {
    const none = await httpRequest(ctl, method, route, method === 'POST' ? { body: { target: 'file:/tmp/x' } } : {});
    t.equal(none.status, 401, `${method} ${route} without a token: 401`);
    const wrong = await httpRequest(ctl, method, route, { token: 'wrong-token', ...(method === 'POST' ? { body: { target: 'file:/tmp/x' } } : {}) });
    t.equal(wrong.status, 401, `${method} ${route} with a wrong token: 401`);
  }
  const basic = await httpRequest(ctl, 'GET', '/v1/export', { headers: { authorization: `Basic ${Buffer.from(`x:${token}`).toString('base64')}` } });
  t.equal(basic.status, 401, 'the token as Basic auth: 401');
  const prefix = await httpRequest(ctl, 'GET', '/v1/export', { token: token.slice(0, -1) });
  t.equal(prefix.status, 401, 'a prefix of the token: 401');
  const good = await httpRequest(ctl, 'GET', '/v1/export', { token });
  t.equal(good.status, 200, 'the right token: 200');
  t.same(good.json, { name: 'disk', size: SIZE }, 'with the export');
  const jobs = await httpRequest(ctl, 'GET', '/v1/jobs', { token });
  t.equal(jobs.status, 200, 'GET /v1/jobs with the token: 200');
  const metrics = await httpRequest(ctl, 'GET', '/metrics', { token });
  t.equal(metrics.status, 200, 'GET /metrics with the token: 200');
  // The CLI reads the same token file.
  const cli = await run(process.execPath, [NBD_CBW_BIN, 'backup', 'start', '--control', `127.0.0.1:${port}`, '--control-token-file', tokenFile, '--target', `file:${tmpPath(t, 'b', '.raw')}`, '--json'], { timeoutMs: 20_000 });
  t.equal(cli.code, 0, '`backup start --control-token-file` works over TCP', { out: cli.describe() });
  const noTok = await run(process.execPath, [NBD_CBW_BIN, 'backup', 'status', '--control', `127.0.0.1:${port}`], { timeoutMs: 20_000 });
  t.not(noTok.code, 0, '`backup status` without the token fails');
  t.match(noTok.stderr, /token/, `saying so: ${noTok.stderr.trim()}`);
});

t.test('bad requests get clear 4xx errors', async (t) => {
  const { cbw } = await server(t);
  const ctl: HttpTarget = { socketPath: controlSocketOf(cbw.socket) };
  const target = `file:${tmpPath(t, 'backup', '.raw')}`;
  const post = (body: unknown, route = '/v1/jobs') => httpRequest(ctl, 'POST', route, { body });

  clientError(t, await post({ target, bufferBytes: -1 }), 400, /bufferBytes/, 'bufferBytes -1');
  clientError(t, await post({ target, bufferBytes: 1.5 }), 400, /bufferBytes/, 'bufferBytes 1.5');
  clientError(t, await post({ target, bufferBytes: '256M' }), 400, /bufferBytes/, 'bufferBytes "256M"');
  clientError(t, await post({ target, workers: 0 }), 400, /workers/, 'workers 0');
  clientError(t, await post({ target, workers: 100000 }), 400, /workers/, 'workers 100000');
  clientError(t, await post({ target, clusterSize: 3000 }), 400, /clusterSize/, 'clusterSize 3000');
  clientError(t, await post({ target, clusterSize: 1024 }), 400, /clusterSize/, 'clusterSize 1024');
  clientError(t, await post({ target, maxChunk: 1 }), 400, /maxChunk/, 'maxChunk 1');
  clientError(t, await post({ target, speed: -5 }), 400, /speed/, 'speed -5');
  clientError(t, await post({ target, cbwTimeoutMs: -1 }), 400, /cbwTimeoutMs/, 'cbwTimeoutMs -1');
  clientError(t, await post({ target, onCbwError: 'ignore' }), 400, /onCbwError/, 'onCbwError "ignore"');
  clientError(t, await post({}), 400, /target/, 'no target');
  clientError(t, await post({ target: 42 }), 400, /target/, 'target 42');
  clientError(t, await post({ target: 'ftp://example/disk' }), 400, /unrecognised target|target/, 'target ftp://');
  clientError(t, await post({ target: 'nbd+unix:///disk' }), 400, /socket/, 'nbd+unix:// without ?socket=');
  clientError(t, await post({ target: `nbd+unix:///disk?socket=${tmpPath(t, 'nothing', '.sock')}` }), 400, /cannot connect|no such socket/, 'a target socket nobody listens on');
  clientError(t, await post({ target: 'file:/nonexistent-dir/x.raw' }), 400, /cannot create|no such file|ENOENT/i, 'a file target in a missing directory');
  clientError(t, await httpRequest(ctl, 'POST', '/v1/jobs', { body: '{"target": "file:/tmp/x"', headers: { 'content-type': 'application/json' } }), 400, /JSON/, 'a truncated JSON body');
  clientError(t, await httpRequest(ctl, 'POST', '/v1/jobs', { body: 'target=file:/tmp/x' }), 400, /JSON/, 'a form body');
  clientError(t, await httpRequest(ctl, 'POST', '/v1/jobs', { body: '[1,2]' }), 400, /JSON object/, 'a JSON array');
  // Oversized: the server answers 413 as soon as it has read 64 KiB and
  // closes, possibly while the body is still being sent, so read the answer
  // like curl does (Node's http client would report EPIPE instead).
  for (const size of [65 * 1024, 256 * 1024, 4 * 1024 * 1024]) {
    const big = Buffer.alloc(size, 0x20);
    big.write(`{"target": "${target}", "pad": "`, 0);
    const head = Buffer.from(`POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: ${size}\r\n\r\n`);
    const r = await rawHttp(ctl, Buffer.concat([head, big]));
    t.equal(r.status, 413, `a ${size / 1024} KiB body: 413`, { response: r.text.slice(0, 300) });
    t.match(r.text, /"error":"request body too large"/, `a ${size / 1024} KiB body: "request body too large"`);
  }
  clientError(t, await httpRequest(ctl, 'GET', '/v1/jobs/no-such-job'), 404, /no job/, 'an unknown job');
  clientError(t, await httpRequest(ctl, 'POST', '/v1/jobs/no-such-job/cancel'), 404, /no job/, 'cancelling an unknown job');
  clientError(t, await httpRequest(ctl, 'GET', '/v1/jobs/current'), 404, /^no backup job has run on this export yet$/, 'the current job when there is none');
  clientError(t, await httpRequest(ctl, 'GET', '/v2/jobs'), 404, /no route/, 'an unknown route');
  clientError(t, await httpRequest(ctl, 'GET', '/'), 404, /no route/, 'the root');
  clientError(t, await httpRequest(ctl, 'GET', '/v1/nothing'), 404, /no route/, 'an unknown /v1 route');
  clientError(t, await httpRequest(ctl, 'DELETE', '/v1/jobs'), 405, /not allowed/, 'DELETE /v1/jobs');
  clientError(t, await httpRequest(ctl, 'PUT', '/v1/jobs', { body: { target } }), 405, /not allowed/, 'PUT /v1/jobs');
  // Nothing was started by any of that.
  const list = await httpRequest(ctl, 'GET', '/v1/jobs');
  t.same(list.json, [], 'no job was created by the bad requests');

  // A real job, to check the per-job routes.
  const started = await post({ target, speed: 1 * MiB });
  t.equal(started.status, 201, 'a good request starts a job: 201', { body: started.text });
  const id = started.json.id as string;
  clientError(t, await httpRequest(ctl, 'PUT', `/v1/jobs/${id}`), 405, /not allowed/, 'PUT on a job');
  clientError(t, await httpRequest(ctl, 'DELETE', `/v1/jobs/${id}`), 405, /not allowed/, 'DELETE on a job');
  clientError(t, await httpRequest(ctl, 'POST', `/v1/jobs/${id}/explode`), 404, /no route/, 'an unknown job action');
  clientError(t, await post({ bytesPerSecond: -1 }, `/v1/jobs/${id}/speed`), 400, /bytesPerSecond/, 'speed -1');
  clientError(t, await post({ bytesPerSecond: 'fast' }, `/v1/jobs/${id}/speed`), 400, /bytesPerSecond/, 'speed "fast"');
  clientError(t, await httpRequest(ctl, 'POST', `/v1/jobs/${id}/speed`, { body: 'nope' }), 400, /JSON/, 'speed with a non-JSON body');

  // A second job while one runs.
  clientError(t, await post({ target: `file:${tmpPath(t, 'second', '.raw')}` }), 409, /already running/, 'a second job while one runs');
  const st = await getJob(ctl, id);
  t.ok(st.state === 'running', `the first job is unaffected (${st.state})`);
  const cancel = await httpRequest(ctl, 'POST', `/v1/jobs/${id}/cancel`);
  t.equal(cancel.status, 200, 'cancel: 200');
  const end = await waitJobEnd(ctl, id, 10_000);
  t.equal(end.state, 'cancelled', 'the job is cancelled');
  clientError(t, await httpRequest(ctl, 'POST', `/v1/jobs/${id}/pause`), 409, /cancelled/, 'pausing a cancelled job');
  clientError(t, await httpRequest(ctl, 'POST', `/v1/jobs/${id}/cancel`), 409, /cancelled/, 'cancelling it again');
  clientError(t, await httpRequest(ctl, 'POST', `/v1/jobs/${id}/speed`, { body: { bytesPerSecond: 1 << 20 } }), 409, /cancelled/, 'a speed limit on a cancelled job');
  const again = await post({ target: `file:${tmpPath(t, 'third', '.raw')}` });
  t.equal(again.status, 201, 'once it ended, a new job can start', { body: again.text });
  const done = await waitJobEnd(ctl, again.json.id as string, 30_000);
  t.equal(done.state, 'completed', 'and completes');
});

t.test('GET /v1/jobs/:id?wait=MS answers when the job ends or MS pass', async (t) => {
  const { cbw } = await server(t);
  const ctlPath = controlSocketOf(cbw.socket);
  const ctl: HttpTarget = { socketPath: ctlPath };
  // Slow enough to still be running while we look: 16 MiB at 1 MiB/s.
  const started = await httpRequest(ctl, 'POST', '/v1/jobs', { body: { target: `file:${tmpPath(t, 'w', '.raw')}`, speed: MiB } });
  t.equal(started.status, 201, 'job started');
  const id = String(started.json?.id);
  t.equal((await httpRequest(ctl, 'POST', `/v1/jobs/${id}/pause`)).status, 200, 'paused');
  const timedOut = await httpRequest(ctl, 'GET', `/v1/jobs/${id}?wait=300`);
  t.equal(timedOut.status, 200);
  t.equal(timedOut.json?.state, 'paused', 'wait=300 on a paused job: answered after its wait, still paused');
  for (const bad of ['-1', 'abc', '1.5', '20001']) {
    clientError(t, await httpRequest(ctl, 'GET', `/v1/jobs/${id}?wait=${bad}`), 400, /wait/, `wait=${bad}`);
  }
  t.equal((await httpRequest(ctl, 'POST', `/v1/jobs/${id}/resume`)).status, 200, 'resumed');

  // Held for up to 20 s; the cancel must end it at once. The 10 s bound only
  // tells "answered by the end" from "answered by its own 20 s wait".
  const held = httpRequest(ctl, 'GET', `/v1/jobs/${id}?wait=20000`, { timeoutMs: 30_000 });
  await new Promise((r) => setTimeout(r, 200));
  t.equal((await httpRequest(ctl, 'POST', `/v1/jobs/${id}/cancel`)).status, 200, 'cancelled');
  const answer = await Promise.race([held, new Promise<null>((r) => setTimeout(() => r(null), 10_000).unref())]);
  t.ok(answer, 'the held request answered when the job ended, not after its 20 s');
  t.equal(answer?.json?.state, 'cancelled', 'and says cancelled');

  // backup wait --interval 20000 on a job that completes quickly.
  const second = await httpRequest(ctl, 'POST', '/v1/jobs', { body: { target: `file:${tmpPath(t, 'w2', '.raw')}`, speed: 8 * MiB } });
  t.equal(second.status, 201, 'second job started');
  const w = await run(process.execPath, [NBD_CBW_BIN, 'backup', 'wait', '--json', '--interval', '20000', '--control', ctlPath], { timeoutMs: 15_000 });
  t.equal(w.code, 0, `backup wait exits 0 once the job completed (${w.stderr.trim()})`);
  const lines = w.stdout.trim().split('\n').map((l) => JSON.parse(l) as { state: string });
  t.equal(lines[lines.length - 1].state, 'completed', 'its last line says completed');
  t.ok(lines.length <= 3, `a line at the start and one at the end, not one per poll (${lines.length})`);
});

t.test('backup start --wait follows the job to its end, exit status from the outcome', async (t) => {
  const { cbw, image } = await server(t);
  const ctlPath = controlSocketOf(cbw.socket);
  const target = tmpPath(t, 'sw', '.raw');
  const done = await run(
    process.execPath,
    [NBD_CBW_BIN, 'backup', 'start', '--wait', '--json', '--interval', '20000', '--target', `file:${target}`, '--control', ctlPath],
    { timeoutMs: 30_000 },
  );
  t.equal(done.code, 0, `exits 0 once the job completed (${done.stderr.trim()})`);
  const lines = done.stdout.trim().split('\n').map((l) => JSON.parse(l) as { id: string; state: string });
  t.equal(lines[0].id, lines[lines.length - 1].id, 'every line is the started job');
  t.equal(lines[lines.length - 1].state, 'completed', 'the last line says completed');
  t.ok(fs.readFileSync(target).equals(fs.readFileSync(image)), 'the target holds the disk');

  // A job that does not complete: --wait exits 1 and says how it ended.
  const slow = run(
    process.execPath,
    [NBD_CBW_BIN, 'backup', 'start', '--wait', '--target', `file:${tmpPath(t, 'sw2', '.raw')}`, '--speed', '1M', '--control', ctlPath],
    { timeoutMs: 30_000 },
  );
  const ctl: HttpTarget = { socketPath: ctlPath };
  let running = await getJob(ctl, 'current');
  for (let i = 0; i < 100 && (running?.state !== 'running' || running?.id === lines[0].id); i++) {
    await new Promise((r) => setTimeout(r, 50));
    running = await getJob(ctl, 'current');
  }
  t.equal(running?.state, 'running', 'the second job runs');
  t.equal((await httpRequest(ctl, 'POST', '/v1/jobs/current/cancel')).status, 200, 'cancelled');
  const cancelled = await slow;
  t.equal(cancelled.code, 1, 'start --wait exits 1 for a cancelled job');
  t.match(cancelled.stderr, /started backup job .*\n(.|\n)*: cancelled/, 'it said it started, then that the job was cancelled');
});
