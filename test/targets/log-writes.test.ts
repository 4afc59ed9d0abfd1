/**
 * dm-log-writes: the on-disk format (against the kernel's struct layout, byte by byte), the target (what is
 * logged when, flush/FUA ordering, completion, marks, discards, status and table lines, a full log device, 4 KiB
 * blocks), and `dmstate replay-writes` (rebuild at each mark, checks at each flush, corrupt logs refused without
 * touching the device). The kernel round trip is test/kernel/log-writes-interop.test.ts.
 */
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, describe, expect, test } from 'vitest';
import { MemoryLevel } from 'memory-level';
import { BlockDevice, type BlockDeviceSupports } from '../../src/block/contract.js';
import { MemoryBlockDevice } from '../../src/block/memory-device.js';
import { bytes, sectors, type Sector } from '../../src/block/units.js';
import { Engine } from '../../src/core/engine.js';
import type { LevelDb } from '../../src/log/event-log.js';
import {
  decodeEntryBlock,
  decodeMarkName,
  decodeSuper,
  encodeEntryHeader,
  encodeMarkBlock,
  encodeSuper,
  entryLogBlocks,
  flagsToString,
  LOG_DISCARD_FLAG,
  LOG_FLUSH_FLAG,
  LOG_FUA_FLAG,
  LOG_MARK_FLAG,
  LogFormatError,
  markNameMaxBytes,
} from '../../src/targets/log-writes/format.js';
import { LogReader, type LogEntry } from '../../src/targets/log-writes/log-reader.js';
import { openReplayFile, planReplay, replayLog } from '../../src/targets/log-writes/replay.js';
import { runReplayWrites } from '../../src/frontends/cli/replay-writes.js';

const TMP = fs.mkdtempSync(path.join(os.tmpdir(), 'dmstate-lw-'));
afterAll(() => fs.rmSync(TMP, { recursive: true, force: true }));
let tmpN = 0;
const tmpFile = (name: string): string => path.join(TMP, `${tmpN++}-${name}`);

const md5 = (b: Uint8Array): string => createHash('md5').update(b).digest('hex');

/** Everything a test needs: an engine with `data` and `log` memory devices and a log-writes device `lw` over them. */
async function setup(opts: { dataSectors?: number; logSectors?: number; blockBytes?: number; data?: GatedDevice } = {}) {
  const blockBytes = opts.blockBytes ?? 512;
  const dataSectors = opts.dataSectors ?? 4096;
  const data = opts.data?.inner ?? new MemoryBlockDevice({ sizeSectors: sectors(dataSectors), logicalBlockSizeBytes: bytes(blockBytes), name: 'data' });
  const log = new MemoryBlockDevice({ sizeSectors: sectors(opts.logSectors ?? 16384), name: 'log' });
  const engine = await Engine.open({ db: new MemoryLevel() as unknown as LevelDb, backingDevices: { data: opts.data ?? data, log } });
  await engine.create('lw', { table: `0 ${dataSectors} log-writes data log` });
  const lw = engine.device('lw')!;
  return { engine, data, log, lw };
}

/** Parses a log held in memory with the reader (through a file, as the CLI does). */
function readLog(log: MemoryBlockDevice): { entries: LogEntry[]; nrEntries: number; blockBytes: number } {
  const file = tmpFile('log.img');
  fs.writeFileSync(file, log.snapshotBytes());
  const r = LogReader.open(file);
  try {
    return { entries: [...r.entries()], nrEntries: r.header.nrEntries, blockBytes: r.blockSizeBytes };
  } finally {
    r.close();
  }
}

/** A log as the kernel would hold it, with the super counting every entry (for reading while the device lives). */
function readAllEntries(log: MemoryBlockDevice, count: number): LogEntry[] {
  const bytesOf = log.snapshotBytes();
  encodeSuper({ nrEntries: count, blockSizeBytes: bytesOf.readUInt32LE(24) || 512 }).copy(bytesOf, 0);
  const file = tmpFile('log-all.img');
  fs.writeFileSync(file, bytesOf);
  const r = LogReader.open(file);
  try {
    return [...r.entries()];
  } finally {
    r.close();
  }
}

