/**
 * Model-based tests: every path xstate/graph finds through each machine (shortest paths to every state and every
 * simple path) is run against the xstate machine and against its compiled transition table; both must be in the
 * same state after every step, and together the paths must cover every state and every transition. The coverage
 * report (src/inspect/machine-coverage.ts) of each form is asserted complete and printed at the end: a table of
 * covered/total per machine and form, then every state and transition of every machine.
 */
import { afterAll, describe, expect, test } from 'vitest';
import { createActor, type AnyStateMachine } from 'xstate';
import { getShortestPaths, getSimplePaths } from 'xstate/graph';
import { MACHINES } from '../../machines/index.js';
import { compileMachine } from '../../src/core/compiled-machine.js';
import {
  formatCoverageDetail, formatCoverageTable, machineCoverage, traceOnCompiled, traceOnXstate, type CoverageReport,
} from '../../src/inspect/machine-coverage.js';

const coverageRows: Array<{ form: string; report: CoverageReport }> = [];
afterAll(() => {
  if (coverageRows.length === 0) return;
  console.log(`coverage of the machine path tests\n${formatCoverageTable(coverageRows)}\n` +
    coverageRows.filter((r) => r.form === 'xstate').map((r) => formatCoverageDetail(r.report)).join(''));
});

function allEvents(compiledEvents: readonly string[]) {
  return compiledEvents.map((type) => ({ type }));
}

for (const [name, machine] of Object.entries(MACHINES) as Array<[string, AnyStateMachine]>) {
  describe(`machine ${name}`, () => {
    const compiled = compileMachine(machine);
    const events = allEvents(compiled.eventNames);
    const graphPaths = [...getShortestPaths(machine, { events }), ...getSimplePaths(machine, { events })];
    const eventsOf = (p: (typeof graphPaths)[number]): string[] =>
      p.steps.map((st) => st.event.type).filter((t) => !t.startsWith('xstate.'));
    // Transition cover: the shortest path to each state, then each event that state accepts (back edges such as
    // HELD --RETRY--> SUBMITTED are on no simple path).
    const transitionCover: string[][] = [];
    for (const p of getShortestPaths(machine, { events })) {
      const si = compiled.stateIndex(String(p.state.value));
      for (let ei = 0; ei < compiled.eventNames.length; ei++) {
        if (compiled.tryStep(si, ei) >= 0) transitionCover.push([...eventsOf(p), compiled.eventNames[ei]]);
      }
    }
    const paths: string[][] = [...graphPaths.map(eventsOf), ...transitionCover];

    test('has paths to explore', () => {
      expect(paths.length).toBeGreaterThan(0);
    });

    test('the graph paths end where xstate/graph says they do', () => {
      for (const p of graphPaths) {
        let s = compiled.initialIndex;
        for (const t of eventsOf(p)) s = compiled.step(s, compiled.eventIndex(t));
        expect(compiled.stateNames[s]).toBe(p.state.value);
      }
    });

    test('xstate and the compiled table agree on every step of every path', () => {
      for (const path of paths) {
        const actor = createActor(machine).start();
        let s = compiled.initialIndex;
        expect(actor.getSnapshot().value).toBe(compiled.stateNames[s]);
        for (const type of path) {
          actor.send({ type });
          s = compiled.step(s, compiled.eventIndex(type));
          expect(compiled.stateNames[s]).toBe(actor.getSnapshot().value);
          expect(compiled.isFinal[s]).toBe(actor.getSnapshot().status === 'done');
        }
        actor.stop();
      }
    });

    test('events not accepted in a state are rejected by both forms', () => {
      for (let si = 0; si < compiled.stateNames.length; si++) {
        for (let ei = 0; ei < compiled.eventNames.length; ei++) {
          if (compiled.tryStep(si, ei) >= 0) continue;
          expect(() => compiled.step(si, ei)).toThrow(/not accepted/);
          const snap = machine.resolveState({ value: compiled.stateNames[si], context: undefined });
          expect(snap.can({ type: compiled.eventNames[ei] })).toBe(false);
        }
      }
    });

    test('the paths cover every state and every transition, run on xstate and on the compiled table', () => {
      // The expected sets come from the compiled table, the report's from the machine's state nodes: they must agree.
      const allTransitions: string[] = [];
      for (let si = 0; si < compiled.stateNames.length; si++) {
        for (let ei = 0; ei < compiled.eventNames.length; ei++) {
          const n = compiled.tryStep(si, ei);
          if (n >= 0) allTransitions.push(`${compiled.stateNames[si]} --${compiled.eventNames[ei]}--> ${compiled.stateNames[n]}`);
        }
      }
      expect(allTransitions.length).toBeGreaterThan(0);
      const forms = {
        xstate: machineCoverage(machine, paths.map((p) => traceOnXstate(machine, p))),
        compiled: machineCoverage(machine, paths.map((p) => traceOnCompiled(compiled, p))),
      };
      for (const [form, report] of Object.entries(forms)) {
        expect(report.machine).toBe(name);
        expect(report.states.items.map((i) => i.name).sort(), form).toEqual([...compiled.stateNames].sort());
        expect(report.transitions.items.map((i) => i.name).sort(), form).toEqual([...allTransitions].sort());
        expect(report.states.items.filter((i) => !i.covered), `${form}: states not covered`).toEqual([]);
        expect(report.transitions.items.filter((i) => !i.covered), `${form}: transitions not covered`).toEqual([]);
        expect(report.states.covered).toBe(compiled.stateNames.length);
        expect(report.transitions.covered).toBe(allTransitions.length);
        expect(report.unexpected, form).toEqual([]);
        coverageRows.push({ form, report });
      }
    });
  });
}

test('compileMachine refuses machines the table cannot express', async () => {
  const { setup } = await import('xstate');
  const guarded = setup({ guards: { g: () => true } }).createMachine({
    id: 'g',
    initial: 'A',
    states: { A: { on: { GO: { target: 'B', guard: 'g' } } }, B: {} },
  });
  expect(() => compileMachine(guarded)).toThrow(/guard/);
  const nested = setup({}).createMachine({ id: 'n', initial: 'A', states: { A: { initial: 'x', states: { x: {} } } } });
  expect(() => compileMachine(nested)).toThrow(/feature/);
});
