/**
 * dm-snapshot interop with Linux 6.1: the same seeded workload on the kernel and on dmstate, then each side loads
 * the COW devices the other one wrote.
 *
 * Devices (both sides): `orig` = snapshot-origin over a 16 MiB origin image pre-filled with seeded data; snapshots
 * `s8a` (P 8), `s32` (P 32), `s8b` (P 8) with 8 MiB COWs, and `tiny` (PO 8) with a 64 KiB COW that the workload
 * overflows (the kernel invalidates it, PO or not, when an origin write finds it full). The workload writes
 * seeded data at seeded sector offsets and lengths to the origin and to the snapshots, one 2 MiB origin write
 * among them (so the chunk-8 COWs fill metadata area 0 and go on in area 1). Kernel: busybox dd (O_DIRECT, one
 * write per op) from a pattern disk; dmstate: qemu-io over NBD (one write per op), driven through the real CLI.
 *
 * Two VM boots, each beside a dmstate run:
 *   boot 1 ‖ dmstate run 1: the workload on each side's own images, then `dmsetup status`, `dmsetup table`, md5
 *                           of every readable device, a clean remove, and the header-wins check (the chunk-8 COW
 *                           loaded with a `P 32` table: the header's 8 wins).
 *                           dmstate then replays the origin's and s8a's writes on a second pool and shuts that
 *                           daemon down (SIGTERM) with the snapshot still mapped.
 *   boot 2 ‖ dmstate run 2: each side loads the images the OTHER side wrote (kernel ← dmstate's COWs and the
 *                           shut-down pool's, dmstate ← the kernel's) with the same tables, same checks, no writes.
 * Everything is compared after naming devices by role (the kernel prints 254:N, dmstate prints file paths); md5s
 * are also checked against a model computed here, and the COW metadata of both sides is parsed and compared.
 *
 * Needs the kernel VM (test/kernel/setup.sh), qemu-io/qemu-img and the build in dist/ (the CLI runs it); if the VM
 * cannot be set up the test fails with the reason, unless DMSTATE_SKIP_KERNEL=1. DMSTATE_KEEP_TMP=1 keeps the
 * images (the folder is printed) for a look with hexdump.
 */
