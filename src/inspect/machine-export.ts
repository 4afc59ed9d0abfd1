/**
 * Exports of the machines in machines/ (or any xstate machine) for reading and for other tools, all pure functions
 * of the machine model (src/inspect/machine-model.ts):
 *
 * - json: the model itself (states, transitions with events, guards and actions by name).
 * - mermaid: a `stateDiagram-v2`; a transition's label is `EVENT [guard] / action, action`.
 * - dot: a Graphviz digraph; compound and parallel states are clusters (edges to and from them are drawn to their
 *   first leaf with lhead/ltail).
 * - scxml: a W3C SCXML 1.0 document. Guards go in `cond` as the guard's NAME (not an expression any datamodel can
 *   evaluate: the implementations live in TypeScript). Actions are named elements in dmstate's own namespace,
 *   `<dm:action name="..."/>` inside <transition>, <onentry> and <onexit>, rather than <script>: SCXML 1.0 (4.1)
 *   allows executable content in other namespaces, and a name says which TypeScript function runs, where a
 *   <script> would need code. Delayed transitions keep xstate's event name (`xstate.after.DELAY.ID`), eventless
 *   ones have no `event` attribute.
 *
 * machinePaths lists the shortest path to each state and the simple paths (no state twice) from xstate/graph, as
 * event sequences.
 */
import type { AnyStateMachine } from 'xstate';
import { getShortestPaths, getSimplePaths } from 'xstate/graph';
import { DmError } from '../core/errors.js';
import {
  activeStatePaths, machineModel, machineOf, stateLabel, type MachineModel, type MachineRef, type MachineStateModel,
  type MachineTransitionModel,
} from './machine-model.js';

export const MACHINE_EXPORT_FORMATS = ['json', 'mermaid', 'dot', 'scxml'] as const;
export type MachineExportFormat = (typeof MACHINE_EXPORT_FORMATS)[number];

/** The file name extension of each format (`dmstate machines --out DIR` writes NAME.EXT). */
export const MACHINE_EXPORT_EXTENSIONS: Record<MachineExportFormat, string> = { json: 'json', mermaid: 'mmd', dot: 'dot', scxml: 'scxml' };

export const SCXML_NAMESPACE = 'http://www.w3.org/2005/07/scxml';
/** The namespace of dmstate's <dm:action> elements in SCXML exports. */
export const SCXML_DMSTATE_NAMESPACE = 'urn:dmstate:scxml:v1';

/** The machine as JSON-ready data (a deep copy of its model: parse it back and it compares equal). */
export function toJsonDoc(ref: MachineRef): MachineModel {
  return JSON.parse(JSON.stringify(machineModel(ref))) as MachineModel;
}

/** The export of a machine in one format, as text ending in a newline. */
export function exportMachine(ref: MachineRef, format: MachineExportFormat): string {
  switch (format) {
    case 'json':
      return JSON.stringify(toJsonDoc(ref), null, 2) + '\n';
    case 'mermaid':
      return toMermaid(ref);
    case 'dot':
      return toDot(ref);
    case 'scxml':
      return toScxml(ref);
  }
}

export function parseExportFormat(text: string): MachineExportFormat {
  if (!(MACHINE_EXPORT_FORMATS as readonly string[]).includes(text)) {
    throw new DmError('DM_INVALID_ARGUMENT', `unknown format '${text}' (formats: ${MACHINE_EXPORT_FORMATS.join(', ')})`);
  }
  return text as MachineExportFormat;
}

/** `EVENT [guard] / a, b`: the label of a transition in mermaid and DOT. */
export function transitionLabel(t: MachineTransitionModel): string {
  let label = t.event === '' ? '(always)' : t.event;
  if (t.guard !== undefined) label += ` [${t.guard}]`;
  if (t.actions.length > 0) label += ` / ${t.actions.join(', ')}`;
  return label;
}

// ---- mermaid ----

