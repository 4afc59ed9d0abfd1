/**
 * End to end through the real CLI (`node bin/dmstate.js`, which runs the build in dist/): a daemon on a tmp pool,
 * dmsetup round trips, bad input, a second daemon, tables from files and stdin, the event log (marks, --json,
 * --since, --follow), clean shutdown on SIGTERM and restoring the devices on restart.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const CLI = path.join(ROOT, 'bin/dmstate.js');

interface CliResult {
  readonly code: number | null;
  readonly stdout: string;
  readonly stderr: string;
}

/** Runs `dmstate ARGS...` to completion, with `input` on stdin (else an empty stdin). */
function cli(args: readonly string[], options: { input?: string; cwd?: string; timeoutMs?: number } = {}): Promise<CliResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [CLI, ...args], { cwd: options.cwd ?? ROOT, stdio: ['pipe', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (c: string) => (stdout += c));
    child.stderr.setEncoding('utf8').on('data', (c: string) => (stderr += c));
    const timer = setTimeout(() => child.kill('SIGKILL'), options.timeoutMs ?? 15_000);
    child.on('error', reject);
    child.on('close', (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr });
    });
    child.stdin.end(options.input ?? '');
  });
}

/** `dmstate dmsetup --pool POOL ARGS...` */
const dm = (pool: string, args: readonly string[], options: { input?: string; cwd?: string } = {}): Promise<CliResult> =>
  cli(['dmsetup', '--pool', pool, ...args], options);

