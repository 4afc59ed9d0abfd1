/**
 * The dirty-region log conformance suite (src/dirty-logs/contract.ts). Every log type runs it, as a black box
 * through the contract:
 *
 *   dirtyLogSuite({ test, expect, name: 'disk', type: diskLog, persistent: true,
 *     factory: async (base) => ({ ...base, logDevice: new FaultyBlockDevice(new MemoryBlockDevice(...), { volatileCache: true }) }),
 *     crash: (options) => (options.logDevice as FaultyBlockDevice).crash() });
 *
 * vitest's `test` and `expect` are passed in so that src/ imports vitest only as types. The factory gets the base
 * options (sizes, initialSync, clock) and returns the options of a fresh log (a fresh, zeroed log device for a
 * persistent type). A reopen reuses that object (so the same device) with initialSync 'resync' and goes through
 * the life cycle the mirror uses: close → create → resume. `crash` (persistent types) drops what the log device
 * has not made durable; `settle` lets a log that clears lazily (md's daemon) run its passes, e.g. by advancing a
 * SimulatedClock.
 *
 * What it checks: the initial sync modes (nosync: all in sync; sync: none; a fresh log that knows nothing: none);
 * getResyncWork hands out each region once until it is given back, and again after setRegionSync(r, false);
 * sync counts; a mark is durable after flush() (across a crash, also with concurrent flushes); a region a leg
 * missed stays out of sync through clearRegion, flushes, reopens and crashes until a resync sets it in sync; no
 * clear while degraded; no clear persisted when the legs cannot be flushed; clears persist after flush and settle;
 * bad arguments are refused with DM_TABLE_INVALID.
 */
import type { expect as vitestExpect, test as vitestTest } from 'vitest';
import { sectors, type Sector } from '../../block/units.js';
import { SimulatedClock, type Clock } from '../../core/clock.js';
import type { AnyDirtyLogType, DirtyLogOptions } from '../../dirty-logs/contract.js';

export interface DirtyLogSuiteOptions {
  readonly test: typeof vitestTest;
  readonly expect: typeof vitestExpect;
  /** Prefix of every test name. */
  readonly name: string;
  readonly type: AnyDirtyLogType;
  /** The log keeps its state on a device across a reopen (enables the reopen and crash tests). */
  readonly persistent: boolean;
  /** Options of a fresh log built on `base` (add the log device and anything type-specific). */
  readonly factory: (base: DirtyLogOptions) => Promise<DirtyLogOptions>;
  /** Power loss on the log device: drops writes it has not made durable. Required when persistent. */
  readonly crash?: (options: DirtyLogOptions) => Promise<void>;
  /** Lets a log that persists clears lazily get there (md: advance the clock past its daemon passes). */
  readonly settle?: (options: DirtyLogOptions, clock: SimulatedClock) => Promise<void>;
  /** Table arguments of a valid log for this type (checked through parseArgs). */
  readonly validArgs: readonly string[];
  /** Region size used by the suite (sectors, a power of two); 8 by default. */
  readonly regionSizeSectors?: Sector;
  /** Releases what the factory made (devices), after each test. */
  readonly release?: (options: DirtyLogOptions) => Promise<void>;
}

/** Regions per suite log: more than 64 so bitsets span several words, and a short last region. */
const SUITE_REGION_COUNT = 200;

