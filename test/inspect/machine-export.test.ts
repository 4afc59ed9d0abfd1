/**
 * The machine exports (src/inspect/machine-export.ts) checked against an independent reading of each machine:
 * its compiled transition table (src/core/compiled-machine.ts, built from machine.config, not from the state nodes
 * the exports read). JSON round-trips and rebuilds an equal machine; SCXML is well-formed XML with every state and
 * transition, and runs the covering paths to the same states as the compiled table; DOT and mermaid hold every
 * edge; paths end where --to says and are really shortest / simple; unknown names are refused. A fixture machine
 * with guards, actions, nesting, parallel and history states checks the naming. Then the CLI, end to end.
 */
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { and, assign, createActor, not, setup, type AnyStateMachine } from 'xstate';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { MACHINES } from '../../machines/index.js';
import { compileMachine, type CompiledMachine } from '../../src/core/compiled-machine.js';
import { isDmError } from '../../src/core/errors.js';
import { coveringPaths, machineCoverage, traceOnCompiled, traceOnXstate } from '../../src/inspect/machine-coverage.js';
import {
  exportMachine, machinePaths, parseExportFormat, SCXML_DMSTATE_NAMESPACE, SCXML_NAMESPACE, shortestMachinePaths, toDot, toJsonDoc,
  toMermaid, toScxml,
} from '../../src/inspect/machine-export.js';
import { machineModel, type MachineModel } from '../../src/inspect/machine-model.js';
import { allElements, parseXml, type XmlElement } from './xml-parse.js';

const NAMES = Object.keys(MACHINES);
const machineOf = (name: string): AnyStateMachine => (MACHINES as Record<string, AnyStateMachine>)[name];

/** Every transition of the compiled table as `SOURCE EVENT TARGET`. */
function tableTransitions(c: CompiledMachine): string[] {
  const out: string[] = [];
  for (let si = 0; si < c.stateNames.length; si++) {
    for (let ei = 0; ei < c.eventNames.length; ei++) {
      const n = c.tryStep(si, ei);
      if (n >= 0) out.push(`${c.stateNames[si]} ${c.eventNames[ei]} ${c.stateNames[n]}`);
    }
  }
  return out.sort();
}

/** The state the compiled table is in after the events. */
function endState(c: CompiledMachine, events: readonly string[]): string {
  return traceOnCompiled(c, events).states.at(-1)!;
}

/** Throws a DmError with this code (and a message matching `message`). */
function expectDmError(fn: () => unknown, code: string, message?: RegExp): void {
  let caught: unknown;
  try {
    fn();
  } catch (e) {
    caught = e;
  }
  expect(isDmError(caught), `expected a DmError, got ${String(caught)}`).toBe(true);
  expect((caught as { code: string }).code).toBe(code);
  if (message) expect((caught as Error).message).toMatch(message);
}

test('the machines to check are there', () => {
  expect(NAMES.length).toBeGreaterThanOrEqual(4);
});

