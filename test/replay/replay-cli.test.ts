/**
 * `dmstate replay` and `dmstate log compact` through the real CLI (node bin/dmstate.js, which runs the build in
 * dist/): a pool made with the library (file-backed origin and COW, writes, marks, a merge), replayed straight
 * from its database and through a running daemon, to marks and sequence numbers; --into writes a pool that
 * `dmstate serve` serves read-only with the exceptions of the replayed point pinned (read back in process against
 * the files), and --writable refuses a COW that moved on; compaction; bad input.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { openPool } from '../../src/frontends/open-pool.js';
import { sectors } from '../../src/block/units.js';
import { replay } from '../../src/replay/replay.js';
import { formatLiveCheck, replayToLiveState } from '../../src/frontends/cli/replay.js';
import type { ControlClient } from '../../src/frontends/control-client.js';
import { stateDigest } from '../../src/replay/digest.js';
import { emptyPoolState } from '../../src/replay/pool-state.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const CLI = path.join(ROOT, 'bin/dmstate.js');
const ORIGIN_SECTORS = 8192;
const CHUNK = 8;

interface CliResult {
  readonly code: number | null;
  readonly stdout: string;
  readonly stderr: string;
}

function cli(args: readonly string[], cwd: string): Promise<CliResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [CLI, ...args], { cwd, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (c: string) => (stdout += c));
    child.stderr.setEncoding('utf8').on('data', (c: string) => (stderr += c));
    const timer = setTimeout(() => child.kill('SIGKILL'), 30_000);
    child.on('error', reject);
    child.on('close', (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr });
    });
  });
}

interface Server {
  readonly child: ChildProcess;
  stderr: string;
  readonly exited: Promise<number | null>;
}

async function serve(pool: string, cwd: string): Promise<Server> {
  const child = spawn(process.execPath, [CLI, 'serve', '--pool', pool], { cwd, stdio: ['ignore', 'ignore', 'pipe'] });
  const server: Server = { child, stderr: '', exited: new Promise((resolve) => child.on('exit', (code) => resolve(code))) };
  child.stderr!.setEncoding('utf8').on('data', (c: string) => (server.stderr += c));
  const until = performance.now() + 15_000;
  while (!server.stderr.includes('serving pool')) {
    if (child.exitCode !== null || performance.now() > until) throw new Error(`dmstate serve failed: ${server.stderr}`);
    await new Promise((r) => setTimeout(r, 25));
  }
  return server;
}

async function stop(server: Server): Promise<void> {
  server.child.kill('SIGTERM');
  expect(await server.exited).toBe(0);
}

const sha = (file: string): string => createHash('sha256').update(fs.readFileSync(file)).digest('hex');
const json = (r: CliResult): Record<string, unknown> => JSON.parse(r.stdout) as Record<string, unknown>;

describe('dmstate replay: the live digest check through a daemon', () => {
  /** A daemon with an empty log whose answers to `state` are `digests`, one per call (the last one repeated). */
  function fakeDaemon(digests: string[]): { client: ControlClient; stateCalls: () => number } {
    let calls = 0;
    const client = {
      request: async (body: { op: string }) => {
        expect(body.op).toBe('state');
        const digest = digests[Math.min(calls++, digests.length - 1)];
        return { id: 1, op: 'state', seq: 0, digest };
      },
      stream: async (body: { op: string }, on: (r: { id: number; op: string }) => boolean) => {
        expect(body.op).toBe('log');
        on({ id: 1, op: 'end' });
      },
    } as unknown as ControlClient;
    return { client, stateCalls: () => calls };
  }
  const args = { pool: '/nowhere', writable: false, useSnapshots: true, json: false, printState: false } as unknown as Parameters<typeof replayToLiveState>[1];
  const empty = stateDigest(emptyPoolState());

  test('equal at once: one attempt', async () => {
    const d = fakeDaemon([empty]);
    const r = await replayToLiveState(d.client, args);
    expect(r.live).toEqual({ seq: 0, digest: empty, equal: true, attempts: 1 });
    expect(formatLiveCheck(r.live!, empty)).toBe("live digest (the running engine's own state at #0): equal\n");
  });

  test('unequal, then equal (an event stored late): asked again', async () => {
    const d = fakeDaemon(['f'.repeat(64), empty]);
    const r = await replayToLiveState(d.client, args);
    expect(r.live).toMatchObject({ equal: true, attempts: 2 });
    expect(d.stateCalls()).toBe(2);
  });

  test('unequal three times: DIFFERS, said plainly', async () => {
    const d = fakeDaemon(['f'.repeat(64)]);
    const r = await replayToLiveState(d.client, args);
    expect(r.live).toMatchObject({ equal: false, attempts: 3, digest: 'f'.repeat(64) });
    expect(d.stateCalls()).toBe(3);
    expect(formatLiveCheck(r.live!, empty)).toMatch(/^live digest \(the running engine's own state at #0\): f{64} DIFFERS from the replay's [0-9a-f]{64} \(3 attempts\): the log does not rebuild the running state/);
  });
});