import type { ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { ensureKernel, kernelSkipRequested, runKernelJob } from './kernel-vm.js';
import { run, startDaemon as startServe, stopDaemon } from '../helpers/process.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const CLI = path.join(ROOT, 'bin/dmstate.js');
const MiB = 1024 * 1024;
const SECTOR = 512;
const ORIGIN_SECTORS = 32768; // 16 MiB
const SEED = 0x5eed_0001;

interface SnapSpec {
  readonly name: string;
  readonly mode: 'P' | 'PO';
  readonly chunk: number;
  readonly cowBytes: number;
  /** The workload invalidates it: no md5 (reads fail), status `Invalid`. */
  readonly overflows?: boolean;
}

const SNAPS: readonly SnapSpec[] = [
  { name: 's8a', mode: 'P', chunk: 8, cowBytes: 8 * MiB },
  { name: 's32', mode: 'P', chunk: 32, cowBytes: 8 * MiB },
  { name: 's8b', mode: 'P', chunk: 8, cowBytes: 8 * MiB },
  { name: 'tiny', mode: 'PO', chunk: 8, cowBytes: 64 * 1024, overflows: true },
];
/** Devices whose content is compared (the origin and the snapshots that stay valid). */
const READABLE = ['orig', ...SNAPS.filter((s) => !s.overflows).map((s) => s.name)];
/** Header-wins check: the COW of `s8a` (header chunk 8) loaded with this table chunk size. */
const HW_TABLE_CHUNK = 32;

/** Roles of the disks: the kernel sees them as /dev/vda, /dev/vdb, ... in this order (the pattern disk last). */
const ROLES = ['origin', ...SNAPS.map((s) => `cow-${s.name}`)] as const;

// ---- the workload -----------------------------------------------------------------------------------------------

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

interface WriteOp {
  readonly dev: string;
  readonly sector: number;
  readonly sectors: number;
  readonly data: Buffer;
  /** Byte offset of `data` on the kernel's pattern disk. */
  readonly patternOffset: number;
}

function makeWorkload(seed: number): { ops: WriteOp[]; prefill: Buffer; pattern: Buffer } {
  const r = rng(seed);
  const int = (n: number): number => Math.floor(r() * n);
  const bytes = (n: number): Buffer => {
    const b = Buffer.alloc(n);
    for (let i = 0; i < n; i += 4) b.writeUInt32LE((r() * 0x1_0000_0000) >>> 0, i);
    return b;
  };
  const prefill = bytes(ORIGIN_SECTORS * SECTOR);
  const chunkOf = (dev: string): number => SNAPS.find((s) => s.name === dev)?.chunk ?? 8;
  // The origin gets half of the writes; the snapshots that stay valid the rest.
  const devs = ['orig', 'orig', 'orig', 'orig', 's8a', 's8a', 's32', 's8b'];
  const shapes: Array<{ dev: string; sector: number; sectors: number }> = [];
  for (let i = 0; i < 64; i++) {
    if (i === 24) {
      shapes.push({ dev: 'orig', sector: 16384, sectors: 4096 }); // 2 MiB: 512 chunk-8 exceptions (area 0 fills)
      continue;
    }
    const dev = devs[int(devs.length)];
    const kind = r();
    let sector: number;
    let sectors: number;
    if (kind < 0.25 && dev !== 'orig') {
      // Whole chunks, chunk-aligned (the snapshot's no-copy path).
      const c = chunkOf(dev);
      const n = 1 + int(3);
      sectors = c * n;
      sector = int(ORIGIN_SECTORS / c - n) * c;
    } else if (kind < 0.45 && shapes.length > 0) {
      // Over or next to an earlier write (chunks that already have exceptions, on any device).
      const p = shapes[int(shapes.length)];
      sectors = 1 + int(48);
      sector = Math.min(ORIGIN_SECTORS - sectors, Math.max(0, p.sector + int(p.sectors + 16) - 8));
    } else {
      sectors = 1 + int(r() < 0.8 ? 64 : 384);
      sector = int(ORIGIN_SECTORS - sectors + 1);
    }
    shapes.push({ dev, sector, sectors });
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

/** What each readable device must hold after the workload: the origin's writes on the origin only, each
 *  snapshot's own writes on the original data. */
function modelMd5(ops: readonly WriteOp[], prefill: Buffer): Map<string, string> {
  const out = new Map<string, string>();
  for (const dev of READABLE) {
    const img = Buffer.from(prefill);
    for (const op of ops) if (op.dev === dev) op.data.copy(img, op.sector * SECTOR);
    out.set(dev, md5(img));
  }
  return out;
}

const md5 = (b: Buffer): string => createHash('md5').update(b).digest('hex');

// ---- the steps (the same on both sides) -------------------------------------------------------------------------

type Step =
  | { readonly kind: 'dmsetup'; readonly name: string; readonly args: readonly string[] }
  /** md5 of a whole mapped device (stdout: the hash); `fails`: reading it must fail (an Invalid snapshot). */
  | { readonly kind: 'md5'; readonly name: string; readonly dev: string; readonly fails?: boolean }
  | { readonly kind: 'writes' };

const dm = (name: string, ...args: string[]): Step => ({ kind: 'dmsetup', name, args });

/**
 * The main sequence. `{origin}`, `{cow-s8a}`, ... in arguments are replaced by each side's device for that role.
 * Without writes it is the load check: the same tables over the images the other side left.
 */
function mainSteps(withWrites: boolean): Step[] {
  const s: Step[] = [dm('create-orig', 'create', 'orig', '--table', `0 ${ORIGIN_SECTORS} snapshot-origin {origin}`)];
  for (const sn of SNAPS) {
    s.push(dm(`create-${sn.name}`, 'create', sn.name, '--table', `0 ${ORIGIN_SECTORS} snapshot {origin} {cow-${sn.name}} ${sn.mode} ${sn.chunk}`));
  }
  s.push(dm('suspend-orig', 'suspend', 'orig'), dm('resume-orig', 'resume', 'orig'), dm('mknodes', 'mknodes'));
  if (withWrites) s.push({ kind: 'writes' });
  s.push(dm('status', 'status'), dm('table', 'table'));
  for (const sn of SNAPS) s.push(dm(`status-${sn.name}`, 'status', sn.name));
  for (const d of READABLE) s.push({ kind: 'md5', name: `md5-${d}`, dev: d });
  for (const sn of SNAPS) if (sn.overflows) s.push({ kind: 'md5', name: `md5-${sn.name}`, dev: sn.name, fails: true });
  s.push(dm('remove-snaps', 'remove', ...SNAPS.map((x) => x.name)), dm('remove-orig', 'remove', 'orig'));
  s.push(dm('hw-create', 'create', 'hw', '--table', `0 ${ORIGIN_SECTORS} snapshot {origin} {cow-s8a} P ${HW_TABLE_CHUNK}`));
  s.push(dm('hw-mknodes', 'mknodes'), dm('hw-status', 'status', 'hw'), dm('hw-table', 'table', 'hw'));
  s.push({ kind: 'md5', name: 'md5-hw', dev: 'hw' }, dm('hw-remove', 'remove', 'hw'), dm('ls', 'ls'));
  return s;
}

/** dmstate only: the origin's and s8a's writes on a second pool whose daemon is then shut down with the
 *  devices still mapped (SIGTERM): the COW must be complete without a `dmsetup remove`. */
const SHUTDOWN_STEPS: readonly Step[] = [
  dm('sd-create-orig', 'create', 'sdorig', '--table', `0 ${ORIGIN_SECTORS} snapshot-origin {sd-origin}`),
  dm('sd-create-snap', 'create', 'sdsnap', '--table', `0 ${ORIGIN_SECTORS} snapshot {sd-origin} {sd-cow} P 8`),
  dm('sd-suspend', 'suspend', 'sdorig'),
  dm('sd-resume', 'resume', 'sdorig'),
  { kind: 'writes' },
  dm('sd-status', 'status', 'sdsnap'),
  { kind: 'md5', name: 'md5-sdsnap', dev: 'sdsnap' },
  { kind: 'md5', name: 'md5-sdorig', dev: 'sdorig' },
];
const SHUTDOWN_RENAME: Readonly<Record<string, string>> = { orig: 'sdorig', s8a: 'sdsnap' };

/** The kernel (boot 2) loads what that daemon left. */
const KERNEL_SHUTDOWN_STEPS: readonly Step[] = [
  dm('sd-create-snap', 'create', 'sdsnap', '--table', `0 ${ORIGIN_SECTORS} snapshot {sd-origin} {sd-cow} P 8`),
  dm('sd-mknodes', 'mknodes'),
  dm('sd-status', 'status', 'sdsnap'),
  { kind: 'md5', name: 'md5-sdsnap', dev: 'sdsnap' },
  dm('sd-remove', 'remove', 'sdsnap'),
];

const outputSteps = (steps: readonly Step[]): number => steps.filter((s) => s.kind !== 'writes').length;

interface Section {
  readonly stdout: string;
  readonly rc: number;
  readonly stderr: string;
}
type Sections = Map<string, Section>;

const fill = (arg: string, devs: Readonly<Record<string, string>>): string => arg.replace(/\{([a-z0-9-]+)\}/g, (_, role: string) => devs[role]);

/** Shell quoting for the kernel job. */
const q = (s: string): string => `'${s.replace(/'/g, `'\\''`)}'`;

const vd = (i: number): string => `vd${String.fromCharCode(97 + i)}`;

/** The kernel job: `roles[i]` is /dev/vd(a+i); the role `pattern` is the disk the writes read their data from. */
function kernelScript(steps: readonly Step[], roles: readonly string[], ops: readonly WriteOp[]): string {
  const devs = Object.fromEntries(roles.map((role, i) => [role, `/dev/${vd(i)}`]));
  const lines = [
    'echo 1 > /proc/sys/kernel/printk',
    'T=/tmp/si; mkdir -p "$T"',
    `echo "@@@ DISKS"; for d in ${roles.map((_, i) => vd(i)).join(' ')}; do cat /sys/block/$d/dev; done; echo "@@@ END DISKS"`,
    'c() { n=$1; shift; "$@" >"$T/out" 2>"$T/err"; rc=$?; echo "@@@ CMD $n"; cat "$T/out"; echo; echo "@@@ RC $rc"; echo "@@@ STDERR"; cat "$T/err"; echo; echo "@@@ END $n"; }',
    // One O_DIRECT write of the whole op (the block layer and dm split it as any bio).
    `w() { dd if=${devs.pattern ?? '/dev/null'} of=/dev/mapper/$1 bs=$2 count=1 skip=$3 seek=$4 iflag=skip_bytes,fullblock oflag=seek_bytes,direct conv=notrunc 2>"$T/dd" || { echo "@@@ DDFAIL $*"; cat "$T/dd"; }; }`,
  ];
  for (const st of steps) {
    if (st.kind === 'dmsetup') lines.push(`c ${st.name} dmsetup ${st.args.map((a) => q(fill(a, devs))).join(' ')}`);
    else if (st.kind === 'md5') lines.push(`c ${st.name} md5sum /dev/mapper/${st.dev}`);
    else for (const op of ops) lines.push(`w ${op.dev} ${op.sectors * SECTOR} ${op.patternOffset} ${op.sector * SECTOR}`);
  }
  return lines.join('\n') + '\n';
}

function parseSections(output: string): Sections {
  const re = /^@@@ CMD (\S+)\n([\s\S]*?)\n@@@ RC (\d+)\n@@@ STDERR\n([\s\S]*?)\n@@@ END \1$/gm;
  const out: Sections = new Map();
  for (const m of output.matchAll(re)) {
    const stdout = m[1].startsWith('md5-') ? (m[2].split(/\s+/)[0] ?? '') : m[2];
    out.set(m[1], { stdout, rc: Number(m[3]), stderr: m[4] });
  }
  for (const l of output.split('\n')) if (l.startsWith('@@@ DDFAIL')) out.set(l.slice(4), { stdout: '', rc: -1, stderr: output.slice(output.indexOf(l), output.indexOf(l) + 500) });
  return out;
}

// ---- processes --------------------------------------------------------------------------------------------------

/** What the daemons printed (a crash report, if one crashed). */
let daemonStderr = '';

const startDaemon = (pool: string): Promise<ChildProcess> => startServe(CLI, pool, (c) => (daemonStderr += c));

/** Runs the steps on dmstate through the CLI; writes and reads through NBD with qemu-io / qemu-img. */
async function dmstateRun(pool: string, devs: Readonly<Record<string, string>>, steps: readonly Step[], ops: readonly WriteOp[], scratch: string): Promise<Sections> {
  const sock = path.join(pool, 'nbd.sock');
  const uri = (name: string): string => `nbd+unix:///${name}?socket=${sock}`;
  const out: Sections = new Map();
  for (const st of steps) {
    if (st.kind === 'dmsetup') {
      const r = await run(process.execPath, [CLI, 'dmsetup', '--pool', pool, ...st.args.map((a) => fill(a, devs))]);
      out.set(st.name, { stdout: r.stdout, rc: r.code ?? -1, stderr: r.stderr });
    } else if (st.kind === 'md5') {
      const file = path.join(scratch, `${st.dev}.raw`);
      const r = await run('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', uri(st.dev), file]);
      out.set(st.name, { stdout: r.code === 0 ? md5(fs.readFileSync(file)) : '', rc: r.code ?? -1, stderr: r.stderr });
      fs.rmSync(file, { force: true });
    } else {
      // Consecutive writes to one device in one qemu-io (its commands run in order, each one write request).
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
        const r = await run('qemu-io', ['-f', 'raw', uri(ops[i].dev), ...cmds]);
        if (r.code !== 0 || r.stdout.trim() !== '' || r.stderr.trim() !== '') {
          out.set(`DDFAIL qemu-io ${ops[i].dev} (ops ${i}..${j - 1})`, { stdout: r.stdout, rc: r.code === 0 ? -1 : (r.code ?? -1), stderr: r.stderr });
        }
        i = j;
      }
    }
  }
  return out;
}

