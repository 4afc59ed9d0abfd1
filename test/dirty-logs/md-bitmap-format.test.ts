/**
 * The md bitmap file format: the 256-byte superblock (field offsets of the spec table, round trip, the kernel's
 * validation reasons), mdadm's CreateBitmap image, and the pieces of `mdadm -X` output (C rounding, human_size).
 * The output as a whole is compared with the real mdadm in test/dirty-logs/mdadm-interop.test.ts.
 */
import { describe, expect, test } from 'vitest';
import { createRng } from '../../src/core/rng.js';
import { createMdBitmapImage, mdadmDefaultChunkSizeBytes } from '../../src/dirty-logs/md-bitmap/create-image.js';
import { countMdBitmapBits, examineMdBitmap, formatCFixed1, mdadmHumanChunksize, mdadmHumanSize } from '../../src/dirty-logs/md-bitmap/examine.js';
import {
  MD_BITMAP_MAGIC,
  MD_BITMAP_SUPERBLOCK_BYTES,
  createMdBitmapSuperblock,
  decodeMdBitmapSuperblock,
  encodeMdBitmapSuperblock,
  formatMdBitmapUuid,
  isBlankMdBitmapSuperblock,
  mdBitmapChunkCount,
  mdBitmapFileBytes,
  parseMdBitmapUuid,
  validateMdBitmapSuperblock,
  type MdBitmapSuperblock,
} from '../../src/dirty-logs/md-bitmap/superblock.js';

function randomSuperblock(seed: number): MdBitmapSuperblock {
  const rng = createRng(seed);
  const u32 = (): number => Math.floor(rng.next() * 2 ** 32);
  const u64 = (): bigint => (BigInt(u32()) << 32n) | BigInt(u32());
  const bytes = (n: number): Uint8Array => Uint8Array.from({ length: n }, () => rng.int(256));
  return {
    magic: u32(),
    version: u32(),
    uuid: bytes(16),
    events: u64(),
    eventsCleared: u64(),
    syncSizeSectors: u64(),
    state: u32(),
    chunkSizeBytes: u32(),
    daemonSleepSeconds: u32(),
    writeBehind: u32(),
    sectorsReserved: u32(),
    nodes: u32(),
    clusterName: bytes(64),
  };
}

