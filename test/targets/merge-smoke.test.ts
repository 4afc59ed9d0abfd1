import { expect, test } from 'vitest';
import { MemoryLevel } from 'memory-level';
import { Engine } from '../../src/core/engine.js';
import { MemoryBlockDevice } from '../../src/block/memory-device.js';
import { sectors } from '../../src/block/units.js';
import type { LevelDb } from '../../src/log/event-log.js';

test('merge smoke', async () => {
  const origin = new MemoryBlockDevice({ sizeSectors: sectors(8192) });
  const cow = new MemoryBlockDevice({ sizeSectors: sectors(4096) });
  const e = await Engine.open({ db: new MemoryLevel() as unknown as LevelDb, backingDevices: { o: origin, c: cow } });
  await origin.write(sectors(0), Buffer.alloc(8192 * 512, 1));
  await e.create('orig', { table: '0 8192 snapshot-origin o' });
  await e.create('snap', { table: '0 8192 snapshot o c P 8' });
  for (let i = 0; i < 40; i++) await e.device('orig')!.write(sectors(i * 16), Buffer.alloc(4096, 2));
  await e.device('snap')!.write(sectors(1000), Buffer.alloc(512, 7));
  const want = Buffer.alloc(8192 * 512);
  await e.device('snap')!.read(sectors(0), want);
  await e.suspend('orig');
  await e.suspend('snap');
  await e.load('orig', '0 8192 snapshot-merge o c P 8');
  await e.resume('orig');
  await e.remove('snap');
  for (let i = 0; i < 200; i++) {
    const st = e.status('orig')[0];
    const [alloc, meta] = [st.split(' ')[3].split('/')[0], st.split(' ')[4]];
    if (alloc === meta) break;
    await new Promise((r) => setTimeout(r, 10));
  }
  console.log(e.status('orig'), await e.message('orig', 0, ['merge-status']));
  const got = Buffer.alloc(8192 * 512);
  await e.device('orig')!.read(sectors(0), got);
  expect(got.equals(want)).toBe(true);
  await e.suspend('orig');
  await e.load('orig', '0 8192 snapshot-origin o');
  await e.resume('orig');
  const raw = Buffer.alloc(8192 * 512);
  await origin.read(sectors(0), raw);
  expect(raw.equals(want)).toBe(true);
  await e.close();
});
