/**
 * The event log: typed events on an RxJS Subject, persisted to LevelDB with a monotonic sequence number.
 *
 * Group commit: appends go into one queue owned by a single committer, which drains everything waiting into ONE
 * LevelDB batch (synced when any event in it was marked durable) and then resolves the producers waiting on it.
 * While a batch is being written, new appends gather for the next one, so many durable events share one
 * fdatasync (measured here: 1 put+sync ≈ 280 µs, a synced batch of 256 ≈ 2.7 ms).
 *
 * Extra batch operations (e.g. a device record) can ride along with an event and land atomically with it.
 *
 * State (with `stateSnapshotEvents`): the log folds every event it has written into the pool's state
 * (src/replay/pool-state.ts) right after the batch holding it is written, and every that many events stores the
 * state in the 'statesnap' sublevel under the sequence number of the last event in it, so that a replay starts
 * from the newest snapshot at or before its target instead of the first event. The fold runs on the committer,
 * per written batch, never on the bio path (trace events are not folded). `compactLog` deletes the events a state
 * snapshot covers.
 */
import { Subject, type Observable } from 'rxjs';
import type { AbstractLevel, AbstractSublevel } from 'abstract-level';
import type { Clock } from '../core/clock.js';
import { DmError } from '../core/errors.js';
import { assert } from '../core/assert.js';
import type { DmEvent, LoggedEvent } from './events.js';
import { TRACE_EVENT_TYPES } from './events.js';
import type { ExceptionWal } from '../stores/contract.js';
import type { Chunk } from '../block/units.js';
import { applyEvent, deserializePoolState, emptyPoolState, serializePoolState, type PoolState } from '../replay/pool-state.js';

/** A LevelDB (or memory-level) database with string keys and JSON values. */
// eslint-disable-next-line @typescript-eslint/no-explicit-any -- abstract-level's generics vary per implementation
export type LevelDb = AbstractLevel<any, string, any>;

export type SideTable = 'devices' | 'meta' | 'wal';

export interface BatchPut {
  readonly type: 'put';
  readonly sublevel: SideTable;
  readonly key: string;
  readonly value: unknown;
}
export interface BatchDel {
  readonly type: 'del';
  readonly sublevel: SideTable;
  readonly key: string;
}
export type BatchOp = BatchPut | BatchDel;

export interface AppendOptions {
  /** The returned promise resolves only once the event is in a synced batch. */
  readonly durable?: boolean;
  /** Operations written in the same batch as the event. */
  readonly ops?: readonly BatchOp[];
}

interface Pending {
  readonly event: LoggedEvent;
  readonly durable: boolean;
  readonly ops: readonly BatchOp[] | undefined;
  resolve(): void;
  reject(err: unknown): void;
}

type WalRecord = { index: number; oldChunk: Chunk; newChunk: Chunk };

/** Sequence numbers as fixed-width hex so that LevelDB's byte order is numeric order. */
export const seqKey = (seq: number): string => seq.toString(16).padStart(14, '0');

/** The 'wal' side-table key of a group of a COW's records (contiguous, in index order) starting at `index`. */
export const walGroupKey = (cowKey: string, index: number): string => `${cowKey}\x00${index.toString(16).padStart(12, '0')}`;

export interface EventLogOptions {
  /**
   * Fold the written events into the pool's state and store it every this many events ('statesnap' sublevel).
   * Undefined or 0: no state is kept (reading tools, tests of the log alone).
   */
  readonly stateSnapshotEvents?: number;
}

/** A COW whose exception list a replayed pool pins (see ExceptionWal.pinned), from the pool's 'meta' table. */
export interface PinnedCow {
  readonly valid: boolean;
  readonly overflowed: boolean;
  readonly chunkSizeSectors: number;
}

/** 'meta' keys: where the log was compacted up to, a replayed pool's origin, its pinned COWs. */
export const META_COMPACTED_THROUGH = 'compactedThrough';
export const META_REPLAYED_FROM = 'replayedFrom';
export const META_PINNED_PREFIX = 'pinned:';

