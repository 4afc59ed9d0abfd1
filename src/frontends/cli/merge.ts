/**
 * `dmstate merge NAME`: merges snapshot NAME back into its origin the way `lvconvert --merge` does: the origin's
 * table becomes snapshot-merge (taking over the snapshot's state), the snapshot device goes away, the merge runs
 * with a progress bar (chunks, chunks/s, ETA), and when it is done the origin gets the table lvconvert leaves: a
 * plain linear mapping of the origin when no other snapshot of it is left, snapshot-origin when one is
 * (LVM's vg_remove_snapshot drops the origin layer with the last snapshot).
 * `dmstate merge ORIGIN` on an origin that is already merging (e.g. after Ctrl-C or a daemon restart) watches it
 * and finishes the switch. Ctrl-C stops only the watching: the merge goes on in the daemon.
 */
import { DmError } from '../../core/errors.js';
import type { ControlClient } from '../control-client.js';
import { dmsetupRunner } from './dmsetup-runner.js';
import { formatDuration, formatProgress } from './progress.js';

/** Polling period of the merge status. */
const MERGE_POLL_MS = 200;

/** One dmsetup command in the daemon (dmsetup-runner.ts). */
const dmsetup = (client: ControlClient, argv: readonly string[], cwd: string): Promise<string> => dmsetupRunner(client, cwd)(argv);

interface TableLine {
  start: string;
  length: string;
  target: string;
  args: string[];
}

function parseLines(text: string): TableLine[] {
  return text
    .split('\n')
    .filter((l) => l.trim() !== '')
    .map((l) => {
      const w = l.trim().split(/\s+/);
      return { start: w[0], length: w[1], target: w[2], args: w.slice(3) };
    });
}

interface MergeStatus {
  state: string;
  chunksLeft: number;
  chunksMerged: number;
  chunksTotal: number;
  reason?: string;
}

function parseMergeStatus(text: string): MergeStatus {
  const get = (k: string): string | undefined => new RegExp(`${k}=("[^"]*"|\\S+)`).exec(text)?.[1];
  const reason = get('reason');
  return {
    state: get('state') ?? 'UNKNOWN',
    chunksLeft: Number(get('chunks_left') ?? 0),
    chunksMerged: Number(get('chunks_merged') ?? 0),
    chunksTotal: Number(get('chunks_total') ?? 0),
    reason: reason ? (JSON.parse(reason) as string) : undefined,
  };
}

export function formatMergeProgress(merged: number, total: number, chunksPerSecond: number, width = 30): string {
  return formatProgress(merged, total, 'chunks', chunksPerSecond, width);
}

/** A dmsetup command line (the arguments after `dmsetup`). */
export type DmsetupArgv = readonly string[];

/**
 * The table switch that starts a merge, in LVM's order (lvconvert --merge). The kernel hands the snapshot's
 * exceptions over to the snapshot-merge table when the ORIGIN resumes, and only while the snapshot's table still
 * exists: a snapshot removed before that cancels the handover ("Cancelling snapshot handover") and the merge table
 * stays Invalid, merging nothing. So the snapshot goes away last.
 */
export interface MergeSwitch {
  /** Suspend the origin: nothing to undo when it fails. */
  readonly prepare: readonly DmsetupArgv[];
  /** Suspend the snapshot, load snapshot-merge on the origin, resume the origin (the handover). */
  readonly handover: readonly DmsetupArgv[];
  /** Remove the snapshot device, Invalid since the handover. */
  readonly cleanup: readonly DmsetupArgv[];
}

export function mergeSwitch(snapshot: string, origin: string, mergeTable: string): MergeSwitch {
  return {
    prepare: [['suspend', origin]],
    handover: [['suspend', snapshot], ['load', origin, '--table', mergeTable], ['resume', origin]],
    cleanup: [['remove', snapshot]],
  };
}

