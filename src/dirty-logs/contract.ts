/**
 * The dirty-region log contract (Linux dm-dirty-log.h): a method table per log type, found by name in a registry
 * (src/dirty-logs/log-registry.ts). A mirror keeps one log over its regions; the log answers "is this region in
 * sync on every leg?" and makes "this region may be out of sync" durable BEFORE the mirror issues the data writes.
 *
 * Implementations:
 *   core       dm-log core: in memory only (every activation resyncs everything unless `nosync` says the legs match)
 *   disk       dm-log disk: the kernel's on-disk format (header "MiRr" v2 at sector 0, clean bits from byte 1024)
 *   md-bitmap  an md write-intent bitmap file (superblock v4 + bits, `mdadm -X` reads it), with md's per-chunk
 *              counters, daemon clearing after daemon_sleep, and events/events_cleared for re-add decisions
 *
 * Region numbers are 0-based indexes of REGION-sized (md: chunk-sized) pieces of the mirror. The mirror (not the
 * log) counts writes in flight per region (dm-region-hash); it calls markRegion when a region's count goes 0 → 1
 * and clearRegion when it drops back to 0 after success. A log may defer the on-disk clear (md clears bits after
 * daemon_sleep idle periods); that is its own business as long as the rules below hold.
 *
 * Life cycle (Linux dm-raid1 + dm-log): create() parses nothing and must not write to the log device, because a table
 * being loaded may replace a live table that keeps writing the same log until it is suspended; the mirror calls
 * resume() (when present) before its first I/O and after every suspend, and a persistent log reads (and, for a new
 * or `sync`/`nosync` log, writes) its state there, as the kernel's disk_resume does; suspend() writes what is
 * pending; close() releases without writing (the next table may own the log already).
 *
 * Clean records and the data below them: a region may be recorded clean on the log device only once the data the
 * mirror wrote to it is durable on every leg. Logs that persist clears call `flushLegs` (Linux flush_callback_fn,
 * mirror_flush) before writing a clear; without it a crash could leave the legs different in a region the log
 * calls clean, which no resync would ever repair.
 *
 * Read-only logs (DirtyLogOptions.readOnly): as above, minus every write to the log device.
 *
 * Rules every implementation keeps (the shared conformance suite, src/testing/conformance/dirty-log.ts, checks them):
 * - after markRegion(r) and a resolved flush(), r reads as not clean after a crash and reopen (durable intent);
 * - a region failed with setRegionSync(r, false) (a leg missed a write) is never reported in sync again until a
 *   resync sets it in sync: not by clearRegion, not by a delayed clear, not across a reopen (persistent logs);
 * - while the log is degraded (setDegraded(true)), clearRegion does not clear anything durable;
 * - getResyncWork hands out each region needing resync until setRegionSync(r, true) is called for it.
 *
 * Call order the mirror keeps: markRegion before a region's first write in flight, then flush() before the data is
 * issued; clearRegion after the last write drained with every leg written; after a leg missed a write,
 * setRegionSync(r, false) before the write's region count drops; after a successful resync copy,
 * setRegionSync(r, true) and then clearRegion(r).
 */
import type { BlockDevice } from '../block/contract.js';
import type { Sector } from '../block/units.js';
import type { Clock } from '../core/clock.js';

export interface DirtyLogOptions {
  /** Size of the mirror (every leg), in sectors. */
  readonly targetSizeSectors: Sector;
  /** Region (md: bitmap chunk) size in sectors, a power of two. */
  readonly regionSizeSectors: Sector;
  /**
   * The table's sync argument, as dm-log reads it: 'resync' (none given, Linux DEFAULTSYNC) trusts what a persistent
   * log says and resyncs what it does not know to be in sync (a core log knows nothing: everything); 'sync' (Linux
   * FORCESYNC) forgets the log and resyncs every region; 'nosync' (Linux NOSYNC) declares every region in sync.
   */
  readonly initialSync: 'resync' | 'sync' | 'nosync';
  /** disk / md-bitmap: the device or file holding the log. */
  readonly logDevice?: BlockDevice;
  /** How status and table print the log device (a file path or a mapped device's name); logDevice.name by default. */
  readonly logDeviceLabel?: string;
  /**
   * Makes every write the mirror completed so far durable on every leg (Linux flush_callback_fn). A log calls it
   * before it persists any clear; a rejection means a leg failed: the log then persists no clear in that flush.
   * Absent: the legs need no flush (tests of a log alone).
   */
  readonly flushLegs?: () => Promise<void>;
  /** md-bitmap: seconds between daemon passes (mdadm --delay), default 5. */
  readonly daemonSleepSeconds?: number;
  /**
   * Optional: the `extra` that parseArgs returned, handed back unchanged by the mirror (type-specific table
   * arguments, e.g. md-bitmap's daemon sleep and offset). Absent: the type's defaults.
   */
  readonly extra?: Readonly<Record<string, string>>;
  /** Injected time source (ms), so daemon passes replay exactly in tests. */
  readonly clock: Clock;
  /**
   * Read-only (a mirror pinned by a read-only replayed pool, src/replay/pinned-files.ts): the log reads its device
   * at resume and derives which regions are in sync from it exactly as usual, but never writes or flushes it —
   * not at resume, not for a flush, not at suspend, no daemon pass. The mirror takes no writes in this mode, so
   * nothing is marked; a flush that would have to make a mark durable rejects with DM_IO, clears are dropped.
   * Logs without a device (core) have nothing to write anyway.
   */
  readonly readOnly?: boolean;
}

