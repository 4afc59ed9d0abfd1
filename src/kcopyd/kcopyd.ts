/**
 * A kcopyd client (Linux dm-kcopyd.c): copies one source region to up to 8 destination regions, or writes zeroes
 * to them, and reports (read error flag, write error bitmask with one bit per destination) to a callback.
 *
 * A job is cut into pieces of `subJobSizeSectors` (512 KiB by default; the last piece is shorter). At most
 * `piecesInFlightPerJobMax` pieces of a job are in flight at once (Linux: a master job and 8 sub-jobs taking the
 * next piece in turn); the next piece starts when one finishes. A copy piece takes a Buffer from the client's
 * fixed pool and waits in START while none is free (kcopyd's "wait for pages"), reads the source piece into it,
 * then writes it to all destinations concurrently. A zero piece needs no buffer: it goes straight to WRITING
 * from a shared zero buffer.
 *
 * Pieces and jobs step the compiled machines of machines/kcopyd.ts (a state index in a plain object, as Bio
 * does); this file counts pieces and error bits and sends ALL_PIECES_DONE.
 *
 * Scatter copies (copyScatter; not in Linux): one source region cut into consecutive segments, each written to a
 * place of its own — so that a merge reads runs that lie side by side on the COW with one read per piece instead of
 * one per run. A piece writes every segment it overlaps (the matching slice of its buffer); writeErrorMask has one
 * bit per segment.
 *
 * Errors (Linux semantics): a failed read or a failed write stops the job from starting new pieces, unless
 * `ignoreError`; pieces already in flight finish. A piece whose read failed writes nothing (Linux with
 * IGNORE_ERROR would write the buffer anyway; here READING --READ_ERROR--> DONE). Pieces of a job may land in any
 * order (no WRITE_SEQ), so after an error a destination holds every piece before the first failed one, possibly
 * some later ones, and nothing from the failed piece on a read error.
 *
 * Ordering: callbacks of one client run one at a time in the order their jobs complete, always from a microtask,
 * never from inside copy()/zero() or from inside another callback's stack (a job a callback starts completes
 * later). A job counts as in flight until its callback has returned.
 */
import { kcopydJobMachine, kcopydPieceMachine, type KcopydJobEvent, type KcopydPieceEvent } from '../../machines/kcopyd.js';
import type { BlockDevice } from '../block/contract.js';
import { sectors, sectorsToBytes, type Bytes, type Sector } from '../block/units.js';
import { assert } from '../core/assert.js';
import { compileMachine } from '../core/compiled-machine.js';
import { DmError } from '../core/errors.js';
import type { EventLog } from '../log/event-log.js';
import type { DmEvent } from '../log/events.js';

export type KcopydPieceStateName = 'START' | 'READING' | 'WRITING' | 'DONE';
export type KcopydPieceEventName = KcopydPieceEvent['type'];
export type KcopydJobStateName = 'START' | 'RUNNING' | 'COMPLETE';
export type KcopydJobEventName = KcopydJobEvent['type'];

export const KCOPYD_PIECE_MACHINE = compileMachine<KcopydPieceStateName, KcopydPieceEventName>(kcopydPieceMachine);
export const KCOPYD_JOB_MACHINE = compileMachine<KcopydJobStateName, KcopydJobEventName>(kcopydJobMachine);

/** State and event indexes of the compiled machines, resolved once. */
export const KCOPYD_PIECE_STATE = Object.fromEntries(KCOPYD_PIECE_MACHINE.stateNames.map((n, i) => [n, i])) as Record<KcopydPieceStateName, number>;
export const KCOPYD_PIECE_EVENT = Object.fromEntries(KCOPYD_PIECE_MACHINE.eventNames.map((n, i) => [n, i])) as Record<KcopydPieceEventName, number>;
export const KCOPYD_JOB_STATE = Object.fromEntries(KCOPYD_JOB_MACHINE.stateNames.map((n, i) => [n, i])) as Record<KcopydJobStateName, number>;
export const KCOPYD_JOB_EVENT = Object.fromEntries(KCOPYD_JOB_MACHINE.eventNames.map((n, i) => [n, i])) as Record<KcopydJobEventName, number>;

