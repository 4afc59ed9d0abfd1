/**
 * dmsetup parity: one kernel VM boot runs a sequence of dmsetup commands on Linux 6.1's device-mapper; the same
 * sequence then runs against dmstate (a daemon on a tmp pool, reached through the real CLI). Per command: the exit
 * codes must match and stdout must match byte for byte once the kernel's device numbers are mapped to what
 * dmstate prints (254:0 -> the first image file, 253:N -> the mapped device's name). Error messages differ by
 * design (dmstate gives its own reason), so for failing commands only the exit code (and stdout, which dmsetup
 * prints for the names before a failing one) and, where dmsetup prints it, the closing "Command failed." are
 * checked.
 *
 * Needs the kernel VM (test/kernel/setup.sh, run by the test). If it cannot be set up the test fails with the
 * reason, unless DMSTATE_SKIP_KERNEL=1.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { ensureKernel, kernelSkipRequested, runKernelJob } from './kernel-vm.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const CLI = path.join(ROOT, 'bin/dmstate.js');

interface Step {
  /** Shell text; $D1 $D2 are the two disks, $T a scratch folder (same script on both sides). */
  readonly cmd: string;
  /** Shell run before the command, not compared (writes table files). */
  readonly pre?: string;
  /** How to compare: stdout + exit code (default), only the Driver version line, or the common targets. */
  readonly check?: 'stdout' | 'driver-version' | 'targets';
}

const STEPS: readonly Step[] = [
  { cmd: 'dmsetup version', check: 'driver-version' },
  { cmd: 'dmsetup targets', check: 'targets' },
  // nothing yet
  { cmd: 'dmsetup ls' },
  { cmd: 'dmsetup status' },
  { cmd: 'dmsetup table' },
  { cmd: 'dmsetup info' },
  { cmd: 'dmsetup info -c' },
  // linear (single line, multi-line with offsets), error, zero, stacked, no table, uuid, read-only
  { cmd: 'dmsetup create lin1 --table "0 2048 linear $D1 0"' },
  { pre: `printf '0 1024 linear %s 4096\\n1024 2048 linear %s 100\\n' "$D1" "$D2" > "$T/multi"`, cmd: 'dmsetup create multi "$T/multi"' },
  { cmd: 'dmsetup create err1 --table "0 100 error"' },
  { cmd: 'dmsetup create z1 --table "0 300 zero"' },
  { cmd: 'dmsetup create empty --notable' },
  { cmd: 'dmsetup mknodes' },
  { cmd: 'dmsetup create stack --table "0 1000 linear /dev/mapper/lin1 24"' },
  { cmd: 'dmsetup create withuuid -u my-uuid-1 --table "0 64 zero"' },
  { cmd: 'dmsetup create ro -r --table "0 8 zero"' },
  // a suspended device with an inactive table
  { cmd: 'dmsetup create susp --table "0 128 zero"' },
  { cmd: 'dmsetup suspend susp' },
  { cmd: 'dmsetup load susp --table "0 256 error"' },
  { cmd: 'dmsetup info susp' },
  { cmd: 'dmsetup info -c susp' },
  { cmd: 'dmsetup status susp' },
  { cmd: 'dmsetup table susp' },
  { cmd: 'dmsetup table --inactive susp' },
  { cmd: 'dmsetup status --inactive susp' },
  // listings, with and without names
  { cmd: 'dmsetup ls' },
  { cmd: 'dmsetup status' },
  { cmd: 'dmsetup table' },
  { cmd: 'dmsetup table lin1' },
  { cmd: 'dmsetup table multi' },
  { cmd: 'dmsetup status multi' },
  { cmd: 'dmsetup table stack' },
  { cmd: 'dmsetup status lin1 multi' },
  { cmd: 'dmsetup info' },
  { cmd: 'dmsetup info -c' },
  { cmd: 'dmsetup info lin1 empty withuuid ro' },
  { cmd: 'dmsetup info -c ro lin1' },
  { cmd: 'dmsetup info -c --noheadings' },
  { cmd: 'dmsetup table --inactive' },
  { cmd: 'dmsetup status --inactive' },
  { cmd: 'dmsetup table empty' },
  { cmd: 'dmsetup status empty' },
  // --target filters
  { cmd: 'dmsetup ls --target linear' },
  { cmd: 'dmsetup ls --target zero' },
  { cmd: 'dmsetup ls --target striped' },
  { cmd: 'dmsetup status --target linear' },
  { cmd: 'dmsetup status --target striped' },
  { cmd: 'dmsetup table --target zero' },
  { cmd: 'dmsetup table --target linear multi' },
  { cmd: 'dmsetup status --target zero ro lin1' },
  { cmd: 'dmsetup info --target zero' },
  { cmd: 'dmsetup info -c --target linear' },
  // errors: bad tables (nothing may be left behind), unknown devices, duplicates, busy devices
  { cmd: 'dmsetup create bad1 --table "0 100 nosuch"' },
  { cmd: 'dmsetup create bad2 --table "0 100 linear $D1"' },
  { cmd: 'dmsetup create bad3 --table "0 100 zero extra"' },
  { pre: `printf '0 100 zero\\n200 100 zero\\n' > "$T/gap"`, cmd: 'dmsetup create bad4 "$T/gap"' },
  { pre: `printf '0 100 zero\\n50 100 zero\\n' > "$T/overlap"`, cmd: 'dmsetup create bad5 "$T/overlap"' },
  { cmd: 'dmsetup create bad6 --table "0 2048 linear $D2 16000"' },
  { cmd: 'dmsetup create bad7 --table "0 100 linear $T/missing.img 0"' },
  { cmd: 'dmsetup create bad8 --table "x 100 zero"' },
  { cmd: 'dmsetup create bad9 --table "0 0 zero"' },
  { cmd: 'dmsetup create bad10 "$T/nosuch.table"' },
  { cmd: 'dmsetup create' },
  { cmd: 'dmsetup frobnicate' },
  { cmd: 'dmsetup ls --bogus' },
  { cmd: 'dmsetup ls' },
  { cmd: 'dmsetup status nosuch' },
  { cmd: 'dmsetup table nosuch' },
  { cmd: 'dmsetup info nosuch' },
  { cmd: 'dmsetup remove nosuch' },
  { cmd: 'dmsetup suspend nosuch' },
  { cmd: 'dmsetup load nosuch --table "0 1 zero"' },
  { cmd: 'dmsetup status lin1 nosuch' },
  { cmd: 'dmsetup status nosuch lin1' },
  { cmd: 'dmsetup info nosuch ro' },
  { cmd: 'dmsetup info ro nosuch' },
  { cmd: 'dmsetup info -c ro nosuch' },
  { cmd: 'dmsetup create lin1 --table "0 10 zero"' },
  { cmd: 'dmsetup remove lin1' },
  { cmd: 'dmsetup info -c lin1' },
  { cmd: 'dmsetup table lin1' },
  // inactive table on a live device, clear, resume swapping the table in
  { cmd: 'dmsetup load z1 --table "0 100 error"' },
  { cmd: 'dmsetup info z1' },
  { cmd: 'dmsetup clear z1' },
  { cmd: 'dmsetup info -c z1' },
  { cmd: 'dmsetup resume susp' },
  { cmd: 'dmsetup table susp' },
  { cmd: 'dmsetup info susp' },
  // removal
  { cmd: 'dmsetup remove stack' },
  { cmd: 'dmsetup remove lin1' },
  { cmd: 'dmsetup remove empty ro' },
  { cmd: 'dmsetup ls' },
  { cmd: 'dmsetup remove_all' },
  { cmd: 'dmsetup ls' },
];

