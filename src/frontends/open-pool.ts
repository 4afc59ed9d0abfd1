/**
 * Embedding: the engine of a pool folder inside your own program, without a daemon (the pool is locked while it
 * is open, so no daemon may serve it at the same time).
 */
import { Engine, type EngineOptions } from '../core/engine.js';
import type { LevelDb } from '../log/event-log.js';
import { openPoolDb, poolPaths } from './pool.js';

export interface OpenPool {
  readonly engine: Engine;
  readonly db: LevelDb;
  /** Closes the engine (devices stay recorded for the next open) and the database. */
  close(): Promise<void>;
}

export async function openPool(dir: string, options: Omit<EngineOptions, 'db'> = {}): Promise<OpenPool> {
  const db = await openPoolDb(poolPaths(dir), { create: true });
  let engine: Engine;
  try {
    engine = await Engine.open({ ...options, db });
  } catch (err) {
    await db.close();
    throw err;
  }
  return {
    engine,
    db,
    async close() {
      await engine.close();
      await db.close();
    },
  };
}
