/**
 * replay(): the pool's state as of a point in its event log, rebuilt from the log alone — from the newest state
 * snapshot at or before the point, then the events after it — with its digest.
 *
 * A past state is the metadata as of that point: devices, tables, each persistent snapshot's exceptions. The
 * data files (origins, COW data chunks) are what they are today; the log does not hold data.
 */
import { DmError } from '../core/errors.js';
import { META_REPLAYED_FROM, readPoolState, type LevelDb } from '../log/event-log.js';
import type { LoggedEvent } from '../log/events.js';
import { openPoolDb, poolPaths } from '../frontends/pool.js';
import { stateDigest } from './digest.js';
import { applyEvent, emptyPoolState, withReadOnlyFlags, type MarkState, type PoolState } from './pool-state.js';
import type { ReplayedFromRecord } from './write-pool.js';

export interface ReplayOptions {
  /** Replay up to and including this sequence number (default: the whole log). */
  readonly toSeq?: number;
  /** Replay up to and including the newest mark of this name (`dmsetup message DEV 0 mark NAME`). */
  readonly toMark?: string;
  /** Start from the newest state snapshot at or before the target (default true). */
  readonly useSnapshots?: boolean;
}

export interface ReplayResult {
  readonly state: PoolState;
  /** sha256 of the state's canonical form (src/replay/digest.ts): equals Engine.stateDigest() of the live pool. */
  readonly digest: string;
  /** The last event applied (≤ the target; the end of the log when the target is past it). */
  readonly seq: number;
  /** The mark replayed to, with toMark. */
  readonly mark?: MarkState;
  /** The state snapshot the replay started from (0: the first event). */
  readonly snapshotSeq: number;
  readonly eventsApplied: number;
  /**
   * When the pool was written by `replay --into`: where from, and the digest of this replayed state with the
   * read-only flags of then (a read-only replayed pool makes every device read-only): the replayed point's digest
   * unless something changed in this pool since.
   */
  readonly replayedFrom?: ReplayedFromRecord & { readonly digestWithFlagsOfThen: string };
}

function checkOptions(options: ReplayOptions): void {
  if (options.toSeq !== undefined && options.toMark !== undefined) throw new DmError('DM_INVALID_ARGUMENT', 'replay: give a sequence number or a mark, not both');
  if (options.toSeq !== undefined && !(Number.isSafeInteger(options.toSeq) && options.toSeq >= 0)) {
    throw new DmError('DM_INVALID_ARGUMENT', `replay: the target must be a sequence number, got ${options.toSeq}`);
  }
  if (options.toMark === '') throw new DmError('DM_INVALID_ARGUMENT', 'replay: empty mark name');
}

/** The newest mark named `name` in a state's marks, or a clear error listing the marks there are. */
export function findMark(state: PoolState, name: string): MarkState {
  for (let i = state.marks.length - 1; i >= 0; i--) if (state.marks[i].name === name) return state.marks[i];
  const names = [...new Set(state.marks.map((m) => m.name))];
  throw new DmError(
    'DM_INVALID_ARGUMENT',
    `replay: no mark named "${name}" in the log` + (names.length ? ` (marks: ${names.slice(0, 10).join(', ')}${names.length > 10 ? ', ...' : ''})` : ' (it has no marks)'),
  );
}

/** Replays a pool's database (an open LevelDB, or a pool folder no process holds). */
export async function replay(source: LevelDb | string, options: ReplayOptions = {}): Promise<ReplayResult> {
  checkOptions(options);
  if (typeof source === 'string') {
    const db = await openPoolDb(poolPaths(source), { create: false });
    try {
      return await replay(db, options);
    } finally {
      await db.close();
    }
  }
  let toSeq = options.toSeq;
  let mark: MarkState | undefined;
  if (options.toMark !== undefined) {
    mark = findMark((await readPoolState(source)).state, options.toMark);
    toSeq = mark.seq;
  }
  const r = await readPoolState(source, { toSeq, useSnapshots: options.useSnapshots });
  const from = (await source.sublevel<string, unknown>('meta', { valueEncoding: 'json' }).get(META_REPLAYED_FROM)) as ReplayedFromRecord | undefined;
  const replayedFrom =
    from && from.readOnlyDevices !== undefined
      ? { ...from, digestWithFlagsOfThen: from.readOnly ? stateDigest(withReadOnlyFlags(r.state, new Set(from.readOnlyDevices))) : stateDigest(r.state) }
      : undefined;
  return { state: r.state, digest: stateDigest(r.state), seq: r.state.seq, mark, snapshotSeq: r.snapshotSeq, eventsApplied: r.eventsApplied, replayedFrom };
}

/**
 * Replays a stream of stored events from the first one (e.g. a daemon's `log` stream), up to `toSeq`. Refuses a
 * stream that does not start at #1: the events before it were compacted, and only the pool's own state snapshots
 * can stand in for them.
 */
export async function replayEvents(events: AsyncIterable<LoggedEvent>, toSeq = Number.MAX_SAFE_INTEGER): Promise<{ state: PoolState; eventsApplied: number }> {
  const state = emptyPoolState();
  let eventsApplied = 0;
  for await (const e of events) {
    if (eventsApplied === 0 && e.seq !== 1) {
      throw new DmError('DM_INVALID_ARGUMENT', `replay: the log starts at #${e.seq} (compacted): stop the daemon to replay from the pool's state snapshots`);
    }
    if (e.seq > toSeq) break;
    applyEvent(state, e);
    eventsApplied++;
  }
  return { state, eventsApplied };
}
