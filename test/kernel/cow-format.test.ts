/**
 * The persistent store's COW format against Linux 6.1's dm-snapshot, both ways, one VM boot each:
 *
 * (a) the kernel writes a COW: snapshot-origin + snapshot P 8 over two images, origin writes at chosen chunks
 *     (single chunks in a known order, then 300 in a row, which fills metadata area 0 and starts area 1), clean
 *     removal. The store then reads exactly the expected exceptions (the first four at the chunks Linux allocates
 *     in order), usage() equals the kernel's `dmsetup status`, and the snapshot rebuilt from the origin image + the
 *     COW through the in-core table equals the origin before the writes (whose md5 the kernel also reports).
 * (b) the store writes COWs (one committed directly, one through a WAL and a checkpoint), each crossing a metadata
 *     area, with its own data in the COW chunks. Linux loads them as `snapshot /dev/vda /dev/vdX P 8`: the
 *     snapshot reads as expected (md5 inside the VM), `dmsetup status` equals usage(), and a write the kernel adds to
 *     our COW is read back by the store after the run.
 *
 * Needs the kernel VM (test/kernel/setup.sh). If it cannot be set up the test fails with the reason, unless
 * DMSTATE_SKIP_KERNEL=1.
 */
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import type { TestContext } from 'vitest';
import { FileBlockDevice } from '../../src/block/file-device.js';
import { chunks, sectors } from '../../src/block/units.js';
import type { Chunk } from '../../src/block/units.js';
import type { ExceptionWal } from '../../src/stores/contract.js';
import { ExceptionTable } from '../../src/stores/exception-table.js';
import { persistentStore } from '../../src/stores/persistent-store.js';
import type { PersistentStore } from '../../src/stores/persistent-store.js';
import { ensureKernel, kernelSkipRequested, runKernelJob } from './kernel-vm.js';

const CHUNK_SECTORS = 8;
const CHUNK_BYTES = CHUNK_SECTORS * 512;
const ORIGIN_CHUNKS = 2048; // 8 MiB
const ORIGIN_SECTORS = ORIGIN_CHUNKS * CHUNK_SECTORS;
const COW_BYTES = 4 * 1024 * 1024;
const COW_SECTORS = COW_BYTES / 512;
const VM_TIMEOUT_MS = 300_000;

/** Chunk `chunk`'s bytes under `salt`: every word different, never all zero. */
function chunkPattern(chunk: number, salt: number): Buffer {
  const buf = Buffer.alloc(CHUNK_BYTES);
  let x = (chunk * 0x9e3779b1 + salt * 0x85ebca6b + 1) >>> 0;
  for (let i = 0; i < CHUNK_BYTES; i += 4) {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    buf.writeUInt32LE(x, i);
  }
  return buf;
}

function originImage(): Buffer {
  const img = Buffer.alloc(ORIGIN_CHUNKS * CHUNK_BYTES);
  for (let c = 0; c < ORIGIN_CHUNKS; c++) chunkPattern(c, 0).copy(img, c * CHUNK_BYTES);
  return img;
}

const md5 = (buf: Uint8Array): string => createHash('md5').update(buf).digest('hex');

/** Parses `0 16384 snapshot 48/8192 16` into its numbers. */
function parseStatus(line: string): { allocated: number; total: number; metadata: number } {
  const m = /snapshot (\d+)\/(\d+) (\d+)/.exec(line);
  if (!m) throw new Error(`not a snapshot status: ${line}`);
  return { allocated: Number(m[1]), total: Number(m[2]), metadata: Number(m[3]) };
}

/** The value after `KEY ` on its own output line. */
function field(output: string, key: string): string {
  const line = output.split('\n').find((l) => l.startsWith(`${key} `));
  if (line === undefined) throw new Error(`no ${key} line in the kernel job output:\n${output}`);
  return line.slice(key.length + 1).trim();
}

