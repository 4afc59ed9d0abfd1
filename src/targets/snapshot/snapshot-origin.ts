/**
 * `snapshot-origin <origin>`: the origin device as it is now; every write first copies out the chunks it
 * overwrites to each snapshot that lacks them (Linux origin_target).
 */
import type { Sector } from '../../block/units.js';
import { MAP_HELD, MAP_REMAPPED, type Bio } from '../../core/bio.js';
import { DmError } from '../../core/errors.js';
import type { DeviceRef, TargetContext, TargetType } from '../../core/target-contract.js';
import type { KcopydClient } from '../../kcopyd/kcopyd.js';
import type { OriginRegistry } from './origin-registry.js';
import { originWrite } from './origin-write.js';
import { originRegistry, snapshotKcopyd } from './shared.js';

interface OriginInstance {
  readonly origin: DeviceRef;
  readonly ctx: TargetContext;
  readonly registry: OriginRegistry;
  readonly kcopyd: KcopydClient;
}

/** The write path of an origin: copy-outs first, then the write itself. Shared with snapshot-merge. */
export function mapOriginWrite(inst: { origin: DeviceRef; registry: OriginRegistry; kcopyd: KcopydClient }, ctx: TargetContext, bio: Bio, originSector: number): 0 | 1 {
  const held = { bio, ctx };
  for (const s of inst.registry.snapshots(inst.origin.device)) if (s.throttle(held)) return MAP_HELD;
  if (originWrite(inst.registry, inst.kcopyd, inst.origin.device, originSector, held)) return MAP_HELD;
  bio.remapDevice = inst.origin.device;
  bio.remapSector = originSector as Sector;
  return MAP_REMAPPED;
}

export const snapshotOriginTarget: TargetType<OriginInstance> = Object.freeze({
  name: 'snapshot-origin',
  version: [1, 9, 0] as const,
  argCountMin: 1,
  argCountMax: 1,
  async ctr(args: readonly string[], ctx: TargetContext) {
    const origin = await ctx.openDevice(args[0]);
    if (ctx.lengthSectors > origin.device.sizeSectors) {
      throw new DmError('DM_TABLE_INVALID', `snapshot-origin: ${origin.label} too small for target: len=${ctx.lengthSectors}, dev_size=${origin.device.sizeSectors}`);
    }
    const registry = originRegistry(ctx);
    registry.registerOriginTarget(origin.device, ctx);
    return { origin, ctx, registry, kcopyd: snapshotKcopyd(ctx) };
  },
  async dtr(inst: OriginInstance) {
    inst.registry.unregisterOriginTarget(inst.origin.device, inst.ctx);
  },
  map(inst: OriginInstance, bio: Bio, ctx: TargetContext) {
    const originSector = bio.sector - ctx.beginSector;
    if (bio.op === 'read' || bio.op === 'flush') {
      bio.remapDevice = inst.origin.device;
      bio.remapSector = originSector as Sector;
      return MAP_REMAPPED;
    }
    return mapOriginWrite(inst, ctx, bio, originSector);
  },
  async blockStatus(inst: OriginInstance, offsetSectors: Sector, lengthSectors: Sector) {
    return inst.origin.device.blockStatus(offsetSectors, lengthSectors);
  },
  status: () => '',
  table: (inst: OriginInstance) => inst.origin.label,
});
