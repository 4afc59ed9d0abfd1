import { describe, expect, test } from 'vitest';
import { BlockDevice } from '../../src/block/contract.js';
import type { BlockDeviceSupports } from '../../src/block/contract.js';
import { FaultyBlockDevice } from '../../src/block/faulty-device.js';
import { MemoryBlockDevice } from '../../src/block/memory-device.js';
import type { Bytes, Chunk, Sector } from '../../src/block/units.js';
import { bytes, chunks, sectors, sectorsToBytes } from '../../src/block/units.js';
import { DmError } from '../../src/core/errors.js';
import { createRng } from '../../src/core/rng.js';
import type { Rng } from '../../src/core/rng.js';
import type { ExceptionStoreOptions, ExceptionWal } from '../../src/stores/contract.js';
import { ExceptionTable } from '../../src/stores/exception-table.js';
import { PersistentStore, encodeHeader, persistentStore } from '../../src/stores/persistent-store.js';
import { lookupExceptionStore } from '../../src/stores/store-registry.js';
import { exceptionStoreSuite } from '../../src/testing/conformance/exception-store.js';

// ---- test doubles -----------------------------------------------------------------------------------------------

interface WalRecord {
  index: number;
  oldChunk: Chunk;
  newChunk: Chunk;
}

/**
 * An in-memory WAL medium. view() hands out an ExceptionWal bound to the current generation; crash() ends the
 * generation, so a store from before the crash can no longer append, trim or clear (its process is gone). Appends
 * are durable when called and acknowledged a turn later (a crash in between keeps them, unacknowledged).
 */
class WalMedium {
  records: WalRecord[] = [];
  appendSizes: number[] = [];
  generation = 0;
  view(power?: Power): ExceptionWal {
    const generation = this.generation;
    const alive = (): void => {
      if (this.generation !== generation) throw new DmError('DM_IO', 'wal: the process that opened this WAL is gone');
      if (power !== undefined && !power.use()) throw new DmError('DM_IO', 'wal: power lost');
    };
    const turn = (): Promise<void> => new Promise((resolve) => setImmediate(resolve));
    return {
      append: async (records) => {
        alive();
        const last = this.records[this.records.length - 1];
        if (last !== undefined) expect(records[0].index, 'WAL indexes are consecutive').toBe(last.index + 1);
        this.records.push(...records.map((r) => ({ ...r })));
        this.appendSizes.push(records.length);
        await turn();
        if (this.generation !== generation) throw new DmError('DM_IO', 'wal: the process that opened this WAL is gone');
      },
      read: async () => {
        if (this.generation !== generation || power?.off === true) throw new DmError('DM_IO', 'wal: gone');
        return this.records.map((r) => ({ ...r }));
      },
      trim: async (beforeIndex) => {
        alive();
        this.records = this.records.filter((r) => r.index >= beforeIndex);
      },
      clear: async () => {
        alive();
        this.records = [];
      },
    };
  }
  crash(): void {
    this.generation++;
  }
}

/**
 * Power for a crash test: every write, flush and WAL operation uses one unit; the operation that finds none left
 * fails, and so does everything after it (power is off). Drawing the budget at random puts the crash between any
 * two I/Os of the run: a data write and its commit, the zeroing of an area and the write of the full one, two area
 * writes of a checkpoint, a checkpoint's writes and its trim.
 */
class Power {
  off = false;
  constructor(public budget: number) {}
  use(): boolean {
    if (this.off) return false;
    if (this.budget-- <= 0) this.off = true;
    return !this.off;
  }
}

/** A pass-through device that can be cut off: after cut() (or when its power runs out), every I/O fails. */
class CutDevice extends BlockDevice {
  readonly sizeSectors: Sector;
  override readonly logicalBlockSizeBytes: Bytes;
  readonly supports: BlockDeviceSupports;
  readonly name: string;
  private isCut = false;
  constructor(
    readonly inner: BlockDevice,
    readonly power?: Power,
  ) {
    super();
    this.sizeSectors = inner.sizeSectors;
    this.logicalBlockSizeBytes = inner.logicalBlockSizeBytes;
    this.supports = inner.supports;
    this.name = `cut(${inner.name})`;
  }
  cut(): void {
    this.isCut = true;
  }
  private dead(): Promise<void> {
    return Promise.reject(new DmError('DM_IO', `${this.name}: cut`));
  }
  private live(): boolean {
    return !this.isCut && (this.power === undefined || this.power.use());
  }
  protected _read(sector: Sector, buf: Uint8Array): Promise<void> {
    return this.isCut || this.power?.off === true ? this.dead() : this.inner.read(sector, buf);
  }
  protected _write(sector: Sector, buf: Uint8Array, fua: boolean): Promise<void> {
    return this.live() ? this.inner.write(sector, buf, { fua }) : this.dead();
  }
  protected override _flush(): Promise<void> {
    return this.live() ? this.inner.flush() : this.dead();
  }
  protected override _close(): Promise<void> {
    return Promise.resolve();
  }
}

// ---- helpers ----------------------------------------------------------------------------------------------------

const mem = (sizeSectors: number, lbs = 512): MemoryBlockDevice =>
  new MemoryBlockDevice({ sizeSectors: sectors(sizeSectors), logicalBlockSizeBytes: bytes(lbs) });
const epaOf = (chunkSizeSectors: number): number => chunkSizeSectors * 32;
const isMetadataChunk = (c: number, chunkSizeSectors: number): boolean => c === 0 || c % (epaOf(chunkSizeSectors) + 1) === 1;
const areaLocation = (area: number, chunkSizeSectors: number): number => 1 + area * (epaOf(chunkSizeSectors) + 1);

type Pair = [number, number];

interface Opened {
  readonly store: PersistentStore;
  readonly found: Pair[];
  readonly valid: boolean;
  readonly chunkSizeSectors: number;
}

async function open(options: Partial<ExceptionStoreOptions> & { cow: BlockDevice }): Promise<Opened> {
  const store = await persistentStore.create({ chunkSizeSectors: sectors(0), overflow: false, ...options });
  const found: Pair[] = [];
  const meta = await persistentStore.readMetadata(store, (o, n) => found.push([o, n]));
  return { store, found, valid: meta.valid, chunkSizeSectors: meta.chunkSizeSectors };
}

const commit = (store: PersistentStore, oldChunk: number, newChunk: number): Promise<boolean> =>
  new Promise((resolve) => persistentStore.commitException(store, chunks(oldChunk), chunks(newChunk), resolve));

/** Commits all pairs in order without waiting in between (one group when nothing else is prepared). */
const commitMany = (store: PersistentStore, pairs: readonly Pair[]): Promise<boolean[]> => Promise.all(pairs.map(([o, n]) => commit(store, o, n)));

/** Prepares n chunks and commits them with the given old chunks (in order). */
async function prepareAndCommit(store: PersistentStore, olds: readonly number[]): Promise<Pair[]> {
  const pairs: Pair[] = olds.map((o) => {
    const c = persistentStore.prepareException(store);
    expect(c, 'room').not.toBe(-1);
    return [o, c as number];
  });
  expect(await commitMany(store, pairs)).toEqual(pairs.map(() => true));
  return pairs;
}

/** The bytes of a metadata area holding `records` (then zeroes). */
function areaImage(chunkSizeSectors: number, records: readonly Pair[]): Buffer {
  const buf = Buffer.alloc(sectorsToBytes(sectors(chunkSizeSectors)));
  records.forEach(([o, n], i) => {
    buf.writeBigUInt64LE(BigInt(o), i * 16);
    buf.writeBigUInt64LE(BigInt(n), i * 16 + 8);
  });
  return buf;
}

async function readChunk(dev: BlockDevice, chunk: number, chunkSizeSectors: number): Promise<Buffer> {
  const buf = Buffer.alloc(sectorsToBytes(sectors(chunkSizeSectors)));
  await dev.read(sectors(chunk * chunkSizeSectors), buf);
  return buf;
}

async function writeChunk(dev: BlockDevice, chunk: number, chunkSizeSectors: number, data: Buffer): Promise<void> {
  await dev.write(sectors(chunk * chunkSizeSectors), data);
}

