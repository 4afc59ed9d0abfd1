/**
 * The pool's durable state as a fold over its event log: `applyEvent(state, event)` for every stored event, in
 * sequence order, rebuilds what the side tables (device records, WAL) project. No I/O, no clock: the same events
 * give the same state. For speed (a replay applies ~1M events a second) the reducer updates the state it is given
 * in place; `clonePoolState` copies one.
 *
 * What is state:
 * - devices: name, minor, uuid, read-only flag, live and inactive table lines, suspended, creation order;
 * - COWs of persistent snapshots, keyed by their WAL key (the COW's table label): chunk size, valid, overflowed,
 *   and the exceptions in index order (index = position in the COW's metadata area sequence);
 * - marks (name, device, seq), to replay up to one.
 *
 * Exceptions that did not come from this pool's commits (a COW written by the kernel, or as it is after a crash)
 * arrive with 'exceptions.loaded', which replaces the COW's state. Commits append, merges clear the newest records.
 * Trace events (bio, kcopyd) and events that change no durable state (merge progress reports, checkpoints,
 * engine start/stop) are ignored, and so is any type this version does not know.
 *
 * An event that contradicts the state (a device created twice, a commit that leaves a gap) means the log is
 * corrupt or was cut: applyEvent throws DmError('DM_POOL_CORRUPT') naming the event.
 */
import { DmError } from '../core/errors.js';
import type { LoggedEvent } from '../log/events.js';

export interface DeviceState {
  minor: number;
  uuid: string | undefined;
  readOnly: boolean;
  /** `dmstate dmsetup table` lines (canonical labels), or null for no table in that slot. */
  live: string[] | null;
  inactive: string[] | null;
  suspended: boolean;
  /** Creation order (a restore builds stacked devices after the ones below them). */
  order: number;
}

export interface CowState {
  /** The chunk size in force (the COW header's); 0 when the log never saw the COW loaded. */
  chunkSizeSectors: number;
  valid: boolean;
  overflowed: boolean;
  /** The exceptions in index order, flattened: old0, new0, old1, new1, ... (two numbers, no object, each). */
  pairs: number[];
}

export interface MarkState {
  readonly name: string;
  readonly device: string;
  readonly seq: number;
}

export interface PoolState {
  /** Sequence number of the last event applied (0: none). */
  seq: number;
  readonly devices: Map<string, DeviceState>;
  readonly cows: Map<string, CowState>;
  readonly marks: MarkState[];
  nextOrder: number;
}

/** A run of exceptions in index order: [oldChunk, newChunk, chunks]; record i is oldChunk + i → newChunk + i. */
export type ExceptionRunTuple = [number, number, number];

export function emptyPoolState(): PoolState {
  return { seq: 0, devices: new Map(), cows: new Map(), marks: [], nextOrder: 1 };
}

const corrupt = (event: LoggedEvent, why: string): DmError =>
  new DmError('DM_POOL_CORRUPT', `event log: event #${event.seq} (${event.type}) ${why}`);

function deviceOf(state: PoolState, event: LoggedEvent & { device: string }): DeviceState {
  const d = state.devices.get(event.device);
  if (!d) throw corrupt(event, `names device ${event.device}, which does not exist at that point`);
  return d;
}

function cowOf(state: PoolState, key: string): CowState {
  let c = state.cows.get(key);
  if (!c) {
    // Commits for a COW the log never saw loaded (a log from before 'exceptions.loaded' existed).
    c = { chunkSizeSectors: 0, valid: true, overflowed: false, pairs: [] };
    state.cows.set(key, c);
  }
  return c;
}

/**
 * The WAL keys (COW labels) of the persistent snapshots a table names: `snapshot` and `snapshot-merge` lines with
 * store type P or PO. Table lines are `start length target args...`, as `dmsetup table` prints them.
 */
