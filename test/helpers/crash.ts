/**
 * The power-cut harness of the crash tests (snapshot, merge, mirror): devices with volatile write caches
 * (FaultyBlockDevice) that report every I/O to a PowerCut, which at a seeded I/O count fences every device (no
 * later I/O lands anywhere) and crashes them all (unflushed cached writes lost or torn); and a model of what each
 * sector may hold afterwards, given which writes were acknowledged and which were made durable.
 */
import type { BlockDevice } from '../../src/block/contract.js';
import { FaultyBlockDevice, type FaultyErrorRule } from '../../src/block/faulty-device.js';
import { sectors, type Sector } from '../../src/block/units.js';
import { SECTOR, decodeSector } from './sector-data.js';

/** Every I/O fails: what the devices see from the power cut on. */
export const CRASH_FENCE: FaultyErrorRule[] = [{ op: 'read' }, { op: 'write' }, { op: 'flush' }, { op: 'discard' }];

/** A FaultyBlockDevice that tells the power cut about every I/O before it starts. */
export class CrashDevice extends FaultyBlockDevice {
  onIo: (() => void) | undefined;
  protected override _read(s: Sector, b: Uint8Array): Promise<void> {
    this.onIo?.();
    return super._read(s, b);
  }
  protected override _write(s: Sector, b: Uint8Array, fua: boolean): Promise<void> {
    this.onIo?.();
    return super._write(s, b, fua);
  }
  protected override _flush(): Promise<void> {
    this.onIo?.();
    return super._flush();
  }
  protected override _discard(s: Sector, n: Sector): Promise<void> {
    this.onIo?.();
    return super._discard(s, n);
  }
}

/** Cuts the power at the `at`-th I/O over all devices: fence them all, then crash them all (torn). */
export class PowerCut {
  count = 0;
  fired = false;
  /** Settles once every device has crashed (the counts below are final then). */
  done: Promise<void> = Promise.resolve();
  /** Resolves when the power is cut (a workload stops waiting for its batch then). */
  readonly firedSignal: Promise<void>;
  private signal: () => void = () => undefined;
  torn = 0;
  lost = 0;
  pending = 0;
  /** Called once, when the power goes (before any device crashes). */
  onFire: () => void = () => undefined;

  constructor(
    private readonly at: number,
    private readonly devices: CrashDevice[],
  ) {
    for (const d of devices) d.onIo = () => this.io();
    this.firedSignal = new Promise((resolve) => (this.signal = resolve));
  }

  private io(): void {
    if (!this.fired && ++this.count >= this.at) this.fire();
  }

  fire(): void {
    if (this.fired) return;
    this.fired = true;
    this.onFire();
    this.signal();
    // The fence first, on every device, so that nothing issued from here on lands anywhere; crash() takes each
    // cache synchronously, before its first await.
    for (const d of this.devices) d.setErrorRules(CRASH_FENCE);
    this.done = Promise.all(this.devices.map((d) => d.crash({ torn: true }))).then((reports) => {
      for (const r of reports) {
        this.torn += r.tornCount;
        this.lost += r.lostCount;
        this.pending += r.pendingCount;
      }
    });
  }
}

export interface WriteRecord {
  readonly id: number;
  readonly sector: number;
  readonly count: number;
  acked: boolean;
  durable: boolean;
}

/**
 * What a device may hold per sector after a crash: hist[s][durable[s]..], in write-issue order — the newest write
 * made durable (by a completed flush or FUA) or any write issued after it.
 */
export class SectorHistoryModel {
  readonly hist: number[][];
  readonly durable: number[];
  records: WriteRecord[] = [];

  /** `base(s)`: the write id sector s holds at the start; `where(s)`: extra context for a failure message. */
  constructor(
    readonly sizeSectors: number,
    base: (s: number) => number,
    private readonly where: (s: number) => string = () => '',
  ) {
    this.hist = Array.from({ length: sizeSectors }, (_, s) => [base(s)]);
    this.durable = new Array<number>(sizeSectors).fill(0);
  }

  issue(id: number, sector: number, count: number): WriteRecord {
    for (let s = sector; s < sector + count; s++) this.hist[s].push(id);
    const r: WriteRecord = { id, sector, count, acked: false, durable: false };
    this.records.push(r);
    return r;
  }

  markDurable(r: WriteRecord): void {
    r.durable = true;
    for (let s = r.sector; s < r.sector + r.count; s++) {
      const i = this.hist[s].lastIndexOf(r.id);
      if (i > this.durable[s]) this.durable[s] = i;
    }
  }

  /** Acknowledged writes a flush issued now covers. */
  ackedNotDurable(): WriteRecord[] {
    return this.records.filter((r) => r.acked && !r.durable);
  }

  /** The power was cut: writes not durable by now never will be (a flush after the restart does not cover them). */
  crashed(): void {
    this.records = this.records.filter((r) => r.durable);
  }

  current(s: number): number {
    return this.hist[s][this.hist[s].length - 1];
  }

  /** Checks the contents read back (throws, naming the first bad sector); returns the write ids found. */
  check(buf: Buffer, what: string): number[] {
    const found: number[] = [];
    for (let s = 0; s < this.sizeSectors; s++) {
      const got = decodeSector(buf, s * SECTOR, s);
      const allowed = this.hist[s].slice(this.durable[s]);
      if (typeof got === 'string' || !allowed.includes(got)) {
        throw new Error(
          `${what}: sector ${s}${this.where(s)} holds ${typeof got === 'string' ? got : `write #${got}`}; allowed: ${allowed.map((x) => `#${x}`).join(' ')} ` +
            `(history ${this.hist[s].map((x) => `#${x}`).join(' ')}, durable from index ${this.durable[s]})`,
        );
      }
      found.push(got);
    }
    return found;
  }

  /** After a verified recovery the contents are durable: the history starts again from them. */
  reset(found: number[]): void {
    for (let s = 0; s < this.sizeSectors; s++) {
      this.hist[s] = [found[s]];
      this.durable[s] = 0;
    }
    this.records = [];
  }
}

/** Fails with `what` when `p` is not done within `ms`: a lost bio fails the run instead of hanging it. */
export async function within<T>(p: Promise<T>, what: string, ms = 5000): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: not done within ${ms} ms (a bio was lost?)`)), ms);
  });
  try {
    return await Promise.race([p, late]);
  } finally {
    clearTimeout(timer);
  }
}

/** The whole device, read within 5 s. */
export async function readDevice(dev: BlockDevice): Promise<Buffer> {
  const b = Buffer.alloc(dev.sizeSectors * SECTOR);
  await within(dev.read(sectors(0), b), `read of ${dev.name}`);
  return b;
}
