/**
 * A plain-data model of an xstate machine definition (machines/*.ts): every state, every transition with its
 * event, targets, guard and actions by name. The exports (src/inspect/machine-export.ts), the path listings and the
 * coverage reports (src/inspect/machine-coverage.ts) are all built from it, and `dmstate machines --format json`
 * prints it as it is.
 *
 * It is read from the machine's state nodes (machine.root) rather than machine.toJSON(): toJSON drops inline
 * guards and turns inline actions into null, so a transition guarded by a function would look unguarded.
 * Names: a named guard/action is its name; an xstate built-in is its type (`xstate.assign`, `and(a, not(b))`); an
 * inline function is its function name, or `inline` for an anonymous one. Parameters are left out (they may be
 * functions of the context). The entry/exit actions xstate adds to implement `after` (raise and cancel of an
 * `xstate.after.*` event) are left out; the delayed transition itself is listed with that event name.
 *
 * Transitions on the machine root (a top-level `on`) and a parallel root are refused: SCXML cannot attach
 * transitions to <scxml>, and no machine in machines/ has either (wrap the states in one top-level state instead).
 */
import type { AnyStateMachine } from 'xstate';
import { MACHINES } from '../../machines/index.js';
import { DmError } from '../core/errors.js';

export const MACHINE_MODEL_FORMAT = 'dmstate.machine.v1';

export type MachineStateType = 'atomic' | 'compound' | 'parallel' | 'final' | 'history';

export interface MachineStateModel {
  /** Dotted key path from the root: `SUBMITTED`, or `A.a` for a child state; unique, used as the state's id. */
  readonly path: string;
  readonly key: string;
  /** Path of the parent state, absent for a top-level state. */
  readonly parent?: string;
  readonly type: MachineStateType;
  /** For a history state. */
  readonly history?: 'shallow' | 'deep';
  /** For a compound state: the path of its initial child. */
  readonly initial?: string;
  readonly children: readonly string[];
  readonly entry: readonly string[];
  readonly exit: readonly string[];
  /** Names (src) of the actors the state invokes. */
  readonly invoke: readonly string[];
}

export interface MachineTransitionModel {
  /** Path of the state the transition leaves. */
  readonly source: string;
  /** The event type; '' for an eventless (`always`) transition, `xstate.after.*` for a delayed one. */
  readonly event: string;
  /** Paths of the target states; empty for a targetless transition (actions only, the state is not left). */
  readonly targets: readonly string[];
  readonly guard?: string;
  readonly actions: readonly string[];
  /** xstate's `reenter`: a transition to the source itself or a descendant exits and re-enters the source. */
  readonly reenter: boolean;
}

export interface MachineModel {
  readonly format: typeof MACHINE_MODEL_FORMAT;
  /** The name in machines/index.ts MACHINES (the machine's id for other machines). */
  readonly name: string;
  readonly id: string;
  /** Path of the initial top-level state. */
  readonly initial: string;
  /** Every state, depth first in definition order. */
  readonly states: readonly MachineStateModel[];
  /** Every transition, by source state in the order of `states`, then in definition order. */
  readonly transitions: readonly MachineTransitionModel[];
  /** The events a sender can send (sorted): every transition's event but eventless and `xstate.*` ones. */
  readonly events: readonly string[];
}

/** A machine of machines/ by name, a machine definition, or its model. */
export type MachineRef = string | AnyStateMachine | MachineModel;

/** The names of the machines in machines/, in their MACHINES order. */
export function machineNames(): string[] {
  return Object.keys(MACHINES);
}

/** The machine definition for a name of machines/; an unknown name is a DM_INVALID_ARGUMENT listing the names. */
export function machineByName(name: string): AnyStateMachine {
  if (!Object.prototype.hasOwnProperty.call(MACHINES, name)) {
    throw new DmError('DM_INVALID_ARGUMENT', `unknown machine '${name}' (machines: ${machineNames().join(', ')})`);
  }
  return (MACHINES as Record<string, AnyStateMachine>)[name];
}

const isModel = (ref: MachineRef): ref is MachineModel => typeof ref === 'object' && (ref as MachineModel).format === MACHINE_MODEL_FORMAT;

/** The xstate machine behind a reference (a model has none: it is data). */
export function machineOf(ref: string | AnyStateMachine): { name: string; machine: AnyStateMachine } {
  if (typeof ref === 'string') return { name: ref, machine: machineByName(ref) };
  const entry = Object.entries(MACHINES).find(([, m]) => m === ref);
  return { name: entry ? entry[0] : ref.id, machine: ref };
}

