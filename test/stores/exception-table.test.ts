import { describe, expect, test } from 'vitest';
import type { Chunk } from '../../src/block/units.js';
import { chunks } from '../../src/block/units.js';
import { createRng } from '../../src/core/rng.js';
import type { Rng } from '../../src/core/rng.js';
import { EXCEPTION_GROUP_CHUNKS, ExceptionTable } from '../../src/stores/exception-table.js';
import type { ExceptionRun } from '../../src/stores/exception-table.js';

const c = chunks;
const runsOf = (t: ExceptionTable): Array<[number, number, number]> => [...t.runs()].map((r: ExceptionRun) => [r.oldChunk, r.newChunk, r.count]);

function shuffle<T>(rng: Rng, items: T[]): T[] {
  for (let i = items.length - 1; i > 0; i--) {
    const j = rng.int(i + 1);
    [items[i], items[j]] = [items[j], items[i]];
  }
  return items;
}

/** Every run is inside one group, sorted, disjoint, count 0..255; size and runCount agree with the runs. */
function checkInvariants(t: ExceptionTable): void {
  let size = 0;
  let runCount = 0;
  let last = -1;
  for (const r of t.runs()) {
    expect(r.count).toBeGreaterThanOrEqual(0);
    expect(r.count).toBeLessThanOrEqual(255);
    expect(Math.floor(r.oldChunk / 256), `run at ${r.oldChunk}+${r.count} crosses a group`).toBe(Math.floor((r.oldChunk + r.count) / 256));
    expect(r.oldChunk, 'runs sorted and disjoint').toBeGreaterThan(last);
    last = r.oldChunk + r.count;
    size += r.count + 1;
    runCount++;
  }
  expect(t.size).toBe(size);
  expect(t.runCount).toBe(runCount);
}

