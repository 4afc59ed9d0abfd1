/**
 * MemoryBlockDevice: a sparse in-memory BlockDevice. Data lives in 64 KiB pages allocated on first write
 * (a Map from page index to Buffer); unallocated pages read as zeroes and are reported as holes by
 * blockStatus(). Discard drops every page it covers whole and zeroes the parts of pages it covers in part.
 *
 * Nothing is cached, so every completed write is as durable as the device gets: `supports.flush` is false
 * (flush() resolves and does nothing, as the contract allows) and `supports.fua` is true (a FUA write is an
 * ordinary write). To model a volatile write cache and power loss, wrap it in a FaultyBlockDevice.
 *
 * Hot path: an I/O inside one page is one Buffer copy and allocates nothing (the page is allocated on the
 * first write to it; the returned promise is a shared resolved one).
 */
import { assert } from '../core/assert.js';
import { DmError } from '../core/errors.js';
import type { BlockDeviceSupports, BlockExtent } from './contract.js';
import { BlockDevice } from './contract.js';
import type { Bytes, Sector } from './units.js';
import { KiB, SECTOR_SIZE_BYTES, bytes, bytesToSectors, sectors, sectorsToBytes } from './units.js';

export interface MemoryBlockDeviceOptions {
  readonly sizeSectors: Sector;
  /** A power of two from 512 to 64 KiB; 512 by default. `sizeSectors` must be a multiple of it. */
  readonly logicalBlockSizeBytes?: Bytes;
  /** Defaults to "memory". */
  readonly name?: string;
}

/** Allocation unit. 64 KiB: small enough to stay sparse, large enough that most bios touch one page. */
export const MEMORY_PAGE_SIZE_BYTES = bytes(64 * KiB);
const PAGE_SIZE_SECTORS = bytesToSectors(MEMORY_PAGE_SIZE_BYTES);
/** blockStatus() walks the pages of ranges up to this many pages; larger ranges sort the allocated pages. */
const BLOCK_STATUS_WALK_PAGES_MAX = 4096;
/** snapshotBytes() copies the whole device into one Buffer; refuse sizes a test would not mean. */
const SNAPSHOT_SIZE_BYTES_MAX = 1024 * 1024 * 1024;

const RESOLVED: Promise<void> = Promise.resolve();

export class MemoryBlockDevice extends BlockDevice {
  readonly sizeSectors: Sector;
  override readonly logicalBlockSizeBytes: Bytes;
  readonly name: string;
  readonly supports: BlockDeviceSupports = Object.freeze({ flush: false, discard: true, fua: true, holes: true });
  private readonly pages = new Map<number, Buffer>();

  constructor(options: MemoryBlockDeviceOptions) {
    super();
    const name = options.name ?? 'memory';
    const lbs = options.logicalBlockSizeBytes ?? SECTOR_SIZE_BYTES;
    if (!Number.isSafeInteger(options.sizeSectors) || options.sizeSectors < 0) {
      throw new DmError('DM_INVALID_ARGUMENT', `${name}: sizeSectors must be a non-negative integer, got ${options.sizeSectors}`);
    }
    if (!Number.isSafeInteger(lbs) || lbs < SECTOR_SIZE_BYTES || lbs > MEMORY_PAGE_SIZE_BYTES || (lbs & (lbs - 1)) !== 0) {
      throw new DmError('DM_INVALID_ARGUMENT', `${name}: logicalBlockSizeBytes must be a power of two from 512 to ${MEMORY_PAGE_SIZE_BYTES}, got ${lbs}`);
    }
    if (sectorsToBytes(options.sizeSectors) % lbs !== 0) {
      throw new DmError('DM_INVALID_ARGUMENT', `${name}: size of ${options.sizeSectors} sectors is not a multiple of the ${lbs}-byte logical block size`);
    }
    this.sizeSectors = options.sizeSectors;
    this.logicalBlockSizeBytes = lbs;
    this.name = name;
  }

  /** Bytes of pages currently allocated (a multiple of MEMORY_PAGE_SIZE_BYTES). */
  get allocatedBytes(): Bytes {
    return bytes(this.pages.size * MEMORY_PAGE_SIZE_BYTES);
  }

  /** A copy of the whole contents (for tests and checkers; refuses devices over 1 GiB). */
  snapshotBytes(): Buffer {
    const sizeBytes = sectorsToBytes(this.sizeSectors);
    assert(sizeBytes <= SNAPSHOT_SIZE_BYTES_MAX, `${this.name}: snapshotBytes() of ${sizeBytes} bytes is over the ${SNAPSHOT_SIZE_BYTES_MAX}-byte limit`);
    const out = Buffer.alloc(sizeBytes);
    for (const [pageIndex, page] of this.pages) {
      const startBytes = pageIndex * MEMORY_PAGE_SIZE_BYTES;
      page.copy(out, startBytes, 0, Math.min(MEMORY_PAGE_SIZE_BYTES, sizeBytes - startBytes));
    }
    return out;
  }

  protected _read(sector: Sector, buf: Uint8Array): Promise<void> {
    let offsetBytes: number = sectorsToBytes(sector);
    let doneBytes = 0;
    const lengthBytes = buf.byteLength;
    while (doneBytes < lengthBytes) {
      const pageIndex = Math.floor(offsetBytes / MEMORY_PAGE_SIZE_BYTES);
      const inPageBytes = offsetBytes - pageIndex * MEMORY_PAGE_SIZE_BYTES;
      const stepBytes = Math.min(MEMORY_PAGE_SIZE_BYTES - inPageBytes, lengthBytes - doneBytes);
      const page = this.pages.get(pageIndex);
      if (page) page.copy(buf, doneBytes, inPageBytes, inPageBytes + stepBytes);
      else buf.fill(0, doneBytes, doneBytes + stepBytes);
      offsetBytes += stepBytes;
      doneBytes += stepBytes;
    }
    return RESOLVED;
  }

