/**
 * The mirror's regions (Linux dm-region-hash.c): per region a state and a count of writes in flight, on top of the
 * dirty log, which keeps what must survive a crash.
 *
 *   CLEAN       no write in flight and in sync (no entry: the log's word)
 *   DIRTY       writes in flight; the log holds the mark (durable before any of them was issued)
 *   NOSYNC      the legs may differ: reads go to the default leg, the resync copies it
 *   RECOVERING  being resynced: new writes wait (delayed) until the copy is done
 *
 * Writes: startWrite counts the write; CLEAN → DIRTY marks the region in the log and starts a log flush, which the
 * write waits for before its data goes out (and so do later writes to the region while that flush runs). endWrite
 * uncounts it; the last one turns DIRTY → CLEAN and clears the region in the log, whose clean record is written in
 * the background after the legs are flushed (the log's flush does that). A region a leg missed is set out of sync
 * in the log before the write's count drops, so it is never cleared; only a resync brings it back.
 *
 * State and counts are typed arrays indexed by region (no allocation per write); delayed writes and the flushes
 * still running for marks are kept in maps only while they exist.
 */
import { assert } from '../../core/assert.js';
import type { AnyDirtyLogType } from '../../dirty-logs/contract.js';

export const RH_CLEAN = 0;
export const RH_DIRTY = 1;
export const RH_NOSYNC = 2;
export const RH_RECOVERING = 3;
export type RegionState = typeof RH_CLEAN | typeof RH_DIRTY | typeof RH_NOSYNC | typeof RH_RECOVERING;

/** Stored state "no entry": ask the log (clean when in sync, NOSYNC otherwise). */
const RH_NONE = 0;
/** Writes in flight per region at most (a Uint32 counter; the core bounds bios in flight far below this). */
export const REGION_WRITES_IN_FLIGHT_MAX = 0xffff_fffe;

export interface RegionHashEvents {
  /** A region was marked in the log (trace events). */
  marked(region: number): void;
  /** A region was cleared in the log (trace events); its clean record is now pending. */
  cleared(region: number): void;
}

export class RegionHash {
  private readonly stored: Uint8Array;
  private readonly pending: Uint32Array;
  /** Log flushes carrying a region's mark, while they run. */
  private readonly markFlushes = new Map<number, Promise<void>>();
  /** Writes waiting for a region's resync copy, in arrival order. */
  private readonly delayed = new Map<number, Array<() => void>>();
  /** What to call when a RECOVERING region's writes have drained. */
  private readonly quiesceWaiters = new Map<number, () => void>();
  /** A flush bio failed on a leg: no region can be called clean any more (Linux rh->flush_failure). */
  flushFailure = false;

  constructor(
    readonly regionCount: number,
    private readonly logType: AnyDirtyLogType,
    private readonly log: unknown,
    private readonly events: RegionHashEvents,
  ) {
    this.stored = new Uint8Array(regionCount);
    this.pending = new Uint32Array(regionCount);
  }

  state(region: number): RegionState {
    const s = this.stored[region];
    if (s !== RH_NONE) return s as RegionState;
    return this.logType.inSync(this.log, region) ? RH_CLEAN : RH_NOSYNC;
  }

  /** In sync: reads may go to any leg (Linux region_in_sync). */
  inSync(region: number): boolean {
    const s = this.state(region);
    return s === RH_CLEAN || s === RH_DIRTY;
  }

  writesInFlight(region: number): number {
    return this.pending[region];
  }

