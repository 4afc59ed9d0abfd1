/**
 * The BlockDevice conformance suite. Every BlockDevice implementation (and every composite that presents one: a
 * faulty wrapper, a mapped device over a linear table) runs it once per option variant:
 *
 *   blockDeviceSuite({ test, expect, name: 'memory', factory: async (sizeSectors) => new MemoryBlockDevice({ sizeSectors }) });
 *
 * vitest's `test` and `expect` are passed in so that src/ imports vitest only as types. Tests are skipped only
 * through the device's `supports` manifest (and `zeroedOnCreate`, a promise of the factory, not the contract).
 * Each test gets a fresh device from the factory and closes it at the end.
 */
import type { TestContext, expect as vitestExpect, test as vitestTest } from 'vitest';
import type { BlockDevice, BlockExtent } from '../../block/contract.js';
import type { Sector } from '../../block/units.js';
import { bytes, bytesToSectors, sectors, sectorsToBytes } from '../../block/units.js';
import type { Rng } from '../../core/rng.js';
import { createRng } from '../../core/rng.js';

export interface BlockDeviceSuiteOptions {
  readonly test: typeof vitestTest;
  readonly expect: typeof vitestExpect;
  /** Prefix of every test name. */
  readonly name: string;
  /** Returns a fresh, isolated device of exactly `sizeSectors` sectors. */
  readonly factory: (sizeSectors: Sector) => Promise<BlockDevice>;
  /** The factory's devices read as zeroes when new (enables the fresh-device test). */
  readonly zeroedOnCreate?: boolean;
  /** Device size used by the suite: 4096 sectors (2 MiB) by default; must hold at least 64 logical blocks. */
  readonly sizeSectors?: Sector;
  /** Seed of the random workload (default 1). */
  readonly seed?: number;
}

const SUITE_SIZE_SECTORS_DEFAULT = sectors(4096);
/** 64 KiB: the memory device's page size, a boundary worth crossing for any page-based implementation. */
const PAGE_SECTORS = 128;
const RANDOM_OPS_COUNT = 400;
const RANDOM_LENGTH_BLOCKS_MAX = 64;
const CONCURRENT_WRITES_COUNT = 32;

/** Index of the first differing byte, or -1 when equal (including length). */
export function firstDifference(a: Uint8Array, b: Uint8Array): number {
  const n = Math.min(a.byteLength, b.byteLength);
  for (let i = 0; i < n; i++) if (a[i] !== b[i]) return i;
  return a.byteLength === b.byteLength ? -1 : n;
}

/** `lengthBytes` bytes drawn from the rng, none zero (so data never passes for a hole). */
export function randomPattern(rng: Rng, lengthBytes: number): Buffer {
  const buf = Buffer.allocUnsafe(lengthBytes);
  for (let i = 0; i < lengthBytes; i++) buf[i] = 1 + rng.int(255);
  return buf;
}

