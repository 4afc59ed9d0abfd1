/**
 * A pool folder: LevelDB under DIR/db (tables, device records, the event log), the control socket
 * DIR/control.sock and the NBD socket DIR/nbd.sock. One daemon owns a pool at a time (LevelDB's lock).
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { ClassicLevel } from 'classic-level';
import { DmError } from '../core/errors.js';
import type { LevelDb } from '../log/event-log.js';

export interface PoolPaths {
  readonly dir: string;
  readonly db: string;
  readonly controlSocket: string;
  readonly nbdSocket: string;
  readonly pidFile: string;
}

export function poolPaths(dir: string): PoolPaths {
  const abs = path.resolve(dir);
  return {
    dir: abs,
    db: path.join(abs, 'db'),
    controlSocket: path.join(abs, 'control.sock'),
    nbdSocket: path.join(abs, 'nbd.sock'),
    pidFile: path.join(abs, 'daemon.pid'),
  };
}

/** Opens the pool's database, creating the pool when `create` is set. Clear errors for locked/corrupt pools. */
export async function openPoolDb(paths: PoolPaths, options: { create: boolean }): Promise<LevelDb> {
  if (fs.existsSync(paths.dir)) {
    if (!fs.statSync(paths.dir).isDirectory()) throw new DmError('DM_POOL_CORRUPT', `pool ${paths.dir} is not a folder`);
  } else if (!options.create) {
    throw new DmError('DM_POOL_CORRUPT', `pool ${paths.dir} does not exist (dmstate serve --pool ${paths.dir} creates it)`);
  } else {
    fs.mkdirSync(paths.dir, { recursive: true });
  }
  if (!options.create && !fs.existsSync(paths.db)) {
    throw new DmError('DM_POOL_CORRUPT', `pool ${paths.dir} has no database (expected ${paths.db})`);
  }
  const db = new ClassicLevel<string, unknown>(paths.db, { createIfMissing: options.create, errorIfExists: false });
  try {
    await db.open();
  } catch (err) {
    const cause = (err as { cause?: { code?: string; message?: string } }).cause;
    if (cause?.code === 'LEVEL_LOCKED') {
      let pid = '';
      try {
        pid = fs.readFileSync(paths.pidFile, 'utf8').trim();
      } catch {
        // no pid file: the holder is not a daemon (e.g. a `dmstate log` reading the pool)
      }
      throw new DmError('DM_POOL_LOCKED', `pool ${paths.dir} is in use by another process${pid ? ` (daemon pid ${pid})` : ''}`, { cause: err });
    }
    throw new DmError('DM_POOL_CORRUPT', `pool ${paths.dir}: cannot open its database: ${cause?.message ?? (err as Error).message}`, { cause: err });
  }
  return db as unknown as LevelDb;
}
