/** md's 16-bit per-chunk counters (NEEDED / RESYNC / count) and their startwrite / endwrite / sync / daemon rules. */
import { describe, expect, test } from 'vitest';
import {
  MD_COUNTER_MAX,
  MD_COUNTER_NEEDED,
  MD_COUNTER_RESYNC,
  MD_COUNTERS_PER_PAGE,
  MdBitmapCounters,
} from '../../src/dirty-logs/md-bitmap/counters.js';

/** Runs daemon walks until nothing counts down; returns the chunks cleared at each walk. */
function walkAll(c: MdBitmapCounters, walksMax = 10): number[][] {
  const out: number[][] = [];
  for (let i = 0; i < walksMax; i++) {
    const cleared: number[] = [];
    const more = c.daemonWalk(true, (chunk) => cleared.push(chunk));
    out.push(cleared);
    if (!more) break;
  }
  return out;
}

describe('md bitmap counters', () => {
  test('startwrite: 0 sets the bit and goes to 3; further writes count on; endwrite counts down to 2 (pending)', () => {
    const c = new MdBitmapCounters(10);
    expect(c.startWrite(4)).toBe('set-bit');
    expect(c.get(4)).toBe(3);
    expect(c.startWrite(4)).toBe('counted');
    expect(c.get(4)).toBe(4);
    expect(c.endWrite(4, true)).toBe(false);
    expect(c.get(4)).toBe(3);
    expect(c.endWrite(4, true)).toBe(true);
    expect(c.get(4)).toBe(2);
    expect(c.allocatedPageCount).toBe(1);
  });

  test('the daemon walk takes 2 → 1 → 0 and clears the bit at the second walk; the page is freed', () => {
    const c = new MdBitmapCounters(10);
    c.startWrite(4);
    c.endWrite(4, true);
    expect(walkAll(c)).toEqual([[], [4]]);
    expect(c.get(4)).toBe(0);
    expect(c.allocatedPageCount).toBe(0);
  });

  test('a write to a chunk counting down (at 1 or 2) restarts it at 3 without setting the bit again', () => {
    const c = new MdBitmapCounters(10);
    c.startWrite(1);
    c.endWrite(1, true);
    c.daemonWalk(true, () => undefined);
    expect(c.get(1)).toBe(1);
    expect(c.startWrite(1)).toBe('counted');
    expect(c.get(1)).toBe(3);
    c.endWrite(1, true);
    expect(walkAll(c)).toEqual([[], [1]]);
  });

  test('writes in flight are never cleared: the walk leaves counts of 3 and up alone', () => {
    const c = new MdBitmapCounters(10);
    c.startWrite(2);
    for (let i = 0; i < 5; i++) expect(c.daemonWalk(true, () => expect.unreachable())).toBe(false);
    expect(c.get(2)).toBe(3);
  });

  test('without allowClear (an events_cleared update outstanding) a counter stays at 1', () => {
    const c = new MdBitmapCounters(10);
    c.startWrite(0);
    c.endWrite(0, true);
    c.daemonWalk(true, () => undefined);
    expect(c.daemonWalk(false, () => expect.unreachable())).toBe(true);
    expect(c.get(0)).toBe(1);
    expect(walkAll(c)).toEqual([[0]]);
  });

  test('a failed (or degraded) endwrite sets NEEDED: the chunk is out of sync and the daemon never clears it', () => {
    const c = new MdBitmapCounters(10);
    c.startWrite(6);
    c.endWrite(6, false);
    expect(c.get(6)).toBe(MD_COUNTER_NEEDED | 2);
    expect(c.flaggedCount).toBe(1);
    expect(walkAll(c).flat()).toEqual([]);
    expect(c.get(6)).toBe(MD_COUNTER_NEEDED | 2);
    // A later successful write does not take NEEDED away.
    c.startWrite(6);
    c.endWrite(6, true);
    expect(c.get(6) & MD_COUNTER_NEEDED).toBe(MD_COUNTER_NEEDED);
  });

  test('resync: NEEDED → RESYNC (not while degraded); end_sync lets the daemon clear it; an aborted one is NEEDED again', () => {
    const c = new MdBitmapCounters(10);
    c.setMemoryBits(3, true);
    c.setMemoryBits(5, true);
    expect(c.flaggedCount).toBe(2);
    expect(c.startSync(3, true)).toBe(true);
    expect(c.get(3)).toBe(MD_COUNTER_NEEDED | 2);
    expect(c.startSync(3, false)).toBe(true);
    expect(c.get(3)).toBe(MD_COUNTER_RESYNC | 2);
    expect(c.startSync(5, false)).toBe(true);
    expect(c.startSync(7, false)).toBe(false);
    expect(c.endSync(5, true)).toBe(false);
    expect(c.get(5)).toBe(MD_COUNTER_NEEDED | 2);
    expect(c.endSync(3, false)).toBe(true);
    expect(c.get(3)).toBe(2);
    expect(c.flaggedCount).toBe(1);
    expect(walkAll(c)).toEqual([[], [3]]);
    expect(c.get(5)).toBe(MD_COUNTER_NEEDED | 2);
  });

  test('setMemoryBits (a bit found set at load) starts at 2, pending; on a live counter it only adds NEEDED', () => {
    const c = new MdBitmapCounters(10);
    expect(c.setMemoryBits(9, false)).toBe(true);
    expect(c.get(9)).toBe(2);
    c.startWrite(8);
    expect(c.setMemoryBits(8, true)).toBe(false);
    expect(c.get(8)).toBe(MD_COUNTER_NEEDED | 3);
    expect(walkAll(c)).toEqual([[], [9]]);
  });

  test('writers stop at COUNTER_MAX (md blocks them there)', () => {
    const c = new MdBitmapCounters(1);
    for (let i = 0; i < MD_COUNTER_MAX - 2; i++) {
      expect(c.canStartWrite(0)).toBe(true);
      c.startWrite(0);
    }
    expect(c.get(0)).toBe(MD_COUNTER_MAX);
    expect(c.canStartWrite(0)).toBe(false);
    expect(() => c.startWrite(0)).toThrow(/overflow/);
    c.endWrite(0, true);
    expect(c.canStartWrite(0)).toBe(true);
  });

  test('pages of 2048 counters are allocated on use and walked only when pending; findNeeded crosses pages', () => {
    const n = MD_COUNTERS_PER_PAGE * 3 + 5;
    const c = new MdBitmapCounters(n);
    expect(c.pageCount).toBe(4);
    c.setMemoryBits(n - 1, true);
    c.setMemoryBits(MD_COUNTERS_PER_PAGE + 7, true);
    expect(c.allocatedPageCount).toBe(2);
    expect(c.findNeeded(0)).toBe(MD_COUNTERS_PER_PAGE + 7);
    expect(c.findNeeded(MD_COUNTERS_PER_PAGE + 8)).toBe(n - 1);
    expect(c.findNeeded(n)).toBeUndefined();
    c.startSync(MD_COUNTERS_PER_PAGE + 7, false);
    expect(c.findNeeded(0)).toBe(n - 1);
  });

  test('anyPendingAtOne and markCountingDownNeeded (a failed leg flush: nothing counting down is clean)', () => {
    const c = new MdBitmapCounters(10);
    c.startWrite(1);
    c.endWrite(1, true);
    c.startWrite(2);
    expect(c.anyPendingAtOne()).toBe(false);
    c.daemonWalk(true, () => undefined);
    expect(c.anyPendingAtOne()).toBe(true);
    c.markCountingDownNeeded();
    expect(c.get(1)).toBe(MD_COUNTER_NEEDED | 1);
    expect(c.get(2)).toBe(3);
    expect(walkAll(c).flat()).toEqual([]);
  });

  test('reset forgets everything', () => {
    const c = new MdBitmapCounters(10);
    c.setMemoryBits(1, true);
    c.startWrite(2);
    c.reset();
    expect(c.get(1)).toBe(0);
    expect(c.get(2)).toBe(0);
    expect(c.flaggedCount).toBe(0);
    expect(c.allocatedPageCount).toBe(0);
  });
});
