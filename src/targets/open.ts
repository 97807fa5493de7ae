// Turn a --target string into a BackupTarget.

import { FileTarget } from './file';
import { NbdTarget } from './nbd';
import type { BackupTarget, TargetOpenOptions } from './types';

export function validateTargetSpec(spec: string): string | null {
  if (spec.startsWith('file:') && spec.length > 5) return null;
  if (/^nbds?(\+unix)?:\/\//.test(spec)) return null;
  return `unrecognised target "${spec}": use file:PATH, nbd[s]://HOST[:PORT]/EXPORT or nbd[s]+unix:///EXPORT?socket=PATH`;
}

export async function openTarget(spec: string, opts: TargetOpenOptions): Promise<BackupTarget> {
  const bad = validateTargetSpec(spec);
  if (bad) throw new Error(bad);
  if (spec.startsWith('file:')) return FileTarget.open(spec.slice(5), opts);
  return NbdTarget.open(spec, opts);
}
