/**
 * The control socket protocol: newline-delimited JSON. A client sends one request per line; the daemon answers
 * each with one response line carrying the same id. `state` answers the running engine's digest and the log
 * position it belongs to. `log` with follow streams event lines until the client
 * closes the connection; `inspect` answers 'inspect.started', then streams 'inspection' lines (live inspection
 * records, src/inspect/live-inspector.ts) until the client closes the connection.
 */
import type { DmsetupCommand } from './dmsetup/command.js';
import type { DmsetupResult } from './dmsetup/execute.js';
import type { LoggedEvent } from '../log/events.js';
import type { InspectionRecord } from '../inspect/live-inspector.js';

export type ControlRequest =
  | { id: number; op: 'dmsetup'; command: DmsetupCommand }
  | { id: number; op: 'log'; sinceSeq?: number; follow: boolean }
  | { id: number; op: 'ping' }
  | { id: number; op: 'state' }
  | { id: number; op: 'inspect'; devices?: string[]; kinds?: string[]; maxEventsPerSecond?: number };

export type ControlResponse =
  | { id: number; op: 'dmsetup'; result: DmsetupResult }
  | { id: number; op: 'event'; event: LoggedEvent }
  | { id: number; op: 'end' }
  | { id: number; op: 'pong'; pid: number; pool: string }
  /** The engine's live digest (src/replay/digest.ts, from its own objects) once every event up to `seq` is stored. */
  | { id: number; op: 'state'; seq: number; digest: string }
  | { id: number; op: 'error'; code: string; message: string }
  | { id: number; op: 'inspect.started'; devices: string[]; kinds: string[]; maxEventsPerSecond: number; missingDevices: string[] }
  | { id: number; op: 'inspection'; record: InspectionRecord };

/** A request line longer than this is refused (a table of 64k lines fits). */
export const CONTROL_LINE_BYTES_MAX = 16 * 1024 * 1024;
/** An inspection record is dropped (counted, reason 'backlog') while this much is unsent on the socket. */
export const INSPECT_BACKLOG_BYTES_MAX = 8 * 1024 * 1024;
