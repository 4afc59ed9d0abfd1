import { describe, expect, test } from 'vitest';
import { createActor } from 'xstate';
import { kcopydJobMachine, kcopydPieceMachine } from '../../machines/kcopyd.js';
import { BlockDevice, type BlockDeviceSupports } from '../../src/block/contract.js';
import { FaultyBlockDevice } from '../../src/block/faulty-device.js';
import { MemoryBlockDevice } from '../../src/block/memory-device.js';
import { bytes, sectors, sectorsToBytes, type Bytes, type Sector } from '../../src/block/units.js';
import { SimulatedClock } from '../../src/core/clock.js';
import { DmError } from '../../src/core/errors.js';
import {
  KCOPYD_JOB_EVENT,
  KCOPYD_JOB_MACHINE,
  KCOPYD_JOB_STATE,
  KCOPYD_PIECE_MACHINE,
  KCOPYD_PIECE_STATE,
  KCOPYD_SEGMENTS_MAX,
  KcopydClient,
  type KcopydObserver,
  type KcopydRegion,
  type KcopydSegment,
} from '../../src/kcopyd/kcopyd.js';
import { EventLog } from '../../src/log/event-log.js';
import type { LoggedEvent } from '../../src/log/events.js';

const PIECE_SECTORS = 1024; // the default sub-job size
/** Several MiB and not a multiple of the piece size: 10 whole pieces and one of 37 sectors. */
const LENGTH_SECTORS = sectors(10 * PIECE_SECTORS + 37);
const PIECE_COUNT = 11;
const SRC_SECTOR = sectors(8);
const DST_SECTOR = sectors(24);
const DEVICE_SECTORS = sectors(LENGTH_SECTORS + 64);

/** A device filled with a deterministic non-zero pattern (xorshift32 per 32-bit word). */
async function patternDevice(sizeSectors: Sector, seed: number): Promise<MemoryBlockDevice> {
  const dev = new MemoryBlockDevice({ sizeSectors, name: `src${seed}` });
  const buf = Buffer.alloc(sectorsToBytes(sizeSectors));
  let x = seed >>> 0 || 1;
  for (let i = 0; i < buf.length; i += 4) {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    buf.writeUInt32LE(x, i);
  }
  await dev.write(sectors(0), buf);
  return dev;
}

const bytesOf = (dev: MemoryBlockDevice, sector: number, lengthSectors: number): Buffer =>
  dev.snapshotBytes().subarray(sector * 512, (sector + lengthSectors) * 512);

const isZero = (b: Buffer): boolean => b.every((v) => v === 0);

const memDevices = (count: number, sizeSectors = DEVICE_SECTORS): MemoryBlockDevice[] =>
  Array.from({ length: count }, (_, i) => new MemoryBlockDevice({ sizeSectors, name: `dst${i}` }));

const region = (device: BlockDevice, sector: Sector, lengthSectors: Sector = LENGTH_SECTORS): KcopydRegion => ({ device, sector, lengthSectors });

const tick = (): Promise<void> => new Promise((resolve) => setImmediate(resolve));

/** Counts I/Os in flight across every device sharing `counter`; each I/O waits `delayTicks` event-loop turns. */
interface IoCounter {
  active: number;
  activeMax: number;
}
class SlowDevice extends BlockDevice {
  readonly supports: BlockDeviceSupports = { flush: false, discard: false, fua: true, holes: false };
  readonly sizeSectors: Sector;
  override readonly logicalBlockSizeBytes: Bytes;
  readonly name: string;
  constructor(readonly inner: BlockDevice, readonly counter: IoCounter, readonly delayTicks = 1) {
    super();
    this.sizeSectors = inner.sizeSectors;
    this.logicalBlockSizeBytes = inner.logicalBlockSizeBytes;
    this.name = `slow(${inner.name})`;
  }
  private async io(run: () => Promise<void>): Promise<void> {
    this.counter.active++;
    this.counter.activeMax = Math.max(this.counter.activeMax, this.counter.active);
    try {
      for (let i = 0; i < this.delayTicks; i++) await tick();
      await run();
    } finally {
      this.counter.active--;
    }
  }
  protected _read(sector: Sector, buf: Uint8Array): Promise<void> {
    return this.io(() => this.inner.read(sector, buf));
  }
  protected _write(sector: Sector, buf: Uint8Array): Promise<void> {
    return this.io(() => this.inner.write(sector, buf));
  }
}

interface Transition {
  kind: 'job' | 'piece';
  id: number;
  jobId: number;
  from: string;
  event: string;
  to: string;
}
function recorder(): { transitions: Transition[]; observer: KcopydObserver } {
  const transitions: Transition[] = [];
  const observer: KcopydObserver = (kind, id, from, eventIndex, to, jobId) => {
    const m = kind === 'job' ? KCOPYD_JOB_MACHINE : KCOPYD_PIECE_MACHINE;
    transitions.push({ kind, id, jobId, from: m.stateNames[from], event: m.eventNames[eventIndex], to: m.stateNames[to] });
  };
  return { transitions, observer };
}