/** Destinations per job (Linux DM_KCOPYD_MAX_REGIONS); writeErrorMask has one bit per destination. */
export const KCOPYD_DESTINATIONS_MAX = 8;
/** 1024 sectors = 512 KiB (Linux SUB_JOB_SIZE). */
export const KCOPYD_SUB_JOB_SIZE_SECTORS_DEFAULT = sectors(1024);
/** Largest accepted subJobSizeSectors: 64 MiB per pool buffer. */
export const KCOPYD_SUB_JOB_SIZE_SECTORS_MAX = sectors(128 * 1024);
/** Linux SPLIT_COUNT: 8 sub-jobs per master job. */
export const KCOPYD_PIECES_IN_FLIGHT_PER_JOB_DEFAULT = 8;
/** Largest accepted piecesInFlightPerJobMax. */
export const KCOPYD_PIECES_IN_FLIGHT_PER_JOB_MAX = 1024;
/** Buffers in the pool by default: 32 × 512 KiB = 16 MiB, allocated as first needed. */
export const KCOPYD_BUFFER_POOL_PIECES_DEFAULT = 32;
/** Largest accepted bufferPoolPieces. */
export const KCOPYD_BUFFER_POOL_PIECES_MAX = 4096;
/**
 * Jobs of one client in flight at once. Linux blocks in the job mempool instead; here a caller that gets this far
 * is not bounding its own queue, which is a bug. It also bounds the wait-for-buffer queue (jobs × pieces per job).
 */
export const KCOPYD_JOBS_IN_FLIGHT_MAX = 64 * 1024;

export interface KcopydRegion {
  readonly device: BlockDevice;
  readonly sector: Sector;
  readonly lengthSectors: Sector;
}

/** Segments of one scatter copy at most; writeErrorMask has one bit per segment (bit 31 makes it negative). */
export const KCOPYD_SEGMENTS_MAX = 32;

/** Where one part of a scatter copy's source goes: source sectors [sourceOffsetSectors, +lengthSectors) to `sector`. */
export interface KcopydSegment {
  readonly device: BlockDevice;
  readonly sector: Sector;
  readonly sourceOffsetSectors: Sector;
  readonly lengthSectors: Sector;
}

export interface KcopydCopyOptions {
  /** Keep starting pieces after a read or write error (Linux DM_KCOPYD_IGNORE_ERROR). */
  readonly ignoreError?: boolean;
}

/** readError: some piece's read failed. writeErrorMask: bit i set when a write to destinations[i] failed. */
export type KcopydCallback = (readError: boolean, writeErrorMask: number) => void;

export interface KcopydResult {
  readonly readError: boolean;
  readonly writeErrorMask: number;
}

/**
 * Watches every job and piece transition (inspection, tests). `id` is the job's or the piece's id (piece ids are
 * unique per client); `jobId` is the job the piece belongs to (equal to `id` for a job).
 */
export type KcopydObserver = (kind: 'job' | 'piece', id: number, fromState: number, eventIndex: number, toState: number, jobId: number) => void;

export interface KcopydClientOptions {
  /** Receives 'kcopyd.job' trace events when `log.traceEnabled`. */
  readonly log?: EventLog;
  /** Piece size; KCOPYD_SUB_JOB_SIZE_SECTORS_DEFAULT (512 KiB) by default. */
  readonly subJobSizeSectors?: Sector;
  /** Pieces of one job in flight at once (waiting for a buffer included); 8 by default. */
  readonly piecesInFlightPerJobMax?: number;
  /** Buffers of subJobSizeSectors in the pool shared by all jobs of the client; 32 by default. */
  readonly bufferPoolPieces?: number;
  readonly observer?: KcopydObserver;
  /** Used in messages; "kcopyd" by default. */
  readonly name?: string;
}

const EMPTY = new Uint8Array(0);

