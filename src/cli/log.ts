// One-line messages on stderr, prefixed like nbdkit's.

let verbose = false;

export function setVerbose(v: boolean): void {
  verbose = v;
}

export function info(msg: string): void {
  process.stderr.write(`nbd-cbw: ${msg}\n`);
}

export function debug(msg: string): void {
  if (verbose) process.stderr.write(`nbd-cbw: debug: ${msg}\n`);
}

/** Print a one-line error and exit with status 1. */
export function die(msg: string, code = 1): never {
  process.stderr.write(`nbd-cbw: error: ${msg}\n`);
  process.exit(code);
}

export function errorMessage(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}