function expectCode(fn: () => unknown, code: string): void {
  let caught: unknown;
  try {
    fn();
  } catch (err) {
    caught = err;
  }
  expect(caught).toBeInstanceOf(DmError);
  expect((caught as DmError).code).toBe(code);
}

describe('KcopydClient copy', () => {
  test.each([1, 3, 8])('copies a 5 MiB region to %i destination(s), contents verified', async (destinationCount) => {
    const src = await patternDevice(DEVICE_SECTORS, 7);
    const dsts = memDevices(destinationCount);
    const kc = new KcopydClient();
    const result = await kc.copyAsync(region(src, SRC_SECTOR), dsts.map((d) => region(d, DST_SECTOR)));
    expect(result).toEqual({ readError: false, writeErrorMask: 0 });
    const expected = bytesOf(src, SRC_SECTOR, LENGTH_SECTORS);
    expect(isZero(expected)).toBe(false);
    for (const d of dsts) {
      expect(bytesOf(d, DST_SECTOR, LENGTH_SECTORS).equals(expected)).toBe(true);
      // Nothing outside the destination region.
      expect(isZero(bytesOf(d, 0, DST_SECTOR))).toBe(true);
      expect(isZero(bytesOf(d, DST_SECTOR + LENGTH_SECTORS, DEVICE_SECTORS - DST_SECTOR - LENGTH_SECTORS))).toBe(true);
    }
    expect(kc.jobsInFlightCount).toBe(0);
    expect(kc.piecesInFlightCount).toBe(0);
    expect(kc.buffersFreeCount).toBe(kc.bufferPoolPieces);
    await kc.close();
  });

  test('rejects 0 or 9 destinations, mismatched lengths, regions past the end, and a closed client', async () => {
    const src = await patternDevice(sectors(2048), 1);
    const dsts = memDevices(9, sectors(2048));
    const kc = new KcopydClient();
    const done = (): void => {
      throw new Error('callback of a rejected job ran');
    };
    const len = sectors(100);
    expectCode(() => kc.copy(region(src, sectors(0), len), dsts.map((d) => region(d, sectors(0), len)), {}, done), 'DM_INVALID_ARGUMENT');
    expectCode(() => kc.copy(region(src, sectors(0), len), [], {}, done), 'DM_INVALID_ARGUMENT');
    expectCode(() => kc.zero(dsts.map((d) => region(d, sectors(0), len)), {}, done), 'DM_INVALID_ARGUMENT');
    expectCode(() => kc.copy(region(src, sectors(0), len), [region(dsts[0], sectors(0), sectors(99))], {}, done), 'DM_INVALID_ARGUMENT');
    expectCode(() => kc.copy(region(src, sectors(2000), len), [region(dsts[0], sectors(0), len)], {}, done), 'DM_IO_RANGE');
    expectCode(() => kc.copy(region(src, sectors(0), len), [region(dsts[0], sectors(1990), len)], {}, done), 'DM_IO_RANGE');
    await expect(kc.copyAsync(region(src, sectors(0), len), dsts.map((d) => region(d, sectors(0), len)))).rejects.toMatchObject({ code: 'DM_INVALID_ARGUMENT' });
    expect(kc.jobsInFlightCount).toBe(0);
    expect(isZero(dsts[0].snapshotBytes())).toBe(true);
    await kc.close();
    expectCode(() => kc.copy(region(src, sectors(0), len), [region(dsts[0], sectors(0), len)], {}, done), 'DM_CLOSED');
    // 8 destinations is the limit, not past it.
    const kc2 = new KcopydClient();
    await expect(kc2.copyAsync(region(src, sectors(0), len), dsts.slice(0, 8).map((d) => region(d, sectors(0), len)))).resolves.toEqual({ readError: false, writeErrorMask: 0 });
  });

  test('rejects invalid client options', () => {
    expectCode(() => new KcopydClient({ subJobSizeSectors: sectors(0) }), 'DM_INVALID_ARGUMENT');
    expectCode(() => new KcopydClient({ piecesInFlightPerJobMax: 0 }), 'DM_INVALID_ARGUMENT');
    expectCode(() => new KcopydClient({ bufferPoolPieces: 1.5 }), 'DM_INVALID_ARGUMENT');
  });

  test('zero() writes zeroes to every destination, only inside the region, without pool buffers', async () => {
    const dsts = [await patternDevice(DEVICE_SECTORS, 3), await patternDevice(DEVICE_SECTORS, 4)];
    const before = dsts.map((d) => d.snapshotBytes());
    const { transitions, observer } = recorder();
    const kc = new KcopydClient({ observer, bufferPoolPieces: 1 });
    const result = await kc.zeroAsync(dsts.map((d) => region(d, DST_SECTOR)));
    expect(result).toEqual({ readError: false, writeErrorMask: 0 });
    for (let i = 0; i < dsts.length; i++) {
      const after = dsts[i].snapshotBytes();
      expect(isZero(bytesOf(dsts[i], DST_SECTOR, LENGTH_SECTORS))).toBe(true);
      expect(after.subarray(0, DST_SECTOR * 512).equals(before[i].subarray(0, DST_SECTOR * 512))).toBe(true);
      const endBytes = (DST_SECTOR + LENGTH_SECTORS) * 512;
      expect(after.subarray(endBytes).equals(before[i].subarray(endBytes))).toBe(true);
      expect(isZero(after.subarray(endBytes))).toBe(false);
    }
    const pieces = transitions.filter((t) => t.kind === 'piece');
    expect(pieces.length).toBe(PIECE_COUNT * 2);
    expect(pieces.filter((t) => t.from === 'START').every((t) => t.event === 'ZERO' && t.to === 'WRITING')).toBe(true);
    // A zero job never takes a pool buffer.
    expect(kc.buffersFreeCount).toBe(1);
  });

  test('a read error sets readError, stops new pieces, and never writes the failed piece', async () => {
    const inner = await patternDevice(DEVICE_SECTORS, 11);
    const failedIndex = 3;
    const failedStart = SRC_SECTOR + failedIndex * PIECE_SECTORS;
    const src = new FaultyBlockDevice(inner, { errorRules: [{ op: 'read', startSector: sectors(failedStart), endSector: sectors(failedStart + PIECE_SECTORS) }] });
    const dst = memDevices(1)[0];
    const kc = new KcopydClient({ piecesInFlightPerJobMax: 2 });
    let job!: ReturnType<KcopydClient['copy']>;
    const result = await new Promise((resolve) => {
      job = kc.copy(region(src, SRC_SECTOR), [region(dst, DST_SECTOR)], {}, (readError, writeErrorMask) => resolve({ readError, writeErrorMask }));
    });
    expect(result).toEqual({ readError: true, writeErrorMask: 0 });
    const expected = bytesOf(inner, SRC_SECTOR, LENGTH_SECTORS);
    const pieceBytes = PIECE_SECTORS * 512;
    const got = bytesOf(dst, DST_SECTOR, LENGTH_SECTORS);
    // Every piece before the failed one was started and lands; the failed one is never written.
    expect(got.subarray(0, failedIndex * pieceBytes).equals(expected.subarray(0, failedIndex * pieceBytes))).toBe(true);
    expect(isZero(got.subarray(failedIndex * pieceBytes, (failedIndex + 1) * pieceBytes))).toBe(true);
    // No piece starts after the error: at most the pieces in flight with the failed one (2 per job here).
    expect(job.nextPieceIndex).toBeLessThanOrEqual(failedIndex + 2);
    expect(isZero(got.subarray((failedIndex + 2) * pieceBytes))).toBe(true);
    expect(job.stateName).toBe('COMPLETE');
  });

  test('a read error with ignoreError copies every other piece', async () => {
    const inner = await patternDevice(DEVICE_SECTORS, 12);
    const failedIndex = 3;
    const failedStart = SRC_SECTOR + failedIndex * PIECE_SECTORS;
    const src = new FaultyBlockDevice(inner, { errorRules: [{ op: 'read', startSector: sectors(failedStart + 5), endSector: sectors(failedStart + 6) }] });
    const dsts = memDevices(2);
    const kc = new KcopydClient();
    const result = await kc.copyAsync(region(src, SRC_SECTOR), dsts.map((d) => region(d, DST_SECTOR)), { ignoreError: true });
    expect(result).toEqual({ readError: true, writeErrorMask: 0 });
    const expected = bytesOf(inner, SRC_SECTOR, LENGTH_SECTORS);
    const pieceBytes = PIECE_SECTORS * 512;
    for (const d of dsts) {
      const got = bytesOf(d, DST_SECTOR, LENGTH_SECTORS);
      expect(got.subarray(0, failedIndex * pieceBytes).equals(expected.subarray(0, failedIndex * pieceBytes))).toBe(true);
      expect(isZero(got.subarray(failedIndex * pieceBytes, (failedIndex + 1) * pieceBytes))).toBe(true);
      expect(got.subarray((failedIndex + 1) * pieceBytes).equals(expected.subarray((failedIndex + 1) * pieceBytes))).toBe(true);
    }
  });

  test('a write error on destination 2 sets bit 2 only; the other destinations hold exactly the started pieces', async () => {
    const src = await patternDevice(DEVICE_SECTORS, 13);
    const dsts = memDevices(4);
    const faulty = new FaultyBlockDevice(dsts[2], { errorRules: [{ op: 'write' }] });
    const kc = new KcopydClient({ piecesInFlightPerJobMax: 3 });
    let job!: ReturnType<KcopydClient['copy']>;
    const result = await new Promise((resolve) => {
      job = kc.copy(
        region(src, SRC_SECTOR),
        [region(dsts[0], DST_SECTOR), region(dsts[1], DST_SECTOR), region(faulty, DST_SECTOR), region(dsts[3], DST_SECTOR)],
        {},
        (readError, writeErrorMask) => resolve({ readError, writeErrorMask }),
      );
    });
    expect(result).toEqual({ readError: false, writeErrorMask: 0b100 });
    // The error stops the job (no ignoreError): only the first pieces started.
    expect(job.nextPieceIndex).toBeGreaterThan(0);
    expect(job.nextPieceIndex).toBeLessThan(PIECE_COUNT);
    const startedBytes = job.nextPieceIndex * PIECE_SECTORS * 512;
    const expected = bytesOf(src, SRC_SECTOR, LENGTH_SECTORS);
    for (const i of [0, 1, 3]) {
      const got = bytesOf(dsts[i], DST_SECTOR, LENGTH_SECTORS);
      expect(got.subarray(0, startedBytes).equals(expected.subarray(0, startedBytes))).toBe(true);
      expect(isZero(got.subarray(startedBytes))).toBe(true);
    }
    expect(isZero(dsts[2].snapshotBytes())).toBe(true);
  });

  test('a write error on destination 2 with ignoreError: mask 0b100, the other destinations fully copied', async () => {
    const src = await patternDevice(DEVICE_SECTORS, 14);
    const dsts = memDevices(4);
    // Fails only one piece's worth of writes on destination 2.
    const faulty = new FaultyBlockDevice(dsts[2], { errorRules: [{ op: 'write', startSector: sectors(DST_SECTOR + 5000), endSector: sectors(DST_SECTOR + 5001) }] });
    const kc = new KcopydClient();
    const result = await kc.copyAsync(
      region(src, SRC_SECTOR),
      [region(dsts[0], DST_SECTOR), region(dsts[1], DST_SECTOR), region(faulty, DST_SECTOR), region(dsts[3], DST_SECTOR)],
      { ignoreError: true },
    );
    expect(result).toEqual({ readError: false, writeErrorMask: 0b100 });
    const expected = bytesOf(src, SRC_SECTOR, LENGTH_SECTORS);
    for (const i of [0, 1, 3]) expect(bytesOf(dsts[i], DST_SECTOR, LENGTH_SECTORS).equals(expected)).toBe(true);
    // Destination 2 got every piece but the failed one (piece 4 holds sector 5000).
    const got2 = bytesOf(dsts[2], DST_SECTOR, LENGTH_SECTORS);
    const pieceBytes = PIECE_SECTORS * 512;
    expect(isZero(got2.subarray(4 * pieceBytes, 5 * pieceBytes))).toBe(true);
    expect(got2.subarray(5 * pieceBytes).equals(expected.subarray(5 * pieceBytes))).toBe(true);
  });
});

