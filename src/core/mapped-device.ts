/**
 * A mapped device (Linux struct mapped_device): a name, a live and an inactive table slot, suspend/resume, and
 * the bio path. It is itself a BlockDevice, so it can back another table (stacking) or an NBD export, and it runs
 * the BlockDevice conformance suite.
 *
 * Bio path per request: one Bio → (queued while suspended) → split at target boundaries → target.map() →
 * remapped I/O on the device below, or held by the target, or finished by it. No event is produced unless
 * tracing is on; the only allocations are the request's promise, the Bio and the remapped I/O's promise.
 */
import { BlockDevice, type BlockDeviceSupports, type BlockExtent } from '../block/contract.js';
import { SECTOR_SIZE_BYTES, type Sector } from '../block/units.js';
import { assert } from './assert.js';
import { BIO_EVENT, BIO_MACHINE, Bio, MAP_DONE, MAP_HELD, MAP_KILL, MAP_REMAPPED, type IoRequest } from './bio.js';
import { DmError } from './errors.js';
import type { Table } from './table.js';
import type { BioOp, DmEvent } from '../log/events.js';
import type { EventLog } from '../log/event-log.js';

/** Watches every bio transition (inspection mode). */
export type BioObserver = (device: MappedDevice, bio: Bio, fromState: number, eventIndex: number) => void;

const EMPTY = new Uint8Array(0);

export class MappedDevice extends BlockDevice {
  readonly supports: BlockDeviceSupports = { flush: true, discard: true, fua: true, holes: true };
  live: Table | undefined = undefined;
  inactive: Table | undefined = undefined;
  suspended = false;
  /** Counts table events (Linux event_nr): raised by targets, e.g. a snapshot becoming invalid. */
  eventNr = 0;
  /** Tables and exports that use this device. */
  openCount = 0;
  /** A table was loaded at some point (info prints Read Ahead only then, as the kernel does). */
  hadTable = false;
  /** Bios between MAP and completion (held ones included): what suspend waits for. */
  private inFlight = 0;
  private queued: Bio[] = [];
  private drainWaiters: Array<() => void> = [];
  private nextBioId = 1;
  bioObserver: BioObserver | undefined = undefined;

  constructor(
    readonly name: string,
    readonly minor: number,
    readonly uuid: string | undefined,
    readonly readOnly: boolean,
    private readonly log: EventLog,
  ) {
    super();
  }

  get sizeSectors(): Sector {
    return (this.live ? this.live.sizeSectors : 0) as Sector;
  }

  get inFlightCount(): number {
    return this.inFlight;
  }

  get queuedCount(): number {
    return this.queued.length;
  }

  protected override _read(sector: Sector, buf: Uint8Array): Promise<void> {
    return this.submit('read', sector, (buf.byteLength / SECTOR_SIZE_BYTES) as Sector, buf, false);
  }

  protected override _write(sector: Sector, buf: Uint8Array, fua: boolean): Promise<void> {
    if (this.readOnly) return Promise.reject(new DmError('DM_IO', `${this.name}: device is read-only`));
    return this.submit('write', sector, (buf.byteLength / SECTOR_SIZE_BYTES) as Sector, buf, fua);
  }

  protected override _flush(): Promise<void> {
    return this.submit('flush', 0 as Sector, 0 as Sector, EMPTY, false);
  }

  protected override _discard(sector: Sector, lengthSectors: Sector): Promise<void> {
    if (this.readOnly) return Promise.reject(new DmError('DM_IO', `${this.name}: device is read-only`));
    return this.submit('discard', sector, lengthSectors, EMPTY, false);
  }

  /** Asks each target the range touches; device-relative extents in order. */
  protected override async _blockStatus(sector: Sector, lengthSectors: Sector): Promise<BlockExtent[]> {
    const table = this.live;
    if (!table || lengthSectors === 0) return [];
    const out: BlockExtent[] = [];
    const end = sector + lengthSectors;
    for (let ti = table.findTargetIndex(sector), s = sector as number; s < end; ti++) {
      const t = table.targets[ti];
      const pieceEnd = Math.min(end, t.endSector);
      const offset = (s - t.beginSector) as Sector;
      const len = (pieceEnd - s) as Sector;
      const extents = t.type.blockStatus
        ? await t.type.blockStatus(t.instance, offset, len)
        : [{ startSector: offset, lengthSectors: len, hole: false }];
      for (const e of extents) {
        const start = (e.startSector + t.beginSector) as Sector;
        const last = out[out.length - 1];
        if (last && last.hole === e.hole && last.startSector + last.lengthSectors === start) {
          out[out.length - 1] = { ...last, lengthSectors: (last.lengthSectors + e.lengthSectors) as Sector };
        } else out.push({ startSector: start, lengthSectors: e.lengthSectors, hole: e.hole });
      }
      s = pieceEnd;
    }
    return out;
  }

