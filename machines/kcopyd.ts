/**
 * kcopyd (Linux dm-kcopyd.c): copy one source region to up to 8 destinations, or zero them.
 *
 * A job is split into pieces of the sub-job size (512 KiB); at most 8 pieces of a job are in flight. Each piece
 * is a piece actor; the job actor waits for all of them and then reports (read error flag, write error bitmask
 * with one bit per destination) to its callback. Counting pieces and error bits is done by the driver
 * (src/kcopyd/kcopyd.ts), which sends ALL_PIECES_DONE; the machines stay free of guards and context, so their
 * compiled transition tables are exact.
 *
 * piece: START (waiting for pages) --READ--> READING --READ_DONE--> WRITING --WRITE_DONE--> DONE
 *                                   --ZERO--> WRITING               READING --READ_ERROR--> DONE (read_err)
 *                                                                   WRITING --WRITE_ERROR--> DONE (bit set)
 * job:   START --RUN--> RUNNING --ALL_PIECES_DONE--> COMPLETE
 */
import { setup } from 'xstate';

export type KcopydPieceEvent =
  | { type: 'READ' }
  | { type: 'ZERO' }
  | { type: 'READ_DONE' }
  | { type: 'READ_ERROR' }
  | { type: 'WRITE_DONE' }
  | { type: 'WRITE_ERROR' };

export const kcopydPieceMachine = setup({
  types: { events: {} as KcopydPieceEvent },
}).createMachine({
  id: 'kcopyd-piece',
  initial: 'START',
  states: {
    START: { on: { READ: 'READING', ZERO: 'WRITING' } },
    READING: { on: { READ_DONE: 'WRITING', READ_ERROR: 'DONE' } },
    WRITING: { on: { WRITE_DONE: 'DONE', WRITE_ERROR: 'DONE' } },
    DONE: { type: 'final' },
  },
});

export type KcopydJobEvent = { type: 'RUN' } | { type: 'ALL_PIECES_DONE' };

export const kcopydJobMachine = setup({
  types: { events: {} as KcopydJobEvent },
}).createMachine({
  id: 'kcopyd-job',
  initial: 'START',
  states: {
    START: { on: { RUN: 'RUNNING' } },
    RUNNING: { on: { ALL_PIECES_DONE: 'COMPLETE' } },
    COMPLETE: { type: 'final' },
  },
});
