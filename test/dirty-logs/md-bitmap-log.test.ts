/**
 * The md-bitmap dirty log: the shared dirty-log suite (per initial-sync and offset variant), then what is md's own:
 * the bitmap file the log writes (mdadm's format), the write-before-data rule under crashes, the daemon's clearing
 * through the contract, the degraded rule, table arguments, and refusal of files that are not md bitmaps.
 */
import { describe, expect, test } from 'vitest';
import { FaultyBlockDevice } from '../../src/block/faulty-device.js';
import { MemoryBlockDevice } from '../../src/block/memory-device.js';
import { sectors } from '../../src/block/units.js';
import { SimulatedClock } from '../../src/core/clock.js';
import { createRng } from '../../src/core/rng.js';
import type { DirtyLogOptions, DirtyLogType } from '../../src/dirty-logs/contract.js';
import { createMdBitmapImage } from '../../src/dirty-logs/md-bitmap/create-image.js';
import { examineMdBitmap } from '../../src/dirty-logs/md-bitmap/examine.js';
import { mdBitmapLog, type MdBitmapLog } from '../../src/dirty-logs/md-bitmap/md-bitmap-log.js';
import { decodeMdBitmapSuperblock, encodeMdBitmapSuperblock } from '../../src/dirty-logs/md-bitmap/superblock.js';
import { dirtyLogSuite } from '../../src/testing/conformance/dirty-log.js';
import { mem, mirrorSetOf, openWorld, readAll, turn, until } from '../targets/mirror-fixtures.js';

const DAEMON_SLEEP_SECONDS = 2;
const SLEEP_MS = DAEMON_SLEEP_SECONDS * 1000;

/** The log type, remembering each log by its options so that `settle` can reach the bitmap's daemon. */
function trackedType(): { type: DirtyLogType<MdBitmapLog>; logOf: (o: DirtyLogOptions) => MdBitmapLog } {
  const logs = new Map<DirtyLogOptions, MdBitmapLog>();
  const type: DirtyLogType<MdBitmapLog> = Object.freeze({
    ...mdBitmapLog,
    async create(o: DirtyLogOptions) {
      const log = await mdBitmapLog.create(o);
      logs.set(o, log);
      return log;
    },
  });
  return {
    type,
    logOf: (o) => {
      const log = logs.get(o);
      if (!log) throw new Error('no md-bitmap log was created with these options');
      return log;
    },
  };
}

/** Advances the clock pass by pass (waiting for each to finish) far enough for every clearable bit to reach disk. */
async function settleLog(log: MdBitmapLog, clock: SimulatedClock, passes = 4): Promise<void> {
  for (let i = 0; i < passes; i++) {
    clock.advance(SLEEP_MS);
    await log.bitmap.whenIdle();
  }
}

for (const variant of [
  { name: 'md-bitmap', offsetSectors: 0 },
  { name: 'md-bitmap offset 24', offsetSectors: 24 },
]) {
  describe(`${variant.name} conformance`, () => {
    const { type, logOf } = trackedType();
    dirtyLogSuite({
      test,
      expect,
      name: variant.name,
      type,
      persistent: true,
      validArgs: ['bm.img', '8', String(DAEMON_SLEEP_SECONDS)],
      factory: async (base) => ({
        ...base,
        logDevice: new FaultyBlockDevice(new MemoryBlockDevice({ sizeSectors: sectors(64) }), { volatileCache: true }),
        extra: { daemonSleepSeconds: String(DAEMON_SLEEP_SECONDS), offsetSectors: String(variant.offsetSectors) },
      }),
      crash: async (options) => {
        await (options.logDevice as FaultyBlockDevice).crash();
      },
      settle: async (options, clock) => settleLog(logOf(options), clock),
      release: async (options) => options.logDevice?.close(),
    });
  });
}

const REGION_SECTORS = 8;
const TARGET_SECTORS = 100 * REGION_SECTORS;