/** A header chunk with arbitrary field values. */
function header(chunkSizeBytes: number, fields: { magic?: number; valid?: number; version?: number; chunkSize: number }): Buffer {
  const buf = Buffer.alloc(chunkSizeBytes);
  buf.writeUInt32LE(fields.magic ?? 0x70416e53, 0);
  buf.writeUInt32LE(fields.valid ?? 1, 4);
  buf.writeUInt32LE(fields.version ?? 1, 8);
  buf.writeUInt32LE(fields.chunkSize, 12);
  return buf;
}

const sortPairs = (pairs: readonly Pair[]): Pair[] => [...pairs].sort((a, b) => a[0] - b[0] || a[1] - b[1]);
const turn = (): Promise<void> => new Promise((resolve) => setImmediate(resolve));

// ---- conformance --------------------------------------------------------------------------------------------------

const plainFactory = async (cowSizeSectors: Sector, chunkSizeSectors: Sector): Promise<ExceptionStoreOptions> => ({
  cow: mem(cowSizeSectors),
  chunkSizeSectors,
  overflow: false,
});
exceptionStoreSuite({ test, expect, name: 'persistent (P)', type: persistentStore, persistent: true, tableCode: 'P', isMetadataChunk, factory: plainFactory });
exceptionStoreSuite({
  test,
  expect,
  name: 'persistent (PO), 8-sector chunks',
  type: persistentStore,
  persistent: true,
  tableCode: 'PO',
  isMetadataChunk,
  chunkSizeSectors: sectors(8),
  factory: async (cowSizeSectors, chunkSizeSectors) => ({ cow: mem(cowSizeSectors), chunkSizeSectors, overflow: true }),
});
exceptionStoreSuite({
  test,
  expect,
  name: 'persistent (P) over a volatile write cache',
  type: persistentStore,
  persistent: true,
  isMetadataChunk,
  factory: async (cowSizeSectors, chunkSizeSectors) => ({
    cow: new FaultyBlockDevice(mem(cowSizeSectors), { volatileCache: true }),
    chunkSizeSectors,
    overflow: false,
  }),
});
exceptionStoreSuite({
  test,
  expect,
  name: 'persistent (P) with a WAL',
  type: persistentStore,
  persistent: true,
  tableCode: 'P',
  isMetadataChunk,
  factory: async (cowSizeSectors, chunkSizeSectors) => ({
    cow: mem(cowSizeSectors),
    chunkSizeSectors,
    overflow: false,
    wal: new WalMedium().view(),
    checkpointExceptionsMax: 50,
  }),
});

// ---- format -------------------------------------------------------------------------------------------------------

describe('persistent store: on-disk format', () => {
  test('a new COW gets the exact header, a zeroed area 0, and records as Linux writes them', async () => {
    const cow = mem(2048);
    await writeChunk(cow, 1, 8, Buffer.alloc(4096, 0xee)); // area 0 holds garbage before the format
    const { store, found, valid, chunkSizeSectors } = await open({ cow, chunkSizeSectors: sectors(8) });
    expect([found, valid, chunkSizeSectors]).toEqual([[], true, 8]);
    const head = await readChunk(cow, 0, 8);
    expect(head.subarray(0, 16).toString('hex')).toBe('536e417001000000010000000800000' + '0');
    expect(head.subarray(16).every((b) => b === 0)).toBe(true);
    expect(head.equals(encodeHeader(sectors(8), true))).toBe(true);
    expect((await readChunk(cow, 1, 8)).every((b) => b === 0), 'area 0 zeroed').toBe(true);

    // The kernel run of test/kernel/cow-format.test.ts: origin chunks 3, 4, 10, 2 written in that order.
    const allocated = [0, 1, 2, 3].map(() => persistentStore.prepareException(store));
    expect(allocated).toEqual([2, 3, 4, 5]);
    expect(await commitMany(store, [[3, 2], [4, 3], [10, 4], [2, 5]])).toEqual([true, true, true, true]);
    const area = await readChunk(cow, 1, 8);
    expect(area.subarray(0, 0x40).toString('hex')).toBe(
      '0300000000000000' + '0200000000000000' + '0400000000000000' + '0300000000000000' +
        '0a00000000000000' + '0400000000000000' + '0200000000000000' + '0500000000000000',
    );
    expect(area.subarray(0x40).every((b) => b === 0)).toBe(true);
    // dmsetup status on 6.1 showed `48/8192 16` for the same four copies (8192-sector COW there).
    expect(persistentStore.usage(store)).toEqual({ totalSectors: 2048, sectorsAllocated: 48, metadataSectors: 16 });
    expect(persistentStore.tableCode(store)).toBe('P 8');
    await persistentStore.close(store);
  });

  test('area boundaries: filling area 0 zeroes area 1 first, allocation skips metadata chunks, area 2 is zeroed in turn', async () => {
    const cs = 1; // 32 records per area; areas at chunks 1, 34, 67, 100
    const cow = mem(200);
    const garbage = Buffer.alloc(512, 0xee);
    for (const c of [34, 67, 100]) await writeChunk(cow, c, cs, garbage);
    const { store } = await open({ cow, chunkSizeSectors: sectors(cs) });
    const got: number[] = [];
    for (let i = 0; i < 64; i++) got.push(persistentStore.prepareException(store));
    expect(got).toEqual([...Array(32).keys()].map((i) => 2 + i).concat([...Array(32).keys()].map((i) => 35 + i)));
    expect(persistentStore.usage(store).sectorsAllocated, 'next_free skipped chunk 67').toBe(68);

    const pairs: Pair[] = got.map((c, i) => [1000 + i, c]);
    expect(await commitMany(store, pairs.slice(0, 31))).toEqual(Array(31).fill(true));
    expect((await readChunk(cow, 1, cs)).equals(areaImage(cs, pairs.slice(0, 31)))).toBe(true);
    expect((await readChunk(cow, 34, cs)).equals(garbage), 'area 1 untouched while area 0 has room').toBe(true);
    expect(persistentStore.usage(store).metadataSectors).toBe(2);

    expect(await commit(store, ...pairs[31])).toBe(true);
    expect((await readChunk(cow, 1, cs)).equals(areaImage(cs, pairs.slice(0, 32))), 'area 0 full').toBe(true);
    expect((await readChunk(cow, 34, cs)).every((b) => b === 0), 'area 1 zeroed').toBe(true);
    expect((await readChunk(cow, 67, cs)).equals(garbage)).toBe(true);
    expect(persistentStore.usage(store).metadataSectors, '(current_area + 2) × chunk').toBe(3);

    expect(await commit(store, ...pairs[32])).toBe(true);
    expect((await readChunk(cow, 34, cs)).equals(areaImage(cs, pairs.slice(32, 33)))).toBe(true);
    expect(await commitMany(store, pairs.slice(33))).toEqual(Array(31).fill(true));
    expect((await readChunk(cow, 34, cs)).equals(areaImage(cs, pairs.slice(32, 64))), 'area 1 full').toBe(true);
    expect((await readChunk(cow, 67, cs)).every((b) => b === 0), 'area 2 zeroed').toBe(true);
    expect((await readChunk(cow, 100, cs)).equals(garbage), 'area 3 untouched').toBe(true);
    expect(persistentStore.usage(store)).toEqual({ totalSectors: 200, sectorsAllocated: 68, metadataSectors: 4 });
    await persistentStore.close(store);

    const again = await open({ cow, chunkSizeSectors: sectors(cs) });
    expect(again.found).toEqual(pairs);
    expect(persistentStore.usage(again.store)).toEqual({ totalSectors: 200, sectorsAllocated: 68, metadataSectors: 4 });
    expect(persistentStore.prepareException(again.store)).toBe(68);
    await persistentStore.close(again.store);
  });

  test('the loader accepts records in any order and leaked chunks', async () => {
    const cs = 1;
    const cow = mem(300);
    await writeChunk(cow, 0, cs, header(512, { chunkSize: cs }));
    const rng = createRng(3);
    // Area 0 full, new chunks 2..33 shuffled; area 1: two records with leaked chunks between.
    const news = [...Array(32).keys()].map((i) => 2 + i);
    for (let i = news.length - 1; i > 0; i--) {
      const j = rng.int(i + 1);
      [news[i], news[j]] = [news[j], news[i]];
    }
    const area0: Pair[] = news.map((n, i) => [5000 - i * 7, n]);
    const area1: Pair[] = [[7, 60], [6, 36]];
    await writeChunk(cow, 1, cs, areaImage(cs, area0));
    await writeChunk(cow, 34, cs, areaImage(cs, area1));
    await writeChunk(cow, 67, cs, Buffer.alloc(512, 0xee)); // past the end marker: never read
    const { store, found } = await open({ cow, chunkSizeSectors: sectors(8) });
    expect(found).toEqual([...area0, ...area1]);
    expect(persistentStore.usage(store)).toEqual({ totalSectors: 300, sectorsAllocated: 61, metadataSectors: 3 });
    expect(persistentStore.prepareException(store)).toBe(61);
    await persistentStore.close(store);
  });

  test('next_free after a load skips a metadata chunk (Linux skip_metadata)', async () => {
    const cs = 1;
    const cow = mem(300);
    await writeChunk(cow, 0, cs, header(512, { chunkSize: cs }));
    await writeChunk(cow, 1, cs, areaImage(cs, [[1, 33]]));
    const { store } = await open({ cow });
    expect(persistentStore.usage(store).sectorsAllocated).toBe(35);
    expect(persistentStore.prepareException(store)).toBe(35);
  });

  test('the header chunk size wins over the table; table 0 means max(32 sectors, logical block size)', async () => {
    const cow = mem(4096);
    await writeChunk(cow, 0, 16, header(8192, { chunkSize: 16 }));
    const a = await open({ cow, chunkSizeSectors: sectors(8) });
    expect(a.chunkSizeSectors).toBe(16);
    expect(persistentStore.tableCode(a.store)).toBe('P 16');
    expect(persistentStore.usage(a.store)).toEqual({ totalSectors: 4096, sectorsAllocated: 32, metadataSectors: 32 });

    const b = await open({ cow: mem(4096), chunkSizeSectors: sectors(0) });
    expect(b.chunkSizeSectors).toBe(32);
    const big = mem(4096, 65536);
    const c = await open({ cow: big, chunkSizeSectors: sectors(0) });
    expect(c.chunkSizeSectors).toBe(128);
    expect((await readChunk(big, 0, 128)).readUInt32LE(12)).toBe(128);
  });

  test('valid = 0 loads invalid with no exceptions, and writes nothing', async () => {
    const cow = mem(256);
    await writeChunk(cow, 0, 8, header(4096, { chunkSize: 8, valid: 0 }));
    await writeChunk(cow, 1, 8, areaImage(8, [[1, 2], [2, 3]]));
    const before = cow.snapshotBytes();
    const { store, found, valid } = await open({ cow, chunkSizeSectors: sectors(8) });
    expect([found, valid]).toEqual([[], false]);
    await persistentStore.close(store);
    expect(cow.snapshotBytes().equals(before)).toBe(true);
  });

  test('drop rewrites the header with valid = 0 (and later commits fail)', async () => {
    const cow = mem(256);
    const { store } = await open({ cow, chunkSizeSectors: sectors(8) });
    await prepareAndCommit(store, [1, 2]);
    await persistentStore.drop(store);
    expect((await readChunk(cow, 0, 8)).equals(encodeHeader(sectors(8), false))).toBe(true);
    const c = persistentStore.prepareException(store);
    expect(await commit(store, 3, c)).toBe(false);
    await persistentStore.close(store);
    const again = await open({ cow });
    expect([again.valid, again.found]).toEqual([false, []]);
  });

  test('the registry resolves P, PO and N case-insensitively', () => {
    expect(lookupExceptionStore('P')).toEqual({ type: persistentStore, overflow: false });
    expect(lookupExceptionStore('po')).toEqual({ type: persistentStore, overflow: true });
    expect(lookupExceptionStore('n')?.type.name).toBe('N');
    expect(lookupExceptionStore('X')).toBeUndefined();
  });
});

