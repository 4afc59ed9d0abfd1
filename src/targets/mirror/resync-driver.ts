/**
 * Drives the resync machine (machines/mirror-resync.ts) for one mirror: the effects of each state run here and
 * report back as machine events, stepped through the compiled table. One region at a time (Linux MAX_RECOVERY):
 * ask the log for a region out of sync, quiesce it (new writes wait, writes in flight drain), copy it with kcopyd
 * from the default leg to every other leg, record the result in the region hash and the log, then wait as the
 * throttle says and go on. Progress is in `dmsetup status` (the sync count), in `message NAME 0 resync-status`,
 * and in mirror.resync.progress / mirror.resync.done events.
 *
 * A read-only mirror (pinned by a replayed pool) never asks the log for work: SCANNING goes to IN_SYNC when every
 * region is in sync, else to STOPPED, as a suspended mirror's resync.
 *
 * Throttle (Linux dm-kcopyd's throttle, a percentage of time): after a copy that took T ms the driver waits
 * T × (100 − p) / p ms on the injected clock; 100 (the default) does not wait.
 */
import { mirrorResyncMachine, type MirrorResyncEvent } from '../../../machines/mirror-resync.js';
import type { Sector } from '../../block/units.js';
import { compileMachine } from '../../core/compiled-machine.js';
import type { ClockTimer } from '../../core/clock.js';
import type { KcopydClient } from '../../kcopyd/kcopyd.js';
import type { MirrorSet } from './mirror-set.js';

export type ResyncStateName = 'IDLE' | 'SCANNING' | 'QUIESCING' | 'COPYING' | 'THROTTLED' | 'IN_SYNC' | 'DEGRADED' | 'STOPPED';
export const RESYNC_MACHINE = compileMachine<ResyncStateName, MirrorResyncEvent['type']>(mirrorResyncMachine);
const E = Object.fromEntries(RESYNC_MACHINE.eventNames.map((n, i) => [n, i])) as Record<MirrorResyncEvent['type'], number>;

/** A progress event at most this often (ms of the injected clock), and at least every this many regions. */
export const RESYNC_PROGRESS_INTERVAL_MS = 1000;
export const RESYNC_PROGRESS_REGIONS = 256;
/** Events queued while the driver is inside a transition, at most (a loop would be a bug). */
const RESYNC_EVENT_QUEUE_MAX = 64;

export interface ResyncProgress {
  readonly state: ResyncStateName;
  readonly regionsInSync: number;
  readonly regionsTotal: number;
  /** Regions copied since the mirror was activated. */
  readonly regionsCopied: number;
  /** Regions copied in the current (or last) run: since the resync last started from IN_SYNC, DEGRADED or IDLE. */
  readonly runRegionsCopied: number;
  readonly throttlePercent: number;
  /** Injected-clock time the current (or last) run has taken so far (or took), in ms. */
  readonly runElapsedMs: number;
}

export class ResyncDriver {
  private stateIndex = RESYNC_MACHINE.initialIndex;
  private readonly queue: number[] = [];
  private stepping = false;
  private stopRequested = false;
  private stopWaiters: Array<() => void> = [];
  private timer: ClockTimer | undefined = undefined;
  private region = -1;
  private copyStartMs = 0;
  private lastProgressMs = -Infinity;
  regionsCopied = 0;
  runRegionsCopied = 0;
  /** When the current (or last) run started and, once in sync, ended (injected clock, ms). */
  runStartedMs = 0;
  runEndedMs: number | undefined = undefined;
  throttlePercent = 100;
  /** Regions recovered with errors ignored (no handle_errors). */
  regionsCopyFailed = 0;

  constructor(
    private readonly ms: MirrorSet,
    private readonly kcopyd: KcopydClient,
  ) {}

  get state(): ResyncStateName {
    return RESYNC_MACHINE.stateNames[this.stateIndex];
  }

  progress(): ResyncProgress {
    return {
      state: this.state,
      regionsInSync: this.ms.logType.syncCount(this.ms.log),
      regionsTotal: this.ms.regionCount,
      regionsCopied: this.regionsCopied,
      runRegionsCopied: this.runRegionsCopied,
      throttlePercent: this.throttlePercent,
      runElapsedMs: (this.runEndedMs ?? this.ms.ctx.clock.nowMs()) - this.runStartedMs,
    };
  }

  /** Starts (or restarts) looking for regions to copy. */
  start(): void {
    this.stopRequested = false;
    const st = this.state;
    if (st === 'IDLE' || st === 'IN_SYNC' || st === 'DEGRADED' || st === 'STOPPED') {
      if (st !== 'STOPPED') {
        this.runRegionsCopied = 0;
        this.runStartedMs = this.ms.ctx.clock.nowMs();
      }
      this.runEndedMs = undefined;
      this.send(E.START);
    }
  }

  /** Stops after the region in flight; resolves once stopped. */
  stop(): Promise<void> {
    const st = this.state;
    if (st === 'STOPPED') return Promise.resolve();
    if (st === 'QUIESCING' || st === 'COPYING') {
      this.stopRequested = true;
      return new Promise((resolve) => this.stopWaiters.push(resolve));
    }
    if (this.timer !== undefined) {
      this.ms.ctx.clock.clearTimeout(this.timer);
      this.timer = undefined;
    }
    this.send(E.STOP);
    return Promise.resolve();
  }

