/**
 * The event log's kept state: folded per written batch, stored every N events ('statesnap'), rebuilt at open;
 * replay from a state snapshot equals replay from the first event; compaction; the WAL's merge event; pinned WALs.
 */
import { expect, test } from 'vitest';
import { MemoryLevel } from 'memory-level';
import { compactLog, EventLog, listStateSnapshots, readPoolState, type LevelDb } from '../../src/log/event-log.js';
import { SimulatedClock } from '../../src/core/clock.js';
import type { DmEvent } from '../../src/log/events.js';
import { serializePoolState } from '../../src/replay/pool-state.js';
import { stateDigest } from '../../src/replay/digest.js';
import { chunks } from '../../src/block/units.js';
import { replay } from '../../src/replay/replay.js';

/** Event #i of a scripted log: devices come and go, a COW gets commits and merges, marks. */
function scripted(i: number): DmEvent {
  const dev = `d${Math.floor(i / 10)}`;
  switch (i % 10) {
    case 0:
      return { type: 'device.created', device: dev, minor: i, readOnly: false };
    case 1:
      return { type: 'device.resumed', device: dev, table: ['0 8 snapshot o c P 8'], swapped: true };
    case 2:
      return { type: 'table.loaded', device: dev, table: [`0 ${i} zero`] };
    case 3:
    case 4:
    case 5:
      return { type: 'mark', device: dev, name: `m${i}` };
    case 6:
      return { type: 'device.suspended', device: dev };
    case 7:
      return { type: 'device.resumed', device: dev, table: [`0 ${i - 5} zero`], swapped: true };
    case 8:
      return i % 20 === 8 ? { type: 'device.removed', device: dev } : { type: 'table.cleared', device: dev };
    default:
      return { type: 'engine.started', devices: 0 };
  }
}

const EVENTS = 95;

async function writeScripted(db: LevelDb, every: number): Promise<EventLog> {
  const log = await EventLog.open(db, new SimulatedClock(), { stateSnapshotEvents: every });
  const wal = log.walFor('c');
  let index = 0;
  for (let i = 0; i < EVENTS; i++) {
    // One event per batch (awaited, durable), so the snapshots fall every `every` events.
    await log.append(scripted(i), { durable: true });
    if (i % 7 === 3) {
      await wal.append([{ index, oldChunk: chunks(100 + i), newChunk: chunks(2 + index) }]);
      index++;
    }
    if (i % 31 === 30) {
      await wal.merged!(2);
      index -= 2;
    }
  }
  await log.drain();
  return log;
}

test('the state is kept per written batch and stored every N events; any replay target gives the same state from a snapshot or from #1', async () => {
  const db = new MemoryLevel() as unknown as LevelDb;
  const log = await writeScripted(db, 10);
  const last = log.lastSeq;
  expect(last).toBeGreaterThan(EVENTS);
  const snaps = await listStateSnapshots(db);
  expect(snaps).toEqual(Array.from({ length: Math.floor(last / 10) }, (_, k) => 10 * (k + 1)));
  // The kept state is the stored events' state.
  const full = await readPoolState(db, { useSnapshots: false });
  expect(full.snapshotSeq).toBe(0);
  expect(serializePoolState(log.poolState!)).toEqual(serializePoolState(full.state));
  expect(full.state.cows.get('c')!.pairs.length).toBeGreaterThan(0);
  for (let to = 0; to <= last + 3; to++) {
    const a = await readPoolState(db, { toSeq: to });
    const b = await readPoolState(db, { toSeq: to, useSnapshots: false });
    expect(a.snapshotSeq).toBe(Math.min(Math.floor(to / 10) * 10, snaps[snaps.length - 1]));
    expect(a.eventsApplied).toBe(Math.min(to, last) - a.snapshotSeq);
    expect(serializePoolState(a.state), `to #${to}`).toEqual(serializePoolState(b.state));
  }
  await log.close();
  // Reopened: the state is rebuilt (from the newest snapshot and the tail), the sequence goes on.
  const again = await EventLog.open(db, new SimulatedClock(), { stateSnapshotEvents: 10 });
  expect(serializePoolState(again.poolState!)).toEqual(serializePoolState(full.state));
  expect((await again.append({ type: 'mark', device: 'x', name: 'after' }, { durable: true })).seq).toBe(last + 1);
  await again.close();
});

test('a log opened without stateSnapshotEvents keeps no state and writes no snapshots', async () => {
  const db = new MemoryLevel() as unknown as LevelDb;
  const log = await writeScripted(db, 0);
  expect(log.poolState).toBeUndefined();
  expect(await listStateSnapshots(db)).toEqual([]);
  await log.close();
});

