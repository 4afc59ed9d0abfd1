/**
 * Replay property: for random seeded workloads — devices created with and without tables, loads, reloads, clears,
 * suspends and resumes, writes to origins and snapshots, P, PO and N snapshots (some on small COWs that fill up:
 * Invalid, Overflow), merges let finish or stopped by a suspend and resumed later, removes, marks, clean restarts
 * and crashes — after every step the digest of a full replay of the log equals the digest of the live engine's
 * own objects (Engine.stateDigest), and so does the state the log keeps; at the end, a replay to each mark equals
 * the digest observed live when the mark was made, and after a compaction the later states still replay the same.
 *
 * Two backends:
 * - memory-level + memory devices behind FaultyBlockDevice wrappers: a crash fences the devices (the dropped
 *   engine can change nothing more), closes the dropped engine's log (what it appended is written, nothing after),
 *   and opens a new engine on the same database and the same media, at a random point of in-flight writes,
 *   reloads or a running merge;
 * - classic-level in a temp folder, devices with volatile write caches: a power cut at a seeded I/O count fences
 *   the devices and loses (tears) their unflushed writes; the database is closed and opened again, as a process
 *   would after a crash.
 *
 * Reproduce one run with REPLAY_SEED=N (memory) or REPLAY_CRASH_SEED=N (classic-level).
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { describe, expect, test } from 'vitest';
import { MemoryLevel } from 'memory-level';
import { ClassicLevel } from 'classic-level';
import { Engine } from '../../src/core/engine.js';
import { MemoryBlockDevice } from '../../src/block/memory-device.js';
import { sectors } from '../../src/block/units.js';
import { createRng, type Rng } from '../../src/core/rng.js';
import { compactLog, listStateSnapshots, type LevelDb } from '../../src/log/event-log.js';
import { replay } from '../../src/replay/replay.js';
import { canonicalState, stateDigest } from '../../src/replay/digest.js';
import { CRASH_FENCE, CrashDevice } from '../helpers/crash.js';

const turn = (): Promise<void> => new Promise((r) => setImmediate(r));

interface Stats {
  steps: number;
  crashes: number;
  crashesMidFlight: number;
  restarts: number;
  merges: number;
  mergesStopped: number;
  invalidated: number;
  overflowed: number;
  loadsAfterCrash: number;
  exceptionsMax: number;
  marks: number;
  replays: number;
  compactions: number;
  failedOps: number;
}

const newStats = (): Stats => ({
  steps: 0,
  crashes: 0,
  crashesMidFlight: 0,
  restarts: 0,
  merges: 0,
  mergesStopped: 0,
  invalidated: 0,
  overflowed: 0,
  loadsAfterCrash: 0,
  exceptionsMax: 0,
  marks: 0,
  replays: 0,
  compactions: 0,
  failedOps: 0,
});

type Backend = 'memory' | 'classic';

/** Fails with `what` when `p` is not done within `ms` (a lost bio fails the run instead of hanging it). */
async function within<T>(p: Promise<T>, what: string, ms = 10_000): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error(`${what}: not done within ${ms} ms`)), ms)));
  try {
    return await Promise.race([p, late]);
  } finally {
    clearTimeout(timer);
  }
}

class Run {
  readonly inner: Record<string, MemoryBlockDevice>;
  devs: Record<string, CrashDevice> = {};
  db!: LevelDb;
  e!: Engine;
  private generation = 0;
  /** Mark name → the live digest right after the mark was durable. */
  readonly markDigests = new Map<string, { digest: string; seq: number }>();
  private readonly markSeqs = new Map<string, number>();
  readonly every: number;
  /** One seed in 5 has origins of 512 chunks of 8: COWs past 256 exceptions use a second metadata area. */
  readonly originSectors: number;

  constructor(
    readonly seed: number,
    readonly backend: Backend,
    readonly rng: Rng,
    readonly stats: Stats,
    readonly dir: string | undefined,
  ) {
    this.originSectors = seed % 5 === 0 ? 4096 : 512;
    const mem = (name: string, sizeSectors: number): MemoryBlockDevice => new MemoryBlockDevice({ sizeSectors: sectors(sizeSectors), name });
    this.inner = {
      o1: mem('o1', this.originSectors),
      o2: mem('o2', this.originSectors),
      // Big enough for every chunk of an origin (data chunks + header + metadata areas).
      c1: mem('c1', 2 * this.originSectors),
      c2: mem('c2', 2 * this.originSectors),
      c3: mem('c3', 2 * this.originSectors),
      // Small: fills up (P: Invalid, PO: Overflow).
      c4: mem('c4', 96),
      l1: mem('l1', 256),
    };
    this.every = 3 + rng.int(30);
  }

