/**
 * FileBlockDevice: a BlockDevice over a regular file, with positional I/O on one file descriptor.
 *
 * `syncIo: true` (the default) calls fs.readSync / fs.writeSync on the event loop thread: for page-cache I/O of
 * a few KiB this costs ~11 µs, while a hop through libuv's thread pool costs ~65 µs. It blocks the loop for the
 * duration of each I/O, which is the right trade for a page-cache-backed file and the wrong one for a slow disk;
 * `syncIo: false` uses the callback fs.read / fs.write instead. flush() is always fdatasync in the thread pool.
 *
 * Node has no fallocate(PUNCH_HOLE), so discard writes zeroes (reads of the range return zeroes, as the contract
 * asks) and blockStatus() reports one data extent (`supports.holes` is false).
 *
 * A read-only handle rejects writes and discards with DM_NOT_SUPPORTED; its manifest is the same as a writable
 * handle's (as in Linux, read-only is a mode of the handle, not a capability of the device); see `readOnly`.
 */
import * as fs from 'node:fs';
import { DmError } from '../core/errors.js';
import type { BlockDeviceSupports } from './contract.js';
import { BlockDevice } from './contract.js';
import type { Sector } from './units.js';
import { MiB, bytes, bytesToSectors, isSectorAligned, sectorsToBytes } from './units.js';

export interface FileBlockDeviceOpenOptions {
  /** Open O_RDONLY; writes and discards reject with DM_NOT_SUPPORTED. Not together with `create`. */
  readonly readOnly?: boolean;
  /**
   * If the file does not exist, create it with this size (a multiple of 512; sparse, reads as zeroes). An
   * existing file is opened as it is, with its own size.
   */
  readonly create?: { readonly sizeBytes: number };
  /** Synchronous positional I/O on the event loop (default true); false goes through libuv's thread pool. */
  readonly syncIo?: boolean;
}

/** Discard writes zeroes in pieces of at most this size, all from one shared zero buffer. */
const DISCARD_PIECE_BYTES_MAX = bytes(1 * MiB);
let zeroPiece: Buffer | undefined;
const RESOLVED: Promise<void> = Promise.resolve();

export class FileBlockDevice extends BlockDevice {
  readonly sizeSectors: Sector;
  readonly name: string;
  readonly supports: BlockDeviceSupports = Object.freeze({ flush: true, discard: true, fua: true, holes: false });
  /** True when opened with `readOnly`. */
  readonly readOnly: boolean;
  private readonly fd: number;
  private readonly syncIo: boolean;
  /** I/O submitted to the thread pool and not yet completed; close() waits for it before closing the fd. */
  private inflightCount = 0;
  private inflightDrained: (() => void) | undefined;

  private constructor(path: string, fd: number, sizeSectors: Sector, readOnly: boolean, syncIo: boolean) {
    super();
    this.name = path;
    this.fd = fd;
    this.sizeSectors = sizeSectors;
    this.readOnly = readOnly;
    this.syncIo = syncIo;
  }

