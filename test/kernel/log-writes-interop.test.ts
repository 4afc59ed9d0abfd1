/**
 * dm-log-writes round trip with Linux 6.1, in one VM boot.
 *
 * Phase A (both ways): a seeded workload of O_DIRECT writes (busybox dd from a pattern disk), flushes (fsync),
 * discards (blkdiscard, 4 KiB aligned so the block layer sends each as one bio), marks (most right after a flush,
 * some not) and writes left unflushed at the end, on the kernel's `log-writes /dev/loop0 /dev/vda`. The data
 * device is a loop device over a tmpfs file, so a discard really reads back as zeroes (qemu's default drive
 * ignores discards). At each mark the VM records the md5 of the device (O_DIRECT read).
 *   kernel -> dmstate: `replay-writes` rebuilds the device from the kernel's log at each mark, and gets the
 *     content the VM recorded there (after a flush) or the durable content (a mark before the flush of some
 *     writes: they are not in the log yet); checks at every flush see each flush's durable content.
 *   dmstate -> kernel: the kernel has no replay tool and nothing in it reads a log back, so the proof is the log
 *     itself: dmstate's log-writes target runs the same operations in the same order and its log must be
 *     byte-for-byte the kernel's (super block, entry blocks, data, marks, the end mark; the rest zeroes). A log
 *     identical to the kernel's is read by the kernel's tooling (fstests' replay-log) exactly as the kernel's
 *     own. It is also replayed by `replay-writes` and must give the VM's content at each mark. Status lines are
 *     compared at two points, table lines with devices named by role.
 * Phase B (kernel -> dmstate, FUA): a persistent snapshot with its COW on `log-writes /dev/loop1 /dev/vdb`;
 * each snapshot write makes the kernel log FUA entries and the FLUSH|FUA entries dm splits from PREFLUSH|FUA
 * bios (dmstate has no flush-with-data bios, so this part is not byte-compared). Replaying to each mark gives
 * the COW content the VM recorded; a check at every FUA runs once per FUA entry.
 *
 * Needs the kernel VM (test/kernel/setup.sh; dm-log-writes and loop are among the modules run.sh loads). If the
 * VM cannot be set up the test fails with the reason, unless DMSTATE_SKIP_KERNEL=1. DMSTATE_KEEP_TMP=1 keeps
 * the images (the folder is printed).
 */
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { MemoryLevel } from 'memory-level';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { MemoryBlockDevice } from '../../src/block/memory-device.js';
import { sectors } from '../../src/block/units.js';
import { Engine } from '../../src/core/engine.js';
import type { LevelDb } from '../../src/log/event-log.js';
import { flagsToString, LOG_FLUSH_FLAG, LOG_FUA_FLAG } from '../../src/targets/log-writes/format.js';
import { LogReader, type LogEntry } from '../../src/targets/log-writes/log-reader.js';
import { runReplayWrites } from '../../src/frontends/cli/replay-writes.js';
import { ensureKernel, kernelSkipRequested, runKernelJob } from './kernel-vm.js';

const MiB = 1024 * 1024;
const SECTOR = 512;
const DATA_SECTORS = 8192; // 4 MiB data devices
const LOG_BYTES = 16 * MiB;
const PATTERN_BYTES = 4 * MiB;
const SEED = 0x1097_0001;

type Op =
  | { readonly kind: 'write'; readonly sector: number; readonly sectors: number; readonly patternOffset: number }
  | { readonly kind: 'flush' }
  | { readonly kind: 'discard'; readonly sector: number; readonly sectors: number }
  | { readonly kind: 'mark'; readonly name: string }
  | { readonly kind: 'status'; readonly name: string };

/** mulberry32: the same workload every run. */
function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function makePattern(seed: number): Buffer {
  const r = rng(seed ^ 0x5a5a);
  const b = Buffer.alloc(PATTERN_BYTES);
  for (let i = 0; i < b.length; i += 4) b.writeUInt32LE((r() * 2 ** 32) >>> 0, i);
  return b;
}