function baseOptions(overrides: Partial<DirtyLogOptions> = {}): DirtyLogOptions {
  return {
    targetSizeSectors: sectors(TARGET_SECTORS),
    regionSizeSectors: sectors(REGION_SECTORS),
    initialSync: 'nosync',
    clock: new SimulatedClock(),
    logDevice: new MemoryBlockDevice({ sizeSectors: sectors(16) }),
    logDeviceLabel: 'bm.img',
    extra: { daemonSleepSeconds: String(DAEMON_SLEEP_SECONDS), offsetSectors: '0' },
    ...overrides,
  };
}

async function open(options: DirtyLogOptions): Promise<MdBitmapLog> {
  const log = await mdBitmapLog.create(options);
  await mdBitmapLog.resume!(log);
  return log;
}

async function deviceBytes(options: DirtyLogOptions, sectorCount = 16): Promise<Uint8Array> {
  const b = new Uint8Array(sectorCount * 512);
  await options.logDevice!.read(sectors(0), b);
  return b;
}

describe('md-bitmap log: table arguments, status and table', () => {
  test('parseArgs takes file, chunk, daemon sleep, then sync|nosync and offset N in any order', () => {
    expect(mdBitmapLog.parseArgs(['bm.img', '128', '5'])).toEqual({
      regionSizeSectors: 128,
      initialSync: 'resync',
      logPath: 'bm.img',
      extra: { daemonSleepSeconds: '5', offsetSectors: '0' },
    });
    expect(mdBitmapLog.parseArgs(['leg.img', '8', '1', 'offset', '4096', 'nosync'])).toMatchObject({
      initialSync: 'nosync',
      logPath: 'leg.img',
      extra: { daemonSleepSeconds: '1', offsetSectors: '4096' },
    });
    for (const bad of [
      ['bm.img', '128'],
      ['bm.img', 'x', '5'],
      ['bm.img', '128', '0'],
      ['bm.img', '128', '86401'],
      ['bm.img', '128', '5', 'resync'],
      ['bm.img', '128', '5', 'sync', 'nosync'],
      ['bm.img', '128', '5', 'offset'],
      ['bm.img', '128', '5', 'offset', '-1'],
      ['bm.img', '128', '5', 'offset', '8', 'offset', '8'],
    ]) {
      expect(() => mdBitmapLog.parseArgs(bad), bad.join(' ')).toThrow(expect.objectContaining({ code: 'DM_TABLE_INVALID' }));
    }
  });

  test('table prints the arguments back; status is `3 md-bitmap DEV A`', async () => {
    const log = await open(baseOptions({ initialSync: 'nosync', extra: { daemonSleepSeconds: '7', offsetSectors: '8' }, logDevice: new MemoryBlockDevice({ sizeSectors: sectors(32) }) }));
    expect(mdBitmapLog.table(log)).toBe('md-bitmap 6 bm.img 8 7 nosync offset 8');
    expect(mdBitmapLog.status(log)).toBe('3 md-bitmap bm.img A');
    const plain = await open(baseOptions({ initialSync: 'resync' }));
    expect(mdBitmapLog.table(plain)).toBe('md-bitmap 3 bm.img 8 2');
  });
});

