/** `zero`: reads return zeroes, writes and discards are dropped (Linux dm-zero). */
import { MAP_DONE, type Bio } from '../core/bio.js';
import type { TargetType } from '../core/target-contract.js';
import type { Sector } from '../block/units.js';

export const zeroTarget: TargetType<null> = Object.freeze({
  name: 'zero',
  version: [1, 1, 0] as const,
  argCountMin: 0,
  argCountMax: 0,
  ctr: async () => null,
  map(_inst: null, bio: Bio) {
    if (bio.op === 'read') bio.buf.fill(0);
    return MAP_DONE;
  },
  blockStatus: async (_inst: null, offsetSectors: Sector, lengthSectors: Sector) => [{ startSector: offsetSectors, lengthSectors, hole: true }],
  status: () => '',
  table: () => '',
});
