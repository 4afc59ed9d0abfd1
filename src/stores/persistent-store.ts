/**
 * The persistent exception store (Linux dm-snap-persistent.c, table codes `P` and `PO`), byte for byte the kernel's
 * on-disk format, so a COW written here loads in Linux and the other way round.
 *
 * COW layout (all integers little-endian; chunk = chunk_size sectors):
 *   chunk 0            header: le32 magic 0x70416e53 ("SnAp"), le32 valid, le32 version 1, le32 chunk_size; rest 0
 *   chunk 1 + k×(E+1)  metadata area k: E = chunk_size × 512 / 16 records {le64 old_chunk, le64 new_chunk};
 *                      the first record with new_chunk == 0 ends the list (chunk 0 is the header, never data)
 *   the E chunks after each area: data chunks
 *
 * Allocation: next_free starts at 2 and skips metadata chunks; ENOSPC when (next_free + 1) × chunk_size > COW size.
 * Usage: sectors_allocated = next_free × chunk_size, metadata_sectors = (current_area + 2) × chunk_size.
 *
 * Loading (create + readMetadata): create() reads and checks the header and writes nothing; a refused load throws
 * DmError('DM_TABLE_INVALID') before any write. magic 0 means a new store, formatted by readMetadata, but only on a
 * writable store whose chunk 0 is all zeroes (a device that holds data is never formatted; Linux would). Another
 * magic: "Invalid or corrupt snapshot". The header's chunk size wins over the table's. version ≠ 1: refused.
 * valid = 0: loads invalid, no exceptions. Areas are read in order while full; records may be in any order and
 * chunks may be leaked (next_free = 1 + the highest new_chunk seen, then skip a metadata chunk).
 *
 * Commit, without a WAL (Linux's batching): commitException writes the record into the in-memory current area.
 * The group of commits waiting is written when no prepared exception is still uncommitted, when the area is full,
 * or at the latest on the next event-loop turn (so an exception the caller abandons cannot stall the others):
 * (if the area is full: zero the NEXT area first, so the end marker survives) → flush the COW (the data before the
 * metadata that points at it) → write the area with FUA → callbacks in commit order with the store's validity. A
 * failed write makes the store invalid; callbacks then get false. Group jobs run one at a time, in order.
 *
 * Commit, with a WAL (options.wal): the group is made durable by flushing the COW (data) then ONE wal.append of its
 * records, each with its index = its position in the area sequence (area × E + slot); the COW areas are not
 * written. checkpoint() (and the store itself every checkpointExceptionsMax WAL-committed exceptions, and close())
 * writes every area changed since the last checkpoint with FUA, from the highest down, so an area is only written
 * once the one after it (with its end marker, zeroes when the full area is the last one) is on disk; then
 * wal.trim(index). Only records whose WAL append completed are written; later slots go to disk as zeroes.
 *
 * Loading with a WAL: the areas from the COW, then the WAL records beyond them. A WAL record whose slot is on disk
 * must hold the same values (a checkpoint that crashed before its trim); DIFFERENT values, a gap between the COW's
 * records and the WAL's, or WAL records for a COW with no header mean that something else wrote the COW since the
 * last checkpoint (the kernel, another pool, a restore from backup): the load is refused with DM_TABLE_INVALID
 * and a message asking to check the COW, writing nothing. Which side is right cannot be known here.
 *
 * Merge (snapshot-merge): prepareMerge finds the linear run ending at the newest record (stepping back an area
 * when the current one is empty), commitMerge(n) clears the newest n records, each in lock-step with the in-core
 * table (clearInCore(old, new) first, then the record; seed 000), writes the area with PREFLUSH+FUA, lowers the
 * committed count and recomputes next_free. With a WAL, commitMerge first checkpoints and empties the WAL
 * (durably: the contract's clear resolves when durable) and then writes the area directly, exactly as without one:
 * the WAL never holds a record for a slot a merge has cleared, so recovery cannot bring a merged exception back.
 *
 * drop(): header rewritten with valid = 0 (FUA), the WAL cleared.
 */
import { assert } from '../core/assert.js';
import { DmError } from '../core/errors.js';
import type { BlockDevice } from '../block/contract.js';
import type { Chunk, Sector } from '../block/units.js';
import { chunkToSector, chunks, sectors, sectorsToBytes } from '../block/units.js';
import type {
  ExceptionStoreOptions,
  ExceptionStoreType,
  ExceptionStoreUsage,
  ExceptionWal,
  MergeBatchLimits,
  MergeRun,
  ReadMetadataResult,
} from './contract.js';
import { defaultChunkSizeSectors, validateChunkSize } from './contract.js';

/** "SnAp" read as le32. */
export const SNAP_MAGIC = 0x70416e53;
export const SNAPSHOT_DISK_VERSION = 1;
/** One on-disk record: le64 old_chunk, le64 new_chunk. */
export const DISK_EXCEPTION_SIZE_BYTES = 16;
/** Chunks before area 0 (the header). */
export const SNAPSHOT_HEADER_CHUNKS = 1;
export const CHECKPOINT_EXCEPTIONS_MAX_DEFAULT = 4096;
/** Chunk numbers above this cannot be numbers here (a COW never has 2^53 chunks): such a record is corrupt. */
const CHUNK_NUMBER_MAX = Number.MAX_SAFE_INTEGER;
const TWO_POW_32 = 0x1_0000_0000;
const RESOLVED: Promise<void> = Promise.resolve();

interface PendingCommit {
  readonly index: number;
  readonly oldChunk: Chunk;
  readonly newChunk: Chunk;
  readonly done: (success: boolean) => void;
}

