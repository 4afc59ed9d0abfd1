/**
 * `core <#args> <region_size> [sync|nosync]`: dm-log's core log, kept in memory only. A fresh core log knows
 * nothing about the legs, so unless the table says `nosync` every region starts out of sync and is resynced
 * (the kernel's behaviour on every activation). flush() has nothing to write.
 */
import type { DirtyLogOptions, DirtyLogType } from './contract.js';
import { DmLogState, dmLogParseRegionArgs, dmLogSyncSuffix } from './dm-log-state.js';

const RESOLVED: Promise<void> = Promise.resolve();

export class CoreLog {
  closed = false;
  constructor(readonly state: DmLogState) {}
}

export const coreLog: DirtyLogType<CoreLog> = Object.freeze({
  name: 'core',
  parseArgs(args: readonly string[]) {
    return { ...dmLogParseRegionArgs('core', args), extra: {} };
  },
  async create(options: DirtyLogOptions) {
    return new CoreLog(new DmLogState('core', options.regionSizeSectors, options.initialSync, options));
  },
  regionCount: (log: CoreLog) => log.state.regionCount,
  isClean: (log: CoreLog, region: number) => log.state.isClean(region),
  inSync: (log: CoreLog, region: number) => log.state.inSync(region),
  markRegion(log: CoreLog, region: number) {
    log.state.checkRegion(region);
    log.state.mark(region);
  },
  clearRegion(log: CoreLog, region: number) {
    log.state.checkRegion(region);
    log.state.clear(region);
  },
  flush(log: CoreLog) {
    log.state.touchedDirtied = false;
    log.state.touchedCleaned = false;
    return RESOLVED;
  },
  getResyncWork: (log: CoreLog) => log.state.getResyncWork(),
  setRegionSync(log: CoreLog, region: number, inSync: boolean) {
    log.state.checkRegion(region);
    log.state.setRegionSync(region, inSync);
  },
  syncCount: (log: CoreLog) => log.state.syncCount,
  setDegraded(log: CoreLog, degraded: boolean) {
    log.state.degraded = degraded;
  },
  status: () => '1 core',
  table: (log: CoreLog) => `core ${log.state.sync === 'resync' ? 1 : 2} ${log.state.regionSizeSectors}${dmLogSyncSuffix(log.state.sync)}`,
  async close(log: CoreLog) {
    log.closed = true;
  },
});
