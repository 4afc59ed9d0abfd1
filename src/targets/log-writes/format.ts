/**
 * The dm-log-writes on-disk format (Linux drivers/md/dm-log-writes.c; read by fstests' src/log-writes).
 *
 *   block 0:     super  {magic u64, version u64, nr_entries u64, sectorsize u32}, zero-padded to one block
 *   then, nr_entries times:
 *     one block: entry  {sector u64, nr_sectors u64, flags u64, data_len u64}, then (marks only) the mark's
 *                       bytes, zero-padded to one block
 *     nr_sectors blocks of written data (not for discards, marks and flushes)
 *
 * All little-endian. A "block" is `sectorsize` bytes: the logical block size of the logged device (512 for most
 * devices). An entry's `sector` and `nr_sectors` count blocks of that size, not 512-byte sectors. `data_len` is
 * the length of the mark's bytes (0 for other entries; the kernel never sets it for writes).
 *
 * One job per function: encode or decode one structure. Reading a whole log is log-reader.ts.
 */
import { DmError } from '../../core/errors.js';

/** WRITE_LOG_MAGIC: the bytes "rhswfsj" read as a little-endian u64. */
export const LOG_WRITES_MAGIC = 0x6a736677736872n;
export const LOG_WRITES_VERSION = 1n;

export const LOG_FLUSH_FLAG = 1 << 0;
export const LOG_FUA_FLAG = 1 << 1;
export const LOG_DISCARD_FLAG = 1 << 2;
export const LOG_MARK_FLAG = 1 << 3;
export const LOG_METADATA_FLAG = 1 << 4;

/** sizeof(struct log_write_super) without padding: 3 × u64 + u32. */
export const SUPER_SIZE_BYTES = 28;
/** sizeof(struct log_write_entry). */
export const ENTRY_HEADER_SIZE_BYTES = 32;
/** Block sizes a log can have: a power of two from 512 (the kernel takes the device's logical block size). */
export const LOG_BLOCK_SIZE_MIN_BYTES = 512;
export const LOG_BLOCK_SIZE_MAX_BYTES = 64 * 1024;
/** The kernel's end-of-log mark, logged when the target is destroyed. */
export const END_MARK_NAME = 'dm-log-writes-end';

export interface LogSuper {
  /** Entries the log holds (the kernel updates it after each FUA and mark entry, so it may lag behind). */
  readonly nrEntries: number;
  /** Bytes per block: the logged device's logical block size. */
  readonly blockSizeBytes: number;
}

export interface LogEntryHeader {
  /** First block written or discarded, in blocks of the log's block size. */
  readonly sector: number;
  /** Blocks written or discarded (0 for flushes and marks). */
  readonly nrSectors: number;
  readonly flags: number;
  /** Bytes of mark data after the header (0 for everything but marks). */
  readonly dataLenBytes: number;
}

/** A log that cannot be read as dm-log-writes: bad magic, short file, malformed entry. */
export class LogFormatError extends DmError {
  constructor(message: string) {
    super('DM_INVALID_ARGUMENT', message);
    this.name = 'LogFormatError';
  }
}

export const isValidBlockSize = (bytes: number): boolean =>
  Number.isInteger(bytes) && bytes >= LOG_BLOCK_SIZE_MIN_BYTES && bytes <= LOG_BLOCK_SIZE_MAX_BYTES && (bytes & (bytes - 1)) === 0;

/** A u64 field as a safe integer; a larger value can only come from a corrupt log. */
function readU64(buf: Uint8Array, offset: number, what: string): number {
  const v = Buffer.from(buf.buffer, buf.byteOffset, buf.byteLength).readBigUInt64LE(offset);
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw new LogFormatError(`${what} is ${v}, larger than any real log holds`);
  return Number(v);
}

/** One block holding the super, zero-padded (what the kernel's log_super writes). */
export function encodeSuper(s: LogSuper): Buffer {
  if (!isValidBlockSize(s.blockSizeBytes)) throw new RangeError(`log block size ${s.blockSizeBytes} is not a power of two from 512 to 64 KiB`);
  const b = Buffer.alloc(s.blockSizeBytes);
  b.writeBigUInt64LE(LOG_WRITES_MAGIC, 0);
  b.writeBigUInt64LE(LOG_WRITES_VERSION, 8);
  b.writeBigUInt64LE(BigInt(s.nrEntries), 16);
  b.writeUInt32LE(s.blockSizeBytes, 24);
  return b;
}

/** Reads the super from the first bytes of a log (at least SUPER_SIZE_BYTES); checks magic, version, block size. */
export function decodeSuper(buf: Uint8Array): LogSuper {
  if (buf.byteLength < SUPER_SIZE_BYTES) throw new LogFormatError(`log is ${buf.byteLength} bytes, shorter than its super block (${SUPER_SIZE_BYTES} bytes)`);
  const b = Buffer.from(buf.buffer, buf.byteOffset, buf.byteLength);
  const magic = b.readBigUInt64LE(0);
  if (magic !== LOG_WRITES_MAGIC) {
    throw new LogFormatError(`not a dm-log-writes log: magic is 0x${magic.toString(16)}, expected 0x${LOG_WRITES_MAGIC.toString(16)}`);
  }
  const version = b.readBigUInt64LE(8);
  if (version !== LOG_WRITES_VERSION) throw new LogFormatError(`log version ${version} is not supported (only version ${LOG_WRITES_VERSION})`);
  const blockSizeBytes = b.readUInt32LE(24);
  if (!isValidBlockSize(blockSizeBytes)) throw new LogFormatError(`log block size ${blockSizeBytes} is not a power of two from 512 to 64 KiB`);
  return { nrEntries: readU64(b, 16, 'the entry count in the super block'), blockSizeBytes };
}