// ---- refused loads ------------------------------------------------------------------------------------------------

describe('persistent store: refused loads write nothing', () => {
  interface Case {
    readonly what: string;
    readonly lbs?: number;
    readonly sizeSectors?: number;
    readonly chunkSizeSectors: number;
    readonly readOnly?: boolean;
    /** Lays out the COW (and the WAL) before the load. */
    readonly setUp: (cow: MemoryBlockDevice, wal: WalMedium) => Promise<void>;
    readonly withWal?: boolean;
  }
  const cases: Case[] = [
    { what: 'bad magic', chunkSizeSectors: 8, setUp: (cow) => writeChunk(cow, 0, 8, header(4096, { magic: 0x12345678, chunkSize: 8 })) },
    { what: 'a filesystem (ext4 superblock at 1 KiB, magic 0)', chunkSizeSectors: 8, setUp: (cow) => cow.write(sectors(2), Buffer.alloc(512, 0x53)) },
    { what: 'version 2', chunkSizeSectors: 8, setUp: (cow) => writeChunk(cow, 0, 8, header(4096, { version: 2, chunkSize: 8 })) },
    { what: 'on-disk chunk size 3 (not a power of two)', chunkSizeSectors: 8, setUp: (cow) => writeChunk(cow, 0, 8, header(4096, { chunkSize: 3 })) },
    { what: 'on-disk chunk size 0', chunkSizeSectors: 8, setUp: (cow) => writeChunk(cow, 0, 8, header(4096, { chunkSize: 0 })) },
    { what: 'on-disk chunk size smaller than the 4 KiB block', lbs: 4096, chunkSizeSectors: 8, setUp: (cow) => writeChunk(cow, 0, 8, header(4096, { chunkSize: 4 })) },
    { what: 'on-disk chunk size larger than the COW', sizeSectors: 64, chunkSizeSectors: 8, setUp: (cow) => writeChunk(cow, 0, 8, header(4096, { chunkSize: 64 })) },
    { what: 'table chunk size 3', chunkSizeSectors: 3, setUp: async () => undefined },
    { what: 'table chunk size smaller than the 4 KiB block', lbs: 4096, chunkSizeSectors: 4, setUp: async () => undefined },
    { what: 'a COW too small for header + area 0', sizeSectors: 8, chunkSizeSectors: 8, setUp: async () => undefined },
    { what: 'a new COW opened read-only', chunkSizeSectors: 8, readOnly: true, setUp: async () => undefined },
    {
      what: 'a duplicated origin chunk',
      chunkSizeSectors: 8,
      setUp: async (cow) => {
        await writeChunk(cow, 0, 8, header(4096, { chunkSize: 8 }));
        await writeChunk(cow, 1, 8, areaImage(8, [[5, 2], [5, 3]]));
      },
    },
    {
      what: 'WAL records for a COW with no header (wiped or replaced)',
      chunkSizeSectors: 8,
      withWal: true,
      setUp: async (_cow, wal) => {
        wal.records = [{ index: 0, oldChunk: chunks(1), newChunk: chunks(2) }];
      },
    },
    {
      what: 'a WAL record that disagrees with the slot on the COW (someone else wrote it)',
      chunkSizeSectors: 8,
      withWal: true,
      setUp: async (cow, wal) => {
        await writeChunk(cow, 0, 8, header(4096, { chunkSize: 8 }));
        await writeChunk(cow, 1, 8, areaImage(8, [[1, 2], [9, 3]]));
        wal.records = [
          { index: 1, oldChunk: chunks(2), newChunk: chunks(3) },
          { index: 2, oldChunk: chunks(3), newChunk: chunks(4) },
        ];
      },
    },
    {
      what: 'a WAL that continues past a gap after the COW records (records removed elsewhere)',
      chunkSizeSectors: 8,
      withWal: true,
      setUp: async (cow, wal) => {
        await writeChunk(cow, 0, 8, header(4096, { chunkSize: 8 }));
        await writeChunk(cow, 1, 8, areaImage(8, [[1, 2]]));
        wal.records = [{ index: 3, oldChunk: chunks(7), newChunk: chunks(5) }];
      },
    },
  ];
  for (const k of cases) {
    test(k.what, async () => {
      const cow = mem(k.sizeSectors ?? 1024, k.lbs ?? 512);
      const wal = new WalMedium();
      await k.setUp(cow, wal);
      const before = cow.snapshotBytes();
      const walBefore = JSON.stringify(wal.records);
      const err = await open({ cow, chunkSizeSectors: sectors(k.chunkSizeSectors), readOnly: k.readOnly, wal: k.withWal ? wal.view() : undefined }).then(
        () => undefined,
        (e: unknown) => e,
      );
      expect(err).toBeInstanceOf(DmError);
      expect((err as DmError).code).toBe('DM_TABLE_INVALID');
      expect(cow.snapshotBytes().equals(before), 'the COW is unchanged').toBe(true);
      expect(JSON.stringify(wal.records), 'the WAL is unchanged').toBe(walBefore);
    });
  }

  test('bad magic says "Invalid or corrupt snapshot"', async () => {
    const cow = mem(256);
    await writeChunk(cow, 0, 8, header(4096, { magic: 1, chunkSize: 8 }));
    await expect(open({ cow, chunkSizeSectors: sectors(8) })).rejects.toThrow('Invalid or corrupt snapshot');
  });

  test('a read-only store loads an existing COW without writing and never allocates', async () => {
    const cow = mem(256);
    const w = await open({ cow, chunkSizeSectors: sectors(8) });
    const pairs = await prepareAndCommit(w.store, [4, 5, 6]);
    await persistentStore.close(w.store);
    const before = cow.snapshotBytes();
    const r = await open({ cow, readOnly: true });
    expect(r.found).toEqual(pairs);
    expect(persistentStore.prepareException(r.store)).toBe(-1);
    await persistentStore.drop(r.store);
    await persistentStore.close(r.store);
    expect(cow.snapshotBytes().equals(before)).toBe(true);
  });
});

