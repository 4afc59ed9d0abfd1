/**
 * Real NBD clients against a real daemon: `dmstate serve --pool DIR --listen 127.0.0.1:0` (the CLI, which runs
 * the build in dist/), devices made with `dmstate dmsetup` over files, then qemu-io, qemu-img, nbdcopy, nbdinfo
 * and fio over the unix socket and TCP. Every data check is also shown to fail when the data is wrong (a wrong
 * pattern, a changed byte in the reference, a corrupted block under fio's verify), so a pass means something.
 * The tools come from test/install-tools.sh (run by test/global-setup.ts); without them these tests fail.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { run as runWithTimeout, show as showRun, type RunResult } from '../helpers/process.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const CLI = path.join(ROOT, 'bin/dmstate.js');
const TOOLS = ['qemu-io', 'qemu-img', 'nbdinfo', 'nbdcopy', 'fio'];
const MiB = 1024 * 1024;
const LIN_BYTES = 64 * MiB;

const run = (cmd: string, args: readonly string[], timeoutMs = 30_000): Promise<RunResult> => runWithTimeout(cmd, args, timeoutMs);
const show = (r: RunResult): string => showRun(r, 3000);

/** A small seeded PRNG (mulberry32): the same workload every run. */
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

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

let dir: string;
let pool: string;
let sock: string;
let tcpPort: number;
let daemon: ChildProcess;
let daemonStderr = '';
let daemonExit: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
let aRaw: string; // 64 MiB behind 'lin'
let bRaw: string; // 4 MiB of seeded data behind the first half of 'lz'
let cRaw: string; // 1 MiB of 0x5a behind 'ro'

const unixUri = (name: string): string => `nbd+unix:///${name}?socket=${sock}`;
const tcpUri = (name: string): string => `nbd://127.0.0.1:${tcpPort}/${name}`;
const dmsetup = (...args: string[]): Promise<RunResult> => run(process.execPath, [CLI, 'dmsetup', '--pool', pool, ...args]);
const qemuIo = (uri: string, cmds: readonly string[], extra: readonly string[] = []): Promise<RunResult> =>
  run('qemu-io', ['-f', 'raw', ...extra, uri, ...cmds.flatMap((c) => ['-c', c])]);

interface NbdInfoExport {
  'export-name': string;
  'export-size': number;
  contexts: string[];
  is_read_only: boolean;
  can_flush: boolean;
  can_fua: boolean;
  can_trim: boolean;
  can_zero: boolean;
  can_multi_conn: boolean;
  block_size_minimum: number;
  block_size_preferred: number;
  block_size_maximum: number;
}

async function nbdinfoJson(args: readonly string[]): Promise<{ exports: NbdInfoExport[] }> {
  const r = await run('nbdinfo', ['--json', ...args]);
  expect(r.code, show(r)).toBe(0);
  return JSON.parse(r.stdout) as { exports: NbdInfoExport[] };
}

const listNames = async (): Promise<string[]> => (await nbdinfoJson(['--list', `nbd+unix://?socket=${sock}`])).exports.map((e) => e['export-name']).sort();

