/**
 * dm-snapshot semantics against a reference model (plain Buffers): the origin as written, and each snapshot as the
 * origin was when it was taken plus the writes made through it. Every check reads the whole mapped device and
 * compares it with the model; status lines are checked against the kernel's arithmetic (spec: dm-snapshot.md,
 * "Usage"); errors by code. The last part is a seeded random workload (reproduce one seed with
 * SNAPSHOT_SEED=N npx vitest run test/targets/snapshot.test.ts).
 */
import { describe, expect, test } from 'vitest';
import { MemoryLevel } from 'memory-level';
import { Engine } from '../../src/core/engine.js';
import { MemoryBlockDevice } from '../../src/block/memory-device.js';
import { FaultyBlockDevice } from '../../src/block/faulty-device.js';
import { BlockDevice, type BlockDeviceSupports } from '../../src/block/contract.js';
import { sectors, type Sector } from '../../src/block/units.js';
import { createRng, type Rng } from '../../src/core/rng.js';
import type { LevelDb } from '../../src/log/event-log.js';
import type { LoggedEvent } from '../../src/log/events.js';
import { SNAP_MAGIC } from '../../src/stores/persistent-store.js';
import type { SnapshotInstance } from '../../src/targets/snapshot/snapshot.js';

const SECTOR = 512;
type Mode = 'P' | 'PO' | 'N';

const mem = (n: number, name = 'memory'): MemoryBlockDevice => new MemoryBlockDevice({ sizeSectors: sectors(n), name });

/**
 * Completes every I/O after 0..maxTurns event-loop turns (seeded), touching the device below only then: a read
 * issued before a write can see it, and I/Os finish out of order, as on a real disk. Memory devices alone complete
 * at once, which would hide ordering bugs (a copy or a snapshot read racing an origin write).
 */
class DelayDevice extends BlockDevice {
  readonly supports: BlockDeviceSupports;
  readonly name: string;
  constructor(
    readonly inner: BlockDevice,
    private readonly rng: Rng,
    private readonly maxTurns = 3,
    /** Reads may take longer (a snapshot read of the origin still running when the copy is committed). */
    private readonly readMaxTurns = maxTurns,
  ) {
    super();
    this.supports = inner.supports;
    this.name = `delay(${inner.name})`;
  }
  get sizeSectors(): Sector {
    return this.inner.sizeSectors;
  }
  private async delay(maxTurns = this.maxTurns): Promise<void> {
    for (let n = this.rng.int(maxTurns + 1); n > 0; n--) await new Promise((r) => setImmediate(r));
  }
  protected _read(s: Sector, b: Uint8Array): Promise<void> {
    return this.delay(this.readMaxTurns).then(() => this.inner.read(s, b));
  }
  protected _write(s: Sector, b: Uint8Array, fua: boolean): Promise<void> {
    return this.delay().then(() => this.inner.write(s, b, { fua }));
  }
  protected override _flush(): Promise<void> {
    return this.delay().then(() => this.inner.flush());
  }
  protected override _discard(s: Sector, n: Sector): Promise<void> {
    return this.delay().then(() => this.inner.discard(s, n));
  }
}

