/**
 * snapshot-merge crash consistency.
 *
 * In process: the origin and the COW are FaultyBlockDevices with a volatile write cache over memory devices; the
 * pool's database is one MemoryLevel that survives. The COW is crafted in the Linux format (records ascending,
 * descending or shuffled; some runs over 256 records with chunk 8, so two metadata areas), then loaded as a
 * snapshot; on some seeds origin writes add exceptions that are only in the WAL when the merge starts. The merge
 * is started as lvconvert does it (suspend, load snapshot-merge, resume, remove the snapshot) while a seeded
 * workload writes to the merging device (chunks in the COW, the run being merged, merged chunks, others; some FUA)
 * and flushes it. At the N-th I/O the power is cut: every device fenced and crashed with torn writes. The engine
 * is dropped; a new one over the same database and memory devices restores the snapshot-merge table, which
 * resumes the merge by itself (half of the runs crash a second time during the resumed merge). Then:
 *   - the merge reaches DONE, status `16/N 16`, nothing left to restore by hand;
 *   - the origin holds the snapshot's contents (read before the merge) with the workload's writes over them:
 *     every write acknowledged before a completed flush (or FUA) is there, later ones are old or new per sector.
 *
 * Through the real daemon: `dmstate merge snap` on a COW with thousands of single-chunk runs, the daemon killed
 * with SIGKILL mid-merge, restarted (the merge resumes), `dmstate merge orig` watches it finish and switches the
 * table back; the origin read through NBD (qemu-img convert) equals the snapshot read before the merge.
 *
 * Reproduce one in-process run with MERGE_CRASH_SEED=N npx vitest run test/targets/merge-crash.test.ts.
 */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { MemoryLevel } from 'memory-level';
import { Engine } from '../../src/core/engine.js';
import { MemoryBlockDevice } from '../../src/block/memory-device.js';
import { sectors } from '../../src/block/units.js';
import { createRng, type Rng } from '../../src/core/rng.js';
import type { LevelDb } from '../../src/log/event-log.js';
import type { SnapshotInstance } from '../../src/targets/snapshot/snapshot.js';
import { ControlClient } from '../../src/frontends/control-client.js';
import { SECTOR, craftCow, decodeSector, firstDifference, snapshotImage, writeData, type RecordOrder } from './merge-cow.js';
import { run, type RunResult, show, startKillableDaemon, type KillableDaemon as Daemon } from '../helpers/process.js';
import { CrashDevice, PowerCut, readDevice, within, SectorHistoryModel } from '../helpers/crash.js';

const CHUNK = 8;
const turn = (): Promise<void> => new Promise((r) => setImmediate(r));
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/**
 * Batches copied whose commit has not come yet (commit one behind, merger.ts), from the merge's machine events: a
 * COPY_DONE or COPY_DONE_AHEAD adds one, a COMMITTED takes one, a start, stop or failure drops them.
 */
function copiedBatchesTracker(e: Engine): { awaiting: number } {
  const t = { awaiting: 0 };
  e.events$.subscribe((ev) => {
    if (ev.type !== 'merge.state') return;
    if (ev.event === 'COPY_DONE' || ev.event === 'COPY_DONE_AHEAD') t.awaiting++;
    else if (ev.event === 'COMMITTED') t.awaiting--;
    else if (ev.event === 'START' || ev.state === 'STOPPED' || ev.state === 'FAILED') t.awaiting = 0;
  });
  return t;
}

async function mergeState(e: Engine): Promise<string> {
  const text = await e.message('orig', 0, ['merge-status']);
  return /state=(\S+)/.exec(text)?.[1] ?? '?';
}

interface Stats {
  crashes: number;
  secondCrashes: number;
  midMerge: number;
  torn: number;
  lost: number;
  writes: number;
  durableWrites: number;
  walSeeds: number;
  twoAreaSeeds: number;
  /** Cuts while a batch was copied and its commit still to come; while two were. */
  cutWithCopiedBatch: number;
  cutWithTwoCopiedBatches: number;
  ms: number;
}

