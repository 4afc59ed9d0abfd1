/**
 * The md write-intent bitmap superblock (Linux drivers/md/md-bitmap.h bitmap_super_t, mdadm's bitmap.h): 256 bytes,
 * little-endian, at the start of the bitmap file; the bits follow it.
 *
 *   off size field             notes
 *     0    4 magic             0x6d746962 ("bitm")
 *     4    4 version           3 legacy host-endian bit order, 4 little-endian (normal), 5 clustered
 *     8   16 uuid              the array's UUID, raw bytes
 *    24    8 events            array event count at the last superblock update
 *    32    8 events_cleared    event count when bits were last cleared
 *    40    8 sync_size         sectors covered (the per-device size for raid1)
 *    48    4 state             bit 1 STALE (out of date), bit 2 WRITE_ERROR
 *    52    4 chunksize         bytes, a power of two, at least 512
 *    56    4 daemon_sleep      seconds
 *    60    4 write_behind      outstanding write-behind I/Os at most, ≤ 16383
 *    64    4 sectors_reserved
 *    68    4 nodes             clustered only
 *    72   64 cluster_name      clustered only
 *   136  120 pad               zero
 *
 * Bits: chunk c is byte 256 + c/8, bit c mod 8 (LSB first); set = the chunk may be out of sync. A bitmap of
 * `chunks = ceil(sync_size × 512 / chunksize)` chunks needs at least 256 + ceil(chunks / 8) bytes (the kernel refuses
 * a shorter file, mdadm -X warns; both ignore what follows the bits).
 *
 * u64 fields are bigints so that any superblock decodes and encodes back exactly.
 */
import { DmError } from '../../core/errors.js';

export const MD_BITMAP_MAGIC = 0x6d746962;
/** Legacy: bits in host order (the same layout as version 4 on a little-endian host). */
export const MD_BITMAP_VERSION_HOSTENDIAN = 3;
export const MD_BITMAP_VERSION = 4;
export const MD_BITMAP_VERSION_CLUSTERED = 5;
export const MD_BITMAP_SUPERBLOCK_BYTES = 256;
/** state bit 1 (1 << BITMAP_STALE): the bitmap may not describe the array; a full resync is needed. */
export const MD_BITMAP_STATE_STALE = 0x2;
/** state bit 2 (1 << BITMAP_WRITE_ERROR). */
export const MD_BITMAP_STATE_WRITE_ERROR = 0x4;
export const MD_BITMAP_CHUNK_SIZE_BYTES_MIN = 512;
/** chunksize is a u32 and a power of two. */
export const MD_BITMAP_CHUNK_SIZE_BYTES_MAX = 2 ** 31;
/** md's COUNTER_MAX: 14 bits of count. */
export const MD_BITMAP_WRITE_BEHIND_MAX = 16383;
/** mdadm's DEFAULT_BITMAP_DELAY. */
export const MD_BITMAP_DAEMON_SLEEP_SECONDS_DEFAULT = 5;
/** daemon_sleep is a u32 of seconds; the kernel keeps it in jiffies, so stay far below any overflow. */
export const MD_BITMAP_DAEMON_SLEEP_SECONDS_MAX = 86_400;
export const MD_BITMAP_UUID_BYTES = 16;
export const MD_BITMAP_CLUSTER_NAME_BYTES = 64;

export interface MdBitmapSuperblock {
  readonly magic: number;
  readonly version: number;
  /** 16 raw bytes. */
  readonly uuid: Uint8Array;
  readonly events: bigint;
  readonly eventsCleared: bigint;
  readonly syncSizeSectors: bigint;
  readonly state: number;
  readonly chunkSizeBytes: number;
  readonly daemonSleepSeconds: number;
  readonly writeBehind: number;
  readonly sectorsReserved: number;
  readonly nodes: number;
  /** 64 raw bytes (NUL-padded). */
  readonly clusterName: Uint8Array;
}

const U64_MAX = (1n << 64n) - 1n;
const U32_MAX = 0xffff_ffff;

