/**
 * md write-intent bitmap files between dmstate and Linux 6.1's md (raid1 with an external bitmap file) and
 * Debian's mdadm 4.2, in one VM boot.
 *
 * In the VM: the bitmap file must be on a filesystem md can bmap (not the initramfs), so the job loads the FAT
 * modules from a tar disk and mounts an msdos filesystem. Then:
 *   1. `mdadm --create --level=1 --assume-clean --bitmap=/mnt/bm --bitmap-chunk=64 --delay=3` on vda + vdb: the
 *      file as mdadm made it (every bit set, events 0) — snapshot 0;
 *   2. once the kernel's daemon has cleared every bit — snapshot 1;
 *   3. vdb failed and removed, three 4 KiB writes (chunks 0, 16, 250) while degraded, the array stopped with
 *      those bits dirty — snapshot 2; the failed leg's event count from its superblock;
 *   4. the array assembled from vda alone and vdb re-added (`mdadm --re-add` succeeds only when the bitmap can
 *      recover it);
 *   5. the bitmap file dmstate's md-bitmap log wrote (vdf) given to `mdadm --assemble --bitmap=`: the kernel
 *      loads it — snapshot 3.
 * Each snapshot is copied to vdd with the VM's `mdadm -X` output. On the host, dmstate must print the same
 * `mdadm -X` text, find the same dirty chunks, events and events cleared, decide what the re-added leg needs as
 * the kernel did, and resync exactly the dirty chunks when its md-bitmap log opens the kernel's file.
 *
 * Needs the kernel VM (test/kernel/setup.sh). If it cannot be set up the test fails with the reason, unless
 * DMSTATE_SKIP_KERNEL=1. DMSTATE_KEEP_TMP=1 keeps the images (the folder is printed).
 */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { FileBlockDevice } from '../../src/block/file-device.js';
import { sectors } from '../../src/block/units.js';
import { SimulatedClock } from '../../src/core/clock.js';
import { examineMdBitmap } from '../../src/dirty-logs/md-bitmap/examine.js';
import { mdBitmapLog } from '../../src/dirty-logs/md-bitmap/md-bitmap-log.js';
import { mdBitmapReaddDecision } from '../../src/dirty-logs/md-bitmap/readd.js';
import { decodeMdBitmapSuperblock, formatMdBitmapUuid, mdBitmapChunkCount } from '../../src/dirty-logs/md-bitmap/superblock.js';
import { runBitmap } from '../../src/frontends/cli/bitmap.js';
import { ensureKernel, kernelSkipRequested, runKernelJob } from './kernel-vm.js';

const MiB = 1024 * 1024;
const UUID = '00112233:44556677:8899aabb:ccddeeff';
/** The array's size as md reports it for two 64 MiB legs with 1.2 metadata (sync_size of the bitmap). */
const SYNC_SECTORS = 129024;
const CHUNK_SECTORS = 128; // --bitmap-chunk=64 (KiB)
const SNAPSHOT_SLOT_BYTES = 65536;
/**
 * mdadm --delay for the array: long enough that snapshot 0, taken right after the create, sees the bitmap before
 * the kernel's daemon can clear anything (that takes two periods), short enough to wait for it.
 */
const CREATE_DELAY_SECONDS = 3;
/** 4 KiB blocks the VM writes while degraded, and the 64 KiB chunks they fall in. */
const DEGRADED_WRITE_BLOCKS = [0, 256, 4000];
const DEGRADED_CHUNKS = DEGRADED_WRITE_BLOCKS.map((b) => Math.floor((b * 4096) / (CHUNK_SECTORS * 512)));
/** Regions dmstate's log leaves dirty in the file it hands to the kernel. */
const DMSTATE_DIRTY_REGIONS = [3, 700];
const MODULES = ['fs/fat/fat.ko', 'fs/fat/msdos.ko', 'fs/nls/nls_cp437.ko'];