  async open(): Promise<void> {
    this.generation++;
    this.devs = {};
    for (const [label, dev] of Object.entries(this.inner)) {
      this.devs[label] = new CrashDevice(dev, {
        volatileCache: this.backend === 'classic',
        rng: createRng(this.seed * 1000 + this.generation * 10 + label.length),
        closeInner: false,
        name: label,
      });
    }
    if (this.backend === 'memory') {
      this.db ??= new MemoryLevel() as unknown as LevelDb;
    } else {
      const db = new ClassicLevel<string, unknown>(path.join(this.dir!, 'db'));
      await db.open();
      this.db = db as unknown as LevelDb;
    }
    this.e = await Engine.open({ db: this.db, backingDevices: this.devs, seed: this.seed, stateSnapshotEvents: this.every });
    this.e.events$.subscribe((ev) => {
      if (ev.type === 'snapshot.invalidated') this.stats.invalidated++;
      if (ev.type === 'snapshot.overflowed') this.stats.overflowed++;
      if (ev.type === 'mark') this.markSeqs.set(ev.name, ev.seq);
    });
    expect(this.e.restoreFailures, `seed ${this.seed}: restore`).toEqual([]);
  }

  /** Drops the engine as a crash would: devices fenced (and, with volatile caches, their unflushed writes lost). */
  async crash(inflight: Array<Promise<unknown>>): Promise<void> {
    const old = this.e;
    for (const d of Object.values(this.devs)) d.setErrorRules(CRASH_FENCE);
    if (this.backend === 'classic') await Promise.all(Object.values(this.devs).map((d) => d.crash({ torn: true })));
    // What the dropped engine still has in flight fails against the fence; a control op stuck on a suspended
    // device's queue dies with the process.
    await Promise.race([Promise.allSettled(inflight), new Promise((r) => setTimeout(r, 100))]);
    for (const name of old.names()) {
      const d = old.device(name)!;
      if (d.suspended && d.queuedCount > 0) d.killQueued();
    }
    await within(Promise.allSettled(inflight), `seed ${this.seed}: the dropped engine's operations`);
    for (let i = 0; i < 3; i++) await turn();
    await old.log.close();
    if (this.backend === 'classic') await this.db.close();
    this.stats.crashes++;
    await this.open();
    this.stats.loadsAfterCrash++;
  }

  async restart(): Promise<void> {
    await this.e.close();
    if (this.backend === 'classic') await this.db.close();
    this.stats.restarts++;
    await this.open();
  }

  /** Table lines of every device, live and inactive. */
  private tablesOf(name: string): string[] {
    return [...this.e.table(name), ...this.e.table(name, true)];
  }

  /** COW labels named by any table. */
  private cowsInUse(): Set<string> {
    const used = new Set<string>();
    for (const n of this.e.names()) for (const l of this.tablesOf(n)) {
      const w = l.split(/\s+/);
      if (w[2] === 'snapshot' || w[2] === 'snapshot-merge') used.add(w[4]);
    }
    return used;
  }

  private pick<T>(xs: readonly T[]): T | undefined {
    return xs.length ? xs[this.rng.int(xs.length)] : undefined;
  }

  /** Runs a control operation; a refusal (DmError) is fine: it must change nothing. */
  private async op(p: Promise<unknown>): Promise<boolean> {
    try {
      await within(p, `seed ${this.seed}: control operation`);
      return true;
    } catch (err) {
      if ((err as { code?: string }).code === undefined) throw err;
      this.stats.failedOps++;
      return false;
    }
  }

  private writable(): string[] {
    return this.e.names().filter((n) => {
      const i = this.e.info(n);
      return i.liveTable && !i.suspended && !i.readOnly;
    });
  }

  /** Writes to random devices; returns the promises (settled, never rejecting). */
  private startWrites(count: number): Array<Promise<unknown>> {
    const out: Array<Promise<unknown>> = [];
    for (let i = 0; i < count; i++) {
      const name = this.pick(this.writable());
      if (!name) break;
      const size = this.e.info(name).sizeSectors;
      const len = Math.min(size, 1 + this.rng.int(this.rng.int(3) === 0 ? (this.originSectors > 512 ? 256 : 64) : 12));
      const at = this.rng.int(size - len + 1);
      const buf = Buffer.alloc(len * 512, (this.seed + i) & 0xff);
      out.push(this.e.device(name)!.write(sectors(at), buf, { fua: this.rng.int(4) === 0 }).catch(() => undefined));
    }
    return out;
  }

