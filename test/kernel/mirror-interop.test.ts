/**
 * dm-mirror interop with Linux 6.1 (one VM boot): the same mirror tables on the kernel and on dmstate, and disk logs
 * written by one side read by the other.
 *
 * Parity (status and table lines, and the table event count, identical once the kernel's 253:N are mapped to the mapped devices' names; legs
 * and logs are linear devices l0, l1, l2, lg on both sides): core log with nosync and handle_errors; core log
 * resyncing everything; three legs with a short last region; a disk log (new: full resync) before and after
 * writes; a leg failing reads (R, the read served by the other leg); a leg failing writes with handle_errors (D,
 * the sync count one region short; the kernel holds the write until a suspend, dmstate completes it from the other
 * leg); the dmstate-written log below.
 *
 * Kernel → dmstate: while a write to regions 5 and 9 waits on a slow leg (dm-delay), the job copies the kernel's
 * log device; dmstate then loads a mirror over copies of the legs with that log, where leg 1 was corrupted in
 * regions 5 (dirty in the log) and 20 (clean): dmstate must copy exactly the two dirty regions — region 5 repaired,
 * region 20 left as it is — which it can only do by reading the kernel's clean bits. The kernel's final log (all
 * clean) makes dmstate copy nothing.
 *
 * dmstate → kernel: dmstate wrote a mirror whose log says regions 4 and 11 are dirty (its writes there were in
 * flight); leg f is corrupted in region 4 (dirty) and 25 (clean). The kernel loads the same table: after its resync
 * regions 4 and 11 match on both legs and region 25 still differs.
 *
 * Needs the kernel VM (test/kernel/setup.sh); if it cannot be set up the test fails with the reason, unless
 * DMSTATE_SKIP_KERNEL=1. DMSTATE_KEEP_TMP=1 keeps the images.
 */
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { MemoryLevel } from 'memory-level';
import { MemoryBlockDevice } from '../../src/block/memory-device.js';
import { sectors } from '../../src/block/units.js';
import { SimulatedClock } from '../../src/core/clock.js';
import { Engine } from '../../src/core/engine.js';
import { createRng } from '../../src/core/rng.js';
import type { LevelDb } from '../../src/log/event-log.js';
import type { MirrorInstance } from '../../src/targets/mirror/mirror.js';
import { ensureKernel, kernelSkipRequested, runKernelJob } from './kernel-vm.js';

const SECTOR = 512;
const MiB = 1024 * 1024;
const S = 32768; // 16 MiB legs, 32 regions of 1024 sectors
const REGION = 1024;
const turn = (): Promise<void> => new Promise((r) => setImmediate(r));

function seeded(seed: number, n: number): Buffer {
  const rng = createRng(seed);
  const b = Buffer.alloc(n);
  for (let i = 0; i < n; i += 4) b.writeUInt32LE((rng.next() * 0x1_0000_0000) >>> 0, i);
  return b;
}

function image(file: string, bytes: number, content?: Buffer): string {
  fs.writeFileSync(file, Buffer.alloc(0));
  fs.truncateSync(file, bytes);
  if (content) {
    const fd = fs.openSync(file, 'r+');
    fs.writeSync(fd, content, 0, content.length, 0);
    fs.closeSync(fd);
  }
  return file;
}

function readRegion(file: string, region: number): Buffer {
  const fd = fs.openSync(file, 'r');
  const b = Buffer.alloc(REGION * SECTOR);
  fs.readSync(fd, b, 0, b.length, region * REGION * SECTOR);
  fs.closeSync(fd);
  return b;
}

function writeAt(file: string, byteOffset: number, data: Buffer): void {
  const fd = fs.openSync(file, 'r+');
  fs.writeSync(fd, data, 0, data.length, byteOffset);
  fs.closeSync(fd);
}

const md5 = (b: Buffer): string => createHash('md5').update(b).digest('hex');

/** Dirty regions of a dm-log disk log image (parsed from the format, independently of the code under test). */
function dirtyRegions(log: Buffer): number[] {
  expect(log.readUInt32LE(0), 'magic').toBe(0x4d695272);
  expect(log.readUInt32LE(4), 'version').toBe(2);
  const n = Number(log.readBigUInt64LE(8));
  const out: number[] = [];
  for (let r = 0; r < n; r++) if ((log[1024 + (r >>> 3)] & (1 << (r & 7))) === 0) out.push(r);
  return out;
}

