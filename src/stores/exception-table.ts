/**
 * ExceptionTable: the in-core table of completed exceptions (Linux dm-snap.c's `complete` dm_exception_table with
 * consecutive-chunk runs). The snapshot target owns it; the store only calls back into it during a merge.
 *
 * An entry is a run {oldChunk, newChunk, count}: origin chunks oldChunk .. oldChunk + count are kept in COW chunks
 * newChunk .. newChunk + count. `count` is the number of ADDITIONAL chunks (0..255, Linux keeps it in the top 8
 * bits of new_chunk). Entries are grouped by oldChunk >> 8 (Linux's hash bucket with hash_shift 8), so a run never
 * crosses a 256-chunk group and its count never overflows; each group is sorted by oldChunk and runs never overlap.
 *
 * Insert (dm_insert_exception): append to the run just below (new.old == e.old + count + 1 and new.new ==
 * e.new + count + 1), else BACK-MERGE into the run just above (new.old == e.old − 1 and new.new == e.new − 1: count
 * + 1, e.old and e.new move down), else a new run in sorted place. Linux checks the entries of a bucket in order,
 * append before back-merge; only the run just below can append and only the run just above can back-merge, so
 * checking those two in that order is the same rule. A chunk that fills the gap between two runs joins the lower
 * one and the runs stay separate, as in Linux. Runs also break where the COW chunks do (metadata areas).
 *
 * Merge clearing (`clearMerged`, the lock-step of seed 000): one chunk at a time, newest first: a single-chunk run
 * goes; the FIRST chunk of a run moves old and new up by one and decrements the count (the back-merged case); the
 * LAST chunk decrements the count; a middle chunk, a chunk not in the table or a new chunk that does not match is
 * refused (false), and the table is left as it was.
 *
 * Hot path: lookup() is one Map.get on the group and a binary search over at most 256 runs; it allocates nothing.
 */
import { assert } from '../core/assert.js';
import type { Chunk } from '../block/units.js';
import { chunks } from '../block/units.js';

/** log2 of the group size: runs live in groups of 256 old chunks (DM_CHUNK_CONSECUTIVE_BITS). */
export const EXCEPTION_GROUP_SHIFT = 8;
/** Chunks per group (a run's count never exceeds EXCEPTION_RUN_COUNT_MAX = 255). */
export const EXCEPTION_GROUP_CHUNKS = 1 << EXCEPTION_GROUP_SHIFT;
export const EXCEPTION_RUN_COUNT_MAX = EXCEPTION_GROUP_CHUNKS - 1;

/** A run of consecutive exceptions as the table iterator reports it (a copy). */
export interface ExceptionRun {
  readonly oldChunk: Chunk;
  readonly newChunk: Chunk;
  /** ADDITIONAL consecutive chunks (0..255): the run covers count + 1 chunks. */
  readonly count: number;
}

interface Run {
  oldChunk: number;
  newChunk: number;
  count: number;
}

/** Chunk numbers are non-negative safe integers (le64 on disk, but a COW never holds 2^53 chunks). */
const groupOf = (oldChunk: number): number => Math.floor(oldChunk / EXCEPTION_GROUP_CHUNKS);

export class ExceptionTable {
  /** Group index (old >> 8) → runs sorted by oldChunk. Empty groups are deleted. */
  private readonly groups = new Map<number, Run[]>();
  private exceptionCount = 0;
  private runTotal = 0;

  /** Number of exceptions (chunks), not runs. */
  get size(): number {
    return this.exceptionCount;
  }

  /** Number of runs (entries). */
  get runCount(): number {
    return this.runTotal;
  }

  /** The COW chunk holding origin chunk `oldChunk`, or -1 when it has no completed exception. */
  lookup(oldChunk: Chunk): Chunk | -1 {
    const runs = this.groups.get(groupOf(oldChunk));
    if (runs === undefined) return -1;
    const i = floorIndex(runs, oldChunk);
    if (i < 0) return -1;
    const e = runs[i];
    const offset = oldChunk - e.oldChunk;
    return offset <= e.count ? chunks(e.newChunk + offset) : -1;
  }