beforeAll(async () => {
  const missing = TOOLS.filter((t) => spawnSync('sh', ['-c', `command -v ${t}`]).status !== 0);
  if (missing.length > 0) {
    throw new Error(`NBD client tests need ${missing.join(', ')}: ${process.env.DMSTATE_TOOLS_MISSING ?? 'run test/install-tools.sh as root'}`);
  }
  if (!fs.existsSync(path.join(ROOT, 'dist/src/frontends/cli/main.js'))) throw new Error('dist/ is missing: run `npm run build` first');
  // Short: unix socket paths are limited to 107 bytes.
  dir = fs.mkdtempSync('/tmp/dmn-');
  pool = path.join(dir, 'pool');
  sock = path.join(pool, 'nbd.sock');
  aRaw = path.join(dir, 'a.raw');
  bRaw = path.join(dir, 'b.raw');
  cRaw = path.join(dir, 'c.raw');
  fs.writeFileSync(aRaw, '');
  fs.truncateSync(aRaw, LIN_BYTES);
  const b = Buffer.alloc(4 * MiB);
  const r = rng(7);
  for (let i = 0; i < b.length; i += 4) b.writeUInt32LE(Math.floor(r() * 2 ** 32), i);
  fs.writeFileSync(bRaw, b);
  fs.writeFileSync(cRaw, Buffer.alloc(MiB, 0x5a));

  daemon = spawn(process.execPath, [CLI, 'serve', '--pool', pool, '--listen', '127.0.0.1:0'], { stdio: ['ignore', 'ignore', 'pipe'] });
  daemonExit = new Promise((resolve) => daemon.on('exit', (code, signal) => resolve({ code, signal })));
  daemon.stderr!.setEncoding('utf8').on('data', (c: string) => (daemonStderr += c));
  const until = performance.now() + 15_000;
  let m: RegExpExecArray | null = null;
  while (!(m = /nbd:\/\/127\.0\.0\.1:(\d+)\/NAME/.exec(daemonStderr)) && daemon.exitCode === null && performance.now() < until) await sleep(20);
  if (!m) throw new Error(`dmstate serve did not start: ${daemonStderr}`);
  tcpPort = Number(m[1]);
  expect(tcpPort).toBeGreaterThan(0);
  expect(daemonStderr).toContain(`nbd+unix:///NAME?socket=${sock}`);

  for (const args of [
    ['create', 'lin', '--table', `0 ${LIN_BYTES / 512} linear ${aRaw} 0`],
    ['create', 'lz', '--table', `0 8192 linear ${bRaw} 0\n8192 8192 zero`],
    ['create', 'ro', '-r', '--table', `0 2048 linear ${cRaw} 0`],
  ]) {
    const res = await dmsetup(...args);
    expect(res.code, show(res)).toBe(0);
  }
});

