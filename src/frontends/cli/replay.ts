/**
 * `dmstate replay` (the pool's state as of a point in its log, its digest, optionally as a new pool) and
 * `dmstate log compact` (drop the events a state snapshot covers).
 */
import * as path from 'node:path';
import { DmError, isDmError } from '../../core/errors.js';
import { parseUnsigned } from '../../core/parse-number.js';
import { compactLog, type CompactResult } from '../../log/event-log.js';
import { canonicalState, stateDigest } from '../../replay/digest.js';
import { applyEvent, emptyPoolState, type MarkState, type PoolState } from '../../replay/pool-state.js';
import { findMark, replay, type ReplayResult } from '../../replay/replay.js';
import { writeReplayedPool, type WriteReplayedPoolResult } from '../../replay/write-pool.js';
import { ControlClient } from '../control-client.js';
import { openPoolDb, poolPaths } from '../pool.js';

export const REPLAY_USAGE = `usage: dmstate replay [--pool DIR] [--to SEQ | --to-mark NAME] [--into DIR2 [--writable]]
                      [--no-snapshots] [--json] [--state]

Rebuilds the pool's state from its event log alone, as of event SEQ (inclusive), or of the newest mark NAME
(dmstate dmsetup message DEV 0 mark NAME), or of the end of the log, and prints the sequence number reached,
counts and the state's digest (sha256). The digest of a full replay equals the digest of the running pool's own
state: a difference means the log is missing something.

What a past state is: the METADATA as of that point — devices, their live and inactive tables, suspended or not,
read-only or not, and each persistent snapshot's exceptions (which origin chunk is kept in which COW chunk),
validity and overflow. The DATA files (origins, COW data chunks) are not in the log: they are today's. A replayed
snapshot therefore reads today's COW chunks for the exceptions it had then, and today's origin elsewhere.

  --to SEQ          replay up to event SEQ (dmstate log prints the sequence numbers)
  --to-mark NAME    replay up to the newest mark of that name
  --into DIR2       also write the state as a new pool in DIR2 (a folder that does not exist or is empty), ready
                    for dmstate serve --pool DIR2. Read-only by default: every device is read-only, each
                    snapshot's exceptions are pinned to those of the replayed point (the COW's own metadata is not
                    used; no merge runs), and so are the mirrors' legs and region logs (the log is read, never
                    written; no resync runs): nothing is written to any file. The new pool's own digest is then
                    the replayed state's with every device read-only; the output names the devices that makes
                    read-only and checks that the new pool's log, given the read-only flags of then back, gives
                    the replay's digest exactly.
  --writable        with --into: keep the devices' read-only flags and load the COWs as usual. Allowed only when
                    every COW (a file) still holds a prefix of the replayed exceptions (true for the latest state);
                    a COW that moved on is refused, naming it
  --no-snapshots    fold every event from the first instead of starting at the newest state snapshot
  --json            one JSON object
  --state           also print the state itself (canonical JSON: devices, tables, exceptions as runs)

With a daemon on the pool the events come through it; without one the pool's database is read directly (and
its state snapshots make a long log quick). A replay to the end of a served pool also asks the daemon for the
digest of its running engine (computed from the engine's own objects, not from the log) at the log position it
belongs to, replays to exactly that position, and prints whether the two are equal; they must be. Unequal three
times in a row (the pool may change while it is read), the command exits 1.

usage: dmstate log compact [--pool DIR] --before SEQ
  Deletes the events up to the newest state snapshot at or before SEQ, and the older snapshots (the pool stores
  one every 100000 events). Replay to an earlier point is impossible afterwards. Stop the daemon first.
`;

export interface ReplayArgs {
  pool: string;
  toSeq?: number;
  toMark?: string;
  into?: string;
  writable: boolean;
  useSnapshots: boolean;
  json: boolean;
  printState: boolean;
}

