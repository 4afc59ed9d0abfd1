/**
 * What the snapshot target needs from replay: the 'exceptions.loaded' event that records a persistent COW's state
 * as its store loaded it, and the exception list a replayed (read-only) pool pins for a COW.
 */
import { DmError } from '../core/errors.js';
import type { DmEvent } from '../log/events.js';
import type { ExceptionWal } from '../stores/contract.js';
import { encodeRuns } from './pool-state.js';

/** The event for a COW loaded with `table` (its exceptions in index order; ignored when invalid). */
export function exceptionsLoadedEvent(
  cow: string,
  device: string,
  chunkSizeSectors: number,
  valid: boolean,
  overflowed: boolean,
  table: ReadonlyArray<readonly [number, number]>,
): DmEvent {
  const pairs: number[] = [];
  if (valid) for (const [o, n] of table) pairs.push(o, n);
  return { type: 'exceptions.loaded', cow, device, chunkSizeSectors, valid, overflowed: overflowed || undefined, count: pairs.length / 2, runs: encodeRuns(pairs) };
}

/**
 * The exceptions a replayed pool pins for a COW (wal.pinned set), in index order. The COW on disk must still have
 * the chunk size it had then: otherwise the pinned chunks mean other places, and the table is refused.
 */
export async function pinnedExceptions(wal: ExceptionWal, cowLabel: string, chunkSizeSectorsOnDisk: number): Promise<Array<[number, number]>> {
  const pinned = wal.pinned!;
  if (pinned.chunkSizeSectors !== chunkSizeSectorsOnDisk) {
    throw new DmError(
      'DM_TABLE_INVALID',
      `COW ${cowLabel} has chunk size ${chunkSizeSectorsOnDisk} now but ${pinned.chunkSizeSectors} at the replayed point: its pinned exceptions do not apply`,
    );
  }
  return (await wal.read()).map((r): [number, number] => [r.oldChunk, r.newChunk]);
}
