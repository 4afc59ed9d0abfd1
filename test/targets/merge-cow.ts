/**
 * Helpers for the snapshot-merge tests: persistent COW images crafted byte by byte in the Linux format (header,
 * metadata areas, data chunks with known patterns), with the records in any on-disk order — ascending,
 * DESCENDING (as older kernels committed them: back-merges in core) or shuffled — and the status lines a merge of
 * such a COW goes through (the same on Linux and on dmstate: the merge order is fixed by the on-disk records).
 */
import { encodeHeader, writeRecord } from '../../src/stores/persistent-store.js';
import { sectors } from '../../src/block/units.js';
import { createRng } from '../../src/core/rng.js';

import { SECTOR, decodeSector, writeData } from '../helpers/sector-data.js';

export { SECTOR, decodeSector, fillSector, writeData } from '../helpers/sector-data.js';

/** First differing sector of two device images, described; undefined when equal. */
export function firstDifference(got: Buffer, want: Buffer, what: string): string | undefined {
  if (got.length !== want.length) return `${what}: ${got.length} bytes, expected ${want.length}`;
  if (got.equals(want)) return undefined;
  for (let s = 0; s * SECTOR < got.length; s++) {
    if (got.compare(want, s * SECTOR, (s + 1) * SECTOR, s * SECTOR, (s + 1) * SECTOR) !== 0) {
      const g = decodeSector(got, s * SECTOR, s);
      const w = decodeSector(want, s * SECTOR, s);
      return `${what}: sector ${s} (chunk ${Math.floor(s / 8)} of 8) holds ${typeof g === 'string' ? g : `#${g}`}, expected ${typeof w === 'string' ? w : `#${w}`}`;
    }
  }
  return undefined;
}

export type RecordOrder = 'ascending' | 'descending' | 'shuffled';

export interface CowSpec {
  readonly chunkSectors: number;
  /** Origin chunks with an exception, in ALLOCATION order (the k-th gets the k-th data chunk). */
  readonly oldChunks: readonly number[];
  /** Order of the records in the metadata areas. */
  readonly order: RecordOrder;
  readonly seed?: number;
  /** Size of the COW device in sectors (default: room for the data plus 4 chunks). */
  readonly cowSectors?: number;
  /** The records as they are, in on-disk order (instead of oldChunks + order): for corrupt COWs. */
  readonly records?: ReadonlyArray<readonly [number, number]>;
  /** Data of the snapshot's copy of origin chunk `old` (default: write id 1 at the origin's sectors). */
  readonly data?: (oldChunk: number, chunkSectors: number) => Buffer;
}

export interface CraftedCow {
  readonly image: Buffer;
  /** [old, new] in on-disk order. */
  readonly records: Array<[number, number]>;
  readonly chunkSectors: number;
  readonly exceptionsPerArea: number;
}

export const exceptionsPerArea = (chunkSectors: number): number => (chunkSectors * SECTOR) / 16;
export const isMetadataChunk = (chunk: number, chunkSectors: number): boolean => chunk === 0 || chunk % (exceptionsPerArea(chunkSectors) + 1) === 1;

/** Data chunks in allocation order, as the kernel hands them out: from chunk 2 on, skipping metadata areas. */
export function allocateDataChunks(count: number, chunkSectors: number): number[] {
  const out: number[] = [];
  for (let c = 2; out.length < count; c++) if (!isMetadataChunk(c, chunkSectors)) out.push(c);
  return out;
}

/** Snapshot data of an origin chunk by default: write id 1 over the chunk's origin sectors. */
export const SNAPSHOT_DATA_ID = 1;
export const defaultChunkData = (oldChunk: number, chunkSectors: number): Buffer => writeData(SNAPSHOT_DATA_ID, oldChunk * chunkSectors, chunkSectors);