/** Writes to the merging device and flushes it until `stop` says so; never rejects (the engine may be fenced). */
async function workload(e: Engine, rng: Rng, model: SectorHistoryModel, nextId: () => number, stop: () => boolean, stats: Stats, fired: Promise<void>): Promise<void> {
  const inflight: Array<Promise<unknown>> = [];
  const track = <T>(p: Promise<T>, onOk?: () => void): Promise<boolean> => {
    const q = p.then(
      () => {
        onOk?.();
        return true;
      },
      () => false,
    );
    inflight.push(q);
    return q;
  };
  const chunks = model.sizeSectors / CHUNK;
  for (let batch = 0; batch < 400 && !stop(); batch++) {
    const ops: Array<Promise<boolean>> = [];
    const busy: Array<[number, number]> = [];
    const n = 1 + rng.int(4);
    for (let i = 0; i < n; i++) {
      if (rng.int(5) === 0) {
        const covered = model.ackedNotDurable();
        ops.push(track(e.device('orig')!.flush(), () => covered.forEach((r) => model.markDurable(r))));
        continue;
      }
      const count = 1 + rng.int(rng.int(3) === 0 ? 2 * CHUNK : CHUNK);
      const sector = Math.min(rng.int(chunks) * CHUNK + rng.int(CHUNK), model.sizeSectors - count);
      if (busy.some(([s, t]) => sector < t && s < sector + count)) continue;
      busy.push([sector, sector + count]);
      const id = nextId();
      const fua = rng.int(4) === 0;
      const rec = model.issue(id, sector, count);
      stats.writes++;
      ops.push(
        track(e.device('orig')!.write(sectors(sector), writeData(id, sector, count), { fua }), () => {
          rec.acked = true;
          if (fua) model.markDurable(rec);
        }),
      );
    }
    await within(Promise.race([Promise.all(ops), fired]), `batch ${batch}`);
    await turn();
  }
  await Promise.race([Promise.all(inflight), sleep(300)]);
}

