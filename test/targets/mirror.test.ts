/**
 * The mirror target: table and status as the kernel prints them (strings captured from Linux 6.1's dm-mirror;
 * test/kernel/mirror-interop.test.ts compares live), the write group (every leg reports before the bio completes;
 * the mark is durable before data), reads balanced and retried, the region log's clean records after the legs are
 * flushed, flush bios, resync of exactly the regions out of sync, the BlockDevice suite over a mirror, and the
 * compiled machines against xstate along a workload.
 */
import { describe, expect, test } from 'vitest';
import { createActor, type AnyActorRef } from 'xstate';
import { MACHINES } from '../../machines/index.js';
import { FaultyBlockDevice } from '../../src/block/faulty-device.js';
import { MemoryBlockDevice } from '../../src/block/memory-device.js';
import { sectors, type Sector } from '../../src/block/units.js';
import { SimulatedClock } from '../../src/core/clock.js';
import { createRng } from '../../src/core/rng.js';
import { readDiskLogCleanBits } from '../../src/dirty-logs/disk-log.js';
import { blockDeviceSuite } from '../../src/testing/conformance/block-device.js';
import { MIRROR_CLEAN_DELAY_MS } from '../../src/targets/mirror/mirror-set.js';
import { RESYNC_MACHINE } from '../../src/targets/mirror/resync-driver.js';
import { WRITE_GROUP_MACHINE, WRITE_TRANSACTION_MACHINE } from '../../src/targets/mirror/write-group.js';
import { SECTOR, TestDevice, mem, mirrorSetOf, openWorld, pattern, readAll, turn, until, type IoRecord } from './mirror-fixtures.js';

const LEN = 32768; // 16 MiB, 32 regions of 1024 sectors

