/**
 * Mirror resync and recovery (Linux dm-raid1 do_recovery with dm-region-hash's recovery lists): copies the regions
 * the log does not know to be in sync from the default leg to the others, one region at a time, throttled, until
 * every region is in sync. It runs after activation (a crash left the log dirty, a `sync` table, a core log) and
 * after a leg is re-added.
 *
 *   IDLE --START--> SCANNING --REGION_FOUND--> QUIESCING --QUIESCED--> COPYING --COPIED--> THROTTLED --NEXT--> SCANNING
 *   SCANNING --NO_WORK--> IN_SYNC            (every region in sync: table event, mirror.resync.done)
 *   SCANNING --DEGRADE--> DEGRADED           (a leg has failed and errors are handled: nothing can become in sync
 *                                             until it is re-added; resync waits there)
 *   COPYING --COPY_FAILED--> DEGRADED        (a leg failed during the copy; the region stays out of sync)
 *   IN_SYNC / DEGRADED / STOPPED --START--> SCANNING   (new work: a failed write, a re-added leg, resume)
 *   IDLE / SCANNING / THROTTLED / IN_SYNC / DEGRADED --STOP--> STOPPED   (suspend, remove)
 *
 * QUIESCING marks the region RECOVERING: new writes to it wait (the write group's DELAYED) and the writes in flight
 * drain. QUIESCING and COPYING take no STOP: the step in flight finishes first and the driver sends STOP after it
 * (src/targets/mirror/resync-driver.ts), as the kernel's presuspend waits for recovery in flight.
 */
import { setup } from 'xstate';

export type MirrorResyncEvent =
  | { type: 'START' }
  | { type: 'REGION_FOUND' }
  | { type: 'NO_WORK' }
  | { type: 'DEGRADE' }
  | { type: 'QUIESCED' }
  | { type: 'COPIED' }
  | { type: 'COPY_FAILED' }
  | { type: 'NEXT' }
  | { type: 'STOP' };

export const mirrorResyncMachine = setup({
  types: { events: {} as MirrorResyncEvent },
}).createMachine({
  id: 'mirror-resync',
  initial: 'IDLE',
  states: {
    IDLE: { on: { START: 'SCANNING', STOP: 'STOPPED' } },
    SCANNING: { on: { REGION_FOUND: 'QUIESCING', NO_WORK: 'IN_SYNC', DEGRADE: 'DEGRADED', STOP: 'STOPPED' } },
    QUIESCING: { on: { QUIESCED: 'COPYING' } },
    COPYING: { on: { COPIED: 'THROTTLED', COPY_FAILED: 'DEGRADED' } },
    THROTTLED: { on: { NEXT: 'SCANNING', STOP: 'STOPPED' } },
    IN_SYNC: { on: { START: 'SCANNING', STOP: 'STOPPED' } },
    DEGRADED: { on: { START: 'SCANNING', STOP: 'STOPPED' } },
    STOPPED: { on: { START: 'SCANNING' } },
  },
});
