/**
 * The BlockDevice contract (abstract-level's shape): public methods validate arguments and state, then call the
 * `_method` an implementation overrides. Positions are in 512-byte sectors; lengths of data are the buffers'
 * byte lengths. Every implementation runs the shared conformance suite in src/testing/conformance/block-device.ts.
 *
 * Public methods are not `async`: on the hot path they return the implementation's promise directly, saving an
 * extra promise per bio. Validation failures come back as rejected promises with a DmError code.
 *
 * Buffer ownership: the `buf` given to read() or write() belongs to the device until the returned promise settles.
 * The caller must not change a write's buffer, nor read a read's buffer, before then; the device must not keep a
 * reference after it (a write that caches data, like the faulty device's volatile cache, copies it). No copy is
 * made on the hot path: NBD payloads, kcopyd pieces and bio buffers are handed down as they are.
 */
import { DmError } from '../core/errors.js';
import type { Bytes, Sector } from './units.js';
import { SECTOR_SIZE_BYTES } from './units.js';

export interface BlockDeviceSupports {
  /** flush() reaches stable storage (false: flush is a no-op because nothing is cached). */
  readonly flush: boolean;
  /** discard() frees the range; reads of it return zeroes afterwards. */
  readonly discard: boolean;
  /** write(..., { fua: true }) is durable when it completes. */
  readonly fua: boolean;
  /** blockStatus() can tell allocated ranges from holes. */
  readonly holes: boolean;
}

export interface WriteOptions {
  /** Force Unit Access: the write is durable when the promise resolves. */
  readonly fua?: boolean;
}

/** One extent reported by blockStatus(): `hole` ranges read as zeroes and hold no data. */
export interface BlockExtent {
  readonly startSector: Sector;
  readonly lengthSectors: Sector;
  readonly hole: boolean;
}

export abstract class BlockDevice {
  /** Size in sectors; fixed for the life of the handle. */
  abstract readonly sizeSectors: Sector;
  /** The smallest I/O unit; every offset and length must be a multiple of it. A power of two ≥ 512. */
  readonly logicalBlockSizeBytes: Bytes = SECTOR_SIZE_BYTES;
  abstract readonly supports: BlockDeviceSupports;
  /** A short human name (file path, "memory", a mapped device's name) used in messages and tables. */
  abstract readonly name: string;
  protected closed = false;

  get isClosed(): boolean {
    return this.closed;
  }

  /** Reads `buf.byteLength` bytes starting at `sector` into `buf`. */
  read(sector: Sector, buf: Uint8Array): Promise<void> {
    const err = this.checkIo('read', sector, buf.byteLength);
    if (err) return Promise.reject(err);
    return this._read(sector, buf);
  }

  /** Writes `buf` at `sector`. With `fua`, the data is durable on completion. */
  write(sector: Sector, buf: Uint8Array, options?: WriteOptions): Promise<void> {
    const err = this.checkIo('write', sector, buf.byteLength);
    if (err) return Promise.reject(err);
    return this._write(sector, buf, options?.fua === true);
  }

  /** Makes every completed write durable. */
  flush(): Promise<void> {
    if (this.closed) return Promise.reject(new DmError('DM_CLOSED', `${this.name}: device is closed`));
    return this._flush();
  }

  /** Discards `lengthSectors` sectors from `sector`; afterwards the range reads as zeroes. */
  discard(sector: Sector, lengthSectors: Sector): Promise<void> {
    const err = this.checkIo('discard', sector, lengthSectors * SECTOR_SIZE_BYTES);
    if (err) return Promise.reject(err);
    if (!this.supports.discard) return Promise.reject(new DmError('DM_NOT_SUPPORTED', `${this.name}: discard not supported`));
    return this._discard(sector, lengthSectors);
  }

  /**
   * Allocation map of [sector, sector + lengthSectors): extents covering the range in order. Devices that
   * cannot tell report one data extent.
   */
  blockStatus(sector: Sector, lengthSectors: Sector): Promise<BlockExtent[]> {
    const err = this.checkIo('blockStatus', sector, lengthSectors * SECTOR_SIZE_BYTES);
    if (err) return Promise.reject(err);
    return this._blockStatus(sector, lengthSectors);
  }

  /** Releases the device. Further I/O fails with DM_CLOSED. Idempotent. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this._close();
  }

  /** Returns an error for an I/O that must not reach the implementation, or undefined. */
  protected checkIo(op: string, sector: Sector, lengthBytes: number): DmError | undefined {
    if (this.closed) return new DmError('DM_CLOSED', `${this.name}: device is closed`);
    const lbs = this.logicalBlockSizeBytes;
    if (!Number.isSafeInteger(sector) || sector < 0 || lengthBytes < 0 || (sector * 512) % lbs !== 0 || lengthBytes % lbs !== 0) {
      return new DmError('DM_IO_ALIGNMENT', `${this.name}: ${op} at sector ${sector} of ${lengthBytes} bytes is not aligned to ${lbs} bytes`);
    }
    if (sector * 512 + lengthBytes > this.sizeSectors * 512) {
      return new DmError('DM_IO_RANGE', `${this.name}: ${op} at sector ${sector} of ${lengthBytes} bytes is past the end (${this.sizeSectors} sectors)`);
    }
    return undefined;
  }

  protected abstract _read(sector: Sector, buf: Uint8Array): Promise<void>;
  protected abstract _write(sector: Sector, buf: Uint8Array, fua: boolean): Promise<void>;
  protected _flush(): Promise<void> {
    return Promise.resolve();
  }
  protected _discard(_sector: Sector, _lengthSectors: Sector): Promise<void> {
    return Promise.reject(new DmError('DM_NOT_SUPPORTED', `${this.name}: discard not supported`));
  }
  protected _blockStatus(sector: Sector, lengthSectors: Sector): Promise<BlockExtent[]> {
    return Promise.resolve([{ startSector: sector, lengthSectors, hole: false }]);
  }
  protected _close(): Promise<void> {
    return Promise.resolve();
  }
}
