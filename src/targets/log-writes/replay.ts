/**
 * Replays a dm-log-writes log onto a device file, as fstests' replay-log does: from the first entry, an entry
 * number or just after a mark, apply each write (and discard, as zeroes) in log order until an end mark, the
 * next flush or FUA, a count of entries, or the end of the log; optionally run a check at every flush, every
 * FUA or every N entries, stopping at the first that fails. Flushes and marks change nothing on the device:
 * they are the points where the device, rebuilt up to there, is what a crash at that moment could have left.
 *
 * Two passes: planReplay() reads and checks every entry the replay will touch (and finds where it stops) before
 * replayLog() writes anything, so a corrupt or short log, a missing mark or a write past the device's end is
 * refused with the device unchanged. (replay-log checks as it goes and leaves a half-replayed device.)
 *
 * Differences from replay-log, on purpose: a discard is always replayed as zeroes (a regular file has no
 * BLKDISCARD, and replay-log skips zeroing discards over 128 MiB, leaving old data that a discard on a dmstate
 * device would not); an end or start mark that is not in the log is an error rather than a replay to the end.
 */
import * as fs from 'node:fs';
import { fileSizeBytes, type LogEntry, type LogReader } from './log-reader.js';
import { LOG_DISCARD_FLAG, LOG_FLUSH_FLAG, LOG_FUA_FLAG, LOG_MARK_FLAG, LogFormatError, markBytes } from './format.js';

/** Where the replay device's bytes go. */
export interface ReplayTarget {
  /** Bytes the device holds, or undefined when it cannot be told (then writes are not checked against it). */
  readonly sizeBytes: number | undefined;
  write(offsetBytes: number, data: Uint8Array): void;
  zero(offsetBytes: number, lengthBytes: number): void;
  /** Makes what was written durable (before a check and at the end). */
  sync(): void;
}

export interface ReplaySelection {
  /** Start at this entry (entries before it are not applied). */
  readonly startEntry?: number;
  /** Start just after this mark (the entries up to it are not applied). */
  readonly startMark?: string;
  /** Stop after this mark. */
  readonly endMark?: string;
  /** Stop after this many entries were replayed. */
  readonly limit?: number;
  /** Stop after the next flush / FUA entry (replay-log's --next-flush, --next-fua). */
  readonly stopAtFlush?: boolean;
  readonly stopAtFua?: boolean;
}

export interface ReplayPlan {
  readonly nrEntries: number;
  /** First entry to apply. */
  readonly firstIndex: number;
  /** Last entry to apply (inclusive); firstIndex - 1 when there is nothing to apply. */
  readonly lastIndex: number;
  /** Why the replay stops after lastIndex, for messages. */
  readonly stopReason: string;
  /** Bytes of written data the replay applies (discards not counted). */
  readonly dataBytes: number;
}

/** When to run the check: after every flush entry, every FUA entry, or every `count` entries replayed. */
export type CheckEvery = { readonly kind: 'flush' } | { readonly kind: 'fua' } | { readonly kind: 'entries'; readonly count: number };

export interface ReplayOptions {
  /** Apply discards (as zeroes); false is replay-log's --no-discard. */
  readonly discard?: boolean;
  readonly check?: {
    readonly every: CheckEvery;
    /** Runs the check on the device as rebuilt up to `entry`; resolves with its exit code (0 = good). */
    run(entry: LogEntry, replayedEntries: number): Promise<number>;
  };
  /** Called after each entry is applied (verbose listing, progress). */
  onEntry?(entry: LogEntry, replayedEntries: number, replayedBytes: number): void;
  /** Called for each entry before the start that is read and not applied. */
  onSkip?(entry: LogEntry): void;
}

export interface ReplayResult {
  readonly replayedEntries: number;
  /** Index of the last entry applied (-1 if none). */
  readonly lastIndex: number;
  readonly writtenBytes: number;
  readonly zeroedBytes: number;
  readonly checksRun: number;
  /** Set when a check failed: the replay stopped right after this entry. */
  readonly checkFailure?: { readonly entryIndex: number; readonly exitCode: number };
}

const isMark = (e: LogEntry, name: string, blockSizeBytes: number): boolean =>
  (e.flags & LOG_MARK_FLAG) !== 0 && e.markName === markBytes(name, blockSizeBytes).toString('utf8');

/**
 * Reads every entry up to where the replay will stop, checking each, and says which entries it applies. Throws
 * a LogFormatError for a corrupt or short log, a start/end mark or start entry that is not there, or a write
 * past the end of a device of `targetSizeBytes`.
 */
