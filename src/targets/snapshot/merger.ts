/**
 * Drives the merge machine (machines/merge.ts) for one snapshot state: the effects of each state — finding the
 * run, making the other snapshots copy out, the write interlock, the kcopyd copy COW → origin, the origin flush
 * and the lock-step commit — run here and report back as machine events. The machine runs in its compiled form;
 * every transition is an event on the log ('merge.state'), with chunks left, so progress is never opaque.
 */
import { mergeMachine, type MergeEvent } from '../../../machines/merge.js';
import type { Chunk, Sector } from '../../block/units.js';
import { assert } from '../../core/assert.js';
import { compileMachine } from '../../core/compiled-machine.js';
import type { KcopydClient } from '../../kcopyd/kcopyd.js';
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

export interface MergeProgress {
  readonly state: MergeStateName;
  readonly chunksLeft: number;
  readonly chunksMerged: number;
  readonly runsMerged: number;
  readonly chunksTotal: number;
  readonly reason?: string;
}

export class Merger {
  private stateIndex = MERGE_MACHINE.initialIndex;
  /** Bumped at every transition: an asynchronous step checks it to know it still belongs to the current state. */
  private epoch = 0;
  private stopRequested = false;
  private stopWaiters: Array<() => void> = [];
  /** The run being merged: [firstOldChunk, firstOldChunk + count). */
  firstMergingChunk = -1;
  mergingChunks = 0;
  /** Writes to the merging range, queued until the run is committed. */
  private queued: HeldBio[] = [];
  /** Writes in flight to COW chunks (remapped by the merge target), per old chunk. */
  private readonly cowWrites = new Map<number, number>();
  private cowWritesDrained: (() => void) | undefined;
  private run = { count: 0, lastOldChunk: 0, lastNewChunk: 0 };
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
    this.send('START');
  }

  /** Stops after the step in flight; resolves when stopped (or finished). */
  stop(): Promise<void> {
    const st = this.state;
    if (st === 'IDLE' || st === 'STOPPED' || st === 'DONE' || st === 'FAILED') return Promise.resolve();
    this.stopRequested = true;
    if (st === 'PREPARE' || st === 'COPY_OUT_OTHERS' || st === 'INTERLOCK') {
      // No I/O of the merge's own is in flight in these states.
      this.send('STOP');
      return Promise.resolve();
    }
    return new Promise((resolve) => this.stopWaiters.push(resolve));
  }

  /** Whether a write to `chunk` must wait for the run being merged. */
  inMergingRange(chunk: number): boolean {
    return this.mergingChunks > 0 && chunk >= this.firstMergingChunk && chunk < this.firstMergingChunk + this.mergingChunks;
  }

  queueWrite(held: HeldBio): void {
    this.queued.push(held);
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
    for (let c = this.firstMergingChunk; c < this.firstMergingChunk + this.mergingChunks; c++) if (this.cowWrites.has(c)) return true;
    return false;
  }

  private fail(reason: string): void {
    this.failureReason = reason;
    this.s.mergeFailed = true;
    this.s.ctx.tableEvent();
    void this.s.ctx.log.append({ type: 'merge.failed', device: this.s.deviceName, reason, chunksLeft: this.s.table.size }, { durable: true }).catch(() => undefined);
  }

  private releaseQueued(): void {
    this.firstMergingChunk = -1;
    this.mergingChunks = 0;
    const q = this.queued;
    this.queued = [];
    for (const h of q) h.ctx.retryBio(h.bio);
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
        return void this.commit();
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

  private prepare(): void {
    if (this.stopRequested) return this.send('STOP');
    const s = this.s;
    if (!s.valid) {
      this.fail('snapshot is invalid: cannot merge');
      return this.send('PREPARE_ERROR');
    }
    if (!s.storeType.prepareMerge) {
      this.fail('the exception store cannot merge');
      return this.send('PREPARE_ERROR');
    }
    let run;
    try {
      run = s.storeType.prepareMerge(s.store);
    } catch (err) {
      this.fail(`read error in exception store: ${(err as Error).message}`);
      return this.send('PREPARE_ERROR');
    }
    if (run.count === 0) return this.send('NO_MORE');
    this.run = { count: run.count, lastOldChunk: run.lastOldChunk, lastNewChunk: run.lastNewChunk };
    void s.ctx.log
      .append({ type: 'merge.run.started', device: s.deviceName, firstOldChunk: run.lastOldChunk + 1 - run.count, firstNewChunk: run.lastNewChunk + 1 - run.count, chunks: run.count })
      .catch(() => undefined);
    this.send('RUN_FOUND');
  }

  private runRegion(): { oldSector: number; newSector: number; lengthSectors: number } {
    const s = this.s;
    const firstOld = this.run.lastOldChunk + 1 - this.run.count;
    const firstNew = this.run.lastNewChunk + 1 - this.run.count;
    const oldSector = firstOld * s.chunkSizeSectors;
    const lengthSectors = Math.min(this.run.count * s.chunkSizeSectors, s.origin.device.sizeSectors - oldSector);
    return { oldSector, newSector: firstNew * s.chunkSizeSectors, lengthSectors };
  }

  /** Before overwriting the origin, the other snapshots of the origin get their copies (Linux origin_write_extent). */
  private copyOutOthers(): void {
    if (this.stopRequested) return this.send('STOP');
    const { oldSector, lengthSectors } = this.runRegion();
    const step = this.registry.minimumChunkSizeSectors(this.s.origin.device) || this.s.chunkSizeSectors;
    let mustWait = false;
    for (let n = 0; n < lengthSectors; n += step) {
      if (originWrite(this.registry, this.kcopyd, this.s.origin.device, oldSector + n, undefined)) mustWait = true;
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
    const firstOld = this.run.lastOldChunk + 1 - this.run.count;
    this.firstMergingChunk = firstOld;
    this.mergingChunks = this.run.count;
    if (!this.rangeHasCowWrites()) return this.send('WRITES_DRAINED');
    const epoch = this.epoch;
    this.cowWritesDrained = () => {
      if (epoch === this.epoch) this.send('WRITES_DRAINED');
    };
  }

  private copy(): void {
    const s = this.s;
    const { oldSector, newSector, lengthSectors } = this.runRegion();
    if (lengthSectors <= 0) {
      // A record for a chunk past the end of the origin: the kernel's copy fails there too.
      this.fail(`write error: exception for origin chunk ${this.run.lastOldChunk} lies past the end of the origin: shutting down merge`);
      return this.send('COPY_ERROR');
    }
    this.kcopyd.copy(
      { device: s.cow.device, sector: newSector as Sector, lengthSectors: lengthSectors as Sector },
      [{ device: s.origin.device, sector: oldSector as Sector, lengthSectors: lengthSectors as Sector }],
      {},
      (readError, writeErrorMask) => {
        if (readError || writeErrorMask !== 0) {
          this.fail(`${readError ? 'read' : 'write'} error copying to the origin: shutting down merge`);
          return this.send('COPY_ERROR');
        }
        this.send('COPY_DONE');
      },
    );
  }

  private flush(): void {
    this.s.origin.device.flush().then(
      () => this.send('FLUSHED'),
      (err: unknown) => {
        this.fail(`flush after merge failed: ${(err as Error).message}`);
        this.send('FLUSH_ERROR');
      },
    );
  }

  private async commit(): Promise<void> {
    const s = this.s;
    const n = this.run.count;
    try {
      let bad: string | undefined;
      await s.storeType.commitMerge!(s.store, n, (oldChunk: Chunk, newChunk: Chunk) => {
        if (s.table.clearMerged(oldChunk, newChunk)) return true;
        bad = `exception ${oldChunk} -> ${newChunk} is on disk but cannot be cleared in core (missing or from the middle of a run)`;
        return false;
      });
      assert(bad === undefined, 'commitMerge resolved after a refused clear');
    } catch (err) {
      this.fail(`write error in exception store: ${(err as Error).message}`);
      this.releaseQueued();
      return this.send('COMMIT_ERROR');
    }
    this.chunksMerged += n;
    this.runsMerged++;
    void s.ctx.log
      .append({ type: 'merge.run.committed', device: s.deviceName, chunks: n, chunksLeft: s.table.size }, { durable: true })
      .catch(() => undefined);
    this.releaseQueued();
    this.send('COMMITTED');
  }
}
