/**
 * Reads a dm-log-writes log file entry by entry (fstests' log_open / log_seek_next_entry), checking as it goes:
 * the super block, every entry block (format.ts's decodeEntryBlock), and that each entry's data lies inside the
 * file. Errors are LogFormatErrors naming the entry and its place in the log.
 *
 * Synchronous positional reads through a read-ahead window: a log is read front to back, mostly in small
 * entry blocks, and this is a batch tool (the CLI), not the daemon's hot path.
 */
import * as fs from 'node:fs';
import {
  decodeEntryBlock,
  decodeMarkName,
  decodeSuper,
  entryLogBlocks,
  LOG_BLOCK_SIZE_MAX_BYTES,
  LOG_DISCARD_FLAG,
  LogFormatError,
  type LogEntryHeader,
  type LogSuper,
} from './format.js';

export interface LogEntry extends LogEntryHeader {
  /** 0 for the first entry after the super. */
  readonly index: number;
  /** Where the entry block starts in the log, in bytes. */
  readonly logOffsetBytes: number;
  /** The mark's name, for mark entries. */
  readonly markName?: string;
}

/** Bytes read at a time when the wanted range is not in the window. */
const WINDOW_BYTES = 4 * 1024 * 1024;

export class LogReader {
  /** The read-ahead window: bytes [windowStartBytes, windowStartBytes + windowBytes) of the log. */
  private storage = Buffer.alloc(0);
  private windowStartBytes = 0;
  private windowBytes = 0;
  private closed = false;

  private constructor(
    readonly path: string,
    private readonly fd: number,
    readonly sizeBytes: number,
    readonly header: LogSuper,
  ) {}

  /** Opens a log and checks its super block. */
  static open(path: string): LogReader {
    let fd: number;
    try {
      fd = fs.openSync(path, 'r');
    } catch (err) {
      throw new LogFormatError(`cannot open log ${path}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
    }
    try {
      const sizeBytes = fileSizeBytes(fd);
      const first = Buffer.alloc(Math.min(LOG_BLOCK_SIZE_MAX_BYTES, sizeBytes));
      fs.readSync(fd, first, 0, first.byteLength, 0);
      let header: LogSuper;
      try {
        header = decodeSuper(first);
      } catch (err) {
        throw new LogFormatError(`${path}: ${(err as Error).message}`);
      }
      if (sizeBytes < header.blockSizeBytes) throw new LogFormatError(`${path}: log is ${sizeBytes} bytes, shorter than its ${header.blockSizeBytes}-byte super block`);
      return new LogReader(path, fd, sizeBytes, header);
    } catch (err) {
      fs.closeSync(fd);
      throw err;
    }
  }

  get blockSizeBytes(): number {
    return this.header.blockSizeBytes;
  }

  /** The entries the super counts, in log order, each checked; stops early if the caller breaks. */
  *entries(): Generator<LogEntry> {
    const block = this.blockSizeBytes;
    let offset = block;
    for (let index = 0; index < this.header.nrEntries; index++) {
      const where = `entry ${index} of ${this.header.nrEntries} (log block ${offset / block}, byte ${offset})`;
      if (offset + block > this.sizeBytes) {
        throw new LogFormatError(`${this.path}: short log: ${where} lies past the end of the file (${this.sizeBytes} bytes)`);
      }
      const bytes = this.bytesAt(offset, block);
      let header: LogEntryHeader;
      try {
        header = decodeEntryBlock(bytes);
      } catch (err) {
        throw new LogFormatError(`${this.path}: malformed ${where}: ${(err as Error).message}`);
      }
      const endBytes = offset + entryLogBlocks(header) * block;
      if (endBytes > this.sizeBytes) {
        throw new LogFormatError(`${this.path}: short log: the data of ${where} (${header.nrSectors} blocks) runs past the end of the file (${this.sizeBytes} bytes)`);
      }
      yield { ...header, index, logOffsetBytes: offset, markName: decodeMarkName(header, bytes) };
      offset = endBytes;
    }
  }

  /** The data an entry wrote (a copy; empty for discards, flushes and marks). */
  readData(e: LogEntry): Buffer {
    if ((e.flags & LOG_DISCARD_FLAG) !== 0 || e.nrSectors === 0) return Buffer.alloc(0);
    const len = e.nrSectors * this.blockSizeBytes;
    return Buffer.from(this.bytesAt(e.logOffsetBytes + this.blockSizeBytes, len));
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    fs.closeSync(this.fd);
  }

  /** `len` bytes at `offset` (inside the file): a view into the window, valid until the next call. */
  private bytesAt(offset: number, len: number): Buffer {
    const start = this.windowStartBytes;
    if (offset >= start && offset + len <= start + this.windowBytes) return this.storage.subarray(offset - start, offset - start + len);
    const size = Math.min(Math.max(len, WINDOW_BYTES), this.sizeBytes - offset);
    if (this.storage.byteLength < size) this.storage = Buffer.alloc(size);
    let got = 0;
    while (got < size) {
      const n = fs.readSync(this.fd, this.storage, got, size - got, offset + got);
      if (n === 0) throw new LogFormatError(`${this.path}: short read at byte ${offset + got} (the file shrank while being read?)`);
      got += n;
    }
    this.windowStartBytes = offset;
    this.windowBytes = size;
    return this.storage.subarray(0, len);
  }
}

/** A regular file's size, or a block device's (fstat says 0 for those: seek to the end instead). */
export function fileSizeBytes(fd: number): number {
  const st = fs.fstatSync(fd);
  if (st.isFile()) return st.size;
  if (st.isBlockDevice()) return blockDeviceSizeBytes(st.rdev);
  throw new LogFormatError('not a regular file or block device');
}

/** Size of a block device from sysfs (/sys/dev/block/MAJ:MIN/size counts 512-byte sectors). */
function blockDeviceSizeBytes(rdev: number): number {
  // Linux's dev_t encoding (new_decode_dev): major in bits 8-19, minor in bits 0-7 and 20-31.
  const major = Math.floor(rdev / 0x100) & 0xfff;
  const minor = (rdev & 0xff) | (Math.floor(rdev / 0x1000) & 0xfff00);
  try {
    return Number(fs.readFileSync(`/sys/dev/block/${major}:${minor}/size`, 'utf8').trim()) * 512;
  } catch {
    throw new LogFormatError(`cannot tell the size of block device ${major}:${minor}`);
  }
}
