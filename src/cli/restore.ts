// Commands over chunked backups (dir:PATH, s3://BUCKET/PREFIX):
//   restore BACKUP --to TARGET     write a backup back to a file or NBD export
//   verify BACKUP                  re-read and re-hash every chunk
//   list LOCATION                  the complete backups there
//   serve-backup BACKUP            a read-only NBD export of a backup
// BACKUP is a location; it means the newest complete backup there unless
// --id names another.

import type { Command } from 'commander';
import type { ObjectStore, S3Settings } from '../store/object-store';
import type { Manifest } from '../store/layout';
import { addS3Options } from './backup-options';
import { addListenOptions, type ListenOptions } from './serve';
import { backgroundSelf } from './daemon';
import { die, errorMessage, info } from './log';
import { formatSize } from './sizes';
import { terminalProgressBar } from './progress';
import type { SingleBar } from 'cli-progress';

/** The store code, loaded when a command runs rather than at every CLI start. */
async function storeCode() {
  const [objectStore, layout] = await Promise.all([import('../store/object-store'), import('../store/layout')]);
  return { ...objectStore, ...layout };
}

interface StoreCliOptions {
  id?: string;
  s3Endpoint?: string;
  s3Region?: string;
  s3ForcePathStyle?: boolean;
  json?: boolean;
  concurrency?: string;
}

function s3Settings(o: StoreCliOptions): S3Settings {
  return { endpoint: o.s3Endpoint, region: o.s3Region, forcePathStyle: o.s3ForcePathStyle };
}

async function openBackup(location: string, o: StoreCliOptions): Promise<{ store: ObjectStore; manifest: Manifest }> {
  const { openStore, findManifest } = await storeCode();
  try {
    const store = await openStore(location, s3Settings(o));
    try {
      return { store, manifest: await findManifest(store, o.id) };
    } catch (e) {
      await store.close();
      throw e;
    }
  } catch (e) {
    die(errorMessage(e));
  }
}

function progressBar(total: number, label: string): SingleBar | null {
  const bar = terminalProgressBar(`${label} |{bar}| {percentage}% {value}/{total} chunks ETA {eta_formatted}`);
  bar?.start(total, 0);
  return bar;
}

/** Run `work(i)` for i in 0..n-1 with at most `limit` at once; stops at the first error. */
async function forEachLimited(n: number, limit: number, work: (i: number) => Promise<void>): Promise<void> {
  let next = 0;
  let failed: unknown = null;
  const runner = async () => {
    while (failed === null && next < n) {
      const i = next++;
      try {
        await work(i);
      } catch (e) {
        failed ??= e;
      }
    }
  };
  await Promise.all(Array.from({ length: Math.min(limit, n) }, runner));
  if (failed !== null) throw failed;
}

function addStoreOptions(cmd: Command, withId = true): Command {
  if (withId) cmd.option('--id <ID>', 'which backup (IDs come from `nbd-cbw list`); default the newest complete one');
  addS3Options(cmd);
  return cmd;
}

