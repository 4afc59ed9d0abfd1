/**
 * Shared fixtures of the mirror tests: devices that delay, gate, count or record their I/O, and an engine over
 * memory devices registered by label.
 */
import { MemoryLevel } from 'memory-level';
import { BlockDevice, type BlockDeviceSupports } from '../../src/block/contract.js';
import { MemoryBlockDevice } from '../../src/block/memory-device.js';
import { sectors, type Sector } from '../../src/block/units.js';
import type { Clock } from '../../src/core/clock.js';
import { Engine } from '../../src/core/engine.js';
import type { Rng } from '../../src/core/rng.js';
import type { LevelDb } from '../../src/log/event-log.js';
import type { LoggedEvent } from '../../src/log/events.js';
import type { MirrorInstance } from '../../src/targets/mirror/mirror.js';
import type { MirrorSet } from '../../src/targets/mirror/mirror-set.js';

export const SECTOR = 512;
export const turn = (): Promise<void> => new Promise((r) => setImmediate(r));

export const mem = (n: number, name = 'memory'): MemoryBlockDevice => new MemoryBlockDevice({ sizeSectors: sectors(n), name });

export type IoRecord = { readonly dev: string; readonly op: 'read' | 'write' | 'flush' | 'discard'; readonly sector: number; readonly lengthSectors: number; readonly fua: boolean };

/**
 * Wraps a device: records every I/O (into a log shared by several devices, so the order across them shows),
 * optionally completes each after 0..maxTurns event-loop turns (seeded), and can hold writes until released.
 */
export class TestDevice extends BlockDevice {
  readonly supports: BlockDeviceSupports;
  readonly name: string;
  reads = 0;
  writes = 0;
  flushes = 0;
  /** While set, writes (not reads) wait until release() is called. */
  gateWrites = false;
  private gated: Array<() => void> = [];

  constructor(
    readonly inner: BlockDevice,
    readonly label: string,
    readonly io: IoRecord[] = [],
    private readonly rng?: Rng,
    private readonly maxTurns = 0,
  ) {
    super();
    this.supports = inner.supports;
    this.name = label;
  }

  get sizeSectors(): Sector {
    return this.inner.sizeSectors;
  }

  release(): void {
    const g = this.gated;
    this.gated = [];
    for (const f of g) f();
  }

  get gatedCount(): number {
    return this.gated.length;
  }

  private async delay(): Promise<void> {
    if (!this.rng) return;
    for (let n = this.rng.int(this.maxTurns + 1); n > 0; n--) await turn();
  }

  protected async _read(s: Sector, b: Uint8Array): Promise<void> {
    this.reads++;
    this.io.push({ dev: this.label, op: 'read', sector: s, lengthSectors: b.byteLength / SECTOR, fua: false });
    await this.delay();
    return this.inner.read(s, b);
  }

  protected async _write(s: Sector, b: Uint8Array, fua: boolean): Promise<void> {
    this.writes++;
    this.io.push({ dev: this.label, op: 'write', sector: s, lengthSectors: b.byteLength / SECTOR, fua });
    if (this.gateWrites) await new Promise<void>((r) => this.gated.push(r));
    await this.delay();
    return this.inner.write(s, b, { fua });
  }

  protected override async _flush(): Promise<void> {
    this.flushes++;
    this.io.push({ dev: this.label, op: 'flush', sector: 0, lengthSectors: 0, fua: false });
    await this.delay();
    return this.inner.flush();
  }

  protected override async _discard(s: Sector, n: Sector): Promise<void> {
    this.io.push({ dev: this.label, op: 'discard', sector: s, lengthSectors: n, fua: false });
    await this.delay();
    return this.inner.discard(s, n);
  }
}

export interface MirrorWorld {
  readonly engine: Engine;
  readonly db: LevelDb;
  readonly events: LoggedEvent[];
}

export async function openWorld(devices: Record<string, BlockDevice>, options: { db?: LevelDb; clock?: Clock; trace?: boolean; seed?: number } = {}): Promise<MirrorWorld> {
  const db = options.db ?? (new MemoryLevel() as unknown as LevelDb);
  const engine = await Engine.open({ db, backingDevices: devices, clock: options.clock, trace: options.trace, seed: options.seed });
  const events: LoggedEvent[] = [];
  engine.events$.subscribe((e) => events.push(e));
  return { engine, db, events };
}

/** The MirrorSet behind a device's (single-target) live table. */
export function mirrorSetOf(engine: Engine, name: string): MirrorSet {
  const t = engine.device(name)!.live!.targets[0];
  return (t.instance as MirrorInstance).set;
}

/** Waits (real event-loop turns) until `cond` holds, failing after `turnsMax`. */
export async function until(cond: () => boolean, what: string, turnsMax = 100_000): Promise<void> {
  for (let i = 0; i < turnsMax; i++) {
    if (cond()) return;
    await turn();
  }
  throw new Error(`timed out waiting for ${what}`);
}

export async function readAll(dev: BlockDevice, fromSector = 0, lengthSectors = dev.sizeSectors - fromSector): Promise<Buffer> {
  const b = Buffer.alloc(lengthSectors * SECTOR);
  await dev.read(sectors(fromSector), b);
  return b;
}

/** `n` bytes of seeded, non-zero data. */
export function pattern(rng: Rng, n: number): Buffer {
  const b = Buffer.alloc(n);
  for (let i = 0; i < n; i++) b[i] = 1 + rng.int(255);
  return b;
}
