// Target specs and addresses compared by what they name:
// - mapTargetPaths (src/targets/spec.ts) finds every local path a target
//   spec names (file:, dir:, an NBD URI's socket= and tls-certificates=),
//   and rewrites it without touching the rest of the spec;
// - sameListener / forbiddenExportOf (src/targets/nbd-endpoint.ts): a unix
//   socket by its inode, a TCP address by resolved IPs and port, a wildcard
//   listener as every local address.
// Logic with the file system and /etc/hosts (only localhost is looked up:
// no query leaves the machine), no peers;
// test/cbw-job-control.test.ts refuses real targets with it.
import t from 'tap';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { mapTargetPaths } from '../src/targets/spec';
import { forbiddenExportOf, sameListener } from '../src/targets/nbd-endpoint';

t.test('mapTargetPaths rewrites each local path and nothing else', async (t) => {
  const up = (p: string) => `/base/${p}`;
  t.equal(mapTargetPaths('file:a.img', up), 'file:/base/a.img', 'file:');
  t.equal(mapTargetPaths('dir:backups', up), 'dir:/base/backups', 'dir:');
  t.equal(mapTargetPaths('nbd+unix:///disk?socket=t.sock', up), 'nbd+unix:///disk?socket=/base/t.sock', 'socket=');
  t.equal(
    mapTargetPaths('nbds+unix:///d?socket=s&tls-certificates=pki', up),
    'nbds+unix:///d?socket=/base/s&tls-certificates=/base/pki',
    'socket= and tls-certificates=',
  );
  t.equal(mapTargetPaths('nbds://h:1/d?tls-certificates=pki', up), 'nbds://h:1/d?tls-certificates=/base/pki', 'tls-certificates= over TCP');
  t.equal(mapTargetPaths('nbd://host:10809/disk', up), 'nbd://host:10809/disk', 'no path, unchanged');
  t.equal(mapTargetPaths('s3://bucket/prefix', up), 's3://bucket/prefix', 's3 names no local path');
  // A path as URLSearchParams reads it (%20, +), written back so it reads the same.
  const seen: string[] = [];
  const out = mapTargetPaths('nbd+unix:///?socket=my%20dir/a+b.sock', (p) => {
    seen.push(p);
    return `/x/${p}`;
  });
  t.same(seen, ['my dir/a b.sock'], 'the path as the server would read it');
  t.equal(new URL(out).searchParams.get('socket'), '/x/my dir/a b.sock', 'the rewritten URI reads as the new path');
  const same = 'nbd+unix:///?socket=/abs/%2Bodd.sock';
  t.equal(mapTargetPaths(same, (p) => p), same, 'a path left as it is keeps its spelling');
});

t.test('unix sockets are the same listener by inode, whatever path names them', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nbd-cbw-endpoint-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const sock = path.join(dir, 's.sock');
  fs.writeFileSync(sock, ''); // identity is the inode; any file will do
  fs.symlinkSync(sock, path.join(dir, 'link.sock'));
  fs.writeFileSync(path.join(dir, 'other.sock'), '');
  const at = (socketPath: string) => ({ socketPath, exportName: '' });
  t.ok(await sameListener(at(sock), at(path.join(dir, 'link.sock'))), 'a symlink');
  t.ok(await sameListener(at(sock), at(`${dir}/./s.sock`)), 'another spelling');
  t.notOk(await sameListener(at(sock), at(path.join(dir, 'other.sock'))), 'another socket');
  t.notOk(await sameListener(at(sock), { host: 'localhost', port: 10809, exportName: '' }), 'unix against TCP');
  t.ok(await sameListener(at(path.join(dir, 'gone.sock')), at(path.join(dir, 'x', '..', 'gone.sock'))), 'missing: compared as resolved paths');
});

t.test('TCP addresses are the same listener by resolved IP and port; a wildcard listener is every local address', async (t) => {
  const tcp = (host: string, port = 10809) => ({ host, port, exportName: '' });
  t.ok(await sameListener(tcp('localhost'), tcp('127.0.0.1')), 'localhost resolves to loopback');
  t.ok(await sameListener(tcp('127.0.0.1'), tcp('::ffff:127.0.0.1')), 'IPv4-mapped IPv6');
  t.ok(await sameListener(tcp('0.0.0.0'), tcp('127.0.0.1')), 'a wildcard listener is reached over loopback');
  t.ok(await sameListener(tcp('::'), tcp('::1')), 'an IPv6 wildcard too');
  const local = Object.values(os.networkInterfaces())
    .flat()
    .find((a) => a && a.family === 'IPv4' && !a.internal);
  if (local) t.ok(await sameListener(tcp('0.0.0.0'), tcp(local.address)), `a wildcard listener is reached at ${local.address}`);
  t.notOk(await sameListener(tcp('0.0.0.0'), tcp('198.51.100.77')), 'not at an address this machine does not have');
  t.notOk(await sameListener(tcp('127.0.0.1', 10809), tcp('127.0.0.1', 10810)), 'another port');
});

t.test('forbiddenExportOf: any export name at nbd-cbw\'s own listener, only the same name at a source\'s', async (t) => {
  const own = { address: { host: '0.0.0.0', port: 10809, exportName: 'disk' }, anyExportName: true, what: 'own' };
  const source = { address: { host: '127.0.0.1', port: 10900, exportName: 'vm1' }, anyExportName: false, what: 'source' };
  const find = async (host: string, port: number, exportName: string) =>
    (await forbiddenExportOf({ host, port, exportName }, [own, source]))?.what;
  t.equal(await find('localhost', 10809, 'anything'), 'own', 'any name at the own listener');
  t.equal(await find('localhost', 10900, 'vm1'), 'source', 'the source export by name');
  t.equal(await find('localhost', 10900, 'vm2'), undefined, 'another export of the source server is allowed');
  t.equal(await find('localhost', 10901, 'vm1'), undefined, 'another server');
});
