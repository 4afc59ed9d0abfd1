/**
 * Mirror benchmarks, on files (FileBlockDevice, the page cache and fdatasync as in production):
 *
 * (a) write throughput, 4 KiB random writes at queue depth 1 and 16 and 64 KiB sequential writes at queue depth 4,
 *     through: a linear device over one file (the reference), a 2-leg mirror with a core log (no log I/O), with a
 *     disk log on a separate file, and with the disk log on the same file as leg 0 (seed 002: an intent log on the
 *     same spindle as the data costs 5–10× on a disk; on a page-cached file it is the fdatasync that costs), and the
 *     same two placements with an md write-intent bitmap (chunk = region, daemon sleep 5 s: a chunk's bit, once set,
 *     stays set while writes keep coming, so a random workload over the device pays the bitmap write once per chunk).
 * (b) resync time after a crash left 1% of the regions dirty in a disk log, against a full resync (`sync`) of the
 *     same mirror. Target: ≤ 2% of the full resync's time.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { MemoryLevel } from 'memory-level';
import type { BlockDevice } from '../src/block/contract.js';
import { sectors } from '../src/block/units.js';
import { createSystemClock, type Clock } from '../src/core/clock.js';
import { Engine } from '../src/core/engine.js';
import { createRng } from '../src/core/rng.js';
import type { LevelDb } from '../src/log/event-log.js';
import type { MirrorInstance } from '../src/targets/mirror/mirror.js';

const LEG_SECTORS = (256 * 1024 * 1024) / 512;
const RESYNC_LEG_SECTORS = (1024 * 1024 * 1024) / 512;
const REGION_SECTORS = 1024;
/** Leg 0 starts here when the log shares its file (the log takes the first 3 sectors). */
const SHARED_LOG_OFFSET_SECTORS = 2048;

const turn = (): Promise<void> => new Promise((r) => setImmediate(r));
const median = (xs: number[]): number => [...xs].sort((x, y) => x - y)[Math.floor(xs.length / 2)];

function makeFile(file: string, sizeSectors: number): string {
  fs.writeFileSync(file, Buffer.alloc(0));
  fs.truncateSync(file, sizeSectors * 512);
  return file;
}

/** `count` writes of `blockBytes`, random (block-aligned) or sequential, `queueDepth` in flight; writes per second. */
async function writeRate(dev: BlockDevice, count: number, queueDepth: number, blockBytes: number, sequential: boolean, seed: number): Promise<number> {
  const rng = createRng(seed);
  const blockSectors = blockBytes / 512;
  const blocks = Math.floor(dev.sizeSectors / blockSectors);
  const bufs = Array.from({ length: queueDepth }, (_, i) => Buffer.alloc(blockBytes, i + 1));
  let next = 0;
  const start = rng.int(blocks);
  const t0 = process.hrtime.bigint();
  await Promise.all(
    bufs.map(async (buf) => {
      while (next < count) {
        const i = next++;
        const block = sequential ? (start + i) % blocks : rng.int(blocks);
        await dev.write(sectors(block * blockSectors), buf);
      }
    }),
  );
  return count / (Number(process.hrtime.bigint() - t0) / 1e9);
}

interface Variant {
  readonly name: string;
  /** Table for a device of LEG_SECTORS over files a, b, log in `dir`. */
  table(dir: string): string;
}

const VARIANTS: readonly Variant[] = [
  { name: 'linear (1 file, reference)', table: (d) => `0 ${LEG_SECTORS} linear ${d}/a.img 0` },
  { name: 'mirror, core log', table: (d) => `0 ${LEG_SECTORS} mirror core 2 ${REGION_SECTORS} nosync 2 ${d}/a.img 0 ${d}/b.img 0` },
  { name: 'mirror, disk log on its own file', table: (d) => `0 ${LEG_SECTORS} mirror disk 3 ${d}/log.img ${REGION_SECTORS} nosync 2 ${d}/a.img 0 ${d}/b.img 0` },
  {
    name: 'mirror, disk log on leg 0 file',
    table: (d) => `0 ${LEG_SECTORS} mirror disk 3 ${d}/a.img ${REGION_SECTORS} nosync 2 ${d}/a.img ${SHARED_LOG_OFFSET_SECTORS} ${d}/b.img 0`,
  },
  // The md write-intent bitmap (issue 7's "bitmap"): chunk = region, daemon sleep 5 s, `nosync` (legs start equal).
  { name: 'mirror, md bitmap on its own file', table: (d) => `0 ${LEG_SECTORS} mirror md-bitmap 4 ${d}/log.img ${REGION_SECTORS} 5 nosync 2 ${d}/a.img 0 ${d}/b.img 0` },
  {
    name: 'mirror, md bitmap on leg 0 file',
    table: (d) => `0 ${LEG_SECTORS} mirror md-bitmap 6 ${d}/a.img ${REGION_SECTORS} 5 nosync offset 0 2 ${d}/a.img ${SHARED_LOG_OFFSET_SECTORS} ${d}/b.img 0`,
  },
];

const WORKLOADS = [
  { label: '4k-rand-qd1', count: 2000, queueDepth: 1, blockBytes: 4096, sequential: false },
  { label: '4k-rand-qd16', count: 20_000, queueDepth: 16, blockBytes: 4096, sequential: false },
  { label: '64k-seq-qd4', count: 8000, queueDepth: 4, blockBytes: 65536, sequential: true },
] as const;

