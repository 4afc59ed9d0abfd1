/**
 * `dmstate inspect` end to end (the built CLI, `node bin/dmstate.js`): a spawned daemon on a tmp pool, writes
 * through NBD (qemu-io) and a merge started over the control socket (`dmstate merge`), the inspect output parsed
 * as JSON lines and checked against the machine definitions; --stately as JSON lines and over a WebSocket (a
 * minimal RFC 6455 server here); bad input; and the daemon dropping a watch when its client goes.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as http from 'node:http';
import type * as net from 'node:net';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { transition, type AnyStateMachine } from 'xstate';
import { MACHINES } from '../../machines/index.js';
import type { InspectionRecord } from '../../src/inspect/live-inspector.js';
import { Daemon } from '../../src/frontends/daemon.js';
import { ControlClient } from '../../src/frontends/control-client.js';
import { MemoryBlockDevice } from '../../src/block/memory-device.js';
import { sectors } from '../../src/block/units.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const CLI = path.join(ROOT, 'bin/dmstate.js');

interface Proc {
  readonly child: ChildProcess;
  stdout: string;
  stderr: string;
  readonly exited: Promise<number | null>;
}

function start(args: readonly string[], env: NodeJS.ProcessEnv = process.env): Proc {
  const child = spawn(process.execPath, [CLI, ...args], { stdio: ['ignore', 'pipe', 'pipe'], env });
  const p: Proc = { child, stdout: '', stderr: '', exited: new Promise((resolve) => child.on('exit', (code) => resolve(code))) };
  child.stdout!.setEncoding('utf8').on('data', (c: string) => (p.stdout += c));
  child.stderr!.setEncoding('utf8').on('data', (c: string) => (p.stderr += c));
  return p;
}

async function finish(p: Proc, timeoutMs = 20_000): Promise<number | null> {
  const timer = setTimeout(() => p.child.kill('SIGKILL'), timeoutMs);
  const code = await p.exited;
  clearTimeout(timer);
  return code;
}

const cli = async (args: readonly string[], env?: NodeJS.ProcessEnv): Promise<{ code: number | null; stdout: string; stderr: string }> => {
  const p = start(args, env);
  const code = await finish(p);
  return { code, stdout: p.stdout, stderr: p.stderr };
};

async function waitFor(what: string, check: () => boolean, timeoutMs = 15_000): Promise<void> {
  const until = performance.now() + timeoutMs;
  while (!check()) {
    if (performance.now() > until) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** `dmstate inspect ARGS` started and attached (it says so on stderr). */
async function inspect(pool: string, args: readonly string[], env?: NodeJS.ProcessEnv): Promise<Proc> {
  const p = start(['inspect', '--pool', pool, ...args], env);
  let exited = false;
  void p.exited.then(() => (exited = true));
  await waitFor('dmstate inspect to attach', () => p.stderr.includes('dmstate: inspecting') || exited);
  if (exited) throw new Error(`dmstate inspect exited: ${p.stderr}`);
  return p;
}

function qemuIo(uri: string, cmds: readonly string[]): void {
  const r = spawnSync('qemu-io', ['-f', 'raw', uri, ...cmds.flatMap((c) => ['-c', c])], { encoding: 'utf8', timeout: 30_000 });
  if (r.status !== 0) throw new Error(`qemu-io failed: ${r.stderr}${r.stdout}`);
}

function xstateNext(machine: AnyStateMachine, from: string, event: string): string {
  const [next] = transition(machine, machine.resolveState({ value: from, context: undefined }), { type: event });
  return String(next.value);
}

/** Groups records per actor and checks each: actor record first, then event/snapshot pairs the machine allows. */
function lifecycles(records: readonly InspectionRecord[]): Map<string, string[]> {
  const out = new Map<string, string[]>();
  const state = new Map<string, string>();
  let pendingEvent: InspectionRecord | undefined;
  for (const r of records) {
    if (r.type === 'dmstate.inspect.dropped') continue;
    const machine = MACHINES[r.kind];
    if (r.type === '@xstate.actor') {
      expect(out.has(r.actorId)).toBe(false);
      out.set(r.actorId, [r.value]);
      state.set(r.actorId, r.value);
    } else if (r.type === '@xstate.event') {
      expect(r.from).toBe(state.get(r.actorId));
      pendingEvent = r;
    } else {
      expect(pendingEvent).toMatchObject({ actorId: r.actorId, event: r.event });
      expect(r.from).toBe(state.get(r.actorId));
      expect(r.value).toBe(xstateNext(machine, r.from, r.event));
      state.set(r.actorId, r.value);
      out.get(r.actorId)!.push(`${r.event}>${r.value}`);
    }
  }
  return out;
}

