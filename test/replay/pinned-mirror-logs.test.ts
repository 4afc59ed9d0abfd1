/**
 * The pieces of a pinned (read-only replayed) mirror on their own: the disk log and the md bitmap in read-only
 * mode read their device and derive the regions in sync from it exactly as a writable log does, and write nothing
 * — not at resume, not for a flush (one carrying a mark rejects), not at suspend or close, no md daemon pass; the
 * files a mirror table names, for write-pool's pins.
 */
import { describe, expect, test } from 'vitest';
import type { BlockDevice } from '../../src/block/contract.js';
import { MemoryBlockDevice } from '../../src/block/memory-device.js';
import { sectors } from '../../src/block/units.js';
import { SimulatedClock } from '../../src/core/clock.js';
import type { AnyDirtyLogType, DirtyLogOptions } from '../../src/dirty-logs/contract.js';
import { DISK_LOG_BITS_OFFSET_BYTES, diskLog } from '../../src/dirty-logs/disk-log.js';
import { createMdBitmapImage } from '../../src/dirty-logs/md-bitmap/create-image.js';
import { mdBitmapLog } from '../../src/dirty-logs/md-bitmap/md-bitmap-log.js';
import { MD_BITMAP_SUPERBLOCK_BYTES } from '../../src/dirty-logs/md-bitmap/superblock.js';
import { pinnableFilesOfTable } from '../../src/replay/pinned-files.js';
import { ReadOnlyGuardDevice } from '../../src/targets/mirror/read-only-guard.js';

const TARGET = 32768;
const REGION = 1024;
const REGIONS = TARGET / REGION;
const turn = (): Promise<void> => new Promise((r) => setImmediate(r));

/** A memory device whose image is set up first; `snapshot()` for comparing, writes and flushes counted. */
class CountingDevice extends MemoryBlockDevice {
  writes = 0;
  flushes = 0;
  protected override _write(s: Parameters<MemoryBlockDevice['write']>[0], b: Uint8Array, fua: boolean): Promise<void> {
    this.writes++;
    return super._write(s, b, fua);
  }
  protected override _flush(): Promise<void> {
    this.flushes++;
    return super._flush();
  }
  async image(): Promise<Buffer> {
    const b = Buffer.alloc(this.sizeSectors * 512);
    await this.read(sectors(0), b);
    return b;
  }
}

async function deviceWith(bytes: Uint8Array): Promise<CountingDevice> {
  const dev = new CountingDevice({ sizeSectors: sectors(64) });
  const padded = new Uint8Array(Math.ceil(bytes.byteLength / 512) * 512);
  padded.set(bytes);
  await dev.write(sectors(0), padded);
  dev.writes = 0;
  return dev;
}

const options = (logDevice: BlockDevice, clock: SimulatedClock, readOnly: boolean, extra?: Record<string, string>): DirtyLogOptions => ({
  targetSizeSectors: sectors(TARGET),
  regionSizeSectors: sectors(REGION),
  initialSync: 'resync',
  clock,
  logDevice,
  logDeviceLabel: 'log.img',
  flushLegs: async () => undefined,
  readOnly,
  extra,
});

async function exercise(type: AnyDirtyLogType, dev: CountingDevice, clock: SimulatedClock, readOnly: boolean, extra?: Record<string, string>): Promise<{ inSync: boolean[]; flushWithMark: unknown }> {
  const log: unknown = await type.create(options(dev, clock, readOnly, extra));
  await type.resume!(log);
  const inSync = Array.from({ length: REGIONS }, (_, r) => type.inSync(log, r));
  expect(type.syncCount(log)).toBe(inSync.filter(Boolean).length);
  // A clear of a region in sync, time for the md daemon, a flush with clears: nothing goes out when read-only.
  type.markRegion(log, 0);
  const flushWithMark = await type.flush(log, { clears: false }).then(
    () => 'resolved',
    (err: unknown) => err,
  );
  type.clearRegion(log, 0);
  for (let i = 0; i < 5; i++) {
    clock.advance(1000);
    await turn();
  }
  await type.flush(log).catch(() => undefined);
  if (type.suspend) await type.suspend(log);
  if (type.resume) await type.resume(log);
  await type.close(log);
  return { inSync, flushWithMark };
}

