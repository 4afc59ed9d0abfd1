/**
 * An md write-intent bitmap over a block device (Linux drivers/md/md-bitmap.c with a bitmap file): the file image
 * in memory (superblock + bits, in 4 KiB pages as md keeps them), md's per-chunk counters (counters.ts), the
 * write-out of pages, the daemon that clears bits, and the events / events_cleared bookkeeping.
 *
 * Page attributes (md's BITMAP_PAGE_*): DIRTY a bit was set (must be written before the data: unplug), PENDING a bit
 * was cleared (written two daemon passes later), NEEDWRITE written at the next pass.
 *
 * Write path, in md's order: startWrite sets the chunk's bit in the image and marks its page DIRTY; unplug()
 * (flush) writes every DIRTY and NEEDWRITE page in page order, flushes the device when a page carried a set bit,
 * and resolves; only then may the data go out. endWrite counts the write down; at 2 or below the daemon has work.
 *
 * The daemon (md_bitmap_daemon_work), every daemon_sleep seconds on the injected clock while there is work:
 *   1. PENDING pages become NEEDWRITE;
 *   2. when an events_cleared update is due (need_sync), the superblock is arranged for writing (page 0 first);
 *   3. counters: 1 → 0 and the bit is cleared in the image (its page turns PENDING), 2 → 1;
 *   4. NEEDWRITE pages are written.
 * So a bit is cleared in memory two passes after its last write ended and on disk at the third: 2–3 periods of
 * idleness (the first pass after the write comes up to one period later; after an idle spell the timer restarts a
 * full period after the write).
 *
 * Where dmstate adds to md: before a pass takes any counter from 1 to 0 it calls `flushLegs` (the dirty-log
 * contract's rule: a region is recorded clean only once its data is durable on every leg; md relies on the write
 * having completed). When that flush fails no bit is cleared again (every chunk counting down gets NEEDED), as
 * dm-log does after a failed flush. And when the superblock carries a new events_cleared, its first block is
 * written with FUA before any page, so no cleared bit can reach the disk ahead of it (md writes page 0 first for
 * the same reason; a volatile cache could reorder the pages).
 *
 * Events: `events` is the array's event count (md's mddev->events, kept in the superblock): +1 at every load
 * (activation), when the array becomes degraded and when it stops being degraded. A successful, non-degraded
 * endWrite with events_cleared < events sets events_cleared = events and need_sync (the daemon writes the
 * superblock before clearing). While degraded every endWrite sets NEEDED and events_cleared stays: no bit is
 * cleared, so the bits name every chunk a missing leg lacks (readd.ts decides what a returning leg needs).
 *
 * Load (resume): reads superblock and bits; a blank (all-zero) superblock is a new bitmap. `resync` trusts the
 * file: every set bit becomes NEEDED, a STALE bitmap (or a new one) sets every bit; `sync` sets every bit;
 * `nosync` clears every bit. (md loads set bits of a cleanly stopped, non-degraded array without NEEDED and lets
 * the daemon clear them; dmstate keeps no clean-shutdown flag, so it resyncs them.) The whole image is written and
 * flushed with events + 1.
 *
 * Read-only (MdBitmapOptions.readOnly, a pinned mirror of a replayed pool): load reads the file and sets the
 * counters from it by the same rules, in memory only — events stay as the file has them, no page is written, the
 * daemon never runs — and nothing is written afterwards: unplug() resolves when no bit was set (it rejects with
 * DM_IO when one was: it cannot be made durable), suspend (flushAll) writes nothing, close writes nothing.
 */
