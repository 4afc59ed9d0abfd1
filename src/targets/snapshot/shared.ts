/** Per-engine objects the snapshot targets share: the origin registry, the kcopyd client, the COW states. */
import type { BlockDevice } from '../../block/contract.js';
import type { TargetContext } from '../../core/target-contract.js';
import { KcopydClient } from '../../kcopyd/kcopyd.js';
import { OriginRegistry, ORIGIN_REGISTRY_KEY } from './origin-registry.js';
import type { SnapshotState } from './snapshot-state.js';

export const originRegistry = (ctx: TargetContext): OriginRegistry => ctx.shared(ORIGIN_REGISTRY_KEY, () => new OriginRegistry());

export const snapshotKcopyd = (ctx: TargetContext): KcopydClient =>
  ctx.shared('dm-snapshot:kcopyd', () => new KcopydClient({ log: ctx.log, name: 'dm-snapshot' }));

/** Snapshot states by COW device: a reloaded snapshot table finds its state here (handover). */
export const snapshotStates = (ctx: TargetContext): Map<BlockDevice, SnapshotState> =>
  ctx.shared('dm-snapshot:states', () => new Map<BlockDevice, SnapshotState>());
