/**
 * Runs shell jobs on a real Linux kernel (Debian 12's 6.1 under qemu) for tests that compare dmstate with the
 * kernel's device-mapper. test/kernel/setup.sh installs what is needed (qemu, cpio, the kernel and dmsetup) and
 * test/kernel/run.sh boots the VM with raw image files as /dev/vda, /dev/vdb, ...
 *
 * A test that needs the kernel calls ensureKernel() (or kernelAvailable()) first. When setup fails (no root for
 * apt-get, no network) the test must fail with the reason, unless DMSTATE_SKIP_KERNEL=1 is set: then it skips
 * with a console note (see kernelSkipRequested()).
 */
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';

const HERE = path.dirname(fileURLToPath(import.meta.url));
export const SETUP_SH = path.join(HERE, 'setup.sh');
export const RUN_SH = path.join(HERE, 'run.sh');

export type KernelStatus = { readonly ok: true } | { readonly ok: false; readonly reason: string };

export interface KernelJobResult {
  /** What the job printed (stdout and stderr merged, as run.sh does), without kernel log lines. */
  readonly output: string;
  /** The job's exit code (from the `=== JOB END rc=N` marker). */
  readonly rc: number;
}

export interface KernelJobOptions {
  /** Kills the VM after this long (default 300 s; run.sh has its own VM_TIMEOUT too). */
  readonly timeoutMs?: number;
  /** MiB of guest memory (run.sh's VM_MEM). */
  readonly memMiB?: number;
}

/** Whether DMSTATE_SKIP_KERNEL=1 asks kernel tests to skip (instead of fail) when the kernel cannot be set up. */
export function kernelSkipRequested(): boolean {
  return process.env.DMSTATE_SKIP_KERNEL === '1';
}

/** A kernel console line such as `[    3.761234] device-mapper: ioctl: ...`. */
export const KERNEL_LOG_LINE = /^\[\s*\d+\.\d+\]/;

/** Drops kernel log lines (the guest console carries them interleaved with the job's output). */
export function stripKernelLog(text: string): string {
  return text
    .split('\n')
    .filter((l) => !KERNEL_LOG_LINE.test(l))
    .join('\n');
}

interface Spawned {
  readonly code: number | null;
  readonly signal: NodeJS.Signals | null;
  readonly stdout: string;
  readonly stderr: string;
  readonly error?: Error;
}

function run(cmd: string, args: readonly string[], timeoutMs: number, env: NodeJS.ProcessEnv = process.env): Promise<Spawned> {
  return new Promise((resolve) => {
    const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'], env, detached: true });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (c: string) => (stdout += c));
    child.stderr.setEncoding('utf8').on('data', (c: string) => (stderr += c));
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      try {
        process.kill(-child.pid!, 'SIGKILL'); // the whole group: run.sh, timeout, qemu
      } catch {
        child.kill('SIGKILL');
      }
    }, timeoutMs);
    child.on('error', (error) => {
      clearTimeout(timer);
      resolve({ code: null, signal: null, stdout, stderr, error });
    });
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, stdout, stderr, error: timedOut ? new Error(`timed out after ${timeoutMs / 1000} s`) : undefined });
    });
  });
}

const tail = (s: string, lines = 15): string => s.trimEnd().split('\n').slice(-lines).join('\n');

let setupResult: Promise<KernelStatus> | undefined;

/**
 * Runs test/kernel/setup.sh once per process (it is idempotent and returns at once when everything is in place)
 * and says whether the kernel VM can run, or why not.
 */
export function ensureKernel(): Promise<KernelStatus> {
  setupResult ??= (async (): Promise<KernelStatus> => {
    if (process.platform !== 'linux' || process.arch !== 'x64') {
      return { ok: false, reason: `the kernel VM needs linux/x64 (this is ${process.platform}/${process.arch})` };
    }
    const r = await run('bash', [SETUP_SH], 30 * 60_000);
    if (r.error || r.code !== 0) {
      const why = r.error ? r.error.message : `exit ${r.code ?? r.signal}`;
      const root = typeof process.getuid === 'function' && process.getuid() !== 0 ? ' (not running as root: apt-get needs root)' : '';
      return {
        ok: false,
        reason: `test/kernel/setup.sh failed: ${why}${root}; it installs qemu-system-x86 and cpio with apt-get and downloads Debian's kernel and dmsetup (root and network needed)\n${tail(r.stderr + r.stdout)}`,
      };
    }
    return { ok: true };
  })();
  return setupResult;
}

/** Whether setup.sh succeeded, so runKernelJob can run. */
export async function kernelAvailable(): Promise<boolean> {
  return (await ensureKernel()).ok;
}

/**
 * Boots the kernel VM with `disks` (raw image files) as /dev/vda, /dev/vdb, ..., runs `script` with sh inside
 * it and returns what it printed between the job markers, kernel log lines removed. Rejects with a clear message
 * when the VM did not produce the markers (failed to boot, timed out, setup failed).
 */
export async function runKernelJob(script: string, disks: readonly string[], options: KernelJobOptions = {}): Promise<KernelJobResult> {
  const status = await ensureKernel();
  if (!status.ok) throw new Error(`kernel VM unavailable: ${status.reason}`);
  for (const d of disks) if (!fs.existsSync(d)) throw new Error(`runKernelJob: disk image ${d} does not exist`);
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'dmstate-kjob-'));
  try {
    const job = path.join(dir, 'job.sh');
    fs.writeFileSync(job, script);
    const timeoutMs = options.timeoutMs ?? 300_000;
    const env = { ...process.env, VM_TIMEOUT: String(Math.ceil(timeoutMs / 1000)), ...(options.memMiB ? { VM_MEM: String(options.memMiB) } : {}) };
    const r = await run('bash', [RUN_SH, job, ...disks.map((d) => path.resolve(d))], timeoutMs + 30_000, env);
    const raw = r.stdout.replace(/\r/g, '');
    const start = raw.indexOf('=== JOB START\n');
    const trimmed = raw.trimEnd();
    const endMatch = /=== JOB END rc=(\d+)$/.exec(trimmed);
    if (start < 0 || !endMatch || endMatch.index < start) {
      const why = r.error ? r.error.message : `run.sh exited ${r.code ?? r.signal}`;
      throw new Error(
        `the kernel VM produced no ${start < 0 ? '"=== JOB START"' : '"=== JOB END rc=N"'} marker (${why}).\n` +
          `--- run.sh stdout (tail):\n${tail(raw)}\n--- run.sh stderr (tail):\n${tail(r.stderr)}`,
      );
    }
    const body = trimmed.slice(start + '=== JOB START\n'.length, endMatch.index);
    return { output: stripKernelLog(body), rc: Number(endMatch[1]) };
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}