import type { BlockDevice } from '../../block/contract.js';
import { sectors, type Sector } from '../../block/units.js';
import { assert } from '../../core/assert.js';
import type { Clock, ClockTimer } from '../../core/clock.js';
import { DmError } from '../../core/errors.js';
import { MdBitmapCounters, mdCounterCount, mdCounterNeeded, mdCounterResync } from './counters.js';
import { mdBitmapReaddDecision, type MdBitmapReaddDecision } from './readd.js';
import {
  MD_BITMAP_CLUSTER_NAME_BYTES,
  MD_BITMAP_MAGIC,
  MD_BITMAP_STATE_STALE,
  MD_BITMAP_SUPERBLOCK_BYTES,
  MD_BITMAP_UUID_BYTES,
  MD_BITMAP_VERSION,
  MD_BITMAP_VERSION_CLUSTERED,
  decodeMdBitmapSuperblock,
  encodeMdBitmapSuperblock,
  isBlankMdBitmapSuperblock,
  mdBitmapFileBytes,
  validateMdBitmapSuperblock,
  type MdBitmapSuperblock,
} from './superblock.js';

/** md writes its bitmap a page at a time. */
export const MD_BITMAP_PAGE_BYTES = 4096;
const PAGE_SECTORS = MD_BITMAP_PAGE_BYTES / 512;
const PAGE_DIRTY = 1;
const PAGE_PENDING = 2;
const PAGE_NEEDWRITE = 4;
/** md_bitmap_flush runs the daemon this many times so that every clearable bit reaches the disk. */
const FLUSH_DAEMON_PASSES = 3;
/** Chunks per bitmap at most (counters are 2 bytes each; mdadm aims for 2^20). */
export const MD_BITMAP_CHUNK_COUNT_MAX = 1 << 28;

const RESOLVED: Promise<void> = Promise.resolve();

export type MdBitmapInitialSync = 'resync' | 'sync' | 'nosync';

export interface MdBitmapOptions {
  readonly device: BlockDevice;
  /** How messages and status name the device. */
  readonly label: string;
  /** Where the superblock starts on the device (a bitmap inside a leg's file), a multiple of the logical block. */
  readonly offsetSectors: Sector;
  /** Sectors the bitmap covers (sync_size: the mirror's length). */
  readonly syncSizeSectors: Sector;
  /** Chunk (mirror region) size, a power of two. */
  readonly chunkSizeSectors: Sector;
  readonly daemonSleepSeconds: number;
  readonly clock: Clock;
  /** Makes every completed data write durable on every leg; called before any bit is cleared. */
  readonly flushLegs?: () => Promise<void>;
  /** Read the file, never write or flush it (see the file header). */
  readonly readOnly?: boolean;
}

/** Bytes the device must hold from the offset: superblock and bits, rounded up to the logical block. */
export function mdBitmapDeviceBytes(chunkCount: number, logicalBlockSizeBytes: number): number {
  return Math.ceil(mdBitmapFileBytes(chunkCount) / logicalBlockSizeBytes) * logicalBlockSizeBytes;
}

export class MdBitmap {
  readonly device: BlockDevice;
  readonly label: string;
  readonly offsetSectors: Sector;
  readonly syncSizeSectors: Sector;
  readonly chunkSizeSectors: Sector;
  readonly chunkCount: number;
  /** Superblock + bits (md's store->bytes). */
  readonly fileBytes: number;
  readonly filePageCount: number;
  /** The file image, whole pages; bytes past fileBytes are what the device held (never meaningful). */
  readonly image: Uint8Array;
  readonly counters: MdBitmapCounters;
  daemonSleepSeconds: number;

  // Superblock fields kept from the file.
  uuid: Uint8Array = new Uint8Array(MD_BITMAP_UUID_BYTES);
  version = MD_BITMAP_VERSION;
  writeBehind = 0;
  sectorsReserved = 0;
  /** The array's event count (mddev->events). */
  events = 0n;
  /** The event count when bits were last cleared. */
  eventsCleared = 0n;

