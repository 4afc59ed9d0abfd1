/**
 * The state of one snapshot (Linux struct dm_snapshot): its exception store, the in-core table of completed
 * exceptions, the pending exceptions (copies in flight), and the copy → commit → release path shared by the
 * snapshot, snapshot-origin and snapshot-merge targets. One state per COW device; a table reload of the same
 * snapshot shares it (the kernel's exception handover).
 *
 * Ordering rules kept here (spec: dm-snapshot.md):
 * - a bio that needs a copy is held until the copy is done AND its commit is durable, then retried through map;
 * - commits are issued in allocation (sequence) order even when copies finish out of order;
 * - a chunk's origin writes are released only after snapshot reads of that chunk that went to the origin finish;
 * - at most COW_THRESHOLD copies are in flight per snapshot; further writes wait.
 */
import type { BlockDevice } from '../../block/contract.js';
import type { Chunk, Sector } from '../../block/units.js';
import { assert } from '../../core/assert.js';
import type { Bio } from '../../core/bio.js';
import { DmError } from '../../core/errors.js';
import type { DeviceRef, TargetContext } from '../../core/target-contract.js';
import type { KcopydClient } from '../../kcopyd/kcopyd.js';
import type { AnyExceptionStoreType, ExceptionStoreUsage } from '../../stores/contract.js';
import { ExceptionTable } from '../../stores/exception-table.js';

/** Copies in flight per snapshot before origin and snapshot writes wait (Linux cow_threshold). */
export const COW_THRESHOLD = 2048;

/** A bio held by a target, with the context that can retry or end it. */
export interface HeldBio {
  readonly bio: Bio;
  readonly ctx: TargetContext;
}

export class PendingException {
  started = false;
  copyError = false;
  readonly originBios: HeldBio[] = [];
  readonly snapshotBios: HeldBio[] = [];
  /** A snapshot write covering the whole chunk, written straight to the COW instead of a copy. */
  fullBio: HeldBio | undefined = undefined;

  constructor(
    readonly state: SnapshotState,
    readonly oldChunk: Chunk,
    readonly newChunk: Chunk,
    /** Allocation order. */
    readonly sequence: number,
  ) {}
}

/** A table built on a snapshot state (Linux: one struct dm_snapshot sharing the COW). */
export interface SnapshotTable {
  readonly generation: number;
  /** The table's target context: its mapped device's name and whether that device is suspended (handover rules). */
  readonly ctx: TargetContext;
  /** Resumed at least once (Linux s->active). */
  resumed: boolean;
  /** Its source went before it was resumed (Linux snapshot_dtr sets such a destination invalid). */
  handoverCancelled: boolean;
}

export class SnapshotState {
  valid = true;
  overflowed = false;
  /** Set when a snapshot table over this state is resumed; origin writes skip inactive snapshots. */
  active = false;
  /** A snapshot-merge table runs on this state (no new exceptions are made in it). */
  merging = false;
  /** Exceptions pinned by a read-only replayed pool (`dmstate replay --into`): nothing is written, no merge runs. */
  pinned = false;
  mergeFailed = false;
  /**
   * The target instance that owns this state now. A table that handed the state over to a newer one (a reload,
   * or the origin's snapshot-merge table) is Invalid and refuses I/O, as the kernel's __handover_exceptions does.
   */
  owner: unknown = undefined;
  /** The generation of the owner's table. */
  private ownerGeneration = -1;
  /**
   * The tables built on this state and not destroyed yet, by generation (their order of construction): Linux's
   * list of snapshots of the origin that share this COW (__find_snapshots_sharing_cow). A resumed table is a
   * handover source, a table not resumed yet a handover destination.
   */
  private readonly tables = new Map<number, SnapshotTable>();
  private nextGeneration = 0;

  /** Adds a table built on this state (snapshot_ctr); returns its generation. */
  addTable(ctx: TargetContext): number {
    const generation = this.nextGeneration++;
    this.tables.set(generation, { generation, ctx, resumed: false, handoverCancelled: false });
    return generation;
  }

  /** Drops a destroyed table (snapshot_dtr); returns how many tables are left on the state. */
  removeTable(generation: number): number {
    this.tables.delete(generation);
    return this.tables.size;
  }

  /** Makes `inst` (table `generation`) the owner of a state no table owns yet: the first table built on it read the COW. */
  claimIfUnowned(inst: unknown, generation: number): void {
    if (this.owner !== undefined) return;
    this.owner = inst;
    this.ownerGeneration = generation;
  }

