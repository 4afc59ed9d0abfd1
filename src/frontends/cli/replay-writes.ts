/**
 * `dmstate replay-writes LOG --to-device FILE [...]`: rebuilds a device from a dm-log-writes log (written by the
 * kernel's log-writes target or dmstate's) the way fstests' replay-log does, optionally running a check at each
 * durability point — the standard way to test crash consistency:
 *
 *   truncate -s 64M replay.img
 *   dmstate replay-writes log.img --to-device replay.img --check 'fsck.ext4 -fn "$1"' --every flush
 *
 * The check runs with `sh -c CMD sh FILE`: the device file is $1 and $DMSTATE_REPLAY_DEVICE, the entry just
 * applied is $DMSTATE_REPLAY_ENTRY, the log $DMSTATE_REPLAY_LOG. A check that exits non-zero stops the replay
 * (exit 1) with the device as rebuilt up to that entry. Without --to-device it prints what the log holds
 * (--verbose: every entry). The log is read and checked through to the stop before the device is touched: a
 * corrupt or short log changes nothing. Exit 0 on success, 1 on an error or failed check, 2 on a usage error.
 */
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { isDmError } from '../../core/errors.js';
import { parseUnsigned } from '../../core/parse-number.js';
import { flagsToString, LOG_WRITES_VERSION } from '../../targets/log-writes/format.js';
import { LogReader, type LogEntry } from '../../targets/log-writes/log-reader.js';
import { openReplayFile, planReplay, replayLog, type CheckEvery, type ReplaySelection } from '../../targets/log-writes/replay.js';

export const REPLAY_WRITES_USAGE = `usage: dmstate replay-writes LOG [--to-device FILE] [--start-entry N | --start-mark M] [--end-mark M]
                             [--limit N] [--next-flush] [--next-fua] [--no-discard]
                             [--check CMD --every flush|fua|N] [-v|--verbose (twice: skipped entries too)]
`;

interface Output {
  write(text: string): unknown;
  readonly isTTY?: boolean;
}

export interface ReplayWritesIo {
  readonly stdout: Output;
  readonly stderr: Output;
  readonly env: NodeJS.ProcessEnv;
}

interface Parsed {
  log: string;
  device?: string;
  selection: ReplaySelection;
  discard: boolean;
  check?: string;
  every?: CheckEvery;
  verbose: number;
}

class UsageError extends Error {}

function parseArgs(args: readonly string[]): Parsed {
  const positional: string[] = [];
  const sel: { -readonly [K in keyof ReplaySelection]: ReplaySelection[K] } = {};
  const p: Omit<Parsed, 'log' | 'selection'> = { discard: true, verbose: 0 };
  const value = (i: number, opt: string): string => {
    const v = args[i];
    if (v === undefined) throw new UsageError(`${opt} needs a value`);
    return v;
  };
  const count = (text: string, opt: string): number => {
    try {
      return parseUnsigned(text, opt, 'DM_INVALID_ARGUMENT');
    } catch (err) {
      throw new UsageError((err as Error).message);
    }
  };
  for (let i = 0; i < args.length; i++) {
    const a = args[i];
    const eq = a.startsWith('--') ? a.indexOf('=') : -1;
    const opt = eq > 0 ? a.slice(0, eq) : a;
    const val = (): string => (eq > 0 ? a.slice(eq + 1) : value(++i, opt));
    switch (opt) {
      case '--to-device':
      case '--replay':
        p.device = val();
        break;
      case '--start-entry':
        sel.startEntry = count(val(), opt);
        break;
      case '--start-mark':
        sel.startMark = val();
        break;
      case '--end-mark':
        sel.endMark = val();
        break;
      case '--limit': {
        const n = count(val(), opt);
        if (n === 0) throw new UsageError('--limit must be at least 1');
        sel.limit = n;
        break;
      }
      case '--next-flush':
        sel.stopAtFlush = true;
        break;
      case '--next-fua':
        sel.stopAtFua = true;
        break;
      case '--no-discard':
        p.discard = false;
        break;
      case '--check':
        p.check = val();
        break;
      case '--every': {
        const v = val();
        if (v === 'flush' || v === 'fua') p.every = { kind: v };
        else {
          const n = count(v, '--every');
          if (n === 0) throw new UsageError('--every takes flush, fua or a number of entries from 1');
          p.every = { kind: 'entries', count: n };
        }
        break;
      }
      case '-v':
      case '--verbose':
        p.verbose++;
        break;
      case '-vv':
        p.verbose += 2;
        break;
      default:
        if (a.startsWith('-') && a !== '-') throw new UsageError(`unknown option '${a}'`);
        positional.push(a);
    }
  }
  if (positional.length !== 1) throw new UsageError(positional.length === 0 ? 'no log given' : `one log only (got ${positional.join(' ')})`);
  if ((p.check === undefined) !== (p.every === undefined)) throw new UsageError('--check CMD and --every flush|fua|N go together');
  if (sel.startEntry !== undefined && sel.startMark !== undefined) throw new UsageError('--start-entry and --start-mark exclude each other');
  if (p.check !== undefined && p.device === undefined) throw new UsageError('--check needs --to-device');
  return { ...p, log: positional[0], selection: sel };
}

function describeEntry(e: LogEntry, blockSizeBytes: number): string {
  const mark = e.markName !== undefined ? ` mark "${e.markName}"` : '';
  return `${e.index}@${e.logOffsetBytes / blockSizeBytes}: sector ${e.sector}, size ${e.nrSectors * blockSizeBytes}, flags 0x${e.flags.toString(16)}(${flagsToString(e.flags)})${mark}`;
}

