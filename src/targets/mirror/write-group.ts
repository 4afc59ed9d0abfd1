/**
 * The mirror's write path: each write (or discard, or flush) bio is a write group (machines/mirror-write-group.ts)
 * with one transaction per leg it writes (machines/mirror-write-transaction.ts). Both run as compiled transition
 * tables: a group is a plain object holding its state index and an array of transaction state indexes; no xstate
 * actor is created per bio (spec: engine-performance.md). The bio is held by the target from map() until the
 * group is final, and completes only when every transaction has reported in.
 *
 * Ordering kept here:
 * - no data is issued before the log flush carrying the region's mark (or out-of-sync record) has completed;
 * - a write to a region being resynced waits until the copy is done (DELAYED);
 * - a leg's failure is recorded (leg marked, region out of sync in the log, the durable mirror.leg.failed event)
 *   before the group's region count drops and before its bio completes;
 * - a flush bio completes after every leg taking writes is flushed and the log has written its clean records.
 *
 * Every step of a group or a transaction is reported to `ms.stepObserver` when one is set (a test's check, or live
 * inspection while someone watches this device's mirror actors); otherwise it costs one comparison.
 */
import { mirrorWriteGroupMachine, type MirrorWriteGroupEvent } from '../../../machines/mirror-write-group.js';
import { mirrorWriteTransactionMachine, type MirrorWriteTransactionEvent } from '../../../machines/mirror-write-transaction.js';
import type { Sector } from '../../block/units.js';
import type { Bio } from '../../core/bio.js';
import { compileMachine } from '../../core/compiled-machine.js';
import { DmError } from '../../core/errors.js';
import type { TargetContext } from '../../core/target-contract.js';
import type { MirrorLeg } from './leg.js';
import type { MirrorSet } from './mirror-set.js';

export type WriteGroupStateName = 'START' | 'DELAYED' | 'WRITING' | 'RECORDING' | 'COMPLETED' | 'FAILED';
export type WriteTransactionStateName = 'START' | 'JOURNAL_FLUSH' | 'DATA_WRITE' | 'DATA_FLUSH' | 'SUPER_WRITE' | 'SUPER_FLUSH' | 'DONE' | 'FAILED';

export const WRITE_GROUP_MACHINE = compileMachine<WriteGroupStateName, MirrorWriteGroupEvent['type']>(mirrorWriteGroupMachine);
export const WRITE_TRANSACTION_MACHINE = compileMachine<WriteTransactionStateName, MirrorWriteTransactionEvent['type']>(mirrorWriteTransactionMachine);

const G = Object.fromEntries(WRITE_GROUP_MACHINE.eventNames.map((n, i) => [n, i])) as Record<MirrorWriteGroupEvent['type'], number>;
const T = Object.fromEntries(WRITE_TRANSACTION_MACHINE.eventNames.map((n, i) => [n, i])) as Record<MirrorWriteTransactionEvent['type'], number>;

export class WriteGroup {
  state = WRITE_GROUP_MACHINE.initialIndex;
  legs: MirrorLeg[] = [];
  /** Transaction state per entry of `legs`. */
  tx: number[] = [];
  remaining = 0;
  /** Bit i: the transaction on legs[i] failed. */
  failedMask = 0;
  error: unknown = undefined;
  /** Set once the group counts in its region (from ISSUE until final). */
  counted = false;
  /** Flush bios: each leg's flush count when the group started (see LegFlusher.flushAfter). */
  flushStarts: number[] = [];
  logFlush: Promise<void> | undefined = undefined;

  constructor(
    /** Unique per mapped device (MirrorSets numbers them across its mirror targets and table reloads). */
    readonly id: number,
    readonly bio: Bio,
    readonly ctx: TargetContext,
    /** Target-relative first sector. */
    readonly offsetSectors: number,
    readonly region: number,
  ) {}
}

function stepGroup(ms: MirrorSet, g: WriteGroup, event: number): void {
  const from = g.state;
  g.state = WRITE_GROUP_MACHINE.step(from, event);
  if (ms.stepObserver !== undefined) ms.stepObserver('mirror-write-group', g, -1, from, event, g.state);
}