for (const name of NAMES) {
  describe(`machine ${name}`, () => {
    const machine = machineOf(name);
    const compiled = compileMachine(machine);
    const transitions = tableTransitions(compiled);

    test('JSON: round-trips, and rebuilds a machine with the same model and the same table', () => {
      const doc = toJsonDoc(name);
      const text = exportMachine(name, 'json');
      expect(JSON.parse(text)).toEqual(doc);
      expect(doc.states.map((s) => s.path).sort()).toEqual([...compiled.stateNames].sort());
      expect(doc.transitions.map((t) => `${t.source} ${t.event} ${t.targets[0]}`).sort()).toEqual(transitions);
      expect(doc.initial).toBe(compiled.stateNames[compiled.initialIndex]);
      // Rebuild the machine from the JSON alone (flat machines: states, final flags, event → target).
      const rebuilt = setup({}).createMachine({
        id: doc.id,
        initial: doc.initial,
        states: Object.fromEntries(doc.states.map((s) => [s.path, {
          ...(s.type === 'final' ? { type: 'final' as const } : {}),
          on: Object.fromEntries(doc.transitions.filter((t) => t.source === s.path).map((t) => [t.event, t.targets[0]])),
        }])),
      });
      expect(machineModel(rebuilt)).toEqual({ ...doc, name: doc.id });
      expect(tableTransitions(compileMachine(rebuilt))).toEqual(transitions);
    });

    test('SCXML: well-formed SCXML 1.0 with every state and transition, and it runs like the compiled table', () => {
      const xml = toScxml(name);
      const root = parseXml(xml);
      expect(root.name).toBe('scxml');
      expect(root.ns).toBe(SCXML_NAMESPACE);
      expect(root.attrs.version).toBe('1.0');
      expect(root.attrs.initial).toBe(compiled.stateNames[compiled.initialIndex]);
      const stateEls = root.children.filter((e) => e.name === 'state' || e.name === 'final');
      expect(stateEls.length).toBe(root.children.length);
      const ids = stateEls.map((e) => e.attrs.id);
      expect(new Set(ids).size).toBe(ids.length);
      expect([...ids].sort()).toEqual([...compiled.stateNames].sort());
      for (const el of stateEls) {
        expect(el.name === 'final').toBe(compiled.isFinal[compiled.stateIndex(el.attrs.id)]);
        if (el.name === 'final') expect(el.children).toEqual([]);
      }
      const scxmlTransitions = stateEls.flatMap((s) => s.children.map((t) => {
        expect(t.name).toBe('transition');
        expect(ids).toContain(t.attrs.target);
        return `${s.attrs.id} ${t.attrs.event} ${t.attrs.target}`;
      }));
      expect(scxmlTransitions.sort()).toEqual(transitions);
      // Interpret the document (flat, no conditions: the first transition whose event matches) on covering paths.
      const byId = new Map(stateEls.map((e) => [e.attrs.id, e]));
      for (const events of coveringPaths(machine)) {
        let current = root.attrs.initial;
        for (const ev of events) {
          const t = byId.get(current)!.children.find((c) => c.attrs.event === ev);
          expect(t, `${current} takes ${ev} in the SCXML`).toBeDefined();
          current = t!.attrs.target;
        }
        expect(current).toBe(endState(compiled, events));
      }
    });

    test('DOT: a digraph with a node per state and every edge', () => {
      const dot = toDot(name);
      expect(dot.startsWith(`digraph "${name}" {`)).toBe(true);
      expect(dot.trimEnd().endsWith('}')).toBe(true);
      expect((dot.match(/{/g) ?? []).length).toBe((dot.match(/}/g) ?? []).length);
      const edges = [...dot.matchAll(/^\s*"([^"]+)" -> "([^"]+)" \[label="([^"]*)"\];$/gm)].map((m) => `${m[1]} ${m[3]} ${m[2]}`);
      expect(edges.sort()).toEqual(transitions);
      const nodes = [...dot.matchAll(/^\s*"([^"]+)" \[label=.*\];$/gm)].map((m) => m[1]).filter((n) => n !== '__initial');
      expect(nodes.sort()).toEqual([...compiled.stateNames].sort());
      expect(dot).toContain(`"__initial" -> "${compiled.stateNames[compiled.initialIndex]}";`);
      for (let si = 0; si < compiled.stateNames.length; si++) {
        expect(dot.includes(`"${compiled.stateNames[si]}" [label="${compiled.stateNames[si]}", shape=doublecircle];`)).toBe(compiled.isFinal[si]);
      }
    });

    test('mermaid: a stateDiagram-v2 with every edge, the initial and the final states', () => {
      const text = toMermaid(name);
      const lines = text.trimEnd().split('\n');
      expect(lines[0]).toBe('stateDiagram-v2');
      const edges = lines.flatMap((l) => {
        const m = /^\s*(\w+) --> (\w+) : (\w+)$/.exec(l);
        return m ? [`${m[1]} ${m[3]} ${m[2]}`] : [];
      });
      expect(edges.sort()).toEqual(transitions);
      expect(lines).toContain(`  [*] --> ${compiled.stateNames[compiled.initialIndex]}`);
      const finals = lines.flatMap((l) => /^\s*(\w+) --> \[\*\]$/.exec(l)?.[1] ?? []);
      expect(finals.sort()).toEqual(compiled.stateNames.filter((_, i) => compiled.isFinal[i]).sort());
    });

    test('paths: shortest and simple paths end in the --to state, are shortest and simple', () => {
      // Breadth-first distances over the compiled table: an independent measure of "shortest".
      const distance = new Map<string, number>([[compiled.stateNames[compiled.initialIndex], 0]]);
      const queue = [compiled.initialIndex];
      while (queue.length > 0) {
        const si = queue.shift()!;
        for (let ei = 0; ei < compiled.eventNames.length; ei++) {
          const n = compiled.tryStep(si, ei);
          if (n >= 0 && !distance.has(compiled.stateNames[n])) {
            distance.set(compiled.stateNames[n], distance.get(compiled.stateNames[si])! + 1);
            queue.push(n);
          }
        }
      }
      for (const to of compiled.stateNames) {
        const p = machinePaths(name, { to, limit: 1000 });
        expect(p.to).toBe(to);
        expect(p.shortest.length).toBe(distance.has(to) ? 1 : 0);
        for (const sp of p.shortest) expect(sp.events.length).toBe(distance.get(to));
        expect(p.simple.length).toBe(p.simpleTotal);
        if (distance.has(to)) expect(p.simple.length).toBeGreaterThan(0);
        for (const sp of [...p.shortest, ...p.simple]) {
          expect(sp.state).toBe(to);
          const xs = traceOnXstate(machine, sp.events);
          expect(xs.states.at(-1)).toBe(to);
          expect(endState(compiled, sp.events)).toBe(to);
        }
        for (const sp of p.simple) {
          const visited = traceOnCompiled(compiled, sp.events).states;
          expect(new Set(visited).size, `simple path ${sp.events.join(' ')} visits a state twice`).toBe(visited.length);
        }
      }
      const all = machinePaths(name);
      expect(all.shortest.map((p) => p.state).sort()).toEqual([...distance.keys()].sort());
      expect(shortestMachinePaths(name)).toEqual(all.shortest);
    });

    test('paths: the simple-path limit applies and says how many there are', () => {
      const unlimited = machinePaths(name, { limit: 10_000 });
      const one = machinePaths(name, { limit: 1 });
      expect(one.simple).toEqual(unlimited.simple.slice(0, 1));
      expect(one.simpleTotal).toBe(unlimited.simple.length);
      expect(one.limit).toBe(1);
    });
  });
}

describe('refusals', () => {
  test('unknown machine names are refused with the list of names', () => {
    for (const fn of [() => toScxml('nope'), () => toJsonDoc('nope'), () => machinePaths('nope'), () => exportMachine('nope', 'dot')]) {
      expectDmError(fn, 'DM_INVALID_ARGUMENT', new RegExp(`unknown machine 'nope' \\(machines: ${NAMES.join(', ')}\\)`));
    }
  });

  test('an unknown --to state, format or limit is refused', () => {
    expectDmError(() => machinePaths('bio', { to: 'NOWHERE' }), 'DM_INVALID_ARGUMENT', /no state 'NOWHERE' \(states: SUBMITTED, /);
    expectDmError(() => parseExportFormat('svg'), 'DM_INVALID_ARGUMENT', /formats: json, mermaid, dot, scxml/);
    expectDmError(() => machinePaths('bio', { limit: -1 }), 'DM_INVALID_ARGUMENT');
  });

  test('coverage refuses machines that are not flat', () => {
    expectDmError(() => machineCoverage(fixture, []), 'DM_NOT_SUPPORTED', /flat/);
  });
});

describe('coverage counts what the traces went through', () => {
  test('shortest paths alone miss the back edges, and the report says which', () => {
    const bio = machineOf('bio');
    const report = machineCoverage('bio', shortestMachinePaths('bio').map((p) => traceOnXstate(bio, p.events)));
    expect(report.states.covered).toBe(report.states.total);
    expect(report.transitions.covered).toBeLessThan(report.transitions.total);
    const missed = report.transitions.items.filter((i) => !i.covered).map((i) => i.name);
    expect(missed).toContain('HELD --RETRY--> SUBMITTED');
    expect(missed).toContain('QUEUED --RESUME--> SUBMITTED');
  });

  test('a step the machine does not have is reported as unexpected', () => {
    const report = machineCoverage('bio', [{ states: ['SUBMITTED', 'COMPLETED'], steps: [{ from: 'SUBMITTED', event: 'ENDIO', to: 'COMPLETED' }] }]);
    expect(report.unexpected).toEqual(['SUBMITTED --ENDIO--> COMPLETED']);
    expect(report.transitions.covered).toBe(0);
  });

  test('an event a state does not accept makes both runners throw', () => {
    expect(() => traceOnXstate(machineOf('bio'), ['IO_DONE'])).toThrow(/not accepted in SUBMITTED/);
    expect(() => traceOnCompiled(compileMachine(machineOf('bio')), ['IO_DONE'])).toThrow(/not accepted in SUBMITTED/);
  });
});

// A machine with what machines/ does not use yet: guards (named, with parameters, higher-order, inline), actions
// (named, built-in, inline), entry/exit, nesting, parallel and history states, eventless, delayed and targetless
// transitions.
const fixture = setup({
  types: { context: {} as { n: number } },
  guards: { isOk: () => true, isBad: () => false },
  actions: { bump: () => {}, log: () => {} },
}).createMachine({
  id: 'fixture',
  initial: 'Idle',
  context: { n: 0 },
  states: {
    Idle: {
      entry: 'log',
      on: {
        GO: [{ target: 'Busy', guard: 'isOk', actions: ['bump', assign({ n: 1 })] }, { target: 'Done', guard: { type: 'isBad', params: { k: 1 } } }],
        BOTH: { target: 'Both', guard: and(['isOk', not('isBad')]) },
        POKE: { actions: 'log' },
        FN: { target: 'Done', guard: function namedCheck() { return true; }, actions: () => {} },
      },
    },
    Busy: {
      initial: 'a',
      exit: [{ type: 'log', params: { x: 1 } }],
      after: { 1000: 'Done' },
      states: { a: { on: { NEXT: 'b' } }, b: { always: { target: '#fixture.Done', guard: 'isOk' } }, hist: { type: 'history', history: 'deep' } },
      on: { RESTART: '.a' },
    },
    Both: { type: 'parallel', states: { left: {}, right: {} } },
    Done: { type: 'final' },
  },
});

describe('a machine with guards, actions, nesting and history', () => {
  const model: MachineModel = machineModel(fixture);
  const find = (source: string, event: string) => model.transitions.filter((t) => t.source === source && t.event === event);

  test('guards and actions are named', () => {
    expect(find('Idle', 'GO').map((t) => [t.targets, t.guard, t.actions])).toEqual([
      [['Busy'], 'isOk', ['bump', 'xstate.assign']],
      [['Done'], 'isBad', []],
    ]);
    expect(find('Idle', 'BOTH')[0].guard).toBe('and(isOk, not(isBad))');
    expect(find('Idle', 'FN')[0]).toMatchObject({ guard: 'namedCheck', actions: ['inline'] });
    expect(find('Idle', 'POKE')[0]).toMatchObject({ targets: [], actions: ['log'] });
    expect(find('Busy.b', '')[0]).toMatchObject({ targets: ['Done'], guard: 'isOk' });
    const delayed = model.transitions.filter((t) => t.source === 'Busy' && t.event.startsWith('xstate.after.1000'));
    expect(delayed.map((t) => t.targets)).toEqual([['Done']]);
    const busy = model.states.find((s) => s.path === 'Busy')!;
    expect(busy).toMatchObject({ type: 'compound', initial: 'Busy.a', children: ['Busy.a', 'Busy.b', 'Busy.hist'], entry: [], exit: ['log'] });
    expect(model.states.find((s) => s.path === 'Busy.hist')).toMatchObject({ type: 'history', history: 'deep', parent: 'Busy' });
    expect(model.states.find((s) => s.path === 'Idle')!.entry).toEqual(['log']);
    expect(model.events).toEqual(['BOTH', 'FN', 'GO', 'NEXT', 'POKE', 'RESTART']);
    expect(JSON.parse(JSON.stringify(toJsonDoc(fixture)))).toEqual(model);
  });

  test('SCXML: cond names guards, dm:action names actions, nesting, parallel and history are kept', () => {
    const root = parseXml(toScxml(fixture));
    const els = allElements(root);
    const byId = new Map(els.filter((e) => e.attrs.id !== undefined).map((e) => [e.attrs.id, e]));
    expect([...byId.keys()].sort()).toEqual(model.states.map((s) => s.path).sort());
    expect(byId.get('Busy')!.attrs.initial).toBe('Busy.a');
    expect(byId.get('Busy.a')!.parent).toBe(byId.get('Busy'));
    expect(byId.get('Both')!.name).toBe('parallel');
    expect(byId.get('Busy.hist')).toMatchObject({ name: 'history', attrs: { id: 'Busy.hist', type: 'deep' } });
    expect(byId.get('Done')!.name).toBe('final');
    const transitions = els.filter((e) => e.name === 'transition');
    expect(transitions.length).toBe(model.transitions.length);
    for (const t of transitions) {
      for (const target of (t.attrs.target ?? '').split(' ').filter(Boolean)) expect(byId.has(target)).toBe(true);
    }
    const go = transitions.filter((t) => t.attrs.event === 'GO');
    expect(go.map((t) => t.attrs.cond)).toEqual(['isOk', 'isBad']);
    const actionNames = (el: XmlElement): string[] => el.children.filter((c) => c.ns === SCXML_DMSTATE_NAMESPACE && c.name === 'dm:action').map((c) => c.attrs.name);
    expect(actionNames(go[0])).toEqual(['bump', 'xstate.assign']);
    expect(transitions.find((t) => t.attrs.event === 'BOTH')!.attrs.cond).toBe('and(isOk, not(isBad))');
    const eventless = transitions.filter((t) => t.attrs.event === undefined);
    expect(eventless.map((t) => [t.parent!.attrs.id, t.attrs.target, t.attrs.cond])).toEqual([['Busy.b', 'Done', 'isOk']]);
    expect(transitions.find((t) => t.attrs.event === 'POKE')!.attrs.target).toBeUndefined();
    expect(transitions.find((t) => t.attrs.event === 'RESTART')!.attrs).toMatchObject({ target: 'Busy.a', type: 'internal' });
    const onentry = byId.get('Idle')!.children.find((c) => c.name === 'onentry')!;
    expect(actionNames(onentry)).toEqual(['log']);
    expect(actionNames(byId.get('Busy')!.children.find((c) => c.name === 'onexit')!)).toEqual(['log']);
  });

  test('DOT draws compound states as clusters and mermaid as composite states', () => {
    const dot = toDot(fixture);
    expect(dot).toContain('subgraph "cluster_Busy" {');
    expect(dot).toMatch(/"Idle" -> "Busy\.a" \[label="GO \[isOk\] \/ bump, xstate\.assign", lhead="cluster_Busy"\];/);
    expect(dot).toContain('"Busy.hist" [label="H*", shape=circle];');
    const mermaid = toMermaid(fixture);
    expect(mermaid).toContain('  state Busy {');
    expect(mermaid).toContain('    [*] --> Busy_a');
    expect(mermaid).toContain('  Idle --> Busy : GO [isOk] / bump, xstate.assign');
    expect(mermaid).toMatch(/state Both \{\n\s+state "left" as Both_left\n\s+--\n\s+state "right" as Both_right\n\s+\}/);
  });

  test('paths run through nested states (guards evaluated by xstate)', () => {
    const p = machinePaths(fixture, { to: 'Busy.b' });
    expect(p.shortest.map((s) => s.events)).toEqual([]); // Busy.b is left at once (eventless, isOk): never a resting state
    const toA = machinePaths(fixture, { to: 'Busy.a' });
    expect(toA.shortest.map((s) => [s.state, s.events])).toEqual([['Busy.a', ['GO']]]);
    const actor = createActor(fixture).start();
    actor.send({ type: 'GO' });
    expect(actor.getSnapshot().value).toEqual({ Busy: 'a' });
    actor.stop();
  });
});

// ---- the CLI, end to end (`node bin/dmstate.js`, which runs the build in dist/: npm test builds first) ----

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const CLI = path.join(ROOT, 'bin/dmstate.js');

interface CliResult {
  readonly code: number | null;
  readonly stdout: string;
  readonly stderr: string;
}

function cli(args: readonly string[]): Promise<CliResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [CLI, ...args], { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (c: string) => (stdout += c));
    child.stderr.setEncoding('utf8').on('data', (c: string) => (stderr += c));
    const timer = setTimeout(() => child.kill('SIGKILL'), 20_000);
    child.on('error', reject);
    child.on('close', (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr });
    });
  });
}

