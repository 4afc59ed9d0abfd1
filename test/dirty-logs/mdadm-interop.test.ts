/**
 * dmstate's md bitmap files against the real mdadm (Debian 12's mdadm 4.2, installed by test/install-tools.sh):
 * `mdadm -X` reads what `dmstate bitmap create` and the md-bitmap log write, with the chunk size, sync size, events,
 * events cleared and dirty count dmstate meant (compared field by field), and `dmstate bitmap examine` prints the
 * same stdout as `mdadm -X` byte for byte, also for odd and damaged files. Bitmaps made by mdadm and the kernel are
 * read in test/kernel/md-bitmap-interop.test.ts (the host has no md driver).
 */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, test, vi } from 'vitest';
import { FileBlockDevice } from '../../src/block/file-device.js';
import { sectors } from '../../src/block/units.js';
import { SimulatedClock } from '../../src/core/clock.js';
import type { DirtyLogOptions } from '../../src/dirty-logs/contract.js';
import { examineMdBitmap } from '../../src/dirty-logs/md-bitmap/examine.js';
import { mdBitmapLog, type MdBitmapLog } from '../../src/dirty-logs/md-bitmap/md-bitmap-log.js';
import { createMdBitmapSuperblock, encodeMdBitmapSuperblock, mdBitmapChunkCount, parseMdBitmapUuid, type MdBitmapSuperblock } from '../../src/dirty-logs/md-bitmap/superblock.js';
import { runBitmap } from '../../src/frontends/cli/bitmap.js';
import { main } from '../../src/frontends/cli/main.js';

function findMdadm(): string | undefined {
  const r = spawnSync('sh', ['-c', 'command -v mdadm || ls /sbin/mdadm /usr/sbin/mdadm 2>/dev/null | head -1'], { encoding: 'utf8' });
  const p = r.stdout.trim().split('\n')[0];
  return p ? p : undefined;
}

const MDADM = findMdadm();

interface Examined {
  readonly stdout: string;
  readonly stderr: string;
  readonly status: number | null;
  readonly fields: Record<string, string>;
}

function mdadmX(file: string): Examined {
  if (!MDADM) throw new Error(`mdadm is not installed: ${process.env.DMSTATE_TOOLS_MISSING ?? 'test/install-tools.sh installs it (as root)'}`);
  const r = spawnSync(MDADM, ['-X', file], { encoding: 'utf8' });
  return { stdout: r.stdout, stderr: r.stderr, status: r.status, fields: parseFields(r.stdout) };
}

/** `          Events : 5` lines into { Events: '5' }. */
function parseFields(text: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const line of text.split('\n')) {
    const m = /^\s*([A-Za-z][A-Za-z ]*?) : (.*)$/.exec(line);
    if (m) out[m[1]] = m[2];
  }
  return out;
}

function dmstateX(file: string): { stdout: string; stderr: string; exitCode: number } {
  return examineMdBitmap(fs.readFileSync(file), file);
}

/** The numbers mdadm prints on the Bitmap line. */
function bitmapCounts(fields: Record<string, string>): { totalBits: number; dirtyBits: number } {
  const m = /^(\d+) bits \(chunks\), (\d+) dirty/.exec(fields.Bitmap ?? '');
  if (!m) throw new Error(`no Bitmap line in ${JSON.stringify(fields)}`);
  return { totalBits: Number(m[1]), dirtyBits: Number(m[2]) };
}

