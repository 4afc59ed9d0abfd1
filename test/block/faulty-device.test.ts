import { describe, expect, test } from 'vitest';
import { FaultyBlockDevice } from '../../src/block/faulty-device.js';
import type { FaultyBlockDeviceOptions } from '../../src/block/faulty-device.js';
import { MemoryBlockDevice } from '../../src/block/memory-device.js';
import type { Sector } from '../../src/block/units.js';
import { bytes, sectors } from '../../src/block/units.js';
import { createRng } from '../../src/core/rng.js';
import { blockDeviceSuite } from '../../src/testing/conformance/block-device.js';

const variants: Array<[string, FaultyBlockDeviceOptions, number]> = [
  ['no cache', {}, 512],
  ['volatile cache', { volatileCache: true }, 512],
  ['volatile cache, 4 KiB blocks', { volatileCache: true }, 4096],
  ['volatile cache of 8 writes', { volatileCache: true, pendingWritesMax: 8 }, 512],
];
for (const [label, options, lbs] of variants) {
  blockDeviceSuite({
    test,
    expect,
    name: `faulty over memory (${label})`,
    zeroedOnCreate: true,
    factory: async (sizeSectors) =>
      new FaultyBlockDevice(new MemoryBlockDevice({ sizeSectors, logicalBlockSizeBytes: bytes(lbs) }), { rng: createRng(7), ...options }),
  });
}

const SIZE_SECTORS = sectors(1024);

function setup(options: FaultyBlockDeviceOptions = {}): { inner: MemoryBlockDevice; dev: FaultyBlockDevice } {
  const inner = new MemoryBlockDevice({ sizeSectors: SIZE_SECTORS });
  return { inner, dev: new FaultyBlockDevice(inner, options) };
}

const fill = (lengthSectors: number, value: number): Buffer => Buffer.alloc(lengthSectors * 512, value);

async function readBack(dev: { read(sector: Sector, buf: Uint8Array): Promise<void> }, sector: number, lengthSectors: number): Promise<Buffer> {
  const buf = Buffer.alloc(lengthSectors * 512, 0xa5);
  await dev.read(sectors(sector), buf);
  return buf;
}

/** The byte values of each sector of `buf` when every sector is uniform, else -1 for that sector. */
function sectorValues(buf: Buffer): number[] {
  const out: number[] = [];
  for (let s = 0; s < buf.length / 512; s++) {
    const part = buf.subarray(s * 512, (s + 1) * 512);
    out.push(part.every((x) => x === part[0]) ? part[0] : -1);
  }
  return out;
}