describe('md-bitmap log: what it writes is an md bitmap', () => {
  test('marks, clears after the daemon, the superblock fields: as mdadm -X would report them', async () => {
    const options = baseOptions({ initialSync: 'nosync' });
    const log = await open(options);
    let x = examineMdBitmap(await deviceBytes(options), 'bm.img');
    expect(x.stdout).toMatch(/Events : 1\n {2}Events Cleared : 1\n/);
    expect(x.stdout).toMatch(/Chunksize : 4 KB\n {10}Daemon : 2s flush period\n/);
    expect(x.stdout).toMatch(/Sync Size : 400\n {10}Bitmap : 100 bits \(chunks\), 0 dirty \(0\.0%\)\n/);
    for (const r of [0, 9, 99]) mdBitmapLog.markRegion(log, r);
    await mdBitmapLog.flush(log);
    x = examineMdBitmap(await deviceBytes(options), 'bm.img');
    expect(x.stdout).toMatch(/Bitmap : 100 bits \(chunks\), 3 dirty \(3\.0%\)\n/);
    for (const r of [0, 9]) mdBitmapLog.clearRegion(log, r);
    await settleLog(log, options.clock as SimulatedClock);
    x = examineMdBitmap(await deviceBytes(options), 'bm.img');
    expect(x.stdout).toMatch(/Bitmap : 100 bits \(chunks\), 1 dirty \(1\.0%\)\n/);
  });

  test('a leg missed a write (setRegionSync false): the bit is set on disk, never cleared; a reopen resyncs it', async () => {
    const options = baseOptions({ initialSync: 'nosync' });
    const log = await open(options);
    mdBitmapLog.setRegionSync(log, 42, false);
    await mdBitmapLog.flush(log);
    await settleLog(log, options.clock as SimulatedClock, 10);
    await mdBitmapLog.suspend!(log);
    expect(examineMdBitmap(await deviceBytes(options), 'bm.img').stdout).toMatch(/1 dirty/);
    await mdBitmapLog.close(log);
    const again = await open({ ...options, initialSync: 'resync' });
    expect(mdBitmapLog.inSync(again, 42)).toBe(false);
    expect(mdBitmapLog.getResyncWork(again)).toBe(42);
    expect(mdBitmapLog.getResyncWork(again)).toBeUndefined();
  });

  test('the bitmap can live inside another file (offset): the bytes before it are untouched', async () => {
    const device = new MemoryBlockDevice({ sizeSectors: sectors(64) });
    const data = new Uint8Array(32 * 512).fill(0x5a);
    await device.write(sectors(0), data);
    const options = baseOptions({ logDevice: device, extra: { daemonSleepSeconds: '2', offsetSectors: '32' } });
    const log = await open(options);
    mdBitmapLog.markRegion(log, 5);
    await mdBitmapLog.flush(log);
    const all = await deviceBytes(options, 64);
    expect(all.subarray(0, 32 * 512).every((b) => b === 0x5a)).toBe(true);
    expect(examineMdBitmap(all.subarray(32 * 512), 'leg.img').stdout).toMatch(/1 dirty/);
  });
});

describe('md-bitmap log: crashes (a bit set and flushed before the data survives)', () => {
  test('a flushed mark survives a crash that tears and drops every unflushed write', async () => {
    for (let seed = 1; seed <= 30; seed++) {
      const rng = createRng(seed);
      const device = new FaultyBlockDevice(new MemoryBlockDevice({ sizeSectors: sectors(16) }), { volatileCache: true, rng });
      const clock = new SimulatedClock();
      const options = baseOptions({ logDevice: device, clock });
      const log = await open(options);
      const durable = new Set<number>();
      const marked = new Set<number>();
      for (let step = 0; step < 40; step++) {
        const r = rng.int(100);
        const op = rng.int(4);
        if (op === 0 && !marked.has(r)) {
          mdBitmapLog.markRegion(log, r);
          marked.add(r);
        } else if (op === 1 && marked.has(r)) {
          mdBitmapLog.clearRegion(log, r);
          marked.delete(r);
          durable.delete(r);
        } else if (op === 2) {
          const inFlight = [...marked];
          await mdBitmapLog.flush(log, { clears: rng.int(2) === 0 });
          // Only now may the data of these writes go out: their intent is durable.
          for (const m of inFlight) if (marked.has(m)) durable.add(m);
        } else {
          clock.advance(rng.int(3 * SLEEP_MS));
          await log.bitmap.whenIdle();
        }
      }
      await mdBitmapLog.close(log);
      await device.crash({ torn: true });
      const after = await open({ ...options, initialSync: 'resync' });
      for (const r of durable) expect(mdBitmapLog.inSync(after, r), `seed ${seed}: region ${r} lost its durable mark`).toBe(false);
      await mdBitmapLog.close(after);
    }
  });

  test('the crash model bites: a mark that was never flushed is lost', async () => {
    const device = new FaultyBlockDevice(new MemoryBlockDevice({ sizeSectors: sectors(16) }), { volatileCache: true });
    const options = baseOptions({ logDevice: device });
    const log = await open(options);
    mdBitmapLog.markRegion(log, 10);
    await mdBitmapLog.close(log);
    await device.crash();
    const after = await open({ ...options, initialSync: 'resync' });
    expect(mdBitmapLog.inSync(after, 10)).toBe(true);
  });
});

