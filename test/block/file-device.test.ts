import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, describe, expect, test } from 'vitest';
import { FileBlockDevice } from '../../src/block/file-device.js';
import { sectors } from '../../src/block/units.js';
import { blockDeviceSuite } from '../../src/testing/conformance/block-device.js';

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'dmstate-file-device-'));
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));
let fileCount = 0;
const freshPath = (): string => path.join(dir, `dev-${++fileCount}.img`);

for (const syncIo of [true, false]) {
  blockDeviceSuite({
    test,
    expect,
    name: `file (syncIo: ${syncIo})`,
    zeroedOnCreate: true,
    factory: (sizeSectors) => FileBlockDevice.open(freshPath(), { create: { sizeBytes: sizeSectors * 512 }, syncIo }),
  });
}

describe('FileBlockDevice', () => {
  test('takes its size from the file and its name from the path', async () => {
    const p = freshPath();
    fs.writeFileSync(p, Buffer.alloc(512 * 10, 3));
    const dev = await FileBlockDevice.open(p);
    try {
      expect(dev.sizeSectors).toBe(10);
      expect(dev.name).toBe(p);
      expect(dev.readOnly).toBe(false);
      expect(dev.supports).toEqual({ flush: true, discard: true, fua: true, holes: false });
      const got = Buffer.alloc(1024);
      await dev.read(sectors(8), got);
      expect(got.every((x) => x === 3)).toBe(true);
    } finally {
      await dev.close();
    }
  });

  test('create makes a zeroed file of the size asked; an existing file is opened as it is', async () => {
    const p = freshPath();
    const dev = await FileBlockDevice.open(p, { create: { sizeBytes: 8192 } });
    await dev.close();
    expect(fs.statSync(p).size).toBe(8192);
    expect(fs.readFileSync(p).every((x) => x === 0)).toBe(true);
    fs.writeFileSync(p, Buffer.alloc(1024, 1));
    const again = await FileBlockDevice.open(p, { create: { sizeBytes: 8192 } });
    expect(again.sizeSectors).toBe(2);
    await again.close();
    expect(fs.readFileSync(p).equals(Buffer.alloc(1024, 1))).toBe(true);
  });

  test('a file whose size is not a multiple of 512 is refused', async () => {
    const p = freshPath();
    fs.writeFileSync(p, Buffer.alloc(1000));
    await expect(FileBlockDevice.open(p)).rejects.toMatchObject({ code: 'DM_INVALID_ARGUMENT', message: expect.stringContaining('1000') });
    await expect(FileBlockDevice.open(freshPath(), { create: { sizeBytes: 1000 } })).rejects.toMatchObject({ code: 'DM_INVALID_ARGUMENT' });
  });

  test('a missing file without create is refused, naming the path', async () => {
    const p = freshPath();
    await expect(FileBlockDevice.open(p)).rejects.toMatchObject({ code: 'DM_INVALID_ARGUMENT', message: expect.stringContaining(p) });
    expect(fs.existsSync(p)).toBe(false);
  });

  test('a directory is refused', async () => {
    await expect(FileBlockDevice.open(dir)).rejects.toMatchObject({ code: 'DM_INVALID_ARGUMENT' });
    await expect(FileBlockDevice.open(dir, { readOnly: true })).rejects.toMatchObject({ code: 'DM_INVALID_ARGUMENT' });
  });

  test('readOnly with create is refused', async () => {
    await expect(FileBlockDevice.open(freshPath(), { readOnly: true, create: { sizeBytes: 512 } })).rejects.toMatchObject({
      code: 'DM_INVALID_ARGUMENT',
    });
  });

  for (const syncIo of [true, false]) {
    test(`read-only (syncIo: ${syncIo}): reads work, writes and discards reject with DM_NOT_SUPPORTED`, async () => {
      const p = freshPath();
      fs.writeFileSync(p, Buffer.alloc(4096, 6));
      const dev = await FileBlockDevice.open(p, { readOnly: true, syncIo });
      try {
        expect(dev.readOnly).toBe(true);
        const got = Buffer.alloc(512);
        await dev.read(sectors(7), got);
        expect(got.every((x) => x === 6)).toBe(true);
        await expect(dev.write(sectors(0), Buffer.alloc(512))).rejects.toMatchObject({ code: 'DM_NOT_SUPPORTED' });
        await expect(dev.write(sectors(0), Buffer.alloc(512), { fua: true })).rejects.toMatchObject({ code: 'DM_NOT_SUPPORTED' });
        await expect(dev.discard(sectors(0), sectors(1))).rejects.toMatchObject({ code: 'DM_NOT_SUPPORTED' });
        await dev.flush();
      } finally {
        await dev.close();
      }
      expect(fs.readFileSync(p).equals(Buffer.alloc(4096, 6))).toBe(true);
    });

    test(`writes and discards reach the file (syncIo: ${syncIo})`, async () => {
      const p = freshPath();
      const sizeBytes = 3 * 1024 * 1024;
      const dev = await FileBlockDevice.open(p, { create: { sizeBytes }, syncIo });
      const data = Buffer.alloc(sizeBytes, 0x3c);
      await dev.write(sectors(0), data);
      // More than one 1 MiB piece of zeroes, with unaligned ends.
      await dev.discard(sectors(3), sectors(2 * 2048 + 5));
      await dev.write(sectors(6000), Buffer.alloc(512, 0x11), { fua: true });
      await dev.close();
      const want = Buffer.from(data);
      want.fill(0, 3 * 512, (3 + 2 * 2048 + 5) * 512);
      want.fill(0x11, 6000 * 512, 6001 * 512);
      const onDisk = fs.readFileSync(p);
      expect(onDisk.length).toBe(sizeBytes);
      expect(onDisk.equals(want)).toBe(true);
    });

    test(`close waits for I/O in flight (syncIo: ${syncIo})`, async () => {
      const p = freshPath();
      const dev = await FileBlockDevice.open(p, { create: { sizeBytes: 1024 * 1024 }, syncIo });
      const writes = Array.from({ length: 16 }, (_, i) => dev.write(sectors(i * 8), Buffer.alloc(4096, i + 1), { fua: i % 2 === 0 }));
      const closed = dev.close();
      await Promise.all(writes);
      await closed;
      const onDisk = fs.readFileSync(p);
      for (let i = 0; i < 16; i++) expect(onDisk.subarray(i * 4096, (i + 1) * 4096).every((x) => x === i + 1), `write ${i}`).toBe(true);
    });
  }
});