async function crashRun(seed: number, stats: Stats): Promise<void> {
  const rng = createRng(seed);
  const big = seed % 5 === 0;
  const originSectors = big ? 4096 : 1024 + CHUNK * rng.int(128);
  const originChunks = originSectors / CHUNK;
  const picked = new Set<number>();
  const oldChunks: number[] = [];
  const want = big ? 260 + rng.int(60) : 10 + rng.int(60);
  while (oldChunks.length < want) {
    const c = rng.int(originChunks - 8);
    const n = rng.int(3) === 0 ? 2 + rng.int(6) : 1;
    for (let i = 0; i < n && oldChunks.length < want; i++) {
      if (picked.has(c + i)) continue;
      picked.add(c + i);
      oldChunks.push(c + i);
    }
  }
  const order: RecordOrder = (['ascending', 'descending', 'shuffled'] as const)[rng.int(3)];
  const cow = craftCow({ chunkSectors: CHUNK, oldChunks, order, seed, cowSectors: (originChunks * 2 + 8) * CHUNK });
  if (big) stats.twoAreaSeeds++;
  const inner: Record<string, MemoryBlockDevice> = {
    o: new MemoryBlockDevice({ sizeSectors: sectors(originSectors), name: 'o' }),
    c: new MemoryBlockDevice({ sizeSectors: sectors(cow.image.length / SECTOR), name: 'c' }),
  };
  await inner.o.write(sectors(0), writeData(0, 0, originSectors));
  await inner.c.write(sectors(0), cow.image);
  const db = new MemoryLevel() as unknown as LevelDb;
  let generation = 0;
  const wrap = (): Record<string, CrashDevice> => {
    generation++;
    const out: Record<string, CrashDevice> = {};
    for (const [label, dev] of Object.entries(inner)) {
      out[label] = new CrashDevice(dev, { volatileCache: true, rng: createRng(seed * 1000 + generation * 10 + label.length), closeInner: false, name: label });
    }
    return out;
  };

  let devs = wrap();
  let e = await Engine.open({ db, backingDevices: devs, seed });
  await e.create('orig', { table: `0 ${originSectors} snapshot-origin o` });
  await e.create('snap', { table: `0 ${originSectors} snapshot o c P ${CHUNK}` });
  let id = 10;
  if (rng.int(2) === 0) {
    // Origin writes: more exceptions, committed through the WAL only (not yet in the COW's areas).
    stats.walSeeds++;
    for (let i = 0; i < 10 + rng.int(30); i++) {
      const count = 1 + rng.int(2 * CHUNK);
      await e.device('orig')!.write(sectors(rng.int(originSectors - count)), writeData(id++, 0, count));
    }
    await e.device('orig')!.flush();
  }
  const snapshot = await readDevice(e.device('snap')!);
  if (id === 10) expect(firstDifference(snapshot, snapshotImage(writeData(0, 0, originSectors), cow), 'crafted snapshot')).toBeUndefined();
  const snapIds = Array.from({ length: originSectors }, (_, s) => decodeSector(snapshot, s * SECTOR, s));
  const model = new SectorHistoryModel(originSectors, (s) => snapIds[s] as number, (s) => ` (chunk ${Math.floor(s / CHUNK)})`);
  const nextId = (): number => id++;

  await e.suspend('orig');
  await e.suspend('snap');
  await e.load('orig', `0 ${originSectors} snapshot-merge o c P ${CHUNK}`);
  // The power is cut at a seeded I/O from the resume on (the merge's and the workload's). A batched merge does about
  // two I/Os per record (the copy's read and write) and a few per batch.
  const ios = 40 + cow.records.length * 2;
  let cut = new PowerCut(1 + rng.int(ios), Object.values(devs));
  let copied = copiedBatchesTracker(e);
  const countCopied = (): void => {
    if (copied.awaiting >= 1) stats.cutWithCopiedBatch++;
    if (copied.awaiting >= 2) stats.cutWithTwoCopiedBatches++;
  };
  cut.onFire = countCopied;
  await e.resume('orig');
  await e.remove('snap'); // after the handover, as lvconvert does (removing it first cancels the handover)
  const rounds = rng.int(2) === 0 ? 2 : 1;
  for (let round = 0; round < rounds; round++) {
    await workload(e, rng, model, nextId, () => cut.fired, stats, cut.firedSignal);
    const merging = await mergeState(e).catch(() => '?');
    if (!cut.fired) cut.fire(); // the merge and the workload ended first: cut now
    else if (merging !== 'DONE') stats.midMerge++;
    await cut.done;
    model.crashed();
    stats.crashes++;
    if (round === 1) stats.secondCrashes++;
    stats.torn += cut.torn;
    stats.lost += cut.lost;
    // Drop the engine: its I/O fails against the fence; let its log settle.
    for (const name of e.names()) {
      const d = e.device(name)!;
      if (d.suspended && d.queuedCount > 0) d.killQueued();
    }
    for (let i = 0; i < 5; i++) {
      await e.log.drain();
      await turn();
    }
    // Power on: the snapshot-merge table comes back and resumes the merge by itself.
    devs = wrap();
    e = await Engine.open({ db, backingDevices: devs, seed });
    copied = copiedBatchesTracker(e);
    const where = `round ${round} (cut at I/O ${cut.count}, ${order}, ${cow.records.length} records)`;
    expect(e.restoreFailures, where).toEqual([]);
    expect(e.names(), where).toEqual(['orig']);
    expect(e.table('orig'), where).toEqual([`0 ${originSectors} snapshot-merge o c P ${CHUNK}`]);
    expect(e.info('orig').suspended, where).toBe(false);
    if (round + 1 < rounds) {
      cut = new PowerCut(1 + rng.int(ios), Object.values(devs));
      cut.onFire = countCopied;
      continue;
    }
    const until = performance.now() + 10_000;
    let st = await mergeState(e);
    while (st !== 'DONE' && st !== 'FAILED' && performance.now() < until) {
      await sleep(1);
      st = await mergeState(e);
    }
    expect(st, `${where}: ${await e.message('orig', 0, ['merge-status'])}`).toBe('DONE');
    expect(e.status('orig'), where).toEqual([`0 ${originSectors} snapshot-merge ${2 * CHUNK}/${cow.image.length / SECTOR} ${2 * CHUNK}`]);
    const state = (e.device('orig')!.live!.targets[0].instance as SnapshotInstance).state;
    expect(state.table.size, where).toBe(0);
    model.check(await readDevice(e.device('orig')!), `${where}: merging device after DONE`);
    model.check(await readDevice(devs.o), `${where}: origin device after DONE`);
  }
  stats.durableWrites += model.records.filter((r) => r.durable).length;
  await e.close();
}