/** The store's state. Fields are public for tests and checkers; only this module's functions change them. */
export class PersistentStore {
  readonly cow: BlockDevice;
  readonly overflow: boolean;
  readonly wal: ExceptionWal | undefined;
  readonly readOnly: boolean;
  readonly checkpointExceptionsMax: number;
  /** The chunk size in force: the header's on an existing COW, else the table's (or the default). */
  readonly chunkSizeSectors: Sector;
  /** E: records per metadata area. */
  readonly exceptionsPerArea: number;
  /** chunk 0 had magic 0: readMetadata formats the COW. */
  readonly isNew: boolean;
  /** The header says valid and no write has failed since. */
  valid: boolean;
  loaded = false;
  closed = false;
  currentArea = 0;
  /** Records in the current area (committed by the caller, not necessarily durable yet). */
  currentCommitted = 0;
  /** The next chunk prepareException hands out. */
  nextFree: number = SNAPSHOT_HEADER_CHUNKS + 1;
  /** Prepared exceptions not yet committed (Linux pending_count). */
  preparedCount = 0;
  /**
   * In-memory area images by area index: always the current area and the one before it (a merge steps back into
   * it); with a WAL also every area from the checkpoint's on. The buffer of the current area is Linux's ps->area.
   */
  readonly areas = new Map<number, Buffer>();
  /** Commits not yet handed to a group job, in commit order (at most E: a full area starts a job). */
  group: PendingCommit[] = [];
  gatherScheduled = false;
  /** Records [0, durableIndex) are durable (area written, or WAL appended). */
  durableIndex = 0;
  /** Records [0, checkpointIndex) are in the COW's areas. Without a WAL, equal to durableIndex. */
  checkpointIndex = 0;
  /** The WAL may hold records below checkpointIndex (from before a load): the next checkpoint trims. */
  walStale = false;
  checkpointQueued = false;
  /** WAL mode: a group job is queued and not started yet; it takes every commit waiting when it starts. */
  walJobQueued = false;
  /**
   * Settles when every WAL append (WAL mode, see walGroupJob) and every merge commit's area writes (see
   * persistentCommitMerge) started so far have completed.
   */
  appendTail: Promise<void> = RESOLVED;
  /** A merge commit's area writes failed: the in-memory areas are ahead of the COW, no merge commit may follow. */
  mergeWriteError: Error | undefined = undefined;
  /** The job chain: group writes, checkpoints and merges run one at a time, in order. */
  tail: Promise<void> = RESOLVED;
  readonly zeroArea: Buffer;

  constructor(options: ExceptionStoreOptions, chunkSizeSectors: Sector, isNew: boolean, valid: boolean) {
    this.cow = options.cow;
    this.overflow = options.overflow;
    this.wal = options.wal;
    this.readOnly = options.readOnly === true;
    this.checkpointExceptionsMax = options.checkpointExceptionsMax ?? CHECKPOINT_EXCEPTIONS_MAX_DEFAULT;
    this.chunkSizeSectors = chunkSizeSectors;
    this.exceptionsPerArea = sectorsToBytes(chunkSizeSectors) / DISK_EXCEPTION_SIZE_BYTES;
    this.isNew = isNew;
    this.valid = valid;
    this.zeroArea = Buffer.alloc(sectorsToBytes(chunkSizeSectors));
  }

  get chunkSizeBytes(): number {
    return sectorsToBytes(this.chunkSizeSectors);
  }

  /** Records committed so far (the index the next commit gets). */
  get committedIndex(): number {
    return this.currentArea * this.exceptionsPerArea + this.currentCommitted;
  }

  /** Chunk of metadata area `area` (Linux area_location). */
  areaLocation(area: number): Chunk {
    return chunks(SNAPSHOT_HEADER_CHUNKS + (this.exceptionsPerArea + 1) * area);
  }

  /** Whether `chunk` is the header or a metadata area (never handed out). */
  isMetadataChunk(chunk: number): boolean {
    return chunk < SNAPSHOT_HEADER_CHUNKS || chunk % (this.exceptionsPerArea + 1) === SNAPSHOT_HEADER_CHUNKS;
  }
}

// ---- encoding -------------------------------------------------------------------------------------------------

/** The header chunk's bytes (chunkSizeBytes long, zero after the 16 header bytes). */
export function encodeHeader(chunkSizeSectors: Sector, valid: boolean): Buffer {
  const buf = Buffer.alloc(sectorsToBytes(chunkSizeSectors));
  buf.writeUInt32LE(SNAP_MAGIC, 0);
  buf.writeUInt32LE(valid ? 1 : 0, 4);
  buf.writeUInt32LE(SNAPSHOT_DISK_VERSION, 8);
  buf.writeUInt32LE(chunkSizeSectors, 12);
  return buf;
}

function readLe64(buf: Buffer, offset: number): number {
  // Up to 2^53 exactly; larger values come back > CHUNK_NUMBER_MAX (inexact) and are refused by the caller.
  return buf.readUInt32LE(offset) + buf.readUInt32LE(offset + 4) * TWO_POW_32;
}

function writeLe64(buf: Buffer, offset: number, value: number): void {
  assert(Number.isSafeInteger(value) && value >= 0, `persistent store: bad le64 value ${value}`);
  buf.writeUInt32LE(value % TWO_POW_32, offset);
  buf.writeUInt32LE(Math.floor(value / TWO_POW_32), offset + 4);
}

export function readRecord(area: Buffer, slot: number): { oldChunk: number; newChunk: number } {
  const at = slot * DISK_EXCEPTION_SIZE_BYTES;
  return { oldChunk: readLe64(area, at), newChunk: readLe64(area, at + 8) };
}

export function writeRecord(area: Buffer, slot: number, oldChunk: number, newChunk: number): void {
  const at = slot * DISK_EXCEPTION_SIZE_BYTES;
  writeLe64(area, at, oldChunk);
  writeLe64(area, at + 8, newChunk);
}

// ---- I/O helpers ----------------------------------------------------------------------------------------------