const summary = (e: LogEntry): string =>
  e.markName !== undefined ? `mark:${e.markName}` : `${flagsToString(e.flags)}@${e.sector}+${e.nrSectors}`;

const fill = (n: number, v: number): Buffer => Buffer.alloc(n * 512, v);

/** Wraps a device; writes to held sectors wait until released (to choose completion order). */
class GatedDevice extends BlockDevice {
  readonly name = 'gated';
  private readonly held = new Map<number, { release: () => void; gate: Promise<void> }>();
  constructor(readonly inner: MemoryBlockDevice) {
    super();
  }
  get sizeSectors(): Sector {
    return this.inner.sizeSectors;
  }
  get supports(): BlockDeviceSupports {
    return this.inner.supports;
  }
  hold(sector: number): void {
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    this.held.set(sector, { release, gate });
  }
  release(sector: number): void {
    this.held.get(sector)!.release();
    this.held.delete(sector);
  }
  protected _read(sector: Sector, buf: Uint8Array): Promise<void> {
    return this.inner.read(sector, buf);
  }
  protected async _write(sector: Sector, buf: Uint8Array, fua: boolean): Promise<void> {
    const h = this.held.get(sector);
    if (h) await h.gate;
    await this.inner.write(sector, buf, { fua });
  }
  protected override _discard(sector: Sector, lengthSectors: Sector): Promise<void> {
    return this.inner.discard(sector, lengthSectors);
  }
}

/** Lets pending promise callbacks run. */
const settle = async (): Promise<void> => {
  for (let i = 0; i < 20; i++) await new Promise((r) => setImmediate(r));
};

// ---- the format -------------------------------------------------------------------------------------------------

