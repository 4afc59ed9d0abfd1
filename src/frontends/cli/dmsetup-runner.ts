/** Runs dmsetup commands in a daemon over its control socket, for the CLI commands built on them (merge, resync). */
import { DmError } from '../../core/errors.js';
import type { ControlClient } from '../control-client.js';
import { parseDmsetupArgs } from '../dmsetup/command.js';

/** Runs one dmsetup command (argv after `dmsetup`) and returns its stdout; rejects with the command's error. */
export type DmsetupRunner = (argv: readonly string[]) => Promise<string>;

export function dmsetupRunner(client: ControlClient, cwd: string): DmsetupRunner {
  return async (argv) => {
    const command = parseDmsetupArgs(argv);
    command.cwd = cwd;
    const r = await client.request({ op: 'dmsetup', command });
    if (r.op !== 'dmsetup') throw new DmError('DM_NO_DAEMON', `unexpected answer from the daemon: ${r.op}`);
    if (r.result.exitCode !== 0) {
      throw new DmError((r.result.errorCode as never) ?? 'DM_INVALID_ARGUMENT', `dmsetup ${argv.join(' ')}: ${r.result.stderr.split('\n')[0]}`);
    }
    return r.result.stdout;
  };
}