export function registerRestore(program: Command): void {
  const restore = program
    .command('restore <BACKUP>')
    .description('restore a chunked backup (dir:PATH or s3://BUCKET/PREFIX) to a file or NBD export; every chunk is checked against its digest')
    .requiredOption('--to <TARGET>', 'file:PATH (a file, created sparse if new, or a block device), nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH')
    .option('--concurrency <N>', 'chunks fetched and written at once', '8');
  addStoreOptions(restore);
  restore.action(async (location: string, o: StoreCliOptions & { to: string }) => {
    const { store, manifest } = await openBackup(location, o);
    const { chunkLength, fetchChunk } = await storeCode();
    const { openTarget } = await import('../targets/open');
    const started = Date.now();
    try {
      const target = await openTarget(o.to, { size: manifest.diskSize });
      const indices = manifest.chunks.map((_, i) => i);
      const bar = progressBar(indices.length, 'restore');
      let done = 0;
      await forEachLimited(indices.length, Math.max(1, Number(o.concurrency) || 8), async (i) => {
        const digest = manifest.chunks[i];
        const offset = i * manifest.chunkSize;
        const len = chunkLength(manifest, i);
        if (digest === null) {
          if (!(target.zeroProbe ? await target.zeroProbe : target.readsAsZero)) await target.writeZeroes(offset, len);
        } else {
          await target.write(offset, [await fetchChunk(store, digest, len)]);
        }
        bar?.update(++done);
      });
      await target.commit();
      await target.close(true);
      bar?.stop();
      const secs = (Date.now() - started) / 1000;
      info(
        `restored backup ${manifest.id} (${formatSize(manifest.diskSize)}) to ${o.to} in ${secs.toFixed(1)} s` +
          ` (${formatSize(manifest.diskSize / Math.max(secs, 0.001))}/s)`,
      );
    } catch (e) {
      die(`restore failed: ${errorMessage(e)}`);
    } finally {
      await store.close();
    }
  });

  const verify = program
    .command('verify <BACKUP>')
    .description('re-read and re-hash every chunk of a backup; exit 1 if any is missing or corrupt')
    .option('--concurrency <N>', 'chunks checked at once', '8')
    .option('--json', 'print the result as JSON');
  addStoreOptions(verify);
  verify.action(async (location: string, o: StoreCliOptions) => {
    const { store, manifest } = await openBackup(location, o);
    const { chunkLength, fetchChunk } = await storeCode();
    const firstIndex = new Map<string, number>();
    manifest.chunks.forEach((d, i) => {
      if (d && !firstIndex.has(d)) firstIndex.set(d, i);
    });
    const digests = [...firstIndex.keys()];
    const problems: string[] = [];
    const bar = o.json ? null : progressBar(digests.length, 'verify');
    let checked = 0;
    await forEachLimited(digests.length, Math.max(1, Number(o.concurrency) || 8), async (k) => {
      const d = digests[k];
      try {
        await fetchChunk(store, d, chunkLength(manifest, firstIndex.get(d) as number));
      } catch (e) {
        problems.push(errorMessage(e));
      }
      bar?.update(++checked);
    });
    bar?.stop();
    await store.close();
    const result = {
      id: manifest.id,
      chunks: manifest.chunks.length,
      distinctChunks: digests.length,
      zeroChunks: manifest.chunks.filter((c) => c === null).length,
      problems,
      ok: problems.length === 0,
    };
    if (o.json) console.log(JSON.stringify(result));
    else {
      for (const p of problems) console.error(`nbd-cbw: ${p}`);
      console.log(
        `backup ${manifest.id}: ${digests.length} distinct chunks checked, ${result.zeroChunks} zero chunks: ` +
          (result.ok ? 'OK' : `${problems.length} PROBLEM${problems.length === 1 ? '' : 'S'}`),
      );
    }
    process.exit(result.ok ? 0 : 1);
  });

  const list = program
    .command('list <LOCATION>')
    .description('list the complete backups in dir:PATH or s3://BUCKET/PREFIX')
    .option('--json', 'one JSON object per backup');
  addStoreOptions(list, false);
  list.action(async (location: string, o: StoreCliOptions) => {
    const { openStore, listBackupIds, readManifest } = await storeCode();
    let store: ObjectStore;
    try {
      store = await openStore(location, s3Settings(o));
    } catch (e) {
      die(errorMessage(e));
    }
    try {
      const ids = await listBackupIds(store);
      if (!o.json) console.log(`${'ID'.padEnd(26)} ${'CREATED'.padEnd(24)} ${'SIZE'.padStart(10)} ${'STORED'.padStart(10)} SOURCE`);
      for (const id of ids) {
        const m = await readManifest(store, id);
        if (o.json) {
          console.log(
            JSON.stringify({ id, createdAt: m.createdAt, completedAt: m.completedAt, diskSize: m.diskSize, chunkSize: m.chunkSize, uploadedBytes: m.uploadedBytes, referencedBytes: m.referencedBytes, source: m.source }),
          );
        } else {
          console.log(
            `${id.padEnd(26)} ${m.createdAt.padEnd(24)} ${formatSize(m.diskSize).padStart(10)} ${formatSize(m.uploadedBytes).padStart(10)} ${m.source}`,
          );
        }
      }
    } catch (e) {
      die(errorMessage(e));
    } finally {
      await store.close();
    }
  });

  const serve = program
    .command('serve-backup <BACKUP>')
    .description('export a chunked backup read-only over NBD, so qemu-img, nbdcopy or a VM can read it without restoring');
  addListenOptions(serve);
  addStoreOptions(serve);
  serve.action(async (location: string, o: StoreCliOptions & ListenOptions) => {
    if (o.unix === '-' && o.run === undefined) die('-U - (a private socket) only makes sense with --run');
    if (!o.foreground && o.run === undefined) await backgroundSelf();
    const { store, manifest } = await openBackup(location, o);
    const [{ BackupDevice }, { runServer }] = await Promise.all([import('../store/backup-device'), import('./serve-run')]);
    const device = new BackupDevice(store, manifest);
    await runServer(o, { name: o.exportName, description: device.description, device });
  });
}
