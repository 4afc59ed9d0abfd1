/** The client side of the control socket (used by the CLI; usable by any program). */
import * as net from 'node:net';
import { DmError } from '../core/errors.js';
import type { ControlRequest, ControlResponse } from './control-protocol.js';

type RequestBody = ControlRequest extends infer R ? (R extends { id: number } ? Omit<R, 'id'> : never) : never;

export class ControlClient {
  private nextId = 1;
  private buffer = '';
  private readonly handlers = new Map<number, (r: ControlResponse) => void>();
  private closedError: Error | undefined;

  private constructor(private readonly sock: net.Socket) {
    sock.setEncoding('utf8');
    sock.on('data', (chunk: string) => {
      this.buffer += chunk;
      let nl: number;
      while ((nl = this.buffer.indexOf('\n')) >= 0) {
        const line = this.buffer.slice(0, nl);
        this.buffer = this.buffer.slice(nl + 1);
        const r = JSON.parse(line) as ControlResponse;
        this.handlers.get(r.id)?.(r);
      }
    });
    sock.on('close', () => {
      this.closedError = new DmError('DM_NO_DAEMON', 'the daemon closed the connection');
      for (const h of this.handlers.values()) h({ id: 0, op: 'error', code: 'DM_NO_DAEMON', message: this.closedError.message });
    });
  }

  static connect(socketPath: string, poolDir: string): Promise<ControlClient> {
    return new Promise((resolve, reject) => {
      const sock = net.connect(socketPath);
      sock.once('connect', () => {
        sock.removeAllListeners('error');
        sock.on('error', () => undefined);
        resolve(new ControlClient(sock));
      });
      sock.once('error', (err: NodeJS.ErrnoException) => {
        reject(new DmError('DM_NO_DAEMON', `no daemon on pool ${poolDir} (${err.code ?? err.message}); start one with: dmstate serve --pool ${poolDir}`, { cause: err }));
      });
    });
  }

  /** Sends a request and calls onResponse for each response line until it returns true (done). */
  stream(body: RequestBody, onResponse: (r: ControlResponse) => boolean): Promise<void> {
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      if (this.closedError) return reject(this.closedError);
      this.handlers.set(id, (r) => {
        if (r.op === 'error') {
          this.handlers.delete(id);
          reject(new DmError(r.code as never, r.message));
          return;
        }
        if (onResponse(r)) {
          this.handlers.delete(id);
          resolve();
        }
      });
      this.sock.write(JSON.stringify({ ...body, id }) + '\n');
    });
  }

  /** One request, one response. */
  async request(body: RequestBody): Promise<ControlResponse> {
    let response: ControlResponse | undefined;
    await this.stream(body, (r) => {
      response = r;
      return true;
    });
    return response!;
  }

  close(): void {
    this.sock.end();
    this.sock.destroy();
  }
}
