/**
 * The md bitmap engine over a device with a SimulatedClock: bit set and flushed before unplug resolves, the
 * daemon's timing (a bit clears on disk 2–3 periods after its last write), events / events_cleared and the
 * superblock-first order, the degraded rule, re-add decisions, a failed leg flush, loads of every kind.
 */
import { describe, expect, test } from 'vitest';
import { FaultyBlockDevice } from '../../src/block/faulty-device.js';
import { MemoryBlockDevice } from '../../src/block/memory-device.js';
import { sectors, type Sector } from '../../src/block/units.js';
import { SimulatedClock } from '../../src/core/clock.js';
import { MD_COUNTER_NEEDED } from '../../src/dirty-logs/md-bitmap/counters.js';
import { createMdBitmapImage } from '../../src/dirty-logs/md-bitmap/create-image.js';
import { MdBitmap, type MdBitmapInitialSync } from '../../src/dirty-logs/md-bitmap/md-bitmap.js';
import { mdBitmapReaddDecision } from '../../src/dirty-logs/md-bitmap/readd.js';
import { MD_BITMAP_STATE_STALE, decodeMdBitmapSuperblock, encodeMdBitmapSuperblock } from '../../src/dirty-logs/md-bitmap/superblock.js';

type Op = { kind: 'write'; sector: number; data: Uint8Array; fua: boolean } | { kind: 'flush' } | { kind: 'legs' };

/** A memory device that records every write and flush in order (the test reads what reached it). */
class RecordingDevice extends MemoryBlockDevice {
  readonly ops: Op[];
  constructor(sizeSectors: number, ops: Op[]) {
    super({ sizeSectors: sectors(sizeSectors) });
    this.ops = ops;
  }
  protected override _write(sector: Sector, buf: Uint8Array, fua: boolean): Promise<void> {
    this.ops.push({ kind: 'write', sector, data: Uint8Array.from(buf), fua });
    return super._write(sector, buf, fua);
  }
  protected override _flush(): Promise<void> {
    this.ops.push({ kind: 'flush' });
    return super._flush();
  }
}

const SLEEP_S = 5;
const SLEEP_MS = SLEEP_S * 1000;

interface Rig {
  readonly clock: SimulatedClock;
  readonly device: RecordingDevice;
  readonly ops: Op[];
  readonly bitmap: MdBitmap;
  diskBit(chunk: number): Promise<boolean>;
  diskSuperblock(): Promise<ReturnType<typeof decodeMdBitmapSuperblock>>;
  /** Advances time in steps of `stepMs`, waiting for the daemon after each. */
  advance(ms: number, stepMs?: number): Promise<void>;
}

function rig(options: { chunks?: number; chunkSectors?: number; image?: Uint8Array; flushLegs?: () => Promise<void>; ops?: Op[] } = {}): Rig {
  const ops = options.ops ?? [];
  const chunkSectors = options.chunkSectors ?? 8;
  const chunks = options.chunks ?? 100;
  const device = new RecordingDevice(256, ops);
  const clock = new SimulatedClock(0);
  const bitmap = new MdBitmap({
    device,
    label: 'bm',
    offsetSectors: sectors(0),
    syncSizeSectors: sectors(chunks * chunkSectors),
    chunkSizeSectors: sectors(chunkSectors),
    daemonSleepSeconds: SLEEP_S,
    clock,
    flushLegs: options.flushLegs,
  });
  const read = async (): Promise<Uint8Array> => {
    const b = new Uint8Array(256 * 512);
    await device.read(sectors(0), b);
    return b;
  };
  return {
    clock,
    device,
    ops,
    bitmap,
    async diskBit(chunk) {
      const b = await read();
      return (b[256 + (chunk >> 3)] & (1 << (chunk & 7))) !== 0;
    },
    async diskSuperblock() {
      return decodeMdBitmapSuperblock(await read());
    },
    async advance(ms, stepMs = 100) {
      for (let t = 0; t < ms; t += stepMs) {
        clock.advance(Math.min(stepMs, ms - t));
        await bitmap.whenIdle();
      }
    },
  };
}

