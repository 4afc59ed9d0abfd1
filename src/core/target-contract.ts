/**
 * The target contract: a method table per target type (Linux struct target_type). Targets are found by name in
 * the registry (src/core/target-registry.ts). Optional slots are left out; callers check them first.
 */
import type { BlockDevice, BlockExtent } from '../block/contract.js';
import type { Sector } from '../block/units.js';
import type { Clock } from './clock.js';
import type { Rng } from './rng.js';
import type { Bio, MapResult } from './bio.js';
import type { EventLog } from '../log/event-log.js';
import type { ExceptionWal } from '../stores/contract.js';

/** A device a table line names: a file, or another mapped device. */
export interface DeviceRef {
  readonly device: BlockDevice;
  /** How `table` prints it: the absolute file path or the mapped device's name. */
  readonly label: string;
}

/** What ctr() gets besides its arguments. */
export interface TargetContext {
  readonly mappedDeviceName: string;
  readonly beginSector: Sector;
  readonly lengthSectors: Sector;
  /** Opens a device named in a table (file path or mapped device name); released by the core after dtr(). */
  openDevice(spec: string): Promise<DeviceRef>;
  /** Completes a bio the target held (MAP_HELD) with success or an error. */
  endBio(bio: Bio, error?: unknown): void;
  /** Sends a held bio back through map(). */
  retryBio(bio: Bio): void;
  /**
   * Splits bios so none crosses a multiple of this many sectors from the target's start (Linux ti->max_io_len);
   * 0 = no limit. Targets set it in ctr or resume (snapshot: its chunk size; origin: the smallest chunk size).
   */
  setMaxIoSectors(sectors: number): void;
  /** A per-engine object shared by all targets under `key` (origin registry, kcopyd client, ...). */
  shared<T>(key: string, create: () => T): T;
  /** The write-ahead log of exception records for a COW device, in the pool's LevelDB. */
  walFor(cow: DeviceRef): ExceptionWal;
  /** Raises a table event on the mapped device (Linux dm_table_event: event_nr + 1, e.g. a snapshot became invalid). */
  tableEvent(): void;
  /** Whether the mapped device this target belongs to is suspended now (Linux dm_suspended(ti)). */
  isSuspended(): boolean;
  readonly clock: Clock;
  readonly rng: Rng;
  readonly log: EventLog;
}

export interface TargetType<TInstance = unknown> {
  readonly name: string;
  readonly version: readonly [number, number, number];
  /** Minimum and maximum argument counts, checked before ctr (the kernel's "Invalid argument count"). */
  readonly argCountMin: number;
  readonly argCountMax: number;
  /** Builds an instance. Throws DmError('DM_TABLE_INVALID', reason) on bad arguments, releasing what it took. */
  ctr(args: readonly string[], ctx: TargetContext): Promise<TInstance>;
  /** Releases the instance (devices opened through ctx are released by the core). */
  dtr?(instance: TInstance): Promise<void>;
  /**
   * Maps a bio whose sector is relative to the mapped device; bio.sector - beginSector is the offset in the
   * target. Synchronous: the hot path. MAP_REMAPPED must set bio.remapDevice and bio.remapSector.
   */
  map(instance: TInstance, bio: Bio, ctx: TargetContext): MapResult;
  /**
   * Allocation of [offsetSectors, offsetSectors + lengthSectors) of the target (offsets relative to the target's
   * start), as extents in order; for NBD base:allocation. Without this slot the range is reported as data.
   */
  blockStatus?(instance: TInstance, offsetSectors: Sector, lengthSectors: Sector): Promise<BlockExtent[]>;
  /** `dmsetup status` text after the target name ('' for none). */
  status(instance: TInstance): string;
  /** `dmsetup table` text after the target name. */
  table(instance: TInstance): string;
  /** Handles `dmsetup message`; returns text to print (may be ''). */
  message?(instance: TInstance, args: readonly string[]): Promise<string>;
  /** `message DEV SECTOR mark NAME` reaches message() too, besides the event log's mark (log-writes logs marks). */
  readonly takesMarks?: boolean;
  /** Called after the device's in-flight I/O drained on suspend. */
  postsuspend?(instance: TInstance): Promise<void>;
  /**
   * Called before resume() when a suspended device resumes, for every target of its (possibly just swapped in)
   * live table (Linux preresume). Throwing a DmError refuses the resume: as in the kernel's do_resume, the device
   * stays suspended, with the table that was swapped in live and no inactive table.
   */
  preresume?(instance: TInstance): Promise<void>;
  /** Called when the table becomes (or stays) live on resume. */
  resume?(instance: TInstance): Promise<void>;
}

// eslint-disable-next-line @typescript-eslint/no-explicit-any -- a registry holds targets of every instance type
export type AnyTargetType = TargetType<any>;
