/**
 * `dmstate merge NAME`: merges snapshot NAME back into its origin the way `lvconvert --merge` does — the origin's
 * table becomes snapshot-merge (taking over the snapshot's state), the snapshot device goes away, the merge runs
 * with a progress bar (chunks, chunks/s, ETA), and the origin gets its plain snapshot-origin table back at the end.
 * `dmstate merge ORIGIN` on an origin that is already merging (e.g. after Ctrl-C or a daemon restart) watches it
 * and finishes the switch. Ctrl-C stops only the watching: the merge goes on in the daemon.
 */
import { DmError } from '../../core/errors.js';
import type { ControlClient } from '../control-client.js';
import { parseDmsetupArgs } from '../dmsetup/command.js';

/** Polling period of the merge status. */
const MERGE_POLL_MS = 200;

async function dmsetup(client: ControlClient, argv: string[], cwd: string): Promise<string> {
  const command = parseDmsetupArgs(argv);
  command.cwd = cwd;
  const r = await client.request({ op: 'dmsetup', command });
  if (r.op !== 'dmsetup') throw new DmError('DM_NO_DAEMON', `unexpected answer from the daemon: ${r.op}`);
  if (r.result.exitCode !== 0) {
    throw new DmError((r.result.errorCode as never) ?? 'DM_INVALID_ARGUMENT', `dmsetup ${argv.join(' ')}: ${r.result.stderr.split('\n')[0]}`);
  }
  return r.result.stdout;
}

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

function formatDuration(seconds: number): string {
  if (!Number.isFinite(seconds)) return '--:--';
  const s = Math.round(seconds);
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const r = s % 60;
  return h > 0 ? `${h}:${String(m).padStart(2, '0')}:${String(r).padStart(2, '0')}` : `${m}:${String(r).padStart(2, '0')}`;
}

export function formatMergeProgress(merged: number, total: number, chunksPerSecond: number, width = 30): string {
  const frac = total === 0 ? 1 : Math.min(1, merged / total);
  const filled = Math.round(frac * width);
  const eta = chunksPerSecond > 0 ? (total - merged) / chunksPerSecond : Infinity;
  return `[${'#'.repeat(filled)}${'.'.repeat(width - filled)}] ${(frac * 100).toFixed(1).padStart(5)}%  ${merged}/${total} chunks  ${Math.round(chunksPerSecond)} chunks/s  ETA ${formatDuration(eta)}`;
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
    const names = (await dmsetup(client, ['ls'], cwd)).split('\n').filter((l) => l.includes('\t')).map((l) => l.split('\t')[0]);
    let found: { name: string; line: TableLine } | undefined;
    for (const n of names) {
      const lines = parseLines(await dmsetup(client, ['table', n], cwd));
      if (lines.length === 1 && lines[0].target === 'snapshot-origin' && lines[0].args[0] === originDev) found = { name: n, line: lines[0] };
    }
    if (!found) throw new DmError('DM_NO_SUCH_DEVICE', `${name}: no snapshot-origin device over ${originDev} found`);
    originName = found.name;
    originTable = found.line;
    out.write(`merging snapshot ${name} into ${originName} (origin ${originDev}, COW ${cowDev}, chunk ${chunk} sectors)\n`);
    await dmsetup(client, ['suspend', originName], cwd);
    try {
      await dmsetup(client, ['load', originName, '--table', `${originTable.start} ${originTable.length} snapshot-merge ${originDev} ${cowDev} ${mode} ${chunk}`], cwd);
      await dmsetup(client, ['remove', name], cwd);
    } catch (err) {
      await dmsetup(client, ['clear', originName], cwd).catch(() => undefined);
      await dmsetup(client, ['resume', originName], cwd);
      throw err;
    }
    await dmsetup(client, ['resume', originName], cwd);
  } else if (t.target === 'snapshot-merge') {
    originName = name;
    originTable = { ...t, target: 'snapshot-origin', args: [t.args[0]] };
    out.write(`watching the merge running on ${originName}\n`);
  } else {
    throw new DmError('DM_INVALID_ARGUMENT', `${name}: not a snapshot (its table is ${t.target})`);
  }

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
  // Done: back to a plain origin.
  await dmsetup(client, ['suspend', originName], cwd);
  await dmsetup(client, ['load', originName, '--table', `${originTable.start} ${originTable.length} snapshot-origin ${originTable.args[0]}`], cwd);
  await dmsetup(client, ['resume', originName], cwd);
  out.write(`merge done: ${st.chunksMerged} chunks in ${formatDuration(elapsedS)}; ${originName} is a snapshot-origin again\n`);
  return 0;
}
