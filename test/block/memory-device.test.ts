import { describe, expect, test } from 'vitest';
import { MEMORY_PAGE_SIZE_BYTES, MemoryBlockDevice } from '../../src/block/memory-device.js';
import { GiB, bytes, sectors } from '../../src/block/units.js';
import { blockDeviceSuite } from '../../src/testing/conformance/block-device.js';

blockDeviceSuite({
  test,
  expect,
  name: 'memory (512-byte blocks)',
  zeroedOnCreate: true,
  factory: async (sizeSectors) => new MemoryBlockDevice({ sizeSectors }),
});

blockDeviceSuite({
  test,
  expect,
  name: 'memory (4 KiB blocks)',
  zeroedOnCreate: true,
  factory: async (sizeSectors) => new MemoryBlockDevice({ sizeSectors, logicalBlockSizeBytes: bytes(4096) }),
});

// A size that is not a multiple of the 64 KiB page: the last page is partial.
blockDeviceSuite({
  test,
  expect,
  name: 'memory (partial last page)',
  zeroedOnCreate: true,
  sizeSectors: sectors(4096 + 40),
  factory: async (sizeSectors) => new MemoryBlockDevice({ sizeSectors }),
});

const PAGE_SECTORS = MEMORY_PAGE_SIZE_BYTES / 512;

