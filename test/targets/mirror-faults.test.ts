/**
 * Mirror fault handling (Linux dm-raid1 fail_mirror semantics): a leg returning EIO on reads (the read is served
 * by another leg, the leg shows R), on writes (with handle_errors: the leg shows D and gets no more writes, the
 * data stays on the others, the regions written meanwhile are out of sync in the log, and re-adding the leg copies
 * exactly those; without handle_errors: the kernel's "pretend it worked" resync brings the mirror back to AA),
 * a failing default leg, every leg failing, and a failing log device.
 */
import { describe, expect, test } from 'vitest';
import { FaultyBlockDevice } from '../../src/block/faulty-device.js';
import { sectors } from '../../src/block/units.js';
import { createRng } from '../../src/core/rng.js';
import { SECTOR, mem, mirrorSetOf, openWorld, pattern, readAll, until } from './mirror-fixtures.js';

const LEN = 32768; // 32 regions of 1024 sectors

const faulty = (n = LEN): FaultyBlockDevice => new FaultyBlockDevice(mem(n));

describe('read errors', () => {
  test('a leg failing reads: served by the other leg, the leg shows R and is not read again', async () => {
    const a = faulty();
    const b = faulty();
    const data = pattern(createRng(1), 64 * SECTOR);
    await a.write(sectors(0), data);
    await b.write(sectors(0), data);
    const w = await openWorld({ a, b });
    await w.engine.create('m', { table: `0 ${LEN} mirror core 2 1024 nosync 2 a 0 b 0 1 handle_errors` });
    a.setErrorRules([{ op: 'read' }]);
    const m = w.engine.device('m')!;
    for (let i = 0; i < 8; i++) {
      const buf = Buffer.alloc(8 * SECTOR);
      await m.read(sectors(i * 8), buf);
      expect(buf.equals(data.subarray(i * 8 * SECTOR, (i + 1) * 8 * SECTOR))).toBe(true);
    }
    expect(a.injectedErrorCounts.read).toBe(1);
    expect(w.engine.status('m')).toEqual([`0 ${LEN} mirror 2 a b 32/32 1 RA 1 core`]);
    expect(w.events.filter((e) => e.type === 'mirror.leg.failed')).toMatchObject([{ leg: 0, label: 'a', error: 'read', health: 'RA' }]);
    // Writes still go to a leg that only failed a read (as the kernel does).
    await m.write(sectors(0), Buffer.alloc(4096, 9));
    expect((await readAll(a.inner, 0, 8)).every((x) => x === 9)).toBe(true);
    await w.engine.close();
  });

  test('every leg failing reads: EIO', async () => {
    const a = faulty();
    const b = faulty();
    const w = await openWorld({ a, b });
    await w.engine.create('m', { table: `0 ${LEN} mirror core 2 1024 nosync 2 a 0 b 0 1 handle_errors` });
    a.setErrorRules([{ op: 'read' }]);
    b.setErrorRules([{ op: 'read' }]);
    await expect(w.engine.device('m')!.read(sectors(0), Buffer.alloc(512))).rejects.toMatchObject({ code: 'DM_IO' });
    expect(w.engine.status('m')).toEqual([`0 ${LEN} mirror 2 a b 32/32 1 RR 1 core`]);
    await expect(w.engine.device('m')!.read(sectors(8), Buffer.alloc(512))).rejects.toMatchObject({ code: 'DM_IO' });
    await w.engine.close();
  });
});

