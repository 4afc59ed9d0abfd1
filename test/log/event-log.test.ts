import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { expect, test } from 'vitest';
import { MemoryLevel } from 'memory-level';
import { ClassicLevel } from 'classic-level';
import { EventLog, seqKey, type LevelDb } from '../../src/log/event-log.js';
import { SimulatedClock } from '../../src/core/clock.js';
import type { LoggedEvent } from '../../src/log/events.js';

const mark = (name: string) => ({ type: 'mark' as const, device: 'd', name });

test('sequence keys sort numerically as strings', () => {
  const keys = [1, 2, 10, 255, 256, 65536, 2 ** 40].map(seqKey);
  expect([...keys].sort()).toEqual(keys);
});

test('events get monotonic sequence numbers and the clock time, and read back in order', async () => {
  const clock = new SimulatedClock(5000);
  const log = await EventLog.open(new MemoryLevel() as unknown as LevelDb, clock);
  const live: LoggedEvent[] = [];
  log.events$.subscribe((e) => live.push(e));
  await log.append(mark('a'));
  clock.advance(10);
  await log.append(mark('b'), { durable: true });
  await log.drain();
  const stored: LoggedEvent[] = [];
  for await (const e of log.read()) stored.push(e);
  expect(stored.map((e) => [e.seq, e.timeMs, e.type === 'mark' && e.name])).toEqual([
    [1, 5000, 'a'],
    [2, 5010, 'b'],
  ]);
  expect(live).toEqual(stored);
  const since: LoggedEvent[] = [];
  for await (const e of log.read({ sinceSeq: 2 })) since.push(e);
  expect(since.map((e) => e.seq)).toEqual([2]);
  await log.close();
  await expect(log.append(mark('c'))).rejects.toMatchObject({ code: 'DM_CLOSED' });
});

test('group commit: many durable appends share few synced batches', async () => {
  const db = new MemoryLevel() as unknown as LevelDb;
  let batches = 0;
  const origBatch = db.batch.bind(db) as (...a: unknown[]) => unknown;
  (db as unknown as { batch: (...a: unknown[]) => unknown }).batch = (...a: unknown[]) => {
    batches++;
    return origBatch(...a);
  };
  const log = await EventLog.open(db, new SimulatedClock());
  const n = 2000;
  const acks = await Promise.all(Array.from({ length: n }, (_, i) => log.append(mark(`m${i}`), { durable: true })));
  expect(acks.map((a) => a.seq)).toEqual(Array.from({ length: n }, (_, i) => i + 1));
  expect(batches).toBeGreaterThan(0);
  expect(batches).toBeLessThanOrEqual(2); // 2000 events ≤ BATCH_EVENTS_MAX: one batch (2 if one slipped between)
  await log.close();
});

test('durable events are on disk when their promise resolves; the sequence resumes after reopen', async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'dmstate-log-'));
  let db = new ClassicLevel<string, unknown>(dir);
  await db.open();
  let log = await EventLog.open(db as unknown as LevelDb, new SimulatedClock());
  await log.append(mark('x'));
  const d = await log.append(mark('y'), { durable: true, ops: [{ type: 'put', sublevel: 'meta', key: 'k', value: { v: 1 } }] });
  expect(d.seq).toBe(2);
  // No close of the log: what was acknowledged as durable must be readable by a fresh handle.
  await db.close();
  db = new ClassicLevel<string, unknown>(dir);
  await db.open();
  log = await EventLog.open(db as unknown as LevelDb, new SimulatedClock());
  expect(log.lastSeq).toBe(2);
  expect(await log.getRecord('meta', 'k')).toEqual({ v: 1 });
  expect((await log.append(mark('z'))).seq).toBe(3);
  await log.close();
  await db.close();
  fs.rmSync(dir, { recursive: true, force: true });
});

test('trace events reach events$ only when tracing is on, and are not persisted by default', async () => {
  const log = await EventLog.open(new MemoryLevel() as unknown as LevelDb, new SimulatedClock());
  const live: string[] = [];
  log.events$.subscribe((e) => live.push(e.type));
  const bio = { type: 'bio' as const, device: 'd', bioId: 1, op: 'read' as const, sector: 0, lengthSectors: 8, from: 'A', event: 'E', state: 'B' };
  log.trace(bio);
  expect(live).toEqual([]);
  log.traceEnabled = true;
  log.trace(bio);
  await log.append(mark('m'), { durable: true });
  expect(live).toEqual(['bio', 'mark']);
  const stored: string[] = [];
  for await (const e of log.read()) stored.push(e.type);
  expect(stored).toEqual(['mark']);
  await log.close();
});

test('the exception WAL keeps groups, reads them back in index order, trims and clears durably', async () => {
  const log = await EventLog.open(new MemoryLevel() as unknown as LevelDb, new SimulatedClock());
  const rec = (index: number) => ({ index, oldChunk: (100 + index) as never, newChunk: (2 + index) as never });
  const wal = log.walFor('/cow/a.img');
  const other = log.walFor('/cow/b.img');
  await wal.append([rec(0), rec(1), rec(2)]);
  await wal.append([rec(3), rec(4)]);
  await other.append([rec(0)]);
  expect((await wal.read()).map((r) => r.index)).toEqual([0, 1, 2, 3, 4]);
  expect(await wal.read()).toContainEqual(rec(3));
  await wal.trim(3); // at a group boundary
  expect((await wal.read()).map((r) => r.index)).toEqual([3, 4]);
  await wal.append([rec(5), rec(6), rec(7)]);
  await wal.trim(6); // inside a group: its tail stays
  expect((await wal.read()).map((r) => r.index)).toEqual([6, 7]);
  await wal.clear();
  expect(await wal.read()).toEqual([]);
  expect((await other.read()).map((r) => r.index)).toEqual([0]);
  const committed: string[] = [];
  for await (const e of log.read()) if (e.type === 'exception.committed') committed.push(`${e.cow}:${e.firstIndex}+${e.count}`);
  expect(committed).toEqual(['/cow/a.img:0+3', '/cow/a.img:3+2', '/cow/b.img:0+1', '/cow/a.img:5+3']);
  await log.close();
});
