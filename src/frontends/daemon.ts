/**
 * `dmstate serve`: the engine of one pool, reachable over the control socket. Clean shutdown on close()
 * (SIGINT/SIGTERM in the CLI): the socket stops accepting, the engine drains and closes, LevelDB closes.
 */
import * as fs from 'node:fs';
import * as net from 'node:net';
import { Engine, type EngineOptions } from '../core/engine.js';
import { DmError, isDmError } from '../core/errors.js';
import type { LevelDb } from '../log/event-log.js';
import { CONTROL_LINE_BYTES_MAX, INSPECT_BACKLOG_BYTES_MAX, type ControlRequest, type ControlResponse } from './control-protocol.js';
import { normalizeInspectFilter, type InspectActorKind } from '../inspect/live-inspector.js';
import { executeDmsetup } from './dmsetup/execute.js';
import { openPoolDb, poolPaths, type PoolPaths } from './pool.js';
import { DMSTATE_VERSION } from '../version.js';
import { NbdServer, engineExports, type NbdListenAddress } from './nbd/server.js';

export interface DaemonOptions extends Omit<EngineOptions, 'db'> {
  readonly poolDir: string;
  /** Also serve NBD on TCP (the unix socket DIR/nbd.sock is always served). */
  readonly nbdTcp?: NbdListenAddress;
}

export class Daemon {
  private readonly connections = new Set<net.Socket>();
  private closing: Promise<void> | undefined;

  private constructor(
    readonly paths: PoolPaths,
    readonly engine: Engine,
    private readonly db: LevelDb,
    private readonly server: net.Server,
    readonly nbd: NbdServer,
  ) {}