/** One job: a copy or a zero. Returned by copy()/zero() for inspection; the client owns every field. */
export class KcopydJob {
  /** Index into KCOPYD_JOB_MACHINE.stateNames. */
  state = KCOPYD_JOB_MACHINE.initialIndex;
  readError = false;
  writeErrorMask = 0;
  /** Offset from the regions' start of the next piece to start. */
  nextOffsetSectors: Sector = sectors(0);
  nextPieceIndex = 0;
  piecesInFlightCount = 0;
  piecesDoneCount = 0;

  constructor(
    readonly id: number,
    /** undefined for a zero job. */
    readonly source: KcopydRegion | undefined,
    /** Every destination takes the whole source (copy, zero); empty for a scatter copy. */
    readonly destinations: readonly KcopydRegion[],
    /** A scatter copy's segments, in source order, covering the source; empty otherwise. */
    readonly segments: readonly KcopydSegment[],
    readonly lengthSectors: Sector,
    readonly ignoreError: boolean,
    readonly jobDone: KcopydCallback,
  ) {}

  get stateName(): KcopydJobStateName {
    return KCOPYD_JOB_MACHINE.stateNames[this.state];
  }

  /** An error stops the job from starting new pieces unless ignoreError. */
  get stopped(): boolean {
    return !this.ignoreError && (this.readError || this.writeErrorMask !== 0);
  }
}

class KcopydPiece {
  state = KCOPYD_PIECE_MACHINE.initialIndex;
  /** The pool buffer (copy pieces, once granted). */
  buffer: Buffer | undefined = undefined;
  /** What the writes send: a view of `buffer`, or of the zero buffer. */
  data: Uint8Array = EMPTY;
  writesPendingCount = 0;
  writeErrorMask = 0;
  /** Next piece in the client's wait-for-buffer FIFO. */
  nextWaiting: KcopydPiece | undefined = undefined;

  constructor(
    readonly id: number,
    readonly job: KcopydJob,
    readonly offsetSectors: Sector,
    readonly lengthSectors: Sector,
  ) {}
}

export class KcopydClient {
  readonly name: string;
  readonly subJobSizeSectors: Sector;
  readonly piecesInFlightPerJobMax: number;
  readonly bufferPoolPieces: number;
  observer: KcopydObserver | undefined;
  private readonly log: EventLog | undefined;
  private readonly subJobSizeBytes: Bytes;

  private nextJobId = 1;
  private nextPieceId = 1;
  private jobsInFlight = 0;
  private piecesInFlight = 0;
  private piecesWaiting = 0;
  /** Pool buffers not in use; the pool grows up to bufferPoolPieces as buffers are first needed. */
  private buffersFree: Buffer[] = [];
  private buffersAllocatedCount = 0;
  private zeroBuffer: Buffer | undefined = undefined;
  /** Pieces waiting in START for a buffer, FIFO (intrusive list through nextWaiting). */
  private waitingHead: KcopydPiece | undefined = undefined;
  private waitingTail: KcopydPiece | undefined = undefined;
  /** Jobs in COMPLETE whose callback has not run yet, in completion order; consumed from completedHeadIndex. */
  private completed: KcopydJob[] = [];
  private completedHeadIndex = 0;
  private completedScheduled = false;
  private readonly completedRunBound = (): void => this.completedRun();
  private closed = false;
  private closeWaiters: Array<() => void> = [];

