/**
 * The snapshot merge (Linux snapshot_merge_next_chunks / merge_callback): copies a snapshot's chunks back into its
 * origin, newest linear run first, until the COW holds no exception. One pass PREPARE → COPYING copies a BATCH of
 * runs (src/targets/snapshot/merger.ts: the first batch after a start is one run, as the kernel's step; later ones
 * take more, up to 64 MiB); FLUSHING → COMMITTING commits the oldest batch copied.
 *
 *   IDLE --START--> PREPARE --RUN_FOUND--> COPY_OUT_OTHERS --OTHERS_READY--> INTERLOCK --WRITES_DRAINED--> COPYING
 *                     |                      (other snapshots of the     (wait for in-flight writes
 *                     `--NO_MORE--> DONE      origin copy their data out)  to the batch's COW chunks)
 *   COPYING --COPY_DONE--> FLUSHING --FLUSHED--> COMMITTING --COMMITTED--> PREPARE   (next batch)
 *   COPYING --COPY_DONE_AHEAD--> PREPARE   (commit one behind: this batch's origin flush runs while the next batch
 *                                           is found and copied; its COPY_DONE then flushes and commits this one)
 *   PREPARE, COPY_OUT_OTHERS, INTERLOCK --DRAIN--> FLUSHING   (a copied batch is committed first: nothing left to
 *                                           find, a run past the origin's end next, or a stop asked for)
 *   COPYING --COPY_ERROR--> FAILED, FLUSHING --FLUSH_ERROR--> FAILED, COMMITTING --COMMIT_ERROR--> FAILED
 *   PREPARE --PREPARE_ERROR--> FAILED (invalid snapshot, a store read error, the previous batch's commit failed)
 *   STOP (suspend/remove) from PREPARE/COPY_OUT_OTHERS/INTERLOCK → STOPPED at once when no copied batch waits for
 *   its commit (else DRAIN, then STOP at the next PREPARE); from COPYING/FLUSHING/COMMITTING the step in flight is
 *   finished first (the driver remembers the STOP); either way the driver's stop() resolves once the last commit is
 *   durable too. STOPPED --START--> PREPARE (resume): a merge resumes from the newest exception left, as after a
 *   crash.
 *
 * COMMITTING clears the on-disk records and the in-core exceptions in lock-step (seed 000): a record on disk but
 * not in memory, or a chunk from the middle of an in-core run, is COMMIT_ERROR and the merge fails ("Merge
 * failed"), while I/O to the device goes on. COMMITTED means cleared, with the metadata area writes queued: they
 * become durable while the next batch runs (the batch's write interlock holds until then), and DONE waits for the
 * last of them. A failed area write fails the merge at the next PREPARE (PREPARE_ERROR) or COMMITTING
 * (COMMIT_ERROR).
 */
import { setup } from 'xstate';

export type MergeEvent =
  | { type: 'START' }
  | { type: 'RUN_FOUND' }
  | { type: 'NO_MORE' }
  | { type: 'PREPARE_ERROR' }
  | { type: 'OTHERS_READY' }
  | { type: 'WRITES_DRAINED' }
  | { type: 'COPY_DONE' }
  | { type: 'COPY_DONE_AHEAD' }
  | { type: 'DRAIN' }
  | { type: 'COPY_ERROR' }
  | { type: 'FLUSHED' }
  | { type: 'FLUSH_ERROR' }
  | { type: 'COMMITTED' }
  | { type: 'COMMIT_ERROR' }
  | { type: 'STOP' };

export const mergeMachine = setup({
  types: { events: {} as MergeEvent },
}).createMachine({
  id: 'merge',
  initial: 'IDLE',
  states: {
    IDLE: { on: { START: 'PREPARE', STOP: 'STOPPED' } },
    PREPARE: { on: { RUN_FOUND: 'COPY_OUT_OTHERS', NO_MORE: 'DONE', DRAIN: 'FLUSHING', PREPARE_ERROR: 'FAILED', STOP: 'STOPPED' } },
    COPY_OUT_OTHERS: { on: { OTHERS_READY: 'INTERLOCK', DRAIN: 'FLUSHING', STOP: 'STOPPED' } },
    INTERLOCK: { on: { WRITES_DRAINED: 'COPYING', DRAIN: 'FLUSHING', STOP: 'STOPPED' } },
    COPYING: { on: { COPY_DONE: 'FLUSHING', COPY_DONE_AHEAD: 'PREPARE', COPY_ERROR: 'FAILED' } },
    FLUSHING: { on: { FLUSHED: 'COMMITTING', FLUSH_ERROR: 'FAILED' } },
    COMMITTING: { on: { COMMITTED: 'PREPARE', COMMIT_ERROR: 'FAILED' } },
    STOPPED: { on: { START: 'PREPARE' } },
    DONE: { type: 'final' },
    FAILED: { type: 'final' },
  },
});