export function blockDeviceSuite(options: BlockDeviceSuiteOptions): void {
  const { test, expect, name, factory } = options;
  const sizeSectors = options.sizeSectors ?? SUITE_SIZE_SECTORS_DEFAULT;
  const seed = options.seed ?? 1;

  /** Runs `body` on a fresh device and closes it afterwards (close is idempotent). */
  const withDevice = async (body: (dev: BlockDevice, blockSectors: number) => Promise<void>): Promise<void> => {
    const dev = await factory(sizeSectors);
    try {
      const blockSectors = bytesToSectors(dev.logicalBlockSizeBytes);
      expect(sizeSectors / blockSectors, 'suite device must hold at least 64 blocks').toBeGreaterThanOrEqual(64);
      await body(dev, blockSectors);
    } finally {
      await dev.close();
    }
  };
  const readRange = async (dev: BlockDevice, sector: number, lengthSectors: number): Promise<Buffer> => {
    const buf = Buffer.alloc(sectorsToBytes(sectors(lengthSectors)), 0xa5);
    await dev.read(sectors(sector), buf);
    return buf;
  };
  const readAll = (dev: BlockDevice): Promise<Buffer> => readRange(dev, 0, dev.sizeSectors);
  const expectSame = (got: Uint8Array, want: Uint8Array, what: string): void => {
    expect(firstDifference(got, want), `${what}: first differing byte`).toBe(-1);
  };
  const expectCode = async (p: Promise<unknown>, code: string, what: string): Promise<void> => {
    await expect(p, what).rejects.toMatchObject({ code });
  };
  const isZero = (buf: Uint8Array): boolean => buf.every((b) => b === 0);
  const modelWrite = (model: Buffer, sector: number, data: Uint8Array): void => {
    model.set(data, sectorsToBytes(sectors(sector)));
  };
  const modelZero = (model: Buffer, sector: number, lengthSectors: number): void => {
    const at = sectorsToBytes(sectors(sector));
    model.fill(0, at, at + sectorsToBytes(sectors(lengthSectors)));
  };

  /** Checks the contract's promises about blockStatus() on [sector, sector + lengthSectors). */
  const checkBlockStatus = async (dev: BlockDevice, sector: number, lengthSectors: number): Promise<BlockExtent[]> => {
    const extents = await dev.blockStatus(sectors(sector), sectors(lengthSectors));
    let cursor = sector;
    for (const x of extents) {
      expect(x.startSector, `extent starts where the previous ended (range ${sector}+${lengthSectors})`).toBe(cursor);
      expect(x.lengthSectors, 'extents are not empty').toBeGreaterThan(0);
      if (!dev.supports.holes) expect(x.hole, 'a device without supports.holes reports no holes').toBe(false);
      if (x.hole) expect(isZero(await readRange(dev, x.startSector, x.lengthSectors)), `hole at ${x.startSector}+${x.lengthSectors} reads as zeroes`).toBe(true);
      cursor += x.lengthSectors;
    }
    expect(cursor, `extents end at the end of the range ${sector}+${lengthSectors}`).toBe(sector + lengthSectors);
    return extents;
  };

  test(`${name}: reports its size and geometry`, () =>
    withDevice(async (dev, blockSectors) => {
      expect(dev.sizeSectors).toBe(sizeSectors);
      const lbs = dev.logicalBlockSizeBytes;
      expect(lbs).toBeGreaterThanOrEqual(512);
      expect(lbs & (lbs - 1), 'logical block size is a power of two').toBe(0);
      expect(dev.sizeSectors % blockSectors).toBe(0);
      expect(typeof dev.name === 'string' && dev.name.length > 0).toBe(true);
      expect(dev.isClosed).toBe(false);
    }));

  test(`${name}: fresh device reads zeroes`, (ctx: TestContext) => {
    ctx.skip(options.zeroedOnCreate !== true, 'the factory does not promise zeroed devices');
    return withDevice(async (dev) => {
      expect(isZero(await readAll(dev))).toBe(true);
    });
  });

  test(`${name}: write/read round trip at several offsets and sizes, including the last block`, () =>
    withDevice(async (dev, b) => {
      const rng = createRng(seed);
      const model = await readAll(dev);
      const size = dev.sizeSectors;
      const cases: Array<[number, number]> = [
        [0, b],
        [b, 8 * b],
        [PAGE_SECTORS - b, 2 * b], // across a 64 KiB boundary
        [3 * PAGE_SECTORS + b, PAGE_SECTORS + 2 * b], // more than a page, both ends unaligned to pages
        [size - 16 * b, 15 * b],
        [size - b, b], // the last block
      ];
      for (const [sector, lengthSectors] of cases) {
        const data = randomPattern(rng, sectorsToBytes(sectors(lengthSectors)));
        await dev.write(sectors(sector), data);
        modelWrite(model, sector, data);
      }
      for (const [sector, lengthSectors] of cases) {
        const at = sectorsToBytes(sectors(sector));
        expectSame(await readRange(dev, sector, lengthSectors), model.subarray(at, at + sectorsToBytes(sectors(lengthSectors))), `read ${sector}+${lengthSectors}`);
      }
      expectSame(await readAll(dev), model, 'whole device after the writes');
    }));

  test(`${name}: a write copies the caller's buffer; a read fills only its view`, () =>
    withDevice(async (dev, b) => {
      const lbs = dev.logicalBlockSizeBytes;
      const data = randomPattern(createRng(seed + 1), 2 * lbs);
      const kept = Buffer.from(data);
      await dev.write(sectors(2 * b), data);
      data.fill(0x77);
      expectSame(await readRange(dev, 2 * b, 2 * b), kept, 'data after the caller reused its buffer');
      const backing = Buffer.alloc(4 * lbs, 0xee);
      const view = new Uint8Array(backing.buffer, backing.byteOffset + lbs, 2 * lbs);
      await dev.read(sectors(2 * b), view);
      expectSame(view, kept, 'read into a view at a byte offset');
      expect(backing.subarray(0, lbs).every((x) => x === 0xee), 'bytes before the view untouched').toBe(true);
      expect(backing.subarray(3 * lbs).every((x) => x === 0xee), 'bytes after the view untouched').toBe(true);
    }));

  test(`${name}: zero-length read and write resolve and change nothing`, () =>
    withDevice(async (dev) => {
      const before = await readAll(dev);
      await dev.read(sectors(0), new Uint8Array(0));
      await dev.write(sectors(0), new Uint8Array(0));
      expectSame(await readAll(dev), before, 'device after zero-length I/O');
    }));

  test(`${name}: out-of-range I/O rejects with DM_IO_RANGE and changes nothing`, () =>
    withDevice(async (dev, b) => {
      const lbs = dev.logicalBlockSizeBytes;
      const size = dev.sizeSectors;
      const lastBefore = await readRange(dev, size - b, b);
      const two = randomPattern(createRng(seed + 2), 2 * lbs);
      await expectCode(dev.read(sectors(size), new Uint8Array(lbs)), 'DM_IO_RANGE', 'read at the end');
      await expectCode(dev.read(sectors(size - b), new Uint8Array(2 * lbs)), 'DM_IO_RANGE', 'read across the end');
      await expectCode(dev.read(sectors(size + 1000 * b), new Uint8Array(lbs)), 'DM_IO_RANGE', 'read far past the end');
      await expectCode(dev.write(sectors(size - b), two), 'DM_IO_RANGE', 'write across the end');
      await expectCode(dev.write(sectors(size - b), two, { fua: true }), 'DM_IO_RANGE', 'FUA write across the end');
      await expectCode(dev.write(sectors(size), two.subarray(0, lbs)), 'DM_IO_RANGE', 'write at the end');
      await expectCode(dev.discard(sectors(size - b), sectors(2 * b)), 'DM_IO_RANGE', 'discard across the end');
      await expectCode(dev.blockStatus(sectors(size - b), sectors(2 * b)), 'DM_IO_RANGE', 'blockStatus across the end');
      expectSame(await readRange(dev, size - b, b), lastBefore, 'last block after rejected I/O');
    }));

  test(`${name}: misaligned I/O rejects with DM_IO_ALIGNMENT and changes nothing`, () =>
    withDevice(async (dev, b) => {
      const lbs = dev.logicalBlockSizeBytes;
      const firstBefore = await readRange(dev, 0, 2 * b);
      const buf = (n: number): Uint8Array => new Uint8Array(n).fill(0x5a);
      await expectCode(dev.read(sectors(0.5), buf(lbs)), 'DM_IO_ALIGNMENT', 'read at a fractional sector');
      await expectCode(dev.read(sectors(-b), buf(lbs)), 'DM_IO_ALIGNMENT', 'read at a negative sector');
      await expectCode(dev.read(sectors(Number.NaN), buf(lbs)), 'DM_IO_ALIGNMENT', 'read at NaN');
      await expectCode(dev.read(sectors(0), buf(lbs + 1)), 'DM_IO_ALIGNMENT', 'read of a partial block');
      await expectCode(dev.write(sectors(0), buf(lbs + 1)), 'DM_IO_ALIGNMENT', 'write of a partial block');
      await expectCode(dev.write(sectors(0), buf(lbs / 2)), 'DM_IO_ALIGNMENT', 'write of half a block');
      await expectCode(dev.write(sectors(1.5), buf(lbs)), 'DM_IO_ALIGNMENT', 'write at a fractional sector');
      await expectCode(dev.write(sectors(-b), buf(lbs)), 'DM_IO_ALIGNMENT', 'write at a negative sector');
      await expectCode(dev.discard(sectors(0.5), sectors(b)), 'DM_IO_ALIGNMENT', 'discard at a fractional sector');
      await expectCode(dev.blockStatus(sectors(-b), sectors(b)), 'DM_IO_ALIGNMENT', 'blockStatus at a negative sector');
      if (b > 1) {
        await expectCode(dev.write(sectors(1), buf(lbs)), 'DM_IO_ALIGNMENT', 'write inside a logical block');
        await expectCode(dev.read(sectors(1), buf(lbs)), 'DM_IO_ALIGNMENT', 'read inside a logical block');
      }
      expectSame(await readRange(dev, 0, 2 * b), firstBefore, 'first blocks after rejected I/O');
    }));

  test(`${name}: FUA write then read`, () =>
    withDevice(async (dev, b) => {
      const data = randomPattern(createRng(seed + 3), sectorsToBytes(sectors(4 * b)));
      await dev.write(sectors(10 * b), data, { fua: true });
      expectSame(await readRange(dev, 10 * b, 4 * b), data, 'FUA write read back');
    }));

  test(`${name}: flush resolves and keeps the data`, () =>
    withDevice(async (dev, b) => {
      const data = randomPattern(createRng(seed + 4), sectorsToBytes(sectors(3 * b)));
      await dev.write(sectors(5 * b), data);
      await dev.flush();
      await dev.flush();
      expectSame(await readRange(dev, 5 * b, 3 * b), data, 'data after flush');
    }));

  test(`${name}: discard makes the range read as zeroes and leaves the rest`, (ctx: TestContext) =>
    withDevice(async (dev, b) => {
      ctx.skip(!dev.supports.discard, 'supports.discard is false');
      const size = dev.sizeSectors;
      const model = await readAll(dev);
      const written = randomPattern(createRng(seed + 5), sectorsToBytes(sectors(size - 2 * b)));
      await dev.write(sectors(b), written);
      modelWrite(model, b, written);
      // A range with unaligned edges spanning whole pages, then a small one inside a page.
      const ranges: Array<[number, number]> = [
        [PAGE_SECTORS - 3 * b, 3 * PAGE_SECTORS + 5 * b],
        [6 * PAGE_SECTORS + 2 * b, b],
      ];
      for (const [sector, lengthSectors] of ranges) {
        await dev.discard(sectors(sector), sectors(lengthSectors));
        modelZero(model, sector, lengthSectors);
        expect(isZero(await readRange(dev, sector, lengthSectors)), `discarded ${sector}+${lengthSectors} reads as zeroes`).toBe(true);
      }
      expectSame(await readAll(dev), model, 'whole device after discards');
      await dev.discard(sectors(0), size);
      expect(isZero(await readAll(dev)), 'whole device after discarding it all').toBe(true);
      await checkBlockStatus(dev, 0, size);
    }));

  test(`${name}: blockStatus extents cover the range exactly and holes read as zeroes`, () =>
    withDevice(async (dev, b) => {
      const size = dev.sizeSectors;
      const rng = createRng(seed + 6);
      for (const [sector, lengthSectors] of [[0, b], [2 * PAGE_SECTORS + b, PAGE_SECTORS], [size - 2 * b, 2 * b]]) {
        await dev.write(sectors(sector), randomPattern(rng, sectorsToBytes(sectors(lengthSectors))));
      }
      if (dev.supports.discard) await dev.discard(sectors(2 * PAGE_SECTORS + 4 * b), sectors(8 * b));
      const ranges: Array<[number, number]> = [
        [0, size],
        [b, size - 2 * b],
        [3 * b, 2 * b],
        [PAGE_SECTORS, PAGE_SECTORS],
        [2 * PAGE_SECTORS, 2 * PAGE_SECTORS],
        [size - b, b],
      ];
      for (const [sector, lengthSectors] of ranges) await checkBlockStatus(dev, sector, lengthSectors);
    }));

  test(`${name}: after close every operation rejects with DM_CLOSED; close twice is fine`, () =>
    withDevice(async (dev, b) => {
      const lbs = dev.logicalBlockSizeBytes;
      await dev.close();
      expect(dev.isClosed).toBe(true);
      await expectCode(dev.read(sectors(0), new Uint8Array(lbs)), 'DM_CLOSED', 'read');
      await expectCode(dev.write(sectors(0), new Uint8Array(lbs)), 'DM_CLOSED', 'write');
      await expectCode(dev.write(sectors(0), new Uint8Array(lbs), { fua: true }), 'DM_CLOSED', 'FUA write');
      await expectCode(dev.flush(), 'DM_CLOSED', 'flush');
      await expectCode(dev.discard(sectors(0), sectors(b)), 'DM_CLOSED', 'discard');
      await expectCode(dev.blockStatus(sectors(0), sectors(b)), 'DM_CLOSED', 'blockStatus');
      await dev.close();
      expect(dev.isClosed).toBe(true);
    }));

  test(`${name}: concurrent writes to disjoint ranges all land`, () =>
    withDevice(async (dev, b) => {
      const rng = createRng(seed + 7);
      const model = await readAll(dev);
      const slotSectors = Math.floor(dev.sizeSectors / CONCURRENT_WRITES_COUNT / b) * b;
      const writes: Array<[number, Buffer]> = [];
      for (let i = 0; i < CONCURRENT_WRITES_COUNT; i++) {
        const lengthSectors = (1 + rng.int(slotSectors / b)) * b;
        const sector = i * slotSectors + rng.int((slotSectors - lengthSectors) / b + 1) * b;
        writes.push([sector, randomPattern(rng, sectorsToBytes(sectors(lengthSectors)))]);
      }
      await Promise.all(writes.map(([sector, data], i) => dev.write(sectors(sector), data, { fua: i % 4 === 0 })));
      for (const [sector, data] of writes) modelWrite(model, sector, data);
      const reads = await Promise.all(writes.map(([sector, data]) => readRange(dev, sector, bytesToSectors(bytes(data.byteLength)))));
      reads.forEach((got, i) => expectSame(got, writes[i][1], `concurrent write ${i}`));
      expectSame(await readAll(dev), model, 'whole device after concurrent writes');
    }));

  test(`${name}: a seeded random workload matches a Buffer model`, () =>
    withDevice(async (dev, b) => {
      const rng = createRng(seed + 8);
      const model = await readAll(dev);
      const blocks = dev.sizeSectors / b;
      const pick = (): [number, number] => {
        const lengthBlocks = 1 + rng.int(Math.min(RANDOM_LENGTH_BLOCKS_MAX, blocks));
        return [rng.int(blocks - lengthBlocks + 1) * b, lengthBlocks * b];
      };
      for (let i = 0; i < RANDOM_OPS_COUNT; i++) {
        const what = rng.int(100);
        const [sector, lengthSectors] = pick();
        const where = `op ${i} (seed ${seed + 8}) at ${sector}+${lengthSectors}`;
        if (what < 45 || (what < 60 && !dev.supports.discard)) {
          const data = randomPattern(rng, sectorsToBytes(sectors(lengthSectors)));
          await dev.write(sectors(sector), data, { fua: rng.int(5) === 0 });
          modelWrite(model, sector, data);
        } else if (what < 60) {
          await dev.discard(sectors(sector), sectors(lengthSectors));
          modelZero(model, sector, lengthSectors);
        } else if (what < 90) {
          const at = sectorsToBytes(sectors(sector));
          expectSame(await readRange(dev, sector, lengthSectors), model.subarray(at, at + sectorsToBytes(sectors(lengthSectors))), `read, ${where}`);
        } else if (what < 95) {
          await dev.flush();
        } else {
          await checkBlockStatus(dev, sector, lengthSectors);
        }
      }
      expectSame(await readAll(dev), model, `whole device after the workload (seed ${seed + 8})`);
    }));
}