// ---- failures -----------------------------------------------------------------------------------------------------

describe('persistent store: write failures', () => {
  test('a failed area write invalidates the store: that group and every later one get false', async () => {
    const faulty = new FaultyBlockDevice(mem(256));
    const { store } = await open({ cow: faulty, chunkSizeSectors: sectors(8) });
    expect((await prepareAndCommit(store, [1])).length).toBe(1);
    faulty.setErrorRules([{ op: 'write', startSector: sectors(8), endSector: sectors(16) }]);
    const a = persistentStore.prepareException(store);
    expect(await commit(store, 2, a)).toBe(false);
    faulty.setErrorRules([]);
    const b = persistentStore.prepareException(store);
    expect(await commit(store, 3, b)).toBe(false);
    expect(store.valid).toBe(false);
  });

  test('filling the last area when the next one is past the end of the COW invalidates (Linux: zero_disk_area fails)', async () => {
    for (const withWal of [false, true]) {
      const cow = mem(34); // chunks 0..33 of 1 sector: area 1 would be chunk 34
      const { store } = await open({ cow, chunkSizeSectors: sectors(1), wal: withWal ? new WalMedium().view() : undefined });
      const got: number[] = [];
      for (let c = persistentStore.prepareException(store); c !== -1; c = persistentStore.prepareException(store)) got.push(c);
      expect(got.length).toBe(32);
      const pairs: Pair[] = got.map((c, i) => [i, c]);
      expect(await commitMany(store, pairs.slice(0, 31)), `first 31 (wal ${withWal})`).toEqual(Array(31).fill(true));
      expect(await commit(store, ...pairs[31]), 'the commit that fills the area').toBe(false);
      expect(store.valid).toBe(false);
    }
  });
});

// ---- WAL ----------------------------------------------------------------------------------------------------------

describe('persistent store: WAL mode', () => {
  test('commits are durable through the WAL only (one append per group); the areas wait for the checkpoint', async () => {
    const cow = mem(512);
    const wal = new WalMedium();
    const { store } = await open({ cow, chunkSizeSectors: sectors(1), wal: wal.view(), checkpointExceptionsMax: 1000 });
    const formatted = cow.snapshotBytes();
    const pairs = await prepareAndCommit(store, [10, 11, 12, 13, 14]);
    expect(wal.appendSizes).toEqual([5]);
    expect(wal.records).toEqual(pairs.map(([o, n], index) => ({ index, oldChunk: o, newChunk: n })));
    pairs.push(...(await prepareAndCommit(store, [20])));
    expect(wal.appendSizes).toEqual([5, 1]);
    expect(wal.records[5].index).toBe(5);
    expect(cow.snapshotBytes().equals(formatted), 'no area written').toBe(true);

    await persistentStore.checkpoint!(store);
    expect((await readChunk(cow, 1, 1)).equals(areaImage(1, pairs))).toBe(true);
    expect(wal.records).toEqual([]);
    await persistentStore.close(store);
  });

  test('reopen without a checkpoint recovers the areas and the WAL tail; the next checkpoint writes Linux layout', async () => {
    const cs = 1;
    const cow = mem(512);
    const wal = new WalMedium();
    const a = await open({ cow, chunkSizeSectors: sectors(cs), wal: wal.view(), checkpointExceptionsMax: 1000 });
    const pairs = await prepareAndCommit(a.store, [...Array(10).keys()].map((i) => 100 + i));
    await persistentStore.checkpoint!(a.store);
    // 30 more through the WAL only, crossing from area 0 into area 1; then the process dies.
    for (let i = 0; i < 30; i++) pairs.push(...(await prepareAndCommit(a.store, [200 + i])));
    expect(wal.records.length).toBe(30);
    expect((await readChunk(cow, 1, cs)).equals(areaImage(cs, pairs.slice(0, 10))), 'area 0 as of the checkpoint').toBe(true);
    const usage = persistentStore.usage(a.store);
    wal.crash();

    const b = await open({ cow, wal: wal.view(), checkpointExceptionsMax: 1000 });
    expect(b.found).toEqual(pairs);
    expect(persistentStore.usage(b.store)).toEqual(usage);
    await persistentStore.checkpoint!(b.store);
    expect((await readChunk(cow, 1, cs)).equals(areaImage(cs, pairs.slice(0, 32)))).toBe(true);
    expect((await readChunk(cow, 34, cs)).equals(areaImage(cs, pairs.slice(32)))).toBe(true);
    expect(wal.records).toEqual([]);
    await persistentStore.close(b.store);

    // The COW alone (no WAL) now reads the same: it is a plain Linux COW.
    const c = await open({ cow });
    expect(c.found).toEqual(pairs);
  });

  test('a WAL record whose slot already holds the same values is fine (a checkpoint that died before its trim)', async () => {
    const cow = mem(512);
    const wal = new WalMedium();
    const a = await open({ cow, chunkSizeSectors: sectors(1), wal: wal.view() });
    const pairs = await prepareAndCommit(a.store, [1, 2, 3]);
    const kept = wal.records.map((r) => ({ ...r }));
    await persistentStore.checkpoint!(a.store);
    wal.records = kept; // the trim was lost
    pairs.push(...(await prepareAndCommit(a.store, [4])));
    wal.crash();
    const b = await open({ cow, wal: wal.view() });
    expect(b.found).toEqual(pairs);
    await persistentStore.close(b.store);
    expect(wal.records).toEqual([]);
  });

  test('a checkpoint that fills an area zeroes the next one; the store checkpoints by itself every checkpointExceptionsMax', async () => {
    const cs = 1;
    const cow = mem(512);
    await writeChunk(cow, 34, cs, Buffer.alloc(512, 0xee));
    const wal = new WalMedium();
    const { store } = await open({ cow, chunkSizeSectors: sectors(cs), wal: wal.view(), checkpointExceptionsMax: 10 });
    const pairs: Pair[] = [];
    for (let i = 0; i < 32; i++) pairs.push(...(await prepareAndCommit(store, [i])));
    await turn();
    // Checkpoints ran at 10, 20, 30: the WAL holds the last two.
    expect(wal.records.map((r) => r.index)).toEqual([30, 31]);
    expect((await readChunk(cow, 1, cs)).equals(areaImage(cs, pairs.slice(0, 30)))).toBe(true);
    expect((await readChunk(cow, 34, cs)).equals(Buffer.alloc(512, 0xee)), 'area 1 not yet reached').toBe(true);
    await persistentStore.checkpoint!(store);
    expect((await readChunk(cow, 1, cs)).equals(areaImage(cs, pairs))).toBe(true);
    expect((await readChunk(cow, 34, cs)).every((b) => b === 0), 'area 1 zeroed').toBe(true);
    expect(wal.records).toEqual([]);
    await persistentStore.close(store);
  });

  test('close checkpoints; drop clears the WAL', async () => {
    const cow = mem(512);
    const wal = new WalMedium();
    const a = await open({ cow, chunkSizeSectors: sectors(1), wal: wal.view() });
    const pairs = await prepareAndCommit(a.store, [7, 8]);
    await persistentStore.close(a.store);
    expect(wal.records).toEqual([]);
    expect((await readChunk(cow, 1, 1)).equals(areaImage(1, pairs))).toBe(true);
    const b = await open({ cow, wal: wal.view() });
    await prepareAndCommit(b.store, [9]);
    expect(wal.records.length).toBe(1);
    await persistentStore.drop(b.store);
    expect(wal.records).toEqual([]);
    expect((await readChunk(cow, 0, 1)).readUInt32LE(4)).toBe(0);
  });
});

