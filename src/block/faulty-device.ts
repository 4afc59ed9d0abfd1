/**
 * FaultyBlockDevice: a BlockDevice wrapping another one, injecting the faults a real disk shows (dm-flakey plus a
 * model of a disk's volatile write cache). Code under test cannot tell it from the device it wraps.
 *
 * Faults modelled, and why the system must survive them:
 * - I/O errors (DmError 'DM_IO'): by rule (an op, optionally a sector range, as dm-flakey's error_reads /
 *   error_writes) or with a probability per I/O drawn from the seeded rng. Disks fail I/Os; a snapshot store
 *   must invalidate the snapshot rather than corrupt the origin, a mirror must fail over. An injected error
 *   fails the I/O before it reaches the cache or the inner device: nothing of it is written.
 * - A volatile write cache (`volatileCache`): a completed write is not durable until a flush or a FUA write, the
 *   contract every journal and exception store relies on. Non-FUA writes and discards complete into an ordered
 *   list of pending writes that reads see (overlaid on the inner device in order) and flush() writes back.
 * - Power loss (`crash()`): pending writes are lost. With `torn`, each pending write independently survives, is
 *   lost, or survives as a prefix of whole logical blocks, which also models the reordering a cache may do
 *   (a later write survives while an earlier one is lost). A single logical block is never torn: disks
 *   guarantee sector atomicity, and the metadata formats above rely on it.
 *
 * Ordering assumed: pending writes apply to the inner device in the order they completed. A FUA write goes to the
 * inner device at once; when an older pending write overlaps it, a copy also stays in the pending list (marked
 * durable) so that the older write can never shadow it in reads, write-back, or crash. A write that the inner
 * device fails may or may not be visible afterwards, as on a real disk.
 *
 * Randomness comes only from the rng option (required for errorProbability > 0 and for torn crashes).
 */
import { DmError } from '../core/errors.js';
import type { Rng } from '../core/rng.js';
import type { BlockDeviceSupports, BlockExtent } from './contract.js';
import { BlockDevice } from './contract.js';
import type { Bytes, Sector } from './units.js';
import { bytes, bytesToSectors, sectors, sectorsToBytes } from './units.js';

export type FaultyOp = 'read' | 'write' | 'flush' | 'discard';

/** Fail every `op` overlapping [startSector, endSector). Flush rules ignore the range. */
export interface FaultyErrorRule {
  readonly op: FaultyOp;
  /** Inclusive; 0 by default. */
  readonly startSector?: Sector;
  /** Exclusive; the end of the device by default. */
  readonly endSector?: Sector;
}

export interface FaultyBlockDeviceOptions {
  /** Drives errorProbability and torn crashes. */
  readonly rng?: Rng;
  readonly errorRules?: readonly FaultyErrorRule[];
  /** Probability in [0, 1] that an I/O not already failed by a rule fails; one rng draw per I/O when > 0. */
  readonly errorProbability?: number;
  /** Model a volatile write cache (see the file header). */
  readonly volatileCache?: boolean;
  /** Cache capacity in pending writes; a write that fills it writes the cache back first. Default 4096. */
  readonly pendingWritesMax?: number;
  /** close() closes the inner device too (default true). */
  readonly closeInner?: boolean;
  /** Defaults to `faulty(<inner name>)`. */
  readonly name?: string;
}

export interface FaultyCrashOptions {
  /** Each pending write survives whole, is lost, or survives as a prefix of whole blocks (needs the rng). */
  readonly torn?: boolean;
}

/** What crash() did to the pending writes (durable FUA copies are not counted: they always survive). */
export interface FaultyCrashReport {
  readonly pendingCount: number;
  readonly lostCount: number;
  readonly survivedCount: number;
  readonly tornCount: number;
}

interface PendingWrite {
  /** Completion order; write-back applies entries up to the sequence number current when flush was called. */
  readonly seq: number;
  readonly sector: Sector;
  readonly lengthSectors: Sector;
  /** A copy of the written data; undefined for a discard. */
  readonly data: Buffer | undefined;
  /** A FUA write already on the inner device, kept so an older overlapping pending write cannot shadow it. */
  readonly durable: boolean;
}

const PENDING_WRITES_MAX_DEFAULT = 4096;
const OPS: readonly FaultyOp[] = ['read', 'write', 'flush', 'discard'];
const RESOLVED: Promise<void> = Promise.resolve();