export function persistentCowsOfTable(lines: readonly string[] | null): string[] {
  const out: string[] = [];
  if (!lines) return out;
  for (const line of lines) {
    const w = line.trim().split(/\s+/);
    if ((w[2] === 'snapshot' || w[2] === 'snapshot-merge') && w.length >= 7 && /^PO?$/i.test(w[5])) out.push(w[4]);
  }
  return out;
}

/** The COW a snapshot event is about: its `cow` field, else (older logs) the one persistent COW in the device's live table. */
function cowOfSnapshotEvent(state: PoolState, event: LoggedEvent & { device: string; cow?: string }): CowState | undefined {
  if (event.cow !== undefined) return state.cows.get(event.cow);
  const keys = persistentCowsOfTable(state.devices.get(event.device)?.live ?? null);
  return keys.length === 1 ? state.cows.get(keys[0]) : undefined;
}

/** Applies one stored event to `state` (in place). Events must come in sequence order. */
export function applyEvent(state: PoolState, event: LoggedEvent): void {
  switch (event.type) {
    case 'device.created':
      if (state.devices.has(event.device)) throw corrupt(event, `creates device ${event.device}, which exists already`);
      state.devices.set(event.device, {
        minor: event.minor,
        uuid: event.uuid,
        readOnly: event.readOnly,
        live: null,
        inactive: null,
        suspended: false,
        order: state.nextOrder++,
      });
      break;
    case 'table.loaded':
      deviceOf(state, event).inactive = event.table;
      break;
    case 'table.cleared':
      deviceOf(state, event).inactive = null;
      break;
    case 'device.suspended':
      deviceOf(state, event).suspended = true;
      break;
    case 'device.resumed': {
      const d = deviceOf(state, event);
      if (event.swapped) {
        d.live = event.table;
        d.inactive = null;
      }
      d.suspended = false;
      break;
    }
    case 'device.removed':
      deviceOf(state, event);
      state.devices.delete(event.device);
      break;
    case 'mark':
      state.marks.push({ name: event.name, device: event.device, seq: event.seq });
      break;
    case 'exceptions.loaded': {
      const pairs: number[] = [];
      decodeRuns(event.runs, pairs);
      if (pairs.length !== 2 * event.count) throw corrupt(event, `holds ${pairs.length / 2} exceptions in its runs but says ${event.count}`);
      state.cows.set(event.cow, { chunkSizeSectors: event.chunkSizeSectors, valid: event.valid, overflowed: event.overflowed === true, pairs });
      break;
    }
    case 'exception.committed': {
      const c = cowOf(state, event.cow);
      if (event.chunks.length === 0) break;
      if (event.firstIndex !== c.pairs.length / 2) {
        throw corrupt(event, `commits record #${event.firstIndex} of COW ${event.cow}, which holds ${c.pairs.length / 2} records`);
      }
      for (const [oldChunk, newChunk] of event.chunks) c.pairs.push(oldChunk, newChunk);
      break;
    }
    case 'exception.merged': {
      const c = cowOf(state, event.cow);
      if (!(Number.isSafeInteger(event.count) && event.count >= 0 && 2 * event.count <= c.pairs.length)) {
        throw corrupt(event, `merges ${event.count} records of COW ${event.cow}, which holds ${c.pairs.length / 2}`);
      }
      c.pairs.length -= 2 * event.count;
      break;
    }
    case 'snapshot.invalidated': {
      // An invalid COW loads with no exceptions (its header says invalid): its list is gone.
      const c = cowOfSnapshotEvent(state, event);
      if (c) {
        c.valid = false;
        c.pairs = [];
      }
      break;
    }
    case 'snapshot.overflowed': {
      const c = cowOfSnapshotEvent(state, event);
      if (c) c.overflowed = true;
      break;
    }
    default:
    // Trace events, progress reports and types this version does not know change no durable state.
  }
  state.seq = event.seq;
}