function kernelScript(dmstateFileBytes: number): string {
  return [
    'T=/tmp/m; mkdir -p $T; cd $T && tar -xf /dev/vde || echo "@@@ FAIL untar"',
    'for m in fat msdos nls_cp437; do insmod $T/$m.ko || echo "@@@ FAIL insmod $m"; done',
    'mkdosfs /dev/vdc >/dev/null && mkdir -p /mnt && mount -t msdos /dev/vdc /mnt || echo "@@@ FAIL mount"',
    // md writes the file's blocks directly (bmap), past the page cache: drop it, then freeze a copy on the same
    // filesystem (mdadm -X reads with O_DIRECT, which FAT supports) so that mdadm and the host see the same bytes.
    `snap() { sync; echo 3 > /proc/sys/vm/drop_caches; cp $2 /mnt/s$1; echo "@@@ SNAP $1 $(wc -c < /mnt/s$1)"; dd if=/mnt/s$1 of=/dev/vdd bs=${SNAPSHOT_SLOT_BYTES} seek=$1 conv=notrunc,fsync 2>/dev/null || echo "@@@ FAIL snap $1"; echo "@@@ X $1 BEGIN"; mdadm -X /mnt/s$1; echo "@@@ X $1 END rc=$?"; }`,
    `mdadm --create /dev/md0 --run --level=1 --raid-devices=2 --assume-clean --uuid=${UUID} --bitmap=/mnt/bm --bitmap-chunk=64 --delay=${CREATE_DELAY_SECONDS} /dev/vda /dev/vdb >/dev/null 2>&1 || echo "@@@ FAIL create"`,
    'snap 0 /mnt/bm',
    "for i in $(seq 1 120); do mdadm -X /mnt/bm | grep -q ' 0 dirty' && break; sleep 1; done",
    'snap 1 /mnt/bm',
    'mdadm /dev/md0 --fail /dev/vdb --remove /dev/vdb >/dev/null 2>&1 || echo "@@@ FAIL fail-remove"',
    `for b in ${DEGRADED_WRITE_BLOCKS.join(' ')}; do dd if=/dev/urandom of=/dev/md0 bs=4096 count=1 seek=$b conv=notrunc,fsync 2>/dev/null || echo "@@@ FAIL dd $b"; done`,
    // Several daemon periods: degraded, nothing may be cleared.
    `sleep ${3 * CREATE_DELAY_SECONDS}`,
    'echo "@@@ LEG $(mdadm --examine /dev/vdb | grep Events)"',
    'echo "@@@ ARRAY $(mdadm --examine /dev/vda | grep Events)"',
    'mdadm --stop /dev/md0 >/dev/null 2>&1 || echo "@@@ FAIL stop"',
    'snap 2 /mnt/bm',
    'mdadm --assemble /dev/md0 --run --bitmap=/mnt/bm /dev/vda >/dev/null 2>&1 || echo "@@@ FAIL assemble"',
    'echo "@@@ READD $(mdadm /dev/md0 --re-add /dev/vdb 2>&1 | tr \'\\n\' \' \') rc=$?"',
    'for i in $(seq 1 60); do grep -q recovery /proc/mdstat || break; sleep 1; done',
    "sed 's/^/@@@ MDSTAT1 /' /proc/mdstat",
    'mdadm --stop /dev/md0 >/dev/null 2>&1 || echo "@@@ FAIL stop2"',
    `dd if=/dev/vdf of=/mnt/dm.bm bs=${dmstateFileBytes} count=1 2>/dev/null || echo "@@@ FAIL copy-in"`,
    'echo "@@@ ASSEMBLE_DM $(mdadm --assemble /dev/md0 --run --bitmap=/mnt/dm.bm /dev/vda /dev/vdb 2>&1 | tr \'\\n\' \' \') rc=$?"',
    "sed 's/^/@@@ MDSTAT2 /' /proc/mdstat",
    "for i in $(seq 1 120); do grep -qE 'resync|recovery' /proc/mdstat || break; sleep 1; done",
    "for i in $(seq 1 60); do mdadm -X /mnt/dm.bm | grep -q ' 0 dirty' && break; sleep 1; done",
    'snap 3 /mnt/dm.bm',
    'mdadm --stop /dev/md0 >/dev/null 2>&1 || echo "@@@ FAIL stop3"',
    "dmesg | grep -E 'md0|bitmap' | sed 's/^/@@@ DMESG /'",
    'umount /mnt',
  ].join('\n');
}

interface Snapshot {
  readonly bytes: Buffer;
  readonly mdadmX: string;
  readonly mdadmRc: number;
}

interface KernelRun {
  readonly output: string;
  readonly failures: string[];
  readonly snapshots: Map<number, Snapshot>;
  readonly legEvents: bigint;
  readonly arrayEvents: bigint;
  readonly readd: string;
  readonly assembleDm: string;
  readonly mdstat2: string;
  readonly dmesg: string;
}