const mib = (bytes: number): string => `${(bytes / (1024 * 1024)).toFixed(1)} MiB`;

/** Runs CMD with sh; resolves with its exit code (128 + signal number style for a signal). */
function runCheck(cmd: string, device: string, log: string, entry: LogEntry, io: ReplayWritesIo): Promise<number> {
  return new Promise((resolve) => {
    const child = spawn('sh', ['-c', cmd, 'sh', device], {
      stdio: ['ignore', 'pipe', 'pipe'],
      env: { ...io.env, DMSTATE_REPLAY_DEVICE: device, DMSTATE_REPLAY_ENTRY: String(entry.index), DMSTATE_REPLAY_LOG: log },
    });
    child.stdout.on('data', (c: Buffer) => io.stdout.write(c.toString()));
    child.stderr.on('data', (c: Buffer) => io.stderr.write(c.toString()));
    child.on('error', (err) => {
      io.stderr.write(`replay-writes: cannot run the check: ${err.message}\n`);
      resolve(127);
    });
    child.on('close', (code, signal) => resolve(code ?? (signal ? 128 : 1)));
  });
}

/** Progress on a terminal: one line redrawn at most every PROGRESS_INTERVAL_MS. */
const PROGRESS_INTERVAL_MS = 100;

export async function runReplayWrites(args: string[], io: ReplayWritesIo = { stdout: process.stdout, stderr: process.stderr, env: process.env }): Promise<number> {
  if (args.includes('--help') || args.includes('-h')) {
    io.stdout.write(REPLAY_WRITES_USAGE);
    return 0;
  }
  let p: Parsed;
  try {
    p = parseArgs(args);
  } catch (err) {
    if (!(err instanceof UsageError)) throw err;
    io.stderr.write(`dmstate replay-writes: ${err.message}\n${REPLAY_WRITES_USAGE}`);
    return 2;
  }
  let reader: LogReader | undefined;
  let target: ReturnType<typeof openReplayFile> | undefined;
  try {
    reader = LogReader.open(p.log);
    const block = reader.blockSizeBytes;
    if (p.device === undefined) {
      io.stdout.write(`Log version=${LOG_WRITES_VERSION}, sectorsize=${block}, entries=${reader.header.nrEntries}\n`);
      let n = 0;
      for (const e of reader.entries()) {
        if (p.verbose > 0) io.stdout.write(`${describeEntry(e, block)}\n`);
        n++;
      }
      if (p.verbose === 0) io.stdout.write(`all ${n} entries read and checked\n`);
      return 0;
    }
    if (fs.existsSync(p.device) && fs.realpathSync(p.device) === fs.realpathSync(p.log)) {
      io.stderr.write(`dmstate replay-writes: the log and the replay device are the same file (${p.log})\n`);
      return 1;
    }
    target = openReplayFile(p.device);
    const plan = planReplay(reader, p.selection, target.sizeBytes);
    const toApply = plan.lastIndex - plan.firstIndex + 1;
    const tty = io.stderr.isTTY === true;
    let lastDrawMs = -Infinity;
    const draw = (done: number, bytes: number): void => {
      const frac = toApply === 0 ? 1 : done / toApply;
      const width = 30;
      const filled = Math.round(frac * width);
      io.stderr.write(`\r[${'#'.repeat(filled)}${'.'.repeat(width - filled)}] ${(frac * 100).toFixed(1).padStart(5)}%  ${done}/${toApply} entries  ${mib(bytes)}/${mib(plan.dataBytes)}`);
    };
    const device = p.device;
    const logPath = p.log;
    const checkCmd = p.check;
    const result = await replayLog(reader, target, plan, {
      discard: p.discard,
      check:
        checkCmd !== undefined && p.every !== undefined
          ? {
              every: p.every,
              run: (e) => {
                if (tty) io.stderr.write('\n'); // the check's output starts below the progress line
                return runCheck(checkCmd, device, logPath, e, io);
              },
            }
          : undefined,
      onEntry: (e, done, bytes) => {
        if (p.verbose > 0) io.stdout.write(`replaying ${describeEntry(e, block)}\n`);
        if (tty && (done === toApply || performance.now() - lastDrawMs >= PROGRESS_INTERVAL_MS)) {
          lastDrawMs = performance.now();
          draw(done, bytes);
        }
      },
      onSkip: p.verbose > 1 ? (e) => io.stdout.write(`skipping ${describeEntry(e, block)}\n`) : undefined,
    });
    if (tty) io.stderr.write('\n');
    const range = result.replayedEntries === 0 ? 'no entries' : `entries ${plan.firstIndex}..${result.lastIndex} of ${plan.nrEntries}`;
    const checks = p.check !== undefined ? `; ${result.checksRun} check${result.checksRun === 1 ? '' : 's'} run` : '';
    if (result.checkFailure) {
      io.stderr.write(
        `replay-writes: check failed at entry ${result.checkFailure.entryIndex} (exit code ${result.checkFailure.exitCode}); ` +
          `${path.basename(device)} is left as rebuilt through entry ${result.checkFailure.entryIndex} (${range}${checks})\n`,
      );
      return 1;
    }
    io.stderr.write(
      `replay-writes: replayed ${range} onto ${device}: ${mib(result.writtenBytes)} written` +
        `${result.zeroedBytes > 0 ? `, ${mib(result.zeroedBytes)} discarded (zeroed)` : ''}; stopped at ${plan.stopReason}${checks}\n`,
    );
    return 0;
  } catch (err) {
    if (!isDmError(err)) throw err;
    io.stderr.write(`dmstate replay-writes: ${err.message}\n`);
    return 1;
  } finally {
    target?.close();
    reader?.close();
  }
}