export class FaultyBlockDevice extends BlockDevice {
  readonly inner: BlockDevice;
  readonly sizeSectors: Sector;
  override readonly logicalBlockSizeBytes: Bytes;
  readonly name: string;
  readonly supports: BlockDeviceSupports;
  private readonly rng: Rng | undefined;
  private readonly volatileCache: boolean;
  private readonly pendingWritesMax: number;
  private readonly closeInner: boolean;
  private errorRules: readonly FaultyErrorRule[] = [];
  private errorProbability = 0;
  private readonly injectedErrors: Record<FaultyOp, number> = { read: 0, write: 0, flush: 0, discard: 0 };
  private pending: PendingWrite[] = [];
  /** Pending entries that are not durable: the writes a crash would lose. */
  private volatileCount = 0;
  private nextSeq = 1;
  /** Bumped by crash(); write-back started before a crash stops and its flush rejects. */
  private epoch = 0;
  /** Write-back jobs run one at a time, in call order. */
  private writeBackTail: Promise<void> = RESOLVED;
  /** The write-back step currently writing to the inner device; crash() lets it land first. */
  private applying: Promise<void> = RESOLVED;

  constructor(inner: BlockDevice, options: FaultyBlockDeviceOptions = {}) {
    super();
    this.inner = inner;
    this.sizeSectors = inner.sizeSectors;
    this.logicalBlockSizeBytes = inner.logicalBlockSizeBytes;
    this.name = options.name ?? `faulty(${inner.name})`;
    this.rng = options.rng;
    this.volatileCache = options.volatileCache === true;
    this.pendingWritesMax = options.pendingWritesMax ?? PENDING_WRITES_MAX_DEFAULT;
    if (!Number.isSafeInteger(this.pendingWritesMax) || this.pendingWritesMax < 1) {
      throw new DmError('DM_INVALID_ARGUMENT', `${this.name}: pendingWritesMax must be a positive integer, got ${options.pendingWritesMax}`);
    }
    this.closeInner = options.closeInner ?? true;
    const s = inner.supports;
    this.supports = Object.freeze({
      flush: this.volatileCache || s.flush,
      fua: this.volatileCache || s.fua,
      discard: s.discard,
      holes: s.holes,
    });
    this.setErrorRules(options.errorRules ?? []);
    this.setErrorProbability(options.errorProbability ?? 0);
  }

  /** Replaces the error rules (takes effect for the next I/O). */
  setErrorRules(rules: readonly FaultyErrorRule[]): void {
    for (const r of rules) {
      if (!OPS.includes(r.op)) throw new DmError('DM_INVALID_ARGUMENT', `${this.name}: unknown op in error rule: ${String(r.op)}`);
      for (const bound of [r.startSector, r.endSector]) {
        if (bound !== undefined && (!Number.isSafeInteger(bound) || bound < 0)) {
          throw new DmError('DM_INVALID_ARGUMENT', `${this.name}: error rule bounds must be non-negative integers, got ${bound}`);
        }
      }
      if (r.endSector !== undefined && r.endSector <= (r.startSector ?? 0)) {
        throw new DmError('DM_INVALID_ARGUMENT', `${this.name}: error rule range [${r.startSector ?? 0}, ${r.endSector}) is empty`);
      }
    }
    this.errorRules = rules.map((r) => ({ ...r }));
  }

  /** Sets the probability that each I/O fails (needs the rng when > 0). */
  setErrorProbability(probability: number): void {
    if (!(probability >= 0 && probability <= 1)) {
      throw new DmError('DM_INVALID_ARGUMENT', `${this.name}: errorProbability must be in [0, 1], got ${probability}`);
    }
    if (probability > 0 && !this.rng) throw new DmError('DM_INVALID_ARGUMENT', `${this.name}: errorProbability > 0 needs an rng`);
    this.errorProbability = probability;
  }

  /** Completed writes and discards not yet on the inner device (what a crash now would lose). */
  get pendingWriteCount(): number {
    return this.volatileCount;
  }

  /** Errors injected so far, by op. */
  get injectedErrorCounts(): Readonly<Record<FaultyOp, number>> {
    return { ...this.injectedErrors };
  }

  get injectedErrorCount(): number {
    return this.injectedErrors.read + this.injectedErrors.write + this.injectedErrors.flush + this.injectedErrors.discard;
  }