/** A mermaid stateDiagram-v2. */
export function toMermaid(ref: MachineRef): string {
  const model = machineModel(ref);
  const byPath = statesByPath(model);
  const ids = uniqueIds(model, (p) => p.replace(/[^A-Za-z0-9_]/g, '_'));
  // mermaid's labels end at a newline and its ';' ends a statement: keep both out of labels.
  const safe = (text: string): string => text.replace(/[\n;]/g, ' ');
  const lines = ['stateDiagram-v2', `  %% machine ${safe(model.name)} (xstate id ${safe(model.id)})`];
  // Transitions are written in the block that declares their source: mermaid's ids are global, but a transition
  // written outside a composite state would pull its states out of it.
  const emit = (paths: readonly string[], initial: string | undefined, parallel: boolean, indent: string): void => {
    if (initial !== undefined) for (const p of initial.split(' ')) lines.push(`${indent}[*] --> ${ids.get(p)}`);
    paths.forEach((p, i) => {
      const s = byPath.get(p)!;
      const id = ids.get(p)!;
      const title = s.type === 'history' ? `${s.key} (${s.history} history)` : s.key;
      lines.push(title !== id ? `${indent}state "${safe(title).replace(/"/g, "'")}" as ${id}` : `${indent}${id}`);
      if (s.children.length > 0) {
        lines.push(`${indent}state ${id} {`);
        emit(s.children, s.initial, s.type === 'parallel', indent + '  ');
        lines.push(`${indent}}`);
      }
      if (s.type === 'final') lines.push(`${indent}${id} --> [*]`);
      if (parallel && i < paths.length - 1) lines.push(`${indent}--`);
    });
    for (const t of model.transitions.filter((t) => paths.includes(t.source))) {
      for (const target of t.targets.length > 0 ? t.targets : [t.source]) {
        lines.push(`${indent}${ids.get(t.source)} --> ${ids.get(target)} : ${safe(transitionLabel(t))}`);
      }
    }
  };
  emit(topLevel(model), model.initial, false, '  ');
  for (const s of model.states) {
    const notes = [...s.entry.map((a) => `entry / ${a}`), ...s.exit.map((a) => `exit / ${a}`), ...s.invoke.map((a) => `invoke ${a}`)];
    if (notes.length > 0) lines.push(`  note right of ${ids.get(s.path)}`, ...notes.map((n) => `    ${safe(n)}`), '  end note');
  }
  return lines.join('\n') + '\n';
}

// ---- DOT ----

const dotQuote = (text: string): string => `"${text.replace(/\\/g, '\\\\').replace(/"/g, '\\"').replace(/\n/g, '\\n')}"`;

/** A Graphviz digraph. */
export function toDot(ref: MachineRef): string {
  const model = machineModel(ref);
  const byPath = statesByPath(model);
  const clusterId = (p: string): string => dotQuote(`cluster_${p}`);
  // An edge to or from a compound/parallel state is drawn to a leaf inside it (its initial one when it has one).
  const leafOf = (p: string): string => {
    const s = byPath.get(p)!;
    if (s.children.length === 0) return p;
    return leafOf(s.initial?.split(' ')[0] ?? s.children[0]);
  };
  const lines = [`digraph ${dotQuote(model.name)} {`, '  rankdir=LR;', '  compound=true;', '  node [shape=box, style=rounded];',
    '  "__initial" [shape=point, label=""];'];
  const emit = (paths: readonly string[], indent: string): void => {
    for (const p of paths) {
      const s = byPath.get(p)!;
      const actionLines = [...s.entry.map((a) => `entry / ${a}`), ...s.exit.map((a) => `exit / ${a}`), ...s.invoke.map((a) => `invoke ${a}`)];
      if (s.children.length > 0) {
        lines.push(`${indent}subgraph ${clusterId(p)} {`, `${indent}  label=${dotQuote([s.key + (s.type === 'parallel' ? ' (parallel)' : ''), ...actionLines].join('\n'))};`);
        emit(s.children, indent + '  ');
        lines.push(`${indent}}`);
        continue;
      }
      const shape = s.type === 'final' ? 'doublecircle' : s.type === 'history' ? 'circle' : undefined;
      const title = s.type === 'history' ? `H${s.history === 'deep' ? '*' : ''}` : s.key;
      const attrs = [`label=${dotQuote([title, ...actionLines].join('\n'))}`, ...(shape ? [`shape=${shape}`] : [])];
      lines.push(`${indent}${dotQuote(p)} [${attrs.join(', ')}];`);
    }
  };
  emit(topLevel(model), '  ');
  lines.push(`  "__initial" -> ${dotQuote(leafOf(model.initial.split(' ')[0]))};`);
  for (const t of model.transitions) {
    for (const target of t.targets.length > 0 ? t.targets : [t.source]) {
      const attrs = [`label=${dotQuote(transitionLabel(t))}`];
      if (byPath.get(t.source)!.children.length > 0) attrs.push(`ltail=${clusterId(t.source)}`);
      if (byPath.get(target)!.children.length > 0) attrs.push(`lhead=${clusterId(target)}`);
      lines.push(`  ${dotQuote(leafOf(t.source))} -> ${dotQuote(leafOf(target))} [${attrs.join(', ')}];`);
    }
  }
  lines.push('}');
  return lines.join('\n') + '\n';
}

// ---- SCXML ----

const xmlEscape = (text: string): string =>
  text.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/"/g, '&quot;');