export function planReplay(reader: LogReader, sel: ReplaySelection, targetSizeBytes?: number): ReplayPlan {
  const nrEntries = reader.header.nrEntries;
  const block = reader.blockSizeBytes;
  if (sel.startEntry !== undefined && sel.startMark !== undefined) throw new LogFormatError('give a start entry or a start mark, not both');
  if (sel.startEntry !== undefined && sel.startEntry >= nrEntries) {
    throw new LogFormatError(`start entry ${sel.startEntry} is not in the log (it has ${nrEntries} entries)`);
  }
  let firstIndex = sel.startMark === undefined ? (sel.startEntry ?? 0) : -1;
  let lastIndex = -1;
  let stopReason = 'end of log';
  let replayed = 0;
  let dataBytes = 0;
  for (const e of reader.entries()) {
    if (firstIndex < 0) {
      if (isMark(e, sel.startMark!, block)) firstIndex = e.index + 1;
      continue;
    }
    if (e.index < firstIndex) continue;
    const bytes = e.nrSectors * block;
    if (targetSizeBytes !== undefined && bytes > 0 && e.sector * block + bytes > targetSizeBytes) {
      throw new LogFormatError(
        `entry ${e.index} ${(e.flags & LOG_DISCARD_FLAG) !== 0 ? 'discards' : 'writes'} bytes ${e.sector * block}..${e.sector * block + bytes} ` +
          `past the end of the replay device (${targetSizeBytes} bytes): is it the right device, of the logged device's size?`,
      );
    }
    if ((e.flags & LOG_DISCARD_FLAG) === 0) dataBytes += bytes;
    replayed++;
    lastIndex = e.index;
    if (sel.endMark !== undefined && isMark(e, sel.endMark, block)) {
      stopReason = `mark "${sel.endMark}"`;
      break;
    }
    if (sel.limit !== undefined && replayed === sel.limit) {
      stopReason = `limit of ${sel.limit} entries`;
      break;
    }
    if (sel.stopAtFlush && (e.flags & LOG_FLUSH_FLAG) !== 0) {
      stopReason = 'next flush';
      break;
    }
    if (sel.stopAtFua && (e.flags & LOG_FUA_FLAG) !== 0) {
      stopReason = 'next FUA';
      break;
    }
  }
  if (firstIndex < 0) throw new LogFormatError(`start mark "${sel.startMark}" is not in the log`);
  if (sel.endMark !== undefined && stopReason === 'end of log') {
    throw new LogFormatError(`end mark "${sel.endMark}" is not in the log${sel.startMark !== undefined || sel.startEntry ? ' after the start' : ''}`);
  }
  if (lastIndex < 0) lastIndex = firstIndex - 1;
  return { nrEntries, firstIndex, lastIndex, stopReason, dataBytes };
}

function checkDue(every: CheckEvery, e: LogEntry, replayed: number): boolean {
  switch (every.kind) {
    case 'flush':
      return (e.flags & LOG_FLUSH_FLAG) !== 0;
    case 'fua':
      return (e.flags & LOG_FUA_FLAG) !== 0;
    default:
      return replayed % every.count === 0;
  }
}

/** Applies the entries `plan` selected (planReplay first: this pass assumes the log was checked). */
export async function replayLog(reader: LogReader, target: ReplayTarget, plan: ReplayPlan, options: ReplayOptions = {}): Promise<ReplayResult> {
  const block = reader.blockSizeBytes;
  const discard = options.discard ?? true;
  let replayed = 0;
  let writtenBytes = 0;
  let zeroedBytes = 0;
  let checksRun = 0;
  let lastIndex = -1;
  let checkFailure: ReplayResult['checkFailure'];
  if (plan.lastIndex >= plan.firstIndex) {
    for (const e of reader.entries()) {
      if (e.index < plan.firstIndex) {
        options.onSkip?.(e);
        continue;
      }
      const bytes = e.nrSectors * block;
      if ((e.flags & LOG_DISCARD_FLAG) !== 0) {
        if (discard && bytes > 0) {
          target.zero(e.sector * block, bytes);
          zeroedBytes += bytes;
        }
      } else if (bytes > 0) {
        target.write(e.sector * block, reader.readData(e));
        writtenBytes += bytes;
      }
      replayed++;
      lastIndex = e.index;
      options.onEntry?.(e, replayed, writtenBytes);
      if (options.check && checkDue(options.check.every, e, replayed)) {
        target.sync();
        checksRun++;
        const exitCode = await options.check.run(e, replayed);
        if (exitCode !== 0) {
          checkFailure = { entryIndex: e.index, exitCode };
          break;
        }
      }
      if (e.index >= plan.lastIndex) break;
    }
  }
  target.sync();
  return { replayedEntries: replayed, lastIndex, writtenBytes, zeroedBytes, checksRun, checkFailure };
}

/** Zeroes are written in pieces of this size from one buffer. */
const ZERO_PIECE_BYTES = 1024 * 1024;

/**
 * An existing file or block device to replay onto (replay-log opens it O_WRONLY and never creates it: make a
 * fresh one of the logged device's size first, e.g. `truncate -s SIZE FILE`).
 */
export function openReplayFile(path: string): ReplayTarget & { close(): void } {
  let fd: number;
  try {
    fd = fs.openSync(path, 'r+');
  } catch (err) {
    throw new LogFormatError(`cannot open replay device ${path}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
  }
  let sizeBytes: number | undefined;
  try {
    sizeBytes = fileSizeBytes(fd);
  } catch {
    sizeBytes = undefined;
  }
  let zeroes: Buffer | undefined;
  const writeAll = (buf: Uint8Array, offsetBytes: number): void => {
    let done = 0;
    while (done < buf.byteLength) done += fs.writeSync(fd, buf, done, buf.byteLength - done, offsetBytes + done);
  };
  return {
    sizeBytes,
    write: (offsetBytes, data) => writeAll(data, offsetBytes),
    zero(offsetBytes, lengthBytes) {
      zeroes ??= Buffer.alloc(ZERO_PIECE_BYTES);
      for (let at = 0; at < lengthBytes; at += ZERO_PIECE_BYTES) {
        writeAll(zeroes.subarray(0, Math.min(ZERO_PIECE_BYTES, lengthBytes - at)), offsetBytes + at);
      }
    },
    sync: () => fs.fsyncSync(fd),
    close: () => fs.closeSync(fd),
  };
}