/** The job's sections: `@@ name` starts one. */
function sections(output: string): Map<string, string> {
  const out = new Map<string, string>();
  let name: string | undefined;
  let lines: string[] = [];
  for (const line of output.split('\n')) {
    const m = /^@@ (\S+)$/.exec(line);
    if (m) {
      if (name) out.set(name, lines.join('\n'));
      name = m[1];
      lines = [];
    } else if (name) lines.push(line);
  }
  if (name) out.set(name, lines.join('\n'));
  return out;
}

const JOB = String.raw`
S=${S}
mk() { dmsetup create "$1" --table "$2"; dmsetup mknodes; }
waitsync() { i=0; while ! dmsetup status "$1" | grep -q " $2 1 "; do sleep 0.2; i=$((i+1)); [ $i -gt 600 ] && echo "waitsync $1 timed out" && break; done; }
st() { echo "@@ $1"; dmsetup status m; dmsetup table m; dmsetup info m | grep '^Event number'; }
relin() { dmsetup suspend "$1"; dmsetup load "$1" --table "$2"; dmsetup resume "$1"; }
mk l0 "0 $S linear /dev/vda 0"; mk l1 "0 $S linear /dev/vdb 0"; mk l2 "0 $S linear /dev/vdc 0"; mk lg "0 2048 linear /dev/vdd 0"
mk le "0 $S linear /dev/vdf 0"; mk lf "0 $S linear /dev/vdg 0"; mk dlg "0 2048 linear /dev/vdh 0"
M=/dev/mapper
mk m "0 $S mirror core 2 1024 nosync 2 $M/l0 0 $M/l1 0 1 handle_errors"; st core-nosync; dmsetup remove m
mk m "0 $S mirror core 1 1024 2 $M/l0 0 $M/l1 0"; waitsync m 32/32; st core-resync; dmsetup remove m
mk m "0 32000 mirror core 2 512 nosync 3 $M/l0 0 $M/l1 0 $M/l2 0"; st three-legs; dmsetup remove m
mk m "0 $S mirror disk 2 $M/lg 1024 2 $M/l0 0 $M/l1 0"; waitsync m 32/32; st disk-resync
dd if=/dev/urandom of=$M/m bs=4096 count=2 seek=$((3*128)) oflag=direct 2>/dev/null
relin l1 "0 $S delay /dev/vdb 0 0 /dev/vdb 0 3000"
dd if=/dev/urandom of=$M/m bs=4096 count=1 seek=$((5*128+2)) oflag=direct 2>/dev/null &
dd if=/dev/urandom of=$M/m bs=4096 count=1 seek=$((9*128+5)) oflag=direct 2>/dev/null &
sleep 1
dd if=$M/lg of=/dev/vde bs=512 count=8 iflag=direct oflag=direct 2>/dev/null
wait
relin l1 "0 $S linear /dev/vdb 0"
st disk-after
dmsetup remove m
dd if=$M/lg of=/dev/vde bs=512 count=8 seek=64 iflag=direct oflag=direct 2>/dev/null
mk m "0 $S mirror core 2 1024 nosync 2 $M/l0 0 $M/l1 0 1 handle_errors"
relin l0 "0 $S error"
dd if=$M/m of=/dev/null bs=4096 count=1 skip=10 iflag=direct 2>/dev/null; rc=$?; echo "@@ read-rc"; echo "rc=$rc"
st read-failure
dmsetup remove m
relin l0 "0 $S linear /dev/vda 0"
mk m "0 $S mirror core 2 1024 nosync 2 $M/l0 0 $M/l1 0 1 handle_errors"
relin l1 "0 $S error"
dd if=/dev/zero of=$M/m bs=4096 count=1 seek=$((7*128)) oflag=direct 2>/dev/null &
sleep 2
st write-failure
dmsetup suspend m; wait; dmsetup resume m; dmsetup remove m
relin l1 "0 $S linear /dev/vdb 0"
mk m "0 $S mirror disk 2 $M/dlg 1024 2 $M/le 0 $M/lf 0"; waitsync m 32/32; st dmstate-log
dmsetup remove m
echo "@@ ls"; dmsetup ls
sync
`;

interface DmstateResult {
  readonly statuses: Map<string, string>;
}

