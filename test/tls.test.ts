// TLS on both sides of nbd-cbw, with throwaway certificates from
// scripts/make-test-certs.sh (qemu's layout: ca-cert.pem, server-cert.pem,
// server-key.pem, client-cert.pem, client-key.pem).
//
// Guest side (nbd-cbw as a TLS server):
//   --tls=require  nbdinfo over nbds:// works and reports TLS; plaintext
//                  nbdinfo is refused; qemu-io over TLS writes and reads back
//                  patterns; a qemu client trusting another CA is refused
//   --tls=on       plaintext and TLS both work
//   --tls-verify-peer  a client with a certificate from the CA is accepted,
//                  one without a client certificate is refused
// Source and target side (nbd-cbw as a TLS client):
//   qemu-nbd with TLS (which by default also demands a client certificate)
//   as the source; nbdkit --tls=require as a backup target: the backup
//   completes and equals the disk; a wrong CA gives a clear error for the
//   source (serve exits non-zero) and for the target (the job is refused).
//
// Note: libnbd 1.14 (nbdinfo, nbdcopy) does not check the server's
// certificate on unix sockets (it connects even with the wrong CA), so the
// wrong-CA checks use nbd-cbw and qemu as clients, which do.

import t, { type Test } from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import {
  MiB,
  REPO_ROOT,
  firstDifference,
  makeImage,
  run,
  startNbdCbw,
  startNbdkit,
  startQemuNbd,
  tmpDir,
  tmpPath,
  type RunResult,
} from './helpers/peers';
import { controlSocketOf, httpRequest, snapshotFile, startJob, waitJobEnd } from './helpers/faults';

const SIZE = 16 * MiB;

async function makeCerts(t: Test, name: string): Promise<string> {
  const dir = path.join(tmpDir(t), name);
  const r = await run('bash', [path.join(REPO_ROOT, 'scripts', 'make-test-certs.sh'), dir], { timeoutMs: 60_000 });
  if (r.code !== 0) throw new Error(`make-test-certs.sh failed:\n${r.describe()}`);
  return dir;
}

/** A directory with only the CA certificate of `certs` (no client identity). */
function caOnly(t: Test, certs: string, name: string): string {
  const dir = path.join(tmpDir(t), name);
  fs.mkdirSync(dir);
  fs.copyFileSync(path.join(certs, 'ca-cert.pem'), path.join(dir, 'ca-cert.pem'));
  return dir;
}

function tlsUri(socket: string, exportName: string, certs: string): string {
  return `nbds+unix:///${exportName}?socket=${socket}&tls-certificates=${certs}`;
}

async function nbdinfoJson(uri: string): Promise<{ r: RunResult; info: { TLS?: boolean; exports?: Array<{ 'export-size': number }> } | null }> {
  const r = await run('nbdinfo', ['--json', uri], { timeoutMs: 30_000 });
  let info = null;
  try {
    info = JSON.parse(r.stdout);
  } catch {
    // not JSON: failed
  }
  return { r, info };
}

/** qemu-io over TLS with the x509 credentials in `certs`. */
function qemuIoTls(socket: string, certs: string, cmds: string[]): Promise<RunResult> {
  const args = [
    '--object',
    `tls-creds-x509,id=tls0,endpoint=client,dir=${certs}`,
    '--image-opts',
    `driver=nbd,server.type=unix,server.path=${socket},export=disk,tls-creds=tls0,tls-hostname=localhost`,
  ];
  for (const c of cmds) args.push('-c', c);
  return run('qemu-io', args, { timeoutMs: 30_000 });
}

function qemuIoPlain(uri: string, cmds: string[]): Promise<RunResult> {
  const args = ['-f', 'raw'];
  for (const c of cmds) args.push('-c', c);
  args.push(uri);
  return run('qemu-io', args, { timeoutMs: 30_000 });
}

function qemuIoOk(t: Test, r: RunResult, what: string): void {
  t.equal(r.code, 0, `${what}: qemu-io exits 0`, { out: r.describe() });
  t.notMatch(r.stdout + r.stderr, /Pattern verification failed|failed|error/i, `${what}: no failure`);
}

