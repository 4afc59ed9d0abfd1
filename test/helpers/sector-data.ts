/**
 * Self-describing sector contents for the data-path tests: every sector a test writes holds the id of the write
 * and its own sector number, then a filler both determine. Reading a device back tells, per sector, which write
 * it holds, or that it holds none (torn, misplaced, garbage).
 */
export const SECTOR = 512;

/** One sector of "write" `id` at device sector `sector`: the ids and the sector number, then a filler. */
export function fillSector(buf: Buffer, at: number, id: number, sector: number): void {
  buf.fill((id * 13 + sector * 7 + 1) & 0xff, at, at + SECTOR);
  buf.writeUInt32LE(id, at);
  buf.writeUInt32LE(sector, at + 4);
}

/** `count` sectors of write `id` starting at device sector `sector`. */
export function writeData(id: number, sector: number, count: number): Buffer {
  const b = Buffer.alloc(count * SECTOR);
  for (let i = 0; i < count; i++) fillSector(b, i * SECTOR, id, sector + i);
  return b;
}

/** The write id a sector holds, or a description of why it holds none. */
export function decodeSector(buf: Buffer, at: number, sector: number): number | string {
  const id = buf.readUInt32LE(at);
  const expect = Buffer.alloc(SECTOR);
  fillSector(expect, 0, id, sector);
  if (buf.compare(expect, 0, SECTOR, at, at + SECTOR) !== 0) {
    return `garbage (first bytes ${buf.subarray(at, at + 16).toString('hex')}; written for sector ${buf.readUInt32LE(at + 4)})`;
  }
  return id;
}