async function loaded(r: Rig, initialSync: MdBitmapInitialSync = 'nosync'): Promise<Rig> {
  await r.bitmap.load(initialSync);
  r.ops.length = 0;
  return r;
}

describe('md bitmap: the write path', () => {
  test('startWrite sets the bit; unplug writes the page and flushes the device before it resolves', async () => {
    const r = await loaded(rig());
    r.bitmap.startWrite(9);
    expect(await r.diskBit(9)).toBe(false);
    let resolved = false;
    const p = r.bitmap.unplug().then(() => (resolved = true));
    expect(resolved).toBe(false);
    await p;
    expect(await r.diskBit(9)).toBe(true);
    expect(r.ops.map((o) => o.kind)).toEqual(['write', 'flush']);
    // Nothing new to write: no I/O.
    await r.bitmap.unplug();
    expect(r.ops).toHaveLength(2);
  });

  test('concurrent unplugs share passes; each resolves with its own bit durable', async () => {
    const r = await loaded(rig());
    const waits: Array<Promise<void>> = [];
    for (let c = 0; c < 20; c++) {
      r.bitmap.startWrite(c);
      waits.push(r.bitmap.unplug({ clears: false }));
    }
    await Promise.all(waits);
    for (let c = 0; c < 20; c++) expect(await r.diskBit(c)).toBe(true);
    expect(r.ops.filter((o) => o.kind === 'write').length).toBeLessThanOrEqual(2);
  });

  test('a write to a chunk that is counting down costs no bitmap I/O', async () => {
    const r = await loaded(rig());
    r.bitmap.startWrite(3);
    await r.bitmap.unplug();
    r.bitmap.endWrite(3, true);
    await r.advance(SLEEP_MS); // pass 1: 2 → 1
    expect(r.bitmap.counters.get(3)).toBe(1);
    const before = r.ops.length;
    r.bitmap.startWrite(3);
    await r.bitmap.unplug({ clears: false });
    expect(r.ops.length).toBe(before);
    expect(r.bitmap.counters.get(3)).toBe(3);
  });
});