  /** An events_cleared update must reach the superblock before the next bits are cleared (md need_sync). */
  needSync = false;
  /** Nothing for the daemon to do (md allclean). */
  allClean = true;
  /** A leg is missing: endWrite sets NEEDED, nothing is cleared (md mddev->degraded). */
  degraded = false;
  /** flushLegs failed once: no bit is cleared again until the next load. */
  legFlushFailed = false;
  /** The device failed a read or a write (status D); every later flush rejects. */
  deviceFailed = false;
  /** The device failed a flush (status F). */
  deviceFlushFailed = false;
  /** The array event count when the array became degraded (the missing leg's last event count). */
  degradedAtEvents: bigint | undefined = undefined;
  /** What the last return from degraded decided. */
  lastReaddDecision: MdBitmapReaddDecision | undefined = undefined;
  /** Daemon passes run (tests and status). */
  daemonPassCount = 0;
  /** Never write or flush the device (a replayed pool's pinned mirror). */
  readonly readOnly: boolean;

  private readonly pageAttrs: Uint8Array;
  private readonly flushLegs: (() => Promise<void>) | undefined;
  private readonly clock: Clock;
  /** Marks (set bits, superblock event changes) made so far, and how many of them are durable. */
  private markSeq = 0;
  private durableMarkSeq = 0;
  /** events_cleared as durable on the device. */
  private durableEventsCleared = -1n;
  private writeTail: Promise<void> = RESOLVED;
  private queuedPass: Promise<void> | undefined = undefined;
  private runningPass: Promise<void> | undefined = undefined;
  private runningPassMarkSeq = 0;
  private daemonTail: Promise<void> = RESOLVED;
  private daemonBusy = false;
  private timer: ClockTimer | undefined = undefined;
  private lastRunMs: number;
  /** Between a load and suspend/close: the daemon may run. */
  private active = false;
  /** close() was called: nothing is written any more (the next table may own the file). */
  private closed = false;

  constructor(options: MdBitmapOptions) {
    const { device, chunkSizeSectors, syncSizeSectors } = options;
    assert(Number.isSafeInteger(chunkSizeSectors) && chunkSizeSectors >= 1 && (chunkSizeSectors & (chunkSizeSectors - 1)) === 0, 'chunk size must be a power of two');
    assert(Number.isSafeInteger(syncSizeSectors) && syncSizeSectors >= 1, 'sync size must be positive');
    this.device = device;
    this.label = options.label;
    this.offsetSectors = options.offsetSectors;
    this.syncSizeSectors = syncSizeSectors;
    this.chunkSizeSectors = chunkSizeSectors;
    this.chunkCount = Math.ceil(syncSizeSectors / chunkSizeSectors);
    assert(this.chunkCount <= MD_BITMAP_CHUNK_COUNT_MAX, 'too many chunks');
    this.fileBytes = mdBitmapFileBytes(this.chunkCount);
    this.filePageCount = Math.ceil(this.fileBytes / MD_BITMAP_PAGE_BYTES);
    this.image = new Uint8Array(this.filePageCount * MD_BITMAP_PAGE_BYTES);
    this.pageAttrs = new Uint8Array(this.filePageCount);
    this.counters = new MdBitmapCounters(this.chunkCount);
    this.daemonSleepSeconds = options.daemonSleepSeconds;
    this.flushLegs = options.flushLegs;
    this.clock = options.clock;
    this.lastRunMs = options.clock.nowMs();
    this.readOnly = options.readOnly === true;
  }

  get failed(): boolean {
    return this.deviceFailed || this.deviceFlushFailed;
  }

  private get daemonSleepMs(): number {
    return this.daemonSleepSeconds * 1000;
  }

  // ---- bits in the image ------------------------------------------------------------------------------------

  private static byteOf(chunk: number): number {
    return MD_BITMAP_SUPERBLOCK_BYTES + (chunk >>> 3);
  }

  private static pageOf(chunk: number): number {
    return Math.floor(MdBitmap.byteOf(chunk) / MD_BITMAP_PAGE_BYTES);
  }

  testBit(chunk: number): boolean {
    return (this.image[MdBitmap.byteOf(chunk)] & (1 << (chunk & 7))) !== 0;
  }

  /** md_bitmap_file_set_bit: sets the bit; its page must be written before data goes out. */
  private fileSetBit(chunk: number): void {
    this.image[MdBitmap.byteOf(chunk)] |= 1 << (chunk & 7);
    this.pageAttrs[MdBitmap.pageOf(chunk)] |= PAGE_DIRTY;
    this.markSeq++;
  }

