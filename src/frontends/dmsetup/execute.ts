/**
 * Runs a parsed dmsetup command on an engine and renders dmsetup's output. Used by the daemon for its clients and
 * by programs that embed the engine. Errors come back as a message and exit code 1, as dmsetup's "Command failed."
 */
import type { Engine } from '../../core/engine.js';
import { DmError, isDmError } from '../../core/errors.js';
import { parseUnsigned } from '../../core/parse-number.js';
import type { DmsetupCommand } from './command.js';
import { formatInfo, formatInfoColumns, formatLs, formatTargets } from './format.js';

export interface DmsetupResult {
  stdout: string;
  stderr: string;
  exitCode: number;
  /** The DmError code when the command failed. */
  errorCode?: string;
}

/** The device-mapper ioctl interface version we follow (Linux 6.1). */
export const DM_DRIVER_VERSION = '4.47.0';

export async function executeDmsetup(engine: Engine, cmd: DmsetupCommand, dmstateVersion: string): Promise<DmsetupResult> {
  // Output is kept when a later name fails, as dmsetup prints what it did before the failing device.
  const out = { text: '' };
  try {
    const tail = await run(engine, cmd, dmstateVersion, out);
    out.text += tail;
    return { stdout: out.text, stderr: '', exitCode: 0 };
  } catch (err) {
    if (!isDmError(err)) throw err;
    return { stdout: out.text, stderr: `${err.message}\nCommand failed.\n`, exitCode: 1, errorCode: err.code };
  }
}

async function run(engine: Engine, cmd: DmsetupCommand, dmstateVersion: string, out: { text: string }): Promise<string> {
  const name = cmd.names[0];
  switch (cmd.command) {
    case 'create':
      if (cmd.table === undefined && !cmd.notable) throw new DmError('DM_INVALID_ARGUMENT', 'create: no table given');
      await engine.create(name, { table: cmd.notable ? undefined : cmd.table, uuid: cmd.uuid, readOnly: cmd.readOnly, cwd: cmd.cwd });
      return '';
    case 'load':
      if (cmd.table === undefined) throw new DmError('DM_INVALID_ARGUMENT', 'load: no table given');
      await engine.load(name, cmd.table, { cwd: cmd.cwd });
      return '';
    case 'suspend':
      for (const n of cmd.names) await engine.suspend(n);
      return '';
    case 'resume':
      for (const n of cmd.names) await engine.resume(n);
      return '';
    case 'remove':
      for (const n of cmd.names) await engine.remove(n);
      return '';
    case 'remove_all':
      await engine.removeAll();
      return '';
    case 'clear':
      for (const n of cmd.names) await engine.clear(n);
      return '';
    case 'message': {
      const sector = parseUnsigned(cmd.messageSector!, 'message: sector', 'DM_INVALID_ARGUMENT');
      const out = await engine.message(name, sector, cmd.messageArgs!);
      return out === '' ? '' : out.endsWith('\n') ? out : out + '\n';
    }
    case 'targets':
      return formatTargets(engine.targets.list());
    case 'version':
      return `Library version:   dmstate ${dmstateVersion}\nDriver version:    ${DM_DRIVER_VERSION}\n`;
    case 'mknodes':
      // No device nodes exist here (devices are reached through NBD or the library); accepted so scripts run.
      for (const n of cmd.names) engine.info(n);
      return '';
    case 'ls': {
      if (cmd.targetFilter === undefined) return formatLs(engine.names().map((n) => engine.info(n)), false);
      const names = engine.names().filter((n) => engine.targetNames(n).includes(cmd.targetFilter!));
      return formatLs(names.map((n) => engine.info(n)), true);
    }
    case 'info': {
      // dmsetup ignores --target for info.
      const names = cmd.names.length ? cmd.names : engine.names();
      if (names.length === 0) return 'No devices found\n';
      if (cmd.columns) {
        const infos = [];
        for (const n of names) {
          try {
            infos.push(engine.info(n));
          } catch (err) {
            out.text += formatInfoColumns(infos, cmd.noHeadings);
            throw err;
          }
        }
        return formatInfoColumns(infos, cmd.noHeadings);
      }
      for (const n of names) out.text += formatInfo(engine.info(n));
      return '';
    }
    case 'status':
    case 'table': {
      const all = cmd.names.length === 0;
      const names = all ? engine.names() : cmd.names;
      if (all && names.length === 0) return 'No devices found\n';
      // dmsetup prefixes lines with the name unless exactly one device was named.
      const prefixed = cmd.names.length !== 1;
      for (const n of names) {
        const lines = cmd.command === 'status' ? engine.status(n, cmd.inactive) : engine.table(n, cmd.inactive);
        const prefix = prefixed ? `${n}: ` : '';
        if (lines.length === 0) {
          // A device without a table in that slot still gets its (empty) line, except under --target.
          if (cmd.targetFilter === undefined) out.text += `${prefix}\n`;
          continue;
        }
        const targets = cmd.inactive ? engine.inactiveTargetNames(n) : engine.targetNames(n);
        for (let i = 0; i < lines.length; i++) {
          if (cmd.targetFilter !== undefined && targets[i] !== cmd.targetFilter) continue;
          out.text += `${prefix}${lines[i]}\n`;
        }
      }
      return '';
    }
  }
}