describe('md bitmap: the daemon', () => {
  /** Time (ms after the write ended) at which the chunk's bit first reads clear on disk. */
  async function clearedAfterMs(r: Rig, chunk: number, endMs: number): Promise<number> {
    for (let i = 0; i < 10 * (SLEEP_MS / 100); i++) {
      await r.advance(100);
      if (!(await r.diskBit(chunk))) return r.clock.nowMs() - endMs;
    }
    throw new Error('never cleared');
  }

  test('a bit clears on disk 2–3 periods after the last write (daemon running on its phase)', async () => {
    const r = await loaded(rig());
    await r.advance(1000);
    r.bitmap.startWrite(3);
    await r.bitmap.unplug();
    r.bitmap.endWrite(3, true);
    const endMs = r.clock.nowMs();
    // Pass 1 (2 → 1) and pass 2 (1 → 0 in memory) leave the disk bit set; pass 3 writes the page.
    const ms = await clearedAfterMs(r, 3, endMs);
    expect(ms).toBeGreaterThan(2 * SLEEP_MS);
    expect(ms).toBeLessThanOrEqual(3 * SLEEP_MS);
    expect(r.bitmap.counters.get(3)).toBe(0);
    expect(r.bitmap.allClean).toBe(true);
  });

  test('after an idle spell the first pass comes a full period after the write: cleared at exactly 3 periods', async () => {
    const r = await loaded(rig());
    await r.advance(100 * SLEEP_MS, 1000);
    const passes = r.bitmap.daemonPassCount;
    r.bitmap.startWrite(7);
    await r.bitmap.unplug();
    r.bitmap.endWrite(7, true);
    const endMs = r.clock.nowMs();
    expect(await clearedAfterMs(r, 7, endMs)).toBe(3 * SLEEP_MS);
    // Then the daemon goes idle again: no more passes.
    const after = r.bitmap.daemonPassCount;
    expect(after - passes).toBe(3);
    await r.advance(10 * SLEEP_MS, 1000);
    expect(r.bitmap.daemonPassCount).toBe(after);
  });

  test('a write still in flight keeps its bit through any number of passes', async () => {
    const r = await loaded(rig());
    r.bitmap.startWrite(1);
    r.bitmap.startWrite(2);
    await r.bitmap.unplug();
    r.bitmap.endWrite(2, true);
    await r.advance(10 * SLEEP_MS, 1000);
    expect(await r.diskBit(1)).toBe(true);
    expect(await r.diskBit(2)).toBe(false);
  });

  test('flushLegs runs before any bit goes 1 → 0, so a clear is never written ahead of the data below it', async () => {
    const ops: Op[] = [];
    const r = await loaded(rig({ ops, flushLegs: async () => void ops.push({ kind: 'legs' }) }));
    r.bitmap.startWrite(5);
    await r.bitmap.unplug();
    r.bitmap.endWrite(5, true);
    await r.advance(4 * SLEEP_MS);
    expect(await r.diskBit(5)).toBe(false);
    const clearingWrite = ops.findIndex((o) => o.kind === 'write' && o.sector === 0 && o.data.length > 256 && (o.data[256] & (1 << 5)) === 0);
    const legs = ops.findIndex((o) => o.kind === 'legs');
    expect(legs).toBeGreaterThanOrEqual(0);
    expect(clearingWrite).toBeGreaterThan(legs);
  });

  test('a failed leg flush: nothing is cleared again, the chunks counting down become NEEDED', async () => {
    let fail = true;
    const r = await loaded(rig({ flushLegs: () => (fail ? Promise.reject(new Error('leg flush failed')) : Promise.resolve()) }));
    r.bitmap.startWrite(5);
    await r.bitmap.unplug();
    r.bitmap.endWrite(5, true);
    await r.advance(4 * SLEEP_MS);
    expect(r.bitmap.legFlushFailed).toBe(true);
    expect(r.bitmap.counters.get(5) & MD_COUNTER_NEEDED).toBe(MD_COUNTER_NEEDED);
    expect(await r.diskBit(5)).toBe(true);
    fail = false;
    r.bitmap.startWrite(6);
    await r.bitmap.unplug();
    r.bitmap.endWrite(6, true);
    await r.advance(4 * SLEEP_MS);
    expect(await r.diskBit(6)).toBe(true);
    expect(r.bitmap.inSync(6)).toBe(false);
  });

  test('flushAll (suspend) clears on disk everything that may be cleared, at once, and stops the daemon', async () => {
    const r = await loaded(rig());
    for (const c of [1, 2, 3]) r.bitmap.startWrite(c);
    await r.bitmap.unplug();
    for (const c of [1, 2]) r.bitmap.endWrite(c, true);
    r.bitmap.setNeeded(40);
    await r.bitmap.flushAll();
    expect(await r.diskBit(1)).toBe(false);
    expect(await r.diskBit(2)).toBe(false);
    expect(await r.diskBit(3)).toBe(true); // still in flight
    expect(await r.diskBit(40)).toBe(true); // NEEDED
    expect(r.ops.at(-1)).toEqual({ kind: 'flush' });
    const passes = r.bitmap.daemonPassCount;
    r.bitmap.endWrite(3, true);
    await r.advance(10 * SLEEP_MS, 1000);
    expect(r.bitmap.daemonPassCount).toBe(passes);
  });
});

