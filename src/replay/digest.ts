/**
 * The digest of a pool state: sha256 over a canonical serialization (object keys sorted, devices by name, COWs by
 * key), so the same state gives the same digest however it was reached.
 *
 * What it covers: every device (minor, uuid, read-only, suspended, live and inactive table lines) and the COW of
 * every persistent snapshot a device's table names (chunk size, valid, overflowed, the exceptions). Not covered:
 * marks (positions in the log, not state), creation order, COWs no table names any more (the log remembers them,
 * an engine does not hold them), and the order of a COW's exceptions on disk: they are compared as the set a
 * snapshot reads through — sorted by origin chunk, as maximal runs — because that is what a running engine holds
 * (its in-core table knows no record indexes). An invalid COW has no exceptions (it loads with none).
 */
import { createHash } from 'node:crypto';
import { persistentCowsOfTable, type PoolState } from './pool-state.js';

export interface CanonicalDevice {
  readonly name: string;
  readonly minor: number;
  readonly uuid: string | null;
  readonly readOnly: boolean;
  readonly suspended: boolean;
  readonly live: string[] | null;
  readonly inactive: string[] | null;
}

export interface CanonicalCow {
  readonly cow: string;
  /** false: a table names the COW but the state holds nothing about it. */
  readonly known: boolean;
  readonly chunkSizeSectors?: number;
  readonly valid?: boolean;
  readonly overflowed?: boolean;
  readonly exceptions?: number;
  /** Sorted by origin chunk, maximal: [oldChunk, newChunk, chunks]. */
  readonly runs?: Array<[number, number, number]>;
}

export interface CanonicalState {
  readonly devices: CanonicalDevice[];
  readonly cows: CanonicalCow[];
}

/** Maximal runs of a flattened pair list, sorted by origin chunk. */
export function sortedRuns(pairs: readonly number[]): Array<[number, number, number]> {
  const n = pairs.length / 2;
  const order = new Array<number>(n);
  for (let i = 0; i < n; i++) order[i] = i;
  order.sort((a, b) => pairs[2 * a] - pairs[2 * b]);
  const runs: Array<[number, number, number]> = [];
  for (const i of order) {
    const o = pairs[2 * i];
    const nw = pairs[2 * i + 1];
    const last = runs[runs.length - 1];
    if (last && o === last[0] + last[2] && nw === last[1] + last[2]) last[2]++;
    else runs.push([o, nw, 1]);
  }
  return runs;
}

export function canonicalState(state: PoolState): CanonicalState {
  const names = [...state.devices.keys()].sort();
  const devices = names.map((name): CanonicalDevice => {
    const d = state.devices.get(name)!;
    return { name, minor: d.minor, uuid: d.uuid ?? null, readOnly: d.readOnly, suspended: d.suspended, live: d.live, inactive: d.inactive };
  });
  const keys = new Set<string>();
  for (const d of state.devices.values()) for (const k of [...persistentCowsOfTable(d.live), ...persistentCowsOfTable(d.inactive)]) keys.add(k);
  const cows = [...keys].sort().map((cow): CanonicalCow => {
    const c = state.cows.get(cow);
    if (!c) return { cow, known: false };
    if (!c.valid) return { cow, known: true, chunkSizeSectors: c.chunkSizeSectors, valid: false };
    return { cow, known: true, chunkSizeSectors: c.chunkSizeSectors, valid: true, overflowed: c.overflowed, exceptions: c.pairs.length / 2, runs: sortedRuns(c.pairs) };
  });
  return { devices, cows };
}

/** JSON with object keys sorted at every level (arrays keep their order). */
export function canonicalJson(value: unknown): string {
  if (value === null || typeof value !== 'object') return JSON.stringify(value) ?? 'null';
  if (Array.isArray(value)) {
    // Arrays of numbers and strings (table lines, runs) have no keys to sort: the fast path for big exception lists.
    if (value.every((v) => typeof v !== 'object' || (Array.isArray(v) && v.every((x) => typeof x === 'number')))) return JSON.stringify(value);
    return `[${value.map(canonicalJson).join(',')}]`;
  }
  const obj = value as Record<string, unknown>;
  const keys = Object.keys(obj).filter((k) => obj[k] !== undefined).sort();
  return `{${keys.map((k) => `${JSON.stringify(k)}:${canonicalJson(obj[k])}`).join(',')}}`;
}

/** sha256 (hex) of the canonical form. */
export function digestCanonical(canonical: CanonicalState): string {
  return createHash('sha256').update(canonicalJson(canonical)).digest('hex');
}

export function stateDigest(state: PoolState): string {
  return digestCanonical(canonicalState(state));
}