// ---- COW metadata -----------------------------------------------------------------------------------------------

interface CowMeta {
  readonly magic: number;
  readonly valid: number;
  readonly version: number;
  readonly chunk: number;
  /** [old_chunk, new_chunk] in on-disk order. */
  readonly records: Array<[number, number]>;
}

function parseCow(file: string): CowMeta {
  const img = fs.readFileSync(file);
  const [magic, valid, version, chunk] = [0, 4, 8, 12].map((o) => img.readUInt32LE(o));
  const records: Array<[number, number]> = [];
  // Records are read even when the header says invalid (the kernel does not; here, to show what is there).
  if (magic === 0x70416e53 && chunk > 0) {
    const chunkBytes = chunk * SECTOR;
    const epa = chunkBytes / 16;
    for (let area = 0; ; area++) {
      const at = (1 + area * (epa + 1)) * chunkBytes;
      if (at + chunkBytes > img.length) break;
      let n = 0;
      for (; n < epa; n++) {
        const newChunk = Number(img.readBigUInt64LE(at + n * 16 + 8));
        if (newChunk === 0) break;
        records.push([Number(img.readBigUInt64LE(at + n * 16)), newChunk]);
      }
      if (n < epa) break;
    }
  }
  return { magic, valid, version, chunk, records };
}