/** Phase A: writes, flushes, discards, marks (a few without a flush first), two status points, unflushed writes at the end. */
function makeWorkload(seed: number): Op[] {
  const r = rng(seed);
  const int = (n: number): number => Math.floor(r() * n);
  const ops: Op[] = [];
  let patternAt = 0;
  const write = (): void => {
    // At least 16 sectors: busybox dd's buffer for smaller blocks is not 512-byte aligned, O_DIRECT refuses it and
    // dd falls back to buffered I/O, which reaches the device as page-cache writeback (4 KiB pages, other bios).
    const n = 16 + int(r() < 0.8 ? 32 : 112);
    ops.push({ kind: 'write', sector: int(DATA_SECTORS - n), sectors: n, patternOffset: patternAt });
    patternAt += n * SECTOR;
  };
  let marks = 0;
  for (let i = 0; i < 70; i++) {
    const k = r();
    if (k < 0.55) write();
    else if (k < 0.65) {
      const n = 8 * (1 + int(16));
      ops.push({ kind: 'discard', sector: 8 * int((DATA_SECTORS - n) / 8), sectors: n });
    } else if (k < 0.78) ops.push({ kind: 'flush' });
    else {
      if (r() < 0.75) ops.push({ kind: 'flush' });
      ops.push({ kind: 'mark', name: `m${marks++}` });
      if (marks === 2) ops.push({ kind: 'status', name: 'mid' });
    }
  }
  // A mark with writes still unflushed, then writes that only the table's removal logs.
  write();
  ops.push({ kind: 'mark', name: 'unflushed' });
  write();
  write();
  ops.push({ kind: 'status', name: 'end' });
  if (patternAt > PATTERN_BYTES) throw new Error(`workload needs ${patternAt} bytes of pattern, more than ${PATTERN_BYTES}`);
  return ops;
}

/** What the device holds at each mark: everything written (`full`) and what a flush made durable (`durable`). */
function model(ops: readonly Op[], pattern: Buffer) {
  const full = Buffer.alloc(DATA_SECTORS * SECTOR);
  const durable = Buffer.alloc(DATA_SECTORS * SECTOR);
  let pending: Op[] = [];
  const apply = (img: Buffer, op: Op): void => {
    if (op.kind === 'write') pattern.copy(img, op.sector * SECTOR, op.patternOffset, op.patternOffset + op.sectors * SECTOR);
    else if (op.kind === 'discard') img.fill(0, op.sector * SECTOR, (op.sector + op.sectors) * SECTOR);
  };
  const atMark = new Map<string, { full: string; durable: string }>();
  const atFlush: string[] = [];
  for (const op of ops) {
    if (op.kind === 'write' || op.kind === 'discard') {
      apply(full, op);
      pending.push(op);
    } else if (op.kind === 'flush') {
      for (const p of pending) apply(durable, p);
      pending = [];
      atFlush.push(md5(durable));
    } else if (op.kind === 'mark') atMark.set(op.name, { full: md5(full), durable: md5(durable) });
  }
  return { atMark, atFlush };
}

const md5 = (b: Uint8Array): string => createHash('md5').update(b).digest('hex');

const PHASE_B_WRITES = 6;