describe('md-bitmap log: files that are not usable md bitmaps are refused, and left as they were', () => {
  const image = (patch: Record<string, unknown> = {}, chunkSizeBytes = REGION_SECTORS * 512): Uint8Array => {
    const img = new Uint8Array(8 * 512);
    const made = createMdBitmapImage({ syncSizeSectors: BigInt(TARGET_SECTORS), chunkSizeBytes: Math.max(512, chunkSizeBytes), daemonSleepSeconds: 5 });
    img.set(made);
    img.set(encodeMdBitmapSuperblock({ ...decodeMdBitmapSuperblock(made), ...patch }), 0);
    return img;
  };

  test.each([
    ['garbage (no magic)', () => new Uint8Array(8 * 512).fill(0x41)],
    ['bad magic', () => image({ magic: 0x12345678 })],
    ['version 2', () => image({ version: 2 })],
    ['version 6', () => image({ version: 6 })],
    ['clustered (version 5)', () => image({ version: 5, nodes: 2 })],
    ['chunk size not a power of two', () => image({ chunkSizeBytes: 3000 })],
    ['chunk size under 512', () => image({ chunkSizeBytes: 256 })],
    ['daemon sleep 0', () => image({ daemonSleepSeconds: 0 })],
    ['write-behind over 16383', () => image({ writeBehind: 20000 })],
    ['another chunk size than the table', () => image({}, 8192)],
  ])('%s', async (_name, make) => {
    const device = new MemoryBlockDevice({ sizeSectors: sectors(8) });
    const before = make();
    await device.write(sectors(0), before);
    await expect(mdBitmapLog.create(baseOptions({ logDevice: device, initialSync: 'resync' }))).rejects.toMatchObject({ code: 'DM_TABLE_INVALID' });
    const after = new Uint8Array(before.byteLength);
    await device.read(sectors(0), after);
    expect(Buffer.from(after).equals(Buffer.from(before))).toBe(true);
  });

  test('a different chunk size is rewritten with sync / nosync (the table forces it); garbage still is not', async () => {
    const device = new MemoryBlockDevice({ sizeSectors: sectors(8) });
    await device.write(sectors(0), image({}, 8192));
    const log = await open(baseOptions({ logDevice: device, initialSync: 'nosync' }));
    const sb = decodeMdBitmapSuperblock(await deviceBytes({ ...baseOptions(), logDevice: device }, 8));
    expect(sb.chunkSizeBytes).toBe(REGION_SECTORS * 512);
    await mdBitmapLog.close(log);
    const junk = new MemoryBlockDevice({ sizeSectors: sectors(8) });
    await junk.write(sectors(0), new Uint8Array(4096).fill(1));
    await expect(mdBitmapLog.create(baseOptions({ logDevice: junk, initialSync: 'nosync' }))).rejects.toMatchObject({ code: 'DM_TABLE_INVALID' });
  });

  test('a device too small for the bits, an offset off the logical block, a chunk over the target: refused', async () => {
    // 100 chunks need 256 + 13 bytes: one sector; an offset of 1 leaves none.
    await expect(mdBitmapLog.create(baseOptions({ logDevice: new MemoryBlockDevice({ sizeSectors: sectors(1) }), extra: { daemonSleepSeconds: '5', offsetSectors: '1' } }))).rejects.toMatchObject({ code: 'DM_TABLE_INVALID' });
    const big = baseOptions({ targetSizeSectors: sectors(2 ** 20), regionSizeSectors: sectors(1) });
    await expect(mdBitmapLog.create(big)).rejects.toMatchObject({ code: 'DM_TABLE_INVALID' });
    const lbs4k = new MemoryBlockDevice({ sizeSectors: sectors(64), logicalBlockSizeBytes: 4096 as never });
    await expect(mdBitmapLog.create(baseOptions({ logDevice: lbs4k, extra: { daemonSleepSeconds: '5', offsetSectors: '4' } }))).rejects.toMatchObject({ code: 'DM_TABLE_INVALID' });
    await expect(mdBitmapLog.create(baseOptions({ regionSizeSectors: sectors(TARGET_SECTORS * 2) }))).rejects.toMatchObject({ code: 'DM_TABLE_INVALID' });
    await expect(mdBitmapLog.create(baseOptions({ logDevice: undefined }))).rejects.toMatchObject({ code: 'DM_TABLE_INVALID' });
  });
});

