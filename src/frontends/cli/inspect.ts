/**
 * `dmstate inspect`: attaches to the pool's daemon and prints its actors' live inspection records (bios, kcopyd
 * jobs and pieces, merges, mirror write groups, write transactions and resyncs) until Ctrl-C, or until --count
 * records. The daemon turns inspection on for what is asked and off again when this disconnects.
 *
 * Output: text lines (default), the records as JSON lines (--json), Stately inspector messages as JSON lines
 * (--stately), or those messages sent to a WebSocket relay (--stately-ws URL; needs a global WebSocket: Node 22,
 * or Node 20 with NODE_OPTIONS=--experimental-websocket).
 */
import { DmError } from '../../core/errors.js';
import { parseUnsigned } from '../../core/parse-number.js';
import { INSPECT_ACTOR_KINDS, type InspectActorKind, type InspectionRecord } from '../../inspect/live-inspector.js';
import { StatelyBridge, type StatelyMessage } from '../../inspect/live-stately.js';
import { ControlClient } from '../control-client.js';
import { poolPaths } from '../pool.js';

export const INSPECT_USAGE = `usage: dmstate inspect [--pool DIR] [--device NAME]... [--actor KIND]... [--rate N] [--count N]
                       [--json | --stately | --stately-ws ws://HOST:PORT]
  KIND: ${INSPECT_ACTOR_KINDS.join(', ')},
        or kcopyd (both kcopyd kinds), mirror (the three mirror kinds); --device and --actor repeat or take comma
        lists; --rate N: at most N records a second per kind start new actors (default 1000, 0 = no limit)
`;

/** Names --actor takes besides the kinds themselves. */
const KIND_GROUPS: Readonly<Record<string, readonly InspectActorKind[]>> = {
  kcopyd: ['kcopyd-job', 'kcopyd-piece'],
  mirror: ['mirror-write-group', 'mirror-write-transaction', 'mirror-resync'],
};

export interface InspectArgs {
  readonly pool: string;
  readonly devices: string[];
  readonly kinds: InspectActorKind[];
  readonly maxEventsPerSecond: number | undefined;
  readonly count: number | undefined;
  readonly format: 'text' | 'json' | 'stately';
  readonly statelyUrl: string | undefined;
}

export function parseInspectArgs(argv: readonly string[], env: NodeJS.ProcessEnv = process.env): InspectArgs {
  let pool = env.DMSTATE_POOL || './dmstate-data';
  const devices: string[] = [];
  const kinds: InspectActorKind[] = [];
  let maxEventsPerSecond: number | undefined;
  let count: number | undefined;
  let format: InspectArgs['format'] = 'text';
  let statelyUrl: string | undefined;
  const formats = new Set<string>();
  for (let i = 0; i < argv.length; i++) {
    const [flag, inline] = argv[i].startsWith('--') && argv[i].includes('=') ? [argv[i].slice(0, argv[i].indexOf('=')), argv[i].slice(argv[i].indexOf('=') + 1)] : [argv[i], undefined];
    const value = (): string => {
      const v = inline ?? argv[++i];
      if (v === undefined || v === '') throw new DmError('DM_INVALID_ARGUMENT', `inspect: ${flag} needs a value\n${INSPECT_USAGE}`);
      return v;
    };
    switch (flag) {
      case '--pool':
        pool = value();
        break;
      case '--device':
        devices.push(...value().split(',').filter((d) => d !== ''));
        break;
      case '--actor':
        for (const k of value().split(',')) {
          const group = Object.hasOwn(KIND_GROUPS, k) ? KIND_GROUPS[k] : undefined;
          if (group !== undefined) kinds.push(...group);
          else if ((INSPECT_ACTOR_KINDS as readonly string[]).includes(k)) kinds.push(k as InspectActorKind);
          else throw new DmError('DM_INVALID_ARGUMENT', `inspect: unknown actor kind '${k}' (one of ${INSPECT_ACTOR_KINDS.join(', ')}, ${Object.keys(KIND_GROUPS).join(', ')})`);
        }
        break;
      case '--rate':
        maxEventsPerSecond = parseUnsigned(value(), '--rate', 'DM_INVALID_ARGUMENT');
        break;
      case '--count':
        count = parseUnsigned(value(), '--count', 'DM_INVALID_ARGUMENT');
        if (count === 0) throw new DmError('DM_INVALID_ARGUMENT', 'inspect: --count must be at least 1');
        break;
      case '--json':
        format = 'json';
        formats.add(flag);
        break;
      case '--stately':
        format = 'stately';
        formats.add(flag);
        break;
      case '--stately-ws':
        statelyUrl = value();
        if (!/^wss?:\/\/./.test(statelyUrl)) throw new DmError('DM_INVALID_ARGUMENT', `inspect: --stately-ws needs a ws:// or wss:// URL, got '${statelyUrl}'`);
        format = 'stately';
        formats.add(flag);
        break;
      default:
        throw new DmError('DM_INVALID_ARGUMENT', `inspect: unknown option '${argv[i]}'\n${INSPECT_USAGE}`);
    }
  }
  if (formats.size > 1) throw new DmError('DM_INVALID_ARGUMENT', `inspect: choose one of ${[...formats].join(', ')}`);
  return { pool, devices: [...new Set(devices)], kinds: [...new Set(kinds)], maxEventsPerSecond, count, format, statelyUrl };
}