// ---- the test ---------------------------------------------------------------------------------------------------

function warnIfDistStale(): void {
  const built = path.join(ROOT, 'dist/src/frontends/cli/main.js');
  if (!fs.existsSync(built)) throw new Error(`${built} is missing: run npx tsc -p tsconfig.build.json (npm run build) first`);
  const builtAt = fs.statSync(built).mtimeMs;
  const stale = ['src/targets/snapshot', 'src/stores', 'src/core', 'src/frontends/nbd', 'machines']
    .filter((d) => fs.existsSync(path.join(ROOT, d)))
    .flatMap((d) => fs.readdirSync(path.join(ROOT, d)).filter((f) => f.endsWith('.ts')).map((f) => path.join(d, f)))
    .filter((f) => fs.statSync(path.join(ROOT, f)).mtimeMs > builtAt);
  if (stale.length) console.warn(`snapshot-interop: dist/ is older than ${stale.join(', ')}; the CLI runs the old build`);
}

function makeImage(file: string, bytes: number, content?: Buffer): string {
  if (content) fs.writeFileSync(file, content);
  else {
    fs.writeFileSync(file, '');
    fs.truncateSync(file, bytes);
  }
  return file;
}

/** Replaces each side's device names by roles: the kernel's major:minor, dmstate's file paths. */
function byRole(text: string, names: ReadonlyMap<string, string>): string {
  let t = text;
  for (const [from, role] of [...names].sort((a, b) => b[0].length - a[0].length)) t = t.split(from).join(`<${role}>`);
  return t;
}

