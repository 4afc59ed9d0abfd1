/**
 * The bio: one read, write, flush or discard on a mapped device, from submission to completion (Linux's struct
 * bio plus the dm core's clone). The definition is the specification; the per-bio hot path runs its compiled
 * transition table (src/core/compiled-machine.ts), and full xstate actors run it when inspection is on.
 *
 *   SUBMITTED --MAP--> MAPPED --REMAP--> REMAPPED --IO_DONE--> COMPLETED
 *       |  ^              |                  `--IO_ERROR--> FAILED
 *     QUEUE RESUME        |--HOLD--> HELD --RETRY--> SUBMITTED   (the target keeps the bio, e.g. until a copy is done)
 *       v  |              |--ENDIO--> COMPLETED                  (the target finished it: zero, flush of nothing)
 *      QUEUED             `--KILL--> FAILED                      (error target, invalid snapshot, ...)
 *
 *   HELD --ENDIO--> COMPLETED / HELD --KILL--> FAILED: the target did the I/O itself (a snapshot read served from
 *   the origin, a whole-chunk write straight to the COW) and ends the bio.
 *
 * QUEUED is where bios wait while their device is suspended: they are queued, not failed, and RESUME sends them
 * back to SUBMITTED to be mapped by the new live table. KILL from SUBMITTED/QUEUED fails bios of a removed device.
 */
import { setup } from 'xstate';

export type BioEvent =
  | { type: 'MAP' }
  | { type: 'QUEUE' }
  | { type: 'RESUME' }
  | { type: 'REMAP' }
  | { type: 'HOLD' }
  | { type: 'RETRY' }
  | { type: 'ENDIO' }
  | { type: 'KILL' }
  | { type: 'IO_DONE' }
  | { type: 'IO_ERROR' };

export const bioMachine = setup({
  types: { events: {} as BioEvent },
}).createMachine({
  id: 'bio',
  initial: 'SUBMITTED',
  states: {
    SUBMITTED: { on: { MAP: 'MAPPED', QUEUE: 'QUEUED', KILL: 'FAILED' } },
    QUEUED: { on: { RESUME: 'SUBMITTED', KILL: 'FAILED' } },
    MAPPED: { on: { REMAP: 'REMAPPED', HOLD: 'HELD', ENDIO: 'COMPLETED', KILL: 'FAILED' } },
    HELD: { on: { RETRY: 'SUBMITTED', ENDIO: 'COMPLETED', KILL: 'FAILED' } },
    REMAPPED: { on: { IO_DONE: 'COMPLETED', IO_ERROR: 'FAILED' } },
    COMPLETED: { type: 'final' },
    FAILED: { type: 'final' },
  },
});
