/**
 * dmsetup's output formats, byte for byte where a script might parse them (checked against the kernel's dmsetup
 * in test/kernel/dmsetup-parity.test.ts).
 */
import type { DeviceInfo } from '../../core/engine.js';

/** `dmsetup info NAME` */
export function formatInfo(i: DeviceInfo): string {
  const tables = !i.liveTable && !i.inactiveTable
    ? 'None'
    : `${i.liveTable ? 'LIVE' : ''}${i.liveTable && i.inactiveTable ? ' & ' : ''}${i.inactiveTable ? 'INACTIVE' : ''}`;
  const lines = [
    `Name:              ${i.name}`,
    `State:             ${i.suspended ? 'SUSPENDED' : 'ACTIVE'}${i.readOnly ? ' (READ-ONLY)' : ''}`,
    // The kernel makes the disk (and so its read-ahead) at the first table load: none before that.
    ...(i.hadTable ? [`Read Ahead:        256`] : []),
    `Tables present:    ${tables}`,
    `Open count:        ${i.openCount}`,
    `Event number:      ${i.eventNr}`,
    `Major, minor:      ${i.major}, ${i.minor}`,
    `Number of targets: ${i.targetCount}`,
  ];
  if (i.uuid) lines.push(`UUID: ${i.uuid}`);
  return lines.join('\n') + '\n\n';
}

/** The Stat column of `dmsetup info -c`: live table, inactive table, suspended, read-only. */
export function formatStat(i: DeviceInfo): string {
  return `${i.liveTable ? 'L' : '-'}${i.inactiveTable ? 'I' : '-'}${i.suspended ? 's' : '-'}${i.readOnly ? 'r' : 'w'}`;
}

/** `dmsetup info -c` (columns Name Maj Min Stat Open Targ Event UUID). */
export function formatInfoColumns(infos: readonly DeviceInfo[], noHeadings: boolean): string {
  if (noHeadings) {
    // Without headings dmsetup prints unaligned, colon-separated fields.
    return infos
      .map((i) => [i.name, i.major, i.minor, formatStat(i), i.openCount, i.targetCount, i.eventNr, i.uuid ?? ''].join(':') + '\n')
      .join('');
  }
  const nameWidth = Math.max(16, ...infos.map((i) => i.name.length));
  const uuidWidth = Math.max(32, ...infos.map((i) => (i.uuid ?? '').length));
  const row = (cols: string[]): string =>
    [
      cols[0].padEnd(nameWidth),
      cols[1].padStart(3),
      cols[2].padStart(3),
      cols[3].padEnd(4),
      cols[4].padStart(4),
      cols[5].padStart(4),
      cols[6].padStart(6),
      cols[7].padEnd(uuidWidth),
    ].join(' ');
  const out: string[] = [];
  // The Event heading is left-aligned in its column, the values right-aligned.
  out.push(row(['Name', 'Maj', 'Min', 'Stat', 'Open', 'Targ', 'Event', 'UUID']).replace(/^(.*Targ) {2}Event/, '$1 Event '));
  for (const i of infos) {
    out.push(row([i.name, String(i.major), String(i.minor), formatStat(i), String(i.openCount), String(i.targetCount), String(i.eventNr), i.uuid ?? '']));
  }
  return out.map((l) => l + '\n').join('');
}

/** `dmsetup ls`; with --target dmsetup prints `(major, minor)` and nothing at all when no device matches. */
export function formatLs(infos: readonly DeviceInfo[], targetFiltered: boolean): string {
  if (targetFiltered) return infos.map((i) => `${i.name}\t(${i.major}, ${i.minor})\n`).join('');
  if (infos.length === 0) return 'No devices found\n';
  return infos.map((i) => `${i.name}\t(${i.major}:${i.minor})\n`).join('');
}

/** `dmsetup targets`: name padded to 16, then the version. */
export function formatTargets(targets: ReadonlyArray<{ name: string; version: readonly number[] }>): string {
  return targets.map((t) => `${t.name.padEnd(16)} v${t.version.join('.')}\n`).join('');
}
