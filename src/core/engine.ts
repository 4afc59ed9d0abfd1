/**
 * The engine: the named mapped devices of one pool and the dmsetup operations on them (Linux dm-ioctl.c).
 * Control operations run one at a time (a mutex), each producing an event that is durable, together with the
 * device's record, before the operation returns. On open, the devices are rebuilt from those records: tables
 * loaded in dependency order, suspended ones left suspended.
 */
import * as path from 'node:path';
import { createActor, type Actor, type InspectionEvent } from 'xstate';
import { bioMachine } from '../../machines/bio.js';
import type { BlockDevice } from '../block/contract.js';
import { BackingDevices } from './backing-devices.js';
import { BIO_MACHINE, type Bio } from './bio.js';
import { createSystemClock, type Clock } from './clock.js';
import { assert } from './assert.js';
import { DmError, isDmError } from './errors.js';
import { MappedDevice, type BioObserver } from './mapped-device.js';
import { createRng, type Rng } from './rng.js';
import { Table, type TableBuildHooks } from './table.js';
import { parseTable } from './table-parser.js';
import type { DeviceRef, TargetContext } from './target-contract.js';
import { createDefaultTargetRegistry, type TargetRegistry } from './target-registry.js';
import { EventLog, type BatchOp, type LevelDb } from '../log/event-log.js';
import type { DmEvent } from '../log/events.js';
import type { PoolState } from '../replay/pool-state.js';
import { livePoolState, SNAPSHOT_STATES_KEY } from '../replay/live-state.js';
import { stateDigest } from '../replay/digest.js';
import type { SnapshotState } from '../targets/snapshot/snapshot-state.js';
import { LiveInspector, combineBioObservers } from '../inspect/live-inspector.js';

/** Linux's dynamic major for device-mapper; minors are handed out lowest-free like the kernel does. */
export const DM_MAJOR = 253;
/** The kernel limits names to 127 bytes (DM_NAME_LEN - 1). */
export const DEVICE_NAME_LENGTH_MAX = 127;
export const DEVICES_MAX = 1 << 20;
/** How often the event log stores the pool's state (events), so that replay starts near its target. */
export const STATE_SNAPSHOT_EVENTS_DEFAULT = 100_000;

/** What the pool stores per device; enough to rebuild it. */
export interface DeviceRecord {
  readonly name: string;
  readonly minor: number;
  readonly uuid?: string;
  readonly readOnly: boolean;
  /** Creation order, for restoring. */
  readonly order: number;
  /** `dmsetup table` lines with canonical device labels (absolute paths, mapped device names). */
  readonly live: string[] | null;
  readonly inactive: string[] | null;
  readonly suspended: boolean;
  readonly hadTable?: boolean;
  /** The live table was swapped in by a resume its preresume refused: it was never resumed (absent: it was). */
  readonly liveNotResumed?: boolean;
}

export interface DeviceInfo {
  readonly name: string;
  readonly major: number;
  readonly minor: number;
  readonly uuid: string | undefined;
  readonly suspended: boolean;
  readonly readOnly: boolean;
  readonly liveTable: boolean;
  readonly inactiveTable: boolean;
  readonly openCount: number;
  readonly eventNr: number;
  readonly targetCount: number;
  readonly sizeSectors: number;
  /** A table was loaded at some point (the kernel creates the disk, and its read-ahead, then). */
  readonly hadTable: boolean;
}

export interface EngineOptions {
  /** Opened LevelDB (or memory-level) of the pool; none = nothing persisted. */
  readonly db?: LevelDb;
  readonly clock?: Clock;
  readonly rng?: Rng;
  readonly seed?: number;
  /** Emit bio lifecycle events (trace level). */
  readonly trace?: boolean;
  /**
   * Run a full xstate actor per bio beside the compiled hot path, with this inspector attached; every
   * transition is checked against the compiled form. Slow: for inspection and tests.
   */
  readonly inspect?: (event: InspectionEvent) => void;
  readonly targets?: TargetRegistry;
  /** Devices usable in tables under these labels, registered before the stored devices are restored. */
  readonly backingDevices?: Readonly<Record<string, BlockDevice>>;
  /** The event log stores the pool's state every this many events, for fast replay (default 100000; 0: never). */
  readonly stateSnapshotEvents?: number;
}

