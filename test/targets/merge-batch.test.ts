/**
 * snapshot-merge in batches (src/targets/snapshot/merger.ts): one pass PREPARE → COMMITTING copies several linear
 * runs, flushes the origin once and clears all their records in one lock-step commit, whose metadata area writes
 * become durable while the next batch runs.
 *
 * - The runs of each batch are the runs prepare_merge finds one commit after the other (test/targets/merge-cow.ts
 *   model), in order; the first batch is one run and later ones grow; a batch spans several metadata areas; every
 *   status seen is one Linux would show at some step; the origin ends equal to the snapshot.
 * - A power cut between two metadata area writes of one batch commit (FaultyBlockDevice volatile caches, torn):
 *   after the restart the merge resumes and finishes, the origin is the snapshot with every acknowledged and
 *   flushed write over it.
 * - Writes into the batch being merged — issued before its interlock, during its copy, flush and commit, once it is
 *   copied and waits for its commit while the next batch is found and copied, and after COMMITTED while its area
 *   writes are not durable yet — all wait for the batch and are kept.
 * - Corruption inside a batch (a chunk from the middle of an in-core run, an exception on disk but not in memory):
 *   `Merge failed` with the lock-step reason, the runs before the refused one merged (on disk too), I/O goes on.
 * - A failed metadata area write after COMMITTED: `Merge failed` with the write error, the queued writes go on.
 */
import { describe, expect, test } from 'vitest';
import { MemoryLevel } from 'memory-level';
import { Engine } from '../../src/core/engine.js';
import { MemoryBlockDevice } from '../../src/block/memory-device.js';
import { FaultyBlockDevice, type FaultyErrorRule } from '../../src/block/faulty-device.js';
import type { BlockDevice } from '../../src/block/contract.js';
import { sectors, type Sector } from '../../src/block/units.js';
import { createRng } from '../../src/core/rng.js';
import type { LevelDb } from '../../src/log/event-log.js';
import type { LoggedEvent } from '../../src/log/events.js';
import { persistentStore } from '../../src/stores/persistent-store.js';
import type { SnapshotInstance } from '../../src/targets/snapshot/snapshot.js';
import type { SnapshotState } from '../../src/targets/snapshot/snapshot-state.js';
import { MERGE_BATCH_RUNS_GROWTH } from '../../src/targets/snapshot/merger.js';
import { SECTOR, craftCow, firstDifference, isMetadataChunk, mergeStatusSequence, mergeSteps, writeData, type CraftedCow } from './merge-cow.js';

const CHUNK = 8;
const EPA = 256; // records per metadata area with 8-sector chunks
const turn = (): Promise<void> => new Promise((r) => setImmediate(r));
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

async function readAll(dev: BlockDevice): Promise<Buffer> {
  const b = Buffer.alloc(dev.sizeSectors * SECTOR);
  await dev.read(sectors(0), b);
  return b;
}

function expectSame(got: Buffer, want: Buffer, what: string): void {
  const d = firstDifference(got, want, what);
  expect(d, d).toBeUndefined();
}

function stateOf(e: Engine, name: string, inactive = false): SnapshotState {
  const d = e.device(name)!;
  return ((inactive ? d.inactive : d.live)!.targets[0].instance as SnapshotInstance).state;
}

async function mergeStatus(e: Engine): Promise<{ state: string; chunksLeft: number; chunksMerged: number; reason?: string }> {
  const text = await e.message('orig', 0, ['merge-status']);
  const get = (k: string): string | undefined => new RegExp(`${k}=("[^"]*"|\\S+)`).exec(text)?.[1];
  const reason = get('reason');
  return { state: get('state') ?? '?', chunksLeft: Number(get('chunks_left')), chunksMerged: Number(get('chunks_merged')), reason: reason === undefined ? undefined : (JSON.parse(reason) as string) };
}

