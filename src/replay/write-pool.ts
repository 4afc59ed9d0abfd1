/**
 * `dmstate replay --into DIR2`: writes a replayed state as a new pool that `dmstate serve --pool DIR2` serves.
 *
 * The new pool is event-sourced like any other: its log holds, for each persistent COW a table names, an
 * 'exceptions.loaded' event with the COW's exceptions as of the replayed point (and the WAL records, in the same
 * batch), then for each device in creation order the events that make it (created, resumed with its live table,
 * its inactive table, suspended), each batch with the device's record. The pool is built in a temporary folder
 * next to DIR2 and renamed at the end, so a failure leaves nothing behind.
 *
 * Read-only (default): every device is read-only, each COW's exceptions are PINNED and so are the mirrors' files
 * (the 'meta' table says so). The snapshot target takes the exceptions from the pool instead of the COW's own
 * metadata, which has usually moved on, and writes nothing (no checkpoint, no merge); a mirror naming a pinned
 * leg or region log (disk log, md bitmap file) reads its log and writes nothing (no log write, no resync, no leg
 * write: src/replay/pinned-files.ts, src/targets/mirror/mirror.ts). What the devices read is the metadata of that
 * point over the data files of today.
 *
 * Digests. The new pool's own digest (what `dmstate replay --pool DIR2` and the served engine's stateDigest()
 * give) is the replayed state's with every device read-only: the read-only flag is part of a device's state (dmsetup
 * info shows it), so a device that was writable at the replayed point makes the two differ, and that is the only
 * difference. So that it is not taken on trust, the new pool records which devices were read-only then ('meta'
 * replayedFrom.readOnlyDevices); its log, folded and given those flags back, must give exactly the replayed digest
 * (`replayedDigest`), and its log folded as it is must give the read-only state's digest. Both are checked before
 * the pool is put in place. With --writable nothing is changed: the two digests are the same.
 *
 * --writable: devices keep their read-only flags and the COWs load as usual (the COW's metadata, then the WAL
 * records past it). That is only the replayed state when each COW on disk still holds a prefix of the replayed
 * exceptions, so every COW is checked first (it must be a file) and a COW that moved on is refused, naming it.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { FileBlockDevice } from '../block/file-device.js';
import { sectors } from '../block/units.js';
import { createSystemClock } from '../core/clock.js';
import { DmError } from '../core/errors.js';
import type { DeviceRecord } from '../core/engine.js';
import { openPoolDb, poolPaths } from '../frontends/pool.js';
import { EventLog, META_PINNED_PREFIX, META_REPLAYED_FROM, walGroupKey, type BatchOp, type PinnedCow } from '../log/event-log.js';
import type { DmEvent } from '../log/events.js';
import { persistentStore } from '../stores/persistent-store.js';
import { stateDigest } from './digest.js';
import { META_PINNED_MIRROR_PREFIX, pinnableFilesOfTable, type PinnedFile } from './pinned-files.js';
import { clonePoolState, encodeRuns, persistentCowsOfTable, withReadOnlyFlags, type CowState, type PoolState } from './pool-state.js';

export interface WriteReplayedPoolOptions {
  /** Where the state comes from, for the new pool's record ('meta' replayedFrom). */
  readonly sourcePool: string;
  /** Keep the devices' read-only flags and load the COWs as usual (after checking them). Default: read-only, pinned. */
  readonly writable?: boolean;
  /** With writable: the state at the end of the source's log (a COW must not have changed after the replayed point). */
  readonly latest?: PoolState;
}

/** The 'meta' record META_REPLAYED_FROM of a pool written by `replay --into`. */
export interface ReplayedFromRecord {
  /** The replayed pool (absolute). */
  readonly pool: string;
  readonly seq: number;
  /** The replayed state's digest. */
  readonly digest: string;
  readonly readOnly: boolean;
  /** Devices read-only at the replayed point (a read-only pool makes every device read-only). Absent in older pools. */
  readonly readOnlyDevices?: string[];
}