  /**
   * The handover source: the owner's table when it has been resumed (Linux s->active), else the newest resumed
   * table; undefined when no table on the state was resumed.
   */
  handoverSource(): SnapshotTable | undefined {
    let newest: SnapshotTable | undefined;
    for (const t of this.tables.values()) {
      if (!t.resumed) continue;
      if (this.ownerGeneration === t.generation) return t;
      if (!newest || t.generation > newest.generation) newest = t;
    }
    return newest;
  }

  /** Tables waiting for a handover: built, never resumed, handover not cancelled (`except`: leave that one out). */
  private waitingTables(except?: number): SnapshotTable[] {
    return [...this.tables.values()].filter((t) => !t.resumed && !t.handoverCancelled && t.generation !== except);
  }

  /** Whether table `generation` waits for the exception handover (its status is `0/<COW sectors> 0` until then). */
  awaitsHandover(generation: number): boolean {
    const t = this.tables.get(generation);
    return t !== undefined && !t.resumed && !t.handoverCancelled;
  }

  /**
   * Why table `generation` may not resume now, or undefined when it may (Linux snapshot_preresume, drivers/md/dm-snap.c):
   * while a resumed table (the source) and a table not resumed yet (the destination) share the COW, the source may
   * not resume before the handover, and the destination only while the source's device is suspended, so that no
   * I/O changes the exceptions as they move. The messages are the kernel's (DMERR; the ioctl returns -EINVAL).
   */
  preresumeRefusal(generation: number): string | undefined {
    const source = this.handoverSource();
    if (source === undefined || this.waitingTables(source.generation).length === 0) return undefined;
    if (source.generation === generation) return 'Unable to resume snapshot source until handover completes.';
    if (!this.awaitsHandover(generation)) return undefined; // an older, handed-over table: nothing to hand over to it
    if (!source.ctx.isSuspended()) {
      return `Unable to perform snapshot handover until source is suspended. (source: ${source.ctx.mappedDeviceName}, not suspended)`;
    }
    return undefined;
  }

  /**
   * Table `generation` (instance `inst`) resumes (Linux snapshot_resume): it is active from now on, and on its first
   * resume it takes the state over from the source (__handover_exceptions), unless its handover was cancelled.
   * Returns whether `inst` owns the state.
   */
  resumeTable(inst: unknown, generation: number): boolean {
    const t = this.tables.get(generation);
    assert(t !== undefined, 'resumeTable: the table is not on this snapshot state');
    const source = this.handoverSource();
    const firstResume = !t.resumed;
    t.resumed = true;
    // A source that is not the owner is a table left Invalid (its own handover was cancelled): what it hands over
    // is Invalid too (__handover_exceptions copies the source's valid flag).
    const validSource = source === undefined || source.generation === this.ownerGeneration;
    if (this.owner !== inst && firstResume && !t.handoverCancelled && validSource) {
      this.owner = inst;
      this.ownerGeneration = generation;
    }
    return this.owner === inst;
  }

  /**
   * Table `generation` is being destroyed: when it is the handover source and tables wait for its exceptions (a
   * reload or snapshot-merge not resumed yet), their handover is cancelled (Linux snapshot_dtr: "Cancelling snapshot
   * handover."): they stay Invalid and never take over. Returns whether any was cancelled.
   */
  cancelHandoverFrom(generation: number): boolean {
    if (this.handoverSource()?.generation !== generation) return false;
    const waiting = this.waitingTables(generation);
    for (const t of waiting) t.handoverCancelled = true;
    return waiting.length > 0;
  }

  /** The merge driver when a snapshot-merge table uses this state (src/targets/snapshot/merger.ts). */
  merger: unknown = undefined;
  readonly table = new ExceptionTable();
  readonly pending = new Map<number, PendingException>();
  /** Copies in flight (Linux in_progress). */
  inProgress = 0;
  /** Writes waiting for inProgress to drop to COW_THRESHOLD. */
  private throttled: HeldBio[] = [];
  private startSequence = 0;
  private completeSequence = 0;
  private readonly outOfOrder = new Map<number, PendingException>();
  /** Snapshot reads in flight on the origin, per chunk (Linux tracked chunks). */
  private readonly trackedReads = new Map<number, number>();
  private readonly trackedReadWaiters = new Map<number, Array<() => void>>();
  /** Resolves waiters of drainPending(). */
  private pendingDrainWaiters: Array<() => void> = [];
  /** The context of the snapshot target that owns this state now (events, table events). */
  ctx: TargetContext;

  constructor(
    /** Name of the mapped device holding the snapshot (for events and messages). */
    public deviceName: string,
    readonly origin: DeviceRef,
    readonly cow: DeviceRef,
    readonly storeType: AnyExceptionStoreType,
    readonly store: unknown,
    readonly chunkSizeSectors: number,
    /** Size of the snapshot device: origin writes past it need no copy. */
    readonly sizeSectors: number,
    readonly persistent: boolean,
    readonly overflowMode: boolean,
    private readonly kcopyd: KcopydClient,
    ctx: TargetContext,
  ) {
    this.ctx = ctx;
  }