// ---- merge --------------------------------------------------------------------------------------------------------

/** Runs one merge step like the snapshot-merge target: prepareMerge, then commitMerge in lock-step with `table`. */
async function mergeStep(store: PersistentStore, table: ExceptionTable, cleared: Pair[] = []): Promise<number> {
  const run = persistentStore.prepareMerge!(store);
  if (run.count === 0) return 0;
  await persistentStore.commitMerge!(store, run.count, (o, n) => {
    cleared.push([o, n]);
    return table.clearMerged(o, n);
  });
  return run.count;
}

describe('persistent store: merge', () => {
  test('prepareMerge finds linear runs at the newest record; commitMerge clears them newest first, as Linux', async () => {
    const cs = 1;
    const cow = mem(512);
    const { store } = await open({ cow, chunkSizeSectors: sectors(cs) });
    const pairs = await prepareAndCommit(store, [100, 101, 102, 7, 200, 201]);
    expect(pairs.map((p) => p[1])).toEqual([2, 3, 4, 5, 6, 7]);
    const table = new ExceptionTable();
    for (const [o, n] of pairs) table.insert(chunks(o), chunks(n));

    expect(persistentStore.prepareMerge!(store)).toEqual({ count: 2, lastOldChunk: 201, lastNewChunk: 7 });
    const cleared: Pair[] = [];
    expect(await mergeStep(store, table, cleared)).toBe(2);
    expect(cleared).toEqual([[201, 7], [200, 6]]);
    expect((await readChunk(cow, 1, cs)).equals(areaImage(cs, pairs.slice(0, 4)))).toBe(true);
    // next_free = area_location(current_area) + current_committed + 1
    expect(persistentStore.usage(store)).toEqual({ totalSectors: 512, sectorsAllocated: 6, metadataSectors: 2 });

    expect(await mergeStep(store, table)).toBe(1);
    expect(await mergeStep(store, table)).toBe(3);
    expect(await mergeStep(store, table)).toBe(0);
    expect(table.size).toBe(0);
    // Done: sectors_allocated == metadata_sectors (Linux shows `16/... 16` with 8-sector chunks).
    expect(persistentStore.usage(store)).toEqual({ totalSectors: 512, sectorsAllocated: 2, metadataSectors: 2 });
    expect((await readChunk(cow, 1, cs)).every((b) => b === 0)).toBe(true);
    await persistentStore.close(store);
    expect((await open({ cow })).found).toEqual([]);
  });

  test('merge steps back into the previous area when the current one is empty', async () => {
    const cs = 1;
    const cow = mem(512);
    const a = await open({ cow, chunkSizeSectors: sectors(cs) });
    const pairs = await prepareAndCommit(a.store, [...Array(40).keys()].map((i) => 1000 + i));
    const table = new ExceptionTable();
    for (const [o, n] of pairs) table.insert(chunks(o), chunks(n));
    expect(await mergeStep(a.store, table)).toBe(8);
    expect(persistentStore.usage(a.store).metadataSectors, 'area 1 still current (empty)').toBe(3);
    await persistentStore.close(a.store);

    const b = await open({ cow });
    expect(b.found).toEqual(pairs.slice(0, 32));
    expect(persistentStore.usage(b.store).metadataSectors).toBe(3);
    expect(persistentStore.prepareMerge!(b.store)).toEqual({ count: 32, lastOldChunk: 1031, lastNewChunk: 33 });
    expect(persistentStore.usage(b.store).metadataSectors, 'stepped back to area 0').toBe(2);
    await persistentStore.commitMerge!(b.store, 32, (o, n) => table.clearMerged(o, n));
    expect(persistentStore.prepareMerge!(b.store).count).toBe(0);
    expect(persistentStore.usage(b.store)).toEqual({ totalSectors: 512, sectorsAllocated: 2, metadataSectors: 2 });
  });

  test('a back-merged in-core run clears in lock-step (its FIRST chunk first)', async () => {
    const cow = mem(512);
    const { store } = await open({ cow, chunkSizeSectors: sectors(1) });
    const a = persistentStore.prepareException(store);
    const b = persistentStore.prepareException(store);
    // Copies finishing out of order: (5 → 3) is committed before (4 → 2), so the in-core table back-merges.
    expect(await commitMany(store, [[5, b], [4, a]])).toEqual([true, true]);
    const table = new ExceptionTable();
    table.insert(chunks(5), chunks(b));
    table.insert(chunks(4), chunks(a));
    expect([...table.runs()]).toEqual([{ oldChunk: 4, newChunk: 2, count: 1 }]);
    const cleared: Pair[] = [];
    expect(await mergeStep(store, table, cleared)).toBe(1);
    expect([...table.runs()]).toEqual([{ oldChunk: 5, newChunk: 3, count: 0 }]);
    expect(await mergeStep(store, table, cleared)).toBe(1);
    expect(cleared).toEqual([[4, 2], [5, 3]]);
    expect(table.size).toBe(0);
  });

  test('clearInCore refusing aborts commitMerge with an error and writes nothing', async () => {
    const cow = mem(512);
    const { store } = await open({ cow, chunkSizeSectors: sectors(1) });
    await prepareAndCommit(store, [1, 2, 3]);
    const before = cow.snapshotBytes();
    const run = persistentStore.prepareMerge!(store);
    const err = await persistentStore.commitMerge!(store, run.count, () => false).then(() => undefined, (e: unknown) => e);
    expect(err).toBeInstanceOf(DmError);
    expect(cow.snapshotBytes().equals(before)).toBe(true);
  });

  test('WAL mode: the merge checkpoints, empties the WAL, then clears the area; a reload keeps it merged', async () => {
    const cow = mem(512);
    const wal = new WalMedium();
    const a = await open({ cow, chunkSizeSectors: sectors(1), wal: wal.view(), checkpointExceptionsMax: 1000 });
    const pairs = await prepareAndCommit(a.store, [50, 51, 52, 9, 60, 61, 62]);
    expect(wal.records.length).toBe(7);
    const table = new ExceptionTable();
    for (const [o, n] of pairs) table.insert(chunks(o), chunks(n));
    expect(await mergeStep(a.store, table)).toBe(3);
    expect(wal.records).toEqual([]);
    expect((await readChunk(cow, 1, 1)).equals(areaImage(1, pairs.slice(0, 4)))).toBe(true);
    wal.crash();
    const b = await open({ cow, wal: wal.view() });
    expect(b.found).toEqual(pairs.slice(0, 4));
  });
});

// ---- merge batches ------------------------------------------------------------------------------------------------

/**
 * The runs prepare_merge finds one commit after the other for `pairs` (on-disk order) with E records per area:
 * [count, lastOld, lastNew], newest first (the model of prepareMergeRuns: a run never crosses an area).
 */
