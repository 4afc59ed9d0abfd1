/**
 * Dirty-region log types by name (Linux dm_dirty_log_type_register / get_type): `core` and `disk` (dm-log), and
 * `md-bitmap` (an md write-intent bitmap file, src/dirty-logs/md-bitmap/). The mirror target finds its log here by the table's log
 * type name and never imports a concrete log.
 */
import type { AnyDirtyLogType } from './contract.js';
import { coreLog } from './core-log.js';
import { diskLog } from './disk-log.js';
import { mdBitmapLog } from './md-bitmap/md-bitmap-log.js';

export class DirtyLogRegistry {
  private readonly byName = new Map<string, AnyDirtyLogType>();

  /** Registers `type` under its name; a second type of the same name is refused (Linux -EEXIST). */
  register(type: AnyDirtyLogType): void {
    if (this.byName.has(type.name)) throw new Error(`dirty log type ${type.name} is registered already`);
    this.byName.set(type.name, type);
  }

  /** The log type of that name, or undefined. */
  get(name: string): AnyDirtyLogType | undefined {
    return this.byName.get(name);
  }

  names(): string[] {
    return [...this.byName.keys()];
  }
}

export function createDefaultDirtyLogRegistry(): DirtyLogRegistry {
  const r = new DirtyLogRegistry();
  r.register(coreLog);
  r.register(diskLog);
  r.register(mdBitmapLog);
  return r;
}

const defaultRegistry = createDefaultDirtyLogRegistry();

/** The default registry (what tables use). */
export function dirtyLogRegistry(): DirtyLogRegistry {
  return defaultRegistry;
}

/** The default registry's log type of that name; undefined for an unknown name. */
export function findDirtyLogType(name: string): AnyDirtyLogType | undefined {
  return defaultRegistry.get(name);
}
