/**
 * `disk <#args> <log_device> <region_size> [sync|nosync]`: dm-log's disk log, in the kernel's on-disk format, so
 * a log written here loads in Linux and the reverse (test/kernel/mirror-interop.test.ts):
 *
 *   sector 0   header, little-endian: magic u32 0x4D695272 ("MiRr"), version u32 2, nr_regions u64
 *   byte 1024  clean bits, bit r = region r (LSB first within a byte), set = in sync and no write in flight;
 *              ceil(regions / 64) × 8 bytes; the whole area (header to the end of the bits, rounded up to the
 *              device's logical block) is read and written as one buffer.
 *
 * Resume (Linux disk_resume): reads the buffer; a log without the magic, or any log when the table says `sync` or
 * `nosync`, is a new log (no region known); regions the header does not cover are set clean (`nosync`) or dirty
 * (otherwise); in sync = clean; the header and bits are written back and flushed.
 *
 * flush() (Linux disk_flush) writes the whole buffer, after flushing the legs when it carries a clear
 * (DirtyLogOptions.flushLegs), and flushes the log device only when it carries a mark: a lost clear costs a resync
 * of that region, a lost mark could cost data. Flushes are serialized and shared: a flush called while one is in
 * flight joins it when nothing changed since it took its snapshot, and waits for the next one otherwise.
 *
 * Failures (status char after the device, as the kernel prints it): A alive, D the log device failed a read or a
 * write, F it failed a flush. A failed log rejects every later flush with DM_IO.
 *
 * Read-only (DirtyLogOptions.readOnly, a pinned mirror of a replayed pool): resume reads the buffer and sets the
 * in-sync regions from it as above (the `sync`/`nosync` rules included, in memory only) but writes and flushes
 * nothing; flush() and suspend write nothing either (a flush carrying a mark rejects with DM_IO: a read-only mirror
 * makes none). Status stays `A`: the device has not failed, it is just not written.
 */
import type { BlockDevice } from '../block/contract.js';
import { sectors } from '../block/units.js';
import { DmError } from '../core/errors.js';
import type { DirtyLogFlushOptions, DirtyLogOptions, DirtyLogType } from './contract.js';
import { DmLogState, dmLogBitsetBytes, dmLogParseRegionArgs, dmLogSyncSuffix } from './dm-log-state.js';

export const DISK_LOG_MAGIC = 0x4d695272;
export const DISK_LOG_VERSION = 2;
/** Where the clean bits start (Linux LOG_OFFSET = 2 sectors). */
export const DISK_LOG_BITS_OFFSET_BYTES = 1024;

const RESOLVED: Promise<void> = Promise.resolve();

/** Bytes of the header + bits buffer for `regionCount` regions on a device of that logical block size. */
export function diskLogBufferBytes(regionCount: number, logicalBlockSizeBytes: number): number {
  const raw = DISK_LOG_BITS_OFFSET_BYTES + dmLogBitsetBytes(regionCount);
  return Math.ceil(raw / logicalBlockSizeBytes) * logicalBlockSizeBytes;
}

export interface DiskLogHeader {
  readonly magic: number;
  readonly version: number;
  readonly regionCount: number;
}

/** Reads the header fields from the first bytes of a disk log. */
export function parseDiskLogHeader(buf: Uint8Array): DiskLogHeader {
  const v = new DataView(buf.buffer, buf.byteOffset, 16);
  return { magic: v.getUint32(0, true), version: v.getUint32(4, true), regionCount: Number(v.getBigUint64(8, true)) };
}

export class DiskLog {
  /** Header (sector 0) and clean bits (from byte 1024), exactly what goes to the device. */
  readonly buffer: Uint8Array;
  readonly state: DmLogState;
  /** The device failed a read or write (status D). */
  deviceFailed = false;
  /** The device failed a flush (status F). */
  deviceFlushFailed = false;
  closed = false;
  private inFlight: Promise<void> | undefined = undefined;
  private next: Promise<void> | undefined = undefined;
  private nextWantsClears = false;
  private inFlightCarriesMarks = false;
  /** Never write or flush the log device (DirtyLogOptions.readOnly). */
  readonly readOnly: boolean;
  /** Regions cleared since the last snapshot that carried clears (their records on the device still say dirty). */
  private readonly clearedSinceWritten: Uint8Array;
  /**
   * Regions whose record on the device may say clean: clean in the last buffer written, or in one being written.
   * Marking a region that is not in here needs no write (its dirty record is on the device, durable, since a mark
   * is always written with a device flush): a region cleared and written to again before its clean record went
   * out costs no log I/O, as with md's bitmap.
   */
  private readonly onDeviceMaybeClean: Uint8Array;