export interface CreateOptions {
  /** Table text; without it the device is created with no table (dmsetup --notable). */
  readonly table?: string;
  readonly uuid?: string;
  readonly readOnly?: boolean;
  /** Directory against which relative file paths in the table resolve (the client's cwd). */
  readonly cwd?: string;
}

export class Engine {
  readonly log: EventLog;
  readonly clock: Clock;
  readonly rng: Rng;
  readonly targets: TargetRegistry;
  readonly backing = new BackingDevices();
  private readonly devices = new Map<string, MappedDevice>();
  private readonly order = new Map<string, number>();
  /** Per-engine objects targets share (see TargetContext.shared). */
  private readonly sharedObjects = new Map<string, unknown>();
  private nextOrder = 1;
  private opChain: Promise<unknown> = Promise.resolve();
  private closed = false;
  private readonly inspect: ((event: InspectionEvent) => void) | undefined;
  /** The xstate checker of each device (the `inspect` option), combined with the live inspector's observer. */
  private readonly xstateCheckers = new WeakMap<MappedDevice, BioObserver>();
  /** Live inspection (src/inspect/live-inspector.ts): off until someone watches. */
  readonly inspector: LiveInspector;
  /** Live tables swapped in by a refused resume (see refuseResume): their targets have not been resumed yet. */
  private readonly notResumed = new WeakSet<Table>();

  private constructor(log: EventLog, options: EngineOptions) {
    this.log = log;
    this.clock = options.clock ?? createSystemClock();
    this.rng = options.rng ?? createRng(options.seed ?? 1);
    this.targets = options.targets ?? createDefaultTargetRegistry();
    this.inspect = options.inspect;
    log.traceEnabled = options.trace === true;
    this.inspector = new LiveInspector({
      clock: this.clock,
      events$: log.events$,
      onBioWatchChange: () => {
        for (const d of this.devices.values()) this.refreshBioObserver(d);
      },
    });
  }

  /** Opens an engine over a pool database, restoring its devices. */
  static async open(options: EngineOptions = {}): Promise<Engine> {
    const clock = options.clock ?? createSystemClock();
    const log = await EventLog.open(options.db, clock, { stateSnapshotEvents: options.stateSnapshotEvents ?? STATE_SNAPSHOT_EVENTS_DEFAULT });
    const engine = new Engine(log, { ...options, clock });
    for (const [label, device] of Object.entries(options.backingDevices ?? {})) engine.registerBackingDevice(label, device);
    await engine.restore();
    return engine;
  }

  /** The event stream (typed events as they happen). */
  get events$() {
    return this.log.events$;
  }

  /** Runs control operations one at a time. */
  private serialize<T>(op: () => Promise<T>): Promise<T> {
    const run = this.opChain.then(() => {
      if (this.closed) throw new DmError('DM_CLOSED', 'engine is closed');
      return op();
    });
    this.opChain = run.catch(() => undefined);
    return run;
  }

  // ---- queries -------------------------------------------------------------------------------------------

  /** The mapped device of that name, or undefined. */
  device(name: string): MappedDevice | undefined {
    return this.devices.get(name);
  }

  private mustGet(name: string): MappedDevice {
    const d = this.devices.get(name);
    if (!d) throw new DmError('DM_NO_SUCH_DEVICE', `${name}: Device does not exist`);
    return d;
  }

  /** The pool's state as this engine holds it (devices, tables, persistent snapshots' exceptions): src/replay/live-state.ts. */
  poolState(): PoolState {
    const devices = [...this.devices.values()].sort((a, b) => (this.order.get(a.name) ?? 0) - (this.order.get(b.name) ?? 0));
    const snapshotStates = this.sharedObjects.get(SNAPSHOT_STATES_KEY) as ReadonlyMap<unknown, SnapshotState> | undefined;
    return livePoolState({ devices, snapshotStates, lastSeq: this.log.lastSeq });
  }

  /** The digest of poolState(); equals `dmstate replay`'s digest of the log when the log is complete. */
  stateDigest(): string {
    return stateDigest(this.poolState());
  }

  /** Device names, sorted. */
  names(): string[] {
    return [...this.devices.keys()].sort();
  }

  info(name: string): DeviceInfo {
    const d = this.mustGet(name);
    return {
      name: d.name,
      major: DM_MAJOR,
      minor: d.minor,
      uuid: d.uuid,
      suspended: d.suspended,
      readOnly: d.readOnly,
      liveTable: d.live !== undefined,
      inactiveTable: d.inactive !== undefined,
      openCount: d.openCount,
      eventNr: d.eventNr,
      targetCount: d.live ? d.live.targets.length : 0,
      sizeSectors: d.sizeSectors,
      hadTable: d.hadTable,
    };
  }