function readChunk(store: PersistentStore, chunk: number, buf: Buffer): Promise<void> {
  return store.cow.read(chunkToSector(chunks(chunk), store.chunkSizeSectors), buf);
}

function writeChunk(store: PersistentStore, chunk: number, buf: Buffer, fua: boolean): Promise<void> {
  assert(!store.readOnly, 'persistent store: write on a read-only store');
  return store.cow.write(chunkToSector(chunks(chunk), store.chunkSizeSectors), buf, { fua });
}

const refuse = (reason: string): DmError => new DmError('DM_TABLE_INVALID', reason);

/** Runs `job` after every job enqueued before it. The returned promise is the job's own (it may reject). */
function enqueue(store: PersistentStore, job: () => Promise<void>): Promise<void> {
  const p = store.tail.then(job);
  store.tail = p.catch(() => undefined);
  return p;
}

/** A callback that throws is a bug in the caller: crash like a failed assertion, but keep the chain going. */
function rethrowLater(e: unknown): void {
  queueMicrotask(() => {
    throw e;
  });
}

// ---- create / readMetadata ------------------------------------------------------------------------------------

async function persistentCreate(options: ExceptionStoreOptions): Promise<PersistentStore> {
  const { cow } = options;
  const max = options.checkpointExceptionsMax;
  if (max !== undefined && !(Number.isSafeInteger(max) && max >= 1)) {
    throw new DmError('DM_INVALID_ARGUMENT', `checkpointExceptionsMax must be a positive integer, got ${max}`);
  }
  // The table's chunk size is checked even when a header will override it (Linux set_chunk_size in the ctr).
  if (options.chunkSizeSectors !== 0) {
    const reason = validateChunkSize(options.chunkSizeSectors, cow);
    if (reason) throw refuse(reason);
  }
  const tableChunkSizeSectors = options.chunkSizeSectors !== 0 ? options.chunkSizeSectors : defaultChunkSizeSectors(cow);
  const blockBytes = cow.logicalBlockSizeBytes;
  if (sectorsToBytes(cow.sizeSectors) < blockBytes) throw refuse(`COW device ${cow.name} is too small to hold a snapshot header`);
  const first = Buffer.alloc(blockBytes);
  await cow.read(sectors(0), first);
  const magic = first.readUInt32LE(0);
  const fits = (chunkSizeSectors: number): boolean => 2 * chunkSizeSectors <= cow.sizeSectors;

  if (magic === 0) {
    if (!fits(tableChunkSizeSectors)) {
      throw refuse(`COW device ${cow.name} (${cow.sizeSectors} sectors) cannot hold the header and one metadata area of ${tableChunkSizeSectors}-sector chunks`);
    }
    if (options.readOnly === true) throw refuse(`COW device ${cow.name} has no snapshot header and the store is read-only: nothing to load`);
    const chunk0 = Buffer.alloc(sectorsToBytes(tableChunkSizeSectors));
    await cow.read(sectors(0), chunk0);
    if (!chunk0.every((b) => b === 0)) {
      throw refuse(`COW device ${cow.name} has no snapshot header but its chunk 0 is not zeroed: refusing to format a device that holds data (zero its first ${chunk0.byteLength} bytes to use it as a new COW)`);
    }
    return new PersistentStore(options, tableChunkSizeSectors, true, true);
  }
  if (magic !== SNAP_MAGIC) throw refuse('Invalid or corrupt snapshot');
  const valid = first.readUInt32LE(4) !== 0;
  const version = first.readUInt32LE(8);
  const headerChunkSizeSectors = first.readUInt32LE(12);
  const reason = validateChunkSize(headerChunkSizeSectors, cow);
  if (reason) throw refuse(`invalid on-disk chunk size ${headerChunkSizeSectors}: ${reason}.`);
  if (version !== SNAPSHOT_DISK_VERSION) throw refuse(`unable to handle snapshot disk version ${version}`);
  if (!fits(headerChunkSizeSectors)) {
    throw refuse(`COW device ${cow.name} (${cow.sizeSectors} sectors) is too small for its header's chunk size of ${headerChunkSizeSectors} sectors`);
  }
  return new PersistentStore(options, sectors(headerChunkSizeSectors), false, valid);
}

/** A growable list of (old, new) pairs (two numbers per record, no object per record). */
class RecordList {
  data = new Float64Array(2 * 1024);
  length = 0;
  push(oldChunk: number, newChunk: number): void {
    if (2 * this.length === this.data.length) {
      const grown = new Float64Array(this.data.length * 2);
      grown.set(this.data);
      this.data = grown;
    }
    this.data[2 * this.length] = oldChunk;
    this.data[2 * this.length + 1] = newChunk;
    this.length++;
  }
  oldAt(i: number): number {
    return this.data[2 * i];
  }
  newAt(i: number): number {
    return this.data[2 * i + 1];
  }
}

async function formatNewStore(store: PersistentStore): Promise<void> {
  const { wal } = store;
  if (wal) {
    const kept = await wal.read();
    if (kept.length > 0) {
      throw refuse(
        `COW device ${store.cow.name} has no snapshot header but the WAL holds ${kept.length} committed exceptions: ` +
          'the COW was replaced or wiped since; check the COW (restore it, or clear the WAL to start a new snapshot)',
      );
    }
  }
  // Area 0 is zeroed and durable before the header names the device a snapshot: a crash in between leaves chunk 0
  // zeroed (formatted again on the next load), never a header over a garbage area 0.
  await writeChunk(store, store.areaLocation(0), store.zeroArea, false);
  await store.cow.flush();
  await writeChunk(store, 0, encodeHeader(store.chunkSizeSectors, true), true);
  store.areas.set(0, Buffer.alloc(store.chunkSizeBytes));
}

