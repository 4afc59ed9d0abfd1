/**
 * Live inspection records as Stately inspector messages: the JSON objects @statelyai/inspect's adapters send
 * (types StatelyActorEvent / StatelyEventEvent / StatelySnapshotEvent in its src/types.ts, version 0.7.0): each
 * with sessionId (our actorId), rootId, createdAt, id and _version; '@xstate.actor' also carries the machine
 * definition (JSON of the machine config) so the inspector can draw it.
 *
 * Stateful: a snapshot message repeats the actor's context (device, bio op/sector), which only the actor record
 * carries; actors are forgotten when they reach a final state.
 */
import { MACHINES } from '../../machines/index.js';
import type { InspectionRecord } from './live-inspector.js';

/** The @statelyai/inspect release whose message shapes these follow. */
export const STATELY_PROTOCOL_VERSION = '0.7.0';

interface StatelyBase {
  readonly sessionId: string;
  readonly rootId: string;
  /** Milliseconds as a decimal string, as @statelyai/inspect sends Date.now().toString(). */
  readonly createdAt: string;
  /** Unique per message. */
  readonly id: string;
  readonly _version: string;
}

export interface StatelySnapshotValue {
  readonly status: 'active' | 'done';
  readonly value: string;
  readonly context: Readonly<Record<string, unknown>>;
}

export interface StatelyActorMessage extends StatelyBase {
  readonly type: '@xstate.actor';
  readonly name: string;
  readonly definition: string;
  readonly parentId: string | undefined;
  readonly snapshot: StatelySnapshotValue;
}

export interface StatelyEventMessage extends StatelyBase {
  readonly type: '@xstate.event';
  readonly event: { readonly type: string };
  readonly sourceId: string | undefined;
}

export interface StatelySnapshotMessage extends StatelyBase {
  readonly type: '@xstate.snapshot';
  readonly event: { readonly type: string };
  readonly snapshot: StatelySnapshotValue;
}

export type StatelyMessage = StatelyActorMessage | StatelyEventMessage | StatelySnapshotMessage;

const definitions = new Map<string, string>();
function definitionOf(kind: keyof typeof MACHINES): string {
  let d = definitions.get(kind);
  if (d === undefined) {
    d = JSON.stringify(MACHINES[kind].config);
    definitions.set(kind, d);
  }
  return d;
}

/** Converts one watch's records, in order, into Stately messages. */
export class StatelyBridge {
  private readonly actors = new Map<string, { rootId: string; context: Readonly<Record<string, unknown>> }>();
  private messageCount = 0;

  /** The message for a record; undefined for records the protocol has no place for (dropped counts). */
  convert(r: InspectionRecord): StatelyMessage | undefined {
    if (r.type === 'dmstate.inspect.dropped') return undefined;
    const base = { sessionId: r.actorId, createdAt: String(r.timeMs), id: `${r.actorId}#${++this.messageCount}`, _version: STATELY_PROTOCOL_VERSION };
    if (r.type === '@xstate.actor') {
      const context = { kind: r.kind, ...(r.device !== undefined ? { device: r.device } : {}), ...(r.info ?? {}) };
      const rootId = r.parentId !== undefined ? (this.actors.get(r.parentId)?.rootId ?? r.parentId) : r.actorId;
      this.actors.set(r.actorId, { rootId, context });
      return {
        type: '@xstate.actor', ...base, rootId, name: MACHINES[r.kind].id, definition: definitionOf(r.kind), parentId: r.parentId,
        snapshot: { status: r.status, value: r.value, context },
      };
    }
    const known = this.actors.get(r.actorId);
    const rootId = known?.rootId ?? r.actorId;
    if (r.type === '@xstate.event') return { type: '@xstate.event', ...base, rootId, event: { type: r.event }, sourceId: undefined };
    if (r.status === 'done') this.actors.delete(r.actorId);
    return {
      type: '@xstate.snapshot', ...base, rootId, event: { type: r.event },
      snapshot: { status: r.status, value: r.value, context: known?.context ?? { kind: r.kind } },
    };
  }
}