describe('md bitmap superblock', () => {
  test('every field sits at the offset of the spec table, little-endian, the pad is zero', () => {
    const sb = randomSuperblock(7);
    const buf = encodeMdBitmapSuperblock(sb);
    expect(buf.byteLength).toBe(256);
    const v = new DataView(buf.buffer);
    expect(v.getUint32(0, true)).toBe(sb.magic);
    expect(v.getUint32(4, true)).toBe(sb.version);
    expect(Buffer.from(buf.subarray(8, 24)).equals(Buffer.from(sb.uuid))).toBe(true);
    expect(v.getBigUint64(24, true)).toBe(sb.events);
    expect(v.getBigUint64(32, true)).toBe(sb.eventsCleared);
    expect(v.getBigUint64(40, true)).toBe(sb.syncSizeSectors);
    expect(v.getUint32(48, true)).toBe(sb.state);
    expect(v.getUint32(52, true)).toBe(sb.chunkSizeBytes);
    expect(v.getUint32(56, true)).toBe(sb.daemonSleepSeconds);
    expect(v.getUint32(60, true)).toBe(sb.writeBehind);
    expect(v.getUint32(64, true)).toBe(sb.sectorsReserved);
    expect(v.getUint32(68, true)).toBe(sb.nodes);
    expect(Buffer.from(buf.subarray(72, 136)).equals(Buffer.from(sb.clusterName))).toBe(true);
    expect(buf.subarray(136).every((b) => b === 0)).toBe(true);
    // "bitm" in the file's first four bytes.
    expect(Buffer.from(encodeMdBitmapSuperblock(createMdBitmapSuperblock({ syncSizeSectors: 8n, chunkSizeBytes: 4096, daemonSleepSeconds: 5 })).subarray(0, 4)).toString('latin1')).toBe('bitm');
  });

  test('decode(encode(sb)) gives sb back for any field values (u64 fields exact)', () => {
    for (let seed = 1; seed <= 50; seed++) {
      const sb = randomSuperblock(seed);
      const back = decodeMdBitmapSuperblock(encodeMdBitmapSuperblock(sb));
      expect(back).toEqual(sb);
      // And the bytes: encode(decode(bytes)) is the same 256 bytes.
      expect(Buffer.from(encodeMdBitmapSuperblock(back)).equals(Buffer.from(encodeMdBitmapSuperblock(sb)))).toBe(true);
    }
  });

  test('encode refuses values that do not fit their field', () => {
    const sb = createMdBitmapSuperblock({ syncSizeSectors: 8n, chunkSizeBytes: 4096, daemonSleepSeconds: 5 });
    expect(() => encodeMdBitmapSuperblock({ ...sb, chunkSizeBytes: 2 ** 32 })).toThrow(expect.objectContaining({ code: 'DM_INVALID_ARGUMENT' }));
    expect(() => encodeMdBitmapSuperblock({ ...sb, events: 1n << 64n })).toThrow(expect.objectContaining({ code: 'DM_INVALID_ARGUMENT' }));
    expect(() => encodeMdBitmapSuperblock({ ...sb, eventsCleared: -1n })).toThrow(expect.objectContaining({ code: 'DM_INVALID_ARGUMENT' }));
    expect(() => encodeMdBitmapSuperblock({ ...sb, uuid: new Uint8Array(15) })).toThrow(expect.objectContaining({ code: 'DM_INVALID_ARGUMENT' }));
  });

  test('a buffer shorter than 256 bytes does not decode', () => {
    expect(() => decodeMdBitmapSuperblock(new Uint8Array(255))).toThrow(expect.objectContaining({ code: 'DM_INVALID_ARGUMENT' }));
  });

  test('validation gives the kernel reasons: magic, version, chunk size, daemon sleep, write-behind', () => {
    const ok = createMdBitmapSuperblock({ syncSizeSectors: 1000n, chunkSizeBytes: 65536, daemonSleepSeconds: 5 });
    expect(validateMdBitmapSuperblock(ok)).toBeUndefined();
    for (const version of [3, 4, 5]) expect(validateMdBitmapSuperblock({ ...ok, version })).toBeUndefined();
    const cases: Array<[Partial<MdBitmapSuperblock>, RegExp]> = [
      [{ magic: 0x12345678 }, /bad magic/],
      [{ version: 2 }, /unrecognized superblock version/],
      [{ version: 6 }, /unrecognized superblock version/],
      [{ chunkSizeBytes: 256 }, /chunksize too small/],
      [{ chunkSizeBytes: 0 }, /chunksize too small/],
      [{ chunkSizeBytes: 3 * 1024 }, /not a power of 2/],
      [{ daemonSleepSeconds: 0 }, /daemon sleep/],
      [{ writeBehind: 16384 }, /write-behind/],
    ];
    for (const [patch, reason] of cases) expect(validateMdBitmapSuperblock({ ...ok, ...patch })).toMatch(reason);
    expect(validateMdBitmapSuperblock({ ...ok, writeBehind: 16383 })).toBeUndefined();
  });

  test('chunk count and file size follow mdadm bitmap_bits and md store->bytes', () => {
    expect(mdBitmapChunkCount(129024n, 65536)).toBe(1008n);
    expect(mdBitmapChunkCount(1n, 512)).toBe(1n);
    expect(mdBitmapChunkCount(129n, 65536)).toBe(2n);
    expect(mdBitmapChunkCount(100n, 0)).toBe(0n);
    expect(mdBitmapFileBytes(1008)).toBe(256 + 126);
    expect(mdBitmapFileBytes(1)).toBe(257);
    expect(mdBitmapFileBytes(8)).toBe(257);
    expect(mdBitmapFileBytes(9)).toBe(258);
  });

  test('UUIDs print as mdadm prints them and parse back; bad ones are refused', () => {
    const uuid = parseMdBitmapUuid('00112233:44556677:8899aabb:ccddeeff');
    expect(Buffer.from(uuid).toString('hex')).toBe('00112233445566778899aabbccddeeff');
    expect(formatMdBitmapUuid(uuid)).toBe('00112233:44556677:8899aabb:ccddeeff');
    expect(formatMdBitmapUuid(parseMdBitmapUuid('00112233-4455-6677-8899-aabbccddeeff'))).toBe('00112233:44556677:8899aabb:ccddeeff');
    expect(() => parseMdBitmapUuid('0011')).toThrow(expect.objectContaining({ code: 'DM_INVALID_ARGUMENT' }));
    expect(() => parseMdBitmapUuid('zz112233:44556677:8899aabb:ccddeeff')).toThrow(expect.objectContaining({ code: 'DM_INVALID_ARGUMENT' }));
  });

  test('a blank superblock is all zeros; one non-zero byte anywhere in it is not blank', () => {
    const buf = new Uint8Array(512);
    expect(isBlankMdBitmapSuperblock(buf)).toBe(true);
    buf[255] = 1;
    expect(isBlankMdBitmapSuperblock(buf)).toBe(false);
    buf[255] = 0;
    buf[256] = 1; // a bit, not the superblock
    expect(isBlankMdBitmapSuperblock(buf)).toBe(true);
  });
});

