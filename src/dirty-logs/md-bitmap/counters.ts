/**
 * md's in-memory bitmap counters (Linux md-bitmap.c struct bitmap_counts): one 16-bit counter per chunk,
 *
 *   bit 15     NEEDED   the chunk must be resynced (a write failed or went out while degraded, or the bit was
 *                       set on disk at load); the daemon never clears such a chunk
 *   bit 14     RESYNC   the resync is working on the chunk (NEEDED moved here by startSync)
 *   bits 0-13  count    0: the on-disk bit is clear (or about to be written clear); 1 or 2: no write in flight,
 *                       the daemon is counting down to clearing the bit; 3 and up: 2 + writes in flight
 *
 * Counters live in pages of 2048 (one 4 KiB page of u16, as md's PAGE_COUNTER_RATIO), allocated on the first
 * non-zero counter and freed when the last one drops to zero; each page has a `pending` flag saying the daemon has
 * counters to look at there. (md falls back to two coarse counters per page when a page cannot be allocated
 * — "hijacked" pages; a JS heap allocation does not fail that way, so there is no fallback here.)
 *
 * The write path (md_bitmap_startwrite / endwrite): startWrite on a zero counter returns 'set-bit' — the caller sets
 * the on-disk bit and marks its page dirty — and the counter goes to 3 (2, plus this write); on 1 or 2 it goes
 * to 3; above, +1. endWrite takes 1 off; at 2 or below the page is pending; a failed write sets NEEDED.
 *
 * This class keeps no I/O and no clock; src/dirty-logs/md-bitmap/md-bitmap.ts drives it.
 */
import { assert } from '../../core/assert.js';

export const MD_COUNTER_NEEDED = 0x8000;
export const MD_COUNTER_RESYNC = 0x4000;
/** COUNTER_MAX: writers wait at this many (md blocks them on overflow_wait). */
export const MD_COUNTER_MAX = 0x3fff;
export const MD_COUNTER_FLAGS = MD_COUNTER_NEEDED | MD_COUNTER_RESYNC;
/** Counters per counter page (PAGE_COUNTER_RATIO: 4096 bytes / 2). */
export const MD_COUNTERS_PER_PAGE = 2048;
const PAGE_SHIFT = 11;
const PAGE_MASK = MD_COUNTERS_PER_PAGE - 1;

export const mdCounterCount = (c: number): number => c & MD_COUNTER_MAX;
export const mdCounterNeeded = (c: number): boolean => (c & MD_COUNTER_NEEDED) !== 0;
export const mdCounterResync = (c: number): boolean => (c & MD_COUNTER_RESYNC) !== 0;

export type MdStartWriteResult = 'set-bit' | 'counted';

export class MdBitmapCounters {
  readonly pageCount: number;
  private readonly maps: Array<Uint16Array | undefined>;
  /** Non-zero counters per page (md bp[].count); the page is freed at 0. */
  private readonly nonZeroCounts: Uint32Array;
  /** md bp[].pending: the daemon has counters at 1 or 2 to look at in this page. */
  private readonly pendingPages: Uint8Array;
  /** Counters with NEEDED or RESYNC: chunks not in sync. */
  private flaggedCountValue = 0;

  constructor(readonly chunkCount: number) {
    assert(Number.isSafeInteger(chunkCount) && chunkCount > 0, 'chunk count must be a positive integer');
    this.pageCount = Math.ceil(chunkCount / MD_COUNTERS_PER_PAGE);
    this.maps = new Array<Uint16Array | undefined>(this.pageCount).fill(undefined);
    this.nonZeroCounts = new Uint32Array(this.pageCount);
    this.pendingPages = new Uint8Array(this.pageCount);
  }

  /** Chunks whose counter has NEEDED or RESYNC set. */
  get flaggedCount(): number {
    return this.flaggedCountValue;
  }

  /** Counter pages allocated (md's "pages" in /proc/mdstat's bitmap line). */
  get allocatedPageCount(): number {
    let n = 0;
    for (const m of this.maps) if (m) n++;
    return n;
  }