  /** md_bitmap_file_clear_bit: clears the bit; its page is written at a later daemon pass. */
  private fileClearBit(chunk: number): void {
    this.image[MdBitmap.byteOf(chunk)] &= ~(1 << (chunk & 7));
    const page = MdBitmap.pageOf(chunk);
    if ((this.pageAttrs[page] & PAGE_NEEDWRITE) === 0) {
      this.pageAttrs[page] |= PAGE_PENDING;
      this.allClean = false;
    }
  }

  // ---- the write path ---------------------------------------------------------------------------------------

  /** Whether a write to the chunk may start now (md blocks writers at COUNTER_MAX). */
  canStartWrite(chunk: number): boolean {
    return this.counters.canStartWrite(chunk);
  }

  /** md_bitmap_startwrite for one chunk. Not durable until unplug() resolves. */
  startWrite(chunk: number): void {
    if (this.counters.startWrite(chunk) === 'set-bit') this.fileSetBit(chunk);
  }

  /** md_bitmap_endwrite for one chunk; `success` false when a leg missed the write. */
  endWrite(chunk: number, success: boolean): void {
    const ok = success && !this.degraded && !this.legFlushFailed;
    if (ok && this.eventsCleared < this.events) {
      this.eventsCleared = this.events;
      this.needSync = true;
      this.noteWork();
    }
    if (this.counters.endWrite(chunk, ok)) this.noteWork();
  }

  /** md_bitmap_dirty_bits for one chunk: it needs a resync; the bit is set (durable at the next unplug). */
  setNeeded(chunk: number): void {
    if (this.counters.setMemoryBits(chunk, true)) this.noteWork();
    if (!this.testBit(chunk)) this.fileSetBit(chunk);
  }

  /** __bitmap_start_sync: whether the chunk needs resync; NEEDED becomes RESYNC unless degraded. */
  startSync(chunk: number): boolean {
    return this.counters.startSync(chunk, this.degraded);
  }

  /**
   * The next chunk needing resync at or after `fromChunk` (wrapping around once), marked RESYNC so it is handed out
   * once; undefined when none. Unlike startSync it marks the chunk even while degraded (the dirty-log contract hands
   * each region out once); endSync then counts a resync that ended while degraded as aborted, so the bit stays.
   */
  takeResyncWork(fromChunk: number): number | undefined {
    const start = Math.min(Math.max(0, fromChunk), this.chunkCount);
    let c = this.counters.findNeeded(start);
    if (c === undefined && start > 0) c = this.counters.findNeeded(0);
    if (c === undefined) return undefined;
    this.counters.startSync(c, false);
    return c;
  }

  /** md_bitmap_end_sync. A resync that ends while degraded counts as aborted: the missing leg still lacks it. */
  endSync(chunk: number, aborted: boolean): void {
    if (this.counters.endSync(chunk, aborted || this.degraded)) this.noteWork();
  }

  /** The chunk's resync is recorded done without a startSync (nothing RESYNC): drop NEEDED unless degraded. */
  clearNeeded(chunk: number): void {
    if (this.degraded) return;
    if (this.counters.clearNeeded(chunk)) this.noteWork();
  }

  /** In sync: neither NEEDED nor RESYNC. */
  inSync(chunk: number): boolean {
    const c = this.counters.get(chunk);
    return !mdCounterNeeded(c) && !mdCounterResync(c);
  }

  /** Writes in flight to the chunk (counter minus the 2 the daemon counts down from). */
  writesInFlight(chunk: number): number {
    return Math.max(0, mdCounterCount(this.counters.get(chunk)) - 2);
  }

  // ---- degraded, events, re-add -----------------------------------------------------------------------------

  /** The superblock changed in a way that must be durable (events): page 0 is written at the next unplug. */
  private markSuperblockDirty(): void {
    this.pageAttrs[0] |= PAGE_DIRTY;
    this.markSeq++;
  }