async function persistentReadMetadata(store: PersistentStore, onException: (oldChunk: Chunk, newChunk: Chunk) => void): Promise<ReadMetadataResult> {
  assert(!store.loaded && !store.closed, 'persistent store: readMetadata must be called once, before anything else');
  const result: ReadMetadataResult = { valid: store.valid, chunkSizeSectors: store.chunkSizeSectors };
  if (store.isNew) {
    await formatNewStore(store);
    store.loaded = true;
    return result;
  }
  if (!store.valid) {
    // Nothing is read; an (empty) current area keeps later calls well-defined: their commits fail.
    store.areas.set(0, Buffer.alloc(store.chunkSizeBytes));
    store.loaded = true;
    return result;
  }
  const epa = store.exceptionsPerArea;
  const walRecords = store.wal ? await store.wal.read() : [];
  const records = new RecordList();
  let nextFree = store.nextFree;
  const noteRecord = (oldChunk: number, newChunk: number, where: string): void => {
    if (!(oldChunk <= CHUNK_NUMBER_MAX && newChunk <= CHUNK_NUMBER_MAX)) throw refuse(`Invalid or corrupt snapshot: ${where} holds a chunk number over 2^53`);
    records.push(oldChunk, newChunk);
    if (nextFree <= newChunk) nextFree = newChunk + 1;
  };

  // The areas on the COW: read while full; the first partly filled one is the current area.
  let area = 0;
  let areaBuf = Buffer.alloc(store.chunkSizeBytes);
  let previousBuf: Buffer | undefined;
  for (;;) {
    const location = store.areaLocation(area);
    if (!areaFits(store, area)) {
      // The area after the last full one is past the end of the COW (Linux gets an I/O error here).
      throw new DmError('DM_IO', `COW device ${store.cow.name}: metadata area ${area} at chunk ${location} is past the end of the device`);
    }
    await readChunk(store, location, areaBuf);
    let count = 0;
    for (; count < epa; count++) {
      const r = readRecord(areaBuf, count);
      if (r.newChunk === 0) break;
      noteRecord(r.oldChunk, r.newChunk, `area ${area} slot ${count}`);
    }
    if (count < epa) break;
    previousBuf = areaBuf;
    areaBuf = Buffer.alloc(store.chunkSizeBytes);
    area++;
  }
  const diskCount = records.length;

  // The WAL's tail beyond them (checked against the slots the COW already has).
  let expectIndex = -1;
  for (const w of walRecords) {
    if (!(Number.isSafeInteger(w.index) && w.index >= 0 && Number.isSafeInteger(w.oldChunk) && w.oldChunk >= 0 && Number.isSafeInteger(w.newChunk) && w.newChunk > 0)) {
      throw refuse(`the WAL of COW device ${store.cow.name} holds a malformed record (#${w.index}: ${w.oldChunk} -> ${w.newChunk})`);
    }
    if (expectIndex >= 0 && w.index !== expectIndex) throw refuse(`the WAL of COW device ${store.cow.name} is not contiguous (record #${w.index} after #${expectIndex - 1}); check the WAL`);
    expectIndex = w.index + 1;
    if (w.index < diskCount) {
      if (records.oldAt(w.index) !== w.oldChunk || records.newAt(w.index) !== w.newChunk) {
        throw refuse(
          `COW device ${store.cow.name} does not match its WAL: slot ${w.index} holds ${records.oldAt(w.index)} -> ${records.newAt(w.index)} ` +
            `but the WAL committed ${w.oldChunk} -> ${w.newChunk}. Something else wrote the COW since the last checkpoint ` +
            '(the kernel, another pool, a restore); check the COW before loading it here',
        );
      }
    } else if (w.index !== records.length) {
      throw refuse(
        `COW device ${store.cow.name} holds ${diskCount} exceptions but its WAL continues at #${w.index}: exceptions were removed from the COW ` +
          'since the last checkpoint (a merge or a restore elsewhere?); check the COW before loading it here',
      );
    } else {
      noteRecord(w.oldChunk, w.newChunk, `WAL record #${w.index}`);
    }
  }

  // Duplicates are impossible on a COW this store or Linux wrote: one means corruption, refuse it.
  const olds = new Float64Array(records.length);
  for (let i = 0; i < records.length; i++) olds[i] = records.oldAt(i);
  olds.sort();
  for (let i = 1; i < olds.length; i++) {
    if (olds[i] === olds[i - 1]) throw refuse(`Invalid or corrupt snapshot: origin chunk ${olds[i]} has two exceptions`);
  }

  // The in-memory areas: the current one, the one before it, and (WAL) those the tail reaches.
  const total = records.length;
  const lastReadArea = area;
  store.currentArea = Math.floor(total / epa);
  store.currentCommitted = total % epa;
  if (lastReadArea > 0 && previousBuf) store.areas.set(lastReadArea - 1, previousBuf);
  store.areas.set(lastReadArea, areaBuf);
  for (let a = lastReadArea + 1; a <= store.currentArea; a++) store.areas.set(a, Buffer.alloc(store.chunkSizeBytes));
  for (let i = diskCount; i < total; i++) {
    const a = Math.floor(i / epa);
    writeRecord(store.areas.get(a)!, i - a * epa, records.oldAt(i), records.newAt(i));
  }
  store.durableIndex = total;
  store.checkpointIndex = diskCount;
  store.walStale = walRecords.length > 0;
  store.nextFree = nextFree;
  skipMetadata(store);
  pruneAreas(store);
  store.loaded = true;
  for (let i = 0; i < total; i++) onException(chunks(records.oldAt(i)), chunks(records.newAt(i)));
  return result;
}

// ---- allocation and commit ------------------------------------------------------------------------------------

function skipMetadata(store: PersistentStore): void {
  if (store.nextFree % (store.exceptionsPerArea + 1) === SNAPSHOT_HEADER_CHUNKS) store.nextFree++;
}