  constructor(options: KcopydClientOptions = {}) {
    this.name = options.name ?? 'kcopyd';
    this.log = options.log;
    this.observer = options.observer;
    this.subJobSizeSectors = options.subJobSizeSectors ?? KCOPYD_SUB_JOB_SIZE_SECTORS_DEFAULT;
    this.piecesInFlightPerJobMax = options.piecesInFlightPerJobMax ?? KCOPYD_PIECES_IN_FLIGHT_PER_JOB_DEFAULT;
    this.bufferPoolPieces = options.bufferPoolPieces ?? KCOPYD_BUFFER_POOL_PIECES_DEFAULT;
    const intIn = (v: number, max: number): boolean => Number.isSafeInteger(v) && v >= 1 && v <= max;
    if (!intIn(this.subJobSizeSectors, KCOPYD_SUB_JOB_SIZE_SECTORS_MAX)) {
      throw new DmError('DM_INVALID_ARGUMENT', `${this.name}: subJobSizeSectors must be an integer from 1 to ${KCOPYD_SUB_JOB_SIZE_SECTORS_MAX}, got ${this.subJobSizeSectors}`);
    }
    if (!intIn(this.piecesInFlightPerJobMax, KCOPYD_PIECES_IN_FLIGHT_PER_JOB_MAX)) {
      throw new DmError('DM_INVALID_ARGUMENT', `${this.name}: piecesInFlightPerJobMax must be an integer from 1 to ${KCOPYD_PIECES_IN_FLIGHT_PER_JOB_MAX}, got ${this.piecesInFlightPerJobMax}`);
    }
    if (!intIn(this.bufferPoolPieces, KCOPYD_BUFFER_POOL_PIECES_MAX)) {
      throw new DmError('DM_INVALID_ARGUMENT', `${this.name}: bufferPoolPieces must be an integer from 1 to ${KCOPYD_BUFFER_POOL_PIECES_MAX}, got ${this.bufferPoolPieces}`);
    }
    this.subJobSizeBytes = sectorsToBytes(this.subJobSizeSectors);
  }

  /** Jobs started and not yet called back. */
  get jobsInFlightCount(): number {
    return this.jobsInFlight;
  }

  /** Pieces started and not yet DONE (those waiting for a buffer included). */
  get piecesInFlightCount(): number {
    return this.piecesInFlight;
  }

  /** Pieces waiting in START for a pool buffer. */
  get piecesWaitingCount(): number {
    return this.piecesWaiting;
  }

  /** Pool buffers not held by a piece (allocated or not yet). */
  get buffersFreeCount(): number {
    return this.bufferPoolPieces - this.buffersAllocatedCount + this.buffersFree.length;
  }

  get isClosed(): boolean {
    return this.closed;
  }

  /**
   * Copies `source` to every destination (1 to 8, each of the source's length). Throws DmError for invalid
   * regions (DM_INVALID_ARGUMENT, DM_IO_RANGE, DM_IO_ALIGNMENT) or a closed client (DM_CLOSED); I/O errors are
   * reported to `copyDone`, which runs later, never from inside this call.
   */
  copy(source: KcopydRegion, destinations: readonly KcopydRegion[], options: KcopydCopyOptions, copyDone: KcopydCallback): KcopydJob {
    this.regionCheck('source', source, source.lengthSectors);
    return this.jobStart(source, destinations, options, copyDone);
  }

  /**
   * Copies `source` in pieces to the segments: 1 to KCOPYD_SEGMENTS_MAX, in source order, consecutive and covering
   * the source exactly (segment i's sourceOffsetSectors is where segment i−1 ends; the first starts at 0, the last
   * ends at the source's length). writeErrorMask bit i: a write to segment i failed. Errors as copy().
   */
  copyScatter(source: KcopydRegion, segments: readonly KcopydSegment[], options: KcopydCopyOptions, copyDone: KcopydCallback): KcopydJob {
    this.regionCheck('source', source, source.lengthSectors);
    if (segments.length < 1 || segments.length > KCOPYD_SEGMENTS_MAX) {
      throw new DmError('DM_INVALID_ARGUMENT', `${this.name}: a scatter copy takes 1 to ${KCOPYD_SEGMENTS_MAX} segments, got ${segments.length}`);
    }
    let offsetSectors = 0;
    for (let i = 0; i < segments.length; i++) {
      const seg = segments[i];
      if (seg.sourceOffsetSectors !== offsetSectors || !(seg.lengthSectors >= 1)) {
        throw new DmError('DM_INVALID_ARGUMENT', `${this.name}: segment ${i} covers source sectors [${seg.sourceOffsetSectors}, +${seg.lengthSectors}); segments must be non-empty, in order and consecutive from ${offsetSectors}`);
      }
      this.regionCheck(`segment ${i}`, seg, seg.lengthSectors);
      offsetSectors += seg.lengthSectors;
    }
    if (offsetSectors !== source.lengthSectors) {
      throw new DmError('DM_INVALID_ARGUMENT', `${this.name}: segments cover ${offsetSectors} of the source's ${source.lengthSectors} sectors`);
    }
    return this.jobCreate(source, [], segments.slice(), source.lengthSectors, options, copyDone);
  }

