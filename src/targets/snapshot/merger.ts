/**
 * Drives the merge machine (machines/merge.ts) for one snapshot state: the effects of each state — finding the
 * runs, making the other snapshots copy out, the write interlock, the kcopyd copies COW → origin, the origin flush
 * and the lock-step commit — run here and report back as machine events. The machine runs in its compiled form;
 * every transition is an event on the log ('merge.state'), with chunks left, so progress is never opaque.
 *
 * Batches. Linux merges one linear run per step: copy, flush the origin, commit_merge (an area write with
 * PREFLUSH|FUA) — a few flushes per run, which hold a merge of 64 KiB runs to a few tens of MiB/s (bench/merge.ts:
 * 26 MiB/s on files). Here one pass PREPARE → COMMITTING merges a BATCH: the runs prepare_merge would find one after
 * the other (the store's prepareMergeRuns: newest first, across metadata areas), copied with up to
 * MERGE_COPY_JOBS_IN_FLIGHT kcopyd jobs, then ONE origin flush and ONE commitMerge that clears all their records in
 * the same newest-first order, record by record in lock-step with the in-core table (seed 000), writes each
 * metadata area it changed and flushes the COW once. The first batch after a start is one run, as the kernel's
 * step; each commit lets the next one take MERGE_BATCH_RUNS_GROWTH times more runs, up to the limits.
 *
 * Safety (the kernel's argument, per batch). The write interlock covers every chunk of the batch from before its
 * copy until its commit is DURABLE — also once the lock-step has cleared their in-core exceptions (the merge target
 * asks inMergingRange before the table). The origin is flushed after the copies and before any record is cleared.
 * So whatever a crash leaves on disk (persistent-store.ts: the records found are always a newest-first-cleared
 * prefix of the list), a record still found names a chunk nothing has written since its copy: merging it again
 * copies the same data over the same origin chunk. A write to a chunk of a batch waits for the whole batch (at most
 * MERGE_BATCH_BYTES_MAX of copying and two flushes).
 *
 * Overlap, so the flushes cost little: the batch is COMMITTED once its records are cleared and its area writes
 * queued, and the next batch is prepared and copied while they become durable (its own commit's writes follow
 * them); the batch's interlock, its queued writes and its 'merge.run.committed' events wait for durability (a
 * failure then fails the merge, and the machine at its next PREPARE or COMMITTING). During FLUSHING the next
 * batch's runs are read ahead. While a batch copies, the origin is flushed every MERGE_WRITEBACK_HINT_SECTORS
 * without waiting, so the write-back runs beside the copy. Each PREPARE waits one event-loop turn: over devices that
 * complete at once (memory, the page cache) the merge never holds the loop for more than a batch.
 *
 * Per-run events stay, in order: 'merge.run.started' for each run when its batch is found, 'merge.run.committed'
 * (chunks left after that run) for each once the batch's commit is durable. They are trace-level events (on
 * events$, persisted only with trace persistence): the metadata areas on the COW are the merge's record, and
 * 'merge.state' (per batch, with chunks left) and 'exception.merged' are logged.
 */
import { mergeMachine, type MergeEvent } from '../../../machines/merge.js';
import type { Chunk, Sector } from '../../block/units.js';
import { assert } from '../../core/assert.js';
import { compileMachine } from '../../core/compiled-machine.js';
import { DmError } from '../../core/errors.js';
import type { KcopydClient } from '../../kcopyd/kcopyd.js';
import type { MergeBatchLimits, MergeRun } from '../../stores/contract.js';
import type { OriginRegistry } from './origin-registry.js';
import { originWrite } from './origin-write.js';
import type { HeldBio, SnapshotState } from './snapshot-state.js';

export type MergeStateName =
  | 'IDLE'
  | 'PREPARE'
  | 'COPY_OUT_OTHERS'
  | 'INTERLOCK'
  | 'COPYING'
  | 'FLUSHING'
  | 'COMMITTING'
  | 'STOPPED'
  | 'DONE'
  | 'FAILED';

