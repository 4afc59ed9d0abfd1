/** The core log: the shared dirty-log suite (in memory only), then what is specific to it. */
import { describe, expect, test } from 'vitest';
import { sectors } from '../../src/block/units.js';
import { SimulatedClock } from '../../src/core/clock.js';
import { coreLog } from '../../src/dirty-logs/core-log.js';
import { dirtyLogSuite } from '../../src/testing/conformance/dirty-log.js';

describe('core log conformance', () => {
  dirtyLogSuite({ test, expect, name: 'core', type: coreLog, persistent: false, validArgs: ['1024'], factory: async (base) => base });
});

describe('core log', () => {
  const open = (initialSync: 'resync' | 'sync' | 'nosync', lengthSectors = 32768, regionSizeSectors = 1024) =>
    coreLog.create({ targetSizeSectors: sectors(lengthSectors), regionSizeSectors: sectors(regionSizeSectors), initialSync, clock: new SimulatedClock() });

  test('parses the kernel table arguments and prints them back as the kernel does', async () => {
    expect(coreLog.parseArgs(['1024'])).toMatchObject({ regionSizeSectors: 1024, initialSync: 'resync' });
    expect(coreLog.parseArgs(['1024', 'nosync'])).toMatchObject({ initialSync: 'nosync' });
    expect(coreLog.parseArgs(['1024', 'sync'])).toMatchObject({ initialSync: 'sync' });
    expect(() => coreLog.parseArgs(['1024', 'bogus'])).toThrow(expect.objectContaining({ code: 'DM_TABLE_INVALID' }));
    expect(() => coreLog.parseArgs(['x'])).toThrow(expect.objectContaining({ code: 'DM_TABLE_INVALID' }));
    expect(coreLog.table(await open('resync'))).toBe('core 1 1024');
    expect(coreLog.table(await open('nosync'))).toBe('core 2 1024 nosync');
    expect(coreLog.table(await open('sync'))).toBe('core 2 1024 sync');
    expect(coreLog.status(await open('sync'))).toBe('1 core');
  });

  test('region count rounds up (a 32000-sector target has 32 regions of 1024)', async () => {
    expect(coreLog.regionCount(await open('nosync', 32000))).toBe(32);
    expect(coreLog.syncCount(await open('nosync', 32000))).toBe(32);
  });

  test('region sizes the kernel refuses are refused', async () => {
    for (const size of [1, 1000, 65536]) await expect(open('nosync', 32768, size)).rejects.toMatchObject({ code: 'DM_TABLE_INVALID' });
    await expect(open('nosync', 32768, 32768)).resolves.toBeDefined();
  });

  test('marks and clears out of range are refused', async () => {
    const log = await open('nosync');
    expect(() => coreLog.markRegion(log, 32)).toThrow(expect.objectContaining({ code: 'DM_INVALID_ARGUMENT' }));
    expect(() => coreLog.clearRegion(log, -1)).toThrow(expect.objectContaining({ code: 'DM_INVALID_ARGUMENT' }));
  });
});
