/**
 * `dmstate resync [--pool DIR] NAME [--readd LEG] [--throttle PERCENT]`: watches a mirror's resync with a progress
 * bar (regions in sync, regions/s, ETA) until every region is in sync. `--readd LEG` first re-adds a failed leg
 * (index or device as the table shows it), which starts the copy of the regions it missed; `--throttle` sets the
 * percentage of time the resync may copy. Ctrl-C stops only the watching: the resync goes on in the daemon.
 * Exit code 0 once in sync; 1 when the resync waits for a failed leg (DEGRADED) or the device is suspended.
 */
import { DmError } from '../../core/errors.js';
import type { DmsetupRunner } from './dmsetup-runner.js';
import { formatProgress } from './progress.js';

/** Polling period of the resync status. */
const RESYNC_POLL_MS = 200;

export interface ResyncStatus {
  readonly state: string;
  readonly regionsInSync: number;
  readonly regionsTotal: number;
  readonly health: string;
}

export function parseResyncStatus(text: string): ResyncStatus {
  const get = (k: string): string | undefined => new RegExp(`(?:^|\\s)${k}=(\\S+)`).exec(text)?.[1];
  const state = get('state');
  const inSync = get('regions_in_sync');
  const total = get('regions_total');
  if (state === undefined || inSync === undefined || total === undefined) {
    throw new DmError('DM_INVALID_ARGUMENT', `not a mirror resync status: ${text.trim()}`);
  }
  return { state, regionsInSync: Number(inSync), regionsTotal: Number(total), health: get('health') ?? '' };
}

/** `[#####.....]  42.0%  420/1000 regions  85 regions/s  ETA 0:07` */
export function formatResyncProgress(inSync: number, total: number, regionsPerSecond: number, width = 30): string {
  return formatProgress(inSync, total, 'regions', regionsPerSecond, width);
}

export interface ResyncWatchOptions {
  readonly readdLeg?: string;
  readonly throttlePercent?: string;
  /** Time source (ms) for rates and pacing; `wait` sleeps between polls. */
  readonly nowMs: () => number;
  readonly wait: (ms: number) => Promise<void>;
}

export async function runResync(dmsetup: DmsetupRunner, name: string, out: NodeJS.WritableStream & { isTTY?: boolean }, options: ResyncWatchOptions): Promise<number> {
  const table = (await dmsetup(['table', name])).split('\n').filter((l) => l.trim() !== '');
  if (table.length !== 1 || table[0].split(/\s+/)[2] !== 'mirror') {
    throw new DmError('DM_INVALID_ARGUMENT', `${name}: not a one-line mirror table`);
  }
  if (options.throttlePercent !== undefined) await dmsetup(['message', name, '0', 'resync-throttle', options.throttlePercent]);
  if (options.readdLeg !== undefined) {
    await dmsetup(['message', name, '0', 'readd', options.readdLeg]);
    out.write(`re-added leg ${options.readdLeg} of ${name}\n`);
  }
  const status = async (): Promise<ResyncStatus> => parseResyncStatus(await dmsetup(['message', name, '0', 'resync-status']));
  const tty = out.isTTY === true;
  let st = await status();
  const startMs = options.nowMs();
  const startInSync = st.regionsInSync;
  let lastPrintMs = -Infinity;
  const line = (): string => {
    const elapsedS = (options.nowMs() - startMs) / 1000;
    return formatResyncProgress(st.regionsInSync, st.regionsTotal, elapsedS > 0 ? (st.regionsInSync - startInSync) / elapsedS : 0);
  };
  while (st.state !== 'IN_SYNC' && st.state !== 'DEGRADED' && st.state !== 'STOPPED') {
    if (tty) out.write(`\r${line()}`);
    else if (options.nowMs() - lastPrintMs >= 1000) {
      out.write(`${line()}\n`);
      lastPrintMs = options.nowMs();
    }
    await options.wait(RESYNC_POLL_MS);
    st = await status();
  }
  out.write(`${tty ? '\r' : ''}${line()}\n`);
  if (st.state === 'DEGRADED') {
    out.write(`${name}: a leg has failed (health ${st.health}); the resync waits until it is re-added (dmstate resync ${name} --readd LEG)\n`);
    return 1;
  }
  if (st.state === 'STOPPED') {
    out.write(`${name}: the resync is stopped (device suspended); resume it and watch again\n`);
    return 1;
  }
  out.write(`${name}: in sync (${st.regionsInSync}/${st.regionsTotal} regions, health ${st.health})\n`);
  return 0;
}