  /** `dmsetup table` lines of the live (or inactive) table. */
  table(name: string, inactive = false): string[] {
    const d = this.mustGet(name);
    const t = inactive ? d.inactive : d.live;
    return t ? t.tableLines() : [];
  }

  /** `dmsetup status` lines of the live (or inactive) table. */
  status(name: string, inactive = false): string[] {
    const d = this.mustGet(name);
    const t = inactive ? d.inactive : d.live;
    return t ? t.statusLines() : [];
  }

  /** Target names used by the live table of a device. */
  targetNames(name: string): string[] {
    const d = this.mustGet(name);
    return d.live ? d.live.targets.map((t) => t.type.name) : [];
  }

  /** Target names used by the inactive table of a device. */
  inactiveTargetNames(name: string): string[] {
    const d = this.mustGet(name);
    return d.inactive ? d.inactive.targets.map((t) => t.type.name) : [];
  }

  // ---- operations ----------------------------------------------------------------------------------------

  /** dmsetup create: a new device, with its table loaded and resumed when one is given. */
  create(name: string, options: CreateOptions = {}): Promise<void> {
    return this.serialize(async () => {
      checkName(name);
      if (this.devices.has(name)) throw new DmError('DM_DEVICE_EXISTS', `${name}: Device or resource busy (a device of that name exists)`);
      if (options.uuid !== undefined) {
        if (options.uuid.length > DEVICE_NAME_LENGTH_MAX) throw new DmError('DM_INVALID_ARGUMENT', `uuid is longer than ${DEVICE_NAME_LENGTH_MAX}`);
        for (const d of this.devices.values()) {
          if (d.uuid === options.uuid) throw new DmError('DM_DEVICE_EXISTS', `uuid ${options.uuid} is used by ${d.name}`);
        }
      }
      if (this.devices.size >= DEVICES_MAX) throw new DmError('DM_INVALID_ARGUMENT', `more than ${DEVICES_MAX} devices`);
      const minor = this.lowestFreeMinor();
      const device = new MappedDevice(name, minor, options.uuid, options.readOnly === true, this.log);
      // Build the table before the device is visible, so a bad table leaves nothing behind.
      let table: Table | undefined;
      if (options.table !== undefined) table = await this.buildTable(device, options.table, options.cwd);
      // dmsetup create is create + load + resume; libdm removes the device when that resume fails: nothing is left.
      if (table) {
        try {
          await this.preresumeTargets(device, table);
        } catch (err) {
          await table.destroy(this.hooksFor(device));
          throw err;
        }
      }
      device.live = table;
      device.hadTable = table !== undefined;
      this.attachObserver(device);
      this.devices.set(name, device);
      this.order.set(name, this.nextOrder++);
      if (table) await this.resumeTargets(table);
      await this.commit(device, { type: 'device.created', device: name, minor, uuid: options.uuid, readOnly: device.readOnly });
      if (table) await this.commit(device, { type: 'device.resumed', device: name, table: table.tableLines(), swapped: true });
    });
  }

  /** dmsetup load: builds a table into the inactive slot (replacing any inactive table). */
  load(name: string, tableText: string, options: { cwd?: string } = {}): Promise<void> {
    return this.serialize(async () => {
      const device = this.mustGet(name);
      const table = await this.buildTable(device, tableText, options.cwd);
      const old = device.inactive;
      device.inactive = table;
      device.hadTable = true;
      if (old) await old.destroy(this.hooksFor(device));
      await this.commit(device, { type: 'table.loaded', device: name, table: table.tableLines() });
    });
  }

  /** dmsetup clear: drops the inactive table. */
  clear(name: string): Promise<void> {
    return this.serialize(async () => {
      const device = this.mustGet(name);
      const old = device.inactive;
      device.inactive = undefined;
      if (old) await old.destroy(this.hooksFor(device));
      await this.commit(device, { type: 'table.cleared', device: name });
    });
  }

  /** dmsetup suspend: new bios queue, in-flight ones drain, then targets run their postsuspend. */
  suspend(name: string): Promise<void> {
    return this.serialize(async () => {
      const device = this.mustGet(name);
      if (device.suspended) return;
      await device.suspendAndDrain();
      if (device.live) for (const t of device.live.targets) if (t.type.postsuspend) await t.type.postsuspend(t.instance);
      await this.commit(device, { type: 'device.suspended', device: name });
    });
  }

