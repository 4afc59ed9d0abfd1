import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { describe, expect, test } from 'vitest';
import { MemoryLevel } from 'memory-level';
import { ClassicLevel } from 'classic-level';
import { Engine } from '../../src/core/engine.js';
import { MemoryBlockDevice } from '../../src/block/memory-device.js';
import { BlockDevice, type BlockDeviceSupports } from '../../src/block/contract.js';
import { sectors, type Sector } from '../../src/block/units.js';
import { SimulatedClock } from '../../src/core/clock.js';
import type { LevelDb } from '../../src/log/event-log.js';
import type { LoggedEvent } from '../../src/log/events.js';

const mem = (n: number) => new MemoryBlockDevice({ sizeSectors: sectors(n) });

async function engineWith(devs: Record<string, BlockDevice> = { m0: mem(8192), m1: mem(8192) }, opts: Parameters<typeof Engine.open>[0] = {}) {
  const e = await Engine.open({ db: new MemoryLevel() as unknown as LevelDb, ...opts });
  for (const [k, v] of Object.entries(devs)) e.registerBackingDevice(k, v);
  return e;
}

const pattern = (bytes: number, seed: number) => {
  const b = Buffer.alloc(bytes);
  for (let i = 0; i < bytes; i++) b[i] = (i * 31 + seed * 7) & 0xff;
  return b;
};

/** A device whose writes complete only when release() is called: to hold I/O in flight. */
class GateDevice extends BlockDevice {
  readonly supports: BlockDeviceSupports = { flush: true, discard: false, fua: true, holes: false };
  readonly name = 'gate';
  private waiting: Array<() => void> = [];
  constructor(readonly inner: BlockDevice) {
    super();
  }
  get sizeSectors() {
    return this.inner.sizeSectors;
  }
  get waitingCount() {
    return this.waiting.length;
  }
  release() {
    const w = this.waiting;
    this.waiting = [];
    for (const f of w) f();
  }
  protected _read(s: Sector, b: Uint8Array) {
    return this.inner.read(s, b);
  }
  protected _write(s: Sector, b: Uint8Array) {
    return new Promise<void>((resolve, reject) => this.waiting.push(() => this.inner.write(s, b).then(resolve, reject)));
  }
}

