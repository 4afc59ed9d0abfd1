/**
 * snapshot-merge interop with Linux 6.1, and the `dmstate merge NAME` command line.
 *
 * One VM boot, beside dmstate runs through the real CLI (daemon, dmsetup, qemu-io/qemu-img over NBD):
 *   A  dmstate writes a COW (a seeded workload on the origin and the snapshot, qemu-io over NBD) and removes its
 *      devices; the KERNEL merges that COW, and dmstate merges a byte copy of it (while the VM runs).
 *   B  the KERNEL writes a COW (the same kind of workload, dd O_DIRECT from a pattern disk), keeps it and merges a
 *      byte copy of it; dmstate then merges the kernel's COW.
 *   C  a crafted COW with a record for a chunk past the end of the origin: the kernel's copy fails (Merge failed).
 *   D  a crafted COW (shuffled records); E: a crafted COW (descending records), and after the handover the
 *      snapshot device is resumed and written to.
 *   F  the snapshot removed BEFORE the origin resumes: the kernel and dmstate both cancel the handover (why
 *      `dmstate merge` removes the snapshot last): Invalid, nothing merged.
 *   G  `dmstate merge NAME`: the kernel runs the exact dmsetup commands the command runs (exported by
 *      src/frontends/cli/merge.ts: its switch, then, once merged, the table lvconvert leaves), dmstate runs the
 *      command itself on a byte copy: both merge, and end with the same linear table.
 *   H  the origin resumed with snapshot-merge while the snapshot is NOT suspended (Linux snapshot_preresume):
 *      refused on both sides, the origin left suspended with the waiting snapshot-merge table live; the
 *      snapshot's own resume refused while that table waits; then, the snapshot suspended, the origin resumes and
 *      merges.
 * A, B, D and E merge the LVM way with checks in between: suspend the origin and the snapshot, load snapshot-merge
 * (`status --inactive` of it), resume the origin (the handover), sample `dmsetup status` until
 * `<alloc>/<total> <meta>` has alloc == meta, remove the snapshot, then back to snapshot-origin. Checked: the merged
 * origin equals the snapshot read before the merge (md5, and a model computed here); the first and every later
 * status sampled during the merge, on both sides, is one of the status lines prepare_merge/commit_merge give for
 * those records (test/targets/merge-cow.ts), in order; `status --inactive` before the handover, final statuses,
 * status and table after the switch back, equal on both sides.
 *
 * Needs the kernel VM (test/kernel/setup.sh), qemu-io/qemu-img and the build in dist/ (built here); if the VM
 * cannot be set up the kernel tests fail with the reason, unless DMSTATE_SKIP_KERNEL=1.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { createRng } from '../../src/core/rng.js';
import { ControlClient } from '../../src/frontends/control-client.js';
import { parseDmsetupArgs } from '../../src/frontends/dmsetup/command.js';
import { poolPaths } from '../../src/frontends/pool.js';
import { mergeFinishCommands, mergeSwitch, mergeSwitchCommands, mergedOriginTable } from '../../src/frontends/cli/merge.js';
import { ensureKernel, kernelSkipRequested, runKernelJob } from './kernel-vm.js';
import { craftCow, mergeStatusSequence, parseUsage, snapshotImage, writeData } from '../targets/merge-cow.js';
import { run, type RunResult, show, startDaemon as startServe, stopDaemon } from '../helpers/process.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const CLI = path.join(ROOT, 'bin/dmstate.js');
const MiB = 1024 * 1024;
const SECTOR = 512;
const CHUNK = 8;
const S = 32768; // 16 MiB origins
const COW_BYTES = 8 * MiB;
const SMALL = 2048; // 1 MiB origins (C, D)

const md5 = (b: Buffer): string => createHash('md5').update(b).digest('hex');

// ---- workloads --------------------------------------------------------------------------------------------------

interface WriteOp {
  readonly dev: 'orig' | 'snap';
  readonly sector: number;
  readonly sectors: number;
  readonly data: Buffer;
  /** Byte offset of `data` on the kernel's pattern disk. */
  readonly patternOffset: number;
}

/**
 * ~290 writes: one over chunks 250..260 (a run across the 256-chunk group boundary), 4 KiB origin writes at random
 * chunks (one exception each: single-chunk runs, records in allocation order), 16-64 KiB origin writes (linear
 * runs), snapshot writes of 1-24 sectors. Over 256 exceptions: the COW's metadata area 1 is in use.
 */
function makeWorkload(seed: number): { ops: WriteOp[]; prefill: Buffer; pattern: Buffer } {
  const rng = createRng(seed);
  const bytes = (n: number): Buffer => {
    const b = Buffer.alloc(n);
    for (let i = 0; i < n; i += 4) b.writeUInt32LE(Math.floor(rng.next() * 0x1_0000_0000) >>> 0, i);
    return b;
  };
  const prefill = bytes(S * SECTOR);
  const shapes: Array<{ dev: 'orig' | 'snap'; sector: number; sectors: number }> = [{ dev: 'orig', sector: 250 * CHUNK, sectors: 11 * CHUNK }];
  for (let i = 0; i < 290; i++) {
    const k = rng.int(100);
    if (k < 85) shapes.push({ dev: 'orig', sector: rng.int(S / CHUNK) * CHUNK, sectors: CHUNK });
    else if (k < 92) {
      const n = 4 + rng.int(13);
      shapes.push({ dev: 'orig', sector: rng.int(S / CHUNK - n) * CHUNK, sectors: n * CHUNK });
    } else {
      const n = 1 + rng.int(24);
      shapes.push({ dev: 'snap', sector: rng.int(S - n), sectors: n });
    }
  }
  let at = 0;
  const ops = shapes.map((s) => {
    const op = { ...s, data: bytes(s.sectors * SECTOR), patternOffset: at };
    at += s.sectors * SECTOR;
    return op;
  });
  const pattern = Buffer.alloc(Math.ceil(at / MiB) * MiB);
  for (const op of ops) op.data.copy(pattern, op.patternOffset);
  return { ops, prefill, pattern };
}

/** The snapshot's contents after the workload: the prefill with the snapshot's own writes. */
function snapshotAfter(ops: readonly WriteOp[], prefill: Buffer): Buffer {
  const img = Buffer.from(prefill);
  for (const op of ops) if (op.dev === 'snap') op.data.copy(img, op.sector * SECTOR);
  return img;
}

/** [old, new] records of a COW image, in on-disk order. */
function cowRecords(img: Buffer): Array<[number, number]> {
  const chunkBytes = img.readUInt32LE(12) * SECTOR;
  const epa = chunkBytes / 16;
  const out: Array<[number, number]> = [];
  for (let area = 0; ; area++) {
    const at = (1 + area * (epa + 1)) * chunkBytes;
    if (at + chunkBytes > img.length) break;
    let n = 0;
    for (; n < epa; n++) {
      const newChunk = Number(img.readBigUInt64LE(at + n * 16 + 8));
      if (newChunk === 0) break;
      out.push([Number(img.readBigUInt64LE(at + n * 16)), newChunk]);
    }
    if (n < epa) break;
  }
  return out;
}

// ---- steps (the same on both sides) -----------------------------------------------------------------------------

type Step =
  | { readonly kind: 'dmsetup'; readonly name: string; readonly args: readonly string[] }
  | { readonly kind: 'md5'; readonly name: string; readonly dev: string }
  /** `dmsetup status DEV` again and again until alloc == meta (or Invalid / Merge failed, or 400 samples). */
  | { readonly kind: 'sample'; readonly name: string; readonly dev: string }
  /** One write to DEV that is expected to fail (rc of the writer). */
  | { readonly kind: 'write'; readonly name: string; readonly dev: string; readonly sector: number; readonly sectors: number }
  | { readonly kind: 'copy'; readonly name: string; readonly from: string; readonly to: string }
  | { readonly kind: 'workload'; readonly prefix: string }
  /** `dmstate merge SNAPSHOT` (dmstate only; on the kernel, the commands it runs: see G_KERNEL_MERGE). */
  | { readonly kind: 'merge-cli'; readonly name: string; readonly snapshot: string };

