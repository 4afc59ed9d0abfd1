/**
 * `mdadm -X FILE` (ExamineBitmap in mdadm 4.2's bitmap.c, Debian 12) as a pure function of the file's bytes:
 * the same stdout, byte for byte, for any file mdadm reads; warnings and errors go to stderr in dmstate's words.
 *
 *         Filename : bm.img
 *            Magic : 6d746962
 *          Version : 4
 *             UUID : 00112233:44556677:8899aabb:ccddeeff
 *           Events : 5
 *   Events Cleared : 0
 *            State : OK
 *        Chunksize : 64 KB
 *           Daemon : 5s flush period
 *       Write Mode : Normal
 *        Sync Size : 64512 (63.00 MiB 66.06 MB)
 *           Bitmap : 1008 bits (chunks), 2 dirty (0.2%)
 *
 * mdadm's arithmetic is kept: `Sync Size` is sync_size / 2 in KiB and human_size() of the bytes (centi-units with
 * its rounding, signed 64-bit), the percentage is C's "%2.1f" of a double (exact binary value, ties to even),
 * numbers printed with "%d" are the u32 fields read as signed. A file shorter than its bits counts the bits it has
 * (mdadm's warning on stderr); a clustered superblock prints its cluster fields and, as mdadm 4.2 does for a file,
 * that no node's bitmap could be read.
 *
 * Exit codes are mdadm's (1 for a superblock it cannot read or an unknown version) except for a bad magic: mdadm
 * prints the fields and exits 0, dmstate prints the same and exits 1 (the file is not a bitmap).
 */
import {
  MD_BITMAP_MAGIC,
  MD_BITMAP_SUPERBLOCK_BYTES,
  MD_BITMAP_VERSION_CLUSTERED,
  MD_BITMAP_VERSION_HOSTENDIAN,
  decodeMdBitmapSuperblock,
  formatMdBitmapUuid,
  mdBitmapChunkCount,
  type MdBitmapSuperblock,
} from './superblock.js';

export interface MdBitmapExamineResult {
  readonly stdout: string;
  readonly stderr: string;
  readonly exitCode: number;
}

/** What mdadm -X counted: bits covered by the file and the set ones among them. */
export interface MdBitmapBitCount {
  readonly totalBits: bigint;
  readonly dirtyBits: bigint;
  /** The file ends before the last bit the superblock asks for. */
  readonly truncated: boolean;
}

const popcount8 = (b: number): number => {
  let n = 0;
  for (let x = b; x !== 0; x &= x - 1) n++;
  return n;
};

/** mdadm's bitmap_fd_read: count set bits among the first `bitmap_bits(sync_size, chunksize)` bits after the superblock. */
export function countMdBitmapBits(file: Uint8Array, sb: MdBitmapSuperblock): MdBitmapBitCount {
  if (sb.syncSizeSectors === 0n || sb.chunkSizeBytes === 0) return { totalBits: 0n, dirtyBits: 0n, truncated: false };
  const wanted = mdBitmapChunkCount(sb.syncSizeSectors, sb.chunkSizeBytes);
  const availableBits = BigInt(Math.max(0, file.byteLength - MD_BITMAP_SUPERBLOCK_BYTES)) * 8n;
  const total = wanted < availableBits ? wanted : availableBits;
  const n = Number(total);
  let dirty = 0;
  const fullBytes = Math.floor(n / 8);
  for (let i = 0; i < fullBytes; i++) dirty += popcount8(file[MD_BITMAP_SUPERBLOCK_BYTES + i]);
  if (n % 8 !== 0) dirty += popcount8(file[MD_BITMAP_SUPERBLOCK_BYTES + fullBytes] & ((1 << (n % 8)) - 1));
  return { totalBits: total, dirtyBits: BigInt(dirty), truncated: total < wanted };
}

/** mdadm's human_chunksize: "%lu %s" after shifting by 1024 while it divides out. */
export function mdadmHumanChunksize(bytes: number): string {
  const suffixes = ['B', 'KB', 'MB', 'GB', 'TB'];
  let v = bytes;
  let i = 0;
  while (Math.floor(v / 1024) !== 0) {
    v = Math.floor(v / 1024);
    i++;
  }
  return `${v} ${suffixes[i]}`;
}

const I64 = (v: bigint): bigint => BigInt.asIntN(64, v);
const centi = (c: bigint): string => `${c / 100n}.${(c % 100n).toString().padStart(2, '0')}`;

/** mdadm 4.2's human_size(long long bytes): "" below 5000 KiB, else " (x.xx MiB y.yy MB)" (GiB/GB, TiB/TB above 2 GiB / 2 TiB). */
export function mdadmHumanSize(bytesIn: bigint): string {
  const bytes = I64(bytesIn);
  if (bytes < 5000n * 1024n) return '';
  if (bytes < 2n * 1024n ** 3n) {
    const cMiB = (I64(bytes * 200n) / (1n << 20n) + 1n) / 2n;
    const cMB = (bytes / (1_000_000n / 200n) + 1n) / 2n;
    return ` (${centi(cMiB)} MiB ${centi(cMB)} MB)`;
  }
  if (bytes < 2n * 1024n ** 4n) {
    const cGiB = (I64(bytes * 200n) / (1n << 30n) + 1n) / 2n;
    const cGB = (bytes / (1_000_000_000n / 200n) + 1n) / 2n;
    return ` (${centi(cGiB)} GiB ${centi(cGB)} GB)`;
  }
  const cTiB = (I64(bytes * 200n) / (1n << 40n) + 1n) / 2n;
  const cTB = (bytes / (1_000_000_000_000n / 200n) + 1n) / 2n;
  return ` (${centi(cTiB)} TiB ${centi(cTB)} TB)`;
}