t.test('--tls=require: TLS clients work, plaintext is refused', async (t) => {
  const certs = await makeCerts(t, 'certs');
  const otherCa = await makeCerts(t, 'other');
  const image = tmpPath(t, 'disk', '.img');
  makeImage(image, SIZE, 'zero');
  const cbw = await startNbdCbw(t, ['--source', `file:${image}`, '--tls=require', '--tls-certificates', certs]);

  const tls = await nbdinfoJson(tlsUri(cbw.socket, 'disk', certs));
  t.equal(tls.r.code, 0, 'nbdinfo over nbds:// works', { out: tls.r.describe() });
  t.equal(tls.info?.TLS, true, 'and reports TLS');
  t.equal(tls.info?.exports?.[0]?.['export-size'], SIZE, 'and the export size');

  const plain = await nbdinfoJson(cbw.uri);
  t.not(plain.r.code, 0, 'plaintext nbdinfo is refused (non-zero exit)');
  t.match(plain.r.stderr, /TLS|tls|not supported|refused|error/i, `nbdinfo says why: ${plain.r.stderr.trim().split('\n')[0]}`);
  const plainIo = await qemuIoPlain(cbw.uri, ['read 0 4k']);
  t.not(plainIo.code, 0, 'plaintext qemu-io is refused too');

  const w = await qemuIoTls(cbw.socket, certs, [
    'write -P 0x5a 0 1M',
    'write -P 0xa5 3M 64k',
    'write -z 8M 1M',
    'flush',
    'read -P 0x5a 0 1M',
    'read -P 0xa5 3M 64k',
    'read -P 0 8M 1M',
  ]);
  qemuIoOk(t, w, 'qemu-io over TLS writes and reads back patterns');
  const again = await qemuIoTls(cbw.socket, certs, ['read -P 0x5a 0 1M', 'read -P 0xa5 3M 64k']);
  qemuIoOk(t, again, 'a second TLS session reads the same data');
  const wrong = await qemuIoTls(cbw.socket, otherCa, ['read 0 4k']);
  t.not(wrong.code, 0, 'qemu-io trusting another CA is refused', { out: wrong.describe() });
  t.match(wrong.stdout + wrong.stderr, /certificate|verif|trust/i, `with a certificate error: ${(wrong.stdout + wrong.stderr).trim().split('\n')[0]}`);
  await cbw.stop();
  const b = fs.readFileSync(image);
  t.ok(b.subarray(0, MiB).every((x) => x === 0x5a) && b.subarray(3 * MiB, 3 * MiB + 65536).every((x) => x === 0xa5), 'the data is in the image file');
});

t.test('--tls=on: plaintext and TLS both work', async (t) => {
  const certs = await makeCerts(t, 'certs');
  const image = tmpPath(t, 'disk', '.img');
  makeImage(image, SIZE, 'zero');
  const cbw = await startNbdCbw(t, ['--source', `file:${image}`, '--tls=on', '--tls-certificates', certs]);
  const plain = await nbdinfoJson(cbw.uri);
  t.equal(plain.r.code, 0, 'plaintext nbdinfo works', { out: plain.r.describe() });
  t.equal(plain.info?.TLS, false, 'without TLS');
  const tls = await nbdinfoJson(tlsUri(cbw.socket, 'disk', certs));
  t.equal(tls.r.code, 0, 'nbdinfo over nbds:// works', { out: tls.r.describe() });
  t.equal(tls.info?.TLS, true, 'with TLS');
  qemuIoOk(t, await qemuIoTls(cbw.socket, certs, ['write -P 0x11 0 64k']), 'qemu-io over TLS writes');
  qemuIoOk(t, await qemuIoPlain(cbw.uri, ['read -P 0x11 0 64k', 'write -P 0x22 64k 64k']), 'plaintext qemu-io reads it and writes');
  qemuIoOk(t, await qemuIoTls(cbw.socket, certs, ['read -P 0x22 64k 64k']), 'qemu-io over TLS reads that');
});

t.test('--tls-verify-peer: a client certificate from the CA is required', async (t) => {
  const certs = await makeCerts(t, 'certs');
  const noClientCert = caOnly(t, certs, 'ca-only');
  const image = tmpPath(t, 'disk', '.img');
  makeImage(image, SIZE, 'zero');
  const cbw = await startNbdCbw(t, ['--source', `file:${image}`, '--tls=require', '--tls-certificates', certs, '--tls-verify-peer']);
  const ok = await nbdinfoJson(tlsUri(cbw.socket, 'disk', certs));
  t.equal(ok.r.code, 0, 'nbdinfo with client-cert.pem in its directory is accepted', { out: ok.r.describe() });
  t.equal(ok.info?.TLS, true, 'over TLS');
  const refused = await nbdinfoJson(tlsUri(cbw.socket, 'disk', noClientCert));
  t.not(refused.r.code, 0, 'nbdinfo with only ca-cert.pem is refused', { out: refused.r.describe() });
  qemuIoOk(t, await qemuIoTls(cbw.socket, certs, ['write -P 0x33 0 64k', 'read -P 0x33 0 64k']), 'qemu-io with a client certificate');
  const q = await qemuIoTls(cbw.socket, noClientCert, ['read 0 64k']);
  t.not(q.code, 0, 'qemu-io without a client certificate is refused', { out: q.describe() });
});