describe('mirror table and status (the kernel prints exactly these, with 254:N for the devices)', () => {
  const cases: Array<[string, string, string]> = [
    ['core 2 1024 nosync 2 a 0 b 0 1 handle_errors', 'core 2 1024 nosync 2 a 0 b 0 1 handle_errors', '2 a b 32/32 1 AA 1 core'],
    ['core 1 1024 2 a 0 b 0', 'core 1 1024 2 a 0 b 0', '2 a b 32/32 1 AA 1 core'],
    ['disk 2 log 1024 2 a 0 b 0', 'disk 2 log 1024 2 a 0 b 0', '2 a b 32/32 1 AA 3 disk log A'],
    ['disk 3 log 1024 sync 2 a 0 b 0', 'disk 3 log 1024 sync 2 a 0 b 0', '2 a b 32/32 1 AA 3 disk log A'],
    ['disk 3 log 1024 nosync 2 a 0 b 0 1 handle_errors', 'disk 3 log 1024 nosync 2 a 0 b 0 1 handle_errors', '2 a b 32/32 1 AA 3 disk log A'],
    ['core 1 1024 2 a 0 b 0 2 handle_errors keep_log', 'core 1 1024 2 a 0 b 0 2 handle_errors keep_log', '2 a b 32/32 1 AA 1 core'],
    ['core 1 1024 3 a 0 b 64 c 128', 'core 1 1024 3 a 0 b 64 c 128', '3 a b c 32/32 1 AAA 1 core'],
  ];
  for (const [table, printed, status] of cases) {
    test(table, async () => {
      const w = await openWorld({ a: mem(LEN + 256), b: mem(LEN + 256), c: mem(LEN + 256), log: mem(64) });
      await w.engine.create('m', { table: `0 ${LEN} mirror ${table}` });
      await until(() => mirrorSetOf(w.engine, 'm').resync.state === 'IN_SYNC', 'the resync');
      expect(w.engine.table('m')).toEqual([`0 ${LEN} mirror ${printed}`]);
      expect(w.engine.status('m')).toEqual([`0 ${LEN} mirror ${status}`]);
      await w.engine.close();
    });
  }

  test('a short last region: 32000 sectors are 32 regions of 1024', async () => {
    const w = await openWorld({ a: mem(LEN), b: mem(LEN) });
    await w.engine.create('m', { table: '0 32000 mirror core 1 1024 2 a 0 b 0' });
    await until(() => mirrorSetOf(w.engine, 'm').resync.state === 'IN_SYNC', 'the resync');
    expect(w.engine.status('m')).toEqual(['0 32000 mirror 2 a b 32/32 1 AA 1 core']);
    await w.engine.close();
  });

  const refused: Array<[string, RegExp]> = [
    ['core 2 1024 bogus 2 a 0 b 0', /sync argument/],
    ['core 1 1000 2 a 0 b 0', /region size/],
    ['core 1 1024 1 a 0', /Invalid number of mirrors/],
    ['core 1 1024 10 a 0 a 0 a 0 a 0 a 0 a 0 a 0 a 0 a 0 a 0', /Invalid number of mirrors/],
    ['core 1 1024 2 a 0 b 0 1 keep_log', /keep_log feature requires the handle_errors feature/],
    ['core 1 1024 2 a 0 b 0 1 fast', /Unrecognised feature/],
    ['core 1 1024 2 a 0 b 0 2 handle_errors', /Not enough arguments/],
    ['core 1 1024 2 a 0 b 0 1 handle_errors extra', /Too many mirror arguments/],
    ['core 1 1024 2 a 0 b', /Too few mirror arguments/],
    ['core 1 1024 2 a x b 0', /Invalid offset/],
    ['core 5 1024 2 a 0', /Insufficient mirror log arguments/],
    ['bitmapz 1 1024 2 a 0 b 0', /Error creating mirror dirty log/],
    ['core 1 1024 2 a 0 b 1', /too small/],
    ['disk 2 tiny 1024 2 a 0 b 0', /too small/],
  ];
  for (const [table, reason] of refused) {
    test(`refused: ${table}`, async () => {
      const w = await openWorld({ a: mem(LEN), b: mem(LEN), tiny: mem(2) });
      const err = await w.engine.create('m', { table: `0 ${LEN} mirror ${table}` }).catch((e: unknown) => e);
      expect(err).toMatchObject({ code: 'DM_TABLE_INVALID' });
      expect((err as Error).message).toMatch(reason);
      expect(w.engine.names()).toEqual([]);
      await w.engine.close();
    });
  }
});