export interface WriteReplayedPoolResult {
  readonly dir: string;
  readonly devices: number;
  readonly cows: number;
  /** Mirror files (legs, region logs) pinned read-only (read-only pools). */
  readonly mirrorFiles: number;
  /**
   * The digest of the new pool's own state, as `dmstate replay --pool DIR2` and the served engine compute it:
   * read-only pools: the replayed state with every device read-only; --writable: the replayed digest.
   */
  readonly digest: string;
  /** The new pool's state folded from its log with the read-only flags of the replayed point: the replayed digest. */
  readonly replayedDigest: string;
  /** Devices writable at the replayed point that the (read-only) new pool makes read-only, sorted: why digest differs. */
  readonly madeReadOnly: string[];
  /** COWs a table names that the log never saw loaded: written without exceptions; they load as they are today. */
  readonly unknownCows: string[];
}

/** WAL records per side-table group (one LevelDB value). */
const WAL_GROUP_RECORDS = 4096;

/** The state the new pool will have: the replayed one, with every device read-only unless writable. */
export function replayedPoolState(state: PoolState, writable: boolean): PoolState {
  const out = clonePoolState(state);
  if (!writable) for (const d of out.devices.values()) d.readOnly = true;
  return out;
}

/** The files the mirror tables of the state name (legs and region logs), with the first device naming each. */
function namedPinnableFiles(state: PoolState): Map<string, PinnedFile> {
  const files = new Map<string, PinnedFile>();
  const devices = [...state.devices].sort((a, b) => a[1].order - b[1].order);
  for (const [name, d] of devices) {
    for (const f of [...pinnableFilesOfTable(d.live), ...pinnableFilesOfTable(d.inactive)]) if (!files.has(f.label)) files.set(f.label, { device: name, role: f.role });
  }
  return files;
}

/** The persistent COWs the devices' tables name, with the first device naming each. */
function namedCows(state: PoolState): Map<string, string> {
  const cows = new Map<string, string>();
  const devices = [...state.devices].sort((a, b) => a[1].order - b[1].order);
  for (const [name, d] of devices) for (const k of [...persistentCowsOfTable(d.live), ...persistentCowsOfTable(d.inactive)]) if (!cows.has(k)) cows.set(k, name);
  return cows;
}

/**
 * --writable: the COW must be as it was at the replayed point — the log says nothing happened to it since (no
 * commit, merge, invalidation or load changed it), and on disk it holds a prefix of the replayed exceptions (the
 * WAL written with the new pool supplies the rest, as after a crash before a checkpoint).
 */
async function checkCowForWritable(label: string, c: CowState, latest: CowState | undefined, seq: number): Promise<void> {
  const refuse = (why: string): DmError =>
    new DmError('DM_INVALID_ARGUMENT', `--writable: COW ${label} ${why}; replay it read-only (without --writable) to see the state of #${seq}`);
  if (!latest || latest.valid !== c.valid || latest.chunkSizeSectors !== c.chunkSizeSectors || latest.pairs.length !== c.pairs.length || latest.pairs.some((v, i) => v !== c.pairs[i])) {
    throw refuse(`has changed since (${c.pairs.length / 2} exceptions then, ${latest ? latest.pairs.length / 2 : 'unknown'} at the end of the log)`);
  }
  if (!path.isAbsolute(label)) throw refuse('is not a file (a mapped device or a device of an embedding program), so it cannot be checked');
  let dev: FileBlockDevice;
  try {
    dev = await FileBlockDevice.open(label, { readOnly: true });
  } catch (err) {
    throw refuse(`cannot be opened (${(err as Error).message})`);
  }
  try {
    let store;
    try {
      store = await persistentStore.create({ cow: dev, chunkSizeSectors: sectors(0), overflow: false, readOnly: true });
    } catch (err) {
      throw refuse(`cannot be loaded (${(err as Error).message})`);
    }
    const pairs: number[] = [];
    const meta = await persistentStore.readMetadata(store, (o, n) => pairs.push(o, n));
    await persistentStore.close(store);
    if (meta.chunkSizeSectors !== c.chunkSizeSectors) throw refuse(`has chunk size ${meta.chunkSizeSectors} now but ${c.chunkSizeSectors} then`);
    if (meta.valid !== c.valid) throw refuse(`is ${meta.valid ? 'valid' : 'invalid'} now but was ${c.valid ? 'valid' : 'invalid'} then`);
    const prefix = pairs.length <= c.pairs.length && pairs.every((v, i) => v === c.pairs[i]);
    if (!prefix) throw refuse(`was changed by something else (${pairs.length / 2} exceptions on disk, ${c.pairs.length / 2} in the log, not a continuation)`);
  } finally {
    await dev.close();
  }
}