  /** dmsetup resume: swaps in the inactive table if there is one, then lets queued bios through. */
  resume(name: string): Promise<void> {
    return this.serialize(async () => {
      const device = this.mustGet(name);
      const swapping = device.inactive !== undefined;
      if (swapping && !device.suspended) {
        await device.suspendAndDrain();
        if (device.live) for (const t of device.live.targets) if (t.type.postsuspend) await t.type.postsuspend(t.instance);
      }
      let old: Table | undefined;
      if (swapping) {
        old = device.live;
        device.live = device.inactive;
        device.inactive = undefined;
      }
      // Linux do_resume calls dm_resume (and the targets' preresume) only for a suspended device.
      if (device.suspended && device.live) {
        try {
          await this.preresumeTargets(device, device.live);
        } catch (err) {
          if (swapping) await this.refuseResume(device, old);
          throw err;
        }
      }
      if (device.live) await this.resumeTargets(device.live);
      if (device.live) this.notResumed.delete(device.live);
      device.resumeQueued();
      if (old) await old.destroy(this.hooksFor(device));
      await this.commit(device, { type: 'device.resumed', device: name, table: device.live ? device.live.tableLines() : [], swapped: swapping });
    });
  }

  /** dmsetup remove: the device must not be in use; queued bios fail. */
  remove(name: string): Promise<void> {
    return this.serialize(() => this.removeOne(name));
  }

  /** dmsetup remove_all: removes every unused device, stacked ones first. */
  removeAll(): Promise<void> {
    return this.serialize(async () => {
      for (;;) {
        const free = this.names().filter((n) => this.devices.get(n)!.openCount === 0);
        if (free.length === 0) break;
        for (const n of free) await this.removeOne(n);
      }
    });
  }

  private async removeOne(name: string): Promise<void> {
    const device = this.mustGet(name);
    if (device.openCount > 0) throw new DmError('DM_DEVICE_BUSY', `${name}: Device or resource busy (open count ${device.openCount})`);
    if (!device.suspended) await device.suspendAndDrain();
    device.killQueued();
    const hooks = this.hooksFor(device);
    if (device.inactive) await device.inactive.destroy(hooks);
    if (device.live) {
      for (const t of device.live.targets) if (t.type.postsuspend) await t.type.postsuspend(t.instance);
      await device.live.destroy(hooks);
    }
    device.live = undefined;
    device.inactive = undefined;
    device.markClosed();
    this.devices.delete(name);
    this.order.delete(name);
    await this.log.append(
      { type: 'device.removed', device: name },
      { durable: true, ops: [{ type: 'del', sublevel: 'devices', key: name }] },
    );
  }

  /**
   * dmsetup message. `mark <name>` (any device, any sector) appends a named mark to the event log; other
   * messages go to the target holding `sector`.
   */
  message(name: string, sector: number, args: readonly string[]): Promise<string> {
    return this.serialize(async () => {
      const device = this.mustGet(name);
      if (args.length === 0) throw new DmError('DM_INVALID_ARGUMENT', 'message: no message given');
      if (args[0] === 'mark') {
        if (args.length !== 2) throw new DmError('DM_INVALID_ARGUMENT', 'message: usage: mark <name>');
        await this.log.append({ type: 'mark', device: name, name: args[1] }, { durable: true });
        // A target that logs marks itself (log-writes) gets them too, as in the kernel.
        const inRange = device.live !== undefined && Number.isSafeInteger(sector) && sector >= 0 && sector < device.live.sizeSectors;
        const slot = inRange ? device.live!.targets[device.live!.findTargetIndex(sector)] : undefined;
        return slot?.type.takesMarks && slot.type.message ? slot.type.message(slot.instance, args) : '';
      }
      if (!device.live) throw new DmError('DM_NO_TABLE', `${name}: device has no live table`);
      if (!Number.isSafeInteger(sector) || sector < 0 || sector >= device.live.sizeSectors) {
        throw new DmError('DM_INVALID_ARGUMENT', `${name}: message sector ${sector} is outside the device`);
      }
      const slot = device.live.targets[device.live.findTargetIndex(sector)];
      if (!slot.type.message) throw new DmError('DM_NOT_SUPPORTED', `${name}: Target type does not support messages`);
      return slot.type.message(slot.instance, args);
    });
  }