describe('engine: tables and lifecycle', () => {
  test('create, status, table, info for linear/error/zero', async () => {
    const e = await engineWith();
    await e.create('lin', { table: '0 2048 linear m0 0\n2048 1024 linear m1 8' });
    await e.create('err', { table: '0 100 error' });
    await e.create('zer', { table: '0 4096 zero' });
    expect(e.status('lin')).toEqual(['0 2048 linear ', '2048 1024 linear ']);
    expect(e.table('lin')).toEqual(['0 2048 linear m0 0', '2048 1024 linear m1 8']);
    expect(e.table('err')).toEqual(['0 100 error ']);
    expect(e.table('zer')).toEqual(['0 4096 zero ']);
    expect(e.names()).toEqual(['err', 'lin', 'zer']);
    const i = e.info('lin');
    expect([i.minor, i.targetCount, i.sizeSectors, i.liveTable, i.inactiveTable, i.suspended]).toEqual([0, 2, 3072, true, false, false]);
    expect(e.info('zer').minor).toBe(2);
    await e.close();
  });

  test('bad tables are refused with clear errors and change nothing', async () => {
    const e = await engineWith({ m0: mem(1024) });
    await e.create('keep', { table: '0 10 zero' });
    const seqBefore = e.log.lastSeq;
    const cases: Array<[string, RegExp]> = [
      ['0 10 nosuch', /unknown target type/],
      ['0 10 linear m0', /Invalid argument count/],
      ['0 10 zero extra', /Invalid argument count/],
      ['0 10 zero\n20 10 zero', /Gap in table/],
      ['0 10 zero\n5 10 zero', /Gap in table/],
      ['5 10 zero', /Gap in table/],
      ['0 2000 linear m0 0', /too small for target/],
      ['0 10 linear m0 1020', /too small for target/],
      ['0 10 linear m0 -1', /Invalid device sector/],
      ['0 x zero', /not a non-negative integer/],
      ['0 0 zero', /zero-length/],
      ['0 10', /expected <start>/],
      ['0 10 linear /nonexistent/file.img 0', /nonexistent/],
    ];
    for (const [table, re] of cases) {
      const err = await e.create('bad', { table }).catch((x: unknown) => x as { code: string; message: string });
      expect(err, table).toMatchObject({ code: 'DM_TABLE_INVALID' });
      expect((err as { message: string }).message).toMatch(re);
      const lerr = await e.load('keep', table).catch((x: unknown) => x as { code: string });
      expect(lerr, table).toMatchObject({ code: 'DM_TABLE_INVALID' });
    }
    expect(e.names()).toEqual(['keep']);
    expect(e.info('keep').inactiveTable).toBe(false);
    expect(e.log.lastSeq).toBe(seqBefore);
    await expect(e.create('keep', { table: '0 1 zero' })).rejects.toMatchObject({ code: 'DM_DEVICE_EXISTS' });
    await expect(e.create('a/b', { table: '0 1 zero' })).rejects.toMatchObject({ code: 'DM_INVALID_ARGUMENT' });
    await expect(e.create('', { table: '0 1 zero' })).rejects.toMatchObject({ code: 'DM_INVALID_ARGUMENT' });
    await expect(e.suspend('nosuch')).rejects.toMatchObject({ code: 'DM_NO_SUCH_DEVICE' });
    await expect(e.remove('nosuch')).rejects.toMatchObject({ code: 'DM_NO_SUCH_DEVICE' });
    expect(() => e.status('nosuch')).toThrow(expect.objectContaining({ code: 'DM_NO_SUCH_DEVICE' }));
    expect(e.names()).toEqual(['keep']);
    await e.close();
  });

  test('a failed ctr releases the devices it opened (open counts return)', async () => {
    const e = await engineWith({ m0: mem(1024) });
    await e.create('low', { table: '0 1024 linear m0 0' });
    await expect(e.create('top', { table: '0 100 linear low 0\n100 100 linear low 2000' })).rejects.toMatchObject({ code: 'DM_TABLE_INVALID' });
    expect(e.info('low').openCount).toBe(0);
    await e.remove('low');
    await e.close();
  });

  test('I/O is split at target boundaries and lands where the table says', async () => {
    const m0 = mem(4096);
    const m1 = mem(4096);
    const e = await engineWith({ m0, m1 });
    await e.create('lin', { table: '0 16 linear m0 100\n16 16 linear m1 200\n32 16 zero' });
    const d = e.device('lin')!;
    const data = pattern(48 * 512, 1);
    await d.write(sectors(0), data);
    const got = Buffer.alloc(48 * 512);
    await d.read(sectors(0), got);
    expect(got.subarray(0, 32 * 512).equals(data.subarray(0, 32 * 512))).toBe(true);
    expect(got.subarray(32 * 512).every((b) => b === 0)).toBe(true); // zero target drops writes
    const under = Buffer.alloc(16 * 512);
    await m1.read(sectors(200), under);
    expect(under.equals(data.subarray(16 * 512, 32 * 512))).toBe(true);
    await m0.read(sectors(100), under);
    expect(under.equals(data.subarray(0, 16 * 512))).toBe(true);
    await expect(d.write(sectors(47), Buffer.alloc(1024))).rejects.toMatchObject({ code: 'DM_IO_RANGE' });
    await expect(d.read(sectors(1.5), Buffer.alloc(512))).rejects.toMatchObject({ code: 'DM_IO_ALIGNMENT' });
    await expect(d.read(sectors(0), Buffer.alloc(100))).rejects.toMatchObject({ code: 'DM_IO_ALIGNMENT' });
    await d.flush();
    await e.close();
  });

  test('block status goes through the targets: zero is a hole, linear asks the device below', async () => {
    const m0 = mem(8192);
    const e = await engineWith({ m0 });
    await e.create('d', { table: '0 1024 linear m0 1024\n1024 1024 zero\n2048 1024 error' });
    const d = e.device('d')!;
    await d.write(sectors(256), Buffer.alloc(512, 1)); // memory pages are 64 KiB = 128 sectors
    expect(await d.blockStatus(sectors(0), sectors(3072))).toEqual([
      { startSector: 0, lengthSectors: 256, hole: true },
      { startSector: 256, lengthSectors: 128, hole: false },
      { startSector: 384, lengthSectors: 1664, hole: true },
      { startSector: 2048, lengthSectors: 1024, hole: false },
    ]);
    expect(await d.blockStatus(sectors(300), sectors(10))).toEqual([{ startSector: 300, lengthSectors: 10, hole: false }]);
    await e.close();
  });

  test('error target fails reads, writes and discards; flush passes', async () => {
    const e = await engineWith();
    await e.create('err', { table: '0 100 error' });
    const d = e.device('err')!;
    await expect(d.read(sectors(0), Buffer.alloc(512))).rejects.toMatchObject({ code: 'DM_IO' });
    await expect(d.write(sectors(0), Buffer.alloc(512))).rejects.toMatchObject({ code: 'DM_IO' });
    await expect(d.discard(sectors(0), sectors(8))).rejects.toMatchObject({ code: 'DM_IO' });
    await d.flush();
    await e.close();
  });

  test('suspend drains in-flight bios and queues new ones until resume; resume swaps in the inactive table', async () => {
    const gate = new GateDevice(mem(4096));
    const m1 = mem(4096);
    const e = await engineWith({ gate, m1 });
    await e.create('d', { table: '0 1024 linear gate 0' });
    const d = e.device('d')!;
    const inflight = d.write(sectors(0), pattern(512, 2));
    await new Promise((r) => setImmediate(r));
    expect(gate.waitingCount).toBe(1);
    let suspended = false;
    const susp = e.suspend('d').then(() => (suspended = true));
    await new Promise((r) => setImmediate(r));
    expect(suspended).toBe(false); // waiting for the in-flight write
    gate.release();
    await inflight;
    await susp;
    expect(e.info('d').suspended).toBe(true);
    let queuedDone = false;
    const queued = d.write(sectors(8), pattern(512, 3)).then(() => (queuedDone = true));
    await new Promise((r) => setTimeout(r, 10));
    expect(queuedDone).toBe(false);
    expect(d.queuedCount).toBe(1);
    await e.load('d', '0 2048 linear m1 0');
    expect(e.info('d')).toMatchObject({ liveTable: true, inactiveTable: true, suspended: true });
    await e.resume('d');
    await queued;
    expect(queuedDone).toBe(true);
    expect(e.info('d')).toMatchObject({ sizeSectors: 2048, inactiveTable: false, suspended: false });
    const back = Buffer.alloc(512);
    await m1.read(sectors(8), back); // the queued write went through the new table
    expect(back.equals(pattern(512, 3))).toBe(true);
    await e.close();
  });

  test('resume with an inactive table on a running device suspends, swaps and resumes', async () => {
    const e = await engineWith();
    await e.create('d', { table: '0 100 zero' });
    await e.load('d', '0 200 linear m0 0');
    expect(e.table('d', true)).toEqual(['0 200 linear m0 0']);
    await e.resume('d');
    expect(e.table('d')).toEqual(['0 200 linear m0 0']);
    await e.clear('d');
    await e.load('d', '0 50 zero');
    await e.clear('d');
    expect(e.info('d').inactiveTable).toBe(false);
    await e.close();
  });

  test('stacking: open counts, busy removal, loops refused, remove_all', async () => {
    const e = await engineWith();
    await e.create('low', { table: '0 4096 linear m0 0' });
    await e.create('mid', { table: '0 2048 linear low 100' });
    await e.create('top', { table: '0 1000 linear /dev/mapper/mid 24' });
    expect(e.info('low').openCount).toBe(1);
    expect(e.info('mid').openCount).toBe(1);
    await expect(e.remove('low')).rejects.toMatchObject({ code: 'DM_DEVICE_BUSY' });
    await expect(e.load('low', '0 100 linear top 0')).rejects.toMatchObject({ code: 'DM_TABLE_INVALID' });
    await expect(e.load('low', '0 100 linear low 0')).rejects.toMatchObject({ code: 'DM_TABLE_INVALID' });
    const data = pattern(4096, 5);
    await e.device('top')!.write(sectors(0), data);
    const back = Buffer.alloc(4096);
    await e.device('low')!.read(sectors(124), back);
    expect(back.equals(data)).toBe(true);
    await e.create('bymm', { table: `0 8 linear 253:${e.info('low').minor} 0` });
    expect(e.info('low').openCount).toBe(2);
    await e.removeAll();
    expect(e.names()).toEqual([]);
    await e.close();
  });

  test('removing a suspended device fails its queued I/O', async () => {
    const e = await engineWith();
    await e.create('d', { table: '0 100 linear m0 0' });
    await e.suspend('d');
    const p = e.device('d')!.write(sectors(0), Buffer.alloc(512));
    const failed = expect(p).rejects.toMatchObject({ code: 'DM_IO' });
    await e.remove('d');
    await failed;
    await expect(p).rejects.toMatchObject({ code: 'DM_IO' });
    await e.close();
  });

  test('messages: mark appends to the log; others go to the target', async () => {
    const e = await engineWith();
    await e.create('d', { table: '0 100 linear m0 0' });
    const seen: LoggedEvent[] = [];
    e.events$.subscribe((ev) => seen.push(ev));
    await e.message('d', 0, ['mark', 'before-upgrade']);
    expect(seen.find((x) => x.type === 'mark')).toMatchObject({ device: 'd', name: 'before-upgrade' });
    await expect(e.message('d', 0, ['hello'])).rejects.toMatchObject({ code: 'DM_NOT_SUPPORTED' });
    await expect(e.message('d', 0, ['mark'])).rejects.toMatchObject({ code: 'DM_INVALID_ARGUMENT' });
    await e.close();
  });

  test('trace events show each bio walking its machine', async () => {
    const e = await engineWith(undefined, { trace: true });
    await e.create('d', { table: '0 100 linear m0 0' });
    const seen: string[] = [];
    e.events$.subscribe((ev) => {
      if (ev.type === 'bio') seen.push(`${ev.from}-${ev.event}->${ev.state}`);
    });
    await e.device('d')!.write(sectors(0), Buffer.alloc(512));
    expect(seen).toEqual(['SUBMITTED-MAP->MAPPED', 'MAPPED-REMAP->REMAPPED', 'REMAPPED-IO_DONE->COMPLETED']);
    await e.close();
  });

  test('inspection mode runs a full xstate actor per bio that agrees with the compiled path', async () => {
    const inspected: string[] = [];
    const e = await engineWith(undefined, { inspect: (ev) => inspected.push(ev.type) });
    await e.create('d', { table: '0 16 linear m0 0\n16 16 zero' });
    await e.device('d')!.write(sectors(8), Buffer.alloc(16 * 512));
    await e.suspend('d');
    const p = e.device('d')!.read(sectors(0), Buffer.alloc(512));
    await e.resume('d');
    await p;
    expect(inspected.filter((t) => t === '@xstate.actor').length).toBe(3);
    expect(inspected.filter((t) => t === '@xstate.snapshot').length).toBeGreaterThan(6);
    await e.close();
  });
});