const dm = (name: string, ...args: string[]): Step => ({ kind: 'dmsetup', name, args });

/** Create, read, merge the LVM way, sample, remove the snapshot, switch back, read again. */
function mergeSteps(p: string, size: number, options: { snapWrite?: boolean; create?: boolean } = {}): Step[] {
  const orig = `${p}orig`;
  const snap = `${p}snap`;
  const steps: Step[] = [];
  if (options.create !== false) {
    steps.push(
      dm(`${p}-create-orig`, 'create', orig, '--table', `0 ${size} snapshot-origin {${p}-origin}`),
      dm(`${p}-create-snap`, 'create', snap, '--table', `0 ${size} snapshot {${p}-origin} {${p}-cow} P ${CHUNK}`),
    );
  }
  steps.push(
    dm(`${p}-status-snap`, 'status', snap),
    { kind: 'md5', name: `${p}-md5-snap`, dev: snap },
    dm(`${p}-suspend-orig`, 'suspend', orig),
    dm(`${p}-suspend-snap`, 'suspend', snap),
    dm(`${p}-load`, 'load', orig, '--table', `0 ${size} snapshot-merge {${p}-origin} {${p}-cow} P ${CHUNK}`),
    dm(`${p}-status-inactive`, 'status', '--inactive', orig),
    dm(`${p}-resume-orig`, 'resume', orig),
  );
  if (options.snapWrite) {
    steps.push(
      dm(`${p}-status-snap-after-handover`, 'status', snap),
      dm(`${p}-resume-snap`, 'resume', snap),
      { kind: 'write', name: `${p}-write-snap-after-handover`, dev: snap, sector: 1000, sectors: 8 },
      { kind: 'sample', name: `${p}-samples`, dev: orig },
    );
  } else {
    steps.push({ kind: 'sample', name: `${p}-samples`, dev: orig }, dm(`${p}-status-snap-after-handover`, 'status', snap));
  }
  steps.push(
    dm(`${p}-remove-snap`, 'remove', snap),
    dm(`${p}-status-final`, 'status', orig),
    { kind: 'md5', name: `${p}-md5-merged`, dev: orig },
    dm(`${p}-suspend-back`, 'suspend', orig),
    dm(`${p}-load-back`, 'load', orig, '--table', `0 ${size} snapshot-origin {${p}-origin}`),
    dm(`${p}-resume-back`, 'resume', orig),
    dm(`${p}-status-after`, 'status', orig),
    dm(`${p}-table-after`, 'table', orig),
    { kind: 'md5', name: `${p}-md5-after`, dev: orig },
    dm(`${p}-remove-orig`, 'remove', orig),
  );
  return steps;
}

/** The kernel's own COW (B): workload, read, clean remove, then a byte copy for its merge. */
const KERNEL_WRITE_B: readonly Step[] = [
  dm('bw-create-orig', 'create', 'bworig', '--table', `0 ${S} snapshot-origin {b-origin}`),
  dm('bw-create-snap', 'create', 'bwsnap', '--table', `0 ${S} snapshot {b-origin} {b-cow} P ${CHUNK}`),
  // The kernel sets the origin's split size (the snapshots' chunk size) at the origin's resume only: without this,
  // an origin write over several chunks copies out only its first chunk.
  dm('bw-suspend-orig', 'suspend', 'bworig'),
  dm('bw-resume-orig', 'resume', 'bworig'),
  { kind: 'workload', prefix: 'bw' },
  dm('bw-status-snap', 'status', 'bwsnap'),
  { kind: 'md5', name: 'bw-md5-snap', dev: 'bwsnap' },
  dm('bw-remove', 'remove', 'bwsnap', 'bworig'),
  { kind: 'copy', name: 'bw-copy-origin', from: 'b-origin', to: 'b2-origin' },
  { kind: 'copy', name: 'bw-copy-cow', from: 'b-cow', to: 'b2-cow' },
];

/** dmstate's own COW (A), before the boot. */
const DMSTATE_WRITE_A: readonly Step[] = [
  dm('aw-create-orig', 'create', 'aworig', '--table', `0 ${S} snapshot-origin {a-origin}`),
  dm('aw-create-snap', 'create', 'awsnap', '--table', `0 ${S} snapshot {a-origin} {a-cow} P ${CHUNK}`),
  dm('aw-suspend-orig', 'suspend', 'aworig'),
  dm('aw-resume-orig', 'resume', 'aworig'),
  { kind: 'workload', prefix: 'aw' },
  dm('aw-status-snap', 'status', 'awsnap'),
  { kind: 'md5', name: 'aw-md5-snap', dev: 'awsnap' },
  dm('aw-remove', 'remove', 'awsnap', 'aworig'),
];

const KERNEL_ROLES = ['a-origin', 'a-cow', 'b-origin', 'b-cow', 'b2-origin', 'b2-cow', 'c-origin', 'c-cow', 'd-origin', 'd-cow', 'e-origin', 'e-cow', 'f-origin', 'f-cow', 'g-origin', 'g-cow', 'h-origin', 'h-cow', 'pattern'] as const;

/** F: the snapshot removed BEFORE the origin's resume (what `dmstate merge` does): no handover in the kernel. */
const F_STEPS: readonly Step[] = [
  dm('f-create-orig', 'create', 'forig', '--table', `0 ${SMALL} snapshot-origin {f-origin}`),
  dm('f-create-snap', 'create', 'fsnap', '--table', `0 ${SMALL} snapshot {f-origin} {f-cow} P ${CHUNK}`),
  dm('f-suspend-orig', 'suspend', 'forig'),
  dm('f-load', 'load', 'forig', '--table', `0 ${SMALL} snapshot-merge {f-origin} {f-cow} P ${CHUNK}`),
  dm('f-status-inactive-before-remove', 'status', '--inactive', 'forig'),
  dm('f-remove-snap', 'remove', 'fsnap'),
  dm('f-status-inactive-after-remove', 'status', '--inactive', 'forig'),
  dm('f-resume-orig', 'resume', 'forig'),
  { kind: 'sample', name: 'f-samples', dev: 'forig' },
  dm('f-status-final', 'status', 'forig'),
  { kind: 'md5', name: 'f-md5-merged', dev: 'forig' },
];

/**
 * H: the handover rules at resume (Linux snapshot_preresume). The origin's resume with the snapshot live and not
 * suspended fails (EINVAL) after the swap: the origin stays suspended with snapshot-merge live (nothing inactive),
 * waiting. The snapshot, suspended, may not resume while that table waits. Then LVM's order goes on.
 */
const H_STEPS: readonly Step[] = [
  dm('h-create-orig', 'create', 'horig', '--table', `0 ${SMALL} snapshot-origin {h-origin}`),
  dm('h-create-snap', 'create', 'hsnap', '--table', `0 ${SMALL} snapshot {h-origin} {h-cow} P ${CHUNK}`),
  { kind: 'md5', name: 'h-md5-snap', dev: 'hsnap' },
  dm('h-suspend-orig', 'suspend', 'horig'),
  dm('h-load', 'load', 'horig', '--table', `0 ${SMALL} snapshot-merge {h-origin} {h-cow} P ${CHUNK}`),
  dm('h-resume-refused', 'resume', 'horig'),
  dm('h-info-orig', 'info', 'horig'),
  dm('h-table-inactive', 'table', '--inactive', 'horig'),
  dm('h-status-orig', 'status', 'horig'),
  dm('h-status-snap', 'status', 'hsnap'),
  { kind: 'md5', name: 'h-md5-snap-refused', dev: 'hsnap' },
  dm('h-suspend-snap', 'suspend', 'hsnap'),
  dm('h-resume-snap-refused', 'resume', 'hsnap'),
  dm('h-resume-orig', 'resume', 'horig'),
  { kind: 'sample', name: 'h-samples', dev: 'horig' },
  dm('h-status-snap-after-handover', 'status', 'hsnap'),
  dm('h-remove-snap', 'remove', 'hsnap'),
  dm('h-status-final', 'status', 'horig'),
  { kind: 'md5', name: 'h-md5-merged', dev: 'horig' },
  dm('h-remove-orig', 'remove', 'horig'),
];

