/**
 * Child processes for the end-to-end tests: run a command to completion, start and stop `dmstate serve`.
 * One copy here instead of one per test file.
 */
import { spawn, type ChildProcess } from 'node:child_process';

export interface RunResult {
  readonly code: number | null;
  readonly stdout: string;
  readonly stderr: string;
}

/** Runs a command to completion (SIGKILL after `timeoutMs`). */
export function run(cmd: string, args: readonly string[], timeoutMs = 60_000): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (c: string) => (stdout += c));
    child.stderr.setEncoding('utf8').on('data', (c: string) => (stderr += c));
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
    child.on('error', reject);
    child.on('close', (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr });
    });
  });
}

/** A run's exit code and the tails of its output, for assertion messages. */
export const show = (r: RunResult, tailChars = 2000): string => `exit ${r.code}\nstdout: ${r.stdout.slice(-tailChars)}\nstderr: ${r.stderr.slice(-tailChars)}`;

/** `dmstate serve --pool POOL` (the built CLI at `cli`), resolved once it says it serves; `onStderr` sees its output. */
export function startDaemon(cli: string, pool: string, onStderr?: (chunk: string) => void): Promise<ChildProcess> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [cli, 'serve', '--pool', pool], { stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    const timer = setTimeout(() => reject(new Error(`dmstate serve did not start in 15 s: ${stderr}`)), 15_000);
    child.stderr!.setEncoding('utf8').on('data', (c: string) => {
      stderr += c;
      onStderr?.(c);
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

/** SIGTERM (a clean shutdown), then the exit code; SIGKILL after 20 s. */
export async function stopDaemon(child: ChildProcess): Promise<number | null> {
  if (child.exitCode !== null || child.signalCode !== null) return child.exitCode;
  const exited = new Promise<number | null>((r) => child.once('exit', (code) => r(code)));
  child.kill('SIGTERM');
  const timer = setTimeout(() => child.kill('SIGKILL'), 20_000);
  const code = await exited;
  clearTimeout(timer);
  return code;
}

/** A daemon a test may kill: its stderr so far and how it exited. */
export interface KillableDaemon {
  readonly child: ChildProcess;
  stderr: string;
  readonly exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
}

/** Starts `dmstate serve` and waits (15 s at most) until it serves; the caller kills it (SIGKILL tests). */
export async function startKillableDaemon(cli: string, pool: string): Promise<KillableDaemon> {
  const child = spawn(process.execPath, [cli, 'serve', '--pool', pool], { stdio: ['ignore', 'ignore', 'pipe'] });
  const d: KillableDaemon = { child, stderr: '', exited: new Promise((resolve) => child.on('exit', (code, signal) => resolve({ code, signal }))) };
  child.stderr!.setEncoding('utf8').on('data', (c: string) => (d.stderr += c));
  let exited = false;
  void d.exited.then(() => (exited = true));
  const until = performance.now() + 15_000;
  while (!d.stderr.includes('serving pool') && !exited && performance.now() < until) await new Promise((r) => setTimeout(r, 20));
  if (!d.stderr.includes('serving pool')) throw new Error(`dmstate serve did not start: ${d.stderr}`);
  return d;
}
