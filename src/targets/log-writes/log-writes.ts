/**
 * `log-writes <dev> <logdev>`: passes I/O through to <dev> and logs every write, flush, discard and mark to
 * <logdev> in the Linux dm-log-writes format (format.ts), so fstests' replay-log and `dmstate replay-writes`
 * can rebuild <dev> at any point (Linux drivers/md/dm-log-writes.c, target version 1.1.0).
 *
 * The log shows what reached stable storage, in the order it did (the kernel's comment: W = write, C = complete,
 * `Wa,Wb,Wc,Cc,Ca,FLUSH,FUAd,Cb,CFLUSH,CFUAd` logs `c,a,b,flush,fuad,...`):
 * - a write is logged only after it completes, and then only when a flush that covers it completes: it waits on
 *   the unflushed list until a flush is *submitted* (the flush takes the list then) and is logged, with the
 *   others that flush took, just before the flush entry when that flush completes;
 * - a FUA write is logged as soon as it completes; a discard waits for a flush like a write (the kernel treats
 *   discards as cached so that they keep their order with the writes);
 * - a mark (`dmsetup message DEV 0 mark NAME`) is logged at once; the super block is rewritten after every FUA
 *   and mark entry (not after flushes: the kernel does not either);
 * - removing the table logs the writes still unflushed and a `dm-log-writes-end` mark.
 * In a read-only replayed pool whose log-writes table is pinned (src/replay/pinned-files.ts), logging is off from
 * the start (status `logging_disabled`, as the kernel's after a log error): the log the pool had stays as it is,
 * end mark included.
 *
 * Completion: a plain write or discard completes when the device below completes it (its entry comes later, with
 * a flush); a flush completes once its entries and the flush entry are on the log device; a FUA write once its
 * entry and the super that counts it are. The kernel completes flush and FUA bios without waiting for the log
 * writer; waiting gives the same log and means a completed flush or FUA is in the log when its caller goes on.
 *
 * Kernel quirks kept: the target passes a bio's sector through unchanged (no dm_target_offset), so a log-writes
 * line that does not start at sector 0 writes <dev> at the mapped device's sector; a failed write is logged all
 * the same (normal_end_io does not look at the error); extra table arguments are ignored.
 */
import type { Sector } from '../../block/units.js';
import { SECTOR_SIZE_BYTES } from '../../block/units.js';
import { MAP_HELD, MAP_KILL, MAP_REMAPPED, type Bio } from '../../core/bio.js';
import { DmError } from '../../core/errors.js';
import type { DeviceRef, TargetContext, TargetType } from '../../core/target-contract.js';
import { pinnedFileLabels } from '../../replay/pinned-files.js';
import {
  encodeEntryHeader,
  encodeMarkBlock,
  END_MARK_NAME,
  isValidBlockSize,
  LOG_DISCARD_FLAG,
  LOG_FLUSH_FLAG,
  LOG_FUA_FLAG,
  LOG_MARK_FLAG,
} from './format.js';
import { LogWriter, type PendingEntry } from './log-writer.js';

interface LogWritesInstance {
  readonly dev: DeviceRef;
  readonly logdev: DeviceRef;
  readonly ctx: TargetContext;
  readonly writer: LogWriter;
  /** The logged device's logical block size: the log's block size. */
  readonly blockSizeBytes: number;
  /** 512-byte sectors per log block. */
  readonly blockSectors: number;
  /** Completed writes and discards that no flush has taken yet (Linux unflushed_blocks). */
  unflushed: PendingEntry[];
}

/** A write or discard entry; for a write, `data` is copied after the entry block at once (the caller may reuse it). */
function makeEntry(inst: LogWritesInstance, bio: Bio, flags: number, data: Uint8Array | undefined): PendingEntry {
  const b = inst.blockSizeBytes;
  const record = Buffer.allocUnsafe(b + (data ? data.byteLength : 0));
  record.fill(0, 0, b);
  const nrSectors = bio.lengthSectors / inst.blockSectors;
  encodeEntryHeader({ sector: Math.floor(bio.sector / inst.blockSectors), nrSectors, flags, dataLenBytes: 0 }, record);
  if (data) record.set(data, b);
  return { flags, nrSectors, record };
}

