/**
 * `dmstate bitmap`: md write-intent bitmap files, the ones a mirror with an `md-bitmap` log keeps.
 *
 *   dmstate bitmap create FILE --sync-size SECTORS [--chunk SIZE] [--delay S] [--write-behind N] [--uuid UUID]
 *                              [--offset SECTORS] [--force]
 *       like `mdadm --create --bitmap=FILE --bitmap-chunk=SIZE --delay=S`: a version 4 superblock, every bit set.
 *       SIZE is KiB unless it ends in K, M, G or T (mdadm's --bitmap-chunk); default: 4 KiB doubled until there are
 *       at most 2^20 chunks (mdadm's choice). --offset writes the bitmap that far into FILE (a leg's file) without
 *       truncating it. An existing FILE (or a non-blank superblock at the offset) needs --force.
 *   dmstate bitmap examine FILE [--offset SECTORS]
 *       prints exactly what `mdadm -X FILE` (mdadm 4.2) prints.
 *
 * Exit 0 on success, 1 on an error (message on stderr, nothing written), 2 on a usage error.
 */
import * as fs from 'node:fs';
import { DmError, isDmError } from '../../core/errors.js';
import { parseUnsigned } from '../../core/parse-number.js';
import { createMdBitmapImage } from '../../dirty-logs/md-bitmap/create-image.js';
import { examineMdBitmap, mdadmHumanChunksize } from '../../dirty-logs/md-bitmap/examine.js';
import { MD_BITMAP_SUPERBLOCK_BYTES, decodeMdBitmapSuperblock, isBlankMdBitmapSuperblock, mdBitmapChunkCount, parseMdBitmapUuid } from '../../dirty-logs/md-bitmap/superblock.js';

export const BITMAP_USAGE = `usage: dmstate bitmap create FILE --sync-size SECTORS [--chunk SIZE] [--delay S] [--write-behind N]
                             [--uuid UUID] [--offset SECTORS] [--force]
       dmstate bitmap examine FILE [--offset SECTORS]      (prints what mdadm -X prints)
SIZE is in KiB unless it ends in K, M, G or T (as mdadm --bitmap-chunk).
`;

interface Output {
  write(text: string): unknown;
}

export interface BitmapIo {
  readonly stdout: Output;
  readonly stderr: Output;
}

class UsageError extends Error {}

const SIZE_SHIFTS: Record<string, number> = { '': 10, K: 10, M: 20, G: 30, T: 40 };

/** mdadm's parse_size for --bitmap-chunk: a number of KiB, or with a K/M/G/T suffix; returns bytes. */
export function parseChunkSizeBytes(text: string): number {
  const m = /^([0-9]+)([KMGT]?)$/i.exec(text);
  if (!m) throw new UsageError(`--chunk: "${text}" is not a size (a number of KiB, or with K, M, G or T)`);
  const bytes = Number(m[1]) * 2 ** SIZE_SHIFTS[m[2].toUpperCase()];
  // Math.log2 is exact for powers of two.
  if (!(bytes > 0 && bytes <= 2 ** 31 && Number.isInteger(Math.log2(bytes)))) throw new UsageError(`--chunk: ${text} is not a power of two of at most 2G`);
  return bytes;
}

interface Options {
  readonly positional: string[];
  readonly values: Map<string, string>;
  readonly flags: Set<string>;
}

function parseOptions(args: readonly string[], valued: readonly string[], flags: readonly string[]): Options {
  const o: Options = { positional: [], values: new Map(), flags: new Set() };
  for (let i = 0; i < args.length; i++) {
    const a = args[i];
    const eq = a.startsWith('--') ? a.indexOf('=') : -1;
    const name = eq > 0 ? a.slice(0, eq) : a;
    if (valued.includes(name)) {
      const v = eq > 0 ? a.slice(eq + 1) : args[++i];
      if (v === undefined) throw new UsageError(`${name} needs a value`);
      if (o.values.has(name)) throw new UsageError(`${name} given twice`);
      o.values.set(name, v);
    } else if (flags.includes(name)) o.flags.add(name);
    else if (a.startsWith('-') && a !== '-') throw new UsageError(`unknown option '${a}'`);
    else o.positional.push(a);
  }
  return o;
}

function count(text: string | undefined, what: string): number | undefined {
  if (text === undefined) return undefined;
  try {
    return parseUnsigned(text, what, 'DM_INVALID_ARGUMENT');
  } catch (err) {
    throw new UsageError((err as Error).message);
  }
}