describe('dm-snapshot interop with the Linux 6.1 kernel', () => {
  let skipReason: string | undefined;
  let tmp: string | undefined;
  const daemons: ChildProcess[] = [];
  const timings: string[] = [];
  /**
   * k1: kernel on its images; d1: dmstate on its images; k2: kernel on dmstate's (and the shut-down pool's);
   * d2: dmstate on the kernel's; sd: dmstate's shutdown pool before the shutdown.
   */
  const runs: Record<'k1' | 'd1' | 'k2' | 'd2' | 'sd', Sections> = { k1: new Map(), d1: new Map(), k2: new Map(), d2: new Map(), sd: new Map() };
  type RunName = keyof typeof runs;
  let model: Map<string, string>;
  let shutdownExit: number | null = null;
  /** After run 1: the COWs as each side left them, and md5s of the images after runs 1 and 2. */
  const cowAfterRun1: Record<'k' | 'd', Map<string, CowMeta>> = { k: new Map(), d: new Map() };
  const imageMd5: Record<'k1' | 'd1' | 'k2' | 'd2', Map<string, string>> = { k1: new Map(), d1: new Map(), k2: new Map(), d2: new Map() };

  const sec = (run: RunName, name: string): Section => {
    const s = runs[run].get(name);
    if (!s) throw new Error(`${run}: no output for step ${name}`);
    return s;
  };

  beforeAll(async () => {
    const t0 = performance.now();
    const status = await ensureKernel();
    if (!status.ok) {
      if (kernelSkipRequested()) {
        skipReason = status.reason;
        console.warn(`snapshot-interop: SKIPPED (DMSTATE_SKIP_KERNEL=1): ${status.reason}`);
        return;
      }
      throw new Error(`the kernel VM is unavailable (set DMSTATE_SKIP_KERNEL=1 to skip): ${status.reason}`);
    }
    warnIfDistStale();

    const { ops, prefill, pattern } = makeWorkload(SEED);
    model = modelMd5(ops, prefill);
    const dir = (tmp = fs.mkdtempSync('/tmp/dsi-')); // short: socket paths must stay under 108 bytes
    const images = (side: string): Record<string, string> => {
      const r: Record<string, string> = { origin: makeImage(path.join(dir, `${side}-origin.img`), 0, prefill) };
      for (const s of SNAPS) r[`cow-${s.name}`] = makeImage(path.join(dir, `${side}-cow-${s.name}.img`), s.cowBytes);
      return r;
    };
    const kImages = images('k');
    const dImages = images('d');
    const sdImages = { 'sd-origin': makeImage(path.join(dir, 'sd-origin.img'), 0, prefill), 'sd-cow': makeImage(path.join(dir, 'sd-cow.img'), 8 * MiB) };
    const patternImg = makeImage(path.join(dir, 'pattern.img'), 0, pattern);
    const scratch = path.join(dir, 's');
    fs.mkdirSync(scratch);
    const pool = path.join(dir, 'p');
    daemons.push(await startDaemon(pool));
    timings.push(`setup ${((performance.now() - t0) / 1000).toFixed(1)} s`);

    const diskNames = (output: string, roles: readonly string[]): Map<string, string> => {
      const m = /@@@ DISKS\n([\s\S]*?)\n@@@ END DISKS/.exec(output);
      if (!m) throw new Error(`kernel job printed no disk numbers:\n${output.slice(0, 3000)}`);
      const names = new Map<string, string>();
      m[1].split('\n').forEach((dev, i) => names.set(dev.trim(), roles[i]));
      return names;
    };
    const pathNames = (imgs: Readonly<Record<string, string>>): Map<string, string> => new Map(Object.entries(imgs).map(([role, file]) => [file, role]));
    /** Status and table texts with <origin>, <cow-s8a>, ... in place of the devices. */
    const normalize = (s: Sections, names: Map<string, string>): Sections => new Map([...s].map(([k, v]) => [k, { ...v, stdout: byRole(v.stdout, names) }]));
    const timed = async <T>(label: string, p: Promise<T>): Promise<T> => {
      const t = performance.now();
      const r = await p;
      timings.push(`${label} ${((performance.now() - t) / 1000).toFixed(1)} s`);
      return r;
    };
    const hashImages = (into: Map<string, string>, imgs: Readonly<Record<string, string>>): void => {
      for (const [role, file] of Object.entries(imgs)) into.set(role, md5(fs.readFileSync(file)));
    };

    // Run 1: the workload, each side on its own images, side by side; dmstate then does the shutdown scenario.
    const roles1 = [...ROLES, 'pattern'];
    const roles2 = [...ROLES, 'sd-origin', 'sd-cow'];
    const dmstateImages: Record<string, string> = { ...dImages, ...sdImages };
    const [k1, d1] = await Promise.all([
      timed('kernel boot 1 (workload)', runKernelJob(kernelScript(mainSteps(true), roles1, ops), [...ROLES.map((r) => kImages[r]), patternImg], { timeoutMs: 240_000 })),
      timed(
        'dmstate run 1 (workload, then shutdown scenario)',
        (async () => {
          const main = await dmstateRun(pool, dImages, mainSteps(true), ops, scratch);
          const sdPool = path.join(dir, 'q');
          const sdDaemon = await startDaemon(sdPool);
          daemons.push(sdDaemon);
          const sdOps = ops.filter((o) => SHUTDOWN_RENAME[o.dev]).map((o) => ({ ...o, dev: SHUTDOWN_RENAME[o.dev] }));
          runs.sd = normalize(await dmstateRun(sdPool, sdImages, SHUTDOWN_STEPS, sdOps, scratch), pathNames(sdImages));
          shutdownExit = await stopDaemon(sdDaemon);
          return main;
        })(),
      ),
    ]);
    runs.k1 = normalize(parseSections(k1.output), diskNames(k1.output, roles1));
    runs.d1 = normalize(d1, pathNames(dImages));
    for (const side of ['k', 'd'] as const) {
      for (const s of SNAPS) cowAfterRun1[side].set(s.name, parseCow((side === 'k' ? kImages : dImages)[`cow-${s.name}`]));
    }
    hashImages(imageMd5.k1, kImages);
    hashImages(imageMd5.d1, dImages);

    // Run 2: each side loads what the other wrote (the kernel also loads what the shut-down daemon left).
    const [k2, d2] = await Promise.all([
      timed(
        'kernel boot 2 (loads dmstate COWs)',
        runKernelJob(kernelScript([...mainSteps(false), ...KERNEL_SHUTDOWN_STEPS], roles2, []), roles2.map((r) => dmstateImages[r]), { timeoutMs: 240_000 }),
      ),
      timed('dmstate run 2 (loads kernel COWs)', dmstateRun(pool, kImages, mainSteps(false), [], scratch)),
    ]);
    runs.k2 = normalize(parseSections(k2.output), diskNames(k2.output, roles2));
    runs.d2 = normalize(d2, pathNames(kImages));
    hashImages(imageMd5.k2, dImages); // the kernel loaded dmstate's images
    hashImages(imageMd5.d2, kImages);

    const expected: Record<RunName, number> = {
      k1: outputSteps(mainSteps(true)),
      d1: outputSteps(mainSteps(true)),
      k2: outputSteps(mainSteps(false)) + outputSteps(KERNEL_SHUTDOWN_STEPS),
      d2: outputSteps(mainSteps(false)),
      sd: outputSteps(SHUTDOWN_STEPS),
    };
    const raw: Partial<Record<RunName, string>> = { k1: k1.output, k2: k2.output };
    for (const name of Object.keys(runs) as RunName[]) {
      const got = [...runs[name].keys()].filter((k) => !k.startsWith('DDFAIL')).length;
      if (got !== expected[name]) {
        throw new Error(`${name}: ${got} of ${expected[name]} step outputs:\n${(raw[name] ?? JSON.stringify([...runs[name]], null, 1)).slice(-4000)}\n--- dmstate serve stderr:\n${daemonStderr.slice(-3000)}`);
      }
    }
    timings.push(`total ${((performance.now() - t0) / 1000).toFixed(1)} s`);
    console.log(`snapshot-interop timings: ${timings.join(', ')}`);
  }, 15 * 60_000);

  afterAll(async () => {
    for (const d of daemons) await stopDaemon(d);
    if (tmp && process.env.DMSTATE_KEEP_TMP === '1') console.log(`snapshot-interop: images kept in ${tmp}`);
    else if (tmp) fs.rmSync(tmp, { recursive: true, force: true });
  });

  const show = (run: RunName, name: string): string => {
    const s = runs[run].get(name);
    const daemonNote = run !== 'k1' && run !== 'k2' && s && s.rc !== 0 ? `\n--- dmstate serve stderr (tail):\n${daemonStderr.slice(-3000)}` : '';
    return s ? `[${run} ${name}] rc=${s.rc}\n${s.stdout}\n${s.stderr}${daemonNote}` : `[${run} ${name}] missing`;
  };
  const failingReads = new Set(SNAPS.filter((s) => s.overflows).map((s) => `md5-${s.name}`));

  test('every step succeeds on both sides in both runs (no failed write); reading the Invalid snapshot fails on both', (ctx) => {
    if (skipReason !== undefined) ctx.skip();
    for (const run of Object.keys(runs) as RunName[]) {
      for (const [name, s] of runs[run]) {
        if (failingReads.has(name)) expect(s.rc, `${show(run, name)}\nreading an Invalid snapshot must fail`).not.toBe(0);
        else expect(name.startsWith('DDFAIL') ? -1 : s.rc, show(run, name)).toBe(0);
      }
    }
  });

  test('(0) the kernel holds what the workload model says (the test itself is right)', (ctx) => {
    if (skipReason !== undefined) ctx.skip();
    for (const dev of READABLE) expect(sec('k1', `md5-${dev}`).stdout, `kernel md5 of ${dev}`).toBe(model.get(dev));
  });

  test('(1) same workload: dmstate device contents equal the kernel (md5 of origin and snapshots)', (ctx) => {
    if (skipReason !== undefined) ctx.skip();
    for (const dev of READABLE) expect(sec('d1', `md5-${dev}`).stdout, `dmstate md5 of ${dev}\n${show('d1', `md5-${dev}`)}`).toBe(sec('k1', `md5-${dev}`).stdout);
    expect(imageMd5.d1.get('origin'), 'the origin image file after run 1').toBe(imageMd5.k1.get('origin'));
  });

  test('(1) same workload: `dmsetup status` equal, every device (the overflowed PO snapshot Invalid)', (ctx) => {
    if (skipReason !== undefined) ctx.skip();
    expect(sec('d1', 'status').stdout, `${show('k1', 'status')}\n${show('d1', 'status')}`).toBe(sec('k1', 'status').stdout);
    for (const s of SNAPS) expect(sec('d1', `status-${s.name}`).stdout, `status ${s.name}`).toBe(sec('k1', `status-${s.name}`).stdout);
    expect(sec('k1', 'status-tiny').stdout).toBe(`0 ${ORIGIN_SECTORS} snapshot Invalid\n`);
  });

  test('(1) same workload: `dmsetup table` equal once 254:N and file paths are both named by role', (ctx) => {
    if (skipReason !== undefined) ctx.skip();
    const k = sec('k1', 'table').stdout;
    expect(k).toContain(`s8a: 0 ${ORIGIN_SECTORS} snapshot <origin> <cow-s8a> P 8\n`);
    expect(k).toContain(`tiny: 0 ${ORIGIN_SECTORS} snapshot <origin> <cow-tiny> PO 8\n`);
    expect(sec('d1', 'table').stdout, `${show('k1', 'table')}\n${show('d1', 'table')}`).toBe(k);
  });

  test('(1) COW metadata: same header, same exceptions (origin chunks) and count on both sides', (ctx) => {
    if (skipReason !== undefined) ctx.skip();
    const notes: string[] = [];
    const head = (m: CowMeta): string => `magic=${m.magic.toString(16)} valid=${m.valid} version=${m.version} chunk=${m.chunk}`;
    const olds = (m: CowMeta): number[] => m.records.map((r) => r[0]).sort((a, b) => a - b);
    for (const s of SNAPS) {
      const k = cowAfterRun1.k.get(s.name)!;
      const d = cowAfterRun1.d.get(s.name)!;
      expect(head(d), `${s.name}: COW header`).toBe(head(k));
      expect(head(k)).toBe(`magic=70416e53 valid=${s.overflows ? 0 : 1} version=1 chunk=${s.chunk}`);
      const same = JSON.stringify(d.records) === JSON.stringify(k.records);
      const bytes = imageMd5.k1.get(`cow-${s.name}`) === imageMd5.d1.get(`cow-${s.name}`) ? 'byte-identical' : 'differs';
      if (s.overflows) {
        // Invalid: nobody reads the records, so they may differ (the kernel wrote the areas before it invalidated).
        notes.push(`${s.name} (invalid): kernel left ${k.records.length} records in its areas, dmstate ${d.records.length}; image ${bytes}`);
        continue;
      }
      expect(d.records.length, `${s.name}: number of exceptions on disk`).toBe(k.records.length);
      expect(olds(d), `${s.name}: origin chunks with an exception`).toEqual(olds(k));
      notes.push(`${s.name}: ${k.records.length} records, ${same ? 'same' : 'different'} on-disk order and chunk mapping, image ${bytes}`);
    }
    console.log(`snapshot-interop COWs after run 1: ${notes.join('; ')}`);
  });

  test('(2) the kernel loads the COWs dmstate wrote: same contents, status and table as dmstate served', (ctx) => {
    if (skipReason !== undefined) ctx.skip();
    for (const dev of READABLE) expect(sec('k2', `md5-${dev}`).stdout, `kernel md5 of ${dev} over dmstate's images`).toBe(sec('d1', `md5-${dev}`).stdout);
    for (const s of SNAPS) {
      expect(sec('k2', `status-${s.name}`).stdout, `kernel status of ${s.name} over dmstate's COW`).toBe(sec('d1', `status-${s.name}`).stdout);
    }
    expect(sec('k2', 'status').stdout).toBe(sec('d1', 'status').stdout);
    expect(sec('k2', 'table').stdout).toBe(sec('d1', 'table').stdout);
  });

  test('(2) the kernel loads a COW left by a daemon shut down (SIGTERM) with the snapshot still mapped', (ctx) => {
    if (skipReason !== undefined) ctx.skip();
    expect(shutdownExit, `dmstate serve exit code after SIGTERM\n${daemonStderr.slice(-2000)}`).toBe(0);
    expect(sec('sd', 'md5-sdsnap').stdout, 'dmstate md5 of the snapshot before the shutdown').toBe(model.get('s8a'));
    expect(sec('sd', 'md5-sdorig').stdout, 'dmstate md5 of the origin before the shutdown').toBe(model.get('orig'));
    // The same origin and snapshot writes as s8a got in run 1: the same exceptions.
    expect(sec('sd', 'sd-status').stdout, 'dmstate status before the shutdown').toBe(sec('k1', 'status-s8a').stdout);
    expect(sec('k2', 'sd-status').stdout, 'kernel status over the COW the shut-down daemon left').toBe(sec('sd', 'sd-status').stdout);
    expect(sec('k2', 'md5-sdsnap').stdout, 'kernel md5 over the COW the shut-down daemon left').toBe(sec('sd', 'md5-sdsnap').stdout);
  });

  test('(3) dmstate loads the COWs the kernel wrote: same contents, status and table as the kernel served', (ctx) => {
    if (skipReason !== undefined) ctx.skip();
    for (const dev of READABLE) expect(sec('d2', `md5-${dev}`).stdout, `dmstate md5 of ${dev} over the kernel's images\n${show('d2', `md5-${dev}`)}`).toBe(sec('k1', `md5-${dev}`).stdout);
    for (const s of SNAPS) {
      expect(sec('d2', `status-${s.name}`).stdout, `dmstate status of ${s.name} over the kernel's COW\n${show('d2', `create-${s.name}`)}`).toBe(sec('k1', `status-${s.name}`).stdout);
    }
    expect(sec('d2', 'status').stdout).toBe(sec('k1', 'status').stdout);
    expect(sec('d2', 'table').stdout).toBe(sec('k1', 'table').stdout);
  });

  test('loading writes nothing: the images are unchanged by the other side loading and removing them', (ctx) => {
    if (skipReason !== undefined) ctx.skip();
    for (const [after, before, who] of [['k2', 'd1', "dmstate's images, loaded by the kernel"], ['d2', 'k1', "the kernel's images, loaded by dmstate"]] as const) {
      for (const [role, h] of imageMd5[after]) expect(h, `${who}: ${role}`).toBe(imageMd5[before].get(role));
    }
  });

  test('header wins: the chunk-8 COW with a `P 32` table is served with chunk 8, all four ways', (ctx) => {
    if (skipReason !== undefined) ctx.skip();
    const table = sec('k1', 'hw-table').stdout;
    expect(table).toBe(`0 ${ORIGIN_SECTORS} snapshot <origin> <cow-s8a> P 8\n`);
    expect(sec('k1', 'hw-status').stdout).toBe(sec('k1', 'status-s8a').stdout);
    for (const run of ['d1', 'k2', 'd2'] as const) {
      expect(sec(run, 'hw-table').stdout, `${run}: table of hw`).toBe(table);
      expect(sec(run, 'hw-status').stdout, `${run}: status of hw`).toBe(sec('k1', 'hw-status').stdout);
    }
    for (const run of ['k1', 'd1', 'k2', 'd2'] as const) expect(sec(run, 'md5-hw').stdout, `${run}: md5 of hw`).toBe(model.get('s8a'));
  });
});