describe('md bitmap: events and events_cleared', () => {
  test('a load bumps events; the first clean endwrite after an event moves events_cleared, written before bits clear', async () => {
    // 40000 chunks of one sector: the bits span two 4 KiB pages; chunk 35000 lives in page 1.
    const ops: Op[] = [];
    const r = rig({ chunks: 40000, chunkSectors: 1, ops, image: undefined });
    await r.device.write(sectors(0), createMdBitmapImage({ syncSizeSectors: 40000n, chunkSizeBytes: 512, daemonSleepSeconds: SLEEP_S }).slice(0, 5632));
    await r.bitmap.load('nosync');
    expect(await r.diskSuperblock()).toMatchObject({ events: 1n, eventsCleared: 0n });
    ops.length = 0;
    const chunk = 35000;
    r.bitmap.startWrite(chunk);
    await r.bitmap.unplug();
    r.bitmap.endWrite(chunk, true);
    expect(r.bitmap.eventsCleared).toBe(1n);
    expect(r.bitmap.needSync).toBe(true);
    await r.advance(4 * SLEEP_MS);
    expect(await r.diskBit(chunk)).toBe(false);
    expect(await r.diskSuperblock()).toMatchObject({ events: 1n, eventsCleared: 1n });
    const sbDurable = ops.findIndex((o) => o.kind === 'write' && o.sector === 0 && o.fua && decodeMdBitmapSuperblock(padded(o.data)).eventsCleared === 1n);
    const clear = ops.findIndex((o) => o.kind === 'write' && o.sector === 8 && (o.data[(256 + (chunk >> 3)) - 4096] & (1 << (chunk & 7))) === 0);
    expect(sbDurable).toBeGreaterThanOrEqual(0);
    expect(clear).toBeGreaterThan(sbDurable);
  });

  test('degraded: events +1, writes end NEEDED, nothing is cleared and events_cleared stays; back: bitmap recovery', async () => {
    const r = await loaded(rig());
    r.bitmap.startWrite(2);
    await r.bitmap.unplug();
    r.bitmap.endWrite(2, true);
    await r.advance(4 * SLEEP_MS);
    const e0 = r.bitmap.events;
    expect(r.bitmap.eventsCleared).toBe(e0);

    r.bitmap.setDegraded(true);
    await r.bitmap.whenIdle();
    expect(await r.diskSuperblock()).toMatchObject({ events: e0 + 1n, eventsCleared: e0 });
    for (const c of [4, 7]) r.bitmap.startWrite(c);
    await r.bitmap.unplug();
    for (const c of [4, 7]) r.bitmap.endWrite(c, true);
    await r.advance(20 * SLEEP_MS, 1000);
    expect(await r.diskBit(4)).toBe(true);
    expect(await r.diskBit(7)).toBe(true);
    expect(r.bitmap.inSync(4)).toBe(false);
    expect(r.bitmap.eventsCleared).toBe(e0);
    // A resync while degraded does not count: the missing leg still lacks the chunk.
    expect(r.bitmap.takeResyncWork(0)).toBe(4);
    r.bitmap.endSync(4, false);
    expect(r.bitmap.inSync(4)).toBe(false);

    r.bitmap.setDegraded(false);
    expect(r.bitmap.lastReaddDecision).toBe('bitmap-recovery');
    expect(r.bitmap.events).toBe(e0 + 2n);
    const work: number[] = [];
    for (let c = r.bitmap.takeResyncWork(0); c !== undefined; c = r.bitmap.takeResyncWork(c + 1)) work.push(c);
    expect(work).toEqual([4, 7]);
    for (const c of work) r.bitmap.endSync(c, false);
    await r.advance(4 * SLEEP_MS);
    expect(await r.diskBit(4)).toBe(false);
    expect(await r.diskBit(7)).toBe(false);
    // events_cleared moves only with the next clean write.
    expect(r.bitmap.eventsCleared).toBe(e0);
    r.bitmap.startWrite(9);
    await r.bitmap.unplug();
    r.bitmap.endWrite(9, true);
    await r.advance(4 * SLEEP_MS);
    expect(await r.diskSuperblock()).toMatchObject({ events: e0 + 2n, eventsCleared: e0 + 2n });
  });
});