/** Waits until `check()` holds, polling. */
async function waitFor(what: string, check: () => boolean, timeoutMs = 10_000): Promise<void> {
  const until = performance.now() + timeoutMs;
  while (!check()) {
    if (performance.now() > until) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

interface Server {
  readonly child: ChildProcess;
  stderr: string;
  readonly exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
}

/** Starts `dmstate serve --pool POOL` and waits for it to say it is serving. */
async function serve(pool: string): Promise<Server> {
  const child = spawn(process.execPath, [CLI, 'serve', '--pool', pool], { stdio: ['ignore', 'ignore', 'pipe'] });
  const server: Server = {
    child,
    stderr: '',
    exited: new Promise((resolve) => child.on('exit', (code, signal) => resolve({ code, signal }))),
  };
  child.stderr!.setEncoding('utf8').on('data', (c: string) => (server.stderr += c));
  let exited = false;
  void server.exited.then(() => (exited = true));
  await waitFor('dmstate serve to start', () => server.stderr.includes('serving pool') || exited);
  if (!server.stderr.includes('serving pool')) throw new Error(`dmstate serve failed: ${server.stderr}`);
  return server;
}

/** SIGTERM, and the exit status. */
async function stop(server: Server): Promise<{ code: number | null; signal: NodeJS.Signals | null }> {
  server.child.kill('SIGTERM');
  const timeout = new Promise<never>((_, reject) => setTimeout(() => reject(new Error('daemon did not exit within 10 s of SIGTERM')), 10_000));
  return Promise.race([server.exited, timeout]);
}

const FAILED = /\nCommand failed\.\n$/;

describe('dmstate CLI end to end', () => {
  let tmp: string;
  let pool: string;
  let socket: string;
  let img1: string;
  let img2: string;
  let daemon: Server | undefined;
  const spawned: ChildProcess[] = [];

  beforeAll(() => {
    const built = path.join(ROOT, 'dist/src/frontends/cli/main.js');
    if (!fs.existsSync(built)) throw new Error(`${built} is missing: build first (npx tsc -p tsconfig.build.json)`);
    tmp = fs.mkdtempSync('/tmp/dmc-'); // short: the control socket path must stay under 108 bytes
    pool = path.join(tmp, 'p');
    socket = path.join(pool, 'control.sock');
    img1 = path.join(tmp, 'img1.img');
    img2 = path.join(tmp, 'img2.img');
    fs.writeFileSync(img1, Buffer.alloc(4 << 20));
    fs.writeFileSync(img2, Buffer.alloc(1 << 20));
  });

  afterAll(async () => {
    for (const c of [daemon?.child, ...spawned]) {
      if (c && c.exitCode === null && c.signalCode === null) {
        const gone = new Promise((r) => c.once('exit', r));
        c.kill('SIGTERM');
        await Promise.race([gone, new Promise((r) => setTimeout(r, 5000))]);
        if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
      }
    }
    if (tmp) fs.rmSync(tmp, { recursive: true, force: true });
  });

  test('dmsetup with no daemon fails with a message naming dmstate serve', async () => {
    const r = await dm(pool, ['ls']);
    expect(r.code).toBe(1);
    expect(r.stdout).toBe('');
    expect(r.stderr).toMatch(/no daemon/);
    expect(r.stderr).toContain(`dmstate serve --pool ${pool}`);
  });

  test('usage errors of dmstate itself exit 2 with the usage', async () => {
    const r = await cli(['frobnicate']);
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/unknown command 'frobnicate'[\s\S]*usage:/);
    const opt = await cli(['log', '--pool', pool, '--bogus']);
    expect(opt.code).toBe(2);
    expect(opt.stderr).toMatch(/unknown option '--bogus'/);
  });

  test('serve starts on a fresh pool', async () => {
    daemon = await serve(pool);
    expect(daemon.stderr).toContain(`serving pool ${pool}`);
    expect(fs.existsSync(socket)).toBe(true);
    const r = await dm(pool, ['ls']);
    expect(r).toEqual({ code: 0, stdout: 'No devices found\n', stderr: '' });
  });

  test('a second serve on the same pool fails clearly and leaves the first one serving', async () => {
    const r = await cli(['serve', '--pool', pool]);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/in use/);
    expect(fs.existsSync(socket)).toBe(true);
    expect((await dm(pool, ['ls'])).code).toBe(0);
  });

  test('create, status, table, info, ls, remove', async () => {
    expect(await dm(pool, ['create', 'lin', '--table', `0 2048 linear ${img1} 0`])).toEqual({ code: 0, stdout: '', stderr: '' });
    expect((await dm(pool, ['status', 'lin'])).stdout).toBe('0 2048 linear \n');
    expect((await dm(pool, ['table', 'lin'])).stdout).toBe(`0 2048 linear ${img1} 0\n`);
    expect((await dm(pool, ['table'])).stdout).toBe(`lin: 0 2048 linear ${img1} 0\n`);
    const info = await dm(pool, ['info', 'lin']);
    expect(info.code).toBe(0);
    expect(info.stdout).toContain('Name:              lin\n');
    expect(info.stdout).toContain('State:             ACTIVE\n');
    expect(info.stdout).toContain('Tables present:    LIVE\n');
    expect(info.stdout).toContain('Major, minor:      253, 0\n');
    expect(info.stdout).toContain('Number of targets: 1\n');
    expect((await dm(pool, ['info', '-c', 'lin'])).stdout).toMatch(/^Name +Maj Min Stat Open Targ Event +UUID *\nlin +253 +0 L--w +0 +1 +0 *\n$/);
    expect((await dm(pool, ['ls'])).stdout).toBe('lin\t(253:0)\n');
    expect(await dm(pool, ['remove', 'lin'])).toEqual({ code: 0, stdout: '', stderr: '' });
    expect((await dm(pool, ['ls'])).stdout).toBe('No devices found\n');
    const gone = await dm(pool, ['status', 'lin']);
    expect(gone.code).toBe(1);
    expect(gone.stderr).toMatch(/lin: Device does not exist/);
  });

  test('bad input exits 1 with a clear reason and changes nothing', async () => {
    expect((await dm(pool, ['create', 'keep', '--table', `0 1024 linear ${img1} 0`])).code).toBe(0);
    expect((await dm(pool, ['create', 'upper', '--table', '0 512 linear keep 0'])).code).toBe(0);
    const snapshot = async (): Promise<string[]> =>
      Promise.all([['ls'], ['table'], ['table', '--inactive'], ['info', '-c']].map(async (a) => (await dm(pool, a)).stdout));
    const before = await snapshot();
    const imagesBefore = [img1, img2].map((f) => fs.statSync(f).mtimeMs);
    const missing = path.join(tmp, 'missing.img');
    const cases: Array<[string[], RegExp]> = [
      [['create', 'b', '--table', 'x 100 zero'], /start: "x" is not a non-negative integer/],
      [['create', 'b', '--table', '0 100'], /expected <start> <length> <target>/],
      [['create', 'b', '--table', '0 0 zero'], /zero-length/],
      [['create', 'b', '--table', '0 100 zero\n200 100 zero'], /Gap in table/],
      [['create', 'b', '--table', '0 100 nosuch'], /nosuch: unknown target type/],
      [['create', 'b', '--table', `0 100 linear ${img1}`], /linear: Invalid argument count/],
      [['create', 'b', '--table', '0 100 zero extra'], /zero: Invalid argument count/],
      [['create', 'b', '--table', `0 4096 linear ${img2} 0`], /too small for target/],
      [['create', 'b', '--table', `0 100 linear ${missing} 0`], /missing\.img/],
      [['create', 'b', '--table', '0 100 linear nosuchdev 0'], /nosuchdev/],
      [['create', 'keep', '--table', '0 10 zero'], /keep: .*exists/],
      [['load', 'keep', '--table', '0 100 linear keep 0'], /loop/],
      [['load', 'keep', '--table', '0 100 linear upper 0'], /loop/],
      [['status', 'nosuch'], /nosuch: Device does not exist/],
      [['table', 'nosuch'], /nosuch: Device does not exist/],
      [['info', 'nosuch'], /nosuch: Device does not exist/],
      [['remove', 'nosuch'], /nosuch: Device does not exist/],
      [['suspend', 'nosuch'], /nosuch: Device does not exist/],
      [['resume', 'nosuch'], /nosuch: Device does not exist/],
      [['load', 'nosuch', '--table', '0 1 zero'], /nosuch: Device does not exist/],
      [['message', 'nosuch', '0', 'mark', 'x'], /nosuch: Device does not exist/],
      [['message', 'keep', '0', 'frobnicate'], /does not support messages/],
      [['message', 'keep', 'x', 'mark', 'y'], /sector/],
      [['remove', 'keep'], /keep: Device or resource busy/],
    ];
    for (const [args, reason] of cases) {
      const r = await dm(pool, args);
      const what = `dmsetup ${args.join(' ')}: ${JSON.stringify(r)}`;
      expect(r.code, what).toBe(1);
      expect(r.stdout, what).toBe('');
      expect(r.stderr, what).toMatch(reason);
      expect(r.stderr, what).toMatch(FAILED);
    }
    // Malformed dmsetup command lines fail too (dmsetup itself exits 1 for them; the exact code is checked
    // against the kernel's dmsetup in test/kernel/dmsetup-parity.test.ts).
    for (const [args, reason] of [
      [['frobnicate'], /unknown command 'frobnicate'/],
      [['create'], /usage: dmsetup create/],
      [['ls', '--bogus'], /unrecognized option '--bogus'/],
      [['create', 'b', '--table', '0 1 zero', '--notable'], /only one of/],
      [['create', 'b', path.join(tmp, 'nosuch.table')], /cannot read table file .*nosuch\.table/],
    ] as Array<[string[], RegExp]>) {
      const r = await dm(pool, args);
      const what = `dmsetup ${args.join(' ')}: ${JSON.stringify(r)}`;
      expect(r.code, what).toBeGreaterThan(0);
      expect(r.stdout, what).toBe('');
      expect(r.stderr, what).toMatch(reason);
    }
    expect(await snapshot()).toEqual(before);
    expect([img1, img2].map((f) => fs.statSync(f).mtimeMs)).toEqual(imagesBefore);
  });

  test('a table from a file (relative to the cwd) and from stdin', async () => {
    fs.writeFileSync(path.join(tmp, 't1.table'), '# two targets\n0 16 linear img1.img 8\n16 16 zero\n');
    expect(await dm(pool, ['create', 'fromfile', 't1.table'], { cwd: tmp })).toEqual({ code: 0, stdout: '', stderr: '' });
    expect((await dm(pool, ['table', 'fromfile'])).stdout).toBe(`0 16 linear ${img1} 8\n16 16 zero \n`);

    expect(await dm(pool, ['create', 'fromstdin'], { input: '0 32 zero\n' })).toEqual({ code: 0, stdout: '', stderr: '' });
    expect((await dm(pool, ['table', 'fromstdin'])).stdout).toBe('0 32 zero \n');
    expect((await dm(pool, ['load', 'fromstdin'], { input: '0 64 error\n' })).code).toBe(0);
    expect((await dm(pool, ['table', '--inactive', 'fromstdin'])).stdout).toBe('0 64 error \n');
    expect((await dm(pool, ['resume', 'fromstdin'])).code).toBe(0);
    expect((await dm(pool, ['table', 'fromstdin'])).stdout).toBe('0 64 error \n');
    for (const n of ['fromfile', 'fromstdin']) expect((await dm(pool, ['remove', n])).code).toBe(0);
  });

  let markSeq = 0;

  test('message NAME 0 mark LABEL lands in the event log; --json and --since', async () => {
    expect(await dm(pool, ['message', 'keep', '0', 'mark', 'foo'])).toEqual({ code: 0, stdout: '', stderr: '' });
    const text = await cli(['log', '--pool', pool]);
    expect(text.code).toBe(0);
    expect(text.stdout).toMatch(/^ *\d+ \d{4}-\d\d-\d\dT\S+Z mark device=keep name=foo$/m);

    const json = await cli(['log', '--pool', pool, '--json']);
    expect(json.code).toBe(0);
    const events = json.stdout.trimEnd().split('\n').map((l) => JSON.parse(l) as { seq: number; type: string; name?: string });
    expect(events.length).toBeGreaterThan(5);
    expect(events.map((e) => e.seq)).toEqual([...events.map((e) => e.seq)].sort((a, b) => a - b));
    const mark = events.find((e) => e.type === 'mark' && e.name === 'foo');
    expect(mark).toBeDefined();
    markSeq = mark!.seq;

    const since = await cli(['log', '--pool', pool, '--json', '--since', String(markSeq)]);
    const later = since.stdout.trimEnd().split('\n').map((l) => JSON.parse(l) as { seq: number });
    expect(later[0]).toMatchObject({ seq: markSeq, type: 'mark', name: 'foo' });
    expect(later.every((e) => e.seq >= markSeq)).toBe(true);
    expect(later.length).toBe(events.filter((e) => e.seq >= markSeq).length);
  });

  test('log --follow streams new events', async () => {
    const follow = spawn(process.execPath, [CLI, 'log', '--pool', pool, '--follow', '--since', String(markSeq)], { stdio: ['ignore', 'pipe', 'pipe'] });
    spawned.push(follow);
    let out = '';
    follow.stdout.setEncoding('utf8').on('data', (c: string) => (out += c));
    const exited = new Promise<number | null>((r) => follow.on('exit', (code) => r(code)));
    await waitFor('log --follow to replay the mark', () => out.includes('name=foo'));
    expect(out).not.toContain('followme');
    expect((await dm(pool, ['create', 'followme', '--table', '0 8 zero'])).code).toBe(0);
    await waitFor('log --follow to show the new device', () => /device\.created device=followme/.test(out));
    await waitFor('log --follow to show the resume', () => /device\.resumed device=followme/.test(out));
    follow.kill('SIGTERM');
    expect(await exited).toBe(0);
    expect((await dm(pool, ['remove', 'followme'])).code).toBe(0);
  });

  test('SIGTERM shuts down cleanly; a restarted daemon restores the devices, suspended ones suspended', async () => {
    expect((await dm(pool, ['create', 'sus', '--table', '0 128 zero'])).code).toBe(0);
    expect((await dm(pool, ['suspend', 'sus'])).code).toBe(0);
    expect((await dm(pool, ['load', 'sus', '--table', '0 256 error'])).code).toBe(0);
    const snapshot = async (): Promise<string[]> =>
      Promise.all([['ls'], ['table'], ['table', '--inactive'], ['info', '-c'], ['info', 'sus'], ['status']].map(async (a) => (await dm(pool, a)).stdout));
    const before = await snapshot();
    expect(before[4]).toContain('State:             SUSPENDED\n');

    const exit = await stop(daemon!);
    expect(exit).toEqual({ code: 0, signal: null });
    expect(daemon!.stderr).toMatch(/SIGTERM: shutting down/);
    expect(fs.existsSync(socket)).toBe(false);
    expect(fs.existsSync(path.join(pool, 'daemon.pid'))).toBe(false);
    const none = await dm(pool, ['ls']);
    expect(none.code).toBe(1);
    expect(none.stderr).toContain('dmstate serve');

    daemon = await serve(pool);
    expect(daemon.stderr).toContain('3 devices');
    expect(daemon.stderr).not.toContain('could not restore');
    const after = await snapshot();
    expect(after).toEqual(before);
    expect(after[4]).toContain('Tables present:    LIVE & INACTIVE\n');
    // Still fully usable: the restored inactive table swaps in.
    expect((await dm(pool, ['resume', 'sus'])).code).toBe(0);
    expect((await dm(pool, ['table', 'sus'])).stdout).toBe('0 256 error \n');
    expect((await dm(pool, ['info', 'sus'])).stdout).toContain('State:             ACTIVE\n');
  });

  test('log works with no daemon running', async () => {
    expect(await stop(daemon!)).toEqual({ code: 0, signal: null });
    daemon = undefined;
    const r = await cli(['log', '--pool', pool]);
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(/mark device=keep name=foo/);
    expect(r.stdout).toMatch(/engine\.stopped\n$/);
    const json = await cli(['log', '--pool', pool, '--json', '--since', String(markSeq)]);
    expect(json.code).toBe(0);
    expect(JSON.parse(json.stdout.split('\n')[0])).toMatchObject({ seq: markSeq, type: 'mark' });
    const nowhere = await cli(['log', '--pool', path.join(tmp, 'nopool')]);
    expect(nowhere.code).toBe(1);
    expect(nowhere.stderr).toMatch(/does not exist/);
  });
});