  get(chunk: number): number {
    const m = this.maps[chunk >>> PAGE_SHIFT];
    return m ? m[chunk & PAGE_MASK] : 0;
  }

  private set(chunk: number, value: number): void {
    const page = chunk >>> PAGE_SHIFT;
    let m = this.maps[page];
    const old = m ? m[chunk & PAGE_MASK] : 0;
    if (old === value) return;
    if (!m) m = this.maps[page] = new Uint16Array(MD_COUNTERS_PER_PAGE);
    m[chunk & PAGE_MASK] = value;
    const wasFlagged = (old & MD_COUNTER_FLAGS) !== 0;
    const isFlagged = (value & MD_COUNTER_FLAGS) !== 0;
    if (wasFlagged !== isFlagged) this.flaggedCountValue += isFlagged ? 1 : -1;
    if (old === 0) this.nonZeroCounts[page]++;
    else if (value === 0 && --this.nonZeroCounts[page] === 0) this.maps[page] = undefined; // md_bitmap_checkfree
  }

  private setPending(chunk: number): void {
    this.pendingPages[chunk >>> PAGE_SHIFT] = 1;
  }

  /** Whether a write may start now (md blocks a writer while the count is at COUNTER_MAX). */
  canStartWrite(chunk: number): boolean {
    return mdCounterCount(this.get(chunk)) < MD_COUNTER_MAX;
  }

  /** md_bitmap_startwrite for one chunk. The caller checks canStartWrite first. */
  startWrite(chunk: number): MdStartWriteResult {
    const c = this.get(chunk);
    assert(mdCounterCount(c) < MD_COUNTER_MAX, 'md bitmap counter overflow: startWrite at COUNTER_MAX');
    const count = mdCounterCount(c);
    const flags = c & MD_COUNTER_FLAGS;
    const result: MdStartWriteResult = c === 0 ? 'set-bit' : 'counted';
    // 0 and 1 both restart at 2 (the on-disk bit is set, or still set); then count this write.
    const base = count <= 1 ? 2 : count;
    this.set(chunk, flags | (base + 1));
    return result;
  }

  /**
   * md_bitmap_endwrite for one chunk: `success` false (a leg failed the write, or the array is degraded) sets
   * NEEDED. Returns true when the count is now 2 or below (the page became pending: the daemon has work).
   */
  endWrite(chunk: number, success: boolean): boolean {
    let c = this.get(chunk);
    assert(mdCounterCount(c) > 0, 'md bitmap: endWrite without a write in flight');
    if (!success) c |= MD_COUNTER_NEEDED;
    c--;
    this.set(chunk, c);
    if (c <= 2) {
      this.setPending(chunk);
      return true;
    }
    return false;
  }

  /**
   * md_bitmap_set_memory_bits: the chunk's on-disk bit is set (load, or a chunk made dirty): a zero counter goes
   * to 2 and its page is pending; `needed` adds NEEDED. Returns true when the counter was zero.
   */
  setMemoryBits(chunk: number, needed: boolean): boolean {
    let c = this.get(chunk);
    const wasZero = c === 0;
    if (wasZero) {
      c = 2;
      this.setPending(chunk);
    }
    if (needed) c |= MD_COUNTER_NEEDED;
    this.set(chunk, c);
    return wasZero;
  }

  /**
   * __bitmap_start_sync: whether the chunk needs resync (RESYNC or NEEDED). NEEDED moves to RESYNC unless
   * `degraded` (in a degraded array nothing is set or cleared: the missing leg still needs the chunk).
   */
  startSync(chunk: number, degraded: boolean): boolean {
    const c = this.get(chunk);
    if (mdCounterResync(c)) return true;
    if (!mdCounterNeeded(c)) return false;
    if (!degraded) this.set(chunk, (c | MD_COUNTER_RESYNC) & ~MD_COUNTER_NEEDED);
    return true;
  }