function parseKernel(output: string, outDisk: Buffer): KernelRun {
  const lines = output.split('\n');
  const snapshots = new Map<number, Snapshot>();
  const sizes = new Map<number, number>();
  const failures: string[] = [];
  let legEvents = -1n;
  let arrayEvents = -1n;
  let readd = '';
  let assembleDm = '';
  const mdstat2: string[] = [];
  const dmesg: string[] = [];
  for (let i = 0; i < lines.length; i++) {
    const l = lines[i];
    let m: RegExpExecArray | null;
    if (l.startsWith('@@@ FAIL')) failures.push(l);
    else if ((m = /^@@@ SNAP (\d+) (\d+)$/.exec(l))) sizes.set(Number(m[1]), Number(m[2]));
    else if ((m = /^@@@ X (\d+) BEGIN$/.exec(l))) {
      const slot = Number(m[1]);
      const body: string[] = [];
      let rc = -1;
      for (i++; i < lines.length; i++) {
        const end = /^@@@ X (\d+) END rc=(\d+)$/.exec(lines[i]);
        if (end) {
          rc = Number(end[2]);
          break;
        }
        body.push(lines[i]);
      }
      const size = sizes.get(slot) ?? 0;
      const at = slot * SNAPSHOT_SLOT_BYTES;
      snapshots.set(slot, { bytes: outDisk.subarray(at, at + size), mdadmX: body.join('\n') + '\n', mdadmRc: rc });
    } else if ((m = /^@@@ LEG\s+Events : (\d+)$/.exec(l))) legEvents = BigInt(m[1]);
    else if ((m = /^@@@ ARRAY\s+Events : (\d+)$/.exec(l))) arrayEvents = BigInt(m[1]);
    else if (l.startsWith('@@@ READD ')) readd = l.slice('@@@ READD '.length);
    else if (l.startsWith('@@@ ASSEMBLE_DM ')) assembleDm = l.slice('@@@ ASSEMBLE_DM '.length);
    else if (l.startsWith('@@@ MDSTAT2 ')) mdstat2.push(l.slice('@@@ MDSTAT2 '.length));
    else if (l.startsWith('@@@ DMESG ')) dmesg.push(l.slice('@@@ DMESG '.length));
  }
  return { output, failures, snapshots, legEvents, arrayEvents, readd, assembleDm, mdstat2: mdstat2.join('\n'), dmesg: dmesg.join('\n') };
}

function dirtyChunks(file: Uint8Array): number[] {
  const sb = decodeMdBitmapSuperblock(file);
  const n = Number(mdBitmapChunkCount(sb.syncSizeSectors, sb.chunkSizeBytes));
  const out: number[] = [];
  for (let c = 0; c < n; c++) if (file[256 + (c >> 3)] & (1 << (c & 7))) out.push(c);
  return out;
}

/** A file holding `bytes`, padded to whole sectors (what a FileBlockDevice opens; md ignores what follows the bits). */
function padToSector(file: string, bytes: Uint8Array): void {
  const b = Buffer.alloc(Math.ceil(bytes.byteLength / 512) * 512);
  b.set(bytes);
  fs.writeFileSync(file, b);
}

async function silentBitmapCli(args: string[]): Promise<number> {
  return runBitmap(args, { stdout: { write: () => true }, stderr: { write: (t: string) => process.stderr.write(t) } });
}

/** dmstate's md-bitmap log writes the file the kernel will load: created like mdadm's, opened nosync, two regions dirty. */
async function writeDmstateBitmap(file: string): Promise<void> {
  expect(await silentBitmapCli(['create', file, '--sync-size', String(SYNC_SECTORS), '--chunk', '64', '--delay', '1', '--uuid', UUID])).toBe(0);
  const device = await FileBlockDevice.open(file);
  const log = await mdBitmapLog.create({
    targetSizeSectors: sectors(SYNC_SECTORS),
    regionSizeSectors: sectors(CHUNK_SECTORS),
    initialSync: 'nosync',
    clock: new SimulatedClock(),
    logDevice: device,
    logDeviceLabel: file,
    extra: { daemonSleepSeconds: '1', offsetSectors: '0' },
  });
  await mdBitmapLog.resume!(log);
  for (const r of DMSTATE_DIRTY_REGIONS) mdBitmapLog.markRegion(log, r);
  await mdBitmapLog.flush(log);
  await mdBitmapLog.suspend!(log);
  await mdBitmapLog.close(log);
  await device.close();
}