/** Drops area images nobody needs: below the one before the current area and (WAL) below the checkpoint's. */
function pruneAreas(store: PersistentStore): void {
  let keepFrom = store.currentArea - 1;
  if (store.wal) keepFrom = Math.min(keepFrom, Math.floor(store.checkpointIndex / store.exceptionsPerArea));
  for (const a of [...store.areas.keys()]) if (a < keepFrom) store.areas.delete(a);
}

function persistentPrepareException(store: PersistentStore): Chunk | -1 {
  assert(store.loaded && !store.closed, 'persistent store: prepareException before readMetadata or after close');
  if (store.readOnly) return -1;
  if ((store.nextFree + 1) * store.chunkSizeSectors > store.cow.sizeSectors) return -1;
  const chunk = chunks(store.nextFree);
  store.nextFree++;
  skipMetadata(store);
  store.preparedCount++;
  assert(!store.isMetadataChunk(chunk), `persistent store: allocated metadata chunk ${chunk}`);
  return chunk;
}

function persistentCommitException(store: PersistentStore, oldChunk: Chunk, newChunk: Chunk, done: (success: boolean) => void): void {
  assert(store.loaded && !store.closed && !store.readOnly, 'persistent store: commitException on a store not loaded, closed or read-only');
  assert(Number.isSafeInteger(oldChunk) && oldChunk >= 0, `persistent store: bad old chunk ${oldChunk}`);
  assert(newChunk > 0 && newChunk < store.nextFree && !store.isMetadataChunk(newChunk), `persistent store: chunk ${newChunk} was not allocated`);
  if (store.preparedCount > 0) store.preparedCount--;
  const epa = store.exceptionsPerArea;
  const index = store.committedIndex;
  writeRecord(store.areas.get(store.currentArea)!, store.currentCommitted, oldChunk, newChunk);
  store.currentCommitted++;
  store.group.push({ index, oldChunk, newChunk, done });
  if (store.currentCommitted === epa) {
    // A full area: its group goes now, and later commits fill the next area (zeroed in memory).
    startGroup(store);
    store.currentArea++;
    store.currentCommitted = 0;
    store.areas.set(store.currentArea, Buffer.alloc(store.chunkSizeBytes));
    pruneAreas(store);
  } else if (store.preparedCount === 0) {
    startGroup(store);
  } else if (!store.gatherScheduled) {
    // Other copies are in flight: let them join the group, but never wait past the next turn for them.
    store.gatherScheduled = true;
    setImmediate(() => {
      store.gatherScheduled = false;
      startGroup(store);
    });
  }
}

/** Hands the waiting commits to a group job (called while store.currentArea is still the group's area). */
function startGroup(store: PersistentStore): void {
  if (store.group.length === 0) return;
  if (store.wal) {
    // Group commit: while a job runs (COW flush + synced WAL batch), commits gather in store.group and the ONE
    // queued job takes all of them when it starts. Capturing the group here instead would queue one job (two
    // syncs) per tiny group and serialize them: measured 1.7k commits/s at 16 in flight.
    if (store.walJobQueued) return;
    store.walJobQueued = true;
    void enqueue(store, () => {
      store.walJobQueued = false;
      const gathered = store.group;
      store.group = [];
      return gathered.length > 0 ? walGroupJob(store, gathered) : RESOLVED;
    }).catch(rethrowLater);
    return;
  }
  const group = store.group;
  store.group = [];
  const area = store.currentArea;
  const full = store.currentCommitted === store.exceptionsPerArea;
  // A copy: later commits keep changing the in-memory area while this write is queued or in flight.
  const image = Buffer.from(store.areas.get(area)!);
  void enqueue(store, () => areaGroupJob(store, group, area, image, full)).catch(rethrowLater);
}

async function areaGroupJob(store: PersistentStore, group: PendingCommit[], area: number, image: Buffer, full: boolean): Promise<void> {
  if (store.valid) {
    try {
      if (full) await writeChunk(store, store.areaLocation(area + 1), store.zeroArea, false);
      await store.cow.flush();
      await writeChunk(store, store.areaLocation(area), image, true);
      store.durableIndex = store.checkpointIndex = group[group.length - 1].index + 1;
    } catch {
      store.valid = false;
    }
  }
  runCallbacks(store, group);
}

/**
 * A WAL group: the COW flush runs on the job chain; the synced WAL append is chained on store.appendTail and the
 * job returns without waiting for it, so the next group's COW flush overlaps this group's LevelDB sync (two
 * fdatasyncs in parallel instead of in series). Appends still complete in group order (appendTail), so callbacks
 * and durableIndex stay in commit order. Jobs that need every append done (checkpoint, merge, drop, close) await
 * store.appendTail first.
 */
async function walGroupJob(store: PersistentStore, group: PendingCommit[]): Promise<void> {
  const wal = store.wal!;
  const epa = store.exceptionsPerArea;
  // Without a WAL, filling an area whose successor is past the end of the COW fails zeroing that successor and
  // invalidates the store (as in Linux); with one, the same commit fails here rather than at the next checkpoint.
  const overflows = group.some((c) => c.index % epa === epa - 1 && !areaFits(store, Math.floor(c.index / epa) + 1));
  if (overflows) store.valid = false;
  let flushed = false;
  if (store.valid) {
    try {
      await store.cow.flush();
      flushed = true;
    } catch {
      store.valid = false;
    }
  }
  const appended = store.appendTail.then(async () => {
    // An earlier group's append may have failed since: then this one is not appended either.
    if (flushed && store.valid) {
      try {
        await wal.append(group.map((c) => ({ index: c.index, oldChunk: c.oldChunk, newChunk: c.newChunk })));
        store.durableIndex = group[group.length - 1].index + 1;
      } catch {
        store.valid = false;
      }
    }
    if (store.valid && !store.checkpointQueued && store.durableIndex - store.checkpointIndex >= store.checkpointExceptionsMax) {
      store.checkpointQueued = true;
      // A failed automatic checkpoint has made the store invalid already; nobody waits for it.
      enqueue(store, () => checkpointJob(store)).catch(() => undefined);
    }
    runCallbacks(store, group);
  });
  store.appendTail = appended.catch(rethrowLater);
}