  /**
   * md_bitmap_end_sync: the resync of the chunk ended. `aborted` puts NEEDED back; otherwise a count of 2 or below
   * makes the page pending so the daemon clears the bit. Returns true when the daemon got work.
   */
  endSync(chunk: number, aborted: boolean): boolean {
    const c = this.get(chunk);
    if (!mdCounterResync(c)) return false;
    let v = c & ~MD_COUNTER_RESYNC;
    if (!mdCounterNeeded(v) && aborted) v |= MD_COUNTER_NEEDED;
    this.set(chunk, v);
    if (!aborted && v <= 2) {
      this.setPending(chunk);
      return true;
    }
    return false;
  }

  /** Clears NEEDED (a resync result recorded without startSync). Returns true when the daemon got work. */
  clearNeeded(chunk: number): boolean {
    const c = this.get(chunk);
    if (!mdCounterNeeded(c)) return false;
    const v = c & ~MD_COUNTER_NEEDED;
    this.set(chunk, v);
    if (v <= 2) {
      this.setPending(chunk);
      return true;
    }
    return false;
  }

  /** Some pending page holds a counter at exactly 1 (the next daemon pass would clear its bit). */
  anyPendingAtOne(): boolean {
    for (let page = 0; page < this.pageCount; page++) {
      const m = this.maps[page];
      if (!this.pendingPages[page] || !m) continue;
      for (let i = 0; i < MD_COUNTERS_PER_PAGE; i++) if (m[i] === 1) return true;
    }
    return false;
  }

  /** Every counter at 1 or 2 (a write drained, the bit not cleared yet) gets NEEDED. */
  markCountingDownNeeded(): void {
    for (let page = 0; page < this.pageCount; page++) {
      const m = this.maps[page];
      if (!m) continue;
      for (let i = 0; i < MD_COUNTERS_PER_PAGE; i++) {
        const c = m[i];
        if (c === 1 || c === 2) this.set((page << PAGE_SHIFT) + i, c | MD_COUNTER_NEEDED);
      }
    }
  }

  /**
   * The counter walk of md_bitmap_daemon_work, over pending pages only: a counter at 1 goes to 0 and `clearBit`
   * is called for its chunk when `allowClear` (md: no superblock update outstanding); a counter at 1 or 2 goes to 1
   * and keeps its page pending. Returns true when some counter is still counting down (the daemon must run again).
   */
  daemonWalk(allowClear: boolean, clearBit: (chunk: number) => void): boolean {
    let workLeft = false;
    for (let page = 0; page < this.pageCount; page++) {
      if (!this.pendingPages[page]) continue;
      this.pendingPages[page] = 0;
      const first = page << PAGE_SHIFT;
      const last = Math.min(first + MD_COUNTERS_PER_PAGE, this.chunkCount);
      for (let chunk = first; chunk < last; chunk++) {
        // The page may be freed while walking it (its last counter reached 0).
        const m = this.maps[page];
        if (!m) break;
        const c = m[chunk & PAGE_MASK];
        if (c === 1 && allowClear) {
          this.set(chunk, 0);
          clearBit(chunk);
        } else if (c !== 0 && c <= 2) {
          this.set(chunk, 1);
          this.setPending(chunk);
          workLeft = true;
        }
      }
    }
    return workLeft;
  }

  /** The first chunk at or after `fromChunk` with NEEDED set (not RESYNC), or undefined. */
  findNeeded(fromChunk: number): number | undefined {
    for (let page = fromChunk >>> PAGE_SHIFT; page < this.pageCount; page++) {
      const m = this.maps[page];
      if (!m) continue;
      const first = page << PAGE_SHIFT;
      const start = Math.max(first, fromChunk);
      const last = Math.min(first + MD_COUNTERS_PER_PAGE, this.chunkCount);
      for (let chunk = start; chunk < last; chunk++) {
        const c = m[chunk & PAGE_MASK];
        if (mdCounterNeeded(c) && !mdCounterResync(c)) return chunk;
      }
    }
    return undefined;
  }

  /** Every counter to zero, every page freed (before a load re-reads the bitmap). */
  reset(): void {
    this.maps.fill(undefined);
    this.nonZeroCounts.fill(0);
    this.pendingPages.fill(0);
    this.flaggedCountValue = 0;
  }
}
