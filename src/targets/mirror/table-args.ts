/**
 * The mirror table (Linux mirror_ctr):
 *
 *   <log_type> <#log_args> <log_args...> <#legs> [<leg_device> <offset>]{2..9} [<#features> [handle_errors] [keep_log]]
 *
 * e.g. `core 2 1024 nosync 2 /dev/vdb 0 /dev/vdc 0 1 handle_errors`. Refusals use the kernel's messages.
 */
import { DmError } from '../../core/errors.js';
import { parseUnsigned } from '../../core/parse-number.js';

/** Legs at least and at most (Linux: 2 and DM_KCOPYD_MAX_REGIONS + 1: a resync copies one leg to all others). */
export const MIRROR_LEGS_MIN = 2;
export const MIRROR_LEGS_MAX = 9;

export interface MirrorTableArgs {
  readonly logTypeName: string;
  readonly logArgs: readonly string[];
  readonly legs: ReadonlyArray<{ readonly spec: string; readonly offsetSectors: number }>;
  readonly handleErrors: boolean;
  readonly keepLog: boolean;
}

const invalid = (reason: string): DmError => new DmError('DM_TABLE_INVALID', `mirror: ${reason}`);

function count(text: string | undefined, reason: string): number {
  if (text === undefined) throw invalid(reason);
  try {
    return parseUnsigned(text, reason);
  } catch {
    throw invalid(reason);
  }
}

export function parseMirrorTableArgs(args: readonly string[]): MirrorTableArgs {
  if (args.length < 2) throw invalid('Insufficient mirror log arguments');
  const logTypeName = args[0];
  const logArgCount = count(args[1], 'Invalid mirror log argument count');
  if (logArgCount > args.length - 2) throw invalid('Insufficient mirror log arguments');
  const logArgs = args.slice(2, 2 + logArgCount);
  let i = 2 + logArgCount;
  const legCount = (() => {
    try {
      return count(args[i], 'Invalid number of mirrors');
    } catch {
      throw invalid('Invalid number of mirrors');
    }
  })();
  if (legCount < MIRROR_LEGS_MIN || legCount > MIRROR_LEGS_MAX) throw invalid('Invalid number of mirrors');
  i++;
  if (args.length - i < legCount * 2) throw invalid('Too few mirror arguments');
  const legs: Array<{ spec: string; offsetSectors: number }> = [];
  for (let m = 0; m < legCount; m++, i += 2) legs.push({ spec: args[i], offsetSectors: count(args[i + 1], 'Invalid offset') });
  let handleErrors = false;
  let keepLog = false;
  if (i < args.length) {
    const featureCount = count(args[i], 'Invalid number of features');
    i++;
    if (featureCount > args.length - i) throw invalid('Not enough arguments to support feature count');
    for (let f = 0; f < featureCount; f++, i++) {
      if (args[i] === 'handle_errors') handleErrors = true;
      else if (args[i] === 'keep_log') keepLog = true;
      else throw invalid('Unrecognised feature requested');
    }
    if (!handleErrors && keepLog) throw invalid('keep_log feature requires the handle_errors feature');
  }
  if (i < args.length) throw invalid('Too many mirror arguments');
  return { logTypeName, logArgs, legs, handleErrors, keepLog };
}

/** The features as the kernel prints them at the end of the table (nothing when there are none). */
export function formatMirrorFeatures(handleErrors: boolean, keepLog: boolean): string {
  const f = [...(handleErrors ? ['handle_errors'] : []), ...(keepLog ? ['keep_log'] : [])];
  return f.length === 0 ? '' : ` ${f.length} ${f.join(' ')}`;
}
