/**
 * The exception store conformance suite. Every store type runs it once per option variant (P, PO, P with a WAL,
 * N), as black boxes through the contract:
 *
 *   exceptionStoreSuite({ test, expect, name: 'P', type: persistentStore, persistent: true,
 *     factory: async (cowSizeSectors, chunkSizeSectors) => ({ cow: new MemoryBlockDevice({ sizeSectors: cowSizeSectors }),
 *       chunkSizeSectors, overflow: false }) });
 *
 * vitest's `test` and `expect` are passed in so that src/ imports vitest only as types. The factory returns the
 * options of a fresh, zeroed COW (and WAL); reopening reuses the same options object, so what a factory shares
 * between opens (the COW, the WAL) is what survives. Tests that need a reload are skipped unless `persistent`.
 * The suite closes the COW at the end of each test.
 *
 * What it checks: allocation hands out each chunk once, inside the COW, never a metadata chunk (when the test says
 * which chunks are metadata) and never over data another exception holds (data written to every chunk survives the
 * metadata writes); prepareException refuses exactly when sectors_allocated + chunk_size > total; commit callbacks
 * run once each, in commit order, also across metadata areas and with an abandoned prepared exception; usage
 * numbers are consistent; a reload (persistent) reports exactly the committed exceptions; drop invalidates.
 */
import type { TestContext, expect as vitestExpect, test as vitestTest } from 'vitest';
import type { Chunk, Sector } from '../../block/units.js';
import { chunkToSector, chunks, sectors, sectorsToBytes } from '../../block/units.js';
import type { AnyExceptionStoreType, ExceptionStoreOptions } from '../../stores/contract.js';
import { createRng } from '../../core/rng.js';

export interface ExceptionStoreSuiteOptions {
  readonly test: typeof vitestTest;
  readonly expect: typeof vitestExpect;
  /** Prefix of every test name. */
  readonly name: string;
  readonly type: AnyExceptionStoreType;
  /** The store keeps exceptions across a reload (enables the reopen tests). */
  readonly persistent: boolean;
  /** Options for a store on a fresh, zeroed COW of `cowSizeSectors` (shared by every open in one test). */
  readonly factory: (cowSizeSectors: Sector, chunkSizeSectors: Sector) => Promise<ExceptionStoreOptions>;
  /** Which chunks the store keeps for metadata (checked to never be handed out). */
  readonly isMetadataChunk?: (chunk: Chunk, chunkSizeSectors: Sector) => boolean;
  /** Chunk size used by the suite: 2 sectors by default (small metadata areas, so tests cross many of them). */
  readonly chunkSizeSectors?: Sector;
  /** The table code the store reports before the chunk size (`P`, `PO`, `N`). */
  readonly tableCode?: string;
}

/** COW size in chunks: with 2-sector chunks, 1024 sectors and 8 metadata areas of 64 records for a persistent store. */
const SUITE_COW_SIZE_CHUNKS = 512;
const SUITE_CHUNK_SIZE_SECTORS_DEFAULT = sectors(2);
/** Commits per test that crosses metadata areas. */
const COMMITS_COUNT = 200;

interface Committed {
  readonly oldChunk: number;
  readonly newChunk: number;
}