  static async start(options: DaemonOptions): Promise<Daemon> {
    const paths = poolPaths(options.poolDir);
    // Unix socket paths are limited to 107 bytes; say so instead of failing obscurely.
    if (Buffer.byteLength(paths.controlSocket) > 107) {
      throw new DmError('DM_INVALID_ARGUMENT', `pool path too long for a unix socket: ${paths.controlSocket} (at most 107 bytes)`);
    }
    const db = await openPoolDb(paths, { create: true });
    let engine: Engine;
    try {
      engine = await Engine.open({ ...options, db });
    } catch (err) {
      await db.close();
      throw err;
    }
    let nbd: NbdServer;
    try {
      nbd = await NbdServer.start(engineExports(engine), { unixPath: paths.nbdSocket, tcp: options.nbdTcp });
    } catch (err) {
      await engine.close();
      await db.close();
      throw err;
    }
    // We hold the database lock, so a socket file left behind is stale.
    fs.rmSync(paths.controlSocket, { force: true });
    const server = net.createServer();
    const daemon = new Daemon(paths, engine, db, server, nbd);
    server.on('connection', (sock) => daemon.onConnection(sock));
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(paths.controlSocket, () => {
        server.off('error', reject);
        resolve();
      });
    });
    fs.writeFileSync(paths.pidFile, `${process.pid}\n`);
    return daemon;
  }

  private onConnection(sock: net.Socket): void {
    this.connections.add(sock);
    sock.setEncoding('utf8');
    let pending = '';
    const subscriptions: Array<{ unsubscribe(): void }> = [];
    const send = (r: ControlResponse): void => {
      if (!sock.destroyed) sock.write(JSON.stringify(r) + '\n');
    };
    sock.on('data', (chunk: string) => {
      pending += chunk;
      if (pending.length > CONTROL_LINE_BYTES_MAX) {
        send({ id: 0, op: 'error', code: 'DM_INVALID_ARGUMENT', message: 'request too long' });
        sock.destroy();
        return;
      }
      let nl: number;
      while ((nl = pending.indexOf('\n')) >= 0) {
        const line = pending.slice(0, nl);
        pending = pending.slice(nl + 1);
        if (line.trim() === '') continue;
        let req: ControlRequest;
        try {
          req = JSON.parse(line) as ControlRequest;
        } catch {
          send({ id: 0, op: 'error', code: 'DM_INVALID_ARGUMENT', message: 'malformed request (not JSON)' });
          continue;
        }
        void this.handle(req, send, subscriptions, sock).catch((err: unknown) => {
          send({ id: req.id ?? 0, op: 'error', code: isDmError(err) ? err.code : 'DM_INTERNAL', message: (err as Error).message });
        });
      }
    });
    const cleanup = (): void => {
      for (const s of subscriptions) s.unsubscribe();
      this.connections.delete(sock);
    };
    sock.on('close', cleanup);
    sock.on('error', cleanup);
  }

  private async handle(req: ControlRequest, send: (r: ControlResponse) => void, subs: Array<{ unsubscribe(): void }>, sock: net.Socket): Promise<void> {
    switch (req.op) {
      case 'ping':
        send({ id: req.id, op: 'pong', pid: process.pid, pool: this.paths.dir });
        return;
      case 'state': {
        // Stored first, then read together (no await between): the digest is the state the log folds to at `seq`.
        await this.engine.log.drain();
        send({ id: req.id, op: 'state', seq: this.engine.log.lastSeq, digest: this.engine.stateDigest() });
        return;
      }
      case 'dmsetup': {
        const result = await executeDmsetup(this.engine, req.command, DMSTATE_VERSION);
        send({ id: req.id, op: 'dmsetup', result });
        return;
      }
      case 'log': {
        // Subscribe first and buffer, so no event falls between the stored read and the live stream.
        const live: ControlResponse[] = [];
        let replaying = true;
        let lastSeq = (req.sinceSeq ?? 1) - 1;
        if (req.follow) {
          subs.push(
            this.engine.events$.subscribe((event) => {
              const r: ControlResponse = { id: req.id, op: 'event', event };
              if (replaying) live.push(r);
              else if (event.seq > lastSeq) {
                lastSeq = event.seq;
                send(r);
              }
            }),
          );
        }
        await this.engine.log.drain();
        for await (const event of this.engine.log.read({ sinceSeq: req.sinceSeq })) {
          lastSeq = event.seq;
          send({ id: req.id, op: 'event', event });
        }
        replaying = false;
        for (const r of live) {
          if (r.op === 'event' && r.event.seq > lastSeq) {
            lastSeq = r.event.seq;
            send(r);
          }
        }
        if (!req.follow) send({ id: req.id, op: 'end' });
        return;
      }
      case 'inspect': {
        const filter = normalizeInspectFilter({ devices: req.devices, kinds: req.kinds as InspectActorKind[] | undefined, maxEventsPerSecond: req.maxEventsPerSecond });
        if (sock.destroyed) return;
        const names = new Set(this.engine.names());
        send({ id: req.id, op: 'inspect.started', ...filter, devices: [...filter.devices], kinds: [...filter.kinds], missingDevices: filter.devices.filter((d) => !names.has(d)) });
        // A watcher that does not read fills the socket: past the limit its records are dropped and counted.
        subs.push(
          this.engine.inspector.subscribe(filter, (record) => {
            if (sock.destroyed || sock.writableLength > INSPECT_BACKLOG_BYTES_MAX) return false;
            send({ id: req.id, op: 'inspection', record });
          }),
        );
        return;
      }
      default:
        send({ id: (req as { id?: number }).id ?? 0, op: 'error', code: 'DM_UNKNOWN_COMMAND', message: `unknown request ${(req as { op?: string }).op}` });
    }
  }

  /** Stops serving, closes the engine and the database. Idempotent. */
  close(): Promise<void> {
    this.closing ??= (async () => {
      const stopped = new Promise<void>((resolve) => this.server.close(() => resolve()));
      for (const s of this.connections) s.destroy();
      await stopped;
      await this.nbd.close();
      await this.engine.close();
      await this.db.close();
      fs.rmSync(this.paths.controlSocket, { force: true });
      fs.rmSync(this.paths.pidFile, { force: true });
    })();
    return this.closing;
  }
}
