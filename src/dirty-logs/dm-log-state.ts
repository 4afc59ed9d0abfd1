/**
 * The in-memory state the core and disk logs share (Linux dm-log.c struct log_c): three bitsets over the regions,
 * little-endian bit order (test_bit_le: region r is byte r/8, bit r%8), each sized to a whole number of 64-bit
 * words as the kernel does on a 64-bit machine (the disk log writes clean_bits in exactly that size).
 *
 *   clean bits      set = no write in flight and in sync as far as the log knows (is_clean); a mark clears it.
 *   sync bits       set = every leg holds the same data (in_sync); only setRegionSync changes them.
 *   recovering bits set = handed out by getResyncWork, not yet given back by setRegionSync.
 *
 * Table arguments of both: `<region_size> [sync|nosync]` (disk: the log device first).
 */
import type { Sector } from '../block/units.js';
import { DmError } from '../core/errors.js';
import { parseUnsigned } from '../core/parse-number.js';
import type { DirtyLogOptions } from './contract.js';

/** Regions per log at most (the kernel allows UINT_MAX; three bitsets of this many bits are 96 MiB). */
export const DM_LOG_REGION_COUNT_MAX = 1 << 28;

export type DmLogSync = DirtyLogOptions['initialSync'];

/** Bytes of one bitset for `regionCount` regions: rounded up to 64-bit words (Linux BITS_PER_LONG). */
export function dmLogBitsetBytes(regionCount: number): number {
  return Math.ceil(regionCount / 64) * 8;
}

export function dmLogTestBit(bits: Uint8Array, region: number): boolean {
  return (bits[region >>> 3] & (1 << (region & 7))) !== 0;
}

/** Parses `<region_size> [sync|nosync]` (dm-log create_log_context). */
export function dmLogParseRegionArgs(typeName: string, args: readonly string[]): { regionSizeSectors: Sector; initialSync: DmLogSync } {
  if (args.length < 1 || args.length > 2) {
    throw new DmError('DM_TABLE_INVALID', `${typeName} log: wrong number of arguments to dirty region log`);
  }
  let initialSync: DmLogSync = 'resync';
  if (args.length > 1) {
    if (args[1] === 'sync') initialSync = 'sync';
    else if (args[1] === 'nosync') initialSync = 'nosync';
    else throw new DmError('DM_TABLE_INVALID', `${typeName} log: unrecognised sync argument to dirty region log: ${args[1]}`);
  }
  let regionSizeSectors: number;
  try {
    regionSizeSectors = parseUnsigned(args[0], `${typeName} log: region size`);
  } catch (err) {
    throw new DmError('DM_TABLE_INVALID', `${typeName} log: invalid region size ${args[0]}`, { cause: err });
  }
  return { regionSizeSectors: regionSizeSectors as Sector, initialSync };
}

/** `sync`/`nosync` as the kernel prints it after the region size in a table (nothing for the default). */
export function dmLogSyncSuffix(sync: DmLogSync): string {
  return sync === 'resync' ? '' : ` ${sync}`;
}

export class DmLogState {
  readonly regionCount: number;
  readonly bitsetBytes: number;
  cleanBits: Uint8Array;
  readonly syncBits: Uint8Array;
  readonly recoveringBits: Uint8Array;
  syncCount = 0;
  /** A mark (clean bit cleared) since the last flush took its snapshot (Linux touched_dirtied). */
  touchedDirtied = false;
  /** A clear (clean bit set) since the last flush took its snapshot (Linux touched_cleaned). */
  touchedCleaned = false;
  /** The legs could not be flushed once: no region may be recorded clean any more (Linux flush_failed). */
  flushFailed = false;
  degraded = false;
  /** Where getResyncWork looks next (Linux sync_search); moved back when a region falls out of sync. */
  private syncSearch = 0;

  constructor(
    readonly typeName: string,
    readonly regionSizeSectors: Sector,
    readonly sync: DmLogSync,
    options: DirtyLogOptions,
    /** The disk log passes its I/O buffer's bit area so that clean bits are written from where they live. */
    cleanBits?: Uint8Array,
  ) {
    const size = regionSizeSectors as number;
    const target = options.targetSizeSectors as number;
    // Linux _check_region_size: a power of two, at least 2 sectors, at most the target's length.
    if (!Number.isSafeInteger(size) || size < 2 || size > target || (size & (size - 1)) !== 0) {
      throw new DmError('DM_TABLE_INVALID', `${typeName} log: invalid region size ${size} (a power of two from 2 to the target length ${target})`);
    }
    this.regionCount = Math.ceil(target / size);
    if (this.regionCount > DM_LOG_REGION_COUNT_MAX) {
      throw new DmError('DM_TABLE_INVALID', `${typeName} log: region count exceeds limit of ${DM_LOG_REGION_COUNT_MAX}`);
    }
    this.bitsetBytes = dmLogBitsetBytes(this.regionCount);
    this.cleanBits = cleanBits ?? new Uint8Array(this.bitsetBytes);
    this.cleanBits.fill(0xff, 0, this.bitsetBytes);
    this.syncBits = new Uint8Array(this.bitsetBytes);
    this.recoveringBits = new Uint8Array(this.bitsetBytes);
    this.setAllInSync(sync === 'nosync');
  }