function kernelScript(ops: readonly Op[]): string {
  const lines = [
    'echo 1 > /proc/sys/kernel/printk',
    'T=/tmp/lw; mkdir -p $T',
    `truncate -s ${DATA_SECTORS * SECTOR} $T/a.img; truncate -s ${DATA_SECTORS * SECTOR} $T/b.img`,
    'losetup /dev/loop0 $T/a.img && losetup /dev/loop1 $T/b.img || echo "@@@ FAIL losetup"',
    'dmsetup targets | grep -q "^log-writes" || echo "@@@ FAIL the VM kernel has no log-writes target (dm-log-writes.ko not loaded)"',
    `dmsetup create lwa --table "0 ${DATA_SECTORS} log-writes /dev/loop0 /dev/vda" || echo "@@@ FAIL create lwa"`,
    'dmsetup mknodes',
    'echo "@@@ DEVS $(cat /sys/block/loop0/dev) $(cat /sys/block/vda/dev)"',
    'echo "@@@ TABLE $(dmsetup table lwa)"',
    'w() { dd if=/dev/vdc of=/dev/mapper/$1 bs=$2 count=1 skip=$3 seek=$4 iflag=skip_bytes,fullblock oflag=seek_bytes,direct conv=notrunc 2>$T/dd || { echo "@@@ FAIL w $*"; cat $T/dd; }; }',
    'f() { dd if=/dev/zero of=/dev/mapper/$1 bs=512 count=0 conv=notrunc,fsync 2>$T/dd || { echo "@@@ FAIL f $*"; cat $T/dd; }; }',
    'd() { blkdiscard -o $2 -l $3 /dev/mapper/$1 || echo "@@@ FAIL d $*"; }',
    'h() { dd if=/dev/mapper/$1 bs=1M iflag=direct 2>/dev/null | md5sum | cut -d" " -f1; }',
    'm() { dmsetup message $1 0 mark $2 || echo "@@@ FAIL m $*"; echo "@@@ MD5 $2 $(h $1)"; }',
    // The kernel logs from a thread after the bio completes: let it catch up before reading the status.
    's() { sleep 1; echo "@@@ STATUS $2 $(dmsetup status $1)"; }',
  ];
  for (const op of ops) {
    if (op.kind === 'write') lines.push(`w lwa ${op.sectors * SECTOR} ${op.patternOffset} ${op.sector * SECTOR}`);
    else if (op.kind === 'flush') lines.push('f lwa');
    else if (op.kind === 'discard') lines.push(`d lwa ${op.sector * SECTOR} ${op.sectors * SECTOR}`);
    else if (op.kind === 'mark') lines.push(`m lwa ${op.name}`);
    else lines.push(`s lwa ${op.name}`);
  }
  lines.push('dmsetup remove lwa || echo "@@@ FAIL remove lwa"');
  // Phase B: a persistent snapshot whose COW is a log-writes device; each write + fsync, then a mark.
  lines.push(
    `dmsetup create lwb --table "0 ${DATA_SECTORS} log-writes /dev/loop1 /dev/vdb" || echo "@@@ FAIL create lwb"`,
    `dmsetup create snap --table "0 ${DATA_SECTORS} snapshot /dev/vdd /dev/mapper/lwb P 8" || echo "@@@ FAIL create snap"`,
    'dmsetup mknodes',
    // The snapshot's header and first metadata area are plain writes: flush them before the first mark.
    'f lwb',
    'm lwb created',
  );
  for (let i = 0; i < PHASE_B_WRITES; i++) {
    lines.push(
      `dd if=/dev/vdc of=/dev/mapper/snap bs=${4096 * (1 + (i % 3))} count=1 skip=${i * 65536} seek=${i * 40960} iflag=skip_bytes,fullblock oflag=seek_bytes,direct conv=notrunc,fsync 2>$T/dd || echo "@@@ FAIL snapwrite ${i}"`,
      `m lwb b${i}`,
    );
  }
  lines.push('dmsetup remove snap; dmsetup remove lwb || echo "@@@ FAIL remove lwb"', 'losetup -d /dev/loop0; losetup -d /dev/loop1');
  return lines.join('\n') + '\n';
}

interface KernelRun {
  readonly output: string;
  readonly rc: number;
  readonly md5: Map<string, string>;
  readonly status: Map<string, string>;
  readonly table: string;
  readonly devs: readonly string[];
  readonly failures: readonly string[];
}