describe('md bitmap: re-add decisions', () => {
  test('the events rules: older than events_cleared → full, from events_cleared up to events → bitmap, else in sync', () => {
    const counts = { events: 9n, eventsCleared: 5n };
    expect(mdBitmapReaddDecision(0n, counts)).toBe('full-resync');
    expect(mdBitmapReaddDecision(4n, counts)).toBe('full-resync');
    expect(mdBitmapReaddDecision(5n, counts)).toBe('bitmap-recovery');
    expect(mdBitmapReaddDecision(8n, counts)).toBe('bitmap-recovery');
    expect(mdBitmapReaddDecision(9n, counts)).toBe('in-sync');
    expect(mdBitmapReaddDecision(10n, counts)).toBe('in-sync');
    // The kernel VM run: the failed leg at 0, events_cleared 0, events 5.
    expect(mdBitmapReaddDecision(0n, { events: 5n, eventsCleared: 0n })).toBe('bitmap-recovery');
  });

  async function withEvents(events: bigint, eventsCleared: bigint, dirty: number[]): Promise<Rig> {
    const r = rig({ chunks: 50 });
    const img = createMdBitmapImage({ syncSizeSectors: 400n, chunkSizeBytes: 4096, daemonSleepSeconds: SLEEP_S });
    img.fill(0, 256, 256 + 7);
    for (const c of dirty) img[256 + (c >> 3)] |= 1 << (c & 7);
    const sb = decodeMdBitmapSuperblock(img);
    img.set(encodeMdBitmapSuperblock({ ...sb, events, eventsCleared }), 0);
    await r.device.write(sectors(0), img);
    await r.bitmap.load('resync');
    // Every dirty bit is NEEDED after a load; a resync of all of them leaves the bitmap clean.
    for (let c = r.bitmap.takeResyncWork(0); c !== undefined; c = r.bitmap.takeResyncWork(c + 1)) r.bitmap.endSync(c, false);
    return r;
  }

  test('readd(full-resync) marks every chunk; readd(bitmap-recovery) the chunks whose bit is set; in-sync nothing', async () => {
    const full = await withEvents(10n, 6n, [3]);
    expect(full.bitmap.events).toBe(11n);
    expect(full.bitmap.readd(5n)).toBe('full-resync');
    expect(full.bitmap.counters.flaggedCount).toBe(50);
    await full.bitmap.unplug();
    for (const c of [0, 25, 49]) expect(await full.diskBit(c)).toBe(true);

    const part = await withEvents(10n, 6n, [3]);
    part.bitmap.startWrite(12);
    expect(part.bitmap.readd(6n)).toBe('bitmap-recovery');
    const needed: number[] = [];
    for (let c = 0; c < 50; c++) if (!part.bitmap.inSync(c)) needed.push(c);
    // 3 is still set (counting down after its resync), 12 has a write in flight.
    expect(needed).toEqual([3, 12]);

    const same = await withEvents(10n, 6n, [3]);
    expect(same.bitmap.readd(11n)).toBe('in-sync');
    expect(same.bitmap.counters.flaggedCount).toBe(0);
  });
});

