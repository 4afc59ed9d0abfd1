/** The disk log: the shared dirty-log suite on a volatile-cache device, then the kernel's on-disk format. */
import { describe, expect, test } from 'vitest';
import type { BlockDevice } from '../../src/block/contract.js';
import { FaultyBlockDevice } from '../../src/block/faulty-device.js';
import { MemoryBlockDevice } from '../../src/block/memory-device.js';
import { sectors } from '../../src/block/units.js';
import { SimulatedClock } from '../../src/core/clock.js';
import type { DirtyLogOptions } from '../../src/dirty-logs/contract.js';
import { DISK_LOG_MAGIC, diskLog, diskLogBufferBytes, readDiskLogCleanBits } from '../../src/dirty-logs/disk-log.js';
import { dirtyLogSuite } from '../../src/testing/conformance/dirty-log.js';

const LOG_DEVICE_SECTORS = 64;

describe('disk log conformance', () => {
  dirtyLogSuite({
    test,
    expect,
    name: 'disk',
    type: diskLog,
    persistent: true,
    validArgs: ['log.img', '1024'],
    factory: async (base) => ({ ...base, logDevice: new FaultyBlockDevice(new MemoryBlockDevice({ sizeSectors: sectors(LOG_DEVICE_SECTORS) }), { volatileCache: true }) }),
    crash: async (options) => {
      await (options.logDevice as FaultyBlockDevice).crash();
    },
    release: async (options) => options.logDevice?.close(),
  });
});