/** Whether metadata area `area` lies inside the COW. */
function areaFits(store: PersistentStore, area: number): boolean {
  return (store.areaLocation(area) + 1) * store.chunkSizeSectors <= store.cow.sizeSectors;
}

function runCallbacks(store: PersistentStore, group: readonly PendingCommit[]): void {
  let thrown: unknown;
  let threw = false;
  for (const c of group) {
    try {
      c.done(store.valid);
    } catch (e) {
      if (!threw) thrown = e;
      threw = true;
    }
  }
  if (threw) throw thrown;
}

// ---- checkpoint -----------------------------------------------------------------------------------------------

/** Writes the areas holding durable records [checkpointIndex, durableIndex), then trims the WAL. */
async function checkpointJob(store: PersistentStore): Promise<void> {
  await store.appendTail;
  store.checkpointQueued = false;
  const wal = store.wal;
  if (!wal || !store.valid || store.readOnly) return;
  const epa = store.exceptionsPerArea;
  const from = store.checkpointIndex;
  const to = store.durableIndex;
  if (from === to && !store.walStale) return;
  try {
    if (from < to) {
      const firstArea = Math.floor(from / epa);
      // The area holding index `to` gets its durable records (none when the area before it just filled: zeroes).
      const lastArea = Math.floor(to / epa);
      for (let a = lastArea; a >= firstArea; a--) {
        const live = store.areas.get(a);
        assert(live !== undefined || to === a * epa, `persistent store: no image of area ${a} to checkpoint`);
        const image = live ? Buffer.from(live) : Buffer.alloc(store.chunkSizeBytes);
        // Slots past the durable records are written as zeroes (their data may not be flushed yet).
        const durableSlots = Math.min(epa, to - a * epa);
        image.fill(0, durableSlots * DISK_EXCEPTION_SIZE_BYTES);
        await writeChunk(store, store.areaLocation(a), image, true);
      }
      await store.cow.flush();
    }
    await wal.trim(to);
    store.checkpointIndex = to;
    store.walStale = false;
    pruneAreas(store);
  } catch (e) {
    store.valid = false;
    throw e;
  }
}

async function persistentCheckpoint(store: PersistentStore): Promise<void> {
  assert(store.loaded && !store.closed, 'persistent store: checkpoint before readMetadata or after close');
  startGroup(store);
  if (!store.wal) return enqueue(store, () => store.appendTail); // a merge commit's area writes, if any
  return enqueue(store, () => checkpointJob(store));
}

// ---- merge ----------------------------------------------------------------------------------------------------
//
// Linux prepare_merge / commit_merge, extended to batches: prepareMergeRuns returns the runs prepare_merge would
// find one after the other (each committed in turn), newest first, walking back over metadata areas, and
// commitMerge(n) clears the newest n records — however many runs and areas they span — in lock-step with the
// in-core table, writes every metadata area it changed, and flushes the COW once.
//
// Why a batch commit needs no ordering between its area writes (the crash argument). Before commitMerge runs,
// every chunk of the batch was copied to the origin and the ORIGIN was flushed, and the merging target holds the
// write interlock over every chunk of the batch until commitMerge resolved (so nothing but the merge has written
// those origin chunks since the copy). The areas are then written without FUA, highest first, and the COW
// flushed once. A crash before that flush leaves each area either old or new (a torn 4 KiB area is old or new
// per sector, i.e. per slot). Say the batch cleared records [lo, hi) and lo lies in area A. A loader reads the
// areas in order while they are full (Linux read_exceptions):
//   - areas below A are untouched by the batch: full, read as before;
//   - area A old: full (when the batch reaches past it) or its old records, read; area A new: the records below
//     lo only, then a zero slot ends the list (the batch clears a suffix of A, so no zero slot precedes a live one);
//   - past A, each area is old (its records, all of the batch) or new (zeroes: the list ends there).
// So the records a reload finds are always the ones below lo plus a newest-first-cleared remainder of the batch:
// a prefix of the record list as it was. Records of the batch still found are merged again after the reload:
// the same COW chunk copied over the same, untouched, origin chunk — idempotent. Areas past the first one that is
// not full are never read (Linux's loader stops there too; a later commit that fills the area below zeroes the
// next area before writing the full one), so a stale area left above the end of the list is harmless.
//
// A commit's writes are queued behind the previous commit's (store.appendTail) and end with their own COW flush,
// so at most one commit is not durable at a crash: the argument above applies to it, the earlier ones are on
// disk. The caller keeps the interlock of a commit until its promise resolves, even when it goes on with the next
// batch as soon as onCleared ran.

/** old_chunk / new_chunk of the record in `slot` of an area image (no object per record: these loops are hot). */
const oldChunkAt = (image: Buffer, slot: number): number => readLe64(image, slot * DISK_EXCEPTION_SIZE_BYTES);
const newChunkAt = (image: Buffer, slot: number): number => readLe64(image, slot * DISK_EXCEPTION_SIZE_BYTES + 8);

/** Linux prepare_merge's step back: an empty current area makes the previous (full) one current. */
function stepBackIfEmpty(store: PersistentStore): void {
  if (store.currentCommitted !== 0 || store.currentArea === 0) return;
  assert(store.areas.has(store.currentArea - 1), `persistent store: no image of area ${store.currentArea - 1}`);
  store.currentArea--;
  store.currentCommitted = store.exceptionsPerArea;
}