export function craftCow(spec: CowSpec): CraftedCow {
  const c = spec.chunkSectors;
  const chunkBytes = c * SECTOR;
  const epa = exceptionsPerArea(c);
  const news = spec.records ? spec.records.map((r) => r[1]) : allocateDataChunks(spec.oldChunks.length, c);
  let records: Array<[number, number]> = spec.records ? spec.records.map((r) => [r[0], r[1]]) : spec.oldChunks.map((o, i) => [o, news[i]]);
  if (spec.records) {
    // as given
  } else if (spec.order === 'descending') records = records.reverse();
  else if (spec.order === 'shuffled') {
    const rng = createRng(spec.seed ?? 1);
    for (let i = records.length - 1; i > 0; i--) {
      const j = rng.int(i + 1);
      [records[i], records[j]] = [records[j], records[i]];
    }
  }
  const areas = Math.floor(records.length / epa) + 1;
  const lastArea = 1 + (epa + 1) * (areas - 1);
  const highest = Math.max(lastArea, ...news);
  const cowSectors = spec.cowSectors ?? (highest + 5) * c;
  const image = Buffer.alloc(cowSectors * SECTOR);
  encodeHeader(sectors(c), true).copy(image, 0);
  for (let a = 0; a < areas; a++) {
    const area = Buffer.alloc(chunkBytes);
    const part = records.slice(a * epa, (a + 1) * epa);
    part.forEach(([o, n], slot) => writeRecord(area, slot, o, n));
    area.copy(image, (1 + (epa + 1) * a) * chunkBytes);
  }
  const data = spec.data ?? defaultChunkData;
  for (const [o, n] of records) data(o, c).copy(image, n * chunkBytes);
  return { image, records, chunkSectors: c, exceptionsPerArea: epa };
}

/** The snapshot's contents: the origin with the COW's chunks over it. */
export function snapshotImage(origin: Buffer, cow: CraftedCow): Buffer {
  const out = Buffer.from(origin);
  const chunkBytes = cow.chunkSectors * SECTOR;
  for (const [o, n] of cow.records) {
    if (o * chunkBytes >= out.length) continue;
    cow.image.copy(out, o * chunkBytes, n * chunkBytes, Math.min((n + 1) * chunkBytes, n * chunkBytes + out.length - o * chunkBytes));
  }
  return out;
}

export interface MergeStep {
  readonly firstOldChunk: number;
  readonly firstNewChunk: number;
  readonly chunks: number;
  /** `<alloc>/<total> <meta>` once prepare_merge found the run (it may have stepped back an area). */
  readonly statusBefore: string;
  /** `<alloc>/<total> <meta>` once the run is committed. */
  readonly statusAfter: string;
}

/**
 * The runs a merge of these records goes through, in order, with the `<alloc>/<total> <meta>` status around each
 * (Linux prepare_merge/commit_merge: a run is found from the newest record back, within an area; stepping back an
 * area lowers the metadata count at once; after a commit next_free = area location + records left + 1).
 */
export function mergeSteps(records: ReadonlyArray<readonly [number, number]>, chunkSectors: number, cowSectors: number): { initial: string; steps: MergeStep[] } {
  const epa = exceptionsPerArea(chunkSectors);
  const areaLocation = (a: number): number => 1 + (epa + 1) * a;
  let nextFree = 2;
  for (const [, n] of records) nextFree = Math.max(nextFree, n + 1);
  if (nextFree % (epa + 1) === 1) nextFree++;
  let area = Math.floor(records.length / epa);
  let committed = records.length % epa;
  const status = (): string => `${nextFree * chunkSectors}/${cowSectors} ${(area + 2) * chunkSectors}`;
  const initial = status();
  const steps: MergeStep[] = [];
  let total = records.length;
  while (total > 0) {
    if (committed === 0) {
      area--;
      committed = epa;
    }
    const statusBefore = status();
    const [lo, ln] = records[total - 1];
    let n = 1;
    while (n < committed && records[total - 1 - n][0] === lo - n && records[total - 1 - n][1] === ln - n) n++;
    total -= n;
    committed -= n;
    nextFree = areaLocation(area) + committed + 1;
    steps.push({ firstOldChunk: lo + 1 - n, firstNewChunk: ln + 1 - n, chunks: n, statusBefore, statusAfter: status() });
  }
  return { initial, steps };
}

/** Every `<alloc>/<total> <meta>` a merge of these records can show, in order (consecutive repeats dropped). */
export function mergeStatusSequence(records: ReadonlyArray<readonly [number, number]>, chunkSectors: number, cowSectors: number): string[] {
  const { initial, steps } = mergeSteps(records, chunkSectors, cowSectors);
  const out = [initial, ...steps.flatMap((s) => [s.statusBefore, s.statusAfter])];
  return out.filter((s, i) => i === 0 || s !== out[i - 1]);
}

/** `<alloc>/<total> <meta>` of a status line like `0 8192 snapshot-merge 16/4096 16`. */
export function parseUsage(statusLine: string): { alloc: number; total: number; meta: number } | undefined {
  const m = /(\d+)\/(\d+) (\d+)\s*$/.exec(statusLine);
  return m ? { alloc: Number(m[1]), total: Number(m[2]), meta: Number(m[3]) } : undefined;
}
