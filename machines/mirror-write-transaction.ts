/**
 * One leg's part of a mirror write (seed 004's write TRANSACTION): a write group (machines/mirror-write-group.ts)
 * has one transaction per leg it writes, and completes its bio only when every transaction has reported in.
 *
 *   START --MARKED--> JOURNAL_FLUSH --JOURNAL_FLUSHED--> DATA_WRITE --DATA_WRITTEN--> DATA_FLUSH
 *     --DATA_FLUSHED--> SUPER_WRITE --SUPER_WRITTEN--> SUPER_FLUSH --SUPER_FLUSHED--> DONE
 *   JOURNAL_FLUSH --JOURNAL_FAILED--> FAILED   (the region log could not make the mark durable: no data is issued)
 *   DATA_WRITE / DATA_FLUSH --DATA_FAILED--> FAILED   (the leg returned an error)
 *
 * What each state does (src/targets/mirror/write-group.ts drives it; a state with nothing to do for a bio is left
 * at once, in the same tick, which costs one table lookup):
 *   START          the group counted the write in its region; a region going CLEAN → DIRTY was marked in the log.
 *   JOURNAL_FLUSH  waits until the log flush carrying the region's mark is durable (one flush shared by every
 *                  write waiting on it); nothing to wait for when the mark is durable already.
 *   DATA_WRITE     the write (FUA passed through) on this leg; a flush bio has no data.
 *   DATA_FLUSH     a flush bio: this leg's flush (shared with every flush request that started after the bio did);
 *                  a write has nothing to flush here (FUA made it durable, and a plain write is not asked to be).
 *   SUPER_WRITE    a flush bio: the region log's clean records, written after the leg flushes (dm-log's disk_flush
 *                  with its flush_callback_fn), so that a crash after a mirror flush resyncs only regions written
 *                  since. A write hands its region back through the group instead: when a region's last write
 *                  drains it turns clean and its clean record is written later, in the background, after the legs
 *                  are flushed (the kernel's dm_rh_update_states path).
 *   SUPER_FLUSH    the log device's cache: dm-log flushes it only for marks; clean records may stay volatile (a lost
 *                  one costs a region resync, never data), so this state has nothing to wait for.
 *
 * Flat, no guards, no context: compiled into a transition table (src/core/compiled-machine.ts) for the hot path.
 */
import { setup } from 'xstate';

export type MirrorWriteTransactionEvent =
  | { type: 'MARKED' }
  | { type: 'JOURNAL_FLUSHED' }
  | { type: 'JOURNAL_FAILED' }
  | { type: 'DATA_WRITTEN' }
  | { type: 'DATA_FLUSHED' }
  | { type: 'DATA_FAILED' }
  | { type: 'SUPER_WRITTEN' }
  | { type: 'SUPER_FLUSHED' };

export const mirrorWriteTransactionMachine = setup({
  types: { events: {} as MirrorWriteTransactionEvent },
}).createMachine({
  id: 'mirror-write-transaction',
  initial: 'START',
  states: {
    START: { on: { MARKED: 'JOURNAL_FLUSH' } },
    JOURNAL_FLUSH: { on: { JOURNAL_FLUSHED: 'DATA_WRITE', JOURNAL_FAILED: 'FAILED' } },
    DATA_WRITE: { on: { DATA_WRITTEN: 'DATA_FLUSH', DATA_FAILED: 'FAILED' } },
    DATA_FLUSH: { on: { DATA_FLUSHED: 'SUPER_WRITE', DATA_FAILED: 'FAILED' } },
    SUPER_WRITE: { on: { SUPER_WRITTEN: 'SUPER_FLUSH' } },
    SUPER_FLUSH: { on: { SUPER_FLUSHED: 'DONE' } },
    DONE: { type: 'final' },
    FAILED: { type: 'final' },
  },
});