export const MERGE_MACHINE = compileMachine<MergeStateName, MergeEvent['type']>(mergeMachine);

/**
 * Bytes of chunks one batch copies at most (its first run excepted: a run is never split). Measured with
 * bench/merge.ts (512 MiB in runs of 64 KiB): 16, 64 and 256 MiB merge at about the same rate, the flushes being
 * amortized already; 64 MiB bounds how long a write to a chunk of the batch can wait.
 */
export const MERGE_BATCH_BYTES_MAX = 64 * 1024 * 1024;
/** Runs in one batch at most. The first batch after a start is one run; each commit lets the next take 8 times more. */
export const MERGE_BATCH_RUNS_MAX = 4096;
export const MERGE_BATCH_RUNS_GROWTH = 8;
/** kcopyd jobs (one per run) of a batch in flight at once. */
export const MERGE_COPY_JOBS_IN_FLIGHT = 16;
/**
 * While a batch copies, the origin is flushed (without waiting) after every this many sectors copied (4 MiB): the
 * page cache starts writing the batch back while the rest is copied, so the flush that ends the batch (FLUSHING)
 * waits for the last part only. A flush is never wrong; this one only moves the write-back earlier (measured:
 * FLUSHING 210 → 60 ms for 512 MiB on files).
 */
export const MERGE_WRITEBACK_HINT_SECTORS = 8192;

export interface MergeProgress {
  readonly state: MergeStateName;
  readonly chunksLeft: number;
  readonly chunksMerged: number;
  readonly runsMerged: number;
  readonly chunksTotal: number;
  readonly reason?: string;
}

/** The write interlock of one batch: its runs' old-chunk ranges, and the writes to them it queued. */
class BatchLock {
  /** Ranges [first, end) sorted by first (the runs of a batch never overlap). */
  readonly firsts: number[];
  readonly ends: number[];
  readonly queued: HeldBio[] = [];

  constructor(runs: readonly MergeRun[]) {
    const ranges = runs.map((run) => [firstOldChunk(run), run.lastOldChunk + 1]).sort((a, b) => a[0] - b[0]);
    this.firsts = ranges.map((r) => r[0]);
    this.ends = ranges.map((r) => r[1]);
  }

  holds(chunk: number): boolean {
    // The last range whose first chunk is <= chunk.
    let lo = 0;
    let hi = this.firsts.length - 1;
    let at = -1;
    while (lo <= hi) {
      const mid = (lo + hi) >> 1;
      if (this.firsts[mid] <= chunk) {
        at = mid;
        lo = mid + 1;
      } else hi = mid - 1;
    }
    return at >= 0 && chunk < this.ends[at];
  }

  /** Retries the queued writes (the interlock is gone). */
  release(): void {
    const q = this.queued.splice(0, this.queued.length);
    for (const h of q) h.ctx.retryBio(h.bio);
  }
}

interface CommittingBatch {
  readonly lock: BatchLock;
  /** Settles once the batch's area writes are durable (never rejects: a failure lands in commitFailure). */
  readonly durable: Promise<void>;
}

const firstOldChunk = (run: MergeRun): number => run.lastOldChunk + 1 - run.count;
const firstNewChunk = (run: MergeRun): number => run.lastNewChunk + 1 - run.count;