describe('write errors with handle_errors', () => {
  test('leg failed, data kept on the other, re-add copies only the regions it missed', async () => {
    const a = faulty();
    const b = faulty();
    const log = mem(64);
    const w = await openWorld({ a, b, log });
    await w.engine.create('m', { table: `0 ${LEN} mirror disk 3 log 1024 nosync 2 a 0 b 0 1 handle_errors` });
    const set = mirrorSetOf(w.engine, 'm');
    const m = w.engine.device('m')!;
    b.setErrorRules([{ op: 'write' }]);
    const first = pattern(createRng(2), 4096);
    let eventSeenAtCompletion = false;
    await m.write(sectors(3 * 1024), first).then(() => {
      eventSeenAtCompletion = w.events.some((e) => e.type === 'mirror.leg.failed' && e.leg === 1);
    });
    expect(eventSeenAtCompletion, 'the failure was recorded before the bio completed').toBe(true);
    expect(w.engine.status('m')).toEqual([`0 ${LEN} mirror 2 a b 31/32 1 AD 3 disk log A`]);
    expect(w.engine.info('m').eventNr).toBeGreaterThan(0);
    expect((await readAll(a.inner, 3 * 1024, 8)).equals(first)).toBe(true);
    // Degraded: writes go to leg a only, each region written is out of sync (and never cleared).
    const writtenRegions = new Set<number>([3]);
    const rng = createRng(3);
    for (let i = 0; i < 20; i++) {
      const s = rng.int(LEN / 8) * 8;
      writtenRegions.add(Math.floor(s / 1024));
      await m.write(sectors(s), pattern(rng, 4096));
    }
    expect(b.injectedErrorCounts.write).toBe(1);
    expect(set.logType.syncCount(set.log)).toBe(32 - writtenRegions.size);
    expect(w.engine.status('m')[0]).toContain(' 1 AD ');
    // A read of a region out of sync comes from leg a (the default leg).
    const back = Buffer.alloc(4096);
    await m.read(sectors(3 * 1024), back);
    expect(back.equals(first)).toBe(true);
    // The leg comes back.
    b.setErrorRules([]);
    await w.engine.message('m', 0, ['readd', '1']);
    await until(() => set.resync.state === 'IN_SYNC', 'the resync');
    expect(set.resync.runRegionsCopied).toBe(writtenRegions.size);
    expect((await readAll(b.inner)).equals(await readAll(a.inner))).toBe(true);
    expect(w.engine.status('m')).toEqual([`0 ${LEN} mirror 2 a b 32/32 1 AA 3 disk log A`]);
    expect(w.events.filter((e) => e.type === 'mirror.leg.readded')).toMatchObject([{ leg: 1, label: 'b' }]);
    await w.engine.close();
  });

  test('a failed default leg hands its role to a healthy leg; re-add by label resyncs from it', async () => {
    const a = faulty();
    const b = faulty();
    const w = await openWorld({ a, b });
    await w.engine.create('m', { table: `0 ${LEN} mirror core 2 1024 nosync 2 a 0 b 0 1 handle_errors` });
    const set = mirrorSetOf(w.engine, 'm');
    a.setErrorRules([{ op: 'write' }]);
    const data = pattern(createRng(4), 4096);
    await w.engine.device('m')!.write(sectors(100), data);
    expect(set.defaultLegIndex).toBe(1);
    expect(w.engine.status('m')).toEqual([`0 ${LEN} mirror 2 a b 31/32 1 DA 1 core`]);
    a.setErrorRules([]);
    await w.engine.message('m', 0, ['readd', 'a']);
    await until(() => set.resync.state === 'IN_SYNC', 'the resync');
    expect((await readAll(a.inner, 100, 8)).equals(data)).toBe(true);
    expect(set.resync.runRegionsCopied).toBe(1);
    await expect(w.engine.message('m', 0, ['readd', 'nope'])).rejects.toMatchObject({ code: 'DM_INVALID_ARGUMENT' });
    await expect(w.engine.message('m', 0, ['frobnicate'])).rejects.toMatchObject({ code: 'DM_UNKNOWN_COMMAND' });
    await w.engine.close();
  });

  test('every leg failing writes: EIO, both legs D', async () => {
    const a = faulty();
    const b = faulty();
    const w = await openWorld({ a, b });
    await w.engine.create('m', { table: `0 ${LEN} mirror core 2 1024 nosync 2 a 0 b 0 1 handle_errors` });
    a.setErrorRules([{ op: 'write' }]);
    b.setErrorRules([{ op: 'write' }]);
    await expect(w.engine.device('m')!.write(sectors(0), Buffer.alloc(512))).rejects.toMatchObject({ code: 'DM_IO' });
    expect(w.engine.status('m')).toEqual([`0 ${LEN} mirror 2 a b 31/32 1 DD 1 core`]);
    // No leg takes writes any more.
    await expect(w.engine.device('m')!.write(sectors(2048), Buffer.alloc(512))).rejects.toMatchObject({ code: 'DM_IO' });
    await w.engine.close();
  });

  test('a table reload re-adds the leg: with a disk log only the dirty regions are copied', async () => {
    const a = faulty();
    const b = faulty();
    const log = mem(64);
    const w = await openWorld({ a, b, log });
    const table = `0 ${LEN} mirror disk 2 log 1024 2 a 0 b 0 1 handle_errors`;
    await w.engine.create('m', { table });
    await until(() => mirrorSetOf(w.engine, 'm').resync.state === 'IN_SYNC', 'the initial resync');
    b.setErrorRules([{ op: 'write' }]);
    for (const r of [2, 7, 19]) await w.engine.device('m')!.write(sectors(r * 1024 + 8), Buffer.alloc(4096, r));
    expect(w.engine.status('m')[0]).toContain(' 29/32 1 AD ');
    b.setErrorRules([]);
    await w.engine.load('m', table);
    await w.engine.resume('m');
    const set = mirrorSetOf(w.engine, 'm');
    await until(() => set.resync.state === 'IN_SYNC', 'the resync after the reload');
    expect(set.resync.runRegionsCopied).toBe(3);
    expect((await readAll(b.inner)).equals(await readAll(a.inner))).toBe(true);
    expect(w.engine.status('m')).toEqual([`0 ${LEN} mirror 2 a b 32/32 1 AA 3 disk log A`]);
    await w.engine.close();
  });
});