function stepTx(ms: MirrorSet, g: WriteGroup, i: number, event: number): void {
  const from = g.tx[i];
  g.tx[i] = WRITE_TRANSACTION_MACHINE.step(from, event);
  if (ms.stepObserver !== undefined) ms.stepObserver('mirror-write-transaction', g, i, from, event, g.tx[i]);
}

/** A write or discard bio: starts its group (the bio is held). */
export function startWriteGroup(ms: MirrorSet, bio: Bio, ctx: TargetContext): void {
  const offset = bio.sector - ctx.beginSector;
  const g = new WriteGroup(ms.groupIds.next++, bio, ctx, offset, ms.regionOf(offset));
  if (ms.rh.isRecovering(g.region)) {
    stepGroup(ms, g, G.DELAY);
    ms.rh.delay(g.region, () => issueWrite(ms, g));
    return;
  }
  issueWrite(ms, g);
}

function issueWrite(ms: MirrorSet, g: WriteGroup): void {
  if (ms.rh.isRecovering(g.region)) {
    // Released by one recovery, caught by the next one of the same region: wait again.
    ms.rh.delay(g.region, () => issueWrite(ms, g));
    return;
  }
  const legs = ms.writeLegs();
  if (legs.length === 0) {
    stepGroup(ms, g, G.KILL);
    g.ctx.endBio(g.bio, new DmError('DM_IO', `${ms.deviceName}: no mirror leg takes writes`));
    return;
  }
  stepGroup(ms, g, G.ISSUE);
  g.legs = legs;
  g.tx = legs.map(() => WRITE_TRANSACTION_MACHINE.initialIndex);
  g.remaining = legs.length;
  const wait = ms.rh.startWrite(g.region, legs.length < ms.legs.length);
  g.counted = true;
  for (let i = 0; i < legs.length; i++) stepTx(ms, g, i, T.MARKED);
  if (wait === undefined) journaled(ms, g);
  else wait.then(() => journaled(ms, g), (err: unknown) => journalFailed(ms, g, err));
}

function journalFailed(ms: MirrorSet, g: WriteGroup, err: unknown): void {
  ms.logFailure = true;
  // Without handle_errors the kernel writes anyway; with it, the write cannot be recorded and fails.
  if (!ms.handleErrors) {
    journaled(ms, g);
    return;
  }
  for (let i = 0; i < g.legs.length; i++) stepTx(ms, g, i, T.JOURNAL_FAILED);
  stepGroup(ms, g, G.JOURNAL_FAILED);
  ms.rh.endWrite(g.region);
  g.ctx.endBio(g.bio, new DmError('DM_IO', `${ms.deviceName}: the mirror log could not record the write`, { cause: err }));
}

function journaled(ms: MirrorSet, g: WriteGroup): void {
  const bio = g.bio;
  const discard = bio.op === 'discard';
  for (let i = 0; i < g.legs.length; i++) {
    stepTx(ms, g, i, T.JOURNAL_FLUSHED);
    const leg = g.legs[i];
    const sector = (leg.offsetSectors + g.offsetSectors) as Sector;
    const p = discard
      ? leg.device.discard(sector, bio.lengthSectors)
      : bio.fua
        ? leg.device.write(sector, bio.buf, { fua: true })
        : leg.device.write(sector, bio.buf);
    p.then(
      () => dataWritten(ms, g, i),
      (err: unknown) => txFailed(ms, g, i, err),
    );
  }
}

function dataWritten(ms: MirrorSet, g: WriteGroup, i: number): void {
  stepTx(ms, g, i, T.DATA_WRITTEN);
  // A write has nothing to flush, nor a clean record to wait for (see the transaction machine's header).
  stepTx(ms, g, i, T.DATA_FLUSHED);
  stepTx(ms, g, i, T.SUPER_WRITTEN);
  stepTx(ms, g, i, T.SUPER_FLUSHED);
  txReported(ms, g);
}

function txFailed(ms: MirrorSet, g: WriteGroup, i: number, err: unknown): void {
  stepTx(ms, g, i, T.DATA_FAILED);
  g.failedMask |= 1 << i;
  if (g.error === undefined) g.error = err;
  txReported(ms, g);
}

