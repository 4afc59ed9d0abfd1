/**
 * Drives the merge machine (machines/merge.ts) for one snapshot state: the effects of each state — finding the
 * runs, making the other snapshots copy out, the write interlock, the kcopyd copies COW → origin, the origin flush
 * and the lock-step commit — run here and report back as machine events. The machine runs in its compiled form;
 * every transition is an event on the log ('merge.state'), with chunks left, so progress is never opaque.
 *
 * Batches. Linux merges one linear run per step: copy, flush the origin, commit_merge (an area write with
 * PREFLUSH|FUA) — a few flushes per run, which hold a merge of 64 KiB runs to a few tens of MiB/s (bench/merge.ts:
 * 26 MiB/s on files). Here one pass PREPARE → COMMITTING merges a BATCH: the runs prepare_merge would find one after
 * the other (the store's prepareMergeRuns: newest first, across metadata areas), copied by kcopyd jobs (runs side
 * by side on the COW read together: scatter copies), then ONE origin flush and ONE commitMerge that clears all their records in
 * the same newest-first order, record by record in lock-step with the in-core table (seed 000), writes each
 * metadata area it changed and flushes the COW once. The first batch after a start is one run, as the kernel's
 * step; each batch copied lets the next one take MERGE_BATCH_RUNS_GROWTH times more runs, up to the limits.
 *
 * Safety (the kernel's argument, per batch). The write interlock covers every chunk of the batch from before its
 * copy until its commit is DURABLE (or the merge stops or fails with the batch not committed: its records stay, a
 * later merge copies it again) — also once the lock-step has cleared their in-core exceptions (the merge target
 * asks inMergingRange before the table). The origin is flushed after the copies and before any record is cleared.
 * So whatever a crash leaves on disk (persistent-store.ts: the records found are always a newest-first-cleared
 * prefix of the list), a record still found names a chunk nothing has written since its copy: merging it again
 * copies the same data over the same origin chunk. A write to a chunk of a batch waits for the whole batch (at most
 * MERGE_BATCH_BYTES_MAX of copying and two flushes).
 *
 * Overlap, so the flushes cost little (a pipeline of three batches at most):
 * - Commit one behind. When a batch's copy is done its origin flush is started, and — if no older batch waits for
 *   its commit — the machine goes on to PREPARE the next batch (COPY_DONE_AHEAD; the store reads the runs below the
 *   copied batch's records). When the next batch's copy is done (COPY_DONE), FLUSHING waits for the OLDER batch's
 *   flush, started a whole batch ago, and COMMITTING commits that older batch: the origin's write-back of a batch
 *   runs while the next one copies. With nothing left to find, or on a stop, the copied batch is committed first
 *   (DRAIN). Commits stay in the records' newest-first order; every batch is flushed before its commit.
 * - The batch is COMMITTED once its records are cleared and its area writes queued, and the next batch is prepared
 *   and copied while they become durable (its own commit's writes follow them); the batch's interlock, its queued
 *   writes and its 'merge.run.committed' events wait for durability (a failure then fails the merge, and the
 *   machine at its next PREPARE or COMMITTING).
 * - While a batch copies, the origin is flushed every MERGE_WRITEBACK_HINT_SECTORS without waiting, so the
 *   write-back runs beside the copy.
 * Each PREPARE waits one event-loop turn: over devices that complete at once (memory, the page cache) the merge never
 * holds the loop for more than a batch.
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
import { KCOPYD_SEGMENTS_MAX, type KcopydClient, type KcopydSegment } from '../../kcopyd/kcopyd.js';
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
/** Runs in one batch at most. The first batch after a start is one run; each batch copied lets the next take 8 times more. */
export const MERGE_BATCH_RUNS_MAX = 4096;
export const MERGE_BATCH_RUNS_GROWTH = 8;
/** kcopyd jobs of a batch in flight at once (each copies a run, or runs side by side on the COW: see startCopies). */
export const MERGE_COPY_JOBS_IN_FLIGHT = 16;
/** Sectors one copy job reads at most (1 MiB): runs side by side on the COW are read together up to this. */
export const MERGE_COPY_JOB_SECTORS_MAX = 2048;
/**
 * Sectors of copying in flight at most (4 MiB; a job is started while fewer are). Enough to keep a device with
 * latency busy; small enough that the kcopyd buffers the data passes through stay in the CPU caches: measured with
 * bench/merge.ts on files (median ratios to the sequential pass), 16 jobs of 1 MiB in flight 0.77–0.84, 4 jobs of
 * 1 MiB or 512 KiB 0.92–0.99, 16 jobs of one 64 KiB run 0.89–0.93.
 */
