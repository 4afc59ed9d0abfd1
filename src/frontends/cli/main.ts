/**
 * The `dmstate` command: serve, dmsetup, log, demo. Exit code 0 on success, 1 on an operating error with a
 * clear message on stderr, 2 on a usage error.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { DmError, isDmError } from '../../core/errors.js';
import { ControlClient } from '../control-client.js';
import { Daemon } from '../daemon.js';
import { parseDmsetupArgs } from '../dmsetup/command.js';
import { formatLoggedEvent } from '../log-format.js';
import { openPoolDb, poolPaths } from '../pool.js';
import { EventLog } from '../../log/event-log.js';
import { createSystemClock } from '../../core/clock.js';
import { parseUnsigned } from '../../core/parse-number.js';
import { DMSTATE_VERSION } from '../../version.js';
import { runDemo } from './demo.js';
import { runMerge } from './merge.js';
import { dmsetupRunner } from './dmsetup-runner.js';
import { runResync } from './resync.js';
import { runReplayWrites } from './replay-writes.js';
import { runInspect } from './inspect.js';
import { runMachines } from './machines.js';
import { runBitmap } from './bitmap.js';
import { runLogCompact, runReplay } from './replay.js';
import { parseListenAddress, type NbdListenAddress } from '../nbd/server.js';

export const USAGE = `dmstate ${DMSTATE_VERSION}: the Linux device-mapper in userspace

usage:
  dmstate serve   [--pool DIR] [--listen HOST:PORT] [--trace] [--seed N]
                  run the engine for a pool, devices as NBD exports on DIR/nbd.sock (and TCP with --listen)
  dmstate dmsetup [--pool DIR] <command> [args...]      dmsetup's commands against the pool's daemon:
        create NAME [FILE | --table TABLE | --notable] [-u UUID] [-r]    load NAME [FILE | --table TABLE]
        suspend NAME...   resume NAME...   remove NAME...   remove_all   clear NAME
        status [NAME...]  table [NAME...]  (--inactive, --target TYPE)   info [NAME...] [-c]   ls [--target TYPE]
        message NAME SECTOR MSG...  (message NAME 0 mark LABEL appends a named mark to the event log)
        targets   version   mknodes
  dmstate log     [--pool DIR] [--follow] [--since SEQ] [--json]   print the pool's event log
  dmstate merge   [--pool DIR] NAME                      merge snapshot NAME into its origin (like lvconvert --merge),
                  with progress; on a merging origin: watch it and finish
  dmstate resync  [--pool DIR] NAME [--readd LEG] [--throttle PERCENT]
                  watch a mirror's resync with progress until it is in sync; --readd re-adds a failed leg first
  dmstate demo    [--pool DIR]                           serve with a demo device (what npm start runs)
  dmstate replay  [--pool DIR] [--to SEQ | --to-mark NAME] [--into DIR2 [--writable]] [--json]
                  rebuild the pool's state (metadata; data files are today's) from its log, print its digest;
                  dmstate replay --help.  dmstate log compact [--pool DIR] --before SEQ: drop old events
  dmstate replay-writes LOG --to-device FILE [...]      rebuild a device from a dm-log-writes log (--help: options)
  dmstate inspect [--pool DIR] [--device NAME] [--actor KIND] [--json | --stately]
                  stream the daemon's actors live (bios, kcopyd jobs/pieces, merges, mirror groups/transactions/resyncs); dmstate inspect --help
  dmstate machines [NAME] [--format json|mermaid|dot|scxml] [--paths [--to STATE]] [--coverage]   the machines; --help
  dmstate bitmap  create FILE --sync-size SECTORS [--chunk SIZE] [--delay S] | examine FILE   md bitmap files
                  (like mdadm --create --bitmap=FILE / mdadm -X FILE); dmstate bitmap --help

The pool is --pool DIR, else $DMSTATE_POOL, else ./dmstate-data. Table device arguments are file paths,
names of other mapped devices, /dev/mapper/NAME or 253:MINOR.
`;

/** Takes `--pool DIR` / `--pool=DIR` out of argv wherever it stands. */
function extractPool(argv: string[]): { pool: string; rest: string[] } {
  let pool = process.env.DMSTATE_POOL || './dmstate-data';
  const rest: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === '--pool') {
      if (i + 1 >= argv.length) throw new DmError('DM_INVALID_ARGUMENT', '--pool needs a folder');
      pool = argv[++i];
    } else if (argv[i].startsWith('--pool=')) pool = argv[i].slice('--pool='.length);
    else rest.push(argv[i]);
  }
  return { pool, rest };
}

