/**
 * Live inspection of the mirror's actors: write groups, write transactions and the resync, as the compiled tables
 * of src/targets/mirror/ step them. Every snapshot is checked against both the compiled transition table and the
 * machine definition run by xstate itself; ids, parents and info; filters by device and kind; sampling with
 * dropped counts; table reloads and multi-target tables; nothing at all (no observer) while nobody watches; and
 * the daemon's inspect stream.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { MemoryLevel } from 'memory-level';
import { describe, expect, test } from 'vitest';
import { transition, type AnyStateMachine } from 'xstate';
import { MACHINES } from '../../machines/index.js';
import type { BlockDevice } from '../../src/block/contract.js';
import { FaultyBlockDevice } from '../../src/block/faulty-device.js';
import { MemoryBlockDevice } from '../../src/block/memory-device.js';
import { sectors, type Sector } from '../../src/block/units.js';
import { SimulatedClock, type Clock } from '../../src/core/clock.js';
import type { CompiledMachine } from '../../src/core/compiled-machine.js';
import { Engine } from '../../src/core/engine.js';
import { ControlClient } from '../../src/frontends/control-client.js';
import { Daemon } from '../../src/frontends/daemon.js';
import type { InspectActorKind, InspectActorRecord, InspectFilter, InspectionRecord, InspectSnapshotRecord } from '../../src/inspect/live-inspector.js';
import { StatelyBridge, type StatelyActorMessage } from '../../src/inspect/live-stately.js';
import type { LevelDb } from '../../src/log/event-log.js';
import type { MirrorInstance } from '../../src/targets/mirror/mirror.js';
import type { MirrorSet } from '../../src/targets/mirror/mirror-set.js';
import { RESYNC_MACHINE } from '../../src/targets/mirror/resync-driver.js';
import { WRITE_GROUP_MACHINE, WRITE_TRANSACTION_MACHINE } from '../../src/targets/mirror/write-group.js';

const LEN = 8192;
const REGION = 256;
const MIRROR_KINDS: InspectActorKind[] = ['mirror-write-group', 'mirror-write-transaction', 'mirror-resync'];
const COMPILED: Partial<Record<InspectActorKind, CompiledMachine>> = {
  'mirror-write-group': WRITE_GROUP_MACHINE,
  'mirror-write-transaction': WRITE_TRANSACTION_MACHINE,
  'mirror-resync': RESYNC_MACHINE,
};

const turn = (): Promise<void> => new Promise((r) => setImmediate(r));
const mem = (n = LEN): MemoryBlockDevice => new MemoryBlockDevice({ sizeSectors: sectors(n) });

async function until(what: string, cond: () => boolean, turnsMax = 100_000): Promise<void> {
  for (let i = 0; i < turnsMax && !cond(); i++) await turn();
  if (!cond()) throw new Error(`timed out waiting for ${what}`);
}

/** Waits in real time (sockets). */
async function waitFor(what: string, cond: () => boolean, timeoutMs = 10_000): Promise<void> {
  const end = performance.now() + timeoutMs;
  while (!cond()) {
    if (performance.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

async function engineWith(devices: Record<string, BlockDevice>, clock?: Clock): Promise<Engine> {
  return Engine.open({ db: new MemoryLevel() as unknown as LevelDb, clock, backingDevices: devices });
}

/** The MirrorSets of a device's live table, in table order. */
function setsOf(engine: Engine, name: string): MirrorSet[] {
  return engine.device(name)!.live!.targets.map((t) => (t.instance as MirrorInstance).set);
}

function watchAll(engine: Engine, filter: InspectFilter): { records: InspectionRecord[]; stop(): void } {
  const records: InspectionRecord[] = [];
  const w = engine.inspector.subscribe(filter, (r) => void records.push(r));
  return { records, stop: () => w.unsubscribe() };
}

function xstateNext(machine: AnyStateMachine, from: string, event: string): string {
  const [next] = transition(machine, machine.resolveState({ value: from, context: undefined }), { type: event });
  return String(next.value);
}

/**
 * Splits records into lives (one per '@xstate.actor': a table reload starts a new resync with the same id) and
 * checks each: event/snapshot pairs chained from the state reached, each transition the compiled table's and
 * xstate's, `done` exactly in final states. Returns 'ID: STATE EVENT>STATE ...' per life, in order of first record.
 */
function lives(records: readonly InspectionRecord[]): string[] {
  const open = new Map<string, { kind: InspectActorKind; state: string; path: string[]; pending?: string }>();
  const out: Array<{ id: string; path: string[] }> = [];
  for (const r of records) {
    if (r.type === 'dmstate.inspect.dropped') continue;
    if (r.type === '@xstate.actor') {
      const prev = open.get(r.actorId);
      // A new actor with a known id only after the old one is done stepping (resync: STOPPED by the reload).
      if (prev) expect(prev.kind === 'mirror-resync' && prev.state === 'STOPPED', `${r.actorId} restarted while ${prev.state}`).toBe(true);
      const life = { kind: r.kind, state: r.value, path: [r.value] };
      open.set(r.actorId, life);
      out.push({ id: r.actorId, path: life.path });
      continue;
    }
    const life = open.get(r.actorId);
    expect(life, `${r.actorId}: a record before its actor record`).toBeDefined();
    expect(r.from).toBe(life!.state);
    if (r.type === '@xstate.event') {
      expect(life!.pending).toBeUndefined();
      life!.pending = r.event;
      continue;
    }
    expect(r.event).toBe(life!.pending);
    life!.pending = undefined;
    const c = COMPILED[r.kind] ?? undefined;
    if (c !== undefined) {
      const to = c.tryStep(c.stateIndex(r.from), c.eventIndex(r.event));
      expect(to, `${r.actorId}: ${r.from} --${r.event}--> not in the compiled table`).toBeGreaterThanOrEqual(0);
      expect(r.value).toBe(c.stateNames[to]);
      expect(r.status).toBe(c.isFinal[to] ? 'done' : 'active');
    }
    expect(r.value).toBe(xstateNext(MACHINES[r.kind], r.from, r.event));
    life!.state = r.value;
    life!.path.push(`${r.event}>${r.value}`);
  }
  for (const [id, life] of open) expect(life.pending, `${id}: an event without its snapshot`).toBeUndefined();
  return out.map((l) => `${l.id}: ${l.path.join(' ')}`);
}

const actorRecords = (records: readonly InspectionRecord[]): InspectActorRecord[] => records.filter((r): r is InspectActorRecord => r.type === '@xstate.actor');
const kindsOf = (records: readonly InspectionRecord[]): Set<string> => new Set(records.map((r) => r.kind));
const devicesOf = (records: readonly InspectionRecord[]): Set<string | undefined> => new Set(records.map((r) => (r.type === 'dmstate.inspect.dropped' ? '-' : r.device)));

const WRITE_TX = 'START MARKED>JOURNAL_FLUSH JOURNAL_FLUSHED>DATA_WRITE DATA_WRITTEN>DATA_FLUSH DATA_FLUSHED>SUPER_WRITE SUPER_WRITTEN>SUPER_FLUSH SUPER_FLUSHED>DONE';
const RESYNC_REGION = 'REGION_FOUND>QUIESCING QUIESCED>COPYING COPIED>THROTTLED NEXT>SCANNING';

describe('mirror actors', () => {
  test('a full resync, a write and a flush on a disk-log mirror: ids, parents, info, every step the machines', async () => {
    const engine = await engineWith({ a: mem(), b: mem(), log: mem(64) });
    const w = watchAll(engine, { kinds: ['bio', ...MIRROR_KINDS], maxEventsPerSecond: 0 });
    await engine.create('m', { table: `0 ${LEN} mirror disk 3 log ${REGION} sync 2 a 0 b 0 1 handle_errors` });
    const [set] = setsOf(engine, 'm');
    await until('the resync', () => set.resync.state === 'IN_SYNC');
    const m = engine.device('m')!;
    await m.write(sectors(8), Buffer.alloc(4096, 1));
    await m.flush();
    w.stop();
    const ls = lives(w.records);
    expect(ls).toEqual([
      `mirror-resync:m: IDLE START>SCANNING ${Array(LEN / REGION).fill(RESYNC_REGION).join(' ')} NO_WORK>IN_SYNC`,
      'bio:m:1: SUBMITTED MAP>MAPPED HOLD>HELD ENDIO>COMPLETED',
      'mirror-write-group:m:1: START ISSUE>WRITING ALL_DONE>COMPLETED',
      `mirror-write-transaction:m:1.0: ${WRITE_TX}`,
      `mirror-write-transaction:m:1.1: ${WRITE_TX}`,
      'bio:m:2: SUBMITTED MAP>MAPPED HOLD>HELD ENDIO>COMPLETED',
      'mirror-write-group:m:2: START ISSUE>WRITING ALL_DONE>COMPLETED',
      `mirror-write-transaction:m:2.0: ${WRITE_TX}`,
      `mirror-write-transaction:m:2.1: ${WRITE_TX}`,
    ]);
    const actors = new Map(actorRecords(w.records).map((r) => [r.actorId, r]));
    expect(actors.get('mirror-resync:m')).toMatchObject({ kind: 'mirror-resync', device: 'm', info: { regions: LEN / REGION, regionSectors: REGION } });
    expect(actors.get('mirror-resync:m')!.parentId).toBeUndefined();
    expect(actors.get('mirror-write-group:m:1')).toMatchObject({
      kind: 'mirror-write-group', device: 'm', info: { bio: 'bio:m:1', op: 'write', sector: 8, lengthSectors: 8, region: 0 },
    });
    expect(actors.get('mirror-write-group:m:1')!.parentId).toBeUndefined();
    expect(actors.get('mirror-write-group:m:2')!.info).toEqual({ bio: 'bio:m:2', op: 'flush', sector: 0, lengthSectors: 0 });
    expect(actors.get('mirror-write-transaction:m:1.0')).toMatchObject({ parentId: 'mirror-write-group:m:1', device: 'm', info: { leg: 0, legDevice: 'a' } });
    expect(actors.get('mirror-write-transaction:m:1.1')).toMatchObject({ parentId: 'mirror-write-group:m:1', info: { leg: 1, legDevice: 'b' } });
    expect(actors.get('mirror-write-transaction:m:2.1')).toMatchObject({ parentId: 'mirror-write-group:m:2' });
    // A group is final only after every transaction: its last snapshot comes after theirs.
    const last = (id: string): number => w.records.map((r) => (r.type === 'dmstate.inspect.dropped' ? '' : r.actorId)).lastIndexOf(id);
    expect(last('mirror-write-group:m:1')).toBeGreaterThan(Math.max(last('mirror-write-transaction:m:1.0'), last('mirror-write-transaction:m:1.1')));
    expect(w.records.map((r) => r.seq)).toEqual(w.records.map((_, i) => i + 1));
    await engine.close();
  });

  test('a leg that fails writes: LEGS_FAILED, RECORDING, its transaction FAILED, the resync DEGRADED; readd resyncs', async () => {
    const b = new FaultyBlockDevice(mem(), { errorRules: [{ op: 'write' }] });
    const engine = await engineWith({ a: mem(), b });
    const w = watchAll(engine, { devices: ['m'], kinds: MIRROR_KINDS, maxEventsPerSecond: 0 });
    await engine.create('m', { table: `0 ${LEN} mirror core 2 ${REGION} nosync 2 a 0 b 0 1 handle_errors` });
    const [set] = setsOf(engine, 'm');
    const m = engine.device('m')!;
    await m.write(sectors(REGION + 8), Buffer.alloc(4096, 2));
    await until('the resync to give up', () => set.resync.state === 'DEGRADED');
    await m.write(sectors(16), Buffer.alloc(4096, 3)); // only leg 0 takes writes now
    b.setErrorRules([]);
    await engine.message('m', 0, ['readd', '1']);
    await until('the resync after the readd', () => set.resync.state === 'IN_SYNC');
    w.stop();
    expect(lives(w.records)).toEqual([
      `mirror-resync:m: IDLE START>SCANNING NO_WORK>IN_SYNC START>SCANNING DEGRADE>DEGRADED START>SCANNING ${RESYNC_REGION} ${RESYNC_REGION} NO_WORK>IN_SYNC`,
      'mirror-write-group:m:1: START ISSUE>WRITING LEGS_FAILED>RECORDING RECORDED>COMPLETED',
      `mirror-write-transaction:m:1.0: ${WRITE_TX}`,
      'mirror-write-transaction:m:1.1: START MARKED>JOURNAL_FLUSH JOURNAL_FLUSHED>DATA_WRITE DATA_FAILED>FAILED',
      'mirror-write-group:m:2: START ISSUE>WRITING ALL_DONE>COMPLETED',
      `mirror-write-transaction:m:2.0: ${WRITE_TX}`,
    ]);
    await engine.close();
  });

  test('every leg failing: RECORDED_NONE_LEFT, FAILED, and the bio fails', async () => {
    const engine = await engineWith({ a: new FaultyBlockDevice(mem(), { errorRules: [{ op: 'write' }] }), b: new FaultyBlockDevice(mem(), { errorRules: [{ op: 'write' }] }) });
    await engine.create('m', { table: `0 ${LEN} mirror core 2 ${REGION} nosync 2 a 0 b 0 1 handle_errors` });
    const w = watchAll(engine, { kinds: ['mirror-write-group'] });
    await expect(engine.device('m')!.write(sectors(0), Buffer.alloc(512))).rejects.toMatchObject({ code: 'DM_IO' });
    await expect(engine.device('m')!.write(sectors(0), Buffer.alloc(512))).rejects.toMatchObject({ code: 'DM_IO' });
    w.stop();
    expect(lives(w.records)).toEqual([
      'mirror-write-group:m:1: START ISSUE>WRITING LEGS_FAILED>RECORDING RECORDED_NONE_LEFT>FAILED',
      'mirror-write-group:m:2: START KILL>FAILED',
    ]);
    expect(w.records.at(-1)).toMatchObject({ status: 'done', value: 'FAILED' });
    await engine.close();
  });

  test('a write to a region being copied waits: START --DELAY--> DELAYED --ISSUE--> WRITING', async () => {
    const gate: Array<() => void> = [];
    let gated = true;
    class GatedDevice extends MemoryBlockDevice {
      protected override async _write(s: Sector, buf: Uint8Array, fua: boolean): Promise<void> {
        if (gated) await new Promise<void>((r) => gate.push(r));
        return super._write(s, buf, fua);
      }
    }
    const engine = await engineWith({ a: mem(), b: new GatedDevice({ sizeSectors: sectors(LEN) }) });
    const w = watchAll(engine, { kinds: MIRROR_KINDS, maxEventsPerSecond: 0 });
    await engine.create('m', { table: `0 ${LEN} mirror core 1 ${REGION} 2 a 0 b 0` });
    const [set] = setsOf(engine, 'm');
    await until('the first copy', () => set.resync.state === 'COPYING');
    const region = [...Array(LEN / REGION).keys()].find((r) => set.rh.isRecovering(r))!;
    const write = engine.device('m')!.write(sectors(region * REGION), Buffer.alloc(512, 9));
    await turn();
    gated = false;
    for (const f of gate.splice(0)) f();
    await write;
    await until('the resync', () => set.resync.state === 'IN_SYNC');
    w.stop();
    const ls = lives(w.records);
    expect(ls.find((l) => l.startsWith('mirror-write-group:'))).toBe('mirror-write-group:m:1: START DELAY>DELAYED ISSUE>WRITING ALL_DONE>COMPLETED');
    expect(ls.filter((l) => l.startsWith('mirror-write-transaction:m:1.'))).toEqual([`mirror-write-transaction:m:1.0: ${WRITE_TX}`, `mirror-write-transaction:m:1.1: ${WRITE_TX}`]);
    // The write waited for its region's copy: delayed while the resync was COPYING, issued when the copy ended
    // (the region hash releases it just before the resync steps on with COPIED).
    const snaps = w.records.filter((r): r is InspectSnapshotRecord => r.type === '@xstate.snapshot');
    const resyncBefore = (i: number): string => snaps.slice(0, i).filter((r) => r.kind === 'mirror-resync').map((r) => `${r.event}>${r.value}`).join(' ');
    const delayed = snaps.findIndex((r) => r.kind === 'mirror-write-group' && r.event === 'DELAY');
    const issued = snaps.findIndex((r) => r.kind === 'mirror-write-group' && r.event === 'ISSUE');
    expect(resyncBefore(delayed)).toBe('START>SCANNING REGION_FOUND>QUIESCING QUIESCED>COPYING');
    expect(resyncBefore(issued)).toBe('START>SCANNING REGION_FOUND>QUIESCING QUIESCED>COPYING');
    expect(snaps.slice(issued).find((r) => r.kind === 'mirror-resync')).toMatchObject({ event: 'COPIED', value: 'THROTTLED' });
    await engine.close();
  });

  test('a watch started while a write is in flight follows its group and transaction from the state they are in', async () => {
    const gate: Array<() => void> = [];
    let gated = true;
    class GatedDevice extends MemoryBlockDevice {
      protected override async _write(s: Sector, buf: Uint8Array, fua: boolean): Promise<void> {
        if (gated) await new Promise<void>((r) => gate.push(r));
        return super._write(s, buf, fua);
      }
    }
    const engine = await engineWith({ a: mem(), b: new GatedDevice({ sizeSectors: sectors(LEN) }) });
    await engine.create('m', { table: `0 ${LEN} mirror core 2 ${REGION} nosync 2 a 0 b 0` });
    const m = engine.device('m')!;
    const first = m.write(sectors(0), Buffer.alloc(512, 1));
    await until('the write on b', () => gate.length === 1);
    const w = watchAll(engine, { kinds: ['mirror-write-group', 'mirror-write-transaction'], maxEventsPerSecond: 0 });
    gated = false;
    for (const f of gate.splice(0)) f();
    await first;
    await m.write(sectors(8), Buffer.alloc(512, 2));
    w.stop();
    expect(lives(w.records)).toEqual([
      'mirror-write-transaction:m:1.1: DATA_WRITE DATA_WRITTEN>DATA_FLUSH DATA_FLUSHED>SUPER_WRITE SUPER_WRITTEN>SUPER_FLUSH SUPER_FLUSHED>DONE',
      'mirror-write-group:m:1: WRITING ALL_DONE>COMPLETED',
      'mirror-write-group:m:2: START ISSUE>WRITING ALL_DONE>COMPLETED',
      `mirror-write-transaction:m:2.0: ${WRITE_TX}`,
      `mirror-write-transaction:m:2.1: ${WRITE_TX}`,
    ]);
    expect(actorRecords(w.records)[0]).toMatchObject({ parentId: 'mirror-write-group:m:1', info: { leg: 1, legDevice: 'b' } });
    await engine.close();
  });

  test('a table reload and a table of two mirror targets: unique ids, a new resync actor after the reload', async () => {
    const engine = await engineWith({ a: mem(2 * LEN), b: mem(2 * LEN) });
    const w = watchAll(engine, { kinds: MIRROR_KINDS, maxEventsPerSecond: 0 });
    const two = `0 ${LEN} mirror core 2 ${REGION} nosync 2 a 0 b 0\n${LEN} ${LEN} mirror core 2 ${REGION} nosync 2 a ${LEN} b ${LEN}`;
    await engine.create('m', { table: two });
    const m = engine.device('m')!;
    await m.write(sectors(0), Buffer.alloc(512));
    await m.write(sectors(LEN + 8), Buffer.alloc(512));
    await engine.load('m', `0 ${LEN} mirror core 2 ${REGION} nosync 2 a 0 b 0`);
    await engine.resume('m');
    await until('the new resync', () => setsOf(engine, 'm')[0].resync.state === 'IN_SYNC');
    await m.write(sectors(8), Buffer.alloc(512));
    w.stop();
    const ls = lives(w.records).filter((l) => !l.startsWith('mirror-write-transaction:'));
    expect(ls).toEqual([
      'mirror-resync:m: IDLE START>SCANNING NO_WORK>IN_SYNC STOP>STOPPED',
      `mirror-resync:m@${LEN}: IDLE START>SCANNING NO_WORK>IN_SYNC STOP>STOPPED`,
      'mirror-write-group:m:1: START ISSUE>WRITING ALL_DONE>COMPLETED',
      'mirror-write-group:m:2: START ISSUE>WRITING ALL_DONE>COMPLETED',
      'mirror-resync:m: IDLE START>SCANNING NO_WORK>IN_SYNC',
      'mirror-write-group:m:3: START ISSUE>WRITING ALL_DONE>COMPLETED',
    ]);
    expect(actorRecords(w.records).find((r) => r.actorId === 'mirror-write-group:m:2')!.info).toMatchObject({ sector: LEN + 8, region: 0 });
    // The second resync started only after the first one stopped.
    const resync = w.records.filter((r) => r.type !== 'dmstate.inspect.dropped' && r.actorId === 'mirror-resync:m');
    const restart = resync.findIndex((r, i) => i > 0 && r.type === '@xstate.actor');
    expect(resync[restart - 1]).toMatchObject({ type: '@xstate.snapshot', value: 'STOPPED' });
    await engine.close();
  });

  test('Stately messages: a transaction is a child of its write group, with the machine definition', async () => {
    const engine = await engineWith({ a: mem(), b: mem() });
    await engine.create('m', { table: `0 ${LEN} mirror core 2 ${REGION} nosync 2 a 0 b 0` });
    const w = watchAll(engine, { kinds: ['mirror-write-group', 'mirror-write-transaction'] });
    await engine.device('m')!.write(sectors(0), Buffer.alloc(512));
    w.stop();
    const bridge = new StatelyBridge();
    const msgs = w.records.map((r) => bridge.convert(r)!);
    const tx = msgs.find((m): m is StatelyActorMessage => m.type === '@xstate.actor' && m.sessionId === 'mirror-write-transaction:m:1.1')!;
    expect(tx).toMatchObject({ name: 'mirror-write-transaction', parentId: 'mirror-write-group:m:1', rootId: 'mirror-write-group:m:1' });
    expect(tx.snapshot.context).toMatchObject({ kind: 'mirror-write-transaction', device: 'm', leg: 1, legDevice: 'b' });
    expect(JSON.parse(tx.definition)).toEqual(MACHINES['mirror-write-transaction'].config);
    expect(msgs.at(-1)).toMatchObject({ sessionId: 'mirror-write-group:m:1', snapshot: { status: 'done', value: 'COMPLETED' } });
    await engine.close();
  });
});

describe('filters', () => {
  async function twoMirrors(clock?: Clock): Promise<Engine> {
    const engine = await engineWith({ a: mem(), b: mem(), c: mem(), d: mem() }, clock);
    await engine.create('m1', { table: `0 ${LEN} mirror core 2 ${REGION} nosync 2 a 0 b 0 1 handle_errors` });
    await engine.create('m2', { table: `0 ${LEN} mirror core 2 ${REGION} nosync 2 c 0 d 0 1 handle_errors` });
    await until('the resyncs', () => setsOf(engine, 'm1')[0].resync.state === 'IN_SYNC' && setsOf(engine, 'm2')[0].resync.state === 'IN_SYNC');
    return engine;
  }

  async function workload(engine: Engine): Promise<void> {
    for (const n of ['m1', 'm2']) {
      await engine.device(n)!.write(sectors(8), Buffer.alloc(4096, 1));
      await engine.device(n)!.flush();
      await engine.suspend(n);
      await engine.resume(n); // the resync: STOP, then START again
    }
    for (const n of ['m1', 'm2']) await until(`${n} in sync`, () => setsOf(engine, n)[0].resync.state === 'IN_SYNC');
  }

  test('by device and by kind; only the mirrors watched get an observer', async () => {
    const engine = await twoMirrors();
    const [s1] = setsOf(engine, 'm1');
    const [s2] = setsOf(engine, 'm2');
    const byDevice = watchAll(engine, { devices: ['m1'], maxEventsPerSecond: 0 });
    expect(s1.stepObserver).toBeDefined();
    expect(s2.stepObserver).toBeUndefined();
    const resyncOnly = watchAll(engine, { kinds: ['mirror-resync'], maxEventsPerSecond: 0 });
    expect(s2.stepObserver).toBeDefined();
    const m2Tx = watchAll(engine, { devices: ['m2'], kinds: ['mirror-write-transaction'], maxEventsPerSecond: 0 });
    const bios = watchAll(engine, { kinds: ['bio'], maxEventsPerSecond: 0 });
    await workload(engine);
    for (const w of [byDevice, resyncOnly, m2Tx, bios]) w.stop();
    expect(s1.stepObserver).toBeUndefined();
    expect(s2.stepObserver).toBeUndefined();

    expect(devicesOf(byDevice.records)).toEqual(new Set(['m1']));
    expect(kindsOf(byDevice.records)).toEqual(new Set(['bio', ...MIRROR_KINDS]));
    expect(lives(byDevice.records).filter((l) => l.startsWith('mirror-resync'))).toEqual(['mirror-resync:m1: IN_SYNC STOP>STOPPED START>SCANNING NO_WORK>IN_SYNC']);

    expect(kindsOf(resyncOnly.records)).toEqual(new Set(['mirror-resync']));
    expect(lives(resyncOnly.records)).toEqual([
      'mirror-resync:m1: IN_SYNC STOP>STOPPED START>SCANNING NO_WORK>IN_SYNC',
      'mirror-resync:m2: IN_SYNC STOP>STOPPED START>SCANNING NO_WORK>IN_SYNC',
    ]);

    expect(kindsOf(m2Tx.records)).toEqual(new Set(['mirror-write-transaction']));
    expect(devicesOf(m2Tx.records)).toEqual(new Set(['m2']));
    expect(lives(m2Tx.records)).toHaveLength(4); // a write and a flush, two legs each

    expect(kindsOf(bios.records)).toEqual(new Set(['bio']));
    await engine.close();
  });

  test('a watch that selects no mirror kind on a device leaves its mirror without an observer', async () => {
    const engine = await twoMirrors();
    const [s1] = setsOf(engine, 'm1');
    const [s2] = setsOf(engine, 'm2');
    for (const f of [{ kinds: ['bio', 'merge', 'kcopyd-job'] as InspectActorKind[] }, { devices: ['m3'] }, { devices: ['m2'], kinds: ['bio'] as InspectActorKind[] }]) {
      const w = watchAll(engine, f);
      expect(s1.stepObserver, JSON.stringify(f)).toBeUndefined();
      expect(s2.stepObserver, JSON.stringify(f)).toBeUndefined();
      await engine.device('m1')!.write(sectors(0), Buffer.alloc(512));
      w.stop();
      expect(w.records.filter((r) => MIRROR_KINDS.includes(r.kind))).toEqual([]);
    }
    await engine.close();
  });
});

describe('sampling and cost', () => {
  test('at most the budget of new actors per kind and second; admitted ones whole; drops counted and reported', async () => {
    const clock = new SimulatedClock(0);
    const engine = await engineWith({ a: mem(), b: mem() }, clock);
    await engine.create('m', { table: `0 ${LEN} mirror core 2 ${REGION} nosync 2 a 0 b 0` });
    const records: InspectionRecord[] = [];
    const watch = engine.inspector.subscribe({ devices: ['m'], kinds: ['mirror-write-group', 'mirror-write-transaction'], maxEventsPerSecond: 5 }, (r) => void records.push(r));
    for (let i = 0; i < 10; i++) await engine.device('m')!.write(sectors(i * 8), Buffer.alloc(4096));
    // A group is 5 records (actor + 2 steps), a transaction 13 (actor + 6 steps): 5 lets the first group and both
    // of its transactions in (the second starts at 3 < 5), then nothing until the next second.
    expect(lives(records)).toEqual([
      'mirror-write-group:m:1: START ISSUE>WRITING ALL_DONE>COMPLETED',
      `mirror-write-transaction:m:1.0: ${WRITE_TX}`,
      `mirror-write-transaction:m:1.1: ${WRITE_TX}`,
    ]);
    expect(watch.stats()).toEqual({ delivered: 5 + 26, droppedEvents: 9 * 5 + 18 * 13, droppedActors: 27, droppedBacklog: 0 });
    clock.advance(1000);
    expect(records.filter((r) => r.type === 'dmstate.inspect.dropped')).toEqual([
      { type: 'dmstate.inspect.dropped', seq: 32, timeMs: 1000, kind: 'mirror-write-group', events: 45, actors: 9, reason: 'rate' },
      { type: 'dmstate.inspect.dropped', seq: 33, timeMs: 1000, kind: 'mirror-write-transaction', events: 234, actors: 18, reason: 'rate' },
    ]);
    await engine.device('m')!.write(sectors(0), Buffer.alloc(512));
    expect(lives(records).at(-1)).toBe(`mirror-write-transaction:m:11.1: ${WRITE_TX}`);
    watch.unsubscribe();
    await engine.close();
  });

  test('nobody watching: no mirror observer, the hub never entered; watching and stopping restores that', async () => {
    const engine = await engineWith({ a: mem(), b: new FaultyBlockDevice(mem()), log: mem(64) });
    await engine.create('m', { table: `0 ${LEN} mirror disk 3 log ${REGION} sync 2 a 0 b 0 1 handle_errors` });
    const [set] = setsOf(engine, 'm');
    const m = engine.device('m')!;
    const work = async (base: number): Promise<void> => {
      for (let i = 0; i < 40; i++) await m.write(sectors(base + i * 8), Buffer.alloc(4096, i));
      await m.flush();
      await engine.message('m', 0, ['readd', '1']);
      await until('the resync', () => set.resync.state === 'IN_SYNC');
    };
    expect(set.stepObserver).toBeUndefined();
    await work(0);
    expect(set.stepObserver).toBeUndefined();
    expect(engine.inspector.stats()).toEqual({ watches: 0, observedSteps: 0, recordsBuilt: 0 });

    const w = watchAll(engine, { kinds: ['mirror-write-group'] });
    expect(set.stepObserver).toBeDefined();
    await work(1024);
    w.stop();
    const after = engine.inspector.stats();
    expect(after.observedSteps).toBeGreaterThan(0);
    expect(w.records.length).toBeGreaterThan(0);
    expect(set.stepObserver).toBeUndefined();
    await work(2048);
    expect(engine.inspector.stats()).toEqual({ ...after, watches: 0 });
    await engine.close();
  });

  test("an observer set by someone else (a test's xstate check) is called beside inspection and kept after", async () => {
    const engine = await engineWith({ a: mem(), b: mem() });
    await engine.create('m', { table: `0 ${LEN} mirror core 2 ${REGION} nosync 2 a 0 b 0` });
    const [set] = setsOf(engine, 'm');
    const theirs: string[] = [];
    const mine = (machine: string, id: string): void => void theirs.push(`${machine}/${id}`);
    set.observer = mine;
    const theirsOnly = set.stepObserver;
    expect(theirsOnly).toBeDefined();
    const w = watchAll(engine, { devices: ['m'] });
    expect(set.stepObserver).not.toBe(theirsOnly);
    await engine.device('m')!.write(sectors(0), Buffer.alloc(512));
    w.stop();
    expect(set.observer).toBe(mine);
    expect(set.stepObserver).toBe(theirsOnly);
    expect([theirs[0], theirs.at(-1)]).toEqual(['mirror-write-group/1', 'mirror-write-group/1']);
    expect([...theirs].sort()).toEqual([...Array(2).fill('mirror-write-group/1'), ...Array(6).fill('mirror-write-transaction/1.0'), ...Array(6).fill('mirror-write-transaction/1.1')]);
    expect(lives(w.records.filter((r) => r.kind !== 'bio'))).toHaveLength(3);
    set.observer = undefined;
    expect(set.stepObserver).toBeUndefined();
    await engine.close();
  });

  test('a removed mirror leaves the inspector; a watch started before the mirror existed sees it', async () => {
    const engine = await engineWith({ a: mem(), b: mem() });
    const w = watchAll(engine, { devices: ['m'], kinds: ['mirror-resync', 'mirror-write-group'] });
    await engine.create('m', { table: `0 ${LEN} mirror core 2 ${REGION} nosync 2 a 0 b 0` });
    const [set] = setsOf(engine, 'm');
    expect(set.stepObserver).toBeDefined();
    await engine.device('m')!.write(sectors(0), Buffer.alloc(512));
    await engine.remove('m');
    expect(set.stepObserver).toBeUndefined();
    w.stop();
    expect(lives(w.records)).toEqual([
      'mirror-resync:m: IDLE START>SCANNING NO_WORK>IN_SYNC STOP>STOPPED',
      'mirror-write-group:m:1: START ISSUE>WRITING ALL_DONE>COMPLETED',
    ]);
    await engine.close();
  });
});

describe('the daemon', () => {
  test('an inspect request for mirror kinds streams the mirror records; the watch ends with the client', async () => {
    const tmp = fs.mkdtempSync('/tmp/dmim-');
    const daemon = await Daemon.start({ poolDir: path.join(tmp, 'p') });
    try {
      daemon.engine.registerBackingDevice('a', mem());
      daemon.engine.registerBackingDevice('b', mem());
      await daemon.engine.create('m', { table: `0 ${LEN} mirror core 2 ${REGION} nosync 2 a 0 b 0` });
      const [set] = setsOf(daemon.engine, 'm');
      const client = await ControlClient.connect(daemon.paths.controlSocket, daemon.paths.dir);
      const got: InspectionRecord[] = [];
      let started = false;
      void client
        .stream({ op: 'inspect', devices: ['m'], kinds: ['mirror-write-group', 'mirror-write-transaction'] }, (r) => {
          if (r.op === 'inspect.started') started = true;
          if (r.op === 'inspection') got.push(r.record);
          return false;
        })
        .catch(() => undefined);
      await waitFor('the watch', () => started);
      expect(set.stepObserver).toBeDefined();
      await daemon.engine.device('m')!.write(sectors(0), Buffer.alloc(512));
      await waitFor('31 records', () => got.length === 5 + 2 * 13);
      expect(lives(got)).toEqual([
        'mirror-write-group:m:1: START ISSUE>WRITING ALL_DONE>COMPLETED',
        `mirror-write-transaction:m:1.0: ${WRITE_TX}`,
        `mirror-write-transaction:m:1.1: ${WRITE_TX}`,
      ]);
      client.close();
      await waitFor('the daemon to drop the watch', () => daemon.engine.inspector.stats().watches === 0);
      expect(set.stepObserver).toBeUndefined();
    } finally {
      await daemon.close();
      fs.rmSync(tmp, { recursive: true, force: true });
    }
  });
});