type JsonSublevel = AbstractSublevel<LevelDb, unknown, string, unknown>;
const eventsSublevel = (db: LevelDb): JsonSublevel => db.sublevel<string, unknown>('events', { valueEncoding: 'json' });
const stateSnapSublevel = (db: LevelDb): JsonSublevel => db.sublevel<string, unknown>('statesnap', { valueEncoding: 'json' });
const metaSublevel = (db: LevelDb): JsonSublevel => db.sublevel<string, unknown>('meta', { valueEncoding: 'json' });
/** Events read per iterator step when folding (one call into LevelDB per this many). */
const READ_BATCH_EVENTS = 1024;

/** At most this many events go into one batch; the rest wait for the next. */
const BATCH_EVENTS_MAX = 4096;

export class EventLog {
  private readonly subject = new Subject<LoggedEvent>();
  /** Every event as it is appended (before it is durable). */
  readonly events$: Observable<LoggedEvent> = this.subject.asObservable();
  /** Whether trace-level events (bio lifecycle, kcopyd) are produced at all. Producers check it first. */
  traceEnabled = false;
  /** Whether trace-level events are also persisted (they always go to events$ when produced). */
  persistTrace = false;

  private nextSeq = 1;
  private queue: Pending[] = [];
  private committing = false;
  private closed = false;
  private idleWaiters: Array<() => void> = [];
  private readonly eventsDb: JsonSublevel | undefined;
  private readonly stateSnapDb: JsonSublevel | undefined;
  private readonly subDbs: Record<SideTable, JsonSublevel> | undefined;
  /** The state the written events fold to (undefined: not kept). */
  private state: PoolState | undefined;
  private stateSnapshotEvents = 0;
  private eventsSinceStateSnapshot = 0;
  /** Why the state stopped being kept (an event the fold refused, an unreadable log at open), if it did. */
  stateError: Error | undefined;
  private readonly pinned = new Map<string, PinnedCow>();
  /** Without a database, WAL records live here (tests and in-memory engines). */
  private readonly memoryWal = new Map<string, Map<number, { index: number; oldChunk: Chunk; newChunk: Chunk }>>();

  private constructor(private readonly db: LevelDb | undefined, private readonly clock: Clock) {
    if (db) {
      this.eventsDb = eventsSublevel(db);
      this.stateSnapDb = stateSnapSublevel(db);
      this.subDbs = {
        devices: db.sublevel<string, unknown>('devices', { valueEncoding: 'json' }),
        meta: metaSublevel(db),
        wal: db.sublevel<string, unknown>('wal', { valueEncoding: 'json' }),
      };
    }
  }

  /**
   * Opens the log on an open database (or none: events$ only, nothing persisted). Resumes the sequence; with
   * `stateSnapshotEvents`, rebuilds the state from the newest state snapshot and the events after it.
   */
  static async open(db: LevelDb | undefined, clock: Clock, options: EventLogOptions = {}): Promise<EventLog> {
    const every = options.stateSnapshotEvents ?? 0;
    if (!(Number.isSafeInteger(every) && every >= 0)) {
      throw new DmError('DM_INVALID_ARGUMENT', `stateSnapshotEvents must be a non-negative integer, got ${every}`);
    }
    const log = new EventLog(db, clock);
    log.stateSnapshotEvents = every;
    if (db) {
      log.nextSeq = (await lastStoredSeq(db)) + 1;
      for await (const [key, value] of log.subDbs!.meta.iterator({ gte: META_PINNED_PREFIX, lt: META_PINNED_PREFIX + '\uffff' })) {
        log.pinned.set(key.slice(META_PINNED_PREFIX.length), value as PinnedCow);
      }
    }
    if (every > 0) {
      if (!db) log.state = emptyPoolState();
      else {
        try {
          const r = await readPoolState(db);
          log.state = r.state;
          log.eventsSinceStateSnapshot = r.eventsApplied;
          if (log.eventsSinceStateSnapshot >= every) await log.writeStateSnapshot();
        } catch (err) {
          // The engine runs without a kept state; `dmstate replay` reports the same error.
          log.stateError = err as Error;
        }
      }
    }
    return log;
  }