function kvmModulesDir(): string {
  const x = path.join(process.env.DMSTATE_KVM_DIR ?? path.join(os.homedir(), '.cache', 'dmstate-kernel-vm'), 'x', 'lib', 'modules');
  const versions = fs.readdirSync(x);
  if (versions.length === 0) throw new Error(`no kernel modules in ${x}`);
  return path.join(x, versions[0], 'kernel');
}

describe('md bitmap files with Linux md and mdadm (one VM boot)', () => {
  let dir = '';
  let skipReason: string | undefined;
  let kernel: KernelRun;
  let dmstateFile: Buffer;

  beforeAll(async () => {
    const status = await ensureKernel();
    if (!status.ok) {
      if (kernelSkipRequested()) {
        skipReason = status.reason;
        console.warn(`md-bitmap-interop: SKIPPED (DMSTATE_SKIP_KERNEL=1): ${status.reason}`);
        return;
      }
      throw new Error(`the kernel VM is unavailable (set DMSTATE_SKIP_KERNEL=1 to skip): ${status.reason}`);
    }
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'dmstate-mdbi-'));
    const disks = ['a.img', 'b.img', 'fs.img', 'out.img', 'mods.tar', 'in.img'].map((f) => path.join(dir, f));
    const [legA, legB, fsImg, out, mods, inImg] = disks;
    for (const [f, bytes] of [[legA, 64 * MiB], [legB, 64 * MiB], [fsImg, 32 * MiB], [out, 1 * MiB]] as const) {
      fs.writeFileSync(f, Buffer.alloc(0));
      fs.truncateSync(f, bytes);
    }
    const modDir = kvmModulesDir();
    const staged = path.join(dir, 'mods');
    fs.mkdirSync(staged);
    for (const m of MODULES) fs.copyFileSync(path.join(modDir, m), path.join(staged, path.basename(m)));
    const tar = spawnSync('tar', ['-cf', mods, '-C', staged, ...MODULES.map((m) => path.basename(m))], { encoding: 'utf8' });
    if (tar.status !== 0) throw new Error(`tar failed: ${tar.stderr}`);
    fs.truncateSync(mods, Math.ceil(fs.statSync(mods).size / 512) * 512);
    const dmFile = path.join(dir, 'dm.bm');
    await writeDmstateBitmap(dmFile);
    dmstateFile = fs.readFileSync(dmFile);
    fs.copyFileSync(dmFile, inImg);
    fs.truncateSync(inImg, 64 * 1024);
    const r = await runKernelJob(kernelScript(dmstateFile.byteLength), disks, { timeoutMs: 300_000 });
    kernel = parseKernel(r.output, fs.readFileSync(out));
    if (r.rc !== 0) kernel.failures.push(`job rc=${r.rc}`);
  });

  afterAll(() => {
    if (!dir) return;
    if (process.env.DMSTATE_KEEP_TMP === '1') console.warn(`md-bitmap-interop: images kept in ${dir}`);
    else fs.rmSync(dir, { recursive: true, force: true });
  });

  test('the VM ran every step and took four snapshots', (ctx) => {
    if (skipReason !== undefined) ctx.skip();
    expect(kernel.failures, kernel.output).toEqual([]);
    expect([...kernel.snapshots.keys()].sort()).toEqual([0, 1, 2, 3]);
    for (const s of kernel.snapshots.values()) expect(s.mdadmRc).toBe(0);
  });

  test('dmstate reads the bitmap mdadm created: same mdadm -X text, every bit dirty, events 0', (ctx) => {
    if (skipReason !== undefined) ctx.skip();
    const s = kernel.snapshots.get(0)!;
    expect(s.bytes.byteLength).toBe(256 + 126);
    expect(examineMdBitmap(s.bytes, '/mnt/s0')).toMatchObject({ stdout: s.mdadmX, exitCode: 0 });
    const sb = decodeMdBitmapSuperblock(s.bytes);
    expect(sb).toMatchObject({ version: 4, events: 0n, eventsCleared: 0n, syncSizeSectors: BigInt(SYNC_SECTORS), chunkSizeBytes: CHUNK_SECTORS * 512, daemonSleepSeconds: CREATE_DELAY_SECONDS });
    expect(formatMdBitmapUuid(sb.uuid)).toBe(UUID);
    expect(dirtyChunks(s.bytes)).toHaveLength(1008);
  });

  test('after the kernel daemon cleared it: no dirty bit, same text', (ctx) => {
    if (skipReason !== undefined) ctx.skip();
    const s = kernel.snapshots.get(1)!;
    expect(examineMdBitmap(s.bytes, '/mnt/s1').stdout).toBe(s.mdadmX);
    expect(dirtyChunks(s.bytes)).toEqual([]);
  });

  test('stopped while degraded: dmstate finds exactly the chunks written, the events, and decides bitmap recovery as the kernel did', (ctx) => {
    if (skipReason !== undefined) ctx.skip();
    const s = kernel.snapshots.get(2)!;
    expect(examineMdBitmap(s.bytes, '/mnt/s2').stdout).toBe(s.mdadmX);
    expect(dirtyChunks(s.bytes)).toEqual(DEGRADED_CHUNKS);
    const sb = decodeMdBitmapSuperblock(s.bytes);
    // No bit was cleared while degraded, so events_cleared did not move.
    expect(sb.events).toBe(kernel.arrayEvents);
    expect(sb.eventsCleared).toBe(0n);
    expect(kernel.legEvents).toBeGreaterThanOrEqual(0n);
    expect(mdBitmapReaddDecision(kernel.legEvents, sb)).toBe('bitmap-recovery');
    // The kernel agreed: mdadm --re-add only succeeds when the bitmap can recover the leg.
    expect(kernel.readd).toMatch(/re-added \/dev\/vdb.*rc=0$/);
  });

  test("dmstate's md-bitmap log opens the kernel's file and resyncs exactly the dirty chunks", async (ctx) => {
    if (skipReason !== undefined) ctx.skip();
    const file = path.join(dir, 'kernel-degraded.bm');
    padToSector(file, kernel.snapshots.get(2)!.bytes);
    const device = await FileBlockDevice.open(file);
    const clock = new SimulatedClock();
    const log = await mdBitmapLog.create({
      targetSizeSectors: sectors(SYNC_SECTORS),
      regionSizeSectors: sectors(CHUNK_SECTORS),
      initialSync: 'resync',
      clock,
      logDevice: device,
      logDeviceLabel: file,
      extra: { daemonSleepSeconds: '1', offsetSectors: '0' },
    });
    try {
      await mdBitmapLog.resume!(log);
      expect(log.bitmap.events).toBe(kernel.arrayEvents + 1n);
      const work: number[] = [];
      for (let r = mdBitmapLog.getResyncWork(log); r !== undefined; r = mdBitmapLog.getResyncWork(log)) work.push(r);
      expect(work).toEqual(DEGRADED_CHUNKS);
      for (const r of work) mdBitmapLog.setRegionSync(log, r, true);
      expect(mdBitmapLog.syncCount(log)).toBe(1008);
      await mdBitmapLog.suspend!(log);
      expect(dirtyChunks(fs.readFileSync(file))).toEqual([]);
    } finally {
      await mdBitmapLog.close(log);
      await device.close();
    }
  });

  test('the kernel loads the bitmap file dmstate wrote (UUID, chunk, sync size accepted; events read)', (ctx) => {
    if (skipReason !== undefined) ctx.skip();
    // What dmstate handed over: events 1, two dirty regions.
    expect(decodeMdBitmapSuperblock(dmstateFile)).toMatchObject({ events: 1n, eventsCleared: 0n });
    expect(dirtyChunks(dmstateFile)).toEqual(DMSTATE_DIRTY_REGIONS);
    expect(kernel.assembleDm).toMatch(/started with 2 drives.*rc=0$/);
    expect(kernel.mdstat2).toMatch(/bitmap: .*64KB chunk, file: \/mnt\/dm\.bm/);
    // md compared our events field with the array's and chose a full recovery, as it must for an older bitmap.
    expect(kernel.dmesg).toMatch(/bitmap file is out of date \(1 < \d+\) -- forcing full recovery/);
    const s = kernel.snapshots.get(3)!;
    expect(examineMdBitmap(s.bytes, '/mnt/s3').stdout).toBe(s.mdadmX);
    const sb = decodeMdBitmapSuperblock(s.bytes);
    expect(sb.events).toBeGreaterThan(kernel.arrayEvents);
    expect(formatMdBitmapUuid(sb.uuid)).toBe(UUID);
    expect(dirtyChunks(s.bytes)).toEqual([]);
    // The kernel kept dmstate's padding (it writes only the bytes the bitmap needs).
    expect(s.bytes.byteLength).toBe(dmstateFile.byteLength);
  });
});