export interface DirtyLogFlushOptions {
  /** Whether clears should be written too (default true). */
  readonly clears?: boolean;
}

export interface DirtyLogType<TLog = unknown> {
  readonly name: string;
  /** Number of table arguments after the type name is given by the table; parse them (Linux ctr). Throws DmError('DM_TABLE_INVALID'). */
  parseArgs(args: readonly string[]): { regionSizeSectors: Sector; initialSync: 'resync' | 'sync' | 'nosync'; logPath?: string; extra: Record<string, string> };
  /**
   * Opens the log. Writes nothing (see the life cycle above). Refuses a log device that is too small, or a log it
   * can tell is corrupt or foreign, with DM_TABLE_INVALID.
   */
  create(options: DirtyLogOptions): Promise<TLog>;
  regionCount(log: TLog): number;
  /** Region has no write in flight and is in sync (Linux is_clean). */
  isClean(log: TLog, region: number): boolean;
  /** Every leg holds the same data for the region (Linux in_sync). */
  inSync(log: TLog, region: number): boolean;
  /** The region is about to be written (intent). Not durable until flush(). */
  markRegion(log: TLog, region: number): void;
  /** The region's writes drained successfully; the log may clear it (now or later). */
  clearRegion(log: TLog, region: number): void;
  /**
   * Makes every markRegion so far durable (md: bitmap unplug; dm-log disk: write the clean bits), and may persist
   * clears (after `flushLegs`). Concurrent calls may share one device write (group commit), but a call resolves
   * only once a write that started after it was made has completed. Rejects with DmError('DM_IO') when the log
   * device failed (status shows it); the marks are then not durable.
   *
   * `options.clears: false` (the mirror's write path, which only needs its marks durable): the log may leave
   * clears for a later flush and resolve at once when every mark is durable already. Optional for implementations
   * (ignoring it is correct: it only allows less work).
   */
  flush(log: TLog, options?: DirtyLogFlushOptions): Promise<void>;
  /**
   * A region needing resync (not in sync) that is not handed out already, or undefined when there is none. A
   * region handed out stays so until setRegionSync() is called for it; after setRegionSync(r, false) it may be
   * handed out again.
   */
  getResyncWork(log: TLog): number | undefined;
  /** Records the result of a resync (true) or a failed leg write in the region (false). */
  setRegionSync(log: TLog, region: number, inSync: boolean): void;
  /** Regions in sync (status `<sync_count>/<nr_regions>`). */
  syncCount(log: TLog): number;
  /** While degraded no bit is cleared (md: bits are never cleared while degraded). */
  setDegraded(log: TLog, degraded: boolean): void;
  /** Status fields after the health characters, as the kernel prints them (`1 core`, `3 disk 254:3 A`, ...). */
  status(log: TLog): string;
  /** Table fields for `dmsetup table` (type name and its arguments). */
  table(log: TLog): string;
  /** Suspend: write everything pending (md: superblock and pages), stop the daemon. */
  suspend?(log: TLog): Promise<void>;
  /** Resume: re-read what the log says and restart the daemon. */
  resume?(log: TLog): Promise<void>;
  close(log: TLog): Promise<void>;
}

// eslint-disable-next-line @typescript-eslint/no-explicit-any -- a registry holds logs of every instance type
export type AnyDirtyLogType = DirtyLogType<any>;