  /**
   * Counts a write. `legMissing`: a leg will not get this write (it failed), so the region goes out of sync first.
   * Returns the log flush the write must wait for before issuing data, or undefined when its mark is durable.
   */
  startWrite(region: number, legMissing: boolean): Promise<void> | undefined {
    assert(this.pending[region] < REGION_WRITES_IN_FLIGHT_MAX, 'region write count overflow');
    const s = this.state(region);
    assert(s !== RH_RECOVERING, 'startWrite on a recovering region (the write must be delayed)');
    let needFlush = false;
    if (s === RH_CLEAN) {
      this.stored[region] = RH_DIRTY;
      this.logType.markRegion(this.log, region);
      this.events.marked(region);
      needFlush = true;
    }
    if (legMissing && (s === RH_CLEAN || s === RH_DIRTY)) {
      this.logType.setRegionSync(this.log, region, false);
      this.stored[region] = RH_NOSYNC;
      needFlush = true;
    } else if (s === RH_NOSYNC) {
      this.stored[region] = RH_NOSYNC;
    }
    this.pending[region]++;
    if (needFlush) {
      const p = this.logType.flush(this.log, { clears: false });
      this.markFlushes.set(region, p);
      const done = (): void => {
        if (this.markFlushes.get(region) === p) this.markFlushes.delete(region);
      };
      p.then(done, done);
      return p;
    }
    return this.markFlushes.get(region);
  }

  /** A leg missed a write in flight: the region is out of sync until a resync (Linux dm_rh_mark_nosync). */
  markNosync(region: number): void {
    this.logType.setRegionSync(this.log, region, false);
    if (this.stored[region] !== RH_RECOVERING) this.stored[region] = RH_NOSYNC;
  }

  /** Uncounts a write (Linux dm_rh_dec). */
  endWrite(region: number): void {
    assert(this.pending[region] > 0, 'endWrite without a write in flight');
    if (--this.pending[region] > 0) return;
    const s = this.stored[region];
    if (this.flushFailure && s !== RH_RECOVERING) {
      // A failed flush bio: nobody knows what reached the legs, so the region must be resynced.
      this.logType.setRegionSync(this.log, region, false);
      this.stored[region] = RH_NOSYNC;
    } else if (s === RH_RECOVERING) {
      const w = this.quiesceWaiters.get(region);
      if (w) {
        this.quiesceWaiters.delete(region);
        w();
      }
    } else if (s === RH_DIRTY) {
      this.stored[region] = RH_NONE;
      this.logType.clearRegion(this.log, region);
      this.events.cleared(region);
    } else if (s === RH_NOSYNC) {
      // The log says out of sync; nothing more to remember.
      this.stored[region] = RH_NONE;
    }
  }

  /** Whether writes to the region must wait for its resync copy. */
  isRecovering(region: number): boolean {
    return this.stored[region] === RH_RECOVERING;
  }

  /** Queues a write until the region's recovery ends. */
  delay(region: number, resume: () => void): void {
    let list = this.delayed.get(region);
    if (!list) this.delayed.set(region, (list = []));
    list.push(resume);
  }

  /** Starts quiescing a region for recovery; `quiesced` runs once no write is in flight to it (maybe at once). */
  recoveryPrepare(region: number, quiesced: () => void): void {
    assert(this.stored[region] !== RH_RECOVERING, 'region already recovering');
    this.stored[region] = RH_RECOVERING;
    if (this.pending[region] === 0) quiesced();
    else this.quiesceWaiters.set(region, quiesced);
  }

  /** Ends a region's recovery: in sync and cleared on success; the writes it delayed go on either way. */
  recoveryEnd(region: number, success: boolean): void {
    assert(this.stored[region] === RH_RECOVERING, 'recoveryEnd on a region not recovering');
    assert(this.pending[region] === 0, 'recoveryEnd with writes in flight');
    this.stored[region] = RH_NONE;
    this.logType.setRegionSync(this.log, region, success);
    if (success) {
      this.logType.clearRegion(this.log, region);
      this.events.cleared(region);
    }
    const list = this.delayed.get(region);
    if (list) {
      this.delayed.delete(region);
      for (const resume of list) resume();
    }
  }

  /** Writes waiting on recoveries, for status and tests. */
  get delayedWriteCount(): number {
    let n = 0;
    for (const l of this.delayed.values()) n += l.length;
    return n;
  }
}
