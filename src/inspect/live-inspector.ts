/**
 * Live inspection: the engine's actors as xstate-style inspection records, for whoever watches (the daemon's
 * `inspect` stream, `openPool().inspect$()`), and nothing at all when nobody does.
 *
 * Sources: the compiled bio machine of every mapped device (MappedDevice.bioObserver), the kcopyd clients the
 * targets share (KcopydClient.observer), the merge machine, whose transitions are already 'merge.state' events on
 * the log, and the mirrors' write groups, write transactions and resyncs (MirrorSet.setInspectObserver, on the
 * mirror sets of the engine's MirrorSets, a shared object the mirror target creates). Each step becomes an '@xstate.event' (event type, from-state) and an
 * '@xstate.snapshot' (the state reached); the first time an actor is seen, an '@xstate.actor' comes first.
 *
 * Cost: while no watch wants bios of a device, its bioObserver stays undefined and the hot path pays one
 * comparison (mapped-device.ts); kcopyd clients get no observer, the merge events are not subscribed, and a mirror
 * set's stepObserver stays undefined unless a watch wants a mirror kind on its device (write-group.ts and
 * resync-driver.ts pay one comparison per step). A watch
 * is sampled per actor kind: at most `maxEventsPerSecond` records a second start new actors; the records of an
 * actor already admitted always go out, so every actor a watcher sees has its whole lifecycle from the moment it
 * was first seen (the budget can be exceeded by the remaining steps of actors in flight). Actors not admitted are
 * counted and reported in 'dmstate.inspect.dropped' records, at most once a second per kind.
 */
import { Observable, type Subscription } from 'rxjs';
import { MACHINES, type MachineName } from '../../machines/index.js';
import { BIO_MACHINE, type Bio } from '../core/bio.js';
import { compileMachine } from '../core/compiled-machine.js';
import type { Clock, ClockTimer } from '../core/clock.js';
import { DmError } from '../core/errors.js';
import type { BioObserver, MappedDevice } from '../core/mapped-device.js';
import { KCOPYD_JOB_MACHINE, KCOPYD_PIECE_MACHINE, KcopydClient, type KcopydObserver } from '../kcopyd/kcopyd.js';
import type { LoggedEvent } from '../log/events.js';
import { MirrorSets, type MirrorGroupIds, type MirrorMachineName, type MirrorSet, type MirrorSetsListener, type MirrorStepObserver } from '../targets/mirror/mirror-set.js';
import { RESYNC_MACHINE } from '../targets/mirror/resync-driver.js';
import { WRITE_GROUP_MACHINE, WRITE_TRANSACTION_MACHINE, type WriteGroup } from '../targets/mirror/write-group.js';

/** An actor kind is the name of its machine definition (machines/index.ts). */
export type InspectActorKind = MachineName;
export const INSPECT_ACTOR_KINDS: readonly InspectActorKind[] = Object.keys(MACHINES) as InspectActorKind[];
/** Default sampling budget per actor kind. */
export const INSPECT_EVENTS_PER_SECOND_DEFAULT = 1000;
/** Largest accepted budget (0 means unlimited). */
export const INSPECT_EVENTS_PER_SECOND_MAX = 10_000_000;
const WINDOW_MS = 1000;
const MERGE_MACHINE = compileMachine(MACHINES.merge);

export interface InspectFilter {
  /** Mapped device names; none = every device. Engine-wide actors (kcopyd) have no device: see `kinds`. */
  readonly devices?: readonly string[];
  /**
   * Actor kinds; none = every kind. With a device filter, engine-wide actors (kcopyd) are included only when
   * their kind is named here.
   */
  readonly kinds?: readonly InspectActorKind[];
  /** Records a second per kind that may start new actors; 0 = no limit. INSPECT_EVENTS_PER_SECOND_DEFAULT. */
  readonly maxEventsPerSecond?: number;
}

export type InspectStatus = 'active' | 'done';

