/**
 * The pool state as a running engine holds it, read from the engine's own objects — its mapped devices and
 * tables, and each persistent snapshot's in-core exception table, validity and overflow flag — never from the
 * event log. Comparing its digest with a replay's is what checks that the log is complete.
 *
 * The in-core exception table knows no record indexes: the pairs come out sorted by origin chunk (the digest
 * compares exceptions as a set, see digest.ts). Marks are positions in the log, not held by the engine: none.
 */
import type { MappedDevice } from '../core/mapped-device.js';
import type { SnapshotState } from '../targets/snapshot/snapshot-state.js';
import { emptyPoolState, type PoolState } from './pool-state.js';

/** The engine's shared-object key of the snapshot states (src/targets/snapshot/shared.ts, snapshotStates). */
export const SNAPSHOT_STATES_KEY = 'dm-snapshot:states';

export interface LiveStateSource {
  /** The engine's devices, in creation order. */
  readonly devices: readonly MappedDevice[];
  /** The snapshot states of the engine (the shared object under SNAPSHOT_STATES_KEY), if any snapshot was built. */
  readonly snapshotStates: ReadonlyMap<unknown, SnapshotState> | undefined;
  readonly lastSeq: number;
}

export function livePoolState(source: LiveStateSource): PoolState {
  const state = emptyPoolState();
  state.seq = source.lastSeq;
  for (const d of source.devices) {
    state.devices.set(d.name, {
      minor: d.minor,
      uuid: d.uuid,
      readOnly: d.readOnly,
      live: d.live ? d.live.tableLines() : null,
      inactive: d.inactive ? d.inactive.tableLines() : null,
      suspended: d.suspended,
      order: state.nextOrder++,
    });
  }
  for (const s of source.snapshotStates?.values() ?? []) {
    if (!s.persistent) continue;
    const pairs: number[] = [];
    for (const run of s.table.runs()) for (let k = 0; k <= run.count; k++) pairs.push(run.oldChunk + k, run.newChunk + k);
    state.cows.set(s.cow.label, { chunkSizeSectors: s.chunkSizeSectors, valid: s.valid, overflowed: s.overflowed, pairs: s.valid ? pairs : [] });
  }
  return state;
}