describe('format', () => {
  test('super block: the kernel struct layout, little-endian, zero-padded to a block', () => {
    const b = encodeSuper({ nrEntries: 0x0102030405, blockSizeBytes: 4096 });
    expect(b.byteLength).toBe(4096);
    // magic 0x6a736677736872 LE = "rhswfsj\0", version 1, nr_entries, sectorsize (struct log_write_super).
    expect(b.subarray(0, 28).toString('hex')).toBe('7268737766736a00' + '0100000000000000' + '0504030201000000' + '00100000');
    expect(b.subarray(28).every((x) => x === 0)).toBe(true);
    expect(decodeSuper(b)).toEqual({ nrEntries: 0x0102030405, blockSizeBytes: 4096 });
  });

  test('entry header and mark block round trip; marks are cut as the kernel cuts them', () => {
    const block = Buffer.alloc(512);
    encodeEntryHeader({ sector: 123456789, nrSectors: 8, flags: LOG_FUA_FLAG, dataLenBytes: 0 }, block);
    expect(block.subarray(0, 32).toString('hex')).toBe('15cd5b0700000000' + '0800000000000000' + '0200000000000000' + '0000000000000000');
    expect(decodeEntryBlock(block)).toEqual({ sector: 123456789, nrSectors: 8, flags: LOG_FUA_FLAG, dataLenBytes: 0 });
    expect(entryLogBlocks(decodeEntryBlock(block))).toBe(9);

    const m = encodeMarkBlock('après-fsync', 512);
    const h = decodeEntryBlock(m);
    expect(h).toEqual({ sector: 0, nrSectors: 0, flags: LOG_MARK_FLAG, dataLenBytes: Buffer.byteLength('après-fsync') });
    expect(decodeMarkName(h, m)).toBe('après-fsync');
    // kstrndup(name, sectorsize - 32 - 1): 479 bytes at most in a 512-byte block; a NUL ends the name.
    const long = encodeMarkBlock('x'.repeat(1000), 512);
    expect(decodeEntryBlock(long).dataLenBytes).toBe(markNameMaxBytes(512));
    expect(markNameMaxBytes(512)).toBe(479);
    expect(long[511]).toBe(0);
    expect(decodeMarkName(decodeEntryBlock(encodeMarkBlock('ab\0cd', 512)), encodeMarkBlock('ab\0cd', 512))).toBe('ab');
    expect(flagsToString(LOG_FLUSH_FLAG | LOG_FUA_FLAG)).toBe('FLUSH|FUA');
    expect(flagsToString(0)).toBe('NONE');
    expect(flagsToString(LOG_DISCARD_FLAG | 0x40)).toBe('DISCARD|UNKNOWN.0x40');
  });

  test('bad supers and malformed entries are refused with the reason', () => {
    const good = encodeSuper({ nrEntries: 1, blockSizeBytes: 512 });
    const bad = (mutate: (b: Buffer) => void): Buffer => {
      const b = Buffer.from(good);
      mutate(b);
      return b;
    };
    expect(() => decodeSuper(good.subarray(0, 20))).toThrow(/shorter than its super block/);
    expect(() => decodeSuper(bad((b) => b.writeUInt8(0x73, 0)))).toThrow(/not a dm-log-writes log: magic/);
    expect(() => decodeSuper(bad((b) => b.writeUInt8(2, 8)))).toThrow(/version 2 is not supported/);
    expect(() => decodeSuper(bad((b) => b.writeUInt32LE(1000, 24)))).toThrow(/block size 1000/);
    expect(() => decodeSuper(bad((b) => b.writeUInt32LE(0, 24)))).toThrow(LogFormatError);
    expect(() => decodeSuper(bad((b) => b.writeBigUInt64LE(1n << 60n, 16)))).toThrow(/larger than any real log/);

    expect(() => decodeEntryBlock(Buffer.alloc(512))).toThrow(/empty entry/);
    const padded = Buffer.alloc(512);
    encodeEntryHeader({ sector: 1, nrSectors: 1, flags: 0, dataLenBytes: 0 }, padded);
    padded[32] = 1;
    expect(() => decodeEntryBlock(padded)).toThrow(/not zero-padded/);
    const mark = Buffer.alloc(512);
    encodeEntryHeader({ sector: 0, nrSectors: 0, flags: LOG_MARK_FLAG, dataLenBytes: 500 }, mark);
    expect(() => decodeEntryBlock(mark)).toThrow(/does not fit/);
    const flags = Buffer.alloc(512);
    encodeEntryHeader({ sector: 0, nrSectors: 1, flags: 2 ** 40, dataLenBytes: 0 }, flags);
    expect(() => decodeEntryBlock(flags)).toThrow(/not dm-log-writes flags/);
  });
});

// ---- the target -------------------------------------------------------------------------------------------------

