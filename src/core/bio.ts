/**
 * The bio on the hot path: a plain object whose `state` steps through the compiled bio machine (machines/bio.ts).
 * A request becomes one bio; when it crosses a target boundary the core splits it as Linux's bio_split does (the
 * bio keeps the head, a new bio takes the rest). When inspection is on, the engine also runs a full xstate actor
 * per bio and checks that both agree.
 */
import { bioMachine, type BioEvent } from '../../machines/bio.js';
import type { BlockDevice } from '../block/contract.js';
import type { Sector } from '../block/units.js';
import type { BioOp } from '../log/events.js';
import { compileMachine } from './compiled-machine.js';

export type BioStateName = 'SUBMITTED' | 'QUEUED' | 'MAPPED' | 'HELD' | 'REMAPPED' | 'COMPLETED' | 'FAILED';
export type BioEventName = BioEvent['type'];

export const BIO_MACHINE = compileMachine<BioStateName, BioEventName>(bioMachine);

/** State and event indexes of the compiled bio machine, resolved once. */
export const BIO_STATE = Object.fromEntries(BIO_MACHINE.stateNames.map((n, i) => [n, i])) as Record<BioStateName, number>;
export const BIO_EVENT = Object.fromEntries(BIO_MACHINE.eventNames.map((n, i) => [n, i])) as Record<BioEventName, number>;

/** What a target's map() did with a bio (Linux DM_MAPIO_*). */
export const MAP_REMAPPED = 0; // bio.remapDevice/remapSector are set: the core issues the I/O there
export const MAP_HELD = 1; // the target keeps the bio and later calls ctx.retryBio() or ctx.endBio()
export const MAP_DONE = 2; // the target completed the bio itself (zero target, empty flush)
export const MAP_KILL = 3; // fail the bio with DM_IO
export type MapResult = typeof MAP_REMAPPED | typeof MAP_HELD | typeof MAP_DONE | typeof MAP_KILL;

/** The caller's request: completes when all its bios have. */
export interface IoRequest {
  remaining: number;
  error: unknown;
  resolve(): void;
  reject(err: unknown): void;
}

export class Bio {
  /** Index into BIO_MACHINE.stateNames. */
  state = BIO_MACHINE.initialIndex;
  /** Set by map() when it returns MAP_REMAPPED. */
  remapDevice: BlockDevice | undefined = undefined;
  remapSector: Sector = 0 as Sector;
  /** For flush clones: the target this bio goes to; -1 means the target holding `sector`. */
  targetIndex = -1;
  /** Opaque per-target state (e.g. the pending exception a held bio waits on). */
  targetData: unknown = undefined;

  constructor(
    readonly id: number,
    readonly op: BioOp,
    /** First sector, relative to the mapped device. Trimmed by a split. */
    public sector: Sector,
    public lengthSectors: Sector,
    /** Data for read/write (exactly lengthSectors × 512 bytes); empty for flush/discard. */
    public buf: Uint8Array,
    readonly fua: boolean,
    readonly request: IoRequest,
  ) {}

  get stateName(): BioStateName {
    return BIO_MACHINE.stateNames[this.state];
  }
}