/** The switch's commands in the order they run. */
export const mergeSwitchCommands = (m: MergeSwitch): DmsetupArgv[] => [...m.prepare, ...m.handover, ...m.cleanup];

/**
 * The origin's table once merged (one line: start, length, origin device): what lvconvert leaves. With no other
 * snapshot of the origin, LVM drops the origin layer (lv_is_origin() is false once origin_count is 0) and the LV is
 * a linear mapping again; with other snapshots, snapshot-origin.
 */
export function mergedOriginTable(start: string, length: string, originDev: string, otherSnapshots: boolean): string {
  return otherSnapshots ? `${start} ${length} snapshot-origin ${originDev}` : `${start} ${length} linear ${originDev} 0`;
}

/** The switch back from the finished snapshot-merge table. */
export function mergeFinishCommands(origin: string, table: string): DmsetupArgv[] {
  return [['suspend', origin], ['load', origin, '--table', table], ['resume', origin]];
}

/** Every device's live table. */
async function allTables(client: ControlClient, cwd: string): Promise<Map<string, TableLine[]>> {
  const names = (await dmsetup(client, ['ls'], cwd)).split('\n').filter((l) => l.includes('\t')).map((l) => l.split('\t')[0]);
  const out = new Map<string, TableLine[]>();
  for (const n of names) out.set(n, parseLines(await dmsetup(client, ['table', n], cwd)));
  return out;
}

/**
 * Runs the switch that starts the merge; a failed handover step is undone (both devices back as they were): the
 * origin's own table is loaded again and resumed, then the snapshot resumed. Loading it (not just clearing the
 * inactive slot) also covers a refused resume, which (as in Linux's do_resume) has swapped the snapshot-merge table
 * in already, live but not resumed.
 */
async function startMerge(
  client: ControlClient,
  cwd: string,
  m: MergeSwitch,
  snapshot: string,
  origin: string,
  originTableBefore: string,
  out: NodeJS.WritableStream,
): Promise<void> {
  for (const c of m.prepare) await dmsetup(client, c, cwd);
  try {
    for (const c of m.handover) await dmsetup(client, c, cwd);
  } catch (err) {
    await dmsetup(client, ['load', origin, '--table', originTableBefore], cwd).catch(() => undefined);
    await dmsetup(client, ['resume', origin], cwd).catch(() => undefined);
    await dmsetup(client, ['resume', snapshot], cwd).catch(() => undefined);
    throw err;
  }
  for (const c of m.cleanup) {
    // The merge runs already: a snapshot device left behind is harmless (Invalid, refuses I/O); say so and go on.
    await dmsetup(client, c, cwd).catch((err: unknown) => {
      out.write(`warning: ${(err as Error).message}; the merge goes on (remove ${snapshot} later: it is Invalid)\n`);
    });
  }
}

