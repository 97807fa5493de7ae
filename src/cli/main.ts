// Entry point: `nbd-cbw COMMAND [options]`.

import { Command, CommanderError } from 'commander';
import { registerServe } from './serve';
import { registerBackup } from './backup';
import { registerRestore } from './restore';
import { die, errorMessage } from './log';

import { VERSION } from '../version';

export function buildProgram(): Command {
  const program = new Command('nbd-cbw');
  program
    .version(VERSION)
    .description(
      'A live-backup NBD proxy. It sits between a VM and its disk export, and while a\n' +
        'backup runs it saves the old content of clusters the guest overwrites into a RAM\n' +
        'buffer (copy-before-write), streaming them to a slow backup target. The target\n' +
        'ends up holding the disk exactly as it was when the backup started.',
    )
    .showHelpAfterError('(run with --help for usage)')
    .exitOverride();
  registerServe(program);
  registerBackup(program);
  registerRestore(program);
  return program;
}

export function main(argv: string[]): void {
  // `nbd-cbw ... | head`: a reader that went away ends the output, quietly.
  for (const out of [process.stdout, process.stderr]) {
    out.on('error', (e: NodeJS.ErrnoException) => {
      if (e.code === 'EPIPE') process.exit(0);
      throw e;
    });
  }
  const program = buildProgram();
  program.parseAsync(argv, { from: 'user' }).catch((e: unknown) => {
    if (e instanceof CommanderError) process.exit(e.exitCode);
    die(errorMessage(e));
  });
}
