/**
 * The mirror's read path (Linux mirror_map for reads, read_callback / mirror_end_io): a read of a region in sync
 * goes to any leg without errors, in turn (balanced); a region out of sync is read from the default leg only.
 * A failed read marks its leg (R: no more reads from it) and is tried again on the next leg while the default leg
 * is fine or the region is in sync and a leg is left; EIO only when none is. The target does the read itself (the
 * bio is held) so that it can retry.
 */
import type { Sector } from '../../block/units.js';
import { MAP_HELD, MAP_KILL, type Bio } from '../../core/bio.js';
import type { TargetContext } from '../../core/target-contract.js';
import type { MirrorLeg } from './leg.js';
import type { MirrorSet } from './mirror-set.js';

export function mapRead(ms: MirrorSet, bio: Bio, ctx: TargetContext): typeof MAP_HELD | typeof MAP_KILL {
  const offset = bio.sector - ctx.beginSector;
  const region = ms.regionOf(offset);
  const leg = ms.chooseReadLeg(region);
  if (leg === undefined) return MAP_KILL;
  readFrom(ms, bio, ctx, offset, region, leg);
  return MAP_HELD;
}

function readFrom(ms: MirrorSet, bio: Bio, ctx: TargetContext, offset: number, region: number, leg: MirrorLeg): void {
  leg.device.read((leg.offsetSectors + offset) as Sector, bio.buf).then(
    () => ctx.endBio(bio),
    (err: unknown) => {
      void ms.failLeg(leg, 'read');
      const next = ms.mayRetryRead(region) ? ms.chooseReadLeg(region) : undefined;
      if (next === undefined) ctx.endBio(bio, err);
      else readFrom(ms, bio, ctx, offset, region, next);
    },
  );
}