export class Merger {
  private stateIndex = MERGE_MACHINE.initialIndex;
  /** Bumped at every transition: an asynchronous step checks it to know it still belongs to the current state. */
  private epoch = 0;
  private stopRequested = false;
  private stopWaiters: Array<() => void> = [];
  /** The batch being merged: runs newest first, and their chunk count. */
  private batch: MergeRun[] = [];
  private batchChunks = 0;
  /** Runs the next batch may take (one after a start; grows at each commit, up to MERGE_BATCH_RUNS_MAX). */
  private batchRunsMax = 1;
  /** Batches found since the merger was created (names the batch a read-ahead follows). */
  private batchSeq = 0;
  /** The next batch's runs, read during this batch's origin flush (FLUSHING), for the PREPARE after its commit. */
  private readAhead: { readonly afterBatch: number; readonly runs: Promise<MergeRun[]> } | undefined;
  /** The write interlock of the batch being merged (undefined before its INTERLOCK and once released). */
  private lock: BatchLock | undefined;
  /** The previous batch, cleared but not durable yet: its interlock holds until its area writes are. */
  private committing: CommittingBatch | undefined;
  /** Why the previous batch's commit failed (reported at the next PREPARE or COMMITTING). */
  private commitFailure: string | undefined;
  /** Writes in flight to COW chunks (remapped by the merge target), per old chunk. */
  private readonly cowWrites = new Map<number, number>();
  private cowWritesDrained: (() => void) | undefined;
  /** COPYING: the next run to start, jobs in flight, the first error seen. */
  private copyNext = 0;
  private copiesInFlight = 0;
  private copyError: string | undefined;
  private copiedSinceHintSectors = 0;
  chunksMerged = 0;
  runsMerged = 0;
  /** Chunks in the COW when this merger first started (progress total). */
  chunksTotal = -1;
  failureReason: string | undefined;

  constructor(
    private readonly s: SnapshotState,
    private readonly registry: OriginRegistry,
    private readonly kcopyd: KcopydClient,
  ) {}

  get state(): MergeStateName {
    return MERGE_MACHINE.stateNames[this.stateIndex];
  }

  progress(): MergeProgress {
    return {
      state: this.state,
      chunksLeft: this.s.table.size,
      chunksMerged: this.chunksMerged,
      runsMerged: this.runsMerged,
      chunksTotal: Math.max(this.chunksTotal, 0),
      reason: this.failureReason,
    };
  }

  private send(type: MergeEvent['type']): void {
    const from = this.state;
    this.stateIndex = MERGE_MACHINE.step(this.stateIndex, MERGE_MACHINE.eventIndex(type));
    this.epoch++;
    const to = this.state;
    void this.s.ctx.log
      .append({ type: 'merge.state', device: this.s.deviceName, from, event: type, state: to, chunksLeft: this.s.table.size, chunksMerged: this.chunksMerged })
      .catch(() => undefined);
    this.enter(to);
  }

  /** Starts (or resumes) the merge. */
  start(): void {
    if (this.state === 'DONE' || this.state === 'FAILED') return;
    if (this.state !== 'IDLE' && this.state !== 'STOPPED') return;
    this.stopRequested = false;
    if (this.chunksTotal < 0) this.chunksTotal = this.s.table.size;
    // Every start begins with a one-run batch, as the kernel's step.
    this.batchRunsMax = 1;
    this.readAhead = undefined;
    this.send('START');
  }

  /** Stops after the step in flight; resolves when stopped (or finished). */
  stop(): Promise<void> {
    const st = this.state;
    if (st === 'IDLE' || st === 'STOPPED' || st === 'DONE' || st === 'FAILED') return this.settled();
    this.stopRequested = true;
    if (st === 'PREPARE' || st === 'COPY_OUT_OTHERS' || st === 'INTERLOCK') {
      // No copy of the merge's own is in flight in these states (a store read in PREPARE is dropped: epoch); the
      // previous batch's commit may still be becoming durable: stopped once it is.
      this.send('STOP');
      return this.settled();
    }
    return new Promise<void>((resolve) => this.stopWaiters.push(resolve)).then(() => this.settled());
  }

  /** Resolves once no batch commit is in flight. */
  private async settled(): Promise<void> {
    while (this.committing) await this.committing.durable;
  }

  /**
   * Whether a write to `chunk` must wait: it is in the batch being merged, or in the previous one until its commit
   * is durable (its in-core exceptions are cleared already: the caller must ask whatever the table says).
   */
  inMergingRange(chunk: number): boolean {
    return (this.lock?.holds(chunk) ?? false) || (this.committing?.lock.holds(chunk) ?? false);
  }