export function exceptionStoreSuite(options: ExceptionStoreSuiteOptions): void {
  const { test, expect, name, type, factory } = options;
  const chunkSizeSectors = options.chunkSizeSectors ?? SUITE_CHUNK_SIZE_SECTORS_DEFAULT;
  const suiteCowSizeSectors = sectors(SUITE_COW_SIZE_CHUNKS * chunkSizeSectors);

  /** Opens a store (create + readMetadata) and returns it with what readMetadata reported. */
  const open = async (storeOptions: ExceptionStoreOptions): Promise<{ store: unknown; found: Committed[]; valid: boolean }> => {
    const store: unknown = await type.create(storeOptions);
    const found: Committed[] = [];
    const meta = await type.readMetadata(store, (oldChunk: Chunk, newChunk: Chunk) => found.push({ oldChunk, newChunk }));
    expect(meta.chunkSizeSectors, 'chunk size in force').toBe(chunkSizeSectors);
    return { store, found, valid: meta.valid };
  };

  const withStore = async (cowSizeSectors: Sector, body: (storeOptions: ExceptionStoreOptions, store: unknown) => Promise<void>): Promise<void> => {
    const storeOptions = await factory(cowSizeSectors, chunkSizeSectors);
    try {
      const { store, found, valid } = await open(storeOptions);
      expect(valid, 'a fresh store is valid').toBe(true);
      expect(found, 'a fresh store has no exceptions').toEqual([]);
      await body(storeOptions, store);
    } finally {
      await storeOptions.cow.close();
    }
  };

  /** Commits each pair in order (without waiting in between) and resolves with the callbacks' order and results. */
  const commitAll = (store: unknown, pairs: readonly Committed[]): Promise<Array<{ i: number; ok: boolean }>> =>
    new Promise((resolve) => {
      const seen: Array<{ i: number; ok: boolean }> = [];
      if (pairs.length === 0) resolve(seen);
      pairs.forEach((p, i) =>
        type.commitException(store, chunks(p.oldChunk), chunks(p.newChunk), (ok: boolean) => {
          seen.push({ i, ok });
          if (seen.length === pairs.length) resolve(seen);
        }),
      );
    });

  const sortPairs = (pairs: readonly Committed[]): Committed[] => [...pairs].sort((a, b) => a.oldChunk - b.oldChunk || a.newChunk - b.newChunk);

  test(`${name}: allocation hands out every chunk once, inside the COW, never metadata`, () =>
    withStore(suiteCowSizeSectors, async (_storeOptions, store) => {
      const seen = new Set<number>();
      for (;;) {
        const c = type.prepareException(store);
        if (c === -1) break;
        expect(Number.isSafeInteger(c) && c >= 0, `chunk ${c} is a chunk index`).toBe(true);
        expect(seen.has(c), `chunk ${c} handed out twice`).toBe(false);
        expect((c + 1) * chunkSizeSectors, `chunk ${c} inside the COW`).toBeLessThanOrEqual(suiteCowSizeSectors);
        if (options.isMetadataChunk) expect(options.isMetadataChunk(c, chunkSizeSectors), `chunk ${c} is metadata`).toBe(false);
        seen.add(c);
        expect(seen.size, 'more chunks than the COW holds').toBeLessThanOrEqual(suiteCowSizeSectors / chunkSizeSectors);
      }
      expect(seen.size, 'the store hands out most of the COW').toBeGreaterThan((suiteCowSizeSectors / chunkSizeSectors) * 0.8);
      await type.close(store);
    }));

  test(`${name}: data in every allocated chunk survives the metadata writes`, () =>
    withStore(suiteCowSizeSectors, async (storeOptions, store) => {
      const { cow } = storeOptions;
      const chunkBytes = sectorsToBytes(chunkSizeSectors);
      const rng = createRng(7);
      const pairs: Committed[] = [];
      const patternOf = (newChunk: number): Buffer => Buffer.alloc(chunkBytes, (newChunk % 251) + 1);
      for (let oldChunk = 0; ; oldChunk += 1 + rng.int(3)) {
        const c = type.prepareException(store);
        if (c === -1) break;
        await cow.write(chunkToSector(c, chunkSizeSectors), patternOf(c));
        pairs.push({ oldChunk, newChunk: c });
      }
      const results = await commitAll(store, pairs);
      expect(results.every((r) => r.ok), 'every commit succeeds').toBe(true);
      const check = async (): Promise<void> => {
        for (const p of pairs) {
          const buf = Buffer.alloc(chunkBytes);
          await cow.read(chunkToSector(chunks(p.newChunk), chunkSizeSectors), buf);
          expect(buf.equals(patternOf(p.newChunk)), `data of chunk ${p.newChunk} intact`).toBe(true);
        }
      };
      await check();
      await type.close(store);
      await check();
      if (options.persistent) {
        const again = await open(storeOptions);
        expect(sortPairs(again.found)).toEqual(sortPairs(pairs));
        await type.close(again.store);
        await check();
      }
    }));

  test(`${name}: prepareException refuses exactly when sectors_allocated + chunk_size > total`, async () => {
    // Sizes around chunk multiples, including remainders smaller than a chunk.
    const sizes = [8, 9, 16, 31, 64, 65, 66, 67, 130, 131, 132, 133, 261].map((n) => n * chunkSizeSectors);
    sizes.push(66 * chunkSizeSectors + 1, 131 * chunkSizeSectors + chunkSizeSectors - 1);
    for (const size of sizes) {
      await withStore(sectors(size), async (_storeOptions, store) => {
        let handedOut = 0;
        for (let step = 0; step <= size; step++) {
          const before = type.usage(store);
          expect(before.totalSectors, 'total is the COW size').toBe(size);
          const expectRoom = before.sectorsAllocated + chunkSizeSectors <= before.totalSectors;
          const c = type.prepareException(store);
          expect(c !== -1, `size ${size}: allocation #${handedOut} with ${before.sectorsAllocated}/${before.totalSectors} allocated`).toBe(expectRoom);
          if (c === -1) {
            expect(type.prepareException(store), 'full stays full').toBe(-1);
            expect(type.usage(store).sectorsAllocated, 'a refusal allocates nothing').toBe(before.sectorsAllocated);
            break;
          }
          handedOut++;
          expect((c + 1) * chunkSizeSectors).toBeLessThanOrEqual(size);
        }
        await type.close(store);
      });
    }
  });

  test(`${name}: commit callbacks run once each, in commit order, across metadata areas`, () =>
    withStore(suiteCowSizeSectors, async (_storeOptions, store) => {
      const rng = createRng(11);
      const order: number[] = [];
      const results: boolean[] = [];
      let committed = 0;
      const waitTurn = (): Promise<void> => new Promise((resolve) => setImmediate(resolve));
      while (committed < COMMITS_COUNT) {
        // A few copies in flight, committed in allocation order; sometimes the test waits a turn in between.
        const batch: Chunk[] = [];
        const want = 1 + rng.int(6);
        for (let i = 0; i < want; i++) {
          const c = type.prepareException(store);
          expect(c, 'room for the test').not.toBe(-1);
          batch.push(c as Chunk);
        }
        for (const c of batch) {
          const i = committed++;
          type.commitException(store, chunks(10_000 + i), c, (ok: boolean) => {
            order.push(i);
            results.push(ok);
          });
          if (rng.int(4) === 0) await waitTurn();
        }
      }
      for (let turns = 0; order.length < committed && turns < 1000; turns++) await waitTurn();
      expect(order).toEqual([...Array(committed).keys()]);
      expect(results.every((ok) => ok)).toBe(true);
      await type.close(store);
    }));

  test(`${name}: an abandoned prepared exception does not stall the commits after it`, () =>
    withStore(suiteCowSizeSectors, async (_storeOptions, store) => {
      const abandoned = type.prepareException(store);
      expect(abandoned).not.toBe(-1);
      const c = type.prepareException(store);
      expect(c).not.toBe(-1);
      const ok = await new Promise<boolean>((resolve) => type.commitException(store, chunks(5), c as Chunk, resolve));
      expect(ok).toBe(true);
      await type.close(store);
    }));

  test(`${name}: usage numbers are consistent`, () =>
    withStore(suiteCowSizeSectors, async (_storeOptions, store) => {
      const check = (): void => {
        const u = type.usage(store);
        expect(u.totalSectors).toBe(suiteCowSizeSectors);
        expect(u.sectorsAllocated % chunkSizeSectors, 'allocated is whole chunks').toBe(0);
        expect(u.metadataSectors % chunkSizeSectors, 'metadata is whole chunks').toBe(0);
        expect(u.metadataSectors).toBeLessThanOrEqual(u.sectorsAllocated);
        expect(u.sectorsAllocated).toBeLessThanOrEqual(u.totalSectors);
        if (!options.persistent) expect(u.metadataSectors, 'no metadata without persistence').toBe(0);
      };
      check();
      const pairs: Committed[] = [];
      for (let i = 0; i < 150; i++) {
        const c = type.prepareException(store);
        expect(c).not.toBe(-1);
        const u = type.usage(store);
        expect(u.sectorsAllocated, `chunk ${c} counted as allocated`).toBeGreaterThanOrEqual((c + 1) * chunkSizeSectors);
        pairs.push({ oldChunk: i, newChunk: c });
        check();
      }
      await commitAll(store, pairs);
      check();
      await type.close(store);
    }));

  test(`${name}: table code`, () =>
    withStore(suiteCowSizeSectors, async (_storeOptions, store) => {
      const code = type.tableCode(store);
      expect(code).toMatch(/^(P|PO|N) \d+$/);
      expect(code.endsWith(` ${chunkSizeSectors}`)).toBe(true);
      if (options.tableCode) expect(code.split(' ')[0]).toBe(options.tableCode);
      await type.close(store);
    }));

  test(`${name}: a reload reports exactly the committed exceptions and allocates around them`, (ctx: TestContext) => {
    ctx.skip(!options.persistent, 'the store does not persist');
    return withStore(suiteCowSizeSectors, async (storeOptions, store) => {
      const rng = createRng(5);
      const pairs: Committed[] = [];
      const used = new Set<number>();
      for (let i = 0; i < COMMITS_COUNT; i++) {
        const c = type.prepareException(store);
        expect(c).not.toBe(-1);
        used.add(c);
        // One in ten prepared exceptions is abandoned (a leaked chunk); old chunks in no particular order.
        if (rng.int(10) === 0) continue;
        pairs.push({ oldChunk: rng.int(1_000_000) * 1000 + i, newChunk: c });
      }
      const results = await commitAll(store, pairs);
      expect(results.every((r) => r.ok)).toBe(true);
      const usageBefore = type.usage(store);
      await type.close(store);

      const again = await open(storeOptions);
      expect(again.valid).toBe(true);
      expect(sortPairs(again.found)).toEqual(sortPairs(pairs));
      const usageAfter = type.usage(again.store);
      expect(usageAfter.totalSectors).toBe(usageBefore.totalSectors);
      expect(usageAfter.sectorsAllocated, 'a reload never allocates less than the highest chunk in use').toBeGreaterThanOrEqual(
        (Math.max(...pairs.map((p) => p.newChunk)) + 1) * chunkSizeSectors,
      );
      for (let i = 0; i < 50; i++) {
        const c = type.prepareException(again.store);
        if (c === -1) break;
        expect(again.found.some((p) => p.newChunk === c), `chunk ${c} of a reloaded exception handed out again`).toBe(false);
      }
      await type.close(again.store);
    });
  });

  test(`${name}: drop invalidates, and a reload stays invalid`, () =>
    withStore(suiteCowSizeSectors, async (storeOptions, store) => {
      const c = type.prepareException(store);
      expect(await new Promise<boolean>((resolve) => type.commitException(store, chunks(1), c as Chunk, resolve))).toBe(true);
      await type.drop(store);
      const d = type.prepareException(store);
      if (d !== -1) {
        expect(await new Promise<boolean>((resolve) => type.commitException(store, chunks(2), d, resolve)), 'a commit after drop fails').toBe(false);
      }
      await type.close(store);
      if (!options.persistent) return;
      const again = await open(storeOptions);
      expect(again.valid).toBe(false);
      expect(again.found).toEqual([]);
      await type.close(again.store);
    }));
}