  usage(): ExceptionStoreUsage {
    return this.storeType.usage(this.store);
  }

  /** `dmsetup status` of a snapshot target on this state. */
  statusText(): string {
    if (!this.valid) return 'Invalid';
    if (this.mergeFailed) return 'Merge failed';
    if (this.overflowed) return 'Overflow';
    const u = this.usage();
    return `${u.sectorsAllocated}/${u.totalSectors} ${u.metadataSectors}`;
  }

  chunkOf(offsetSectors: number): number {
    return Math.floor(offsetSectors / this.chunkSizeSectors);
  }

  /** Is a write allowed to proceed now, or must it wait for copies to drain? Queues it when it must wait. */
  throttle(held: HeldBio): boolean {
    if (this.inProgress <= COW_THRESHOLD) return false;
    this.throttled.push(held);
    return true;
  }

  /** Allocates a pending exception for `chunk`; undefined when the COW is full. */
  newPending(chunk: number): PendingException | undefined {
    const newChunk = this.storeType.prepareException(this.store);
    if (newChunk === -1) return undefined;
    const pe = new PendingException(this, chunk as Chunk, newChunk, this.startSequence++);
    this.pending.set(chunk, pe);
    this.ctx.log.trace({ type: 'exception.prepared', device: this.deviceName, oldChunk: chunk, newChunk });
    return pe;
  }

  /** The origin region a pending exception copies (the last chunk may be short). */
  copySource(pe: PendingException): { sector: number; lengthSectors: number } {
    const sector = pe.oldChunk * this.chunkSizeSectors;
    return { sector, lengthSectors: Math.min(this.chunkSizeSectors, this.origin.device.sizeSectors - sector) };
  }

  accountStart(): void {
    this.inProgress++;
  }

  private accountEnd(): void {
    assert(this.inProgress > 0, 'accountEnd: no copy in progress');
    this.inProgress--;
    if (this.inProgress <= COW_THRESHOLD && this.throttled.length > 0) {
      const waiting = this.throttled;
      this.throttled = [];
      for (const h of waiting) h.ctx.retryBio(h.bio);
    }
  }

  /** A snapshot write covering the whole chunk: straight to the COW, then committed as if copied. */
  startFullBio(pe: PendingException, held: HeldBio): void {
    pe.started = true;
    pe.fullBio = held;
    this.accountStart();
    const bio = held.bio;
    this.cow.device
      .write((pe.newChunk * this.chunkSizeSectors) as Sector, bio.buf)
      .then(
        () => this.copyDone(pe, false),
        () => this.copyDone(pe, true),
      );
  }

  /** Called when a pending exception's data is in the COW (or failed to get there). */
  copyDone(pe: PendingException, error: boolean): void {
    pe.copyError = error;
    if (pe.sequence === this.completeSequence) {
      this.completeSequence++;
      this.completeException(pe);
      for (;;) {
        const next = this.outOfOrder.get(this.completeSequence);
        if (!next) break;
        this.outOfOrder.delete(this.completeSequence);
        this.completeSequence++;
        this.completeException(next);
      }
    } else {
      this.outOfOrder.set(pe.sequence, pe);
    }
    this.accountEnd();
  }

  private completeException(pe: PendingException): void {
    if (pe.copyError || !this.valid) {
      this.pendingComplete(pe, false);
      return;
    }
    this.storeType.commitException(this.store, pe.oldChunk, pe.newChunk, (success) => this.pendingComplete(pe, success));
  }

  private pendingComplete(pe: PendingException, success: boolean): void {
    let error = false;
    if (!success) {
      if (this.valid) this.invalidate(pe.copyError ? 'I/O error copying to the COW' : 'I/O error committing an exception');
      error = true;
    } else if (!this.valid) {
      error = true;
    } else {
      // From here on, snapshot reads of this chunk go to the COW.
      this.table.insert(pe.oldChunk, pe.newChunk);
    }
    const release = (): void => {
      this.pending.delete(pe.oldChunk);
      const ioError = error ? new DmError('DM_IO', `${this.deviceName}: snapshot is invalid`) : undefined;
      if (pe.fullBio) pe.fullBio.ctx.endBio(pe.fullBio.bio, error ? ioError : undefined);
      for (const h of pe.snapshotBios) {
        if (error) h.ctx.endBio(h.bio, ioError);
        else h.ctx.retryBio(h.bio);
      }
      // Origin writes go on whatever happened to the snapshot.
      for (const h of pe.originBios) h.ctx.retryBio(h.bio);
      if (this.pending.size === 0 && this.pendingDrainWaiters.length > 0) {
        const w = this.pendingDrainWaiters;
        this.pendingDrainWaiters = [];
        for (const f of w) f();
      }
    };
    // Snapshot reads of this chunk still reading the origin must finish before the origin may change.
    if (!error && (this.trackedReads.get(pe.oldChunk) ?? 0) > 0) {
      let w = this.trackedReadWaiters.get(pe.oldChunk);
      if (!w) this.trackedReadWaiters.set(pe.oldChunk, (w = []));
      w.push(release);
    } else release();
  }