/** The parity scenarios on dmstate, in-process, over memory devices with the same linear devices as the kernel. */
async function dmstateParity(dlogImages: { e: string; f: string; dlog: string }): Promise<DmstateResult> {
  const out = new Map<string, string>();
  const engine = await Engine.open({
    db: new MemoryLevel() as unknown as LevelDb,
    backingDevices: {
      a: new MemoryBlockDevice({ sizeSectors: sectors(S), name: 'a' }),
      b: new MemoryBlockDevice({ sizeSectors: sectors(S), name: 'b' }),
      c: new MemoryBlockDevice({ sizeSectors: sectors(S), name: 'c' }),
      d: new MemoryBlockDevice({ sizeSectors: sectors(2048), name: 'd' }),
    },
  });
  const set = () => (engine.device('m')!.live!.targets[0].instance as MirrorInstance).set;
  const waitSync = async (): Promise<void> => {
    while (set().resync.state !== 'IN_SYNC') await turn();
  };
  const st = (name: string): void => {
    out.set(name, [...engine.status('m'), ...engine.table('m'), `Event number:      ${engine.info('m').eventNr}`].join('\n'));
  };
  const relin = async (name: string, table: string): Promise<void> => {
    await engine.suspend(name);
    await engine.load(name, table);
    await engine.resume(name);
  };
  await engine.create('l0', { table: `0 ${S} linear a 0` });
  await engine.create('l1', { table: `0 ${S} linear b 0` });
  await engine.create('l2', { table: `0 ${S} linear c 0` });
  await engine.create('lg', { table: '0 2048 linear d 0' });
  await engine.create('le', { table: `0 ${S} linear ${dlogImages.e} 0` });
  await engine.create('lf', { table: `0 ${S} linear ${dlogImages.f} 0` });
  await engine.create('dlg', { table: `0 2048 linear ${dlogImages.dlog} 0` });
  const m = (table: string) => engine.create('m', { table });
  await m(`0 ${S} mirror core 2 1024 nosync 2 l0 0 l1 0 1 handle_errors`);
  st('core-nosync');
  await engine.remove('m');
  await m(`0 ${S} mirror core 1 1024 2 l0 0 l1 0`);
  await waitSync();
  st('core-resync');
  await engine.remove('m');
  await m('0 32000 mirror core 2 512 nosync 3 l0 0 l1 0 l2 0');
  st('three-legs');
  await engine.remove('m');
  await m(`0 ${S} mirror disk 2 lg 1024 2 l0 0 l1 0`);
  await waitSync();
  st('disk-resync');
  const dev = engine.device('m')!;
  await dev.write(sectors(3 * REGION), seeded(1, 8192));
  await Promise.all([dev.write(sectors(5 * REGION + 16), seeded(2, 4096)), dev.write(sectors(9 * REGION + 40), seeded(3, 4096))]);
  st('disk-after');
  await engine.remove('m');
  await m(`0 ${S} mirror core 2 1024 nosync 2 l0 0 l1 0 1 handle_errors`);
  await relin('l0', `0 ${S} error`);
  await engine.device('m')!.read(sectors(80), Buffer.alloc(4096));
  out.set('read-rc', 'rc=0');
  st('read-failure');
  await engine.remove('m');
  await relin('l0', `0 ${S} linear a 0`);
  await m(`0 ${S} mirror core 2 1024 nosync 2 l0 0 l1 0 1 handle_errors`);
  await relin('l1', `0 ${S} error`);
  // The kernel holds this write (handle_errors) until a suspend; dmstate completes it from leg l0.
  await engine.device('m')!.write(sectors(7 * REGION), Buffer.alloc(4096));
  st('write-failure');
  await engine.remove('m');
  await relin('l1', `0 ${S} linear b 0`);
  await m(`0 ${S} mirror disk 2 dlg 1024 2 le 0 lf 0`);
  await waitSync();
  st('dmstate-log');
  out.set('dmstate-log-copied', String(set().resync.runRegionsCopied));
  await engine.remove('m');
  await engine.close();
  return { statuses: out };
}

