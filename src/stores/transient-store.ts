/**
 * The transient exception store (Linux dm-snap-transient.c, table code `N`): no metadata at all. COW chunks are
 * handed out from chunk 0 upward; nothing survives a reload, so readMetadata reports no exceptions and commits
 * only have to keep their order. Full when next_free + chunk_size > COW size (both in sectors, as in Linux).
 *
 * Differences from Linux, on purpose: commit callbacks run on a later turn (a macrotask, in commit order) rather
 * than inside commit_exception, so that a caller never sees its callback run re-entrantly, whichever store it has.
 * A table chunk size of 0 is refused ("Chunk size not set", as snapshot_ctr refuses it for N).
 *
 * No merge: like Linux's transient store (no prepare_merge/commit_merge), it leaves prepareMerge, prepareMergeRuns
 * and commitMerge out of its method table; snapshot-merge refuses a non-persistent store, and a merger finding no
 * merge methods fails the merge ("the exception store cannot merge"). Nothing survives a reload to merge anyway.
 */
import { assert } from '../core/assert.js';
import { DmError } from '../core/errors.js';
import type { BlockDevice } from '../block/contract.js';
import type { Chunk, Sector } from '../block/units.js';
import { sectorToChunk, sectors } from '../block/units.js';
import type { ExceptionStoreOptions, ExceptionStoreType, ExceptionStoreUsage, ReadMetadataResult } from './contract.js';
import { validateChunkSize } from './contract.js';

export class TransientStore {
  readonly cow: BlockDevice;
  readonly chunkSizeSectors: Sector;
  /** Next free position, in sectors (Linux keeps it in sectors too). */
  nextFreeSectors: Sector = sectors(0);
  valid = true;
  closed = false;
  /** Callbacks waiting for their turn, in commit order. */
  readonly queue: Array<(success: boolean) => void> = [];
  scheduled = false;

  constructor(cow: BlockDevice, chunkSizeSectors: Sector) {
    this.cow = cow;
    this.chunkSizeSectors = chunkSizeSectors;
  }
}

function transientCreate(options: ExceptionStoreOptions): Promise<TransientStore> {
  const { cow, chunkSizeSectors } = options;
  if (chunkSizeSectors === 0) return Promise.reject(new DmError('DM_TABLE_INVALID', 'Chunk size not set'));
  const reason = validateChunkSize(chunkSizeSectors, cow);
  if (reason) return Promise.reject(new DmError('DM_TABLE_INVALID', reason));
  return Promise.resolve(new TransientStore(cow, chunkSizeSectors));
}

function transientReadMetadata(store: TransientStore, _onException: (oldChunk: Chunk, newChunk: Chunk) => void): Promise<ReadMetadataResult> {
  assert(!store.closed, 'transient store: readMetadata after close');
  return Promise.resolve({ valid: true, chunkSizeSectors: store.chunkSizeSectors });
}

function transientPrepareException(store: TransientStore): Chunk | -1 {
  assert(!store.closed, 'transient store: prepareException after close');
  if (store.nextFreeSectors + store.chunkSizeSectors > store.cow.sizeSectors) return -1;
  const chunk = sectorToChunk(store.nextFreeSectors, store.chunkSizeSectors);
  store.nextFreeSectors = sectors(store.nextFreeSectors + store.chunkSizeSectors);
  return chunk;
}

function transientCommitException(store: TransientStore, _oldChunk: Chunk, newChunk: Chunk, done: (success: boolean) => void): void {
  assert(!store.closed, 'transient store: commitException after close');
  assert(newChunk >= 0 && (newChunk + 1) * store.chunkSizeSectors <= store.nextFreeSectors, `transient store: chunk ${newChunk} was not allocated`);
  store.queue.push(done);
  if (store.scheduled) return;
  store.scheduled = true;
  setImmediate(() => {
    store.scheduled = false;
    // Callbacks queued by these callbacks wait for the next turn (a new scheduled run).
    const batch = store.queue.splice(0, store.queue.length);
    for (const cb of batch) cb(store.valid);
  });
}

function transientUsage(store: TransientStore): ExceptionStoreUsage {
  return { totalSectors: store.cow.sizeSectors, sectorsAllocated: store.nextFreeSectors, metadataSectors: sectors(0) };
}

function transientDrop(store: TransientStore): Promise<void> {
  store.valid = false;
  return Promise.resolve();
}

async function transientClose(store: TransientStore): Promise<void> {
  if (store.closed) return;
  // Let queued callbacks run before the store goes away.
  while (store.queue.length > 0) await new Promise<void>((resolve) => setImmediate(resolve));
  store.closed = true;
}

/** Table code `N`. Chunks are exact conversions: the chunk size is a power of two ≥ the COW's block size. */
export const transientStore: ExceptionStoreType<TransientStore> = Object.freeze({
  name: 'N',
  create: transientCreate,
  readMetadata: transientReadMetadata,
  prepareException: transientPrepareException,
  commitException: transientCommitException,
  usage: transientUsage,
  drop: transientDrop,
  tableCode: (store: TransientStore) => `N ${store.chunkSizeSectors}`,
  close: transientClose,
});

