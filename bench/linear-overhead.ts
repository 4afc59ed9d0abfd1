/**
 * Foundation benchmark: 4 KiB writes per second through a `linear` mapped device over a memory device versus
 * writes straight to the memory device, in the same run. Reports the ratio and the core's added cost per bio.
 * Target: ≤ 5 µs per bio (ratio ≥ 0.5).
 */
import { MemoryLevel } from 'memory-level';
import { Engine } from '../src/core/engine.js';
import { MemoryBlockDevice } from '../src/block/memory-device.js';
import type { BlockDevice } from '../src/block/contract.js';
import { sectors } from '../src/block/units.js';
import { createRng } from '../src/core/rng.js';
import type { LevelDb } from '../src/log/event-log.js';

const DEVICE_SECTORS = (256 * 1024 * 1024) / 512;
const BLOCK_BYTES = 4096;

/** Writes `count` random 4 KiB blocks with `queueDepth` in flight; returns writes per second. */
async function writeRate(dev: BlockDevice, count: number, queueDepth: number, seed: number): Promise<number> {
  const rng = createRng(seed);
  const blocks = DEVICE_SECTORS / 8;
  const offsets = new Float64Array(count);
  for (let i = 0; i < count; i++) offsets[i] = rng.int(blocks) * 8;
  const bufs = Array.from({ length: queueDepth }, (_, i) => Buffer.alloc(BLOCK_BYTES, i + 1));
  let next = 0;
  const t0 = process.hrtime.bigint();
  const worker = async (w: number) => {
    const buf = bufs[w];
    while (next < count) {
      const i = next++;
      await dev.write(sectors(offsets[i]), buf);
    }
  };
  await Promise.all(bufs.map((_, w) => worker(w)));
  const ns = Number(process.hrtime.bigint() - t0);
  return count / (ns / 1e9);
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];

export async function benchLinearOverhead(options: { count?: number; rounds?: number } = {}): Promise<string> {
  const count = options.count ?? 300_000;
  const rounds = options.rounds ?? 5;
  const direct = new MemoryBlockDevice({ sizeSectors: sectors(DEVICE_SECTORS) });
  const under = new MemoryBlockDevice({ sizeSectors: sectors(DEVICE_SECTORS) });
  const engine = await Engine.open({ db: new MemoryLevel() as unknown as LevelDb });
  engine.registerBackingDevice('mem0', under);
  await engine.create('lin', { table: `0 ${DEVICE_SECTORS} linear mem0 0` });
  const lin = engine.device('lin')!;
  const out: string[] = [];
  for (const qd of [1, 32]) {
    // Warm up both paths (JIT, page allocation).
    await writeRate(direct, 50_000, qd, 7);
    await writeRate(lin, 50_000, qd, 7);
    const d: number[] = [];
    const l: number[] = [];
    for (let r = 0; r < rounds; r++) {
      d.push(await writeRate(direct, count, qd, 100 + r));
      l.push(await writeRate(lin, count, qd, 100 + r));
    }
    const rd = median(d);
    const rl = median(l);
    const addedUs = (1 / rl - 1 / rd) * 1e6;
    out.push(
      `linear-overhead qd=${qd}: direct ${Math.round(rd).toLocaleString('en')} writes/s, ` +
        `through linear ${Math.round(rl).toLocaleString('en')} writes/s, ratio ${(rl / rd).toFixed(2)}, ` +
        `added ${addedUs.toFixed(2)} µs/bio (target ≤ 5 µs, ratio ≥ 0.5)`,
    );
  }
  await engine.close();
  return out.join('\n');
}