describe('mirror writes', () => {
  test('a write lands on every leg, and the bio completes only when every leg has reported', async () => {
    const io: IoRecord[] = [];
    const a = new TestDevice(mem(LEN), 'a', io);
    const b = new TestDevice(mem(LEN), 'b', io);
    const w = await openWorld({ a, b });
    await w.engine.create('m', { table: `0 ${LEN} mirror core 2 1024 nosync 2 a 0 b 0` });
    b.gateWrites = true;
    const data = pattern(createRng(1), 8 * SECTOR);
    let done = false;
    const p = w.engine.device('m')!.write(sectors(2048), data).then(() => (done = true));
    await until(() => b.gatedCount === 1, 'the write to leg b');
    for (let i = 0; i < 20; i++) await turn();
    expect(done, 'completed on the primary alone').toBe(false);
    expect((await readAll(a, 2048, 8)).equals(data)).toBe(true);
    b.release();
    await p;
    expect((await readAll(b, 2048, 8)).equals(data)).toBe(true);
    await w.engine.close();
  });

  test('the mark is on the log device (written and flushed) before any leg sees the data; clean records come after a leg flush', async () => {
    const io: IoRecord[] = [];
    const clock = new SimulatedClock();
    const a = new TestDevice(mem(LEN), 'a', io);
    const b = new TestDevice(mem(LEN), 'b', io);
    const log = new TestDevice(mem(64), 'log', io);
    const w = await openWorld({ a, b, log }, { clock });
    await w.engine.create('m', { table: `0 ${LEN} mirror disk 3 log 1024 nosync 2 a 0 b 0` });
    io.length = 0;
    const m = w.engine.device('m')!;
    await m.write(sectors(5 * 1024 + 8), Buffer.alloc(4096, 1));
    const firstLeg = io.findIndex((r) => r.dev !== 'log');
    expect(io.slice(0, firstLeg).map((r) => `${r.dev}:${r.op}`)).toEqual(['log:write', 'log:flush']);
    expect(readDiskLogCleanBits(await readAll(log.inner, 0, 3)).clean[5]).toBe(false);
    // A second write to the same region, before its clean record was written, needs no log I/O.
    io.length = 0;
    await m.write(sectors(5 * 1024 + 16), Buffer.alloc(4096, 2));
    expect(io.filter((r) => r.dev === 'log')).toEqual([]);
    // The region drained: its clean record is written later, after both legs are flushed.
    io.length = 0;
    clock.advance(MIRROR_CLEAN_DELAY_MS);
    await until(() => io.some((r) => r.dev === 'log' && r.op === 'write'), 'the clean record');
    const logWrite = io.findIndex((r) => r.dev === 'log' && r.op === 'write');
    expect(io.slice(0, logWrite).map((r) => `${r.dev}:${r.op}`).sort()).toEqual(['a:flush', 'b:flush']);
    for (let i = 0; i < 10; i++) await turn();
    expect(readDiskLogCleanBits(await readAll(log.inner, 0, 3)).clean[5]).toBe(true);
    // Written again after its clean record went out: the mark is written (and flushed) again first.
    io.length = 0;
    await m.write(sectors(5 * 1024 + 24), Buffer.alloc(4096, 3));
    expect(io.slice(0, 2).map((r) => `${r.dev}:${r.op}`)).toEqual(['log:write', 'log:flush']);
    await w.engine.close();
  });

  test('a flush bio flushes every leg and writes the clean records (one leg flush each, shared with the log)', async () => {
    const io: IoRecord[] = [];
    const clock = new SimulatedClock();
    const a = new TestDevice(mem(LEN), 'a', io);
    const b = new TestDevice(mem(LEN), 'b', io);
    const log = new TestDevice(mem(64), 'log', io);
    const w = await openWorld({ a, b, log }, { clock });
    await w.engine.create('m', { table: `0 ${LEN} mirror disk 3 log 1024 nosync 2 a 0 b 0` });
    const m = w.engine.device('m')!;
    await m.write(sectors(3 * 1024), Buffer.alloc(4096, 1));
    expect(readDiskLogCleanBits(await readAll(log.inner, 0, 3)).clean[3]).toBe(false);
    io.length = 0;
    await m.flush();
    expect(io.filter((r) => r.op === 'flush' && r.dev !== 'log').map((r) => r.dev).sort()).toEqual(['a', 'b']);
    expect(readDiskLogCleanBits(await readAll(log.inner, 0, 3)).clean[3]).toBe(true);
    // Nothing changed since: a second flush flushes the legs only.
    io.length = 0;
    await m.flush();
    expect(io.map((r) => `${r.dev}:${r.op}`).sort()).toEqual(['a:flush', 'b:flush']);
    await w.engine.close();
  });

  test('FUA reaches every leg', async () => {
    const io: IoRecord[] = [];
    const w = await openWorld({ a: new TestDevice(mem(LEN), 'a', io), b: new TestDevice(mem(LEN), 'b', io) });
    await w.engine.create('m', { table: `0 ${LEN} mirror core 2 1024 nosync 2 a 0 b 0` });
    await w.engine.device('m')!.write(sectors(0), Buffer.alloc(512, 1), { fua: true });
    expect(io.filter((r) => r.op === 'write').map((r) => `${r.dev}:${r.fua}`).sort()).toEqual(['a:true', 'b:true']);
    await w.engine.close();
  });

  test('no bio crosses a region: a write over a region boundary is split there', async () => {
    const io: IoRecord[] = [];
    const w = await openWorld({ a: new TestDevice(mem(LEN), 'a', io), b: new TestDevice(mem(LEN), 'b', io) });
    await w.engine.create('m', { table: `0 ${LEN} mirror core 2 1024 nosync 2 a 0 b 0` });
    await w.engine.device('m')!.write(sectors(1020), Buffer.alloc(16 * SECTOR, 3));
    expect(io.filter((r) => r.dev === 'a' && r.op === 'write').map((r) => [r.sector, r.lengthSectors])).toEqual([
      [1020, 4],
      [1024, 12],
    ]);
    await w.engine.close();
  });

  test('legs at offsets: each leg is written at its own offset', async () => {
    const a = mem(LEN + 100);
    const b = mem(LEN + 300);
    const w = await openWorld({ a, b });
    await w.engine.create('m', { table: `0 ${LEN} mirror core 2 1024 nosync 2 a 100 b 300` });
    const data = pattern(createRng(2), 4096);
    await w.engine.device('m')!.write(sectors(40), data);
    expect((await readAll(a, 140, 8)).equals(data)).toBe(true);
    expect((await readAll(b, 340, 8)).equals(data)).toBe(true);
    await w.engine.close();
  });
});