async function waitMerge(e: Engine, ms = 20_000): Promise<{ state: string; chunksLeft: number; chunksMerged: number; reason?: string }> {
  const until = performance.now() + ms;
  for (;;) {
    const st = await mergeStatus(e);
    if (st.state === 'DONE' || st.state === 'FAILED' || st.state === 'STOPPED') return st;
    if (performance.now() > until) throw new Error(`merge not finished within ${ms} ms: ${JSON.stringify(st)}`);
    await sleep(2);
  }
}

/** A pass-through device: `gate` holds writes back while shut; `onIo` hears of every I/O before it starts. */
class TestDevice extends FaultyBlockDevice {
  onIo: ((op: 'read' | 'write' | 'flush', sector: number) => void) | undefined;
  private gate: Promise<void> | undefined;
  private open: () => void = () => undefined;
  /** Writes held back by the gate whose sector passes this test (all when unset). */
  gateOnly: ((sector: number) => boolean) | undefined;
  waiting = 0;
  shut(only?: (sector: number) => boolean): void {
    this.gateOnly = only;
    this.gate ??= new Promise((resolve) => (this.open = resolve));
  }
  reopen(): void {
    this.open();
    this.gate = undefined;
  }
  protected override _read(s: Sector, b: Uint8Array): Promise<void> {
    this.onIo?.('read', s);
    return super._read(s, b);
  }
  protected override async _write(s: Sector, b: Uint8Array, fua: boolean): Promise<void> {
    this.onIo?.('write', s);
    if (this.gate && (this.gateOnly === undefined || this.gateOnly(s))) {
      this.waiting++;
      await this.gate;
      this.waiting--;
    }
    return super._write(s, b, fua);
  }
  protected override _flush(): Promise<void> {
    this.onIo?.('flush', 0);
    return super._flush();
  }
}

interface Rig {
  readonly e: Engine;
  readonly db: LevelDb;
  readonly inner: { o: MemoryBlockDevice; c: MemoryBlockDevice };
  readonly origin: TestDevice;
  readonly cow: TestDevice;
  readonly originSectors: number;
  readonly snapshot: Buffer;
  readonly events: LoggedEvent[];
  readonly statuses: string[];
}

/** Origin (write id 0) + crafted COW behind TestDevices, `orig` snapshot-origin and `snap` snapshot over them. */
async function rig(cow: CraftedCow, originSectors: number, seed = 1): Promise<Rig> {
  const inner = { o: new MemoryBlockDevice({ sizeSectors: sectors(originSectors), name: 'o' }), c: new MemoryBlockDevice({ sizeSectors: sectors(cow.image.length / SECTOR), name: 'c' }) };
  await inner.o.write(sectors(0), writeData(0, 0, originSectors));
  await inner.c.write(sectors(0), cow.image);
  const origin = new TestDevice(inner.o, { volatileCache: true, rng: createRng(seed), closeInner: false, name: 'o' });
  const cowDev = new TestDevice(inner.c, { volatileCache: true, rng: createRng(seed + 1), closeInner: false, name: 'c' });
  const db = new MemoryLevel() as unknown as LevelDb;
  const e = await Engine.open({ db, backingDevices: { o: origin, c: cowDev } });
  const events: LoggedEvent[] = [];
  const statuses: string[] = [];
  e.events$.subscribe((ev) => {
    if (!ev.type.startsWith('merge.')) return;
    events.push(ev);
    if (e.device('orig')?.live?.targets[0].type.name === 'snapshot-merge') statuses.push(e.status('orig')[0]);
  });
  await e.create('orig', { table: `0 ${originSectors} snapshot-origin o` });
  await e.create('snap', { table: `0 ${originSectors} snapshot o c P ${CHUNK}` });
  const snapshot = await readAll(e.device('snap')!);
  return { e, db, inner, origin, cow: cowDev, originSectors, snapshot, events, statuses };
}

/** lvconvert --merge's order; `before` runs just before the handover (the resume). */
async function startMerge(r: Rig, before?: () => void): Promise<void> {
  await r.e.suspend('orig');
  await r.e.suspend('snap');
  await r.e.load('orig', `0 ${r.originSectors} snapshot-merge o c P ${CHUNK}`);
  before?.();
  await r.e.resume('orig');
  await r.e.remove('snap');
}