/**
 * The section printer. Stdout and stderr go to files first so one gets a trailing newline added (and taken off
 * when parsing) and the markers always start a line. In the kernel, `dmsetup ls` after each command gives the
 * minor -> name map for that moment.
 */
const sectionFunction = (withMap: boolean): string =>
  `c() { n=$1; shift; "$@" >"$T/out" 2>"$T/err"; rc=$?; echo "@@@ CMD $n"; cat "$T/out"; echo; echo "@@@ RC $rc"; ` +
  `echo "@@@ STDERR"; cat "$T/err"; echo; ${withMap ? 'echo "@@@ MAP"; dmsetup ls 2>/dev/null; ' : ''}echo "@@@ END $n"; }`;

const jobBody = (): string => STEPS.map((s, i) => `${s.pre ? s.pre + '\n' : ''}c ${i} ${s.cmd}`).join('\n') + '\n';

const KERNEL_SCRIPT = [
  'echo 1 > /proc/sys/kernel/printk', // keep device-mapper's console messages out of the job's output
  'D1=/dev/vda; D2=/dev/vdb; T=/tmp/parity; mkdir -p "$T"',
  'echo "@@@ DISKS"; cat /sys/block/vda/dev /sys/block/vdb/dev; echo "@@@ END DISKS"',
  sectionFunction(true),
  jobBody(),
].join('\n');

const DMSTATE_SCRIPT = [
  'dmsetup() { node "$DMSTATE_CLI" dmsetup --pool "$DMSTATE_POOL" "$@"; }',
  sectionFunction(false),
  jobBody(),
].join('\n');