  /**
   * A leg went missing (true) or came back (false). Each change is an array event. Coming back applies the re-add
   * rules with the event count the array had when it went degraded: a full resync when bits were cleared since
   * (never in one run: nothing is cleared while degraded); otherwise the NEEDED chunks are exactly what it missed.
   */
  setDegraded(degraded: boolean): void {
    if (degraded === this.degraded) return;
    if (degraded) {
      this.degradedAtEvents = this.events;
    } else {
      const legEvents = this.degradedAtEvents ?? this.events;
      this.degradedAtEvents = undefined;
      const decision = mdBitmapReaddDecision(legEvents, this);
      this.lastReaddDecision = decision;
      if (decision === 'full-resync') this.setAllNeeded();
    }
    this.degraded = degraded;
    this.events += 1n;
    this.markSuperblockDirty();
    if (this.active && !this.failed) this.requestPass().catch(() => undefined);
  }

  /**
   * A leg that was in sync at `legEvents` returns (md re-add): decides by the events rules and marks what it needs:
   * everything for a full resync, every chunk whose bit is set for a bitmap recovery, nothing when in sync.
   */
  readd(legEvents: bigint): MdBitmapReaddDecision {
    const decision = mdBitmapReaddDecision(legEvents, this);
    this.lastReaddDecision = decision;
    if (decision === 'full-resync') this.setAllNeeded();
    else if (decision === 'bitmap-recovery') {
      for (let c = 0; c < this.chunkCount; c++) if (this.testBit(c)) this.setNeeded(c);
    }
    return decision;
  }

  private setAllNeeded(): void {
    for (let c = 0; c < this.chunkCount; c++) this.setNeeded(c);
  }

  // ---- writing pages ----------------------------------------------------------------------------------------

  /** Bytes of page `page` that go to the device (the last page is cut at the file, rounded to the block). */
  private pageWriteBytes(page: number): number {
    const lbs = this.device.logicalBlockSizeBytes;
    const left = this.fileBytes - page * MD_BITMAP_PAGE_BYTES;
    return Math.min(MD_BITMAP_PAGE_BYTES, Math.ceil(left / lbs) * lbs);
  }

  private pageSector(page: number): Sector {
    return sectors(this.offsetSectors + page * PAGE_SECTORS);
  }

  superblock(): MdBitmapSuperblock {
    return {
      magic: MD_BITMAP_MAGIC,
      version: this.version,
      uuid: this.uuid,
      events: this.events,
      eventsCleared: this.eventsCleared,
      syncSizeSectors: BigInt(this.syncSizeSectors),
      // STALE and WRITE_ERROR are not kept: a load clears STALE, a write error fails the log instead.
      state: 0,
      chunkSizeBytes: this.chunkSizeSectors * 512,
      daemonSleepSeconds: this.daemonSleepSeconds,
      writeBehind: this.writeBehind,
      sectorsReserved: this.sectorsReserved,
      nodes: 0,
      clusterName: new Uint8Array(MD_BITMAP_CLUSTER_NAME_BYTES),
    };
  }

  private anyPageToWrite(): boolean {
    for (let p = 0; p < this.filePageCount; p++) if (this.pageAttrs[p] & (PAGE_DIRTY | PAGE_NEEDWRITE)) return true;
    return false;
  }

  /**
   * md_bitmap_unplug: writes every DIRTY and NEEDWRITE page. Resolves once every bit set before the call is durable
   * (and, with `clears`, once the pages carrying cleared bits are written too). Concurrent calls share passes.
   * Rejects with DM_IO when the device failed.
   */
  unplug(options?: { clears?: boolean }): Promise<void> {
    if (this.closed) return Promise.reject(this.closedError());
    if (this.failed) return Promise.reject(this.failedError());
    if (this.readOnly) {
      // Nothing goes to the device: a set bit cannot be made durable; cleared bits stay in memory.
      const marks = this.markSeq > this.durableMarkSeq;
      this.pageAttrs.fill(0);
      this.durableMarkSeq = this.markSeq;
      return marks ? Promise.reject(this.readOnlyError()) : RESOLVED;
    }
    const clears = options?.clears !== false;
    const pagesWaiting = clears && this.anyPageToWrite();
    if (this.markSeq > this.durableMarkSeq || pagesWaiting) {
      // A pass running already covers every mark made so far: share it.
      if (!pagesWaiting && this.runningPass && this.runningPassMarkSeq >= this.markSeq) return this.runningPass;
      return this.requestPass();
    }
    return clears ? (this.runningPass ?? RESOLVED) : RESOLVED;
  }