describe('KcopydClient copyScatter (one source read, consecutive segments written to places of their own)', () => {
  /** Cuts [0, total) at `cuts` into segments, each sent to its own device at its own sector (a seeded layout). */
  function layout(total: number, cuts: number[], dsts: MemoryBlockDevice[]): KcopydSegment[] {
    const bounds = [0, ...cuts, total];
    return bounds.slice(1).map((end, i) => ({
      device: dsts[i % dsts.length],
      // Far apart and out of order on the destinations: segment i lands at 3 × (count − i) × 1000 sectors.
      sector: sectors(3 * (bounds.length - 1 - i) * 1000),
      sourceOffsetSectors: sectors(bounds[i]),
      lengthSectors: sectors(end - bounds[i]),
    }));
  }

  test('segments crossing piece boundaries, inside one piece, and piece-sized: every byte lands where its segment says, nothing else written', async () => {
    const src = await patternDevice(DEVICE_SECTORS, 21);
    const dsts = memDevices(2, sectors(40_000));
    // 7 segments over the 10 pieces + 37 sectors: one inside piece 0, one crossing 0/1, one exactly piece 2, a long
    // one over pieces 3..8, two small ones in piece 9, the tail.
    const cuts = [300, 1500, 2048, 3072, 9300, 9400];
    const segs = layout(LENGTH_SECTORS, cuts, dsts);
    const kc = new KcopydClient();
    const { transitions, observer } = recorder();
    kc.observer = observer;
    const result = await kc.copyScatterAsync(region(src, SRC_SECTOR), segs);
    expect(result).toEqual({ readError: false, writeErrorMask: 0 });
    const expected = bytesOf(src, SRC_SECTOR, LENGTH_SECTORS);
    const want = dsts.map((d) => Buffer.alloc(d.snapshotBytes().length));
    for (const g of segs) {
      const part = expected.subarray(g.sourceOffsetSectors * 512, (g.sourceOffsetSectors + g.lengthSectors) * 512);
      part.copy(want[dsts.indexOf(g.device as MemoryBlockDevice)], g.sector * 512);
    }
    for (let i = 0; i < dsts.length; i++) expect(dsts[i].snapshotBytes().equals(want[i]), `destination ${i}`).toBe(true);
    // One read per piece, as a plain copy: 11 pieces, each READING once.
    expect(transitions.filter((t) => t.kind === 'piece' && t.event === 'READ').length).toBe(PIECE_COUNT);
    expect(kc.jobsInFlightCount).toBe(0);
    expect(kc.buffersFreeCount).toBe(kc.bufferPoolPieces);
    await kc.close();
  });

  test('32 single-sector segments (the limit) and one segment; 33, gaps, overlaps, short or long cover and out-of-range places are refused', async () => {
    const src = await patternDevice(sectors(2048), 2);
    const dst = memDevices(1, sectors(2048))[0];
    const kc = new KcopydClient();
    const done = (): void => {
      throw new Error('callback of a rejected job ran');
    };
    const seg = (sourceOffsetSectors: number, lengthSectors: number, sector = 1000 + sourceOffsetSectors * 2): KcopydSegment => ({
      device: dst,
      sector: sectors(sector),
      sourceOffsetSectors: sectors(sourceOffsetSectors),
      lengthSectors: sectors(lengthSectors),
    });
    const n = KCOPYD_SEGMENTS_MAX;
    const ones = Array.from({ length: n }, (_, i) => seg(i, 1));
    expect(await kc.copyScatterAsync(region(src, sectors(100), sectors(n)), ones)).toEqual({ readError: false, writeErrorMask: 0 });
    for (let i = 0; i < n; i++) expect(bytesOf(dst, 1000 + 2 * i, 1).equals(bytesOf(src, 100 + i, 1)), `segment ${i}`).toBe(true);
    expect(isZero(bytesOf(dst, 1001, 1))).toBe(true); // between two segments' places
    const len = sectors(64);
    const bad: Array<[string, KcopydSegment[], string]> = [
      ['33 segments', Array.from({ length: n + 1 }, (_, i) => seg(i, 1)), 'DM_INVALID_ARGUMENT'],
      ['no segment', [], 'DM_INVALID_ARGUMENT'],
      ['a gap', [seg(0, 10), seg(12, 52)], 'DM_INVALID_ARGUMENT'],
      ['an overlap', [seg(0, 10), seg(8, 56)], 'DM_INVALID_ARGUMENT'],
      ['not from 0', [seg(2, 62)], 'DM_INVALID_ARGUMENT'],
      ['short of the source', [seg(0, 10), seg(10, 50)], 'DM_INVALID_ARGUMENT'],
      ['past the source', [seg(0, 10), seg(10, 60)], 'DM_INVALID_ARGUMENT'],
      ['an empty segment', [seg(0, 10), seg(10, 0), seg(10, 54)], 'DM_INVALID_ARGUMENT'],
      ['a place past the end', [seg(0, 10), seg(10, 54, 2000)], 'DM_IO_RANGE'],
    ];
    for (const [what, segs, code] of bad) {
      let caught: unknown;
      try {
        kc.copyScatter(region(src, sectors(0), len), segs, {}, done);
      } catch (err) {
        caught = err;
      }
      expect((caught as DmError | undefined)?.code, what).toBe(code);
    }
    expect(kc.jobsInFlightCount).toBe(0);
    await kc.close();
    expectCode(() => kc.copyScatter(region(src, sectors(0), len), [seg(0, 64)], {}, done), 'DM_CLOSED');
  });

  test('a write error on segment 2 sets bit 2; the other segments are written; a read error writes none of its piece', async () => {
    const src = await patternDevice(sectors(4096), 5);
    const dst = memDevices(1, sectors(8192))[0];
    const faulty = new FaultyBlockDevice(dst, { errorRules: [{ op: 'write', startSector: sectors(5000), endSector: sectors(5010) }] });
    const segs: KcopydSegment[] = [0, 1, 2, 3].map((i) => ({ device: faulty, sector: sectors(i === 2 ? 5000 : 100 * i), sourceOffsetSectors: sectors(16 * i), lengthSectors: sectors(16) }));
    const kc = new KcopydClient();
    expect(await kc.copyScatterAsync(region(src, sectors(0), sectors(64)), segs, { ignoreError: true })).toEqual({ readError: false, writeErrorMask: 0b100 });
    for (const i of [0, 1, 3]) expect(bytesOf(dst, 100 * i, 16).equals(bytesOf(src, 16 * i, 16)), `segment ${i}`).toBe(true);
    expect(isZero(bytesOf(dst, 5000, 16))).toBe(true);
    // A read error: the piece's segments stay unwritten.
    const badSrc = new FaultyBlockDevice(src, { errorRules: [{ op: 'read' }] });
    const dst2 = memDevices(1, sectors(8192))[0];
    const segs2 = segs.map((g) => ({ ...g, device: dst2 }));
    expect(await kc.copyScatterAsync(region(badSrc, sectors(0), sectors(64)), segs2)).toEqual({ readError: true, writeErrorMask: 0 });
    expect(isZero(dst2.snapshotBytes())).toBe(true);
    await kc.close();
  });
});