interface Section {
  readonly stdout: string;
  readonly rc: number;
  readonly stderr: string;
  /** Kernel only: `253:N` -> device name, from `dmsetup ls` right after the command. */
  readonly map: Map<string, string>;
}

function parseSections(output: string): Map<number, Section> {
  const re = /^@@@ CMD (\d+)\n([\s\S]*?)\n@@@ RC (\d+)\n@@@ STDERR\n([\s\S]*?)\n(?:@@@ MAP\n([\s\S]*?))?@@@ END \1$/gm;
  const sections = new Map<number, Section>();
  for (const m of output.matchAll(re)) {
    const map = new Map<string, string>();
    for (const l of (m[5] ?? '').split('\n')) {
      const lm = /^(\S+)\t\((\d+)[:,] ?(\d+)\)$/.exec(l);
      if (lm) map.set(`${lm[2]}:${lm[3]}`, lm[1]);
    }
    sections.set(Number(m[1]), { stdout: m[2], rc: Number(m[3]), stderr: m[4], map });
  }
  return sections;
}

/** Table lines: the kernel's major:minor device arguments become what dmstate prints (file path, device name). */
function normalizeKernelStdout(stdout: string, devices: Map<string, string>): string {
  return stdout
    .split('\n')
    .map((line) => {
      const m = /^((?:\S+: )?\d+ \d+ \S+ )(.*)$/.exec(line);
      return m ? m[1] + m[2].replace(/\b\d+:\d+\b/g, (t) => devices.get(t) ?? t) : line;
    })
    .join('\n');
}

function warnIfDistStale(): void {
  const built = path.join(ROOT, 'dist/src/frontends/cli/main.js');
  if (!fs.existsSync(built)) throw new Error(`${built} is missing: run npx tsc -p tsconfig.build.json (npm run build) first`);
  const builtAt = fs.statSync(built).mtimeMs;
  const stale = ['src/frontends/dmsetup', 'src/frontends', 'src/core']
    .flatMap((d) => fs.readdirSync(path.join(ROOT, d)).filter((f) => f.endsWith('.ts')).map((f) => path.join(d, f)))
    .filter((f) => fs.statSync(path.join(ROOT, f)).mtimeMs > builtAt);
  if (stale.length) console.warn(`dmsetup-parity: dist/ is older than ${stale.join(', ')}; the CLI runs the old build`);
}

function makeImage(file: string, mib: number): string {
  fs.writeFileSync(file, '');
  fs.truncateSync(file, mib * 1024 * 1024);
  return file;
}

/** Starts `dmstate serve` and resolves once it says it is serving. */
function startDaemon(pool: string): Promise<ChildProcess> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [CLI, 'serve', '--pool', pool], { stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    const timer = setTimeout(() => reject(new Error(`dmstate serve did not start in 15 s: ${stderr}`)), 15_000);
    child.stderr!.setEncoding('utf8').on('data', (c: string) => {
      stderr += c;
      if (stderr.includes('serving pool')) {
        clearTimeout(timer);
        resolve(child);
      }
    });
    child.on('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`dmstate serve exited ${code}: ${stderr}`));
    });
  });
}

function runShell(script: string, env: Record<string, string>, timeoutMs: number): Promise<{ stdout: string; code: number | null }> {
  return new Promise((resolve, reject) => {
    const child = spawn('sh', ['-c', script], { stdio: ['ignore', 'pipe', 'inherit'], env: { ...process.env, ...env } });
    let stdout = '';
    child.stdout.setEncoding('utf8').on('data', (c: string) => (stdout += c));
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
    child.on('error', reject);
    child.on('close', (code) => {
      clearTimeout(timer);
      resolve({ stdout, code });
    });
  });
}