function modelRuns(pairs: readonly Pair[], epa: number): Array<[number, number, number]> {
  const out: Array<[number, number, number]> = [];
  for (let last = pairs.length - 1; last >= 0; ) {
    const [o, n] = pairs[last];
    let count = 1;
    while (count <= last % epa && pairs[last - count][0] === o - count && pairs[last - count][1] === n - count) count++;
    out.push([count, o, n]);
    last -= count;
  }
  return out;
}

const asTriples = (runs: ReadonlyArray<{ count: number; lastOldChunk: number; lastNewChunk: number }>): Array<[number, number, number]> =>
  runs.map((r) => [r.count, r.lastOldChunk, r.lastNewChunk]);

/** Old chunks in runs of 1..6 consecutive chunks, `count` in all (seeded). */
function runsOfOlds(count: number, seed: number): number[] {
  const rng = createRng(seed);
  const olds: number[] = [];
  for (let base = 0; olds.length < count; base += 100) for (let i = 0, k = rng.int(6); i <= k && olds.length < count; i++) olds.push(base + i);
  return olds;
}

/** A COW device whose writes wait while the gate is shut (reads and flushes pass). */
class GatedCow extends FaultyBlockDevice {
  private gate: Promise<void> | undefined;
  private open: () => void = () => undefined;
  writesWaiting = 0;
  shut(): void {
    this.gate ??= new Promise((resolve) => (this.open = resolve));
  }
  reopen(): void {
    this.open();
    this.gate = undefined;
  }
  protected override async _write(s: Sector, b: Uint8Array, fua: boolean): Promise<void> {
    if (this.gate) {
      this.writesWaiting++;
      await this.gate;
      this.writesWaiting--;
    }
    return super._write(s, b, fua);
  }
}

describe('persistent store: merge batches (prepareMergeRuns, commitMerge over several runs and areas)', () => {
  test('prepareMergeRuns returns the runs prepare_merge finds one commit after the other, across areas, up to the limits', async () => {
    const cow = mem(1024);
    const { store } = await open({ cow, chunkSizeSectors: sectors(1) });
    const pairs = await prepareAndCommit(store, runsOfOlds(150, 1)); // 32 records per area: areas 0..4
    const model = modelRuns(pairs, 32);
    const all = await persistentStore.prepareMergeRuns!(store, { chunksMax: 10_000, runsMax: 10_000 });
    expect(asTriples(all)).toEqual(model);
    expect(all.reduce((n, r) => n + r.count, 0)).toBe(150);
    // Runs stop at area boundaries: the model's runs never cross one, and prepareMerge agrees on the first.
    expect(asTriples([persistentStore.prepareMerge!(store)])).toEqual([model[0]]);
    // runsMax, chunksMax (whole runs only; the first run whole even when longer than chunksMax).
    expect(asTriples(await persistentStore.prepareMergeRuns!(store, { chunksMax: 10_000, runsMax: 3 }))).toEqual(model.slice(0, 3));
    const firstTwo = model[0][0] + model[1][0];
    expect(asTriples(await persistentStore.prepareMergeRuns!(store, { chunksMax: firstTwo, runsMax: 100 }))).toEqual(model.slice(0, 2));
    expect(asTriples(await persistentStore.prepareMergeRuns!(store, { chunksMax: firstTwo + model[2][0] - 1, runsMax: 100 }))).toEqual(model.slice(0, 2));
    expect(asTriples(await persistentStore.prepareMergeRuns!(store, { chunksMax: 1, runsMax: 100 }))).toEqual(model.slice(0, 1));
    // Runs below the newest records (a copied batch whose commit is to come) change nothing (the current area is not empty).
    const usage = persistentStore.usage(store);
    const below = model[0][0] + model[1][0];
    expect(asTriples(await persistentStore.prepareMergeRuns!(store, { chunksMax: 10_000, runsMax: 4 }, below))).toEqual(model.slice(2, 6));
    expect(persistentStore.usage(store)).toEqual(usage);
    expect(await persistentStore.prepareMergeRuns!(store, { chunksMax: 10, runsMax: 10 }, 150)).toEqual([]);
    expect(() => persistentStore.prepareMergeRuns!(store, { chunksMax: 0, runsMax: 1 })).toThrow(/limits/);
  });

  test('one commitMerge over runs in three areas: lock-step newest first, every changed area written, the state of run-by-run commits', async () => {
    const cow = mem(1024);
    const a = await open({ cow, chunkSizeSectors: sectors(1) });
    const pairs = await prepareAndCommit(a.store, runsOfOlds(110, 2)); // areas 0..3, 14 records in area 3
    const table = new ExceptionTable();
    for (const [o, n] of pairs) table.insert(chunks(o), chunks(n));
    const model = modelRuns(pairs, 32);
    // A batch from the newest record down into area 1: whole runs covering at least 50 records.
    let take = 0;
    let runs = 0;
    while (take < 50) take += model[runs++][0];
    const batch = await persistentStore.prepareMergeRuns!(a.store, { chunksMax: take, runsMax: runs });
    expect(batch.length).toBe(runs);
    const cleared: Pair[] = [];
    let clearedWhenOnCleared = -1;
    await persistentStore.commitMerge!(
      a.store,
      take,
      (o, n) => {
        cleared.push([o, n]);
        return table.clearMerged(o, n);
      },
      () => (clearedWhenOnCleared = cleared.length),
    );
    expect(cleared).toEqual(pairs.slice(110 - take).reverse());
    expect(clearedWhenOnCleared).toBe(take);
    const left = 110 - take;
    // Every area from the one holding the oldest cleared record up is on disk as it must be.
    for (let area = Math.floor(left / 32); area <= 3; area++) {
      expect((await readChunk(cow, areaLocation(area, 1), 1)).equals(areaImage(1, pairs.slice(area * 32, Math.min(left, (area + 1) * 32)))), `area ${area}`).toBe(true);
    }
    // Usage as after the same runs committed one per step: next_free = area location + records left in it + 1.
    const area = Math.floor(left / 32);
    expect(persistentStore.usage(a.store)).toEqual({ totalSectors: 1024, sectorsAllocated: areaLocation(area, 1) + (left - area * 32) + 1, metadataSectors: area + 2 });
    // The rest in one more batch; then a reload finds nothing.
    const rest = await persistentStore.prepareMergeRuns!(a.store, { chunksMax: 1000, runsMax: 1000 });
    expect(asTriples(rest)).toEqual(model.slice(runs));
    await persistentStore.commitMerge!(a.store, left, (o, n) => table.clearMerged(o, n));
    expect(table.size).toBe(0);
    expect(persistentStore.usage(a.store)).toEqual({ totalSectors: 1024, sectorsAllocated: 2, metadataSectors: 2 });
    await persistentStore.close(a.store);
    for (let area = 0; area <= 3; area++) expect((await readChunk(cow, areaLocation(area, 1), 1)).every((x) => x === 0), `area ${area} zeroed`).toBe(true);
    expect((await open({ cow })).found).toEqual([]);
  });

  test('a batch whose clearInCore refuses inside it: the whole runs before are committed, the refused run and older stay', async () => {
    const cow = mem(1024);
    const a = await open({ cow, chunkSizeSectors: sectors(1) });
    const pairs = await prepareAndCommit(a.store, runsOfOlds(80, 3));
    const model = modelRuns(pairs, 32);
    // Refuse the second record of the fourth run (or its first if it has one record).
    const before = model[0][0] + model[1][0] + model[2][0];
    const refuseAt = before + Math.min(1, model[3][0] - 1);
    let calls = 0;
    const err = await persistentStore
      .commitMerge!(a.store, before + model[3][0] + model[4][0], () => calls++ !== refuseAt)
      .then(() => undefined, (e: unknown) => e);
    expect(err).toBeInstanceOf(DmError);
    expect((err as DmError).code).toBe('DM_INVALID_ARGUMENT');
    expect(calls).toBe(refuseAt + 1);
    await persistentStore.close(a.store);
    expect((await open({ cow })).found, 'the three runs before the refused one are merged, nothing else').toEqual(pairs.slice(0, 80 - before));
  });

  test('onCleared comes before the area writes are durable: the next batch is prepared meanwhile, its commit waits for them', async () => {
    const cow = new GatedCow(mem(1024), { volatileCache: true });
    const a = await open({ cow, chunkSizeSectors: sectors(1) });
    const pairs = await prepareAndCommit(a.store, runsOfOlds(70, 4));
    const model = modelRuns(pairs, 32);
    const table = new ExceptionTable();
    for (const [o, n] of pairs) table.insert(chunks(o), chunks(n));
    cow.shut();
    let cleared = false;
    let durable = false;
    const first = persistentStore.commitMerge!(a.store, model[0][0], (o, n) => table.clearMerged(o, n), () => (cleared = true)).then(() => (durable = true));
    while (!cleared) await turn();
    await turn();
    expect(durable, 'not durable while its area write waits').toBe(false);
    expect(cow.writesWaiting).toBe(1);
    // The store has moved on: the next runs (and usage) are those after the first run.
    expect(asTriples(await persistentStore.prepareMergeRuns!(a.store, { chunksMax: 1000, runsMax: 2 }))).toEqual(model.slice(1, 3));
    const second = persistentStore.commitMerge!(a.store, model[1][0], (o, n) => table.clearMerged(o, n));
    await turn();
    expect(cow.writesWaiting, "the second commit's writes wait behind the first's").toBe(1);
    cow.reopen();
    await Promise.all([first, second]);
    expect(durable).toBe(true);
    // checkpoint() waits for merge writes too; a crash now keeps both commits.
    await persistentStore.checkpoint!(a.store);
    await cow.crash();
    expect((await open({ cow: new CutDevice(cow) })).found).toEqual(pairs.slice(0, 70 - model[0][0] - model[1][0]));
  });

  test('a failed area write rejects the commit (DM_IO) and every merge call after it', async () => {
    const cow = new FaultyBlockDevice(mem(1024));
    const a = await open({ cow, chunkSizeSectors: sectors(1) });
    const pairs = await prepareAndCommit(a.store, runsOfOlds(40, 5));
    const table = new ExceptionTable();
    for (const [o, n] of pairs) table.insert(chunks(o), chunks(n));
    cow.setErrorRules([{ op: 'write' }]);
    const run = persistentStore.prepareMerge!(a.store);
    const err = await persistentStore.commitMerge!(a.store, run.count, (o, n) => table.clearMerged(o, n)).then(() => undefined, (e: unknown) => e);
    expect((err as DmError).code).toBe('DM_IO');
    cow.setErrorRules([]);
    await expect(persistentStore.prepareMergeRuns!(a.store, { chunksMax: 10, runsMax: 10 })).rejects.toThrow(/metadata areas/);
    await expect(persistentStore.commitMerge!(a.store, 1, () => true)).rejects.toThrow(/metadata areas/);
    await persistentStore.close(a.store);
    expect((await open({ cow })).found, 'nothing merged on disk').toEqual(pairs);
  });

  test('a crash at any I/O of batched merges (between two area writes of one commit too) leaves a prefix, never a merged record back', async () => {
    /** Counts the writes that land on metadata areas (chunk size 1). */
    class AreaCountingCut extends CutDevice {
      areaWrites = 0;
      protected override _write(sector: Sector, buf: Uint8Array, fua: boolean): Promise<void> {
        return super._write(sector, buf, fua).then(() => {
          if (isMetadataChunk(sector, 1)) this.areaWrites++;
        });
      }
    }
    let insideCommits = 0;
    for (let seed = 1; seed <= 150; seed++) {
      const rng = createRng(9100 + seed);
      const wal = seed % 2 === 0 ? new WalMedium() : undefined;
      const faulty = new FaultyBlockDevice(await garbageCow(1024), { volatileCache: true, rng });
      const power = new Power(Infinity);
      const cow = new AreaCountingCut(faulty, power);
      const { store } = await open({ cow, chunkSizeSectors: sectors(1), wal: wal?.view(power), checkpointExceptionsMax: 7 });
      const pairs = await prepareAndCommit(store, runsOfOlds(100, seed));
      const table = new ExceptionTable();
      for (const [o, n] of pairs) table.insert(chunks(o), chunks(n));
      // Power for a seeded number of writes, flushes and WAL operations from here on: the merge runs into the cut.
      power.budget = rng.int(30);
      let floor = pairs.length; // records left after the last commit that resolved
      let remaining = pairs.length; // records left once the last commit started
      try {
        for (;;) {
          const batch = await persistentStore.prepareMergeRuns!(store, { chunksMax: 1 + rng.int(60), runsMax: 1 + rng.int(20) });
          if (batch.length === 0) break;
          const n = batch.reduce((sum, r) => sum + r.count, 0);
          const areas = Math.floor((remaining - 1) / 32) - Math.floor((remaining - n) / 32) + 1;
          remaining -= n;
          const areaWritesBefore = cow.areaWrites;
          try {
            await persistentStore.commitMerge!(store, n, (o, nn) => table.clearMerged(o, nn));
          } catch (e) {
            const written = cow.areaWrites - areaWritesBefore;
            if (areas > 1 && written >= 1 && written < areas) insideCommits++;
            throw e;
          }
          floor = remaining;
        }
      } catch {
        // the cut
      }
      wal?.crash();
      await faulty.crash({ torn: rng.int(2) === 0 });
      const again = await open({ cow: new CutDevice(faulty), wal: wal?.view() });
      expect(again.valid).toBe(true);
      const n = again.found.length;
      expect(again.found, `seed ${seed}`).toEqual(pairs.slice(0, n));
      expect(n, `seed ${seed}: a durable merge commit came back`).toBeLessThanOrEqual(floor);
      expect(n, `seed ${seed}: more merged than committed`).toBeGreaterThanOrEqual(remaining);
    }
    expect(insideCommits, 'crashes between two area writes of one commit').toBeGreaterThan(5);
  });
});