function flushEntry(inst: LogWritesInstance): PendingEntry {
  const record = Buffer.alloc(inst.blockSizeBytes);
  // Linux logs the flush bio's sector: 0 for the empty flushes the core sends.
  encodeEntryHeader({ sector: 0, nrSectors: 0, flags: LOG_FLUSH_FLAG, dataLenBytes: 0 }, record);
  return { flags: LOG_FLUSH_FLAG, nrSectors: 0, record };
}

/** Queues a mark (Linux log_mark); resolves when it and the super counting it are on the log device. */
function logMark(inst: LogWritesInstance, name: string): Promise<void> {
  return inst.writer.append({ flags: LOG_MARK_FLAG, nrSectors: 0, record: encodeMarkBlock(name, inst.blockSizeBytes) });
}

function mapWrite(inst: LogWritesInstance, bio: Bio, ctx: TargetContext): void {
  const entry = makeEntry(inst, bio, bio.fua ? LOG_FUA_FLAG : 0, bio.buf);
  const dev = inst.dev.device;
  const io = bio.fua ? dev.write(bio.sector, bio.buf, { fua: true }) : dev.write(bio.sector, bio.buf);
  io.then(
    () => endWrite(inst, bio, ctx, entry, undefined),
    (err: unknown) => endWrite(inst, bio, ctx, entry, err),
  );
}

/** Linux normal_end_io for a write or discard: FUA to the log now, the rest to the unflushed list. */
function endWrite(inst: LogWritesInstance, bio: Bio, ctx: TargetContext, entry: PendingEntry, err: unknown): void {
  if ((entry.flags & LOG_FUA_FLAG) !== 0) {
    void inst.writer.append(entry).then(() => ctx.endBio(bio, err));
    return;
  }
  inst.unflushed.push(entry);
  ctx.endBio(bio, err);
}

function mapFlush(inst: LogWritesInstance, bio: Bio, ctx: TargetContext): void {
  // The flush covers what completed before it was submitted; later completions wait for the next flush.
  const covered = inst.unflushed;
  inst.unflushed = [];
  const entry = flushEntry(inst);
  const end = (err: unknown): void => {
    const logged = covered.map((e) => inst.writer.append(e));
    logged.push(inst.writer.append(entry));
    void Promise.all(logged).then(() => ctx.endBio(bio, err));
  };
  inst.dev.device.flush().then(() => end(undefined), end);
}

function mapDiscard(inst: LogWritesInstance, bio: Bio, ctx: TargetContext): void {
  const entry = makeEntry(inst, bio, LOG_DISCARD_FLAG, undefined);
  const dev = inst.dev.device;
  // Linux advertises discards even over a device without them, and then only logs them.
  const io = dev.supports.discard ? dev.discard(bio.sector, bio.lengthSectors) : Promise.resolve();
  io.then(
    () => endWrite(inst, bio, ctx, entry, undefined),
    (err: unknown) => endWrite(inst, bio, ctx, entry, err),
  );
}

