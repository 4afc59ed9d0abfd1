/**
 * The typed events of the engine. Every state change is one; the control-plane ones are persisted to the pool's
 * LevelDB log with a sequence number, the trace-level ones (bio lifecycle, kcopyd pieces) only when tracing is on.
 */
export type BioOp = 'read' | 'write' | 'flush' | 'discard';

export type DmEvent =
  | { type: 'device.created'; device: string; minor: number; uuid?: string; readOnly: boolean }
  | { type: 'table.loaded'; device: string; table: string[] }
  | { type: 'table.cleared'; device: string }
  | { type: 'device.suspended'; device: string }
  | { type: 'device.resumed'; device: string; table: string[]; swapped: boolean }
  | { type: 'device.removed'; device: string }
  | { type: 'mark'; device: string; name: string }
  | { type: 'exception.prepared'; device: string; oldChunk: number; newChunk: number }
  | { type: 'exception.committed'; cow: string; count: number; firstIndex: number; chunks: Array<[number, number]> }
  | { type: 'snapshot.invalidated'; device: string; reason: string; /** WAL key of a persistent snapshot's COW. */ cow?: string }
  | { type: 'snapshot.overflowed'; device: string; /** WAL key of a persistent snapshot's COW. */ cow?: string }
  /** A table waiting for a snapshot's exceptions lost them: their owner was removed first (stays Invalid, in memory only). */
  | { type: 'snapshot.handover.cancelled'; device: string; cow: string }
  /**
   * A persistent snapshot's store finished reading its metadata: the COW's complete state as loaded (it replaces
   * whatever the log knew about that COW). `runs` are the exceptions in index order, each [oldChunk, newChunk,
   * chunks]: record i of a run is oldChunk + i → newChunk + i.
   */
  | {
      type: 'exceptions.loaded';
      cow: string;
      device: string;
      chunkSizeSectors: number;
      valid: boolean;
      /** Set when the snapshot starts out overflowed (a replayed pool's pinned state); absent means false. */
      overflowed?: boolean;
      count: number;
      runs: Array<[number, number, number]>;
    }
  /** The newest `count` exception records of a COW were cleared by a merge (the metadata area write succeeded). */
  | { type: 'exception.merged'; cow: string; count: number }
  | { type: 'checkpoint.written'; device: string; cow: string; exceptions: number }
  | { type: 'merge.state'; device: string; from: string; event: string; state: string; chunksLeft: number; chunksMerged: number }
  | { type: 'merge.run.started'; device: string; firstOldChunk: number; firstNewChunk: number; chunks: number }
  | { type: 'merge.run.committed'; device: string; chunks: number; chunksLeft: number }
  | { type: 'merge.done'; device: string; chunksMerged: number }
  | { type: 'merge.failed'; device: string; reason: string; chunksLeft: number }
  | { type: 'mirror.leg.failed'; device: string; leg: number; label: string; error: 'write' | 'flush' | 'sync' | 'read'; health: string }
  | { type: 'mirror.leg.readded'; device: string; leg: number; label: string }
  | { type: 'mirror.resync.progress'; device: string; regionsInSync: number; regionsTotal: number; regionsCopied: number }
  | { type: 'mirror.resync.done'; device: string; regionsInSync: number; regionsTotal: number; regionsCopied: number }
  | { type: 'mirror.region.marked'; device: string; region: number }
  | { type: 'mirror.region.cleared'; device: string; region: number }
  | { type: 'engine.started'; devices: number }
  | { type: 'engine.stopped' }
  | {
      type: 'bio';
      device: string;
      bioId: number;
      op: BioOp;
      sector: number;
      lengthSectors: number;
      from: string;
      event: string;
      state: string;
    }
  | {
      type: 'kcopyd.job';
      jobId: number;
      state: string;
      sourceSector?: number;
      lengthSectors: number;
      destinations: number;
      readError?: boolean;
      writeErrorMask?: number;
    };

export type DmEventType = DmEvent['type'];

/** Trace-level events: cheap to skip, never needed to rebuild state. */
export const TRACE_EVENT_TYPES: ReadonlySet<DmEventType> = new Set<DmEventType>(['bio', 'kcopyd.job', 'exception.prepared', 'mirror.region.marked', 'mirror.region.cleared', 'merge.run.started', 'merge.run.committed']);

/** An event as the log holds it: a sequence number (monotonic per pool) and the injected clock's time. */
export type LoggedEvent = DmEvent & { readonly seq: number; readonly timeMs: number };
