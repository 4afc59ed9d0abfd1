/**
 * The exception store contract (Linux dm-exception-store.h): a method table per store type, found by name in a
 * registry. A store owns the COW device's metadata: which origin chunk (old) is kept in which COW chunk (new).
 * The snapshot target owns the in-core table (src/stores/exception-table.ts) and the copying; the store allocates
 * COW chunks, makes commits durable, and answers merge questions.
 *
 * Durability rule (both stores that persist): when commitException's callback runs with success, the exception
 * and the data it points at survive a crash (persistent: the data chunk was flushed before the record was made
 * durable). Callbacks run in commit (allocation) order.
 */
import type { BlockDevice } from '../block/contract.js';
import type { Chunk, Sector } from '../block/units.js';
import { bytesToSectors, sectors } from '../block/units.js';

export interface ExceptionStoreUsage {
  readonly totalSectors: Sector;
  readonly sectorsAllocated: Sector;
  readonly metadataSectors: Sector;
}

/**
 * Durable side log the persistent store writes its commits to before the COW areas (the pool's LevelDB).
 * `index` is the record's position in the on-disk area sequence (area × exceptions-per-area + slot): consecutive
 * and increasing in append order. Every method's promise resolves only once its effect is durable (trim and clear
 * included: a merge rewrites slots a stale record would otherwise bring back).
 */
export interface ExceptionWal {
  /** Makes `records` durable in one synced batch together with an event; resolves when synced. */
  append(records: ReadonlyArray<{ index: number; oldChunk: Chunk; newChunk: Chunk }>): Promise<void>;
  /** Every record kept (not trimmed or cleared), in index order (recovery). */
  read(): Promise<Array<{ index: number; oldChunk: Chunk; newChunk: Chunk }>>;
  /** Drops records with index < beforeIndex (after a checkpoint wrote them to the COW). */
  trim(beforeIndex: number): Promise<void>;
  /** Drops everything (the COW was reformatted or invalidated). */
  clear(): Promise<void>;
  /**
   * Records that a merge cleared the newest `count` records (called once the metadata area write that cleared them
   * succeeded; the pool's event log rebuilds the COW's state from it). Optional.
   */
  merged?(count: number): Promise<void>;
  /**
   * Set in a pool written by `dmstate replay --into` (read-only): read() is the COW's complete exception list as of
   * the replayed point, to be used instead of the COW's own metadata, and nothing may be written.
   */
  readonly pinned?: { readonly valid: boolean; readonly overflowed: boolean; readonly chunkSizeSectors: number };
}

export interface ExceptionStoreOptions {
  readonly cow: BlockDevice;
  /** From the table; 0 means the default (or the header's on a persistent COW). */
  readonly chunkSizeSectors: Sector;
  /** PO: a full COW reports Overflow instead of Invalid. */
  readonly overflow: boolean;
  /** Where a persistent store keeps its write-ahead log; none = commit to the COW areas directly. */
  readonly wal?: ExceptionWal;
  /** Write the COW areas after this many exceptions committed through the WAL (checkpoint). Default 4096. */
  readonly checkpointExceptionsMax?: number;
  /**
   * Open without ever writing the COW (or the WAL): a persistent store refuses a COW with no header instead of
   * formatting it, and prepareException always reports full. Default false.
   */
  readonly readOnly?: boolean;
}

export interface ReadMetadataResult {
  /** false: the header says invalid (or an I/O error invalidated it); no exceptions were reported. */
  readonly valid: boolean;
  /** The chunk size in force (from the header when there is one). */
  readonly chunkSizeSectors: Sector;
}

/** For merge: a linear run of committed exceptions, (lastOld − i, lastNew − i) for i < count, within one area. */
export interface MergeRun {
  /** Number of chunks in the linear run ending at the last committed exception (0: nothing left). */
  readonly count: number;
  readonly lastOldChunk: Chunk;
  readonly lastNewChunk: Chunk;
}

/** How much one merge batch (the runs copied between two commits) may take. */
export interface MergeBatchLimits {
  /** Chunks in all; the first run is returned whole even when it is longer. */
  readonly chunksMax: number;
  readonly runsMax: number;
}