function createBitmap(args: readonly string[], io: BitmapIo): number {
  const o = parseOptions(args, ['--sync-size', '--chunk', '--delay', '--write-behind', '--uuid', '--offset'], ['--force']);
  if (o.positional.length !== 1) throw new UsageError('bitmap create needs one FILE');
  const file = o.positional[0];
  const syncText = o.values.get('--sync-size');
  if (syncText === undefined) throw new UsageError('bitmap create needs --sync-size SECTORS (the mirror length)');
  const syncSizeSectors = BigInt(count(syncText, '--sync-size')!);
  const chunkText = o.values.get('--chunk');
  const uuidText = o.values.get('--uuid');
  let uuid: Uint8Array | undefined;
  try {
    uuid = uuidText === undefined ? undefined : parseMdBitmapUuid(uuidText);
  } catch (err) {
    throw new UsageError((err as Error).message);
  }
  const offsetSectors = count(o.values.get('--offset'), '--offset');
  const image = createMdBitmapImage({
    syncSizeSectors,
    chunkSizeBytes: chunkText === undefined ? undefined : parseChunkSizeBytes(chunkText),
    daemonSleepSeconds: count(o.values.get('--delay'), '--delay'),
    writeBehind: count(o.values.get('--write-behind'), '--write-behind'),
    uuid,
  });
  const force = o.flags.has('--force');
  if (offsetSectors === undefined) {
    if (!force && fs.existsSync(file)) throw new DmError('DM_INVALID_ARGUMENT', `bitmap file ${file} already exists, use --force to overwrite`);
    writeAll(file, image, 0, 'w');
  } else {
    const atBytes = offsetSectors * 512;
    if (!force && fs.existsSync(file)) {
      const here = readRange(file, atBytes, MD_BITMAP_SUPERBLOCK_BYTES);
      if (here.byteLength > 0 && !isBlankMdBitmapSuperblock(padTo(here, MD_BITMAP_SUPERBLOCK_BYTES))) {
        throw new DmError('DM_INVALID_ARGUMENT', `${file} holds data at sector ${offsetSectors}, use --force to overwrite it`);
      }
    }
    writeAll(file, image, atBytes, fs.existsSync(file) ? 'r+' : 'w');
  }
  const sb = decodeMdBitmapSuperblock(image);
  io.stdout.write(
    `${file}: md bitmap version ${sb.version}, ${mdBitmapChunkCount(sb.syncSizeSectors, sb.chunkSizeBytes)} chunks of ${mdadmHumanChunksize(sb.chunkSizeBytes)}, ` +
      `sync size ${sb.syncSizeSectors} sectors, daemon sleep ${sb.daemonSleepSeconds} s${offsetSectors ? `, at sector ${offsetSectors}` : ''}\n`,
  );
  return 0;
}

function padTo(buf: Uint8Array, n: number): Uint8Array {
  if (buf.byteLength >= n) return buf;
  const out = new Uint8Array(n);
  out.set(buf);
  return out;
}

function fsError(file: string, err: unknown): DmError {
  return new DmError('DM_INVALID_ARGUMENT', `${file}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`, { cause: err });
}

function writeAll(file: string, data: Uint8Array, atBytes: number, flags: 'w' | 'r+'): void {
  let fd: number;
  try {
    fd = fs.openSync(file, flags);
  } catch (err) {
    throw fsError(file, err);
  }
  try {
    let done = 0;
    while (done < data.byteLength) done += fs.writeSync(fd, data, done, data.byteLength - done, atBytes + done);
    fs.fsyncSync(fd);
  } catch (err) {
    throw fsError(file, err);
  } finally {
    fs.closeSync(fd);
  }
}

/** Up to `lengthBytes` bytes from `atBytes` (fewer at the end of the file). */
function readRange(file: string, atBytes: number, lengthBytes: number): Uint8Array {
  let fd: number;
  try {
    fd = fs.openSync(file, 'r');
  } catch (err) {
    throw fsError(file, err);
  }
  try {
    const buf = new Uint8Array(lengthBytes);
    let done = 0;
    for (;;) {
      const n = fs.readSync(fd, buf, done, lengthBytes - done, atBytes + done);
      if (n === 0) break;
      done += n;
      if (done === lengthBytes) break;
    }
    return buf.subarray(0, done);
  } catch (err) {
    throw fsError(file, err);
  } finally {
    fs.closeSync(fd);
  }
}

function examineBitmap(args: readonly string[], io: BitmapIo): number {
  const o = parseOptions(args, ['--offset'], []);
  if (o.positional.length !== 1) throw new UsageError('bitmap examine needs one FILE');
  const file = o.positional[0];
  const atBytes = (count(o.values.get('--offset'), '--offset') ?? 0) * 512;
  let size: number;
  try {
    size = fs.statSync(file).size;
  } catch (err) {
    throw fsError(file, err);
  }
  const r = examineMdBitmap(readRange(file, atBytes, Math.max(0, size - atBytes)), file);
  io.stdout.write(r.stdout);
  io.stderr.write(r.stderr);
  return r.exitCode;
}

export async function runBitmap(args: readonly string[], io: BitmapIo = { stdout: process.stdout, stderr: process.stderr }): Promise<number> {
  const [sub, ...rest] = args;
  try {
    switch (sub) {
      case 'create':
        return createBitmap(rest, io);
      case 'examine':
      case '-X':
        return examineBitmap(rest, io);
      case undefined:
      case 'help':
      case '--help':
      case '-h':
        io.stdout.write(BITMAP_USAGE);
        return sub === undefined ? 2 : 0;
      default:
        throw new UsageError(`unknown bitmap command '${sub}'`);
    }
  } catch (err) {
    if (err instanceof UsageError) {
      io.stderr.write(`dmstate bitmap: ${err.message}\n${BITMAP_USAGE}`);
      return 2;
    }
    if (isDmError(err)) {
      io.stderr.write(`dmstate bitmap: ${err.message}\n`);
      return 1;
    }
    throw err;
  }
}
