/**
 * The state of one mirror (Linux struct mirror_set): its legs, the dirty log and region hash over it, the default
 * leg (resync source, the only leg read for regions out of sync), whether every region is in sync, the resync
 * driver, and the per-leg flush group commit. The write and read paths (write-group.ts, read-path.ts) and the
 * resync (resync-driver.ts) work on it.
 *
 * Errors (Linux fail_mirror): every error is counted on its leg and shown in status. With `handle_errors` a leg
 * that failed a write, flush or resync copy gets no more writes (the regions written meanwhile are marked out of
 * sync in the log), a failed default leg hands its role to a healthy one when the mirror is in sync, a table event
 * is raised, and the resync waits until the leg is re-added (`dmsetup message NAME 0 readd LEG`, or a table
 * reload). Without it the kernel keeps writing to every leg and ignores failed resync copies; so does this.
 */
import type { Sector } from '../../block/units.js';
import type { AnyDirtyLogType } from '../../dirty-logs/contract.js';
import { DmError } from '../../core/errors.js';
import type { TargetContext } from '../../core/target-contract.js';
import type { KcopydClient } from '../../kcopyd/kcopyd.js';
import type { DmEvent } from '../../log/events.js';
import { MirrorLeg, type LegErrorKind } from './leg.js';
import { LegFlusher } from './leg-flusher.js';
import { RegionHash } from './region-hash.js';
import { ResyncDriver } from './resync-driver.js';
import { formatMirrorFeatures } from './table-args.js';
import type { WriteGroup } from './write-group.js';

const RESOLVED: Promise<void> = Promise.resolve();
/** How long a region cleared in memory may wait before the log writes its clean record (when nothing else does). */
export const MIRROR_CLEAN_DELAY_MS = 100;

export type MirrorMachineName = 'mirror-write-group' | 'mirror-write-transaction' | 'mirror-resync';

/**
 * Watches compiled machine steps (tests compare them with xstate actors): `id` is the group's id (`N`), a
 * transaction's (`N.I`, I its index in the group's legs) or the device name (the resync).
 */
export type MirrorMachineObserver = (machine: MirrorMachineName, id: string, fromState: number, eventIndex: number, toState: number) => void;

/**
 * What the write and resync paths call on every step (MirrorSet.stepObserver): the write group (undefined for the
 * resync) and a transaction's index in `group.legs` (-1 for a group or the resync), nothing built for the call.
 */
export type MirrorStepObserver = (machine: MirrorMachineName, group: WriteGroup | undefined, index: number, fromState: number, eventIndex: number, toState: number) => void;

/** The write group ids of one mapped device, shared by its mirror sets (every mirror target, across reloads). */
export interface MirrorGroupIds {
  next: number;
}

/** Told when mirror sets come and go (the live inspector, which sets their inspect observer while someone watches). */
export interface MirrorSetsListener {
  added(set: MirrorSet): void;
  removed(set: MirrorSet): void;
}

/**
 * The mirror sets of one engine (a per-engine shared object, TargetContext.shared 'dm-mirror:sets', which the
 * engine hands to its live inspector): a set is added when its table is built and removed by its dtr. It also
 * numbers the write groups per mapped device, so that group ids stay unique across the mirror targets of a table
 * and across table reloads (actor ids 'mirror-write-group:DEVICE:N').
 */
export class MirrorSets {
  private readonly sets = new Set<MirrorSet>();
  private readonly perDevice = new Map<string, { ids: MirrorGroupIds; live: number }>();
  listener: MirrorSetsListener | undefined = undefined;

  add(set: MirrorSet): void {
    if (this.sets.has(set)) return;
    let d = this.perDevice.get(set.deviceName);
    if (d === undefined) {
      d = { ids: { next: 1 }, live: 0 };
      this.perDevice.set(set.deviceName, d);
    }
    d.live++;
    set.groupIds = d.ids;
    this.sets.add(set);
    this.listener?.added(set);
  }

  remove(set: MirrorSet): void {
    if (!this.sets.delete(set)) return;
    const d = this.perDevice.get(set.deviceName);
    if (d !== undefined && --d.live === 0) this.perDevice.delete(set.deviceName);
    this.listener?.removed(set);
  }

  [Symbol.iterator](): IterableIterator<MirrorSet> {
    return this.sets.values();
  }
}

export interface MirrorSetOptions {
  readonly ctx: TargetContext;
  readonly legs: readonly MirrorLeg[];
  readonly logType: AnyDirtyLogType;
  readonly log: unknown;
  readonly regionSizeSectors: Sector;
  readonly handleErrors: boolean;
  readonly keepLog: boolean;
  readonly kcopyd: KcopydClient;
  /** Pinned by a read-only replayed pool: no leg or log write, no resync (mirror.ts). Default false. */
  readonly readOnly?: boolean;
}