  /** The state the written events fold to, kept up to date by the committer (undefined when not kept). Do not change it. */
  get poolState(): PoolState | undefined {
    return this.state;
  }

  get lastSeq(): number {
    return this.nextSeq - 1;
  }

  /**
   * Appends an event. Returns at once for non-durable events (the promise still reports a failed batch);
   * with `durable`, resolves once the batch holding it is synced.
   */
  append(event: DmEvent, options: AppendOptions = {}): Promise<LoggedEvent> {
    if (this.closed) return Promise.reject(new DmError('DM_CLOSED', 'event log is closed'));
    // Object.assign, not a spread: V8 copies `{ ...event, seq, timeMs }` through a slow path (measured on Node 20:
    // ~1.5 µs per event against ~0.07 µs), which every event pays (a merge emits two per run).
    const logged = Object.assign({}, event, { seq: this.nextSeq++, timeMs: this.clock.nowMs() }) as LoggedEvent;
    this.subject.next(logged);
    const isTrace = TRACE_EVENT_TYPES.has(event.type);
    if (!this.eventsDb || (isTrace && !this.persistTrace)) {
      assert(!options.ops || options.ops.length === 0 || this.eventsDb, 'batch ops need a database');
      if (!this.eventsDb && !isTrace && this.state) this.fold([logged]);
      return Promise.resolve(logged);
    }
    return new Promise<LoggedEvent>((resolve, reject) => {
      this.queue.push({ event: logged, durable: options.durable === true, ops: options.ops, resolve: () => resolve(logged), reject });
      if (!this.committing) this.scheduleCommit();
    });
  }

  /** Emits a trace-level event if tracing is on. Cheap when it is off (one boolean test by the caller). */
  trace(event: DmEvent): void {
    if (!this.traceEnabled) return;
    void this.append(event).catch(() => undefined);
  }

  private scheduleCommit(): void {
    this.committing = true;
    // setImmediate lets producers of the same tick join this batch.
    setImmediate(() => void this.commitLoop());
  }

  private async commitLoop(): Promise<void> {
    while (this.queue.length > 0) {
      const group = this.queue.length <= BATCH_EVENTS_MAX ? this.queue : this.queue.slice(0, BATCH_EVENTS_MAX);
      this.queue = this.queue.length <= BATCH_EVENTS_MAX ? [] : this.queue.slice(BATCH_EVENTS_MAX);
      let sync = false;
      const batch = this.db!.batch();
      for (const p of group) {
        if (p.durable) sync = true;
        batch.put(seqKey(p.event.seq), p.event, { sublevel: this.eventsDb! });
        if (p.ops) {
          for (const op of p.ops) {
            if (op.type === 'put') batch.put(op.key, op.value, { sublevel: this.subDbs![op.sublevel] });
            else batch.del(op.key, { sublevel: this.subDbs![op.sublevel] });
          }
        }
      }
      try {
        await batch.write({ sync });
        // Folded only once written, so the kept state is always the stored events' state.
        if (this.state) this.fold(group.map((p) => p.event));
        for (const p of group) p.resolve();
      } catch (err) {
        const e = new DmError('DM_IO', `event log: batch write failed: ${(err as Error).message}`, { cause: err });
        for (const p of group) p.reject(e);
      }
      if (this.state && this.stateSnapshotEvents > 0 && this.eventsSinceStateSnapshot >= this.stateSnapshotEvents) await this.writeStateSnapshot();
    }
    this.committing = false;
    const waiters = this.idleWaiters;
    this.idleWaiters = [];
    for (const w of waiters) w();
  }