describe('md bitmap create (mdadm CreateBitmap)', () => {
  test('superblock as mdadm writes it, every bit set, zero padding to 512 bytes', () => {
    const uuid = parseMdBitmapUuid('00112233:44556677:8899aabb:ccddeeff');
    const img = createMdBitmapImage({ syncSizeSectors: 129024n, chunkSizeBytes: 65536, daemonSleepSeconds: 3, writeBehind: 7, uuid });
    expect(img.byteLength).toBe(512);
    const sb = decodeMdBitmapSuperblock(img);
    expect(sb).toMatchObject({ magic: MD_BITMAP_MAGIC, version: 4, events: 0n, eventsCleared: 0n, state: 0, syncSizeSectors: 129024n, chunkSizeBytes: 65536, daemonSleepSeconds: 3, writeBehind: 7 });
    expect(formatMdBitmapUuid(sb.uuid)).toBe('00112233:44556677:8899aabb:ccddeeff');
    expect(img.subarray(256, 256 + 126).every((b) => b === 0xff)).toBe(true);
    expect(img.subarray(256 + 126).every((b) => b === 0)).toBe(true);
    expect(countMdBitmapBits(img, sb)).toEqual({ totalBits: 1008n, dirtyBits: 1008n, truncated: false });
  });

  test('default chunk: 4 KiB, doubled while there would be more than 2^20 chunks', () => {
    expect(mdadmDefaultChunkSizeBytes(1000n)).toBe(4096);
    // 2^20 chunks of 4 KiB = 4 GiB = 2^23 sectors: still 4 KiB; one sector more doubles.
    expect(mdadmDefaultChunkSizeBytes(2n ** 23n)).toBe(4096);
    expect(mdadmDefaultChunkSizeBytes(2n ** 23n + 1n)).toBe(8192);
    expect(mdadmDefaultChunkSizeBytes(2n ** 31n)).toBe(4096 * 256);
    for (const s of [1n, 12345n, 2n ** 23n + 1n, 2n ** 33n, 2n ** 40n]) {
      expect(mdBitmapChunkCount(s, mdadmDefaultChunkSizeBytes(s))).toBeLessThanOrEqual(2n ** 20n);
    }
  });

  test('bad geometry is refused with DM_INVALID_ARGUMENT', () => {
    for (const bad of [
      { syncSizeSectors: 0n },
      { syncSizeSectors: 100n, chunkSizeBytes: 256 },
      { syncSizeSectors: 100n, chunkSizeBytes: 3000 },
      { syncSizeSectors: 100n, chunkSizeBytes: 2 ** 32 },
      { syncSizeSectors: 100n, daemonSleepSeconds: 0 },
      { syncSizeSectors: 100n, writeBehind: 16384 },
      { syncSizeSectors: 2n ** 40n, chunkSizeBytes: 512 },
    ]) {
      expect(() => createMdBitmapImage(bad)).toThrow(expect.objectContaining({ code: 'DM_INVALID_ARGUMENT' }));
    }
  });
});