describe('read-only region logs (a pinned mirror of a replayed pool)', () => {
  test('disk log: the dirty regions on the device are read, nothing is ever written', async () => {
    const img = new Uint8Array(2048);
    new DataView(img.buffer).setUint32(0, 0x4d695272, true);
    new DataView(img.buffer).setUint32(4, 2, true);
    new DataView(img.buffer).setBigUint64(8, BigInt(REGIONS), true);
    img.fill(0xff, DISK_LOG_BITS_OFFSET_BYTES, DISK_LOG_BITS_OFFSET_BYTES + 4);
    img[DISK_LOG_BITS_OFFSET_BYTES] &= ~(1 << 3); // region 3 dirty
    const dev = await deviceWith(img);
    const before = await dev.image();
    const ro = await exercise(diskLog, dev, new SimulatedClock(), true);
    expect(ro.inSync.map((s, r) => (s ? '' : r)).filter((x) => x !== '')).toEqual([3]);
    expect(ro.flushWithMark).toMatchObject({ code: 'DM_IO' });
    expect([dev.writes, dev.flushes]).toEqual([0, 0]);
    expect((await dev.image()).equals(before)).toBe(true);
    // The same log writable: the same regions in sync, and it writes (what the read-only mode leaves out).
    const rw = await exercise(diskLog, dev, new SimulatedClock(), false);
    expect(rw.inSync).toEqual(ro.inSync);
    expect(rw.flushWithMark).toBe('resolved');
    expect(dev.writes).toBeGreaterThan(0);
  });

  test('md bitmap: set bits are read as regions to resync, no event, no page, no daemon pass is written', async () => {
    const img = createMdBitmapImage({ syncSizeSectors: BigInt(TARGET), chunkSizeBytes: REGION * 512, daemonSleepSeconds: 1 });
    img.fill(0, MD_BITMAP_SUPERBLOCK_BYTES, MD_BITMAP_SUPERBLOCK_BYTES + REGIONS / 8);
    img[MD_BITMAP_SUPERBLOCK_BYTES] |= 1 << 5; // chunk 5 dirty
    const dev = await deviceWith(img);
    const before = await dev.image();
    const extra = { daemonSleepSeconds: '1', offsetSectors: '0' };
    const ro = await exercise(mdBitmapLog, dev, new SimulatedClock(), true, extra);
    expect(ro.inSync.map((s, r) => (s ? '' : r)).filter((x) => x !== '')).toEqual([5]);
    expect(ro.flushWithMark).toMatchObject({ code: 'DM_IO' });
    expect([dev.writes, dev.flushes]).toEqual([0, 0]);
    expect((await dev.image()).equals(before)).toBe(true);
    const rw = await exercise(mdBitmapLog, dev, new SimulatedClock(), false, extra);
    expect(rw.inSync).toEqual(ro.inSync);
    expect(dev.writes).toBeGreaterThan(0);
  });

  test('the read-only guard: reads pass, writes and discards are refused and counted, flush does nothing', async () => {
    const inner = new CountingDevice({ sizeSectors: sectors(16) });
    await inner.write(sectors(0), new Uint8Array(512).fill(7));
    inner.writes = 0;
    const g = new ReadOnlyGuardDevice(inner, 'pinned');
    const b = new Uint8Array(512);
    await g.read(sectors(0), b);
    expect(b[0]).toBe(7);
    await expect(g.write(sectors(0), new Uint8Array(512))).rejects.toMatchObject({ code: 'DM_IO' });
    await g.flush();
    expect([g.refused, inner.writes, inner.flushes]).toEqual([1, 0, 0]);
    expect(g.sizeSectors).toBe(16);
  });

  test('mirror tables name their region log device and legs; other lines name nothing', () => {
    expect(
      pinnableFilesOfTable([
        '0 2048 mirror disk 2 /x/log.img 64 2 /x/a.img 0 /x/b.img 0 1 handle_errors',
        '2048 2048 mirror md-bitmap 5 /x/bm.img 64 1 offset 8 2 c 0 d 0',
        '4096 2048 mirror core 2 64 nosync 2 l1 0 l2 0',
        '6144 8 linear /x/e.img 0',
        '6152 8 mirror bogus',
      ]),
    ).toEqual([
      { label: '/x/log.img', role: 'log' },
      { label: '/x/a.img', role: 'leg' },
      { label: '/x/b.img', role: 'leg' },
      { label: '/x/bm.img', role: 'log' },
      { label: 'c', role: 'leg' },
      { label: 'd', role: 'leg' },
      { label: 'l1', role: 'leg' },
      { label: 'l2', role: 'leg' },
    ]);
    expect(pinnableFilesOfTable(null)).toEqual([]);
  });
});
