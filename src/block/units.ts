/**
 * Units of position and length. Every shift lives here; a public signature never takes a bare number for a
 * position or a length. The brands are erased at run time (they cost nothing on the hot path).
 */
declare const sectorBrand: unique symbol;
declare const bytesBrand: unique symbol;
declare const chunkBrand: unique symbol;

/** A count or index of 512-byte sectors. */
export type Sector = number & { readonly [sectorBrand]: true };
/** A count or offset in bytes. */
export type Bytes = number & { readonly [bytesBrand]: true };
/** A count or index of chunks (a chunk is `chunkSizeSectors` sectors). */
export type Chunk = number & { readonly [chunkBrand]: true };

export const SECTOR_SHIFT = 9;
export const SECTOR_SIZE_BYTES = 512 as Bytes;

export const sectors = (n: number): Sector => n as Sector;
export const bytes = (n: number): Bytes => n as Bytes;
export const chunks = (n: number): Chunk => n as Chunk;

export const sectorsToBytes = (s: Sector): Bytes => (s * 512) as Bytes;
/** Exact conversion; callers assert alignment first (see isSectorAligned). */
export const bytesToSectors = (b: Bytes): Sector => Math.floor(b / 512) as Sector;
export const isSectorAligned = (b: number): boolean => b % 512 === 0;

export const sectorToChunk = (s: Sector, chunkSizeSectors: Sector): Chunk => Math.floor(s / chunkSizeSectors) as Chunk;
export const chunkToSector = (c: Chunk, chunkSizeSectors: Sector): Sector => (c * chunkSizeSectors) as Sector;

export const KiB = 1024;
export const MiB = 1024 * 1024;
export const GiB = 1024 * 1024 * 1024;
