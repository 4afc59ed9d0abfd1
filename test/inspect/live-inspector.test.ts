/**
 * The live inspector: records for bios (compiled hot path), kcopyd jobs/pieces and merges, each step checked
 * against the machine definition run by xstate itself; filters; sampling with dropped counts; and nothing at all
 * (no observer on the bio path, no record built) while nobody watches.
 */
import { MemoryLevel } from 'memory-level';
import { firstValueFrom, toArray } from 'rxjs';
import { describe, expect, test } from 'vitest';
import { transition, type AnyStateMachine } from 'xstate';
import { MACHINES } from '../../machines/index.js';
import { MemoryBlockDevice } from '../../src/block/memory-device.js';
import { sectors } from '../../src/block/units.js';
import { SimulatedClock } from '../../src/core/clock.js';
import { Engine } from '../../src/core/engine.js';
import type { InspectionRecord, InspectSnapshotRecord } from '../../src/inspect/live-inspector.js';
import type { LevelDb } from '../../src/log/event-log.js';

const memDb = (): LevelDb => new MemoryLevel() as unknown as LevelDb;

async function linearEngine(options: { clock?: SimulatedClock; devices?: string[] } = {}): Promise<Engine> {
  const under = new MemoryBlockDevice({ sizeSectors: sectors(8192) });
  const engine = await Engine.open({ db: memDb(), clock: options.clock, backingDevices: { mem: under } });
  const names = options.devices ?? ['lin'];
  for (let i = 0; i < names.length; i++) await engine.create(names[i], { table: `0 1024 linear mem ${i * 1024}` });
  return engine;
}

/** Runs `from --event--> ?` through xstate's own interpreter of the machine definition. */
function xstateNext(machine: AnyStateMachine, from: string, event: string): string {
  const [next] = transition(machine, machine.resolveState({ value: from, context: undefined }), { type: event });
  return String(next.value);
}

/** Checks one actor's records: an actor record first, then event/snapshot pairs that chain and obey the machine. */
function checkLifecycle(records: readonly InspectionRecord[], machine: AnyStateMachine): string[] {
  expect(records[0].type).toBe('@xstate.actor');
  let state = (records[0] as { value: string }).value;
  const path = [state];
  for (let i = 1; i < records.length; i += 2) {
    const ev = records[i];
    const snap = records[i + 1] as InspectSnapshotRecord;
    expect(ev.type).toBe('@xstate.event');
    expect(snap.type).toBe('@xstate.snapshot');
    if (ev.type !== '@xstate.event') throw new Error('unreachable');
    expect(ev.from).toBe(state);
    expect(snap.from).toBe(state);
    expect(snap.event).toBe(ev.event);
    expect(snap.value).toBe(xstateNext(machine, state, ev.event));
    state = snap.value;
    path.push(`${ev.event}>${state}`);
  }
  return path;
}

const byActor = (records: readonly InspectionRecord[]): Map<string, InspectionRecord[]> => {
  const m = new Map<string, InspectionRecord[]>();
  for (const r of records) if (r.type !== 'dmstate.inspect.dropped') m.set(r.actorId, [...(m.get(r.actorId) ?? []), r]);
  return m;
};