/** A flattened pair list as index-order runs (consecutive records whose old and new chunks both step by one). */
export function encodeRuns(pairs: readonly number[]): ExceptionRunTuple[] {
  const runs: ExceptionRunTuple[] = [];
  let i = 0;
  while (i < pairs.length) {
    const o = pairs[i];
    const n = pairs[i + 1];
    let len = 1;
    while (i + 2 * len < pairs.length && pairs[i + 2 * len] === o + len && pairs[i + 2 * len + 1] === n + len) len++;
    runs.push([o, n, len]);
    i += 2 * len;
  }
  return runs;
}

/** Appends the records of index-order runs to a flattened pair list. */
export function decodeRuns(runs: ReadonlyArray<readonly [number, number, number]>, out: number[]): void {
  for (const [o, n, len] of runs) for (let k = 0; k < len; k++) out.push(o + k, n + k);
}

export function clonePoolState(state: PoolState): PoolState {
  return {
    seq: state.seq,
    devices: new Map([...state.devices].map(([k, d]) => [k, { ...d, live: d.live && [...d.live], inactive: d.inactive && [...d.inactive] }])),
    cows: new Map([...state.cows].map(([k, c]) => [k, { ...c, pairs: [...c.pairs] }])),
    marks: [...state.marks],
    nextOrder: state.nextOrder,
  };
}

/** A copy of `state` with exactly the devices of `readOnlyDevices` read-only (a read-only replayed pool's state as it was then). */
export function withReadOnlyFlags(state: PoolState, readOnlyDevices: ReadonlySet<string>): PoolState {
  const out = clonePoolState(state);
  for (const [name, d] of out.devices) d.readOnly = readOnlyDevices.has(name);
  return out;
}

// ---- serialization (state snapshots in the log) -----------------------------------------------------------

export const POOL_STATE_FORMAT = 1;

export interface SerializedPoolState {
  readonly format: number;
  readonly seq: number;
  readonly nextOrder: number;
  readonly devices: ReadonlyArray<{ name: string; minor: number; uuid?: string; readOnly: boolean; live: string[] | null; inactive: string[] | null; suspended: boolean; order: number }>;
  readonly cows: ReadonlyArray<{ cow: string; chunkSizeSectors: number; valid: boolean; overflowed: boolean; runs: ExceptionRunTuple[] }>;
  readonly marks: readonly MarkState[];
}

export function serializePoolState(state: PoolState): SerializedPoolState {
  return {
    format: POOL_STATE_FORMAT,
    seq: state.seq,
    nextOrder: state.nextOrder,
    devices: [...state.devices].map(([name, d]) => ({ name, ...d, uuid: d.uuid })),
    cows: [...state.cows].map(([cow, c]) => ({ cow, chunkSizeSectors: c.chunkSizeSectors, valid: c.valid, overflowed: c.overflowed, runs: encodeRuns(c.pairs) })),
    marks: state.marks,
  };
}

export function deserializePoolState(value: unknown): PoolState {
  const s = value as SerializedPoolState;
  if (typeof s !== 'object' || s === null || s.format !== POOL_STATE_FORMAT || !Array.isArray(s.devices) || !Array.isArray(s.cows)) {
    throw new DmError('DM_POOL_CORRUPT', `state snapshot: unknown format ${String((s as { format?: unknown } | null)?.format)} (this version reads ${POOL_STATE_FORMAT})`);
  }
  const state: PoolState = { seq: s.seq, devices: new Map(), cows: new Map(), marks: [...s.marks], nextOrder: s.nextOrder };
  for (const d of s.devices) {
    state.devices.set(d.name, { minor: d.minor, uuid: d.uuid, readOnly: d.readOnly, live: d.live, inactive: d.inactive, suspended: d.suspended, order: d.order });
  }
  for (const c of s.cows) {
    const pairs: number[] = [];
    decodeRuns(c.runs, pairs);
    state.cows.set(c.cow, { chunkSizeSectors: c.chunkSizeSectors, valid: c.valid, overflowed: c.overflowed, pairs });
  }
  return state;
}