function parseReplayArgs(pool: string, argv: readonly string[]): ReplayArgs | 'help' {
  const a: ReplayArgs = { pool, writable: false, useSnapshots: true, json: false, printState: false };
  const value = (i: number, opt: string): string => {
    const v = argv[i + 1];
    if (v === undefined || v.startsWith('--')) throw new DmError('DM_INVALID_ARGUMENT', `replay: ${opt} needs a value`);
    return v;
  };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    switch (arg) {
      case '--help':
      case '-h':
        return 'help';
      case '--to':
        a.toSeq = parseUnsigned(value(i++, '--to'), 'replay: --to', 'DM_INVALID_ARGUMENT');
        break;
      case '--to-mark':
        a.toMark = value(i++, '--to-mark');
        break;
      case '--into':
        a.into = value(i++, '--into');
        break;
      case '--writable':
        a.writable = true;
        break;
      case '--no-snapshots':
        a.useSnapshots = false;
        break;
      case '--json':
        a.json = true;
        break;
      case '--state':
        a.printState = true;
        break;
      default:
        throw new DmError('DM_INVALID_ARGUMENT', `replay: unknown argument '${arg}' (dmstate replay --help)`);
    }
  }
  if (a.toSeq !== undefined && a.toMark !== undefined) throw new DmError('DM_INVALID_ARGUMENT', 'replay: give --to or --to-mark, not both');
  if (a.writable && a.into === undefined) throw new DmError('DM_INVALID_ARGUMENT', 'replay: --writable goes with --into');
  return a;
}

export interface Replayed {
  readonly state: PoolState;
  /** Read from the database: the pool was written by replay --into (see ReplayResult.replayedFrom). */
  readonly replayedFrom?: ReplayResult['replayedFrom'];
  readonly mark?: MarkState;
  readonly snapshotSeq: number;
  readonly eventsApplied: number;
  readonly via: 'database' | 'daemon';
  /** Through the daemon, to the end of the log: its engine's live digest at the position replayed to. */
  readonly live?: LiveCheck;
}

/** The running engine's digest at #seq, against the replay of the stored log to #seq. */
export interface LiveCheck {
  readonly seq: number;
  readonly digest: string;
  readonly equal: boolean;
  /** Replays it took (a pool that changed meanwhile is asked again, up to LIVE_CHECK_ATTEMPTS). */
  readonly attempts: number;
}

const LIVE_CHECK_ATTEMPTS = 3;

async function liveState(client: ControlClient): Promise<{ seq: number; digest: string }> {
  const r = await client.request({ op: 'state' });
  if (r.op === 'error') throw new DmError(r.code as never, r.message);
  if (r.op !== 'state') throw new DmError('DM_NO_DAEMON', `unexpected answer from the daemon: ${r.op}`);
  return { seq: r.seq, digest: r.digest };
}

/**
 * Replay to the end of a served pool, checked against the daemon's live state: the live digest at #S is read
 * first, then the stored log folded to #S. Events appended meanwhile may not be stored yet when the log is read:
 * an unequal pair is asked again, up to LIVE_CHECK_ATTEMPTS times.
 */
export async function replayToLiveState(client: ControlClient, args: ReplayArgs): Promise<Replayed> {
  for (let attempt = 1; ; attempt++) {
    const live = await liveState(client);
    const r = await replayThroughDaemon(client, { ...args, toSeq: live.seq, toMark: undefined });
    const equal = stateDigest(r.state) === live.digest;
    if (equal || attempt === LIVE_CHECK_ATTEMPTS) return { ...r, live: { ...live, equal, attempts: attempt } };
  }
}

/** Streams the daemon's stored log from #1, calling `onEvent` until it returns false. */
async function streamLog(client: ControlClient, onEvent: (e: Parameters<typeof applyEvent>[1]) => boolean): Promise<void> {
  let failure: unknown;
  let first = true;
  await client.stream({ op: 'log', follow: false }, (r) => {
    if (r.op === 'end') return true;
    if (r.op !== 'event' || failure !== undefined) return false;
    try {
      if (first && r.event.seq !== 1) {
        throw new DmError('DM_INVALID_ARGUMENT', `replay: the log starts at #${r.event.seq} (compacted): stop the daemon to replay from the pool's state snapshots`);
      }
      first = false;
      if (!onEvent(r.event)) failure = null; // done: ignore the rest of the stream
    } catch (err) {
      failure = err;
    }
    return false;
  });
  if (failure) throw failure;
}