describe('ExceptionTable', () => {
  test('lookup of an empty table', () => {
    const t = new ExceptionTable();
    expect(t.lookup(c(0))).toBe(-1);
    expect(t.size).toBe(0);
    expect(t.runCount).toBe(0);
    expect(runsOf(t)).toEqual([]);
  });

  test('append grows a run; a gap in new or old starts a new one', () => {
    const t = new ExceptionTable();
    t.insert(c(10), c(100));
    t.insert(c(11), c(101));
    t.insert(c(12), c(102));
    expect(runsOf(t)).toEqual([[10, 100, 2]]);
    t.insert(c(13), c(104)); // new not consecutive
    t.insert(c(15), c(105)); // old not consecutive
    expect(runsOf(t)).toEqual([[10, 100, 2], [13, 104, 0], [15, 105, 0]]);
    expect(t.lookup(c(12))).toBe(102);
    expect(t.lookup(c(14))).toBe(-1);
    expect(t.size).toBe(5);
    expect(t.runCount).toBe(3);
  });

  test('back-merge: a chunk just before a run joins it and moves its start down', () => {
    const t = new ExceptionTable();
    t.insert(c(20), c(200));
    t.insert(c(19), c(199));
    t.insert(c(18), c(198));
    expect(runsOf(t)).toEqual([[18, 198, 2]]);
    expect(t.lookup(c(18))).toBe(198);
    expect(t.lookup(c(20))).toBe(200);
    expect(t.lookup(c(17))).toBe(-1);
    t.insert(c(17), c(300)); // old fits but new does not
    expect(runsOf(t)).toEqual([[17, 300, 0], [18, 198, 2]]);
  });

  test('a chunk filling a gap appends to the run below (Linux checks it first); the runs stay separate', () => {
    const t = new ExceptionTable();
    t.insert(c(1), c(11));
    t.insert(c(2), c(12));
    t.insert(c(4), c(14));
    t.insert(c(5), c(15));
    t.insert(c(3), c(13));
    expect(runsOf(t)).toEqual([[1, 11, 2], [4, 14, 1]]);
    // When only the run above matches, the chunk back-merges into it.
    const u = new ExceptionTable();
    u.insert(c(1), c(50));
    u.insert(c(4), c(14));
    u.insert(c(3), c(13));
    expect(runsOf(u)).toEqual([[1, 50, 0], [3, 13, 1]]);
  });

  test('runs never cross a 256-chunk group; a full group is one run of count 255', () => {
    const t = new ExceptionTable();
    for (let i = 0; i < 2 * EXCEPTION_GROUP_CHUNKS; i++) t.insert(c(i), c(1000 + i));
    expect(runsOf(t)).toEqual([[0, 1000, 255], [256, 1256, 255]]);
    expect(t.lookup(c(255))).toBe(1255);
    expect(t.lookup(c(256))).toBe(1256);
    // Back-merge across the boundary is refused too.
    const u = new ExceptionTable();
    u.insert(c(256), c(500));
    u.insert(c(255), c(499));
    expect(runsOf(u)).toEqual([[255, 499, 0], [256, 500, 0]]);
    // Built backwards: back-merges make one run per group as well.
    const b = new ExceptionTable();
    for (let i = 2 * EXCEPTION_GROUP_CHUNKS - 1; i >= 0; i--) b.insert(c(i), c(1000 + i));
    expect(runsOf(b)).toEqual([[0, 1000, 255], [256, 1256, 255]]);
    checkInvariants(b);
  });

  test('inserting a chunk already present is a bug (assert)', () => {
    const t = new ExceptionTable();
    t.insert(c(7), c(70));
    t.insert(c(8), c(71));
    expect(() => t.insert(c(8), c(99))).toThrow(/already/);
  });

  test('shuffled insert orders give the same lookups as a Map model', () => {
    for (let seed = 1; seed <= 40; seed++) {
      const rng = createRng(seed);
      // Old chunks in clusters (so runs form), new chunks mostly consecutive with metadata-like holes.
      const olds = new Set<number>();
      const clusterCount = 1 + rng.int(8);
      for (let k = 0; k < clusterCount; k++) {
        const base = rng.int(2000);
        const len = 1 + rng.int(300);
        for (let i = 0; i < len; i++) olds.add(base + i);
      }
      const model = new Map<number, number>();
      let next = 2;
      for (const o of [...olds].sort((a, b) => a - b)) {
        if (rng.int(20) === 0) next++; // a skipped chunk breaks the run
        model.set(o, next++);
      }
      const pairs = shuffle(rng, [...model.entries()]);
      if (seed % 3 === 0) pairs.sort((a, b) => b[0] - a[0]); // strictly backwards: back-merges only
      const t = new ExceptionTable();
      for (const [o, n] of pairs) t.insert(c(o), c(n));
      checkInvariants(t);
      expect(t.size).toBe(model.size);
      const wrong: number[] = [];
      for (let o = 0; o < 2400; o++) if (t.lookup(c(o)) !== (model.get(o) ?? -1)) wrong.push(o);
      expect(wrong, `seed ${seed}: chunks looked up wrong`).toEqual([]);
    }
  });

  test('clearMerged: single chunk, first chunk of a back-merged run, last chunk', () => {
    const t = new ExceptionTable();
    t.insert(c(5), c(50));
    expect(t.clearMerged(c(5), c(50))).toBe(true);
    expect(t.size).toBe(0);
    expect(t.runCount).toBe(0);
    expect(t.lookup(c(5))).toBe(-1);

    // Built by back-merges: 12 → 11 → 10. The merge clears the newest record first: (10, 100), the run's FIRST chunk.
    t.insert(c(12), c(102));
    t.insert(c(11), c(101));
    t.insert(c(10), c(100));
    expect(runsOf(t)).toEqual([[10, 100, 2]]);
    expect(t.clearMerged(c(10), c(100))).toBe(true);
    expect(runsOf(t)).toEqual([[11, 101, 1]]);
    expect(t.lookup(c(10))).toBe(-1);
    expect(t.lookup(c(11))).toBe(101);
    // Then the LAST chunk of the run.
    expect(t.clearMerged(c(12), c(102))).toBe(true);
    expect(runsOf(t)).toEqual([[11, 101, 0]]);
    expect(t.clearMerged(c(11), c(101))).toBe(true);
    expect(t.size).toBe(0);
  });

  test('clearMerged refuses a middle chunk, an unknown chunk and a mismatched new chunk, changing nothing', () => {
    const t = new ExceptionTable();
    for (let i = 0; i < 5; i++) t.insert(c(30 + i), c(300 + i));
    const before = runsOf(t);
    expect(t.clearMerged(c(32), c(302))).toBe(false); // middle
    expect(t.clearMerged(c(40), c(400))).toBe(false); // not in the table
    expect(t.clearMerged(c(34), c(999))).toBe(false); // on disk elsewhere than in memory
    expect(t.clearMerged(c(30 + 256), c(300))).toBe(false); // another group
    expect(runsOf(t)).toEqual(before);
    expect(t.size).toBe(5);
  });

  test('clearMerged in lock-step with a merge from the newest record down empties any table', () => {
    for (let seed = 1; seed <= 30; seed++) {
      const rng = createRng(1000 + seed);
      // Commit order = record order on disk: old chunks written in a random order, new chunks in allocation order.
      const olds = shuffle(rng, [...Array(300).keys()].map((i) => i + (i > 150 ? 100 : 0)));
      if (seed % 2 === 0) olds.sort((a, b) => b - a); // origin written backwards: back-merged runs
      const records = olds.map((o, i) => ({ oldChunk: o, newChunk: 2 + i + Math.floor(i / 64) })); // a hole every 64
      const t = new ExceptionTable();
      for (const r of records) t.insert(c(r.oldChunk), c(r.newChunk));
      checkInvariants(t);
      // Like persistent_prepare_merge: linear runs (old − i, new − i) ending at the newest record, cleared newest first.
      let end = records.length;
      while (end > 0) {
        const last = records[end - 1];
        let n = 1;
        while (n < end && records[end - 1 - n].oldChunk === last.oldChunk - n && records[end - 1 - n].newChunk === last.newChunk - n) n++;
        for (let i = 0; i < n; i++) {
          const r = records[end - 1 - i];
          const cleared = t.clearMerged(c(r.oldChunk), c(r.newChunk) as Chunk);
          if (!cleared || t.lookup(c(r.oldChunk)) !== -1) expect.fail(`seed ${seed}: clearing ${r.oldChunk} -> ${r.newChunk}`);
        }
        end -= n;
        expect(t.size).toBe(end);
        let wrong = 0;
        for (let i = 0; i < end; i++) if (t.lookup(c(records[i].oldChunk)) !== records[i].newChunk) wrong++;
        expect(wrong, `seed ${seed}: lookups wrong with ${end} records left`).toBe(0);
      }
      expect(t.runCount).toBe(0);
    }
  });
});