  /** Waits for merges to settle (DONE, FAILED, STOPPED) and for the log to be written. */
  async quiesce(): Promise<void> {
    for (const n of this.e.names()) {
      // Suspended ones too: a merge restored after a restart runs even while its device stays suspended.
      if (this.e.targetNames(n)[0] !== 'snapshot-merge') continue;
      const until = performance.now() + 10_000;
      for (;;) {
        const st = await this.e.message(n, 0, ['merge-status']);
        if (!/state=(PREPARE|COPY_OUT_OTHERS|INTERLOCK|COPYING|FLUSHING|COMMITTING)/.test(st)) break;
        if (performance.now() > until) throw new Error(`seed ${this.seed}: merge on ${n} does not settle: ${st}`);
        await new Promise((r) => setTimeout(r, 1));
      }
    }
    for (let i = 0; i < 3; i++) {
      await this.e.log.drain();
      await turn();
    }
  }

  /** The property: full replay == live, and the log's kept state == live. */
  async check(where: string): Promise<void> {
    await this.quiesce();
    const live = this.e.stateDigest();
    const useSnapshots = this.rng.int(4) !== 0;
    const r = await replay(this.db, { useSnapshots });
    this.stats.replays++;
    if (r.digest !== live) {
      throw new Error(
        `seed ${this.seed} ${where}: replay (${useSnapshots ? `from snapshot #${r.snapshotSeq}` : 'from #1'}, to #${r.seq}) differs from the live state\n` +
          `replayed: ${JSON.stringify(canonicalState(r.state))}\n` +
          `live:     ${JSON.stringify(canonicalState(this.e.poolState()))}`,
      );
    }
    expect(this.e.log.stateError, where).toBeUndefined();
    expect(stateDigest(this.e.log.poolState!), `${where}: the log's kept state`).toBe(live);
    for (const c of this.e.poolState().cows.values()) this.stats.exceptionsMax = Math.max(this.stats.exceptionsMax, c.pairs.length / 2);
  }

  async step(i: number): Promise<void> {
    const rng = this.rng;
    const e = this.e;
    const k = rng.int(100);
    const names = e.names();
    if (k < 6) {
      // A linear or zero device, sometimes without a table, read-only, with a uuid.
      const name = `lin${rng.int(3)}`;
      const table = rng.int(5) === 0 ? undefined : rng.int(2) === 0 ? `0 ${64 + 8 * rng.int(20)} linear l1 ${rng.int(8)}` : '0 128 zero';
      await this.op(e.create(name, { table, readOnly: rng.int(6) === 0, uuid: rng.int(3) === 0 ? `uuid-${name}-${i}` : undefined }));
    } else if (k < 10) {
      const o = `o${1 + rng.int(2)}`;
      await this.op(e.create(`orig${o}`, { table: `0 ${this.originSectors} snapshot-origin ${o}` }));
    } else if (k < 20) {
      // A snapshot on a free COW: P, PO or N. Sometimes the COW is zeroed first (a new one).
      const used = this.cowsInUse();
      const cow = this.pick(['c1', 'c2', 'c3', 'c4'].filter((c) => !used.has(c)));
      if (!cow) return;
      if (rng.int(3) === 0) await this.inner[cow].write(sectors(0), Buffer.alloc(this.inner[cow].sizeSectors * 512));
      const mode = ['P', 'P', 'PO', 'N'][rng.int(4)];
      const chunk = rng.int(3) === 0 ? 16 : 8;
      await this.op(e.create(`snap${cow}`, { table: `0 ${this.originSectors} snapshot o${1 + rng.int(2)} ${cow} ${mode} ${chunk}` }));
    } else if (k < 40) {
      await Promise.all(this.startWrites(1 + rng.int(this.originSectors > 512 ? 48 : 8)));
    } else if (k < 45) {
      // A reload of the live table (snapshots: a handover), or a different linear table.
      const name = this.pick(names.filter((n) => e.info(n).liveTable));
      if (!name) return;
      const table = name.startsWith('lin') && rng.int(2) === 0 ? `0 ${64 + 8 * rng.int(20)} linear l1 0` : e.table(name).join('\n');
      if (await this.op(e.load(name, table))) await this.op(e.resume(name));
    } else if (k < 49) {
      // An inactive table left loaded, or loaded and cleared; sometimes a snapshot table in the inactive slot.
      const name = this.pick(names.filter((n) => n.startsWith('lin')));
      if (!name) return;
      const cow = this.pick(['c1', 'c2', 'c3'].filter((c) => !this.cowsInUse().has(c)));
      const table = cow && rng.int(2) === 0 ? `0 ${this.originSectors} snapshot o1 ${cow} P 8` : '0 64 error';
      if ((await this.op(e.load(name, table))) && rng.int(2) === 0) await this.op(e.clear(name));
    } else if (k < 54) {
      const name = this.pick(names);
      if (!name) return;
      if (e.info(name).suspended) await this.op(e.resume(name));
      else await this.op(e.suspend(name));
    } else if (k < 68) {
      await this.merge();
    } else if (k < 73) {
      const name = this.pick(names.filter((n) => e.info(n).openCount === 0));
      if (name) await this.op(e.remove(name));
    } else if (k < 81) {
      const name = this.pick(names);
      if (!name) return;
      const mark = `m${i}`;
      await e.message(name, 0, ['mark', mark]);
      await this.quiesce();
      this.markDigests.set(mark, { digest: e.stateDigest(), seq: this.markSeqs.get(mark)! });
      this.stats.marks++;
    } else if (k < 92) {
      // A crash, at a random point of writes and control operations in flight.
      const inflight = this.startWrites(rng.int(6));
      const name = this.pick(names.filter((n) => e.info(n).liveTable));
      if (name && rng.int(2) === 0) inflight.push(e.load(name, e.table(name).join('\n')).then(() => e.resume(name)).catch(() => undefined));
      const merging = names.find((n) => e.targetNames(n)[0] === 'snapshot-merge' && !e.info(n).suspended);
      if (inflight.length > 0 || merging) this.stats.crashesMidFlight++;
      if (this.backend === 'classic') await this.powerCut(1 + rng.int(60));
      else for (let t = rng.int(12); t > 0; t--) await turn();
      await this.crash(inflight);
    } else {
      await this.restart();
    }
  }