interface RecordBase {
  /** Position in this watch's stream (records delivered so far + 1). */
  readonly seq: number;
  /** The engine clock's time. */
  readonly timeMs: number;
  readonly kind: InspectActorKind;
  /**
   * Unique while the actor lives: 'bio:DEVICE:ID', 'merge:DEVICE', 'kcopyd-job:CLIENT:ID', 'kcopyd-piece:CLIENT:ID',
   * 'mirror-write-group:DEVICE:N', 'mirror-write-transaction:DEVICE:N.LEG' (LEG: the mirror leg's index, as in
   * `readd`), 'mirror-resync:DEVICE' ('mirror-resync:DEVICE@SECTOR' for a mirror target that does not start at
   * sector 0). A table reload makes a new resync actor with the same id: it starts with a new '@xstate.actor'.
   */
  readonly actorId: string;
  /** The mapped device the actor belongs to; undefined for engine-wide actors (kcopyd). */
  readonly device: string | undefined;
}

export interface InspectActorRecord extends RecordBase {
  readonly type: '@xstate.actor';
  /** The actor's state when first seen (its initial state unless the watch started while it ran). */
  readonly value: string;
  readonly status: InspectStatus;
  /** A kcopyd piece's job; a mirror write transaction's write group. */
  readonly parentId?: string;
  /**
   * What the actor works on: a bio's op, sector and length; a mirror write group's bio (actor id), op, sector,
   * length and region; a write transaction's leg (index) and legDevice; a resync's regions and regionSectors.
   */
  readonly info?: Readonly<Record<string, string | number | boolean>>;
}

export interface InspectEventRecord extends RecordBase {
  readonly type: '@xstate.event';
  readonly event: string;
  /** The state the event arrived in. */
  readonly from: string;
}

export interface InspectSnapshotRecord extends RecordBase {
  readonly type: '@xstate.snapshot';
  readonly event: string;
  readonly from: string;
  /** The state reached. */
  readonly value: string;
  readonly status: InspectStatus;
}

export interface InspectDroppedRecord {
  readonly type: 'dmstate.inspect.dropped';
  readonly seq: number;
  readonly timeMs: number;
  readonly kind: InspectActorKind;
  /** Records not delivered since the last report of this kind. */
  readonly events: number;
  /** Actors not admitted since the last report (sampling). */
  readonly actors: number;
  /** 'rate': over the sampling budget; 'backlog': the consumer fell behind (e.g. a full socket). */
  readonly reason: 'rate' | 'backlog';
}

export type InspectionRecord = InspectActorRecord | InspectEventRecord | InspectSnapshotRecord | InspectDroppedRecord;

/** Delivers one record; returning false means it could not be taken (counted as dropped, reason 'backlog'). */
export type InspectSink = (record: InspectionRecord) => void | boolean;

export interface InspectWatchStats {
  readonly delivered: number;
  readonly droppedEvents: number;
  readonly droppedActors: number;
  readonly droppedBacklog: number;
}

export interface InspectWatch {
  readonly filter: Readonly<Required<InspectFilter>>;
  stats(): InspectWatchStats;
  unsubscribe(): void;
}

/** Counters for tests and benchmarks: how often the hub was entered from an actor's path. */
export interface LiveInspectorStats {
  readonly watches: number;
  readonly observedSteps: number;
  readonly recordsBuilt: number;
}

/** Checks and completes a filter (bad input: DM_INVALID_ARGUMENT). */
export function normalizeInspectFilter(filter: InspectFilter = {}): Readonly<Required<InspectFilter>> {
  const devices = filter.devices ?? [];
  const kinds = filter.kinds ?? [];
  if (!Array.isArray(devices) || devices.some((d) => typeof d !== 'string' || d.length === 0)) {
    throw new DmError('DM_INVALID_ARGUMENT', 'inspect: devices must be a list of device names');
  }
  if (!Array.isArray(kinds)) throw new DmError('DM_INVALID_ARGUMENT', 'inspect: kinds must be a list of actor kinds');
  for (const k of kinds) {
    if (!INSPECT_ACTOR_KINDS.includes(k)) {
      throw new DmError('DM_INVALID_ARGUMENT', `inspect: unknown actor kind '${String(k)}' (one of ${INSPECT_ACTOR_KINDS.join(', ')})`);
    }
  }
  const rate = filter.maxEventsPerSecond ?? INSPECT_EVENTS_PER_SECOND_DEFAULT;
  if (!Number.isSafeInteger(rate) || rate < 0 || rate > INSPECT_EVENTS_PER_SECOND_MAX) {
    throw new DmError('DM_INVALID_ARGUMENT', `inspect: maxEventsPerSecond must be an integer from 0 (no limit) to ${INSPECT_EVENTS_PER_SECOND_MAX}, got ${String(rate)}`);
  }
  return { devices: [...new Set(devices)], kinds: [...new Set(kinds)], maxEventsPerSecond: rate };
}