describe('log-writes target', () => {
  test('table and status lines; writes are logged at the flush after them, the super at FUA and marks', async () => {
    const { engine, data, log, lw } = await setup();
    expect(engine.table('lw')).toEqual(['0 4096 log-writes data log']);
    expect(engine.status('lw')).toEqual(['0 4096 log-writes 0 0']);

    await lw.write(sectors(8), fill(8, 0xa1));
    await lw.write(sectors(48), fill(16, 0xa2));
    // Completed but not flushed: nothing in the log yet (the log shows what is durable).
    expect(engine.status('lw')).toEqual(['0 4096 log-writes 0 0']);
    expect(log.snapshotBytes().every((x) => x === 0)).toBe(true);
    expect(data.snapshotBytes().subarray(8 * 512, 16 * 512).every((x) => x === 0xa1)).toBe(true);

    await lw.flush();
    // 1 + (1 + 8) + (1 + 16) + 1 sectors used: next_sector 28, status prints next_sector - 1.
    expect(engine.status('lw')).toEqual(['0 4096 log-writes 3 27']);
    // A flush does not rewrite the super (the kernel does that after FUA and mark entries only).
    expect(log.snapshotBytes().subarray(0, 512).every((x) => x === 0)).toBe(true);

    await engine.message('lw', 0, ['mark', 'one']);
    expect(engine.status('lw')).toEqual(['0 4096 log-writes 4 28']);
    expect(readLog(log).nrEntries).toBe(4);

    await lw.write(sectors(100), fill(2, 0xa3), { fua: true });
    expect(readLog(log).nrEntries).toBe(5); // the FUA write completed: its entry and the super are written
    await lw.discard(sectors(128), sectors(64));
    await lw.flush();
    expect(data.snapshotBytes().subarray(128 * 512, 192 * 512).every((x) => x === 0)).toBe(true);

    const all = readAllEntries(log, 7).map(summary);
    expect(all).toEqual(['NONE@8+8', 'NONE@48+16', 'FLUSH@0+0', 'mark:one', 'FUA@100+2', 'DISCARD@128+64', 'FLUSH@0+0']);
    const entries = readAllEntries(log, 7);
    // Data follows its entry block; a discard has none.
    const lb = log.snapshotBytes();
    expect(lb.subarray(entries[0].logOffsetBytes + 512, entries[0].logOffsetBytes + 512 + 8 * 512).every((x) => x === 0xa1)).toBe(true);
    expect(entries[6].logOffsetBytes - entries[5].logOffsetBytes).toBe(512);

    // Unflushed writes and the end mark are logged when the table goes away; the super then counts them all.
    await lw.write(sectors(300), fill(1, 0xa4));
    await engine.remove('lw');
    const final = readLog(log);
    expect(final.nrEntries).toBe(9);
    expect(final.entries.slice(7).map(summary)).toEqual(['NONE@300+1', 'mark:dm-log-writes-end']);
    await engine.close();
  });

  test('flush and FUA ordering as the kernel: a flush takes the writes completed when it is submitted', async () => {
    const inner = new MemoryBlockDevice({ sizeSectors: sectors(4096), name: 'inner' });
    const gated = new GatedDevice(inner);
    const { engine, log, lw } = await setup({ data: gated });
    // Wa, Wb, Wc, Cc, Ca, FLUSH, FUAd, Cb, CFLUSH, CFUAd (the kernel's example).
    gated.hold(0);
    gated.hold(8);
    const a = lw.write(sectors(0), fill(1, 1));
    gated.hold(16);
    const b = lw.write(sectors(8), fill(1, 2));
    const c = lw.write(sectors(16), fill(1, 3));
    gated.release(16);
    await c;
    gated.release(0);
    await a;
    const flush = lw.flush();
    gated.hold(24);
    const d = lw.write(sectors(24), fill(1, 4), { fua: true });
    gated.release(8);
    await b;
    await flush;
    gated.release(24);
    await d;
    await lw.flush();
    // b completed after the flush was submitted: the next flush logs it.
    expect(readAllEntries(log, 6).map(summary)).toEqual(['NONE@16+1', 'NONE@0+1', 'FLUSH@0+0', 'FUA@24+1', 'NONE@8+1', 'FLUSH@0+0']);
    await engine.close();
  });

  test('a FUA write or flush completes only once its entries are on the log device', async () => {
    const { engine, log, lw } = await setup();
    const slowLog = log as MemoryBlockDevice & { write: BlockDevice['write'] };
    const realWrite = slowLog.write.bind(slowLog);
    let logWritesInFlight = 0;
    // Delay every log write by a few turns of the event loop.
    slowLog.write = (sector, buf, o) => {
      logWritesInFlight++;
      return settle().then(() => realWrite(sector, buf, o)).finally(() => logWritesInFlight--);
    };
    await lw.write(sectors(0), fill(4, 7));
    await lw.flush();
    expect(logWritesInFlight).toBe(0);
    expect(readAllEntries(log, 2).map(summary)).toEqual(['NONE@0+4', 'FLUSH@0+0']);
    await lw.write(sectors(40), fill(1, 8), { fua: true });
    expect(logWritesInFlight).toBe(0);
    expect(readLog(log).entries.map(summary)).toEqual(['NONE@0+4', 'FLUSH@0+0', 'FUA@40+1']);
    await engine.close();
  });

  test('mark messages: case-insensitive, two arguments, truncated to a block; other messages refused', async () => {
    const { engine, log } = await setup();
    await engine.message('lw', 0, ['MARK', 'upper']);
    await engine.message('lw', 0, ['mark', 'm'.repeat(600)]);
    await expect(engine.message('lw', 0, ['mark', 'a', 'b'])).rejects.toMatchObject({ code: 'DM_INVALID_ARGUMENT' });
    await expect(engine.message('lw', 0, ['foo', 'bar'])).rejects.toMatchObject({ code: 'DM_UNKNOWN_COMMAND' });
    await expect(engine.message('lw', 0, ['foo'])).rejects.toMatchObject({ code: 'DM_INVALID_ARGUMENT' });
    const { entries } = readLog(log);
    expect(entries.map((e) => e.markName)).toEqual(['upper', 'm'.repeat(479)]);
    await engine.close();
  });

  test('a full log device turns logging off; I/O goes on', async () => {
    // 64 sectors of log: super + a few entries.
    const { engine, data, lw } = await setup({ logSectors: 64 });
    await lw.write(sectors(0), fill(30, 1));
    await lw.flush();
    expect(engine.status('lw')).toEqual(['0 4096 log-writes 2 32']);
    await lw.write(sectors(100), fill(40, 2));
    await lw.flush(); // the 41-sector entry does not fit
    expect(engine.status('lw')[0]).toMatch(/ logging_disabled$/);
    await lw.write(sectors(200), fill(1, 3), { fua: true });
    expect(data.snapshotBytes()[200 * 512]).toBe(3);
    await engine.close();
  });

  test('4 KiB logical blocks: entries, sectors and marks in 4 KiB units', async () => {
    const { engine, log, lw } = await setup({ blockBytes: 4096, dataSectors: 4096 });
    await lw.write(sectors(16), fill(16, 5));
    await lw.flush();
    await engine.message('lw', 0, ['mark', 'k']);
    await expect(lw.write(sectors(1), fill(1, 1))).rejects.toBeDefined();
    const { entries, blockBytes, nrEntries } = readLog(log);
    expect(blockBytes).toBe(4096);
    expect(nrEntries).toBe(3);
    expect(entries.map(summary)).toEqual(['NONE@2+2', 'FLUSH@0+0', 'mark:k']);
    expect(entries.map((e) => e.logOffsetBytes)).toEqual([4096, 4096 * 4, 4096 * 5]);
    // next_sector in 512-byte sectors: 8 (super) + 8 + 16 + 8 + 8.
    expect(engine.status('lw')).toEqual(['0 4096 log-writes 3 47']);
    await engine.close();
  });
});