async function openStore(file: string, options: { readOnly?: boolean; wal?: ExceptionWal } = {}): Promise<{ store: PersistentStore; dev: FileBlockDevice; found: Array<[number, number]> }> {
  const dev = await FileBlockDevice.open(file, { readOnly: options.readOnly });
  const store = await persistentStore.create({ cow: dev, chunkSizeSectors: sectors(CHUNK_SECTORS), overflow: false, readOnly: options.readOnly, wal: options.wal });
  const found: Array<[number, number]> = [];
  const meta = await persistentStore.readMetadata(store, (o, n) => found.push([o, n]));
  expect(meta).toEqual({ valid: true, chunkSizeSectors: CHUNK_SECTORS });
  return { store, dev, found };
}

/** A WAL kept in memory for the duration of the test (the pool's LevelDB in real use). */
function memoryWal(): ExceptionWal & { readonly records: Array<{ index: number; oldChunk: Chunk; newChunk: Chunk }> } {
  const records: Array<{ index: number; oldChunk: Chunk; newChunk: Chunk }> = [];
  return {
    records,
    append: async (rs) => void records.push(...rs.map((r) => ({ ...r }))),
    read: async () => records.map((r) => ({ ...r })),
    trim: async (before) => void records.splice(0, records.filter((r) => r.index < before).length),
    clear: async () => void records.splice(0, records.length),
  };
}