/** Calls both observers (the engine's xstate checker and the live inspector), or the one that is set. */
export function combineBioObservers(a: BioObserver | undefined, b: BioObserver | undefined): BioObserver | undefined {
  if (a === undefined) return b;
  if (b === undefined) return a;
  return (device, bio, from, eventIndex) => {
    a(device, bio, from, eventIndex);
    b(device, bio, from, eventIndex);
  };
}

interface KindWindow {
  startMs: number;
  count: number;
  droppedEvents: number;
  droppedActors: number;
  droppedBacklog: number;
}

/** One watcher: its filter, its sampling windows, which actors it admitted. */
class Watch implements InspectWatch {
  private nextSeq = 1;
  private readonly windows = new Map<InspectActorKind, KindWindow>();
  /**
   * Bios admitted (few, by sampling); the many refused ones cost no memory. A bio with an id above the last one
   * seen on its device is new; one at or below it was seen, and is followed only if admitted. Bio ids grow per
   * device and a bio takes its first step before any later bio does, except a flush sent to several targets,
   * whose first bio steps after its clones: that bio, and bios already in flight when the watch starts that step
   * after a newer one, count as refused.
   */
  readonly bioAdmitted = new WeakSet<Bio>();
  readonly lastBioId = new WeakMap<MappedDevice, number>();
  /** Admission per keyed actor ('merge:DEV', 'kcopyd-job:CLIENT:ID'); deleted when the actor reaches a final state. */
  readonly keyedAdmitted = new Map<string, boolean>();
  /**
   * Mirror actors decided on, by their object (a WriteGroup for the group and its transactions, the MirrorSet for
   * its resync): bit 2k set when decided, bit 2k+1 when admitted; k = 0 for the group or the resync, 1 + I for a
   * transaction (I its index in the group's legs; at most 9 legs). Gone with the object. As for bios, the many
   * groups and transactions refused by sampling are not recorded: one that leaves its initial state is new, one
   * that steps from another state without an entry was refused, unless its group was already in flight when the
   * watch started (`mirrorGroupStart`: the device's next group id then), in which case it is new too.
   */
  readonly mirrorSeen = new WeakMap<object, number>();
  readonly mirrorGroupStart = new WeakMap<MirrorGroupIds, number>();
  private readonly kindSet: ReadonlySet<string>;
  private readonly deviceSet: ReadonlySet<string>;
  private totals = { delivered: 0, droppedEvents: 0, droppedActors: 0, droppedBacklog: 0 };
  closed = false;

  constructor(
    readonly filter: Readonly<Required<InspectFilter>>,
    private readonly sink: InspectSink,
    private readonly clock: Clock,
    private readonly onClose: (w: Watch) => void,
    private readonly onEnd: (() => void) | undefined,
  ) {
    this.kindSet = new Set(filter.kinds);
    this.deviceSet = new Set(filter.devices);
  }

  wantsKind(kind: InspectActorKind): boolean {
    return this.kindSet.size === 0 || this.kindSet.has(kind);
  }

  /** Whether this watch selects actors of `kind` on `device` (undefined: an engine-wide actor). */
  wants(kind: InspectActorKind, device: string | undefined): boolean {
    if (!this.wantsKind(kind)) return false;
    if (this.deviceSet.size === 0) return true;
    return device === undefined ? this.kindSet.has(kind) : this.deviceSet.has(device);
  }

  private window(kind: InspectActorKind): KindWindow {
    let w = this.windows.get(kind);
    if (w === undefined) {
      w = { startMs: this.clock.nowMs(), count: 0, droppedEvents: 0, droppedActors: 0, droppedBacklog: 0 };
      this.windows.set(kind, w);
    }
    return w;
  }

  /** Sampling: whether a newly seen actor of `kind` is followed. */
  admit(kind: InspectActorKind): boolean {
    const w = this.window(kind);
    const now = this.clock.nowMs();
    if (now - w.startMs >= WINDOW_MS) {
      this.reportDropped(kind, w);
      w.startMs = now;
      w.count = 0;
    }
    const limit = this.filter.maxEventsPerSecond;
    if (limit === 0 || w.count < limit) return true;
    w.droppedActors++;
    this.totals.droppedActors++;
    return false;
  }