describe('dmstate machines', () => {
  let tmp: string;
  beforeAll(() => {
    expect(fs.existsSync(path.join(ROOT, 'dist/src/frontends/cli/machines.js')), 'run npm run build first').toBe(true);
    tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'dmstate-machines-'));
  });
  afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

  test('with no name lists every machine with its state and transition counts', async () => {
    const r = await cli(['machines']);
    expect(r.code).toBe(0);
    const rows = r.stdout.trimEnd().split('\n');
    expect(rows[0]).toMatch(/^machine\s+states\s+transitions\s+events\s+initial\s+final states$/);
    expect(rows.length).toBe(NAMES.length + 1);
    for (const name of NAMES) {
      const c = compileMachine(machineOf(name));
      const row = rows.find((l) => l.startsWith(`${name} `))!.split(/\s+/);
      expect(row.slice(0, 5)).toEqual([name, String(c.stateNames.length), String(tableTransitions(c).length), String(c.eventNames.length),
        c.stateNames[c.initialIndex]]);
    }
  });

  test('exports one machine in each format', async () => {
    const json = await cli(['machines', 'bio', '--format', 'json']);
    expect(json.code).toBe(0);
    expect(JSON.parse(json.stdout)).toEqual(toJsonDoc('bio'));
    const plain = await cli(['machines', 'kcopyd-piece']);
    expect(JSON.parse(plain.stdout)).toEqual(toJsonDoc('kcopyd-piece'));
    for (const format of ['mermaid', 'dot', 'scxml'] as const) {
      const r = await cli(['machines', 'merge', `--format=${format}`]);
      expect(r.code).toBe(0);
      expect(r.stdout).toBe(exportMachine('merge', format));
    }
    expect(parseXml((await cli(['machines', 'bio', '--format', 'scxml'])).stdout).attrs.initial).toBe('SUBMITTED');
  });

  test('exports every machine: JSON as an array, SCXML into one file per machine with --out', async () => {
    const all = await cli(['machines', '--format', 'json']);
    expect(all.code).toBe(0);
    expect((JSON.parse(all.stdout) as MachineModel[]).map((m) => m.name)).toEqual(NAMES);
    const refused = await cli(['machines', '--format', 'scxml']);
    expect(refused.code).toBe(2);
    expect(refused.stderr).toMatch(/give a NAME or --out DIR/);
    const dir = path.join(tmp, 'scxml');
    const written = await cli(['machines', '--format', 'scxml', '--out', dir]);
    expect(written.code).toBe(0);
    expect(fs.readdirSync(dir).sort()).toEqual(NAMES.map((n) => `${n}.scxml`).sort());
    for (const name of NAMES) expect(parseXml(fs.readFileSync(path.join(dir, `${name}.scxml`), 'utf8')).attrs.name).toBe(machineOf(name).id);
  });

  test('--paths --to STATE lists paths that end there', async () => {
    const r = await cli(['machines', 'bio', '--paths', '--to', 'COMPLETED', '--json']);
    expect(r.code).toBe(0);
    const p = JSON.parse(r.stdout) as ReturnType<typeof machinePaths>;
    expect(p).toEqual(machinePaths('bio', { to: 'COMPLETED' }));
    const c = compileMachine(machineOf('bio'));
    for (const sp of [...p.shortest, ...p.simple]) expect(endState(c, sp.events)).toBe('COMPLETED');
    const text = await cli(['machines', 'merge', '--paths', '--limit', '2']);
    expect(text.code).toBe(0);
    const total = machinePaths('merge').simpleTotal;
    expect(text.stdout).toContain(`simple paths, no state twice: 2 of ${total}, the shortest first (limit 2; --limit N for more)`);
  });

  test('--coverage covers every state and transition of every machine in both forms', async () => {
    const r = await cli(['machines', '--coverage']);
    expect(r.code).toBe(0);
    for (const name of NAMES) {
      const c = compileMachine(machineOf(name));
      const s = c.stateNames.length;
      const t = tableTransitions(c).length;
      for (const form of ['xstate', 'compiled']) {
        expect(r.stdout).toMatch(new RegExp(`^${name}\\s+${form}\\s+${s}/${s}\\s+${t}/${t}\\s+\\d+$`, 'm'));
      }
    }
    expect(r.stdout).not.toContain('✗');
  });

  test('bad input: exit 2 with the valid choices, and nothing written', async () => {
    const unknown = await cli(['machines', 'nope']);
    expect(unknown.code).toBe(2);
    expect(unknown.stderr).toContain(`unknown machine 'nope' (machines: ${NAMES.join(', ')})`);
    const format = await cli(['machines', 'bio', '--format', 'svg']);
    expect(format.code).toBe(2);
    expect(format.stderr).toContain("unknown format 'svg' (formats: json, mermaid, dot, scxml)");
    const state = await cli(['machines', 'bio', '--paths', '--to', 'NOWHERE']);
    expect(state.code).toBe(2);
    expect(state.stderr).toContain("machine bio has no state 'NOWHERE' (states: SUBMITTED, QUEUED, MAPPED, HELD, REMAPPED, COMPLETED, FAILED)");
    const out = path.join(tmp, 'never');
    const unknownOut = await cli(['machines', 'nope', '--format', 'dot', '--out', out]);
    expect(unknownOut.code).toBe(2);
    expect(fs.existsSync(out)).toBe(false);
    for (const args of [['machines', '--bogus'], ['machines', 'bio', '--out'], ['machines', '--paths'], ['machines', 'bio', '--to', 'COMPLETED'], ['machines', 'bio', 'merge']]) {
      const r = await cli(args);
      expect(r.code, args.join(' ')).toBe(2);
      expect(r.stderr).toMatch(/^dmstate: machines: /);
      expect(r.stdout).toBe('');
    }
  });
});