describe('KcopydClient concurrency', () => {
  test.each([
    [8, undefined],
    [3, 3],
  ])('never more than %i pieces of a job in flight (piecesInFlightPerJobMax %s)', async (limit, option) => {
    const counter: IoCounter = { active: 0, activeMax: 0 };
    const lengthSectors = sectors(40 * 64 + 5);
    const srcInner = await patternDevice(sectors(lengthSectors + 8), 21);
    const dstInner = memDevices(1, sectors(lengthSectors + 8))[0];
    const src = new SlowDevice(srcInner, counter, 2);
    const dst = new SlowDevice(dstInner, counter, 3);
    let piecesInFlightMax = 0;
    const kcRef: { kc?: KcopydClient } = {};
    const observer: KcopydObserver = () => {
      const kc = kcRef.kc!;
      piecesInFlightMax = Math.max(piecesInFlightMax, kc.piecesInFlightCount);
    };
    const kc = new KcopydClient({ subJobSizeSectors: sectors(64), piecesInFlightPerJobMax: option, observer });
    kcRef.kc = kc;
    const result = await kc.copyAsync(region(src, sectors(0), lengthSectors), [region(dst, sectors(8), lengthSectors)]);
    expect(result).toEqual({ readError: false, writeErrorMask: 0 });
    expect(bytesOf(dstInner, 8, lengthSectors).equals(bytesOf(srcInner, 0, lengthSectors))).toBe(true);
    // One destination: each piece has at most one I/O in flight, so device I/Os in flight = pieces doing I/O.
    expect(counter.activeMax).toBeLessThanOrEqual(limit);
    expect(counter.activeMax).toBeGreaterThan(1);
    expect(counter.activeMax).toBe(limit);
    expect(piecesInFlightMax).toBe(limit);
  });

  test('buffer pool exhaustion: many concurrent jobs wait for buffers and all complete', async () => {
    const counter: IoCounter = { active: 0, activeMax: 0 };
    const jobCount = 12;
    const lengthSectors = sectors(5 * 64 + 17);
    const poolPieces = 3;
    const srcs = await Promise.all(Array.from({ length: jobCount }, (_, i) => patternDevice(sectors(lengthSectors), 100 + i)));
    const dsts = memDevices(jobCount, lengthSectors);
    const kcRef: { kc?: KcopydClient } = {};
    let buffersHeldMax = 0;
    let piecesWaitingMax = 0;
    const observer: KcopydObserver = () => {
      const kc = kcRef.kc!;
      buffersHeldMax = Math.max(buffersHeldMax, kc.bufferPoolPieces - kc.buffersFreeCount);
      piecesWaitingMax = Math.max(piecesWaitingMax, kc.piecesWaitingCount);
    };
    const kc = new KcopydClient({ subJobSizeSectors: sectors(64), bufferPoolPieces: poolPieces, observer });
    kcRef.kc = kc;
    const results = await Promise.all(
      srcs.map((s, i) => kc.copyAsync(region(new SlowDevice(s, counter), sectors(0), lengthSectors), [region(new SlowDevice(dsts[i], counter), sectors(0), lengthSectors)])),
    );
    for (const r of results) expect(r).toEqual({ readError: false, writeErrorMask: 0 });
    for (let i = 0; i < jobCount; i++) expect(dsts[i].snapshotBytes().equals(srcs[i].snapshotBytes())).toBe(true);
    expect(buffersHeldMax).toBe(poolPieces);
    expect(piecesWaitingMax).toBeGreaterThan(jobCount);
    // A piece holds its buffer for its whole I/O: never more I/Os than buffers.
    expect(counter.activeMax).toBeLessThanOrEqual(poolPieces);
    expect(kc.buffersFreeCount).toBe(poolPieces);
    expect(kc.piecesWaitingCount).toBe(0);
    expect(kc.piecesInFlightCount).toBe(0);
  });
});