export class MirrorSet {
  readonly ctx: TargetContext;
  readonly legs: readonly MirrorLeg[];
  readonly logType: AnyDirtyLogType;
  readonly log: unknown;
  readonly regionSizeSectors: Sector;
  readonly regionCount: number;
  readonly handleErrors: boolean;
  readonly keepLog: boolean;
  /** Pinned by a read-only replayed pool: writes nothing to its legs or log, runs no resync (mirror.ts). */
  readonly readOnly: boolean;
  readonly rh: RegionHash;
  readonly flushers: readonly LegFlusher[];
  readonly resync: ResyncDriver;
  defaultLegIndex = 0;
  /** Every region in sync (Linux ms->in_sync); reset by a failed write, set when the resync finds no work. */
  inSync = false;
  /** The log failed to record something (Linux ms->log_failure). */
  logFailure = false;
  /** Between postsuspend and resume (and before the first resume). */
  suspended = true;
  resumedOnce = false;
  /**
   * Called on every step of a write group, write transaction or the resync (write-group.ts, resync-driver.ts test
   * `stepObserver !== undefined` first): undefined unless `observer` is set or live inspection watches this
   * mirror's actors, so nobody watching costs one comparison per step and allocates nothing.
   */
  stepObserver: MirrorStepObserver | undefined = undefined;
  private userObserver: MirrorMachineObserver | undefined = undefined;
  /** userObserver called with string ids. */
  private namedObserver: MirrorStepObserver | undefined = undefined;
  private inspectObserver: MirrorStepObserver | undefined = undefined;
  /** Next write group id; shared with the device's other mirror sets once registered (MirrorSets.add). */
  groupIds: MirrorGroupIds = { next: 1 };
  private readCursor = 0;
  private cleanTimer: ReturnType<TargetContext['clock']['setTimeout']> | undefined = undefined;

  constructor(o: MirrorSetOptions) {
    this.ctx = o.ctx;
    this.legs = o.legs;
    this.logType = o.logType;
    this.log = o.log;
    this.regionSizeSectors = o.regionSizeSectors;
    this.regionCount = o.logType.regionCount(o.log);
    this.handleErrors = o.handleErrors;
    this.keepLog = o.keepLog;
    this.readOnly = o.readOnly === true;
    this.flushers = o.legs.map((l) => new LegFlusher(l.device));
    this.rh = new RegionHash(this.regionCount, o.logType, o.log, {
      marked: (region) => {
        if (this.ctx.log.traceEnabled) this.ctx.log.trace({ type: 'mirror.region.marked', device: this.ctx.mappedDeviceName, region });
      },
      cleared: (region) => {
        if (this.ctx.log.traceEnabled) this.ctx.log.trace({ type: 'mirror.region.cleared', device: this.ctx.mappedDeviceName, region });
        this.scheduleClean();
      },
    });
    this.resync = new ResyncDriver(this, o.kcopyd);
  }

  get deviceName(): string {
    return this.ctx.mappedDeviceName;
  }

  /** A watcher of the machines' steps with string ids (tests); kept beside live inspection's. */
  get observer(): MirrorMachineObserver | undefined {
    return this.userObserver;
  }

  set observer(fn: MirrorMachineObserver | undefined) {
    this.userObserver = fn;
    this.namedObserver =
      fn === undefined
        ? undefined
        : (machine, g, i, from, event, to) => fn(machine, g === undefined ? this.deviceName : i < 0 ? `${g.id}` : `${g.id}.${i}`, from, event, to);
    this.combineObservers();
  }

  /** Live inspection's observer (src/inspect/live-inspector.ts): set while a watch wants this mirror's actors. */
  setInspectObserver(fn: MirrorStepObserver | undefined): void {
    this.inspectObserver = fn;
    this.combineObservers();
  }

  private combineObservers(): void {
    const named = this.namedObserver;
    const inspect = this.inspectObserver;
    this.stepObserver =
      named === undefined
        ? inspect
        : inspect === undefined
          ? named
          : (machine, g, i, from, event, to) => {
              named(machine, g, i, from, event, to);
              inspect(machine, g, i, from, event, to);
            };
  }

  get defaultLeg(): MirrorLeg {
    return this.legs[this.defaultLegIndex];
  }

  /** Region of a target-relative sector. */
  regionOf(offsetSectors: number): number {
    return Math.floor(offsetSectors / this.regionSizeSectors);
  }

  /** Legs a write goes to: all of them, except failed ones when errors are handled. */
  writeLegs(): MirrorLeg[] {
    return this.handleErrors ? this.legs.filter((l) => !l.failsWrites) : [...this.legs];
  }

  /** A leg failed and errors are handled: writes miss it, nothing can become in sync (md: the array is degraded). */
  get degraded(): boolean {
    return this.handleErrors && this.legs.some((l) => l.failsWrites);
  }