/** Replay through a running daemon: its log stream from #1 (two passes for a mark: find it, then fold to it). */
async function replayThroughDaemon(client: ControlClient, args: ReplayArgs): Promise<Replayed> {
  let toSeq = args.toSeq ?? Number.MAX_SAFE_INTEGER;
  let mark: MarkState | undefined;
  if (args.toMark !== undefined) {
    const marks = emptyPoolState();
    await streamLog(client, (e) => {
      if (e.type === 'mark') marks.marks.push({ name: e.name, device: e.device, seq: e.seq });
      return true;
    });
    mark = findMark(marks, args.toMark);
    toSeq = mark.seq;
  }
  const state = emptyPoolState();
  let eventsApplied = 0;
  await streamLog(client, (e) => {
    if (e.seq > toSeq) return false;
    applyEvent(state, e);
    eventsApplied++;
    return true;
  });
  return { state, mark, snapshotSeq: 0, eventsApplied, via: 'daemon' };
}

/** The state at the end of the log (through the daemon when one runs). */
async function latestState(args: ReplayArgs): Promise<PoolState> {
  const client = await connectIfServed(args.pool);
  if (!client) return (await replay(args.pool)).state;
  try {
    return (await replayThroughDaemon(client, { ...args, toSeq: undefined, toMark: undefined })).state;
  } finally {
    client.close();
  }
}

async function connectIfServed(pool: string): Promise<ControlClient | undefined> {
  const paths = poolPaths(pool);
  try {
    return await ControlClient.connect(paths.controlSocket, paths.dir);
  } catch (err) {
    if (isDmError(err) && err.code === 'DM_NO_DAEMON') return undefined;
    throw err;
  }
}

function summary(state: PoolState): { devices: number; liveTables: number; suspended: number; cows: number; exceptions: number; marks: number } {
  const canonical = canonicalState(state);
  const devices = [...state.devices.values()];
  return {
    devices: devices.length,
    liveTables: devices.filter((d) => d.live !== null).length,
    suspended: devices.filter((d) => d.suspended).length,
    cows: canonical.cows.length,
    exceptions: canonical.cows.reduce((n, c) => n + (c.exceptions ?? 0), 0),
    marks: state.marks.length,
  };
}

export async function runReplay(pool: string, argv: readonly string[], out: NodeJS.WritableStream = process.stdout): Promise<number> {
  const args = parseReplayArgs(pool, argv);
  if (args === 'help') {
    out.write(REPLAY_USAGE);
    return 0;
  }
  const client = await connectIfServed(args.pool);
  let r: Replayed;
  if (client) {
    try {
      r = args.toSeq === undefined && args.toMark === undefined ? await replayToLiveState(client, args) : await replayThroughDaemon(client, args);
    } finally {
      client.close();
    }
  } else {
    const res = await replay(args.pool, { toSeq: args.toSeq, toMark: args.toMark, useSnapshots: args.useSnapshots });
    r = { state: res.state, mark: res.mark, snapshotSeq: res.snapshotSeq, eventsApplied: res.eventsApplied, via: 'database', replayedFrom: res.replayedFrom };
  }
  const digest = stateDigest(r.state);
  let into: WriteReplayedPoolResult | undefined;
  if (args.into !== undefined) {
    // --writable checks each COW against the end of the log: nothing may have happened to it since.
    const latest = args.writable && (args.toSeq !== undefined || args.toMark !== undefined) ? await latestState(args) : r.state;
    into = await writeReplayedPool(args.into, r.state, { sourcePool: args.pool, writable: args.writable, latest });
  }
  const s = summary(r.state);
  const poolDir = path.resolve(args.pool);
  if (args.json) {
    out.write(
      JSON.stringify({
        pool: poolDir,
        seq: r.state.seq,
        mark: r.mark,
        via: r.via,
        snapshotSeq: r.snapshotSeq,
        eventsApplied: r.eventsApplied,
        ...s,
        digest,
        live: r.live,
        replayedFrom: r.replayedFrom,
        into: into && {
          dir: into.dir,
          readOnly: !args.writable,
          digest: into.digest,
          replayedDigest: into.replayedDigest,
          madeReadOnly: into.madeReadOnly,
          mirrorFiles: into.mirrorFiles,
          unknownCows: into.unknownCows,
        },
        state: args.printState ? canonicalState(r.state) : undefined,
      }) + '\n',
    );
    return r.live?.equal === false ? 1 : 0;
  }
  const target = r.mark ? `mark "${r.mark.name}" (#${r.mark.seq})` : args.toSeq !== undefined ? `#${args.toSeq}` : 'the end of the log';
  const start = r.snapshotSeq > 0 ? `state snapshot #${r.snapshotSeq} + ${r.eventsApplied} events` : `${r.eventsApplied} events`;
  out.write(
    `replayed pool ${poolDir} to ${target}: at event #${r.state.seq} (${start}, read ${r.via === 'daemon' ? 'through the daemon' : 'from the database'})\n` +
      `devices: ${s.devices} (${s.liveTables} with a live table, ${s.suspended} suspended)\n` +
      `persistent snapshot COWs: ${s.cows} (${s.exceptions} exceptions)\n` +
      `marks: ${s.marks}\n` +
      `digest: ${digest}\n`,
  );
  if (r.live) out.write(formatLiveCheck(r.live, digest));
  const from = r.replayedFrom;
  if (from?.readOnly) {
    // A read-only replayed pool: its digest is the replayed point's with every device read-only; say so.
    const same = from.digestWithFlagsOfThen === from.digest;
    out.write(
      `this pool was written by dmstate replay --into from ${from.pool} at #${from.seq}, read-only: every device made read-only ` +
        `(read-only then: ${from.readOnlyDevices!.join(', ') || 'none'});\n` +
        `  with the read-only flags of then: digest ${from.digestWithFlagsOfThen} (${same ? 'the digest of the replayed point' : `not ${from.digest} of the replayed point: this pool changed since`})\n`,
    );
  }
  if (into) {
    const pins = args.writable ? 'writable' : `read-only, exceptions pinned${into.mirrorFiles > 0 ? `, ${into.mirrorFiles} mirror/log-writes files pinned` : ''}`;
    out.write(`wrote pool ${into.dir} (${pins}): ${into.devices} devices, ${into.cows} COWs; digest ${into.digest}\n`);
    if (into.digest === digest) out.write(`  = the replay's digest\n`);
    else {
      // The only legitimate difference (write-pool.ts checks it): the read-only flags a read-only pool sets.
      out.write(
        `  = the replayed state with every device read-only (made read-only: ${into.madeReadOnly.join(', ')}), the only difference from the replay's digest;\n` +
          `  the new pool's log with the read-only flags of #${r.state.seq} gives ${into.replayedDigest === digest ? "the replay's digest" : 'ANOTHER digest'}: ${into.replayedDigest}\n`,
      );
    }
    out.write(`serve it with: dmstate serve --pool ${into.dir}\n`);
    for (const c of into.unknownCows) out.write(`note: the log never saw COW ${c} loaded: it loads as it is today\n`);
  }
  if (args.printState) out.write(JSON.stringify(canonicalState(r.state), null, 2) + '\n');
  return r.live?.equal === false ? 1 : 0;
}