/** A dmstate mirror over files that stops with regions 4 and 11 dirty in its disk log (writes in flight). */
async function writeDmstateLog(e: string, f: string, dlog: string): Promise<number[]> {
  const clock = new SimulatedClock();
  const engine = await Engine.open({ db: new MemoryLevel() as unknown as LevelDb, clock });
  await engine.create('m', { table: `0 ${S} mirror disk 2 ${dlog} 1024 2 ${e} 0 ${f} 0` });
  const set = (engine.device('m')!.live!.targets[0].instance as MirrorInstance).set;
  while (set.resync.state !== 'IN_SYNC') await turn();
  // The clean records of the resync are written by the cleaner after 100 ms of (simulated) time.
  clock.advance(1000);
  for (let i = 0; i < 50; i++) await turn();
  const dev = engine.device('m')!;
  // Both in flight at once: a mark's flush writes the clean records pending at that moment, so a second write
  // issued after the first completed would carry the first region's clear with its own mark.
  await Promise.all([dev.write(sectors(4 * REGION + 8), seeded(4, 4096)), dev.write(sectors(11 * REGION + 100), seeded(5, 8192))]);
  // The clock does not move: the two regions' clean records are not written. Keep the log as it is now (a crash
  // here), then shut down cleanly and put it back.
  const crashLog = Buffer.alloc(8 * SECTOR);
  const fd = fs.openSync(dlog, 'r');
  fs.readSync(fd, crashLog, 0, crashLog.length, 0);
  fs.closeSync(fd);
  await engine.close();
  writeAt(dlog, 0, crashLog);
  return dirtyRegions(crashLog);
}