  /** Writes zeroes to every destination (1 to 8, all of the same length). As copy() otherwise. */
  zero(destinations: readonly KcopydRegion[], options: KcopydCopyOptions, zeroDone: KcopydCallback): KcopydJob {
    return this.jobStart(undefined, destinations, options, zeroDone);
  }

  /** copy() as a promise; argument errors reject. */
  copyAsync(source: KcopydRegion, destinations: readonly KcopydRegion[], options: KcopydCopyOptions = {}): Promise<KcopydResult> {
    return new Promise((resolve) => {
      this.copy(source, destinations, options, (readError, writeErrorMask) => resolve({ readError, writeErrorMask }));
    });
  }

  /** copyScatter() as a promise; argument errors reject. */
  copyScatterAsync(source: KcopydRegion, segments: readonly KcopydSegment[], options: KcopydCopyOptions = {}): Promise<KcopydResult> {
    return new Promise((resolve) => {
      this.copyScatter(source, segments, options, (readError, writeErrorMask) => resolve({ readError, writeErrorMask }));
    });
  }

  /** zero() as a promise; argument errors reject. */
  zeroAsync(destinations: readonly KcopydRegion[], options: KcopydCopyOptions = {}): Promise<KcopydResult> {
    return new Promise((resolve) => {
      this.zero(destinations, options, (readError, writeErrorMask) => resolve({ readError, writeErrorMask }));
    });
  }

  /**
   * Refuses new jobs (DM_CLOSED), waits until every job in flight has been called back, then drops the buffer
   * pool. Idempotent.
   */
  close(): Promise<void> {
    this.closed = true;
    if (this.jobsInFlight === 0) {
      this.buffersDrop();
      return Promise.resolve();
    }
    return new Promise((resolve) => this.closeWaiters.push(resolve));
  }

  private jobStart(source: KcopydRegion | undefined, destinations: readonly KcopydRegion[], options: KcopydCopyOptions, jobDone: KcopydCallback): KcopydJob {
    if (destinations.length < 1 || destinations.length > KCOPYD_DESTINATIONS_MAX) {
      throw new DmError('DM_INVALID_ARGUMENT', `${this.name}: a job takes 1 to ${KCOPYD_DESTINATIONS_MAX} destinations, got ${destinations.length}`);
    }
    const lengthSectors = source !== undefined ? source.lengthSectors : destinations[0].lengthSectors;
    for (let i = 0; i < destinations.length; i++) this.regionCheck(`destination ${i}`, destinations[i], lengthSectors);
    return this.jobCreate(source, destinations.slice(), [], lengthSectors, options, jobDone);
  }

  private jobCreate(
    source: KcopydRegion | undefined,
    destinations: readonly KcopydRegion[],
    segments: readonly KcopydSegment[],
    lengthSectors: Sector,
    options: KcopydCopyOptions,
    jobDone: KcopydCallback,
  ): KcopydJob {
    if (this.closed) throw new DmError('DM_CLOSED', `${this.name}: client is closed`);
    assert(typeof jobDone === 'function', `${this.name}: a job needs a callback`);
    assert(this.jobsInFlight < KCOPYD_JOBS_IN_FLIGHT_MAX, `${this.name}: over ${KCOPYD_JOBS_IN_FLIGHT_MAX} jobs in flight`);

    const job = new KcopydJob(this.nextJobId++, source, destinations, segments, lengthSectors, options.ignoreError === true, jobDone);
    this.jobsInFlight++;
    this.jobStep(job, KCOPYD_JOB_EVENT.RUN);
    this.jobFill(job);
    // Only an empty job has no piece to wait for; its callback still runs from a microtask.
    if (job.piecesInFlightCount === 0) this.jobComplete(job);
    return job;
  }