/**
 * C's printf("%.1f", v) for a finite double: the exact binary value rounded to one decimal, ties to even (the
 * rounding glibc does), where JavaScript's toFixed rounds ties up.
 */
export function formatCFixed1(v: number): string {
  if (!Number.isFinite(v)) return String(v);
  const negative = v < 0 || Object.is(v, -0);
  // v = mantissa × 2^exp exactly.
  const view = new DataView(new ArrayBuffer(8));
  view.setFloat64(0, Math.abs(v));
  const bits = view.getBigUint64(0);
  const expBits = Number((bits >> 52n) & 0x7ffn);
  let mantissa = bits & ((1n << 52n) - 1n);
  let exp: number;
  if (expBits === 0) exp = -1074;
  else {
    mantissa |= 1n << 52n;
    exp = expBits - 1075;
  }
  // tenths = v × 10 = mantissa × 10 × 2^exp
  let q: bigint;
  if (exp >= 0) q = (mantissa * 10n) << BigInt(exp);
  else {
    const den = 1n << BigInt(-exp);
    const num = mantissa * 10n;
    q = num / den;
    const twiceRem = (num % den) * 2n;
    if (twiceRem > den || (twiceRem === den && (q & 1n) === 1n)) q++;
  }
  const text = `${q / 10n}.${q % 10n}`;
  return negative ? `-${text}` : text;
}

const s32 = (v: number): number => v | 0;
/** Node slots printed at most (md-cluster allows far fewer; a corrupt count must not print forever). */
export const MD_BITMAP_EXAMINE_NODE_SLOTS_MAX = 1024;

function bitmapStateName(state: number): string {
  if (state === 0) return 'OK';
  if (state === 2) return 'Out of date';
  return 'Unknown';
}

/** The C string in a fixed field (up to the first NUL). */
function cString(bytes: Uint8Array): string {
  const end = bytes.indexOf(0);
  return Buffer.from(end < 0 ? bytes : bytes.subarray(0, end)).toString('latin1');
}

function bitmapLine(count: MdBitmapBitCount): string {
  const pct = (100 * Number(count.dirtyBits)) / Number(count.totalBits === 0n ? 1n : count.totalBits);
  return `          Bitmap : ${count.totalBits} bits (chunks), ${count.dirtyBits} dirty (${formatCFixed1(pct)}%)\n`;
}

/** Everything `mdadm -X <filename>` prints for a file holding `file`. */
export function examineMdBitmap(file: Uint8Array, filename: string): MdBitmapExamineResult {
  if (file.byteLength < MD_BITMAP_SUPERBLOCK_BYTES) {
    return {
      stdout: '',
      stderr: `${filename}: ${file.byteLength} bytes is too short for an md bitmap superblock (${MD_BITMAP_SUPERBLOCK_BYTES} bytes)\n`,
      exitCode: 1,
    };
  }
  const sb = decodeMdBitmapSuperblock(file);
  const count = countMdBitmapBits(file, sb);
  let out = '';
  let err = '';
  if (count.truncated) err += `WARNING: bitmap file is not large enough for array size ${sb.syncSizeSectors}!\n`;
  out += `        Filename : ${filename}\n`;
  out += `           Magic : ${sb.magic.toString(16).padStart(8, '0')}\n`;
  const badMagic = sb.magic !== MD_BITMAP_MAGIC;
  if (badMagic) err += `${filename}: invalid bitmap magic 0x${sb.magic.toString(16)}: the file is not an md bitmap or is corrupted\n`;
  out += `         Version : ${s32(sb.version)}\n`;
  if (sb.version < MD_BITMAP_VERSION_HOSTENDIAN || sb.version > MD_BITMAP_VERSION_CLUSTERED) {
    err += `${filename}: unknown bitmap version ${s32(sb.version)} (${MD_BITMAP_VERSION_HOSTENDIAN} to ${MD_BITMAP_VERSION_CLUSTERED}): the file is corrupted or newer than this tool\n`;
    return { stdout: out, stderr: err, exitCode: 1 };
  }
  out += `            UUID : ${formatMdBitmapUuid(sb.uuid)}\n`;
  if (sb.nodes === 0) {
    out += `          Events : ${sb.events}\n`;
    out += `  Events Cleared : ${sb.eventsCleared}\n`;
    out += `           State : ${bitmapStateName(sb.state)}\n`;
  }
  out += `       Chunksize : ${mdadmHumanChunksize(sb.chunkSizeBytes)}\n`;
  out += `          Daemon : ${s32(sb.daemonSleepSeconds)}s flush period\n`;
  out += `      Write Mode : ${sb.writeBehind !== 0 ? `Allow write behind, max ${s32(sb.writeBehind)}` : 'Normal'}\n`;
  out += `       Sync Size : ${sb.syncSizeSectors / 2n}${mdadmHumanSize(sb.syncSizeSectors * 512n)}\n`;
  if (sb.nodes === 0) out += bitmapLine(count);
  else {
    out += `   Cluster nodes : ${s32(sb.nodes)}\n`;
    out += `    Cluster name : ${cString(sb.clusterName).padEnd(64, ' ')}\n`;
    // mdadm 4.2 re-reads each node's slot through the superblock type of a block device; for a file it reads
    // nothing and says so per node.
    for (let i = 0; i < Math.min(s32(sb.nodes), MD_BITMAP_EXAMINE_NODE_SLOTS_MAX); i++) {
      err += `${filename}: node slot ${i}: per-node bitmaps of a clustered bitmap are only found on a block device\n`;
      out += `   Unable to read bitmap on node: ${i}\n`;
    }
  }
  return { stdout: out, stderr: err, exitCode: badMagic ? 1 : 0 };
}