  static async open(path: string, options: FileBlockDeviceOpenOptions = {}): Promise<FileBlockDevice> {
    const readOnly = options.readOnly === true;
    const syncIo = options.syncIo ?? true;
    const create = options.create;
    if (create) {
      if (readOnly) throw new DmError('DM_INVALID_ARGUMENT', `${path}: cannot create a file opened read-only`);
      if (!Number.isSafeInteger(create.sizeBytes) || create.sizeBytes < 0 || !isSectorAligned(create.sizeBytes)) {
        throw new DmError('DM_INVALID_ARGUMENT', `${path}: create.sizeBytes must be a non-negative multiple of 512, got ${create.sizeBytes}`);
      }
    }
    let fd: number;
    try {
      fd = await fsOpen(path, readOnly ? 'r' : 'r+');
    } catch (e) {
      if (errnoCode(e) !== 'ENOENT' || !create) throw openError(path, e);
      try {
        // O_EXCL: if someone else created it meanwhile, open theirs as an existing file.
        fd = await fsOpen(path, 'wx+');
        await fsCall<void>((cb) => fs.ftruncate(fd, create.sizeBytes, cb)).catch(async (err: unknown) => {
          await fsCall<void>((cb) => fs.close(fd, cb)).catch(() => undefined);
          throw err;
        });
      } catch (e2) {
        if (errnoCode(e2) !== 'EEXIST') throw openError(path, e2);
        fd = await fsOpen(path, 'r+').catch((e3: unknown) => Promise.reject(openError(path, e3)));
      }
    }
    try {
      const stat = await fsCall<fs.Stats>((cb) => fs.fstat(fd, cb));
      if (!stat.isFile()) throw new DmError('DM_INVALID_ARGUMENT', `${path}: not a regular file`);
      if (!isSectorAligned(stat.size)) {
        throw new DmError('DM_INVALID_ARGUMENT', `${path}: file size ${stat.size} bytes is not a multiple of 512`);
      }
      return new FileBlockDevice(path, fd, bytesToSectors(bytes(stat.size)), readOnly, syncIo);
    } catch (e) {
      await fsCall<void>((cb) => fs.close(fd, cb)).catch(() => undefined);
      throw e instanceof DmError ? e : new DmError('DM_IO', `${path}: fstat failed`, { cause: e });
    }
  }

  protected _read(sector: Sector, buf: Uint8Array): Promise<void> {
    const positionBytes = sectorsToBytes(sector);
    if (!this.syncIo) return this.track(this.readAsync(buf, positionBytes));
    try {
      let doneBytes = 0;
      while (doneBytes < buf.byteLength) {
        const n = fs.readSync(this.fd, buf, doneBytes, buf.byteLength - doneBytes, positionBytes + doneBytes);
        if (n === 0) return Promise.reject(this.shortReadError(positionBytes + doneBytes));
        doneBytes += n;
      }
      return RESOLVED;
    } catch (e) {
      return Promise.reject(this.ioError('read', positionBytes, e));
    }
  }

  protected _write(sector: Sector, buf: Uint8Array, fua: boolean): Promise<void> {
    if (this.readOnly) return Promise.reject(this.readOnlyError('write'));
    const positionBytes = sectorsToBytes(sector);
    if (!this.syncIo) {
      const written = this.writeAsync(buf, positionBytes);
      return this.track(fua ? written.then(() => this.datasync()) : written);
    }
    try {
      this.writeAllSync(buf, positionBytes);
    } catch (e) {
      return Promise.reject(this.ioError('write', positionBytes, e));
    }
    return fua ? this.track(this.datasync()) : RESOLVED;
  }

  protected override _flush(): Promise<void> {
    // A read-only handle has written nothing, so there is nothing of ours to make durable.
    if (this.readOnly) return RESOLVED;
    return this.track(this.datasync());
  }

  protected override _discard(sector: Sector, lengthSectors: Sector): Promise<void> {
    if (this.readOnly) return Promise.reject(this.readOnlyError('discard'));
    zeroPiece ??= Buffer.alloc(DISCARD_PIECE_BYTES_MAX);
    const zeroes = zeroPiece;
    const startBytes = sectorsToBytes(sector);
    const endBytes = startBytes + sectorsToBytes(lengthSectors);
    if (!this.syncIo) {
      return this.track((async () => {
        for (let positionBytes: number = startBytes; positionBytes < endBytes; positionBytes += DISCARD_PIECE_BYTES_MAX) {
          await this.writeAsync(zeroes.subarray(0, Math.min(DISCARD_PIECE_BYTES_MAX, endBytes - positionBytes)), positionBytes);
        }
      })());
    }
    let positionBytes: number = startBytes;
    try {
      for (; positionBytes < endBytes; positionBytes += DISCARD_PIECE_BYTES_MAX) {
        this.writeAllSync(zeroes.subarray(0, Math.min(DISCARD_PIECE_BYTES_MAX, endBytes - positionBytes)), positionBytes);
      }
    } catch (e) {
      return Promise.reject(this.ioError('discard', positionBytes, e));
    }
    return RESOLVED;
  }

  protected override async _close(): Promise<void> {
    if (this.inflightCount > 0) await new Promise<void>((resolve) => (this.inflightDrained = resolve));
    await fsCall<void>((cb) => fs.close(this.fd, cb)).catch((e: unknown) => Promise.reject(this.ioError('close', 0, e)));
  }