// ---- crashes ------------------------------------------------------------------------------------------------------

/** Data a workload writes into the COW chunk of origin chunk `old` (never zero, so it never passes for a hole). */
function patternFor(old: number, chunkBytes: number): Buffer {
  const buf = Buffer.alloc(chunkBytes);
  for (let i = 0; i < chunkBytes; i += 4) buf.writeUInt32LE((old * 2654435761 + i + 1) >>> 0 || 1, i);
  return buf;
}

/**
 * A COW whose every sector from 2 on holds plausible records (small old and new chunk numbers): an area the store
 * forgot to zero before relying on its end marker shows up as exceptions nobody committed.
 */
async function garbageCow(sizeSectors: number): Promise<MemoryBlockDevice> {
  let buf = garbageBySize.get(sizeSectors);
  if (!buf) {
    const rng = createRng(sizeSectors);
    buf = Buffer.alloc((sizeSectors - 2) * 512);
    for (let at = 0; at < buf.length; at += 16) {
      buf.writeUInt32LE(rng.int(100_000), at);
      buf.writeUInt32LE(1 + rng.int(sizeSectors), at + 8);
    }
    garbageBySize.set(sizeSectors, buf);
  }
  const dev = mem(sizeSectors);
  await dev.write(sectors(2), buf); // chunk 0 stays zeroed for chunk sizes of 1 and 2 sectors
  return dev;
}
const garbageBySize = new Map<number, Buffer>();

interface CrashWorld {
  readonly faulty: FaultyBlockDevice;
  readonly wal: WalMedium | undefined;
  readonly chunkSizeSectors: number;
  /** old → new of every exception whose commit was called (its data was written first). */
  readonly committed: Map<number, number>;
  /** old → new of every exception whose callback reported success before a crash. */
  readonly acked: Map<number, number>;
  nextOld: number;
}

