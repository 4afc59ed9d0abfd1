/**
 * Replay benchmark: a 1M-event log in a temporary classic-level pool, written through the EventLog (which keeps
 * the pool's state and stores it every 100k events), then the state rebuilt from it: from the newest state
 * snapshot, and from the first event. Events per second = events the state covers / time to rebuild it.
 *
 * The log is what a busy pool writes: devices created, loaded, suspended, resumed and removed; snapshots loaded
 * (exceptions.loaded) and committing exceptions in groups of 1-8 (most events), merges clearing them, marks. Also
 * measured: the cost of keeping the state on the committer (the same events appended with and without it).
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { ClassicLevel } from 'classic-level';
import { SimulatedClock } from '../src/core/clock.js';
import { createRng, type Rng } from '../src/core/rng.js';
import { EventLog, listStateSnapshots, type LevelDb } from '../src/log/event-log.js';
import type { DmEvent, LoggedEvent } from '../src/log/events.js';
import { applyEvent, emptyPoolState } from '../src/replay/pool-state.js';
import { replay } from '../src/replay/replay.js';

const EVENTS = 1_000_000;
const STATE_SNAPSHOT_EVENTS = 100_000;
/** Appends in flight before waiting for the committer (bounds memory; the log batches up to 4096 per write). */
const APPEND_WINDOW = 8192;
const COWS = 4;

/** A seeded stream of plausible events, consistent with the reducer (indexes, devices that exist). */
class Workload {
  private readonly cowRecords = new Array<number>(COWS).fill(0);
  private readonly loaded = new Array<boolean>(COWS).fill(false);
  private readonly devices: string[] = [];
  private nextDevice = 0;

  constructor(private readonly rng: Rng) {}

  next(): DmEvent {
    const k = this.rng.int(1000);
    const cow = this.rng.int(COWS);
    const key = `/pool/cow${cow}.img`;
    if (!this.loaded[cow] || k < 2) {
      // A snapshot (re)loaded: the COW starts from what its store read (here: empty again after a merge elsewhere).
      this.loaded[cow] = true;
      this.cowRecords[cow] = 0;
      return { type: 'exceptions.loaded', cow: key, device: `snap${cow}`, chunkSizeSectors: 8, valid: true, count: 0, runs: [] };
    }
    if (k < 12 && this.cowRecords[cow] > 0) {
      const count = 1 + this.rng.int(Math.min(this.cowRecords[cow], 64));
      this.cowRecords[cow] -= count;
      return { type: 'exception.merged', cow: key, count };
    }
    if (k < 20 && this.devices.length < 64) {
      const name = `dev${this.nextDevice++}`;
      this.devices.push(name);
      return { type: 'device.created', device: name, minor: this.nextDevice, readOnly: false };
    }
    if (k < 40 && this.devices.length > 0) {
      const at = this.rng.int(this.devices.length);
      const name = this.devices[at];
      const r = this.rng.int(5);
      if (r === 0 && this.devices.length > 8) {
        this.devices.splice(at, 1);
        return { type: 'device.removed', device: name };
      }
      if (r === 1) return { type: 'table.loaded', device: name, table: [`0 ${8 * (1 + this.rng.int(1000))} linear /pool/disk.img 0`] };
      if (r === 2) return { type: 'device.suspended', device: name };
      return { type: 'device.resumed', device: name, table: [`0 8192 linear /pool/disk.img ${this.rng.int(100)}`], swapped: r === 3 };
    }
    if (k < 45) return { type: 'mark', device: 'pool', name: `mark-${this.rng.int(100)}` };
    if (k < 60) return { type: 'merge.state', device: `snap${cow}`, from: 'COPYING', event: 'COPY_DONE', state: 'FLUSHING', chunksLeft: 5, chunksMerged: 1 };
    const n = 1 + this.rng.int(8);
    const first = this.cowRecords[cow];
    this.cowRecords[cow] += n;
    const chunks: Array<[number, number]> = [];
    for (let i = 0; i < n; i++) chunks.push([this.rng.int(1 << 20), 2 + first + i]);
    return { type: 'exception.committed', cow: key, count: n, firstIndex: first, chunks };
  }
}

async function openDb(dir: string): Promise<LevelDb> {
  const db = new ClassicLevel<string, unknown>(dir);
  await db.open();
  return db as unknown as LevelDb;
}