t.test('nbd-cbw as a TLS client: qemu-nbd TLS source, nbdkit TLS target, wrong CA', async (t) => {
  const certs = await makeCerts(t, 'certs');
  const otherCa = await makeCerts(t, 'other');
  const image = tmpPath(t, 'disk', '.img');
  makeImage(image, SIZE, 'random', 601);

  // qemu-nbd with TLS; tls-creds-x509 with endpoint=server verifies the
  // client's certificate by default, so nbd-cbw must present client-cert.pem.
  const qemu = await startQemuNbd(t, image, {
    extraArgs: ['--object', `tls-creds-x509,id=tls0,endpoint=server,dir=${certs}`, '--tls-creds', 'tls0'],
  });
  const target = await startNbdkit(t, ['--tls=require', `--tls-certificates=${certs}`, 'memory', `${SIZE}`]);

  // Wrong CA for the source: serve fails with a clear message.
  const bad = await run(
    process.execPath,
    [path.join(REPO_ROOT, 'bin', 'nbd-cbw'), 'serve', '--source', tlsUri(qemu.socket, 'disk', otherCa), '-f', '-U', tmpPath(t, 'bad', '.sock')],
    { timeoutMs: 30_000 },
  );
  t.not(bad.code, 0, 'serve with a source certificate from another CA exits non-zero', { out: bad.describe() });
  t.match(bad.stderr, /certificate/i, `and says it is about the certificate: ${bad.stderr.trim()}`);
  const plainSrc = await run(
    process.execPath,
    [path.join(REPO_ROOT, 'bin', 'nbd-cbw'), 'serve', '--source', qemu.uri, '-f', '-U', tmpPath(t, 'bad', '.sock')],
    { timeoutMs: 30_000 },
  );
  t.not(plainSrc.code, 0, 'serve with a plaintext URI to a TLS-only source exits non-zero', { out: plainSrc.describe() });

  const cbw = await startNbdCbw(t, ['--source', tlsUri(qemu.socket, 'disk', certs)]);
  // Guest writes (plaintext to nbd-cbw) reach the TLS source.
  qemuIoOk(t, await qemuIoPlain(cbw.uri, ['write -P 0x44 1M 256k', 'read -P 0x44 1M 256k']), 'qemu-io through nbd-cbw to the TLS source');
  const snapshot = tmpPath(t, 'snap', '.img');
  snapshotFile(image, snapshot); // qemu-io has exited: the image is quiet
  const mid = fs.readFileSync(image).subarray(MiB, MiB + 256 * 1024);
  t.ok(mid.every((x) => x === 0x44), 'the write is in the image behind qemu-nbd');

  // Backup to the TLS target; a wrong CA is refused first.
  const ctl = { socketPath: controlSocketOf(cbw.socket) };
  const refused = await httpRequest(ctl, 'POST', '/v1/jobs', { body: { target: tlsUri(target.socket, '', otherCa) } });
  t.equal(refused.status, 400, 'a backup to a TLS target with the wrong CA is refused with 400', { body: refused.text });
  t.match(refused.json?.error ?? '', /certificate/i, `with a clear message: ${refused.json?.error}`);
  const plainTarget = await httpRequest(ctl, 'POST', '/v1/jobs', { body: { target: target.uri } });
  t.equal(plainTarget.status, 400, 'a plaintext URI to a TLS-only target is refused with 400', { body: plainTarget.text });

  const job = await startJob(ctl, { target: tlsUri(target.socket, '', certs) });
  // Guest writes during the backup go to the TLS source; the backup keeps the point in time.
  qemuIoOk(t, await qemuIoPlain(cbw.uri, ['write -P 0x55 0 2M', 'write -P 0x66 10M 1M']), 'guest writes during the backup');
  const end = await waitJobEnd(ctl, job.id, 60_000);
  t.equal(end.state, 'completed', 'the backup to the TLS target completed', { status: end });

  // Read the target back over TLS and compare with the snapshot.
  const copy = tmpPath(t, 'target-copy', '.img');
  const c = await run('nbdcopy', [tlsUri(target.socket, '', certs), copy], { timeoutMs: 60_000 });
  t.equal(c.code, 0, 'nbdcopy reads the target over TLS', { out: c.describe() });
  t.equal(firstDifference(copy, snapshot), null, 'the target equals the disk as it was when the backup started');
  const now = fs.readFileSync(image);
  t.ok(now.subarray(0, 2 * MiB).every((x) => x === 0x55), 'while the source has the newer writes');
});
