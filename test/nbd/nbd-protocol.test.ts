/**
 * The NBD server byte by byte: a tiny client written here on node:net drives an in-process NbdServer over an
 * Engine of memory devices, through the handshake (flags, options, errors) and transmission (every command, its
 * flags, bad input, pipelining, out-of-order replies, disconnects). Reply bytes are checked field by field
 * against NetworkBlockDevice doc/proto.md (restated in /work/shared/spec/nbd.md).
 */
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, test } from 'vitest';
import { MemoryLevel } from 'memory-level';
import { Engine } from '../../src/core/engine.js';
import { BlockDevice, type BlockDeviceSupports } from '../../src/block/contract.js';
import { MemoryBlockDevice } from '../../src/block/memory-device.js';
import { sectors, type Sector } from '../../src/block/units.js';
import type { LevelDb } from '../../src/log/event-log.js';
import { NbdServer, engineExports } from '../../src/frontends/nbd/server.js';
import * as P from '../../src/frontends/nbd/protocol.js';

// ---- a tiny NBD client ---------------------------------------------------------------------------------

/** A socket with a byte buffer: read(n) waits (with a timeout) for exactly n bytes. */
class Peer {
  private chunks: Buffer[] = [];
  private buffered = 0;
  private waiter: { bytes: number; resolve: (b: Buffer) => void; reject: (e: Error) => void; timer: NodeJS.Timeout } | undefined;
  /** The server ended its side (FIN) or the socket closed. */
  ended = false;
  closed = false;
  readonly closedPromise: Promise<void>;

  constructor(readonly sock: net.Socket) {
    livePeers.add(this);
    sock.on('data', (c: Buffer) => {
      this.chunks.push(c);
      this.buffered += c.length;
      this.serve();
    });
    sock.on('error', () => {});
    sock.on('end', () => {
      this.ended = true;
      this.serve();
    });
    this.closedPromise = new Promise((resolve) =>
      sock.on('close', () => {
        this.closed = true;
        this.ended = true;
        livePeers.delete(this);
        this.serve();
        resolve();
      }),
    );
  }

  static connect(socketPath: string, options: { allowHalfOpen?: boolean } = {}): Promise<Peer> {
    return new Promise((resolve, reject) => {
      const sock = net.connect({ path: socketPath, allowHalfOpen: options.allowHalfOpen ?? false });
      sock.once('error', reject);
      sock.once('connect', () => {
        sock.off('error', reject);
        resolve(new Peer(sock));
      });
    });
  }

  get pending(): number {
    return this.buffered;
  }

  private take(bytes: number): Buffer {
    const parts: Buffer[] = [];
    for (let need = bytes; need > 0; ) {
      const c = this.chunks[0];
      if (c.length <= need) {
        parts.push(c);
        this.chunks.shift();
        need -= c.length;
      } else {
        parts.push(c.subarray(0, need));
        this.chunks[0] = c.subarray(need);
        need = 0;
      }
    }
    this.buffered -= bytes;
    return parts.length === 1 ? parts[0] : Buffer.concat(parts, bytes);
  }

  private serve(): void {
    const w = this.waiter;
    if (!w) return;
    if (this.buffered >= w.bytes) {
      this.waiter = undefined;
      clearTimeout(w.timer);
      w.resolve(this.take(w.bytes));
    } else if (this.ended) {
      this.waiter = undefined;
      clearTimeout(w.timer);
      w.reject(new Error(`connection ended with ${this.buffered} of ${w.bytes} awaited bytes`));
    }
  }

  read(bytes: number, timeoutMs = 5000): Promise<Buffer> {
    if (this.waiter) return Promise.reject(new Error('one read at a time'));
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiter = undefined;
        reject(new Error(`timed out waiting for ${bytes} bytes (have ${this.buffered})`));
      }, timeoutMs);
      this.waiter = { bytes, resolve, reject, timer };
      this.serve();
    });
  }

  write(b: Buffer): void {
    this.sock.write(b);
  }

  /** The server ends the connection without sending anything more. */
  async expectEnded(timeoutMs = 3000): Promise<void> {
    const until = performance.now() + timeoutMs;
    while (!this.ended && performance.now() < until) await sleep(10);
    expect(this.ended, 'the server should have ended the connection').toBe(true);
    expect(this.buffered, 'no bytes after the end').toBe(0);
  }

  destroy(): void {
    this.sock.destroy();
  }
}

/** Every connection a test opened, closed after each test even when it fails midway. */
const livePeers = new Set<Peer>();

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

async function greet(p: Peer, clientFlags = P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES): Promise<void> {
  const hello = await p.read(18);
  expect(hello.readBigUInt64BE(0)).toBe(P.NBDMAGIC);
  expect(hello.readBigUInt64BE(8)).toBe(P.IHAVEOPT);
  expect(hello.readUInt16BE(16)).toBe(P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES);
  const f = Buffer.alloc(4);
  f.writeUInt32BE(clientFlags >>> 0);
  p.write(f);
}

function option(opt: number, data: Buffer = Buffer.alloc(0), length = data.length, magic = P.IHAVEOPT): Buffer {
  const h = Buffer.alloc(16);
  h.writeBigUInt64BE(magic, 0);
  h.writeUInt32BE(opt, 8);
  h.writeUInt32BE(length, 12);
  return Buffer.concat([h, data]);
}

interface OptReply {
  option: number;
  type: number;
  data: Buffer;
}

async function optReply(p: Peer): Promise<OptReply> {
  const h = await p.read(20);
  expect(h.readBigUInt64BE(0)).toBe(P.OPT_REPLY_MAGIC);
  const length = h.readUInt32BE(16);
  const data = length > 0 ? await p.read(length) : Buffer.alloc(0);
  return { option: h.readUInt32BE(8), type: h.readUInt32BE(12), data };
}

/** Replies up to and including the final one (ACK or an error). */
async function optReplies(p: Peer, opt: number): Promise<OptReply[]> {
  const out: OptReply[] = [];
  for (;;) {
    const r = await optReply(p);
    expect(r.option).toBe(opt);
    out.push(r);
    if (r.type === P.REP_ACK || (r.type & 0x80000000) !== 0) return out;
  }
}

function str(s: string): Buffer {
  const b = Buffer.from(s, 'utf8');
  const l = Buffer.alloc(4);
  l.writeUInt32BE(b.length);
  return Buffer.concat([l, b]);
}

function infoGoData(name: string, infos: number[] = []): Buffer {
  const n = Buffer.alloc(2 + 2 * infos.length);
  n.writeUInt16BE(infos.length, 0);
  infos.forEach((t, i) => n.writeUInt16BE(t, 2 + 2 * i));
  return Buffer.concat([str(name), n]);
}

function metaData(name: string, queries: string[]): Buffer {
  const c = Buffer.alloc(4);
  c.writeUInt32BE(queries.length);
  return Buffer.concat([str(name), c, ...queries.map(str)]);
}

async function handshake(socketPath: string): Promise<Peer> {
  const p = await Peer.connect(socketPath);
  await greet(p);
  return p;
}

/** Connects and enters transmission on `name` with GO. */
async function open(socketPath: string, name: string, o: { structured?: boolean; meta?: boolean } = {}): Promise<Peer> {
  const p = await handshake(socketPath);
  if (o.structured) {
    p.write(option(P.OPT_STRUCTURED_REPLY));
    expect((await optReplies(p, P.OPT_STRUCTURED_REPLY)).map((r) => r.type)).toEqual([P.REP_ACK]);
  }
  if (o.meta) {
    p.write(option(P.OPT_SET_META_CONTEXT, metaData(name, [P.META_CONTEXT_BASE_ALLOCATION])));
    const rs = await optReplies(p, P.OPT_SET_META_CONTEXT);
    expect(rs.map((r) => r.type)).toEqual([P.REP_META_CONTEXT, P.REP_ACK]);
  }
  p.write(option(P.OPT_GO, infoGoData(name, [P.INFO_BLOCK_SIZE])));
  const rs = await optReplies(p, P.OPT_GO);
  expect(rs[rs.length - 1].type, `GO ${name}`).toBe(P.REP_ACK);
  return p;
}