describe('write errors without handle_errors (the kernel ignores them)', () => {
  test('the write succeeds, the leg shows D, the resync ignores the error and the mirror is AA again', async () => {
    const a = faulty();
    const b = faulty();
    const w = await openWorld({ a, b });
    await w.engine.create('m', { table: `0 ${LEN} mirror core 2 1024 nosync 2 a 0 b 0` });
    const set = mirrorSetOf(w.engine, 'm');
    b.setErrorRules([{ op: 'write', startSector: sectors(4096), endSector: sectors(4104) }]);
    await w.engine.device('m')!.write(sectors(4096), Buffer.alloc(4096, 1));
    await until(() => set.resync.state === 'IN_SYNC' && set.inSync, 'the resync');
    expect(w.engine.status('m')).toEqual([`0 ${LEN} mirror 2 a b 32/32 1 AA 1 core`]);
    expect(set.resync.regionsCopyFailed).toBe(1);
    expect(w.events.filter((e) => e.type === 'mirror.leg.failed').map((e) => (e as { error: string }).error)).toEqual(['write', 'sync']);
    await w.engine.close();
  });
});

describe('log failures', () => {
  test('a log device failing writes: status D; with handle_errors a write needing a mark fails', async () => {
    const log = new FaultyBlockDevice(mem(64));
    const w = await openWorld({ a: mem(LEN), b: mem(LEN), log });
    await w.engine.create('m', { table: `0 ${LEN} mirror disk 3 log 1024 nosync 2 a 0 b 0 1 handle_errors` });
    log.setErrorRules([{ op: 'write' }]);
    await expect(w.engine.device('m')!.write(sectors(0), Buffer.alloc(512))).rejects.toMatchObject({ code: 'DM_IO' });
    expect(w.engine.status('m')).toEqual([`0 ${LEN} mirror 2 a b 32/32 1 AA 3 disk log D`]);
    await w.engine.close();
  });

  test('without handle_errors the data is written anyway', async () => {
    const log = new FaultyBlockDevice(mem(64));
    const a = mem(LEN);
    const w = await openWorld({ a, b: mem(LEN), log });
    await w.engine.create('m', { table: `0 ${LEN} mirror disk 3 log 1024 nosync 2 a 0 b 0` });
    log.setErrorRules([{ op: 'flush' }]);
    await w.engine.device('m')!.write(sectors(0), Buffer.alloc(512, 5));
    expect((await readAll(a, 0, 1)).every((x) => x === 5)).toBe(true);
    expect(w.engine.status('m')).toEqual([`0 ${LEN} mirror 2 a b 32/32 1 AA 3 disk log F`]);
    await w.engine.close();
  });
});