  drop(kind: InspectActorKind, events: number): void {
    this.window(kind).droppedEvents += events;
    this.totals.droppedEvents += events;
  }

  deliver(record: InspectActorRecord | InspectEventRecord | InspectSnapshotRecord): void {
    const w = this.window(record.kind);
    w.count++;
    if (this.sink(record) === false) {
      w.droppedBacklog++;
      this.totals.droppedBacklog++;
      return;
    }
    this.nextSeq++;
    this.totals.delivered++;
  }

  get seq(): number {
    return this.nextSeq;
  }

  /** Emits the drops counted in a kind's window since its last report. */
  private reportDropped(kind: InspectActorKind, w: KindWindow): void {
    if (w.droppedEvents > 0 || w.droppedActors > 0) {
      const r: InspectDroppedRecord = { type: 'dmstate.inspect.dropped', seq: this.nextSeq, timeMs: this.clock.nowMs(), kind, events: w.droppedEvents, actors: w.droppedActors, reason: 'rate' };
      w.droppedEvents = 0;
      w.droppedActors = 0;
      if (this.sink(r) !== false) this.nextSeq++;
    }
    if (w.droppedBacklog > 0) {
      const r: InspectDroppedRecord = { type: 'dmstate.inspect.dropped', seq: this.nextSeq, timeMs: this.clock.nowMs(), kind, events: w.droppedBacklog, actors: 0, reason: 'backlog' };
      if (this.sink(r) !== false) {
        w.droppedBacklog = 0;
        this.nextSeq++;
      }
    }
  }

  /** Periodic: reports every kind's drops. */
  reportAllDropped(): void {
    for (const [kind, w] of this.windows) this.reportDropped(kind, w);
  }

  stats(): InspectWatchStats {
    return { ...this.totals };
  }

  unsubscribe(): void {
    if (this.closed) return;
    this.closed = true;
    this.onClose(this);
  }

  /** The engine closed: no more records. */
  end(): void {
    if (this.closed) return;
    this.unsubscribe();
    this.onEnd?.();
  }
}

export interface LiveInspectorOptions {
  readonly clock: Clock;
  /** The engine's events (merge transitions arrive as 'merge.state'). */
  readonly events$: Observable<LoggedEvent>;
  /** Called when the set of devices whose bios are watched may have changed: re-read bioObserverFor(). */
  readonly onBioWatchChange: () => void;
}

export class LiveInspector {
  private readonly watches = new Set<Watch>();
  /** Kcopyd clients the engine created (shared objects), with the observer they had before we attached. */
  private readonly kcopydClients = new Map<KcopydClient, { attached: boolean; previous: KcopydObserver | undefined; mine: KcopydObserver }>();
  /** Mirror sets alive (from the engine's MirrorSets), with our observer and whether it is set. */
  private readonly mirrorSets = new Map<MirrorSet, { attached: boolean; mine: MirrorStepObserver }>();
  private readonly mirrorListener: MirrorSetsListener = {
    added: (set) => {
      if (this.mirrorSets.has(set)) return;
      this.mirrorSets.set(set, { attached: false, mine: this.mirrorObserver(set) });
      this.reconfigureMirror(set);
    },
    removed: (set) => {
      const slot = this.mirrorSets.get(set);
      if (slot === undefined) return;
      if (slot.attached) set.setInspectObserver(undefined);
      this.mirrorSets.delete(set);
    },
  };
  private mergeSubscription: Subscription | undefined;
  private reportTimer: ClockTimer | undefined;
  private observedSteps = 0;
  private recordsBuilt = 0;

  constructor(private readonly options: LiveInspectorOptions) {}

  /**
   * Starts a watch: records go to `sink` synchronously, from the actors' own paths. `onEnd` runs if the engine
   * closes first.
   */
  subscribe(filter: InspectFilter | undefined, sink: InspectSink, onEnd?: () => void): InspectWatch {
    const watch = new Watch(normalizeInspectFilter(filter), sink, this.options.clock, (w) => this.remove(w), onEnd);
    for (const set of this.mirrorSets.keys()) watch.mirrorGroupStart.set(set.groupIds, set.groupIds.next);
    this.watches.add(watch);
    this.reconfigure();
    return watch;
  }