  constructor(
    readonly device: BlockDevice,
    readonly label: string,
    options: DirtyLogOptions,
    regionCount: number,
    private readonly flushLegs: (() => Promise<void>) | undefined,
  ) {
    this.readOnly = options.readOnly === true;
    this.buffer = new Uint8Array(diskLogBufferBytes(regionCount, device.logicalBlockSizeBytes));
    const bits = this.buffer.subarray(DISK_LOG_BITS_OFFSET_BYTES, DISK_LOG_BITS_OFFSET_BYTES + dmLogBitsetBytes(regionCount));
    this.state = new DmLogState('disk', options.regionSizeSectors, options.initialSync, options, bits);
    // Until resume has written the log, nothing is known about the device: every mark is written.
    this.onDeviceMaybeClean = new Uint8Array(bits.byteLength).fill(0xff);
    this.state.markNeedsWrite = (region) => (this.onDeviceMaybeClean[region >>> 3] & (1 << (region & 7))) !== 0;
    this.clearedSinceWritten = new Uint8Array(bits.byteLength);
    this.state.onClear = (region) => {
      this.clearedSinceWritten[region >>> 3] |= 1 << (region & 7);
    };
  }

  private bitsOf(buffer: Uint8Array): Uint8Array {
    return buffer.subarray(DISK_LOG_BITS_OFFSET_BYTES, DISK_LOG_BITS_OFFSET_BYTES + this.state.bitsetBytes);
  }

  get failed(): boolean {
    return this.deviceFailed || this.deviceFlushFailed;
  }

  statusChar(): string {
    return this.deviceFlushFailed ? 'F' : this.deviceFailed ? 'D' : 'A';
  }

  private writeHeader(regionCount: number): void {
    const v = new DataView(this.buffer.buffer, this.buffer.byteOffset, 16);
    v.setUint32(0, DISK_LOG_MAGIC, true);
    v.setUint32(4, DISK_LOG_VERSION, true);
    v.setBigUint64(8, BigInt(regionCount), true);
  }

  /** Linux disk_resume. Resolves even when the device fails (the log is then failed: status D or F). */
  async resume(): Promise<void> {
    const st = this.state;
    let known = 0;
    const disk = new Uint8Array(this.buffer.byteLength);
    let readOk = true;
    try {
      await this.device.read(sectors(0), disk);
    } catch {
      readOk = false;
      this.deviceFailed = true;
    }
    if (readOk) {
      const h = parseDiskLogHeader(disk);
      const fresh = st.sync !== 'resync' || h.magic !== DISK_LOG_MAGIC;
      // Version 1 was the same layout on little-endian machines (the kernel upgrades it in place).
      if (!fresh && h.version !== DISK_LOG_VERSION && h.version !== 1) this.deviceFailed = true;
      else if (!fresh) {
        known = Math.min(h.regionCount, st.regionCount);
        this.buffer.set(disk.subarray(DISK_LOG_BITS_OFFSET_BYTES, DISK_LOG_BITS_OFFSET_BYTES + st.bitsetBytes), DISK_LOG_BITS_OFFSET_BYTES);
      }
    }
    const bits = st.cleanBits;
    for (let r = known; r < st.regionCount; r++) {
      if (st.sync === 'nosync') bits[r >>> 3] |= 1 << (r & 7);
      else bits[r >>> 3] &= ~(1 << (r & 7));
    }
    // Bits past the last region are always clear (the kernel clears them to the end of the last word).
    for (let r = st.regionCount; r < st.bitsetBytes * 8; r++) bits[r >>> 3] &= ~(1 << (r & 7));
    st.syncFromClean();
    this.writeHeader(st.regionCount);
    st.touchedDirtied = false;
    st.touchedCleaned = false;
    this.clearedSinceWritten.fill(0);
    if (this.failed || this.readOnly) return;
    try {
      await this.device.write(sectors(0), this.buffer.slice());
    } catch {
      this.deviceFailed = true;
      return;
    }
    try {
      await this.device.flush();
    } catch {
      this.deviceFlushFailed = true;
      return;
    }
    this.onDeviceMaybeClean.set(this.state.cleanBits);
  }