  protected _write(sector: Sector, buf: Uint8Array, _fua: boolean): Promise<void> {
    let offsetBytes: number = sectorsToBytes(sector);
    const lengthBytes = buf.byteLength;
    const firstPageIndex = Math.floor(offsetBytes / MEMORY_PAGE_SIZE_BYTES);
    const firstInPageBytes = offsetBytes - firstPageIndex * MEMORY_PAGE_SIZE_BYTES;
    if (firstInPageBytes + lengthBytes <= MEMORY_PAGE_SIZE_BYTES) {
      // The common case: the whole bio inside one page, one copy, no view allocated.
      if (lengthBytes > 0) this.pageForWrite(firstPageIndex).set(buf, firstInPageBytes);
      return RESOLVED;
    }
    let doneBytes = 0;
    while (doneBytes < lengthBytes) {
      const pageIndex = Math.floor(offsetBytes / MEMORY_PAGE_SIZE_BYTES);
      const inPageBytes = offsetBytes - pageIndex * MEMORY_PAGE_SIZE_BYTES;
      const stepBytes = Math.min(MEMORY_PAGE_SIZE_BYTES - inPageBytes, lengthBytes - doneBytes);
      this.pageForWrite(pageIndex).set(buf.subarray(doneBytes, doneBytes + stepBytes), inPageBytes);
      offsetBytes += stepBytes;
      doneBytes += stepBytes;
    }
    return RESOLVED;
  }

  protected override _discard(sector: Sector, lengthSectors: Sector): Promise<void> {
    let offsetBytes: number = sectorsToBytes(sector);
    const endBytes = offsetBytes + sectorsToBytes(lengthSectors);
    const deviceSizeBytes = sectorsToBytes(this.sizeSectors);
    while (offsetBytes < endBytes) {
      const pageIndex = Math.floor(offsetBytes / MEMORY_PAGE_SIZE_BYTES);
      const inPageBytes = offsetBytes - pageIndex * MEMORY_PAGE_SIZE_BYTES;
      const stepBytes = Math.min(MEMORY_PAGE_SIZE_BYTES - inPageBytes, endBytes - offsetBytes);
      // The last page of a device whose size is not a multiple of the page size counts as whole.
      const pageInDeviceBytes = Math.min(MEMORY_PAGE_SIZE_BYTES, deviceSizeBytes - pageIndex * MEMORY_PAGE_SIZE_BYTES);
      if (inPageBytes === 0 && stepBytes === pageInDeviceBytes) this.pages.delete(pageIndex);
      else this.pages.get(pageIndex)?.fill(0, inPageBytes, inPageBytes + stepBytes);
      offsetBytes += stepBytes;
    }
    return RESOLVED;
  }

  protected override _blockStatus(sector: Sector, lengthSectors: Sector): Promise<BlockExtent[]> {
    const extents: BlockExtent[] = [];
    if (lengthSectors === 0) return Promise.resolve(extents);
    const endSector = sector + lengthSectors;
    const firstPageIndex = Math.floor(sector / PAGE_SIZE_SECTORS);
    const lastPageIndex = Math.floor((endSector - 1) / PAGE_SIZE_SECTORS);
    // Appends [start, end) of one kind, merging with the previous extent when it is of the same kind.
    const push = (startSector: number, stopSector: number, hole: boolean): void => {
      if (stopSector <= startSector) return;
      const last = extents[extents.length - 1];
      if (last && last.hole === hole) {
        extents[extents.length - 1] = { startSector: last.startSector, lengthSectors: sectors(stopSector - last.startSector), hole };
      } else {
        extents.push({ startSector: sectors(startSector), lengthSectors: sectors(stopSector - startSector), hole });
      }
    };
    const clip = (pageIndex: number): [number, number] => [
      Math.max(sector, pageIndex * PAGE_SIZE_SECTORS),
      Math.min(endSector, (pageIndex + 1) * PAGE_SIZE_SECTORS),
    ];
    if (lastPageIndex - firstPageIndex < BLOCK_STATUS_WALK_PAGES_MAX) {
      for (let pageIndex = firstPageIndex; pageIndex <= lastPageIndex; pageIndex++) {
        const [startSector, stopSector] = clip(pageIndex);
        push(startSector, stopSector, !this.pages.has(pageIndex));
      }
    } else {
      // A large range (a sparse terabyte): visit only the allocated pages, in order.
      const allocated: number[] = [];
      for (const pageIndex of this.pages.keys()) {
        if (pageIndex >= firstPageIndex && pageIndex <= lastPageIndex) allocated.push(pageIndex);
      }
      allocated.sort((a, b) => a - b);
      let cursorSector: number = sector;
      for (const pageIndex of allocated) {
        const [startSector, stopSector] = clip(pageIndex);
        push(cursorSector, startSector, true);
        push(startSector, stopSector, false);
        cursorSector = stopSector;
      }
      push(cursorSector, endSector, true);
    }
    return Promise.resolve(extents);
  }

  /** Frees the pages: a closed device's contents are gone (snapshotBytes() afterwards reads zeroes). */
  protected override _close(): Promise<void> {
    this.pages.clear();
    return RESOLVED;
  }

  private pageForWrite(pageIndex: number): Buffer {
    let page = this.pages.get(pageIndex);
    if (!page) {
      page = Buffer.alloc(MEMORY_PAGE_SIZE_BYTES);
      this.pages.set(pageIndex, page);
    }
    return page;
  }
}