describe('mirror reads', () => {
  test('reads of regions in sync are balanced across the legs', async () => {
    const a = new TestDevice(mem(LEN), 'a');
    const b = new TestDevice(mem(LEN), 'b');
    const c = new TestDevice(mem(LEN), 'c');
    const w = await openWorld({ a, b, c });
    await w.engine.create('m', { table: `0 ${LEN} mirror core 2 1024 nosync 3 a 0 b 0 c 0` });
    const m = w.engine.device('m')!;
    const buf = Buffer.alloc(4096);
    for (let i = 0; i < 30; i++) await m.read(sectors(i * 8), buf);
    expect([a.reads, b.reads, c.reads]).toEqual([10, 10, 10]);
    await w.engine.close();
  });

  test('regions out of sync are read from the default leg only', async () => {
    const a = new TestDevice(mem(LEN), 'a');
    const b = new TestDevice(mem(LEN), 'b');
    b.gateWrites = true; // the resync's first copy waits on leg b: the other regions stay out of sync
    const w = await openWorld({ a, b });
    await w.engine.create('m', { table: `0 ${LEN} mirror core 1 1024 2 a 0 b 0` });
    const set = mirrorSetOf(w.engine, 'm');
    await until(() => set.resync.state === 'COPYING', 'the first copy');
    expect(set.logType.inSync(set.log, 31)).toBe(false);
    a.reads = 0;
    const buf = Buffer.alloc(4096);
    for (let i = 0; i < 6; i++) await w.engine.device('m')!.read(sectors(31 * 1024 + i * 8), buf);
    expect([a.reads, b.reads]).toEqual([6, 0]);
    b.gateWrites = false;
    b.release();
    await until(() => set.resync.state === 'IN_SYNC', 'the resync');
    // In sync now: balanced.
    a.reads = 0;
    for (let i = 0; i < 6; i++) await w.engine.device('m')!.read(sectors(31 * 1024 + i * 8), buf);
    expect([a.reads, b.reads]).toEqual([3, 3]);
    await w.engine.close();
  });
});