/**
 * The linear run ending at record index `last` (within its area): how many records, counting down from `last`,
 * are (old − i, new − i).
 */
function runEndingAt(store: PersistentStore, image: Buffer, last: number): MergeRun {
  const slot = last % store.exceptionsPerArea;
  const topOld = oldChunkAt(image, slot);
  const topNew = newChunkAt(image, slot);
  let count = 1;
  while (count <= slot && oldChunkAt(image, slot - count) === topOld - count && newChunkAt(image, slot - count) === topNew - count) count++;
  return { count, lastOldChunk: chunks(topOld), lastNewChunk: chunks(topNew) };
}

/** The in-memory image of area `area`, read from the COW when it is not in memory (areas below it are on disk). */
async function areaImageFor(store: PersistentStore, area: number): Promise<Buffer> {
  let image = store.areas.get(area);
  if (!image) {
    image = Buffer.alloc(store.chunkSizeBytes);
    await readChunk(store, store.areaLocation(area), image);
    store.areas.set(area, image);
  }
  return image;
}

function persistentPrepareMerge(store: PersistentStore): MergeRun {
  assert(store.loaded && !store.closed, 'persistent store: prepareMerge before readMetadata or after close');
  assert(store.group.length === 0, 'persistent store: prepareMerge with commits waiting');
  stepBackIfEmpty(store);
  if (store.currentCommitted === 0) return { count: 0, lastOldChunk: chunks(0), lastNewChunk: chunks(0) };
  return runEndingAt(store, store.areas.get(store.currentArea)!, store.committedIndex - 1);
}

function persistentPrepareMergeRuns(store: PersistentStore, limits: MergeBatchLimits, belowNewest = 0): Promise<MergeRun[]> {
  assert(store.loaded && !store.closed, 'persistent store: prepareMergeRuns before readMetadata or after close');
  assert(store.group.length === 0, 'persistent store: prepareMergeRuns with commits waiting');
  const { chunksMax, runsMax } = limits;
  assert(Number.isSafeInteger(chunksMax) && chunksMax >= 1 && Number.isSafeInteger(runsMax) && runsMax >= 1, `persistent store: bad merge batch limits ${chunksMax} chunks, ${runsMax} runs`);
  assert(Number.isSafeInteger(belowNewest) && belowNewest >= 0, `persistent store: bad belowNewest ${belowNewest}`);
  // On the job chain: after any area write still queued, so an area read from the COW here is the one on disk.
  let found: MergeRun[] = [];
  return enqueue(store, async () => {
    if (store.mergeWriteError) throw store.mergeWriteError;
    assert(belowNewest <= store.committedIndex, `persistent store: prepareMergeRuns below ${belowNewest} of ${store.committedIndex} records`);
    // Like prepare_merge, an empty current area (left by the last commitMerge) makes the previous one current: the
    // status shows it at once, as the kernel's next prepare_merge does. Nothing else changes until commitMerge:
    // the runs found, below the newest `belowNewest` records or not, change nothing.
    stepBackIfEmpty(store);
    const runs: MergeRun[] = [];
    let chunksFound = 0;
    let last = store.committedIndex - 1 - belowNewest;
    let imageArea = -1;
    let image = store.zeroArea;
    while (last >= 0 && runs.length < runsMax) {
      if (Math.floor(last / store.exceptionsPerArea) !== imageArea) {
        imageArea = Math.floor(last / store.exceptionsPerArea);
        image = await areaImageFor(store, imageArea);
      }
      const run = runEndingAt(store, image, last);
      if (runs.length > 0 && chunksFound + run.count > chunksMax) break;
      runs.push(run);
      chunksFound += run.count;
      last -= run.count;
    }
    found = runs;
  }).then(() => found);
}