  private fold(events: readonly LoggedEvent[]): void {
    for (const e of events) {
      try {
        applyEvent(this.state!, e);
      } catch (err) {
        this.stateError = err as Error;
        this.state = undefined;
        return;
      }
    }
    this.eventsSinceStateSnapshot += events.length;
  }

  /** Stores the kept state under the sequence number of its last event. A failed write only delays the next one. */
  private async writeStateSnapshot(): Promise<void> {
    if (!this.state || !this.stateSnapDb) return;
    this.eventsSinceStateSnapshot = 0;
    try {
      await this.stateSnapDb.put(seqKey(this.state.seq), serializePoolState(this.state));
    } catch {
      // A state snapshot only makes replay faster; the events are the truth.
    }
  }

  /** Resolves when everything appended so far is written. */
  drain(): Promise<void> {
    if (!this.committing && this.queue.length === 0) return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  /** Stored events with seq ≥ sinceSeq, in order. */
  async *read(options: { sinceSeq?: number; limit?: number } = {}): AsyncGenerator<LoggedEvent> {
    if (!this.eventsDb) return;
    const it = this.eventsDb.values({ gte: seqKey(options.sinceSeq ?? 1), limit: options.limit ?? -1 });
    for await (const v of it) yield v as LoggedEvent;
  }

  /** Reads one record of a side table (devices, meta). */
  async getRecord<T>(sublevel: SideTable, key: string): Promise<T | undefined> {
    if (!this.subDbs) return undefined;
    return (await this.subDbs[sublevel].get(key)) as T | undefined;
  }

  async listRecords<T>(sublevel: SideTable): Promise<Array<[string, T]>> {
    if (!this.subDbs) return [];
    const out: Array<[string, T]> = [];
    for await (const [k, v] of this.subDbs[sublevel].iterator()) out.push([k, v as T]);
    return out;
  }

  /**
   * The write-ahead log of a COW device's exception records (keyed by the COW's label). Appends are durable
   * events ('exception.committed') carrying the records as side-table writes, so they share the group commit.
   */
  walFor(cowKey: string): ExceptionWal {
    const pinned = this.pinned.get(cowKey);
    if (pinned) return this.pinnedWal(cowKey, pinned);
    const prefix = `${cowKey}\x00`;
    const end = `${cowKey}\x01`;
    const key = (index: number) => walGroupKey(cowKey, index);
    const mem = (): Map<number, { index: number; oldChunk: Chunk; newChunk: Chunk }> => {
      let m = this.memoryWal.get(cowKey);
      if (!m) this.memoryWal.set(cowKey, (m = new Map()));
      return m;
    };
    return {
      append: async (records) => {
        const event: DmEvent = {
          type: 'exception.committed',
          cow: cowKey,
          count: records.length,
          firstIndex: records.length ? records[0].index : 0,
          chunks: records.map((r) => [r.oldChunk, r.newChunk]),
        };
        if (!this.subDbs) {
          for (const r of records) mem().set(r.index, { ...r });
          await this.append(event, { durable: true });
          return;
        }
        // One side-table record per group (keyed by its first index): a group is contiguous in index order.
        if (records.length === 0) return;
        await this.append(event, { durable: true, ops: [{ type: 'put', sublevel: 'wal', key: key(records[0].index), value: records }] });
      },
      read: async () => {
        if (!this.subDbs) return [...mem().values()].sort((a, b) => a.index - b.index);
        const out: WalRecord[] = [];
        for await (const v of this.subDbs.wal.values({ gte: prefix, lt: end })) out.push(...(v as WalRecord[]));
        return out.sort((a, b) => a.index - b.index);
      },
      trim: async (beforeIndex) => {
        if (!this.subDbs) {
          for (const i of [...mem().keys()]) if (i < beforeIndex) mem().delete(i);
          return;
        }
        await this.drain();
        // Groups wholly below beforeIndex go; a group straddling it keeps its tail under the tail's first index.
        const batch = this.subDbs.wal.batch();
        for await (const [k, v] of this.subDbs.wal.iterator({ gte: prefix, lt: key(beforeIndex) })) {
          const group = v as WalRecord[];
          batch.del(k);
          const tail = group.filter((r) => r.index >= beforeIndex);
          if (tail.length > 0) batch.put(key(tail[0].index), tail);
        }
        await batch.write({ sync: true });
      },
      clear: async () => {
        if (!this.subDbs) {
          this.memoryWal.delete(cowKey);
          return;
        }
        await this.drain();
        const batch = this.subDbs.wal.batch();
        for await (const k of this.subDbs.wal.keys({ gte: prefix, lt: end })) batch.del(k);
        await batch.write({ sync: true });
      },
      merged: async (count) => {
        // The records themselves left the WAL before the merge wrote the area (clear): only the event is needed.
        await this.append({ type: 'exception.merged', cow: cowKey, count }, { durable: true });
      },
    };
  }

  /** A replayed pool's pinned COW: its records as of the replayed point, read-only. */
  private pinnedWal(cowKey: string, pinned: PinnedCow): ExceptionWal {
    const refuse = (): Promise<never> =>
      Promise.reject(new DmError('DM_NOT_SUPPORTED', `COW ${cowKey}: its exceptions are pinned by a replayed pool (read-only)`));
    return {
      pinned,
      read: async () => {
        const out: WalRecord[] = [];
        if (!this.subDbs) return out;
        for await (const v of this.subDbs.wal.values({ gte: `${cowKey}\x00`, lt: `${cowKey}\x01` })) out.push(...(v as WalRecord[]));
        return out.sort((a, b) => a.index - b.index);
      },
      append: refuse,
      trim: refuse,
      clear: refuse,
      merged: refuse,
    };
  }

  /** Writes what is queued, then refuses further appends and completes events$. */
  async close(): Promise<void> {
    if (this.closed) return;
    await this.drain();
    this.closed = true;
    this.subject.complete();
  }
}

/** The highest sequence number the database has used (events, or a compaction that deleted them all). */
async function lastStoredSeq(db: LevelDb): Promise<number> {
  let last = 0;
  for await (const key of eventsSublevel(db).keys({ reverse: true, limit: 1 })) last = parseInt(key, 16);
  for await (const key of stateSnapSublevel(db).keys({ reverse: true, limit: 1 })) last = Math.max(last, parseInt(key, 16));
  const compacted = (await metaSublevel(db).get(META_COMPACTED_THROUGH)) as number | undefined;
  return Math.max(last, compacted ?? 0);
}

export interface PoolStateReadOptions {
  /** Fold the events up to and including this sequence number (default: all). */
  readonly toSeq?: number;
  /**
   * Start from the newest state snapshot at or before toSeq (default true). Without, the fold starts at the first
   * event, or at the compaction's snapshot in a compacted log (the events before it are gone).
   */
  readonly useSnapshots?: boolean;
}

export interface PoolStateReadResult {
  readonly state: PoolState;
  /** The state snapshot the fold started from (0: the first event). */
  readonly snapshotSeq: number;
  /** Events read and folded after it. */
  readonly eventsApplied: number;
}

/** Rebuilds the pool's state from a database's stored state snapshots and events (no engine needed). */
export async function readPoolState(db: LevelDb, options: PoolStateReadOptions = {}): Promise<PoolStateReadResult> {
  const toSeq = options.toSeq ?? Number.MAX_SAFE_INTEGER;
  if (!(Number.isSafeInteger(toSeq) && toSeq >= 0)) throw new DmError('DM_INVALID_ARGUMENT', `replay target must be a sequence number, got ${options.toSeq}`);
  const compacted = ((await metaSublevel(db).get(META_COMPACTED_THROUGH)) as number | undefined) ?? 0;
  if (toSeq < compacted) {
    throw new DmError('DM_INVALID_ARGUMENT', `the events up to #${compacted} were compacted behind a state snapshot: the oldest state that can be rebuilt is #${compacted}`);
  }
  const snaps = stateSnapSublevel(db);
  let state = emptyPoolState();
  let snapshotSeq = 0;
  if (options.useSnapshots ?? true) {
    for await (const [key, value] of snaps.iterator({ lte: seqKey(toSeq), reverse: true, limit: 1 })) {
      state = deserializePoolState(value);
      snapshotSeq = parseInt(key, 16);
    }
  }
  if (snapshotSeq < compacted) {
    const value = await snaps.get(seqKey(compacted));
    if (value === undefined) throw new DmError('DM_POOL_CORRUPT', `the log was compacted through #${compacted} but its state snapshot there is missing`);
    state = deserializePoolState(value);
    snapshotSeq = compacted;
  }
  let eventsApplied = 0;
  const it = eventsSublevel(db).values({ gt: seqKey(snapshotSeq), lte: seqKey(toSeq) });
  try {
    for (;;) {
      const batch = await it.nextv(READ_BATCH_EVENTS);
      if (batch.length === 0) break;
      for (const e of batch) applyEvent(state, e as LoggedEvent);
      eventsApplied += batch.length;
    }
  } finally {
    await it.close();
  }
  return { state, snapshotSeq, eventsApplied };
}

/** The sequence numbers of the stored state snapshots, oldest first. */
export async function listStateSnapshots(db: LevelDb): Promise<number[]> {
  const out: number[] = [];
  for await (const key of stateSnapSublevel(db).keys()) out.push(parseInt(key, 16));
  return out;
}

export interface CompactResult {
  /** The state snapshot the log now starts from. */
  readonly snapshotSeq: number;
  readonly eventsDeleted: number;
  readonly snapshotsDeleted: number;
}

/**
 * Deletes the events a state snapshot covers: finds the newest snapshot at or before `beforeSeq`, deletes every
 * event up to it and the older snapshots. Replay to an earlier point is impossible afterwards (and says so).
 * Refuses, deleting nothing, when there is no such snapshot. Do not run it on a database an engine has open.
 */
export async function compactLog(db: LevelDb, beforeSeq: number): Promise<CompactResult> {
  if (!(Number.isSafeInteger(beforeSeq) && beforeSeq >= 0)) throw new DmError('DM_INVALID_ARGUMENT', `compact: --before must be a sequence number, got ${beforeSeq}`);
  const snaps = stateSnapSublevel(db);
  let snapshotSeq = 0;
  for await (const key of snaps.keys({ lte: seqKey(beforeSeq), reverse: true, limit: 1 })) snapshotSeq = parseInt(key, 16);
  if (snapshotSeq === 0) {
    const all = await listStateSnapshots(db);
    throw new DmError(
      'DM_INVALID_ARGUMENT',
      `compact: no state snapshot at or before #${beforeSeq}, nothing compacted` + (all.length ? ` (snapshots at ${all.slice(0, 8).map((s) => `#${s}`).join(', ')}${all.length > 8 ? ', ...' : ''})` : ' (the log has none yet)'),
    );
  }
  // The mark first: once it is durable, replay never looks before the snapshot, whatever is deleted when.
  const mark = db.batch();
  mark.put(META_COMPACTED_THROUGH, snapshotSeq, { sublevel: metaSublevel(db) });
  await mark.write({ sync: true });
  const events = eventsSublevel(db);
  let eventsDeleted = 0;
  for (;;) {
    const keys: string[] = [];
    for await (const k of events.keys({ lte: seqKey(snapshotSeq), limit: 10_000 })) keys.push(k);
    if (keys.length === 0) break;
    await events.batch(keys.map((key) => ({ type: 'del' as const, key })));
    eventsDeleted += keys.length;
  }
  const older: string[] = [];
  for await (const k of snaps.keys({ lt: seqKey(snapshotSeq) })) older.push(k);
  if (older.length > 0) await snaps.batch(older.map((key) => ({ type: 'del' as const, key })));
  return { snapshotSeq, eventsDeleted, snapshotsDeleted: older.length };
}
