/** `linear <device> <offset_sectors>`: maps the range onto a device at an offset (Linux dm-linear). */
import type { BlockDevice } from '../block/contract.js';
import { sectors, type Sector } from '../block/units.js';
import { MAP_REMAPPED, type Bio } from '../core/bio.js';
import { DmError } from '../core/errors.js';
import { parseUnsigned } from '../core/parse-number.js';
import type { TargetContext, TargetType } from '../core/target-contract.js';

interface LinearInstance {
  readonly device: BlockDevice;
  readonly label: string;
  readonly offsetSectors: Sector;
  /** offsetSectors - beginSector: added to a bio's device-relative sector. */
  readonly deltaSectors: number;
}

export const linearTarget: TargetType<LinearInstance> = Object.freeze({
  name: 'linear',
  version: [1, 4, 0] as const,
  argCountMin: 2,
  argCountMax: 2,
  async ctr(args: readonly string[], ctx: TargetContext) {
    const offsetSectors = sectors(parseUnsigned(args[1], 'linear: Invalid device sector'));
    const ref = await ctx.openDevice(args[0]);
    if (offsetSectors + ctx.lengthSectors > ref.device.sizeSectors) {
      throw new DmError(
        'DM_TABLE_INVALID',
        `linear: ${ref.label} too small for target: start=${offsetSectors}, len=${ctx.lengthSectors}, dev_size=${ref.device.sizeSectors}`,
      );
    }
    return { device: ref.device, label: ref.label, offsetSectors, deltaSectors: offsetSectors - ctx.beginSector };
  },
  map(inst: LinearInstance, bio: Bio) {
    bio.remapDevice = inst.device;
    bio.remapSector = (bio.sector + inst.deltaSectors) as Sector;
    return MAP_REMAPPED;
  },
  async blockStatus(inst: LinearInstance, offsetSectors: Sector, lengthSectors: Sector) {
    const below = await inst.device.blockStatus((inst.offsetSectors + offsetSectors) as Sector, lengthSectors);
    return below.map((e) => ({ ...e, startSector: (e.startSector - inst.offsetSectors) as Sector }));
  },
  status: () => '',
  table: (inst: LinearInstance) => `${inst.label} ${inst.offsetSectors}`,
});
