/**
 * A mirror write (seed 004's write GROUP): one bio written to every leg that takes writes, as one transaction per
 * leg (machines/mirror-write-transaction.ts). The bio completes only when every transaction has reported in —
 * never on the primary alone — and a leg's failure is recorded before the bio completes.
 *
 *   START --ISSUE--> WRITING --ALL_DONE--> COMPLETED           (every leg has the data)
 *   START --DELAY--> DELAYED --ISSUE--> WRITING                (the region is being resynced: wait for the copy)
 *   START --KILL--> FAILED                                     (no leg can take the write)
 *   WRITING --LEGS_FAILED--> RECORDING --RECORDED--> COMPLETED (some legs failed: they are marked failed, the region
 *                                                               out of sync in the log, the event logged; then the
 *                                                               bio completes, its data on the other legs)
 *   RECORDING --RECORDED_NONE_LEFT--> FAILED                   (every leg failed: EIO once the failure is recorded)
 *   WRITING --JOURNAL_FAILED--> FAILED                         (the log could not record the write; handle_errors)
 *
 * The group counts the write in its region (per-region write counts, Linux dm-region-hash) from ISSUE until it is
 * final; counting transactions and deciding which event to send is the driver's (src/targets/mirror/write-group.ts),
 * so the machine stays flat and its compiled table exact.
 */
import { setup } from 'xstate';

export type MirrorWriteGroupEvent =
  | { type: 'ISSUE' }
  | { type: 'DELAY' }
  | { type: 'KILL' }
  | { type: 'ALL_DONE' }
  | { type: 'LEGS_FAILED' }
  | { type: 'JOURNAL_FAILED' }
  | { type: 'RECORDED' }
  | { type: 'RECORDED_NONE_LEFT' };

export const mirrorWriteGroupMachine = setup({
  types: { events: {} as MirrorWriteGroupEvent },
}).createMachine({
  id: 'mirror-write-group',
  initial: 'START',
  states: {
    START: { on: { ISSUE: 'WRITING', DELAY: 'DELAYED', KILL: 'FAILED' } },
    DELAYED: { on: { ISSUE: 'WRITING' } },
    WRITING: { on: { ALL_DONE: 'COMPLETED', LEGS_FAILED: 'RECORDING', JOURNAL_FAILED: 'FAILED' } },
    RECORDING: { on: { RECORDED: 'COMPLETED', RECORDED_NONE_LEFT: 'FAILED' } },
    COMPLETED: { type: 'final' },
    FAILED: { type: 'final' },
  },
});
