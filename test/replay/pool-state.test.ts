/**
 * The pool-state reducer (src/replay/pool-state.ts) and the digest (src/replay/digest.ts), event by event.
 */
import { describe, expect, test } from 'vitest';
import type { DmEvent, LoggedEvent } from '../../src/log/events.js';
import {
  applyEvent,
  clonePoolState,
  decodeRuns,
  deserializePoolState,
  emptyPoolState,
  encodeRuns,
  persistentCowsOfTable,
  serializePoolState,
  type PoolState,
} from '../../src/replay/pool-state.js';
import { canonicalState, sortedRuns, stateDigest } from '../../src/replay/digest.js';
import { ExceptionTable } from '../../src/stores/exception-table.js';
import { chunks } from '../../src/block/units.js';
import { createRng } from '../../src/core/rng.js';

/** Applies events with consecutive sequence numbers after the state's. */
function apply(state: PoolState, ...events: DmEvent[]): PoolState {
  for (const e of events) applyEvent(state, { ...e, seq: state.seq + 1, timeMs: 0 } as LoggedEvent);
  return state;
}

const SNAP = '0 64 snapshot o c P 8';
const pairsOf = (s: PoolState, cow = 'c'): number[] => s.cows.get(cow)!.pairs;

describe('devices', () => {
  test('create, load, resume (swap), clear, suspend, resume, remove', () => {
    const s = apply(emptyPoolState(), { type: 'device.created', device: 'a', minor: 0, uuid: 'u-a', readOnly: false });
    expect(s.devices.get('a')).toEqual({ minor: 0, uuid: 'u-a', readOnly: false, live: null, inactive: null, suspended: false, order: 1 });
    apply(s, { type: 'table.loaded', device: 'a', table: ['0 8 zero'] });
    expect(s.devices.get('a')!.inactive).toEqual(['0 8 zero']);
    apply(s, { type: 'device.resumed', device: 'a', table: ['0 8 zero'], swapped: true });
    expect(s.devices.get('a')).toMatchObject({ live: ['0 8 zero'], inactive: null, suspended: false });
    apply(s, { type: 'table.loaded', device: 'a', table: ['0 8 error'] }, { type: 'table.cleared', device: 'a' });
    expect(s.devices.get('a')!.inactive).toBeNull();
    apply(s, { type: 'device.suspended', device: 'a' });
    expect(s.devices.get('a')!.suspended).toBe(true);
    apply(s, { type: 'table.loaded', device: 'a', table: ['0 8 error'] }, { type: 'device.resumed', device: 'a', table: ['0 8 zero'], swapped: false });
    // A resume without a swap keeps both tables.
    expect(s.devices.get('a')).toMatchObject({ live: ['0 8 zero'], inactive: ['0 8 error'], suspended: false });
    apply(s, { type: 'device.created', device: 'b', minor: 1, readOnly: true });
    expect(s.devices.get('b')!.order).toBe(2);
    apply(s, { type: 'device.removed', device: 'a' });
    expect([...s.devices.keys()]).toEqual(['b']);
    expect(s.seq).toBe(10);
  });

  test('an event that contradicts the state is refused, naming it', () => {
    const s = apply(emptyPoolState(), { type: 'device.created', device: 'a', minor: 0, readOnly: false });
    expect(() => apply(s, { type: 'device.created', device: 'a', minor: 1, readOnly: false })).toThrow(/#2 \(device.created\).*exists already/);
    for (const e of [
      { type: 'table.loaded', device: 'x', table: [] },
      { type: 'device.resumed', device: 'x', table: [], swapped: false },
      { type: 'device.suspended', device: 'x' },
      { type: 'device.removed', device: 'x' },
      { type: 'table.cleared', device: 'x' },
    ] as DmEvent[]) {
      expect(() => apply(clonePoolState(s), e)).toThrow(expect.objectContaining({ code: 'DM_POOL_CORRUPT' }));
    }
  });

  test('trace events, progress reports and unknown types change nothing but the sequence number', () => {
    const s = apply(emptyPoolState(), { type: 'device.created', device: 'a', minor: 0, readOnly: false });
    const before = serializePoolState(s);
    apply(
      s,
      { type: 'bio', device: 'a', bioId: 1, op: 'write', sector: 0, lengthSectors: 8, from: 'X', event: 'Y', state: 'Z' },
      { type: 'engine.started', devices: 1 },
      { type: 'merge.state', device: 'a', from: 'IDLE', event: 'START', state: 'PREPARE', chunksLeft: 1, chunksMerged: 0 },
      { type: 'checkpoint.written', device: 'a', cow: 'c', exceptions: 3 },
      { type: 'some.future.event', device: 'a' } as unknown as DmEvent,
    );
    expect({ ...serializePoolState(s), seq: before.seq }).toEqual(before);
    expect(s.seq).toBe(6);
  });

  test('marks are kept in order with their sequence numbers', () => {
    const s = apply(emptyPoolState(), { type: 'mark', device: 'a', name: 'one' }, { type: 'mark', device: 'b', name: 'two' });
    expect(s.marks).toEqual([
      { name: 'one', device: 'a', seq: 1 },
      { name: 'two', device: 'b', seq: 2 },
    ]);
  });
});

describe('COWs', () => {
  const loaded = (pairs: number[], extra: Partial<Extract<DmEvent, { type: 'exceptions.loaded' }>> = {}): DmEvent => ({
    type: 'exceptions.loaded',
    cow: 'c',
    device: 's',
    chunkSizeSectors: 8,
    valid: true,
    count: pairs.length / 2,
    runs: encodeRuns(pairs),
    ...extra,
  });

  test('loaded replaces, commits append at the next index, merges clear the newest records', () => {
    const s = apply(emptyPoolState(), loaded([5, 2, 6, 3]));
    expect(s.cows.get('c')).toEqual({ chunkSizeSectors: 8, valid: true, overflowed: false, pairs: [5, 2, 6, 3] });
    apply(s, { type: 'exception.committed', cow: 'c', count: 2, firstIndex: 2, chunks: [[9, 4], [1, 5]] });
    expect(pairsOf(s)).toEqual([5, 2, 6, 3, 9, 4, 1, 5]);
    apply(s, { type: 'exception.merged', cow: 'c', count: 3 });
    expect(pairsOf(s)).toEqual([5, 2]);
    apply(s, { type: 'exception.committed', cow: 'c', count: 1, firstIndex: 1, chunks: [[7, 3]] });
    expect(pairsOf(s)).toEqual([5, 2, 7, 3]);
    // A later load wins over everything before it (a COW written elsewhere, or as it was after a crash).
    apply(s, loaded([100, 2], { chunkSizeSectors: 16 }));
    expect(s.cows.get('c')).toEqual({ chunkSizeSectors: 16, valid: true, overflowed: false, pairs: [100, 2] });
  });

  test('a commit that leaves a gap or overlaps, a merge of more than there is, and a miscounted load are refused', () => {
    const s = apply(emptyPoolState(), loaded([5, 2, 6, 3]));
    expect(() => apply(clonePoolState(s), { type: 'exception.committed', cow: 'c', count: 1, firstIndex: 3, chunks: [[1, 9]] })).toThrow(/record #3 of COW c, which holds 2/);
    expect(() => apply(clonePoolState(s), { type: 'exception.committed', cow: 'c', count: 1, firstIndex: 1, chunks: [[1, 9]] })).toThrow(/DM_POOL_CORRUPT|record #1/);
    expect(() => apply(clonePoolState(s), { type: 'exception.merged', cow: 'c', count: 3 })).toThrow(/merges 3 records/);
    expect(() => apply(clonePoolState(s), { ...loaded([1, 2]), count: 2 } as DmEvent)).toThrow(/holds 1 exceptions/);
    // An empty commit group changes nothing.
    apply(s, { type: 'exception.committed', cow: 'c', count: 0, firstIndex: 0, chunks: [] });
    expect(pairsOf(s)).toEqual([5, 2, 6, 3]);
  });

  test('commits for a COW never seen loaded start a list of unknown chunk size', () => {
    const s = apply(emptyPoolState(), { type: 'exception.committed', cow: 'old', count: 1, firstIndex: 0, chunks: [[3, 2]] });
    expect(s.cows.get('old')).toEqual({ chunkSizeSectors: 0, valid: true, overflowed: false, pairs: [3, 2] });
  });

  test('invalidation empties the COW (by its cow field, or the one persistent COW of the device in older logs); overflow sets the flag', () => {
    const s = apply(
      emptyPoolState(),
      { type: 'device.created', device: 's', minor: 0, readOnly: false },
      { type: 'device.resumed', device: 's', table: [SNAP], swapped: true },
      loaded([5, 2, 6, 3]),
      { ...loaded([1, 2]), cow: 'd' } as DmEvent,
    );
    const byField = clonePoolState(s);
    apply(byField, { type: 'snapshot.invalidated', device: 's', reason: 'x', cow: 'd' });
    expect(byField.cows.get('d')).toMatchObject({ valid: false, pairs: [] });
    expect(byField.cows.get('c')).toMatchObject({ valid: true, pairs: [5, 2, 6, 3] });
    apply(s, { type: 'snapshot.invalidated', device: 's', reason: 'COW device full' });
    expect(s.cows.get('c')).toMatchObject({ valid: false, pairs: [] });
    apply(s, { type: 'snapshot.overflowed', device: 'other', cow: 'd' });
    expect(s.cows.get('d')!.overflowed).toBe(true);
    // An N snapshot's events name no COW the state knows: nothing changes.
    apply(s, { type: 'snapshot.invalidated', device: 'nobody', reason: 'x' });
    apply(s, loaded([1, 2], { overflowed: true }));
    expect(s.cows.get('c')).toMatchObject({ valid: true, overflowed: true, pairs: [1, 2] });
  });

  test('persistentCowsOfTable: snapshot and snapshot-merge lines with P or PO', () => {
    expect(
      persistentCowsOfTable([
        '0 8 snapshot o c1 P 8',
        '8 8 snapshot o c2 PO 16',
        '16 8 snapshot o c3 N 8',
        '24 8 snapshot-merge o c4 p 8',
        '32 8 linear c5 0',
        '40 8 snapshot-origin o',
      ]),
    ).toEqual(['c1', 'c2', 'c4']);
    expect(persistentCowsOfTable(null)).toEqual([]);
  });
});

describe('encoding and snapshots of the state', () => {
  test('index-order runs round-trip, and are maximal', () => {
    const rng = createRng(7);
    for (let round = 0; round < 200; round++) {
      const pairs: number[] = [];
      let o = rng.int(100);
      let n = 2 + rng.int(5);
      for (let i = rng.int(60); i > 0; i--) {
        if (rng.int(3) === 0) o = rng.int(1000);
        else o++;
        if (rng.int(5) === 0) n += 1 + rng.int(3);
        else n++;
        pairs.push(o, n);
      }
      const runs = encodeRuns(pairs);
      const back: number[] = [];
      decodeRuns(runs, back);
      expect(back).toEqual(pairs);
      for (let i = 1; i < runs.length; i++) {
        const [po, pn, pc] = runs[i - 1];
        expect(runs[i][0] === po + pc && runs[i][1] === pn + pc).toBe(false);
      }
    }
  });

  test('serialize → deserialize gives the same state', () => {
    const s = apply(
      emptyPoolState(),
      { type: 'device.created', device: 's', minor: 3, uuid: 'u', readOnly: true },
      { type: 'device.resumed', device: 's', table: [SNAP], swapped: true },
      { type: 'table.loaded', device: 's', table: ['0 64 zero'] },
      { type: 'device.suspended', device: 's' },
      { type: 'exceptions.loaded', cow: 'c', device: 's', chunkSizeSectors: 8, valid: true, count: 3, runs: [[10, 2, 2], [4, 4, 1]] },
      { type: 'mark', device: 's', name: 'm' },
      { type: 'snapshot.overflowed', device: 's', cow: 'c' },
    );
    const back = deserializePoolState(JSON.parse(JSON.stringify(serializePoolState(s))));
    expect(back).toEqual(s);
    expect(stateDigest(back)).toBe(stateDigest(s));
    expect(() => deserializePoolState({ format: 99 })).toThrow(expect.objectContaining({ code: 'DM_POOL_CORRUPT' }));
  });
});

describe('digest', () => {
  const base = (): PoolState =>
    apply(
      emptyPoolState(),
      { type: 'device.created', device: 's', minor: 0, readOnly: false },
      { type: 'device.resumed', device: 's', table: [SNAP], swapped: true },
      { type: 'exceptions.loaded', cow: 'c', device: 's', chunkSizeSectors: 8, valid: true, count: 4, runs: [[10, 2, 1], [11, 3, 1], [3, 4, 1], [12, 5, 1]] },
    );

  test('exceptions compare as the set a snapshot reads through, whatever their order or run shape', () => {
    const a = base();
    const b = base();
    b.cows.get('c')!.pairs = [3, 4, 12, 5, 10, 2, 11, 3];
    expect(stateDigest(b)).toBe(stateDigest(a));
    // The ExceptionTable's runs for the same exceptions (inserted in another order) give the same canonical runs.
    const t = new ExceptionTable();
    for (const [o, n] of [[11, 3], [12, 4], [10, 2], [3, 4]]) t.insert(chunks(o), chunks(n));
    const fromTable: number[] = [];
    for (const r of t.runs()) for (let k = 0; k <= r.count; k++) fromTable.push(r.oldChunk + k, r.newChunk + k);
    expect(sortedRuns(fromTable)).toEqual([[3, 4, 1], [10, 2, 3]]);
  });

  test('every field of a device and of a named COW changes it; marks, order and unnamed COWs do not', () => {
    const d0 = stateDigest(base());
    const changes: Array<(s: PoolState) => void> = [
      (s) => (s.devices.get('s')!.minor = 5),
      (s) => (s.devices.get('s')!.uuid = 'x'),
      (s) => (s.devices.get('s')!.readOnly = true),
      (s) => (s.devices.get('s')!.suspended = true),
      (s) => (s.devices.get('s')!.live = ['0 64 zero']),
      (s) => (s.devices.get('s')!.inactive = ['0 64 zero']),
      (s) => (s.cows.get('c')!.chunkSizeSectors = 16),
      (s) => (s.cows.get('c')!.valid = false),
      (s) => (s.cows.get('c')!.overflowed = true),
      (s) => s.cows.get('c')!.pairs.push(99, 9),
      (s) => (s.cows.get('c')!.pairs[1] = 7),
      (s) => s.cows.delete('c'),
      (s) => s.devices.delete('s'),
    ];
    const seen = new Set([d0]);
    for (const change of changes) {
      const s = base();
      change(s);
      const d = stateDigest(s);
      expect(seen.has(d), String(change)).toBe(false);
      seen.add(d);
    }
    const same = base();
    same.marks.push({ name: 'm', device: 's', seq: 9 });
    same.devices.get('s')!.order = 42;
    same.cows.set('unnamed', { chunkSizeSectors: 8, valid: true, overflowed: false, pairs: [1, 2] });
    same.seq = 1000;
    expect(stateDigest(same)).toBe(d0);
  });

  test('an invalid COW is compared without exceptions; a COW a table names but the state lacks is marked unknown', () => {
    const a = base();
    a.cows.get('c')!.valid = false;
    const b = base();
    b.cows.get('c')!.valid = false;
    b.cows.get('c')!.pairs = [];
    expect(stateDigest(a)).toBe(stateDigest(b));
    const c = base();
    c.cows.delete('c');
    expect(canonicalState(c).cows).toEqual([{ cow: 'c', known: false }]);
  });
});