/** Reopens the store after a crash and checks: every acknowledged exception is there, nothing else than committed ones, data intact. */
async function reopenAndCheck(world: CrashWorld, cow: BlockDevice, power: Power | undefined, label: string): Promise<Opened> {
  const opened = await open({ cow, chunkSizeSectors: sectors(world.chunkSizeSectors), wal: world.wal?.view(power), checkpointExceptionsMax: 5 });
  expect(opened.valid, `${label}: valid`).toBe(true);
  const found = new Map(opened.found);
  expect(found.size, `${label}: no duplicates`).toBe(opened.found.length);
  const problems: string[] = [];
  for (const [o, n] of world.acked) if (found.get(o) !== n) problems.push(`acked ${o} -> ${n} found as ${found.get(o)}`);
  const news = new Set<number>();
  const chunkBytes = world.chunkSizeSectors * 512;
  for (const [o, n] of opened.found) {
    if (world.committed.get(o) !== n) problems.push(`found ${o} -> ${n}, never committed`);
    if (isMetadataChunk(n, world.chunkSizeSectors)) problems.push(`found ${o} -> ${n}: a metadata chunk`);
    if (news.has(n)) problems.push(`chunk ${n} used twice`);
    news.add(n);
    const data = await readChunk(cow, n, world.chunkSizeSectors);
    if (!data.equals(patternFor(o, chunkBytes))) problems.push(`data of ${o} in chunk ${n} lost`);
  }
  expect(problems, label).toEqual([]);
  // What survived is now the truth: forget what was lost, so the next round may reuse those chunks.
  world.committed.clear();
  world.acked.clear();
  for (const [o, n] of opened.found) {
    world.committed.set(o, n);
    world.acked.set(o, n);
  }
  return opened;
}

/** Workload steps per round at most (a round usually ends earlier, when its power runs out). */
const CRASH_ROUND_STEPS_MAX = 400;

/**
 * Copies and commits until the power runs out: data into the COW chunks (cached, not flushed), commits sometimes
 * out of allocation order, random turns in between. Then the cache loses what was not flushed (sometimes torn).
 */
async function workloadUntilCrash(world: CrashWorld, store: PersistentStore, cow: CutDevice, power: Power, rng: Rng): Promise<void> {
  const chunkBytes = world.chunkSizeSectors * 512;
  try {
    for (let step = 0; step < CRASH_ROUND_STEPS_MAX && !power.off; step++) {
      const batch: Pair[] = [];
      const want = 1 + rng.int(4);
      for (let i = 0; i < want; i++) {
        const c = persistentStore.prepareException(store);
        if (c === -1) break;
        batch.push([world.nextOld++ * 3 + rng.int(3), c]);
      }
      for (const [o, n] of batch) await cow.write(sectors(n * world.chunkSizeSectors), patternFor(o, chunkBytes));
      if (rng.int(3) === 0) batch.reverse();
      for (const [o, n] of batch) {
        world.committed.set(o, n);
        // Success means every I/O it depended on completed before the power went: it must survive.
        persistentStore.commitException(store, chunks(o), chunks(n), (ok) => {
          if (ok) world.acked.set(o, n);
        });
        if (rng.int(3) === 0) await turn();
      }
      await (rng.int(2) === 0 || batch.length === 0 ? turn() : Promise.resolve());
    }
  } catch {
    // A data write after the power went.
  }
  for (let i = 0; i < 3; i++) await turn(); // let the store's jobs notice
  cow.cut();
  world.wal?.crash();
  await world.faulty.crash({ torn: rng.int(2) === 0 });
}

describe('persistent store: crashes (FaultyBlockDevice volatile cache)', () => {
  const SEEDS_PER_MODE = 250;
  const ROUNDS = 3;
  /** A round's power budget is drawn from [0, this) writes, flushes and WAL operations. */
  const CRASH_IO_BUDGET_MAX = 200;
  for (const withWal of [false, true]) {
    test(`every acknowledged exception survives ${SEEDS_PER_MODE * ROUNDS} crashes (${withWal ? 'WAL' : 'no WAL'})`, async () => {
      let crashes = 0;
      for (let seed = 1; seed <= SEEDS_PER_MODE; seed++) {
        const rng = createRng(seed * 2 + (withWal ? 1 : 0));
        const chunkSizeSectors = rng.int(2) === 0 ? 1 : 2;
        const faulty = new FaultyBlockDevice(await garbageCow(2048), { volatileCache: true, rng });
        const world: CrashWorld = { faulty, wal: withWal ? new WalMedium() : undefined, chunkSizeSectors, committed: new Map(), acked: new Map(), nextOld: 1 };
        for (let round = 0; round < ROUNDS; round++) {
          const power = new Power(Infinity);
          const cow = new CutDevice(faulty, power);
          const { store } = await reopenAndCheck(world, cow, power, `seed ${seed} round ${round} (before)`);
          power.budget = rng.int(CRASH_IO_BUDGET_MAX);
          await workloadUntilCrash(world, store, cow, power, rng);
          crashes++;
        }
        await reopenAndCheck(world, new CutDevice(faulty), undefined, `seed ${seed} final`);
      }
      expect(crashes).toBe(SEEDS_PER_MODE * ROUNDS);


    });
  }

  test('a crash during the format leaves a COW that formats again (chunk 0 still zero) or a formatted one', async () => {
    for (let seed = 1; seed <= 100; seed++) {
      const rng = createRng(seed);
      const faulty = new FaultyBlockDevice(mem(256), { volatileCache: true, rng });
      const cow = new CutDevice(faulty);
      const opening = open({ cow, chunkSizeSectors: sectors(1) }).catch(() => undefined);
      for (let i = rng.int(4); i > 0; i--) await Promise.resolve();
      cow.cut();
      await faulty.crash({ torn: true });
      await opening;
      const again = await open({ cow: new CutDevice(faulty), chunkSizeSectors: sectors(1) });
      expect([again.valid, again.found]).toEqual([true, []]);
    }
  });

  test('merge: a crash at any point leaves the records of a prefix, never a merged one back', async () => {
    let crashes = 0;
    for (let seed = 1; seed <= 150; seed++) {
      const rng = createRng(7000 + seed);
      const withWal = seed % 2 === 0;
      const wal = withWal ? new WalMedium() : undefined;
      const faulty = new FaultyBlockDevice(await garbageCow(1024), { volatileCache: true, rng });
      const cow = new CutDevice(faulty);
      const { store } = await open({ cow, chunkSizeSectors: sectors(1), wal: wal?.view(), checkpointExceptionsMax: 5 });
      // Runs of consecutive old chunks, so merge steps take several records at once.
      const olds: number[] = [];
      for (let base = 0; olds.length < 60; base += 100) for (let i = 0, k = rng.int(6); i <= k; i++) olds.push(base + i);
      const pairs = await prepareAndCommit(store, olds.slice(0, 60));
      const table = new ExceptionTable();
      for (const [o, n] of pairs) table.insert(chunks(o), chunks(n));
      // Merge until the crash: `floor` records are left after the last step that completed, `remaining` after the
      // last one started.
      let remaining = pairs.length;
      let floor = remaining;
      const steps = rng.int(12);
      let crashed = false;
      const merging = (async () => {
        for (let s = 0; s < steps && !crashed; s++) {
          const run = persistentStore.prepareMerge!(store);
          if (run.count === 0) break;
          remaining -= run.count;
          await persistentStore.commitMerge!(store, run.count, (o, n) => table.clearMerged(o, n));
          if (!crashed) floor = remaining;
        }
      })().catch(() => undefined);
      for (let i = rng.int(20); i > 0; i--) await (rng.int(2) === 0 ? turn() : Promise.resolve());
      crashed = true;
      cow.cut();
      wal?.crash();
      await faulty.crash({ torn: rng.int(2) === 0 });
      await merging;
      const again = await open({ cow: new CutDevice(faulty), wal: wal?.view() });
      expect(again.valid).toBe(true);
      const n = again.found.length;
      expect(again.found, `seed ${seed}`).toEqual(pairs.slice(0, n));
      expect(n, `seed ${seed}: a completed merge step came back`).toBeLessThanOrEqual(floor);
      expect(n, `seed ${seed}: more merged than started`).toBeGreaterThanOrEqual(remaining);
      crashes++;
    }
    expect(crashes).toBe(150);
  });
});

// Sanity for the helpers above.
test('helpers: metadata chunk layout', () => {
  expect([0, 1, 2, 33, 34, 35, 67].map((c) => isMetadataChunk(c, 1))).toEqual([true, true, false, false, true, false, true]);
  expect(areaLocation(2, 1)).toBe(67);
  expect(sortPairs([[2, 1], [1, 2]])).toEqual([[1, 2], [2, 1]]);
});
