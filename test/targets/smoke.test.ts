import { expect, test } from 'vitest';
import { MemoryLevel } from 'memory-level';
import { Engine } from '../../src/core/engine.js';
import { MemoryBlockDevice } from '../../src/block/memory-device.js';
import { sectors } from '../../src/block/units.js';
import type { LevelDb } from '../../src/log/event-log.js';

test('smoke', async () => {
  const origin = new MemoryBlockDevice({ sizeSectors: sectors(4096) });
  const cow = new MemoryBlockDevice({ sizeSectors: sectors(2048) });
  const e = await Engine.open({ db: new MemoryLevel() as unknown as LevelDb, backingDevices: { o: origin, c: cow } });
  await origin.write(sectors(0), Buffer.alloc(4096 * 512, 1));
  await e.create('orig', { table: '0 4096 snapshot-origin o' });
  await e.create('snap', { table: '0 4096 snapshot o c P 8' });
  console.log(e.status('snap'), e.table('snap'));
  await e.device('orig')!.write(sectors(8), Buffer.alloc(4096, 2));
  await e.device('orig')!.write(sectors(16), Buffer.alloc(8192, 3));
  console.log(e.status('snap'));
  const b = Buffer.alloc(4096 * 2);
  await e.device('snap')!.read(sectors(8), b);
  expect(b.every((x) => x === 1)).toBe(true);
  await e.device('orig')!.read(sectors(8), b);
  expect(b.subarray(0, 4096).every((x) => x === 2) && b.subarray(4096).every((x) => x === 3)).toBe(true);
  await e.device('snap')!.write(sectors(100), Buffer.alloc(512, 9));
  const c = Buffer.alloc(4096);
  await e.device('snap')!.read(sectors(96), c);
  console.log(c[0], c[4*512], e.status('snap'));
  await e.close();
});
