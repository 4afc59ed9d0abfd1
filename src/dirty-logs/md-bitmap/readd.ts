/**
 * What a returning leg needs, by md's event-count rules (Linux md.c super_1_validate for a device added to an array
 * with a bitmap):
 *
 *   leg events <  events_cleared          'full-resync'      bits were cleared after the leg left: the bitmap no
 *                                                            longer names every chunk it missed
 *   events_cleared <= leg events < events 'bitmap-recovery'  copy only the chunks whose bit is set (no bit is
 *                                                            cleared while degraded, so they cover what it missed)
 *   leg events >= array events            'in-sync'          the leg saw every event of the array
 *
 * `legEvents` is the array's event count when the leg was last in sync (md: the event count in the leg's own
 * superblock). A stale bitmap (superblock state STALE) needs a full resync whatever the counts say; the caller
 * checks that first.
 */
export type MdBitmapReaddDecision = 'full-resync' | 'bitmap-recovery' | 'in-sync';

export interface MdBitmapEventCounts {
  /** The array's event count now. */
  readonly events: bigint;
  /** The event count when bits were last cleared. */
  readonly eventsCleared: bigint;
}

export function mdBitmapReaddDecision(legEvents: bigint, bitmap: MdBitmapEventCounts): MdBitmapReaddDecision {
  if (legEvents < bitmap.eventsCleared) return 'full-resync';
  if (legEvents < bitmap.events) return 'bitmap-recovery';
  return 'in-sync';
}
