/**
 * openPool's embedding API on a real pool folder: devices(), device(), events$ and events$ByType, inspect$,
 * machines(), replay(to), close(); bad input refused without side effects.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { firstValueFrom, toArray } from 'rxjs';
import { afterEach, beforeEach, expect, test } from 'vitest';
import { MACHINES } from '../../machines/index.js';
import { sectors } from '../../src/block/units.js';
import { openPool, type LoggedEventOf } from '../../src/frontends/open-pool.js';
import type { InspectionRecord } from '../../src/inspect/live-inspector.js';

let dir: string;
beforeEach(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'dmstate-embed-'));
  fs.writeFileSync(path.join(dir, 'disk.img'), '');
  fs.truncateSync(path.join(dir, 'disk.img'), 4 << 20);
});
afterEach(() => fs.rmSync(dir, { recursive: true, force: true }));

test('devices, device, typed event streams, inspect$ and machines()', async () => {
  const pool = await openPool(path.join(dir, 'pool'));
  expect(pool.dir).toBe(path.join(dir, 'pool'));
  expect(pool.devices()).toEqual([]);
  const created: Array<LoggedEventOf<'device.created'>> = [];
  const some: string[] = [];
  pool.events$ByType('device.created').subscribe((e) => created.push(e));
  pool.events$ByType('mark', 'device.removed').subscribe((e) => some.push(e.type));
  const all = firstValueFrom(pool.events$.pipe(toArray()));
  const records: InspectionRecord[] = [];
  const sub = pool.inspect$({ devices: ['b'] }).subscribe((r) => records.push(r));

  await pool.engine.create('a', { table: `0 4096 linear ${dir}/disk.img 0` });
  await pool.engine.create('b', { table: '0 2048 linear a 2048' });
  await pool.engine.message('a', 0, ['mark', 'm1']);
  expect(pool.devices().map((d) => [d.name, d.sizeSectors, d.openCount])).toEqual([['a', 4096, 1], ['b', 2048, 0]]);
  await pool.device('b').write(sectors(0), Buffer.alloc(4096, 7));
  sub.unsubscribe();
  expect(() => pool.device('nope')).toThrow(expect.objectContaining({ code: 'DM_NO_SUCH_DEVICE' }));
  expect(() => pool.events$ByType()).toThrow(expect.objectContaining({ code: 'DM_INVALID_ARGUMENT' }));
  expect(() => pool.inspect$({ kinds: ['nope' as never] })).toThrow(expect.objectContaining({ code: 'DM_INVALID_ARGUMENT' }));

  // Only b's bio (a's bio below it is not selected).
  expect(new Set(records.map((r) => (r.type === 'dmstate.inspect.dropped' ? '' : r.actorId)))).toEqual(new Set(['bio:b:1']));
  expect(created.map((e) => [e.device, e.minor])).toEqual([['a', 0], ['b', 1]]);
  expect(some).toEqual(['mark']);
  expect(pool.machines()).toBe(MACHINES);
  expect(pool.machines().bio.id).toBe('bio');

  await pool.engine.remove('b');
  await pool.close();
  await pool.close(); // idempotent
  expect(some).toEqual(['mark', 'device.removed']);
  const types = (await all).map((e) => e.type);
  expect(types[0]).toBe('device.created'); // a live stream: engine.started came at open, before subscribing
  expect(types.at(-1)).toBe('engine.stopped');
  expect(fs.readFileSync(path.join(dir, 'disk.img')).subarray(2048 * 512, 2048 * 512 + 4096).every((b) => b === 7)).toBe(true);
});

test('replay(to): the pool as of a mark or a sequence number, and all of it by default', async () => {
  const pool = await openPool(path.join(dir, 'pool'));
  await pool.engine.create('a', { table: `0 4096 linear ${dir}/disk.img 0` });
  await pool.engine.message('a', 0, ['mark', 'one-device']);
  await pool.engine.create('b', { table: '0 1024 linear a 0' });
  const seqB = pool.engine.log.lastSeq;
  await pool.engine.remove('b');
  const devicesOf = (st: { devices: ReadonlyMap<string, unknown> }): string[] => [...st.devices.keys()].sort();
  expect(devicesOf((await pool.replay('one-device')).state)).toEqual(['a']);
  expect(devicesOf((await pool.replay(seqB)).state)).toEqual(['a', 'b']);
  const now = await pool.replay();
  expect(devicesOf(now.state)).toEqual(['a']);
  expect(now.digest).toBe(pool.engine.stateDigest());
  await expect(pool.replay('no-such-mark')).rejects.toMatchObject({ code: 'DM_INVALID_ARGUMENT' });
  await pool.close();
});