describe('bios', () => {
  test('a write through linear: actor, then MAP, REMAP, IO_DONE with from/event/to; seq numbers follow', async () => {
    const engine = await linearEngine();
    const records: InspectionRecord[] = [];
    const watch = engine.inspector.subscribe({ kinds: ['bio'] }, (r) => void records.push(r));
    await engine.device('lin')!.write(sectors(8), Buffer.alloc(4096, 1));
    watch.unsubscribe();
    expect(records.map((r) => r.seq)).toEqual(records.map((_, i) => i + 1));
    expect(records[0]).toMatchObject({
      type: '@xstate.actor', kind: 'bio', actorId: 'bio:lin:1', device: 'lin', value: 'SUBMITTED', status: 'active',
      info: { op: 'write', sector: 8, lengthSectors: 8 },
    });
    expect(checkLifecycle(records, MACHINES.bio)).toEqual(['SUBMITTED', 'MAP>MAPPED', 'REMAP>REMAPPED', 'IO_DONE>COMPLETED']);
    expect(records.at(-1)).toMatchObject({ type: '@xstate.snapshot', status: 'done', value: 'COMPLETED' });
    expect(watch.stats()).toEqual({ delivered: 7, droppedEvents: 0, droppedActors: 0, droppedBacklog: 0 });
    await engine.close();
  });

  test('queued while suspended, a split across targets, the zero and error targets: every path obeys the machine', async () => {
    const engine = await Engine.open({ db: memDb(), backingDevices: { mem: new MemoryBlockDevice({ sizeSectors: sectors(4096) }) } });
    await engine.create('mix', { table: '0 16 linear mem 0\n16 16 zero\n32 16 error' });
    const records: InspectionRecord[] = [];
    const watch = engine.inspector.subscribe({}, (r) => void records.push(r));
    const dev = engine.device('mix')!;
    await engine.suspend('mix');
    const queuedWrite = dev.write(sectors(0), Buffer.alloc(512, 3));
    await engine.resume('mix');
    await queuedWrite;
    await dev.read(sectors(8), Buffer.alloc(16 * 512)); // 8 sectors linear + 8 sectors zero: split in two
    await expect(dev.read(sectors(32), Buffer.alloc(512))).rejects.toMatchObject({ code: 'DM_IO' });
    watch.unsubscribe();
    const paths = [...byActor(records).values()].map((rs) => checkLifecycle(rs, MACHINES.bio).join(' '));
    expect(paths).toEqual([
      'SUBMITTED QUEUE>QUEUED RESUME>SUBMITTED MAP>MAPPED REMAP>REMAPPED IO_DONE>COMPLETED',
      'SUBMITTED MAP>MAPPED REMAP>REMAPPED IO_DONE>COMPLETED',
      'SUBMITTED MAP>MAPPED ENDIO>COMPLETED',
      'SUBMITTED MAP>MAPPED KILL>FAILED',
    ]);
    const actors = records.filter((r) => r.type === '@xstate.actor');
    expect(actors.map((r) => r.actorId)).toEqual(['bio:mix:1', 'bio:mix:2', 'bio:mix:3', 'bio:mix:4']);
    expect(actors[2]).toMatchObject({ info: { op: 'read', sector: 16, lengthSectors: 8 } });
    await engine.close();
  });

  test('a watch started while bios wait on a suspended device follows them from the state they are in', async () => {
    const engine = await linearEngine();
    const dev = engine.device('lin')!;
    await engine.suspend('lin');
    const waiting = [dev.write(sectors(0), Buffer.alloc(512)), dev.write(sectors(8), Buffer.alloc(512))];
    const records: InspectionRecord[] = [];
    const watch = engine.inspector.subscribe({ kinds: ['bio'] }, (r) => void records.push(r));
    await engine.resume('lin');
    await Promise.all(waiting);
    watch.unsubscribe();
    const paths = [...byActor(records).values()].map((rs) => checkLifecycle(rs, MACHINES.bio).join(' '));
    expect(paths).toEqual([
      'QUEUED RESUME>SUBMITTED MAP>MAPPED REMAP>REMAPPED IO_DONE>COMPLETED',
      'QUEUED RESUME>SUBMITTED MAP>MAPPED REMAP>REMAPPED IO_DONE>COMPLETED',
    ]);
    await engine.close();
  });

  test('works beside the xstate checker (the `inspect` engine option); unsubscribing leaves the checker', async () => {
    const xstateEvents: string[] = [];
    const engine = await Engine.open({
      db: memDb(),
      inspect: (e) => void xstateEvents.push(e.type),
      backingDevices: { mem: new MemoryBlockDevice({ sizeSectors: sectors(2048) }) },
    });
    await engine.create('lin', { table: '0 1024 linear mem 0' });
    const checker = engine.device('lin')!.bioObserver;
    expect(checker).toBeDefined();
    const records: InspectionRecord[] = [];
    const watch = engine.inspector.subscribe({ kinds: ['bio'] }, (r) => void records.push(r));
    expect(engine.device('lin')!.bioObserver).not.toBe(checker);
    await engine.device('lin')!.write(sectors(0), Buffer.alloc(512));
    watch.unsubscribe();
    expect(engine.device('lin')!.bioObserver).toBe(checker);
    expect(records).toHaveLength(7);
    const before = xstateEvents.length;
    expect(before).toBeGreaterThan(0);
    await engine.device('lin')!.write(sectors(0), Buffer.alloc(512));
    expect(xstateEvents.length).toBeGreaterThan(before);
    expect(records).toHaveLength(7);
    await engine.close();
  });
});