/** The runs of each batch, in order: the run.started events between two PREPARE --RUN_FOUND--> transitions. */
function batchesOf(events: readonly LoggedEvent[]): Array<Array<[number, number, number]>> {
  const out: Array<Array<[number, number, number]>> = [];
  let current: Array<[number, number, number]> = [];
  for (const ev of events) {
    if (ev.type === 'merge.run.started') current.push([ev.firstOldChunk, ev.firstNewChunk, ev.chunks]);
    if (ev.type === 'merge.state' && ev.event === 'RUN_FOUND') {
      out.push(current);
      current = [];
    }
  }
  expect(current, 'run.started events after the last RUN_FOUND').toEqual([]);
  return out;
}

const range = (from: number, to: number): number[] => Array.from({ length: to - from }, (_, i) => from + i);

/** `count` old chunks in runs of 1..maxRun consecutive chunks, gaps between runs (allocation order = ascending). */
function runsOfOlds(count: number, maxRun: number, seed: number): number[] {
  const rng = createRng(seed);
  const olds: number[] = [];
  for (let base = 0; olds.length < count; base += maxRun + 1 + rng.int(3)) for (let i = 0, k = rng.int(maxRun); i <= k && olds.length < count; i++) olds.push(base + i);
  return olds;
}

describe('merge batches', () => {
  test('the batches are the prepare_merge runs in order, the first one run, later ones larger and across areas; origin = snapshot', async () => {
    // 1300 records in runs of 1..6 chunks: six metadata areas (the last partly filled).
    const oldChunks = runsOfOlds(1300, 6, 7);
    const cow = craftCow({ chunkSectors: CHUNK, oldChunks, order: 'ascending' });
    const originSectors = (oldChunks[oldChunks.length - 1] + 8) * CHUNK;
    const r = await rig(cow, originSectors);
    const cowSectors = cow.image.length / SECTOR;
    await startMerge(r);
    const st = await waitMerge(r.e);
    expect(st.state).toBe('DONE');
    expect(r.e.status('orig')).toEqual([`0 ${originSectors} snapshot-merge ${2 * CHUNK}/${cowSectors} ${2 * CHUNK}`]);
    expectSame(await readAll(r.inner.o), r.snapshot, 'origin after DONE');

    const model = mergeSteps(cow.records, CHUNK, cowSectors).steps.map((x): [number, number, number] => [x.firstOldChunk, x.firstNewChunk, x.chunks]);
    const batches = batchesOf(r.events);
    expect(batches.flat()).toEqual(model);
    expect(batches[0].length, 'the first batch is one run, as the kernel step').toBe(1);
    for (let i = 1; i < batches.length - 1; i++) expect(batches[i].length, `batch ${i}`).toBe(Math.min(MERGE_BATCH_RUNS_GROWTH ** i, 4096));
    // Records of one batch in more than one metadata area: the commit wrote several areas.
    let index = cow.records.length;
    let spanning = 0;
    for (const b of batches) {
      const chunks = b.reduce((n, x) => n + x[2], 0);
      if (Math.floor((index - 1) / EPA) !== Math.floor((index - chunks) / EPA)) spanning++;
      index -= chunks;
    }
    expect(spanning, 'batches spanning metadata areas').toBeGreaterThanOrEqual(2);
    // The committed events: chunks left after each run, in order; the merge.state events once per batch.
    let left = cow.records.length;
    expect(r.events.flatMap((ev) => (ev.type === 'merge.run.committed' ? [ev.chunksLeft] : []))).toEqual(model.map((x) => (left -= x[2])));
    expect(r.events.filter((ev) => ev.type === 'merge.state' && ev.event === 'COMMITTED').length).toBe(batches.length);
    // Every status seen is one of the prepare_merge/commit_merge sequence, in order.
    const sequence = mergeStatusSequence(cow.records, CHUNK, cowSectors);
    let at = 0;
    for (const s of r.statuses) {
      const i = sequence.indexOf(s.split(' ').slice(3).join(' '), at);
      expect(i, `status "${s}" after ${sequence[at]}`).toBeGreaterThanOrEqual(0);
      at = i;
    }
    // The COW holds no exception: a fresh store finds none.
    const store = await persistentStore.create({ cow: r.inner.c, chunkSizeSectors: sectors(0), overflow: false, readOnly: true });
    const found: number[] = [];
    await persistentStore.readMetadata(store, (o) => found.push(o));
    expect(found).toEqual([]);
    await r.e.close();
  });
});