describe('dmsetup parity with the Linux 6.1 kernel', () => {
  let skipReason: string | undefined;
  let tmp: string | undefined;
  let daemon: ChildProcess | undefined;
  let kernel: Map<number, Section>;
  let dmstate: Map<number, Section>;
  /** Kernel device numbers of the disks -> the image files dmstate used. */
  const diskMap = new Map<string, string>();

  beforeAll(async () => {
    const status = await ensureKernel();
    if (!status.ok) {
      if (kernelSkipRequested()) {
        skipReason = status.reason;
        console.warn(`dmsetup-parity: SKIPPED (DMSTATE_SKIP_KERNEL=1): ${status.reason}`);
        return;
      }
      throw new Error(`the kernel VM is unavailable (set DMSTATE_SKIP_KERNEL=1 to skip): ${status.reason}`);
    }
    warnIfDistStale();
    tmp = fs.mkdtempSync('/tmp/dmp-'); // short: the control socket path must stay under 108 bytes
    const kernelDisks = [makeImage(path.join(tmp, 'k1.img'), 16), makeImage(path.join(tmp, 'k2.img'), 8)];
    const dmDisks = [makeImage(path.join(tmp, 'd1.img'), 16), makeImage(path.join(tmp, 'd2.img'), 8)];
    const scratch = path.join(tmp, 't');
    fs.mkdirSync(scratch);
    const pool = path.join(tmp, 'p');
    daemon = await startDaemon(pool);
    // The VM and the dmstate run use separate images, so they run side by side.
    const [k, d] = await Promise.all([
      runKernelJob(KERNEL_SCRIPT, kernelDisks),
      runShell(DMSTATE_SCRIPT, { DMSTATE_CLI: CLI, DMSTATE_POOL: pool, D1: dmDisks[0], D2: dmDisks[1], T: scratch }, 240_000),
    ]);
    const disks = /@@@ DISKS\n([\s\S]*?)\n@@@ END DISKS/.exec(k.output);
    if (!disks) throw new Error(`kernel job printed no disk numbers:\n${k.output.slice(0, 2000)}`);
    disks[1].split('\n').forEach((dev, i) => diskMap.set(dev.trim(), dmDisks[i]));
    kernel = parseSections(k.output);
    dmstate = parseSections(d.stdout);
    if (kernel.size !== STEPS.length) throw new Error(`kernel job gave ${kernel.size} of ${STEPS.length} sections (rc=${k.rc}):\n${k.output.slice(-3000)}`);
    if (dmstate.size !== STEPS.length) throw new Error(`dmstate run gave ${dmstate.size} of ${STEPS.length} sections:\n${d.stdout.slice(-3000)}`);
  }, 20 * 60_000);

  afterAll(async () => {
    if (daemon && daemon.exitCode === null) {
      const exited = new Promise((r) => daemon!.once('exit', r));
      daemon.kill('SIGTERM');
      await Promise.race([exited, new Promise((r) => setTimeout(r, 5000))]);
      if (daemon.exitCode === null) daemon.kill('SIGKILL');
    }
    if (tmp) fs.rmSync(tmp, { recursive: true, force: true });
  });

  STEPS.forEach((step, i) => {
    test(`#${i} ${step.cmd}`, (ctx) => {
      if (skipReason !== undefined) ctx.skip();
      const k = kernel.get(i)!;
      const d = dmstate.get(i)!;
      const devices = new Map([...diskMap, ...k.map]);
      const check = step.check ?? 'stdout';
      if (check === 'driver-version') {
        expect(k.rc).toBe(0);
        expect(d.rc).toBe(0);
        const driverLine = (s: string): string | undefined => s.split('\n').find((l) => l.startsWith('Driver version:'));
        expect(driverLine(d.stdout), 'the Driver version line').toBe(driverLine(k.stdout));
        expect(d.stdout).toMatch(/^Library version: {3}\S/m);
        return;
      }
      if (check === 'targets') {
        expect(d.rc).toBe(k.rc);
        const kernelLines = new Map(k.stdout.split('\n').filter(Boolean).map((l) => [l.split(/\s+/)[0], l]));
        const common = d.stdout.split('\n').filter((l) => kernelLines.has(l.split(/\s+/)[0]));
        expect(common.map((l) => l.split(/\s+/)[0])).toEqual(expect.arrayContaining(['linear', 'zero', 'error']));
        for (const l of common) expect(l, 'a target both have: same line (name padded to 16, version)').toBe(kernelLines.get(l.split(/\s+/)[0]));
        return;
      }
      const expected = normalizeKernelStdout(k.stdout, devices);
      const report = `\n--- kernel stdout (normalized):\n${expected}\n--- dmstate stdout:\n${d.stdout}\n--- dmstate stderr:\n${d.stderr}\n--- kernel stderr:\n${k.stderr}`;
      expect(d.rc, `exit code of \`${step.cmd}\`${report}`).toBe(k.rc);
      expect(d.stdout, `stdout of \`${step.cmd}\`${report}`).toBe(expected);
      // Where dmsetup closes a failure with "Command failed.", dmstate gives a reason line and the same close.
      if (k.rc !== 0 && /Command failed\.\n$/.test(k.stderr)) {
        expect(d.stderr, `dmstate's stderr of \`${step.cmd}\`: a reason, then "Command failed."`).toMatch(/^\S[\s\S]*\nCommand failed\.\n$/);
      }
    });
  });
});
