/** Target types by name (Linux dm_register_target). */
import type { AnyTargetType } from './target-contract.js';
import { linearTarget } from '../targets/linear.js';
import { errorTarget } from '../targets/error.js';
import { zeroTarget } from '../targets/zero.js';
import { snapshotTarget } from '../targets/snapshot/snapshot.js';
import { snapshotOriginTarget } from '../targets/snapshot/snapshot-origin.js';
import { snapshotMergeTarget } from '../targets/snapshot/snapshot-merge.js';
import { mirrorTarget } from '../targets/mirror/mirror.js';
import { logWritesTarget } from '../targets/log-writes/log-writes.js';

export class TargetRegistry {
  private readonly types = new Map<string, AnyTargetType>();

  register(type: AnyTargetType): void {
    this.types.set(type.name, type);
  }

  get(name: string): AnyTargetType | undefined {
    return this.types.get(name);
  }

  list(): AnyTargetType[] {
    return [...this.types.values()];
  }
}

export function createDefaultTargetRegistry(): TargetRegistry {
  const r = new TargetRegistry();
  for (const t of [linearTarget, errorTarget, zeroTarget, snapshotOriginTarget, snapshotTarget, snapshotMergeTarget, logWritesTarget, mirrorTarget]) r.register(t);
  return r;
}