describe('snapshot-merge crash consistency (in process, power cut at a seeded I/O)', () => {
  const only = process.env.MERGE_CRASH_SEED;
  const seeds = only !== undefined ? [Number(only)] : Array.from({ length: 250 }, (_, i) => i + 1);
  test(`${seeds.length} runs, one or two power cuts each`, async () => {
    const stats: Stats = { crashes: 0, secondCrashes: 0, midMerge: 0, torn: 0, lost: 0, writes: 0, durableWrites: 0, walSeeds: 0, twoAreaSeeds: 0, cutWithCopiedBatch: 0, cutWithTwoCopiedBatches: 0, ms: 0 };
    const t0 = performance.now();
    for (const seed of seeds) {
      try {
        await crashRun(seed, stats);
      } catch (err) {
        throw new Error(`seed ${seed}: ${(err as Error).message}\nreproduce with MERGE_CRASH_SEED=${seed} npx vitest run test/targets/merge-crash.test.ts`, { cause: err });
      }
    }
    stats.ms = Math.round(performance.now() - t0);
    console.log(
      `merge crash points: ${stats.crashes} (${stats.secondCrashes} during a resumed merge, ${stats.midMerge} with the merge still running), ` +
        `${stats.lost} cached writes lost, ${stats.torn} torn, ${stats.writes} writes to the merging device (${stats.durableWrites} durable), ` +
        `${stats.walSeeds} runs with WAL-only exceptions, ${stats.twoAreaSeeds} with two metadata areas, ` +
        `${stats.cutWithCopiedBatch} cuts with a batch copied and its commit to come (${stats.cutWithTwoCopiedBatches} with two), ${stats.ms} ms`,
    );
    if (only === undefined) {
      expect(stats.crashes).toBeGreaterThanOrEqual(300);
      expect(stats.midMerge).toBeGreaterThan(stats.crashes / 2);
      // Commit one behind is exercised: cuts land between a batch's copy and its commit, also with the next copied.
      expect(stats.cutWithCopiedBatch).toBeGreaterThan(stats.crashes / 10);
      expect(stats.cutWithTwoCopiedBatches).toBeGreaterThan(0);
      expect(stats.torn).toBeGreaterThan(0);
      expect(stats.ms).toBeLessThan(30_000);
    }
  }, 120_000);
});

// ---- the real daemon, killed with SIGKILL mid-merge -----------------------------------------------------------

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const CLI = path.join(ROOT, 'bin/dmstate.js');


