/**
 * Live inspection's cost on the bio path: 4 KiB random writes through a `linear` device over memory with nobody
 * watching, with a watcher on another device (this device keeps no observer), with a watcher sampled at the
 * default budget (1000 records/s per kind), and with an unsampled watcher (every bio: 7 records), whose sink either
 * drops the record or serializes it as the daemon does. Medians of rounds interleaved in one run.
 */
import { MemoryLevel } from 'memory-level';
import { Engine } from '../src/core/engine.js';
import { MemoryBlockDevice } from '../src/block/memory-device.js';
import type { BlockDevice } from '../src/block/contract.js';
import { sectors } from '../src/block/units.js';
import { createRng } from '../src/core/rng.js';
import type { InspectFilter, InspectSink, InspectWatch } from '../src/inspect/live-inspector.js';
import type { LevelDb } from '../src/log/event-log.js';

const DEVICE_SECTORS = (64 * 1024 * 1024) / 512;

async function writeRate(dev: BlockDevice, count: number, queueDepth: number, seed: number): Promise<number> {
  const rng = createRng(seed);
  const offsets = new Float64Array(count);
  for (let i = 0; i < count; i++) offsets[i] = rng.int(DEVICE_SECTORS / 8) * 8;
  const bufs = Array.from({ length: queueDepth }, (_, i) => Buffer.alloc(4096, i + 1));
  let next = 0;
  const t0 = process.hrtime.bigint();
  await Promise.all(
    bufs.map(async (buf) => {
      while (next < count) await dev.write(sectors(offsets[next++]), buf);
    }),
  );
  return count / (Number(process.hrtime.bigint() - t0) / 1e9);
}

const median = (xs: number[]): number => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];

export async function benchInspectOverhead(options: { count?: number; rounds?: number } = {}): Promise<string> {
  const count = options.count ?? 200_000;
  const rounds = options.rounds ?? 5;
  const engine = await Engine.open({ db: new MemoryLevel() as unknown as LevelDb });
  engine.registerBackingDevice('mem0', new MemoryBlockDevice({ sizeSectors: sectors(DEVICE_SECTORS * 2) }));
  await engine.create('lin', { table: `0 ${DEVICE_SECTORS} linear mem0 0` });
  await engine.create('other', { table: `0 ${DEVICE_SECTORS} linear mem0 ${DEVICE_SECTORS}` });
  const lin = engine.device('lin')!;
  let serializedBytes = 0;
  const drop: InspectSink = () => undefined;
  const serialize: InspectSink = (r) => {
    serializedBytes += JSON.stringify({ id: 1, op: 'inspection', record: r }).length;
  };
  const cases: Array<[string, InspectFilter | undefined, InspectSink]> = [
    ['nobody watching', undefined, drop],
    ['watcher on another device', { devices: ['other'] }, drop],
    ['watcher, default sampling', { devices: ['lin'] }, serialize],
    ['watcher, unsampled, no-op sink', { devices: ['lin'], maxEventsPerSecond: 0 }, drop],
    ['watcher, unsampled, JSON sink', { devices: ['lin'], maxEventsPerSecond: 0 }, serialize],
  ];
  const out: string[] = [];
  for (const qd of [1, 32]) {
    const rates = cases.map((): number[] => []);
    await writeRate(lin, 50_000, qd, 7); // warm-up
    for (let r = 0; r < rounds; r++) {
      for (let c = 0; c < cases.length; c++) {
        const [, filter, sink] = cases[c];
        const watch: InspectWatch | undefined = filter ? engine.inspector.subscribe(filter, sink) : undefined;
        rates[c].push(await writeRate(lin, count, qd, 100 + r));
        watch?.unsubscribe();
      }
    }
    const base = median(rates[0]);
    for (let c = 0; c < cases.length; c++) {
      const m = median(rates[c]);
      out.push(
        `inspect-overhead qd=${qd} ${cases[c][0]}: ${Math.round(m).toLocaleString('en')} writes/s` +
          (c === 0 ? '' : `, ratio ${(m / base).toFixed(2)}, added ${((1 / m - 1 / base) * 1e6).toFixed(2)} µs/bio`),
      );
    }
  }
  await engine.close();
  if (serializedBytes === 0) throw new Error('inspect-overhead: the JSON sink saw nothing');
  return out.join('\n');
}
