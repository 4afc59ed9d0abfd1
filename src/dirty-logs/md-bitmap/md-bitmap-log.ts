/**
 * `md-bitmap`: a mirror's dirty-region log kept as an md write-intent bitmap file (md-bitmap.ts), which
 * `mdadm -X` reads and the kernel's md can use. One bitmap chunk per mirror region.
 *
 * Table: `md-bitmap <#args> <bitmap_dev> <chunk_sectors> <daemon_sleep_s> [sync|nosync] [offset <sectors>]`
 *
 *   bitmap_dev      the bitmap file (or device); `dmstate bitmap create` makes one, as mdadm --create-bitmap does
 *   chunk_sectors   the region size: a power of two, at most the mirror's length (mdadm --bitmap-chunk); a file
 *                   that exists must have this chunk size unless `sync`/`nosync` rewrites it
 *   daemon_sleep_s  seconds between daemon passes (mdadm --delay), 1 to 86400; written to the superblock
 *   sync|nosync     as dm-log: resync every region / declare every region in sync (the bitmap is rewritten);
 *                   without either the file is trusted: set bits are resynced
 *   offset N        the superblock is N sectors into bitmap_dev (a bitmap inside one of the legs' files, past the
 *                   mirror's data); a multiple of the device's logical block
 *
 * e.g. `mirror md-bitmap 3 bm.img 128 5 2 a.img 0 b.img 0`.
 *
 * The mirror calls markRegion on a region's first write in flight (md startwrite: the bit is set), flush() before
 * the data (md unplug: the page is written and flushed), clearRegion when the writes drained (md endwrite; the
 * daemon clears the bit 2–3 periods later). A region a leg missed (setRegionSync false) or written while degraded
 * is NEEDED: never cleared until a resync.
 *
 * Status: `3 md-bitmap <bitmap_dev> <A|D|F>` (A alive, D a read or write failed, F a flush failed).
 *
 * Read-only (DirtyLogOptions.readOnly, a pinned mirror of a replayed pool): the file is read at resume and never
 * written (md-bitmap.ts); status stays `A`.
 */
import { sectors } from '../../block/units.js';
import { assert } from '../../core/assert.js';
import { DmError } from '../../core/errors.js';
import { parseUnsigned } from '../../core/parse-number.js';
import type { DirtyLogFlushOptions, DirtyLogOptions, DirtyLogType } from '../contract.js';
import { mdCounterResync } from './counters.js';
import { MD_BITMAP_CHUNK_COUNT_MAX, MD_BITMAP_PAGE_BYTES, MdBitmap, checkMdBitmapGeometry, mdBitmapDeviceBytes, type MdBitmapInitialSync } from './md-bitmap.js';
import {
  MD_BITMAP_CHUNK_SIZE_BYTES_MAX,
  MD_BITMAP_DAEMON_SLEEP_SECONDS_DEFAULT,
  MD_BITMAP_DAEMON_SLEEP_SECONDS_MAX,
  decodeMdBitmapSuperblock,
  isBlankMdBitmapSuperblock,
  validateMdBitmapSuperblock,
} from './superblock.js';

const TYPE = 'md-bitmap';

const invalid = (reason: string, cause?: unknown): DmError => new DmError('DM_TABLE_INVALID', `${TYPE} log: ${reason}`, cause === undefined ? undefined : { cause });

function parseCount(text: string, what: string): number {
  try {
    return parseUnsigned(text, what);
  } catch (err) {
    throw invalid(`invalid ${what} "${text}"`, err);
  }
}

export class MdBitmapLog {
  closed = false;
  /** Where getResyncWork looks next. */
  resyncCursor = 0;

  constructor(
    readonly bitmap: MdBitmap,
    readonly initialSync: MdBitmapInitialSync,
    /** The table's arguments after the count, as `dmsetup table` prints them. */
    readonly tableArgs: readonly string[],
  ) {}

  statusChar(): string {
    return this.bitmap.deviceFlushFailed ? 'F' : this.bitmap.deviceFailed ? 'D' : 'A';
  }

  checkRegion(region: number): void {
    if (!Number.isSafeInteger(region) || region < 0 || region >= this.bitmap.chunkCount) {
      throw new DmError('DM_INVALID_ARGUMENT', `${TYPE} log: region ${region} is outside 0..${this.bitmap.chunkCount - 1}`);
    }
  }
}