describe('merge batches: runs side by side on the COW are copied together', () => {
  test('600 one-chunk runs allocated in order: one scatter copy per 32 of them (a read each), each chunk to its own origin place', async () => {
    // Every other origin chunk remapped: no two records form a run, but their COW chunks follow each other.
    const oldChunks = range(0, 600).map((i) => 2 * i + 1);
    const cow = craftCow({ chunkSectors: CHUNK, oldChunks, order: 'ascending' });
    const originSectors = 1300 * CHUNK;
    const r = await rig(cow, originSectors);
    let dataReads = 0;
    let writes = 0;
    r.cow.onIo = (op, sector) => {
      if (op === 'read' && !isMetadataChunk(Math.floor(sector / CHUNK), CHUNK)) dataReads++;
    };
    r.origin.onIo = (op) => {
      if (op === 'write') writes++;
    };
    await startMerge(r);
    const st = await waitMerge(r.e);
    expect(st.state).toBe('DONE');
    expectSame(await readAll(r.inner.o), r.snapshot, 'origin after DONE');
    expect(writes, 'one origin write per run').toBe(600);
    // 600 runs: ≥ 19 groups of ≤ 32; groups also end at metadata chunks (every 256 records) and batch ends.
    expect(dataReads).toBeGreaterThanOrEqual(19);
    expect(dataReads, 'COW reads for 600 runs').toBeLessThanOrEqual(30);
    await r.e.close();
  });
});

// ---- a power cut between two area writes of one commit -------------------------------------------------------------