interface Req {
  flags?: number;
  type: number;
  cookie: bigint;
  offset?: number | bigint;
  length?: number;
  data?: Buffer;
  magic?: number;
}

function request(r: Req): Buffer {
  const h = Buffer.alloc(28);
  h.writeUInt32BE(r.magic ?? P.REQUEST_MAGIC, 0);
  h.writeUInt16BE(r.flags ?? 0, 4);
  h.writeUInt16BE(r.type, 6);
  h.writeBigUInt64BE(r.cookie, 8);
  h.writeBigUInt64BE(BigInt(r.offset ?? 0), 16);
  h.writeUInt32BE(r.length ?? r.data?.length ?? 0, 24);
  return r.data ? Buffer.concat([h, r.data]) : h;
}

interface SimpleReply {
  error: number;
  cookie: bigint;
  data: Buffer;
}

/** A simple reply; `readLength` bytes of data follow a successful READ. */
async function simpleReply(p: Peer, readLength = 0): Promise<SimpleReply> {
  const h = await p.read(16);
  expect(h.readUInt32BE(0), 'simple reply magic').toBe(P.SIMPLE_REPLY_MAGIC);
  const error = h.readUInt32BE(4);
  const data = error === 0 && readLength > 0 ? await p.read(readLength) : Buffer.alloc(0);
  return { error, cookie: h.readBigUInt64BE(8), data };
}

interface Chunk {
  flags: number;
  type: number;
  cookie: bigint;
  payload: Buffer;
}

async function chunk(p: Peer): Promise<Chunk> {
  const h = await p.read(20);
  expect(h.readUInt32BE(0), 'structured reply magic').toBe(P.STRUCTURED_REPLY_MAGIC);
  const length = h.readUInt32BE(16);
  const payload = length > 0 ? await p.read(length) : Buffer.alloc(0);
  return { flags: h.readUInt16BE(4), type: h.readUInt16BE(6), cookie: h.readBigUInt64BE(8), payload };
}

interface StructuredReply {
  cookie: bigint;
  chunks: Chunk[];
  /** The errno of the first error chunk, else 0. */
  error: number;
}

/** Chunks of one reply up to DONE (the test sends one request at a time when it uses this). */
async function structuredReply(p: Peer): Promise<StructuredReply> {
  const chunks: Chunk[] = [];
  for (;;) {
    const c = await chunk(p);
    if (chunks.length > 0) expect(c.cookie).toBe(chunks[0].cookie);
    chunks.push(c);
    if ((c.flags & P.REPLY_FLAG_DONE) !== 0) break;
  }
  const err = chunks.find((c) => (c.type & 0x8000) !== 0);
  if (err) checkErrorChunk(err);
  return { cookie: chunks[0].cookie, chunks, error: err ? err.payload.readUInt32BE(0) : 0 };
}

function checkErrorChunk(c: Chunk): void {
  expect(c.type).toBe(P.REPLY_TYPE_ERROR);
  expect(c.payload.length).toBeGreaterThanOrEqual(6);
  expect(c.payload.readUInt32BE(0)).not.toBe(0);
  const msgLength = c.payload.readUInt16BE(4);
  expect(msgLength).toBe(c.payload.length - 6);
  expect(msgLength).toBeLessThanOrEqual(4096);
}

/** The data of a successful structured READ reply of [offset, offset+length). */
function readData(r: StructuredReply, offset: number, length: number): Buffer {
  expect(r.error).toBe(0);
  const out = Buffer.alloc(length);
  let covered = 0;
  for (const c of r.chunks) {
    if (c.type === P.REPLY_TYPE_OFFSET_DATA) {
      const o = Number(c.payload.readBigUInt64BE(0));
      c.payload.copy(out, o - offset, 8);
      covered += c.payload.length - 8;
    } else if (c.type === P.REPLY_TYPE_OFFSET_HOLE) {
      covered += c.payload.readUInt32BE(8);
    } else expect(c.type).toBe(P.REPLY_TYPE_NONE);
  }
  expect(covered).toBe(length);
  return out;
}

const pattern = (bytes: number, seed: number): Buffer => {
  const b = Buffer.alloc(bytes);
  for (let i = 0; i < bytes; i++) b[i] = (i * 31 + seed * 7 + (i >> 9)) & 0xff;
  return b;
};

// ---- the server under test ------------------------------------------------------------------------------

/** A memory device whose reads below `holdBelowSector` wait until release(): to keep requests in flight. */
class GateDevice extends BlockDevice {
  readonly supports: BlockDeviceSupports = { flush: true, discard: true, fua: true, holes: false };
  readonly name = 'gate';
  holdBelowSector = 0;
  /** Reads that reached this device. */
  reads = 0;
  private held: Array<() => void> = [];
  constructor(private readonly inner: MemoryBlockDevice) {
    super();
  }
  get sizeSectors(): Sector {
    return this.inner.sizeSectors;
  }
  get heldCount(): number {
    return this.held.length;
  }
  release(): void {
    const h = this.held;
    this.held = [];
    for (const f of h) f();
  }
  protected _read(s: Sector, b: Uint8Array): Promise<void> {
    this.reads++;
    if (s < this.holdBelowSector) return new Promise((resolve, reject) => this.held.push(() => this.inner.read(s, b).then(resolve, reject)));
    return this.inner.read(s, b);
  }
  protected _write(s: Sector, b: Uint8Array, fua: boolean): Promise<void> {
    return this.inner.write(s, b, { fua });
  }
  protected override _discard(s: Sector, n: Sector): Promise<void> {
    return this.inner.discard(s, n);
  }
}

const D_SECTORS = 8192; // 'd': 4 MiB
const D_BYTES = D_SECTORS * 512;
const FLAGS_BASE =
  P.TFLAG_HAS_FLAGS | P.TFLAG_SEND_FLUSH | P.TFLAG_SEND_FUA | P.TFLAG_SEND_TRIM | P.TFLAG_SEND_WRITE_ZEROES | P.TFLAG_SEND_FAST_ZERO | P.TFLAG_CAN_MULTI_CONN;

let dir: string;
let sockPath: string;
let engine: Engine;
let server: NbdServer;
let m0: MemoryBlockDevice;
let m2: MemoryBlockDevice;
let gate: GateDevice;

beforeAll(async () => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nbdp-'));
  sockPath = path.join(dir, 'nbd.sock');
  engine = await Engine.open({ db: new MemoryLevel() as unknown as LevelDb });
  m0 = new MemoryBlockDevice({ sizeSectors: sectors(D_SECTORS) });
  m2 = new MemoryBlockDevice({ sizeSectors: sectors(2048) });
  gate = new GateDevice(new MemoryBlockDevice({ sizeSectors: sectors(2048) }));
  engine.registerBackingDevice('m0', m0);
  engine.registerBackingDevice('m1', new MemoryBlockDevice({ sizeSectors: sectors(4096) }));
  engine.registerBackingDevice('m2', m2);
  engine.registerBackingDevice('g0', gate);
  await engine.create('d', { table: `0 ${D_SECTORS} linear m0 0` });
  // 'bs': 1 MiB of memory (holes until written) then 1 MiB of the zero target.
  await engine.create('bs', { table: '0 2048 linear m1 0\n2048 2048 zero' });
  await engine.create('ro', { table: '0 2048 linear m2 0', readOnly: true });
  await engine.create('gd', { table: '0 2048 linear g0 0' });
  server = await NbdServer.start(engineExports(engine), { unixPath: sockPath });
});