  /**
   * The leg to read a region from (Linux choose_mirror, balanced): any leg without errors, in turn, when the
   * region is in sync; else the default leg if it has no errors; else none.
   */
  chooseReadLeg(region: number): MirrorLeg | undefined {
    if (!this.rh.inSync(region)) return this.defaultLeg.healthy ? this.defaultLeg : undefined;
    const n = this.legs.length;
    for (let k = 0; k < n; k++) {
      const leg = this.legs[(this.readCursor + k) % n];
      if (leg.healthy) {
        this.readCursor = (leg.index + 1) % n;
        return leg;
      }
    }
    return undefined;
  }

  /** After a failed read: may it be tried on another leg (Linux default_ok || mirror_available)? */
  mayRetryRead(region: number): boolean {
    if (this.defaultLeg.healthy) return true;
    return this.rh.inSync(region) && this.legs.some((l) => l.healthy);
  }

  /**
   * Records a leg error (Linux fail_mirror). Returns the durable append of the event when the error is new for
   * the leg, so a write group can wait for it before completing its bio.
   */
  failLeg(leg: MirrorLeg, kind: LegErrorKind): Promise<void> {
    const wasDegraded = this.degraded;
    if (!leg.recordError(kind)) return RESOLVED;
    if (this.handleErrors) {
      if (leg === this.defaultLeg && (this.inSync || this.keepLog)) {
        const valid = this.legs.find((l) => l.healthy);
        if (valid) this.defaultLegIndex = valid.index;
      }
      if (!wasDegraded && this.degraded) this.logType.setDegraded(this.log, true);
      this.ctx.tableEvent();
    }
    return this.append(
      { type: 'mirror.leg.failed', device: this.deviceName, leg: leg.index, label: leg.label, error: kind, health: this.healthChars() },
      true,
    );
  }

  /** Clears a leg's errors and resyncs what it missed (regions out of sync in the log). */
  readdLeg(leg: MirrorLeg): Promise<void> {
    if (this.readOnly) return Promise.reject(new DmError('DM_NOT_SUPPORTED', `mirror: ${this.deviceName} is read-only (pinned by a replayed pool): no re-add`));
    leg.reset();
    if (!this.degraded) this.logType.setDegraded(this.log, false);
    const p = this.append({ type: 'mirror.leg.readded', device: this.deviceName, leg: leg.index, label: leg.label }, true);
    if (!this.suspended) this.resync.start();
    return p;
  }

  /** Every leg taking writes flushed (the log's flushLegs, Linux mirror_flush). A failed flush fails the leg (F). */
  flushAllLegs(): Promise<void> {
    const legs = this.writeLegs();
    return Promise.all(
      legs.map((l) =>
        this.flushers[l.index].request().catch((err: unknown) => {
          void this.failLeg(l, 'flush');
          throw err;
        }),
      ),
    ).then(() => undefined);
  }

  /** The log writes its clean records soon when nothing else makes it (a mark's flush carries them too). */
  private scheduleClean(): void {
    if (this.cleanTimer !== undefined || this.suspended) return;
    this.cleanTimer = this.ctx.clock.setTimeout(() => {
      this.cleanTimer = undefined;
      if (this.suspended) return;
      this.logType.flush(this.log).catch(() => {
        this.logFailure = true;
      });
    }, MIRROR_CLEAN_DELAY_MS);
  }

  cancelClean(): void {
    if (this.cleanTimer !== undefined) this.ctx.clock.clearTimeout(this.cleanTimer);
    this.cleanTimer = undefined;
  }

  /** Called when every region is in sync (Linux do_recovery: in_sync, table event, reset_ms_flags). */
  markAllInSync(raiseEvent: boolean): void {
    if (this.inSync) return;
    this.inSync = true;
    if (raiseEvent) this.ctx.tableEvent();
    for (const l of this.legs) l.reset();
    this.logType.setDegraded(this.log, false);
  }

  healthChars(): string {
    return this.legs.map((l) => l.statusChar()).join('');
  }

  /** `dmsetup status` (Linux mirror_status STATUSTYPE_INFO). */
  statusText(): string {
    const labels = this.legs.map((l) => l.label).join(' ');
    return `${this.legs.length} ${labels} ${this.logType.syncCount(this.log)}/${this.regionCount} 1 ${this.healthChars()} ${this.logType.status(this.log)}`;
  }

  /** `dmsetup table` (Linux mirror_status STATUSTYPE_TABLE). */
  tableText(): string {
    const legs = this.legs.map((l) => ` ${l.label} ${l.offsetSectors}`).join('');
    return `${this.logType.table(this.log)} ${this.legs.length}${legs}${formatMirrorFeatures(this.handleErrors, this.keepLog)}`;
  }

  append(event: DmEvent, durable: boolean): Promise<void> {
    return this.ctx.log.append(event, { durable }).then(
      () => undefined,
      () => undefined,
    );
  }
}