export async function main(argv: string[]): Promise<number> {
  const [cmd, ...args] = argv;
  try {
    switch (cmd) {
      case undefined:
      case 'help':
      case '--help':
      case '-h':
        process.stdout.write(USAGE);
        return cmd === undefined ? 2 : 0;
      case '--version':
      case 'version':
        process.stdout.write(`dmstate ${DMSTATE_VERSION}\n`);
        return 0;
      case 'serve':
        return await serve(args);
      case 'dmsetup':
        return await dmsetup(args);
      case 'replay':
        return await runReplay(extractPool(args).pool, extractPool(args).rest);
      case 'log':
        if (args[0] === 'compact') return await runLogCompact(extractPool(args.slice(1)).pool, extractPool(args.slice(1)).rest);
        return await log(args);
      case 'demo':
        return await runDemo(extractPool(args).pool);
      case 'merge':
        return await merge(args);
      case 'resync':
        return await resync(args);
      case 'replay-writes':
        return await runReplayWrites(args);
      case 'inspect':
        return await runInspect(args);
      case 'machines':
        return await runMachines(args);
      case 'bitmap':
        return await runBitmap(args);
      default:
        process.stderr.write(`dmstate: unknown command '${cmd}'\n\n${USAGE}`);
        return 2;
    }
  } catch (err) {
    if (isDmError(err)) {
      process.stderr.write(`dmstate: ${err.message}\n`);
      return err.code === 'DM_INVALID_ARGUMENT' || err.code === 'DM_UNKNOWN_COMMAND' ? 2 : 1;
    }
    throw err;
  }
}

/** Resolves when SIGINT or SIGTERM arrives. */
export function untilSignal(): Promise<string> {
  return new Promise((resolve) => {
    const on = (sig: string): void => {
      process.off('SIGINT', on);
      process.off('SIGTERM', on);
      resolve(sig);
    };
    process.on('SIGINT', on);
    process.on('SIGTERM', on);
  });
}

async function serve(argv: string[]): Promise<number> {
  const { pool, rest } = extractPool(argv);
  let trace = false;
  let seed: number | undefined;
  let nbdTcp: NbdListenAddress | undefined;
  for (let i = 0; i < rest.length; i++) {
    if (rest[i] === '--trace') trace = true;
    else if (rest[i] === '--listen') nbdTcp = parseListenAddress(rest[++i] ?? '');
    else if (rest[i].startsWith('--listen=')) nbdTcp = parseListenAddress(rest[i].slice('--listen='.length));
    else if (rest[i] === '--seed') seed = parseUnsigned(rest[++i] ?? '', '--seed', 'DM_INVALID_ARGUMENT');
    else throw new DmError('DM_INVALID_ARGUMENT', `serve: unknown option '${rest[i]}'`);
  }
  const daemon = await Daemon.start({ poolDir: pool, trace, seed, nbdTcp });
  for (const f of daemon.engine.restoreFailures) process.stderr.write(`dmstate: could not restore ${f}\n`);
  process.stderr.write(`dmstate: serving pool ${daemon.paths.dir} (control socket ${daemon.paths.controlSocket}, ${daemon.engine.names().length} devices)\n` +
      `dmstate: NBD exports on nbd+unix:///NAME?socket=${daemon.paths.nbdSocket}` +
      (daemon.nbd.tcpPort !== undefined ? ` and nbd://${nbdTcp!.host}:${daemon.nbd.tcpPort}/NAME` : '') + '\n');
  const sig = await untilSignal();
  process.stderr.write(`dmstate: ${sig}: shutting down\n`);
  await daemon.close();
  return 0;
}

async function readStdin(): Promise<string> {
  const chunks: Buffer[] = [];
  for await (const c of process.stdin) chunks.push(c as Buffer);
  return Buffer.concat(chunks).toString('utf8');
}