function parseKernel(output: string, rc: number): KernelRun {
  const md5s = new Map<string, string>();
  const status = new Map<string, string>();
  let table = '';
  let devs: string[] = [];
  const failures: string[] = [];
  for (const l of output.split('\n')) {
    let m: RegExpExecArray | null;
    if ((m = /^@@@ MD5 (\S+) ([0-9a-f]{32})$/.exec(l))) md5s.set(m[1], m[2]);
    else if ((m = /^@@@ STATUS (\S+) (.*)$/.exec(l))) status.set(m[1], m[2].trim());
    else if ((m = /^@@@ TABLE (.*)$/.exec(l))) table = m[1].trim();
    else if ((m = /^@@@ DEVS (.*)$/.exec(l))) devs = m[1].trim().split(/\s+/);
    else if (l.startsWith('@@@ FAIL')) failures.push(l);
  }
  return { output, rc, md5: md5s, status, table, devs, failures };
}

/** The same phase A on dmstate's log-writes target (in process), returning its log and status lines. */
async function runDmstate(ops: readonly Op[], pattern: Buffer): Promise<{ log: Buffer; status: Map<string, string>; table: string }> {
  const data = new MemoryBlockDevice({ sizeSectors: sectors(DATA_SECTORS), name: 'dataA' });
  const logdev = new MemoryBlockDevice({ sizeSectors: sectors(LOG_BYTES / SECTOR), name: 'logA' });
  const engine = await Engine.open({ db: new MemoryLevel() as unknown as LevelDb, backingDevices: { dataA: data, logA: logdev } });
  await engine.create('lwa', { table: `0 ${DATA_SECTORS} log-writes dataA logA` });
  const table = engine.table('lwa')[0];
  const lw = engine.device('lwa')!;
  const status = new Map<string, string>();
  for (const op of ops) {
    if (op.kind === 'write') await lw.write(sectors(op.sector), pattern.subarray(op.patternOffset, op.patternOffset + op.sectors * SECTOR));
    else if (op.kind === 'flush') await lw.flush();
    else if (op.kind === 'discard') await lw.discard(sectors(op.sector), sectors(op.sectors));
    else if (op.kind === 'mark') await engine.message('lwa', 0, ['mark', op.name]);
    else status.set(op.name, engine.status('lwa')[0]);
  }
  await engine.remove('lwa');
  const log = logdev.snapshotBytes();
  await engine.close();
  return { log, status, table };
}

function entriesOf(file: string): LogEntry[] {
  const r = LogReader.open(file);
  try {
    return [...r.entries()];
  } finally {
    r.close();
  }
}

const quiet = () => {
  const out = { stdout: '', stderr: '' };
  return { out, io: { stdout: { write: (s: string) => (out.stdout += s) }, stderr: { write: (s: string) => (out.stderr += s) }, env: process.env } };
};

/** Replays `log` onto a fresh zeroed device up to `mark`; returns the device's md5. */
async function replayTo(dir: string, log: string, mark: string, extra: string[] = []): Promise<string> {
  const dev = path.join(dir, `replay-${path.basename(log)}-${mark}.img`);
  fs.writeFileSync(dev, Buffer.alloc(DATA_SECTORS * SECTOR));
  const q = quiet();
  const code = await runReplayWrites([log, '--to-device', dev, '--end-mark', mark, ...extra], q.io);
  if (code !== 0) throw new Error(`replay-writes to ${mark} exited ${code}: ${q.out.stderr}`);
  const sum = md5(fs.readFileSync(dev));
  fs.rmSync(dev);
  return sum;
}

/** The first entry where two logs differ, for a readable failure. */
function firstDifference(a: Buffer, b: Buffer, entries: readonly LogEntry[]): string {
  let i = 0;
  while (i < a.length && i < b.length && a[i] === b[i]) i++;
  if (i === a.length && i === b.length) return 'identical';
  const e = [...entries].reverse().find((x) => x.logOffsetBytes <= i);
  return `first difference at byte ${i} (log block ${Math.floor(i / SECTOR)})${
    e ? `, in entry ${e.index} (${flagsToString(e.flags)} sector ${e.sector} +${e.nrSectors})` : ' (super block)'
  }`;
}