  /** Queues a write that inMergingRange said must wait, on the batch that holds its chunk. */
  queueWrite(held: HeldBio): void {
    const chunk = this.s.chunkOf(held.bio.sector - held.ctx.beginSector);
    const lock = this.committing?.lock.holds(chunk) ? this.committing.lock : this.lock;
    assert(lock !== undefined, `merge: a write queued for chunk ${chunk}, which no batch holds`);
    lock.queued.push(held);
  }

  /** A write to a COW chunk started (the interlock waits for these). */
  cowWriteStart(chunk: number): void {
    this.cowWrites.set(chunk, (this.cowWrites.get(chunk) ?? 0) + 1);
  }

  cowWriteEnd(chunk: number): void {
    const n = this.cowWrites.get(chunk)! - 1;
    if (n === 0) this.cowWrites.delete(chunk);
    else this.cowWrites.set(chunk, n);
    if (this.cowWritesDrained && !this.rangeHasCowWrites()) {
      const f = this.cowWritesDrained;
      this.cowWritesDrained = undefined;
      f();
    }
  }

  private rangeHasCowWrites(): boolean {
    if (!this.lock) return false;
    for (const chunk of this.cowWrites.keys()) if (this.lock.holds(chunk)) return true;
    return false;
  }

  private fail(reason: string): void {
    this.failureReason = reason;
    this.s.mergeFailed = true;
    this.s.ctx.tableEvent();
    void this.s.ctx.log.append({ type: 'merge.failed', device: this.s.deviceName, reason, chunksLeft: this.s.table.size }, { durable: true }).catch(() => undefined);
  }

  /** Drops the interlock of the batch being merged and retries the writes it queued. */
  private releaseQueued(): void {
    const lock = this.lock;
    this.lock = undefined;
    lock?.release();
  }

  /** Runs the effect of the state just entered. */
  private enter(state: MergeStateName): void {
    switch (state) {
      case 'PREPARE':
        return this.prepare();
      case 'COPY_OUT_OTHERS':
        return this.copyOutOthers();
      case 'INTERLOCK':
        return this.interlock();
      case 'COPYING':
        return this.copy();
      case 'FLUSHING':
        return this.flush();
      case 'COMMITTING':
        return this.commit();
      case 'DONE':
        void this.s.ctx.log.append({ type: 'merge.done', device: this.s.deviceName, chunksMerged: this.chunksMerged }, { durable: true }).catch(() => undefined);
        return this.wakeStopWaiters();
      case 'FAILED':
        this.releaseQueued();
        return this.wakeStopWaiters();
      case 'STOPPED':
        this.releaseQueued();
        return this.wakeStopWaiters();
      default:
    }
  }

  private wakeStopWaiters(): void {
    const w = this.stopWaiters;
    this.stopWaiters = [];
    for (const f of w) f();
  }

  private batchLimits(runsMax: number): MergeBatchLimits {
    const chunkBytes = this.s.chunkSizeSectors * 512;
    return { chunksMax: Math.max(1, Math.floor(MERGE_BATCH_BYTES_MAX / chunkBytes)), runsMax };
  }

  private nextBatchRunsMax(): number {
    return Math.min(MERGE_BATCH_RUNS_GROWTH * this.batchRunsMax, MERGE_BATCH_RUNS_MAX);
  }

  private prepare(): void {
    // One event-loop turn per batch: a merge over devices that complete at once (memory, the page cache) never
    // holds the loop for more than a batch, and a suspend reaches stop() between two batches.
    const epoch = this.epoch;
    setImmediate(() => {
      if (epoch === this.epoch) this.prepareNow();
    });
  }