  private regionCheck(what: string, r: KcopydRegion, lengthSectors: Sector): void {
    const name = `${this.name}: ${what} (${r.device.name})`;
    if (!Number.isSafeInteger(r.sector) || r.sector < 0 || !Number.isSafeInteger(r.lengthSectors) || r.lengthSectors < 0) {
      throw new DmError('DM_INVALID_ARGUMENT', `${name}: sector ${r.sector} and length ${r.lengthSectors} must be non-negative integers`);
    }
    if (r.lengthSectors !== lengthSectors) {
      throw new DmError('DM_INVALID_ARGUMENT', `${name}: length ${r.lengthSectors} differs from the job's ${lengthSectors} sectors`);
    }
    if (r.sector + r.lengthSectors > r.device.sizeSectors) {
      throw new DmError('DM_IO_RANGE', `${name}: [${r.sector}, +${r.lengthSectors}) is past the end (${r.device.sizeSectors} sectors)`);
    }
    const lbs = r.device.logicalBlockSizeBytes;
    if (sectorsToBytes(r.sector) % lbs !== 0 || sectorsToBytes(r.lengthSectors) % lbs !== 0 || this.subJobSizeBytes % lbs !== 0) {
      throw new DmError('DM_IO_ALIGNMENT', `${name}: region or ${this.subJobSizeSectors}-sector pieces not aligned to ${lbs} bytes`);
    }
  }

  /** Starts pieces until the job has piecesInFlightPerJobMax in flight, runs out, or stops on an error. */
  private jobFill(job: KcopydJob): void {
    // Bounded: each turn adds a piece in flight, and the loop stops at piecesInFlightPerJobMax.
    while (job.piecesInFlightCount < this.piecesInFlightPerJobMax && job.nextOffsetSectors < job.lengthSectors && !job.stopped) {
      const offsetSectors = job.nextOffsetSectors;
      const lengthSectors = sectors(Math.min(this.subJobSizeSectors, job.lengthSectors - offsetSectors));
      const piece = new KcopydPiece(this.nextPieceId++, job, offsetSectors, lengthSectors);
      job.nextOffsetSectors = sectors(offsetSectors + lengthSectors);
      job.nextPieceIndex++;
      job.piecesInFlightCount++;
      this.piecesInFlight++;
      this.pieceStart(piece);
    }
  }

  private jobStep(job: KcopydJob, eventIndex: number): void {
    const from = job.state;
    job.state = KCOPYD_JOB_MACHINE.step(from, eventIndex);
    if (this.observer !== undefined) this.observer('job', job.id, from, eventIndex, job.state, job.id);
    if (this.log !== undefined && this.log.traceEnabled) this.jobTrace(job);
  }

  private jobTrace(job: KcopydJob): void {
    const complete = job.state === KCOPYD_JOB_STATE.COMPLETE;
    const e: DmEvent = {
      type: 'kcopyd.job',
      jobId: job.id,
      state: KCOPYD_JOB_MACHINE.stateNames[job.state],
      sourceSector: job.source?.sector,
      lengthSectors: job.lengthSectors,
      destinations: job.destinations.length + job.segments.length,
      readError: complete ? job.readError : undefined,
      writeErrorMask: complete ? job.writeErrorMask : undefined,
    };
    this.log!.trace(e);
  }

  private jobComplete(job: KcopydJob): void {
    assert(job.piecesInFlightCount === 0 && (job.stopped || job.nextOffsetSectors === job.lengthSectors), `${this.name}: job ${job.id} completed early`);
    this.jobStep(job, KCOPYD_JOB_EVENT.ALL_PIECES_DONE);
    this.completed.push(job);
    if (!this.completedScheduled) {
      this.completedScheduled = true;
      queueMicrotask(this.completedRunBound);
    }
  }