/** G, before and after the merge: the same on both sides. */
const G_BEFORE: readonly Step[] = [
  dm('g-create-orig', 'create', 'gorig', '--table', `0 ${SMALL} snapshot-origin {g-origin}`),
  dm('g-create-snap', 'create', 'gsnap', '--table', `0 ${SMALL} snapshot {g-origin} {g-cow} P ${CHUNK}`),
  { kind: 'md5', name: 'g-md5-snap', dev: 'gsnap' },
];
const G_AFTER: readonly Step[] = [
  dm('g-info-snap', 'info', 'gsnap'),
  dm('g-table-after', 'table', 'gorig'),
  dm('g-status-after', 'status', 'gorig'),
  { kind: 'md5', name: 'g-md5-after', dev: 'gorig' },
  dm('g-remove-orig', 'remove', 'gorig'),
];
/**
 * G on the kernel: what `dmstate merge gsnap` runs, from the functions it runs them from: the switch (LVM's
 * order), the wait for the merge (sampled), the switch to the table lvconvert leaves (no other snapshot: linear).
 */
const G_KERNEL_MERGE: readonly Step[] = [
  ...mergeSwitchCommands(mergeSwitch('gsnap', 'gorig', `0 ${SMALL} snapshot-merge {g-origin} {g-cow} P ${CHUNK}`)).map((argv, i) => dm(`g-switch-${i}`, ...argv)),
  { kind: 'sample', name: 'g-samples', dev: 'gorig' },
  ...mergeFinishCommands('gorig', mergedOriginTable('0', String(SMALL), '{g-origin}', false)).map((argv, i) => dm(`g-finish-${i}`, ...argv)),
];

/** dmstate's steps for C: up to the failure (on a pool of its own, run beside A/D/E and killed after). */
const C_DMSTATE_STEPS = new Set(['create-orig', 'create-snap', 'status-snap', 'md5-snap', 'suspend-orig', 'suspend-snap', 'load', 'status-inactive', 'resume-orig', 'samples', 'status-snap-after-handover', 'status-final', 'md5-merged'].map((x) => `c-${x}`));

// ---- the kernel side --------------------------------------------------------------------------------------------

const q = (s: string): string => `'${s.replace(/'/g, `'\\''`)}'`;
const vd = (i: number): string => `vd${String.fromCharCode(97 + i)}`;
const fill = (arg: string, devs: Readonly<Record<string, string>>): string => arg.replace(/\{([a-z0-9-]+)\}/g, (_, role: string) => devs[role]);

function kernelScript(steps: readonly Step[], ops: readonly WriteOp[]): string {
  const devs = Object.fromEntries(KERNEL_ROLES.map((role, i) => [role, `/dev/${vd(i)}`]));
  const lines = [
    'echo 1 > /proc/sys/kernel/printk',
    'T=/tmp/mi; mkdir -p "$T"',
    `echo "@@@ DISKS"; for d in ${KERNEL_ROLES.map((_, i) => vd(i)).join(' ')}; do cat /sys/block/$d/dev; done; echo "@@@ END DISKS"`,
    'c() { n=$1; shift; "$@" >"$T/out" 2>"$T/err"; rc=$?; echo "@@@ CMD $n"; cat "$T/out"; echo; echo "@@@ RC $rc"; echo "@@@ STDERR"; cat "$T/err"; echo; echo "@@@ END $n"; }',
    `w() { dd if=${devs.pattern} of=/dev/mapper/$1 bs=$2 count=1 skip=$3 seek=$4 iflag=skip_bytes,fullblock oflag=seek_bytes,direct conv=notrunc 2>"$T/dd" || { echo "@@@ DDFAIL $*"; cat "$T/dd"; }; }`,
    // Samples until alloc == meta (the merge is done), Invalid or Merge failed, or 400 samples.
    'sample() { i=0; while [ $i -lt 400 ]; do s=$(dmsetup status $1) || return 1; echo "$s"; i=$((i+1)); case "$s" in *Invalid*|*failed*) return 0;; esac; set -- $1 $s; a=${5%/*}; [ "$a" = "$6" ] && return 0; done; }',
    'wr() { dd if=/dev/zero of=/dev/mapper/$1 bs=512 count=$3 seek=$2 oflag=direct conv=notrunc; }',
  ];
  for (const st of steps) {
    if (st.kind === 'dmsetup') lines.push(`c ${st.name} dmsetup ${st.args.map((a) => q(fill(a, devs))).join(' ')}`);
    else if (st.kind === 'md5') lines.push(`c ${st.name} md5sum /dev/mapper/${st.dev}`);
    else if (st.kind === 'sample') lines.push(`c ${st.name} sample ${st.dev}`);
    else if (st.kind === 'write') lines.push(`c ${st.name} wr ${st.dev} ${st.sector} ${st.sectors}`);
    else if (st.kind === 'copy') lines.push(`c ${st.name} dd if=${devs[st.from]} of=${devs[st.to]} bs=1M conv=fsync`);
    else if (st.kind === 'merge-cli') throw new Error(`${st.name}: dmstate only (the kernel runs G_KERNEL_MERGE)`);
    else {
      const rename = { orig: `${st.prefix}orig`, snap: `${st.prefix}snap` };
      for (const op of ops) lines.push(`w ${rename[op.dev]} ${op.sectors * SECTOR} ${op.patternOffset} ${op.sector * SECTOR}`);
    }
  }
  return lines.join('\n') + '\n';
}

interface Section {
  readonly stdout: string;
  readonly rc: number;
  readonly stderr: string;
}
type Sections = Map<string, Section>;

function parseSections(output: string): Sections {
  const re = /^@@@ CMD (\S+)\n([\s\S]*?)\n@@@ RC (\d+)\n@@@ STDERR\n([\s\S]*?)\n@@@ END \1$/gm;
  const out: Sections = new Map();
  for (const m of output.matchAll(re)) {
    const stdout = m[1].includes('-md5-') ? (m[2].split(/\s+/)[0] ?? '') : m[2];
    out.set(m[1], { stdout, rc: Number(m[3]), stderr: m[4] });
  }
  for (const l of output.split('\n')) if (l.startsWith('@@@ DDFAIL')) out.set(l.slice(4), { stdout: '', rc: -1, stderr: l });
  return out;
}

// ---- the dmstate side -------------------------------------------------------------------------------------------


let daemonStderr = '';

const startDaemon = (pool: string): Promise<ChildProcess> => startServe(CLI, pool, (c) => (daemonStderr += c));

async function dmstateRun(pool: string, devs: Readonly<Record<string, string>>, steps: readonly Step[], ops: readonly WriteOp[], scratch: string, timeoutMs = 60_000): Promise<Sections> {
  const sock = path.join(pool, 'nbd.sock');
  const uri = (name: string): string => `nbd+unix:///${name}?socket=${sock}`;
  const dmsetup = (...args: string[]): Promise<RunResult> => run(process.execPath, [CLI, 'dmsetup', '--pool', pool, ...args], timeoutMs);
  const out: Sections = new Map();
  for (const st of steps) {
    if (st.kind === 'dmsetup') {
      const r = await dmsetup(...st.args.map((a) => fill(a, devs)));
      out.set(st.name, { stdout: r.stdout, rc: r.code ?? -1, stderr: r.stderr });
    } else if (st.kind === 'md5') {
      const file = path.join(scratch, `${st.dev}.raw`);
      const r = await run('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', uri(st.dev), file], timeoutMs);
      out.set(st.name, { stdout: r.code === 0 ? md5(fs.readFileSync(file)) : '', rc: r.code ?? -1, stderr: r.stderr });
      fs.rmSync(file, { force: true });
    } else if (st.kind === 'sample') {
      // Through the daemon's control socket (what `dmstate dmsetup status` sends) rather than a CLI process per
      // sample: a process start takes longer than many merge steps, and the first sample must come early.
      const paths = poolPaths(pool);
      const client = await ControlClient.connect(paths.controlSocket, paths.dir);
      const lines: string[] = [];
      let rc = 0;
      let stderr = '';
      let same = 0;
      const until = performance.now() + 30_000;
      try {
        for (let i = 0; i < 4000 && same < 500 && performance.now() < until; i++) {
          const r = await client.request({ op: 'dmsetup', command: { ...parseDmsetupArgs(['status', st.dev]), cwd: process.cwd() } });
          if (r.op !== 'dmsetup' || r.result.exitCode !== 0) {
            rc = r.op === 'dmsetup' ? r.result.exitCode : -1;
            stderr = r.op === 'dmsetup' ? r.result.stderr : JSON.stringify(r);
            break;
          }
          const s = r.result.stdout.trimEnd();
          if (s === lines[lines.length - 1]) {
            same++; // keep one line per status; 500 polls without a change: the merge is stuck
            await new Promise((resolve) => setTimeout(resolve, 2));
            continue;
          }
          same = 0;
          lines.push(s);
          if (/Invalid|failed/.test(s)) break;
          const u = parseUsage(s);
          if (u && u.alloc === u.meta) break;
        }
      } finally {
        client.close();
      }
      out.set(st.name, { stdout: lines.join('\n'), rc, stderr });
    } else if (st.kind === 'write') {
      const r = await run('qemu-io', ['-f', 'raw', uri(st.dev), '-c', `write -P 0 ${st.sector * SECTOR} ${st.sectors * SECTOR}`], timeoutMs);
      // qemu-io exits 0 even when a write fails; its output says so.
      const failed = r.code !== 0 || /failed|error/i.test(r.stdout + r.stderr);
      out.set(st.name, { stdout: r.stdout, rc: failed ? 1 : 0, stderr: r.stderr });
    } else if (st.kind === 'copy') {
      fs.copyFileSync(devs[st.from], devs[st.to]);
      out.set(st.name, { stdout: '', rc: 0, stderr: '' });
    } else if (st.kind === 'merge-cli') {
      const r = await run(process.execPath, [CLI, 'merge', '--pool', pool, st.snapshot], 120_000);
      out.set(st.name, { stdout: r.stdout, rc: r.code ?? -1, stderr: r.stderr });
    } else {
      const rename = { orig: `${st.prefix}orig`, snap: `${st.prefix}snap` };
      let i = 0;
      while (i < ops.length) {
        let j = i;
        while (j < ops.length && ops[j].dev === ops[i].dev) j++;
        const cmds: string[] = [];
        for (let k = i; k < j; k++) {
          const file = path.join(scratch, `w${k}.bin`);
          fs.writeFileSync(file, ops[k].data);
          cmds.push('-c', `write -q -s ${file} ${ops[k].sector * SECTOR} ${ops[k].sectors * SECTOR}`);
        }
        const r = await run('qemu-io', ['-f', 'raw', uri(rename[ops[i].dev]), ...cmds]);
        if (r.code !== 0 || r.stdout.trim() !== '' || r.stderr.trim() !== '') {
          out.set(`DDFAIL qemu-io ${ops[i].dev} (ops ${i}..${j - 1})`, { stdout: r.stdout, rc: -1, stderr: r.stderr });
        }
        i = j;
      }
    }
  }
  return out;
}