describe('mirror resync', () => {
  test('a core log without nosync copies every region from the default leg, with progress and done events', async () => {
    const a = mem(LEN);
    const b = mem(LEN);
    await a.write(sectors(0), pattern(createRng(3), LEN * SECTOR));
    const w = await openWorld({ a, b });
    await w.engine.create('m', { table: `0 ${LEN} mirror core 1 1024 2 a 0 b 0` });
    const set = mirrorSetOf(w.engine, 'm');
    await until(() => set.resync.state === 'IN_SYNC', 'the resync');
    expect((await readAll(b)).equals(await readAll(a))).toBe(true);
    expect(set.resync.regionsCopied).toBe(32);
    const done = w.events.filter((e) => e.type === 'mirror.resync.done');
    expect(done).toMatchObject([{ device: 'm', regionsInSync: 32, regionsTotal: 32, regionsCopied: 32 }]);
    expect(w.events.some((e) => e.type === 'mirror.resync.progress')).toBe(true);
    expect(w.engine.info('m').eventNr).toBe(1);
    expect(await w.engine.message('m', 0, ['resync-status'])).toMatch(
      /^state=IN_SYNC regions_in_sync=32 regions_total=32 regions_copied=32 run_regions_copied=32 run_ms=\d+ throttle=100 default_leg=0 health=AA\n$/,
    );
    await w.engine.close();
  });

  test('a disk log left dirty resyncs exactly its dirty regions', async () => {
    const a = mem(LEN);
    const b = mem(LEN);
    const log = mem(64);
    const w = await openWorld({ a, b, log });
    await w.engine.create('m', { table: `0 ${LEN} mirror disk 3 log 1024 nosync 2 a 0 b 0` });
    const set = mirrorSetOf(w.engine, 'm');
    // Regions 4, 9 and 30 dirty on disk, as a crash in the middle of writes would leave them.
    for (const r of [4, 9, 30]) set.logType.markRegion(set.log, r);
    await set.logType.flush(set.log);
    await b.write(sectors(9 * 1024), Buffer.alloc(4096, 0xee)); // the legs differ in region 9
    await w.engine.remove('m').catch(() => undefined);
    // remove writes the log (postsuspend): put the dirty bits back as the crash left them.
    const img = await readAll(log, 0, 3);
    img[1024] = 0xff & ~((1 << 4) | 0) & 0xff;
    img[1025] = 0xff & ~(1 << 1);
    img[1027] = 0xff & ~(1 << 6);
    await log.write(sectors(0), img);
    await w.engine.create('m', { table: `0 ${LEN} mirror disk 2 log 1024 2 a 0 b 0` });
    const again = mirrorSetOf(w.engine, 'm');
    await until(() => again.resync.state === 'IN_SYNC', 'the resync');
    expect(again.resync.regionsCopied).toBe(3);
    expect((await readAll(b)).equals(await readAll(a))).toBe(true);
    await w.engine.suspend('m'); // writes the clean records
    expect(readDiskLogCleanBits(await readAll(log, 0, 3)).clean.every((c) => c)).toBe(true);
    await w.engine.close();
  });

  test('writes to a region being copied wait for the copy, then reach every leg', async () => {
    const a = new TestDevice(mem(LEN), 'a');
    const b = new TestDevice(mem(LEN), 'b');
    await a.inner.write(sectors(0), pattern(createRng(4), LEN * SECTOR));
    const w = await openWorld({ a, b });
    b.gateWrites = true; // the first region's copy waits on leg b
    await w.engine.create('m', { table: `0 ${LEN} mirror core 1 1024 2 a 0 b 0` });
    const set = mirrorSetOf(w.engine, 'm');
    await until(() => set.resync.state === 'COPYING', 'the first copy');
    const data = pattern(createRng(5), 4096);
    let done = false;
    const p = w.engine.device('m')!.write(sectors(16), data).then(() => (done = true));
    for (let i = 0; i < 20; i++) await turn();
    expect(done).toBe(false);
    expect(set.rh.delayedWriteCount).toBe(1);
    b.gateWrites = false;
    b.release();
    await p;
    await until(() => set.resync.state === 'IN_SYNC', 'the resync');
    expect((await readAll(a, 16, 8)).equals(data)).toBe(true);
    expect((await readAll(b)).equals(await readAll(a))).toBe(true);
    await w.engine.close();
  });

  test('throttle: the resync waits (100 − p)/p of its copy time on the injected clock', async () => {
    const clock = new SimulatedClock();
    const w = await openWorld({ a: mem(LEN), b: mem(LEN) }, { clock });
    await w.engine.create('m', { table: `0 ${LEN} mirror core 2 1024 sync 2 a 0 b 0` });
    const set = mirrorSetOf(w.engine, 'm');
    await w.engine.message('m', 0, ['resync-throttle', '50']);
    await expect(w.engine.message('m', 0, ['resync-throttle', '0'])).rejects.toMatchObject({ code: 'DM_INVALID_ARGUMENT' });
    // The copies take no simulated time, so a throttle of 50% waits 0 ms: it gets there without the clock moving.
    await until(() => set.resync.state === 'IN_SYNC', 'the resync');
    expect(set.resync.regionsCopied).toBe(32);
    await w.engine.close();
  });
});