  private closedError(): DmError {
    return new DmError('DM_CLOSED', `md bitmap ${this.label}: closed`);
  }

  private readOnlyError(): DmError {
    return new DmError('DM_IO', `md bitmap ${this.label}: read-only (a replayed pool's pinned mirror): nothing is written`);
  }

  private failedError(): DmError {
    return new DmError('DM_IO', `md bitmap ${this.label}: the bitmap device has failed`);
  }

  /** Queues a write pass after the one running; a pass queued and not started yet is shared. */
  private requestPass(): Promise<void> {
    if (this.queuedPass) return this.queuedPass;
    const pass: Promise<void> = this.writeTail
      .catch(() => undefined)
      .then(() => {
        if (this.queuedPass === pass) this.queuedPass = undefined;
        const run = this.writePass();
        this.runningPass = run;
        const done = (): void => {
          if (this.runningPass === run) this.runningPass = undefined;
        };
        run.then(done, done);
        return run;
      });
    this.queuedPass = pass;
    this.writeTail = pass;
    return pass;
  }

  /** One pass: snapshot the pages (synchronously), write them in page order, flush when one carried a mark. */
  private async writePass(): Promise<void> {
    if (this.closed) throw this.closedError();
    if (this.failed) throw this.failedError();
    if (this.readOnly) throw this.readOnlyError();
    const pages: number[] = [];
    let carriesMarks = false;
    for (let p = 0; p < this.filePageCount; p++) {
      const a = this.pageAttrs[p];
      if ((a & (PAGE_DIRTY | PAGE_NEEDWRITE)) === 0) continue;
      if (a & PAGE_DIRTY) carriesMarks = true;
      this.pageAttrs[p] = a & ~(PAGE_DIRTY | PAGE_NEEDWRITE | PAGE_PENDING);
      pages.push(p);
    }
    const markSeqAtStart = this.markSeq;
    this.runningPassMarkSeq = markSeqAtStart;
    if (pages.length === 0) {
      this.durableMarkSeq = Math.max(this.durableMarkSeq, markSeqAtStart);
      return;
    }
    let eventsClearedWritten: bigint | undefined;
    if (pages[0] === 0) {
      const sb = this.superblock();
      this.image.set(encodeMdBitmapSuperblock(sb), 0);
      if (sb.eventsCleared !== this.durableEventsCleared) eventsClearedWritten = sb.eventsCleared;
    }
    const buffers = pages.map((p) => this.image.slice(p * MD_BITMAP_PAGE_BYTES, p * MD_BITMAP_PAGE_BYTES + this.pageWriteBytes(p)));
    try {
      if (eventsClearedWritten !== undefined) {
        // The superblock's block alone and durable first: no cleared bit may land before its events_cleared.
        await this.device.write(this.pageSector(0), buffers[0].subarray(0, this.device.logicalBlockSizeBytes), { fua: true });
        this.durableEventsCleared = eventsClearedWritten;
      }
      for (let i = 0; i < pages.length; i++) await this.device.write(this.pageSector(pages[i]), buffers[i]);
    } catch (err) {
      this.deviceFailed = true;
      throw new DmError('DM_IO', `md bitmap ${this.label}: writing the bitmap failed`, { cause: err });
    }
    if (carriesMarks) {
      try {
        await this.device.flush();
      } catch (err) {
        this.deviceFlushFailed = true;
        throw new DmError('DM_IO', `md bitmap ${this.label}: flushing the bitmap device failed`, { cause: err });
      }
    }
    this.durableMarkSeq = Math.max(this.durableMarkSeq, markSeqAtStart);
  }

