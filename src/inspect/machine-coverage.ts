/**
 * State and transition coverage of event paths through a flat machine (every machine in machines/: top-level
 * atomic and final states, event transitions; what src/core/compiled-machine.ts compiles). Paths are run on a
 * form of the machine — the xstate definition or its compiled transition table — which records what it went
 * through (a trace); the coverage report compares the traces with the machine model: every state and every
 * transition, covered or not, and any step the model does not have (a disagreement between the forms).
 *
 * A transition is identified by (source, event, target): two guarded transitions of one event to one target
 * count as one.
 */
import { createActor, type AnyStateMachine } from 'xstate';
import type { CompiledMachine } from '../core/compiled-machine.js';
import { DmError } from '../core/errors.js';
import { shortestMachinePaths } from './machine-export.js';
import { isFlatModel, machineModel, machineOf, stateLabel, type MachineModel, type MachineRef } from './machine-model.js';

export interface TraceStep {
  readonly from: string;
  readonly event: string;
  readonly to: string;
}

/** What one path went through: the states in order (the initial one first) and the steps between them. */
export interface PathTrace {
  readonly states: readonly string[];
  readonly steps: readonly TraceStep[];
}

export interface CoverageItem {
  readonly name: string;
  readonly covered: boolean;
}

export interface CoverageCount {
  readonly total: number;
  readonly covered: number;
  /** Every state (transition) of the model in model order, `SOURCE --EVENT--> TARGET` for transitions. */
  readonly items: readonly CoverageItem[];
}

export interface CoverageReport {
  readonly machine: string;
  readonly paths: number;
  readonly states: CoverageCount;
  readonly transitions: CoverageCount;
  /** States and steps seen in the traces that the model does not have (empty unless a form disagrees with it). */
  readonly unexpected: readonly string[];
}

export const transitionName = (from: string, event: string, to: string): string => `${from} --${event}--> ${to}`;

function requireFlat(model: MachineModel): void {
  if (!isFlatModel(model)) {
    throw new DmError('DM_NOT_SUPPORTED', `machine ${model.name}: coverage is counted for flat machines only (top-level atomic and final states, event transitions)`);
  }
}

/** Every transition of a flat machine by name, in model order (targetless transitions stay in their source). */
export function modelTransitionNames(ref: MachineRef): string[] {
  const model = machineModel(ref);
  requireFlat(model);
  return [...new Set(model.transitions.map((t) => transitionName(t.source, t.event, t.targets[0] ?? t.source)))];
}

/** Coverage of the traces against the machine's model. */
export function machineCoverage(ref: MachineRef, traces: readonly PathTrace[]): CoverageReport {
  const model = machineModel(ref);
  requireFlat(model);
  const statesSeen = new Set(traces.flatMap((t) => t.states));
  const stepsSeen = new Set(traces.flatMap((t) => t.steps.map((s) => transitionName(s.from, s.event, s.to))));
  const stateNames = model.states.map((s) => s.path);
  const transitionNames = modelTransitionNames(model);
  const count = (names: readonly string[], seen: ReadonlySet<string>): CoverageCount => {
    const items = names.map((name) => ({ name, covered: seen.has(name) }));
    return { total: items.length, covered: items.filter((i) => i.covered).length, items };
  };
  const known = new Set([...stateNames, ...transitionNames]);
  return {
    machine: model.name,
    paths: traces.length,
    states: count(stateNames, statesSeen),
    transitions: count(transitionNames, stepsSeen),
    unexpected: [...statesSeen, ...stepsSeen].filter((n) => !known.has(n)),
  };
}

/**
 * Event paths that together take every transition of a flat machine (and so reach every reachable state): the
 * shortest path (xstate/graph) to each state, and for each transition the shortest path to its source followed
 * by its event. A transition out of a state no path reaches is left out, and the coverage report shows it.
 */
export function coveringPaths(ref: string | AnyStateMachine): string[][] {
  const { machine } = machineOf(ref);
  const model = machineModel(machine);
  requireFlat(model);
  const shortest = shortestMachinePaths(machine);
  const toState = new Map(shortest.map((p) => [p.state, p.events]));
  const cover = model.transitions.flatMap((t) => {
    const prefix = toState.get(t.source);
    return prefix === undefined ? [] : [[...prefix, t.event]];
  });
  return [...shortest.map((p) => [...p.events]), ...cover];
}

/** Runs a path on a fresh xstate actor of the machine; an event the current state does not accept throws. */
export function traceOnXstate(machine: AnyStateMachine, events: readonly string[]): PathTrace {
  const actor = createActor(machine).start();
  try {
    const states = [stateLabel(actor.getSnapshot().value)];
    const steps: TraceStep[] = [];
    for (const type of events) {
      const from = stateLabel(actor.getSnapshot().value);
      if (!actor.getSnapshot().can({ type })) throw new Error(`${machine.id}: event ${type} is not accepted in ${from}`);
      actor.send({ type });
      const to = stateLabel(actor.getSnapshot().value);
      steps.push({ from, event: type, to });
      states.push(to);
    }
    return { states, steps };
  } finally {
    actor.stop();
  }
}

/** Runs a path on a compiled transition table; an event the current state does not accept throws. */
export function traceOnCompiled(compiled: CompiledMachine, events: readonly string[]): PathTrace {
  let s = compiled.initialIndex;
  const states = [compiled.stateNames[s]];
  const steps: TraceStep[] = [];
  for (const type of events) {
    const next = compiled.step(s, compiled.eventIndex(type));
    steps.push({ from: compiled.stateNames[s], event: type, to: compiled.stateNames[next] });
    states.push(compiled.stateNames[next]);
    s = next;
  }
  return { states, steps };
}

/** One row per report: `machine  form  states covered/total  transitions covered/total  paths`. */
export function formatCoverageTable(rows: ReadonlyArray<{ readonly form: string; readonly report: CoverageReport }>): string {
  const table = [['machine', 'form', 'states', 'transitions', 'paths'],
    ...rows.map(({ form, report: r }) => [r.machine, form, `${r.states.covered}/${r.states.total}`,
      `${r.transitions.covered}/${r.transitions.total}`, String(r.paths)])];
  const widths = table[0].map((_, c) => Math.max(...table.map((row) => row[c].length)));
  return table.map((row) => row.map((cell, c) => (c >= 2 ? cell.padStart(widths[c]) : cell.padEnd(widths[c]))).join('  ').trimEnd()).join('\n') + '\n';
}

/** Every state and transition of a report, one a line, marked covered (✓) or not (✗). */
export function formatCoverageDetail(report: CoverageReport): string {
  const mark = (i: CoverageItem): string => `    ${i.covered ? '✓' : '✗'} ${i.name}`;
  return [
    `machine ${report.machine}: ${report.paths} paths`,
    `  states ${report.states.covered}/${report.states.total}`,
    ...report.states.items.map(mark),
    `  transitions ${report.transitions.covered}/${report.transitions.total}`,
    ...report.transitions.items.map(mark),
    ...(report.unexpected.length > 0 ? ['  not in the machine:', ...report.unexpected.map((u) => `    ! ${u}`)] : []),
  ].join('\n') + '\n';
}