/** Fails an I/O that has not completed within `ms`: a lost bio then fails its test quickly instead of hanging. */
function within<T>(p: Promise<T>, what: string, ms = 3000): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what} did not complete within ${ms} ms (a bio was lost)`)), ms);
  });
  return Promise.race([p, late]).finally(() => clearTimeout(timer));
}

/** The I/O methods of a mapped device, each guarded by within(). */
interface Io {
  readonly sizeSectors: number;
  read(sector: Sector, buf: Uint8Array): Promise<void>;
  write(sector: Sector, buf: Uint8Array, options?: { fua?: boolean }): Promise<void>;
  flush(): Promise<void>;
}

function guard(d: BlockDevice): Io {
  return {
    sizeSectors: d.sizeSectors,
    read: (sector, buf) => within(d.read(sector, buf), `${d.name}: read at ${sector}`),
    write: (sector, buf, options) => within(d.write(sector, buf, options), `${d.name}: write at ${sector}`),
    flush: () => within(d.flush(), `${d.name}: flush`),
  };
}

const slow = (n: number, seed: number, readMaxTurns = 3): DelayDevice => new DelayDevice(mem(n), createRng(seed), 3, readMaxTurns);

function randomBytes(rng: Rng, length: number): Buffer {
  const b = Buffer.alloc(length);
  for (let i = 0; i < length; i += 4) b.writeUInt32LE(Math.floor(rng.next() * 2 ** 32), i);
  return b;
}

/** Index of the first 512-byte sector where a and b differ, or -1. */
function firstDiffSector(a: Buffer, b: Buffer): number {
  if (a.length !== b.length) return 0;
  for (let s = 0; s * SECTOR < a.length; s++) {
    if (a.compare(b, s * SECTOR, (s + 1) * SECTOR, s * SECTOR, (s + 1) * SECTOR) !== 0) return s;
  }
  return -1;
}

/** Persistent store usage after n exceptions (spec: next_free from 2, skipping metadata chunks; EPA = chunk × 32). */
function persistentUsage(n: number, chunk: number): { alloc: number; meta: number } {
  const epa = (chunk * SECTOR) / 16;
  let nextFree = 2;
  for (let i = 0; i < n; i++) {
    nextFree++;
    if (nextFree % (epa + 1) === 1) nextFree++;
  }
  return { alloc: nextFree * chunk, meta: (Math.floor(n / epa) + 2) * chunk };
}

function expectedStatus(s: SnapModel, cowSectors: number): string {
  const n = s.exceptions.size;
  if (s.mode === 'N') return `${n * s.chunk}/${cowSectors} 0`;
  const u = persistentUsage(n, s.chunk);
  return `${u.alloc}/${cowSectors} ${u.meta}`;
}

interface SnapModel {
  readonly name: string;
  readonly cow: string;
  readonly mode: Mode;
  readonly chunk: number;
  readonly sizeSectors: number;
  /** The snapshot's contents as they must read. */
  readonly model: Buffer;
  /** Origin chunks with an exception (copied out or written through the snapshot). */
  readonly exceptions: Set<number>;
}

/** An engine over memory devices with an origin `orig` and snapshots, and the reference model. */
class World {
  readonly snaps = new Map<string, SnapModel>();
  readonly events: LoggedEvent[] = [];
  originModel: Buffer;

  private constructor(
    readonly e: Engine,
    readonly db: LevelDb,
    readonly devices: Record<string, BlockDevice>,
    readonly originSectors: number,
  ) {
    this.originModel = Buffer.alloc(originSectors * SECTOR);
    e.events$.subscribe((ev) => this.events.push(ev));
  }

  /** devices.o is the origin; it is filled with seeded random data (durably) before anything is created. */
  static async open(devices: Record<string, BlockDevice>, seed = 1, options: { trace?: boolean } = {}): Promise<World> {
    const db = new MemoryLevel() as unknown as LevelDb;
    const e = await Engine.open({ db, backingDevices: devices, seed, trace: options.trace });
    const o = devices.o;
    const w = new World(e, db, devices, o.sizeSectors);
    w.originModel = randomBytes(createRng(seed * 7919 + 13), o.sizeSectors * SECTOR);
    await o.write(sectors(0), w.originModel);
    await o.flush();
    return w;
  }

  get origin(): Io {
    return guard(this.e.device('orig')!);
  }

  dev(name: string): Io {
    return guard(this.e.device(name)!);
  }

  async createOrigin(lengthSectors = this.originSectors): Promise<void> {
    await this.e.create('orig', { table: `0 ${lengthSectors} snapshot-origin o` });
  }

  /** Creates snapshot `name` over COW label `cow`: its model is the origin model now. */
  async snapshot(name: string, cow: string, mode: Mode, chunk: number, lengthSectors = this.originSectors): Promise<SnapModel> {
    await this.e.create(name, { table: `0 ${lengthSectors} snapshot o ${cow} ${mode} ${chunk}` });
    const s: SnapModel = {
      name,
      cow,
      mode,
      chunk,
      sizeSectors: lengthSectors,
      model: Buffer.from(this.originModel.subarray(0, lengthSectors * SECTOR)),
      exceptions: new Set(),
    };
    this.snaps.set(name, s);
    return s;
  }

  /** Records an origin write in the model (and the chunks it copies out of live snapshots). */
  noteOriginWrite(sector: number, data: Buffer): void {
    data.copy(this.originModel, sector * SECTOR);
    const end = sector + data.length / SECTOR;
    for (const s of this.snaps.values()) {
      for (let x = sector; x < Math.min(end, s.sizeSectors); x++) s.exceptions.add(Math.floor(x / s.chunk));
    }
  }

  noteSnapWrite(name: string, sector: number, data: Buffer): void {
    const s = this.snaps.get(name)!;
    data.copy(s.model, sector * SECTOR);
    for (let x = sector; x < sector + data.length / SECTOR; x++) s.exceptions.add(Math.floor(x / s.chunk));
  }

  async writeOrigin(sector: number, data: Buffer): Promise<void> {
    await this.origin.write(sectors(sector), data);
    this.noteOriginWrite(sector, data);
  }

  async writeSnap(name: string, sector: number, data: Buffer): Promise<void> {
    await this.dev(name).write(sectors(sector), data);
    this.noteSnapWrite(name, sector, data);
  }

  async readAll(name: string): Promise<Buffer> {
    const d = this.dev(name);
    const b = Buffer.alloc(d.sizeSectors * SECTOR);
    await d.read(sectors(0), b);
    return b;
  }

  async expectOrigin(what = ''): Promise<void> {
    const got = await this.readAll('orig');
    const d = firstDiffSector(got, this.originModel);
    expect(d, `${what} origin differs from the model at sector ${d}`).toBe(-1);
  }

  async expectSnap(name: string, what = ''): Promise<void> {
    const got = await this.readAll(name);
    const d = firstDiffSector(got, this.snaps.get(name)!.model);
    expect(d, `${what} snapshot ${name} differs from the model at sector ${d}`).toBe(-1);
  }

  async expectAll(what = ''): Promise<void> {
    await this.expectOrigin(what);
    for (const name of this.snaps.keys()) await this.expectSnap(name, what);
  }

  /** `dmstate status` line of snapshot `name` as the kernel would print it after the model's exceptions. */
  expectStatus(name: string): void {
    const s = this.snaps.get(name)!;
    const cowSectors = this.devices[s.cow].sizeSectors;
    expect(this.e.status(name)).toEqual([`0 ${s.sizeSectors} snapshot ${expectedStatus(s, cowSectors)}`]);
  }

  state(name: string): SnapshotInstance['state'] {
    return (this.e.device(name)!.live!.targets[0].instance as SnapshotInstance).state;
  }

  eventTypes(): string[] {
    return this.events.map((e) => e.type);
  }
}

const rngFor = (seed: number): Rng => createRng(seed);

describe('snapshot: copy-on-write semantics', () => {
  test('origin writes copy out: the snapshot reads the origin as it was when it was taken', async () => {
    const w = await World.open({ o: mem(2048), c: mem(2048) });
    await w.createOrigin();
    await w.snapshot('snap', 'c', 'P', 8);
    const rng = rngFor(2);
    // Unaligned offsets and lengths (512-byte granularity), across chunk boundaries, some rewriting earlier ones.
    for (const [sector, count] of [[3, 1], [8, 8], [13, 20], [100, 3], [1, 40], [2040, 8], [15, 2], [511, 130]]) {
      await w.writeOrigin(sector, randomBytes(rng, count * SECTOR));
      await w.expectAll(`after origin write ${sector}+${count}:`);
      w.expectStatus('snap');
    }
    // The snapshot kept the initial contents everywhere.
    const initial = randomBytes(createRng(1 * 7919 + 13), 2048 * SECTOR);
    expect(firstDiffSector(await w.readAll('snap'), initial)).toBe(-1);
    await w.e.close();
  });

  test('status matches the kernel line seen on 6.1: three 4 KiB copies with chunk 8 → 40/16384 16', async () => {
    const w = await World.open({ o: mem(32768), c: mem(16384) });
    await w.createOrigin();
    await w.snapshot('snap', 'c', 'P', 8);
    expect(w.e.status('snap')).toEqual(['0 32768 snapshot 16/16384 16']);
    for (const s of [0, 800, 16000]) await w.writeOrigin(s, Buffer.alloc(4096, 0xab));
    expect(w.e.status('snap')).toEqual(['0 32768 snapshot 40/16384 16']);
    // Writing the same chunks again copies nothing.
    for (const s of [0, 804, 16000]) await w.writeOrigin(s, Buffer.alloc(2048, 0xcd));
    expect(w.e.status('snap')).toEqual(['0 32768 snapshot 40/16384 16']);
    await w.expectAll();
    await w.e.close();
  });

  test('snapshot writes: partial chunk → copy then write; whole chunk → no copy; the origin never changes', async () => {
    const inner = mem(1024);
    // The origin under a FaultyBlockDevice: an error rule on origin reads shows whether a copy read it.
    const o = new FaultyBlockDevice(inner);
    const w = await World.open({ o, c: mem(1024) });
    await w.createOrigin();
    await w.snapshot('snap', 'c', 'P', 8);
    const rng = rngFor(3);
    // Partial chunk: sectors 2..4 of chunk 1; the rest of the chunk must come from the origin (a copy).
    await w.writeSnap('snap', 10, randomBytes(rng, 3 * SECTOR));
    await w.expectAll('partial:');
    w.expectStatus('snap');
    // A whole chunk (chunk 4 = sectors 32..39) while origin reads of that chunk fail: written without a copy.
    o.setErrorRules([{ op: 'read', startSector: sectors(32), endSector: sectors(40) }]);
    await w.writeSnap('snap', 32, randomBytes(rng, 8 * SECTOR));
    expect(o.injectedErrorCount).toBe(0);
    // The same rule makes a partial write of chunk 5 fail: it has to copy (read the origin) first.
    o.setErrorRules([{ op: 'read', startSector: sectors(40), endSector: sectors(48) }]);
    await expect(w.dev('snap').write(sectors(41), randomBytes(rng, SECTOR))).rejects.toMatchObject({ code: 'DM_IO' });
    expect(o.injectedErrorCount).toBeGreaterThan(0);
    expect(w.e.status('snap')).toEqual(['0 1024 snapshot Invalid']);
    o.setErrorRules([]);
    await w.expectOrigin('origin after snapshot writes:');
    await w.e.close();
  });

  test('snapshot writes of whole and partial chunks, then origin writes over them: each side keeps its own data', async () => {
    const w = await World.open({ o: mem(1024), c: mem(1024) });
    await w.createOrigin();
    await w.snapshot('snap', 'c', 'P', 8);
    const rng = rngFor(4);
    await w.writeSnap('snap', 0, randomBytes(rng, 24 * SECTOR)); // three whole chunks
    await w.writeSnap('snap', 27, randomBytes(rng, 10 * SECTOR)); // partial, partial
    await w.expectAll('snapshot writes:');
    w.expectStatus('snap');
    await w.writeOrigin(0, randomBytes(rng, 64 * SECTOR)); // chunks 0..7: 0..4 have exceptions already
    await w.expectAll('origin over them:');
    w.expectStatus('snap');
    await w.writeSnap('snap', 4, randomBytes(rng, 2 * SECTOR)); // into an existing exception
    await w.writeSnap('snap', 60, randomBytes(rng, 8 * SECTOR)); // chunk 7 (copied out by the origin write) + chunk 8
    await w.expectAll('again:');
    w.expectStatus('snap');
    await w.e.close();
  });

  test('two snapshots of one origin with chunk sizes 8 and 32, taken at different times', async () => {
    const w = await World.open({ o: mem(4096), c8: mem(4096), c32: mem(8192) });
    await w.createOrigin();
    const rng = rngFor(5);
    await w.snapshot('s8', 'c8', 'P', 8);
    await w.writeOrigin(30, randomBytes(rng, 20 * SECTOR));
    await w.writeOrigin(1000, randomBytes(rng, 70 * SECTOR));
    await w.snapshot('s32', 'c32', 'P', 32);
    await w.expectAll('second snapshot taken:');
    await w.writeOrigin(20, randomBytes(rng, 50 * SECTOR)); // overlaps chunks s8 has and does not have
    await w.writeOrigin(4000, randomBytes(rng, 96 * SECTOR)); // the end
    await w.writeSnap('s32', 33, randomBytes(rng, 5 * SECTOR));
    await w.writeSnap('s8', 33, randomBytes(rng, 5 * SECTOR));
    await w.writeSnap('s32', 128, randomBytes(rng, 32 * SECTOR)); // a whole 32-sector chunk
    await w.writeOrigin(130, randomBytes(rng, 3 * SECTOR));
    await w.expectAll('both:');
    w.expectStatus('s8');
    w.expectStatus('s32');
    // A third, transient, snapshot with chunk 16 joins later; the split size follows the smallest chunk.
    w.devices.n16 = mem(4096);
    w.e.registerBackingDevice('n16', w.devices.n16);
    await w.snapshot('n16', 'n16', 'N', 16);
    await w.writeOrigin(0, randomBytes(rng, 256 * SECTOR));
    await w.writeSnap('n16', 5, randomBytes(rng, 30 * SECTOR));
    await w.expectAll('three:');
    for (const n of ['s8', 's32', 'n16']) w.expectStatus(n);
    await w.e.close();
  });

  test('the last, short chunk of an origin whose size is not a multiple of the chunk size', async () => {
    // 1003 sectors: chunk 8 → last chunk 125 holds 3 sectors; chunk 32 → last chunk 31 holds 11.
    const w = await World.open({ o: mem(1003), c8: mem(2048), c32: mem(4096) });
    await w.createOrigin();
    await w.snapshot('s8', 'c8', 'P', 8);
    await w.snapshot('s32', 'c32', 'P', 32);
    const rng = rngFor(6);
    await w.writeOrigin(1001, randomBytes(rng, 2 * SECTOR));
    await w.expectAll('origin tail write:');
    await w.writeSnap('s8', 1000, randomBytes(rng, 2 * SECTOR));
    await w.writeSnap('s32', 995, randomBytes(rng, 8 * SECTOR));
    await w.writeOrigin(990, randomBytes(rng, 13 * SECTOR));
    await w.expectAll('snapshot tail writes:');
    w.expectStatus('s8');
    w.expectStatus('s32');
    // Reload both (handover) and remove/re-create one: the short chunk's exception survives.
    await w.e.remove('s32');
    await w.e.create('s32', { table: '0 1003 snapshot o c32 P 32' });
    await w.expectAll('after re-create:');
    w.expectStatus('s32');
    await w.e.close();
  });

  test('status arithmetic across the first metadata area (chunk 8: 256 exceptions per area)', async () => {
    const w = await World.open({ o: mem(8 * 400), c: mem(8 * 400) });
    await w.createOrigin();
    await w.snapshot('snap', 'c', 'P', 8);
    w.expectStatus('snap');
    const writeChunks = async (from: number, to: number): Promise<void> => {
      await Promise.all(Array.from({ length: to - from }, (_, i) => w.writeOrigin((from + i) * 8, Buffer.alloc(4096, (from + i) & 0xff))));
    };
    const steps: Array<[number, string]> = [
      [1, '24/3200 16'],
      [255, '2056/3200 16'], // next_free = 257, the last data chunk of area 0
      [256, '2072/3200 24'], // next_free skips chunk 258 (area 1); current_area = 1
      [257, '2080/3200 24'],
      [300, '2424/3200 24'],
    ];
    let done = 0;
    for (const [n, status] of steps) {
      await writeChunks(done, n);
      done = n;
      expect(w.e.status('snap'), `after ${n} exceptions`).toEqual([`0 3200 snapshot ${status}`]);
      w.expectStatus('snap');
    }
    await w.expectAll();
    // The records of area 0 and area 1 are where the spec puts them once checkpointed (suspend).
    await w.e.suspend('snap');
    await w.e.resume('snap');
    const cow = (w.devices.c as MemoryBlockDevice).snapshotBytes();
    expect(cow.readUInt32LE(0)).toBe(SNAP_MAGIC);
    const area0 = cow.subarray(8 * SECTOR, 16 * SECTOR);
    const area1 = cow.subarray(258 * 8 * SECTOR, 259 * 8 * SECTOR);
    const olds = new Set<number>();
    for (let i = 0; i < 256; i++) {
      expect(Number(area0.readBigUInt64LE(i * 16 + 8))).not.toBe(0);
      olds.add(Number(area0.readBigUInt64LE(i * 16)));
    }
    for (let i = 0; i < 44; i++) olds.add(Number(area1.readBigUInt64LE(i * 16)));
    expect(Number(area1.readBigUInt64LE(44 * 16 + 8))).toBe(0); // end marker
    expect(olds.size).toBe(300);
    // Re-created from the COW alone (checkpointed): same usage.
    await w.e.remove('snap');
    await w.e.create('snap', { table: '0 3200 snapshot o c P 8' });
    w.expectStatus('snap');
    await w.expectAll('re-created:');
    await w.e.close();
  });

  test('transient (N) store: chunks from COW chunk 0, no metadata, nothing survives re-creation', async () => {
    const w = await World.open({ o: mem(1024), c: mem(256) });
    await w.createOrigin();
    await w.snapshot('snap', 'c', 'N', 8);
    expect(w.e.table('snap')).toEqual(['0 1024 snapshot o c N 8']);
    expect(w.e.status('snap')).toEqual(['0 1024 snapshot 0/256 0']);
    const rng = rngFor(7);
    await w.writeOrigin(5, randomBytes(rng, 20 * SECTOR)); // chunks 0..3
    await w.writeSnap('snap', 100, randomBytes(rng, 4 * SECTOR));
    expect(w.e.status('snap')).toEqual(['0 1024 snapshot 40/256 0']);
    w.expectStatus('snap');
    await w.expectAll('transient:');
    // The copies are at COW chunks 0.. in allocation order: chunk 0 of the COW holds origin chunk 0 as it was.
    const cow = (w.devices.c as MemoryBlockDevice).snapshotBytes();
    expect(firstDiffSector(cow.subarray(0, 8 * SECTOR), w.snaps.get('snap')!.model.subarray(0, 8 * SECTOR))).toBe(-1);
    // Full when next_free + chunk > size: 256 sectors = 32 chunks; 5 used; 27 more fit, the 28th invalidates.
    for (let c = 20; c < 47; c++) await w.writeOrigin(c * 8, randomBytes(rng, SECTOR));
    expect(w.e.status('snap')).toEqual(['0 1024 snapshot 256/256 0']);
    await w.writeOrigin(47 * 8, randomBytes(rng, SECTOR));
    expect(w.e.status('snap')).toEqual(['0 1024 snapshot Invalid']);
    await w.expectOrigin('origin after the transient COW filled:');
    // A transient snapshot re-created over the same COW starts empty: it reads the origin of now.
    await w.e.remove('snap');
    await w.snapshot('snap', 'c', 'N', 8);
    expect(w.e.status('snap')).toEqual(['0 1024 snapshot 0/256 0']);
    await w.expectAll('re-created transient:');
    await w.e.close();
  });

  test('table output: origin, COW, store code and the chunk size in force (a header wins over the table)', async () => {
    const w = await World.open({ o: mem(1024), c: mem(1024), d: mem(1024) });
    await w.createOrigin();
    expect(w.e.table('orig')).toEqual(['0 1024 snapshot-origin o']);
    await w.snapshot('snap', 'c', 'P', 8);
    expect(w.e.table('snap')).toEqual(['0 1024 snapshot o c P 8']);
    await w.snapshot('po', 'd', 'PO', 16);
    expect(w.e.table('po')).toEqual(['0 1024 snapshot o d PO 16']);
    await w.e.remove('snap');
    await w.e.create('snap', { table: '0 1024 snapshot o c p 32' });
    expect(w.e.table('snap')).toEqual(['0 1024 snapshot o c P 8']);
    // Table chunk size 0 on a new COW: the default, 32 sectors.
    await w.e.remove('po');
    await (w.devices.d as MemoryBlockDevice).write(sectors(0), Buffer.alloc(16 * SECTOR));
    await w.e.create('po', { table: '0 1024 snapshot o d PO 0' });
    expect(w.e.table('po')).toEqual(['0 1024 snapshot o d PO 32']);
    await w.e.close();
  });
});

describe('snapshot: full, failing and foreign COW devices', () => {
  test('P: a full COW invalidates the snapshot; the origin keeps working; Invalid survives re-creation', async () => {
    // 64 sectors = 8 chunks of 8: header, area 0, data chunks 2..7 → six exceptions fit.
    const w = await World.open({ o: mem(1024), c: mem(64) });
    await w.createOrigin();
    await w.snapshot('snap', 'c', 'P', 8);
    const rng = rngFor(8);
    for (let c = 0; c < 6; c++) await w.writeOrigin(c * 16 + 1, randomBytes(rng, SECTOR));
    expect(w.e.status('snap')).toEqual(['0 1024 snapshot 64/64 16']);
    await w.expectAll('six exceptions:');
    const eventNr = w.e.info('snap').eventNr;
    await w.writeOrigin(500, randomBytes(rng, 4 * SECTOR)); // needs a seventh: the COW is full
    expect(w.e.status('snap')).toEqual(['0 1024 snapshot Invalid']);
    expect(w.e.info('snap').eventNr).toBeGreaterThan(eventNr);
    await w.expectOrigin('origin after the overflow:');
    await w.writeOrigin(0, randomBytes(rng, 64 * SECTOR));
    await w.expectOrigin('origin writes go on:');
    await expect(w.dev('snap').read(sectors(0), Buffer.alloc(SECTOR))).rejects.toMatchObject({ code: 'DM_IO' });
    await expect(w.dev('snap').write(sectors(0), Buffer.alloc(SECTOR))).rejects.toMatchObject({ code: 'DM_IO' });
    const inv = w.events.find((e) => e.type === 'snapshot.invalidated');
    expect(inv).toMatchObject({ type: 'snapshot.invalidated', device: 'snap' });
    // The header says invalid (valid = 0) on disk; a new table over the COW loads it Invalid.
    await w.e.remove('snap');
    const header = (w.devices.c as MemoryBlockDevice).snapshotBytes().subarray(0, 16);
    expect([header.readUInt32LE(0), header.readUInt32LE(4), header.readUInt32LE(8), header.readUInt32LE(12)]).toEqual([SNAP_MAGIC, 0, 1, 8]);
    await w.e.create('snap', { table: '0 1024 snapshot o c P 8' });
    expect(w.e.status('snap')).toEqual(['0 1024 snapshot Invalid']);
    await w.e.close();
  });

  test('remove + re-create right after the COW filled (a slow COW): the snapshot stays Invalid', async () => {
    for (let seed = 1; seed <= 8; seed++) {
      const w = await World.open({ o: mem(1024), c: slow(64, 500 + seed) });
      await w.createOrigin();
      await w.snapshot('snap', 'c', 'P', 8);
      const rng = rngFor(seed);
      for (let c = 0; c < 7; c++) await w.writeOrigin(c * 8, randomBytes(rng, SECTOR));
      expect(w.e.status('snap'), `seed ${seed}`).toEqual(['0 1024 snapshot Invalid']);
      await w.e.remove('snap');
      await w.e.create('snap', { table: '0 1024 snapshot o c P 8' });
      expect(w.e.status('snap'), `seed ${seed}: an invalidated snapshot came back after remove + create`).toEqual(['0 1024 snapshot Invalid']);
      await w.e.close();
    }
  });

  test('PO: a snapshot write that finds the COW full → Overflow; the snapshot stays readable, writes fail', async () => {
    const w = await World.open({ o: mem(1024), c: mem(64) });
    await w.createOrigin();
    await w.snapshot('snap', 'c', 'PO', 8);
    const rng = rngFor(9);
    for (let c = 0; c < 5; c++) await w.writeSnap('snap', c * 8 + 2, randomBytes(rng, 2 * SECTOR));
    await w.writeOrigin(200, randomBytes(rng, SECTOR)); // the sixth, from the origin
    expect(w.e.status('snap')).toEqual(['0 1024 snapshot 64/64 16']);
    await expect(w.dev('snap').write(sectors(300), randomBytes(rng, SECTOR))).rejects.toMatchObject({ code: 'DM_IO' });
    expect(w.e.status('snap')).toEqual(['0 1024 snapshot Overflow']);
    expect(w.events.some((e) => e.type === 'snapshot.overflowed')).toBe(true);
    expect(w.events.some((e) => e.type === 'snapshot.invalidated')).toBe(false);
    await w.expectAll('overflowed, still readable:');
    // Once overflowed, writes fail even where an exception exists; reads and origin writes to copied chunks go on.
    await expect(w.dev('snap').write(sectors(2), randomBytes(rng, SECTOR))).rejects.toMatchObject({ code: 'DM_IO' });
    // Chunks 0..5: 0..4 have exceptions (the snapshot writes), 5 needs a copy and the COW is full.
    await w.writeOrigin(0, randomBytes(rng, 48 * SECTOR));
    await w.expectOrigin('origin writes while overflowed:');
    // Linux __origin_write invalidates when it cannot allocate, even a PO snapshot (only snapshot writes overflow).
    expect(w.e.status('snap')).toEqual(['0 1024 snapshot Invalid']);
    await w.e.close();
  });

  test('PO: origin writes to chunks already copied need no space; the overflowed snapshot reads exactly', async () => {
    const w = await World.open({ o: mem(1024), c: mem(64) });
    await w.createOrigin();
    await w.snapshot('snap', 'c', 'PO', 8);
    const rng = rngFor(10);
    for (let c = 0; c < 6; c++) await w.writeSnap('snap', c * 8, randomBytes(rng, 8 * SECTOR));
    await expect(w.dev('snap').write(sectors(48), randomBytes(rng, 8 * SECTOR))).rejects.toMatchObject({ code: 'DM_IO' });
    expect(w.e.status('snap')).toEqual(['0 1024 snapshot Overflow']);
    await w.writeOrigin(0, randomBytes(rng, 48 * SECTOR));
    expect(w.e.status('snap')).toEqual(['0 1024 snapshot Overflow']);
    await w.expectAll('overflowed:');
    await w.e.close();
  });

  test('a COW write error (FaultyBlockDevice rule) invalidates the snapshot; the origin write still lands', async () => {
    const cow = new FaultyBlockDevice(mem(2048));
    const w = await World.open({ o: mem(1024), c: cow });
    await w.createOrigin();
    await w.snapshot('snap', 'c', 'P', 8);
    const rng = rngFor(11);
    await w.writeOrigin(0, randomBytes(rng, 16 * SECTOR));
    await w.expectAll('before the fault:');
    // Data chunks (past header and area 0) refuse writes.
    cow.setErrorRules([{ op: 'write', startSector: sectors(16) }]);
    await w.writeOrigin(100, randomBytes(rng, 4 * SECTOR));
    expect(cow.injectedErrorCounts.write).toBeGreaterThan(0);
    expect(w.e.status('snap')).toEqual(['0 1024 snapshot Invalid']);
    expect(w.events.find((e) => e.type === 'snapshot.invalidated')).toMatchObject({ device: 'snap' });
    await w.expectOrigin('origin after the COW error:');
    await expect(w.dev('snap').read(sectors(0), Buffer.alloc(SECTOR))).rejects.toMatchObject({ code: 'DM_IO' });
    cow.setErrorRules([]);
    await w.e.close();
  });

  test('a COW flush error when committing invalidates the snapshot and fails the snapshot write', async () => {
    const cow = new FaultyBlockDevice(mem(2048), { volatileCache: true });
    const w = await World.open({ o: mem(1024), c: cow });
    await w.createOrigin();
    await w.snapshot('snap', 'c', 'P', 8);
    cow.setErrorRules([{ op: 'flush' }]);
    await expect(w.dev('snap').write(sectors(3), Buffer.alloc(SECTOR, 7))).rejects.toMatchObject({ code: 'DM_IO' });
    expect(w.e.status('snap')).toEqual(['0 1024 snapshot Invalid']);
    const rng = rngFor(12);
    await w.writeOrigin(0, randomBytes(rng, 8 * SECTOR));
    await w.expectOrigin();
    cow.setErrorRules([]);
    await w.e.close();
  });

  test('a corrupt, foreign or wrong-version header or a bad chunk size is refused at create; the COW is unchanged', async () => {
    const header = (magic: number, valid: number, version: number, chunk: number): Buffer => {
      const b = Buffer.alloc(4096);
      b.writeUInt32LE(magic, 0);
      b.writeUInt32LE(valid, 4);
      b.writeUInt32LE(version, 8);
      b.writeUInt32LE(chunk, 12);
      return b;
    };
    const xfs = Buffer.alloc(4096);
    xfs.write('XFSB', 0, 'latin1');
    xfs.writeUInt32BE(4096, 4);
    const dataNoMagic = Buffer.alloc(4096);
    dataNoMagic.fill(0x5a, 512);
    const cases: Array<[string, Buffer | undefined, string]> = [
      ['bad magic', header(0x12345678, 1, 1, 8), 'P 8'],
      ['foreign (an XFS superblock)', xfs, 'P 8'],
      ['no magic but data in chunk 0', dataNoMagic, 'P 8'],
      ['version 2', header(SNAP_MAGIC, 1, 2, 8), 'P 8'],
      ['version 0', header(SNAP_MAGIC, 1, 0, 8), 'PO 8'],
      ['header chunk size 7', header(SNAP_MAGIC, 1, 1, 7), 'P 8'],
      ['header chunk size 0', header(SNAP_MAGIC, 1, 1, 0), 'P 8'],
      ['header chunk size larger than the COW', header(SNAP_MAGIC, 1, 1, 4096), 'P 8'],
      ['table chunk size 7', undefined, 'P 7'],
      ['table chunk size 12', undefined, 'P 12'],
      ['table chunk size 7 (transient)', undefined, 'N 7'],
      ['table chunk size 0 (transient)', undefined, 'N 0'],
      ['table chunk size 7 over a valid header', header(SNAP_MAGIC, 1, 1, 8), 'P 7'],
      ['unknown store type', undefined, 'X 8'],
    ];
    const cowInner = mem(2048);
    const w = await World.open({ o: mem(1024), c: cowInner });
    await w.createOrigin();
    const seqBefore = w.e.log.lastSeq;
    for (const [what, head, args] of cases) {
      await cowInner.discard(sectors(0), sectors(2048));
      if (head) await cowInner.write(sectors(0), head);
      await cowInner.write(sectors(1000), Buffer.alloc(SECTOR, 0x33)); // something else on the COW
      const before = cowInner.snapshotBytes();
      const err = await w.e.create('snap', { table: `0 1024 snapshot o c ${args}` }).then(
        () => undefined,
        (x: unknown) => x,
      );
      expect(err, what).toMatchObject({ code: 'DM_TABLE_INVALID' });
      expect(firstDiffSector(cowInner.snapshotBytes(), before), `${what}: the COW was written`).toBe(-1);
      expect(w.e.names(), what).toEqual(['orig']);
    }
    expect(w.e.log.lastSeq).toBe(seqBefore);
    // The origin still works without a snapshot, and a good table over a zeroed COW is accepted afterwards.
    await w.writeOrigin(0, Buffer.alloc(SECTOR, 1));
    await cowInner.discard(sectors(0), sectors(2048));
    await w.snapshot('snap', 'c', 'P', 8);
    await w.expectAll();
    await w.e.close();
  });

  test('a header with valid = 0 loads as Invalid without writing the COW', async () => {
    const cowInner = mem(2048);
    const w = await World.open({ o: mem(1024), c: cowInner });
    await w.createOrigin();
    const h = Buffer.alloc(4096);
    h.writeUInt32LE(SNAP_MAGIC, 0);
    h.writeUInt32LE(0, 4);
    h.writeUInt32LE(1, 8);
    h.writeUInt32LE(8, 12);
    await cowInner.write(sectors(0), h);
    const before = cowInner.snapshotBytes();
    await w.e.create('snap', { table: '0 1024 snapshot o c P 8' });
    expect(w.e.status('snap')).toEqual(['0 1024 snapshot Invalid']);
    await w.writeOrigin(0, Buffer.alloc(4096, 9));
    await w.expectOrigin();
    expect(firstDiffSector(cowInner.snapshotBytes(), before)).toBe(-1);
    await w.e.close();
  });
});

describe('snapshot: reload, re-create, concurrency, events', () => {
  test('reloading the snapshot table (load + suspend + resume) keeps its exceptions (handover)', async () => {
    const w = await World.open({ o: mem(2048), c: mem(2048) });
    await w.createOrigin();
    await w.snapshot('snap', 'c', 'P', 8);
    const rng = rngFor(13);
    await w.writeOrigin(7, randomBytes(rng, 50 * SECTOR));
    await w.writeSnap('snap', 300, randomBytes(rng, 9 * SECTOR));
    const status = w.e.status('snap');
    w.expectStatus('snap');
    await w.e.load('snap', '0 2048 snapshot o c P 8');
    await w.expectAll('loaded, not yet swapped:');
    await w.e.suspend('snap');
    await w.e.resume('snap');
    expect(w.e.status('snap')).toEqual(status);
    await w.expectAll('after the reload:');
    // The same chunks again: no new exceptions.
    await w.writeOrigin(7, randomBytes(rng, 50 * SECTOR));
    expect(w.e.status('snap')).toEqual(status);
    // A reload with origin writes in flight (resume suspends itself when a table is waiting).
    const inFlight = Array.from({ length: 40 }, (_, i) => {
      const data = randomBytes(rng, 3 * SECTOR);
      const sector = 600 + i * 20;
      return w.origin.write(sectors(sector), data).then(() => w.noteOriginWrite(sector, data));
    });
    await w.e.load('snap', '0 2048 snapshot o c P 8');
    await w.e.resume('snap');
    await Promise.all(inFlight);
    await w.expectAll('reload under load:');
    w.expectStatus('snap');
    await w.e.close();
  });

  test('remove + re-create over the same persistent COW finds its exceptions, also in a new engine', async () => {
    const devices = { o: mem(2048), c: mem(2048) };
    const w = await World.open(devices);
    await w.createOrigin();
    await w.snapshot('snap', 'c', 'P', 8);
    const rng = rngFor(14);
    for (let i = 0; i < 20; i++) await w.writeOrigin(rng.int(2000), randomBytes(rng, (1 + rng.int(40)) * SECTOR));
    await w.writeSnap('snap', 1500, randomBytes(rng, 17 * SECTOR));
    const status = w.e.status('snap');
    await w.e.remove('snap');
    expect(w.events.some((e) => e.type === 'checkpoint.written')).toBe(true);
    await w.e.create('snap', { table: '0 2048 snapshot o c P 8' });
    expect(w.e.status('snap')).toEqual(status);
    await w.expectAll('re-created:');
    // Origin writes to copied chunks copy nothing; new chunks still do.
    const before = w.state('snap').table.size;
    await w.writeOrigin(1500, randomBytes(rng, 17 * SECTOR));
    expect(w.state('snap').table.size).toBe(before);
    await w.expectAll('after more writes:');
    // A clean close and a new engine over the same pool: the snapshot is restored with its exceptions.
    const statusNow = w.e.status('snap');
    await w.e.close();
    const e2 = await Engine.open({ db: w.db, backingDevices: devices });
    expect(e2.names()).toEqual(['orig', 'snap']);
    expect(e2.status('snap')).toEqual(statusNow);
    const got = Buffer.alloc(2048 * SECTOR);
    await guard(e2.device('snap')!).read(sectors(0), got);
    expect(firstDiffSector(got, w.snaps.get('snap')!.model)).toBe(-1);
    await e2.close();
  });

  test('removing the snapshot while origin writes are in flight: they finish their copies first', async () => {
    const w = await World.open({ o: slow(2048, 201), c: slow(2048, 202) });
    await w.createOrigin();
    await w.snapshot('snap', 'c', 'P', 8);
    const rng = rngFor(16);
    // Non-overlapping, so that the order they land in does not matter.
    const writes = Array.from({ length: 100 }, (_, i) => {
      const sector = i * 20 + rng.int(4);
      const data = randomBytes(rng, (1 + rng.int(16)) * SECTOR);
      w.noteOriginWrite(sector, data); // the snapshot exists when each is issued (mapped at once)
      return w.origin.write(sectors(sector), data);
    });
    await w.e.remove('snap');
    await Promise.all(writes);
    await w.expectOrigin();
    await w.e.create('snap', { table: '0 2048 snapshot o c P 8' });
    await w.expectSnap('snap', 're-created:');
    w.expectStatus('snap');
    await w.e.close();
  });

  test('a snapshot suspended when the engine stopped still gets its copies after a restart', async () => {
    const devices = { o: mem(1024), c: mem(1024) };
    const w = await World.open(devices);
    await w.createOrigin();
    await w.snapshot('snap', 'c', 'P', 8);
    const rng = rngFor(17);
    await w.writeOrigin(0, randomBytes(rng, 16 * SECTOR));
    await w.e.suspend('snap');
    // While suspended (before the restart), origin writes still copy out (Linux: suspending a snapshot does not
    // stop copy-on-write; only its own I/O queues).
    await w.writeOrigin(100, randomBytes(rng, 8 * SECTOR));
    await w.e.close();
    const e2 = await Engine.open({ db: w.db, backingDevices: devices });
    expect(e2.info('snap').suspended).toBe(true);
    const data = randomBytes(rng, 8 * SECTOR);
    await guard(e2.device('orig')!).write(sectors(200), data); // a chunk not copied yet
    w.noteOriginWrite(200, data);
    await e2.resume('snap');
    const got = Buffer.alloc(1024 * SECTOR);
    await guard(e2.device('snap')!).read(sectors(0), got);
    const d = firstDiffSector(got, w.snaps.get('snap')!.model);
    expect(d, `snapshot differs at sector ${d}: the origin write after the restart was not copied out`).toBe(-1);
    await e2.close();
  });

  test('more than COW_THRESHOLD (2048) copies in flight: writes are throttled, nothing is lost', async () => {
    const w = await World.open({ o: slow(8 * 3000, 301), c: mem(8 * 3100) });
    await w.createOrigin();
    await w.snapshot('snap', 'c', 'P', 8);
    const writes = Array.from({ length: 3000 }, (_, c) => {
      const data = Buffer.alloc(SECTOR, (c % 250) + 1);
      data.writeUInt32LE(c, 0);
      return w.origin.write(sectors(c * 8 + (c % 8)), data).then(() => w.noteOriginWrite(c * 8 + (c % 8), data));
    });
    await Promise.all(writes);
    await w.expectAll();
    w.expectStatus('snap');
    await w.e.close();
  });

  test('over 4096 exceptions: the store checkpoints itself (WAL trimmed); a new engine without a clean close finds all', async () => {
    const n = 4500;
    const devices = { o: mem(8 * n), c: mem(8 * (n + 40)) };
    const w = await World.open(devices);
    await w.createOrigin();
    await w.snapshot('snap', 'c', 'P', 8);
    await Promise.all(
      Array.from({ length: n }, (_, c) => {
        const data = Buffer.alloc(SECTOR, (c % 251) + 1);
        return w.origin.write(sectors(c * 8 + (c % 8)), data).then(() => w.noteOriginWrite(c * 8 + (c % 8), data));
      }),
    );
    w.expectStatus('snap');
    // The checkpoint runs in the background, after the commit that crossed 4096.
    const wal = w.e.log.walFor('c');
    for (let i = 0; i < 200 && (await wal.read()).length >= 4096; i++) await new Promise((r) => setTimeout(r, 10));
    expect((await wal.read()).length, 'WAL records left after the automatic checkpoint').toBeLessThan(4096);
    // Areas 0..15 are full on the COW (4096 records), without any suspend.
    const cow = devices.c.snapshotBytes();
    const area15 = cow.subarray((1 + 15 * 257) * 8 * SECTOR, (2 + 15 * 257) * 8 * SECTOR);
    expect(Number(area15.readBigUInt64LE(255 * 16 + 8)), 'last record of area 15').not.toBe(0);
    // The engine is dropped (no close: no checkpoint); a new one over the same pool recovers from areas + WAL.
    await w.e.log.drain();
    const e2 = await Engine.open({ db: w.db, backingDevices: devices });
    expect(e2.status('snap')).toEqual(w.e.status('snap'));
    const got = Buffer.alloc(8 * n * SECTOR);
    await guard(e2.device('snap')!).read(sectors(0), got);
    expect(firstDiffSector(got, w.snaps.get('snap')!.model)).toBe(-1);
    // Every exception is in the new table (reads alone would not tell a lost copy of an unchanged chunk).
    const state = (e2.device('snap')!.live!.targets[0].instance as SnapshotInstance).state;
    expect(state.table.size).toBe(n);
    await e2.close();
  });

  test('a COW read error fails the snapshot read but does not invalidate the snapshot', async () => {
    const cow = new FaultyBlockDevice(mem(2048));
    const w = await World.open({ o: mem(1024), c: cow });
    await w.createOrigin();
    await w.snapshot('snap', 'c', 'P', 8);
    await w.writeOrigin(0, Buffer.alloc(8 * SECTOR, 5)); // chunk 0 → COW chunk 2 (sectors 16..23)
    cow.setErrorRules([{ op: 'read', startSector: sectors(16), endSector: sectors(24) }]);
    await expect(w.dev('snap').read(sectors(0), Buffer.alloc(SECTOR))).rejects.toMatchObject({ code: 'DM_IO' });
    expect(w.e.status('snap')).toEqual(['0 1024 snapshot 24/2048 16']);
    cow.setErrorRules([]);
    await w.expectAll();
    await w.e.close();
  });

  test('a discard of the origin copies out first (or is refused): the snapshot keeps its data either way', async () => {
    const w = await World.open({ o: mem(1024), c: mem(1024), d: mem(1024) });
    await w.createOrigin();
    await w.snapshot('s8', 'c', 'P', 8);
    await w.snapshot('s32', 'd', 'P', 32);
    const done = await within(w.e.device('orig')!.discard(sectors(20), sectors(100)), 'origin discard').then(
      () => true,
      () => false,
    );
    if (done) w.noteOriginWrite(20, Buffer.alloc(100 * SECTOR));
    await w.expectAll(`after an origin discard (${done ? 'done' : 'refused'}):`);
    if (done) {
      w.expectStatus('s8');
      w.expectStatus('s32');
    }
    // Snapshots refuse discards (no discard features): nothing changes.
    await expect(w.e.device('s8')!.discard(sectors(0), sectors(8))).rejects.toMatchObject({ code: 'DM_IO' });
    await w.expectAll('after a snapshot discard:');
    await w.e.close();
  });

  test('a snapshot shorter than its origin: origin writes past its end copy nothing', async () => {
    const w = await World.open({ o: mem(2048), c: mem(2048) });
    await w.createOrigin();
    await w.snapshot('snap', 'c', 'P', 8, 1003);
    const rng = rngFor(18);
    await w.writeOrigin(1500, randomBytes(rng, 100 * SECTOR));
    expect(w.e.status('snap')).toEqual(['0 1003 snapshot 16/2048 16']);
    await w.writeOrigin(990, randomBytes(rng, 30 * SECTOR)); // chunks 123..125 (125 is the snapshot's short last one)
    await w.writeSnap('snap', 1001, randomBytes(rng, 2 * SECTOR));
    await w.expectAll();
    w.expectStatus('snap');
    await w.e.close();
  });

  test('many origin writes in flight at once, several to the same chunk: the snapshot is still exact', async () => {
    const w = await World.open({ o: slow(4096, 101, 40), c8: slow(8192, 102), c32: slow(8192, 103) });
    await w.createOrigin();
    await w.snapshot('s8', 'c8', 'P', 8);
    await w.snapshot('s32', 'c32', 'P', 32);
    const rng = rngFor(15);
    for (let round = 0; round < 4; round++) {
      const ops: Array<Promise<void>> = [];
      // Each chunk of 32 sectors gets 1..4 writes to distinct sectors, all issued at once.
      for (let c = 0; c < 128; c++) {
        const picks = new Set<number>();
        const n = 1 + rng.int(4);
        while (picks.size < n) picks.add(rng.int(32));
        for (const p of picks) {
          const sector = c * 32 + p;
          const data = randomBytes(rng, SECTOR);
          ops.push(w.origin.write(sectors(sector), data).then(() => w.noteOriginWrite(sector, data)));
        }
      }
      // Snapshot reads racing the copies, issued over the life of the batch (the origin's reads are slow, so some
      // are still reading the origin when the copy of their chunk is committed): they must see the old contents.
      const reads = Array.from({ length: 100 }, async () => {
        const name = rng.int(2) === 0 ? 's8' : 's32';
        const sector = rng.int(4096 - 64);
        const len = 1 + rng.int(64);
        const want = Buffer.from(w.snaps.get(name)!.model.subarray(sector * SECTOR, (sector + len) * SECTOR));
        const got = Buffer.alloc(len * SECTOR);
        for (let t = rng.int(300); t > 0; t--) await new Promise((r) => setImmediate(r));
        await w.dev(name).read(sectors(sector), got);
        expect(firstDiffSector(got, want), `racing read of ${name} at ${sector}+${len}`).toBe(-1);
      });
      await Promise.all([...ops, ...reads]);
      await w.expectAll(`round ${round}:`);
      w.expectStatus('s8');
      w.expectStatus('s32');
    }
    await w.e.close();
  });

  test('events: exception.prepared (trace), exception.committed, snapshot.invalidated, checkpoint.written', async () => {
    const w = await World.open({ o: mem(1024), c: mem(64) }, 1, { trace: true });
    await w.createOrigin();
    await w.snapshot('snap', 'c', 'P', 8);
    await w.writeOrigin(0, Buffer.alloc(8 * SECTOR, 1)); // chunk 0 → COW chunk 2
    await w.writeOrigin(9, Buffer.alloc(SECTOR, 2)); // chunk 1 → COW chunk 3
    const prepared = w.events.filter((e) => e.type === 'exception.prepared');
    expect(prepared).toMatchObject([
      { device: 'snap', oldChunk: 0, newChunk: 2 },
      { device: 'snap', oldChunk: 1, newChunk: 3 },
    ]);
    const committed = w.events.filter((e) => e.type === 'exception.committed');
    expect(committed.flatMap((e) => (e.type === 'exception.committed' ? e.chunks : []))).toEqual([
      [0, 2],
      [1, 3],
    ]);
    expect(committed.every((e) => e.type === 'exception.committed' && e.cow === 'c')).toBe(true);
    // Committed only after prepared.
    expect(w.events.findIndex((e) => e.type === 'exception.committed')).toBeGreaterThan(w.events.findIndex((e) => e.type === 'exception.prepared'));
    await w.e.suspend('snap');
    expect(w.events.filter((e) => e.type === 'checkpoint.written').at(-1)).toMatchObject({ device: 'snap', cow: 'c', exceptions: 2 });
    await w.e.resume('snap');
    for (let c = 2; c < 7; c++) await w.writeOrigin(c * 8, Buffer.alloc(SECTOR, c));
    expect(w.events.filter((e) => e.type === 'snapshot.invalidated')).toMatchObject([{ device: 'snap' }]);
    await w.e.close();
  });
});

// ---- seeded random workload ------------------------------------------------------------------------------------

interface SimOp {
  readonly kind: 'ow' | 'or' | 'sw' | 'sr';
  readonly dev: string;
  readonly sector: number;
  readonly count: number;
  /** Event-loop turns to wait before issuing it. */
  readonly delay: number;
  /** Writes: the data, and whether it is FUA. */
  readonly data: Buffer | undefined;
  readonly fua: boolean;
}

/**
 * One seed: an origin of random size (not always a multiple of 32), two snapshots (chunk sizes from {8, 32},
 * stores P/PO/N) taken at different times, and batches of concurrent ops that do not overlap on the same device
 * (an origin write and a snapshot read of the same sectors may run together: the snapshot must not see it).
 * Checked against the model after every batch; the status after every batch too.
 */
async function simulate(seed: number): Promise<{ ops: number }> {
  const rng = createRng(seed);
  const originSectors = 512 + rng.int(3000);
  const chunkA = rng.int(2) === 0 ? 8 : 32;
  const chunkB = rng.int(2) === 0 ? 8 : 32;
  const modes: Mode[] = ['P', 'P', 'PO', 'N'];
  const modeA = modes[rng.int(modes.length)];
  const modeB = modes[rng.int(modes.length)];
  // COWs large enough never to fill: every chunk, metadata areas, header.
  const cowSectors = (s: number, c: number): number => (Math.ceil(s / c) * 2 + 4) * c;
  // Half the seeds run over devices that complete I/O late and out of order.
  const dev = (n: number, k: number): BlockDevice => (seed % 2 === 0 ? slow(n, seed * 3 + k) : mem(n));
  const devices = { o: dev(originSectors, 0), ca: dev(cowSectors(originSectors, chunkA), 1), cb: dev(cowSectors(originSectors, chunkB), 2) };
  const w = await World.open(devices, seed);
  await w.createOrigin();
  await w.snapshot('sa', 'ca', modeA, chunkA);
  const batches = 12 + rng.int(10);
  const takeB = rng.int(batches);
  let opCount = 0;
  for (let b = 0; b < batches; b++) {
    if (b === takeB) await w.snapshot('sb', 'cb', modeB, chunkB);
    const busy = new Map<string, Array<[number, number]>>();
    const ops: SimOp[] = [];
    const n = 1 + rng.int(10);
    for (let i = 0; i < n; i++) {
      const snapNames = [...w.snaps.keys()];
      const kind = (['ow', 'ow', 'or', 'sw', 'sr'] as const)[rng.int(5)];
      const dev = kind === 'ow' || kind === 'or' ? 'orig' : snapNames[rng.int(snapNames.length)];
      const size = w.dev(dev).sizeSectors;
      const count = Math.min(size, 1 + (rng.int(4) === 0 ? rng.int(128) : rng.int(16)));
      const sector = rng.int(size - count + 1);
      const ranges = busy.get(dev) ?? [];
      if (ranges.some(([s, e]) => sector < e && s < sector + count)) continue;
      ranges.push([sector, sector + count]);
      busy.set(dev, ranges);
      const write = kind === 'ow' || kind === 'sw';
      // Over slow devices, ops start at different times during the batch (reads land in the middle of copies).
      const delay = seed % 2 === 0 ? rng.int(30) : 0;
      ops.push({ kind, dev, sector, count, delay, data: write ? randomBytes(rng, count * SECTOR) : undefined, fua: write && rng.int(4) === 0 });
    }
    const pending = ops.map(async (op) => {
      for (let t = op.delay; t > 0; t--) await new Promise((r) => setImmediate(r));
      const d = w.dev(op.dev);
      const data = op.data;
      if (data) {
        return d.write(sectors(op.sector), data, { fua: op.fua }).then(() => {
          if (op.kind === 'ow') w.noteOriginWrite(op.sector, data);
          else w.noteSnapWrite(op.dev, op.sector, data);
        });
      }
      // Reads check against the model as it was when the batch started (no write to the same device overlaps).
      const model = op.dev === 'orig' ? w.originModel : w.snaps.get(op.dev)!.model;
      const want = Buffer.from(model.subarray(op.sector * SECTOR, (op.sector + op.count) * SECTOR));
      const got = Buffer.alloc(op.count * SECTOR);
      return d.read(sectors(op.sector), got).then(() => {
        const diff = firstDiffSector(got, want);
        if (diff !== -1) throw new Error(`batch ${b}: read of ${op.dev} at ${op.sector}+${op.count} differs at +${diff}`);
      });
    });
    if (rng.int(5) === 0) pending.push(w.dev(rng.int(2) === 0 ? 'orig' : 'sa').flush());
    await Promise.all(pending);
    opCount += ops.length;
    await w.expectAll(`batch ${b}:`);
    for (const name of w.snaps.keys()) w.expectStatus(name);
    if (rng.int(8) === 0) {
      // A reload of one snapshot between batches (handover).
      const name = [...w.snaps.keys()][rng.int(w.snaps.size)];
      await w.e.load(name, w.e.table(name)[0]);
      await w.e.resume(name);
      w.expectStatus(name);
    }
  }
  await w.e.close();
  return { ops: opCount };
}

describe('snapshot: seeded random workload against the model', () => {
  const only = process.env.SNAPSHOT_SEED;
  const seeds = only !== undefined ? [Number(only)] : Array.from({ length: 50 }, (_, i) => i + 1);
  test(`${seeds.length} seeds, two snapshots each, batches of concurrent ops`, async () => {
    let ops = 0;
    for (const seed of seeds) {
      try {
        ops += (await simulate(seed)).ops;
      } catch (err) {
        console.log(`reproduce with seed=${seed} (SNAPSHOT_SEED=${seed} npx vitest run test/targets/snapshot.test.ts)`);
        throw new Error(`seed ${seed}: ${(err as Error).message}\nreproduce with seed=${seed}`, { cause: err });
      }
    }
    console.log(`random workload: ${seeds.length} seeds, ${ops} ops`);
  });
});