describe('dmstate replay', () => {
  let dir: string;
  let pool: string;
  const digestAt = new Map<string, string>();
  let finalDigest: string;

  beforeAll(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'dmstate-replay-cli-'));
    pool = path.join(dir, 'pool');
    fs.writeFileSync(path.join(dir, 'origin.img'), Buffer.alloc(ORIGIN_SECTORS * 512, 0x11));
    fs.writeFileSync(path.join(dir, 'cow.img'), Buffer.alloc(4096 * 512));
    fs.writeFileSync(path.join(dir, 'cow2.img'), Buffer.alloc(4096 * 512));
    const p = await openPool(pool, { stateSnapshotEvents: 10 });
    const e = p.engine;
    const origin = path.join(dir, 'origin.img');
    await e.create('orig', { table: `0 ${ORIGIN_SECTORS} snapshot-origin ${origin}` });
    await e.create('snap', { table: `0 ${ORIGIN_SECTORS} snapshot ${origin} ${path.join(dir, 'cow.img')} P ${CHUNK}` });
    await e.create('lin', { table: `0 1024 linear ${origin} 0`, readOnly: true, uuid: 'LIN-1' });
    const write = (at: number, fill: number, count = 8): Promise<void> => e.device('orig')!.write(sectors(at), Buffer.alloc(count * 512, fill));
    const mark = async (name: string): Promise<void> => {
      await e.message('orig', 0, ['mark', name]);
      await e.log.drain();
      digestAt.set(name, e.stateDigest());
    };
    for (let i = 0; i < 12; i++) await write(i * 64, 0x20 + i);
    await mark('first');
    for (let i = 12; i < 30; i++) await write(i * 64, 0x20 + i, 16);
    await e.suspend('lin');
    await mark('second');
    // A second snapshot, and the first one merged back into the origin.
    await e.create('snap2', { table: `0 ${ORIGIN_SECTORS} snapshot ${origin} ${path.join(dir, 'cow2.img')} PO ${CHUNK}` });
    for (let i = 0; i < 5; i++) await write(4000 + i * 64, 0x60 + i);
    await e.suspend('orig');
    await e.suspend('snap'); // the handover needs the snapshot suspended (as lvconvert --merge and dmstate merge do)
    await e.load('orig', `0 ${ORIGIN_SECTORS} snapshot-merge ${origin} ${path.join(dir, 'cow.img')} P ${CHUNK}`);
    await e.resume('orig');
    await e.remove('snap');
    for (let i = 0; i < 500 && !(await e.message('orig', 0, ['merge-status'])).includes('state=DONE'); i++) await new Promise((r) => setTimeout(r, 10));
    expect(await e.message('orig', 0, ['merge-status'])).toContain('state=DONE');
    await e.log.drain();
    await mark('merged');
    finalDigest = e.stateDigest();
    await p.close();
  }, 60_000);

  afterAll(() => {
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  });

  test('without a daemon: the whole log, marks, sequence numbers, with and without state snapshots', async () => {
    const full = await cli(['replay', '--pool', pool], dir);
    expect(full.stderr).toBe('');
    expect(full.code).toBe(0);
    expect(full.stdout).toContain(`digest: ${finalDigest}`);
    expect(full.stdout).toMatch(/to the end of the log: at event #\d+ \(state snapshot #\d+ \+ \d+ events, read from the database\)/);
    expect(full.stdout).toMatch(/devices: 3 \(3 with a live table, 1 suspended\)/);

    const j = json(await cli(['replay', '--pool', pool, '--json', '--no-snapshots'], dir));
    expect(j).toMatchObject({ digest: finalDigest, snapshotSeq: 0, via: 'database', devices: 3, marks: 3 });
    for (const [mark, digest] of digestAt) {
      const r = json(await cli(['replay', '--pool', pool, '--to-mark', mark, '--json'], dir));
      expect(r.digest, mark).toBe(digest);
      // The same point by its sequence number.
      const seq = (r.mark as { seq: number }).seq;
      expect(json(await cli(['replay', '--pool', pool, '--to', String(seq), '--json'], dir)).digest).toBe(digest);
    }
    const first = json(await cli(['replay', '--pool', pool, '--to-mark', 'first', '--json', '--state'], dir));
    const state = first.state as { cows: Array<{ exceptions: number }>; devices: Array<{ name: string }> };
    expect(state.cows).toHaveLength(1);
    expect(state.cows[0].exceptions).toBe(12);
    expect(state.devices.map((d) => d.name)).toEqual(['lin', 'orig', 'snap']);
  }, 60_000);

  test('bad input: a clear message, exit 2, nothing written', async () => {
    const cases: Array<[string[], RegExp]> = [
      [['--to', '5', '--to-mark', 'first'], /--to or --to-mark, not both/],
      [['--to', 'x'], /--to/],
      [['--to-mark', 'nope'], /no mark named "nope" in the log \(marks: first, second, merged\)/],
      [['--writable'], /--writable goes with --into/],
      [['--frobnicate'], /unknown argument '--frobnicate'/],
      [['--into', pool], /another folder than the replayed one/],
    ];
    for (const [args, message] of cases) {
      const r = await cli(['replay', '--pool', pool, ...args], dir);
      expect(r.code, args.join(' ')).toBe(2);
      expect(r.stderr, args.join(' ')).toMatch(message);
    }
    const missing = await cli(['replay', '--pool', path.join(dir, 'nowhere')], dir);
    expect(missing.code).toBe(1);
    expect(missing.stderr).toMatch(/does not exist/);
    expect((await cli(['replay', '--help'], dir)).stdout).toMatch(/DATA files .* are not in the log: they are today's/s);
  }, 60_000);

  test('through a running daemon: the same digests', async () => {
    const server = await serve(pool, dir);
    try {
      const r = json(await cli(['replay', '--pool', pool, '--json'], dir));
      expect(r.via).toBe('daemon');
      // The restored engine loaded what the log says (its exceptions.loaded events change nothing).
      expect(r.digest).toBe(finalDigest);
      // To the end of a served pool: the daemon's live digest (from its engine's objects) at the position replayed
      // to, equal to the replay's.
      const live = r.live as { seq: number; digest: string; equal: boolean; attempts: number };
      expect(live).toMatchObject({ digest: finalDigest, equal: true, attempts: 1 });
      expect(live.seq).toBe(r.seq);
      const text = await cli(['replay', '--pool', pool], dir);
      expect(text.code, text.stderr).toBe(0);
      expect(text.stdout).toContain(`live digest (the running engine's own state at #${live.seq}): equal\n`);
      // A replay to a point in the past is not compared with the live state.
      expect(json(await cli(['replay', '--pool', pool, '--to-mark', 'second', '--json'], dir)).live).toBeUndefined();
      expect(json(await cli(['replay', '--pool', pool, '--to-mark', 'second', '--json'], dir)).digest).toBe(digestAt.get('second'));
      const locked = await cli(['log', 'compact', '--pool', pool, '--before', '20'], dir);
      expect(locked.code).toBe(1);
      expect(locked.stderr).toMatch(/in use by another process .*stop the daemon to compact/);
    } finally {
      await stop(server);
    }
  }, 60_000);

  test('--into: a read-only pool with the exceptions of the replayed point, served; the files are not written', async () => {
    const into = path.join(dir, 'at-first');
    const r = await cli(['replay', '--pool', pool, '--to-mark', 'first', '--into', into], dir);
    expect(r.stderr).toBe('');
    expect(r.stdout).toMatch(/wrote pool .*at-first \(read-only, exceptions pinned\): 3 devices, 1 COWs/);
    const intoDigest = /digest ([0-9a-f]{64})/.exec(r.stdout)![1];
    // The same state, with every device read-only.
    expect(intoDigest).not.toBe(digestAt.get('first'));
    const again = await cli(['replay', '--pool', pool, '--into', into], dir);
    expect(again.code).toBe(2);
    expect(again.stderr).toMatch(/exists and is not an empty folder/);

    const files = ['origin.img', 'cow.img', 'cow2.img'].map((f) => path.join(dir, f));
    const before = files.map(sha);
    const server = await serve(into, dir);
    try {
      const info = await cli(['dmsetup', '--pool', into, 'info', 'snap'], dir);
      expect(info.stdout).toMatch(/State: +ACTIVE \(READ-ONLY\)/);
      const lin = await cli(['dmsetup', '--pool', into, 'info', '-c', '--noheadings', 'lin'], dir);
      expect(lin.stdout).toMatch(/^lin:253:2:L--r/);
      expect((await cli(['dmsetup', '--pool', into, 'table', 'snap'], dir)).stdout).toBe(`0 ${ORIGIN_SECTORS} snapshot ${files[0]} ${files[1]} P ${CHUNK}\n`);
      const served = json(await cli(['replay', '--pool', into, '--json'], dir));
      expect(served.via).toBe('daemon');
      expect(served.digest).toBe(intoDigest);
    } finally {
      await stop(server);
    }
    expect(files.map(sha)).toEqual(before);

    // What the replayed snapshot reads: the COW chunks of the exceptions it had at the mark, today's origin elsewhere.
    const past = await replay(pool, { toMark: 'first' });
    const pairs = past.state.cows.get(files[1])!.pairs;
    const kept = new Map<number, number>();
    for (let i = 0; i < pairs.length; i += 2) kept.set(pairs[i], pairs[i + 1]);
    const originNow = fs.readFileSync(files[0]);
    const cowNow = fs.readFileSync(files[1]);
    const chunkBytes = CHUNK * 512;
    const expected = Buffer.alloc(ORIGIN_SECTORS * 512);
    for (let c = 0; c < ORIGIN_SECTORS / CHUNK; c++) {
      const n = kept.get(c);
      (n === undefined ? originNow : cowNow).copy(expected, c * chunkBytes, (n ?? c) * chunkBytes, ((n ?? c) + 1) * chunkBytes);
    }
    const p = await openPool(into);
    try {
      expect(p.engine.stateDigest()).toBe(intoDigest);
      const got = Buffer.alloc(ORIGIN_SECTORS * 512);
      await p.engine.device('snap')!.read(sectors(0), got);
      expect(got.equals(expected)).toBe(true);
      // Not today's state: the merge since then changed the origin under the chunks the snapshot kept.
      expect(kept.size).toBe(12);
      await expect(p.engine.device('snap')!.write(sectors(0), Buffer.alloc(512))).rejects.toMatchObject({ code: 'DM_IO' });
    } finally {
      await p.close();
    }
    expect(files.map(sha)).toEqual(before);
  }, 90_000);

  test('--into --writable: the latest state is served writable; a COW that moved on since the target is refused', async () => {
    const refused = path.join(dir, 'writable-first');
    const r = await cli(['replay', '--pool', pool, '--to-mark', 'first', '--into', refused, '--writable'], dir);
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/--writable: COW .*cow\.img has changed since \(12 exceptions then, 0 at the end of the log\); replay it read-only/);
    expect(fs.existsSync(refused)).toBe(false);

    const latest = path.join(dir, 'writable-latest');
    const ok = await cli(['replay', '--pool', pool, '--into', latest, '--writable', '--json'], dir);
    expect(ok.stderr).toBe('');
    const written = json(ok).into as { digest: string; readOnly: boolean };
    expect(written).toMatchObject({ readOnly: false, digest: finalDigest });
    const p = await openPool(latest);
    try {
      expect(p.engine.stateDigest()).toBe(finalDigest);
      expect(p.engine.info('orig').readOnly).toBe(false);
      expect(p.engine.info('lin').readOnly).toBe(true);
      await p.engine.device('snap2')!.write(sectors(0), Buffer.alloc(4096, 0x77));
      expect((await replay(p.db)).digest).toBe(p.engine.stateDigest());
    } finally {
      await p.close();
    }
  }, 60_000);

  test('log compact: the events behind a state snapshot go; later states replay the same, earlier ones are refused', async () => {
    const copy = path.join(dir, 'compacted');
    fs.cpSync(pool, copy, { recursive: true });
    const second = json(await cli(['replay', '--pool', copy, '--to-mark', 'second', '--json'], dir));
    const secondSeq = (second.mark as { seq: number }).seq;
    const none = await cli(['log', 'compact', '--pool', copy, '--before', '5'], dir);
    expect(none.code).toBe(2);
    expect(none.stderr).toMatch(/no state snapshot at or before #5, nothing compacted \(snapshots at #10/);
    const r = await cli(['log', 'compact', '--pool', copy, '--before', String(secondSeq + 1)], dir);
    expect(r.stderr).toBe('');
    const through = Number(/starts from state snapshot #(\d+)/.exec(r.stdout)![1]);
    expect(through).toBeLessThanOrEqual(secondSeq + 1);
    expect(through).toBeGreaterThan(digestAt.size);
    expect(json(await cli(['replay', '--pool', copy, '--json'], dir)).digest).toBe(finalDigest);
    expect(json(await cli(['replay', '--pool', copy, '--to-mark', 'merged', '--json'], dir)).digest).toBe(digestAt.get('merged'));
    const early = await cli(['replay', '--pool', copy, '--to-mark', 'first'], dir);
    expect(early.code).toBe(2);
    expect(early.stderr).toMatch(/compacted behind a state snapshot: the oldest state that can be rebuilt is #\d+/);
    // The pool still serves. Through the daemon a compacted log cannot be replayed (its stream starts after #1,
    // the state snapshots stay in the database): said clearly. Once stopped, the sequence went on.
    const server = await serve(copy, dir);
    try {
      const viaDaemon = await cli(['replay', '--pool', copy], dir);
      expect(viaDaemon.code).toBe(2);
      expect(viaDaemon.stderr).toMatch(/the log starts at #\d+ \(compacted\): stop the daemon/);
    } finally {
      await stop(server);
    }
    const after = json(await cli(['replay', '--pool', copy, '--json'], dir));
    expect(after.digest).toBe(finalDigest);
    expect(after.seq as number).toBeGreaterThan(through);
  }, 90_000);
});