describe('md-bitmap log in a mirror', () => {
  const LEN = 32768; // 32 regions of 1024 sectors

  test('degraded writes keep their bits through the daemon; the re-added leg gets exactly those regions; then they clear', async () => {
    const clock = new SimulatedClock();
    const a = new FaultyBlockDevice(mem(LEN));
    const b = new FaultyBlockDevice(mem(LEN));
    const logDevice = mem(16);
    const w = await openWorld({ a, b, log: logDevice }, { clock });
    await w.engine.create('m', { table: `0 ${LEN} mirror md-bitmap 4 log 1024 ${DAEMON_SLEEP_SECONDS} nosync 2 a 0 b 0 1 handle_errors` });
    expect(w.engine.table('m')).toEqual([`0 ${LEN} mirror md-bitmap 4 log 1024 ${DAEMON_SLEEP_SECONDS} nosync 2 a 0 b 0 1 handle_errors`]);
    const set = mirrorSetOf(w.engine, 'm');
    const bitmap = (set.log as MdBitmapLog).bitmap;
    const m = w.engine.device('m')!;
    const dirtyOnDisk = async (): Promise<number> => Number(/(\d+) dirty/.exec(examineMdBitmap(await readAll(logDevice), 'log').stdout)![1]);
    const idle = async (periods: number): Promise<void> => {
      for (let i = 0; i < periods * 10; i++) {
        clock.advance(SLEEP_MS / 10);
        await bitmap.whenIdle();
        await turn();
      }
    };

    await m.write(sectors(3 * 1024), Buffer.alloc(4096, 1));
    expect(await dirtyOnDisk()).toBe(1);
    await idle(4);
    expect(await dirtyOnDisk()).toBe(0);
    const eventsBefore = bitmap.events;
    expect(bitmap.eventsCleared).toBe(eventsBefore);

    b.setErrorRules([{ op: 'write' }]);
    for (const r of [5, 9]) await m.write(sectors(r * 1024), Buffer.alloc(4096, r));
    expect(bitmap.degraded).toBe(true);
    expect(bitmap.events).toBe(eventsBefore + 1n);
    await idle(10);
    expect(await dirtyOnDisk()).toBe(2);
    expect(bitmap.eventsCleared).toBe(eventsBefore);

    b.setErrorRules([]);
    await w.engine.message('m', 0, ['readd', '1']);
    expect(bitmap.lastReaddDecision).toBe('bitmap-recovery');
    await until(() => set.resync.state === 'IN_SYNC', 'the resync');
    expect(set.resync.runRegionsCopied).toBe(2);
    expect((await readAll(b.inner)).equals(await readAll(a.inner))).toBe(true);
    await idle(4);
    expect(await dirtyOnDisk()).toBe(0);
    await m.write(sectors(0), Buffer.alloc(4096, 7));
    await idle(4);
    expect(bitmap.eventsCleared).toBe(bitmap.events);
    expect(w.engine.status('m')).toEqual([`0 ${LEN} mirror 2 a b 32/32 1 AA 3 md-bitmap log A`]);
    await w.engine.close();
  });
});