  private prepareNow(): void {
    if (this.stopRequested) return this.send('STOP');
    if (this.commitFailure !== undefined) return this.send('PREPARE_ERROR'); // reported (fail) when it happened
    const s = this.s;
    if (!s.valid) {
      this.fail('snapshot is invalid: cannot merge');
      return this.send('PREPARE_ERROR');
    }
    const type = s.storeType;
    if (!type.prepareMerge && !type.prepareMergeRuns) {
      this.fail('the exception store cannot merge');
      return this.send('PREPARE_ERROR');
    }
    const readError = (err: unknown): void => {
      this.fail(`read error in exception store: ${(err as Error).message}`);
      this.send('PREPARE_ERROR');
    };
    if (!type.prepareMergeRuns) {
      // A store with Linux's one-run prepare_merge only: batches of one run.
      let run: MergeRun;
      try {
        run = type.prepareMerge!(s.store);
      } catch (err) {
        return readError(err);
      }
      return this.batchFound(run.count === 0 ? [] : [run]);
    }
    const epoch = this.epoch;
    const ahead = this.readAhead;
    this.readAhead = undefined;
    if (ahead?.afterBatch === this.batchSeq && type.prepareMerge) {
      // The runs were read during the last batch's flush. prepare_merge itself (synchronous: it steps back an area
      // when the current one is empty, as the status shows) must agree on the first of them.
      void ahead.runs.then(
        (runs) => {
          if (epoch !== this.epoch) return;
          let first: MergeRun;
          try {
            first = type.prepareMerge!(s.store);
          } catch (err) {
            return readError(err);
          }
          const agrees = runs.length === 0 ? first.count === 0 : first.count === runs[0].count && first.lastOldChunk === runs[0].lastOldChunk && first.lastNewChunk === runs[0].lastNewChunk;
          if (agrees) this.batchFound(runs);
          else this.readRuns(epoch, readError);
        },
        () => {
          if (epoch === this.epoch) this.readRuns(epoch, readError);
        },
      );
      return;
    }
    this.readRuns(epoch, readError);
  }

  private readRuns(epoch: number, readError: (err: unknown) => void): void {
    const s = this.s;
    s.storeType.prepareMergeRuns!(s.store, this.batchLimits(this.batchRunsMax)).then(
      (runs) => {
        if (epoch === this.epoch) this.batchFound(runs);
      },
      (err: unknown) => {
        if (epoch === this.epoch) readError(err);
      },
    );
  }

  private batchFound(runs: MergeRun[]): void {
    const s = this.s;
    if (runs.length === 0) {
      // DONE only once the last commit is durable.
      const committing = this.committing;
      if (!committing) return this.send('NO_MORE');
      const epoch = this.epoch;
      void committing.durable.then(() => {
        if (epoch === this.epoch) this.send(this.commitFailure === undefined ? 'NO_MORE' : 'PREPARE_ERROR');
      });
      return;
    }
    // A run past the end of the origin fails its copy (as the kernel's write past the end does): the runs before
    // it are merged first, and it comes alone in the next batch.
    const originChunks = Math.ceil(s.origin.device.sizeSectors / s.chunkSizeSectors);
    const pastEnd = runs.findIndex((r) => firstOldChunk(r) >= originChunks);
    if (pastEnd >= 0) runs = runs.slice(0, Math.max(pastEnd, 1));
    this.batch = runs;
    this.batchSeq++;
    this.batchChunks = 0;
    for (const run of runs) {
      this.batchChunks += run.count;
      void s.ctx.log
        .append({ type: 'merge.run.started', device: s.deviceName, firstOldChunk: firstOldChunk(run), firstNewChunk: firstNewChunk(run), chunks: run.count })
        .catch(() => undefined);
    }
    this.send('RUN_FOUND');
  }

  /** The sectors a run copies (clipped at the origin's end, as a write past it would be). */
  private runRegion(run: MergeRun): { oldSector: number; newSector: number; lengthSectors: number } {
    const s = this.s;
    const oldSector = firstOldChunk(run) * s.chunkSizeSectors;
    const lengthSectors = Math.min(run.count * s.chunkSizeSectors, s.origin.device.sizeSectors - oldSector);
    return { oldSector, newSector: firstNewChunk(run) * s.chunkSizeSectors, lengthSectors };
  }