  /** The same as an RxJS Observable; unsubscribing stops the watch. */
  records$(filter?: InspectFilter): Observable<InspectionRecord> {
    const f = normalizeInspectFilter(filter); // bad filters throw here, not at subscribe time
    return new Observable<InspectionRecord>((subscriber) => {
      const w = this.subscribe(f, (r) => subscriber.next(r), () => subscriber.complete());
      return () => w.unsubscribe();
    });
  }

  get watching(): boolean {
    return this.watches.size > 0;
  }

  stats(): LiveInspectorStats {
    return { watches: this.watches.size, observedSteps: this.observedSteps, recordsBuilt: this.recordsBuilt };
  }

  /** The observer a device's bio path should call, or undefined when no watch wants its bios. */
  bioObserverFor(deviceName: string): BioObserver | undefined {
    for (const w of this.watches) if (w.wants('bio', deviceName)) return this.onBio;
    return undefined;
  }

  /** The engine hands over every shared object it creates; kcopyd clients and mirror sets are watched when asked for. */
  adopt(shared: unknown): void {
    if (shared instanceof MirrorSets) {
      if (shared.listener === this.mirrorListener) return;
      shared.listener = this.mirrorListener;
      for (const set of shared) this.mirrorListener.added(set);
      return;
    }
    if (!(shared instanceof KcopydClient) || this.kcopydClients.has(shared)) return;
    const client = shared;
    this.kcopydClients.set(client, { attached: false, previous: undefined, mine: this.kcopydObserver(client.name) });
    this.reconfigure();
  }

  /**
   * A transition of any other control-plane actor (for targets that drive their own machines): cheap to call
   * when nobody watches (`wants` first).
   */
  wants(kind: InspectActorKind, device: string | undefined): boolean {
    for (const w of this.watches) if (w.wants(kind, device)) return true;
    return false;
  }

  transition(kind: InspectActorKind, actorId: string, device: string | undefined, from: string, event: string, to: string, final: boolean, parentId?: string): void {
    this.observedSteps++;
    for (const w of this.watches) {
      if (!w.wants(kind, device)) continue;
      const seen = w.keyedAdmitted.get(actorId);
      const admitted = this.step(w, kind, actorId, device, seen, from, event, to, final, parentId, undefined, -1);
      if (final) w.keyedAdmitted.delete(actorId);
      else if (seen === undefined) w.keyedAdmitted.set(actorId, admitted);
    }
  }

  /** Ends every watch (engine close). */
  close(): void {
    for (const w of [...this.watches]) w.end();
  }

  // ---- internals -------------------------------------------------------------------------------------------

  private readonly onBio: BioObserver = (device: MappedDevice, bio: Bio, from: number, eventIndex: number) => {
    this.observedSteps++;
    const to = bio.state;
    for (const w of this.watches) {
      if (!w.wants('bio', device.name)) continue;
      const last = w.lastBioId.get(device);
      let seen: boolean | undefined;
      if (last === undefined || bio.id > last) w.lastBioId.set(device, bio.id);
      else seen = w.bioAdmitted.has(bio);
      const admitted = this.step(
        w, 'bio', undefined, device.name, seen,
        BIO_MACHINE.stateNames[from], BIO_MACHINE.eventNames[eventIndex], BIO_MACHINE.stateNames[to], BIO_MACHINE.isFinal[to], undefined, bio, -1,
      );
      if (seen === undefined && admitted) w.bioAdmitted.add(bio);
    }
  };

  private kcopydObserver(clientName: string): KcopydObserver {
    return (which, id, from, eventIndex, to, jobId) => {
      const kind: InspectActorKind = which === 'job' ? 'kcopyd-job' : 'kcopyd-piece';
      if (!this.wants(kind, undefined)) return;
      const m = which === 'job' ? KCOPYD_JOB_MACHINE : KCOPYD_PIECE_MACHINE;
      const parentId = which === 'piece' ? `kcopyd-job:${clientName}:${jobId}` : undefined;
      this.transition(kind, `${kind}:${clientName}:${id}`, undefined, m.stateNames[from], m.eventNames[eventIndex], m.stateNames[to], m.isFinal[to], parentId);
    };
  }