/** Parses `<bitmap_dev> <chunk_sectors> <daemon_sleep_s> [sync|nosync] [offset <sectors>]`. */
function parseMdBitmapArgs(args: readonly string[]) {
  if (args.length < 3 || args.length > 6) throw invalid(`wrong number of arguments (${args.length}): <bitmap_dev> <chunk_sectors> <daemon_sleep_s> [sync|nosync] [offset <sectors>]`);
  const [logPath, chunkText, sleepText] = args;
  const regionSizeSectors = sectors(parseCount(chunkText, 'chunk size'));
  const daemonSleepSeconds = parseCount(sleepText, 'daemon sleep');
  if (daemonSleepSeconds < 1 || daemonSleepSeconds > MD_BITMAP_DAEMON_SLEEP_SECONDS_MAX) {
    throw invalid(`daemon sleep ${daemonSleepSeconds} s is out of range (1 to ${MD_BITMAP_DAEMON_SLEEP_SECONDS_MAX})`);
  }
  let initialSync: MdBitmapInitialSync = 'resync';
  let offsetSectors = 0;
  let sawSync = false;
  let sawOffset = false;
  for (let i = 3; i < args.length; i++) {
    const a = args[i];
    if ((a === 'sync' || a === 'nosync') && !sawSync) {
      initialSync = a;
      sawSync = true;
    } else if (a === 'offset' && !sawOffset) {
      if (i + 1 >= args.length) throw invalid('offset needs a number of sectors');
      offsetSectors = parseCount(args[++i], 'offset');
      sawOffset = true;
    } else throw invalid(`unrecognised or repeated argument "${a}"`);
  }
  return { logPath, regionSizeSectors, initialSync, daemonSleepSeconds, offsetSectors };
}