  // ---- the daemon -------------------------------------------------------------------------------------------

  private noteWork(): void {
    this.allClean = false;
    this.scheduleDaemon();
  }

  private scheduleDaemon(): void {
    if (!this.active || this.timer !== undefined || this.daemonBusy || this.failed) return;
    const nowMs = this.clock.nowMs();
    const nextMs = this.lastRunMs + this.daemonSleepMs;
    // A pass at most every daemon_sleep; after an idle spell, a full period from now.
    const delayMs = nextMs > nowMs ? nextMs - nowMs : this.daemonSleepMs;
    this.timer = this.clock.setTimeout(() => {
      this.timer = undefined;
      this.runDaemon().catch(() => undefined);
    }, delayMs);
  }

  private stopDaemonTimer(): void {
    if (this.timer !== undefined) this.clock.clearTimeout(this.timer);
    this.timer = undefined;
  }

  /** Runs one daemon pass after any pass in progress (passes never overlap). */
  runDaemon(): Promise<void> {
    const p = this.daemonTail.then(() => this.daemonPass());
    this.daemonTail = p.catch(() => undefined);
    return p;
  }

  private async daemonPass(): Promise<void> {
    this.daemonBusy = true;
    try {
      this.lastRunMs = this.clock.nowMs();
      if (this.allClean || this.failed || this.readOnly) return;
      this.daemonPassCount++;
      this.allClean = true;
      for (let p = 0; p < this.filePageCount; p++) {
        if (this.pageAttrs[p] & PAGE_PENDING) this.pageAttrs[p] = (this.pageAttrs[p] & ~PAGE_PENDING) | PAGE_NEEDWRITE;
      }
      if (this.needSync) {
        // The superblock (page 0, written first) carries the new events_cleared.
        this.needSync = false;
        this.pageAttrs[0] |= PAGE_NEEDWRITE;
      }
      if (!this.legFlushFailed && this.flushLegs && this.counters.anyPendingAtOne()) {
        try {
          await this.flushLegs();
        } catch {
          // Which data reached the legs is unknown: nothing counting down may be called clean.
          this.legFlushFailed = true;
          this.counters.markCountingDownNeeded();
        }
      }
      const workLeft = this.counters.daemonWalk(!this.needSync && !this.legFlushFailed, (chunk) => this.fileClearBit(chunk));
      if (workLeft) this.allClean = false;
      if (this.anyPageToWrite()) await this.requestPass();
    } finally {
      this.daemonBusy = false;
      if (!this.allClean) this.scheduleDaemon();
    }
  }

  /** Resolves once no daemon pass and no write pass is in progress. */
  async whenIdle(): Promise<void> {
    for (;;) {
      const d = this.daemonTail;
      const w = this.writeTail;
      await d;
      await w.catch(() => undefined);
      if (d === this.daemonTail && w === this.writeTail) return;
    }
  }

  // ---- life cycle -------------------------------------------------------------------------------------------