// SCXML ids are XML IDs (NCNames). State keys are checked rather than mangled, so that ids stay the state paths.
const NCNAME = /^[A-Za-z_][A-Za-z0-9_.-]*$/;

/** A W3C SCXML 1.0 document (see the top of this file for guards and actions). */
export function toScxml(ref: MachineRef): string {
  const model = machineModel(ref);
  const byPath = statesByPath(model);
  for (const s of model.states) {
    if (!NCNAME.test(s.path)) throw new DmError('DM_NOT_SUPPORTED', `machine ${model.name}: state '${s.path}' is not a valid SCXML id`);
  }
  const outgoing = new Map<string, MachineTransitionModel[]>();
  for (const t of model.transitions) outgoing.set(t.source, [...(outgoing.get(t.source) ?? []), t]);
  const actions = (names: readonly string[], indent: string): string[] =>
    names.map((n) => `${indent}<dm:action name="${xmlEscape(n)}"/>`);
  const lines = [
    '<?xml version="1.0" encoding="UTF-8"?>',
    `<!-- dmstate machine ${model.name.replace(/--/g, '- -')}: cond attributes name guards, dm:action elements name actions (implemented in TypeScript) -->`,
    `<scxml xmlns="${SCXML_NAMESPACE}" xmlns:dm="${SCXML_DMSTATE_NAMESPACE}" version="1.0" name="${xmlEscape(model.id)}" initial="${xmlEscape(model.initial)}">`,
  ];
  const emit = (paths: readonly string[], indent: string): void => {
    for (const p of paths) {
      const s = byPath.get(p)!;
      if (s.type === 'history') {
        lines.push(`${indent}<history id="${p}" type="${s.history ?? 'shallow'}"/>`);
        continue;
      }
      const element = s.type === 'final' ? 'final' : s.type === 'parallel' ? 'parallel' : 'state';
      const initialAttr = s.type === 'compound' && s.initial !== undefined ? ` initial="${s.initial}"` : '';
      const body: string[] = [];
      const inner = indent + '  ';
      if (s.entry.length > 0) body.push(`${inner}<onentry>`, ...actions(s.entry, inner + '  '), `${inner}</onentry>`);
      if (s.exit.length > 0) body.push(`${inner}<onexit>`, ...actions(s.exit, inner + '  '), `${inner}</onexit>`);
      for (const inv of s.invoke) body.push(`${inner}<!-- invokes ${inv.replace(/--/g, '- -')} -->`);
      for (const t of outgoing.get(p) ?? []) {
        const attrs = [
          ...(t.event !== '' ? [`event="${xmlEscape(t.event)}"`] : []),
          ...(t.guard !== undefined ? [`cond="${xmlEscape(t.guard)}"`] : []),
          ...(t.targets.length > 0 ? [`target="${t.targets.join(' ')}"`] : []),
          // xstate's default (reenter: false) to a descendant does not exit the source: SCXML's internal type.
          ...(!t.reenter && t.targets.length > 0 && t.targets.every((x) => x.startsWith(p + '.')) ? ['type="internal"'] : []),
        ].join(' ');
        if (t.actions.length === 0) body.push(`${inner}<transition ${attrs}/>`);
        else body.push(`${inner}<transition ${attrs}>`, ...actions(t.actions, inner + '  '), `${inner}</transition>`);
      }
      if (body.length === 0 && s.children.length === 0) {
        lines.push(`${indent}<${element} id="${p}"${initialAttr}/>`);
        continue;
      }
      lines.push(`${indent}<${element} id="${p}"${initialAttr}>`, ...body);
      emit(s.children, inner);
      lines.push(`${indent}</${element}>`);
    }
  };
  emit(topLevel(model), '  ');
  lines.push('</scxml>');
  return lines.join('\n') + '\n';
}

// ---- paths ----

export interface MachinePath {
  /** Where the path ends: the deepest active state(s). */
  readonly state: string;
  /** The events to send from the initial state, in order. */
  readonly events: readonly string[];
}

export interface MachinePathsOptions {
  /** Only paths that end in this state (a state path: `COMPLETED`, `A.a`). */
  readonly to?: string;
  /** At most this many simple paths are returned (default MACHINE_SIMPLE_PATHS_LIMIT); `simpleTotal` says how many there are. */
  readonly limit?: number;
}

export interface MachinePaths {
  readonly machine: string;
  readonly to?: string;
  /** One shortest path to each state (to `to`, when given), in state order. */
  readonly shortest: readonly MachinePath[];
  /** Simple paths (no state visited twice), in state order, then shortest first; at most `limit` of them. */
  readonly simple: readonly MachinePath[];
  readonly simpleTotal: number;
  readonly limit: number;
}