describe('KcopydClient callbacks', () => {
  test('callbacks run in job-completion order, one at a time, never from inside copy()', async () => {
    const counter: IoCounter = { active: 0, activeMax: 0 };
    const srcInner = await patternDevice(sectors(4096), 31);
    const dstInner = memDevices(1, sectors(4096))[0];
    const { transitions, observer } = recorder();
    const kc = new KcopydClient({ subJobSizeSectors: sectors(64), observer });
    const order: number[] = [];
    let inCallback = false;
    let inCopy = false;
    const jobs: number[] = [];
    const allDone = new Promise<void>((resolve) => {
      let remaining = 0;
      const start = (src: BlockDevice, srcSector: number, lengthSectors: number, delayTicks: number): void => {
        remaining++;
        inCopy = true;
        const job = kc.copy(
          region(new SlowDevice(src, counter, delayTicks), sectors(srcSector), sectors(lengthSectors)),
          [region(new SlowDevice(dstInner, counter, delayTicks), sectors(srcSector), sectors(lengthSectors))],
          {},
          () => {
            expect(inCopy).toBe(false);
            expect(inCallback).toBe(false);
            inCallback = true;
            order.push(job.id);
            // A job started from a callback completes later, after this callback returns.
            if (job.id === jobs[1]) start(srcInner, 4000, 0, 1);
            inCallback = false;
            if (--remaining === 0) resolve();
          },
        );
        inCopy = false;
        jobs.push(job.id);
      };
      start(srcInner, 0, 2048, 3); // big and slow
      start(srcInner, 2048, 64, 1); // one piece, fast
      start(srcInner, 2112, 0, 1); // empty: completes at once, called back from a microtask
      start(srcInner, 2112, 640, 1);
    });
    await allDone;
    const completed = transitions.filter((t) => t.kind === 'job' && t.to === 'COMPLETE').map((t) => t.id);
    expect(order).toEqual(completed);
    expect(order.length).toBe(5);
    // The big slow job finishes last; the empty one first.
    expect(order[0]).toBe(jobs[2]);
    expect(order[order.length - 1]).toBe(jobs[0]);
    expect(bytesOf(dstInner, 0, 2752).equals(bytesOf(srcInner, 0, 2752))).toBe(true);
  });

  test('close() waits for jobs in flight, then refuses new ones', async () => {
    const counter: IoCounter = { active: 0, activeMax: 0 };
    const src = new SlowDevice(await patternDevice(sectors(4096), 41), counter, 2);
    const dst = new SlowDevice(memDevices(1, sectors(4096))[0], counter, 2);
    const kc = new KcopydClient({ subJobSizeSectors: sectors(128) });
    let called = false;
    kc.copy(region(src, sectors(0), sectors(4096)), [region(dst, sectors(0), sectors(4096))], {}, () => {
      called = true;
    });
    expect(kc.jobsInFlightCount).toBe(1);
    await kc.close();
    expect(called).toBe(true);
    expect(kc.jobsInFlightCount).toBe(0);
    expectCode(() => kc.zero([region(dst, sectors(0), sectors(8))], {}, () => undefined), 'DM_CLOSED');
  });
});