test('compaction drops the events behind a snapshot: later targets replay the same, earlier ones are refused, the sequence goes on', async () => {
  const db = new MemoryLevel() as unknown as LevelDb;
  const log = await writeScripted(db, 10);
  const last = log.lastSeq;
  const before = new Map<number, string>();
  for (const to of [49, 50, 51, 77, last]) before.set(to, JSON.stringify(serializePoolState((await readPoolState(db, { toSeq: to })).state)));
  await log.close();

  await expect(compactLog(db, 9)).rejects.toThrow(/no state snapshot at or before #9, nothing compacted/);
  expect((await readPoolState(db, { toSeq: 3 })).state.seq).toBe(3);
  const r = await compactLog(db, 57);
  expect(r).toEqual({ snapshotSeq: 50, eventsDeleted: 50, snapshotsDeleted: 4 });
  expect(await listStateSnapshots(db)).toEqual((await listStateSnapshots(db)).filter((s) => s >= 50));
  for (const [to, want] of before) {
    if (to < 50) await expect(readPoolState(db, { toSeq: to })).rejects.toThrow(/compacted .* the oldest state that can be rebuilt is #50/);
    else {
      expect(JSON.stringify(serializePoolState((await readPoolState(db, { toSeq: to })).state))).toBe(want);
      // "Without snapshots" starts at the compaction's snapshot: the events before it are gone.
      expect(JSON.stringify(serializePoolState((await readPoolState(db, { toSeq: to, useSnapshots: false })).state))).toBe(want);
    }
  }
  // Everything up to the newest snapshot: no event may be left below it, and new ones continue the sequence.
  const newest = (await listStateSnapshots(db)).at(-1)!;
  await compactLog(db, 10 ** 9);
  const reopened = await EventLog.open(db, new SimulatedClock(), { stateSnapshotEvents: 10 });
  expect(reopened.lastSeq).toBe(last);
  expect(newest).toBeLessThanOrEqual(last);
  expect(JSON.stringify(serializePoolState(reopened.poolState!))).toBe(before.get(last));
  await reopened.close();
});

test('an event the fold refuses stops the kept state (with the reason) and nothing else', async () => {
  const db = new MemoryLevel() as unknown as LevelDb;
  const log = await EventLog.open(db, new SimulatedClock(), { stateSnapshotEvents: 2 });
  await log.append({ type: 'device.removed', device: 'ghost' }, { durable: true });
  expect(log.poolState).toBeUndefined();
  expect(log.stateError?.message).toMatch(/device ghost, which does not exist/);
  for (let i = 0; i < 5; i++) await log.append({ type: 'mark', device: 'x', name: `m${i}` }, { durable: true });
  expect(await listStateSnapshots(db)).toEqual([]);
  await expect(replay(db)).rejects.toMatchObject({ code: 'DM_POOL_CORRUPT' });
  await log.close();
});

test('a merge through the WAL is a durable exception.merged event; a pinned WAL gives its records and refuses writes', async () => {
  const db = new MemoryLevel() as unknown as LevelDb;
  const log = await EventLog.open(db, new SimulatedClock(), { stateSnapshotEvents: 1000 });
  const wal = log.walFor('c');
  await wal.append([0, 1, 2].map((i) => ({ index: i, oldChunk: chunks(10 + i), newChunk: chunks(2 + i) })));
  await wal.merged!(2);
  expect(log.poolState!.cows.get('c')!.pairs).toEqual([10, 2]);
  const stored: string[] = [];
  for await (const e of log.read()) stored.push(e.type);
  expect(stored).toEqual(['exception.committed', 'exception.merged']);
  expect(stateDigest(log.poolState!)).toBe((await replay(db)).digest);
  await log.append({ type: 'mark', device: '', name: 'x' }, { durable: true, ops: [{ type: 'put', sublevel: 'meta', key: 'pinned:c', value: { valid: true, overflowed: false, chunkSizeSectors: 8 } }] });
  await log.close();
  const pinnedLog = await EventLog.open(db, new SimulatedClock());
  const pinned = pinnedLog.walFor('c');
  expect(pinned.pinned).toEqual({ valid: true, overflowed: false, chunkSizeSectors: 8 });
  expect(await pinned.read()).toEqual([0, 1, 2].map((i) => ({ index: i, oldChunk: 10 + i, newChunk: 2 + i })));
  await expect(pinned.append([])).rejects.toMatchObject({ code: 'DM_NOT_SUPPORTED' });
  await expect(pinned.clear()).rejects.toMatchObject({ code: 'DM_NOT_SUPPORTED' });
  expect(pinnedLog.walFor('other').pinned).toBeUndefined();
  await pinnedLog.close();
});