export const MACHINE_SIMPLE_PATHS_LIMIT = 20;

/**
 * Shortest and simple paths through a machine, from xstate/graph, as event sequences. xstate/graph enumerates every
 * simple path before the limit applies: fine for the small flat machines of machines/, exponential in general.
 * Delayed and eventless transitions are taken by xstate itself; only the model's `events` are sent.
 */
export function machinePaths(ref: string | AnyStateMachine, options: MachinePathsOptions = {}): MachinePaths {
  const limit = options.limit ?? MACHINE_SIMPLE_PATHS_LIMIT;
  if (!Number.isSafeInteger(limit) || limit < 0) throw new DmError('DM_INVALID_ARGUMENT', `paths: limit must be a whole number ≥ 0, got ${limit}`);
  const t = traversal(ref, options.to);
  const simple = getSimplePaths(t.machine, t.options).map(t.asPath).sort(t.order);
  return {
    machine: t.name, ...(options.to !== undefined ? { to: options.to } : {}),
    shortest: getShortestPaths(t.machine, t.options).map(t.asPath).sort(t.order),
    simple: simple.slice(0, limit), simpleTotal: simple.length, limit,
  };
}

/** The shortest path to each state (to `to` only, when given), in state order, without the simple paths. */
export function shortestMachinePaths(ref: string | AnyStateMachine, to?: string): MachinePath[] {
  const t = traversal(ref, to);
  return getShortestPaths(t.machine, t.options).map(t.asPath).sort(t.order);
}

function traversal(ref: string | AnyStateMachine, to: string | undefined) {
  const { name, machine } = machineOf(ref);
  const model = machineModel(machine);
  if (to !== undefined && !model.states.some((s) => s.path === to)) {
    throw new DmError('DM_INVALID_ARGUMENT', `machine ${name} has no state '${to}' (states: ${model.states.map((s) => s.path).join(', ')})`);
  }
  const options = {
    events: model.events.map((type) => ({ type })),
    ...(to !== undefined ? { toState: (snapshot: { value: unknown }) => activeStatePaths(snapshot.value).includes(to) } : {}),
  };
  const stateOrder = new Map(model.states.map((s, i) => [s.path, i]));
  const rank = (p: MachinePath): number => stateOrder.get(p.state.split(', ')[0]) ?? stateOrder.size;
  const asPath = (p: { state: { value: unknown }; steps: ReadonlyArray<{ event: { type: string } }> }): MachinePath => ({
    state: stateLabel(p.state.value),
    events: p.steps.map((s) => s.event.type).filter((type) => !type.startsWith('xstate.')),
  });
  // By state, then shorter first, then by event names: a stable order for listings and tests.
  const order = (a: MachinePath, b: MachinePath): number =>
    rank(a) - rank(b) || a.events.length - b.events.length || a.events.join(' ').localeCompare(b.events.join(' '));
  return { name, machine, options, asPath, order };
}

/** machinePaths as text: one line per path, `STATE: EVENT EVENT ...`, and how many simple paths were left out. */
export function formatMachinePaths(paths: MachinePaths): string {
  const width = Math.max(0, ...[...paths.shortest, ...paths.simple].map((p) => p.state.length));
  const line = (p: MachinePath): string => `  ${p.state.padEnd(width)}  ${p.events.length > 0 ? p.events.join(' ') : '(initial state: no event)'}`;
  const where = paths.to !== undefined ? ` to ${paths.to}` : '';
  const shown = paths.simple.length < paths.simpleTotal
    ? `${paths.simple.length} of ${paths.simpleTotal}, the shortest first (limit ${paths.limit}; --limit N for more)`
    : `all ${paths.simpleTotal}`;
  return [
    `machine ${paths.machine}: shortest paths${where} (${paths.shortest.length})`,
    ...paths.shortest.map(line),
    `simple paths${where}, no state twice: ${shown}`,
    ...paths.simple.map(line),
  ].join('\n') + '\n';
}

// ---- helpers ----

function statesByPath(model: MachineModel): Map<string, MachineStateModel> {
  return new Map(model.states.map((s) => [s.path, s]));
}

function topLevel(model: MachineModel): string[] {
  return model.states.filter((s) => s.parent === undefined).map((s) => s.path);
}

/** An id per state made by `make`, suffixed where two states would share one. */
function uniqueIds(model: MachineModel, make: (path: string) => string): Map<string, string> {
  const ids = new Map<string, string>();
  const used = new Set<string>();
  for (const s of model.states) {
    let id = make(s.path);
    for (let n = 2; used.has(id); n++) id = `${make(s.path)}_${n}`;
    used.add(id);
    ids.set(s.path, id);
  }
  return ids;
}