describe('FaultyBlockDevice: error injection', () => {
  test('error rules fail their op in their range only, change nothing, and are counted', async () => {
    const { inner, dev } = setup({ errorRules: [{ op: 'write', startSector: sectors(100), endSector: sectors(200) }] });
    await expect(dev.write(sectors(96), fill(8, 1))).rejects.toMatchObject({ code: 'DM_IO' }); // 96..103 overlaps
    await expect(dev.write(sectors(199), fill(1, 1))).rejects.toMatchObject({ code: 'DM_IO' });
    await dev.write(sectors(92), fill(8, 2)); // 92..99: ends where the rule starts
    await dev.write(sectors(200), fill(8, 3)); // the end is exclusive
    expect(sectorValues(await readBack(inner, 96, 8))).toEqual([2, 2, 2, 2, 0, 0, 0, 0]);
    expect(sectorValues(await readBack(dev, 150, 1))).toEqual([0]); // reads are not affected
    expect(dev.injectedErrorCounts).toEqual({ read: 0, write: 2, flush: 0, discard: 0 });

    dev.setErrorRules([{ op: 'read' }, { op: 'discard', startSector: sectors(10) }, { op: 'flush' }]);
    await expect(dev.read(sectors(0), Buffer.alloc(512))).rejects.toMatchObject({ code: 'DM_IO' });
    await expect(dev.read(sectors(1023), Buffer.alloc(512))).rejects.toMatchObject({ code: 'DM_IO' });
    await expect(dev.flush()).rejects.toMatchObject({ code: 'DM_IO' });
    await expect(dev.discard(sectors(8), sectors(4))).rejects.toMatchObject({ code: 'DM_IO' });
    await dev.discard(sectors(0), sectors(8));
    await dev.write(sectors(150), fill(1, 4)); // the write rule is gone
    expect(dev.injectedErrorCounts).toEqual({ read: 2, write: 2, flush: 1, discard: 1 });
    expect(dev.injectedErrorCount).toBe(6);

    dev.setErrorRules([]);
    expect(sectorValues(await readBack(dev, 150, 1))).toEqual([4]);
    await dev.flush();
  });

  test('an injected write error in the volatile cache leaves nothing pending', async () => {
    const { dev } = setup({ volatileCache: true, errorRules: [{ op: 'write', startSector: sectors(0), endSector: sectors(8) }] });
    await expect(dev.write(sectors(0), fill(8, 1))).rejects.toMatchObject({ code: 'DM_IO' });
    expect(dev.pendingWriteCount).toBe(0);
    expect(sectorValues(await readBack(dev, 0, 8))).toEqual([0, 0, 0, 0, 0, 0, 0, 0]);
  });

  test('errorProbability with a seed is deterministic', async () => {
    const failures = async (seed: number): Promise<string> => {
      const { dev } = setup({ rng: createRng(seed), errorProbability: 0.3 });
      let pattern = '';
      for (let i = 0; i < 200; i++) {
        const sector = sectors((i * 8) % 1024);
        const op = i % 3 === 0 ? dev.read(sector, Buffer.alloc(512)) : i % 3 === 1 ? dev.write(sector, fill(1, i & 0xff)) : dev.flush();
        pattern += await op.then(
          () => '.',
          (e: unknown) => {
            expect(e).toMatchObject({ code: 'DM_IO' });
            return 'x';
          },
        );
      }
      expect(dev.injectedErrorCount).toBe(pattern.split('x').length - 1);
      return pattern;
    };
    const a = await failures(42);
    expect(await failures(42)).toBe(a);
    const failed = a.split('x').length - 1;
    expect(failed).toBeGreaterThan(30);
    expect(failed).toBeLessThan(90);
    expect(await failures(43)).not.toBe(a);
  });

  test('setErrorProbability takes effect at once and can be turned off', async () => {
    const { dev } = setup({ rng: createRng(5) });
    await dev.write(sectors(0), fill(1, 1));
    dev.setErrorProbability(1);
    await expect(dev.read(sectors(0), Buffer.alloc(512))).rejects.toMatchObject({ code: 'DM_IO' });
    await expect(dev.discard(sectors(0), sectors(1))).rejects.toMatchObject({ code: 'DM_IO' });
    dev.setErrorProbability(0);
    expect(sectorValues(await readBack(dev, 0, 1))).toEqual([1]);
  });

  test('invalid options are refused with DM_INVALID_ARGUMENT', async () => {
    const inner = new MemoryBlockDevice({ sizeSectors: SIZE_SECTORS });
    const bad: FaultyBlockDeviceOptions[] = [
      { errorProbability: 0.1 }, // no rng
      { rng: createRng(1), errorProbability: -0.1 },
      { rng: createRng(1), errorProbability: Number.NaN },
      { errorRules: [{ op: 'write', startSector: sectors(10), endSector: sectors(10) }] },
      { errorRules: [{ op: 'write', startSector: sectors(-1) }] },
      { errorRules: [{ op: 'trim' as never }] },
      { pendingWritesMax: 0 },
    ];
    for (const options of bad) expect(() => new FaultyBlockDevice(inner, options)).toThrow(expect.objectContaining({ code: 'DM_INVALID_ARGUMENT' }));
    const dev = new FaultyBlockDevice(inner, { rng: createRng(1) });
    expect(() => dev.setErrorProbability(1.5)).toThrow(expect.objectContaining({ code: 'DM_INVALID_ARGUMENT' }));
    expect(() => dev.setErrorRules([{ op: 'read', endSector: sectors(0) }])).toThrow(expect.objectContaining({ code: 'DM_INVALID_ARGUMENT' }));
    await expect(new FaultyBlockDevice(inner, { volatileCache: true }).crash({ torn: true })).rejects.toMatchObject({ code: 'DM_INVALID_ARGUMENT' });
  });
});