blockDeviceSuite({
  test,
  expect,
  name: 'mirror (core, 3 legs) over memory',
  zeroedOnCreate: true,
  factory: async (size: Sector) => {
    const w = await openWorld({ a: new MemoryBlockDevice({ sizeSectors: size }), b: new MemoryBlockDevice({ sizeSectors: size }), c: new MemoryBlockDevice({ sizeSectors: size }) });
    await w.engine.create('d', { table: `0 ${size} mirror core 2 256 nosync 3 a 0 b 0 c 0 1 handle_errors` });
    return w.engine.device('d')!;
  },
});

blockDeviceSuite({
  test,
  expect,
  name: 'mirror (disk log) over delaying memory devices',
  zeroedOnCreate: true,
  factory: async (size: Sector) => {
    const rng = createRng(7);
    const w = await openWorld({
      a: new TestDevice(new MemoryBlockDevice({ sizeSectors: size }), 'a', [], rng, 3),
      b: new TestDevice(new MemoryBlockDevice({ sizeSectors: size }), 'b', [], rng, 3),
      log: new TestDevice(mem(64), 'log', [], rng, 3),
    });
    await w.engine.create('d', { table: `0 ${size} mirror disk 3 log 128 nosync 2 a 0 b 0` });
    return w.engine.device('d')!;
  },
});

describe('compiled machines agree with xstate along a workload', () => {
  test('groups, transactions and the resync step exactly as their xstate actors do', async () => {
    const rng = createRng(11);
    const a = new TestDevice(mem(LEN), 'a', [], rng, 2);
    const b = new TestDevice(mem(LEN), 'b', [], rng, 2);
    const w = await openWorld({ a, b, log: mem(64) });
    await w.engine.create('m', { table: `0 ${LEN} mirror disk 3 log 1024 sync 2 a 0 b 0 1 handle_errors` });
    const set = mirrorSetOf(w.engine, 'm');
    const actors = new Map<string, AnyActorRef>();
    const compiled = { 'mirror-write-group': WRITE_GROUP_MACHINE, 'mirror-write-transaction': WRITE_TRANSACTION_MACHINE, 'mirror-resync': RESYNC_MACHINE };
    const seen = new Set<string>();
    set.observer = (machine, id, from, event, to) => {
      const c = compiled[machine];
      const key = `${machine}/${id}`;
      let actor = actors.get(key);
      if (!actor) {
        actor = createActor(MACHINES[machine]).start();
        if (machine === 'mirror-resync') {
          // The resync ran before the observer was attached: bring the actor to the same state first.
          actor = createActor(MACHINES[machine], { snapshot: MACHINES[machine].resolveState({ value: c.stateNames[from], context: undefined }) }).start();
        }
        actors.set(key, actor);
      }
      expect(actor.getSnapshot().value).toBe(c.stateNames[from]);
      actor.send({ type: c.eventNames[event] });
      expect(actor.getSnapshot().value).toBe(c.stateNames[to]);
      seen.add(`${machine}:${c.stateNames[from]}-${c.eventNames[event]}`);
    };
    const m = w.engine.device('m')!;
    const ops: Array<Promise<unknown>> = [];
    for (let i = 0; i < 60; i++) {
      const s = rng.int(LEN / 8) * 8;
      if (i % 7 === 6) ops.push(m.flush());
      else ops.push(m.write(sectors(s), Buffer.alloc(4096, i)));
    }
    await Promise.all(ops);
    await until(() => set.resync.state === 'IN_SYNC', 'the resync');
    expect(seen.has('mirror-write-group:WRITING-ALL_DONE')).toBe(true);
    expect(seen.has('mirror-write-transaction:SUPER_FLUSH-SUPER_FLUSHED')).toBe(true);
    expect(seen.has('mirror-resync:THROTTLED-NEXT') || seen.has('mirror-resync:SCANNING-NO_WORK')).toBe(true);
    await w.engine.close();
  });
});