describe('filters', () => {
  test('a device filter selects that device; only watched devices get an observer; devices created later too', async () => {
    const engine = await linearEngine({ devices: ['a', 'b'] });
    const records: InspectionRecord[] = [];
    const watch = engine.inspector.subscribe({ devices: ['b', 'c'] }, (r) => void records.push(r));
    expect(engine.device('a')!.bioObserver).toBeUndefined();
    expect(engine.device('b')!.bioObserver).toBeDefined();
    await engine.device('a')!.write(sectors(0), Buffer.alloc(512));
    await engine.device('b')!.write(sectors(0), Buffer.alloc(512));
    await engine.create('c', { table: '0 1024 linear mem 4096' });
    await engine.device('c')!.write(sectors(0), Buffer.alloc(512));
    watch.unsubscribe();
    expect(new Set(records.map((r) => (r.type === 'dmstate.inspect.dropped' ? '' : r.device)))).toEqual(new Set(['b', 'c']));
    expect(records).toHaveLength(14);
    for (const n of ['a', 'b', 'c']) expect(engine.device(n)!.bioObserver).toBeUndefined();
    await engine.close();
  });

  test('a kind filter without bio attaches nothing to the bio path', async () => {
    const engine = await linearEngine();
    const records: InspectionRecord[] = [];
    const watch = engine.inspector.subscribe({ kinds: ['merge', 'kcopyd-job'] }, (r) => void records.push(r));
    expect(engine.device('lin')!.bioObserver).toBeUndefined();
    await engine.device('lin')!.write(sectors(0), Buffer.alloc(512));
    expect(records).toEqual([]);
    expect(engine.inspector.stats().observedSteps).toBe(0);
    watch.unsubscribe();
    await engine.close();
  });

  test('bad filters are refused with DM_INVALID_ARGUMENT and start nothing', async () => {
    const engine = await linearEngine();
    const sink = (): void => undefined;
    for (const f of [
      { kinds: ['bio', 'thread'] },
      { devices: [''] },
      { maxEventsPerSecond: -1 },
      { maxEventsPerSecond: 1.5 },
      { devices: 'lin' },
    ]) {
      expect(() => engine.inspector.subscribe(f as never, sink)).toThrow(expect.objectContaining({ code: 'DM_INVALID_ARGUMENT' }));
      expect(() => engine.inspector.records$(f as never)).toThrow(expect.objectContaining({ code: 'DM_INVALID_ARGUMENT' }));
    }
    expect(engine.inspector.stats().watches).toBe(0);
    expect(engine.device('lin')!.bioObserver).toBeUndefined();
    await engine.close();
  });
});

/** An origin with one persistent snapshot over memory devices; `writes` first writes to distinct chunks. */
async function snapshotEngine(writes: number): Promise<Engine> {
  const origin = new MemoryBlockDevice({ sizeSectors: sectors(8192) });
  const cow = new MemoryBlockDevice({ sizeSectors: sectors(4096) });
  const engine = await Engine.open({ db: memDb(), backingDevices: { o: origin, c: cow } });
  await engine.create('orig', { table: '0 8192 snapshot-origin o' });
  await engine.create('snap', { table: '0 8192 snapshot o c P 8' });
  for (let i = 0; i < writes; i++) await engine.device('orig')!.write(sectors(i * 16), Buffer.alloc(4096, 2));
  return engine;
}

async function waitFor(what: string, check: () => boolean): Promise<void> {
  for (let i = 0; i < 1000 && !check(); i++) await new Promise((r) => setTimeout(r, 5));
  if (!check()) throw new Error(`timed out waiting for ${what}`);
}