describe('merge batches: a power cut between two metadata area writes of one commit', () => {
  test('20 seeds: the merge resumes after the restart and ends with the snapshot plus every flushed write', async () => {
    let cutsBetween = 0;
    for (let seed = 1; seed <= 20; seed++) {
      const rng = createRng(500 + seed);
      // Single-chunk runs (shuffled records): the third batch (64 runs) or the fourth (512) spans areas.
      const originChunks = 2048;
      const all = range(0, originChunks - 8);
      for (let i = all.length - 1; i > 0; i--) {
        const j = rng.int(i + 1);
        [all[i], all[j]] = [all[j], all[i]];
      }
      const cow = craftCow({ chunkSectors: CHUNK, oldChunks: all.slice(0, 700 + rng.int(300)), order: 'shuffled', seed });
      const originSectors = originChunks * CHUNK;
      const r = await rig(cow, originSectors, seed * 10);
      const cowSectors = cow.image.length / SECTOR;
      // Writes to the merging device: whole chunks, each chunk at most once; `flushed`: chunks whose write was
      // acknowledged FUA or before a completed flush (they must survive the cut).
      const model = Buffer.from(r.snapshot);
      const written = new Map<number, { id: number; acked: boolean }>();
      const flushed = new Set<number>();
      let nextId = 100;
      const cutAt = 2 + rng.int(2); // the cut comes at the 2nd or 3rd area write of one commit
      let areaWritesSinceFlush = 0;
      let fired = false;
      let firedAreas = 0;
      const fence: FaultyErrorRule[] = [{ op: 'read' }, { op: 'write' }, { op: 'flush' }, { op: 'discard' }];
      let crashDone: Promise<unknown> = Promise.resolve();
      const fire = (): void => {
        fired = true;
        for (const d of [r.origin, r.cow]) d.setErrorRules(fence);
        crashDone = Promise.all([r.origin.crash({ torn: true }), r.cow.crash({ torn: true })]);
      };
      r.cow.onIo = (op, sector) => {
        if (fired) return;
        if (op === 'flush') areaWritesSinceFlush = 0;
        else if (op === 'write' && isMetadataChunk(sector / CHUNK, CHUNK) && sector > 0 && ++areaWritesSinceFlush === cutAt) {
          firedAreas = areaWritesSinceFlush - 1;
          fire();
        }
      };
      // Chunks of runs whose commit is durable (the interlock released them): the workload writes there half the
      // time, where a commit that were not durable after all would come back and be merged over the write.
      const started: number[] = [];
      const released: number[] = [];
      const sub = r.e.events$.subscribe((ev) => {
        if (ev.type === 'merge.run.started') started.push(ev.firstOldChunk);
        if (ev.type === 'merge.run.committed') released.push(started.shift()!);
      });
      await startMerge(r);
      // A workload until the cut: a few writes a turn (the merge takes one batch a turn).
      const dev = r.e.device('orig')!;
      for (let round = 0; round < 300 && !fired; round++) {
        for (let k = 0; k < 8; k++) {
          const chunk = released.length > 0 && rng.int(2) === 0 ? released[rng.int(released.length)] : rng.int(originChunks);
          if (written.has(chunk)) continue;
          const id = nextId++;
          const rec = { id, acked: false };
          written.set(chunk, rec);
          const fua = rng.int(2) === 0; // durable once acknowledged, with no flush of the COW behind it
          dev.write(sectors(chunk * CHUNK), writeData(id, chunk * CHUNK, CHUNK), { fua }).then(
            () => {
              rec.acked = true;
              if (fua) flushed.add(chunk);
            },
            () => undefined,
          );
        }
        if (rng.int(4) === 0) {
          const covered = [...written].filter(([, w]) => w.acked).map(([c]) => c);
          dev.flush().then(
            () => covered.forEach((c) => flushed.add(c)),
            () => undefined,
          );
        }
        await turn();
        if ((await mergeStatus(r.e)).state === 'DONE') break;
      }
      sub.unsubscribe();
      if (!fired) continue; // the merge ended before a commit wrote cutAt areas: nothing to check here
      cutsBetween++;
      expect(firedAreas, 'areas written before the cut, in the same commit').toBeGreaterThanOrEqual(1);
      await crashDone;
      for (const name of r.e.names()) {
        const d = r.e.device(name)!;
        if (d.suspended && d.queuedCount > 0) d.killQueued();
      }
      for (let i = 0; i < 5; i++) {
        await r.e.log.drain();
        await turn();
      }
      // Power on: new devices over the same memory, the same database; the merge resumes by itself.
      const origin = new FaultyBlockDevice(r.inner.o, { closeInner: false, name: 'o' });
      const cowDev = new FaultyBlockDevice(r.inner.c, { closeInner: false, name: 'c' });
      const e = await Engine.open({ db: r.db, backingDevices: { o: origin, c: cowDev } });
      expect(e.restoreFailures).toEqual([]);
      const st = await waitMerge(e);
      expect(st.state, `seed ${seed}`).toBe('DONE');
      expect(e.status('orig')).toEqual([`0 ${originSectors} snapshot-merge ${2 * CHUNK}/${cowSectors} ${2 * CHUNK}`]);
      // Per sector: a flushed write must be there; a write not flushed may or may not be (a torn one in part);
      // everything else is the snapshot.
      const got = await readAll(r.inner.o);
      for (let c = 0; c < originChunks; c++) {
        const w = written.get(c);
        const data = w ? writeData(w.id, c * CHUNK, CHUNK) : undefined;
        for (let k = 0; k < CHUNK; k++) {
          const at = (c * CHUNK + k) * SECTOR;
          const sector = got.subarray(at, at + SECTOR);
          const isWrite = data !== undefined && sector.equals(data.subarray(k * SECTOR, (k + 1) * SECTOR));
          if (w !== undefined && flushed.has(c)) expect(isWrite, `seed ${seed}: chunk ${c}: flushed write #${w.id} lost`).toBe(true);
          if (!isWrite) expect(sector.equals(model.subarray(at, at + SECTOR)), `seed ${seed}: sector ${c * CHUNK + k} is neither the snapshot nor the write`).toBe(true);
        }
      }
      await e.close();
    }
    expect(cutsBetween, 'seeds whose cut came between two area writes of one commit').toBeGreaterThanOrEqual(10);
  }, 120_000);
});