  /**
   * Reads the bitmap and starts it (md_bitmap_create + md_bitmap_load): see the file header. Resolves even when
   * the device fails (the bitmap is then failed: status D or F, every flush rejects).
   */
  async load(initialSync: MdBitmapInitialSync): Promise<void> {
    assert(!this.closed, 'md bitmap: load after close');
    this.active = false;
    this.stopDaemonTimer();
    await this.whenIdle();
    const ioBytes = mdBitmapDeviceBytes(this.chunkCount, this.device.logicalBlockSizeBytes);
    const disk = new Uint8Array(ioBytes);
    try {
      await this.device.read(this.offsetSectors, disk);
    } catch {
      this.deviceFailed = true;
      return;
    }
    const blank = isBlankMdBitmapSuperblock(disk);
    let stale = blank;
    if (!blank) {
      const sb = decodeMdBitmapSuperblock(disk);
      const why = validateMdBitmapSuperblock(sb) ?? checkMdBitmapGeometry(sb, this.chunkSizeSectors, initialSync === 'resync');
      if (why !== undefined) {
        // create() refused it already; something changed the file since.
        this.deviceFailed = true;
        return;
      }
      this.uuid = sb.uuid;
      // Version 3 (host-endian bits) has the same layout as 4 on a little-endian host; clustered is refused.
      this.version = sb.version;
      this.writeBehind = sb.writeBehind;
      this.sectorsReserved = sb.sectorsReserved;
      this.events = sb.events;
      this.eventsCleared = sb.eventsCleared;
      stale = (sb.state & MD_BITMAP_STATE_STALE) !== 0;
    }
    this.image.fill(0);
    this.image.set(disk.subarray(0, Math.min(disk.byteLength, this.image.byteLength)));
    this.pageAttrs.fill(0);
    this.counters.reset();
    this.needSync = false;
    this.legFlushFailed = false;
    this.allClean = true;
    const setAll = initialSync === 'sync' || (initialSync === 'resync' && stale);
    for (let c = 0; c < this.chunkCount; c++) {
      const bit = 1 << (c & 7);
      const at = MdBitmap.byteOf(c);
      if (initialSync === 'nosync') this.image[at] &= ~bit;
      else if (setAll || (this.image[at] & bit) !== 0) {
        this.image[at] |= bit;
        this.counters.setMemoryBits(c, true);
      }
    }
    if (this.readOnly) {
      // As the file says, in memory only: no event, no page written, no daemon.
      this.durableMarkSeq = this.markSeq;
      return;
    }
    this.events += 1n;
    // md: a stale bitmap is started over with events_cleared = the array's events.
    if (stale) this.eventsCleared = this.events;
    for (let p = 0; p < this.filePageCount; p++) this.pageAttrs[p] = PAGE_DIRTY;
    this.markSeq++;
    this.durableEventsCleared = -1n;
    this.active = true;
    try {
      await this.requestPass();
    } catch {
      // The device failed (status D / F); nothing more is written.
      this.active = false;
    }
  }

  /**
   * md_bitmap_flush, then the superblock (suspend): three daemon passes one after another, so every bit that may
   * be cleared is cleared on disk, then the superblock is written and the device flushed. The daemon stops.
   */
  async flushAll(): Promise<void> {
    this.stopDaemonTimer();
    if (this.readOnly) {
      this.active = false;
      return;
    }
    for (let i = 0; i < FLUSH_DAEMON_PASSES; i++) await this.runDaemon();
    this.active = false;
    this.stopDaemonTimer();
    await this.whenIdle();
    if (this.failed) throw this.failedError();
    this.pageAttrs[0] |= PAGE_NEEDWRITE;
    await this.requestPass();
    try {
      await this.device.flush();
    } catch (err) {
      this.deviceFlushFailed = true;
      throw new DmError('DM_IO', `md bitmap ${this.label}: flushing the bitmap device failed`, { cause: err });
    }
  }

  /** Stops the daemon without writing anything (the next table may own the file already). */
  close(): void {
    this.closed = true;
    this.active = false;
    this.stopDaemonTimer();
  }
}

/**
 * Why a valid superblock cannot serve a mirror with this chunk size, or undefined. dmstate has no cluster support,
 * so a clustered bitmap (version 5) is refused. `checkChunkSize` (a table that trusts the file): the file's chunk
 * size must be the table's region size (md takes the chunk size from the file, a mirror from its table; with
 * `sync`/`nosync` the file is rewritten with the table's).
 */
export function checkMdBitmapGeometry(sb: MdBitmapSuperblock, chunkSizeSectors: Sector, checkChunkSize: boolean): string | undefined {
  if (sb.version === MD_BITMAP_VERSION_CLUSTERED || sb.nodes !== 0) return 'clustered bitmaps (version 5) are not supported';
  if (checkChunkSize && sb.chunkSizeBytes !== chunkSizeSectors * 512) {
    return `the bitmap's chunk size is ${sb.chunkSizeBytes} bytes (${sb.chunkSizeBytes / 512} sectors), the table says ${chunkSizeSectors} sectors`;
  }
  return undefined;
}