describe('snapshot-merge through the real daemon: SIGKILL mid-merge, restart, dmstate merge finishes it', () => {
  let dir = '';
  let pool = '';
  let originImg = '';
  let cowImg = '';
  const daemons: Daemon[] = [];
  // 64 MiB: 16384 chunks of 4 KiB. A batched merge takes these 10000 runs in seven batches (1, 8, 64, 512, 4096,
  // 4096, 1223 runs), so the kill at the first committed run lands with most of them left.
  const ORIGIN_SECTORS = 131072;
  const RECORDS = 10000;

  async function serve(): Promise<Daemon> {
    const d = await startKillableDaemon(CLI, pool);
    daemons.push(d);
    return d;
  }

  const dmsetup = (...args: string[]): Promise<RunResult> => run(process.execPath, [CLI, 'dmsetup', '--pool', pool, ...args]);
  const nbdRead = async (name: string): Promise<Buffer> => {
    const file = path.join(dir, `${name}.raw`);
    const r = await run('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', `nbd+unix:///${name}?socket=${path.join(pool, 'nbd.sock')}`, file]);
    expect(r.code, show(r)).toBe(0);
    const b = fs.readFileSync(file);
    fs.rmSync(file);
    return b;
  };
  const mergeStatusText = async (): Promise<string> => (await dmsetup('message', 'orig', '0', 'merge-status')).stdout;

  beforeAll(() => {
    if (spawnSync('sh', ['-c', 'command -v qemu-img']).status !== 0) {
      throw new Error(`this test needs qemu-img (qemu-utils): ${process.env.DMSTATE_TOOLS_MISSING ?? 'run test/install-tools.sh as root'}`);
    }
    const build = spawnSync('npx', ['tsc', '-p', 'tsconfig.build.json'], { cwd: ROOT, encoding: 'utf8' });
    if (build.status !== 0) throw new Error(`build failed:\n${build.stdout}\n${build.stderr}`);
    dir = fs.mkdtempSync('/tmp/dmm-'); // short: unix socket paths are limited to 107 bytes
    pool = path.join(dir, 'p');
    originImg = path.join(dir, 'origin.img');
    cowImg = path.join(dir, 'cow.img');
  }, 120_000);

  afterAll(async () => {
    for (const d of daemons) {
      if (d.child.exitCode === null && d.child.signalCode === null) {
        d.child.kill('SIGTERM');
        const t = await Promise.race([d.exited, sleep(5000).then(() => 'timeout')]);
        if (t === 'timeout') d.child.kill('SIGKILL');
      }
    }
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  });

  test(`${RECORDS} single-chunk runs: kill -9 mid-merge, restart, the merge resumes, origin = snapshot`, async () => {
    // A shuffled COW: every record its own run (thousands of merge steps).
    const rng = createRng(4242);
    const all = Array.from({ length: ORIGIN_SECTORS / CHUNK }, (_, i) => i);
    for (let i = all.length - 1; i > 0; i--) {
      const j = rng.int(i + 1);
      [all[i], all[j]] = [all[j], all[i]];
    }
    const cow = craftCow({ chunkSectors: CHUNK, oldChunks: all.slice(0, RECORDS), order: 'shuffled', seed: 5 });
    const originData = writeData(0, 0, ORIGIN_SECTORS);
    fs.writeFileSync(originImg, originData);
    fs.writeFileSync(cowImg, cow.image);
    const want = snapshotImage(originData, cow);

    let daemon = await serve();
    for (const args of [
      ['create', 'orig', '--table', `0 ${ORIGIN_SECTORS} snapshot-origin ${originImg}`],
      ['create', 'snap', '--table', `0 ${ORIGIN_SECTORS} snapshot ${originImg} ${cowImg} P ${CHUNK}`],
    ]) {
      const r = await dmsetup(...args);
      expect(r.code, show(r)).toBe(0);
    }
    expect(firstDifference(await nbdRead('snap'), want, 'snapshot through NBD before the merge')).toBeUndefined();

    // Kill the daemon once a part of the merge is durable and `dmstate merge` has removed the snapshot (its switch is
    // done): at the first committed run after both, from the daemon's live event stream (a batched merge of these
    // runs takes a fraction of a second: polling merge-status would miss it).
    const events = await ControlClient.connect(path.join(pool, 'control.sock'), pool);
    let status = '';
    let snapRemoved = false;
    const firstCommitted = new Promise<void>((resolve) => {
      events
        .stream({ op: 'log', follow: true }, (r) => {
          if (r.op !== 'event') return false;
          if (r.event.type === 'device.removed' && r.event.device === 'snap') snapRemoved = true;
          if (r.event.type === 'merge.state') status = `state=${r.event.state} chunks_left=${r.event.chunksLeft}`;
          if (r.event.type !== 'merge.run.committed' || !snapRemoved) return false;
          resolve();
          return true;
        })
        .catch(() => undefined);
    });
    const t0 = performance.now();
    const merge1 = run(process.execPath, [CLI, 'merge', '--pool', pool, 'snap'], 120_000);
    await Promise.race([firstCommitted, sleep(60_000)]);
    expect(status).toMatch(/state=(PREPARE|COPY_OUT_OTHERS|INTERLOCK|COPYING|FLUSHING|COMMITTING) /);
    daemon.child.kill('SIGKILL');
    events.close();
    expect(await daemon.exited).toEqual({ code: null, signal: 'SIGKILL' });
    const killedAt = (performance.now() - t0) / 1000;
    const r1 = await merge1;
    expect(r1.code, show(r1)).not.toBe(0); // its daemon died under it
    expect(r1.stderr).toContain(`merging snapshot snap into orig (origin ${originImg}, COW ${cowImg}, chunk ${CHUNK} sectors)`);

    daemon = await serve();
    expect(daemon.stderr).not.toMatch(/could not restore/);
    const ls = await dmsetup('ls');
    expect(ls.stdout).not.toMatch(/^snap\t/m);
    expect((await dmsetup('table', 'orig')).stdout).toBe(`0 ${ORIGIN_SECTORS} snapshot-merge ${originImg} ${cowImg} P ${CHUNK}\n`);
    const resumed = await mergeStatusText();
    expect(resumed).toMatch(/state=\S+ chunks_left=\d+/);
    // The restarted daemon resumed the merge by itself (it may be done by now): chunks_total is what the COW held
    // when it did.
    const leftAfterRestart = Number(/chunks_total=(\d+)/.exec(resumed)![1]);
    expect(leftAfterRestart).toBeLessThan(RECORDS);
    expect(leftAfterRestart).toBeGreaterThan(0);

    const r2 = await run(process.execPath, [CLI, 'merge', '--pool', pool, 'orig'], 120_000);
    expect(r2.code, show(r2)).toBe(0);
    expect(r2.stderr).toContain('watching the merge running on orig');
    expect(r2.stderr).toMatch(/\[#{30}\] 100\.0% {2}\d+\/\d+ chunks/);
    // No snapshot of the origin is left: as lvconvert leaves it, a linear mapping.
    expect(r2.stderr).toMatch(/merge done: \d+ chunks in \d+:\d\d; orig is a linear mapping of .* again \(no snapshot of it left\)\n$/);
    expect((await dmsetup('table', 'orig')).stdout).toBe(`0 ${ORIGIN_SECTORS} linear ${originImg} 0\n`);
    expect(firstDifference(await nbdRead('orig'), want, 'origin through NBD after the merge')).toBeUndefined();
    expect(firstDifference(fs.readFileSync(originImg), want, 'origin.img after the merge')).toBeUndefined();
    // The COW is empty now: the header and an empty area 0 (what the kernel leaves too).
    const cowAfter = fs.readFileSync(cowImg);
    expect(cowAfter.subarray(CHUNK * SECTOR, 2 * CHUNK * SECTOR).every((b) => b === 0)).toBe(true);
    console.log(
      `SIGKILL after ${killedAt.toFixed(1)} s with ${leftAfterRestart} of ${RECORDS} chunks left; the rest merged in ` +
        `${((performance.now() - t0) / 1000 - killedAt).toFixed(1)} s (incl. restart)`,
    );
  }, 120_000);
});