async function benchWrites(): Promise<string[]> {
  const out: string[] = [];
  const rates = new Map<string, Map<string, number>>();
  for (const v of VARIANTS) {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'dmstate-bench-mirror-'));
    try {
      makeFile(path.join(dir, 'a.img'), LEG_SECTORS + SHARED_LOG_OFFSET_SECTORS);
      makeFile(path.join(dir, 'b.img'), LEG_SECTORS);
      makeFile(path.join(dir, 'log.img'), 2048);
      const engine = await Engine.open({ db: new MemoryLevel() as unknown as LevelDb });
      await engine.create('m', { table: v.table(dir) });
      const dev = engine.device('m')!;
      const r = new Map<string, number>();
      for (const w of WORKLOADS) {
        await writeRate(dev, Math.min(500, w.count), w.queueDepth, w.blockBytes, w.sequential, 1); // warm-up
        r.set(w.label, await writeRate(dev, w.count, w.queueDepth, w.blockBytes, w.sequential, 2));
      }
      rates.set(v.name, r);
      await engine.close();
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  }
  const ref = rates.get(VARIANTS[1].name)!;
  for (const w of WORKLOADS) {
    const parts = VARIANTS.map((v) => {
      const x = rates.get(v.name)!.get(w.label)!;
      return `${v.name} ${Math.round(x).toLocaleString('en')}/s (${(x / ref.get(w.label)!).toFixed(2)}× core)`;
    });
    out.push(`mirror-writes ${w.label}: ${parts.join('; ')}`);
  }
  return out;
}

/**
 * A fresh mirror over the same files: the resync's time (from the end of activation, when the log has been read
 * and the resync started, to in sync) and the whole activation's (table load, log read and rewrite included).
 */
async function resyncMs(table: string): Promise<{ ms: number; activationMs: number; copied: number }> {
  // A sub-millisecond clock, so that the resync driver's own run time (injected clock) resolves short runs.
  const clock: Clock = { ...createSystemClock(), nowMs: () => performance.now() };
  const engine = await Engine.open({ db: new MemoryLevel() as unknown as LevelDb, clock });
  const t0 = performance.now();
  await engine.create('m', { table });
  const set = (engine.device('m')!.live!.targets[0].instance as MirrorInstance).set;
  while (set.resync.state !== 'IN_SYNC') await turn();
  const activationMs = performance.now() - t0;
  const p = set.resync.progress();
  await engine.close();
  return { ms: p.runElapsedMs, activationMs, copied: p.runRegionsCopied };
}

async function benchResync(): Promise<string[]> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'dmstate-bench-mirror-resync-'));
  try {
    const a = makeFile(path.join(dir, 'a.img'), RESYNC_LEG_SECTORS);
    const b = makeFile(path.join(dir, 'b.img'), RESYNC_LEG_SECTORS);
    const log = makeFile(path.join(dir, 'log.img'), 2048);
    // Real data on leg 0 (a resync of holes would measure nothing).
    const fd = fs.openSync(a, 'r+');
    const chunk = Buffer.alloc(4 * 1024 * 1024);
    const rng = createRng(3);
    for (let i = 0; i < chunk.length; i += 4) chunk.writeUInt32LE((rng.next() * 0x1_0000_0000) >>> 0, i);
    for (let off = 0; off < RESYNC_LEG_SECTORS * 512; off += chunk.length) fs.writeSync(fd, chunk, 0, chunk.length, off);
    fs.fsyncSync(fd);
    fs.closeSync(fd);
    const regions = RESYNC_LEG_SECTORS / REGION_SECTORS;
    const dirty = Math.max(1, Math.round(regions / 100));
    const fulls: number[] = [];
    const partials: number[] = [];
    const fullsWithActivation: number[] = [];
    const partialsWithActivation: number[] = [];
    let fullCopied = 0;
    let partialCopied = 0;
    for (let round = 0; round < 3; round++) {
      const full = await resyncMs(`0 ${RESYNC_LEG_SECTORS} mirror disk 3 ${log} ${REGION_SECTORS} sync 2 ${a} 0 ${b} 0`);
      fulls.push(full.ms);
      fullsWithActivation.push(full.activationMs);
      fullCopied = full.copied;
      // The log is all clean now; dirty 1% of the regions as a crash in the middle of writes there would leave them.
      const img = fs.readFileSync(log).subarray(0, 4096);
      const pick = createRng(4 + round);
      const chosen = new Set<number>();
      while (chosen.size < dirty) chosen.add(pick.int(regions));
      for (const r of chosen) img[1024 + (r >>> 3)] &= ~(1 << (r & 7));
      const lfd = fs.openSync(log, 'r+');
      fs.writeSync(lfd, img, 0, img.length, 0);
      fs.closeSync(lfd);
      const partial = await resyncMs(`0 ${RESYNC_LEG_SECTORS} mirror disk 2 ${log} ${REGION_SECTORS} 2 ${a} 0 ${b} 0`);
      partials.push(partial.ms);
      partialsWithActivation.push(partial.activationMs);
      partialCopied = partial.copied;
    }
    const full = median(fulls);
    const partial = median(partials);
    const fullA = median(fullsWithActivation);
    const partialA = median(partialsWithActivation);
    return [
      `mirror-resync ${RESYNC_LEG_SECTORS / 2048} MiB, ${regions} regions (median of 3): full resync ${full.toFixed(0)} ms (${fullCopied} regions copied), ` +
        `1% dirty ${partial.toFixed(1)} ms (${partialCopied} regions copied), ratio ${((partial / full) * 100).toFixed(2)}% (target ≤ 2%); ` +
        `with activation (table load, log read and rewrite + fdatasync): ${fullA.toFixed(0)} ms vs ${partialA.toFixed(1)} ms, ratio ${((partialA / fullA) * 100).toFixed(2)}%`,
    ];
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

export async function benchMirror(): Promise<string> {
  return [...(await benchWrites()), ...(await benchResync())].join('\n');
}