// ---- writes into the batch being merged -------------------------------------------------------------------------------

describe('merge batches: writes into the batch being merged', () => {
  test('issued before its interlock, during copy, flush and commit, and after COMMITTED before its area writes are durable: all wait and are kept', async () => {
    const oldChunks = runsOfOlds(900, 4, 3);
    const cow = craftCow({ chunkSectors: CHUNK, oldChunks, order: 'ascending' });
    const originSectors = (oldChunks[oldChunks.length - 1] + 8) * CHUNK;
    const r = await rig(cow, originSectors);
    const model = Buffer.from(r.snapshot);
    const dev = (): BlockDevice => r.e.device('orig')!;
    const kinds = new Map<string, number>();
    const pending: Array<Promise<void>> = [];
    const errors: string[] = [];
    let nextId = 1000;
    const taken = new Set<number>();
    /** Writes 3 sectors into chunk `chunk` (once per chunk). */
    const write = (kind: string, chunk: number): { done: () => boolean } | undefined => {
      if (taken.has(chunk)) return undefined;
      taken.add(chunk);
      const id = nextId++;
      const sector = chunk * CHUNK + 2;
      const data = writeData(id, sector, 3);
      data.copy(model, sector * SECTOR);
      kinds.set(kind, (kinds.get(kind) ?? 0) + 1);
      let finished = false;
      pending.push(
        dev()
          .write(sectors(sector), data)
          .then(
            () => void (finished = true),
            (err: unknown) => void errors.push(`${kind} #${id}: ${(err as Error).message}`),
          ),
      );
      return { done: () => finished };
    };
    let found: Array<[number, number]> = []; // [first old chunk, chunks] of the runs of the batch being found
    let current: Array<[number, number]> = []; // the runs of the batch past RUN_FOUND
    const held: Array<{ done: () => boolean }> = [];
    let gating = false;
    let gated = 0;
    // Commit one behind: a write into a batch just copied (COPY_DONE or COPY_DONE_AHEAD) is still waiting when the
    // next batch starts copying, as that batch's commit comes only after the next copy.
    let aheadWrite: { done: () => boolean } | undefined;
    let aheadChecked = 0;
    r.e.events$.subscribe((ev) => {
      if (ev.type === 'merge.state' && (ev.event === 'COPY_DONE_AHEAD' || ev.event === 'COPY_DONE')) {
        const chunk = current.flatMap(([first, n]) => range(first, first + n)).find((c) => !taken.has(c));
        aheadWrite = chunk === undefined ? undefined : write('into a batch copied, its commit to come', chunk);
      } else if (ev.type === 'merge.state' && ev.state === 'COPYING' && aheadWrite !== undefined) {
        expect(aheadWrite.done(), 'a write into a copied batch completed before its commit').toBe(false);
        aheadWrite = undefined;
        aheadChecked++;
      }
      if (ev.type === 'merge.run.started') {
        found.push([ev.firstOldChunk, ev.chunks]);
        if (found.length % 5 === 1) write('before the interlock (in flight, the interlock waits)', ev.firstOldChunk + ev.chunks - 1);
      } else if (ev.type === 'merge.state' && ev.event === 'RUN_FOUND') {
        current = found;
        found = [];
      } else if (ev.type === 'merge.state' && ['COPYING', 'FLUSHING', 'COMMITTING'].includes(ev.state)) {
        // A chunk of the batch not written yet, from a different run for each state.
        const from = Math.floor((current.length * ['COPYING', 'FLUSHING', 'COMMITTING'].indexOf(ev.state)) / 3);
        const chunk = [...current.slice(from), ...current.slice(0, from)].flatMap(([first, n]) => range(first, first + n)).find((c) => !taken.has(c));
        if (chunk !== undefined) write(`queued (${ev.state})`, chunk);
        if (ev.state === 'COMMITTING' && current.length >= 8 && gated < 2) {
          // Hold this commit's metadata area writes back (they are queued once the records are cleared).
          gating = true;
          gated++;
          r.cow.shut((s) => isMetadataChunk(s / CHUNK, CHUNK) && s > 0);
        }
      } else if (ev.type === 'merge.state' && ev.event === 'COMMITTED' && gating) {
        // The batch is cleared in core, its area writes wait: a write to one of its chunks must wait for them.
        gating = false;
        const chunk = current.flatMap(([first, n]) => range(first, first + n)).find((c) => !taken.has(c));
        const w = chunk === undefined ? undefined : write('after COMMITTED, before the commit is durable', chunk);
        expect(w, 'a chunk of the committed batch to write to').toBeDefined();
        held.push(w!);
      }
    });
    await startMerge(r);
    let checked = 0;
    for (let i = 0; i < 5000; i++) {
      if (r.cow.waiting > 0 && held.length > checked) {
        // While the area writes wait, the write to the committed batch is not done.
        for (let k = 0; k < 5; k++) await turn();
        expect(r.cow.waiting).toBeGreaterThan(0);
        // (a later batch may have been committed meanwhile: its area writes queue behind the held ones)
        for (; checked < held.length; checked++) expect(held[checked].done(), 'a write to a cleared but not durable batch completed').toBe(false);
        r.cow.reopen();
      }
      await turn();
      if ((await mergeStatus(r.e)).state === 'DONE') break;
    }
    expect(checked, 'writes checked while their batch was not durable').toBe(2);
    expect(aheadChecked, 'writes checked while their copied batch waited for its commit').toBeGreaterThanOrEqual(2);
    if (r.cow.waiting > 0) r.cow.reopen();
    const st = await waitMerge(r.e);
    await Promise.all(pending);
    expect(errors).toEqual([]);
    expect(st.state).toBe('DONE');
    for (const h of held) expect(h.done()).toBe(true);
    for (const kind of ['before the interlock (in flight, the interlock waits)', 'queued (COPYING)', 'queued (FLUSHING)', 'queued (COMMITTING)', 'into a batch copied, its commit to come']) {
      expect(kinds.get(kind) ?? 0, kind).toBeGreaterThanOrEqual(2);
    }
    expectSame(await readAll(dev()), model, 'merging device after DONE');
    await r.origin.flush();
    expectSame(await readAll(r.inner.o), model, 'origin after DONE');
    await r.e.close();
  });
});

