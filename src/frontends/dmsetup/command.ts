/**
 * A dmsetup command line parsed into a structure the engine runs (in the daemon or in-process). Parsing follows
 * dmsetup(8): options may stand before or after the command; udev and locking options are accepted and have no
 * effect here (there are no device nodes and no udev).
 */
import { DmError } from '../../core/errors.js';

export type DmsetupCommandName =
  | 'create'
  | 'load'
  | 'suspend'
  | 'resume'
  | 'remove'
  | 'remove_all'
  | 'clear'
  | 'status'
  | 'table'
  | 'info'
  | 'ls'
  | 'message'
  | 'targets'
  | 'version'
  | 'mknodes';

export interface DmsetupCommand {
  readonly command: DmsetupCommandName;
  readonly names: string[];
  /** Table text (from --table, a file or stdin, read by the client). */
  table?: string;
  /** A table file to read (the client reads it and sets `table`). */
  tableFile?: string;
  /** create/load with neither --table, a file nor --notable: the client reads the table from stdin. */
  tableFromStdin?: boolean;
  readonly notable: boolean;
  readonly uuid?: string;
  readonly readOnly: boolean;
  readonly inactive: boolean;
  readonly columns: boolean;
  readonly noHeadings: boolean;
  readonly force: boolean;
  readonly targetFilter?: string;
  /** message: sector and words. */
  readonly messageSector?: string;
  readonly messageArgs?: string[];
  /** The client's working directory: relative paths in tables resolve against it. */
  cwd?: string;
}

const COMMAND_ALIASES: Record<string, DmsetupCommandName> = {
  create: 'create',
  load: 'load',
  reload: 'load',
  suspend: 'suspend',
  resume: 'resume',
  remove: 'remove',
  remove_all: 'remove_all',
  clear: 'clear',
  status: 'status',
  table: 'table',
  info: 'info',
  ls: 'ls',
  message: 'message',
  targets: 'targets',
  version: 'version',
  mknodes: 'mknodes',
};

/** Options that take no value and do nothing here. */
const IGNORED_FLAGS = new Set([
  '--noudevsync', '--noudevrules', '--verifyudev', '--udevcookie', '--nolockfs', '--noflush', '-y', '--yes', '-v', '--verbose',
  '--noopencount', '--deferred', '--retry', '--addnodeoncreate', '--addnodeonresume',
]);

export function parseDmsetupArgs(argv: readonly string[]): DmsetupCommand {
  let command: DmsetupCommandName | undefined;
  const positional: string[] = [];
  let table: string | undefined;
  let notable = false;
  let uuid: string | undefined;
  let readOnly = false;
  let inactive = false;
  let columns = false;
  let noHeadings = false;
  let force = false;
  let targetFilter: string | undefined;
  const value = (i: number, flag: string): string => {
    if (i + 1 >= argv.length) throw new DmError('DM_INVALID_ARGUMENT', `${flag} needs a value`);
    return argv[i + 1];
  };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (command === 'message' && positional.length >= 2) {
      positional.push(a); // message words are passed through verbatim
      continue;
    }
    if (a.startsWith('-') && a !== '-') {
      const [flag, inline] = a.startsWith('--') && a.includes('=') ? [a.slice(0, a.indexOf('=')), a.slice(a.indexOf('=') + 1)] : [a, undefined];
      const take = (): string => (inline !== undefined ? inline : value(i++, flag));
      switch (flag) {
        case '--table': table = take(); break;
        case '--notable': notable = true; break;
        case '-u': case '--uuid': uuid = take(); break;
        case '-r': case '--readonly': readOnly = true; break;
        case '--inactive': inactive = true; break;
        case '-c': case '-C': case '--columns': columns = true; break;
        case '--noheadings': noHeadings = true; break;
        case '-f': case '--force': force = true; break;
        case '--target': targetFilter = take(); break;
        default:
          if (IGNORED_FLAGS.has(flag)) break;
          throw new DmError('DM_INVALID_ARGUMENT', `dmsetup: unrecognized option '${a}'`);
      }
      continue;
    }
    if (command === undefined) {
      const c = COMMAND_ALIASES[a];
      if (!c) throw new DmError('DM_UNKNOWN_COMMAND', `dmsetup: unknown command '${a}'`);
      command = c;
      continue;
    }
    positional.push(a);
  }
  if (command === undefined) throw new DmError('DM_INVALID_ARGUMENT', 'dmsetup: no command given (see dmstate dmsetup --help)');
  const base = { command, notable, uuid, readOnly, inactive, columns, noHeadings, force, targetFilter };
  const need = (min: number, max: number, usage: string): void => {
    if (positional.length < min || positional.length > max) throw new DmError('DM_INVALID_ARGUMENT', `usage: dmsetup ${usage}`);
  };
  switch (command) {
    case 'create':
    case 'load': {
      need(1, 2, `${command} <name> [<table_file>] [--table <table>]${command === 'create' ? ' [--notable] [-u <uuid>] [-r]' : ''}`);
      const tableFile = positional[1];
      if ([table !== undefined, tableFile !== undefined, notable].filter(Boolean).length > 1) {
        throw new DmError('DM_INVALID_ARGUMENT', `${command}: give only one of --table, a table file${command === 'create' ? ' or --notable' : ''}`);
      }
      if (command === 'load' && notable) throw new DmError('DM_INVALID_ARGUMENT', 'load: --notable makes no sense');
      return { ...base, names: [positional[0]], table, tableFile, tableFromStdin: table === undefined && tableFile === undefined && !notable };
    }
    case 'suspend':
    case 'resume':
    case 'remove':
    case 'clear':
      need(1, Infinity, `${command} <name>...`);
      return { ...base, names: positional };
    case 'message':
      need(3, Infinity, 'message <name> <sector> <message>...');
      return { ...base, names: [positional[0]], messageSector: positional[1], messageArgs: positional.slice(2) };
    case 'remove_all':
    case 'targets':
    case 'version':
    case 'ls':
      need(0, 0, command);
      return { ...base, names: [] };
    default:
      return { ...base, names: positional };
  }
}