  /**
   * Power loss: drops the cache. Pending writes are lost, or with `torn` each survives whole, is lost, or survives
   * as a block prefix (rng draws in pending order), and survivors are written to the inner device in order and
   * flushed. A flush in progress rejects with DM_IO. The device stays usable afterwards.
   */
  async crash(options: FaultyCrashOptions = {}): Promise<FaultyCrashReport> {
    const torn = options.torn === true;
    const rng = this.rng;
    if (torn && !rng) throw new DmError('DM_INVALID_ARGUMENT', `${this.name}: a torn crash needs an rng`);
    this.epoch++;
    const cache = this.pending;
    this.pending = [];
    this.volatileCount = 0;
    // A write-back step already submitted to the inner device lands (or fails); no further step starts.
    await this.applying.catch(() => undefined);
    const lbsSectors = bytesToSectors(this.logicalBlockSizeBytes);
    let pendingCount = 0, survivedCount = 0, tornCount = 0, appliedCount = 0;
    for (const e of cache) {
      let keepSectors: number = e.lengthSectors;
      if (!e.durable) {
        pendingCount++;
        if (!torn || !rng) continue;
        const blocks = e.lengthSectors / lbsSectors;
        // 0: lost, 1: survives whole, 2: torn (only writes of two blocks or more can tear).
        const fate = rng.int(blocks >= 2 ? 3 : 2);
        if (fate === 0) continue;
        if (fate === 2) {
          keepSectors = (1 + rng.int(blocks - 1)) * lbsSectors;
          tornCount++;
        }
        survivedCount++;
      }
      // (After a failed close the inner device may be gone; then there is no medium to land on.)
      if (this.inner.isClosed) continue;
      await this.apply(e, sectors(keepSectors));
      appliedCount++;
    }
    if (appliedCount > 0) await this.inner.flush();
    return { pendingCount, lostCount: pendingCount - survivedCount, survivedCount, tornCount };
  }

  protected _read(sector: Sector, buf: Uint8Array): Promise<void> {
    const lengthSectors = bytesToSectors(bytes(buf.byteLength));
    const err = this.injectedError('read', sector, lengthSectors);
    if (err) return Promise.reject(err);
    if (this.pending.length === 0) return this.inner.read(sector, buf);
    // Overlay what is pending now, even if write-back moves it to the inner device while the read runs.
    const overlay = this.pendingOverlapping(sector, lengthSectors, false);
    if (overlay.length === 0) return this.inner.read(sector, buf);
    return this.inner.read(sector, buf).then(() => {
      const endSector = sector + lengthSectors;
      for (const e of overlay) {
        const fromSector = Math.max(sector, e.sector);
        const toSector = Math.min(endSector, e.sector + e.lengthSectors);
        const dstBytes = sectorsToBytes(sectors(fromSector - sector));
        const lengthBytes = sectorsToBytes(sectors(toSector - fromSector));
        if (e.data) {
          const srcBytes = sectorsToBytes(sectors(fromSector - e.sector));
          e.data.copy(buf, dstBytes, srcBytes, srcBytes + lengthBytes);
        } else {
          buf.fill(0, dstBytes, dstBytes + lengthBytes);
        }
      }
    });
  }

  protected _write(sector: Sector, buf: Uint8Array, fua: boolean): Promise<void> {
    const lengthSectors = bytesToSectors(bytes(buf.byteLength));
    const err = this.injectedError('write', sector, lengthSectors);
    if (err) return Promise.reject(err);
    if (!this.volatileCache) return this.inner.write(sector, buf, { fua });
    if (lengthSectors === 0) return RESOLVED;
    if (fua) {
      if (this.pendingOverlapping(sector, lengthSectors, false).length > 0) {
        this.pending.push({ seq: this.nextSeq++, sector, lengthSectors, data: copyOf(buf), durable: true });
      }
      return this.inner.write(sector, buf, { fua: true });
    }
    return this.cache({ seq: this.nextSeq++, sector, lengthSectors, data: copyOf(buf), durable: false });
  }

  protected override _flush(): Promise<void> {
    const err = this.injectedError('flush', sectors(0), sectors(0));
    if (err) return Promise.reject(err);
    if (!this.volatileCache) return this.inner.flush();
    return this.writeBack(true);
  }

  protected override _discard(sector: Sector, lengthSectors: Sector): Promise<void> {
    const err = this.injectedError('discard', sector, lengthSectors);
    if (err) return Promise.reject(err);
    if (!this.volatileCache) return this.inner.discard(sector, lengthSectors);
    if (lengthSectors === 0) return RESOLVED;
    return this.cache({ seq: this.nextSeq++, sector, lengthSectors, data: undefined, durable: false });
  }