export async function runMerge(client: ControlClient, name: string, cwd: string, out: NodeJS.WriteStream, nowMs: () => number): Promise<number> {
  const table = parseLines(await dmsetup(client, ['table', name], cwd));
  if (table.length !== 1) throw new DmError('DM_INVALID_ARGUMENT', `${name}: expected a one-line snapshot or snapshot-merge table`);
  let originName: string;
  let originTable: TableLine;
  const t = table[0];
  if (t.target === 'snapshot') {
    const [originDev, cowDev, mode, chunk] = t.args;
    if (mode.toUpperCase() === 'N') throw new DmError('DM_INVALID_ARGUMENT', `${name}: a transient (N) snapshot cannot be merged`);
    const info = await dmsetup(client, ['info', '-c', '--noheadings', name], cwd);
    const openCount = Number(info.split(':')[4]);
    if (openCount > 0) throw new DmError('DM_DEVICE_BUSY', `${name}: the snapshot is in use (open count ${openCount}); close its users first`);
    // Find the device whose table is the snapshot's origin.
    let found: { name: string; line: TableLine } | undefined;
    for (const [n, lines] of await allTables(client, cwd)) {
      if (lines.length === 1 && lines[0].target === 'snapshot-origin' && lines[0].args[0] === originDev) found = { name: n, line: lines[0] };
    }
    if (!found) throw new DmError('DM_NO_SUCH_DEVICE', `${name}: no snapshot-origin device over ${originDev} found`);
    originName = found.name;
    originTable = found.line;
    out.write(`merging snapshot ${name} into ${originName} (origin ${originDev}, COW ${cowDev}, chunk ${chunk} sectors)\n`);
    const mergeTable = `${originTable.start} ${originTable.length} snapshot-merge ${originDev} ${cowDev} ${mode} ${chunk}`;
    const originTableBefore = `${originTable.start} ${originTable.length} ${originTable.target} ${originTable.args.join(' ')}`;
    await startMerge(client, cwd, mergeSwitch(name, originName, mergeTable), name, originName, originTableBefore, out);
  } else if (t.target === 'snapshot-merge') {
    originName = name;
    originTable = t;
    out.write(`watching the merge running on ${originName}\n`);
  } else {
    throw new DmError('DM_INVALID_ARGUMENT', `${name}: not a snapshot (its table is ${t.target})`);
  }
  const originDev = originTable.args[0];

  // Watch.
  const first = parseMergeStatus(await dmsetup(client, ['message', originName, '0', 'merge-status'], cwd));
  // Progress counts chunks that left the COW (a run being committed counts as soon as it is cleared).
  const total = Math.max(first.chunksTotal, first.chunksLeft);
  const startMs = nowMs();
  const startMerged = total - first.chunksLeft;
  let st = first;
  let lastPrintMs = 0;
  const tty = out.isTTY === true;
  while (st.state !== 'DONE' && st.state !== 'FAILED' && st.state !== 'STOPPED') {
    await new Promise((r) => setTimeout(r, MERGE_POLL_MS));
    st = parseMergeStatus(await dmsetup(client, ['message', originName, '0', 'merge-status'], cwd));
    const elapsedS = (nowMs() - startMs) / 1000;
    const rate = elapsedS > 0 ? (total - st.chunksLeft - startMerged) / elapsedS : 0;
    if (tty) out.write(`\r${formatMergeProgress(total - st.chunksLeft, total, rate)}`);
    else if (nowMs() - lastPrintMs >= 1000) {
      out.write(`${formatMergeProgress(total - st.chunksLeft, total, rate)}\n`);
      lastPrintMs = nowMs();
    }
  }
  const elapsedS = (nowMs() - startMs) / 1000;
  out.write(`${tty ? '\r' : ''}${formatMergeProgress(total - st.chunksLeft, total, elapsedS > 0 ? (total - st.chunksLeft - startMerged) / elapsedS : 0)}\n`);
  if (st.state === 'FAILED') {
    out.write(`merge failed: ${st.reason ?? 'unknown reason'}; ${originName} keeps its snapshot-merge table (I/O goes on)\n`);
    return 1;
  }
  if (st.state === 'STOPPED') {
    out.write(`merge stopped (device suspended); run dmstate merge ${originName} after resuming it\n`);
    return 1;
  }
  // Done: the table lvconvert leaves (looked up now: snapshots may have come or gone during the merge).
  const others = [...(await allTables(client, cwd))]
    .filter(([n, lines]) => n !== name && lines.some((l) => l.target === 'snapshot' && l.args[0] === originDev))
    .map(([n]) => n);
  const finalTable = mergedOriginTable(originTable.start, originTable.length, originDev, others.length > 0);
  for (const c of mergeFinishCommands(originName, finalTable)) await dmsetup(client, c, cwd);
  const what = others.length > 0 ? `a snapshot-origin again (snapshots left: ${others.join(', ')})` : `a linear mapping of ${originDev} again (no snapshot of it left)`;
  out.write(`merge done: ${st.chunksMerged} chunks in ${formatDuration(elapsedS)}; ${originName} is ${what}\n`);
  return 0;
}