describe('engine: persistence', () => {
  test('tables, stacking and suspended state survive a restart', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'dmstate-engine-'));
    const file = path.join(dir, 'disk.img');
    fs.writeFileSync(file, '');
    fs.truncateSync(file, 4 * 1024 * 1024);
    const open = async () => {
      const db = new ClassicLevel<string, unknown>(path.join(dir, 'db'));
      await db.open();
      return { db, e: await Engine.open({ db: db as unknown as LevelDb }) };
    };
    let { db, e } = await open();
    await e.create('base', { table: `0 8192 linear ${file} 0` });
    await e.create('stk', { table: '0 1024 linear base 8' });
    await e.create('z', { table: '0 10 zero', uuid: 'UUID-Z' });
    await e.suspend('z');
    await e.load('z', '0 20 zero');
    await e.create('gone', { table: '0 10 zero' });
    await e.remove('gone');
    const data = pattern(4096, 9);
    await e.device('stk')!.write(sectors(0), data);
    await e.device('stk')!.flush();
    const before = e.names().map((n) => [n, e.table(n), e.table(n, true), e.info(n)]);
    await e.close();
    await db.close();
    ({ db, e } = await open());
    expect(e.restoreFailures).toEqual([]);
    expect(e.names().map((n) => [n, e.table(n), e.table(n, true), e.info(n)])).toEqual(before);
    expect(e.info('z').suspended).toBe(true);
    const back = Buffer.alloc(4096);
    await e.device('stk')!.read(sectors(0), back);
    expect(back.equals(data)).toBe(true);
    await e.close();
    await db.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });
});

describe('engine: deterministic mode', () => {
  test('a virtual clock and a seed give the same event sequence twice', async () => {
    const run = async () => {
      const clock = new SimulatedClock(1_000);
      const e = await engineWith({ m0: mem(4096) }, { clock, seed: 42, trace: true });
      const events: LoggedEvent[] = [];
      e.events$.subscribe((ev) => events.push(ev));
      await e.create('a', { table: '0 1024 linear m0 0\n1024 1024 zero' });
      for (let i = 0; i < 20; i++) {
        clock.advance(e.rng.int(100));
        const s = e.rng.int(2040);
        await e.device('a')!.write(sectors(s), pattern(8 * 512, i).subarray(0, 8 * 512));
      }
      await e.message('a', 0, ['mark', 'end']);
      await e.close();
      return events;
    };
    const a = await run();
    const b = await run();
    expect(a.length).toBeGreaterThan(40);
    expect(b).toEqual(a);
  });
});