afterEach(async () => {
  gate.holdBelowSector = 0;
  gate.release();
  const closing = [...livePeers].map((p) => p.closedPromise);
  for (const p of livePeers) p.destroy();
  await Promise.all(closing);
  // The server sees each close and releases the exports.
  const until = performance.now() + 2000;
  while (performance.now() < until && engine.names().some((n) => engine.info(n).openCount > 0)) await sleep(5);
});

afterAll(async () => {
  await server?.close();
  await engine?.close();
  fs.rmSync(dir, { recursive: true, force: true });
});

// ---- handshake ------------------------------------------------------------------------------------------

describe('handshake', () => {
  test('greeting is NBDMAGIC, IHAVEOPT, FIXED_NEWSTYLE|NO_ZEROES', async () => {
    const p = await Peer.connect(sockPath);
    const hello = await p.read(18);
    expect(hello.toString('hex')).toBe('4e42444d41474943' + '49484156454f5054' + '0003');
    p.destroy();
  });

  test('unknown client flag bits → the server closes the connection', async () => {
    const p = await Peer.connect(sockPath);
    await greet(p, P.FLAG_FIXED_NEWSTYLE | 0x4);
    await p.expectEnded();
    const q = await Peer.connect(sockPath);
    await greet(q, 0x80000000 | P.FLAG_FIXED_NEWSTYLE);
    await q.expectEnded();
  });

  test('bad option magic → closed', async () => {
    const p = await handshake(sockPath);
    p.write(option(P.OPT_LIST, Buffer.alloc(0), 0, 0x1122334455667788n));
    await p.expectEnded();
  });

  test('unknown option → ERR_UNSUP (option echoed), and the connection is still usable', async () => {
    const p = await handshake(sockPath);
    p.write(option(99, Buffer.from('some data')));
    const [r] = await optReplies(p, 99);
    expect(r.type).toBe(P.REP_ERR_UNSUP);
    p.write(option(4 /* NBD_OPT_PEEK_EXPORT, withdrawn */));
    expect((await optReplies(p, 4))[0].type).toBe(P.REP_ERR_UNSUP);
    p.write(option(P.OPT_LIST));
    const rs = await optReplies(p, P.OPT_LIST);
    expect(rs[rs.length - 1].type).toBe(P.REP_ACK);
    p.destroy();
  });

  test('LIST returns every export then ACK; LIST with data → ERR_INVALID', async () => {
    const p = await handshake(sockPath);
    p.write(option(P.OPT_LIST));
    const rs = await optReplies(p, P.OPT_LIST);
    expect(rs[rs.length - 1].type).toBe(P.REP_ACK);
    const names = rs.slice(0, -1).map((r) => {
      expect(r.type).toBe(P.REP_SERVER);
      const n = r.data.readUInt32BE(0);
      expect(n).toBeLessThanOrEqual(r.data.length - 4);
      return r.data.toString('utf8', 4, 4 + n);
    });
    expect(names.sort()).toEqual(['bs', 'd', 'gd', 'ro']);
    p.write(option(P.OPT_LIST, Buffer.from('x')));
    expect((await optReplies(p, P.OPT_LIST)).map((r) => r.type)).toEqual([P.REP_ERR_INVALID]);
    p.destroy();
  });

  test('INFO: INFO_EXPORT (size, flags), NAME when asked, BLOCK_SIZE 512/4096/32 MiB, then ACK; no transmission', async () => {
    const p = await handshake(sockPath);
    p.write(option(P.OPT_INFO, infoGoData('d', [P.INFO_NAME, P.INFO_BLOCK_SIZE, 0x7777 /* unknown: ignored */])));
    const rs = await optReplies(p, P.OPT_INFO);
    expect(rs[rs.length - 1]).toEqual({ option: P.OPT_INFO, type: P.REP_ACK, data: Buffer.alloc(0) });
    const infos = new Map(rs.slice(0, -1).map((r) => [r.data.readUInt16BE(0), r.data]));
    for (const r of rs.slice(0, -1)) expect(r.type).toBe(P.REP_INFO);
    const exp = infos.get(P.INFO_EXPORT)!;
    expect(exp.length).toBe(12);
    expect(exp.readBigUInt64BE(2)).toBe(BigInt(D_BYTES));
    expect(exp.readUInt16BE(10)).toBe(FLAGS_BASE); // no structured replies yet: no SEND_DF
    expect(infos.get(P.INFO_NAME)!.toString('utf8', 2)).toBe('d');
    const bs = infos.get(P.INFO_BLOCK_SIZE)!;
    expect(bs.length).toBe(14);
    expect([bs.readUInt32BE(2), bs.readUInt32BE(6), bs.readUInt32BE(10)]).toEqual([512, 4096, 32 * 1024 * 1024]);
    // Still negotiating: INFO on the read-only export says READ_ONLY; after STRUCTURED_REPLY flags gain SEND_DF.
    p.write(option(P.OPT_INFO, infoGoData('ro')));
    const ro = (await optReplies(p, P.OPT_INFO)).find((r) => r.type === P.REP_INFO && r.data.readUInt16BE(0) === P.INFO_EXPORT)!;
    expect(ro.data.readUInt16BE(10)).toBe(FLAGS_BASE | P.TFLAG_READ_ONLY);
    expect(ro.data.readBigUInt64BE(2)).toBe(1024n * 1024n);
    p.write(option(P.OPT_STRUCTURED_REPLY));
    await optReplies(p, P.OPT_STRUCTURED_REPLY);
    p.write(option(P.OPT_INFO, infoGoData('d')));
    const d2 = (await optReplies(p, P.OPT_INFO)).find((r) => r.type === P.REP_INFO && r.data.readUInt16BE(0) === P.INFO_EXPORT)!;
    expect(d2.data.readUInt16BE(10)).toBe(FLAGS_BASE | P.TFLAG_SEND_DF);
    p.destroy();
  });

  test('INFO/GO with malformed lengths → ERR_INVALID, connection still usable', async () => {
    const p = await handshake(sockPath);
    const bad = [
      Buffer.alloc(3), // shorter than name length + count
      Buffer.concat([Buffer.from([0, 0, 0, 100]), Buffer.from('d'), Buffer.alloc(2)]), // name length past the data
      Buffer.concat([str('d'), Buffer.from([0, 2]), Buffer.from([0, 3])]), // 2 info requests announced, 1 sent
      Buffer.concat([str('d'), Buffer.from([0, 0]), Buffer.from([0])]), // trailing byte
    ];
    for (const opt of [P.OPT_INFO, P.OPT_GO]) {
      for (const data of bad) {
        p.write(option(opt, data));
        const rs = await optReplies(p, opt);
        expect(rs.map((r) => r.type)).toEqual([P.REP_ERR_INVALID]);
      }
    }
    p.write(option(P.OPT_GO, infoGoData('d')));
    const rs = await optReplies(p, P.OPT_GO);
    expect(rs[rs.length - 1].type).toBe(P.REP_ACK);
    p.write(request({ type: P.CMD_READ, cookie: 1n, offset: 0, length: 512 }));
    expect((await simpleReply(p, 512)).error).toBe(0);
    p.destroy();
  });

  test('INFO/GO on an unknown export → ERR_UNKNOWN with no INFO replies; GO on a real one then works', async () => {
    const p = await handshake(sockPath);
    for (const opt of [P.OPT_INFO, P.OPT_GO]) {
      for (const name of ['nope', '', 'D']) {
        p.write(option(opt, infoGoData(name, [P.INFO_BLOCK_SIZE])));
        expect((await optReplies(p, opt)).map((r) => r.type)).toEqual([P.REP_ERR_UNKNOWN]);
      }
    }
    p.write(option(P.OPT_GO, infoGoData('d')));
    expect((await optReplies(p, P.OPT_GO)).pop()!.type).toBe(P.REP_ACK);
    p.write(request({ type: P.CMD_FLUSH, cookie: 2n }));
    expect(await simpleReply(p)).toEqual({ error: 0, cookie: 2n, data: Buffer.alloc(0) });
    p.destroy();
  });

  test('ABORT → ACK, then the server closes', async () => {
    const p = await handshake(sockPath);
    p.write(option(P.OPT_ABORT));
    expect(await optReply(p)).toEqual({ option: P.OPT_ABORT, type: P.REP_ACK, data: Buffer.alloc(0) });
    await p.expectEnded();
  });

  test('STARTTLS → ERR_UNSUP (no TLS), still negotiating', async () => {
    const p = await handshake(sockPath);
    p.write(option(P.OPT_STARTTLS));
    expect((await optReplies(p, P.OPT_STARTTLS)).map((r) => r.type)).toEqual([P.REP_ERR_UNSUP]);
    p.write(option(P.OPT_LIST));
    expect((await optReplies(p, P.OPT_LIST)).pop()!.type).toBe(P.REP_ACK);
    p.destroy();
  });

  test('STRUCTURED_REPLY with data → ERR_INVALID; without → ACK', async () => {
    const p = await handshake(sockPath);
    p.write(option(P.OPT_STRUCTURED_REPLY, Buffer.from('x')));
    expect((await optReplies(p, P.OPT_STRUCTURED_REPLY)).map((r) => r.type)).toEqual([P.REP_ERR_INVALID]);
    p.write(option(P.OPT_STRUCTURED_REPLY));
    expect((await optReplies(p, P.OPT_STRUCTURED_REPLY)).map((r) => r.type)).toEqual([P.REP_ACK]);
    p.destroy();
  });

  test('meta contexts: SET before STRUCTURED_REPLY → ERR_INVALID; LIST and SET of base:allocation', async () => {
    const p = await handshake(sockPath);
    p.write(option(P.OPT_SET_META_CONTEXT, metaData('d', [P.META_CONTEXT_BASE_ALLOCATION])));
    expect((await optReplies(p, P.OPT_SET_META_CONTEXT)).map((r) => r.type)).toEqual([P.REP_ERR_INVALID]);
    p.write(option(P.OPT_STRUCTURED_REPLY));
    await optReplies(p, P.OPT_STRUCTURED_REPLY);
    // LIST with no query, and with the base: wildcard: base:allocation with id 0.
    for (const q of [[], ['base:'], ['x-other:thing', 'base:allocation']]) {
      p.write(option(P.OPT_LIST_META_CONTEXT, metaData('d', q)));
      const rs = await optReplies(p, P.OPT_LIST_META_CONTEXT);
      expect(rs.map((r) => r.type)).toEqual([P.REP_META_CONTEXT, P.REP_ACK]);
      expect(rs[0].data.readUInt32BE(0)).toBe(0);
      expect(rs[0].data.toString('utf8', 4)).toBe('base:allocation');
    }
    // SET: an unknown context selects nothing (ACK only); base:allocation gets a context id.
    p.write(option(P.OPT_SET_META_CONTEXT, metaData('d', ['x-unknown:foo', 'base:'])));
    expect((await optReplies(p, P.OPT_SET_META_CONTEXT)).map((r) => r.type)).toEqual([P.REP_ACK]);
    p.write(option(P.OPT_SET_META_CONTEXT, metaData('d', [P.META_CONTEXT_BASE_ALLOCATION])));
    const rs = await optReplies(p, P.OPT_SET_META_CONTEXT);
    expect(rs.map((r) => r.type)).toEqual([P.REP_META_CONTEXT, P.REP_ACK]);
    expect(rs[0].data.readUInt32BE(0)).toBe(P.META_CONTEXT_ID_BASE_ALLOCATION);
    expect(rs[0].data.toString('utf8', 4)).toBe('base:allocation');
    // Unknown export, and a query length past the data.
    p.write(option(P.OPT_SET_META_CONTEXT, metaData('nope', [P.META_CONTEXT_BASE_ALLOCATION])));
    expect((await optReplies(p, P.OPT_SET_META_CONTEXT)).map((r) => r.type)).toEqual([P.REP_ERR_UNKNOWN]);
    const truncated = metaData('d', [P.META_CONTEXT_BASE_ALLOCATION]).subarray(0, 12);
    p.write(option(P.OPT_LIST_META_CONTEXT, truncated));
    expect((await optReplies(p, P.OPT_LIST_META_CONTEXT)).map((r) => r.type)).toEqual([P.REP_ERR_INVALID]);
    p.destroy();
  });

  test('an option longer than the limit → ERR_TOO_BIG after its data is skipped; still in sync', async () => {
    const p = await handshake(sockPath);
    const big = Buffer.alloc(P.OPTION_BYTES_MAX + 4096, 0x49); // 'I': would look like IHAVEOPT if misparsed
    p.write(option(P.OPT_GO, big));
    expect((await optReplies(p, P.OPT_GO)).map((r) => r.type)).toEqual([P.REP_ERR_TOO_BIG]);
    p.write(option(P.OPT_GO, infoGoData('d')));
    expect((await optReplies(p, P.OPT_GO)).pop()!.type).toBe(P.REP_ACK);
    p.write(request({ type: P.CMD_READ, cookie: 3n, offset: 0, length: 512 }));
    expect((await simpleReply(p, 512)).cookie).toBe(3n);
    p.destroy();
  });

  test('EXPORT_NAME: unknown name → closed; known name → size, flags and 124 zeroes (none with NO_ZEROES)', async () => {
    const p = await handshake(sockPath);
    p.write(option(P.OPT_EXPORT_NAME, Buffer.from('nope')));
    await p.expectEnded();

    const q = await Peer.connect(sockPath);
    await greet(q, P.FLAG_FIXED_NEWSTYLE); // without NO_ZEROES
    q.write(option(P.OPT_EXPORT_NAME, Buffer.from('d')));
    const r = await q.read(134);
    expect(r.readBigUInt64BE(0)).toBe(BigInt(D_BYTES));
    expect(r.readUInt16BE(8)).toBe(FLAGS_BASE);
    expect(r.subarray(10).equals(Buffer.alloc(124))).toBe(true);
    q.write(request({ type: P.CMD_READ, cookie: 4n, offset: 0, length: 512 }));
    expect((await simpleReply(q, 512)).cookie).toBe(4n);
    expect(q.pending).toBe(0);
    q.destroy();

    const s = await handshake(sockPath); // with NO_ZEROES
    s.write(option(P.OPT_EXPORT_NAME, Buffer.from('ro')));
    const h = await s.read(10);
    expect(h.readUInt16BE(8)).toBe(FLAGS_BASE | P.TFLAG_READ_ONLY);
    s.write(request({ type: P.CMD_READ, cookie: 5n, offset: 0, length: 512 }));
    const rr = await s.read(16 + 512);
    expect(rr.readUInt32BE(0)).toBe(P.SIMPLE_REPLY_MAGIC); // no zero padding came before the reply
    s.destroy();
  });

  test('an open export holds the device open: remove is busy until the client goes', async () => {
    const p = await open(sockPath, 'd');
    expect(engine.info('d').openCount).toBe(1);
    await expect(engine.remove('d')).rejects.toMatchObject({ code: 'DM_DEVICE_BUSY' });
    p.destroy();
    const until = performance.now() + 3000;
    while (engine.info('d').openCount !== 0 && performance.now() < until) await sleep(10);
    expect(engine.info('d').openCount).toBe(0);
  });
});

