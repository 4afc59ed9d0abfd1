/**
 * A write reaching an origin (Linux __origin_write): for every snapshot of the origin that lacks the chunk,
 * make (or find) a pending exception and start its copy. The bio, if given, waits on one of them and is retried
 * through map when that one completes; the retry finds any other snapshot still copying (seed 001: retrying
 * keeps the code simple when not all snapshots are handled in one pass).
 */
import type { BlockDevice } from '../../block/contract.js';
import type { KcopydClient } from '../../kcopyd/kcopyd.js';
import type { OriginRegistry } from './origin-registry.js';
import { SnapshotState, type HeldBio, type PendingException } from './snapshot-state.js';

/**
 * @returns true when the write must wait (the bio, if given, is queued on a pending exception), false when
 * it may go to the origin now.
 */
export function originWrite(
  registry: OriginRegistry,
  kcopyd: KcopydClient,
  origin: BlockDevice,
  originSector: number,
  held: HeldBio | undefined,
): boolean {
  const snapshots = registry.snapshots(origin);
  if (snapshots.length === 0) return false;
  let mustWait = false;
  let startLast: PendingException | undefined;
  let startNow: PendingException[] | undefined;
  for (const snap of snapshots) {
    // A merging snapshot is being deleted: no new exceptions in it.
    if (snap.merging || !snap.valid || !snap.active) continue;
    if (originSector >= snap.sizeSectors) continue;
    const chunk = snap.chunkOf(originSector);
    let pe = snap.pending.get(chunk);
    if (!pe) {
      if (snap.table.lookup(chunk as never) >= 0) continue;
      pe = snap.newPending(chunk);
      if (!pe) {
        // The kernel invalidates (even PO snapshots) when an origin write finds the COW full.
        snap.invalidate('COW device full');
        continue;
      }
    }
    mustWait = true;
    if (held) {
      pe.originBios.push(held);
      held = undefined;
      if (!pe.started) {
        pe.started = true;
        startLast = pe;
      }
    }
    if (!pe.started) {
      pe.started = true;
      (startNow ??= []).push(pe);
    }
  }
  // The exception the bio waits on starts last, giving the others a head start (as the kernel does).
  if (startLast) (startNow ??= []).push(startLast);
  if (startNow) SnapshotState.startCopies(kcopyd, startNow);
  return mustWait;
}