  private send(event: number): void {
    if (this.queue.length >= RESYNC_EVENT_QUEUE_MAX) throw new Error('mirror resync: event queue overflow');
    this.queue.push(event);
    if (this.stepping) return;
    this.stepping = true;
    try {
      while (this.queue.length > 0) {
        const e = this.queue.shift()!;
        const from = this.stateIndex;
        this.stateIndex = RESYNC_MACHINE.step(from, e);
        if (this.ms.stepObserver !== undefined) this.ms.stepObserver('mirror-resync', undefined, -1, from, e, this.stateIndex);
        this.enter(this.state);
      }
    } finally {
      this.stepping = false;
    }
  }

  private enter(state: ResyncStateName): void {
    const ms = this.ms;
    switch (state) {
      case 'SCANNING': {
        if (this.stopRequested) return this.send(E.STOP);
        if (ms.degraded) return this.send(E.DEGRADE);
        // A read-only (pinned) mirror copies nothing: in sync when the log says so, else stopped as if suspended.
        if (ms.readOnly) return this.send(ms.logType.syncCount(ms.log) === ms.regionCount ? E.NO_WORK : E.STOP);
        const r = ms.logType.getResyncWork(ms.log);
        if (r === undefined) return this.send(E.NO_WORK);
        this.region = r;
        return this.send(E.REGION_FOUND);
      }
      case 'QUIESCING':
        return ms.rh.recoveryPrepare(this.region, () => this.send(E.QUIESCED));
      case 'COPYING':
        return this.copy();
      case 'THROTTLED': {
        this.maybeProgress();
        if (this.stopRequested) return this.send(E.STOP);
        const p = this.throttlePercent;
        const delayMs = p >= 100 ? 0 : ((ms.ctx.clock.nowMs() - this.copyStartMs) * (100 - p)) / p;
        if (delayMs <= 0) return this.send(E.NEXT);
        this.timer = ms.ctx.clock.setTimeout(() => {
          this.timer = undefined;
          if (this.state === 'THROTTLED') this.send(E.NEXT);
        }, delayMs);
        return;
      }
      case 'IN_SYNC': {
        this.runEndedMs = ms.ctx.clock.nowMs();
        if (ms.logType.syncCount(ms.log) === ms.regionCount) {
          const copied = this.runRegionsCopied;
          ms.markAllInSync(copied > 0);
          if (copied > 0) void ms.append({ type: 'mirror.resync.done', device: ms.deviceName, ...this.counts() }, true);
        }
        if (this.stopRequested) return this.send(E.STOP);
        return;
      }
      case 'DEGRADED':
        if (this.stopRequested) return this.send(E.STOP);
        return;
      case 'STOPPED': {
        this.stopRequested = false;
        const w = this.stopWaiters;
        this.stopWaiters = [];
        for (const f of w) f();
        return;
      }
      default:
        return;
    }
  }

  private counts(): { regionsInSync: number; regionsTotal: number; regionsCopied: number } {
    return { regionsInSync: this.ms.logType.syncCount(this.ms.log), regionsTotal: this.ms.regionCount, regionsCopied: this.runRegionsCopied };
  }

  private maybeProgress(): void {
    const now = this.ms.ctx.clock.nowMs();
    if (now - this.lastProgressMs < RESYNC_PROGRESS_INTERVAL_MS && this.runRegionsCopied % RESYNC_PROGRESS_REGIONS !== 0) return;
    this.lastProgressMs = now;
    void this.ms.append({ type: 'mirror.resync.progress', device: this.ms.deviceName, ...this.counts() }, false);
  }

  /** Copies the quiesced region from the default leg to every other leg (Linux recover). */
  private copy(): void {
    const ms = this.ms;
    const region = this.region;
    const source = ms.defaultLeg;
    const startSector = region * ms.regionSizeSectors;
    const lengthSectors = Math.min(ms.regionSizeSectors, ms.ctx.lengthSectors - startSector) as Sector;
    const dests = ms.legs.filter((l) => l !== source);
    this.copyStartMs = ms.ctx.clock.nowMs();
    this.kcopyd.copy(
      { device: source.device, sector: (source.offsetSectors + startSector) as Sector, lengthSectors },
      dests.map((l) => ({ device: l.device, sector: (l.offsetSectors + startSector) as Sector, lengthSectors })),
      { ignoreError: !ms.handleErrors },
      (readError, writeErrorMask) => {
        if (readError) void ms.failLeg(source, 'sync');
        dests.forEach((l, i) => {
          if (writeErrorMask & (1 << i)) void ms.failLeg(l, 'sync');
        });
        const failed = readError || writeErrorMask !== 0;
        if (failed) this.regionsCopyFailed++;
        // Without handle_errors the kernel calls the region in sync anyway (complete_resync_work(reg, 1)).
        const success = !failed || !ms.handleErrors;
        ms.rh.recoveryEnd(region, success);
        if (success) {
          this.regionsCopied++;
          this.runRegionsCopied++;
        }
        this.send(success ? E.COPIED : E.COPY_FAILED);
      },
    );
  }
}
