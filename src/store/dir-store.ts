// dir:PATH: objects are files under PATH. A chunk is written to a temporary
// file, made durable, then linked into place, so a reader never sees half a
// chunk and two writers of the same chunk cannot clobber each other.

import fs from 'node:fs';
import fsp from 'node:fs/promises';
import path from 'node:path';
import crypto from 'node:crypto';
import type { ObjectStore, StoredObject } from './object-store';

export class DirStore implements ObjectStore {
  readonly description: string;

  private constructor(private readonly root: string) {
    this.description = `dir:${root}`;
  }

  static async open(root: string): Promise<DirStore> {
    const abs = path.resolve(root);
    await fsp.mkdir(abs, { recursive: true });
    return new DirStore(abs);
  }

  private file(key: string): string {
    if (key.includes('..') || key.startsWith('/')) throw new Error(`bad object key "${key}"`);
    return path.join(this.root, key);
  }

  async get(key: string): Promise<Buffer | null> {
    try {
      return await fsp.readFile(this.file(key));
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') return null;
      throw e;
    }
  }

  private async writeTemp(key: string, data: Buffer): Promise<string> {
    const final = this.file(key);
    await fsp.mkdir(path.dirname(final), { recursive: true });
    const tmp = `${final}.tmp-${process.pid}-${crypto.randomBytes(4).toString('hex')}`;
    const fh = await fsp.open(tmp, 'wx', 0o644);
    try {
      await fh.writeFile(data);
      await fh.datasync();
    } finally {
      await fh.close();
    }
    return tmp;
  }

  async putIfAbsent(key: string, data: Buffer): Promise<boolean> {
    const tmp = await this.writeTemp(key, data);
    try {
      await fsp.link(tmp, this.file(key));
      return true;
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'EEXIST') return false;
      throw e;
    } finally {
      await fsp.unlink(tmp).catch(() => undefined);
    }
  }

  async put(key: string, data: Buffer): Promise<void> {
    const tmp = await this.writeTemp(key, data);
    await fsp.rename(tmp, this.file(key));
    // Make the rename itself durable: the manifest is the commit point.
    const dir = await fsp.open(path.dirname(this.file(key)), 'r');
    try {
      await dir.sync();
    } finally {
      await dir.close();
    }
  }

  async *list(prefix: string): AsyncIterable<StoredObject> {
    const out: StoredObject[] = [];
    const walk = async (dir: string, rel: string) => {
      let entries: fs.Dirent[];
      try {
        entries = await fsp.readdir(dir, { withFileTypes: true });
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code === 'ENOENT') return;
        throw e;
      }
      for (const ent of entries) {
        const key = rel ? `${rel}/${ent.name}` : ent.name;
        if (ent.isDirectory()) {
          if (prefix.startsWith(`${key}/`) || key.startsWith(prefix) || prefix.startsWith(key)) {
            await walk(path.join(dir, ent.name), key);
          }
        } else if (ent.isFile() && key.startsWith(prefix) && !ent.name.includes('.tmp-')) {
          out.push({ key, size: (await fsp.stat(path.join(dir, ent.name))).size });
        }
      }
    };
    await walk(this.root, '');
    out.sort((a, b) => (a.key < b.key ? -1 : a.key > b.key ? 1 : 0));
    yield* out;
  }

  async delete(key: string): Promise<void> {
    await fsp.rm(this.file(key), { force: true });
  }

  async close(): Promise<void> {
    // nothing held open
  }
}