describe('disk log', () => {
  const setup = (initialSync: DirtyLogOptions['initialSync'], device: BlockDevice = new MemoryBlockDevice({ sizeSectors: sectors(LOG_DEVICE_SECTORS) }), flushLegs?: () => Promise<void>): DirtyLogOptions => ({
    targetSizeSectors: sectors(32768),
    regionSizeSectors: sectors(1024),
    initialSync,
    clock: new SimulatedClock(),
    logDevice: device,
    logDeviceLabel: 'log.img',
    flushLegs,
  });
  const image = async (dev: MemoryBlockDevice, bytes = 1536): Promise<Buffer> => {
    const b = Buffer.alloc(bytes);
    await dev.read(sectors(0), b);
    return b;
  };

  test('a resumed log is in the kernel format: header MiRr v2, nr_regions, clean bits from byte 1024', async () => {
    const dev = new MemoryBlockDevice({ sizeSectors: sectors(LOG_DEVICE_SECTORS) });
    const log = await diskLog.create(setup('nosync', dev));
    await diskLog.resume!(log);
    // The bytes the kernel wrote for the same table (test/kernel/mirror-interop.test.ts checks it live).
    const img = await image(dev);
    expect(img.subarray(0, 16).toString('hex')).toBe('7252694d020000002000000000000000');
    expect(img.subarray(1024, 1032).toString('hex')).toBe('ffffffff00000000');
    expect(img.subarray(1032).every((b) => b === 0)).toBe(true);
    expect(diskLogBufferBytes(32, 512)).toBe(1536);
    expect(diskLog.table(log)).toBe('disk 3 log.img 1024 nosync');
    expect(diskLog.status(log)).toBe('3 disk log.img A');
  });

  test('a mark is written and flushed before flush() resolves; a clear waits for the legs to be flushed', async () => {
    const dev = new MemoryBlockDevice({ sizeSectors: sectors(LOG_DEVICE_SECTORS) });
    const order: string[] = [];
    const log = await diskLog.create(setup('nosync', dev, async () => {
      order.push('legs flushed');
    }));
    await diskLog.resume!(log);
    diskLog.markRegion(log, 3);
    await diskLog.flush(log);
    expect(readDiskLogCleanBits(await image(dev)).clean[3]).toBe(false);
    expect(order).toEqual([]);
    diskLog.clearRegion(log, 3);
    await diskLog.flush(log);
    expect(order).toEqual(['legs flushed']);
    expect(readDiskLogCleanBits(await image(dev)).clean[3]).toBe(true);
  });

  test('reads a log left dirty: only its dirty regions are out of sync', async () => {
    const dev = new MemoryBlockDevice({ sizeSectors: sectors(LOG_DEVICE_SECTORS) });
    const first = await diskLog.create(setup('nosync', dev));
    await diskLog.resume!(first);
    for (const r of [1, 17, 31]) diskLog.markRegion(first, r);
    await diskLog.flush(first);
    await diskLog.close(first);
    const again = await diskLog.create(setup('resync', dev));
    await diskLog.resume!(again);
    expect(diskLog.syncCount(again)).toBe(29);
    const work: number[] = [];
    for (let r = diskLog.getResyncWork(again); r !== undefined; r = diskLog.getResyncWork(again)) work.push(r);
    expect(work).toEqual([1, 17, 31]);
    expect(diskLog.table(again)).toBe('disk 2 log.img 1024');
  });

  test('a grown target: regions the header does not cover are out of sync (or in sync with nosync)', async () => {
    const dev = new MemoryBlockDevice({ sizeSectors: sectors(LOG_DEVICE_SECTORS) });
    const small = await diskLog.create({ ...setup('nosync', dev), targetSizeSectors: sectors(16384) });
    await diskLog.resume!(small);
    await diskLog.close(small);
    const grown = await diskLog.create(setup('resync', dev));
    await diskLog.resume!(grown);
    expect(diskLog.syncCount(grown)).toBe(16);
    expect(readDiskLogCleanBits(await image(dev)).header.regionCount).toBe(32);
  });

  test('refuses a log device too small, or a log of another version, writing nothing', async () => {
    const tiny = new MemoryBlockDevice({ sizeSectors: sectors(2) });
    await expect(diskLog.create(setup('resync', tiny))).rejects.toMatchObject({ code: 'DM_TABLE_INVALID' });
    const dev = new MemoryBlockDevice({ sizeSectors: sectors(LOG_DEVICE_SECTORS) });
    const hdr = Buffer.alloc(512);
    hdr.writeUInt32LE(DISK_LOG_MAGIC, 0);
    hdr.writeUInt32LE(3, 4);
    await dev.write(sectors(0), hdr);
    await expect(diskLog.create(setup('resync', dev))).rejects.toMatchObject({ code: 'DM_TABLE_INVALID' });
    expect((await image(dev, 512)).equals(hdr)).toBe(true);
  });

  test('a failing log device shows D (write) or F (flush) and rejects flushes with DM_IO', async () => {
    const inner = new MemoryBlockDevice({ sizeSectors: sectors(LOG_DEVICE_SECTORS) });
    const dev = new FaultyBlockDevice(inner, { volatileCache: true });
    const log = await diskLog.create(setup('nosync', dev));
    await diskLog.resume!(log);
    dev.setErrorRules([{ op: 'flush' }]);
    diskLog.markRegion(log, 2);
    await expect(diskLog.flush(log)).rejects.toMatchObject({ code: 'DM_IO' });
    expect(diskLog.status(log)).toBe('3 disk log.img F');
    await expect(diskLog.flush(log)).rejects.toMatchObject({ code: 'DM_IO' });

    const dev2 = new FaultyBlockDevice(new MemoryBlockDevice({ sizeSectors: sectors(LOG_DEVICE_SECTORS) }));
    const log2 = await diskLog.create(setup('nosync', dev2));
    await diskLog.resume!(log2);
    dev2.setErrorRules([{ op: 'write' }]);
    diskLog.markRegion(log2, 2);
    await expect(diskLog.flush(log2)).rejects.toMatchObject({ code: 'DM_IO' });
    expect(diskLog.status(log2)).toBe('3 disk log.img D');
  });

  test('a failed leg flush makes every region dirty on disk (Linux flush_failed)', async () => {
    const dev = new MemoryBlockDevice({ sizeSectors: sectors(LOG_DEVICE_SECTORS) });
    const log = await diskLog.create(setup('nosync', dev, () => Promise.reject(new Error('leg flush failed'))));
    await diskLog.resume!(log);
    diskLog.markRegion(log, 0);
    await diskLog.flush(log);
    diskLog.clearRegion(log, 0);
    await diskLog.flush(log);
    const bits = readDiskLogCleanBits(await image(dev));
    expect(bits.clean.every((c) => !c)).toBe(true);
    // And nothing is recorded clean afterwards.
    diskLog.clearRegion(log, 5);
    expect(diskLog.isClean(log, 5)).toBe(false);
  });
});