describe('KcopydClient machines', () => {
  const names = (ts: Transition[]): string[][] => ts.map((t) => [t.from, t.event, t.to]);

  test('pieces and jobs visit the expected states, and xstate agrees', async () => {
    const src = await patternDevice(sectors(2048), 51);
    const faulty = new FaultyBlockDevice(await patternDevice(sectors(2048), 52), { errorRules: [{ op: 'read', startSector: sectors(300), endSector: sectors(301) }] });
    const dsts = memDevices(2, sectors(2048));
    const badDst = new FaultyBlockDevice(memDevices(1, sectors(2048))[0], { errorRules: [{ op: 'write', startSector: sectors(300), endSector: sectors(301) }] });
    const rec1 = recorder();
    const rec2 = recorder();
    let transitions = rec1.transitions;
    const kc = new KcopydClient({ subJobSizeSectors: sectors(256), observer: rec1.observer });
    const len = sectors(600); // pieces of 256, 256, 88

    await kc.copyAsync(region(src, sectors(0), len), [region(dsts[0], sectors(0), len)]);
    const copyJobId = transitions[0].jobId;
    const jobOf = (jobId: number, kind: 'job' | 'piece'): Transition[] => transitions.filter((t) => t.jobId === jobId && t.kind === kind);
    const piecesOf = (jobId: number): Map<number, Transition[]> => {
      const m = new Map<number, Transition[]>();
      for (const t of jobOf(jobId, 'piece')) m.set(t.id, [...(m.get(t.id) ?? []), t]);
      return m;
    };
    const jobPath = [['START', 'RUN', 'RUNNING'], ['RUNNING', 'ALL_PIECES_DONE', 'COMPLETE']];
    expect(names(jobOf(copyJobId, 'job'))).toEqual(jobPath);
    expect(piecesOf(copyJobId).size).toBe(3);
    for (const ts of piecesOf(copyJobId).values()) {
      expect(names(ts)).toEqual([['START', 'READ', 'READING'], ['READING', 'READ_DONE', 'WRITING'], ['WRITING', 'WRITE_DONE', 'DONE']]);
    }
    // The job completes after all its pieces are DONE.
    const jobCompleteAt = transitions.findIndex((t) => t.kind === 'job' && t.to === 'COMPLETE' && t.jobId === copyJobId);
    expect(transitions.slice(jobCompleteAt).some((t) => t.kind === 'piece' && t.jobId === copyJobId)).toBe(false);

    const zeroJob = kc.zero([region(dsts[1], sectors(0), len)], {}, () => undefined);
    await kc.close();
    expect(names(jobOf(zeroJob.id, 'job'))).toEqual(jobPath);
    for (const ts of piecesOf(zeroJob.id).values()) expect(names(ts)).toEqual([['START', 'ZERO', 'WRITING'], ['WRITING', 'WRITE_DONE', 'DONE']]);

    // Job and piece ids are per client: record the second client apart.
    transitions = rec2.transitions;
    const kc2 = new KcopydClient({ subJobSizeSectors: sectors(256), observer: rec2.observer });
    const readFail = await kc2.copyAsync(region(faulty, sectors(0), len), [region(dsts[1], sectors(0), len)], { ignoreError: true });
    expect(readFail.readError).toBe(true);
    const readFailJobId = transitions[transitions.length - 1].jobId;
    const readPaths = [...piecesOf(readFailJobId).values()].map(names);
    expect(readPaths.filter((p) => p.length === 2)).toEqual([[['START', 'READ', 'READING'], ['READING', 'READ_ERROR', 'DONE']]]);
    expect(readPaths.filter((p) => p.length === 3).length).toBe(2);

    const writeFail = await kc2.copyAsync(region(src, sectors(0), len), [region(dsts[1], sectors(0), len), region(badDst, sectors(0), len)], { ignoreError: true });
    expect(writeFail).toEqual({ readError: false, writeErrorMask: 0b10 });
    const writeFailJobId = transitions[transitions.length - 1].jobId;
    const writePaths = [...piecesOf(writeFailJobId).values()].map(names);
    expect(writePaths.filter((p) => p[2][1] === 'WRITE_ERROR')).toEqual([[['START', 'READ', 'READING'], ['READING', 'READ_DONE', 'WRITING'], ['WRITING', 'WRITE_ERROR', 'DONE']]]);

    // Every path the compiled tables took, replayed on the xstate machines, ends in the same state.
    const byActor = new Map<string, Transition[]>();
    for (const [client, ts] of [rec1.transitions, rec2.transitions].entries()) {
      for (const t of ts) byActor.set(`${client}:${t.kind}:${t.id}`, [...(byActor.get(`${client}:${t.kind}:${t.id}`) ?? []), t]);
    }
    expect(byActor.size).toBeGreaterThan(10);
    for (const ts of byActor.values()) {
      const actor = createActor(ts[0].kind === 'job' ? kcopydJobMachine : kcopydPieceMachine).start();
      for (const t of ts) {
        expect(actor.getSnapshot().value).toBe(t.from);
        actor.send({ type: t.event } as never);
        expect(actor.getSnapshot().value).toBe(t.to);
      }
      expect(actor.getSnapshot().status).toBe('done');
      actor.stop();
    }
    expect(KCOPYD_JOB_STATE.COMPLETE).toBe(KCOPYD_JOB_MACHINE.stateIndex('COMPLETE'));
    expect(KCOPYD_PIECE_STATE.DONE).toBe(KCOPYD_PIECE_MACHINE.stateIndex('DONE'));
    expect(KCOPYD_JOB_MACHINE.tryStep(KCOPYD_JOB_STATE.START, KCOPYD_JOB_EVENT.ALL_PIECES_DONE)).toBe(-1);
  });

  test("emits 'kcopyd.job' trace events on job state changes only when tracing is on", async () => {
    const log = await EventLog.open(undefined, new SimulatedClock());
    const events: LoggedEvent[] = [];
    log.events$.subscribe((e) => events.push(e));
    const src = await patternDevice(sectors(2048), 61);
    const dst = memDevices(1, sectors(2048))[0];
    const kc = new KcopydClient({ log, subJobSizeSectors: sectors(256) });
    await kc.copyAsync(region(src, sectors(0), sectors(600)), [region(dst, sectors(0), sectors(600))]);
    expect(events).toEqual([]);
    log.traceEnabled = true;
    const job = kc.copy(region(src, sectors(16), sectors(600)), [region(dst, sectors(0), sectors(600))], {}, () => undefined);
    await kc.close();
    expect(events.map((e) => (e.type === 'kcopyd.job' ? [e.jobId, e.state, e.sourceSector, e.lengthSectors, e.destinations, e.readError, e.writeErrorMask] : e.type))).toEqual([
      [job.id, 'RUNNING', 16, 600, 1, undefined, undefined],
      [job.id, 'COMPLETE', 16, 600, 1, false, 0],
    ]);
    await log.close();
  });
});

// Keep the unit helpers honest: the piece size the tests assume is the client's default.
test('default sub-job size is 512 KiB', () => {
  expect(sectorsToBytes(new KcopydClient().subJobSizeSectors)).toBe(bytes(512 * 1024));
});