describe('mdadm -X formatting', () => {
  test('"%.1f" rounds the exact binary value, ties to even (where toFixed rounds ties up)', () => {
    // Exactly representable ties: C gives the even neighbour.
    expect(formatCFixed1(12.25)).toBe('12.2');
    expect(formatCFixed1(0.25)).toBe('0.2');
    expect(formatCFixed1(0.75)).toBe('0.8');
    expect(formatCFixed1(100)).toBe('100.0');
    expect(formatCFixed1(0)).toBe('0.0');
    // Not ties in binary: 0.35 is 0.34999..., 0.05 is 0.05000...03.
    expect(formatCFixed1(0.35)).toBe('0.3');
    expect(formatCFixed1(0.05)).toBe('0.1');
    expect(formatCFixed1((100 * 2) / 1008)).toBe('0.2');
    expect(formatCFixed1(5e-324)).toBe('0.0');
    // Everywhere else it agrees with toFixed (which is exact for non-ties).
    const rng = createRng(3);
    for (let i = 0; i < 2000; i++) {
      const v = rng.int(100_000) / rng.int(1000) || 0;
      const tenths = v * 10;
      if (Math.abs(tenths - Math.floor(tenths) - 0.5) < 1e-9) continue;
      expect(formatCFixed1(v)).toBe(v.toFixed(1));
    }
  });

  test('human_chunksize and human_size as mdadm 4.2 prints them', () => {
    expect(mdadmHumanChunksize(512)).toBe('512 B');
    expect(mdadmHumanChunksize(65536)).toBe('64 KB');
    expect(mdadmHumanChunksize(1 << 20)).toBe('1 MB');
    expect(mdadmHumanChunksize(2 ** 31)).toBe('2 GB');
    expect(mdadmHumanChunksize(3 * 1024 + 5)).toBe('3 KB');
    // Values printed by Debian's mdadm 4.2 for these sync sizes (sectors × 512 bytes).
    expect(mdadmHumanSize(9999n * 512n)).toBe('');
    expect(mdadmHumanSize(10000n * 512n)).toBe(' (4.88 MiB 5.12 MB)');
    expect(mdadmHumanSize(129024n * 512n)).toBe(' (63.00 MiB 66.06 MB)');
    expect(mdadmHumanSize(4194303n * 512n)).toBe(' (2048.00 MiB 2147.48 MB)');
    expect(mdadmHumanSize(4194304n * 512n)).toBe(' (2.00 GiB 2.15 GB)');
    expect(mdadmHumanSize(10000000n * 512n)).toBe(' (4.77 GiB 5.12 GB)');
    expect(mdadmHumanSize(2n ** 33n * 512n)).toBe(' (4.00 TiB 4.40 TB)');
  });

  const file = (patch: Partial<MdBitmapSuperblock>, bits: number[] = [], bitsBytes?: number): Uint8Array => {
    const sb = { ...createMdBitmapSuperblock({ syncSizeSectors: 2048n, chunkSizeBytes: 65536, daemonSleepSeconds: 5 }), ...patch };
    const n = Number(mdBitmapChunkCount(sb.syncSizeSectors, sb.chunkSizeBytes));
    const img = new Uint8Array(MD_BITMAP_SUPERBLOCK_BYTES + (bitsBytes ?? Math.ceil(n / 8)));
    img.set(encodeMdBitmapSuperblock(sb));
    for (const b of bits) img[256 + (b >> 3)] |= 1 << (b & 7);
    return img;
  };

  test('a bitmap with dirty bits: every line', () => {
    const r = examineMdBitmap(file({ events: 9n, eventsCleared: 4n, uuid: parseMdBitmapUuid('00112233445566778899aabbccddeeff') }, [0, 3, 15]), 'bm.img');
    expect(r.exitCode).toBe(0);
    expect(r.stderr).toBe('');
    expect(r.stdout.split('\n')).toEqual([
      '        Filename : bm.img',
      '           Magic : 6d746962',
      '         Version : 4',
      '            UUID : 00112233:44556677:8899aabb:ccddeeff',
      '          Events : 9',
      '  Events Cleared : 4',
      '           State : OK',
      '       Chunksize : 64 KB',
      '          Daemon : 5s flush period',
      '      Write Mode : Normal',
      '       Sync Size : 1024',
      '          Bitmap : 16 bits (chunks), 3 dirty (18.8%)',
      '',
    ]);
  });

  test('state names, write-behind, truncated files, bits past the last chunk', () => {
    expect(examineMdBitmap(file({ state: 2 }), 'f').stdout).toMatch(/State : Out of date\n/);
    expect(examineMdBitmap(file({ state: 4 }), 'f').stdout).toMatch(/State : Unknown\n/);
    expect(examineMdBitmap(file({ writeBehind: 100 }), 'f').stdout).toMatch(/Write Mode : Allow write behind, max 100\n/);
    // 2048 sectors / 64 KiB = 16 chunks; a file with one byte of bits counts 8 of them and warns.
    const short = examineMdBitmap(file({}, [1, 2], 1), 'f');
    expect(short.stdout).toMatch(/Bitmap : 8 bits \(chunks\), 2 dirty \(25\.0%\)\n/);
    expect(short.stderr).toMatch(/not large enough for array size 2048/);
    expect(short.exitCode).toBe(0);
    // 12 chunks: the 4 bits past them in the last byte are not counted.
    const tail = file({ syncSizeSectors: 1536n }, [11]);
    tail[257] |= 0xf0;
    expect(examineMdBitmap(tail, 'f').stdout).toMatch(/Bitmap : 12 bits \(chunks\), 1 dirty \(8\.3%\)\n/);
  });

  test('not a bitmap: short superblock, bad magic, unknown version (exit 1, the reason on stderr)', () => {
    const short = examineMdBitmap(new Uint8Array(100), 'f');
    expect(short).toMatchObject({ stdout: '', exitCode: 1 });
    expect(short.stderr).toMatch(/too short/);
    const magic = examineMdBitmap(file({ magic: 0x12345678 }), 'f');
    expect(magic.exitCode).toBe(1);
    expect(magic.stderr).toMatch(/invalid bitmap magic 0x12345678/);
    expect(magic.stdout).toMatch(/Magic : 12345678\n/);
    const version = examineMdBitmap(file({ version: 2 }), 'f');
    expect(version.exitCode).toBe(1);
    expect(version.stderr).toMatch(/unknown bitmap version 2/);
    expect(version.stdout.trimEnd().split('\n')).toHaveLength(3);
  });
});