afterAll(async () => {
  if (daemon && daemon.exitCode === null) {
    daemon.kill('SIGTERM');
    const timeout = sleep(10_000).then(() => 'timeout' as const);
    const exit = await Promise.race([daemonExit, timeout]);
    if (exit === 'timeout') daemon.kill('SIGKILL');
    expect(exit, daemonStderr).toEqual({ code: 0, signal: null });
  }
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

describe('real NBD clients against dmstate serve', () => {
  test('qemu-io: pattern writes and reads at several offsets and sizes; a wrong pattern fails', async () => {
    const cases: Array<[number, number, number]> = [
      [0, 4096, 0xab],
      [65536, 65536, 0x11],
      [MiB + 512, 1536, 0x22],
      [5000, 3000, 0x33], // not sector-aligned: qemu does read-modify-write of whole sectors
      [LIN_BYTES - 4096, 4096, 0x44], // the last block
      [8 * MiB, 4 * MiB, 0x55],
    ];
    const cmds = cases.flatMap(([o, l, p]) => [`write -P 0x${p.toString(16)} ${o} ${l}`, `read -P 0x${p.toString(16)} ${o} ${l}`]);
    const r = await qemuIo(unixUri('lin'), cmds);
    expect(r.code, show(r)).toBe(0);
    expect(r.stdout).not.toMatch(/verification failed|error/i);
    // The bytes are in the backing file.
    const fd = fs.openSync(aRaw, 'r');
    try {
      for (const [o, l, p] of cases) {
        const b = Buffer.alloc(l);
        fs.readSync(fd, b, 0, l, o);
        expect(b.every((x) => x === p), `a.raw at ${o}`).toBe(true);
      }
      // Bytes around the unaligned write are untouched.
      const edge = Buffer.alloc(2);
      fs.readSync(fd, edge, 0, 1, 4999);
      fs.readSync(fd, edge, 1, 1, 8000);
      expect([...edge]).toEqual([0, 0]);
    } finally {
      fs.closeSync(fd);
    }
    // The check can fail: the wrong pattern, and a read that straddles two patterns.
    const bad = await qemuIo(unixUri('lin'), ['read -P 0xcd 0 4k']);
    expect(bad.code, show(bad)).toBe(1);
    expect(bad.stdout).toContain('Pattern verification failed');
    const straddle = await qemuIo(unixUri('lin'), ['read -P 0x11 61440 8k']);
    expect(straddle.code, show(straddle)).toBe(1);
    // Over TCP too.
    const tcp = await qemuIo(tcpUri('lin'), ['read -P 0x11 65536 64k', 'read -P 0x55 8M 4M', 'write -P 0x66 16M 128k', 'read -P 0x66 16M 128k']);
    expect(tcp.code, show(tcp)).toBe(0);
    expect(tcp.stdout).not.toMatch(/verification failed/i);
  });

  test('a seeded mix of writes, write-zeroes and discards through qemu-io matches a reference file (qemu-img compare)', async () => {
    const ref = fs.readFileSync(aRaw); // the device's contents now
    expect(ref.length).toBe(LIN_BYTES);
    const r = rng(20240611);
    const cmds: string[] = [];
    const kinds = { write: 0, zero: 0, discard: 0 };
    for (let i = 0; i < 160; i++) {
      const len = 512 * (1 + Math.floor(r() * 256)); // up to 128 KiB
      const off = 512 * Math.floor(r() * ((LIN_BYTES - len) / 512 + 1));
      const k = r();
      if (k < 0.5) {
        const pat = 1 + Math.floor(r() * 255);
        cmds.push(`write -P 0x${pat.toString(16)} ${off} ${len}`);
        ref.fill(pat, off, off + len);
        kinds.write++;
      } else if (k < 0.75) {
        cmds.push(r() < 0.5 ? `write -z ${off} ${len}` : `write -z -u ${off} ${len}`);
        ref.fill(0, off, off + len);
        kinds.zero++;
      } else {
        // dmstate's contract: a discarded range reads back as zeroes (NBD allows anything; dmstate promises zeroes).
        cmds.push(`discard ${off} ${len}`);
        ref.fill(0, off, off + len);
        kinds.discard++;
      }
    }
    expect(Math.min(kinds.write, kinds.zero, kinds.discard)).toBeGreaterThan(20);
    const w = await qemuIo(unixUri('lin'), cmds);
    expect(w.code, show(w)).toBe(0);
    expect(w.stdout).not.toMatch(/error|failed/i);
    const refPath = path.join(dir, 'ref.raw');
    fs.writeFileSync(refPath, ref);
    const same = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', refPath, unixUri('lin')]);
    expect(same.code, show(same)).toBe(0);
    expect(same.stdout).toContain('Images are identical');
    expect(fs.readFileSync(aRaw).equals(ref)).toBe(true);
    // One changed byte in the reference: compare must notice (exit 1, the offset named).
    const at = 12345678;
    const fd = fs.openSync(refPath, 'r+');
    fs.writeSync(fd, Buffer.from([ref[at] ^ 0x01]), 0, 1, at);
    fs.closeSync(fd);
    const differ = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', refPath, tcpUri('lin')]);
    expect(differ.code, show(differ)).toBe(1);
    expect(differ.stdout).toContain(`Content mismatch at offset ${at - (at % 512)}`);
  });

  test('nbdcopy: the exports read back byte for byte (TCP and unix), and a file copied in lands in the backing file', async () => {
    const out = path.join(dir, 'out.raw');
    const r = await run('nbdcopy', [tcpUri('lin'), out]);
    expect(r.code, show(r)).toBe(0);
    expect(fs.readFileSync(out).equals(fs.readFileSync(aRaw))).toBe(true);
    // 'lz': the file's 4 MiB, then 4 MiB of the zero target.
    const out2 = path.join(dir, 'out2.raw');
    const r2 = await run('nbdcopy', [unixUri('lz'), out2]);
    expect(r2.code, show(r2)).toBe(0);
    const got = fs.readFileSync(out2);
    expect(got.length).toBe(8 * MiB);
    expect(got.subarray(0, 4 * MiB).equals(fs.readFileSync(bRaw))).toBe(true);
    expect(got.subarray(4 * MiB).equals(Buffer.alloc(4 * MiB))).toBe(true);
    // Into an export: 8 MiB (file data plus the zero half) over four connections (nbdcopy's default with multi-conn).
    const before = fs.readFileSync(aRaw);
    const r3 = await run('nbdcopy', ['--connections=4', out2, unixUri('lin')]);
    expect(r3.code, show(r3)).toBe(0);
    const after = fs.readFileSync(aRaw);
    expect(after.subarray(0, 8 * MiB).equals(got)).toBe(true);
    expect(after.subarray(8 * MiB).equals(before.subarray(8 * MiB))).toBe(true);
  });

  test('nbdinfo --json: size, capabilities, block sizes, base:allocation; is_read_only only for the -r device', async () => {
    const [lin] = (await nbdinfoJson(['--no-content', unixUri('lin')])).exports;
    expect(lin).toMatchObject({
      'export-name': 'lin',
      'export-size': LIN_BYTES,
      is_read_only: false,
      can_flush: true,
      can_fua: true,
      can_trim: true,
      can_zero: true,
      can_multi_conn: true,
      block_size_minimum: 512,
      block_size_preferred: 4096,
      block_size_maximum: 32 * MiB,
    });
    expect(lin.contexts).toContain('base:allocation');
    const [lz] = (await nbdinfoJson(['--no-content', tcpUri('lz')])).exports;
    expect(lz).toMatchObject({ 'export-size': 8 * MiB, is_read_only: false });
    const [ro] = (await nbdinfoJson(['--no-content', unixUri('ro')])).exports;
    expect(ro).toMatchObject({ 'export-name': 'ro', 'export-size': MiB, is_read_only: true, block_size_minimum: 512 });
    const can = await run('nbdinfo', ['--can', 'fua', unixUri('lin')]);
    expect(can.code, show(can)).toBe(0);
    const cannot = await run('nbdinfo', ['--is', 'read-only', unixUri('lin')]);
    expect(cannot.code, show(cannot)).toBe(2); // nbdinfo --is/--can: exit 2 means false
  });

  test('nbdinfo --map: the zero target is a hole that reads as zeroes; file data is data', async () => {
    const r = await run('nbdinfo', ['--map', unixUri('lz')]);
    expect(r.code, show(r)).toBe(0);
    const rows = r.stdout
      .trim()
      .split('\n')
      .map((l) => l.trim().split(/\s+/));
    expect(rows).toEqual([
      ['0', String(4 * MiB), '0', 'data'],
      [String(4 * MiB), String(4 * MiB), '3', 'hole,zero'],
    ]);
    const lin = await run('nbdinfo', ['--map', tcpUri('lin')]);
    expect(lin.code, show(lin)).toBe(0);
    expect(lin.stdout.trim().split(/\s+/)).toEqual(['0', String(LIN_BYTES), '0', 'data']);
  });

  test('fio: random 4k writes at iodepth 16 from two connections with crc32c verify; a corrupted block is caught', async () => {
    const common = [
      '--name=v', '--ioengine=nbd', '--rw=randwrite', '--bs=4k', '--iodepth=16', '--numjobs=2',
      '--size=8M', '--offset=16M', '--offset_increment=8M', // job 0: [16M, 24M), job 1: [24M, 32M): no overlap
      '--verify=crc32c', '--verify_fatal=1', '--randrepeat=1', '--group_reporting', '--verify_state_save=0',
    ];
    const w = await run('fio', [...common, `--uri=${tcpUri('lin')}`, '--do_verify=1'], 60_000);
    expect(w.code, show(w)).toBe(0);
    expect(w.stdout + w.stderr).not.toMatch(/verify failed|bad magic|bad header|err=\s*[1-9]/i);
    expect(w.stdout).toMatch(/write: IOPS=/);
    expect(w.stdout).toMatch(/issued rwts: total=\d+,4096,/); // 2 jobs × 8 MiB / 4 KiB, all written
    // Again, read-only: replays the same offsets and checks every block (over the unix socket this time).
    const again = await run('fio', [...common, `--uri=${unixUri('lin')}`, '--verify_only'], 60_000);
    expect(again.code, show(again)).toBe(0);
    expect(again.stdout + again.stderr).not.toMatch(/verify failed/i);
    // Corrupt one byte of one of fio's blocks behind the daemon's back: verify must fail.
    const fd = fs.openSync(aRaw, 'r+');
    const at = 16 * MiB + 4096 * 37 + 100;
    const b = Buffer.alloc(1);
    fs.readSync(fd, b, 0, 1, at);
    fs.writeSync(fd, Buffer.from([b[0] ^ 0xff]), 0, 1, at);
    fs.closeSync(fd);
    const caught = await run('fio', [...common, `--uri=${unixUri('lin')}`, '--verify_only'], 60_000);
    expect(caught.code, show(caught)).not.toBe(0);
    expect(caught.stdout + caught.stderr).toMatch(/verify failed at file .* offset \d+/);
  });

  test('the read-only export: reads work, every way of writing fails, the backing file is unchanged', async () => {
    const read = await qemuIo(unixUri('ro'), ['read -P 0x5a 0 1M'], ['-r']);
    expect(read.code, show(read)).toBe(0);
    const w = await qemuIo(unixUri('ro'), ['write -P 0x11 0 4k']);
    expect(w.code, show(w)).not.toBe(0);
    expect(w.stdout + w.stderr).toMatch(/read-only|permission denied/i);
    const src = path.join(dir, 'small.raw');
    fs.writeFileSync(src, Buffer.alloc(MiB, 0x11));
    const copy = await run('nbdcopy', [src, tcpUri('ro')]);
    expect(copy.code, show(copy)).not.toBe(0);
    const zero = await qemuIo(tcpUri('ro'), ['write -z 0 4k']);
    expect(zero.code, show(zero)).not.toBe(0);
    expect(fs.readFileSync(cRaw).equals(Buffer.alloc(MiB, 0x5a))).toBe(true);
  });

  test('devices created while the daemon runs appear in nbdinfo --list; removed ones disappear', async () => {
    expect(await listNames()).toEqual(['lin', 'lz', 'ro']);
    const c = await dmsetup('create', 'late', '--table', '0 2048 zero');
    expect(c.code, show(c)).toBe(0);
    expect(await listNames()).toEqual(['late', 'lin', 'lz', 'ro']);
    const r = await qemuIo(tcpUri('late'), ['read -P 0 0 1M', 'write -P 0x9 0 4k', 'read -P 0 0 4k']); // dm-zero drops writes
    expect(r.code, show(r)).toBe(0);
    const rm = await dmsetup('remove', 'late');
    expect(rm.code, show(rm)).toBe(0);
    expect(await listNames()).toEqual(['lin', 'lz', 'ro']);
    const gone = await qemuIo(unixUri('late'), ['read 0 4k']);
    expect(gone.code, show(gone)).not.toBe(0);
    const info = await run('nbdinfo', [unixUri('late')]);
    expect(info.code).not.toBe(0);
  });

  test('a suspended device queues a client read until resume (and cannot be removed while the client holds it)', async () => {
    const s = await dmsetup('suspend', 'lz');
    expect(s.code, show(s)).toBe(0);
    let done: RunResult | undefined;
    const reading = qemuIo(unixUri('lz'), ['read -P 0 4M 64k']).then((r) => (done = r));
    try {
      // Wait for qemu-io to connect (the export holds the device open), then give its read time to finish if it could.
      let info = await dmsetup('info', 'lz');
      for (let i = 0; i < 20 && !/Open count:\s+1/.test(info.stdout) && done === undefined; i++) {
        await sleep(100);
        info = await dmsetup('info', 'lz');
      }
      expect(info.stdout, show(info)).toMatch(/State:\s+SUSPENDED/);
      expect(info.stdout, show(info)).toMatch(/Open count:\s+1/);
      await sleep(300);
      expect(done, 'the read finished while the device was suspended').toBeUndefined();
      const rm = await dmsetup('remove', 'lz');
      expect(rm.code, show(rm)).not.toBe(0);
      expect(rm.stderr).toMatch(/busy/i);
    } finally {
      const res = await dmsetup('resume', 'lz');
      expect(res.code, show(res)).toBe(0);
    }
    const r = await Promise.race([reading, sleep(10_000).then(() => undefined)]);
    expect(r, 'the read did not finish after resume').toBeDefined();
    expect(r!.code, show(r!)).toBe(0);
    expect(r!.stdout).toContain('read 65536/65536 bytes at offset 4194304');
  });
});