  /** Waits until `ios` more I/Os reached the devices (or the in-flight work ran out of them). */
  private async powerCut(ios: number): Promise<void> {
    let count = 0;
    let fired: () => void = () => undefined;
    const done = new Promise<void>((r) => (fired = r));
    for (const d of Object.values(this.devs)) d.onIo = () => (++count >= ios ? fired() : undefined);
    await Promise.race([done, new Promise((r) => setTimeout(r, 20))]);
    for (const d of Object.values(this.devs)) d.onIo = undefined;
  }

  /** Merges a persistent snapshot into its origin (as dmstate merge does); lets it finish, or stops it with a suspend. */
  private async merge(): Promise<void> {
    const e = this.e;
    const candidates = e.names().filter((n) => {
      const w = e.table(n)[0]?.split(/\s+/);
      return n.startsWith('snap') && w?.[2] === 'snapshot' && w[5] !== 'N' && !e.info(n).suspended && e.status(n)[0] && !/Invalid|Overflow/.test(e.status(n)[0]);
    });
    const snap = this.pick(candidates);
    if (!snap) return;
    const w = e.table(snap)[0].split(/\s+/);
    const originLabel = w[3];
    const originName = `orig${originLabel}`;
    // As lvconvert --merge: the origin is a mapped device (made here when the workload has none).
    if (!e.device(originName) && !(await this.op(e.create(originName, { table: `0 ${this.originSectors} snapshot-origin ${originLabel}` })))) return;
    if (e.targetNames(originName)[0] !== 'snapshot-origin' || e.info(originName).suspended || e.info(originName).inactiveTable) return;
    // Something to merge: writes to the origin first.
    await Promise.all(Array.from({ length: 1 + this.rng.int(6) }, (_, j) => {
      const at = 8 * this.rng.int(this.originSectors / 8 - 8);
      return e.device(originName)!.write(sectors(at), Buffer.alloc(512 * 8 * (1 + this.rng.int(8)), j + 1)).catch(() => undefined);
    }));
    if (!(await this.op(e.suspend(originName)))) return;
    if (!(await this.op(e.load(originName, `0 ${this.originSectors} snapshot-merge ${originLabel} ${w[4]} P ${w[6]}`)))) {
      await this.op(e.resume(originName));
      return;
    }
    // LVM's order: the origin resumes (the handover) before the snapshot goes (first would cancel the handover).
    await this.op(e.resume(originName));
    await this.op(e.remove(snap));
    this.stats.merges++;
    if (this.rng.int(3) === 0) {
      // Stopped part-way (a later suspend/resume step may continue it).
      for (let t = this.rng.int(6); t > 0; t--) await turn();
      await this.op(e.suspend(originName));
      this.stats.mergesStopped++;
      return;
    }
    await this.quiesce();
    if (this.rng.int(2) === 0) {
      // Done: the origin gets its snapshot-origin table back.
      if (await this.op(e.suspend(originName))) {
        if (await this.op(e.load(originName, `0 ${this.originSectors} snapshot-origin ${originLabel}`))) await this.op(e.resume(originName));
      }
    }
  }