  /** Lets tables use `device` under `label` (library embedding, tests, benchmarks). */
  registerBackingDevice(label: string, device: BlockDevice): void {
    this.backing.register(label, device);
  }

  /** Suspends nothing, writes everything queued, releases every device. */
  async close(): Promise<void> {
    await this.serialize(async () => {
      await this.log.append({ type: 'engine.stopped' }, { durable: true });
      // Tear down without recording removals: the records stay for the next open.
      for (;;) {
        const free = this.names().filter((n) => this.devices.get(n)!.openCount === 0);
        if (free.length === 0) break;
        for (const n of free) {
          const d = this.devices.get(n)!;
          if (!d.suspended) await d.suspendAndDrain();
          d.killQueued();
          const hooks = this.hooksFor(d);
          if (d.live) for (const t of d.live.targets) if (t.type.postsuspend) await t.type.postsuspend(t.instance);
          if (d.inactive) await d.inactive.destroy(hooks);
          if (d.live) await d.live.destroy(hooks);
          d.markClosed();
          this.devices.delete(n);
        }
      }
      assert(this.devices.size === 0, 'close: devices left');
      await this.backing.closeAll();
      this.closed = true;
    });
    await this.log.close();
    this.inspector.close();
  }

  // ---- internals -----------------------------------------------------------------------------------------

  private lowestFreeMinor(): number {
    const used = new Set([...this.devices.values()].map((d) => d.minor));
    let m = 0;
    while (used.has(m)) m++;
    return m;
  }

  private record(device: MappedDevice): DeviceRecord {
    return {
      name: device.name,
      minor: device.minor,
      uuid: device.uuid,
      readOnly: device.readOnly,
      order: this.order.get(device.name) ?? 0,
      live: device.live ? device.live.tableLines() : null,
      inactive: device.inactive ? device.inactive.tableLines() : null,
      suspended: device.suspended,
      hadTable: device.hadTable,
      liveNotResumed: device.live !== undefined && this.notResumed.has(device.live) ? true : undefined,
    };
  }

  /** Appends a durable event together with the device's new record. */
  private async commit(device: MappedDevice, event: DmEvent): Promise<void> {
    const ops: BatchOp[] = [{ type: 'put', sublevel: 'devices', key: device.name, value: this.record(device) }];
    await this.log.append(event, { durable: true, ops });
  }

  private async buildTable(device: MappedDevice, text: string, cwd: string | undefined): Promise<Table> {
    const lines = parseTable(text);
    return Table.build(lines, this.targets, this.hooksFor(device, cwd));
  }

  private hooksFor(device: MappedDevice, cwd?: string): TableBuildHooks {
    return {
      makeContext: (beginSector, lengthSectors, opened, limits) => this.makeContext(device, beginSector, lengthSectors, opened, limits, cwd),
      releaseDevice: (ref) => this.releaseDevice(ref),
    };
  }

  private makeContext(
    device: MappedDevice,
    beginSector: number,
    lengthSectors: number,
    opened: DeviceRef[],
    limits: { maxIoSectors: number },
    cwd: string | undefined,
  ): TargetContext {
    return {
      mappedDeviceName: device.name,
      beginSector: beginSector as TargetContext['beginSector'],
      lengthSectors: lengthSectors as TargetContext['lengthSectors'],
      openDevice: async (spec: string) => {
        const ref = await this.openDevice(device, spec, cwd);
        opened.push(ref);
        return ref;
      },
      endBio: (bio: Bio, error?: unknown) => device.endHeld(bio, error),
      retryBio: (bio: Bio) => device.retryHeld(bio),
      setMaxIoSectors: (sectors: number) => {
        assert(Number.isSafeInteger(sectors) && sectors >= 0, 'setMaxIoSectors: bad value');
        limits.maxIoSectors = sectors;
      },
      shared: <T>(key: string, create: () => T): T => {
        let v = this.sharedObjects.get(key) as T | undefined;
        if (v === undefined) {
          v = create();
          this.sharedObjects.set(key, v);
          this.inspector.adopt(v);
        }
        return v;
      },
      walFor: (cow: DeviceRef) => this.log.walFor(cow.label),
      tableEvent: () => {
        device.eventNr++;
      },
      isSuspended: () => device.suspended,
      clock: this.clock,
      rng: this.rng,
      log: this.log,
    };
  }

