/**
 * A loaded table: the target instances of one table, built by their ctr()s, in sector order. A mapped device
 * has a live and an inactive one. Building a table either succeeds whole or releases everything it acquired.
 */
import type { Sector } from '../block/units.js';
import { assert } from './assert.js';
import { DmError } from './errors.js';
import type { AnyTargetType, DeviceRef, TargetContext } from './target-contract.js';
import type { TargetRegistry } from './target-registry.js';
import { formatTableLine, type TableLine } from './table-parser.js';

export interface TargetSlot {
  readonly type: AnyTargetType;
  readonly instance: unknown;
  readonly ctx: TargetContext;
  readonly beginSector: Sector;
  readonly lengthSectors: Sector;
  /** beginSector + lengthSectors */
  readonly endSector: Sector;
  /** Devices opened by this target, released after dtr. */
  readonly devices: DeviceRef[];
  /** Bios are split at multiples of this from beginSector (0: no limit); see TargetContext.setMaxIoSectors. */
  maxIoSectors: number;
}

export interface TableBuildHooks {
  /** Creates the per-target context; `opened` collects devices the target opens; `limits` receives setMaxIoSectors. */
  makeContext(beginSector: Sector, lengthSectors: Sector, opened: DeviceRef[], limits: { maxIoSectors: number }): TargetContext;
  /** Releases a device opened through a context. */
  releaseDevice(ref: DeviceRef): Promise<void>;
}

export class Table {
  /** Sorted by beginSector; contiguous from 0. */
  readonly targets: readonly TargetSlot[];
  readonly sizeSectors: Sector;
  /** Start sectors of targets, for the binary search on the hot path. */
  private readonly starts: Float64Array;

  private constructor(targets: TargetSlot[]) {
    this.targets = targets;
    this.sizeSectors = (targets.length ? targets[targets.length - 1].endSector : 0) as Sector;
    this.starts = Float64Array.from(targets.map((t) => t.beginSector));
  }

  static async build(lines: readonly TableLine[], registry: TargetRegistry, hooks: TableBuildHooks): Promise<Table> {
    const slots: TargetSlot[] = [];
    try {
      for (const line of lines) {
        const type = registry.get(line.targetName);
        if (!type) throw new DmError('DM_TABLE_INVALID', `${line.targetName}: unknown target type`);
        if (line.args.length < type.argCountMin || line.args.length > type.argCountMax) {
          throw new DmError('DM_TABLE_INVALID', `${line.targetName}: Invalid argument count (got ${line.args.length}) in "${formatTableLine(line)}"`);
        }
        const devices: DeviceRef[] = [];
        // The slot is created before ctr so that setMaxIoSectors can reach it from ctr and later from resume.
        const limits = { maxIoSectors: 0 };
        const ctx = hooks.makeContext(line.startSector, line.lengthSectors, devices, limits);
        let instance: unknown;
        try {
          instance = await type.ctr(line.args, ctx);
        } catch (err) {
          for (const d of devices.reverse()) await hooks.releaseDevice(d);
          throw err;
        }
        slots.push(
          Object.assign(limits, {
            type,
            instance,
            ctx,
            beginSector: line.startSector,
            lengthSectors: line.lengthSectors,
            endSector: (line.startSector + line.lengthSectors) as Sector,
            devices,
          }),
        );
      }
    } catch (err) {
      await Table.destroySlots(slots.reverse(), hooks);
      throw err;
    }
    return new Table(slots);
  }

  /** Index of the target holding `sector` (which must be < sizeSectors). */
  findTargetIndex(sector: number): number {
    const starts = this.starts;
    if (starts.length === 1) return 0;
    let lo = 0;
    let hi = starts.length - 1;
    while (lo < hi) {
      const mid = (lo + hi + 1) >> 1;
      if (starts[mid] <= sector) lo = mid;
      else hi = mid - 1;
    }
    assert(sector >= starts[lo] && sector < this.targets[lo].endSector, 'findTargetIndex: sector outside the table');
    return lo;
  }

  /** The table as `dmsetup table` prints it (device labels in place of major:minor). */
  tableLines(): string[] {
    return this.targets.map((t) => {
      const args = t.type.table(t.instance);
      return `${t.beginSector} ${t.lengthSectors} ${t.type.name} ${args}`;
    });
  }

  statusLines(): string[] {
    return this.targets.map((t) => `${t.beginSector} ${t.lengthSectors} ${t.type.name} ${t.type.status(t.instance)}`);
  }

  /** Names of the devices this table uses (for dependency order and open counts). */
  deviceLabels(): string[] {
    return this.targets.flatMap((t) => t.devices.map((d) => d.label));
  }

  async destroy(hooks: TableBuildHooks): Promise<void> {
    await Table.destroySlots([...this.targets].reverse(), hooks);
  }

  private static async destroySlots(slots: TargetSlot[], hooks: TableBuildHooks): Promise<void> {
    for (const s of slots) {
      if (s.type.dtr) await s.type.dtr(s.instance);
      for (const d of [...s.devices].reverse()) await hooks.releaseDevice(d);
    }
  }
}