/** Appends `count` workload events; seconds taken. */
async function writeLog(db: LevelDb, count: number, stateSnapshotEvents: number, seed: number): Promise<number> {
  const log = await EventLog.open(db, new SimulatedClock(), { stateSnapshotEvents });
  const w = new Workload(createRng(seed));
  const t0 = performance.now();
  let window: Array<Promise<unknown>> = [];
  for (let i = 0; i < count; i++) {
    window.push(log.append(w.next()));
    if (window.length === APPEND_WINDOW) {
      await Promise.all(window);
      window = [];
    }
  }
  await Promise.all(window);
  await log.close();
  if (stateSnapshotEvents > 0 && log.stateError) throw log.stateError;
  return (performance.now() - t0) / 1000;
}

async function timed<T>(f: () => Promise<T>): Promise<[T, number]> {
  const t0 = performance.now();
  const v = await f();
  return [v, (performance.now() - t0) / 1000];
}

const rate = (events: number, seconds: number): string => `${Math.round(events / seconds / 1000)}k events/s`;

export async function benchReplay(): Promise<string> {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'dmstate-bench-replay-'));
  try {
    // The cost of keeping the state, on the committer: the same 200k events with and without it.
    const side = 200_000;
    const plain = await openDb(path.join(root, 'plain'));
    const plainSeconds = await writeLog(plain, side, 0, 7);
    await plain.close();
    const kept = await openDb(path.join(root, 'kept'));
    const keptSeconds = await writeLog(kept, side, STATE_SNAPSHOT_EVENTS, 7);
    await kept.close();

    const db = await openDb(path.join(root, 'pool'));
    const buildSeconds = await writeLog(db, EVENTS, STATE_SNAPSHOT_EVENTS, 1);
    const snaps = await listStateSnapshots(db);
    const [withSnap, withSeconds] = await timed(() => replay(db));
    const [without, withoutSeconds] = await timed(() => replay(db, { useSnapshots: false }));
    if (withSnap.digest !== without.digest) throw new Error('replay with and without state snapshots disagree');
    // The fold alone (what keeping the state adds per written event on the committer), on events in memory.
    const sample: LoggedEvent[] = [];
    const reader = await EventLog.open(db, new SimulatedClock());
    for await (const e of reader.read({ limit: 200_000 })) sample.push(e);
    await reader.close();
    let foldSeconds = Infinity;
    for (let round = 0; round < 3; round++) {
      const state = emptyPoolState();
      const t0 = performance.now();
      for (const e of sample) applyEvent(state, e);
      foldSeconds = Math.min(foldSeconds, (performance.now() - t0) / 1000);
    }
    const mid = 550_000;
    const [midSnap, midSeconds] = await timed(() => replay(db, { toSeq: mid }));
    const [midFull, midFullSeconds] = await timed(() => replay(db, { toSeq: mid, useSnapshots: false }));
    if (midSnap.digest !== midFull.digest) throw new Error('replay to #550000 with and without state snapshots disagree');
    await db.close();
    const exceptions = [...withSnap.state.cows.values()].reduce((n, c) => n + c.pairs.length / 2, 0);
    return [
      `replay: ${EVENTS} events in a classic-level pool (${snaps.length} state snapshots, every ${STATE_SNAPSHOT_EVENTS}; at the end ${withSnap.state.devices.size} devices, ${exceptions} exceptions in ${withSnap.state.cows.size} COWs)`,
      `  rebuild the whole log, from the newest state snapshot (#${withSnap.snapshotSeq} + ${withSnap.eventsApplied} events): ${withSeconds.toFixed(3)} s = ${rate(EVENTS, withSeconds)}`,
      `  rebuild the whole log, from the first event: ${withoutSeconds.toFixed(3)} s = ${rate(EVENTS, withoutSeconds)}`,
      `  rebuild to #${mid}, from state snapshot #${midSnap.snapshotSeq}: ${midSeconds.toFixed(3)} s = ${rate(mid, midSeconds)}; from the first event: ${midFullSeconds.toFixed(3)} s = ${rate(mid, midFullSeconds)}`,
      `  writing the log: ${rate(EVENTS, buildSeconds)} keeping the state; ${side} events: ${rate(side, plainSeconds)} without keeping it, ${rate(side, keptSeconds)} with (state snapshots included)`,
      `  the fold alone: ${rate(sample.length, foldSeconds)} = ${((foldSeconds / sample.length) * 1e6).toFixed(2)} µs per event on the committer (never on the bio path: trace events are not folded)`,
    ].join('\n');
  } finally {
    fs.rmSync(root, { recursive: true, force: true });
  }
}