  /**
   * Resolves a table's device argument: `/dev/mapper/NAME`, `253:MINOR` or a bare NAME of a mapped device, a
   * label registered by the embedding program, else a file path (relative to the client's cwd).
   */
  private async openDevice(self: MappedDevice, spec: string, cwd: string | undefined): Promise<DeviceRef> {
    let mappedName: string | undefined;
    const mm = /^(\d+):(\d+)$/.exec(spec);
    if (mm) {
      const major = Number(mm[1]);
      const minor = Number(mm[2]);
      const d = major === DM_MAJOR ? [...this.devices.values()].find((x) => x.minor === minor) : undefined;
      if (!d) throw new DmError('DM_TABLE_INVALID', `device ${spec} not found`);
      mappedName = d.name;
    } else if (spec.startsWith('/dev/mapper/')) {
      mappedName = spec.slice('/dev/mapper/'.length);
      if (!this.devices.has(mappedName)) throw new DmError('DM_TABLE_INVALID', `device ${spec} not found`);
    } else if (!spec.includes('/') && this.devices.has(spec)) {
      mappedName = spec;
    }
    if (mappedName !== undefined) {
      if (mappedName === self.name || this.dependsOn(mappedName, self.name)) {
        throw new DmError('DM_TABLE_INVALID', `${self.name}: table would make a loop through ${mappedName}`);
      }
      const target = this.devices.get(mappedName)!;
      target.openCount++;
      return { device: target, label: mappedName };
    }
    const registered = this.backing.getRegistered(spec);
    if (registered) return { device: registered, label: spec };
    if (spec === '') throw new DmError('DM_TABLE_INVALID', 'empty device argument');
    const abs = path.resolve(cwd ?? process.cwd(), spec);
    const device = await this.backing.openFile(abs, false);
    return { device, label: abs };
  }

  /** Whether mapped device `name` uses `other`, directly or through other mapped devices. */
  private dependsOn(name: string, other: string): boolean {
    const seen = new Set<string>();
    const stack = [name];
    while (stack.length) {
      const n = stack.pop()!;
      if (n === other) return true;
      if (seen.has(n)) continue;
      seen.add(n);
      const d = this.devices.get(n);
      if (!d) continue;
      for (const t of [d.live, d.inactive]) if (t) for (const l of t.deviceLabels()) if (this.devices.has(l)) stack.push(l);
    }
    return false;
  }

  private async releaseDevice(ref: DeviceRef): Promise<void> {
    if (ref.device instanceof MappedDevice) {
      ref.device.openCount--;
      assert(ref.device.openCount >= 0, 'open count below zero');
      return;
    }
    if (this.backing.getRegistered(ref.label) === ref.device) return;
    await this.backing.releaseFile(ref.label);
  }

  private async resumeTargets(table: Table): Promise<void> {
    for (const t of table.targets) if (t.type.resume) await t.type.resume(t.instance);
  }

  /** Runs the targets' preresume; a refusal comes back as the kernel logs it: "<device>: <target>: preresume failed". */
  private async preresumeTargets(device: MappedDevice, table: Table): Promise<void> {
    for (const t of table.targets) {
      if (!t.type.preresume) continue;
      try {
        await t.type.preresume(t.instance);
      } catch (err) {
        if (!isDmError(err)) throw err;
        throw new DmError(err.code, `${device.name}: ${t.type.name}: preresume failed: ${err.message}`, { cause: err });
      }
    }
  }

  /**
   * A resume with a table swap that a preresume refused. As in Linux do_resume (the swap comes before dm_resume,
   * whose failure undoes nothing): the device stays suspended, the table swapped in stays live without having been
   * resumed, there is no inactive table, and the old live table is destroyed. A later resume retries the preresume.
   */
  private async refuseResume(device: MappedDevice, old: Table | undefined): Promise<void> {
    const table = device.live!;
    this.notResumed.add(table);
    if (old) await old.destroy(this.hooksFor(device));
    // The log has no event for a swap without a resume; this pair replays to exactly the state left (the new table
    // live, no inactive table, the device suspended): src/replay/pool-state.ts.
    await this.log.append({ type: 'device.resumed', device: device.name, table: table.tableLines(), swapped: true }, { durable: true });
    await this.commit(device, { type: 'device.suspended', device: device.name });
  }

