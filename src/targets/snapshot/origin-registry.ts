/**
 * Which snapshots watch which origin device (Linux's _origins hash), per engine. Snapshots register at ctr and
 * leave at dtr; origin targets register too, so that their bio split size (the smallest chunk size of the
 * origin's snapshots) follows snapshots as they come and go — the kernel only updates it on the origin's resume.
 */
import type { BlockDevice } from '../../block/contract.js';
import type { TargetContext } from '../../core/target-contract.js';
import type { SnapshotState } from './snapshot-state.js';

interface OriginEntry {
  /** Largest chunk size first (the kernel's order). */
  snapshots: SnapshotState[];
  /** Contexts of snapshot-origin (and snapshot-merge) targets over this device, to update their split size. */
  originTargets: Set<TargetContext>;
}

export const ORIGIN_REGISTRY_KEY = 'dm-snapshot:origins';

export class OriginRegistry {
  private readonly origins = new Map<BlockDevice, OriginEntry>();

  private entry(origin: BlockDevice): OriginEntry {
    let e = this.origins.get(origin);
    if (!e) this.origins.set(origin, (e = { snapshots: [], originTargets: new Set() }));
    return e;
  }

  private forget(origin: BlockDevice): void {
    const e = this.origins.get(origin);
    if (e && e.snapshots.length === 0 && e.originTargets.size === 0) this.origins.delete(origin);
  }

  /** Snapshots of `origin` (possibly empty); the array is not to be modified. */
  snapshots(origin: BlockDevice): readonly SnapshotState[] {
    return this.origins.get(origin)?.snapshots ?? EMPTY;
  }

  registerSnapshot(s: SnapshotState): void {
    const e = this.entry(s.origin.device);
    e.snapshots.push(s);
    e.snapshots.sort((a, b) => b.chunkSizeSectors - a.chunkSizeSectors);
    this.updateSplit(s.origin.device);
  }

  unregisterSnapshot(s: SnapshotState): void {
    const e = this.origins.get(s.origin.device);
    if (!e) return;
    e.snapshots = e.snapshots.filter((x) => x !== s);
    this.updateSplit(s.origin.device);
    this.forget(s.origin.device);
  }

  registerOriginTarget(origin: BlockDevice, ctx: TargetContext): void {
    this.entry(origin).originTargets.add(ctx);
    ctx.setMaxIoSectors(this.minimumChunkSizeSectors(origin));
  }

  unregisterOriginTarget(origin: BlockDevice, ctx: TargetContext): void {
    this.origins.get(origin)?.originTargets.delete(ctx);
    this.forget(origin);
  }

  /** The smallest chunk size of the origin's snapshots, 0 when it has none. */
  minimumChunkSizeSectors(origin: BlockDevice): number {
    const snaps = this.origins.get(origin)?.snapshots ?? EMPTY;
    return snaps.length === 0 ? 0 : snaps[snaps.length - 1].chunkSizeSectors;
  }

  private updateSplit(origin: BlockDevice): void {
    const e = this.origins.get(origin);
    if (!e) return;
    const m = this.minimumChunkSizeSectors(origin);
    for (const ctx of e.originTargets) ctx.setMaxIoSectors(m);
  }
}

const EMPTY: readonly SnapshotState[] = [];