  /** Before overwriting the origin, the other snapshots of the origin get their copies (Linux origin_write_extent). */
  private copyOutOthers(): void {
    if (this.stopRequested) return this.send('STOP');
    const step = this.registry.minimumChunkSizeSectors(this.s.origin.device) || this.s.chunkSizeSectors;
    let mustWait = false;
    if (this.registry.snapshots(this.s.origin.device).length > 1) {
      for (const run of this.batch) {
        const { oldSector, lengthSectors } = this.runRegion(run);
        for (let n = 0; n < lengthSectors; n += step) {
          if (originWrite(this.registry, this.kcopyd, this.s.origin.device, oldSector + n, undefined)) mustWait = true;
        }
      }
    }
    if (!mustWait) return this.send('OTHERS_READY');
    // Wait for the copies just started (or already pending) to commit, then check again — unless the merge was
    // stopped (or moved on) meanwhile.
    const epoch = this.epoch;
    const others = this.registry.snapshots(this.s.origin.device).filter((x) => x !== this.s);
    void Promise.all(others.map((o) => o.drainPending())).then(() => {
      if (epoch === this.epoch) this.copyOutOthers();
    });
  }

  private interlock(): void {
    this.lock = new BatchLock(this.batch);
    if (!this.rangeHasCowWrites()) return this.send('WRITES_DRAINED');
    const epoch = this.epoch;
    this.cowWritesDrained = () => {
      if (epoch === this.epoch) this.send('WRITES_DRAINED');
    };
  }

  private copy(): void {
    this.copyNext = 0;
    this.copiesInFlight = 0;
    this.copyError = undefined;
    this.startCopies();
  }

  /** Keeps up to MERGE_COPY_JOBS_IN_FLIGHT runs copying; the batch's copy is done when all have reported. */
  private startCopies(): void {
    const s = this.s;
    while (this.copiesInFlight < MERGE_COPY_JOBS_IN_FLIGHT && this.copyNext < this.batch.length && this.copyError === undefined) {
      const run = this.batch[this.copyNext++];
      const { oldSector, newSector, lengthSectors } = this.runRegion(run);
      if (lengthSectors <= 0) {
        // A record for a chunk past the end of the origin: the kernel's copy fails there too.
        this.copyError = `write error: exception for origin chunk ${run.lastOldChunk} lies past the end of the origin: shutting down merge`;
        break;
      }
      this.copiesInFlight++;
      this.copiedSinceHintSectors += lengthSectors;
      if (this.copiedSinceHintSectors >= MERGE_WRITEBACK_HINT_SECTORS) {
        this.copiedSinceHintSectors = 0;
        s.origin.device.flush().catch(() => undefined);
      }
      this.kcopyd.copy(
        { device: s.cow.device, sector: newSector as Sector, lengthSectors: lengthSectors as Sector },
        [{ device: s.origin.device, sector: oldSector as Sector, lengthSectors: lengthSectors as Sector }],
        {},
        (readError, writeErrorMask) => {
          this.copiesInFlight--;
          if ((readError || writeErrorMask !== 0) && this.copyError === undefined) {
            this.copyError = `${readError ? 'read' : 'write'} error copying to the origin: shutting down merge`;
          }
          this.startCopies();
        },
      );
    }
    if (this.copiesInFlight > 0) return;
    if (this.copyError !== undefined) {
      this.fail(this.copyError);
      return this.send('COPY_ERROR');
    }
    if (this.copyNext === this.batch.length) this.send('COPY_DONE');
  }

  private flush(): void {
    const s = this.s;
    if (s.storeType.prepareMergeRuns) {
      // Read the next batch's runs while the origin flush runs (the CPU is idle meanwhile).
      const runs = s.storeType.prepareMergeRuns(s.store, this.batchLimits(this.nextBatchRunsMax()), this.batchChunks);
      runs.catch(() => undefined); // a read error shows again when PREPARE reads for itself
      this.readAhead = { afterBatch: this.batchSeq, runs };
    }
    this.s.origin.device.flush().then(
      () => this.send('FLUSHED'),
      (err: unknown) => {
        this.fail(`flush after merge failed: ${(err as Error).message}`);
        this.send('FLUSH_ERROR');
      },
    );
  }