/** One record as a line of text; undefined for records the text form leaves out (events: the snapshot has them). */
export function formatInspectionRecord(r: InspectionRecord): string | undefined {
  const time = new Date(r.timeMs).toISOString();
  switch (r.type) {
    case '@xstate.actor': {
      const info = r.info ? ' ' + Object.entries(r.info).map(([k, v]) => `${k}=${v}`).join(' ') : '';
      const parent = r.parentId !== undefined ? ` parent=${r.parentId}` : '';
      return `${time} ${r.actorId} started in ${r.value}${info}${parent}`;
    }
    case '@xstate.event':
      return undefined;
    case '@xstate.snapshot':
      return `${time} ${r.actorId} ${r.from} --${r.event}--> ${r.value}${r.status === 'done' ? ' (done)' : ''}`;
    default:
      return `${time} dropped ${r.events} ${r.kind} records (${r.actors} actors) ${r.reason === 'rate' ? 'over the --rate budget' : 'while this watcher fell behind'}`;
  }
}

interface Output {
  write(line: string): void;
  /** Resolves when the far end went away (the WebSocket relay closed). */
  readonly ended: Promise<void>;
  close(): Promise<void>;
}

/** Sends Stately messages to a WebSocket relay (e.g. @statelyai/inspect's createInspectorServer on port 8080). */
async function webSocketOutput(url: string): Promise<Output> {
  const WS = (globalThis as { WebSocket?: new (url: string) => WebSocketLike }).WebSocket;
  if (WS === undefined) {
    throw new DmError('DM_NOT_SUPPORTED', 'inspect: --stately-ws needs a WebSocket client: Node 22 or later, or Node 20 with NODE_OPTIONS=--experimental-websocket (or use --stately for JSON lines)');
  }
  const ws = new WS(url);
  await new Promise<void>((resolve, reject) => {
    ws.onopen = () => resolve();
    ws.onerror = () => reject(new DmError('DM_IO', `inspect: cannot connect to ${url}`));
  });
  const closed = new Promise<void>((resolve) => {
    ws.onclose = () => resolve();
  });
  return {
    write: (line) => ws.send(line),
    ended: closed,
    close: async () => {
      ws.close();
      await closed;
    },
  };
}

interface WebSocketLike {
  onopen: (() => void) | null;
  onerror: (() => void) | null;
  onclose: (() => void) | null;
  send(data: string): void;
  close(): void;
}

function stdoutOutput(): Output {
  return {
    write: (line) => void process.stdout.write(line + '\n'),
    ended: new Promise<void>(() => undefined),
    close: () => new Promise((resolve) => process.stdout.write('', () => resolve())),
  };
}

function untilSignal(): { promise: Promise<void>; dispose(): void } {
  let on: () => void = () => undefined;
  const promise = new Promise<void>((resolve) => {
    on = () => resolve();
    process.on('SIGINT', on);
    process.on('SIGTERM', on);
  });
  return {
    promise,
    dispose: () => {
      process.off('SIGINT', on);
      process.off('SIGTERM', on);
    },
  };
}

export async function runInspect(argv: readonly string[]): Promise<number> {
  if (argv.includes('--help') || argv.includes('-h')) {
    process.stdout.write(INSPECT_USAGE);
    return 0;
  }
  const args = parseInspectArgs(argv);
  const paths = poolPaths(args.pool);
  const client = await ControlClient.connect(paths.controlSocket, paths.dir);
  let output: Output | undefined;
  const signal = untilSignal();
  // A closed stdout (`| head`) ends the watch quietly.
  let stdoutClosed: () => void = () => undefined;
  const stdoutGone = new Promise<void>((resolve) => (stdoutClosed = resolve));
  const onStdoutError = (): void => stdoutClosed();
  process.stdout.on('error', onStdoutError);
  try {
    output = args.statelyUrl !== undefined ? await webSocketOutput(args.statelyUrl) : stdoutOutput();
    const out = output;
    const bridge = args.format === 'stately' ? new StatelyBridge() : undefined;
    let printed = 0;
    let reachedCount: () => void = () => undefined;
    const counted = new Promise<void>((resolve) => (reachedCount = resolve));
    const stream = client.stream(
      { op: 'inspect', devices: args.devices, kinds: args.kinds, maxEventsPerSecond: args.maxEventsPerSecond },
      (r) => {
        if (r.op === 'inspect.started') {
          for (const d of r.missingDevices) process.stderr.write(`dmstate: inspect: no device ${d} (yet): watching for it\n`);
          process.stderr.write(`dmstate: inspecting ${r.kinds.length ? r.kinds.join(', ') : 'every actor kind'} on ${r.devices.length ? r.devices.join(', ') : 'every device'} (at most ${r.maxEventsPerSecond || 'unlimited'} records/s per kind); Ctrl-C stops\n`);
          return false;
        }
        if (r.op !== 'inspection' || (args.count !== undefined && printed >= args.count)) return false;
        const rec = r.record;
        let line: string | undefined;
        if (args.format === 'json') line = JSON.stringify(rec);
        else if (bridge) {
          const m: StatelyMessage | undefined = bridge.convert(rec);
          if (m === undefined) process.stderr.write(`${formatInspectionRecord(rec)}\n`);
          else line = JSON.stringify(m);
        } else line = formatInspectionRecord(rec);
        if (line === undefined) return false;
        out.write(line);
        if (rec.type !== 'dmstate.inspect.dropped' && ++printed === args.count) reachedCount();
        return false;
      },
    );
    await Promise.race([stream, signal.promise, counted, stdoutGone, out.ended]);
    return 0;
  } finally {
    signal.dispose();
    client.close();
    await output?.close();
    process.stdout.off('error', onStdoutError);
  }
}