/** The live-digest line of a replay through the daemon. */
export function formatLiveCheck(live: LiveCheck, replayDigest: string): string {
  if (live.equal) return `live digest (the running engine's own state at #${live.seq}): equal\n`;
  return (
    `live digest (the running engine's own state at #${live.seq}): ${live.digest} DIFFERS from the replay's ${replayDigest} ` +
    `(${live.attempts} attempts): the log does not rebuild the running state; this is a bug, please report it with \`dmstate log --pool DIR\`\n`
  );
}

export async function runLogCompact(pool: string, argv: readonly string[], out: NodeJS.WritableStream = process.stdout): Promise<number> {
  let before: number | undefined;
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === '--before') before = parseUnsigned(argv[++i] ?? '', 'log compact: --before', 'DM_INVALID_ARGUMENT');
    else if (argv[i] === '--help' || argv[i] === '-h') {
      out.write(REPLAY_USAGE);
      return 0;
    } else throw new DmError('DM_INVALID_ARGUMENT', `log compact: unknown argument '${argv[i]}'`);
  }
  if (before === undefined) throw new DmError('DM_INVALID_ARGUMENT', 'usage: dmstate log compact [--pool DIR] --before SEQ');
  const paths = poolPaths(pool);
  let db;
  try {
    db = await openPoolDb(paths, { create: false });
  } catch (err) {
    if (isDmError(err) && err.code === 'DM_POOL_LOCKED') throw new DmError('DM_POOL_LOCKED', `${err.message}: stop the daemon to compact its log`);
    throw err;
  }
  let r: CompactResult;
  try {
    r = await compactLog(db, before);
  } finally {
    await db.close();
  }
  out.write(`compacted the log of ${paths.dir}: it starts from state snapshot #${r.snapshotSeq} (${r.eventsDeleted} events and ${r.snapshotsDeleted} older snapshots deleted)\n`);
  return 0;
}