export const mdBitmapLog: DirtyLogType<MdBitmapLog> = Object.freeze({
  name: TYPE,
  parseArgs(args: readonly string[]) {
    const a = parseMdBitmapArgs(args);
    return {
      regionSizeSectors: a.regionSizeSectors,
      initialSync: a.initialSync,
      logPath: a.logPath,
      extra: { daemonSleepSeconds: String(a.daemonSleepSeconds), offsetSectors: String(a.offsetSectors) },
    };
  },

  async create(options: DirtyLogOptions) {
    const device = options.logDevice;
    if (!device) throw invalid('no bitmap device');
    const label = options.logDeviceLabel ?? device.name;
    const chunkSizeSectors = options.regionSizeSectors as number;
    const targetSectors = options.targetSizeSectors as number;
    if (!Number.isSafeInteger(chunkSizeSectors) || chunkSizeSectors < 1 || (chunkSizeSectors & (chunkSizeSectors - 1)) !== 0 || chunkSizeSectors > targetSectors) {
      throw invalid(`invalid chunk size ${chunkSizeSectors} (a power of two from 1 to the target length ${targetSectors} sectors)`);
    }
    if (chunkSizeSectors * 512 > MD_BITMAP_CHUNK_SIZE_BYTES_MAX) throw invalid(`chunk size ${chunkSizeSectors} sectors is over md's ${MD_BITMAP_CHUNK_SIZE_BYTES_MAX} bytes`);
    const chunkCount = Math.ceil(targetSectors / chunkSizeSectors);
    if (chunkCount > MD_BITMAP_CHUNK_COUNT_MAX) throw invalid(`${chunkCount} chunks exceed the limit of ${MD_BITMAP_CHUNK_COUNT_MAX}`);
    const extra = options.extra ?? {};
    const daemonSleepSeconds = extra.daemonSleepSeconds !== undefined ? parseCount(extra.daemonSleepSeconds, 'daemon sleep') : (options.daemonSleepSeconds ?? MD_BITMAP_DAEMON_SLEEP_SECONDS_DEFAULT);
    if (!Number.isSafeInteger(daemonSleepSeconds) || daemonSleepSeconds < 1 || daemonSleepSeconds > MD_BITMAP_DAEMON_SLEEP_SECONDS_MAX) {
      throw invalid(`daemon sleep ${daemonSleepSeconds} s is out of range (1 to ${MD_BITMAP_DAEMON_SLEEP_SECONDS_MAX})`);
    }
    const offsetSectors = extra.offsetSectors !== undefined ? parseCount(extra.offsetSectors, 'offset') : 0;
    const lbs = device.logicalBlockSizeBytes;
    if (lbs > MD_BITMAP_PAGE_BYTES) throw invalid(`${label}: logical block of ${lbs} bytes is larger than md's ${MD_BITMAP_PAGE_BYTES}-byte pages`);
    if ((offsetSectors * 512) % lbs !== 0) throw invalid(`offset ${offsetSectors} is not a multiple of ${label}'s ${lbs}-byte logical block`);
    const needBytes = offsetSectors * 512 + mdBitmapDeviceBytes(chunkCount, lbs);
    if (needBytes > device.sizeSectors * 512) {
      throw invalid(`bitmap device ${label} too small: ${chunkCount} chunks need ${needBytes} bytes from the start, it has ${device.sizeSectors * 512}`);
    }
    // Refuse what is not an md bitmap of this geometry before any table goes live; a blank device is a new bitmap.
    const first = new Uint8Array(Math.ceil(512 / lbs) * lbs);
    const readable = await device.read(sectors(offsetSectors), first).then(
      () => true,
      () => false,
    );
    if (readable && !isBlankMdBitmapSuperblock(first)) {
      const sb = decodeMdBitmapSuperblock(first);
      const why = validateMdBitmapSuperblock(sb) ?? checkMdBitmapGeometry(sb, sectors(chunkSizeSectors), options.initialSync === 'resync');
      if (why !== undefined) throw invalid(`${label}: not a usable md bitmap: ${why}`);
    }
    const bitmap = new MdBitmap({
      device,
      label,
      offsetSectors: sectors(offsetSectors),
      syncSizeSectors: options.targetSizeSectors,
      chunkSizeSectors: sectors(chunkSizeSectors),
      daemonSleepSeconds,
      clock: options.clock,
      flushLegs: options.flushLegs,
      readOnly: options.readOnly,
    });
    const tableArgs = [label, String(chunkSizeSectors), String(daemonSleepSeconds)];
    if (options.initialSync !== 'resync') tableArgs.push(options.initialSync);
    if (offsetSectors !== 0) tableArgs.push('offset', String(offsetSectors));
    return new MdBitmapLog(bitmap, options.initialSync, tableArgs);
  },

  regionCount: (log: MdBitmapLog) => log.bitmap.chunkCount,
  isClean: (log: MdBitmapLog, region: number) => log.bitmap.writesInFlight(region) === 0 && log.bitmap.inSync(region),
  inSync: (log: MdBitmapLog, region: number) => log.bitmap.inSync(region),

  markRegion(log: MdBitmapLog, region: number) {
    log.checkRegion(region);
    // The mirror marks a region once per write burst; md's COUNTER_MAX (16383 writers) is never near.
    assert(log.bitmap.canStartWrite(region), 'md-bitmap log: too many writes in flight to one region');
    log.bitmap.startWrite(region);
  },

  clearRegion(log: MdBitmapLog, region: number) {
    log.checkRegion(region);
    // After a resync (no write counted) the chunk is counting down already (endSync); nothing to uncount.
    if (log.bitmap.writesInFlight(region) === 0) return;
    log.bitmap.endWrite(region, log.bitmap.inSync(region));
  },

  flush: (log: MdBitmapLog, options?: DirtyLogFlushOptions) => log.bitmap.unplug(options),

  getResyncWork(log: MdBitmapLog) {
    const c = log.bitmap.takeResyncWork(log.resyncCursor);
    log.resyncCursor = c === undefined ? 0 : c + 1;
    return c;
  },

  setRegionSync(log: MdBitmapLog, region: number, inSync: boolean) {
    log.checkRegion(region);
    const b = log.bitmap;
    const resyncing = mdCounterResync(b.counters.get(region));
    if (inSync) {
      if (resyncing) b.endSync(region, false);
      else b.clearNeeded(region);
    } else if (resyncing) b.endSync(region, true);
    else b.setNeeded(region);
  },

  syncCount: (log: MdBitmapLog) => log.bitmap.chunkCount - log.bitmap.counters.flaggedCount,
  setDegraded: (log: MdBitmapLog, degraded: boolean) => log.bitmap.setDegraded(degraded),
  status: (log: MdBitmapLog) => `3 ${TYPE} ${log.tableArgs[0]} ${log.statusChar()}`,
  table: (log: MdBitmapLog) => `${TYPE} ${log.tableArgs.length} ${log.tableArgs.join(' ')}`,

  async suspend(log: MdBitmapLog) {
    // A failed bitmap writes nothing more; its status says so.
    await log.bitmap.flushAll().catch(() => undefined);
  },
  async resume(log: MdBitmapLog) {
    log.resyncCursor = 0;
    await log.bitmap.load(log.initialSync);
  },
  async close(log: MdBitmapLog) {
    log.closed = true;
    log.bitmap.close();
  },
});
