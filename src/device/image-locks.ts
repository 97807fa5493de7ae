// QEMU's image lock bytes (block/file-posix.c), so nbd-cbw and QEMU see each
// other on one image: a process holding an image keeps a shared OFD lock on
// byte 100+n for each permission n it holds, and on 200+n for each one it
// does not let others take; n = 1 is WRITE. qemu-nbd serving an image
// read-write holds 101; a VM's disk (share-rw=off) holds 201 as well.
//
// nbd-cbw must be the only writer of what it serves and of a backup target:
// a write it does not see breaks the point in time, and one into a target
// corrupts the backup. So it takes the image as a writer that shares no
// writes does, after checking nobody is in the way, as QEMU would.

import type { FileOps } from './native';

export const QEMU_LOCK_WRITE = 101;
export const QEMU_LOCK_WRITE_NOT_SHARED = 201;

/**
 * Check and take QEMU's lock bytes on `fd` as a writer that shares no
 * writes: refused if another process writes (101) or lets nobody else
 * write (201); then 101 and 201 are held. Returns why the image cannot be
 * taken, or null once the locks are held. Where the file system has no OFD
 * locks (some network file systems), nothing is checked or taken, as QEMU
 * then does not lock either. The locks go with the file description.
 */
export async function claimImageLocks(ops: FileOps, fd: number): Promise<string | null> {
  let writer: number;
  let noWritersAllowed: number;
  try {
    writer = await ops.lockHeld(fd, QEMU_LOCK_WRITE, 1);
    noWritersAllowed = await ops.lockHeld(fd, QEMU_LOCK_WRITE_NOT_SHARED, 1);
  } catch {
    return null;
  }
  if (writer) return `another process writes to it (it holds QEMU's "write" lock)`;
  if (noWritersAllowed) return "another process has it open and lets nobody else write to it (QEMU's lock)";
  try {
    await ops.lockShared(fd, QEMU_LOCK_WRITE, 1);
    await ops.lockShared(fd, QEMU_LOCK_WRITE_NOT_SHARED, 1);
  } catch (e) {
    const code = (e as { code?: string }).code;
    // Taken by someone else since the check above.
    if (code === 'EAGAIN' || code === 'EACCES') return "another process just locked it (QEMU's lock bytes)";
  }
  return null;
}