describe('dm-log-writes round trip with the Linux 6.1 kernel', () => {
  let skipReason: string | undefined;
  let dir: string;
  let kernel: KernelRun;
  let dm: Awaited<ReturnType<typeof runDmstate>>;
  let kLogA: string;
  let kLogB: string;
  let dLogA: string;
  const ops = makeWorkload(SEED);
  const pattern = makePattern(SEED);
  const expected = model(ops, pattern);
  const marks = ops.filter((o): o is Extract<Op, { kind: 'mark' }> => o.kind === 'mark').map((o) => o.name);

  beforeAll(async () => {
    const status = await ensureKernel();
    if (!status.ok) {
      if (kernelSkipRequested()) {
        skipReason = status.reason;
        console.warn(`log-writes-interop: SKIPPED (DMSTATE_SKIP_KERNEL=1): ${status.reason}`);
        return;
      }
      throw new Error(`the kernel VM is unavailable (set DMSTATE_SKIP_KERNEL=1 to skip): ${status.reason}`);
    }
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'dmstate-lwi-'));
    kLogA = path.join(dir, 'k-log-a.img');
    kLogB = path.join(dir, 'k-log-b.img');
    dLogA = path.join(dir, 'd-log-a.img');
    const patternImg = path.join(dir, 'pattern.img');
    const snapOrigin = path.join(dir, 'snap-origin.img');
    fs.writeFileSync(kLogA, Buffer.alloc(0));
    fs.truncateSync(kLogA, LOG_BYTES);
    fs.writeFileSync(kLogB, Buffer.alloc(0));
    fs.truncateSync(kLogB, LOG_BYTES);
    fs.writeFileSync(patternImg, pattern);
    fs.writeFileSync(snapOrigin, pattern.subarray(0, DATA_SECTORS * SECTOR));
    const [k, d] = await Promise.all([
      runKernelJob(kernelScript(ops), [kLogA, kLogB, patternImg, snapOrigin], { timeoutMs: 400_000 }),
      runDmstate(ops, pattern),
    ]);
    kernel = parseKernel(k.output, k.rc);
    dm = d;
    fs.writeFileSync(dLogA, dm.log);
  });

  afterAll(() => {
    if (!dir) return;
    if (process.env.DMSTATE_KEEP_TMP === '1') console.warn(`log-writes-interop: images kept in ${dir}`);
    else fs.rmSync(dir, { recursive: true, force: true });
  });

  test('the VM ran every step, and its device held the model content at each mark (the test itself is right)', (ctx) => {
    if (skipReason !== undefined) ctx.skip();
    expect(kernel.failures, kernel.output).toEqual([]);
    expect(kernel.rc).toBe(0);
    for (const m of marks) expect(kernel.md5.get(m), `mark ${m}`).toBe(expected.atMark.get(m)!.full);
    // The workload has marks where some writes were not flushed yet (else the durable/full distinction is untested).
    expect(marks.some((m) => expected.atMark.get(m)!.full !== expected.atMark.get(m)!.durable)).toBe(true);
  });

  test('kernel -> dmstate: replay-writes rebuilds the kernel-logged device at every mark', async (ctx) => {
    if (skipReason !== undefined) ctx.skip();
    const kEntries = entriesOf(kLogA);
    expect(kEntries.filter((e) => e.markName !== undefined).map((e) => e.markName)).toEqual([...marks, 'dm-log-writes-end']);
    for (const m of marks) {
      const got = await replayTo(dir, kLogA, m);
      expect(got, `mark ${m}: the durable content`).toBe(expected.atMark.get(m)!.durable);
      // After a flush, that is what the VM read at the mark.
      if (expected.atMark.get(m)!.durable === expected.atMark.get(m)!.full) expect(got, `mark ${m}`).toBe(kernel.md5.get(m));
    }
  });

  test('kernel -> dmstate: a check at every flush sees the durable content of each flush', async (ctx) => {
    if (skipReason !== undefined) ctx.skip();
    const sums = path.join(dir, 'flush-sums.txt');
    const dev = path.join(dir, 'check.img');
    fs.writeFileSync(dev, Buffer.alloc(DATA_SECTORS * SECTOR));
    const q = quiet();
    const code = await runReplayWrites([kLogA, '--to-device', dev, '--check', `md5sum "$DMSTATE_REPLAY_DEVICE" | cut -d' ' -f1 >> ${sums}`, '--every', 'flush'], q.io);
    expect(code, q.out.stderr).toBe(0);
    expect(fs.readFileSync(sums, 'utf8').trim().split('\n')).toEqual(expected.atFlush);
  });

  test('dmstate -> kernel: the same workload on dmstate gives a log byte-identical to the kernel\'s', (ctx) => {
    if (skipReason !== undefined) ctx.skip();
    const k = fs.readFileSync(kLogA);
    expect(dm.log.length).toBe(k.length);
    const same = dm.log.equals(k);
    expect(same ? 'identical' : firstDifference(dm.log, k, entriesOf(kLogA))).toBe('identical');
  });

  test('dmstate -> kernel: status lines equal at the same points; table lines equal by role', (ctx) => {
    if (skipReason !== undefined) ctx.skip();
    for (const point of ['mid', 'end']) expect(dm.status.get(point), point).toBe(kernel.status.get(point));
    const [loopDev, logDev] = kernel.devs;
    expect(kernel.table.replace(loopDev, '<data>').replace(logDev, '<log>')).toBe(dm.table.replace('dataA', '<data>').replace('logA', '<log>'));
  });

  test('dmstate\'s own log rebuilds the VM\'s content at every mark', async (ctx) => {
    if (skipReason !== undefined) ctx.skip();
    for (const m of marks) expect(await replayTo(dir, dLogA, m), `mark ${m}`).toBe(expected.atMark.get(m)!.durable);
  });

  test('kernel -> dmstate with FUA: a snapshot COW on log-writes is rebuilt at every mark; checks run at each FUA', async (ctx) => {
    if (skipReason !== undefined) ctx.skip();
    const entries = entriesOf(kLogB);
    // The kernel's forms: FUA writes, and FLUSH|FUA entries (the empty flush dm splits from a PREFLUSH|FUA bio).
    const fua = entries.filter((e) => (e.flags & LOG_FUA_FLAG) !== 0);
    expect(fua.some((e) => (e.flags & LOG_FLUSH_FLAG) === 0 && e.nrSectors > 0)).toBe(true);
    expect(fua.some((e) => (e.flags & LOG_FLUSH_FLAG) !== 0)).toBe(true);
    const bMarks = ['created', ...Array.from({ length: PHASE_B_WRITES }, (_, i) => `b${i}`)];
    for (const m of bMarks) {
      expect(kernel.md5.get(m), `VM md5 at ${m}`).toMatch(/^[0-9a-f]{32}$/);
      expect(await replayTo(dir, kLogB, m), `mark ${m}`).toBe(kernel.md5.get(m));
    }
    const count = path.join(dir, 'fua-count.txt');
    const dev = path.join(dir, 'fua.img');
    fs.writeFileSync(dev, Buffer.alloc(DATA_SECTORS * SECTOR));
    const q = quiet();
    expect(await runReplayWrites([kLogB, '--to-device', dev, '--check', `echo $DMSTATE_REPLAY_ENTRY >> ${count}`, '--every', 'fua'], q.io), q.out.stderr).toBe(0);
    expect(fs.readFileSync(count, 'utf8').trim().split('\n').map(Number)).toEqual(fua.map((e) => e.index));
  });
});