export function dirtyLogSuite(options: DirtyLogSuiteOptions): void {
  const { test, expect, name, type, factory } = options;
  const regionSizeSectors = options.regionSizeSectors ?? sectors(8);
  // One sector short of SUITE_REGION_COUNT whole regions: the last region is shorter.
  const targetSizeSectors = sectors(SUITE_REGION_COUNT * regionSizeSectors - 1);

  type Open = { log: unknown; options: DirtyLogOptions; clock: SimulatedClock };

  const base = (initialSync: DirtyLogOptions['initialSync'], clock: Clock): DirtyLogOptions => ({
    targetSizeSectors,
    regionSizeSectors,
    initialSync,
    clock,
  });

  const openWith = async (opts: DirtyLogOptions): Promise<unknown> => {
    const log: unknown = await type.create(opts);
    if (type.resume) await type.resume(log);
    return log;
  };

  const withLog = async (initialSync: DirtyLogOptions['initialSync'], body: (o: Open) => Promise<void>): Promise<void> => {
    const clock = new SimulatedClock();
    const opts = await factory(base(initialSync, clock));
    const log = await openWith(opts);
    try {
      await body({ log, options: opts, clock });
    } finally {
      await options.release?.(opts);
    }
  };

  /** close → create → resume on the same options (same device), trusting what the log says. */
  const reopen = async (o: Open, overrides: Partial<DirtyLogOptions> = {}): Promise<Open> => {
    await type.close(o.log);
    const opts = { ...o.options, initialSync: 'resync' as const, ...overrides };
    return { log: await openWith(opts), options: opts, clock: o.clock };
  };

  const crashAndReopen = async (o: Open): Promise<Open> => {
    await type.close(o.log);
    await options.crash!(o.options);
    return reopen({ ...o, log: o.log }, {});
  };

  const inSyncCount = (log: unknown): number => {
    let n = 0;
    for (let r = 0; r < type.regionCount(log); r++) if (type.inSync(log, r)) n++;
    return n;
  };

  const persistentTest = options.persistent ? test : test.skip;

  test(`${name}: region count covers the target (the last region may be short)`, async () => {
    await withLog('nosync', async ({ log }) => {
      expect(type.regionCount(log)).toBe(SUITE_REGION_COUNT);
    });
  });

  test(`${name}: nosync starts with every region in sync and clean, no resync work`, async () => {
    await withLog('nosync', async ({ log }) => {
      expect(type.syncCount(log)).toBe(SUITE_REGION_COUNT);
      expect(inSyncCount(log)).toBe(SUITE_REGION_COUNT);
      for (let r = 0; r < SUITE_REGION_COUNT; r++) expect(type.isClean(log, r)).toBe(true);
      expect(type.getResyncWork(log)).toBeUndefined();
    });
  });

  test(`${name}: sync (forced) starts with no region in sync and hands each one out once`, async () => {
    await withLog('sync', async ({ log }) => {
      expect(type.syncCount(log)).toBe(0);
      const seen = new Set<number>();
      for (let r = type.getResyncWork(log); r !== undefined; r = type.getResyncWork(log)) {
        expect(seen.has(r), `region ${r} handed out twice`).toBe(false);
        expect(r).toBeGreaterThanOrEqual(0);
        expect(r).toBeLessThan(SUITE_REGION_COUNT);
        seen.add(r);
      }
      expect(seen.size).toBe(SUITE_REGION_COUNT);
      let count = 0;
      for (const r of seen) {
        type.setRegionSync(log, r, true);
        type.clearRegion(log, r);
        expect(type.syncCount(log)).toBe(++count);
        expect(type.inSync(log, r)).toBe(true);
      }
      // Setting a region in sync twice does not count it twice.
      type.setRegionSync(log, 0, true);
      expect(type.syncCount(log)).toBe(SUITE_REGION_COUNT);
      expect(type.getResyncWork(log)).toBeUndefined();
    });
  });

  test(`${name}: a fresh log that knows nothing resyncs everything`, async () => {
    await withLog('resync', async ({ log }) => {
      expect(type.syncCount(log)).toBe(0);
      expect(inSyncCount(log)).toBe(0);
    });
  });

  test(`${name}: a region given back out of sync is handed out again; one handed out is not`, async () => {
    await withLog('sync', async ({ log }) => {
      const a = type.getResyncWork(log)!;
      const b = type.getResyncWork(log)!;
      expect(a).not.toBe(b);
      type.setRegionSync(log, a, false);
      const handed: number[] = [];
      for (let r = type.getResyncWork(log); r !== undefined; r = type.getResyncWork(log)) handed.push(r);
      expect(handed).toContain(a);
      expect(handed).not.toContain(b);
    });
  });

  test(`${name}: markRegion makes a region not clean; setRegionSync(false) takes it out of sync`, async () => {
    await withLog('nosync', async ({ log }) => {
      type.markRegion(log, 5);
      expect(type.isClean(log, 5)).toBe(false);
      expect(type.inSync(log, 5)).toBe(true);
      await type.flush(log);
      type.setRegionSync(log, 5, false);
      expect(type.inSync(log, 5)).toBe(false);
      expect(type.syncCount(log)).toBe(SUITE_REGION_COUNT - 1);
      // A drained write does not bring it back: only a resync does.
      type.clearRegion(log, 5);
      await type.flush(log);
      expect(type.inSync(log, 5)).toBe(false);
      expect(type.getResyncWork(log)).toBe(5);
      type.setRegionSync(log, 5, true);
      type.clearRegion(log, 5);
      expect(type.inSync(log, 5)).toBe(true);
      expect(type.syncCount(log)).toBe(SUITE_REGION_COUNT);
    });
  });

  test(`${name}: status and table are printable and name the type`, async () => {
    await withLog('nosync', async ({ log }) => {
      expect(type.status(log)).toMatch(/\S/);
      expect(type.table(log).split(' ')[0]).toBe(type.name);
    });
  });

  test(`${name}: bad arguments are refused with DM_TABLE_INVALID`, async () => {
    expect(() => type.parseArgs([...options.validArgs])).not.toThrow();
    expect(() => type.parseArgs([])).toThrow(expect.objectContaining({ code: 'DM_TABLE_INVALID' }));
    expect(() => type.parseArgs([...options.validArgs, 'bogus', 'more', 'args'])).toThrow(expect.objectContaining({ code: 'DM_TABLE_INVALID' }));
    const clock = new SimulatedClock();
    for (const bad of [3, 0, targetSizeSectors * 4]) {
      const opts = await factory({ ...base('nosync', clock), regionSizeSectors: sectors(bad) });
      try {
        await expect(type.create(opts)).rejects.toMatchObject({ code: 'DM_TABLE_INVALID' });
      } finally {
        await options.release?.(opts);
      }
    }
  });

  persistentTest(`${name}: a flushed mark survives a crash and reopen`, async () => {
    await withLog('nosync', async (o) => {
      for (const r of [0, 63, 64, 130, SUITE_REGION_COUNT - 1]) type.markRegion(o.log, r);
      await type.flush(o.log);
      const after = await crashAndReopen(o);
      for (const r of [0, 63, 64, 130, SUITE_REGION_COUNT - 1]) {
        expect(type.isClean(after.log, r), `region ${r} clean after the crash`).toBe(false);
        expect(type.inSync(after.log, r), `region ${r} in sync after the crash`).toBe(false);
      }
      expect(type.inSync(after.log, 1)).toBe(true);
      expect(type.syncCount(after.log)).toBe(SUITE_REGION_COUNT - 5);
      await type.close(after.log);
    });
  });

  persistentTest(`${name}: concurrent flushes: each resolves only with its marks durable`, async () => {
    await withLog('nosync', async (o) => {
      const marked: number[] = [];
      const flushes: Array<Promise<void>> = [];
      for (let i = 0; i < 12; i++) {
        const r = (i * 17) % SUITE_REGION_COUNT;
        type.markRegion(o.log, r);
        marked.push(r);
        flushes.push(type.flush(o.log));
        if (i % 3 === 0) await Promise.resolve();
      }
      await flushes[flushes.length - 1];
      const after = await crashAndReopen(o);
      for (const r of marked) expect(type.inSync(after.log, r), `region ${r}`).toBe(false);
      await Promise.allSettled(flushes);
      await type.close(after.log);
    });
  });

  persistentTest(`${name}: a mark made while a flush carrying its region's clear runs is durable when its own flush resolves`, async () => {
    await withLog('nosync', async (o) => {
      type.markRegion(o.log, 20);
      await type.flush(o.log);
      type.clearRegion(o.log, 20);
      const carryingClear = type.flush(o.log);
      type.markRegion(o.log, 20);
      await type.flush(o.log, { clears: false });
      // No crash: what the device shows right now must say "not clean".
      const after = await reopen(o);
      expect(type.isClean(after.log, 20)).toBe(false);
      expect(type.inSync(after.log, 20)).toBe(false);
      await carryingClear.catch(() => undefined);
      await type.close(after.log);
    });
  });

  persistentTest(`${name}: marks flushed with clears: false are durable too`, async () => {
    await withLog('nosync', async (o) => {
      type.markRegion(o.log, 33);
      type.markRegion(o.log, 34);
      await type.flush(o.log, { clears: false });
      const after = await crashAndReopen(o);
      expect(type.inSync(after.log, 33)).toBe(false);
      expect(type.inSync(after.log, 34)).toBe(false);
      await type.close(after.log);
    });
  });

  persistentTest(`${name}: a region a leg missed stays out of sync across reopens until a resync`, async () => {
    await withLog('nosync', async (o) => {
      type.markRegion(o.log, 7);
      await type.flush(o.log);
      type.setRegionSync(o.log, 7, false);
      type.clearRegion(o.log, 7);
      await type.flush(o.log);
      await options.settle?.(o.options, o.clock);
      await type.flush(o.log);
      let cur = await crashAndReopen(o);
      expect(type.inSync(cur.log, 7)).toBe(false);
      cur = await reopen(cur);
      expect(type.inSync(cur.log, 7)).toBe(false);
      const r = type.getResyncWork(cur.log);
      expect(r).toBe(7);
      type.setRegionSync(cur.log, 7, true);
      type.clearRegion(cur.log, 7);
      await type.flush(cur.log);
      await options.settle?.(cur.options, cur.clock);
      await type.flush(cur.log);
      if (type.suspend) await type.suspend(cur.log);
      cur = await reopen(cur);
      expect(type.inSync(cur.log, 7)).toBe(true);
      expect(type.syncCount(cur.log)).toBe(SUITE_REGION_COUNT);
      await type.close(cur.log);
    });
  });

  persistentTest(`${name}: clears persist after flush (and settle); nothing is cleared while degraded`, async () => {
    await withLog('nosync', async (o) => {
      type.markRegion(o.log, 3);
      type.markRegion(o.log, 4);
      await type.flush(o.log);
      type.setDegraded(o.log, true);
      type.clearRegion(o.log, 4);
      await type.flush(o.log);
      type.setDegraded(o.log, false);
      type.clearRegion(o.log, 3);
      await type.flush(o.log);
      await options.settle?.(o.options, o.clock);
      await type.flush(o.log);
      if (type.suspend) await type.suspend(o.log);
      const after = await reopen(o);
      expect(type.inSync(after.log, 3), 'cleared while not degraded').toBe(true);
      expect(type.inSync(after.log, 4), 'cleared while degraded').toBe(false);
      await type.close(after.log);
    });
  });

  persistentTest(`${name}: no clear is persisted when the legs cannot be flushed`, async () => {
    const clock = new SimulatedClock();
    let legsFail = false;
    const opts = await factory({
      ...base('nosync', clock),
      flushLegs: () => (legsFail ? Promise.reject(new Error('leg flush failed')) : Promise.resolve()),
    });
    try {
      const o: Open = { log: await openWith(opts), options: opts, clock };
      type.markRegion(o.log, 9);
      await type.flush(o.log);
      legsFail = true;
      type.clearRegion(o.log, 9);
      await type.flush(o.log).catch(() => undefined);
      await options.settle?.(o.options, o.clock);
      await type.flush(o.log).catch(() => undefined);
      if (type.suspend) await type.suspend(o.log).catch(() => undefined);
      const after = await crashAndReopen(o);
      expect(type.inSync(after.log, 9)).toBe(false);
      await type.close(after.log);
    } finally {
      await options.release?.(opts);
    }
  });

  persistentTest(`${name}: sync (forced) forgets what the log said; nosync declares everything in sync`, async () => {
    await withLog('nosync', async (o) => {
      type.markRegion(o.log, 11);
      await type.flush(o.log);
      const forced = await reopen(o, { initialSync: 'sync' });
      expect(type.syncCount(forced.log)).toBe(0);
      const declared = await reopen(forced, { initialSync: 'nosync' });
      expect(type.syncCount(declared.log)).toBe(SUITE_REGION_COUNT);
      await type.close(declared.log);
    });
  });
}