  /** Why the in-core table refused to clear a record the store cleared (Linux's two DMERR messages). */
  private lockStepReason(oldChunk: Chunk, newChunk: Chunk): string {
    const inCore = this.s.table.lookup(oldChunk);
    const what =
      inCore < 0
        ? `exception for origin chunk ${oldChunk} (COW chunk ${newChunk}) is on disk but not in memory`
        : `exception ${oldChunk} -> ${newChunk} cannot be cleared in core: merge from the middle of a run, or in core it is in COW chunk ${inCore}`;
    return `Merge failed: in-core and on-disk exceptions out of lock-step: ${what}: shutting down merge`;
  }

  /** Emits 'merge.run.committed' for the first `runs` runs of `batch`, whose clearing began at `leftBefore`. */
  private runsCommitted(batch: readonly MergeRun[], runs: number, leftBefore: number): void {
    let left = leftBefore;
    for (let i = 0; i < runs; i++) {
      const chunks = batch[i].count;
      left -= chunks;
      this.chunksMerged += chunks;
      this.runsMerged++;
      void this.s.ctx.log.append({ type: 'merge.run.committed', device: this.s.deviceName, chunks, chunksLeft: left }).catch(() => undefined);
    }
  }

  /**
   * The lock-step commit of the batch. COMMITTED as soon as its records are cleared (in core and in the store's
   * area images) and their writes queued: the next batch is prepared and copied while they become durable, and
   * this batch's interlock holds until they are. If those writes fail, the merge fails at once ("Merge failed")
   * and the machine follows at its next PREPARE or COMMITTING.
   */
  private commit(): void {
    const s = this.s;
    if (this.commitFailure !== undefined) {
      this.releaseQueued();
      return this.send('COMMIT_ERROR');
    }
    const batch = this.batch;
    const lock = this.lock!;
    const leftBefore = s.table.size;
    const epoch = this.epoch;
    let cleared = 0;
    let refused: string | undefined;
    let handedOver = false;
    let settled = false;
    const durable = s.storeType.commitMerge!(
      s.store,
      this.batchChunks,
      (oldChunk: Chunk, newChunk: Chunk) => {
        if (s.table.clearMerged(oldChunk, newChunk)) {
          cleared++;
          return true;
        }
        refused = this.lockStepReason(oldChunk, newChunk);
        return false;
      },
      () => {
        // Called from inside the store's job: go on from a microtask, once the store is ready for the next call.
        handedOver = true;
        queueMicrotask(() => {
          if (!settled) this.committing = { lock, durable: settledDurable };
          if (this.lock === lock) this.lock = undefined;
          this.batchRunsMax = this.nextBatchRunsMax();
          if (epoch === this.epoch) this.send('COMMITTED');
        });
      },
    );
    const settledDurable: Promise<void> = durable.then(
      () => {
        assert(refused === undefined, 'commitMerge resolved after a refused clear');
        settled = true;
        this.runsCommitted(batch, batch.length, leftBefore);
        this.endCommit(lock);
      },
      (err: unknown) => {
        settled = true;
        let reason: string;
        if (refused !== undefined && err instanceof DmError && err.code === 'DM_INVALID_ARGUMENT') {
          // The store committed the whole runs before the refused one (as the kernel's earlier steps would have).
          let runs = 0;
          for (let whole = 0; runs < batch.length && whole + batch[runs].count <= cleared; runs++) whole += batch[runs].count;
          this.runsCommitted(batch, runs, leftBefore);
          reason = refused;
        } else {
          reason = `write error in exception store: ${(err as Error).message}${refused !== undefined ? ` (${refused})` : ''}`;
        }
        if (this.state !== 'FAILED') this.fail(reason); // (a copy error may have failed the merge meanwhile)
        this.endCommit(lock);
        if (handedOver) {
          // The machine is on the next batch already: it fails at its next PREPARE or COMMITTING.
          this.commitFailure = reason;
        } else if (epoch === this.epoch) {
          this.releaseQueued();
          this.send('COMMIT_ERROR');
        }
      },
    );
  }

  /** A batch commit settled: its interlock goes. */
  private endCommit(lock: BatchLock): void {
    if (this.committing?.lock === lock) this.committing = undefined;
    lock.release();
  }
}