describe('control-plane actors', () => {
  test('kcopyd jobs and pieces of an origin write; a device filter leaves them out unless their kind is named', async () => {
    const engine = await snapshotEngine(0);
    const all: InspectionRecord[] = [];
    const devOnly: InspectionRecord[] = [];
    const devAndKcopyd: InspectionRecord[] = [];
    const w1 = engine.inspector.subscribe({ kinds: ['kcopyd-job', 'kcopyd-piece'] }, (r) => void all.push(r));
    const w2 = engine.inspector.subscribe({ devices: ['orig'] }, (r) => void devOnly.push(r));
    const w3 = engine.inspector.subscribe({ devices: ['orig'], kinds: ['bio', 'kcopyd-job'] }, (r) => void devAndKcopyd.push(r));
    await engine.device('orig')!.write(sectors(0), Buffer.alloc(4096, 2));
    for (const w of [w1, w2, w3]) w.unsubscribe();
    const actors = byActor(all);
    expect([...actors.keys()]).toEqual(['kcopyd-job:dm-snapshot:1', 'kcopyd-piece:dm-snapshot:1']);
    expect(checkLifecycle(actors.get('kcopyd-job:dm-snapshot:1')!, MACHINES['kcopyd-job'])).toEqual(['START', 'RUN>RUNNING', 'ALL_PIECES_DONE>COMPLETE']);
    expect(checkLifecycle(actors.get('kcopyd-piece:dm-snapshot:1')!, MACHINES['kcopyd-piece'])).toEqual(['START', 'READ>READING', 'READ_DONE>WRITING', 'WRITE_DONE>DONE']);
    expect(actors.get('kcopyd-piece:dm-snapshot:1')![0]).toMatchObject({ parentId: 'kcopyd-job:dm-snapshot:1', device: undefined });
    expect(new Set(devOnly.map((r) => (r.type === 'dmstate.inspect.dropped' ? '' : r.kind)))).toEqual(new Set(['bio']));
    expect(new Set(devAndKcopyd.map((r) => (r.type === 'dmstate.inspect.dropped' ? '' : r.kind)))).toEqual(new Set(['bio', 'kcopyd-job']));
    // The origin write waited for the copy: its bio was HELD, then retried.
    expect(checkLifecycle([...byActor(devOnly).values()][0], MACHINES.bio).join(' ')).toBe(
      'SUBMITTED MAP>MAPPED HOLD>HELD RETRY>SUBMITTED MAP>MAPPED REMAP>REMAPPED IO_DONE>COMPLETED',
    );
    await engine.close();
  });

  test('a merge: one actor from IDLE to DONE, every transition the machine allows, runs included', async () => {
    const engine = await snapshotEngine(20);
    const records: InspectionRecord[] = [];
    const watch = engine.inspector.subscribe({ kinds: ['merge'], devices: ['orig'] }, (r) => void records.push(r));
    await engine.suspend('orig');
    await engine.suspend('snap');
    await engine.load('orig', '0 8192 snapshot-merge o c P 8');
    await engine.resume('orig');
    await engine.remove('snap');
    await waitFor('the merge to finish', () => records.some((r) => r.type === '@xstate.snapshot' && r.value === 'DONE'));
    watch.unsubscribe();
    expect(new Set(records.map((r) => (r.type === 'dmstate.inspect.dropped' ? '' : r.actorId)))).toEqual(new Set(['merge:orig']));
    const path = checkLifecycle(records, MACHINES.merge);
    expect(path[0]).toBe('IDLE');
    expect(path.at(-1)).toBe('NO_MORE>DONE');
    expect(path.filter((p) => p === 'COMMITTED>PREPARE').length).toBeGreaterThan(0);
    expect(records.at(-1)).toMatchObject({ status: 'done', device: 'orig', kind: 'merge' });
    await engine.close();
  });

  test('a merge watch on another device gets no merge records and never enters the hub', async () => {
    const engine = await snapshotEngine(4);
    const other: InspectionRecord[] = [];
    const watch = engine.inspector.subscribe({ kinds: ['merge'], devices: ['snap'] }, (r) => void other.push(r));
    const done = firstValueFrom(engine.events$.pipe(toArray()));
    await engine.suspend('orig');
    await engine.suspend('snap');
    await engine.load('orig', '0 8192 snapshot-merge o c P 8');
    await engine.resume('orig');
    await engine.remove('snap');
    await waitFor('the merge to finish', () => engine.status('orig')[0].split(' ')[3].split('/')[0] === engine.status('orig')[0].split(' ')[4]);
    watch.unsubscribe();
    const steps = engine.inspector.stats().observedSteps;
    expect(other).toEqual([]);
    await engine.close();
    const events = await done;
    expect(events.filter((e) => e.type === 'merge.state').length).toBeGreaterThan(0);
    expect(steps).toBe(0);
  });
});