  /**
   * A mirror set's observer (set only while a watch wants a mirror kind on its device). Actors refused by sampling
   * cost a lookup that misses and no string (see Watch.mirrorSeen).
   */
  private mirrorObserver(set: MirrorSet): MirrorStepObserver {
    const device = set.deviceName;
    return (machine, group, index, from, eventIndex, to) => {
      this.observedSteps++;
      const m = MIRROR_MACHINES[machine];
      const subject: WriteGroup | MirrorSet = group ?? set;
      const decidedBit = index < 0 ? 1 : 1 << (2 + 2 * index);
      const admittedBit = decidedBit << 1;
      for (const w of this.watches) {
        if (!w.wants(machine, device)) continue;
        const bits = w.mirrorSeen.get(subject) ?? 0;
        let seen: boolean | undefined;
        if ((bits & decidedBit) !== 0) seen = (bits & admittedBit) !== 0;
        else if (group !== undefined && from !== m.initialIndex && !(group.id < (w.mirrorGroupStart.get(set.groupIds) ?? 0))) seen = false;
        const admitted = this.step(
          w, machine, undefined, device, seen,
          m.stateNames[from], m.eventNames[eventIndex], m.stateNames[to], m.isFinal[to], undefined, subject, index,
        );
        // Recorded: admitted actors, and those the watch met in flight (the resync; groups older than the watch).
        if (seen === undefined && (admitted || group === undefined || from !== m.initialIndex)) {
          w.mirrorSeen.set(subject, bits | decidedBit | (admitted ? admittedBit : 0));
        }
      }
    };
  }

  private onMergeEvent(e: LoggedEvent): void {
    if (e.type !== 'merge.state') return;
    if (!this.wants('merge', e.device)) return;
    const stateIndex = MERGE_MACHINE.stateNames.indexOf(e.state);
    const final = stateIndex >= 0 && MERGE_MACHINE.isFinal[stateIndex];
    this.transition('merge', `merge:${e.device}`, e.device, e.from, e.event, e.state, final);
  }

  /**
   * One step of one actor for one watch; returns whether the actor is admitted (sampling). Keyed actors pass their
   * id (and parent); bios and mirror actors pass their object (`subject`, and a transaction's `index` in its
   * group's legs), from which the id, parent and info are built only for an admitted actor.
   */
  private step(
    w: Watch, kind: InspectActorKind, actorId: string | undefined, device: string | undefined, seen: boolean | undefined,
    from: string, event: string, to: string, final: boolean, parentId: string | undefined, subject: Bio | WriteGroup | MirrorSet | undefined, index: number,
  ): boolean {
    let admitted = seen;
    let id = actorId;
    if (admitted === undefined) {
      admitted = w.admit(kind);
      if (!admitted) w.drop(kind, 1);
      else {
        id ??= subjectActorId(kind, device!, subject!, index);
        const parent = parentId ?? (subject !== undefined ? subjectParentId(kind, device!, subject) : undefined);
        const info = subject !== undefined ? subjectInfo(kind, device!, subject, index) : undefined;
        this.recordsBuilt++;
        w.deliver({
          type: '@xstate.actor', seq: w.seq, timeMs: this.options.clock.nowMs(), kind, actorId: id, device,
          value: from, status: 'active',
          ...(parent !== undefined ? { parentId: parent } : {}),
          ...(info !== undefined ? { info } : {}),
        });
      }
    }
    if (!admitted) {
      w.drop(kind, 2);
      return false;
    }
    id ??= subjectActorId(kind, device!, subject!, index);
    const timeMs = this.options.clock.nowMs();
    this.recordsBuilt += 2;
    w.deliver({ type: '@xstate.event', seq: w.seq, timeMs, kind, actorId: id, device, event, from });
    w.deliver({ type: '@xstate.snapshot', seq: w.seq, timeMs, kind, actorId: id, device, event, from, value: to, status: final ? 'done' : 'active' });
    return true;
  }

  private remove(w: Watch): void {
    this.watches.delete(w);
    this.reconfigure();
  }

  /** Attaches or detaches a mirror set's observer: set only while some watch wants a mirror kind on its device. */
  private reconfigureMirror(set: MirrorSet): void {
    const slot = this.mirrorSets.get(set);
    if (slot === undefined) return;
    const device = set.deviceName;
    const wanted = this.wants('mirror-write-group', device) || this.wants('mirror-write-transaction', device) || this.wants('mirror-resync', device);
    if (wanted !== slot.attached) {
      set.setInspectObserver(wanted ? slot.mine : undefined);
      slot.attached = wanted;
    }
  }