  /** Makes a request into a bio and sends it on (or queues it while suspended). */
  private submit(op: BioOp, sector: Sector, lengthSectors: Sector, buf: Uint8Array, fua: boolean): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      const request: IoRequest = { remaining: 1, error: undefined, resolve, reject };
      const bio = new Bio(this.nextBioId++, op, sector, lengthSectors, buf, fua, request);
      this.dispatch(bio);
    });
  }

  private step(bio: Bio, eventIndex: number): void {
    const from = bio.state;
    bio.state = BIO_MACHINE.step(from, eventIndex);
    if (this.bioObserver !== undefined) this.bioObserver(this, bio, from, eventIndex);
    if (this.log.traceEnabled) this.traceBio(bio, from, eventIndex);
  }

  private traceBio(bio: Bio, from: number, eventIndex: number): void {
    const e: DmEvent = {
      type: 'bio',
      device: this.name,
      bioId: bio.id,
      op: bio.op,
      sector: bio.sector,
      lengthSectors: bio.lengthSectors,
      from: BIO_MACHINE.stateNames[from],
      event: BIO_MACHINE.eventNames[eventIndex],
      state: BIO_MACHINE.stateNames[bio.state],
    };
    this.log.trace(e);
  }

  /** A bio in SUBMITTED: queue it, split it, or map it. */
  private dispatch(bio: Bio): void {
    const table = this.live;
    if (this.suspended) {
      this.step(bio, BIO_EVENT.QUEUE);
      this.queued.push(bio);
      return;
    }
    if (table === undefined) {
      this.step(bio, BIO_EVENT.KILL);
      this.finish(bio, new DmError('DM_IO', `${this.name}: device has no live table`));
      return;
    }
    if (bio.op === 'flush') {
      if (bio.targetIndex < 0) {
        // An empty flush goes to every target (Linux sends one flush bio per target).
        const n = table.targets.length;
        if (n === 0) {
          this.step(bio, BIO_EVENT.MAP);
          this.step(bio, BIO_EVENT.ENDIO);
          this.finish(bio, undefined);
          return;
        }
        bio.targetIndex = 0;
        for (let i = 1; i < n; i++) {
          const clone = new Bio(this.nextBioId++, 'flush', bio.sector, bio.lengthSectors, EMPTY, false, bio.request);
          clone.targetIndex = i;
          bio.request.remaining++;
          this.mapBio(clone, i);
        }
      }
      this.mapBio(bio, bio.targetIndex);
      return;
    }
    if (bio.sector + bio.lengthSectors > table.sizeSectors) {
      // Possible only for bios queued across a resume that shrank the device.
      this.step(bio, BIO_EVENT.KILL);
      this.finish(bio, new DmError('DM_IO_RANGE', `${this.name}: ${bio.op} at sector ${bio.sector} is past the end of the new table`));
      return;
    }
    const ti = table.findTargetIndex(bio.sector);
    const slot = table.targets[ti];
    let end: number = slot.endSector;
    if (slot.maxIoSectors !== 0) {
      const m = slot.maxIoSectors;
      const boundary = slot.beginSector + (Math.floor((bio.sector - slot.beginSector) / m) + 1) * m;
      if (boundary < end) end = boundary;
    }
    const tail = bio.sector + bio.lengthSectors > end ? this.splitAt(bio, end as Sector) : undefined;
    this.mapBio(bio, ti);
    if (tail !== undefined) this.dispatch(tail);
  }

  /** Splits `bio` at `atSector` (Linux bio_split): it keeps the head; returns a new bio with the tail. */
  private splitAt(bio: Bio, atSector: Sector): Bio {
    const headSectors = atSector - bio.sector;
    assert(headSectors > 0 && headSectors < bio.lengthSectors, 'splitAt: split point outside the bio');
    const tailSectors = (bio.lengthSectors - headSectors) as Sector;
    const tailBuf = bio.buf.byteLength === 0 ? EMPTY : bio.buf.subarray(headSectors * SECTOR_SIZE_BYTES);
    const tail = new Bio(this.nextBioId++, bio.op, atSector, tailSectors, tailBuf, bio.fua, bio.request);
    if (bio.buf.byteLength !== 0) bio.buf = bio.buf.subarray(0, headSectors * SECTOR_SIZE_BYTES);
    bio.lengthSectors = headSectors as Sector;
    bio.request.remaining++;
    return tail;
  }

  private mapBio(bio: Bio, targetIndex: number): void {
    const slot = this.live!.targets[targetIndex];
    this.step(bio, BIO_EVENT.MAP);
    this.inFlight++;
    const r = slot.type.map(slot.instance, bio, slot.ctx);
    if (r === MAP_REMAPPED) {
      this.step(bio, BIO_EVENT.REMAP);
      this.issue(bio);
    } else if (r === MAP_HELD) {
      this.step(bio, BIO_EVENT.HOLD);
    } else if (r === MAP_DONE) {
      this.step(bio, BIO_EVENT.ENDIO);
      this.endInFlight(bio, undefined);
    } else {
      assert(r === MAP_KILL, `map returned ${r as number}`);
      this.step(bio, BIO_EVENT.KILL);
      this.endInFlight(bio, new DmError('DM_IO', `${this.name}: ${slot.type.name} target failed ${bio.op} at sector ${bio.sector}`));
    }
  }

  /** Issues a remapped bio to the device below. */
  private issue(bio: Bio): void {
    const dev = bio.remapDevice!;
    let p: Promise<void>;
    switch (bio.op) {
      case 'read':
        p = dev.read(bio.remapSector, bio.buf);
        break;
      case 'write':
        p = bio.fua ? dev.write(bio.remapSector, bio.buf, { fua: true }) : dev.write(bio.remapSector, bio.buf);
        break;
      case 'flush':
        p = dev.flush();
        break;
      default:
        p = dev.discard(bio.remapSector, bio.lengthSectors);
    }
    p.then(
      () => {
        this.step(bio, BIO_EVENT.IO_DONE);
        this.endInFlight(bio, undefined);
      },
      (err: unknown) => {
        this.step(bio, BIO_EVENT.IO_ERROR);
        this.endInFlight(bio, err);
      },
    );
  }

  /** For targets: completes a held bio. */
  endHeld(bio: Bio, error: unknown): void {
    this.step(bio, error === undefined ? BIO_EVENT.ENDIO : BIO_EVENT.KILL);
    this.endInFlight(bio, error);
  }

  /** For targets: sends a held bio back through the map (Linux retries after a copy; seed 001). */
  retryHeld(bio: Bio): void {
    this.step(bio, BIO_EVENT.RETRY);
    this.inFlight--;
    this.dispatch(bio);
    if (this.inFlight === 0) this.wakeDrainWaiters();
  }

  private endInFlight(bio: Bio, error: unknown): void {
    this.inFlight--;
    this.finish(bio, error);
    if (this.inFlight === 0) this.wakeDrainWaiters();
  }

  private finish(bio: Bio, error: unknown): void {
    const req = bio.request;
    if (error !== undefined && req.error === undefined) req.error = error;
    if (--req.remaining === 0) {
      if (req.error === undefined) req.resolve();
      else req.reject(req.error);
    }
  }

  private wakeDrainWaiters(): void {
    if (this.drainWaiters.length === 0) return;
    const w = this.drainWaiters;
    this.drainWaiters = [];
    for (const f of w) f();
  }

  /** Stops mapping new bios (they queue) and waits for in-flight ones to finish. */
  async suspendAndDrain(): Promise<void> {
    this.suspended = true;
    while (this.inFlight > 0) await new Promise<void>((resolve) => this.drainWaiters.push(resolve));
  }

  /** Lets bios through again and sends the queued ones through the (possibly new) live table in order. */
  resumeQueued(): void {
    this.suspended = false;
    const q = this.queued;
    this.queued = [];
    for (const bio of q) {
      this.step(bio, BIO_EVENT.RESUME);
      this.dispatch(bio);
    }
  }

  /** Fails every queued bio (device removal). */
  killQueued(): void {
    const q = this.queued;
    this.queued = [];
    for (const bio of q) {
      this.step(bio, BIO_EVENT.KILL);
      this.finish(bio, new DmError('DM_IO', `${this.name}: device removed with I/O queued`));
    }
  }

  /** Marks the handle closed without releasing anything (the engine owns the tables). */
  markClosed(): void {
    this.closed = true;
  }
}