// ---- replay -----------------------------------------------------------------------------------------------------

/** mulberry32 */
function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

const DATA_SECTORS = 2048;

interface Recorded {
  logFile: string;
  /** Content of the data device at each mark (each mark follows a flush, so it is all durable). */
  atMark: Map<string, string>;
  /** md5 of the durable content after each flush, in order (what a check at each flush must see). */
  atFlush: string[];
  /** Flush entries in the log. */
  flushes: number;
}

/**
 * A seeded workload on a log-writes device: writes (some FUA), discards, flushes, marks after flushes, and some
 * writes left in flight across a flush. Records what the data device holds at each mark and after each flush.
 */
async function recordWorkload(seed: number): Promise<Recorded> {
  const r = rng(seed);
  const int = (n: number): number => Math.floor(r() * n);
  const { engine, data, log, lw } = await setup({ dataSectors: DATA_SECTORS, logSectors: 65536 });
  // The durable model: writes enter it when a flush logs them (or at once for FUA).
  const durable = Buffer.alloc(DATA_SECTORS * 512);
  let unflushed: Array<() => void> = [];
  const atMark = new Map<string, string>();
  const atFlush: string[] = [];
  let flushes = 0;
  for (let step = 0; step < 120; step++) {
    const k = r();
    if (k < 0.55) {
      const n = 1 + int(64);
      const s = int(DATA_SECTORS - n);
      const buf = Buffer.alloc(n * 512);
      for (let i = 0; i < buf.length; i += 4) buf.writeUInt32LE((r() * 2 ** 32) >>> 0, i);
      const fua = r() < 0.15;
      await lw.write(sectors(s), buf, { fua });
      const apply = (): void => void buf.copy(durable, s * 512);
      if (fua) apply();
      else unflushed.push(apply);
    } else if (k < 0.65) {
      const n = 1 + int(128);
      const s = int(DATA_SECTORS - n);
      await lw.discard(sectors(s), sectors(n));
      unflushed.push(() => void durable.fill(0, s * 512, (s + n) * 512));
    } else if (k < 0.85) {
      await lw.flush();
      for (const f of unflushed) f();
      unflushed = [];
      flushes++;
      atFlush.push(md5(durable));
      expect(md5(data.snapshotBytes())).toBe(md5(durable));
    } else {
      await lw.flush();
      for (const f of unflushed) f();
      unflushed = [];
      flushes++;
      atFlush.push(md5(durable));
      const name = `m${step}`;
      await engine.message('lw', 0, ['mark', name]);
      atMark.set(name, md5(data.snapshotBytes()));
      expect(atMark.get(name)).toBe(md5(durable));
    }
  }
  await engine.remove('lw');
  const logFile = tmpFile(`workload-${seed}.log`);
  fs.writeFileSync(logFile, log.snapshotBytes());
  await engine.close();
  return { logFile, atMark, atFlush, flushes };
}