  /** Attaches or detaches the sources so that only what some watch wants costs anything. */
  private reconfigure(): void {
    this.options.onBioWatchChange();
    for (const set of this.mirrorSets.keys()) this.reconfigureMirror(set);
    const wantsKcopyd = this.wants('kcopyd-job', undefined) || this.wants('kcopyd-piece', undefined);
    for (const [client, slot] of this.kcopydClients) {
      if (wantsKcopyd && !slot.attached) {
        slot.previous = client.observer;
        const prev = slot.previous;
        client.observer = prev === undefined ? slot.mine : (...a) => {
          prev(...a);
          slot.mine(...a);
        };
        slot.attached = true;
      } else if (!wantsKcopyd && slot.attached) {
        client.observer = slot.previous;
        slot.previous = undefined;
        slot.attached = false;
      }
    }
    let wantsMerge = false;
    for (const w of this.watches) if (w.wantsKind('merge')) wantsMerge = true;
    if (wantsMerge && this.mergeSubscription === undefined) {
      this.mergeSubscription = this.options.events$.subscribe((e) => this.onMergeEvent(e));
    } else if (!wantsMerge && this.mergeSubscription !== undefined) {
      this.mergeSubscription.unsubscribe();
      this.mergeSubscription = undefined;
    }
    if (this.watches.size > 0 && this.reportTimer === undefined) this.armReportTimer();
    else if (this.watches.size === 0 && this.reportTimer !== undefined) {
      this.options.clock.clearTimeout(this.reportTimer);
      this.reportTimer = undefined;
    }
  }

  private armReportTimer(): void {
    this.reportTimer = this.options.clock.setTimeout(() => {
      this.reportTimer = undefined;
      for (const w of this.watches) w.reportAllDropped();
      if (this.watches.size > 0) this.armReportTimer();
    }, WINDOW_MS);
  }
}

const MIRROR_MACHINES = {
  'mirror-write-group': WRITE_GROUP_MACHINE,
  'mirror-write-transaction': WRITE_TRANSACTION_MACHINE,
  'mirror-resync': RESYNC_MACHINE,
} as const satisfies Record<MirrorMachineName, unknown>;

function bioActorId(device: string, bio: Bio): string {
  return `bio:${device}:${bio.id}`;
}

/** 'mirror-resync:DEVICE', or 'mirror-resync:DEVICE@SECTOR' for a mirror target that does not start at sector 0. */
function mirrorResyncActorId(set: MirrorSet): string {
  const begin = set.ctx.beginSector;
  return begin === 0 ? `mirror-resync:${set.deviceName}` : `mirror-resync:${set.deviceName}@${begin}`;
}

/** The id of an actor given by its object: a bio, a mirror write group (and a transaction's index), a mirror set. */
function subjectActorId(kind: InspectActorKind, device: string, subject: Bio | WriteGroup | MirrorSet, index: number): string {
  switch (kind) {
    case 'mirror-write-group':
      return `mirror-write-group:${device}:${(subject as WriteGroup).id}`;
    case 'mirror-write-transaction':
      return `mirror-write-transaction:${device}:${(subject as WriteGroup).id}.${(subject as WriteGroup).legs[index].index}`;
    case 'mirror-resync':
      return mirrorResyncActorId(subject as MirrorSet);
    default:
      return bioActorId(device, subject as Bio);
  }
}

function subjectParentId(kind: InspectActorKind, device: string, subject: Bio | WriteGroup | MirrorSet): string | undefined {
  return kind === 'mirror-write-transaction' ? `mirror-write-group:${device}:${(subject as WriteGroup).id}` : undefined;
}

function subjectInfo(kind: InspectActorKind, device: string, subject: Bio | WriteGroup | MirrorSet, index: number): Record<string, string | number | boolean> {
  switch (kind) {
    case 'mirror-write-group': {
      const g = subject as WriteGroup;
      const bio = g.bio;
      return {
        bio: bioActorId(device, bio), op: bio.op, sector: bio.sector, lengthSectors: bio.lengthSectors,
        ...(g.region >= 0 ? { region: g.region } : {}),
      };
    }
    case 'mirror-write-transaction': {
      const l = (subject as WriteGroup).legs[index];
      return { leg: l.index, legDevice: l.label };
    }
    case 'mirror-resync': {
      const set = subject as MirrorSet;
      return { regions: set.regionCount, regionSectors: set.regionSizeSectors };
    }
    default: {
      const bio = subject as Bio;
      return { op: bio.op, sector: bio.sector, lengthSectors: bio.lengthSectors };
    }
  }
}