  /** Replays to every mark, compacts, replays again. */
  async finish(): Promise<void> {
    await this.check('at the end');
    const finalDigest = this.e.stateDigest();
    for (const [mark, want] of this.markDigests) {
      const r = await replay(this.db, { toMark: mark, useSnapshots: this.rng.int(2) === 0 });
      expect(r.seq, `seed ${this.seed}: mark ${mark}`).toBe(want.seq);
      if (r.digest !== want.digest) throw new Error(`seed ${this.seed}: replay to mark ${mark} (#${want.seq}) differs from the state observed live there`);
    }
    await this.e.close();
    const snaps = await listStateSnapshots(this.db);
    if (snaps.length > 0 && this.rng.int(2) === 0) {
      const before = snaps[this.rng.int(snaps.length)] + this.rng.int(3);
      const c = await compactLog(this.db, before);
      this.stats.compactions++;
      expect((await replay(this.db)).digest).toBe(finalDigest);
      for (const [mark, want] of this.markDigests) {
        if (want.seq < c.snapshotSeq) await expect(replay(this.db, { toMark: mark })).rejects.toThrow(/compacted/);
        else expect((await replay(this.db, { toMark: mark })).digest).toBe(want.digest);
      }
    }
    if (this.backend === 'classic') await this.db.close();
  }
}

async function runSeed(seed: number, backend: Backend, stats: Stats, steps: number): Promise<void> {
  const dir = backend === 'classic' ? fs.mkdtempSync(path.join(os.tmpdir(), 'dmstate-replay-')) : undefined;
  const run = new Run(seed, backend, createRng(seed), stats, dir);
  try {
    await run.open();
    await run.check('after open');
    for (let i = 0; i < steps; i++) {
      await run.step(i);
      stats.steps++;
      await run.check(`after step ${i}`);
    }
    await run.finish();
  } finally {
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  }
}

function describeStats(s: Stats): string {
  return Object.entries(s)
    .map(([k, v]) => `${k}=${v}`)
    .join(' ');
}

describe('replay digest equals the live digest', () => {
  test('memory-level, 60 seeds', async () => {
    const only = process.env.REPLAY_SEED;
    const seeds = only !== undefined ? [Number(only)] : Array.from({ length: 60 }, (_, i) => i + 1);
    const stats = newStats();
    const t0 = performance.now();
    for (const seed of seeds) {
      try {
        await runSeed(seed, 'memory', stats, 50);
      } catch (err) {
        throw new Error(`${(err as Error).message}\nreproduce with REPLAY_SEED=${seed} npx vitest run test/replay/replay-property.test.ts`, { cause: err });
      }
    }
    console.log(`memory: ${seeds.length} seeds, ${describeStats(stats)}, ${Math.round(performance.now() - t0)} ms`);
    if (only === undefined) {
      // The workload reaches what it is meant to.
      expect(stats.crashes).toBeGreaterThan(20);
      expect(stats.crashesMidFlight).toBeGreaterThan(10);
      expect(stats.merges).toBeGreaterThan(10);
      expect(stats.mergesStopped).toBeGreaterThan(2);
      expect(stats.invalidated + stats.overflowed).toBeGreaterThan(0);
      expect(stats.marks).toBeGreaterThan(50);
      expect(stats.compactions).toBeGreaterThan(5);
      expect(stats.exceptionsMax).toBeGreaterThan(256);
    }
  }, 300_000);

  test('classic-level in a temp folder, power cuts with volatile caches, 20 seeds', async () => {
    const only = process.env.REPLAY_CRASH_SEED;
    const seeds = only !== undefined ? [Number(only)] : Array.from({ length: 20 }, (_, i) => 1000 + i);
    const stats = newStats();
    const t0 = performance.now();
    for (const seed of seeds) {
      try {
        await runSeed(seed, 'classic', stats, 30);
      } catch (err) {
        throw new Error(`${(err as Error).message}\nreproduce with REPLAY_CRASH_SEED=${seed} npx vitest run test/replay/replay-property.test.ts`, { cause: err });
      }
    }
    console.log(`classic: ${seeds.length} seeds, ${describeStats(stats)}, ${Math.round(performance.now() - t0)} ms`);
    if (only === undefined) {
      expect(stats.crashes).toBeGreaterThan(10);
      expect(stats.merges).toBeGreaterThan(3);
    }
  }, 300_000);
});
