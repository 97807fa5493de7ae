// Progress bars on a terminal. cli-progress (and the string-width modules
// under it) is loaded only when one is shown: it is a third of the CLI's
// module loading, and scripts (JSON, no terminal) never draw a bar.

import type { SingleBar } from 'cli-progress';

/** A bar on stderr with this format, or null when stderr is not a terminal. */
export function terminalProgressBar(format: string): SingleBar | null {
  if (!process.stderr.isTTY) return null;
  const cliProgress = require('cli-progress') as typeof import('cli-progress');
  return new cliProgress.SingleBar({ format, stream: process.stderr, hideCursor: true }, cliProgress.Presets.shades_classic);
}