/** Replaces each side's device names by roles: the kernel's major:minor, dmstate's file paths. */
function byRole(text: string, names: ReadonlyMap<string, string>): string {
  let t = text;
  for (const [from, role] of [...names].sort((a, b) => b[0].length - a[0].length)) t = t.split(from).join(`<${role}>`);
  return t;
}

// ---- the test ---------------------------------------------------------------------------------------------------

let built: Promise<void> | undefined;
/** Builds dist/ once for this file (the CLI runs it). */
function buildOnce(): Promise<void> {
  built ??= new Promise((resolve, reject) => {
    const child = spawn('npx', ['tsc', '-p', 'tsconfig.build.json'], { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    child.stdout.on('data', (c: Buffer) => (out += c.toString()));
    child.stderr.on('data', (c: Buffer) => (out += c.toString()));
    child.on('close', (code) => (code === 0 ? resolve() : reject(new Error(`build failed:\n${out}`))));
  });
  return built;
}

/**
 * Starts a daemon from dist/; if it cannot load (another process rewriting dist/ at that moment: tsc writes file
 * by file), builds again and retries once.
 */
async function startBuiltDaemon(pool: string): Promise<ChildProcess> {
  try {
    return await startDaemon(pool);
  } catch (err) {
    if (!/SyntaxError|Cannot find module|ERR_MODULE_NOT_FOUND/.test((err as Error).message)) throw err;
    built = undefined;
    await buildOnce();
    return startDaemon(pool);
  }
}

describe('snapshot-merge interop with the Linux 6.1 kernel (one VM boot)', () => {
  let skipReason: string | undefined;
  let tmp: string | undefined;
  const daemons: ChildProcess[] = [];
  /** k: the kernel; d: dmstate (aw: writing A before the boot). */
  let k: Sections = new Map();
  let d: Sections = new Map();
  let aw: Sections = new Map();
  const expected = new Map<string, string>(); // scenario → md5 of the snapshot (= the merged origin)
  const sequences = new Map<string, string[]>(); // scenario → status sequence of its records (k and d merge the same bytes)
  const timings: string[] = [];
  let cRecordsPastEnd = 0;

  const sec = (side: Sections, name: string, who: string): Section => {
    const s = side.get(name);
    if (!s) throw new Error(`${who}: no output for step ${name}${who === 'dmstate' ? `\n--- dmstate serve stderr:\n${daemonStderr.slice(-2000)}` : ''}`);
    return s;
  };

  beforeAll(async () => {
    const t0 = performance.now();
    const status = await ensureKernel();
    if (!status.ok) {
      if (kernelSkipRequested()) {
        skipReason = status.reason;
        console.warn(`merge-interop: SKIPPED (DMSTATE_SKIP_KERNEL=1): ${status.reason}`);
        return;
      }
      throw new Error(`the kernel VM is unavailable (set DMSTATE_SKIP_KERNEL=1 to skip): ${status.reason}`);
    }
    await buildOnce();
    timings.push(`build ${((performance.now() - t0) / 1000).toFixed(1)} s`);

    const dir = (tmp = fs.mkdtempSync('/tmp/dmi-'));
    const scratch = path.join(dir, 'scratch');
    fs.mkdirSync(scratch);
    const file = (name: string, content: Buffer | number): string => {
      const f = path.join(dir, `${name}.img`);
      if (typeof content === 'number') {
        fs.writeFileSync(f, '');
        fs.truncateSync(f, content);
      } else fs.writeFileSync(f, content);
      return f;
    };
    const wa = makeWorkload(0xa11);
    const wb = makeWorkload(0xb22);
    expected.set('a', md5(snapshotAfter(wa.ops, wa.prefill)));
    expected.set('b', md5(snapshotAfter(wb.ops, wb.prefill)));
    // C: records 3→2, 4→3 and 600→4 on a 256-chunk origin (600 is past its end); D: 150 shuffled records.
    const cOrigin = writeData(0, 0, SMALL);
    const cCow = craftCow({ chunkSectors: CHUNK, oldChunks: [], order: 'ascending', records: [[3, 2], [4, 3], [600, 4]], cowSectors: 2048 });
    cRecordsPastEnd = 1;
    const dOrigin = writeData(0, 0, SMALL);
    const dCow = craftCow({ chunkSectors: CHUNK, oldChunks: Array.from({ length: 150 }, (_, i) => (i * 5) % 256), order: 'shuffled', seed: 9, cowSectors: 4096 });
    const eCow = craftCow({ chunkSectors: CHUNK, oldChunks: Array.from({ length: 100 }, (_, i) => (i * 3) % 256), order: 'descending', cowSectors: 4096 });
    expected.set('c', md5(snapshotImage(cOrigin, cCow)));
    expected.set('d', md5(snapshotImage(dOrigin, dCow)));
    expected.set('e', md5(snapshotImage(dOrigin, eCow)));
    expected.set('f-unmerged', md5(dOrigin));
    sequences.set('d', mergeStatusSequence(dCow.records, CHUNK, 4096));
    sequences.set('e', mergeStatusSequence(eCow.records, CHUNK, 4096));
    // G (`dmstate merge`): 180 records in allocation order, each its own run (old chunks 7 apart).
    const gCow = craftCow({ chunkSectors: CHUNK, oldChunks: Array.from({ length: 180 }, (_, i) => (i * 7) % 256), order: 'ascending', cowSectors: 4096 });
    expected.set('g', md5(snapshotImage(dOrigin, gCow)));
    sequences.set('g', mergeStatusSequence(gCow.records, CHUNK, 4096));
    // H (the handover rules): D's COW again.
    expected.set('h', expected.get('d')!);
    sequences.set('h', sequences.get('d')!);

    const kImages: Record<string, string> = {
      'a-origin': file('a-origin', wa.prefill),
      'a-cow': file('a-cow', COW_BYTES),
      'b-origin': file('b-origin', wb.prefill),
      'b-cow': file('b-cow', COW_BYTES),
      'b2-origin': file('b2-origin', S * SECTOR),
      'b2-cow': file('b2-cow', COW_BYTES),
      'c-origin': file('c-origin', cOrigin),
      'c-cow': file('c-cow', cCow.image),
      'd-origin': file('d-origin', dOrigin),
      'd-cow': file('d-cow', dCow.image),
      'e-origin': file('e-origin', dOrigin),
      'e-cow': file('e-cow', eCow.image),
      'f-origin': file('f-origin', dOrigin),
      'f-cow': file('f-cow', dCow.image),
      'g-origin': file('g-origin', dOrigin),
      'g-cow': file('g-cow', gCow.image),
      'h-origin': file('h-origin', dOrigin),
      'h-cow': file('h-cow', dCow.image),
      pattern: file('pattern', wb.pattern),
    };
    const dImages: Record<string, string> = {
      'a-origin': file('da-origin', 0),
      'a-cow': file('da-cow', 0),
      'b-origin': kImages['b-origin'],
      'b-cow': kImages['b-cow'],
      'c-origin': file('dc-origin', cOrigin),
      'c-cow': file('dc-cow', cCow.image),
      'd-origin': file('dd-origin', dOrigin),
      'd-cow': file('dd-cow', dCow.image),
      'e-origin': file('de-origin', dOrigin),
      'e-cow': file('de-cow', eCow.image),
      'f-origin': file('df-origin', dOrigin),
      'f-cow': file('df-cow', dCow.image),
      'g-origin': file('dg-origin', dOrigin),
      'g-cow': file('dg-cow', gCow.image),
      'h-origin': file('dh-origin', dOrigin),
      'h-cow': file('dh-cow', dCow.image),
    };
    const pool = path.join(dir, 'p');
    const daemon = await startBuiltDaemon(pool);
    daemons.push(daemon);

    // A: dmstate writes its COW (on the images the kernel gets), then the copies dmstate merges itself.
    let t = performance.now();
    aw = await dmstateRun(pool, kImages, DMSTATE_WRITE_A, wa.ops, scratch);
    fs.copyFileSync(kImages['a-origin'], dImages['a-origin']);
    fs.copyFileSync(kImages['a-cow'], dImages['a-cow']);
    sequences.set('a', mergeStatusSequence(cowRecords(fs.readFileSync(kImages['a-cow'])), CHUNK, COW_BYTES / SECTOR));
    timings.push(`dmstate writes A ${((performance.now() - t) / 1000).toFixed(1)} s`);

    // The boot (the kernel merges A, writes B and merges its copy, C, D, E, F, G, H) beside dmstate merging A, D, E,
    // F, G, H and (on a pool of its own, as a failure there can leave that daemon stuck) C.
    t = performance.now();
    const kernelSteps = [...mergeSteps('a', S), ...KERNEL_WRITE_B, ...mergeSteps('b2', S), ...mergeSteps('c', SMALL), ...mergeSteps('d', SMALL), ...mergeSteps('e', SMALL, { snapWrite: true }), ...F_STEPS, ...G_BEFORE, ...G_KERNEL_MERGE, ...G_AFTER, ...H_STEPS];
    const [kr, d1, dc] = await Promise.all([
      runKernelJob(kernelScript(kernelSteps, wb.ops), KERNEL_ROLES.map((r) => kImages[r]), { timeoutMs: 240_000 }).then((r) => {
        timings.push(`kernel boot ${((performance.now() - t) / 1000).toFixed(1)} s`);
        return r;
      }),
      dmstateRun(pool, dImages, [...mergeSteps('a', S), ...mergeSteps('d', SMALL), ...mergeSteps('e', SMALL, { snapWrite: true }), ...F_STEPS, ...G_BEFORE, { kind: 'merge-cli', name: 'g-merge-cli', snapshot: 'gsnap' }, ...G_AFTER, ...H_STEPS], [], scratch).then((r) => {
        timings.push(`dmstate merges A, D, E, F, G, H ${((performance.now() - t) / 1000).toFixed(1)} s`);
        return r;
      }),
      (async () => {
        const cPool = path.join(dir, 'q');
        const cDaemon = await startBuiltDaemon(cPool);
        daemons.push(cDaemon);
        const r = await dmstateRun(cPool, dImages, mergeSteps('c', SMALL).filter((x) => !('name' in x) || C_DMSTATE_STEPS.has(x.name)), [], scratch, 15_000);
        cDaemon.kill('SIGKILL');
        return r;
      })(),
    ]);
    // B: dmstate merges the COW the kernel wrote (it merged a byte copy of it).
    sequences.set('b', mergeStatusSequence(cowRecords(fs.readFileSync(kImages['b-cow'])), CHUNK, COW_BYTES / SECTOR));
    sequences.set('b2', sequences.get('b')!);
    t = performance.now();
    const d2 = await dmstateRun(pool, dImages, mergeSteps('b', S), [], scratch);
    timings.push(`dmstate merges B ${((performance.now() - t) / 1000).toFixed(1)} s`);
    const m = /@@@ DISKS\n([\s\S]*?)\n@@@ END DISKS/.exec(kr.output);
    if (!m) throw new Error(`kernel job printed no disk numbers:\n${kr.output.slice(0, 3000)}`);
    const kNames = new Map<string, string>();
    m[1].split('\n').forEach((dev, i) => kNames.set(dev.trim(), KERNEL_ROLES[i].replace(/^b2-/, 'b-')));
    const dNames = new Map<string, string>(Object.entries(dImages).map(([role, f]) => [f, role]));
    const normalize = (s: Sections, names: Map<string, string>): Sections => new Map([...s].map(([key, v]) => [key.replace(/^b2-/, 'b-'), { ...v, stdout: byRole(v.stdout, names) }]));
    k = normalize(parseSections(kr.output), kNames);
    d = normalize(new Map([...d1, ...dc, ...d2]), dNames);
    // Device names differ only by the b2 prefix on the kernel: name both `b`.
    for (const side of [k, d]) for (const v of side.values()) (v as { stdout: string }).stdout = v.stdout.replace(/\bb2(orig|snap)\b/g, 'b$1');
    timings.push(`total ${((performance.now() - t0) / 1000).toFixed(1)} s`);
    console.log(`merge-interop timings: ${timings.join(', ')}`);
  }, 15 * 60_000);

  afterAll(async () => {
    for (const dm2 of daemons) await stopDaemon(dm2);
    if (tmp && process.env.DMSTATE_KEEP_TMP === '1') console.log(`merge-interop: images kept in ${tmp}`);
    else if (tmp) fs.rmSync(tmp, { recursive: true, force: true });
  });

  const skipIfNoKernel = (ctx: { skip: () => void }): void => {
    if (skipReason !== undefined) ctx.skip();
  };

  /** The statuses sampled during a merge: each one of the sequence, in order (the first one too); done at the end. */
  const checkSamples = (side: Sections, name: string, who: string, size: number, total: number, seq: readonly string[]): string[] => {
    const samples = sec(side, name, who).stdout.split('\n').filter((l) => l !== '');
    expect(samples.length, `${who}: samples`).toBeGreaterThan(0);
    let at = 0;
    for (const s of samples) {
      expect(s, `${who}: status line`).toMatch(new RegExp(`^0 ${size} snapshot-merge \\d+/${total} \\d+$`));
      const i = seq.indexOf(s.split(' ').slice(3).join(' '), at);
      expect(i, `${who}: status "${s}" is not in the sequence after "${seq[at]}":\n${seq.join(', ')}\nsamples: ${samples.join(' | ')}`).toBeGreaterThanOrEqual(0);
      at = i;
    }
    expect(samples[samples.length - 1], `${who}: last sample`).toBe(`0 ${size} snapshot-merge ${2 * CHUNK}/${total} ${2 * CHUNK}`);
    return samples;
  };

  test('dmstate wrote COW A without error (qemu-io over NBD)', (ctx) => {
    skipIfNoKernel(ctx);
    for (const [name, s] of aw) expect(name.startsWith('DDFAIL') ? -1 : s.rc, `${name}: ${s.stderr}`).toBe(0);
    expect(sec(aw, 'aw-md5-snap', 'dmstate').stdout).toBe(expected.get('a'));
    expect(sec(aw, 'aw-status-snap', 'dmstate').stdout).toBe(`0 ${S} snapshot ${sequences.get('a')![0]}\n`);
  });

  test('the kernel wrote COW B without error, and its snapshot holds the model', (ctx) => {
    skipIfNoKernel(ctx);
    for (const [name, s] of k) if (name.startsWith('bw-') || name.startsWith('DDFAIL')) expect(s.rc, `${name}: ${s.stderr}`).toBe(0);
    expect(sec(k, 'bw-md5-snap', 'kernel').stdout).toBe(expected.get('b'));
    expect(sec(k, 'bw-status-snap', 'kernel').stdout).toBe(`0 ${S} snapshot ${sequences.get('b')![0]}\n`);
  });

  for (const [sc, what] of [
    ['a', 'the kernel merges a COW dmstate wrote (dmstate merges the same bytes)'],
    ['b', 'dmstate merges a COW the kernel wrote (the kernel merges the same bytes)'],
    ['d', 'a crafted COW with shuffled records (single-chunk runs, back to front)'],
  ] as const) {
    test(`${sc.toUpperCase()}: ${what}: merged origin = snapshot, same statuses during and after`, (ctx) => {
      skipIfNoKernel(ctx);
      const size = sc === 'd' ? SMALL : S;
      const total = sc === 'd' ? 4096 : COW_BYTES / SECTOR;
      const seq = sequences.get(sc)!;
      for (const [side, who] of [[k, 'kernel'], [d, 'dmstate']] as const) {
        for (const step of ['create-orig', 'create-snap', 'suspend-orig', 'suspend-snap', 'load', 'resume-orig', 'remove-snap', 'resume-back', 'remove-orig']) {
          const s = sec(side, `${sc}-${step}`, who);
          expect(s.rc, `${who} ${sc}-${step}: ${s.stderr}`).toBe(0);
        }
        expect(sec(side, `${sc}-md5-snap`, who).stdout, `${who}: the snapshot before the merge`).toBe(expected.get(sc));
        expect(sec(side, `${sc}-md5-merged`, who).stdout, `${who}: the merged origin (snapshot-merge)`).toBe(expected.get(sc));
        expect(sec(side, `${sc}-md5-after`, who).stdout, `${who}: the origin (snapshot-origin again)`).toBe(expected.get(sc));
        expect(sec(side, `${sc}-status-snap`, who).stdout, `${who}: snapshot status before the merge`).toBe(`0 ${size} snapshot ${seq[0]}\n`);
        const samples = checkSamples(side, `${sc}-samples`, who, size, total, seq);
        expect(sec(side, `${sc}-status-final`, who).stdout).toBe(`0 ${size} snapshot-merge ${2 * CHUNK}/${total} ${2 * CHUNK}\n`);
        console.log(`${sc}: ${who} sampled ${samples.length} statuses (first ${samples[0].split(' ').slice(3).join(' ')}, sequence of ${seq.length})`);
      }
      // After: the same status and table (devices by role) on both sides.
      for (const step of ['status-final', 'status-after', 'table-after']) {
        expect(sec(d, `${sc}-${step}`, 'dmstate').stdout, `${sc}-${step}`).toBe(sec(k, `${sc}-${step}`, 'kernel').stdout);
      }
      expect(sec(k, `${sc}-table-after`, 'kernel').stdout).toBe(`0 ${size} snapshot-origin <${sc}-origin>\n`);
    });
  }

  test('parity: the snapshot device after the handover is Invalid, and a write to it fails, on both sides', (ctx) => {
    skipIfNoKernel(ctx);
    for (const sc of ['a', 'b', 'd', 'e']) {
      const kernel = sec(k, `${sc}-status-snap-after-handover`, 'kernel').stdout;
      const size = sc === 'a' || sc === 'b' ? S : SMALL;
      expect(kernel, `kernel ${sc}`).toBe(`0 ${size} snapshot Invalid\n`);
      expect(sec(d, `${sc}-status-snap-after-handover`, 'dmstate').stdout, `dmstate ${sc}: status of the snapshot after the handover`).toBe(kernel);
    }
    expect(sec(k, 'e-resume-snap', 'kernel').rc).toBe(0);
    expect(sec(k, 'e-write-snap-after-handover', 'kernel').rc, 'kernel: write to the snapshot after the handover').not.toBe(0);
    expect(sec(d, 'e-write-snap-after-handover', 'dmstate').rc, 'dmstate: write to the snapshot after the handover').not.toBe(0);
    // The merge goes on undisturbed on the kernel; dmstate must end the same way.
    const kFinal = sec(k, 'e-status-final', 'kernel').stdout;
    expect(kFinal).toBe(`0 ${SMALL} snapshot-merge ${2 * CHUNK}/4096 ${2 * CHUNK}\n`);
    expect(sec(k, 'e-md5-merged', 'kernel').stdout).toBe(expected.get('e'));
    expect(sec(d, 'e-status-final', 'dmstate').stdout, 'dmstate: status after a write to the snapshot during the merge').toBe(kFinal);
    expect(sec(d, 'e-md5-merged', 'dmstate').stdout).toBe(expected.get('e'));
  });

  test('parity: a record past the end of the origin: Merge failed on both sides, the origin still reads', (ctx) => {
    skipIfNoKernel(ctx);
    expect(cRecordsPastEnd).toBe(1);
    const kFinal = sec(k, 'c-status-final', 'kernel').stdout;
    expect(kFinal, 'kernel').toBe(`0 ${SMALL} snapshot-merge Merge failed\n`);
    expect(sec(k, 'c-resume-orig', 'kernel').rc).toBe(0);
    expect(sec(d, 'c-resume-orig', 'dmstate').rc, `dmstate: resume of the snapshot-merge table: ${sec(d, 'c-resume-orig', 'dmstate').stderr}`).toBe(0);
    expect(sec(d, 'c-status-final', 'dmstate').stdout, 'dmstate').toBe(kFinal);
    // The kernel's (and dmstate's) merging device still reads: the snapshot's contents (the first run failed).
    expect(sec(k, 'c-md5-merged', 'kernel').stdout).toBe(expected.get('c'));
    expect(sec(d, 'c-md5-merged', 'dmstate').stdout).toBe(expected.get('c'));
  });

  test('G: `dmstate merge` on both: the kernel runs its commands (LVM order, then the table lvconvert leaves), dmstate the command; same result', (ctx) => {
    skipIfNoKernel(ctx);
    // The kernel merges with the switch the command uses: every step succeeds, the merge runs to the end.
    const kSteps = G_KERNEL_MERGE.flatMap((st) => ('name' in st && st.kind === 'dmsetup' ? [st] : []));
    expect(kSteps.map((st) => st.args[0])).toEqual(['suspend', 'suspend', 'load', 'resume', 'remove', 'suspend', 'load', 'resume']);
    for (const st of kSteps) expect(sec(k, st.name, 'kernel').rc, `kernel ${st.name} (dmsetup ${st.args.join(' ')}): ${sec(k, st.name, 'kernel').stderr}`).toBe(0);
    const samples = checkSamples(k, 'g-samples', 'kernel', SMALL, 4096, sequences.get('g')!);
    const cli = sec(d, 'g-merge-cli', 'dmstate');
    expect(cli.rc, `dmstate merge gsnap: ${cli.stderr}`).toBe(0);
    const cliLines = cli.stderr.split('\n').filter((l) => l !== '');
    expect(cliLines[0]).toMatch(/^merging snapshot gsnap into gorig \(origin .*, COW .*, chunk 8 sectors\)$/);
    expect(cliLines.at(-1)).toMatch(/^merge done: 180 chunks in \d+:\d\d; gorig is a linear mapping of .* again \(no snapshot of it left\)$/);
    for (const [side, who] of [[k, 'kernel'], [d, 'dmstate']] as const) {
      for (const step of ['g-create-orig', 'g-create-snap', 'g-remove-orig']) expect(sec(side, step, who).rc, `${who} ${step}: ${sec(side, step, who).stderr}`).toBe(0);
      expect(sec(side, 'g-md5-snap', who).stdout, `${who}: the snapshot before the merge`).toBe(expected.get('g'));
      expect(sec(side, 'g-md5-after', who).stdout, `${who}: the origin after the merge and the switch`).toBe(expected.get('g'));
      expect(sec(side, 'g-info-snap', who).rc, `${who}: the snapshot device is gone`).not.toBe(0);
    }
    expect(sec(k, 'g-table-after', 'kernel').stdout).toBe(`0 ${SMALL} linear <g-origin> 0\n`);
    for (const step of ['g-table-after', 'g-status-after']) expect(sec(d, step, 'dmstate').stdout, step).toBe(sec(k, step, 'kernel').stdout);
    console.log(`g: the kernel sampled ${samples.length} statuses; dmstate merge: ${cliLines.at(-1)}`);
  });

  test('F: the snapshot removed before the origin resumes: the handover is cancelled on both sides (why dmstate merge removes it last)', (ctx) => {
    skipIfNoKernel(ctx);
    // Linux snapshot_dtr: "Cancelling snapshot handover": the snapshot-merge table is Invalid from the removal on,
    // nothing merges, the origin keeps its data. dmstate does the same (snapshotDtr).
    for (const step of ['f-create-orig', 'f-create-snap', 'f-suspend-orig', 'f-load', 'f-remove-snap', 'f-resume-orig']) {
      expect(sec(k, step, 'kernel').rc, `kernel ${step}: ${sec(k, step, 'kernel').stderr}`).toBe(0);
      expect(sec(d, step, 'dmstate').rc, `dmstate ${step}: ${sec(d, step, 'dmstate').stderr}`).toBe(0);
    }
    expect(sec(k, 'f-status-inactive-before-remove', 'kernel').stdout).toBe(`0 ${SMALL} snapshot-merge 0/4096 0\n`);
    expect(sec(k, 'f-status-inactive-after-remove', 'kernel').stdout).toBe(`0 ${SMALL} snapshot-merge Invalid\n`);
    expect(sec(k, 'f-status-final', 'kernel').stdout).toBe(`0 ${SMALL} snapshot-merge Invalid\n`);
    expect(sec(k, 'f-md5-merged', 'kernel').stdout, 'kernel: the origin, not merged').toBe(expected.get('f-unmerged'));
    for (const step of ['f-status-inactive-after-remove', 'f-status-final']) {
      expect(sec(d, step, 'dmstate').stdout, `dmstate ${step}`).toBe(sec(k, step, 'kernel').stdout);
    }
    expect(sec(d, 'f-md5-merged', 'dmstate').stdout, 'dmstate: the origin, not merged').toBe(expected.get('f-unmerged'));
  });

  test('H: the origin resumed while the snapshot is not suspended: refused on both sides, the same state left; then LVM\'s order merges', (ctx) => {
    skipIfNoKernel(ctx);
    const stateLines = (s: Section): string => s.stdout.split('\n').filter((l) => /^(State|Tables present):/.test(l)).join('\n');
    for (const [side, who] of [[k, 'kernel'], [d, 'dmstate']] as const) {
      for (const step of ['h-create-orig', 'h-create-snap', 'h-suspend-orig', 'h-load', 'h-info-orig', 'h-suspend-snap', 'h-resume-orig', 'h-remove-snap', 'h-remove-orig']) {
        expect(sec(side, step, who).rc, `${who} ${step}: ${sec(side, step, who).stderr}`).toBe(0);
      }
      // snapshot_preresume: -EINVAL, dmsetup fails.
      for (const step of ['h-resume-refused', 'h-resume-snap-refused']) expect(sec(side, step, who).rc, `${who} ${step}`).toBe(1);
      // do_resume swapped the table in before the preresume failed: suspended, snapshot-merge live, no inactive table.
      expect(stateLines(sec(side, 'h-info-orig', who)), `${who}: info of the origin after the refused resume`).toBe('State:             SUSPENDED\nTables present:    LIVE');
      expect(sec(side, 'h-table-inactive', who).stdout, `${who}: no inactive table`).toBe('\n');
      for (const step of ['h-md5-snap', 'h-md5-snap-refused', 'h-md5-merged']) expect(sec(side, step, who).stdout, `${who} ${step}`).toBe(expected.get('h'));
      checkSamples(side, 'h-samples', who, SMALL, 4096, sequences.get('h')!);
    }
    expect(sec(k, 'h-status-orig', 'kernel').stdout).toBe(`0 ${SMALL} snapshot-merge 0/4096 0\n`);
    expect(sec(k, 'h-status-snap-after-handover', 'kernel').stdout).toBe(`0 ${SMALL} snapshot Invalid\n`);
    for (const step of ['h-status-orig', 'h-status-snap', 'h-status-snap-after-handover', 'h-status-final']) {
      expect(sec(d, step, 'dmstate').stdout, `dmstate ${step}`).toBe(sec(k, step, 'kernel').stdout);
    }
    // dmstate says why, in the kernel's words (the kernel logs them: DMERR).
    expect(sec(d, 'h-resume-refused', 'dmstate').stderr).toContain('horig: snapshot-merge: preresume failed: Unable to perform snapshot handover until source is suspended.');
    expect(sec(d, 'h-resume-snap-refused', 'dmstate').stderr).toContain('hsnap: snapshot: preresume failed: Unable to resume snapshot source until handover completes.');
  });

  test('parity: `dmsetup status --inactive` of the snapshot-merge table waiting for the handover: 0/<COW sectors> 0', (ctx) => {
    skipIfNoKernel(ctx);
    // The kernel defers reading the COW to the handover (chunk size 0 until then).
    for (const sc of ['a', 'b', 'd', 'e']) {
      const [size, total] = sc === 'a' || sc === 'b' ? [S, COW_BYTES / SECTOR] : [SMALL, 4096];
      const kernel = sec(k, `${sc}-status-inactive`, 'kernel').stdout;
      expect(kernel, `kernel ${sc}`).toBe(`0 ${size} snapshot-merge 0/${total} 0\n`);
      expect(sec(d, `${sc}-status-inactive`, 'dmstate').stdout, `dmstate ${sc}`).toBe(kernel);
    }
    expect(sec(d, 'f-status-inactive-before-remove', 'dmstate').stdout).toBe(sec(k, 'f-status-inactive-before-remove', 'kernel').stdout);
  });
});

// ---- dmstate merge NAME (the command line) ------------------------------------------------------------------------

describe('dmstate merge NAME', () => {
  let dir = '';
  let pool = '';
  let daemon: ChildProcess | undefined;
  const dmsetup = (...args: string[]): Promise<RunResult> => run(process.execPath, [CLI, 'dmsetup', '--pool', pool, ...args]);
  const merge = (name: string): Promise<RunResult> => run(process.execPath, [CLI, 'merge', '--pool', pool, name], 120_000);

  beforeAll(async () => {
    await buildOnce();
    dir = fs.mkdtempSync('/tmp/dmc-');
    pool = path.join(dir, 'p');
    daemon = await startBuiltDaemon(pool);
  }, 120_000);

  afterAll(async () => {
    if (daemon) await stopDaemon(daemon);
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  });

  test('progress lines, "merge done", the origin linear again (no snapshot left, as lvconvert leaves it), exit 0; the origin holds the snapshot', async () => {
    const size = 16384; // 8 MiB
    const originImg = path.join(dir, 'o.img');
    const cowImg = path.join(dir, 'c.img');
    const origin = writeData(0, 0, size);
    // 1200 shuffled single-chunk runs: long enough for several progress lines (one a second without a tty).
    const cow = craftCow({ chunkSectors: CHUNK, oldChunks: Array.from({ length: 1200 }, (_, i) => (i * 7) % (size / CHUNK)), order: 'shuffled', seed: 1, cowSectors: 16384 });
    fs.writeFileSync(originImg, origin);
    fs.writeFileSync(cowImg, cow.image);
    for (const args of [
      ['create', 'orig', '--table', `0 ${size} snapshot-origin ${originImg}`],
      ['create', 'snap', '--table', `0 ${size} snapshot ${originImg} ${cowImg} P ${CHUNK}`],
    ]) {
      const r = await dmsetup(...args);
      expect(r.code, show(r)).toBe(0);
    }
    const t0 = performance.now();
    const r = await merge('snap');
    const seconds = (performance.now() - t0) / 1000;
    expect(r.code, show(r)).toBe(0);
    expect(r.stdout).toBe('');
    const lines = r.stderr.split('\n').filter((l) => l !== '');
    expect(lines[0]).toBe(`merging snapshot snap into orig (origin ${originImg}, COW ${cowImg}, chunk ${CHUNK} sectors)`);
    const progress = lines.slice(1, -1);
    expect(progress.length).toBeGreaterThanOrEqual(1);
    const re = /^\[([#.]{30})\] +(\d+\.\d)% {2}(\d+)\/1200 chunks {2}(\d+) chunks\/s {2}ETA (\d+:\d\d|--:--)$/;
    let last = -1;
    for (const l of progress) {
      const m = re.exec(l);
      expect(m, `progress line "${l}"`).not.toBeNull();
      const merged = Number(m![3]);
      expect(merged).toBeGreaterThanOrEqual(last);
      last = merged;
      expect(m![2], 'percent, one decimal').toBe(((100 * merged) / 1200).toFixed(1));
      expect(m![1].replace(/\./g, '').length).toBe(Math.round((30 * merged) / 1200));
    }
    expect(progress[progress.length - 1]).toMatch(/^\[#{30}\] 100\.0% {2}1200\/1200 chunks {2}\d+ chunks\/s {2}ETA 0:00$/);
    expect(lines[lines.length - 1]).toBe(`merge done: 1200 chunks in ${/in (\d+:\d\d);/.exec(lines[lines.length - 1])?.[1]}; orig is a linear mapping of ${originImg} again (no snapshot of it left)`);
    expect((await dmsetup('table', 'orig')).stdout).toBe(`0 ${size} linear ${originImg} 0\n`);
    expect((await dmsetup('ls')).stdout).not.toMatch(/^snap\t/m);
    expect((await dmsetup('info', '-c', '--noheadings', 'orig')).stdout.split(':')[3]).toBe('L--w'); // live, not suspended
    expect(md5(fs.readFileSync(originImg))).toBe(md5(snapshotImage(origin, cow)));
    console.log(`dmstate merge: 1200 chunks in ${seconds.toFixed(1)} s, ${progress.length} progress lines; last: ${progress[progress.length - 1]}`);
  });

  test('a busy snapshot: a clear error, exit 1, nothing changed', async () => {
    const size = 2048;
    const originImg = path.join(dir, 'o2.img');
    const cowImg = path.join(dir, 'c2.img');
    fs.writeFileSync(originImg, writeData(0, 0, size));
    fs.writeFileSync(cowImg, craftCow({ chunkSectors: CHUNK, oldChunks: [1, 2, 3], order: 'ascending', cowSectors: 2048 }).image);
    for (const args of [
      ['create', 'orig2', '--table', `0 ${size} snapshot-origin ${originImg}`],
      ['create', 'snap2', '--table', `0 ${size} snapshot ${originImg} ${cowImg} P ${CHUNK}`],
      ['create', 'user', '--table', `0 ${size} linear snap2 0`],
    ]) {
      const r = await dmsetup(...args);
      expect(r.code, show(r)).toBe(0);
    }
    const before = ['table', 'status', 'info'].map((c) => dmsetup(c));
    const snapshotBefore = await Promise.all(before);
    const r = await merge('snap2');
    expect(r.code, show(r)).toBe(1);
    expect(r.stderr).toBe('dmstate: snap2: the snapshot is in use (open count 1); close its users first\n');
    const after = await Promise.all(['table', 'status', 'info'].map((c) => dmsetup(c)));
    expect(after.map((x) => x.stdout)).toEqual(snapshotBefore.map((x) => x.stdout));
    // Not a snapshot, and a name that does not exist.
    const notSnap = await merge('user');
    expect(notSnap.code).not.toBe(0);
    expect(notSnap.stderr).toBe('dmstate: user: not a snapshot (its table is linear)\n');
    const missing = await merge('nosuch');
    expect(missing.code).not.toBe(0);
    expect(missing.stderr).toMatch(/^dmstate: .*nosuch/);
    for (const n of ['user', 'snap2', 'orig2']) expect((await dmsetup('remove', n)).code).toBe(0);
  });
});