describe('MemoryBlockDevice', () => {
  test('rejects invalid options with DM_INVALID_ARGUMENT', () => {
    const bad = [
      { sizeSectors: sectors(-1) },
      { sizeSectors: sectors(1.5) },
      { sizeSectors: sectors(1024), logicalBlockSizeBytes: bytes(1000) },
      { sizeSectors: sectors(1024), logicalBlockSizeBytes: bytes(256) },
      { sizeSectors: sectors(1024), logicalBlockSizeBytes: bytes(128 * 1024) },
      { sizeSectors: sectors(1025), logicalBlockSizeBytes: bytes(4096) },
    ];
    for (const options of bad) expect(() => new MemoryBlockDevice(options), JSON.stringify(options)).toThrow(expect.objectContaining({ code: 'DM_INVALID_ARGUMENT' }));
  });

  test('allocates pages lazily and reports unallocated ones as merged holes', async () => {
    const dev = new MemoryBlockDevice({ sizeSectors: sectors(16 * PAGE_SECTORS), name: 'm' });
    expect(dev.name).toBe('m');
    expect(dev.allocatedBytes).toBe(0);
    expect(await dev.blockStatus(sectors(0), dev.sizeSectors)).toEqual([{ startSector: 0, lengthSectors: 16 * PAGE_SECTORS, hole: true }]);
    await dev.write(sectors(PAGE_SECTORS + 8), Buffer.alloc(4096, 1)); // page 1
    await dev.write(sectors(2 * PAGE_SECTORS), Buffer.alloc(512, 2)); // page 2
    await dev.write(sectors(5 * PAGE_SECTORS - 1), Buffer.alloc(1024, 3)); // pages 4 and 5
    expect(dev.allocatedBytes).toBe(4 * MEMORY_PAGE_SIZE_BYTES);
    expect(await dev.blockStatus(sectors(0), dev.sizeSectors)).toEqual([
      { startSector: 0, lengthSectors: PAGE_SECTORS, hole: true },
      { startSector: PAGE_SECTORS, lengthSectors: 2 * PAGE_SECTORS, hole: false },
      { startSector: 3 * PAGE_SECTORS, lengthSectors: PAGE_SECTORS, hole: true },
      { startSector: 4 * PAGE_SECTORS, lengthSectors: 2 * PAGE_SECTORS, hole: false },
      { startSector: 6 * PAGE_SECTORS, lengthSectors: 10 * PAGE_SECTORS, hole: true },
    ]);
    // A sub-range is clipped to the asked bounds.
    expect(await dev.blockStatus(sectors(PAGE_SECTORS - 3), sectors(PAGE_SECTORS + 5))).toEqual([
      { startSector: PAGE_SECTORS - 3, lengthSectors: 3, hole: true },
      { startSector: PAGE_SECTORS, lengthSectors: PAGE_SECTORS + 2, hole: false },
    ]);
  });

  test('discard drops whole pages and zeroes partial ones', async () => {
    const dev = new MemoryBlockDevice({ sizeSectors: sectors(4 * PAGE_SECTORS) });
    await dev.write(sectors(0), Buffer.alloc(4 * MEMORY_PAGE_SIZE_BYTES, 9));
    expect(dev.allocatedBytes).toBe(4 * MEMORY_PAGE_SIZE_BYTES);
    // From the middle of page 0 to the middle of page 3: pages 1 and 2 go, 0 and 3 are zeroed in part.
    await dev.discard(sectors(PAGE_SECTORS / 2), sectors(3 * PAGE_SECTORS));
    expect(dev.allocatedBytes).toBe(2 * MEMORY_PAGE_SIZE_BYTES);
    expect(await dev.blockStatus(sectors(0), dev.sizeSectors)).toEqual([
      { startSector: 0, lengthSectors: PAGE_SECTORS, hole: false },
      { startSector: PAGE_SECTORS, lengthSectors: 2 * PAGE_SECTORS, hole: true },
      { startSector: 3 * PAGE_SECTORS, lengthSectors: PAGE_SECTORS, hole: false },
    ]);
    const all = dev.snapshotBytes();
    const half = MEMORY_PAGE_SIZE_BYTES / 2;
    expect(all.subarray(0, half).every((x) => x === 9)).toBe(true);
    expect(all.subarray(half, 3 * MEMORY_PAGE_SIZE_BYTES + half).every((x) => x === 0)).toBe(true);
    expect(all.subarray(3 * MEMORY_PAGE_SIZE_BYTES + half).every((x) => x === 9)).toBe(true);
  });

  test('discard to the end frees a partial last page', async () => {
    const dev = new MemoryBlockDevice({ sizeSectors: sectors(PAGE_SECTORS + 8) });
    await dev.write(sectors(PAGE_SECTORS), Buffer.alloc(4096, 1));
    expect(dev.allocatedBytes).toBe(MEMORY_PAGE_SIZE_BYTES);
    await dev.discard(sectors(PAGE_SECTORS), sectors(8));
    expect(dev.allocatedBytes).toBe(0);
  });

  test('snapshotBytes returns the whole contents', async () => {
    const dev = new MemoryBlockDevice({ sizeSectors: sectors(3 * PAGE_SECTORS + 4) });
    const data = Buffer.alloc(2048);
    for (let i = 0; i < data.length; i++) data[i] = (i * 7 + 1) & 0xff;
    await dev.write(sectors(3 * PAGE_SECTORS), data);
    const all = dev.snapshotBytes();
    expect(all.length).toBe((3 * PAGE_SECTORS + 4) * 512);
    expect(all.subarray(3 * MEMORY_PAGE_SIZE_BYTES).equals(data)).toBe(true);
    expect(all.subarray(0, 3 * MEMORY_PAGE_SIZE_BYTES).every((x) => x === 0)).toBe(true);
  });

  test('a sparse terabyte: writes at both ends, blockStatus visits only allocated pages', async () => {
    const dev = new MemoryBlockDevice({ sizeSectors: sectors((1024 * GiB) / 512) });
    const end = dev.sizeSectors;
    await dev.write(sectors(0), Buffer.alloc(512, 1));
    await dev.write(sectors(end - 8), Buffer.alloc(4096, 2));
    const got = Buffer.alloc(4096);
    await dev.read(sectors(end - 8), got);
    expect(got.every((x) => x === 2)).toBe(true);
    expect(await dev.blockStatus(sectors(0), end)).toEqual([
      { startSector: 0, lengthSectors: PAGE_SECTORS, hole: false },
      { startSector: PAGE_SECTORS, lengthSectors: end - 2 * PAGE_SECTORS, hole: true },
      { startSector: end - PAGE_SECTORS, lengthSectors: PAGE_SECTORS, hole: false },
    ]);
    expect(dev.allocatedBytes).toBe(2 * MEMORY_PAGE_SIZE_BYTES);
  });

  test('flush is a no-op on a device with nothing cached', async () => {
    const dev = new MemoryBlockDevice({ sizeSectors: sectors(64) });
    expect(dev.supports).toEqual({ flush: false, discard: true, fua: true, holes: true });
    await dev.write(sectors(0), Buffer.alloc(512, 4));
    await dev.flush();
    expect(dev.snapshotBytes().subarray(0, 512).every((x) => x === 4)).toBe(true);
  });
});