export const logWritesTarget: TargetType<LogWritesInstance> = Object.freeze({
  name: 'log-writes',
  version: [1, 1, 0] as const,
  argCountMin: 2,
  // The kernel reads two arguments and ignores any more.
  argCountMax: Number.MAX_SAFE_INTEGER,
  async ctr(args: readonly string[], ctx: TargetContext) {
    const dev = await ctx.openDevice(args[0]);
    const logdev = await ctx.openDevice(args[1]);
    if (ctx.lengthSectors > dev.device.sizeSectors) {
      throw new DmError('DM_TABLE_INVALID', `log-writes: ${dev.label} too small for target: start=0, len=${ctx.lengthSectors}, dev_size=${dev.device.sizeSectors}`);
    }
    const blockSizeBytes = dev.device.logicalBlockSizeBytes;
    if (!isValidBlockSize(blockSizeBytes)) throw new DmError('DM_TABLE_INVALID', `log-writes: ${dev.label} has an unsupported logical block size ${blockSizeBytes}`);
    if (blockSizeBytes % logdev.device.logicalBlockSizeBytes !== 0) {
      throw new DmError(
        'DM_TABLE_INVALID',
        `log-writes: log device ${logdev.label} has ${logdev.device.logicalBlockSizeBytes}-byte blocks, larger than ${dev.label}'s ${blockSizeBytes}`,
      );
    }
    const writer = new LogWriter(logdev.device, blockSizeBytes);
    const pinned = await pinnedFileLabels(ctx.log, [dev.label, logdev.label]);
    if (pinned.length > 0) {
      writer.enabled = false;
      writer.disabledReason = `${pinned.join(', ')} pinned by a read-only replayed pool`;
    }
    return {
      dev,
      logdev,
      ctx,
      writer,
      blockSizeBytes,
      blockSectors: blockSizeBytes / SECTOR_SIZE_BYTES,
      unflushed: [],
    };
  },
  async dtr(inst: LogWritesInstance) {
    // Linux log_writes_dtr: what no flush took is logged now, then an end mark (which rewrites the super).
    const rest = inst.unflushed;
    inst.unflushed = [];
    for (const e of rest) void inst.writer.append(e);
    await logMark(inst, END_MARK_NAME);
    await inst.writer.drain();
  },
  map(inst: LogWritesInstance, bio: Bio, ctx: TargetContext) {
    const logging = inst.writer.enabled && bio.op !== 'read' && (bio.op === 'flush' || bio.lengthSectors > 0);
    // The kernel's queue limits keep bios aligned to the device's block size; dmstate's mapped devices take
    // 512-byte I/O, so an unaligned bio over a larger-block device fails here rather than being half logged.
    if (inst.blockSectors > 1 && (bio.sector % inst.blockSectors !== 0 || bio.lengthSectors % inst.blockSectors !== 0)) return MAP_KILL;
    if (!logging) {
      bio.remapDevice = inst.dev.device;
      bio.remapSector = bio.sector;
      return MAP_REMAPPED;
    }
    if (bio.op === 'write') mapWrite(inst, bio, ctx);
    else if (bio.op === 'flush') mapFlush(inst, bio, ctx);
    else mapDiscard(inst, bio, ctx);
    return MAP_HELD;
  },
  async blockStatus(inst: LogWritesInstance, offsetSectors: Sector, lengthSectors: Sector) {
    // Same sectors as the bios: the target's offset is not subtracted (see the quirk above).
    const begin = inst.ctx.beginSector;
    const below = await inst.dev.device.blockStatus((begin + offsetSectors) as Sector, lengthSectors);
    return below.map((e) => ({ ...e, startSector: (e.startSector - begin) as Sector }));
  },
  status: (inst: LogWritesInstance) => `${inst.writer.loggedEntries} ${inst.writer.nextSector - 1}${inst.writer.enabled ? '' : ' logging_disabled'}`,
  table: (inst: LogWritesInstance) => `${inst.dev.label} ${inst.logdev.label}`,
  takesMarks: true,
  async message(inst: LogWritesInstance, args: readonly string[]) {
    if (args.length !== 2) {
      throw new DmError('DM_INVALID_ARGUMENT', `log-writes: Invalid log-writes message arguments, expect 2 arguments, got ${args.length}`);
    }
    if (args[0].toLowerCase() !== 'mark') throw new DmError('DM_UNKNOWN_COMMAND', `log-writes: Unrecognised log writes target message received: ${args[0]}`);
    await logMark(inst, args[1]);
    return '';
  },
});