function persistentCommitMerge(
  store: PersistentStore,
  n: number,
  clearInCore: (oldChunk: Chunk, newChunk: Chunk) => boolean,
  onCleared?: () => void,
): Promise<void> {
  assert(store.loaded && !store.closed && !store.readOnly, 'persistent store: commitMerge on a store not loaded, closed or read-only');
  assert(Number.isSafeInteger(n) && n >= 1 && n <= store.committedIndex, `persistent store: commitMerge of ${n} with ${store.committedIndex} records`);
  assert(store.group.length === 0, 'persistent store: commitMerge with commits in flight');
  let durable: Promise<void> = RESOLVED;
  let refused: string | undefined;
  return enqueue(store, async () => {
    if (store.mergeWriteError) throw store.mergeWriteError;
    const wal = store.wal;
    if (wal && (store.walStale || store.durableIndex > store.checkpointIndex)) {
      // Once per merge (no commit comes in while merging): everything durable goes to the areas, then the WAL is
      // emptied (durably), so that no WAL record can name a slot a merge clears. From here on the area writes
      // are the merge's only record.
      store.checkpointQueued = false;
      await checkpointJob(store);
      await wal.clear();
    }
    const epa = store.exceptionsPerArea;
    const top = store.committedIndex;
    const bottom = top - n;
    // Lock-step (seed 000), newest first: the in-core exception first, knowing the on-disk one. `kept` is where
    // the records cleared in WHOLE runs end: a refusal keeps the run it hits on disk (the kernel never committed
    // that run either) and commits the runs before it.
    let kept = bottom;
    let aboveOld = -1;
    let aboveNew = -1;
    let imageArea = -1;
    let image = store.zeroArea;
    for (let index = top - 1; index >= bottom; index--) {
      if (Math.floor(index / epa) !== imageArea) {
        imageArea = Math.floor(index / epa);
        image = await areaImageFor(store, imageArea);
      }
      const slot = index - imageArea * epa;
      const oldChunk = oldChunkAt(image, slot);
      const newChunk = newChunkAt(image, slot);
      // A run (as prepare_merge finds it) starts at the newest record, at an area's last slot, or where the record
      // above is not (old + 1, new + 1).
      if (index === top - 1 || slot === epa - 1 || oldChunk !== aboveOld - 1 || newChunk !== aboveNew - 1) kept = index + 1;
      if (!clearInCore(chunks(oldChunk), chunks(newChunk))) {
        refused = `merge: exception ${oldChunk} -> ${newChunk} is on disk but not in memory, or in the middle of a run`;
        break;
      }
      aboveOld = oldChunk;
      aboveNew = newChunk;
    }
    if (refused === undefined) kept = bottom;
    if (kept === top) return;
    // The new area images: in memory now (the store's state moves on at once: prepare and usage see it), on disk
    // once `durable` settles.
    const writes: Array<[number, Buffer]> = [];
    for (let a = Math.floor((top - 1) / epa); a >= Math.floor(kept / epa); a--) {
      const cleared = Buffer.from(await areaImageFor(store, a));
      cleared.fill(0, Math.max(kept - a * epa, 0) * DISK_EXCEPTION_SIZE_BYTES);
      store.areas.set(a, cleared);
      writes.push([a, Buffer.from(cleared)]); // the write's own copy: the live image may change before it lands
    }
    // The kernel's state after committing these runs one by one: the area of the oldest record cleared, with
    // what is left in it (0 when the batch ended on an area boundary; the next prepare steps back).
    store.currentArea = Math.floor(kept / epa);
    store.currentCommitted = kept - store.currentArea * epa;
    // Linux: only usage() reads next_free now; exceptions may have been committed out of order.
    store.nextFree = store.areaLocation(store.currentArea) + store.currentCommitted + 1;
    store.durableIndex = store.checkpointIndex = kept;
    for (const a of [...store.areas.keys()]) if (a > store.currentArea) store.areas.delete(a);
    if (store.currentCommitted === 0 && store.currentArea > 0) await areaImageFor(store, store.currentArea - 1);
    pruneAreas(store);
    // The writes go after every earlier one (a previous batch's writes of the same area must land first), and
    // outside the job chain: the next prepareMergeRuns, and the next batch's copy, overlap them. Jobs that need
    // the COW up to date (checkpoint, drop, close) await store.appendTail.
    const merged = top - kept;
    durable = store.appendTail.then(() => writeMergedAreas(store, writes, merged));
    store.appendTail = durable.catch(() => undefined);
    if (refused === undefined) onCleared?.();
  }).then(async () => {
    await durable;
    if (refused !== undefined) throw new DmError('DM_INVALID_ARGUMENT', refused);
  });
}

/** Writes the area images of one merge commit, then flushes the COW: from then on the commit is durable. */
async function writeMergedAreas(store: PersistentStore, writes: ReadonlyArray<[number, Buffer]>, merged: number): Promise<void> {
  if (store.mergeWriteError) throw store.mergeWriteError;
  try {
    for (const [area, image] of writes) await writeChunk(store, store.areaLocation(area), image, false);
    // Linux writes each area with PREFLUSH|FUA; one flush after all of them is the same durability point (see the
    // crash argument above: their order does not matter, only that all are durable before the interlock goes).
    await store.cow.flush();
  } catch (e) {
    const areas = writes.map(([a]) => a);
    // The images in memory are ahead of the COW now: no later merge commit may build on them.
    store.mergeWriteError = new DmError('DM_IO', `merge: writing metadata areas ${Math.min(...areas)}..${Math.max(...areas)} of ${store.cow.name} failed`, { cause: e });
    throw store.mergeWriteError;
  }
  // The event log's record of the merge (replay), after the area writes, once the store agrees. Not awaited: the
  // areas are the merge's record, and a reload logs the COW's state as loaded anyway.
  if (store.wal?.merged) void store.wal.merged(merged).catch(() => undefined);
}

// ---- the rest -------------------------------------------------------------------------------------------------

function persistentUsage(store: PersistentStore): ExceptionStoreUsage {
  return {
    totalSectors: store.cow.sizeSectors,
    sectorsAllocated: chunkToSector(chunks(store.nextFree), store.chunkSizeSectors),
    metadataSectors: chunkToSector(chunks(store.currentArea + 1 + SNAPSHOT_HEADER_CHUNKS), store.chunkSizeSectors),
  };
}

function persistentDrop(store: PersistentStore): Promise<void> {
  store.valid = false;
  if (store.readOnly) return RESOLVED;
  // On the job chain, so that close() (and so a remove) waits until the header says invalid.
  return enqueue(store, async () => {
    await store.appendTail;
    await writeChunk(store, 0, encodeHeader(store.chunkSizeSectors, false), true);
    if (store.wal) await store.wal.clear();
  });
}

async function persistentClose(store: PersistentStore): Promise<void> {
  if (store.closed) return;
  try {
    if (store.loaded) {
      startGroup(store);
      await enqueue(store, () => store.appendTail);
      if (store.wal && store.valid && !store.readOnly) await enqueue(store, () => checkpointJob(store));
    }
  } finally {
    store.closed = true;
  }
}

/** Table code `P` / `PO` (persistent; PO reports Overflow instead of Invalid when full). */
export const persistentStore: ExceptionStoreType<PersistentStore> = Object.freeze({
  name: 'P',
  create: persistentCreate,
  readMetadata: persistentReadMetadata,
  prepareException: persistentPrepareException,
  commitException: persistentCommitException,
  usage: persistentUsage,
  drop: persistentDrop,
  checkpoint: persistentCheckpoint,
  prepareMerge: persistentPrepareMerge,
  prepareMergeRuns: persistentPrepareMergeRuns,
  commitMerge: persistentCommitMerge,
  tableCode: (store: PersistentStore) => `${store.overflow ? 'PO' : 'P'} ${store.chunkSizeSectors}`,
  close: persistentClose,
});

