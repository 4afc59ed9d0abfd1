/**
 * The NBD server: every mapped device of an engine is an export named after it, on a unix socket and optionally
 * TCP. Exports are looked up when a client asks, so devices created or removed while the daemon runs appear and
 * disappear by themselves; a connected client holds the device open (remove says busy, as the kernel does for an
 * opened device), and a suspended device queues the client's requests until resume.
 */
import * as fs from 'node:fs';
import * as net from 'node:net';
import type { Engine } from '../../core/engine.js';
import { DmError } from '../../core/errors.js';
import { NbdConnection, type NbdExport, type NbdExportProvider } from './connection.js';

export interface NbdListenAddress {
  readonly host: string;
  readonly port: number;
}

export function parseListenAddress(text: string): NbdListenAddress {
  const m = /^(?:\[([^\]]+)\]|([^:]+)):(\d+)$/.exec(text);
  if (!m) throw new DmError('DM_INVALID_ARGUMENT', `--listen: expected HOST:PORT, got "${text}"`);
  const port = Number(m[3]);
  if (port < 0 || port > 65535) throw new DmError('DM_INVALID_ARGUMENT', `--listen: port ${port} out of range`);
  return { host: m[1] ?? m[2], port };
}

export function engineExports(engine: Engine): NbdExportProvider {
  return {
    list: () => engine.names().filter((n) => engine.info(n).liveTable),
    has: (name) => engine.device(name)?.live !== undefined,
    sizeBytes: (name) => engine.device(name)!.sizeSectors * 512,
    readOnly: (name) => engine.device(name)!.readOnly,
    open(name): NbdExport | undefined {
      const device = engine.device(name);
      if (!device || !device.live) return undefined;
      device.openCount++;
      let open = true;
      return {
        name,
        device,
        readOnly: device.readOnly,
        close() {
          if (!open) return;
          open = false;
          device.openCount--;
        },
      };
    },
  };
}

export class NbdServer {
  private readonly servers: net.Server[] = [];
  private readonly connections = new Set<NbdConnection>();
  /** The TCP port actually bound (useful with port 0). */
  tcpPort: number | undefined;

  private constructor(private readonly exports: NbdExportProvider, private readonly unixPath: string | undefined) {}

  static async start(exports: NbdExportProvider, options: { unixPath?: string; tcp?: NbdListenAddress }): Promise<NbdServer> {
    const s = new NbdServer(exports, options.unixPath);
    try {
      if (options.unixPath) {
        fs.rmSync(options.unixPath, { force: true });
        await s.listen((srv, cb) => srv.listen(options.unixPath, cb));
      }
      if (options.tcp) {
        const srv = await s.listen((srv2, cb) => srv2.listen(options.tcp!.port, options.tcp!.host, cb));
        s.tcpPort = (srv.address() as net.AddressInfo).port;
      }
    } catch (err) {
      await s.close();
      throw new DmError('DM_INVALID_ARGUMENT', `NBD: cannot listen: ${(err as Error).message}`, { cause: err });
    }
    return s;
  }

  private listen(bind: (srv: net.Server, cb: () => void) => void): Promise<net.Server> {
    const srv = net.createServer({ noDelay: true, allowHalfOpen: true }, (sock) => {
      const c = new NbdConnection(sock, this.exports, (x) => this.connections.delete(x));
      this.connections.add(c);
    });
    this.servers.push(srv);
    return new Promise((resolve, reject) => {
      srv.once('error', reject);
      bind(srv, () => {
        srv.off('error', reject);
        resolve(srv);
      });
    });
  }

  get connectionCount(): number {
    return this.connections.size;
  }

  async close(): Promise<void> {
    const closing = this.servers.map((s) => new Promise<void>((resolve) => s.close(() => resolve())));
    for (const c of this.connections) c.close();
    await Promise.all(closing);
    if (this.unixPath) fs.rmSync(this.unixPath, { force: true });
  }
}