  private writeAllSync(buf: Uint8Array, positionBytes: number): void {
    let doneBytes = 0;
    while (doneBytes < buf.byteLength) {
      doneBytes += fs.writeSync(this.fd, buf, doneBytes, buf.byteLength - doneBytes, positionBytes + doneBytes);
    }
  }

  private async readAsync(buf: Uint8Array, positionBytes: number): Promise<void> {
    let doneBytes = 0;
    while (doneBytes < buf.byteLength) {
      const at = positionBytes + doneBytes;
      const n = await fsCall<number>((cb) => fs.read(this.fd, buf, doneBytes, buf.byteLength - doneBytes, at, cb)).catch(
        (e: unknown) => Promise.reject(this.ioError('read', at, e)),
      );
      if (n === 0) throw this.shortReadError(at);
      doneBytes += n;
    }
  }

  private async writeAsync(buf: Uint8Array, positionBytes: number): Promise<void> {
    let doneBytes = 0;
    while (doneBytes < buf.byteLength) {
      const at = positionBytes + doneBytes;
      doneBytes += await fsCall<number>((cb) => fs.write(this.fd, buf, doneBytes, buf.byteLength - doneBytes, at, cb)).catch(
        (e: unknown) => Promise.reject(this.ioError('write', at, e)),
      );
    }
  }

  private datasync(): Promise<void> {
    return fsCall<void>((cb) => fs.fdatasync(this.fd, cb)).catch((e: unknown) => Promise.reject(this.ioError('fdatasync', 0, e)));
  }

  /** Counts `p` as in flight until it settles, so close() does not close the fd under it. */
  private track(p: Promise<void>): Promise<void> {
    this.inflightCount++;
    const done = (): void => {
      this.inflightCount--;
      if (this.inflightCount === 0 && this.inflightDrained) {
        const drained = this.inflightDrained;
        this.inflightDrained = undefined;
        drained();
      }
    };
    p.then(done, done);
    return p;
  }

  private ioError(op: string, positionBytes: number, cause: unknown): DmError {
    const code = errnoCode(cause);
    return new DmError('DM_IO', `${this.name}: ${op} at byte ${positionBytes} failed${code ? ` (${code})` : ''}`, { cause });
  }

  private shortReadError(positionBytes: number): DmError {
    return new DmError('DM_IO', `${this.name}: read at byte ${positionBytes} hit the end of the file (was it truncated?)`);
  }

  private readOnlyError(op: string): DmError {
    return new DmError('DM_NOT_SUPPORTED', `${this.name}: ${op} refused: the device was opened read-only`);
  }
}

/** Wraps a Node callback-style fs call in a promise. */
function fsCall<T>(call: (cb: (err: NodeJS.ErrnoException | null, value: T) => void) => void): Promise<T> {
  return new Promise<T>((resolve, reject) => call((err, value) => (err ? reject(err) : resolve(value))));
}

function fsOpen(path: string, flags: string): Promise<number> {
  return fsCall<number>((cb) => fs.open(path, flags, 0o644, cb));
}

function errnoCode(e: unknown): string | undefined {
  return typeof e === 'object' && e !== null && typeof (e as { code?: unknown }).code === 'string' ? (e as { code: string }).code : undefined;
}

function openError(path: string, cause: unknown): DmError {
  const code = errnoCode(cause);
  switch (code) {
    case 'ENOENT':
      return new DmError('DM_INVALID_ARGUMENT', `${path}: no such file (pass create: { sizeBytes } to create it)`, { cause });
    case 'EISDIR':
    case 'ENOTDIR':
      return new DmError('DM_INVALID_ARGUMENT', `${path}: not a regular file (${code})`, { cause });
    case 'EACCES':
    case 'EPERM':
    case 'EROFS':
      return new DmError('DM_INVALID_ARGUMENT', `${path}: permission denied (${code})`, { cause });
    default:
      return new DmError('DM_IO', `${path}: open failed${code ? ` (${code})` : ''}`, { cause });
  }
}