// ---- transmission ---------------------------------------------------------------------------------------

describe('transmission', () => {
  test('WRITE then READ with simple replies: exact reply bytes, data on the device', async () => {
    const p = await open(sockPath, 'd');
    const data = pattern(8192, 1);
    p.write(request({ type: P.CMD_WRITE, cookie: 0xdeadbeefcafe0001n, offset: 65536, data }));
    const w = await p.read(16);
    expect(w.toString('hex')).toBe('67446698' + '00000000' + 'deadbeefcafe0001');
    p.write(request({ type: P.CMD_READ, cookie: 0xfeedfacef00d0002n, offset: 65536, length: 8192 }));
    const r = await p.read(16 + 8192);
    expect(r.subarray(0, 16).toString('hex')).toBe('67446698' + '00000000' + 'feedfacef00d0002');
    expect(r.subarray(16).equals(data)).toBe(true);
    const onDevice = Buffer.alloc(8192);
    await m0.read(sectors(128), onDevice);
    expect(onDevice.equals(data)).toBe(true);
    // FUA on a write is accepted.
    p.write(request({ type: P.CMD_WRITE, flags: P.CMD_FLAG_FUA, cookie: 7n, offset: 65536, data: pattern(512, 2) }));
    expect(await simpleReply(p)).toEqual({ error: 0, cookie: 7n, data: Buffer.alloc(0) });
    p.destroy();
  });

  test('WRITE then READ with structured replies: NONE chunk for the write, one OFFSET_DATA chunk for the read', async () => {
    const p = await open(sockPath, 'd', { structured: true });
    const data = pattern(4096, 3);
    p.write(request({ type: P.CMD_WRITE, cookie: 0x0102030405060708n, offset: 131072, data }));
    const w = await p.read(20);
    expect(w.toString('hex')).toBe('668e33ef' + '0001' + '0000' + '0102030405060708' + '00000000');
    p.write(request({ type: P.CMD_READ, cookie: 9n, offset: 131072, length: 4096 }));
    const r = await structuredReply(p);
    expect(r.cookie).toBe(9n);
    expect(readData(r, 131072, 4096).equals(data)).toBe(true);
    // DF: at most one content chunk.
    p.write(request({ type: P.CMD_READ, flags: P.CMD_FLAG_DF, cookie: 10n, offset: 131072, length: 4096 }));
    const df = await structuredReply(p);
    expect(df.chunks.filter((c) => c.type === P.REPLY_TYPE_OFFSET_DATA || c.type === P.REPLY_TYPE_OFFSET_HOLE).length).toBe(1);
    expect(readData(df, 131072, 4096).equals(data)).toBe(true);
    // An error to a READ is a structured error chunk too (never a simple reply once structured is on).
    p.write(request({ type: P.CMD_READ, cookie: 11n, offset: D_BYTES, length: 512 }));
    const e = await structuredReply(p);
    expect(e).toMatchObject({ cookie: 11n, error: P.EINVAL });
    expect(e.chunks[e.chunks.length - 1].flags & P.REPLY_FLAG_DONE).toBe(P.REPLY_FLAG_DONE);
    p.destroy();
  });

  test('pipelined requests (more than the in-flight limit): every cookie answered exactly once, data right', async () => {
    const p = await open(sockPath, 'd');
    const n = 300; // > REQUESTS_IN_FLIGHT_MAX: exercises the pause/resume of the socket
    const expected = new Map<bigint, { read?: Buffer }>();
    const reqs: Buffer[] = [];
    for (let i = 0; i < n; i++) {
      const cookie = 0x1000n + BigInt(i);
      const offset = 1024 * 1024 + (i % 100) * 4096; // writes to slot k, reads of slot k after its write
      if (i < 100) {
        reqs.push(request({ type: P.CMD_WRITE, cookie, offset, data: pattern(4096, i) }));
        expected.set(cookie, {});
      } else {
        reqs.push(request({ type: P.CMD_READ, cookie, offset, length: 4096 }));
        expected.set(cookie, { read: pattern(4096, i % 100) });
      }
    }
    // Writes first and answered, so the reads (which may run in any order) see them.
    p.write(Buffer.concat(reqs.slice(0, 100)));
    const seen = new Set<bigint>();
    for (let i = 0; i < 100; i++) {
      const r = await simpleReply(p);
      expect(r.error).toBe(0);
      expect(seen.has(r.cookie)).toBe(false);
      seen.add(r.cookie);
    }
    p.write(Buffer.concat(reqs.slice(100)));
    for (let i = 100; i < n; i++) {
      const h = await p.read(16);
      expect(h.readUInt32BE(0)).toBe(P.SIMPLE_REPLY_MAGIC);
      expect(h.readUInt32BE(4)).toBe(0);
      const cookie = h.readBigUInt64BE(8);
      const e = expected.get(cookie);
      expect(e, `unknown cookie ${cookie}`).toBeDefined();
      expect(seen.has(cookie), `cookie ${cookie} answered twice`).toBe(false);
      seen.add(cookie);
      const data = await p.read(4096);
      expect(data.equals(e!.read!)).toBe(true);
    }
    expect(seen.size).toBe(n);
    await sleep(50);
    expect(p.pending).toBe(0);
    p.destroy();
  });

  test('replies come out of order: a held read does not block a later one', async () => {
    const p = await open(sockPath, 'gd', { structured: true });
    gate.holdBelowSector = 8; // reads of the first 4 KiB wait
    try {
      p.write(Buffer.concat([
        request({ type: P.CMD_READ, cookie: 100n, offset: 0, length: 4096 }),
        request({ type: P.CMD_READ, cookie: 101n, offset: 65536, length: 4096 }),
        request({ type: P.CMD_FLUSH, cookie: 102n }),
      ]));
      const first = [await structuredReply(p), await structuredReply(p)].map((r) => r.cookie).sort();
      expect(first).toEqual([101n, 102n]);
      expect(gate.heldCount).toBe(1);
      gate.release();
      expect((await structuredReply(p)).cookie).toBe(100n);
    } finally {
      gate.holdBelowSector = 0;
      gate.release();
    }
    p.destroy();
  });

  test('a client that stops reading replies: the server stops taking requests instead of buffering without limit', async () => {
    const p = await open(sockPath, 'gd');
    p.sock.pause(); // read nothing: replies pile up in the kernel, then in the server
    const n = 1024;
    const length = 128 * 1024; // 128 MiB of replies in all
    const start = gate.reads;
    p.write(Buffer.concat(Array.from({ length: n }, (_, i) => request({ type: P.CMD_READ, cookie: BigInt(i), offset: (i % 8) * length, length }))));
    await sleep(500);
    const taken = gate.reads - start;
    await sleep(300);
    expect(gate.reads - start, 'the server kept reading requests while the client read no replies').toBe(taken);
    // At most half of them (64 MiB of replies) held for a client that does not read.
    expect(taken, `${taken} of ${n} reads done (${(taken * length) / 1048576} MiB of replies buffered)`).toBeLessThanOrEqual(n / 2);
    // The client reads again: every reply arrives.
    p.sock.resume();
    const seen = new Set<bigint>();
    for (let i = 0; i < n; i++) {
      const r = await simpleReply(p, length);
      expect(r.error).toBe(0);
      seen.add(r.cookie);
    }
    expect(seen.size).toBe(n);
  });

  test('unknown command → EINVAL; CACHE (not advertised) → EINVAL; connection usable', async () => {
    const p = await open(sockPath, 'd');
    for (const [type, cookie] of [[99, 20n], [P.CMD_CACHE, 21n], [0xffff, 22n]] as const) {
      p.write(request({ type, cookie, offset: 0, length: 512 }));
      expect(await simpleReply(p)).toEqual({ error: P.EINVAL, cookie, data: Buffer.alloc(0) });
    }
    p.write(request({ type: P.CMD_READ, cookie: 23n, offset: 0, length: 512 }));
    expect((await simpleReply(p, 512)).error).toBe(0);
    p.destroy();
  });

  test('unknown or misplaced flags → EINVAL (a refused WRITE payload is still consumed)', async () => {
    const p = await open(sockPath, 'd');
    const cases: Req[] = [
      { type: P.CMD_READ, flags: 0x20, cookie: 30n, offset: 0, length: 512 },
      { type: P.CMD_READ, flags: 0x8000, cookie: 31n, offset: 0, length: 512 },
      { type: P.CMD_READ, flags: P.CMD_FLAG_DF, cookie: 32n, offset: 0, length: 512 }, // DF without structured replies
      { type: P.CMD_WRITE, flags: P.CMD_FLAG_NO_HOLE, cookie: 33n, offset: 0, data: Buffer.alloc(1024, 0x25) },
      { type: P.CMD_WRITE, flags: 0x40, cookie: 34n, offset: 0, data: request({ type: P.CMD_DISC, cookie: 0n }) }, // a payload that looks like DISC,
      { type: P.CMD_FLUSH, flags: P.CMD_FLAG_REQ_ONE, cookie: 35n },
    ];
    for (const c of cases) {
      p.write(request(c));
      expect(await simpleReply(p), `flags 0x${(c.flags ?? 0).toString(16)} on type ${c.type}`).toEqual({ error: P.EINVAL, cookie: c.cookie, data: Buffer.alloc(0) });
    }
    p.write(request({ type: P.CMD_READ, cookie: 36n, offset: 0, length: 512 }));
    expect((await simpleReply(p, 512)).error).toBe(0);
    p.destroy();
  });

  test('FUA is accepted on every command once SEND_FUA is advertised (proto.md: "MUST accept all commands with this bit set")', async () => {
    const p = await open(sockPath, 'd', { structured: true, meta: true });
    const cases: Req[] = [
      { type: P.CMD_FLUSH, flags: P.CMD_FLAG_FUA, cookie: 40n }, // old qemu clients did this
      { type: P.CMD_READ, flags: P.CMD_FLAG_FUA, cookie: 41n, offset: 0, length: 512 },
      { type: P.CMD_BLOCK_STATUS, flags: P.CMD_FLAG_FUA, cookie: 42n, offset: 0, length: 4096 },
    ];
    for (const c of cases) {
      p.write(request(c));
      const r = await structuredReply(p);
      expect(r.cookie).toBe(c.cookie);
      expect(r.error, `FUA on command ${c.type}`).toBe(0);
    }
    p.destroy();
  });

  test('reads past the end or misaligned → EINVAL', async () => {
    const p = await open(sockPath, 'd');
    const cases: Array<[number | bigint, number]> = [
      [D_BYTES, 512],
      [D_BYTES - 512, 1024],
      [2n ** 63n, 512],
      [2n ** 64n - 512n, 1024], // offset + length wraps around 2^64
      [100, 512],
      [0, 100],
      [512, 513],
    ];
    let cookie = 50n;
    for (const [offset, length] of cases) {
      p.write(request({ type: P.CMD_READ, cookie, offset, length }));
      expect(await simpleReply(p), `read ${offset} +${length}`).toEqual({ error: P.EINVAL, cookie, data: Buffer.alloc(0) });
      cookie++;
    }
    // The last sector is readable.
    p.write(request({ type: P.CMD_READ, cookie, offset: D_BYTES - 512, length: 512 }));
    expect((await simpleReply(p, 512)).error).toBe(0);
    p.destroy();
  });

  test('write past the end → ENOSPC, misaligned write → EINVAL; payloads consumed, next request fine', async () => {
    const p = await open(sockPath, 'd');
    // Payloads full of request-magic-looking bytes: if the server parsed them as requests it would misbehave.
    const evil = Buffer.concat(Array.from({ length: 64 }, (_, i) => request({ type: P.CMD_DISC, cookie: BigInt(i) }))).subarray(0, 1536);
    p.write(request({ type: P.CMD_WRITE, cookie: 60n, offset: D_BYTES - 512, data: evil }));
    expect(await simpleReply(p)).toEqual({ error: P.ENOSPC, cookie: 60n, data: Buffer.alloc(0) });
    p.write(request({ type: P.CMD_WRITE, cookie: 61n, offset: 2n ** 63n, data: evil }));
    expect((await simpleReply(p)).error).toBe(P.ENOSPC);
    p.write(request({ type: P.CMD_WRITE, cookie: 62n, offset: 100, data: evil }));
    expect(await simpleReply(p)).toEqual({ error: P.EINVAL, cookie: 62n, data: Buffer.alloc(0) });
    p.write(request({ type: P.CMD_WRITE, cookie: 63n, offset: 0, data: evil.subarray(0, 700) }));
    expect(await simpleReply(p)).toEqual({ error: P.EINVAL, cookie: 63n, data: Buffer.alloc(0) });
    // The payload, sent in dribs and drabs after the header, is still skipped.
    p.write(request({ type: P.CMD_WRITE, cookie: 64n, offset: D_BYTES, length: 1024 }));
    for (let i = 0; i < 4; i++) {
      await sleep(5);
      p.write(evil.subarray(i * 256, (i + 1) * 256));
    }
    expect((await simpleReply(p)).error).toBe(P.ENOSPC);
    // Nothing was written at the end of the device.
    const tail = Buffer.alloc(512);
    await m0.read(sectors(D_SECTORS - 1), tail);
    expect(tail.includes(evil.subarray(0, 28))).toBe(false);
    p.write(request({ type: P.CMD_READ, cookie: 65n, offset: 0, length: 512 }));
    expect((await simpleReply(p, 512)).cookie).toBe(65n);
    expect(p.pending).toBe(0);
    p.destroy();
  });

  test('length 0: an answer (not a disconnect) for each command', async () => {
    const p = await open(sockPath, 'd');
    let cookie = 70n;
    for (const type of [P.CMD_READ, P.CMD_WRITE, P.CMD_TRIM, P.CMD_WRITE_ZEROES]) {
      p.write(request({ type, cookie, offset: 0, length: 0 }));
      const r = await simpleReply(p);
      expect(r.cookie).toBe(cookie);
      expect([0, P.EINVAL]).toContain(r.error);
      cookie++;
    }
    p.write(request({ type: P.CMD_READ, cookie, offset: 0, length: 512 }));
    expect((await simpleReply(p, 512)).error).toBe(0);
    p.destroy();
  });

  test('oversize requests (> 32 MiB): READ → EINVAL; WRITE → an error, its payload consumed, still in sync', async () => {
    const p = await open(sockPath, 'd');
    const max = P.REQUEST_BYTES_MAX;
    p.write(request({ type: P.CMD_READ, cookie: 80n, offset: 0, length: max + 512 }));
    expect(await simpleReply(p)).toEqual({ error: P.EINVAL, cookie: 80n, data: Buffer.alloc(0) });
    p.write(request({ type: P.CMD_WRITE, cookie: 81n, offset: 0, data: Buffer.alloc(max + 512, 0x25) }));
    const w = await simpleReply(p);
    expect(w.cookie).toBe(81n);
    expect([P.EINVAL, P.EOVERFLOW]).toContain(w.error);
    p.write(request({ type: P.CMD_READ, cookie: 82n, offset: 0, length: 512 }));
    expect((await simpleReply(p, 512)).cookie).toBe(82n);
    p.destroy();
  });

  test('FLUSH; TRIM; WRITE_ZEROES (plain, NO_HOLE, FAST_ZERO, FUA): the range reads back as zeroes', async () => {
    const p = await open(sockPath, 'd', { structured: true });
    const base = 2 * 1024 * 1024;
    const fill = async (cookie: bigint): Promise<void> => {
      p.write(request({ type: P.CMD_WRITE, cookie, offset: base, data: pattern(65536, Number(cookie)) }));
      expect((await structuredReply(p)).error).toBe(0);
    };
    const readBack = async (cookie: bigint): Promise<Buffer> => {
      p.write(request({ type: P.CMD_READ, cookie, offset: base, length: 65536 }));
      return readData(await structuredReply(p), base, 65536);
    };
    p.write(request({ type: P.CMD_FLUSH, cookie: 90n }));
    expect(await structuredReply(p)).toMatchObject({ cookie: 90n, error: 0 });

    const zeroings: Req[] = [
      { type: P.CMD_TRIM, cookie: 91n },
      { type: P.CMD_TRIM, flags: P.CMD_FLAG_FUA, cookie: 92n },
      { type: P.CMD_WRITE_ZEROES, cookie: 93n },
      { type: P.CMD_WRITE_ZEROES, flags: P.CMD_FLAG_NO_HOLE, cookie: 94n },
      { type: P.CMD_WRITE_ZEROES, flags: P.CMD_FLAG_FAST_ZERO, cookie: 95n },
      { type: P.CMD_WRITE_ZEROES, flags: P.CMD_FLAG_FUA | P.CMD_FLAG_NO_HOLE, cookie: 96n },
    ];
    for (const z of zeroings) {
      await fill(z.cookie + 1000n);
      // Zero the middle 32 KiB only: the edges keep their data.
      p.write(request({ ...z, offset: base + 16384, length: 32768 }));
      const r = await structuredReply(p);
      expect(r, `type ${z.type} flags ${z.flags ?? 0}`).toMatchObject({ cookie: z.cookie, error: 0 });
      expect(r.chunks.map((c) => [c.type, c.flags])).toEqual([[P.REPLY_TYPE_NONE, P.REPLY_FLAG_DONE]]);
      const got = await readBack(z.cookie + 2000n);
      const want = pattern(65536, Number(z.cookie + 1000n));
      want.fill(0, 16384, 16384 + 32768);
      expect(got.equals(want), `type ${z.type} flags ${z.flags ?? 0}`).toBe(true);
    }
    // FAST_ZERO with NO_HOLE cannot be faster than writing: ENOTSUP, quickly, contents unchanged.
    await fill(97n);
    p.write(request({ type: P.CMD_WRITE_ZEROES, flags: P.CMD_FLAG_FAST_ZERO | P.CMD_FLAG_NO_HOLE, cookie: 98n, offset: base, length: 65536 }));
    expect(await structuredReply(p)).toMatchObject({ cookie: 98n, error: P.ENOTSUP });
    expect((await readBack(99n)).equals(pattern(65536, 97))).toBe(true);
    // Past the end and misaligned.
    p.write(request({ type: P.CMD_TRIM, cookie: 100n, offset: D_BYTES - 512, length: 1024 }));
    expect((await structuredReply(p)).error).toBe(P.EINVAL);
    p.write(request({ type: P.CMD_WRITE_ZEROES, cookie: 101n, offset: 1000, length: 512 }));
    expect((await structuredReply(p)).error).toBe(P.EINVAL);
    p.destroy();
  });

  test('WRITE_ZEROES past the end → ENOSPC (proto.md: the server SHOULD return NBD_ENOSPC)', async () => {
    const p = await open(sockPath, 'd');
    p.write(request({ type: P.CMD_WRITE_ZEROES, cookie: 105n, offset: D_BYTES - 512, length: 1024 }));
    expect(await simpleReply(p)).toEqual({ error: P.ENOSPC, cookie: 105n, data: Buffer.alloc(0) });
    p.destroy();
  });

  test('BLOCK_STATUS: data, hole|zero from memory holes and the zero target; REQ_ONE; context id', async () => {
    const p = await open(sockPath, 'bs', { structured: true, meta: true });
    const MiB = 1024 * 1024;
    // Fresh memory: the whole 2 MiB is hole|zero (1 MiB of unallocated memory, then the zero target), merged.
    const status = async (cookie: bigint, offset: number, length: number, flags = 0): Promise<Array<[number, number]>> => {
      p.write(request({ type: P.CMD_BLOCK_STATUS, flags, cookie, offset, length }));
      const r = await structuredReply(p);
      expect(r.cookie).toBe(cookie);
      expect(r.error).toBe(0);
      expect(r.chunks.length).toBe(1);
      const c = r.chunks[0];
      expect(c.type).toBe(P.REPLY_TYPE_BLOCK_STATUS);
      expect(c.flags & P.REPLY_FLAG_DONE).toBe(P.REPLY_FLAG_DONE);
      expect((c.payload.length - 4) % 8).toBe(0);
      expect(c.payload.length).toBeGreaterThanOrEqual(12);
      expect(c.payload.readUInt32BE(0)).toBe(P.META_CONTEXT_ID_BASE_ALLOCATION);
      const out: Array<[number, number]> = [];
      for (let o = 4; o < c.payload.length; o += 8) out.push([c.payload.readUInt32BE(o), c.payload.readUInt32BE(o + 4)]);
      for (const [len] of out) expect(len % 512 === 0 && len > 0).toBe(true);
      return out;
    };
    const HZ = P.STATE_HOLE | P.STATE_ZERO;
    expect(await status(110n, 0, 2 * MiB)).toEqual([[2 * MiB, HZ]]);
    // Write 4 KiB at 128 KiB: its 64 KiB memory page becomes data.
    p.write(request({ type: P.CMD_WRITE, cookie: 111n, offset: 128 * 1024, data: pattern(4096, 5) }));
    expect((await structuredReply(p)).error).toBe(0);
    expect(await status(112n, 0, 2 * MiB)).toEqual([[128 * 1024, HZ], [64 * 1024, 0], [2 * MiB - 192 * 1024, HZ]]);
    // REQ_ONE: exactly one descriptor, no longer than the request.
    expect(await status(113n, 0, 2 * MiB, P.CMD_FLAG_REQ_ONE)).toEqual([[128 * 1024, HZ]]);
    expect(await status(114n, 128 * 1024, 4096, P.CMD_FLAG_REQ_ONE)).toEqual([[4096, 0]]);
    expect(await status(115n, MiB - 4096, 8192)).toEqual([[8192, HZ]]);
    // Past the end → EINVAL; length 0 → an answer.
    p.write(request({ type: P.CMD_BLOCK_STATUS, cookie: 116n, offset: 2 * MiB - 512, length: 1024 }));
    expect((await structuredReply(p)).error).toBe(P.EINVAL);
    p.write(request({ type: P.CMD_BLOCK_STATUS, cookie: 117n, offset: 0, length: 0 }));
    expect((await structuredReply(p)).cookie).toBe(117n);
    p.destroy();
  });

  test('BLOCK_STATUS without a meta context (or without structured replies) → EINVAL', async () => {
    const p = await open(sockPath, 'bs', { structured: true });
    p.write(request({ type: P.CMD_BLOCK_STATUS, cookie: 120n, offset: 0, length: 4096 }));
    expect(await structuredReply(p)).toMatchObject({ cookie: 120n, error: P.EINVAL });
    p.destroy();
    const q = await open(sockPath, 'bs');
    q.write(request({ type: P.CMD_BLOCK_STATUS, cookie: 121n, offset: 0, length: 4096 }));
    expect(await simpleReply(q)).toEqual({ error: P.EINVAL, cookie: 121n, data: Buffer.alloc(0) });
    q.destroy();
    // A context set for another export does not carry over to the one GO selects.
    const s = await handshake(sockPath);
    s.write(option(P.OPT_STRUCTURED_REPLY));
    await optReplies(s, P.OPT_STRUCTURED_REPLY);
    s.write(option(P.OPT_SET_META_CONTEXT, metaData('d', [P.META_CONTEXT_BASE_ALLOCATION])));
    await optReplies(s, P.OPT_SET_META_CONTEXT);
    s.write(option(P.OPT_GO, infoGoData('bs')));
    expect((await optReplies(s, P.OPT_GO)).pop()!.type).toBe(P.REP_ACK);
    s.write(request({ type: P.CMD_BLOCK_STATUS, cookie: 122n, offset: 0, length: 4096 }));
    expect((await structuredReply(s)).error).toBe(P.EINVAL);
    s.destroy();
  });

  test('read-only export: WRITE/TRIM/WRITE_ZEROES → EPERM (payload consumed), READ works, nothing changes', async () => {
    await m2.write(sectors(0), Buffer.alloc(4096, 0x5a));
    const p = await open(sockPath, 'ro');
    p.write(request({ type: P.CMD_WRITE, cookie: 130n, offset: 0, data: Buffer.alloc(4096, 0x11) }));
    expect(await simpleReply(p)).toEqual({ error: P.EPERM, cookie: 130n, data: Buffer.alloc(0) });
    p.write(request({ type: P.CMD_WRITE, flags: P.CMD_FLAG_FUA, cookie: 131n, offset: 0, data: Buffer.alloc(512, 0x11) }));
    expect((await simpleReply(p)).error).toBe(P.EPERM);
    p.write(request({ type: P.CMD_TRIM, cookie: 132n, offset: 0, length: 4096 }));
    expect((await simpleReply(p)).error).toBe(P.EPERM);
    p.write(request({ type: P.CMD_WRITE_ZEROES, cookie: 133n, offset: 0, length: 4096 }));
    expect((await simpleReply(p)).error).toBe(P.EPERM);
    p.write(request({ type: P.CMD_FLUSH, cookie: 134n }));
    expect((await simpleReply(p)).error).toBe(0);
    p.write(request({ type: P.CMD_READ, cookie: 135n, offset: 0, length: 4096 }));
    const r = await simpleReply(p, 4096);
    expect(r.error).toBe(0);
    expect(r.data.equals(Buffer.alloc(4096, 0x5a))).toBe(true);
    p.destroy();
  });

  test('bad request magic → the connection is closed, and the server still takes new connections', async () => {
    const p = await open(sockPath, 'd');
    p.write(request({ type: P.CMD_READ, cookie: 140n, offset: 0, length: 512, magic: 0x25609514 }));
    await p.expectEnded();
    // Garbage after a good request: a hard disconnect (the good request's reply may be lost: proto.md allows it).
    const q = await open(sockPath, 'd');
    q.write(Buffer.concat([request({ type: P.CMD_READ, cookie: 141n, offset: 0, length: 512 }), Buffer.alloc(28, 0xee)]));
    const until = performance.now() + 3000;
    while (!q.ended && performance.now() < until) await sleep(10);
    expect(q.ended).toBe(true);
    expect([0, 16 + 512]).toContain(q.pending);
    const s = await open(sockPath, 'd');
    s.write(request({ type: P.CMD_READ, cookie: 142n, offset: 0, length: 512 }));
    expect((await simpleReply(s, 512)).error).toBe(0);
    s.destroy();
  });

  test('a client that vanishes with a request in flight: the export is released, the server carries on', async () => {
    const before = engine.info('gd').openCount;
    const p = await open(sockPath, 'gd');
    gate.holdBelowSector = 8;
    try {
      p.write(request({ type: P.CMD_READ, cookie: 145n, offset: 0, length: 4096 }));
      const until = performance.now() + 2000;
      while (gate.heldCount === 0 && performance.now() < until) await sleep(5);
      expect(gate.heldCount).toBe(1);
      p.destroy();
      await p.closedPromise;
      await sleep(50);
      gate.release(); // the read completes after the socket is gone: its reply goes nowhere
      await sleep(50);
      expect(engine.info('gd').openCount).toBe(before);
    } finally {
      gate.holdBelowSector = 0;
      gate.release();
    }
    const q = await open(sockPath, 'gd');
    q.write(request({ type: P.CMD_READ, cookie: 146n, offset: 0, length: 512 }));
    expect((await simpleReply(q, 512)).error).toBe(0);
  });

  test('DISC: outstanding requests are answered first, then the server closes; no reply to DISC', async () => {
    const p = await open(sockPath, 'gd');
    gate.holdBelowSector = 8;
    try {
      p.write(Buffer.concat([
        request({ type: P.CMD_READ, cookie: 150n, offset: 0, length: 4096 }),
        request({ type: P.CMD_WRITE, cookie: 151n, offset: 65536, data: pattern(4096, 9) }),
        request({ type: P.CMD_DISC, cookie: 152n }),
        request({ type: P.CMD_READ, cookie: 153n, offset: 65536, length: 512 }), // after DISC: ignored
      ]));
      expect(await simpleReply(p)).toMatchObject({ error: 0, cookie: 151n });
      await sleep(100);
      expect(p.ended).toBe(false); // the held read is still outstanding
      expect(gate.heldCount).toBe(1);
      gate.release();
      const r = await simpleReply(p, 4096);
      expect(r).toMatchObject({ error: 0, cookie: 150n });
      await p.expectEnded();
    } finally {
      gate.holdBelowSector = 0;
      gate.release();
    }
  });

  test('DISC followed by the client half-closing its side: outstanding replies still arrive', async () => {
    const p = await open(sockPath, 'gd');
    gate.holdBelowSector = 8;
    try {
      p.write(Buffer.concat([
        request({ type: P.CMD_READ, cookie: 160n, offset: 0, length: 4096 }),
        request({ type: P.CMD_DISC, cookie: 161n }),
      ]));
      p.sock.end(); // shutdown(SHUT_WR): the client sends nothing more but still reads
      await sleep(100);
      expect(gate.heldCount).toBe(1);
      gate.release();
      expect(await simpleReply(p, 4096)).toMatchObject({ error: 0, cookie: 160n });
      await p.expectEnded();
    } finally {
      gate.holdBelowSector = 0;
      gate.release();
    }
  });

  test('after DISC the server lets go of the export even if the client keeps its socket open', async () => {
    const before = engine.info('d').openCount;
    const p = await Peer.connect(sockPath, { allowHalfOpen: true });
    await greet(p);
    p.write(option(P.OPT_GO, infoGoData('d')));
    expect((await optReplies(p, P.OPT_GO)).pop()!.type).toBe(P.REP_ACK);
    expect(engine.info('d').openCount).toBe(before + 1);
    p.write(request({ type: P.CMD_DISC, cookie: 170n }));
    await p.expectEnded();
    const until = performance.now() + 2000;
    while (engine.info('d').openCount !== before && performance.now() < until) await sleep(10);
    expect(engine.info('d').openCount, 'the device is still held open by a disconnected client').toBe(before);
    p.destroy();
  });
});