  flush(options?: DirtyLogFlushOptions): Promise<void> {
    if (this.failed) return Promise.reject(new DmError('DM_IO', `disk log ${this.label}: the log device has failed`));
    const st = this.state;
    if (this.readOnly) return this.readOnlyFlush();
    const clears = options?.clears !== false;
    const needMarks = st.touchedDirtied;
    const needClears = clears && st.touchedCleaned;
    if (this.inFlight === undefined) {
      if (needClears) return this.start(false);
      return needMarks ? this.start(true) : RESOLVED;
    }
    // Nothing changed since the flush in flight took its snapshot: the caller's marks are in it (or, when only
    // marks matter and that flush carries none, every mark is durable already).
    if (!needMarks && !needClears) return clears || this.inFlightCarriesMarks ? this.inFlight : RESOLVED;
    this.nextWantsClears ||= clears;
    this.next ??= this.inFlight
      .catch(() => undefined)
      .then(() => {
        this.next = undefined;
        const withClears = this.nextWantsClears;
        this.nextWantsClears = false;
        return this.flush({ clears: withClears });
      });
    return this.next;
  }

  /** A read-only log's flush: nothing is written; a mark cannot be made durable, clears are dropped. */
  private readOnlyFlush(): Promise<void> {
    const st = this.state;
    const marks = st.touchedDirtied;
    st.touchedDirtied = false;
    st.touchedCleaned = false;
    this.clearedSinceWritten.fill(0);
    if (marks) return Promise.reject(new DmError('DM_IO', `disk log ${this.label}: read-only (a replayed pool's pinned mirror): a mark cannot be written`));
    return RESOLVED;
  }

  private start(marksOnly: boolean): Promise<void> {
    this.inFlightCarriesMarks = this.state.touchedDirtied;
    const p = this.write(marksOnly);
    this.inFlight = p;
    const done = (): void => {
      if (this.inFlight === p) this.inFlight = undefined;
    };
    p.then(done, done);
    return p;
  }

  /**
   * One flush: snapshot (synchronously, before any await), flush the legs if it carries clears, write, flush.
   * `marksOnly`: the snapshot keeps the regions cleared since the last clears went out dirty, as the device has
   * them, so that a mark needs no leg flush; the clears go out with the next flush that asks for them.
   */
  private async write(marksOnly: boolean): Promise<void> {
    if (this.readOnly) throw new DmError('DM_IO', `disk log ${this.label}: read-only (a replayed pool's pinned mirror)`);
    const st = this.state;
    let dirtied = st.touchedDirtied;
    const cleaned = !marksOnly && st.touchedCleaned;
    st.touchedDirtied = false;
    let snapshot = this.buffer.slice();
    if (marksOnly) {
      const bits = this.bitsOf(snapshot);
      for (let i = 0; i < bits.byteLength; i++) bits[i] &= ~this.clearedSinceWritten[i];
    } else {
      st.touchedCleaned = false;
      this.clearedSinceWritten.fill(0);
    }
    // From the moment the snapshot exists, a region clean in it may become clean on the device: a mark made from
    // now on must be written again (it must not count on a dirty record this write is about to overwrite).
    let snapshotBits = this.bitsOf(snapshot);
    for (let i = 0; i < snapshotBits.byteLength; i++) this.onDeviceMaybeClean[i] |= snapshotBits[i];
    if (cleaned && this.flushLegs) {
      try {
        await this.flushLegs();
      } catch {
        // Linux: "it is impossible to determine which regions are clean", so every region becomes dirty.
        st.flushFailed = true;
        st.markAllDirty();
        st.touchedDirtied = false;
        snapshot = this.buffer.slice();
        snapshotBits = this.bitsOf(snapshot);
        dirtied = true;
      }
    }
    try {
      await this.device.write(sectors(0), snapshot);
    } catch (err) {
      this.deviceFailed = true;
      throw new DmError('DM_IO', `disk log ${this.label}: writing the log failed`, { cause: err });
    }
    if (dirtied) {
      try {
        await this.device.flush();
      } catch (err) {
        this.deviceFlushFailed = true;
        throw new DmError('DM_IO', `disk log ${this.label}: flushing the log device failed`, { cause: err });
      }
    }
    // Flushes run one at a time: the device now holds exactly this snapshot (a record it says is dirty is durable:
    // only a written mark makes a record dirty, and a mark is always flushed).
    this.onDeviceMaybeClean.set(snapshotBits);
  }
}

