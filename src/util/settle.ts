// Waiting for every piece of a split operation before failing it. Promise.all
// rejects at the first failure while the other pieces may still be filling
// or reading a buffer the caller is about to reuse.

/** Resolves once all settled; then rejects with the first failure, if any. */
export async function settleAll(pieces: readonly Promise<unknown>[]): Promise<void> {
  const failed = (await Promise.allSettled(pieces)).find((r): r is PromiseRejectedResult => r.status === 'rejected');
  if (failed) throw failed.reason;
}