describe('mirror resync: stop, quiesce, copy failure', () => {
  test('a suspend in the middle of the resync waits for the region in flight; resume goes on where it stopped', async () => {
    const a = new TestDevice(mem(LEN), 'a');
    const b = new TestDevice(mem(LEN), 'b');
    await a.inner.write(sectors(0), pattern(createRng(8), LEN * SECTOR));
    b.gateWrites = true;
    const w = await openWorld({ a, b });
    await w.engine.create('m', { table: `0 ${LEN} mirror core 1 1024 2 a 0 b 0` });
    const set = mirrorSetOf(w.engine, 'm');
    await until(() => set.resync.state === 'COPYING', 'the first copy');
    let suspended = false;
    const s = w.engine.suspend('m').then(() => (suspended = true));
    for (let i = 0; i < 20; i++) await turn();
    expect(suspended, 'the suspend waits for the copy in flight').toBe(false);
    b.gateWrites = false;
    b.release();
    await s;
    expect(set.resync.state).toBe('STOPPED');
    const copiedAtStop = set.resync.regionsCopied;
    expect(copiedAtStop).toBeGreaterThanOrEqual(1);
    expect(copiedAtStop).toBeLessThan(32);
    await w.engine.resume('m');
    await until(() => set.resync.state === 'IN_SYNC', 'the resync after resume');
    expect(set.resync.regionsCopied).toBe(32);
    expect((await readAll(b)).equals(await readAll(a))).toBe(true);
    await w.engine.close();
  });

  test('a region with writes in flight is copied only after they drain (QUIESCING)', async () => {
    const a = new TestDevice(mem(LEN), 'a');
    const b = new TestDevice(mem(LEN), 'b');
    const w = await openWorld({ a, b });
    await w.engine.create('m', { table: `0 ${LEN} mirror core 2 1024 nosync 2 a 0 b 0` });
    const set = mirrorSetOf(w.engine, 'm');
    // A write to region 2 is in flight (leg b holds it) when region 2 falls out of sync and the resync wants it.
    b.gateWrites = true;
    const data = pattern(createRng(9), 4096);
    const p = w.engine.device('m')!.write(sectors(2 * 1024 + 8), data);
    await until(() => b.gatedCount === 1, 'the write on leg b');
    set.rh.markNosync(2);
    set.inSync = false;
    set.resync.start();
    await until(() => set.resync.state === 'QUIESCING', 'quiescing');
    for (let i = 0; i < 20; i++) await turn();
    expect(set.resync.state).toBe('QUIESCING');
    b.gateWrites = false;
    b.release();
    await p;
    await until(() => set.resync.state === 'IN_SYNC', 'the resync');
    expect(set.resync.runRegionsCopied).toBe(1);
    expect((await readAll(b, 2 * 1024, 1024)).equals(await readAll(a, 2 * 1024, 1024))).toBe(true);
    await w.engine.close();
  });

  test('with handle_errors a copy that fails on a leg leaves the region out of sync and the resync DEGRADED', async () => {
    const a = mem(LEN);
    const b = new FaultyBlockDeviceForTest(mem(LEN));
    b.setErrorRules([{ op: 'write', startSector: sectors(5 * 1024), endSector: sectors(6 * 1024) }]);
    const w = await openWorld({ a, b });
    await w.engine.create('m', { table: `0 ${LEN} mirror core 1 1024 2 a 0 b 0 1 handle_errors` });
    const set = mirrorSetOf(w.engine, 'm');
    await until(() => set.resync.state === 'DEGRADED', 'the failed copy');
    expect(set.logType.inSync(set.log, 5)).toBe(false);
    expect(w.engine.status('m')[0]).toMatch(/ 5\/32 1 AS 1 core$/);
    b.setErrorRules([]);
    await w.engine.message('m', 0, ['readd', 'b']);
    await until(() => set.resync.state === 'IN_SYNC', 'the resync after the re-add');
    expect(w.engine.status('m')).toEqual([`0 ${LEN} mirror 2 a b 32/32 1 AA 1 core`]);
    await w.engine.close();
  });
});

