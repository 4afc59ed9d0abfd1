/**
 * One leg of a mirror (Linux struct mirror): its device, offset and the errors it has shown. The health character
 * `dmsetup status` prints per leg is the most severe error seen (Linux device_status_char):
 *   A alive · F a flush failed · D a write failed · S a resync copy to or from it failed · R a read failed · U other.
 */
import type { BlockDevice } from '../../block/contract.js';
import type { Sector } from '../../block/units.js';

export const LEG_ERROR_WRITE = 1 << 0;
export const LEG_ERROR_FLUSH = 1 << 1;
export const LEG_ERROR_SYNC = 1 << 2;
export const LEG_ERROR_READ = 1 << 3;
/** Errors after which a mirror that handles errors stops writing to the leg until it is re-added. */
export const LEG_ERRORS_FAILING_WRITES = LEG_ERROR_WRITE | LEG_ERROR_FLUSH | LEG_ERROR_SYNC;

export type LegErrorKind = 'write' | 'flush' | 'sync' | 'read';

export const LEG_ERROR_BIT: Readonly<Record<LegErrorKind, number>> = Object.freeze({
  write: LEG_ERROR_WRITE,
  flush: LEG_ERROR_FLUSH,
  sync: LEG_ERROR_SYNC,
  read: LEG_ERROR_READ,
});

export class MirrorLeg {
  /** Errors seen (Linux error_count): a leg with any error is not chosen for reads. */
  errorCount = 0;
  /** LEG_ERROR_* bits (Linux error_type). */
  errorBits = 0;

  constructor(
    readonly index: number,
    readonly device: BlockDevice,
    /** How status and table print the device (file path or mapped device name). */
    readonly label: string,
    readonly offsetSectors: Sector,
  ) {}

  get healthy(): boolean {
    return this.errorCount === 0;
  }

  get failsWrites(): boolean {
    return (this.errorBits & LEG_ERRORS_FAILING_WRITES) !== 0;
  }

  /** Records an error; returns true when this kind of error is new for the leg (Linux test_and_set_bit). */
  recordError(kind: LegErrorKind): boolean {
    this.errorCount++;
    const bit = LEG_ERROR_BIT[kind];
    const isNew = (this.errorBits & bit) === 0;
    this.errorBits |= bit;
    return isNew;
  }

  reset(): void {
    this.errorCount = 0;
    this.errorBits = 0;
  }

  statusChar(): string {
    if (this.errorCount === 0) return 'A';
    if (this.errorBits & LEG_ERROR_FLUSH) return 'F';
    if (this.errorBits & LEG_ERROR_WRITE) return 'D';
    if (this.errorBits & LEG_ERROR_SYNC) return 'S';
    if (this.errorBits & LEG_ERROR_READ) return 'R';
    return 'U';
  }
}