function walOps(cowKey: string, pairs: readonly number[]): BatchOp[] {
  const ops: BatchOp[] = [];
  for (let first = 0; first < pairs.length / 2; first += WAL_GROUP_RECORDS) {
    const group = [];
    for (let i = first; i < Math.min(first + WAL_GROUP_RECORDS, pairs.length / 2); i++) group.push({ index: i, oldChunk: pairs[2 * i], newChunk: pairs[2 * i + 1] });
    ops.push({ type: 'put', sublevel: 'wal', key: walGroupKey(cowKey, first), value: group });
  }
  return ops;
}

/** Writes `state` (replayed from `options.sourcePool` up to state.seq) as a new pool in `dir`, which must not exist or be empty. */
export async function writeReplayedPool(dir: string, state: PoolState, options: WriteReplayedPoolOptions): Promise<WriteReplayedPoolResult> {
  const target = poolPaths(dir);
  if (path.resolve(options.sourcePool) === target.dir) throw new DmError('DM_INVALID_ARGUMENT', '--into: the new pool must be another folder than the replayed one');
  if (fs.existsSync(target.dir) && (!fs.statSync(target.dir).isDirectory() || fs.readdirSync(target.dir).length > 0)) {
    throw new DmError('DM_INVALID_ARGUMENT', `--into ${target.dir}: exists and is not an empty folder (replay writes a new pool)`);
  }
  const writable = options.writable === true;
  const cows = namedCows(state);
  const unknownCows = [...cows.keys()].filter((k) => !state.cows.has(k));
  if (writable) {
    if (!options.latest) throw new DmError('DM_INVALID_ARGUMENT', '--writable needs the state at the end of the log to check the COWs against');
    for (const k of cows.keys()) if (state.cows.has(k)) await checkCowForWritable(k, state.cows.get(k)!, options.latest.cows.get(k), state.seq);
  }

  const expected = replayedPoolState(state, writable);
  const readOnlyThen = [...state.devices].filter(([, d]) => d.readOnly).map(([name]) => name).sort();
  const madeReadOnly = writable ? [] : [...state.devices].filter(([, d]) => !d.readOnly).map(([name]) => name).sort();
  const mirrorFiles = writable ? new Map<string, PinnedFile>() : namedPinnableFiles(state);
  const tmp = `${target.dir}.replay-${process.pid}`;
  if (fs.existsSync(tmp)) throw new DmError('DM_INVALID_ARGUMENT', `--into: ${tmp} exists (left by an earlier replay?): remove it first`);
  fs.mkdirSync(path.dirname(target.dir), { recursive: true });
  const db = await openPoolDb(poolPaths(tmp), { create: true });
  let digest: string;
  let replayedDigest: string;
  try {
    const log = await EventLog.open(db, createSystemClock(), { stateSnapshotEvents: 100_000 });
    const appended: Array<Promise<unknown>> = [];
    const put = (event: DmEvent, ops: BatchOp[] = []): void => {
      appended.push(log.append(event, { durable: true, ops }));
    };
    const replayedFrom: ReplayedFromRecord = {
      pool: path.resolve(options.sourcePool),
      seq: state.seq,
      digest: stateDigest(state),
      readOnly: !writable,
      readOnlyDevices: readOnlyThen,
    };
    put({ type: 'mark', device: '', name: `replayed-from:${path.resolve(options.sourcePool)}@${state.seq}` }, [
      { type: 'put', sublevel: 'meta', key: META_REPLAYED_FROM, value: replayedFrom },
      // Read-only: the mirrors' legs and region logs are pinned (no log write, no resync, no leg write).
      ...[...mirrorFiles].map(([label, file]): BatchOp => ({ type: 'put', sublevel: 'meta', key: META_PINNED_MIRROR_PREFIX + label, value: file })),
    ]);
    for (const [cowKey, device] of cows) {
      const c = expected.cows.get(cowKey);
      if (!c) continue;
      const ops = walOps(cowKey, c.pairs);
      if (!writable) {
        const pinned: PinnedCow = { valid: c.valid, overflowed: c.overflowed, chunkSizeSectors: c.chunkSizeSectors };
        ops.push({ type: 'put', sublevel: 'meta', key: META_PINNED_PREFIX + cowKey, value: pinned });
      }
      put(
        {
          type: 'exceptions.loaded',
          cow: cowKey,
          device,
          chunkSizeSectors: c.chunkSizeSectors,
          valid: c.valid,
          overflowed: c.overflowed || undefined,
          count: c.pairs.length / 2,
          runs: encodeRuns(c.pairs),
        },
        ops,
      );
    }
    const devices = [...expected.devices].sort((a, b) => a[1].order - b[1].order);
    for (const [name, d] of devices) {
      const record: DeviceRecord = {
        name,
        minor: d.minor,
        uuid: d.uuid,
        readOnly: d.readOnly,
        order: d.order,
        live: d.live,
        inactive: d.inactive,
        suspended: d.suspended,
        hadTable: d.live !== null || d.inactive !== null,
      };
      const ops: BatchOp[] = [{ type: 'put', sublevel: 'devices', key: name, value: record }];
      put({ type: 'device.created', device: name, minor: d.minor, uuid: d.uuid, readOnly: d.readOnly }, ops);
      if (d.live) put({ type: 'device.resumed', device: name, table: d.live, swapped: true }, ops);
      if (d.inactive) put({ type: 'table.loaded', device: name, table: d.inactive }, ops);
      if (d.suspended) put({ type: 'device.suspended', device: name }, ops);
    }
    await Promise.all(appended);
    await log.close();
    // The new pool's own log must fold to the state it was written from.
    const written = log.poolState;
    if (!written) throw new DmError('DM_POOL_CORRUPT', `--into: the new pool's log does not fold: ${log.stateError?.message}`);
    digest = stateDigest(written);
    if (digest !== stateDigest(expected)) throw new DmError('DM_POOL_CORRUPT', '--into: the new pool does not replay to the state written (a bug): not put in place');
    // ... and, with the read-only flags of then, to the replayed state itself.
    replayedDigest = stateDigest(withReadOnlyFlags(written, new Set(readOnlyThen)));
    if (replayedDigest !== replayedFrom.digest) throw new DmError('DM_POOL_CORRUPT', '--into: the new pool does not replay to the replayed state (a bug): not put in place');
  } catch (err) {
    await db.close();
    fs.rmSync(tmp, { recursive: true, force: true });
    throw err;
  }
  await db.close();
  if (fs.existsSync(target.dir)) fs.rmdirSync(target.dir);
  fs.renameSync(tmp, target.dir);
  return {
    dir: target.dir,
    devices: expected.devices.size,
    cows: cows.size - unknownCows.length,
    mirrorFiles: mirrorFiles.size,
    digest,
    replayedDigest,
    madeReadOnly,
    unknownCows,
  };
}