export const MERGE_COPY_SECTORS_IN_FLIGHT = 8192;
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

/** A batch whose copy is done and whose commit is still to come. */
interface CopiedBatch {
  /** Runs newest first. */
  readonly runs: MergeRun[];
  readonly chunks: number;
  readonly lock: BatchLock;
  /** The origin flush started when the copy was done: settles with its error, or undefined. */
  readonly flushed: Promise<Error | undefined>;
}

const firstOldChunk = (run: MergeRun): number => run.lastOldChunk + 1 - run.count;
const firstNewChunk = (run: MergeRun): number => run.lastNewChunk + 1 - run.count;

export class Merger {
  private stateIndex = MERGE_MACHINE.initialIndex;
  /** Bumped at every transition: an asynchronous step checks it to know it still belongs to the current state. */
  private epoch = 0;
  private stopRequested = false;
  private stopWaiters: Array<() => void> = [];
  /** The batch being found and copied (PREPARE to COPYING): runs newest first, and their chunk count. */
  private batch: MergeRun[] = [];
  private batchChunks = 0;
  /** Runs the next batch may take (one after a start; grows with each batch copied, up to MERGE_BATCH_RUNS_MAX). */
  private batchRunsMax = 1;
  /** The write interlock of the batch being copied (undefined before its INTERLOCK and once it is copied). */
  private lock: BatchLock | undefined;
  /** Batches copied, oldest first, whose commit is to come (at most two: see "Commit one behind"). */
  private copied: CopiedBatch[] = [];
  /** Batches cleared but not durable yet, oldest first: each interlock holds until its area writes are durable. */
  private committing: CommittingBatch[] = [];
  /** Why the previous batch's commit failed (reported at the next PREPARE or COMMITTING). */
  private commitFailure: string | undefined;
  /** Writes in flight to COW chunks (remapped by the merge target), per old chunk. */
  private readonly cowWrites = new Map<number, number>();
  private cowWritesDrained: (() => void) | undefined;
  /** COPYING: the next run to start, jobs and sectors in flight, the first error seen. */
  private copyNext = 0;
  private copiesInFlight = 0;
  private copySectorsInFlight = 0;
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
    assert(this.copied.length === 0 && this.lock === undefined, 'merge: started with a batch left from before');
    this.send('START');
  }

  /** Stops after the step in flight; resolves when stopped (or finished). */
  stop(): Promise<void> {
    const st = this.state;
    if (st === 'IDLE' || st === 'STOPPED' || st === 'DONE' || st === 'FAILED') return this.settled();
    this.stopRequested = true;
    if (st === 'PREPARE' || st === 'COPY_OUT_OTHERS' || st === 'INTERLOCK') {
      // No copy of the merge's own is in flight in these states (a store read in PREPARE is dropped: epoch); the
      // batch being prepared is dropped. A batch copied already is committed first (DRAIN, then STOP at the next
      // PREPARE); the previous batches' commits may still be becoming durable: stopped once they are.
      if (this.copied.length > 0) {
        this.stopRequested = true;
        const stopped = new Promise<void>((resolve) => this.stopWaiters.push(resolve));
        this.send('DRAIN');
        return stopped.then(() => this.settled());
      }
      this.send('STOP');
      return this.settled();
    }
    return new Promise<void>((resolve) => this.stopWaiters.push(resolve)).then(() => this.settled());
  }

  /** Resolves once no batch commit is in flight. */
  private async settled(): Promise<void> {
    while (this.committing.length > 0) await this.committing[0].durable;
  }

  /** The interlock holding `chunk`: of the batch being copied, a copied one, or one whose commit is not durable yet. */
  private lockHolding(chunk: number): BatchLock | undefined {
    if (this.lock?.holds(chunk)) return this.lock;
    for (const b of this.copied) if (b.lock.holds(chunk)) return b.lock;
    for (const b of this.committing) if (b.lock.holds(chunk)) return b.lock;
    return undefined;
  }

  /**
   * Whether a write to `chunk` must wait: it is in the batch being copied, in one copied and not committed, or in
   * one whose commit is not durable yet (its in-core exceptions are cleared already: the caller must ask whatever
   * the table says).
   */
  inMergingRange(chunk: number): boolean {
    return this.lockHolding(chunk) !== undefined;
  }

  /** Queues a write that inMergingRange said must wait, on the batch that holds its chunk. */
  queueWrite(held: HeldBio): void {
    const chunk = this.s.chunkOf(held.bio.sector - held.ctx.beginSector);
    const lock = this.lockHolding(chunk);
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

  /** Drops the interlock of the batch being copied and retries the writes it queued. */
  private releaseQueued(): void {
    const lock = this.lock;
    this.lock = undefined;
    lock?.release();
  }

  /**
   * The merge stops or fails: the batch being copied and the copied ones are dropped (their records stay on disk
   * and in core, a later merge copies them again) and their queued writes retried. Commits in flight keep their
   * interlocks until durable.
   */
  private releaseUncommitted(): void {
    this.releaseQueued();
    const copied = this.copied;
    this.copied = [];
    for (const b of copied) b.lock.release();
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
        // (From DRAIN in COPY_OUT_OTHERS or INTERLOCK, the batch being prepared is dropped.)
        this.releaseQueued();
        return this.flush();
      case 'COMMITTING':
        return this.commit();
      case 'DONE':
        void this.s.ctx.log.append({ type: 'merge.done', device: this.s.deviceName, chunksMerged: this.chunksMerged }, { durable: true }).catch(() => undefined);
        return this.wakeStopWaiters();
      case 'FAILED':
      case 'STOPPED':
        this.releaseUncommitted();
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
    if (this.stopRequested) return this.send(this.copied.length > 0 ? 'DRAIN' : 'STOP');
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
      // A store with Linux's one-run prepare_merge only: batches of one run, each committed before the next is found.
      assert(this.copied.length === 0, 'merge: a one-run store with a copied batch left');
      let run: MergeRun;
      try {
        run = type.prepareMerge!(s.store);
      } catch (err) {
        return readError(err);
      }
      return this.batchFound(run.count === 0 ? [] : [run]);
    }
    const epoch = this.epoch;
    // Below the records of a copied batch whose commit is still to come.
    let belowNewest = 0;
    for (const b of this.copied) belowNewest += b.chunks;
    type.prepareMergeRuns(s.store, this.batchLimits(this.batchRunsMax), belowNewest).then(
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
      // The copied batch is committed first; DONE only once the last commit is durable.
      if (this.copied.length > 0) return this.send('DRAIN');
      if (this.committing.length === 0) return this.send('NO_MORE');
      const epoch = this.epoch;
      void this.settled().then(() => {
        if (epoch === this.epoch) this.send(this.commitFailure === undefined ? 'NO_MORE' : 'PREPARE_ERROR');
      });
      return;
    }
    // A run past the end of the origin fails its copy (as the kernel's write past the end does): the runs before
    // it are merged (and committed) first, and it comes alone in a batch of its own.
    const originChunks = Math.ceil(s.origin.device.sizeSectors / s.chunkSizeSectors);
    const pastEnd = runs.findIndex((r) => firstOldChunk(r) >= originChunks);
    if (pastEnd === 0 && this.copied.length > 0) return this.send('DRAIN');
    if (pastEnd >= 0) runs = runs.slice(0, Math.max(pastEnd, 1));
    this.batch = runs;
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

  /**
   * The runs from copyNext on that one copy job takes (copyNext moves past them), newest first: the first, and each
   * next run (one older) whose COW chunks end where the previous one's start, while the total stays within
   * MERGE_COPY_JOB_SECTORS_MAX and KCOPYD_SEGMENTS_MAX. A run clipped at the origin's end, or one past it, ends
   * the group (its COW range is not what it copies). `sector`: where the run starts on the COW.
   */
  private copySegments(): Array<{ sector: number; oldSector: number; lengthSectors: number }> {
    const out: Array<{ sector: number; oldSector: number; lengthSectors: number }> = [];
    const chunkSectors = this.s.chunkSizeSectors;
    let totalSectors = 0;
    while (this.copyNext < this.batch.length && out.length < KCOPYD_SEGMENTS_MAX) {
      const run = this.batch[this.copyNext];
      const { oldSector, newSector, lengthSectors } = this.runRegion(run);
      if (lengthSectors <= 0) break;
      if (out.length > 0) {
        const prev = out[out.length - 1];
        if (newSector + lengthSectors !== prev.sector || totalSectors + lengthSectors > MERGE_COPY_JOB_SECTORS_MAX) break;
      }
      out.push({ sector: newSector, oldSector, lengthSectors });
      totalSectors += lengthSectors;
      this.copyNext++;
      if (lengthSectors !== run.count * chunkSectors) break;
    }
    return out;
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
    this.copySectorsInFlight = 0;
    this.copyError = undefined;
    this.startCopies();
  }

  /**
   * Keeps up to MERGE_COPY_JOBS_IN_FLIGHT kcopyd jobs, MERGE_COPY_SECTORS_IN_FLIGHT sectors, copying; the batch's
   * copy is done when all have reported.
   * Runs side by side on the COW (allocated in order, so the batch's next run, one older, ends where this one
   * starts) share one job: a scatter copy reading them at once, each run's chunks written to its own origin place.
   */
  private startCopies(): void {
    const s = this.s;
    while (
      this.copiesInFlight < MERGE_COPY_JOBS_IN_FLIGHT &&
      this.copySectorsInFlight < MERGE_COPY_SECTORS_IN_FLIGHT &&
      this.copyNext < this.batch.length &&
      this.copyError === undefined
    ) {
      const group = this.copySegments(); // newest (highest on the COW) first
      if (group.length === 0) {
        // A record for a chunk past the end of the origin: the kernel's copy fails there too.
        this.copyError = `write error: exception for origin chunk ${this.batch[this.copyNext].lastOldChunk} lies past the end of the origin: shutting down merge`;
        break;
      }
      // In source (COW) order, the oldest run first.
      const scatter: KcopydSegment[] = [];
      let sourceSectors = 0;
      for (let i = group.length - 1; i >= 0; i--) {
        scatter.push({ device: s.origin.device, sector: group[i].oldSector as Sector, sourceOffsetSectors: sourceSectors as Sector, lengthSectors: group[i].lengthSectors as Sector });
        sourceSectors += group[i].lengthSectors;
      }
      this.copiesInFlight++;
      this.copySectorsInFlight += sourceSectors;
      this.copiedSinceHintSectors += sourceSectors;
      if (this.copiedSinceHintSectors >= MERGE_WRITEBACK_HINT_SECTORS) {
        this.copiedSinceHintSectors = 0;
        s.origin.device.flush().catch(() => undefined);
      }
      const source = { device: s.cow.device, sector: group[group.length - 1].sector as Sector, lengthSectors: sourceSectors as Sector };
      const copyDone = (readError: boolean, writeErrorMask: number): void => {
        this.copiesInFlight--;
        this.copySectorsInFlight -= sourceSectors;
        if ((readError || writeErrorMask !== 0) && this.copyError === undefined) {
          this.copyError = `${readError ? 'read' : 'write'} error copying to the origin: shutting down merge`;
        }
        this.startCopies();
      };
      this.kcopyd.copyScatter(source, scatter, {}, copyDone);
    }
    if (this.copiesInFlight > 0) return;
    if (this.copyError !== undefined) {
      this.fail(this.copyError);
      return this.send('COPY_ERROR');
    }
    if (this.copyNext < this.batch.length) return;
    // Copied: the origin flush that must precede the batch's commit starts now and runs while the next batch is
    // found and copied (commit one behind), unless an older batch waits for its commit, the store finds one run at
    // a time, or a stop is asked for.
    const flushed = s.origin.device.flush().then(
      () => undefined,
      (err: unknown) => err as Error,
    );
    this.copied.push({ runs: this.batch, chunks: this.batchChunks, lock: this.lock!, flushed });
    this.lock = undefined;
    this.batch = [];
    this.batchRunsMax = this.nextBatchRunsMax();
    const ahead = this.copied.length === 1 && s.storeType.prepareMergeRuns !== undefined && !this.stopRequested;
    this.send(ahead ? 'COPY_DONE_AHEAD' : 'COPY_DONE');
  }

  /** FLUSHING: waits for the origin flush started when the oldest copied batch's copy was done. */
  private flush(): void {
    const b = this.copied[0];
    assert(b !== undefined, 'merge: FLUSHING without a copied batch');
    const epoch = this.epoch;
    void b.flushed.then((err) => {
      if (epoch !== this.epoch) return;
      if (err === undefined) return this.send('FLUSHED');
      this.fail(`flush after merge failed: ${err.message}`);
      this.send('FLUSH_ERROR');
    });
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
    if (this.commitFailure !== undefined) return this.send('COMMIT_ERROR'); // reported (fail) when it happened
    const copied = this.copied[0];
    assert(copied !== undefined, 'merge: COMMITTING without a copied batch');
    const batch = copied.runs;
    const lock = copied.lock;
    const leftBefore = s.table.size;
    const epoch = this.epoch;
    let cleared = 0;
    let refused: string | undefined;
    let handedOver = false;
    let settled = false;
    const durable = s.storeType.commitMerge!(
      s.store,
      copied.chunks,
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
          if (!settled) this.committing.push({ lock, durable: settledDurable });
          if (this.copied[0] === copied) this.copied.shift();
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
          this.send('COMMIT_ERROR');
        }
      },
    );
  }

  /** A batch commit settled: its interlock goes. */
  private endCommit(lock: BatchLock): void {
    const at = this.committing.findIndex((b) => b.lock === lock);
    if (at >= 0) this.committing.splice(at, 1);
    lock.release();
  }
}
