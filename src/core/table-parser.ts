/**
 * Parses dmsetup table text: one `<start_sector> <length_sectors> <target> <args...>` per line; blank lines and
 * lines starting with '#' are skipped (as libdevmapper does). Checks what can be checked without the targets:
 * numbers, a table that starts at 0 and has no gaps or overlaps (the kernel's "Gap in table").
 */
import { sectors, type Sector } from '../block/units.js';
import { DmError } from './errors.js';
import { parseUnsigned } from './parse-number.js';

export interface TableLine {
  readonly startSector: Sector;
  readonly lengthSectors: Sector;
  readonly targetName: string;
  readonly args: readonly string[];
}

/** At most this many lines in a table (the kernel has no small limit; this keeps a typo from eating memory). */
export const TABLE_LINES_MAX = 1 << 16;

export function parseTable(text: string): TableLine[] {
  const lines: TableLine[] = [];
  let expectedStart = 0;
  const rawLines = text.split(/\r?\n/);
  for (let i = 0; i < rawLines.length; i++) {
    const raw = rawLines[i].trim();
    if (raw === '' || raw.startsWith('#')) continue;
    const words = raw.split(/\s+/);
    const where = `table line ${i + 1} "${raw}"`;
    if (words.length < 3) throw new DmError('DM_TABLE_INVALID', `${where}: expected <start> <length> <target> [args...]`);
    const startSector = sectors(parseUnsigned(words[0], `${where}: start`));
    const lengthSectors = sectors(parseUnsigned(words[1], `${where}: length`));
    if (lengthSectors === 0) throw new DmError('DM_TABLE_INVALID', `${where}: zero-length target`);
    if (startSector !== expectedStart) {
      throw new DmError('DM_TABLE_INVALID', `${where}: ${words[2]}: Gap in table (expected start ${expectedStart})`);
    }
    expectedStart = startSector + lengthSectors;
    if (lines.length >= TABLE_LINES_MAX) throw new DmError('DM_TABLE_INVALID', `table has more than ${TABLE_LINES_MAX} lines`);
    lines.push({ startSector, lengthSectors, targetName: words[2], args: words.slice(3) });
  }
  return lines;
}

export function formatTableLine(l: TableLine): string {
  return `${l.startSector} ${l.lengthSectors} ${l.targetName}${l.args.length ? ' ' + l.args.join(' ') : ''}`;
}
