/**
 * A new bitmap file as mdadm's CreateBitmap writes it (`mdadm --create --bitmap=FILE`, `--bitmap-chunk`,
 * `--delay`): the superblock with events = events_cleared = state = 0, then every bit set (0xff: every chunk
 * resyncs on first use unless the table says nosync).
 *
 * One difference: the file is padded with zeros to a multiple of 512 bytes, so that a BlockDevice (whole sectors)
 * can open it; mdadm -X and the kernel ignore what follows the bits. (A file mdadm made can be padded the same way
 * with `truncate -s %512 FILE`.)
 */
import { DmError } from '../../core/errors.js';
import { MD_BITMAP_CHUNK_COUNT_MAX } from './md-bitmap.js';
import {
  MD_BITMAP_CHUNK_SIZE_BYTES_MAX,
  MD_BITMAP_CHUNK_SIZE_BYTES_MIN,
  MD_BITMAP_DAEMON_SLEEP_SECONDS_DEFAULT,
  MD_BITMAP_DAEMON_SLEEP_SECONDS_MAX,
  MD_BITMAP_SUPERBLOCK_BYTES,
  MD_BITMAP_WRITE_BEHIND_MAX,
  createMdBitmapSuperblock,
  encodeMdBitmapSuperblock,
  mdBitmapChunkCount,
} from './superblock.js';

/** mdadm's DEFAULT_BITMAP_CHUNK for a file bitmap: 4 KiB, doubled until there are at most 2^20 chunks. */
export const MDADM_BITMAP_CHUNK_SIZE_BYTES_DEFAULT = 4096;
const MDADM_CHUNK_COUNT_TARGET_SHIFT = 20;

export interface MdBitmapCreateOptions {
  readonly syncSizeSectors: bigint;
  /** Default: mdadm's choice (see mdadmDefaultChunkSizeBytes). */
  readonly chunkSizeBytes?: number;
  readonly daemonSleepSeconds?: number;
  readonly writeBehind?: number;
  /** 16 bytes; zeros by default (mdadm writes the array's UUID when it creates the array). */
  readonly uuid?: Uint8Array;
}

/** The chunk size mdadm picks when none is given: 4 KiB doubled while the array has more than 2^20 chunks. */
export function mdadmDefaultChunkSizeBytes(syncSizeSectors: bigint): number {
  let chunk = MDADM_BITMAP_CHUNK_SIZE_BYTES_DEFAULT;
  while (syncSizeSectors > BigInt(chunk) << BigInt(MDADM_CHUNK_COUNT_TARGET_SHIFT - 9) && chunk < MD_BITMAP_CHUNK_SIZE_BYTES_MAX) chunk *= 2;
  return chunk;
}

const bad = (reason: string): DmError => new DmError('DM_INVALID_ARGUMENT', `md bitmap: ${reason}`);

/** The bytes of a new bitmap file (superblock, all bits set, zero padding to 512). Throws DM_INVALID_ARGUMENT. */
export function createMdBitmapImage(options: MdBitmapCreateOptions): Uint8Array {
  const syncSizeSectors = options.syncSizeSectors;
  if (syncSizeSectors < 1n) throw bad(`sync size must be at least one sector, got ${syncSizeSectors}`);
  const chunkSizeBytes = options.chunkSizeBytes ?? mdadmDefaultChunkSizeBytes(syncSizeSectors);
  if (!Number.isSafeInteger(chunkSizeBytes) || chunkSizeBytes < MD_BITMAP_CHUNK_SIZE_BYTES_MIN || chunkSizeBytes > MD_BITMAP_CHUNK_SIZE_BYTES_MAX || (chunkSizeBytes & (chunkSizeBytes - 1)) !== 0) {
    throw bad(`chunk size ${chunkSizeBytes} bytes must be a power of two from ${MD_BITMAP_CHUNK_SIZE_BYTES_MIN} to ${MD_BITMAP_CHUNK_SIZE_BYTES_MAX}`);
  }
  const daemonSleepSeconds = options.daemonSleepSeconds ?? MD_BITMAP_DAEMON_SLEEP_SECONDS_DEFAULT;
  if (!Number.isSafeInteger(daemonSleepSeconds) || daemonSleepSeconds < 1 || daemonSleepSeconds > MD_BITMAP_DAEMON_SLEEP_SECONDS_MAX) {
    throw bad(`daemon sleep ${daemonSleepSeconds} s must be from 1 to ${MD_BITMAP_DAEMON_SLEEP_SECONDS_MAX}`);
  }
  const writeBehind = options.writeBehind ?? 0;
  if (!Number.isSafeInteger(writeBehind) || writeBehind < 0 || writeBehind > MD_BITMAP_WRITE_BEHIND_MAX) {
    throw bad(`write-behind ${writeBehind} must be from 0 to ${MD_BITMAP_WRITE_BEHIND_MAX}`);
  }
  const chunkCount = mdBitmapChunkCount(syncSizeSectors, chunkSizeBytes);
  if (chunkCount > BigInt(MD_BITMAP_CHUNK_COUNT_MAX)) throw bad(`${chunkCount} chunks exceed the limit of ${MD_BITMAP_CHUNK_COUNT_MAX}: use a larger chunk`);
  const bitsBytes = Math.ceil(Number(chunkCount) / 8);
  const fileBytes = Math.ceil((MD_BITMAP_SUPERBLOCK_BYTES + bitsBytes) / 512) * 512;
  const image = new Uint8Array(fileBytes);
  image.set(encodeMdBitmapSuperblock(createMdBitmapSuperblock({ uuid: options.uuid, syncSizeSectors, chunkSizeBytes, daemonSleepSeconds, writeBehind })), 0);
  image.fill(0xff, MD_BITMAP_SUPERBLOCK_BYTES, MD_BITMAP_SUPERBLOCK_BYTES + bitsBytes);
  return image;
}