  protected override async _blockStatus(sector: Sector, lengthSectors: Sector): Promise<BlockExtent[]> {
    // Pending data makes a hole of the inner device read as non-zero, so it turns that part into data.
    // (A pending discard is left as the inner device reports it: a data extent may read as zeroes.)
    const overlay = this.supports.holes ? this.pendingOverlapping(sector, lengthSectors, true) : [];
    const extents = await this.inner.blockStatus(sector, lengthSectors);
    if (overlay.length === 0) return extents;
    const endSector = sector + lengthSectors;
    const cuts = new Set<number>([sector, endSector]);
    for (const x of extents) cuts.add(x.startSector);
    for (const e of overlay) {
      cuts.add(Math.max(sector, e.sector));
      cuts.add(Math.min(endSector, e.sector + e.lengthSectors));
    }
    const points = [...cuts].sort((a, b) => a - b);
    const out: BlockExtent[] = [];
    let extentIndex = 0;
    for (let i = 0; i + 1 < points.length; i++) {
      const from = points[i], to = points[i + 1];
      while (extentIndex + 1 < extents.length && extents[extentIndex + 1].startSector <= from) extentIndex++;
      const innerHole = extents[extentIndex]?.hole ?? false;
      const hole = innerHole && !overlay.some((e) => e.sector < to && from < e.sector + e.lengthSectors);
      const last = out[out.length - 1];
      if (last && last.hole === hole) out[out.length - 1] = { ...last, lengthSectors: sectors(to - last.startSector) };
      else out.push({ startSector: sectors(from), lengthSectors: sectors(to - from), hole });
    }
    return out;
  }

  /** A clean shutdown: the cache is written back (no injected faults), then the inner device closed. */
  protected override async _close(): Promise<void> {
    try {
      if (this.volatileCache) await this.writeBack(true);
    } finally {
      if (this.closeInner) await this.inner.close();
    }
  }

  private cache(entry: PendingWrite): Promise<void> {
    this.pending.push(entry);
    this.volatileCount++;
    // A full cache writes itself back before taking more (the write has completed into it either way).
    return this.volatileCount >= this.pendingWritesMax ? this.writeBack(false) : RESOLVED;
  }

  /** Writes back, in order, every entry cached before this call; then flushes the inner device if asked. */
  private writeBack(flushInner: boolean): Promise<void> {
    const epoch = this.epoch;
    const seqMax = this.nextSeq - 1;
    const job = this.writeBackTail.then(async () => {
      const list = this.pending;
      let appliedCount = 0;
      try {
        while (epoch === this.epoch && appliedCount < list.length && list[appliedCount].seq <= seqMax) {
          this.applying = this.apply(list[appliedCount], list[appliedCount].lengthSectors);
          await this.applying;
          appliedCount++;
        }
      } finally {
        // Only this job removes entries, and only from the front; a crash replaces the whole list instead.
        if (epoch === this.epoch) {
          for (let i = 0; i < appliedCount; i++) if (!list[i].durable) this.volatileCount--;
          list.splice(0, appliedCount);
        }
      }
      if (flushInner && epoch === this.epoch) await this.inner.flush();
      if (epoch !== this.epoch) throw new DmError('DM_IO', `${this.name}: power lost before the flush completed`);
    });
    this.writeBackTail = job.catch(() => undefined);
    return job;
  }

  private apply(e: PendingWrite, lengthSectors: Sector): Promise<void> {
    if (lengthSectors === 0) return RESOLVED;
    if (!e.data) return this.inner.discard(e.sector, lengthSectors);
    const lengthBytes = sectorsToBytes(lengthSectors);
    return this.inner.write(e.sector, lengthBytes === e.data.byteLength ? e.data : e.data.subarray(0, lengthBytes));
  }

  private pendingOverlapping(sector: Sector, lengthSectors: Sector, dataOnly: boolean): PendingWrite[] {
    const endSector = sector + lengthSectors;
    return this.pending.filter((e) => e.sector < endSector && sector < e.sector + e.lengthSectors && (!dataOnly || e.data !== undefined));
  }

  private injectedError(op: FaultyOp, sector: Sector, lengthSectors: Sector): DmError | undefined {
    // A zero-length I/O counts as touching its start sector.
    const endSector = sector + Math.max(1, lengthSectors);
    for (const r of this.errorRules) {
      if (r.op !== op) continue;
      if (op !== 'flush' && !((r.startSector ?? 0) < endSector && sector < (r.endSector ?? Infinity))) continue;
      this.injectedErrors[op]++;
      return new DmError('DM_IO', `${this.name}: injected ${op} error at sector ${sector} (error rule)`);
    }
    if (this.errorProbability > 0 && this.rng && this.rng.next() < this.errorProbability) {
      this.injectedErrors[op]++;
      return new DmError('DM_IO', `${this.name}: injected ${op} error at sector ${sector} (random)`);
    }
    return undefined;
  }
}

function copyOf(buf: Uint8Array): Buffer {
  const copy = Buffer.allocUnsafe(buf.byteLength);
  copy.set(buf);
  return copy;
}