/** Writes an entry header into the first ENTRY_HEADER_SIZE_BYTES of `block` (the rest is the caller's). */
export function encodeEntryHeader(e: LogEntryHeader, block: Buffer): void {
  block.writeBigUInt64LE(BigInt(e.sector), 0);
  block.writeBigUInt64LE(BigInt(e.nrSectors), 8);
  block.writeBigUInt64LE(BigInt(e.flags), 16);
  block.writeBigUInt64LE(BigInt(e.dataLenBytes), 24);
}

/**
 * Reads an entry block (one whole block: the checks look past the header). Rejects what fstests' replay-log
 * calls malformed: an all-zero header (where a log that was cut short ends), and a non-mark entry whose first
 * byte after the header is not zero (entries are zero-padded; anything else is not an entry).
 */
export function decodeEntryBlock(block: Uint8Array): LogEntryHeader {
  if (block.byteLength < ENTRY_HEADER_SIZE_BYTES + 1) throw new LogFormatError(`entry block of ${block.byteLength} bytes is too short`);
  const flags = readU64(block, 16, 'entry flags');
  if (flags > 0xffff_ffff) throw new LogFormatError(`entry flags 0x${flags.toString(16)} are not dm-log-writes flags`);
  const nrSectors = readU64(block, 8, 'entry length');
  if (flags === 0 && nrSectors === 0) throw new LogFormatError('empty entry (all zero): the log ends before its super block says');
  if (flags !== LOG_MARK_FLAG && block[ENTRY_HEADER_SIZE_BYTES] !== 0) throw new LogFormatError('entry is not zero-padded: not an entry');
  const dataLenBytes = readU64(block, 24, 'entry data length');
  if ((flags & LOG_MARK_FLAG) !== 0 && dataLenBytes > block.byteLength - ENTRY_HEADER_SIZE_BYTES) {
    throw new LogFormatError(`mark of ${dataLenBytes} bytes does not fit in its ${block.byteLength}-byte entry block`);
  }
  return { sector: readU64(block, 0, 'entry sector'), nrSectors, flags, dataLenBytes };
}

/**
 * The most bytes of a mark name the kernel keeps: kstrndup(name, sectorsize - sizeof(entry) - 1), leaving room
 * for the NUL replay-log relies on.
 */
export const markNameMaxBytes = (blockSizeBytes: number): number => blockSizeBytes - ENTRY_HEADER_SIZE_BYTES - 1;

/** A mark's bytes as the kernel stores them: UTF-8, cut at the first NUL and at markNameMaxBytes. */
export function markBytes(name: string, blockSizeBytes: number): Buffer {
  let b = Buffer.from(name, 'utf8');
  const nul = b.indexOf(0);
  if (nul >= 0) b = b.subarray(0, nul);
  return b.subarray(0, Math.min(b.byteLength, markNameMaxBytes(blockSizeBytes)));
}

/** One entry block for a mark: header plus the name's bytes, zero-padded. */
export function encodeMarkBlock(name: string, blockSizeBytes: number): Buffer {
  const data = markBytes(name, blockSizeBytes);
  const block = Buffer.alloc(blockSizeBytes);
  encodeEntryHeader({ sector: 0, nrSectors: 0, flags: LOG_MARK_FLAG, dataLenBytes: data.byteLength }, block);
  data.copy(block, ENTRY_HEADER_SIZE_BYTES);
  return block;
}

/** The mark name in an entry block decoded by decodeEntryBlock (undefined for non-mark entries). */
export function decodeMarkName(header: LogEntryHeader, block: Uint8Array): string | undefined {
  if ((header.flags & LOG_MARK_FLAG) === 0) return undefined;
  return Buffer.from(block.buffer, block.byteOffset + ENTRY_HEADER_SIZE_BYTES, header.dataLenBytes).toString('utf8');
}

/** Blocks an entry takes in the log: its entry block, and its data unless it is a discard. */
export const entryLogBlocks = (e: LogEntryHeader): number => 1 + ((e.flags & LOG_DISCARD_FLAG) !== 0 ? 0 : e.nrSectors);

const FLAG_NAMES: ReadonlyArray<readonly [number, string]> = [
  [LOG_FLUSH_FLAG, 'FLUSH'],
  [LOG_FUA_FLAG, 'FUA'],
  [LOG_DISCARD_FLAG, 'DISCARD'],
  [LOG_MARK_FLAG, 'MARK'],
  [LOG_METADATA_FLAG, 'METADATA'],
];

/** Flags as text, e.g. `FLUSH|FUA`, `NONE`, `MARK|UNKNOWN.0x40` (replay-log's style). */
export function flagsToString(flags: number): string {
  const parts: string[] = [];
  let rest = flags;
  for (const [bit, name] of FLAG_NAMES) {
    if ((flags & bit) !== 0) {
      parts.push(name);
      rest &= ~bit;
    }
  }
  if (rest !== 0) parts.push(`UNKNOWN.0x${rest.toString(16)}`);
  return parts.length === 0 ? 'NONE' : parts.join('|');
}