describe('mirror discards and trace events', () => {
  test('a discard reaches every leg; a leg that cannot discard fails the bio but not the leg', async () => {
    const a = mem(LEN);
    const b = mem(LEN);
    await a.write(sectors(0), Buffer.alloc(8192, 7));
    await b.write(sectors(0), Buffer.alloc(8192, 7));
    const w = await openWorld({ a, b });
    await w.engine.create('m', { table: `0 ${LEN} mirror core 2 1024 nosync 2 a 0 b 0 1 handle_errors` });
    await w.engine.device('m')!.discard(sectors(0), sectors(16));
    expect((await readAll(a, 0, 16)).every((x) => x === 0)).toBe(true);
    expect((await readAll(b, 0, 16)).every((x) => x === 0)).toBe(true);
    expect(w.engine.status('m')).toEqual([`0 ${LEN} mirror 2 a b 32/32 1 AA 1 core`]);
    await w.engine.close();

    const nd = new NoDiscardDevice(mem(LEN));
    const w2 = await openWorld({ a: mem(LEN), nd });
    await w2.engine.create('m', { table: `0 ${LEN} mirror core 2 1024 nosync 2 a 0 nd 0 1 handle_errors` });
    await expect(w2.engine.device('m')!.discard(sectors(0), sectors(16))).rejects.toMatchObject({ code: 'DM_NOT_SUPPORTED' });
    // The legs may differ now in region 0: it is out of sync, but no leg failed.
    expect(w2.engine.status('m')[0]).toMatch(/ 1 AA 1 core$/);
    const set = mirrorSetOf(w2.engine, 'm');
    await until(() => set.resync.state === 'IN_SYNC' && set.logType.syncCount(set.log) === 32, 'the region resynced');
    expect(set.resync.regionsCopied).toBe(1);
    await w2.engine.close();
  });

  test('with tracing on, regions marked and cleared are trace events', async () => {
    const w = await openWorld({ a: mem(LEN), b: mem(LEN) }, { trace: true });
    await w.engine.create('m', { table: `0 ${LEN} mirror core 2 1024 nosync 2 a 0 b 0` });
    await w.engine.device('m')!.write(sectors(3 * 1024), Buffer.alloc(512));
    const mine = w.events.filter((e) => e.type === 'mirror.region.marked' || e.type === 'mirror.region.cleared');
    expect(mine.map((e) => `${e.type}:${(e as { region: number }).region}`)).toEqual(['mirror.region.marked:3', 'mirror.region.cleared:3']);
    await w.engine.close();
  });
});

/** A FaultyBlockDevice alias (the error rules are what the test needs). */
class FaultyBlockDeviceForTest extends FaultyBlockDevice {}

/** A device that cannot discard (a file system without hole punching). */
class NoDiscardDevice extends TestDevice {
  override readonly supports = { ...mem(8).supports, discard: false };
  constructor(inner: MemoryBlockDevice) {
    super(inner, 'nd');
  }
}