// ---- a merge that cannot go on inside a batch ---------------------------------------------------------------------------

describe('merge batches: Merge failed inside a batch', () => {
  // Ascending records in runs of 3 chunks (old 10k.., new 2..): the second batch has 8 runs.
  const oldChunks = range(0, 60).flatMap((i) => [10 * i, 10 * i + 1, 10 * i + 2]);

  for (const kind of ['middle', 'missing'] as const) {
    test(`${kind === 'middle' ? 'a chunk from the middle of an in-core run' : 'an exception on disk but not in memory'} in the 4th run of the 2nd batch: the runs before it merged, the lock-step reason, I/O goes on`, async () => {
      const cow = craftCow({ chunkSectors: CHUNK, oldChunks, order: 'ascending' });
      const originSectors = 8192;
      const r = await rig(cow, originSectors);
      // Runs newest first: run k (0-based) is old chunks 10·(59−k) .. +2. The 2nd batch holds runs 1..8; its 4th
      // run is run 4: old chunks 550..552, records in on-disk order 550, 551, 552 (new chunks consecutive).
      const [o550, n550] = cow.records.find(([o]) => o === 550)!;
      await startMerge(r, () => {
        const t = stateOf(r.e, 'orig', true).table;
        if (kind === 'missing') {
          // Clearing 552 in core only: the store's record 552 then finds nothing in memory.
          expect(t.clearMerged((o550 + 2) as never, (n550 + 2) as never)).toBe(true);
        } else {
          // Extend the in-core run 550..552 by 553 (not in the COW): clearing the store's newest record of the run,
          // 552, then hits the middle of 550..553.
          t.insert(553 as never, (n550 + 3) as never);
          expect(t.lookup(553 as never)).toBe(n550 + 3);
        }
      });
      const st = await waitMerge(r.e);
      expect(st.state, JSON.stringify(st)).toBe('FAILED');
      expect(r.e.status('orig')).toEqual([`0 ${originSectors} snapshot-merge Merge failed`]);
      expect(st.reason).toMatch(/lock-step/);
      expect(st.reason).toMatch(kind === 'middle' ? /middle of a run/ : /on disk but not in memory/);
      expect(st.reason).not.toMatch(/write error/);
      // The first batch (1 run) and the 3 runs before the refused one: 12 chunks merged, as run-by-run steps would.
      expect(st.chunksMerged).toBe(12);
      const committed = r.events.filter((ev) => ev.type === 'merge.run.committed').length;
      expect(committed).toBe(4);
      const failed = r.events.find((ev) => ev.type === 'merge.failed');
      expect(failed).toMatchObject({ reason: st.reason });
      // On disk: the records of the four merged runs are gone, the refused run's are there.
      await r.cow.flush();
      const store = await persistentStore.create({ cow: r.inner.c, chunkSizeSectors: sectors(0), overflow: false, readOnly: true });
      const found: Array<[number, number]> = [];
      await persistentStore.readMetadata(store, (o, n) => found.push([o, n]));
      expect(found).toEqual(cow.records.slice(0, cow.records.length - 12));
      // Reads are the snapshot's contents (with the made-up 553 read from the COW chunk the test gave it); writes
      // go on (one into the refused run, one into a merged one).
      const model = Buffer.from(r.snapshot);
      const chunkBytes = CHUNK * SECTOR;
      if (kind === 'middle') cow.image.copy(model, 553 * chunkBytes, (n550 + 3) * chunkBytes, (n550 + 4) * chunkBytes);
      expectSame(await readAll(r.e.device('orig')!), model, 'merging device after Merge failed');
      for (const [chunk, id] of [[551, 901], [591, 902]]) {
        const data = writeData(id, chunk * CHUNK, CHUNK);
        await r.e.device('orig')!.write(sectors(chunk * CHUNK), data);
        data.copy(model, chunk * CHUNK * SECTOR);
      }
      expectSame(await readAll(r.e.device('orig')!), model, 'merging device after writes');
      await r.e.close();
    });
  }

  test('a metadata area write that fails after COMMITTED: Merge failed with the write error, reads still the snapshot', async () => {
    const cow = craftCow({ chunkSectors: CHUNK, oldChunks, order: 'ascending' });
    const originSectors = 8192;
    const r = await rig(cow, originSectors);
    // The 2nd batch's area write fails (area 0 is the only area): the first batch's commit is durable already.
    let areaWrites = 0;
    r.cow.onIo = (op, sector) => {
      if (op === 'write' && sector === CHUNK && ++areaWrites === 2) r.cow.setErrorRules([{ op: 'write', startSector: sectors(CHUNK), endSector: sectors(2 * CHUNK) }]);
    };
    await startMerge(r);
    const st = await waitMerge(r.e);
    expect(st.state).toBe('FAILED');
    expect(st.reason).toMatch(/write error in exception store: merge: writing metadata areas 0\.\.0/);
    expect(r.e.status('orig')).toEqual([`0 ${originSectors} snapshot-merge Merge failed`]);
    expect(st.chunksMerged, 'only the first batch is merged').toBe(3);
    expectSame(await readAll(r.e.device('orig')!), r.snapshot, 'merging device after Merge failed');
    await r.e.close();
  });
});