/** A superblock as `mdadm --create-bitmap` (CreateBitmap) writes it: events 0, state 0, the given geometry. */
export function createMdBitmapSuperblock(fields: {
  uuid?: Uint8Array;
  syncSizeSectors: bigint;
  chunkSizeBytes: number;
  daemonSleepSeconds: number;
  writeBehind?: number;
  events?: bigint;
  eventsCleared?: bigint;
  state?: number;
}): MdBitmapSuperblock {
  return {
    magic: MD_BITMAP_MAGIC,
    version: MD_BITMAP_VERSION,
    uuid: fields.uuid ? Uint8Array.from(fields.uuid) : new Uint8Array(MD_BITMAP_UUID_BYTES),
    events: fields.events ?? 0n,
    eventsCleared: fields.eventsCleared ?? 0n,
    syncSizeSectors: fields.syncSizeSectors,
    state: fields.state ?? 0,
    chunkSizeBytes: fields.chunkSizeBytes,
    daemonSleepSeconds: fields.daemonSleepSeconds,
    writeBehind: fields.writeBehind ?? 0,
    sectorsReserved: 0,
    nodes: 0,
    clusterName: new Uint8Array(MD_BITMAP_CLUSTER_NAME_BYTES),
  };
}

function checkU32(value: number, field: string): void {
  if (!Number.isSafeInteger(value) || value < 0 || value > U32_MAX) {
    throw new DmError('DM_INVALID_ARGUMENT', `md bitmap superblock: ${field} ${value} does not fit a u32`);
  }
}

function checkU64(value: bigint, field: string): void {
  if (value < 0n || value > U64_MAX) throw new DmError('DM_INVALID_ARGUMENT', `md bitmap superblock: ${field} ${value} does not fit a u64`);
}

/** The 256 on-disk bytes of `sb` (pad zeroed). Throws DM_INVALID_ARGUMENT for a field that does not fit. */
export function encodeMdBitmapSuperblock(sb: MdBitmapSuperblock): Uint8Array {
  for (const [field, v] of [
    ['magic', sb.magic],
    ['version', sb.version],
    ['state', sb.state],
    ['chunksize', sb.chunkSizeBytes],
    ['daemon_sleep', sb.daemonSleepSeconds],
    ['write_behind', sb.writeBehind],
    ['sectors_reserved', sb.sectorsReserved],
    ['nodes', sb.nodes],
  ] as const) {
    checkU32(v, field);
  }
  checkU64(sb.events, 'events');
  checkU64(sb.eventsCleared, 'events_cleared');
  checkU64(sb.syncSizeSectors, 'sync_size');
  if (sb.uuid.byteLength !== MD_BITMAP_UUID_BYTES) throw new DmError('DM_INVALID_ARGUMENT', `md bitmap superblock: uuid must be ${MD_BITMAP_UUID_BYTES} bytes`);
  if (sb.clusterName.byteLength !== MD_BITMAP_CLUSTER_NAME_BYTES) {
    throw new DmError('DM_INVALID_ARGUMENT', `md bitmap superblock: cluster_name must be ${MD_BITMAP_CLUSTER_NAME_BYTES} bytes`);
  }
  const buf = new Uint8Array(MD_BITMAP_SUPERBLOCK_BYTES);
  const v = new DataView(buf.buffer);
  v.setUint32(0, sb.magic, true);
  v.setUint32(4, sb.version, true);
  buf.set(sb.uuid, 8);
  v.setBigUint64(24, sb.events, true);
  v.setBigUint64(32, sb.eventsCleared, true);
  v.setBigUint64(40, sb.syncSizeSectors, true);
  v.setUint32(48, sb.state, true);
  v.setUint32(52, sb.chunkSizeBytes, true);
  v.setUint32(56, sb.daemonSleepSeconds, true);
  v.setUint32(60, sb.writeBehind, true);
  v.setUint32(64, sb.sectorsReserved, true);
  v.setUint32(68, sb.nodes, true);
  buf.set(sb.clusterName, 72);
  return buf;
}

/**
 * Reads the fields of the first 256 bytes of `buf`, whatever they hold (validate with validateMdBitmapSuperblock).
 * Throws DM_INVALID_ARGUMENT when `buf` is shorter than a superblock.
 */
