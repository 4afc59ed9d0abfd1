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

const RESOLVED: Promise<void> = Promise.resolve();
/** How long a region cleared in memory may wait before the log writes its clean record (when nothing else does). */
export const MIRROR_CLEAN_DELAY_MS = 100;

/** Watches compiled machine steps (tests compare them with xstate actors). */
export type MirrorMachineObserver = (machine: 'mirror-write-group' | 'mirror-write-transaction' | 'mirror-resync', id: string, fromState: number, eventIndex: number, toState: number) => void;

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
  observer: MirrorMachineObserver | undefined = undefined;
  nextGroupId = 1;
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