describe('dm-mirror interop with Linux 6.1', () => {
  let skipReason: string | undefined;
  let dir = '';
  let kernel = new Map<string, string>();
  let dmstate: DmstateResult | undefined;
  let names = new Map<string, string>();
  const imgs: Record<string, string> = {};
  let dmstateDirty: number[] = [];

  beforeAll(async () => {
    const status = await ensureKernel();
    if (!status.ok) {
      if (kernelSkipRequested()) {
        skipReason = status.reason;
        console.warn(`mirror-interop: SKIPPED (DMSTATE_SKIP_KERNEL=1): ${status.reason}`);
        return;
      }
      throw new Error(`the kernel VM is unavailable (set DMSTATE_SKIP_KERNEL=1 to skip): ${status.reason}`);
    }
    dir = fs.mkdtempSync('/tmp/dmi-');
    for (const n of ['a', 'b', 'c']) imgs[n] = image(path.join(dir, `${n}.img`), 16 * MiB);
    imgs.log = image(path.join(dir, 'log.img'), MiB);
    imgs.snap = image(path.join(dir, 'snap.img'), MiB);
    const legData = seeded(9, S * SECTOR);
    imgs.e = image(path.join(dir, 'e.img'), 16 * MiB, legData);
    imgs.f = image(path.join(dir, 'f.img'), 16 * MiB, legData);
    imgs.dlog = image(path.join(dir, 'dlog.img'), MiB);
    dmstateDirty = await writeDmstateLog(imgs.e, imgs.f, imgs.dlog);
    // Leg f loses the data in region 4 (dirty: the kernel must repair it) and gets garbage in region 25 (clean: the
    // kernel must leave it, which shows it read the bits rather than resyncing everything).
    writeAt(imgs.f, 4 * REGION * SECTOR + 8 * SECTOR, Buffer.alloc(4096, 0xa5));
    writeAt(imgs.f, 25 * REGION * SECTOR, Buffer.alloc(4096, 0x5a));
    // dmstate's run on copies of e, f, dlog (the kernel gets the originals).
    const copy = (n: string): string => {
      const to = path.join(dir, `ds-${n}.img`);
      fs.copyFileSync(imgs[n], to);
      return to;
    };
    const dsImgs = { e: copy('e'), f: copy('f'), dlog: copy('dlog') };
    const disks = [imgs.a, imgs.b, imgs.c, imgs.log, imgs.snap, imgs.e, imgs.f, imgs.dlog];
    const [k, d] = await Promise.all([runKernelJob(JOB, disks, { timeoutMs: 600_000 }), dmstateParity(dsImgs)]);
    expect(k.rc, k.output).toBe(0);
    kernel = sections(k.output);
    if (process.env.MIRROR_INTEROP_PRINT) console.log(k.output);
    dmstate = d;
    for (const line of (kernel.get('ls') ?? '').split('\n')) {
      const m = /^(\S+)\s+\((\d+), (\d+)\)$/.exec(line.trim()) ?? /^(\S+)\s+\((\d+):(\d+)\)$/.exec(line.trim());
      if (m) names.set(`${m[2]}:${m[3]}`, m[1]);
    }
    names = new Map([...names].sort((x, y) => y[0].length - x[0].length));
  }, 900_000);

  afterAll(() => {
    if (dir && process.env.DMSTATE_KEEP_TMP !== '1') fs.rmSync(dir, { recursive: true, force: true });
    else if (dir) console.log(`mirror-interop: images kept in ${dir}`);
  });

  const named = (text: string): string => text.replace(/\b253:\d+\b/g, (mm) => names.get(mm) ?? mm);

  for (const step of ['core-nosync', 'core-resync', 'three-legs', 'disk-resync', 'disk-after', 'read-rc', 'read-failure', 'write-failure', 'dmstate-log']) {
    test(`status and table: ${step}`, () => {
      if (skipReason) return;
      const k = kernel.get(step);
      expect(k, `kernel output for ${step}`).toBeDefined();
      expect(dmstate!.statuses.get(step)).toBe(named(k!).trim());
    });
  }

  test('the expected kernel lines (health chars, sync counts) are what dmstate prints', () => {
    if (skipReason) return;
    expect(named(kernel.get('read-failure')!)).toContain(' 32/32 1 RA 1 core');
    expect(named(kernel.get('write-failure')!)).toContain(' 31/32 1 AD 1 core');
    expect(named(kernel.get('three-legs')!)).toContain('0 32000 mirror 3 l0 l1 l2 63/63 1 AAA 1 core');
  });

  test('a disk log written by the kernel (mid-write) is read by dmstate: exactly its dirty regions are copied', async () => {
    if (skipReason) return;
    const snap = fs.readFileSync(imgs.snap);
    const midLog = snap.subarray(0, 8 * SECTOR);
    const finalLog = snap.subarray(64 * SECTOR, 72 * SECTOR);
    expect(dirtyRegions(Buffer.from(midLog))).toEqual([5, 9]);
    expect(dirtyRegions(Buffer.from(finalLog))).toEqual([]);
    // The legs the kernel left are identical.
    expect(md5(fs.readFileSync(imgs.a))).toBe(md5(fs.readFileSync(imgs.b)));
    const run = async (log: Buffer, label: string): Promise<{ copied: number; regionsDiffering: number[] }> => {
      const a2 = path.join(dir, `${label}-a.img`);
      const b2 = path.join(dir, `${label}-b.img`);
      const l2 = image(path.join(dir, `${label}-log.img`), MiB, Buffer.from(log));
      fs.copyFileSync(imgs.a, a2);
      fs.copyFileSync(imgs.b, b2);
      writeAt(b2, 5 * REGION * SECTOR + 16 * SECTOR, Buffer.alloc(4096, 0xc3)); // dirty in the mid-write log
      writeAt(b2, 20 * REGION * SECTOR, Buffer.alloc(4096, 0x3c)); // clean: must stay as it is
      const engine = await Engine.open({ db: new MemoryLevel() as unknown as LevelDb });
      await engine.create('m', { table: `0 ${S} mirror disk 2 ${l2} 1024 2 ${a2} 0 ${b2} 0` });
      const set = (engine.device('m')!.live!.targets[0].instance as MirrorInstance).set;
      while (set.resync.state !== 'IN_SYNC') await turn();
      const copied = set.resync.runRegionsCopied;
      await engine.close();
      const regionsDiffering: number[] = [];
      for (let r = 0; r < 32; r++) if (!readRegion(a2, r).equals(readRegion(b2, r))) regionsDiffering.push(r);
      return { copied, regionsDiffering };
    };
    expect(await run(Buffer.from(midLog), 'mid')).toEqual({ copied: 2, regionsDiffering: [20] });
    expect(await run(Buffer.from(finalLog), 'final')).toEqual({ copied: 0, regionsDiffering: [5, 20] });
  });

  test('a disk log written by dmstate is read by the kernel: it repairs the dirty regions only', () => {
    if (skipReason) return;
    expect(dmstateDirty).toEqual([4, 11]);
    for (const r of [4, 11]) expect(md5(readRegion(imgs.e, r)), `region ${r}`).toBe(md5(readRegion(imgs.f, r)));
    expect(md5(readRegion(imgs.e, 25))).not.toBe(md5(readRegion(imgs.f, 25)));
    // dmstate on the same images did the same (two regions copied).
    expect(dmstate!.statuses.get('dmstate-log-copied')).toBe('2');
    // The kernel's log afterwards is all clean (it wrote the dmstate-made log in the same format).
    expect(dirtyRegions(fs.readFileSync(imgs.dlog).subarray(0, 8 * SECTOR))).toEqual([]);
  });
});
