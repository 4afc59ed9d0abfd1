/**
 * A read-only view of a device for a pinned mirror (a read-only replayed pool, src/replay/pinned-files.ts): reads
 * and block status go to the device; writes and discards are refused with DM_IO and counted; a flush does nothing
 * (nothing was written through the view). A pinned mirror hands its legs and its region log device only through
 * this view, so no path inside the mirror — write groups, resync copies, log flushes, md bitmap daemon passes —
 * can change a file even if it tried; `refused` says whether one did (the tests check it stays 0).
 */
import { BlockDevice, type BlockDeviceSupports, type BlockExtent } from '../../block/contract.js';
import type { Bytes, Sector } from '../../block/units.js';
import { DmError } from '../../core/errors.js';

const RESOLVED: Promise<void> = Promise.resolve();

export class ReadOnlyGuardDevice extends BlockDevice {
  readonly supports: BlockDeviceSupports;
  readonly name: string;
  override readonly logicalBlockSizeBytes: Bytes;
  /** Writes and discards refused so far. */
  refused = 0;

  constructor(
    readonly inner: BlockDevice,
    /** Why it is read-only, for the error message. */
    private readonly why: string,
  ) {
    super();
    this.supports = inner.supports;
    this.name = inner.name;
    this.logicalBlockSizeBytes = inner.logicalBlockSizeBytes;
  }

  get sizeSectors(): Sector {
    return this.inner.sizeSectors;
  }

  private refuse(op: string): Promise<void> {
    this.refused++;
    return Promise.reject(new DmError('DM_IO', `${this.name}: ${op} refused: ${this.why}`));
  }

  protected _read(sector: Sector, buf: Uint8Array): Promise<void> {
    return this.inner.read(sector, buf);
  }

  protected _write(): Promise<void> {
    return this.refuse('write');
  }

  protected override _flush(): Promise<void> {
    return RESOLVED;
  }

  protected override _discard(): Promise<void> {
    return this.refuse('discard');
  }

  protected override _blockStatus(sector: Sector, lengthSectors: Sector): Promise<BlockExtent[]> {
    return this.inner.blockStatus(sector, lengthSectors);
  }

  // close(): the core releases the device below (opened through the target context); nothing to do here.
}
