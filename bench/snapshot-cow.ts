/**
 * dm-snapshot benchmark: 4 KiB random origin writes with one snapshot (each write lands on a chunk not yet
 * copied: copy-out + durable commit before the write) versus the same writes with no snapshot, same run.
 * Two set-ups: memory devices + memory-level (the engine's own cost), and files + LevelDB on disk (fdatasync of
 * the COW and a synced LevelDB batch per commit group, as in production).
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { MemoryLevel } from 'memory-level';
import { ClassicLevel } from 'classic-level';
import { Engine } from '../src/core/engine.js';
import { MemoryBlockDevice } from '../src/block/memory-device.js';
import { FileBlockDevice } from '../src/block/file-device.js';
import type { BlockDevice } from '../src/block/contract.js';
import { sectors } from '../src/block/units.js';
import { createRng } from '../src/core/rng.js';
import type { LevelDb } from '../src/log/event-log.js';

const ORIGIN_SECTORS = (512 * 1024 * 1024) / 512;
const CHUNK_SECTORS = 8;

/** `count` writes of 4 KiB to distinct random chunks, `queueDepth` in flight; writes per second. */
async function writeDistinctChunks(dev: BlockDevice, count: number, queueDepth: number, seed: number): Promise<number> {
  const rng = createRng(seed);
  const chunksTotal = ORIGIN_SECTORS / CHUNK_SECTORS;
  // A seeded permutation prefix: distinct chunks, so every write needs a copy when a snapshot exists.
  const picked = new Set<number>();
  const order: number[] = [];
  while (order.length < count) {
    const c = rng.int(chunksTotal);
    if (!picked.has(c)) {
      picked.add(c);
      order.push(c);
    }
  }
  const buf = Buffer.alloc(4096, 0x5a);
  let next = 0;
  const t0 = process.hrtime.bigint();
  await Promise.all(
    Array.from({ length: queueDepth }, async () => {
      while (next < count) {
        const c = order[next++];
        await dev.write(sectors(c * CHUNK_SECTORS), buf);
      }
    }),
  );
  return count / (Number(process.hrtime.bigint() - t0) / 1e9);
}

async function runSetup(kind: 'memory' | 'file', count: number, queueDepth: number): Promise<string> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'dmstate-bench-snap-'));
  try {
    const rates: Record<string, number> = {};
    for (const withSnapshot of [false, true]) {
      let origin: BlockDevice;
      let cow: BlockDevice;
      let db: LevelDb;
      if (kind === 'memory') {
        origin = new MemoryBlockDevice({ sizeSectors: sectors(ORIGIN_SECTORS) });
        cow = new MemoryBlockDevice({ sizeSectors: sectors(ORIGIN_SECTORS) });
        db = new MemoryLevel() as unknown as LevelDb;
      } else {
        const run = path.join(dir, withSnapshot ? 'snap' : 'plain');
        fs.mkdirSync(run);
        origin = await FileBlockDevice.open(path.join(run, 'origin.img'), { create: { sizeBytes: ORIGIN_SECTORS * 512 } });
        cow = await FileBlockDevice.open(path.join(run, 'cow.img'), { create: { sizeBytes: ORIGIN_SECTORS * 512 } });
        const cl = new ClassicLevel<string, unknown>(path.join(run, 'db'));
        await cl.open();
        db = cl as unknown as LevelDb;
      }
      // A real origin holds data: fill it first so that page allocation of the memory device is not measured.
      const fill = Buffer.alloc(1024 * 1024, 0x11);
      for (let s = 0; s < ORIGIN_SECTORS; s += fill.length / 512) await origin.write(sectors(s), fill);
      const engine = await Engine.open({ db, backingDevices: { origin, cow } });
      await engine.create('orig', { table: `0 ${ORIGIN_SECTORS} snapshot-origin origin` });
      if (withSnapshot) await engine.create('snap', { table: `0 ${ORIGIN_SECTORS} snapshot origin cow P ${CHUNK_SECTORS}` });
      const dev = engine.device('orig')!;
      await writeDistinctChunks(dev, Math.min(2000, count / 10), queueDepth, 1); // warm-up on other chunks
      rates[withSnapshot ? 'snap' : 'plain'] = await writeDistinctChunks(dev, count, queueDepth, 2);
      await engine.close();
      await db.close();
      await origin.close();
      await cow.close();
    }
    const ratio = rates.snap / rates.plain;
    return (
      `snapshot-cow ${kind} qd=${queueDepth}: no snapshot ${Math.round(rates.plain).toLocaleString('en')} writes/s, ` +
      `one snapshot (copy + durable commit per write) ${Math.round(rates.snap).toLocaleString('en')} writes/s, ratio ${ratio.toFixed(2)}`
    );
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

export async function benchSnapshotCow(): Promise<string> {
  const out: string[] = [];
  out.push(await runSetup('memory', 50_000, 32));
  out.push(await runSetup('file', 20_000, 32));
  return out.join('\n');
}