describe('sampling and cost', () => {
  test('at most the budget starts new actors per second; admitted actors stay whole; drops are counted and reported', async () => {
    const clock = new SimulatedClock(0);
    const engine = await linearEngine({ clock });
    const records: InspectionRecord[] = [];
    const watch = engine.inspector.subscribe({ kinds: ['bio'], maxEventsPerSecond: 20 }, (r) => void records.push(r));
    const dev = engine.device('lin')!;
    for (let i = 0; i < 50; i++) await dev.write(sectors(i * 8), Buffer.alloc(4096));
    // 7 records per bio: 20 allows 3 bios to start (0, 7, 14 < 20), each delivered whole.
    const actors = byActor(records);
    expect(actors.size).toBe(3);
    for (const rs of actors.values()) expect(checkLifecycle(rs, MACHINES.bio).at(-1)).toBe('IO_DONE>COMPLETED');
    expect(watch.stats()).toEqual({ delivered: 21, droppedEvents: 47 * 7, droppedActors: 47, droppedBacklog: 0 });
    // The report comes once a second (engine clock).
    expect(records.some((r) => r.type === 'dmstate.inspect.dropped')).toBe(false);
    clock.advance(1000);
    expect(records.at(-1)).toEqual({ type: 'dmstate.inspect.dropped', seq: 22, timeMs: 1000, kind: 'bio', events: 329, actors: 47, reason: 'rate' });
    // A new window admits again.
    await dev.write(sectors(0), Buffer.alloc(4096));
    expect(records.at(-1)).toMatchObject({ type: '@xstate.snapshot', value: 'COMPLETED', seq: 29 });
    clock.advance(1000);
    expect(records.at(-1)).toMatchObject({ seq: 29 }); // nothing dropped: no report
    watch.unsubscribe();
    await engine.close();
  });

  test('a sink that refuses records (a full socket) is counted as backlog and reported', async () => {
    const clock = new SimulatedClock(0);
    const engine = await linearEngine({ clock });
    const records: InspectionRecord[] = [];
    let accept = false;
    const watch = engine.inspector.subscribe({ kinds: ['bio'], maxEventsPerSecond: 0 }, (r) => (accept ? void records.push(r) : false));
    for (let i = 0; i < 3; i++) await engine.device('lin')!.write(sectors(0), Buffer.alloc(512));
    expect(watch.stats()).toMatchObject({ delivered: 0, droppedBacklog: 21 });
    accept = true;
    clock.advance(1000);
    expect(records).toEqual([{ type: 'dmstate.inspect.dropped', seq: 1, timeMs: 1000, kind: 'bio', events: 21, actors: 0, reason: 'backlog' }]);
    watch.unsubscribe();
    await engine.close();
  });

  test('nobody watching: no observer on any bio path, the hub is never entered, nothing built', async () => {
    const engine = await snapshotEngine(0);
    const lin = await linearEngine();
    const check = (e: Engine): void => {
      for (const n of e.names()) expect(e.device(n)!.bioObserver).toBeUndefined();
    };
    check(engine);
    check(lin);
    for (let i = 0; i < 200; i++) {
      await engine.device('orig')!.write(sectors((i % 64) * 8), Buffer.alloc(4096, i));
      await lin.device('lin')!.write(sectors(i % 128), Buffer.alloc(512));
    }
    expect(engine.inspector.stats()).toEqual({ watches: 0, observedSteps: 0, recordsBuilt: 0 });
    expect(lin.inspector.stats()).toEqual({ watches: 0, observedSteps: 0, recordsBuilt: 0 });
    // Watch, then stop: everything is detached again.
    const w = engine.inspector.subscribe({}, () => undefined);
    await engine.device('orig')!.write(sectors(1000), Buffer.alloc(4096));
    const after = engine.inspector.stats();
    expect(after.observedSteps).toBeGreaterThan(0);
    w.unsubscribe();
    check(engine);
    for (let i = 0; i < 50; i++) await engine.device('orig')!.write(sectors(2000 + i * 8), Buffer.alloc(4096));
    expect(engine.inspector.stats()).toEqual({ ...after, watches: 0 });
    await engine.close();
    await lin.close();
  });

  test('records$ is an Observable: unsubscribing stops the watch; engine close completes it', async () => {
    const engine = await linearEngine();
    const got: InspectionRecord[] = [];
    const sub = engine.inspector.records$({ kinds: ['bio'] }).subscribe((r) => got.push(r));
    expect(engine.inspector.stats().watches).toBe(1);
    await engine.device('lin')!.write(sectors(0), Buffer.alloc(512));
    sub.unsubscribe();
    expect(engine.inspector.stats().watches).toBe(0);
    expect(got).toHaveLength(7);
    const all = firstValueFrom(engine.inspector.records$({ kinds: ['bio'] }).pipe(toArray()));
    await engine.device('lin')!.write(sectors(0), Buffer.alloc(512));
    await engine.close();
    expect(await all).toHaveLength(7);
  });
});
