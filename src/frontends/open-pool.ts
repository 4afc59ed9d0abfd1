/**
 * Embedding: the engine of a pool folder inside your own program, without a daemon (the pool is locked while it
 * is open, so no daemon may serve it at the same time). Besides the engine itself: devices, typed event streams,
 * live inspection and the machine definitions.
 */
import { filter, type Observable } from 'rxjs';
import { MACHINES } from '../../machines/index.js';
import { Engine, type DeviceInfo, type EngineOptions } from '../core/engine.js';
import { DmError } from '../core/errors.js';
import type { MappedDevice } from '../core/mapped-device.js';
import type { InspectFilter, InspectionRecord } from '../inspect/live-inspector.js';
import type { LevelDb } from '../log/event-log.js';
import type { DmEvent, DmEventType, LoggedEvent } from '../log/events.js';
import { openPoolDb, poolPaths } from './pool.js';
import { replay, type ReplayResult } from '../replay/replay.js';

/** The logged event of one type, narrowed (e.g. LoggedEventOf<'exception.committed'> has cow, count, chunks). */
export type LoggedEventOf<T extends DmEventType> = Extract<DmEvent, { type: T }> & { readonly seq: number; readonly timeMs: number };

export interface OpenPool {
  /** The pool folder, absolute. */
  readonly dir: string;
  readonly engine: Engine;
  readonly db: LevelDb;
  /** Every mapped device (dmsetup info), sorted by name. */
  devices(): DeviceInfo[];
  /** The mapped device of that name (a BlockDevice); DM_NO_SUCH_DEVICE when there is none. */
  device(name: string): MappedDevice;
  /** Every event as it happens (the engine's stream; the log keeps them too). */
  readonly events$: Observable<LoggedEvent>;
  /** The events of the given types, typed accordingly. */
  events$ByType<T extends DmEventType>(...types: T[]): Observable<LoggedEventOf<T>>;
  /**
   * Live inspection records of the engine's actors (bios, kcopyd jobs/pieces, merges), sampled per kind; the
   * engine inspects only while a subscription is open. Bad filters throw DM_INVALID_ARGUMENT at once.
   */
  inspect$(filter?: InspectFilter): Observable<InspectionRecord>;
  /** The XState machine definitions the engine runs (bio, kcopyd-job, kcopyd-piece, merge, ...). */
  machines(): typeof MACHINES;
  /**
   * The pool's metadata state (devices, tables, snapshot exceptions) as of event `to`: a sequence number, or the
   * newest mark of that name; the whole log when omitted. Rebuilt from the log alone (src/replay/replay.ts).
   */
  replay(to?: number | string): Promise<ReplayResult>;
  /** Closes the engine (devices stay recorded for the next open) and the database. Idempotent. */
  close(): Promise<void>;
}

export async function openPool(dir: string, options: Omit<EngineOptions, 'db'> = {}): Promise<OpenPool> {
  const paths = poolPaths(dir);
  const db = await openPoolDb(paths, { create: true });
  let engine: Engine;
  try {
    engine = await Engine.open({ ...options, db });
  } catch (err) {
    await db.close();
    throw err;
  }
  let closing: Promise<void> | undefined;
  return {
    dir: paths.dir,
    engine,
    db,
    devices: () => engine.names().map((n) => engine.info(n)),
    device(name) {
      const d = engine.device(name);
      if (d === undefined) throw new DmError('DM_NO_SUCH_DEVICE', `${name}: Device does not exist`);
      return d;
    },
    events$: engine.events$,
    events$ByType<T extends DmEventType>(...types: T[]): Observable<LoggedEventOf<T>> {
      if (types.length === 0) throw new DmError('DM_INVALID_ARGUMENT', 'events$ByType: name at least one event type');
      const wanted = new Set<DmEventType>(types);
      return engine.events$.pipe(filter((e): e is LoggedEventOf<T> => wanted.has(e.type)));
    },
    inspect$: (f) => engine.inspector.records$(f),
    machines: () => MACHINES,
    async replay(to) {
      await engine.log.drain();
      return replay(db, typeof to === 'string' ? { toMark: to } : { toSeq: to });
    },
    close() {
      closing ??= (async () => {
        await engine.close();
        await db.close();
      })();
      return closing;
    },
  };
}
