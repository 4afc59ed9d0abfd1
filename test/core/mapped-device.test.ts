/** A mapped device is a BlockDevice: the shared conformance suite runs on linear tables, split and stacked. */
import { expect, test } from 'vitest';
import { MemoryLevel } from 'memory-level';
import { Engine } from '../../src/core/engine.js';
import { MemoryBlockDevice } from '../../src/block/memory-device.js';
import { sectors, type Sector } from '../../src/block/units.js';
import { blockDeviceSuite } from '../../src/testing/conformance/block-device.js';
import type { LevelDb } from '../../src/log/event-log.js';

async function engine() {
  const e = await Engine.open({ db: new MemoryLevel() as unknown as LevelDb });
  e.registerBackingDevice('m0', new MemoryBlockDevice({ sizeSectors: sectors(1 << 16) }));
  e.registerBackingDevice('m1', new MemoryBlockDevice({ sizeSectors: sectors(1 << 16) }));
  return e;
}

blockDeviceSuite({
  test,
  expect,
  name: 'linear over memory',
  zeroedOnCreate: true,
  factory: async (size: Sector) => {
    const e = await engine();
    await e.create('d', { table: `0 ${size} linear m0 64` });
    return e.device('d')!;
  },
});

blockDeviceSuite({
  test,
  expect,
  name: 'linear split over two devices in 7 targets',
  zeroedOnCreate: true,
  factory: async (size: Sector) => {
    const e = await engine();
    const lines: string[] = [];
    const piece = Math.floor(size / 7);
    for (let i = 0, start = 0; i < 7; i++) {
      const len = i === 6 ? size - start : piece;
      lines.push(`${start} ${len} linear m${i % 2} ${1000 + start}`);
      start += len;
    }
    await e.create('d', { table: lines.join('\n') });
    return e.device('d')!;
  },
});

blockDeviceSuite({
  test,
  expect,
  name: 'linear stacked on linear',
  zeroedOnCreate: true,
  factory: async (size: Sector) => {
    const e = await engine();
    await e.create('low', { table: `0 ${size + 100} linear m1 0` });
    await e.create('d', { table: `0 ${size} linear low 100` });
    return e.device('d')!;
  },
});