  /** Runs the callbacks of completed jobs in completion order (the "one worker" of a Linux client). */
  private completedRun(): void {
    try {
      // Bounded by the jobs in flight; a job a callback starts completes in a later microtask at the earliest.
      while (this.completedHeadIndex < this.completed.length) {
        const job = this.completed[this.completedHeadIndex++];
        this.jobsInFlight--;
        job.jobDone(job.readError, job.writeErrorMask);
      }
    } finally {
      if (this.completedHeadIndex < this.completed.length) {
        // A callback threw (a bug, reported as such); the later callbacks still run, in order.
        queueMicrotask(this.completedRunBound);
      } else {
        this.completed = [];
        this.completedHeadIndex = 0;
        this.completedScheduled = false;
        if (this.jobsInFlight === 0 && this.closed) this.closeFinish();
      }
    }
  }

  private closeFinish(): void {
    this.buffersDrop();
    const waiters = this.closeWaiters;
    this.closeWaiters = [];
    for (const w of waiters) w();
  }

  private pieceStep(piece: KcopydPiece, eventIndex: number): void {
    const from = piece.state;
    piece.state = KCOPYD_PIECE_MACHINE.step(from, eventIndex);
    if (this.observer !== undefined) this.observer('piece', piece.id, from, eventIndex, piece.state, piece.job.id);
  }

  /** A piece in START: a zero piece writes at once; a copy piece reads once it has a buffer. */
  private pieceStart(piece: KcopydPiece): void {
    if (piece.job.source === undefined) {
      this.pieceStep(piece, KCOPYD_PIECE_EVENT.ZERO);
      const lengthBytes = sectorsToBytes(piece.lengthSectors);
      this.zeroBuffer ??= Buffer.alloc(this.subJobSizeBytes);
      piece.data = lengthBytes === this.subJobSizeBytes ? this.zeroBuffer : this.zeroBuffer.subarray(0, lengthBytes);
      this.pieceWrite(piece);
      return;
    }
    const buffer = this.bufferGet();
    if (buffer !== undefined) {
      this.pieceRead(piece, buffer);
      return;
    }
    // Wait for pages: FIFO over all jobs, so a big job cannot starve the others of buffers.
    if (this.waitingTail === undefined) this.waitingHead = piece;
    else this.waitingTail.nextWaiting = piece;
    this.waitingTail = piece;
    this.piecesWaiting++;
  }

  private pieceRead(piece: KcopydPiece, buffer: Buffer): void {
    const source = piece.job.source;
    assert(source !== undefined && piece.buffer === undefined, `${this.name}: piece ${piece.id} read without a source or with a buffer`);
    const lengthBytes = sectorsToBytes(piece.lengthSectors);
    piece.buffer = buffer;
    piece.data = lengthBytes === buffer.byteLength ? buffer : buffer.subarray(0, lengthBytes);
    this.pieceStep(piece, KCOPYD_PIECE_EVENT.READ);
    source.device.read(sectors(source.sector + piece.offsetSectors), piece.data).then(
      () => this.pieceReadDone(piece, false),
      () => this.pieceReadDone(piece, true),
    );
  }

  private pieceReadDone(piece: KcopydPiece, failed: boolean): void {
    if (failed) {
      this.pieceStep(piece, KCOPYD_PIECE_EVENT.READ_ERROR);
      piece.job.readError = true;
      this.pieceDone(piece);
      return;
    }
    this.pieceStep(piece, KCOPYD_PIECE_EVENT.READ_DONE);
    this.pieceWrite(piece);
  }

  /** A piece in WRITING: writes `data` to every destination (or the segments it overlaps) at once. */
  private pieceWrite(piece: KcopydPiece): void {
    if (piece.job.segments.length > 0) return this.pieceWriteSegments(piece);
    const destinations = piece.job.destinations;
    piece.writesPendingCount = destinations.length;
    // Bounded by KCOPYD_DESTINATIONS_MAX.
    for (let i = 0; i < destinations.length; i++) {
      const d = destinations[i];
      d.device.write(sectors(d.sector + piece.offsetSectors), piece.data).then(
        () => this.pieceWriteDone(piece, i, false),
        () => this.pieceWriteDone(piece, i, true),
      );
    }
  }