export const diskLog: DirtyLogType<DiskLog> = Object.freeze({
  name: 'disk',
  parseArgs(args: readonly string[]) {
    if (args.length < 2 || args.length > 3) throw new DmError('DM_TABLE_INVALID', 'disk log: wrong number of arguments to disk dirty region log');
    return { ...dmLogParseRegionArgs('disk', args.slice(1)), logPath: args[0], extra: {} };
  },
  async create(options: DirtyLogOptions) {
    const device = options.logDevice;
    if (!device) throw new DmError('DM_TABLE_INVALID', 'disk log: no log device');
    const label = options.logDeviceLabel ?? device.name;
    // Validates the region size and counts regions before anything is read.
    const probe = new DmLogState('disk', options.regionSizeSectors, options.initialSync, options);
    const needBytes = diskLogBufferBytes(probe.regionCount, device.logicalBlockSizeBytes);
    if (needBytes > device.sizeSectors * 512) {
      throw new DmError('DM_TABLE_INVALID', `disk log: log device ${label} too small: need ${needBytes} bytes`);
    }
    // A log of another version is refused here, before any table goes live (the kernel fails it at resume).
    const first = new Uint8Array(device.logicalBlockSizeBytes);
    const readable = await device.read(sectors(0), first).then(
      () => true,
      () => false,
    );
    if (readable && options.initialSync === 'resync') {
      const h = parseDiskLogHeader(first);
      if (h.magic === DISK_LOG_MAGIC && h.version !== DISK_LOG_VERSION && h.version !== 1) {
        throw new DmError('DM_TABLE_INVALID', `disk log: ${label}: incompatible disk log version ${h.version}`);
      }
    }
    return new DiskLog(device, label, options, probe.regionCount, options.flushLegs);
  },
  regionCount: (log: DiskLog) => log.state.regionCount,
  isClean: (log: DiskLog, region: number) => log.state.isClean(region),
  inSync: (log: DiskLog, region: number) => log.state.inSync(region),
  markRegion(log: DiskLog, region: number) {
    log.state.checkRegion(region);
    log.state.mark(region);
  },
  clearRegion(log: DiskLog, region: number) {
    log.state.checkRegion(region);
    log.state.clear(region);
  },
  flush: (log: DiskLog, options?: DirtyLogFlushOptions) => log.flush(options),
  getResyncWork: (log: DiskLog) => log.state.getResyncWork(),
  setRegionSync(log: DiskLog, region: number, inSync: boolean) {
    log.state.checkRegion(region);
    log.state.setRegionSync(region, inSync);
  },
  syncCount: (log: DiskLog) => log.state.syncCount,
  setDegraded(log: DiskLog, degraded: boolean) {
    log.state.degraded = degraded;
  },
  status: (log: DiskLog) => `3 disk ${log.label} ${log.statusChar()}`,
  table: (log: DiskLog) => `disk ${log.state.sync === 'resync' ? 2 : 3} ${log.label} ${log.state.regionSizeSectors}${dmLogSyncSuffix(log.state.sync)}`,
  async suspend(log: DiskLog) {
    if (!log.failed) await log.flush().catch(() => undefined);
  },
  resume: (log: DiskLog) => log.resume(),
  async close(log: DiskLog) {
    log.closed = true;
  },
});

/** Reads the clean bits of a disk log image (tools and tests): region r is clean when bits[r] is true. */
export function readDiskLogCleanBits(image: Uint8Array): { header: DiskLogHeader; clean: boolean[] } {
  const header = parseDiskLogHeader(image);
  const clean: boolean[] = [];
  for (let r = 0; r < header.regionCount; r++) {
    const byte = image[DISK_LOG_BITS_OFFSET_BYTES + (r >>> 3)];
    clean.push(byte !== undefined && (byte & (1 << (r & 7))) !== 0);
  }
  return { header, clean };
}