  /** The device's bio observer: the xstate checker and/or the live inspector's; undefined when neither is on. */
  private refreshBioObserver(device: MappedDevice): void {
    device.bioObserver = combineBioObservers(this.xstateCheckers.get(device), this.inspector.bioObserverFor(device.name));
  }

  /** Inspection mode: a full xstate actor per bio, checked against the compiled form at every step. */
  private attachObserver(device: MappedDevice): void {
    this.refreshBioObserver(device);
    const inspect = this.inspect;
    if (!inspect) return;
    const actors = new WeakMap<Bio, Actor<typeof bioMachine>>();
    device.bioObserver = (_dev, bio, fromState, eventIndex) => {
      let actor = actors.get(bio);
      if (!actor) {
        assert(fromState === BIO_MACHINE.initialIndex, 'inspection: first bio transition not from the initial state');
        actor = createActor(bioMachine, { inspect, id: `bio-${device.name}-${bio.id}` });
        actor.start();
        actors.set(bio, actor);
      }
      actor.send({ type: BIO_MACHINE.eventNames[eventIndex] } as Parameters<typeof actor.send>[0]);
      const value = actor.getSnapshot().value;
      assert(value === bio.stateName, `inspection: xstate bio is in ${String(value)}, compiled bio in ${bio.stateName}`);
    };
    this.xstateCheckers.set(device, device.bioObserver);
    this.refreshBioObserver(device);
  }

  private async restore(): Promise<void> {
    const records = (await this.log.listRecords<DeviceRecord>('devices')).map(([, r]) => r).sort((a, b) => a.order - b.order);
    for (const r of records) {
      const d = new MappedDevice(r.name, r.minor, r.uuid, r.readOnly, this.log);
      d.hadTable = r.hadTable ?? (r.live !== null || r.inactive !== null);
      this.attachObserver(d);
      this.devices.set(r.name, d);
      this.order.set(r.name, r.order);
      this.nextOrder = Math.max(this.nextOrder, r.order + 1);
    }
    // Load tables in dependency order: a table can be built once the mapped devices it names have theirs.
    let pending = records.filter((r) => r.live || r.inactive);
    const failures: string[] = [];
    while (pending.length > 0) {
      const ready = pending.filter((r) =>
        [...(r.live ?? []), ...(r.inactive ?? [])].every((line) =>
          line.split(/\s+/).slice(3).every((w) => !this.devices.has(w) || w === r.name || pending.every((p) => p.name !== w))),
      );
      const batch = ready.length > 0 ? ready : [pending[0]]; // a cycle cannot be stored; take one to make progress
      for (const r of batch) {
        const d = this.devices.get(r.name)!;
        try {
          if (r.live) d.live = await this.buildTable(d, r.live.join('\n'), undefined);
          if (r.inactive) d.inactive = await this.buildTable(d, r.inactive.join('\n'), undefined);
          if (d.live && r.liveNotResumed) {
            // Swapped in by a refused resume: it waits for the next resume, as before the restart.
            this.notResumed.add(d.live);
          } else if (d.live) {
            // A stored live table was resumed once; its targets resume now even when the device stays suspended
            // (a suspended snapshot still gets its copy-outs, as in the kernel).
            await this.resumeTargets(d.live);
            // ... and a suspended device's targets then see the suspend again (a snapshot-merge stops merging, as a
            // suspended merging origin does in the kernel, until the device resumes).
            if (r.suspended) for (const t of d.live.targets) if (t.type.postsuspend) await t.type.postsuspend(t.instance);
          }
        } catch (err) {
          failures.push(`${r.name}: ${(err as Error).message}`);
        }
        if (r.suspended) d.suspended = true;
      }
      pending = pending.filter((p) => !batch.includes(p));
    }
    for (const r of records) if (r.suspended) this.devices.get(r.name)!.suspended = true;
    await this.log.append({ type: 'engine.started', devices: records.length }, { durable: true });
    this.restoreFailures = failures;
  }

  /** Devices whose tables could not be rebuilt at open (e.g. a backing file that is gone), with reasons. */
  restoreFailures: string[] = [];
}

function checkName(name: string): void {
  if (name.length === 0 || name.length > DEVICE_NAME_LENGTH_MAX || name.includes('/') || /\s/.test(name) || name === '.' || name === '..') {
    throw new DmError('DM_INVALID_ARGUMENT', `"${name}": invalid device name (1-${DEVICE_NAME_LENGTH_MAX} characters, no '/' or spaces)`);
  }
}