describe('FaultyBlockDevice: volatile cache and crashes', () => {
  test('reads overlay pending writes and discards in order; flush writes them back in order', async () => {
    const { inner, dev } = setup({ volatileCache: true });
    await inner.write(sectors(0), fill(32, 9));
    await dev.write(sectors(0), fill(16, 1));
    await dev.write(sectors(8), fill(16, 2));
    await dev.discard(sectors(12), sectors(2));
    expect(dev.pendingWriteCount).toBe(3);
    const want = [1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 9, 9, 9, 9, 9, 9, 9, 9];
    expect(sectorValues(await readBack(dev, 0, 32))).toEqual(want);
    // A read that starts and ends inside pending writes.
    expect(sectorValues(await readBack(dev, 6, 4))).toEqual([1, 1, 2, 2]);
    expect(sectorValues(await readBack(inner, 0, 32))).toEqual(new Array(32).fill(9));
    await dev.flush();
    expect(dev.pendingWriteCount).toBe(0);
    expect(sectorValues(await readBack(inner, 0, 32))).toEqual(want);
    expect(sectorValues(await readBack(dev, 0, 32))).toEqual(want);
  });

  test('a crash loses unflushed writes and keeps flushed and FUA ones; the device stays usable', async () => {
    const { inner, dev } = setup({ volatileCache: true });
    expect(dev.supports.flush).toBe(true);
    await dev.write(sectors(0), fill(8, 1));
    await dev.flush();
    await dev.write(sectors(8), fill(8, 2));
    await dev.write(sectors(16), fill(8, 3), { fua: true });
    await dev.discard(sectors(0), sectors(4));
    expect(dev.pendingWriteCount).toBe(2);
    expect(sectorValues(await readBack(dev, 0, 24))).toEqual([0, 0, 0, 0, 1, 1, 1, 1, ...new Array(8).fill(2), ...new Array(8).fill(3)]);
    const report = await dev.crash();
    expect(report).toEqual({ pendingCount: 2, lostCount: 2, survivedCount: 0, tornCount: 0 });
    expect(dev.pendingWriteCount).toBe(0);
    const after = [...new Array(8).fill(1), ...new Array(8).fill(0), ...new Array(8).fill(3)];
    expect(sectorValues(await readBack(dev, 0, 24))).toEqual(after);
    expect(sectorValues(await readBack(inner, 0, 24))).toEqual(after);
    await dev.write(sectors(8), fill(1, 4));
    await dev.flush();
    expect(sectorValues(await readBack(inner, 8, 1))).toEqual([4]);
  });

  test('an older pending write never shadows a later FUA write, in reads, flushes, or crashes', async () => {
    for (let seed = 0; seed < 20; seed++) {
      const { inner, dev } = setup({ volatileCache: true, rng: createRng(seed) });
      await dev.write(sectors(0), fill(8, 1));
      await dev.write(sectors(4), fill(2, 5), { fua: true });
      expect(dev.pendingWriteCount).toBe(1);
      expect(sectorValues(await readBack(dev, 0, 8))).toEqual([1, 1, 1, 1, 5, 5, 1, 1]);
      expect(sectorValues(await readBack(inner, 4, 2))).toEqual([5, 5]); // durable at once
      const report = await dev.crash({ torn: true });
      const got = sectorValues(await readBack(dev, 0, 8));
      expect(got.slice(4, 6), `seed ${seed}`).toEqual([5, 5]);
      if (report.lostCount === 1) expect(got).toEqual([0, 0, 0, 0, 5, 5, 0, 0]);
    }
    const { inner, dev } = setup({ volatileCache: true });
    await dev.write(sectors(0), fill(8, 1));
    await dev.write(sectors(4), fill(2, 5), { fua: true });
    await dev.flush();
    expect(sectorValues(await readBack(inner, 0, 8))).toEqual([1, 1, 1, 1, 5, 5, 1, 1]);
  });

  test('a torn crash keeps, loses, or tears each pending write into a prefix of whole sectors', async () => {
    const { dev } = setup({ volatileCache: true, rng: createRng(2024) });
    const writesCount = 15;
    for (let i = 0; i < writesCount; i++) await dev.write(sectors(i * 64), fill(64, i + 1));
    await dev.write(sectors(writesCount * 64), fill(1, 0xee)); // one sector: can never tear
    const report = await dev.crash({ torn: true });
    expect(report.pendingCount).toBe(writesCount + 1);
    expect(report.lostCount + report.survivedCount).toBe(writesCount + 1);
    let whole = 0, torn = 0, lost = 0;
    for (let i = 0; i < writesCount; i++) {
      const values = sectorValues(await readBack(dev, i * 64, 64));
      const prefix = values.indexOf(0) === -1 ? 64 : values.indexOf(0);
      expect(values.slice(0, prefix), `write ${i} prefix`).toEqual(new Array(prefix).fill(i + 1));
      expect(values.slice(prefix), `write ${i} after its prefix`).toEqual(new Array(64 - prefix).fill(0));
      if (prefix === 64) whole++;
      else if (prefix === 0) lost++;
      else torn++;
    }
    const single = sectorValues(await readBack(dev, writesCount * 64, 1))[0];
    expect([0, 0xee]).toContain(single);
    if (single === 0) lost++;
    else whole++;
    expect(torn).toBe(report.tornCount);
    expect(torn).toBeGreaterThan(0);
    expect(whole).toBeGreaterThan(0);
    expect(lost).toBe(report.lostCount);
    expect(whole + torn).toBe(report.survivedCount);
  });

  test('a torn crash is deterministic for a seed', async () => {
    const run = async (seed: number): Promise<string> => {
      const { inner, dev } = setup({ volatileCache: true, rng: createRng(seed) });
      for (let i = 0; i < 8; i++) await dev.write(sectors(i * 32), fill(32, i + 1));
      await dev.crash({ torn: true });
      return inner.snapshotBytes().toString('base64');
    };
    expect(await run(11)).toBe(await run(11));
  });

  test('a flush interrupted by a crash rejects with DM_IO and writes nothing back', async () => {
    const { inner, dev } = setup({ volatileCache: true });
    await dev.write(sectors(0), fill(8, 1));
    const flushed = dev.flush();
    const report = await dev.crash();
    await expect(flushed).rejects.toMatchObject({ code: 'DM_IO' });
    expect(report.lostCount).toBe(1);
    expect(sectorValues(await readBack(inner, 0, 8))).toEqual(new Array(8).fill(0));
    await dev.write(sectors(0), fill(8, 2));
    await dev.flush();
    expect(sectorValues(await readBack(inner, 0, 8))).toEqual(new Array(8).fill(2));
  });

  test('a full cache writes itself back', async () => {
    const { inner, dev } = setup({ volatileCache: true, pendingWritesMax: 4 });
    for (let i = 0; i < 3; i++) await dev.write(sectors(i), fill(1, i + 1));
    expect(dev.pendingWriteCount).toBe(3);
    expect(sectorValues(await readBack(inner, 0, 3))).toEqual([0, 0, 0]);
    await dev.write(sectors(3), fill(1, 4));
    expect(dev.pendingWriteCount).toBe(0);
    expect(sectorValues(await readBack(inner, 0, 4))).toEqual([1, 2, 3, 4]);
  });

  test('blockStatus reports pending data over an inner hole as data', async () => {
    const { dev } = setup({ volatileCache: true });
    await dev.write(sectors(256), fill(8, 1));
    expect(await dev.blockStatus(sectors(0), SIZE_SECTORS)).toEqual([
      { startSector: 0, lengthSectors: 256, hole: true },
      { startSector: 256, lengthSectors: 8, hole: false },
      { startSector: 264, lengthSectors: 1024 - 264, hole: true },
    ]);
    await dev.flush();
    // Now the inner device has the page: its granularity (128 sectors) shows.
    expect(await dev.blockStatus(sectors(0), SIZE_SECTORS)).toEqual([
      { startSector: 0, lengthSectors: 256, hole: true },
      { startSector: 256, lengthSectors: 128, hole: false },
      { startSector: 384, lengthSectors: 1024 - 384, hole: true },
    ]);
  });

  test('without a volatile cache writes go straight down and a crash loses nothing', async () => {
    const { inner, dev } = setup({ rng: createRng(3) });
    await dev.write(sectors(0), fill(8, 1));
    expect(dev.pendingWriteCount).toBe(0);
    expect(sectorValues(await readBack(inner, 0, 8))).toEqual(new Array(8).fill(1));
    expect(await dev.crash({ torn: true })).toEqual({ pendingCount: 0, lostCount: 0, survivedCount: 0, tornCount: 0 });
    expect(sectorValues(await readBack(dev, 0, 8))).toEqual(new Array(8).fill(1));
  });

  test('close writes the cache back and closes the inner device unless told not to', async () => {
    const a = setup({ volatileCache: true });
    await a.dev.write(sectors(0), fill(8, 1));
    await a.dev.close();
    expect(a.inner.isClosed).toBe(true);

    const inner = new MemoryBlockDevice({ sizeSectors: SIZE_SECTORS });
    const dev = new FaultyBlockDevice(inner, { volatileCache: true, closeInner: false });
    await dev.write(sectors(0), fill(8, 1));
    await dev.close();
    expect(inner.isClosed).toBe(false);
    expect(sectorValues(await readBack(inner, 0, 8))).toEqual(new Array(8).fill(1));
  });
});