function txReported(ms: MirrorSet, g: WriteGroup): void {
  if (--g.remaining > 0) return;
  if (g.failedMask === 0) {
    stepGroup(ms, g, G.ALL_DONE);
    if (g.counted) ms.rh.endWrite(g.region);
    g.ctx.endBio(g.bio);
    return;
  }
  stepGroup(ms, g, G.LEGS_FAILED);
  void recordFailures(ms, g).then((bioError) => {
    stepGroup(ms, g, bioError === undefined ? G.RECORDED : G.RECORDED_NONE_LEFT);
    if (g.counted) ms.rh.endWrite(g.region);
    g.ctx.endBio(g.bio, bioError);
  });
}

/** RECORDING: what the bio's failed legs mean, made durable; resolves with the bio's error (undefined: success). */
async function recordFailures(ms: MirrorSet, g: WriteGroup): Promise<unknown> {
  const failed = g.legs.filter((_, i) => (g.failedMask & (1 << i)) !== 0);
  const succeeded = g.legs.length - failed.length;
  const op = g.bio.op;
  if (op === 'discard') {
    // A leg that cannot discard is not a failing leg (the kernel returns EOPNOTSUPP and keeps the mirror whole);
    // the legs differ now only if some did discard.
    if (succeeded > 0) {
      ms.rh.markNosync(g.region);
      ms.inSync = false;
      if (!ms.suspended) ms.resync.start();
    }
    await ms.logType.flush(ms.log).catch(() => (ms.logFailure = true));
    return g.error;
  }
  if (op === 'flush') ms.rh.flushFailure = true;
  else ms.rh.markNosync(g.region);
  const events = failed.map((leg) => ms.failLeg(leg, 'write'));
  await ms.logType.flush(ms.log).catch(() => (ms.logFailure = true));
  await Promise.all(events);
  // The resync copies the region back when the failed leg returns (or at once without handle_errors).
  ms.inSync = false;
  if (!ms.suspended) ms.resync.start();
  return succeeded > 0 ? undefined : new DmError('DM_IO', `${ms.deviceName}: ${op} failed on every mirror leg`, { cause: g.error });
}

/**
 * A flush bio: every leg taking writes is flushed (DATA_FLUSH), then the log writes its clean records
 * (SUPER_WRITE). The log's flush flushes the legs itself first when it has clears to write; the transactions join
 * those flushes instead of starting their own.
 */
export function startFlushGroup(ms: MirrorSet, bio: Bio, ctx: TargetContext): void {
  const g = new WriteGroup(ms.groupIds.next++, bio, ctx, 0, -1);
  const legs = ms.writeLegs();
  if (legs.length === 0) {
    stepGroup(ms, g, G.KILL);
    ctx.endBio(bio, new DmError('DM_IO', `${ms.deviceName}: no mirror leg takes writes`));
    return;
  }
  stepGroup(ms, g, G.ISSUE);
  g.legs = legs;
  g.tx = legs.map(() => WRITE_TRANSACTION_MACHINE.initialIndex);
  g.remaining = legs.length;
  g.flushStarts = legs.map((l) => ms.flushers[l.index].startedCount);
  g.logFlush = ms.logType.flush(ms.log).catch(() => {
    ms.logFailure = true;
  });
  for (let i = 0; i < legs.length; i++) {
    stepTx(ms, g, i, T.MARKED);
    stepTx(ms, g, i, T.JOURNAL_FLUSHED);
    stepTx(ms, g, i, T.DATA_WRITTEN);
    ms.flushers[legs[i].index].flushAfter(g.flushStarts[i]).then(
      () => legFlushed(ms, g, i),
      (err: unknown) => txFailed(ms, g, i, err),
    );
  }
}

function legFlushed(ms: MirrorSet, g: WriteGroup, i: number): void {
  stepTx(ms, g, i, T.DATA_FLUSHED);
  void g.logFlush!.then(() => {
    stepTx(ms, g, i, T.SUPER_WRITTEN);
    stepTx(ms, g, i, T.SUPER_FLUSHED);
    txReported(ms, g);
  });
}