/** The model of a machine (a model is returned as it is). */
export function machineModel(ref: MachineRef): MachineModel {
  if (isModel(ref)) return ref;
  const { name, machine } = machineOf(ref);
  const root = machine.root as unknown as NodeLike;
  if (root.transitions.size > 0 || (root.always?.length ?? 0) > 0 || root.type === 'parallel') {
    throw new DmError('DM_NOT_SUPPORTED', `machine ${name}: transitions on the machine root and a parallel root are not supported; wrap the states in one state`);
  }
  const states: MachineStateModel[] = [];
  const transitions: MachineTransitionModel[] = [];
  const visit = (node: NodeLike): void => {
    const path = pathOf(node);
    const children = Object.values(node.states);
    states.push({
      path,
      key: node.key,
      ...(node.path.length > 1 ? { parent: node.path.slice(0, -1).join('.') } : {}),
      type: node.type,
      ...(node.history ? { history: node.history } : {}),
      ...(node.type === 'compound' && node.initial ? { initial: node.initial.target.map(pathOf).join(' ') } : {}),
      children: children.map(pathOf),
      entry: ownActions(node.entry),
      exit: ownActions(node.exit),
      invoke: (node.invoke ?? []).map((inv) => (typeof inv.src === 'string' ? inv.src : inv.id ?? 'inline')),
    });
    const defs = [...[...node.transitions.values()].flat(), ...(node.always ?? [])];
    for (const t of defs) {
      const guard = guardName(t.guard);
      transitions.push({
        source: path,
        event: t.eventType,
        targets: (t.target ?? []).map(pathOf),
        ...(guard !== undefined ? { guard } : {}),
        actions: t.actions.map(actionName),
        reenter: t.reenter,
      });
    }
    children.forEach(visit);
  };
  Object.values(root.states).forEach(visit);
  const events = [...new Set(transitions.map((t) => t.event))].filter((e) => e !== '' && !e.startsWith('xstate.')).sort();
  const initial = root.initial?.target.map(pathOf).join(' ');
  if (initial === undefined) throw new DmError('DM_NOT_SUPPORTED', `machine ${name} has no initial state`);
  return { format: MACHINE_MODEL_FORMAT, name, id: machine.id, initial, states, transitions, events };
}

/** True when every state is top-level, atomic or final, and every transition is an event's: what the compiled
 *  transition tables (src/core/compiled-machine.ts) and the coverage reports handle. */
export function isFlatModel(model: MachineModel): boolean {
  return model.states.every((s) => s.parent === undefined && (s.type === 'atomic' || s.type === 'final')) &&
    model.transitions.every((t) => t.event !== '' && !t.event.startsWith('xstate.') && t.targets.length <= 1);
}

/** The dotted paths of every state active in a snapshot value (ancestors included), e.g. {A: 'a'} → A, A.a. */
export function activeStatePaths(value: unknown, prefix = ''): string[] {
  if (typeof value === 'string') return [prefix + value];
  if (value === null || typeof value !== 'object') return [];
  const out: string[] = [];
  for (const [k, v] of Object.entries(value as Record<string, unknown>)) {
    out.push(prefix + k, ...activeStatePaths(v, `${prefix}${k}.`));
  }
  return out;
}

/** The deepest active states of a snapshot value, joined with ', ' (one for a machine without parallel states). */
export function stateLabel(value: unknown): string {
  const paths = activeStatePaths(value);
  return paths.filter((p) => !paths.some((q) => q.startsWith(p + '.'))).join(', ');
}

// The parts of xstate's StateNode and TransitionDefinition read here (their generic types are unwieldy).
interface TransitionLike {
  readonly eventType: string;
  readonly target?: readonly NodeLike[];
  readonly guard?: unknown;
  readonly actions: readonly unknown[];
  readonly reenter: boolean;
}
interface NodeLike {
  readonly key: string;
  readonly path: readonly string[];
  readonly type: MachineStateType;
  readonly history: false | 'shallow' | 'deep';
  readonly states: Record<string, NodeLike>;
  readonly initial?: { readonly target: readonly NodeLike[] };
  readonly entry: readonly unknown[];
  readonly exit: readonly unknown[];
  readonly invoke?: ReadonlyArray<{ readonly src: unknown; readonly id?: string }>;
  readonly transitions: Map<string, readonly TransitionLike[]>;
  readonly always?: readonly TransitionLike[];
}

const pathOf = (node: NodeLike): string => node.path.join('.');

// A function literal gets the name of the property it is written in (`guard: () => ...` is named 'guard').
const INFERRED_FUNCTION_NAMES = new Set(['', 'guard', 'actions', 'entry', 'exit', 'anonymous']);
const functionName = (f: { name: string }): string => (INFERRED_FUNCTION_NAMES.has(f.name) ? 'inline' : f.name);

function actionName(action: unknown): string {
  if (typeof action === 'string') return action;
  const type = (action as { type?: unknown } | null)?.type;
  if (typeof type === 'string') return type;
  return typeof action === 'function' ? functionName(action) : 'inline';
}

/** Entry/exit actions without the raise/cancel pairs xstate generates for `after` transitions. */
function ownActions(actions: readonly unknown[]): string[] {
  return actions
    .filter((a) => {
      const generated = a as { type?: unknown; id?: unknown; sendId?: unknown };
      const id = generated.type === 'xstate.raise' ? generated.id : generated.type === 'xstate.cancel' ? generated.sendId : undefined;
      return !(typeof id === 'string' && id.startsWith('xstate.after.'));
    })
    .map(actionName);
}

function guardName(guard: unknown): string | undefined {
  if (guard === undefined) return undefined;
  if (typeof guard === 'string') return guard;
  if (typeof guard === 'function') {
    const g = guard as { name: string; guards?: unknown[]; check?: unknown; stateValue?: unknown };
    if (Array.isArray(g.guards) && typeof g.check === 'function') return `${g.name}(${g.guards.map(guardName).join(', ')})`;
    if ('stateValue' in g) return `stateIn(${JSON.stringify(g.stateValue)})`;
    return functionName(g);
  }
  const type = (guard as { type?: unknown } | null)?.type;
  return typeof type === 'string' ? type : 'inline';
}