export function decodeMdBitmapSuperblock(buf: Uint8Array): MdBitmapSuperblock {
  if (buf.byteLength < MD_BITMAP_SUPERBLOCK_BYTES) {
    throw new DmError('DM_INVALID_ARGUMENT', `md bitmap: ${buf.byteLength} bytes is too short for the ${MD_BITMAP_SUPERBLOCK_BYTES}-byte superblock`);
  }
  const v = new DataView(buf.buffer, buf.byteOffset, MD_BITMAP_SUPERBLOCK_BYTES);
  return {
    magic: v.getUint32(0, true),
    version: v.getUint32(4, true),
    uuid: buf.slice(8, 24),
    events: v.getBigUint64(24, true),
    eventsCleared: v.getBigUint64(32, true),
    syncSizeSectors: v.getBigUint64(40, true),
    state: v.getUint32(48, true),
    chunkSizeBytes: v.getUint32(52, true),
    daemonSleepSeconds: v.getUint32(56, true),
    writeBehind: v.getUint32(60, true),
    sectorsReserved: v.getUint32(64, true),
    nodes: v.getUint32(68, true),
    clusterName: buf.slice(72, 136),
  };
}

const isPowerOfTwo = (n: number): boolean => n > 0 && (n & (n - 1)) === 0;

/**
 * Why the kernel would refuse this superblock (md_bitmap_read_sb's reasons, in its order), or undefined when it is
 * valid. The bits are checked separately (mdBitmapFileBytes).
 */
export function validateMdBitmapSuperblock(sb: MdBitmapSuperblock): string | undefined {
  if (sb.magic !== MD_BITMAP_MAGIC) return `bad magic 0x${sb.magic.toString(16).padStart(8, '0')} (want 0x${MD_BITMAP_MAGIC.toString(16)})`;
  if (sb.version < MD_BITMAP_VERSION_HOSTENDIAN || sb.version > MD_BITMAP_VERSION_CLUSTERED) {
    return `unrecognized superblock version ${sb.version} (${MD_BITMAP_VERSION_HOSTENDIAN} to ${MD_BITMAP_VERSION_CLUSTERED})`;
  }
  if (sb.chunkSizeBytes < MD_BITMAP_CHUNK_SIZE_BYTES_MIN) return `bitmap chunksize too small (${sb.chunkSizeBytes} < ${MD_BITMAP_CHUNK_SIZE_BYTES_MIN} bytes)`;
  if (!isPowerOfTwo(sb.chunkSizeBytes)) return `bitmap chunksize not a power of 2 (${sb.chunkSizeBytes} bytes)`;
  if (sb.daemonSleepSeconds < 1) return `daemon sleep period out of range (${sb.daemonSleepSeconds} s)`;
  if (sb.writeBehind > MD_BITMAP_WRITE_BEHIND_MAX) return `write-behind limit out of range (0 - ${MD_BITMAP_WRITE_BEHIND_MAX}): ${sb.writeBehind}`;
  return undefined;
}

/** mdadm's bitmap_bits: chunks covering `syncSizeSectors` (rounded up). 0 for a zero chunk size. */
export function mdBitmapChunkCount(syncSizeSectors: bigint, chunkSizeBytes: number): bigint {
  if (chunkSizeBytes <= 0) return 0n;
  const c = BigInt(chunkSizeBytes);
  return (syncSizeSectors * 512n + c - 1n) / c;
}

/** Bytes of superblock and bits for `chunkCount` chunks (Linux md_bitmap_storage_alloc's store->bytes). */
export function mdBitmapFileBytes(chunkCount: number): number {
  return MD_BITMAP_SUPERBLOCK_BYTES + Math.ceil(chunkCount / 8);
}

/** True when the superblock bytes are all zero: a device nothing was written to yet (a new bitmap). */
export function isBlankMdBitmapSuperblock(buf: Uint8Array): boolean {
  for (let i = 0; i < MD_BITMAP_SUPERBLOCK_BYTES; i++) if (buf[i] !== 0) return false;
  return true;
}

/** The UUID as mdadm -X prints it: four groups of eight hex digits, the raw bytes in order. */
export function formatMdBitmapUuid(uuid: Uint8Array): string {
  const hex = Buffer.from(uuid).toString('hex');
  return `${hex.slice(0, 8)}:${hex.slice(8, 16)}:${hex.slice(16, 24)}:${hex.slice(24, 32)}`;
}

/** Parses a UUID as mdadm takes it (32 hex digits, any of `:`, `-`, `.` or spaces between them). */
export function parseMdBitmapUuid(text: string): Uint8Array {
  const hex = text.replace(/[:\-. ]/g, '');
  if (!/^[0-9a-fA-F]{32}$/.test(hex)) throw new DmError('DM_INVALID_ARGUMENT', `bad UUID "${text}": want 32 hex digits (e.g. 00112233:44556677:8899aabb:ccddeeff)`);
  return Uint8Array.from(Buffer.from(hex, 'hex'));
}