const parseLines = <T>(text: string): T[] => text.trim().split('\n').filter((l) => l !== '').map((l) => JSON.parse(l) as T);

/** The smallest WebSocket server that takes text messages (RFC 6455: handshake, masked client frames). */
async function webSocketSink(): Promise<{ url: string; messages: string[]; close(): Promise<void> }> {
  const messages: string[] = [];
  const sockets = new Set<net.Socket>();
  const server = http.createServer((_, res) => res.writeHead(426).end());
  server.on('upgrade', (req: http.IncomingMessage, socket: net.Socket) => {
    sockets.add(socket);
    const accept = crypto.createHash('sha1').update(`${req.headers['sec-websocket-key']}258EAFA5-E914-47DA-95CA-C5AB0DC85B11`).digest('base64');
    socket.write(`HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ${accept}\r\n\r\n`);
    let buf = Buffer.alloc(0);
    socket.on('data', (chunk: Buffer) => {
      buf = Buffer.concat([buf, chunk]);
      for (;;) {
        if (buf.length < 2) return;
        const opcode = buf[0] & 0x0f;
        let len = buf[1] & 0x7f;
        let off = 2;
        if (len === 126) {
          if (buf.length < 4) return;
          len = buf.readUInt16BE(2);
          off = 4;
        } else if (len === 127) {
          if (buf.length < 10) return;
          len = Number(buf.readBigUInt64BE(2));
          off = 10;
        }
        const masked = (buf[1] & 0x80) !== 0;
        const mask = masked ? buf.subarray(off, off + 4) : undefined;
        if (masked) off += 4;
        if (buf.length < off + len) return;
        const payload = Buffer.from(buf.subarray(off, off + len));
        if (mask) for (let i = 0; i < payload.length; i++) payload[i] ^= mask[i & 3];
        buf = buf.subarray(off + len);
        if (opcode === 1) messages.push(payload.toString('utf8'));
        if (opcode === 8) {
          socket.end(Buffer.from([0x88, 0]));
          return;
        }
      }
    });
    socket.on('error', () => undefined);
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = (server.address() as net.AddressInfo).port;
  return {
    url: `ws://127.0.0.1:${port}`,
    messages,
    close: async () => {
      for (const s of sockets) s.destroy();
      await new Promise((r) => server.close(r));
    },
  };
}

describe('dmstate inspect', () => {
  let tmp: string;
  let pool: string;
  let daemon: Proc | undefined;
  const spawned: Proc[] = [];

  beforeAll(async () => {
    if (!fs.existsSync(path.join(ROOT, 'dist/src/frontends/cli/inspect.js'))) throw new Error('build first (npm run build)');
    if (spawnSync('sh', ['-c', 'command -v qemu-io']).status !== 0) {
      throw new Error(`dmstate inspect tests write through NBD with qemu-io: ${process.env.DMSTATE_TOOLS_MISSING ?? 'run test/install-tools.sh as root'}`);
    }
    tmp = fs.mkdtempSync('/tmp/dmi-');
    pool = path.join(tmp, 'p');
    for (const [f, mib] of [['disk.img', 16], ['base.img', 8], ['cow.img', 4]] as const) {
      fs.writeFileSync(path.join(tmp, f), '');
      fs.truncateSync(path.join(tmp, f), mib << 20);
    }
    daemon = start(['serve', '--pool', pool]);
    await waitFor('the daemon', () => daemon!.stderr.includes('serving pool'));
    const r = await cli(['dmsetup', '--pool', pool, 'create', 'lin', '--table', `0 32768 linear ${tmp}/disk.img 0`]);
    expect(r.code).toBe(0);
  });

  afterAll(async () => {
    for (const p of [...spawned, daemon]) {
      if (p && p.child.exitCode === null && p.child.signalCode === null) {
        p.child.kill('SIGTERM');
        await Promise.race([p.exited, new Promise((r) => setTimeout(r, 5000))]);
        if (p.child.exitCode === null) p.child.kill('SIGKILL');
      }
    }
    if (tmp) fs.rmSync(tmp, { recursive: true, force: true });
  });

  const nbd = (name: string): string => `nbd+unix:///${name}?socket=${pool}/nbd.sock`;

  test('--json while qemu-io writes and reads through NBD: every bio a whole lifecycle; --count ends it', async () => {
    const p = await inspect(pool, ['--json', '--device', 'lin', '--actor', 'bio', '--count', '14']);
    spawned.push(p);
    expect(p.stderr).toContain('inspecting bio on lin');
    qemuIo(nbd('lin'), ['write -P 0xab 8192 4k', 'read -P 0xab 8192 4k']);
    expect(await finish(p)).toBe(0);
    const records = parseLines<InspectionRecord>(p.stdout);
    expect(records).toHaveLength(14);
    const lives = [...lifecycles(records).entries()];
    expect(lives.map(([, l]) => l.join(' '))).toEqual([
      'SUBMITTED MAP>MAPPED REMAP>REMAPPED IO_DONE>COMPLETED',
      'SUBMITTED MAP>MAPPED REMAP>REMAPPED IO_DONE>COMPLETED',
    ]);
    const actors = records.filter((r) => r.type === '@xstate.actor');
    expect(actors.map((r) => r.info)).toEqual([
      { op: 'write', sector: 16, lengthSectors: 8 },
      { op: 'read', sector: 16, lengthSectors: 8 },
    ]);
    expect(records.every((r) => r.type !== 'dmstate.inspect.dropped' && r.device === 'lin')).toBe(true);
  });

  test('text output, and a merge started over the control socket: the merge actor IDLE → DONE, its kcopyd jobs', async () => {
    const dm = (args: string[]) => cli(['dmsetup', '--pool', pool, ...args]);
    expect((await dm(['create', 'base', '--table', `0 16384 snapshot-origin ${tmp}/base.img`])).code).toBe(0);
    expect((await dm(['create', 'snap', '--table', `0 16384 snapshot ${tmp}/base.img ${tmp}/cow.img P 8`])).code).toBe(0);
    qemuIo(nbd('base'), ['write -P 0x11 0 64k', 'write -P 0x22 1M 32k']);
    const json = await inspect(pool, ['--json', '--actor', 'merge,kcopyd', '--rate', '0']);
    const text = await inspect(pool, ['--device', 'base', '--actor', 'merge']);
    spawned.push(json, text);
    const merged = await cli(['merge', '--pool', pool, 'snap']);
    expect(merged.code).toBe(0);
    await waitFor('the merge records', () => json.stdout.includes('"value":"DONE"') && text.stdout.includes('--> DONE'));
    json.child.kill('SIGINT');
    text.child.kill('SIGINT');
    expect(await finish(json)).toBe(0);
    expect(await finish(text)).toBe(0);
    const records = parseLines<InspectionRecord>(json.stdout);
    const lives = lifecycles(records);
    const merge = lives.get('merge:base')!;
    expect(merge[0]).toBe('IDLE');
    expect(merge.at(-1)).toBe('NO_MORE>DONE');
    // Two runs (64k and 32k apart): two copies back to the origin, each a kcopyd job.
    expect(merge.filter((s) => s === 'COMMITTED>PREPARE')).toHaveLength(2);
    const jobs = [...lives.entries()].filter(([id]) => id.startsWith('kcopyd-job:'));
    expect(jobs.length).toBeGreaterThanOrEqual(2);
    for (const [, l] of jobs) expect(l).toEqual(['START', 'RUN>RUNNING', 'ALL_PIECES_DONE>COMPLETE']);
    const lines = text.stdout.trim().split('\n');
    expect(lines[0]).toMatch(/^\S+Z merge:base started in IDLE$/);
    expect(lines.at(-1)).toMatch(/^\S+Z merge:base PREPARE --NO_MORE--> DONE \(done\)$/);
    expect(lines).toHaveLength(merge.length); // one line per state: the actor, then one per transition
  });

  test('--actor mirror: a mirror created, resynced and written through NBD; its resync, write groups and transactions', async () => {
    for (const [f, mib] of [['ma.img', 4], ['mb.img', 4], ['mlog.img', 1]] as const) {
      fs.writeFileSync(path.join(tmp, f), '');
      fs.truncateSync(path.join(tmp, f), mib << 20);
    }
    const json = await inspect(pool, ['--json', '--device', 'mir', '--actor', 'mirror', '--rate', '0']);
    const text = await inspect(pool, ['--device', 'mir', '--actor', 'mirror-resync']);
    spawned.push(json, text);
    expect(json.stderr).toContain('inspecting mirror-write-group, mirror-write-transaction, mirror-resync on mir');
    const table = `0 8192 mirror disk 3 ${tmp}/mlog.img 256 sync 2 ${tmp}/ma.img 0 ${tmp}/mb.img 0 1 handle_errors`;
    expect((await cli(['dmsetup', '--pool', pool, 'create', 'mir', '--table', table])).code).toBe(0);
    await waitFor('the resync', () => json.stdout.includes('"value":"IN_SYNC"') && text.stdout.includes('--NO_WORK--> IN_SYNC'));
    qemuIo(nbd('mir'), ['write -P 0x33 4096 4k']);
    await waitFor('the write group', () => /"actorId":"mirror-write-group:mir:\d+".*"value":"COMPLETED"/.test(json.stdout));
    json.child.kill('SIGINT');
    text.child.kill('SIGINT');
    expect(await finish(json)).toBe(0);
    expect(await finish(text)).toBe(0);
    const records = parseLines<InspectionRecord>(json.stdout);
    expect(records.every((r) => r.type !== 'dmstate.inspect.dropped' && r.device === 'mir')).toBe(true);
    const lives = lifecycles(records);
    const resync = lives.get('mirror-resync:mir')!;
    expect(resync[0]).toBe('IDLE');
    expect(resync.at(-1)).toBe('NO_WORK>IN_SYNC');
    expect(resync.filter((s) => s === 'COPIED>THROTTLED')).toHaveLength(32); // 32 regions of 256 sectors
    const actors = records.filter((r) => r.type === '@xstate.actor');
    const write = actors.find((r) => r.kind === 'mirror-write-group' && r.info?.op === 'write')!;
    expect(write.info).toMatchObject({ sector: 8, lengthSectors: 8, region: 0 });
    expect(write.actorId).toMatch(/^mirror-write-group:mir:\d+$/);
    expect(lives.get(write.actorId)).toEqual(['START', 'ISSUE>WRITING', 'ALL_DONE>COMPLETED']);
    const txs = actors.filter((r) => r.parentId === write.actorId);
    expect(txs.map((r) => [r.actorId, r.info?.legDevice])).toEqual([
      [`${write.actorId.replace('mirror-write-group:', 'mirror-write-transaction:')}.0`, `${tmp}/ma.img`],
      [`${write.actorId.replace('mirror-write-group:', 'mirror-write-transaction:')}.1`, `${tmp}/mb.img`],
    ]);
    for (const t of txs) expect(lives.get(t.actorId)!.at(-1)).toBe('SUPER_FLUSHED>DONE');
    const lines = text.stdout.trim().split('\n');
    expect(lines[0]).toMatch(/^\S+Z mirror-resync:mir started in IDLE regions=32 regionSectors=256$/);
    expect(lines.at(-1)).toMatch(/^\S+Z mirror-resync:mir SCANNING --NO_WORK--> IN_SYNC$/);
  });

  test('--stately prints Stately inspector messages as JSON lines', async () => {
    const p = await inspect(pool, ['--stately', '--device', 'lin', '--count', '7']);
    spawned.push(p);
    qemuIo(nbd('lin'), ['write -P 0x5a 0 4k']);
    expect(await finish(p)).toBe(0);
    const msgs = parseLines<Record<string, unknown>>(p.stdout);
    expect(msgs.map((m) => m.type)).toEqual(['@xstate.actor', ...Array(3).fill(['@xstate.event', '@xstate.snapshot']).flat()]);
    const actor = msgs[0];
    expect(actor.parentId).toBeUndefined();
    expect(actor).toMatchObject({ name: 'bio', _version: '0.7.0', snapshot: { status: 'active', value: 'SUBMITTED', context: { device: 'lin', op: 'write' } } });
    expect(JSON.parse(actor.definition as string)).toEqual(MACHINES.bio.config);
    for (const m of msgs) {
      expect(m.sessionId).toBe(actor.sessionId);
      expect(m.rootId).toBe(actor.sessionId);
      expect(typeof m.createdAt).toBe('string');
    }
    expect(new Set(msgs.map((m) => m.id)).size).toBe(7);
    expect(msgs.at(-1)).toMatchObject({ event: { type: 'IO_DONE' }, snapshot: { status: 'done', value: 'COMPLETED' } });
  });

  test('--stately-ws sends the same messages to a WebSocket server (Node 20: with --experimental-websocket)', async () => {
    const sink = await webSocketSink();
    try {
      const env = { ...process.env, NODE_OPTIONS: `${process.env.NODE_OPTIONS ?? ''} --experimental-websocket --no-warnings`.trim() };
      const p = await inspect(pool, ['--stately-ws', sink.url, '--device', 'lin', '--count', '7'], env);
      spawned.push(p);
      qemuIo(nbd('lin'), ['write -P 0x5b 0 4k']);
      expect(await finish(p)).toBe(0);
      expect(p.stdout).toBe('');
      await waitFor('the messages', () => sink.messages.length >= 7);
      const msgs = sink.messages.map((m) => JSON.parse(m) as { type: string; snapshot?: { value: string } });
      expect(msgs.map((m) => m.type)).toEqual(['@xstate.actor', ...Array(3).fill(['@xstate.event', '@xstate.snapshot']).flat()]);
      expect(msgs.at(-1)!.snapshot!.value).toBe('COMPLETED');
    } finally {
      await sink.close();
    }
  });

  test('bad input: unknown kind or option, bad numbers, two formats (exit 2); no daemon (exit 1)', async () => {
    for (const [args, msg] of [
      [['--actor', 'thread'], /unknown actor kind 'thread'/],
      [['--rate', 'fast'], /--rate: "fast" is not a non-negative integer/],
      [['--count', '0'], /--count must be at least 1/],
      [['--json', '--stately'], /choose one of --json, --stately/],
      [['--stately-ws', 'http://x'], /needs a ws:\/\/ or wss:\/\/ URL/],
      [['--bogus'], /unknown option '--bogus'/],
    ] as const) {
      const r = await cli(['inspect', '--pool', pool, ...args]);
      expect(r.code, args.join(' ')).toBe(2);
      expect(r.stderr).toMatch(msg);
      expect(r.stdout).toBe('');
    }
    const none = await cli(['inspect', '--pool', path.join(tmp, 'nopool')]);
    expect(none.code).toBe(1);
    expect(none.stderr).toMatch(/no daemon/);
  });
});

describe('the daemon side', () => {
  test('an inspect request streams records; bad filters are refused; the watch ends when the client goes', async () => {
    const tmp = fs.mkdtempSync('/tmp/dmd-');
    const daemon = await Daemon.start({ poolDir: path.join(tmp, 'p') });
    try {
      daemon.engine.registerBackingDevice('mem', new MemoryBlockDevice({ sizeSectors: sectors(2048) }));
      await daemon.engine.create('m', { table: '0 1024 linear mem 0' });
      const client = await ControlClient.connect(daemon.paths.controlSocket, daemon.paths.dir);
      await expect(client.request({ op: 'inspect', kinds: ['nope'] })).rejects.toMatchObject({ code: 'DM_INVALID_ARGUMENT' });
      await expect(client.request({ op: 'inspect', maxEventsPerSecond: -5 })).rejects.toMatchObject({ code: 'DM_INVALID_ARGUMENT' });
      expect(daemon.engine.inspector.stats().watches).toBe(0);
      const got: InspectionRecord[] = [];
      let started: unknown;
      void client.stream({ op: 'inspect', devices: ['m', 'later'] }, (r) => {
        if (r.op === 'inspect.started') started = r;
        if (r.op === 'inspection') got.push(r.record);
        return false;
      }).catch(() => undefined);
      await waitFor('the watch', () => started !== undefined);
      expect(started).toMatchObject({ op: 'inspect.started', devices: ['m', 'later'], kinds: [], maxEventsPerSecond: 1000, missingDevices: ['later'] });
      expect(daemon.engine.device('m')!.bioObserver).toBeDefined();
      await daemon.engine.device('m')!.write(sectors(0), Buffer.alloc(512));
      await waitFor('7 records', () => got.length === 7);
      expect(lifecycles(got).get('bio:m:1')).toEqual(['SUBMITTED', 'MAP>MAPPED', 'REMAP>REMAPPED', 'IO_DONE>COMPLETED']);
      client.close();
      await waitFor('the daemon to drop the watch', () => daemon.engine.inspector.stats().watches === 0);
      expect(daemon.engine.device('m')!.bioObserver).toBeUndefined();
    } finally {
      await daemon.close();
      fs.rmSync(tmp, { recursive: true, force: true });
    }
  });
});