function freshDevice(): string {
  const f = tmpFile('replay.img');
  fs.writeFileSync(f, Buffer.alloc(DATA_SECTORS * 512));
  return f;
}

/** Collects what the CLI prints. */
function captureIo() {
  const out = { stdout: '', stderr: '' };
  return {
    out,
    io: {
      stdout: { write: (s: string) => (out.stdout += s) },
      stderr: { write: (s: string) => (out.stderr += s) },
      env: process.env,
    },
  };
}

describe('replay', () => {
  let rec: Recorded;

  test('replaying to each mark rebuilds the device as it was at that mark', async () => {
    rec = await recordWorkload(0x10_6001);
    expect(rec.atMark.size).toBeGreaterThan(3);
    const reader = LogReader.open(rec.logFile);
    try {
      for (const [mark, want] of rec.atMark) {
        const dev = freshDevice();
        const target = openReplayFile(dev);
        const plan = planReplay(reader, { endMark: mark }, target.sizeBytes);
        await replayLog(reader, target, plan);
        target.close();
        expect(md5(fs.readFileSync(dev)), `at mark ${mark}`).toBe(want);
      }
    } finally {
      reader.close();
    }
  });

  test('CLI: --end-mark, --start-mark on a device rebuilt to the earlier mark, --limit, --verbose', async () => {
    const marks = [...rec.atMark.keys()];
    const dev = freshDevice();
    const c1 = captureIo();
    expect(await runReplayWrites([rec.logFile, '--to-device', dev, '--end-mark', marks[1]], c1.io)).toBe(0);
    expect(md5(fs.readFileSync(dev))).toBe(rec.atMark.get(marks[1]));
    expect(c1.out.stderr).toMatch(new RegExp(`stopped at mark "${marks[1]}"`));
    // From that mark on to a later one, on the same device.
    const c2 = captureIo();
    expect(await runReplayWrites([rec.logFile, '--to-device', dev, '--start-mark', marks[1], '--end-mark', marks[3], '-v'], c2.io)).toBe(0);
    expect(md5(fs.readFileSync(dev))).toBe(rec.atMark.get(marks[3]));
    const listed = c2.out.stdout.trim().split('\n');
    expect(listed[0]).toMatch(/^replaying \d+@\d+: sector \d+, size \d+, flags 0x[0-9a-f]+\(/);
    expect(listed[listed.length - 1]).toMatch(new RegExp(`flags 0x8\\(MARK\\) mark "${marks[3]}"$`));
    // --limit N applies exactly N entries.
    const c3 = captureIo();
    expect(await runReplayWrites([rec.logFile, '--to-device', freshDevice(), '--limit', '5', '-v'], c3.io)).toBe(0);
    expect(c3.out.stdout.trim().split('\n')).toHaveLength(5);
    // No device: what the log holds.
    const c4 = captureIo();
    expect(await runReplayWrites([rec.logFile], c4.io)).toBe(0);
    expect(c4.out.stdout).toMatch(/^Log version=1, sectorsize=512, entries=\d+\n/);
  });

  test('CLI: --check at every flush sees the durable content of each flush; a failing check stops there', async () => {
    const sums = tmpFile('sums.txt');
    const c = captureIo();
    const code = await runReplayWrites(
      [rec.logFile, '--to-device', freshDevice(), '--check', `md5sum "$1" | cut -d' ' -f1 >> ${sums}; test -n "$DMSTATE_REPLAY_ENTRY"`, '--every', 'flush'],
      c.io,
    );
    expect(code, c.out.stderr).toBe(0);
    const seen = fs.readFileSync(sums, 'utf8').trim().split('\n');
    expect(seen).toHaveLength(rec.flushes);
    expect(seen).toEqual(rec.atFlush);
    expect(c.out.stderr).toMatch(new RegExp(`${rec.flushes} checks run`));

    // A check that fails at its third run: exit 1, the entry named, the device as rebuilt through that entry.
    const counter = tmpFile('count');
    fs.writeFileSync(counter, '');
    const dev = freshDevice();
    const f = captureIo();
    const failing = `echo x >> ${counter}; [ $(wc -l < ${counter}) -lt 3 ]`;
    expect(await runReplayWrites([rec.logFile, '--to-device', dev, '--check', failing, '--every', 'flush'], f.io)).toBe(1);
    const m = /check failed at entry (\d+) \(exit code 1\)/.exec(f.out.stderr);
    expect(m, f.out.stderr).not.toBeNull();
    expect(md5(fs.readFileSync(dev))).toBe(rec.atFlush[2]);
    const reader = LogReader.open(rec.logFile);
    const flushIdx = [...reader.entries()].filter((e) => (e.flags & LOG_FLUSH_FLAG) !== 0).map((e) => e.index);
    reader.close();
    expect(Number(m![1])).toBe(flushIdx[2]);

    // --every N runs the check after every N entries.
    const n = tmpFile('n.txt');
    expect(await runReplayWrites([rec.logFile, '--to-device', freshDevice(), '--limit', '10', '--check', `echo $DMSTATE_REPLAY_ENTRY >> ${n}`, '--every', '3'], captureIo().io)).toBe(0);
    expect(fs.readFileSync(n, 'utf8').trim().split('\n')).toEqual(['2', '5', '8']);
  });

  test('corrupt, short or mismatched logs are refused and the device is left untouched', async () => {
    const good = fs.readFileSync(rec.logFile);
    const reader = LogReader.open(rec.logFile);
    const entries = [...reader.entries()];
    reader.close();
    const lastMark = [...rec.atMark.keys()].pop()!;
    const cases: Array<{ name: string; log: Buffer; args?: string[]; error: RegExp }> = [
      { name: 'bad magic', log: Buffer.concat([Buffer.from('not a log'), good.subarray(9)]), error: /not a dm-log-writes log/ },
      { name: 'empty file', log: Buffer.alloc(0), error: /shorter than its super block/ },
      { name: 'cut in the middle', log: good.subarray(0, entries[entries.length - 3].logOffsetBytes + 100), error: /short log: entry \d+ of \d+/ },
      {
        name: 'data cut short',
        log: good.subarray(0, entries.find((e) => e.nrSectors > 4 && (e.flags & LOG_DISCARD_FLAG) === 0)!.logOffsetBytes + 1024),
        error: /short log: the data of entry/,
      },
      {
        name: 'super counts more entries than the log holds',
        log: (() => {
          const b = Buffer.concat([good, Buffer.alloc(8192)]);
          b.writeBigUInt64LE(BigInt(entries.length + 1), 16);
          return b;
        })(),
        error: new RegExp(`malformed entry ${entries.length} of ${entries.length + 1} .*empty entry`),
      },
      {
        name: 'garbage in an entry block',
        log: (() => {
          const b = Buffer.from(good);
          b[entries.find((e) => e.index >= 5 && e.markName === undefined)!.logOffsetBytes + 32] = 0xff;
          return b;
        })(),
        error: /malformed entry \d+ of .*not zero-padded/,
      },
      { name: 'missing end mark', log: good, args: ['--end-mark', 'nope'], error: /end mark "nope" is not in the log/ },
      { name: 'missing start mark', log: good, args: ['--start-mark', 'nope'], error: /start mark "nope" is not in the log/ },
      { name: 'start entry past the end', log: good, args: ['--start-entry', '100000'], error: /start entry 100000 is not in the log/ },
      { name: 'replay device too small', log: good, args: ['--end-mark', lastMark, '--small'], error: /past the end of the replay device/ },
    ];
    for (const c of cases) {
      const logFile = tmpFile('bad.log');
      fs.writeFileSync(logFile, c.log);
      const small = c.args?.includes('--small');
      const dev = tmpFile('untouched.img');
      const before = Buffer.alloc(small ? 64 * 512 : DATA_SECTORS * 512, 0x5a);
      fs.writeFileSync(dev, before);
      const io = captureIo();
      const args = [logFile, '--to-device', dev, ...(c.args ?? []).filter((a) => a !== '--small')];
      expect(await runReplayWrites(args, io.io), c.name).toBe(1);
      expect(io.out.stderr, c.name).toMatch(c.error);
      expect(md5(fs.readFileSync(dev)), `${c.name}: device unchanged`).toBe(md5(before));
    }
  });

  test('`dmstate replay-writes` is a command of the CLI; a missing replay device is an error', async () => {
    const { main } = await import('../../src/frontends/cli/main.js');
    const write = process.stdout.write;
    let printed = '';
    process.stdout.write = ((s: string) => ((printed += s), true)) as typeof process.stdout.write;
    try {
      expect(await main(['replay-writes', rec.logFile])).toBe(0);
    } finally {
      process.stdout.write = write;
    }
    expect(printed).toMatch(/^Log version=1, sectorsize=512, entries=\d+/);
    const io = captureIo();
    expect(await runReplayWrites([rec.logFile, '--to-device', path.join(TMP, 'nope.img')], io.io)).toBe(1);
    expect(io.out.stderr).toMatch(/cannot open replay device .*nope\.img: ENOENT/);
  });

  test('CLI usage errors exit 2', async () => {
    for (const args of [[], ['a', 'b'], [rec.logFile, '--check', 'true'], [rec.logFile, '--every', 'flush', '--check', 'x'], [rec.logFile, '--bogus'], [rec.logFile, '--limit', 'x'], [rec.logFile, '--every', '0', '--check', 'true', '--to-device', 'd']]) {
      const io = captureIo();
      expect(await runReplayWrites(args, io.io), args.join(' ')).toBe(2);
      expect(io.out.stderr).toMatch(/usage: dmstate replay-writes/);
    }
  });
});