export interface ExceptionStoreType<TStore = unknown> {
  readonly name: string;
  /** Opens the store. Throws DmError('DM_TABLE_INVALID', reason) for a corrupt/foreign header or bad chunk size; writes nothing then. */
  create(options: ExceptionStoreOptions): Promise<TStore>;
  /**
   * Reads the metadata, calling onException for every committed exception (any order, duplicates impossible).
   * Called once, before any other slot but close. A new persistent COW is formatted here. May refuse with
   * DmError('DM_TABLE_INVALID') (a WAL that disagrees with the COW, a corrupt area), writing nothing then.
   */
  readMetadata(store: TStore, onException: (oldChunk: Chunk, newChunk: Chunk) => void): Promise<ReadMetadataResult>;
  /** Allocates the COW chunk for a new exception, or returns -1 when the COW is full (or the store read-only). Synchronous. */
  prepareException(store: TStore): Chunk | -1;
  /**
   * Commits an exception whose data has been copied into newChunk. `done(success)` runs once the commit is
   * durable (batched with other commits), in allocation order.
   */
  commitException(store: TStore, oldChunk: Chunk, newChunk: Chunk, done: (success: boolean) => void): void;
  usage(store: TStore): ExceptionStoreUsage;
  /** Marks the store invalid on disk (header valid = 0); later commits fail. */
  drop(store: TStore): Promise<void>;
  /** Brings the on-disk metadata up to date (persistent: writes the COW areas from the WAL state). */
  checkpoint?(store: TStore): Promise<void>;
  /**
   * Optional (persistent only; Linux prepare_merge): the linear run at the newest committed exception, within its
   * area; an empty current area first makes the previous one current (the status shows it). count 0: none left.
   */
  prepareMerge?(store: TStore): MergeRun;
  /**
   * Optional (persistent only): the runs prepareMerge would return one after the other if each were committed in
   * turn — newest first, walking back over metadata areas — up to `limits` (at least one run while any is left;
   * [] when none is). Steps back like prepareMerge; changes nothing else. May read older areas from the COW.
   * `belowNewest`: start below the newest `belowNewest` records — a batch copied whose commitMerge is still to
   * come (the stepping back is the same: an empty current area means every record left is below it).
   */
  prepareMergeRuns?(store: TStore, limits: MergeBatchLimits, belowNewest?: number): Promise<MergeRun[]>;
  /**
   * Optional (persistent only; Linux commit_merge): forgets the newest n exceptions durably; n may span runs and
   * metadata areas (a batch from prepareMergeRuns). For each record, from the newest down, calls clearInCore(old,
   * new) first (lock-step with the in-core table, seed 000), then clears the record; every changed area is written
   * and the COW flushed before the promise resolves. The caller has made the merged data durable on the origin
   * first and holds the write interlock over the n chunks until then (a write to them, even once cleared in core,
   * must wait). `onCleared`, when all n are cleared and their area writes queued: from then on prepareMerge,
   * prepareMergeRuns and usage see the state after this commit (the next batch may be prepared and copied while
   * the writes become durable; its commit's writes follow these). Precondition: no commit waiting.
   * Rejects with DmError: DM_INVALID_ARGUMENT when clearInCore refused — the whole runs cleared before the refused
   * record's run are committed (as if merged one run per step), that run and the older ones stay on disk (the
   * refused run stays partly cleared in core, as in Linux); DM_IO when an area write failed (the merge must stop,
   * later merge calls reject too; a reload resumes from the COW).
   */
  commitMerge?(store: TStore, n: number, clearInCore: (oldChunk: Chunk, newChunk: Chunk) => boolean, onCleared?: () => void): Promise<void>;
  /** Table status extras (`P 8` / `PO 8` / `N 8`). */
  readonly tableCode: (store: TStore) => string;
  close(store: TStore): Promise<void>;
}

// eslint-disable-next-line @typescript-eslint/no-explicit-any -- a registry holds stores of every instance type
export type AnyExceptionStoreType = ExceptionStoreType<any>;

/** The chunk size a table's 0 stands for, at least (DM_CHUNK_SIZE_DEFAULT_SECTORS, 16 KiB). */
export const CHUNK_SIZE_DEFAULT_SECTORS = sectors(32);
/** Linux refuses chunk sizes over INT_MAX >> SECTOR_SHIFT sectors ("Chunk size is too high"). */
export const CHUNK_SIZE_SECTORS_MAX = sectors(0x7fffffff >> 9);

/** Table chunk size 0: max(32 sectors, the COW's logical block size). */
export const defaultChunkSizeSectors = (cow: BlockDevice): Sector =>
  sectors(Math.max(CHUNK_SIZE_DEFAULT_SECTORS, bytesToSectors(cow.logicalBlockSizeBytes)));

/**
 * Linux dm_exception_store_set_chunk_size: a power of two, a multiple of the COW's logical block size, not too
 * high. Returns the kernel's reason for a bad size, or undefined. (The origin's block size is the target's check.)
 */
export function validateChunkSize(chunkSizeSectors: number, cow: BlockDevice): string | undefined {
  if (!Number.isSafeInteger(chunkSizeSectors) || chunkSizeSectors <= 0 || (chunkSizeSectors & (chunkSizeSectors - 1)) !== 0) {
    return 'Chunk size is not a power of 2';
  }
  if (chunkSizeSectors % bytesToSectors(cow.logicalBlockSizeBytes) !== 0) return 'Chunk size is not a multiple of device blocksize';
  if (chunkSizeSectors > CHUNK_SIZE_SECTORS_MAX) return 'Chunk size is too high';
  return undefined;
}
