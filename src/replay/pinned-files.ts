/**
 * What the mirror and log-writes targets need from replay: whether a table is PINNED by a read-only replayed pool
 * (`dmstate replay --into`, without --writable), and which files a mirror or log-writes table names.
 *
 * A replayed pool is metadata of a past point over today's data files. Its snapshots pin their exceptions (the
 * 'meta' record `pinned:<COW>`, src/log/event-log.ts) and write nothing; its mirrors are pinned the same way, per
 * file: the new pool's 'meta' table holds `pinnedMirror:<label>` for every leg and region log (disk log, md
 * bitmap file) a mirror table of the replayed state names. A mirror table naming any pinned file — the replayed
 * ones, or one created later in that pool over the same files — runs read-only (src/targets/mirror/mirror.ts):
 * its region log is read and never written, no resync runs, no leg is written. A log-writes table's device and
 * log device are pinned the same way: a pinned log-writes table logs nothing (status `logging_disabled`), so
 * neither its log nor its end mark overwrite the log the pool had (src/targets/log-writes/log-writes.ts).
 */
import { findDirtyLogType } from '../dirty-logs/log-registry.js';
import { META_REPLAYED_FROM, type EventLog } from '../log/event-log.js';
import { parseMirrorTableArgs } from '../targets/mirror/table-args.js';

/** 'meta' key prefix of a replayed pool's pinned mirror and log-writes files (outside the `pinned:` COW range on purpose). */
export const META_PINNED_MIRROR_PREFIX = 'pinnedMirror:';

/** The value of a `pinnedMirror:<label>` record: the device whose table named the file, and what the file was. */
export interface PinnedFile {
  readonly device: string;
  readonly role: PinnedFileRole;
}

/** A mirror's leg or region log; a log-writes table's device or log device. */
export type PinnedFileRole = 'leg' | 'log' | 'log-writes-dev' | 'log-writes-log';

/**
 * The files (labels, as `dmsetup table` prints them) the mirror and log-writes lines of a table name: for a mirror
 * the region log device first when the log type has one, then the legs; for log-writes the device, then the log
 * device. Other lines, or lines that do not parse, name none.
 */
export function pinnableFilesOfTable(lines: readonly string[] | null): Array<{ label: string; role: PinnedFileRole }> {
  const out: Array<{ label: string; role: PinnedFileRole }> = [];
  for (const line of lines ?? []) {
    const w = line.trim().split(/\s+/);
    if (w[2] === 'log-writes' && w.length >= 5) {
      out.push({ label: w[3], role: 'log-writes-dev' }, { label: w[4], role: 'log-writes-log' });
      continue;
    }
    if (w[2] !== 'mirror') continue;
    try {
      const a = parseMirrorTableArgs(w.slice(3));
      const logPath = findDirtyLogType(a.logTypeName)?.parseArgs(a.logArgs).logPath;
      if (logPath !== undefined) out.push({ label: logPath, role: 'log' });
      for (const l of a.legs) out.push({ label: l.spec, role: 'leg' });
    } catch {
      // A table that does not parse cannot be built either: nothing to pin.
    }
  }
  return out;
}

/**
 * The labels among `labels` that the pool pins (a read-only replayed pool's mirror files); none in other pools.
 * A read-only pool written by `replay --into` before mirror files were pinned (its replayedFrom record has no
 * readOnlyDevices) pins every mirror: all of `labels`.
 */
export async function pinnedFileLabels(log: EventLog, labels: readonly string[]): Promise<string[]> {
  const out: string[] = [];
  for (const label of labels) if ((await log.getRecord<PinnedFile>('meta', META_PINNED_MIRROR_PREFIX + label)) !== undefined) out.push(label);
  if (out.length > 0) return out;
  const from = await log.getRecord<{ readOnly?: boolean; readOnlyDevices?: unknown }>('meta', META_REPLAYED_FROM);
  return from?.readOnly === true && from.readOnlyDevices === undefined ? [...labels] : out;
}