  /** A snapshot read of a chunk with no completed exception: read the origin, tracked. */
  readFromOrigin(held: HeldBio, chunk: number, originSector: number): void {
    this.trackedReads.set(chunk, (this.trackedReads.get(chunk) ?? 0) + 1);
    const done = (err?: unknown): void => {
      const n = this.trackedReads.get(chunk)! - 1;
      if (n === 0) {
        this.trackedReads.delete(chunk);
        const w = this.trackedReadWaiters.get(chunk);
        if (w) {
          this.trackedReadWaiters.delete(chunk);
          for (const f of w) f();
        }
      } else this.trackedReads.set(chunk, n);
      held.ctx.endBio(held.bio, err);
    };
    this.origin.device.read(originSector as Sector, held.bio.buf).then(() => done(), done);
  }

  /** Starts copies for pending exceptions (from one origin bio: they share the source region). */
  static startCopies(kcopyd: KcopydClient, pes: readonly PendingException[]): void {
    // Group by source region: snapshots with the same chunk size copy the same origin bytes; one kcopyd job
    // fans out to up to 8 COW destinations.
    const groups = new Map<string, PendingException[]>();
    for (const pe of pes) {
      pe.state.accountStart();
      const src = pe.state.copySource(pe);
      const key = `${src.sector}:${src.lengthSectors}`;
      let g = groups.get(key);
      if (!g) groups.set(key, (g = []));
      g.push(pe);
    }
    for (const g of groups.values()) {
      for (let i = 0; i < g.length; i += 8) {
        const part = g.slice(i, i + 8);
        const src = part[0].state.copySource(part[0]);
        const origin = part[0].state.origin.device;
        kcopyd.copy(
          { device: origin, sector: src.sector as Sector, lengthSectors: src.lengthSectors as Sector },
          part.map((pe) => ({
            device: pe.state.cow.device,
            sector: (pe.newChunk * pe.state.chunkSizeSectors) as Sector,
            lengthSectors: src.lengthSectors as Sector,
          })),
          {},
          (readError, writeErrorMask) => {
            part.forEach((pe, j) => pe.state.copyDone(pe, readError || (writeErrorMask & (1 << j)) !== 0));
          },
        );
      }
    }
  }

  startCopy(pe: PendingException): void {
    pe.started = true;
    SnapshotState.startCopies(this.kcopyd, [pe]);
  }

  /** Linux __invalidate_snapshot: drop the store, mark invalid, raise a table event. */
  invalidate(reason: string): void {
    if (!this.valid) return;
    this.valid = false;
    this.ctx.tableEvent();
    void this.storeType.drop(this.store).catch(() => undefined);
    void this.ctx.log.append({ type: 'snapshot.invalidated', device: this.deviceName, reason, cow: this.persistent ? this.cow.label : undefined }, { durable: true }).catch(() => undefined);
  }

  /** PO snapshots: a full COW stops snapshot writes but keeps the snapshot readable. */
  overflow(): void {
    if (!this.valid || this.overflowed) return;
    this.overflowed = true;
    this.ctx.tableEvent();
    void this.ctx.log.append({ type: 'snapshot.overflowed', device: this.deviceName, cow: this.persistent ? this.cow.label : undefined }, { durable: true }).catch(() => undefined);
  }

  /** Waits until no pending exception is left. */
  async drainPending(): Promise<void> {
    while (this.pending.size > 0) await new Promise<void>((resolve) => this.pendingDrainWaiters.push(resolve));
  }

  /** Brings the COW's own metadata up to date (suspend, remove, shutdown). */
  async checkpoint(): Promise<void> {
    await this.drainPending();
    if (!this.storeType.checkpoint) return;
    await this.storeType.checkpoint(this.store);
    void this.ctx.log
      .append({ type: 'checkpoint.written', device: this.deviceName, cow: this.cow.label, exceptions: this.table.size })
      .catch(() => undefined);
  }

  /** For tests and tools: where a snapshot sector's data lives now. */
  lookup(chunk: number): number {
    return this.table.lookup(chunk as Chunk);
  }

  originDevice(): BlockDevice {
    return this.origin.device;
  }
}