async function dmsetup(argv: string[]): Promise<number> {
  const { pool, rest } = extractPool(argv);
  if (rest.includes('--help') || rest.includes('-h')) {
    process.stdout.write(USAGE);
    return 0;
  }
  let command: ReturnType<typeof parseDmsetupArgs>;
  try {
    command = parseDmsetupArgs(rest);
    if (command.tableFile !== undefined) {
      const file = path.resolve(command.tableFile);
      try {
        command.table = fs.readFileSync(file, 'utf8');
      } catch (err) {
        throw new DmError('DM_INVALID_ARGUMENT', `cannot read table file ${file}: ${(err as NodeJS.ErrnoException).code}`);
      }
    }
  } catch (err) {
    // dmsetup exits 1 with "Command failed." for its usage errors too.
    if (!isDmError(err)) throw err;
    process.stderr.write(`dmstate: ${err.message}\nCommand failed.\n`);
    return 1;
  }
  command.cwd = process.cwd();
  if (command.tableFromStdin) {
    command.table = await readStdin();
  }
  const paths = poolPaths(pool);
  const client = await ControlClient.connect(paths.controlSocket, paths.dir);
  try {
    const r = await client.request({ op: 'dmsetup', command });
    if (r.op !== 'dmsetup') throw new DmError('DM_NO_DAEMON', `unexpected answer from the daemon: ${r.op}`);
    process.stdout.write(r.result.stdout);
    process.stderr.write(r.result.stderr);
    return r.result.exitCode;
  } finally {
    client.close();
  }
}

async function merge(argv: string[]): Promise<number> {
  const { pool, rest } = extractPool(argv);
  if (rest.length !== 1) throw new DmError('DM_INVALID_ARGUMENT', 'usage: dmstate merge [--pool DIR] NAME');
  const paths = poolPaths(pool);
  const client = await ControlClient.connect(paths.controlSocket, paths.dir);
  try {
    return await runMerge(client, rest[0], process.cwd(), process.stderr, () => performance.now());
  } finally {
    client.close();
  }
}

async function resync(argv: string[]): Promise<number> {
  const { pool, rest } = extractPool(argv);
  const names: string[] = [];
  let readdLeg: string | undefined;
  let throttlePercent: string | undefined;
  const usage = new DmError('DM_INVALID_ARGUMENT', 'usage: dmstate resync [--pool DIR] NAME [--readd LEG] [--throttle PERCENT]');
  for (let i = 0; i < rest.length; i++) {
    if (rest[i] === '--readd' || rest[i] === '--throttle') {
      const value = rest[i + 1];
      if (value === undefined) throw usage;
      if (rest[i] === '--readd') readdLeg = value;
      else throttlePercent = value;
      i++;
    } else names.push(rest[i]);
  }
  if (names.length !== 1) throw usage;
  const paths = poolPaths(pool);
  const client = await ControlClient.connect(paths.controlSocket, paths.dir);
  try {
    return await runResync(dmsetupRunner(client, process.cwd()), names[0], process.stderr, {
      readdLeg,
      throttlePercent,
      nowMs: () => performance.now(),
      wait: (ms) => new Promise((r) => setTimeout(r, ms)),
    });
  } finally {
    client.close();
  }
}

async function log(argv: string[]): Promise<number> {
  const { pool, rest } = extractPool(argv);
  let follow = false;
  let json = false;
  let sinceSeq: number | undefined;
  for (let i = 0; i < rest.length; i++) {
    if (rest[i] === '--follow' || rest[i] === '-f') follow = true;
    else if (rest[i] === '--json') json = true;
    else if (rest[i] === '--since') sinceSeq = parseUnsigned(rest[++i] ?? '', '--since', 'DM_INVALID_ARGUMENT');
    else throw new DmError('DM_INVALID_ARGUMENT', `log: unknown option '${rest[i]}'`);
  }
  const print = (e: Parameters<typeof formatLoggedEvent>[0]): void => {
    process.stdout.write((json ? JSON.stringify(e) : formatLoggedEvent(e)) + '\n');
  };
  const paths = poolPaths(pool);
  let client: ControlClient | undefined;
  try {
    client = await ControlClient.connect(paths.controlSocket, paths.dir);
  } catch (err) {
    if (follow) throw err;
  }
  if (client) {
    const c = client;
    const done = c.stream({ op: 'log', sinceSeq, follow }, (r) => {
      if (r.op === 'event') print(r.event);
      return r.op === 'end';
    });
    if (follow) {
      await Promise.race([done, untilSignal()]);
    } else await done;
    c.close();
    return 0;
  }
  // No daemon: read the pool's database directly.
  const db = await openPoolDb(paths, { create: false });
  try {
    const eventLog = await EventLog.open(db, createSystemClock());
    for await (const e of eventLog.read({ sinceSeq })) print(e);
  } finally {
    await db.close();
  }
  return 0;
}