describe('persistent COW format against Linux 6.1', () => {
  let dir = '';
  let skipReason: string | undefined;

  beforeAll(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'dmstate-cow-'));
    const status = await ensureKernel();
    if (!status.ok) {
      if (kernelSkipRequested()) {
        skipReason = status.reason;
        console.warn(`cow-format: skipping, the kernel VM is unavailable: ${status.reason}`);
        return;
      }
      throw new Error(`the kernel VM is unavailable (set DMSTATE_SKIP_KERNEL=1 to skip): ${status.reason}`);
    }
  });

  afterAll(() => {
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  });

  test('(a) the store reads a COW the kernel wrote', async (ctx: TestContext) => {
    if (skipReason !== undefined) ctx.skip();
    const originFile = path.join(dir, 'a-origin.img');
    const cowFile = path.join(dir, 'a-cow.img');
    const before = originImage();
    fs.writeFileSync(originFile, before);
    fs.writeFileSync(cowFile, Buffer.alloc(COW_BYTES));
    const singles = [3, 4, 10, 2];
    const runStart = 1000;
    const runLength = 300;
    const script = [
      'set -e',
      `dmsetup create orig --table "0 ${ORIGIN_SECTORS} snapshot-origin /dev/vda"`,
      `dmsetup create snap --table "0 ${ORIGIN_SECTORS} snapshot /dev/vda /dev/vdb P ${CHUNK_SECTORS}"`,
      'dmsetup mknodes',
      `for c in ${singles.join(' ')}; do dd if=/dev/zero of=/dev/mapper/orig bs=${CHUNK_BYTES} seek=$c count=1 conv=fsync 2>/dev/null; done`,
      `dd if=/dev/zero of=/dev/mapper/orig bs=${CHUNK_BYTES} seek=${runStart} count=${runLength} conv=fsync 2>/dev/null`,
      'echo "STATUS $(dmsetup status snap)"',
      'echo "TABLE $(dmsetup table snap)"',
      'echo "MD5 $(md5sum /dev/mapper/snap | cut -d" " -f1)"',
      'dmsetup remove snap',
      'dmsetup remove orig',
      'echo DONE',
    ].join('\n');
    const { output, rc } = await runKernelJob(script, [originFile, cowFile], { timeoutMs: VM_TIMEOUT_MS });
    expect(rc, output).toBe(0);
    expect(field(output, 'TABLE')).toMatch(/ P 8$/);
    expect(field(output, 'MD5'), 'the kernel reads the snapshot as the origin before the writes').toBe(md5(before));

    const { store, dev, found } = await openStore(cowFile, { readOnly: true });
    try {
      // Exactly the written chunks; the single writes in order, at the chunks Linux hands out first.
      const expectedOlds = [...singles, ...Array.from({ length: runLength }, (_, i) => runStart + i)];
      expect(found.map(([o]) => o).sort((a, b) => a - b)).toEqual([...expectedOlds].sort((a, b) => a - b));
      expect(found.slice(0, 4)).toEqual([[3, 2], [4, 3], [10, 4], [2, 5]]);
      const news = new Set(found.map(([, n]) => n));
      expect(news.size).toBe(found.length);
      expect([...news].some((n) => n % 257 === 1), 'no exception in a metadata chunk').toBe(false);
      expect(found.length, 'area 0 (256 records) filled, area 1 started').toBeGreaterThan(256);

      const kernel = parseStatus(field(output, 'STATUS'));
      const usage = persistentStore.usage(store);
      expect({ allocated: usage.sectorsAllocated, total: usage.totalSectors, metadata: usage.metadataSectors }).toEqual(kernel);
      expect(kernel.metadata, 'two metadata areas in use: (1 + 2) × 8').toBe(24);

      // The snapshot rebuilt from the origin image (after the writes) and the COW through the in-core table.
      const table = new ExceptionTable();
      for (const [o, n] of found) table.insert(chunks(o), chunks(n));
      expect(table.size).toBe(found.length);
      const after = fs.readFileSync(originFile);
      expect(after.subarray(runStart * CHUNK_BYTES, (runStart + 1) * CHUNK_BYTES).every((b) => b === 0), 'the origin was written').toBe(true);
      const rebuilt = Buffer.alloc(before.length);
      const cowChunk = Buffer.alloc(CHUNK_BYTES);
      for (let c = 0; c < ORIGIN_CHUNKS; c++) {
        const n = table.lookup(chunks(c));
        if (n === -1) {
          after.copy(rebuilt, c * CHUNK_BYTES, c * CHUNK_BYTES, (c + 1) * CHUNK_BYTES);
        } else {
          await dev.read(sectors(n * CHUNK_SECTORS), cowChunk);
          cowChunk.copy(rebuilt, c * CHUNK_BYTES);
        }
      }
      expect(md5(rebuilt)).toBe(md5(before));
    } finally {
      await persistentStore.close(store);
      await dev.close();
    }
  }, VM_TIMEOUT_MS + 60_000);

  test('(b) the kernel loads COWs the store wrote (direct and through a WAL + checkpoint)', async (ctx: TestContext) => {
    if (skipReason !== undefined) ctx.skip();
    const originFile = path.join(dir, 'b-origin.img');
    const origin = originImage();
    fs.writeFileSync(originFile, origin);

    interface Built {
      readonly file: string;
      readonly expectedMd5: string;
      readonly usage: { allocated: number; total: number; metadata: number };
    }
    /** Writes a COW with exceptions for `olds` (data: chunkPattern(old, salt)) and returns what Linux should see. */
    const build = async (name: string, olds: readonly number[], salt: number, withWal: boolean): Promise<Built> => {
      const file = path.join(dir, name);
      const dev = await FileBlockDevice.open(file, { create: { sizeBytes: COW_BYTES } });
      const wal = withWal ? memoryWal() : undefined;
      const store = await persistentStore.create({ cow: dev, chunkSizeSectors: sectors(CHUNK_SECTORS), overflow: false, wal, checkpointExceptionsMax: 100_000 });
      await persistentStore.readMetadata(store, () => expect.fail('a new COW has no exceptions'));
      const snapshot = Buffer.from(origin);
      const acks: Array<Promise<boolean>> = [];
      for (const o of olds) {
        const n = persistentStore.prepareException(store);
        expect(n).not.toBe(-1);
        const data = chunkPattern(o, salt);
        await dev.write(sectors((n as number) * CHUNK_SECTORS), data);
        data.copy(snapshot, o * CHUNK_BYTES);
        acks.push(new Promise((resolve) => persistentStore.commitException(store, chunks(o), n as Chunk, resolve)));
        if (acks.length % 7 === 0) await new Promise((resolve) => setImmediate(resolve));
      }
      expect((await Promise.all(acks)).every((ok) => ok)).toBe(true);
      if (wal) {
        expect(wal.records.length, 'committed through the WAL only').toBe(olds.length);
        expect(fs.readFileSync(file).subarray(CHUNK_BYTES, 2 * CHUNK_BYTES).every((b) => b === 0), 'area 0 not written before the checkpoint').toBe(true);
      }
      const u = persistentStore.usage(store);
      await persistentStore.close(store); // with a WAL: the checkpoint
      if (wal) expect(wal.records).toEqual([]);
      await dev.close();
      return { file, expectedMd5: md5(snapshot), usage: { allocated: u.sectorsAllocated, total: u.totalSectors, metadata: u.metadataSectors } };
    };
    const run = (start: number, length: number): number[] => Array.from({ length }, (_, i) => start + i);
    const direct = await build('b-cow-direct.img', [7, 8, 9, 100, 50, 51, ...run(1200, 300)], 1, false);
    const viaWal = await build('b-cow-wal.img', [0, 1, ORIGIN_CHUNKS - 1, ...run(500, 280).reverse()], 2, true);
    const extraChunk = 1900;

    const script = [
      'set -e',
      `dmsetup create snap1 --table "0 ${ORIGIN_SECTORS} snapshot /dev/vda /dev/vdb P ${CHUNK_SECTORS}"`,
      `dmsetup create snap2 --table "0 ${ORIGIN_SECTORS} snapshot /dev/vda /dev/vdc P ${CHUNK_SECTORS}"`,
      'dmsetup mknodes',
      'echo "STATUS1 $(dmsetup status snap1)"',
      'echo "STATUS2 $(dmsetup status snap2)"',
      'echo "MD5_1 $(md5sum /dev/mapper/snap1 | cut -d" " -f1)"',
      'echo "MD5_2 $(md5sum /dev/mapper/snap2 | cut -d" " -f1)"',
      // The kernel continues our COW: a whole-chunk write to the snapshot where no exception exists.
      `dd if=/dev/zero of=/dev/mapper/snap1 bs=${CHUNK_BYTES} seek=${extraChunk} count=1 conv=fsync 2>/dev/null`,
      'echo "STATUS1B $(dmsetup status snap1)"',
      'dmsetup remove snap1',
      'dmsetup remove snap2',
      'echo DONE',
    ].join('\n');
    const { output, rc } = await runKernelJob(script, [originFile, direct.file, viaWal.file], { timeoutMs: VM_TIMEOUT_MS });
    expect(rc, output).toBe(0);
    expect(field(output, 'MD5_1'), 'snapshot over the directly committed COW').toBe(direct.expectedMd5);
    expect(field(output, 'MD5_2'), 'snapshot over the WAL-checkpointed COW').toBe(viaWal.expectedMd5);
    expect(parseStatus(field(output, 'STATUS1')), 'dmsetup status vs usage() (direct)').toEqual(direct.usage);
    expect(parseStatus(field(output, 'STATUS2')), 'dmsetup status vs usage() (WAL)').toEqual(viaWal.usage);

    // The kernel's exception (written after ours) is read back, its data the zeroes written.
    const afterKernel = parseStatus(field(output, 'STATUS1B'));
    const { store, dev, found } = await openStore(direct.file, { readOnly: true });
    try {
      expect(found.length).toBe(6 + 300 + 1);
      const [o, n] = found[found.length - 1];
      expect(o).toBe(extraChunk);
      expect(n * CHUNK_SECTORS, 'the kernel allocated the chunk our usage said was next').toBe(direct.usage.allocated);
      const u = persistentStore.usage(store);
      expect({ allocated: u.sectorsAllocated, total: u.totalSectors, metadata: u.metadataSectors }).toEqual(afterKernel);
      const data = Buffer.alloc(CHUNK_BYTES, 0xff);
      await dev.read(sectors(n * CHUNK_SECTORS), data);
      expect(data.every((b) => b === 0)).toBe(true);
    } finally {
      await persistentStore.close(store);
      await dev.close();
    }
    expect(COW_SECTORS).toBe(direct.usage.total);
  }, VM_TIMEOUT_MS + 60_000);
});