  /** A scatter piece: each segment it overlaps gets its slice of the piece's data. */
  private pieceWriteSegments(piece: KcopydPiece): void {
    const segments = piece.job.segments;
    const pieceStart = piece.offsetSectors;
    const pieceEnd = pieceStart + piece.lengthSectors;
    // The segments are consecutive from 0: the overlapping ones form one range, found from both ends (≤ 32).
    let first = 0;
    while (segments[first].sourceOffsetSectors + segments[first].lengthSectors <= pieceStart) first++;
    let last = first;
    while (last + 1 < segments.length && segments[last + 1].sourceOffsetSectors < pieceEnd) last++;
    piece.writesPendingCount = last - first + 1;
    for (let i = first; i <= last; i++) {
      const seg = segments[i];
      const from = Math.max(pieceStart, seg.sourceOffsetSectors);
      const to = Math.min(pieceEnd, seg.sourceOffsetSectors + seg.lengthSectors);
      const data = piece.data.subarray(sectorsToBytes(sectors(from - pieceStart)), sectorsToBytes(sectors(to - pieceStart)));
      seg.device.write(sectors(seg.sector + from - seg.sourceOffsetSectors), data).then(
        () => this.pieceWriteDone(piece, i, false),
        () => this.pieceWriteDone(piece, i, true),
      );
    }
  }

  private pieceWriteDone(piece: KcopydPiece, destinationIndex: number, failed: boolean): void {
    if (failed) piece.writeErrorMask |= 1 << destinationIndex;
    assert(piece.writesPendingCount > 0, `${this.name}: piece ${piece.id} has no write pending`);
    if (--piece.writesPendingCount > 0) return;
    this.pieceStep(piece, piece.writeErrorMask === 0 ? KCOPYD_PIECE_EVENT.WRITE_DONE : KCOPYD_PIECE_EVENT.WRITE_ERROR);
    piece.job.writeErrorMask |= piece.writeErrorMask;
    this.pieceDone(piece);
  }

  /** A piece in DONE: frees its buffer, lets its job start the next piece or complete. */
  private pieceDone(piece: KcopydPiece): void {
    assert(KCOPYD_PIECE_MACHINE.isFinal[piece.state], `${this.name}: piece ${piece.id} done in ${KCOPYD_PIECE_MACHINE.stateNames[piece.state]}`);
    const job = piece.job;
    const buffer = piece.buffer;
    piece.buffer = undefined;
    piece.data = EMPTY;
    job.piecesInFlightCount--;
    job.piecesDoneCount++;
    this.piecesInFlight--;
    if (buffer !== undefined) this.bufferPut(buffer);
    this.jobFill(job);
    if (job.piecesInFlightCount === 0) this.jobComplete(job);
  }

  private bufferGet(): Buffer | undefined {
    if (this.buffersFree.length > 0) return this.buffersFree.pop();
    if (this.buffersAllocatedCount < this.bufferPoolPieces) {
      this.buffersAllocatedCount++;
      return Buffer.alloc(this.subJobSizeBytes);
    }
    return undefined;
  }

  /** Hands a freed buffer to the first waiting piece, or back to the pool. */
  private bufferPut(buffer: Buffer): void {
    const piece = this.waitingHead;
    if (piece === undefined) {
      this.buffersFree.push(buffer);
      return;
    }
    this.waitingHead = piece.nextWaiting;
    if (this.waitingHead === undefined) this.waitingTail = undefined;
    piece.nextWaiting = undefined;
    this.piecesWaiting--;
    this.pieceRead(piece, buffer);
  }

  private buffersDrop(): void {
    assert(this.piecesInFlight === 0 && this.waitingHead === undefined, `${this.name}: buffers dropped with pieces in flight`);
    this.buffersFree = [];
    this.buffersAllocatedCount = 0;
    this.zeroBuffer = undefined;
  }
}