let dir = '';
beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'dmstate-mdadm-'));
});
afterAll(() => {
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

async function cli(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  let stdout = '';
  let stderr = '';
  const code = await runBitmap(args, { stdout: { write: (t: string) => (stdout += t) }, stderr: { write: (t: string) => (stderr += t) } });
  return { code, stdout, stderr };
}

test('mdadm is installed (test/install-tools.sh)', () => {
  expect(MDADM, process.env.DMSTATE_TOOLS_MISSING ?? 'mdadm not found').toBeDefined();
  const v = spawnSync(MDADM!, ['--version'], { encoding: 'utf8' });
  expect(v.stderr + v.stdout).toMatch(/mdadm - v4\.2/);
});

describe('mdadm -X reads what dmstate bitmap create writes', () => {
  test.each([
    { name: '64 KiB chunks, 63 MiB', args: ['--sync-size', '129024', '--chunk', '64'], chunk: '64 KB', sync: '64512 (63.00 MiB 66.06 MB)', daemon: '5s', bits: 1008 },
    { name: "mdadm's default chunk for 5 GB", args: ['--sync-size', '10000000'], chunk: '8 KB', sync: '5000000 (4.77 GiB 5.12 GB)', daemon: '5s', bits: 625000 },
    { name: 'every option', args: ['--sync-size', '1000', '--chunk', '4K', '--delay', '1', '--write-behind', '100', '--uuid', '00112233:44556677:8899aabb:ccddeeff'], chunk: '4 KB', sync: '500', daemon: '1s', bits: 125 },
    { name: '1 MiB chunks, odd size', args: ['--sync-size', '4194303', '--chunk', '1M'], chunk: '1 MB', sync: '2097151 (2048.00 MiB 2147.48 MB)', daemon: '5s', bits: 2048 },
  ])('$name', async (c) => {
    const file = path.join(dir, `create-${c.bits}.bm`);
    const r = await cli(['create', file, ...c.args]);
    expect(r.code, r.stderr).toBe(0);
    const x = mdadmX(file);
    expect(x.status, x.stderr).toBe(0);
    expect(x.stderr).toBe('');
    expect(x.fields).toMatchObject({ Magic: '6d746962', Version: '4', Events: '0', 'Events Cleared': '0', State: 'OK', Chunksize: c.chunk, 'Sync Size': c.sync });
    expect(x.fields.Daemon).toBe(`${c.daemon} flush period`);
    expect(bitmapCounts(x.fields)).toEqual({ totalBits: c.bits, dirtyBits: c.bits });
    if (c.args.includes('--uuid')) expect(x.fields.UUID).toBe('00112233:44556677:8899aabb:ccddeeff');
    if (c.args.includes('--write-behind')) expect(x.fields['Write Mode']).toBe('Allow write behind, max 100');
    const mine = await cli(['examine', file]);
    expect(mine.stdout).toBe(x.stdout);
    expect(mine.code).toBe(0);
  });

  test('`dmstate bitmap` is a dmstate command', async () => {
    const file = path.join(dir, 'main.bm');
    let out = '';
    const spy = vi.spyOn(process.stdout, 'write').mockImplementation((chunk: string | Uint8Array) => {
      out += String(chunk);
      return true;
    });
    try {
      expect(await main(['bitmap', 'create', file, '--sync-size', '2048', '--chunk', '64'])).toBe(0);
      out = '';
      expect(await main(['bitmap', 'examine', file])).toBe(0);
    } finally {
      spy.mockRestore();
    }
    expect(out).toBe(mdadmX(file).stdout);
  });

  test('an existing file needs --force; bad options change nothing', async () => {
    const file = path.join(dir, 'exists.bm');
    fs.writeFileSync(file, 'keep me');
    expect((await cli(['create', file, '--sync-size', '100'])).code).toBe(1);
    expect((await cli(['create', file, '--sync-size', '100', '--chunk', '3'])).code).toBe(2);
    expect((await cli(['create', file, '--sync-size', '100', '--delay', '0', '--force'])).code).toBe(1);
    expect((await cli(['create', file])).code).toBe(2);
    expect(fs.readFileSync(file, 'utf8')).toBe('keep me');
    expect((await cli(['create', file, '--sync-size', '100', '--force'])).code).toBe(0);
    expect(mdadmX(file).fields.Chunksize).toBe('4 KB');
  });

  test('--offset writes the bitmap inside a file (a leg), leaving the rest; mdadm reads it once cut out', async () => {
    const file = path.join(dir, 'leg.img');
    fs.writeFileSync(file, Buffer.alloc(64 * 512, 0x77));
    expect((await cli(['create', file, '--sync-size', '4096', '--chunk', '4', '--offset', '32'])).code).toBe(1);
    expect((await cli(['create', file, '--sync-size', '4096', '--chunk', '4', '--offset', '32', '--force'])).code).toBe(0);
    const all = fs.readFileSync(file);
    expect(all.subarray(0, 32 * 512).every((b) => b === 0x77)).toBe(true);
    const cut = path.join(dir, 'cut.bm');
    fs.writeFileSync(cut, all.subarray(32 * 512));
    expect(bitmapCounts(mdadmX(cut).fields)).toEqual({ totalBits: 512, dirtyBits: 512 });
    const mine = await cli(['examine', file, '--offset', '32']);
    expect(mine.stdout.replace(file, cut)).toBe(mdadmX(cut).stdout);
  });
});

describe('mdadm -X reads what the md-bitmap log writes', () => {
  const SLEEP_S = 3;

  async function openLog(file: string, initialSync: DirtyLogOptions['initialSync'], clock: SimulatedClock): Promise<{ log: MdBitmapLog; device: FileBlockDevice }> {
    const device = await FileBlockDevice.open(file);
    const log = await mdBitmapLog.create({
      targetSizeSectors: sectors(129024),
      regionSizeSectors: sectors(128),
      initialSync,
      clock,
      logDevice: device,
      logDeviceLabel: file,
      extra: { daemonSleepSeconds: String(SLEEP_S), offsetSectors: '0' },
    });
    await mdBitmapLog.resume!(log);
    return { log, device };
  }

  async function settle(log: MdBitmapLog, clock: SimulatedClock): Promise<void> {
    for (let i = 0; i < 4; i++) {
      clock.advance(SLEEP_S * 1000);
      await log.bitmap.whenIdle();
    }
  }

  /** mdadm's view and the log's own state agree, field by field; dmstate's examine prints the same. */
  function expectMdadmSees(file: string, log: MdBitmapLog, dirtyChunks: number): void {
    const x = mdadmX(file);
    expect(x.status, x.stderr).toBe(0);
    expect(x.fields).toMatchObject({
      Magic: '6d746962',
      Version: '4',
      Events: String(log.bitmap.events),
      'Events Cleared': String(log.bitmap.eventsCleared),
      State: 'OK',
      Chunksize: '64 KB',
      Daemon: `${SLEEP_S}s flush period`,
      'Sync Size': '64512 (63.00 MiB 66.06 MB)',
    });
    expect(bitmapCounts(x.fields)).toEqual({ totalBits: 1008, dirtyBits: dirtyChunks });
    expect(dmstateX(file).stdout).toBe(x.stdout);
  }

  test('clean, with dirty bits, after the daemon cleared them, degraded', async () => {
    const file = path.join(dir, 'log.bm');
    expect((await cli(['create', file, '--sync-size', '129024', '--chunk', '64', '--delay', String(SLEEP_S)])).code).toBe(0);
    const clock = new SimulatedClock();
    const { log, device } = await openLog(file, 'nosync', clock);
    try {
      // Clean: mdadm's all-ones bitmap rewritten with every bit clear, events 0 → 1.
      expect(log.bitmap.events).toBe(1n);
      expectMdadmSees(file, log, 0);

      // Three regions written: their bits reach the file before flush() resolves.
      for (const r of [0, 16, 1007]) mdBitmapLog.markRegion(log, r);
      await mdBitmapLog.flush(log);
      expectMdadmSees(file, log, 3);

      // Two writes drained: after the daemon's passes only the one in flight is left; events_cleared caught up.
      for (const r of [0, 16]) mdBitmapLog.clearRegion(log, r);
      await settle(log, clock);
      expect(log.bitmap.eventsCleared).toBe(log.bitmap.events);
      expectMdadmSees(file, log, 1);

      // Degraded: an event; a write that ends now keeps its bit through any number of passes.
      mdBitmapLog.setDegraded(log, true);
      mdBitmapLog.markRegion(log, 500);
      await mdBitmapLog.flush(log);
      mdBitmapLog.clearRegion(log, 500);
      mdBitmapLog.clearRegion(log, 1007);
      await settle(log, clock);
      expect(log.bitmap.events).toBe(2n);
      expect(log.bitmap.eventsCleared).toBe(1n);
      expectMdadmSees(file, log, 2);

      // Suspend writes the superblock; the file reads the same afterwards.
      await mdBitmapLog.suspend!(log);
      expectMdadmSees(file, log, 2);
    } finally {
      await mdBitmapLog.close(log);
      await device.close();
    }
  });
});

describe('dmstate bitmap examine prints what mdadm -X prints', () => {
  const base = createMdBitmapSuperblock({ syncSizeSectors: 2097152n, chunkSizeBytes: 65536, daemonSleepSeconds: 5, events: 7n, eventsCleared: 3n, uuid: parseMdBitmapUuid('000102030405060708090a0b0c0d0e0f') });

  function write(name: string, patch: Partial<MdBitmapSuperblock>, options: { bits?: (i: number) => number; bitsBytes?: number } = {}): string {
    const sb = { ...base, ...patch };
    const chunks = Number(sb.chunkSizeBytes === 0 ? 0n : mdBitmapChunkCount(sb.syncSizeSectors, sb.chunkSizeBytes));
    const bitsBytes = options.bitsBytes ?? Math.ceil(chunks / 8);
    const img = Buffer.alloc(256 + bitsBytes);
    Buffer.from(encodeMdBitmapSuperblock(sb)).copy(img);
    for (let i = 0; i < bitsBytes; i++) img[256 + i] = options.bits ? options.bits(i) : 0;
    const file = path.join(dir, name);
    fs.writeFileSync(file, img);
    return file;
  }

  const cases: Array<[string, Partial<MdBitmapSuperblock>, { bits?: (i: number) => number; bitsBytes?: number }?]> = [
    ['clean', {}],
    ['some bits', {}, { bits: (i) => (i % 7 === 0 ? 0x81 : 0) }],
    ['every bit', {}, { bits: () => 0xff }],
    ['out of date', { state: 2 }],
    ['write error state', { state: 4 }],
    ['write-behind', { writeBehind: 16383 }],
    ['version 3', { version: 3 }],
    ['clustered', { version: 5, nodes: 2, clusterName: Uint8Array.from(Buffer.from('mycluster'.padEnd(64, '\0'))) }],
    ['truncated', {}, { bitsBytes: 4, bits: () => 0x0f }],
    ['no bits at all', {}, { bitsBytes: 0 }],
    ['tiny', { syncSizeSectors: 1n, chunkSizeBytes: 512 }, { bits: () => 0xff }],
    ['4 TiB, 2 GiB chunks', { syncSizeSectors: 2n ** 33n, chunkSizeBytes: 2 ** 31 }, { bits: (i) => i }],
    ['sync size zero', { syncSizeSectors: 0n }],
    ['chunk size zero', { chunkSizeBytes: 0 }],
    ['huge events', { events: 2n ** 64n - 1n, eventsCleared: 2n ** 63n }],
    ['daemon sleep over 2^31', { daemonSleepSeconds: 2 ** 32 - 5 }],
    ['third of the bits (rounding)', { syncSizeSectors: 384n, chunkSizeBytes: 512 }, { bits: (i) => (i % 3 === 0 ? 0xff : 0) }],
  ];

  test.each(cases)('%s', (name, patch, options) => {
    const file = write(`${name.replace(/\W+/g, '-')}.bm`, patch, options);
    const x = mdadmX(file);
    const mine = dmstateX(file);
    expect(mine.stdout).toBe(x.stdout);
    expect(mine.exitCode).toBe(x.status);
    // Warnings go to stderr on both sides (mdadm's own words there).
    expect(mine.stderr === '').toBe(x.stderr === '');
  });

  test('not a bitmap: same stdout; unknown version exits 1 on both; bad magic exits 1 in dmstate (mdadm: 0)', () => {
    const badMagic = write('bad-magic.bm', { magic: 0x12345678 });
    expect(dmstateX(badMagic).stdout).toBe(mdadmX(badMagic).stdout);
    expect(mdadmX(badMagic).status).toBe(0);
    expect(dmstateX(badMagic).exitCode).toBe(1);
    for (const version of [2, 6]) {
      const f = write(`version-${version}.bm`, { version });
      expect(dmstateX(f).stdout).toBe(mdadmX(f).stdout);
      expect(dmstateX(f).exitCode).toBe(1);
      expect(mdadmX(f).status).toBe(1);
    }
    const short = path.join(dir, 'short.bm');
    fs.writeFileSync(short, Buffer.alloc(100, 1));
    expect(dmstateX(short)).toMatchObject({ stdout: mdadmX(short).stdout, exitCode: 1 });
    expect(mdadmX(short).status).toBe(1);
  });
});