describe('md bitmap: loads', () => {
  async function withImage(image: Uint8Array, initialSync: MdBitmapInitialSync): Promise<Rig> {
    const r = rig({ chunks: 100 });
    await r.device.write(sectors(0), image);
    await r.bitmap.load(initialSync);
    return r;
  }
  const mdadmMade = (): Uint8Array => createMdBitmapImage({ syncSizeSectors: 800n, chunkSizeBytes: 4096, daemonSleepSeconds: SLEEP_S });

  test('an mdadm-made bitmap (every bit set) resyncs everything; events 0 → 1', async () => {
    const r = await withImage(mdadmMade(), 'resync');
    expect(r.bitmap.counters.flaggedCount).toBe(100);
    expect(await r.diskSuperblock()).toMatchObject({ events: 1n, eventsCleared: 0n, state: 0 });
  });

  test('nosync clears every bit on disk; sync sets every bit', async () => {
    const clean = await withImage(mdadmMade(), 'nosync');
    expect(clean.bitmap.counters.flaggedCount).toBe(0);
    for (const c of [0, 50, 99]) expect(await clean.diskBit(c)).toBe(false);
    const img = mdadmMade();
    img.fill(0, 256, 256 + 13);
    const all = await withImage(img, 'sync');
    expect(all.bitmap.counters.flaggedCount).toBe(100);
    for (const c of [0, 50, 99]) expect(await all.diskBit(c)).toBe(true);
  });

  test('resync trusts the bits: set ones are NEEDED, clear ones in sync', async () => {
    const img = mdadmMade();
    img.fill(0, 256, 256 + 13);
    img[256] = 0b1000_0001;
    img[256 + 12] = 0b1000; // chunk 99
    const r = await withImage(img, 'resync');
    const needed: number[] = [];
    for (let c = 0; c < 100; c++) if (!r.bitmap.inSync(c)) needed.push(c);
    expect(needed).toEqual([0, 7, 99]);
  });

  test('a STALE bitmap is resynced whole and starts over with events_cleared = events; a blank device is a new bitmap', async () => {
    const img = mdadmMade();
    img.fill(0, 256, 256 + 13);
    const sb = decodeMdBitmapSuperblock(img);
    img.set(encodeMdBitmapSuperblock({ ...sb, state: MD_BITMAP_STATE_STALE, events: 20n, eventsCleared: 3n }), 0);
    const r = await withImage(img, 'resync');
    expect(r.bitmap.counters.flaggedCount).toBe(100);
    expect(await r.diskSuperblock()).toMatchObject({ events: 21n, eventsCleared: 21n, state: 0 });
    const blank = await withImage(new Uint8Array(512), 'resync');
    expect(blank.bitmap.counters.flaggedCount).toBe(100);
    expect(await blank.diskSuperblock()).toMatchObject({ magic: 0x6d746962, version: 4, events: 1n, eventsCleared: 1n, chunkSizeBytes: 4096, syncSizeSectors: 800n, daemonSleepSeconds: SLEEP_S });
  });

  test('a device that fails reads, writes or flushes fails the bitmap (status D / F): unplug rejects with DM_IO', async () => {
    const inner = new MemoryBlockDevice({ sizeSectors: sectors(64) });
    const mk = (device: FaultyBlockDevice): MdBitmap =>
      new MdBitmap({ device, label: 'bm', offsetSectors: sectors(0), syncSizeSectors: sectors(800), chunkSizeSectors: sectors(8), daemonSleepSeconds: SLEEP_S, clock: new SimulatedClock() });
    const reads = mk(new FaultyBlockDevice(inner, { errorRules: [{ op: 'read' }], closeInner: false }));
    await reads.load('resync');
    expect(reads.deviceFailed).toBe(true);
    await expect(reads.unplug()).rejects.toMatchObject({ code: 'DM_IO' });
    const writesDev = new FaultyBlockDevice(inner, { closeInner: false });
    const writes = mk(writesDev);
    await writes.load('nosync');
    writesDev.setErrorRules([{ op: 'write' }]);
    writes.startWrite(1);
    await expect(writes.unplug()).rejects.toMatchObject({ code: 'DM_IO' });
    expect(writes.deviceFailed).toBe(true);
    writesDev.setErrorRules([]);
    await expect(writes.unplug()).rejects.toMatchObject({ code: 'DM_IO' });
    const flushDev = new FaultyBlockDevice(inner, { closeInner: false, volatileCache: true });
    const flushes = mk(flushDev);
    await flushes.load('nosync');
    flushDev.setErrorRules([{ op: 'flush' }]);
    flushes.startWrite(1);
    await expect(flushes.unplug()).rejects.toMatchObject({ code: 'DM_IO' });
    expect(flushes.deviceFlushFailed).toBe(true);
  });

  test('after close nothing is written; unplug rejects with DM_CLOSED', async () => {
    const r = await loaded(rig());
    r.bitmap.startWrite(1);
    r.bitmap.close();
    await expect(r.bitmap.unplug()).rejects.toMatchObject({ code: 'DM_CLOSED' });
    await r.advance(5 * SLEEP_MS, 1000);
    expect(r.ops).toEqual([]);
  });
});

function padded(b: Uint8Array): Uint8Array {
  if (b.byteLength >= 256) return b;
  const o = new Uint8Array(256);
  o.set(b);
  return o;
}