  /** Every region in sync (nosync) or none. Padding bits past the last region stay clear. */
  setAllInSync(inSync: boolean): void {
    this.syncBits.fill(0);
    if (inSync) for (let r = 0; r < this.regionCount; r++) this.syncBits[r >>> 3] |= 1 << (r & 7);
    this.syncCount = inSync ? this.regionCount : 0;
    this.recoveringBits.fill(0);
    this.syncSearch = 0;
  }

  /** After a resume read the clean bits: in sync = clean (Linux disk_resume copies clean_bits to sync_bits). */
  syncFromClean(): void {
    this.syncBits.set(this.cleanBits.subarray(0, this.bitsetBytes));
    let n = 0;
    for (let r = 0; r < this.regionCount; r++) if (dmLogTestBit(this.syncBits, r)) n++;
    this.syncCount = n;
    this.recoveringBits.fill(0);
    this.syncSearch = 0;
  }

  checkRegion(region: number): void {
    if (!Number.isSafeInteger(region) || region < 0 || region >= this.regionCount) {
      throw new DmError('DM_INVALID_ARGUMENT', `${this.typeName} log: region ${region} is outside 0..${this.regionCount - 1}`);
    }
  }

  isClean(region: number): boolean {
    return dmLogTestBit(this.cleanBits, region);
  }

  inSync(region: number): boolean {
    return dmLogTestBit(this.syncBits, region);
  }

  /**
   * Set by a persistent log: whether marking `region` must be written (false when the record on the device says
   * dirty already and no write in flight or done since says otherwise). Without it every mark is written.
   */
  markNeedsWrite: ((region: number) => boolean) | undefined = undefined;

  /** Set by a persistent log to learn which regions were cleared (clean bit set) since it last wrote clears. */
  onClear: ((region: number) => void) | undefined = undefined;

  mark(region: number): void {
    this.cleanBits[region >>> 3] &= ~(1 << (region & 7));
    if (this.markNeedsWrite === undefined || this.markNeedsWrite(region)) this.touchedDirtied = true;
  }

  clear(region: number): void {
    // A region that fell out of sync is cleared only by a resync (setRegionSync true), never by a drained write:
    // the clean bit is what survives a crash, and it must keep saying "resync me".
    if (this.flushFailed || this.degraded || !this.inSync(region)) return;
    this.cleanBits[region >>> 3] |= 1 << (region & 7);
    this.touchedCleaned = true;
    this.onClear?.(region);
  }

  getResyncWork(): number | undefined {
    for (let r = this.syncSearch; r < this.regionCount; r++) {
      if (dmLogTestBit(this.syncBits, r) || dmLogTestBit(this.recoveringBits, r)) continue;
      this.syncSearch = r + 1;
      this.recoveringBits[r >>> 3] |= 1 << (r & 7);
      return r;
    }
    this.syncSearch = this.regionCount;
    return undefined;
  }

  setRegionSync(region: number, inSync: boolean): void {
    this.recoveringBits[region >>> 3] &= ~(1 << (region & 7));
    const was = this.inSync(region);
    if (inSync && !was) {
      this.syncBits[region >>> 3] |= 1 << (region & 7);
      this.syncCount++;
    } else if (!inSync) {
      if (was) {
        this.syncBits[region >>> 3] &= ~(1 << (region & 7));
        this.syncCount--;
      }
      // Not clean either: the on-disk record must say "resync me" until a resync sets the region in sync.
      if (this.isClean(region)) this.mark(region);
      if (region < this.syncSearch) this.syncSearch = region;
    }
  }

  /** Linux disk_flush after a failed leg flush: nothing can be trusted clean, mark every region dirty. */
  markAllDirty(): void {
    for (let r = 0; r < this.regionCount; r++) this.cleanBits[r >>> 3] &= ~(1 << (r & 7));
    this.touchedDirtied = true;
  }
}