  /** Whether `oldChunk` has a completed exception. */
  has(oldChunk: Chunk): boolean {
    return this.lookup(oldChunk) !== -1;
  }

  /**
   * Records the completed exception old → new. Precondition (asserted): `oldChunk` is not in the table, both are
   * non-negative safe integers.
   */
  insert(oldChunk: Chunk, newChunk: Chunk): void {
    assert(Number.isSafeInteger(oldChunk) && oldChunk >= 0, `exception table: bad old chunk ${oldChunk}`);
    assert(Number.isSafeInteger(newChunk) && newChunk >= 0, `exception table: bad new chunk ${newChunk}`);
    const group = groupOf(oldChunk);
    let runs = this.groups.get(group);
    if (runs === undefined) {
      runs = [];
      this.groups.set(group, runs);
    }
    const below = floorIndex(runs, oldChunk);
    if (below >= 0) {
      const e = runs[below];
      assert(oldChunk > e.oldChunk + e.count, `exception table: chunk ${oldChunk} is already in the run at ${e.oldChunk}+${e.count}`);
      if (oldChunk === e.oldChunk + e.count + 1 && newChunk === e.newChunk + e.count + 1) {
        // Same group, so the run holds at most 256 chunks: the count cannot pass 255.
        assert(e.count < EXCEPTION_RUN_COUNT_MAX, 'exception table: run count overflow');
        e.count++;
        this.exceptionCount++;
        return;
      }
    }
    const above = below + 1;
    if (above < runs.length) {
      const e = runs[above];
      if (oldChunk === e.oldChunk - 1 && newChunk === e.newChunk - 1) {
        assert(e.count < EXCEPTION_RUN_COUNT_MAX, 'exception table: run count overflow');
        e.count++;
        e.oldChunk--;
        e.newChunk--;
        this.exceptionCount++;
        return;
      }
    }
    runs.splice(above, 0, { oldChunk, newChunk, count: 0 });
    this.exceptionCount++;
    this.runTotal++;
  }

  /**
   * Removes one merged chunk in lock-step with the store clearing its on-disk record (seed 000). Returns false,
   * changing nothing, when the chunk is not in the table, is in the middle of a run, or `newChunk` is not where the
   * table keeps it.
   */
  clearMerged(oldChunk: Chunk, newChunk: Chunk): boolean {
    const group = groupOf(oldChunk);
    const runs = this.groups.get(group);
    if (runs === undefined) return false;
    const i = floorIndex(runs, oldChunk);
    if (i < 0) return false;
    const e = runs[i];
    const offset = oldChunk - e.oldChunk;
    if (offset > e.count || newChunk !== e.newChunk + offset) return false;
    if (e.count === 0) {
      runs.splice(i, 1);
      if (runs.length === 0) this.groups.delete(group);
      this.runTotal--;
    } else if (offset === 0) {
      // The first chunk (a back-merged run is cleared from its front): the run starts one later.
      e.oldChunk++;
      e.newChunk++;
      e.count--;
    } else if (offset === e.count) {
      e.count--;
    } else {
      return false;
    }
    this.exceptionCount--;
    return true;
  }

  /** Forgets everything. */
  clear(): void {
    this.groups.clear();
    this.exceptionCount = 0;
    this.runTotal = 0;
  }

  /** The runs in ascending oldChunk order (copies; the table must not change during the iteration). */
  *runs(): IterableIterator<ExceptionRun> {
    const keys = [...this.groups.keys()].sort((a, b) => a - b);
    for (const key of keys) {
      for (const e of this.groups.get(key) ?? []) yield { oldChunk: chunks(e.oldChunk), newChunk: chunks(e.newChunk), count: e.count };
    }
  }

  [Symbol.iterator](): IterableIterator<ExceptionRun> {
    return this.runs();
  }
}

/** Index of the last run with oldChunk ≤ chunk, or -1. */
function floorIndex(runs: readonly Run[], chunk: number): number {
  let lo = 0;
  let hi = runs.length - 1;
  let found = -1;
  while (lo <= hi) {
    const mid = (lo + hi) >>> 1;
    if (runs[mid].oldChunk <= chunk) {
      found = mid;
      lo = mid + 1;
    } else {
      hi = mid - 1;
    }
  }
  return found;
}
