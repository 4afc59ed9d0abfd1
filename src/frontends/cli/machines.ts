/**
 * `dmstate machines`: the state machines of machines/ for reading and for other tools.
 *
 *   dmstate machines                                 list them with their state, transition and event counts
 *   dmstate machines NAME [--format F] [--out DIR]   export one (F: json, mermaid, dot, scxml; default json)
 *   dmstate machines --format F [--out DIR]          export every one (json: an array; dot: one graph each;
 *                                                    mermaid and scxml need --out DIR: one document per file)
 *   dmstate machines NAME --paths [--to STATE] [--limit N] [--json]   shortest and simple paths (xstate/graph)
 *   dmstate machines [NAME] --coverage               run covering paths on the xstate and the compiled forms and
 *                                                    list every state and transition, covered or not
 *
 * Exit 0 on success, 2 on a usage error (unknown machine, format, state or option) with the valid choices, and 1
 * when --coverage finds something not covered or a form that disagrees with the machine.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { compileMachine } from '../../core/compiled-machine.js';
import { DmError, isDmError } from '../../core/errors.js';
import { parseUnsigned } from '../../core/parse-number.js';
import {
  coveringPaths, formatCoverageDetail, formatCoverageTable, machineCoverage, traceOnCompiled, traceOnXstate, type CoverageReport,
} from '../../inspect/machine-coverage.js';
import {
  exportMachine, formatMachinePaths, machinePaths, MACHINE_EXPORT_EXTENSIONS, MACHINE_EXPORT_FORMATS, parseExportFormat, toJsonDoc,
  type MachineExportFormat,
} from '../../inspect/machine-export.js';
import { machineByName, machineModel, machineNames } from '../../inspect/machine-model.js';

export const MACHINES_USAGE = `usage: dmstate machines                                  list the machines of machines/
       dmstate machines [NAME] [--format FORMAT] [--out DIR]   export one machine, or every one
       dmstate machines NAME --paths [--to STATE] [--limit N] [--json]   shortest and simple paths
       dmstate machines [NAME] --coverage               run paths covering every transition on the xstate and the
                                                        compiled forms; list every state and transition, covered or not
  FORMAT: ${MACHINE_EXPORT_FORMATS.join(', ')} (default json); --out DIR writes DIR/NAME.EXT instead of printing
`;

interface MachinesArgs {
  name?: string;
  format?: MachineExportFormat;
  out?: string;
  paths: boolean;
  to?: string;
  limit?: number;
  json: boolean;
  coverage: boolean;
  help: boolean;
}

export interface MachinesOutput {
  write(text: string): unknown;
}

function parseMachinesArgs(argv: readonly string[]): MachinesArgs {
  const args: MachinesArgs = { paths: false, json: false, coverage: false, help: false };
  for (let i = 0; i < argv.length; i++) {
    const eq = argv[i].startsWith('--') ? argv[i].indexOf('=') : -1;
    const flag = eq > 0 ? argv[i].slice(0, eq) : argv[i];
    const value = (): string => {
      const v = eq > 0 ? argv[i].slice(eq + 1) : argv[++i];
      if (v === undefined || v === '') throw new DmError('DM_INVALID_ARGUMENT', `machines: ${flag} needs a value`);
      return v;
    };
    switch (flag) {
      case '--format':
        args.format = parseExportFormat(value());
        break;
      case '--out':
        args.out = value();
        break;
      case '--paths':
        args.paths = true;
        break;
      case '--to':
        args.to = value();
        break;
      case '--limit':
        args.limit = parseUnsigned(value(), '--limit', 'DM_INVALID_ARGUMENT');
        break;
      case '--json':
        args.json = true;
        break;
      case '--coverage':
        args.coverage = true;
        break;
      case '--help':
      case '-h':
        args.help = true;
        break;
      default:
        if (flag.startsWith('-')) throw new DmError('DM_INVALID_ARGUMENT', `machines: unknown option '${flag}'`);
        if (args.name !== undefined) throw new DmError('DM_INVALID_ARGUMENT', `machines: one machine name at a time ('${args.name}', '${flag}')`);
        args.name = flag;
    }
  }
  const pathOptions = args.to !== undefined || args.limit !== undefined || args.json;
  if (args.paths && (args.format !== undefined || args.out !== undefined || args.coverage)) {
    throw new DmError('DM_INVALID_ARGUMENT', 'machines: --paths goes with --to, --limit and --json only');
  }
  if (!args.paths && pathOptions) throw new DmError('DM_INVALID_ARGUMENT', 'machines: --to, --limit and --json go with --paths');
  if (args.paths && args.name === undefined) throw new DmError('DM_INVALID_ARGUMENT', 'machines: --paths needs a machine NAME');
  if (args.coverage && (args.format !== undefined || args.out !== undefined)) {
    throw new DmError('DM_INVALID_ARGUMENT', 'machines: --coverage takes no --format or --out');
  }
  if (args.name !== undefined) machineByName(args.name); // an unknown name fails here, listing the names
  return args;
}

export async function runMachines(argv: string[], out: MachinesOutput = process.stdout, err: MachinesOutput = process.stderr): Promise<number> {
  try {
    const args = parseMachinesArgs(argv);
    if (args.help) {
      out.write(MACHINES_USAGE);
      return 0;
    }
    if (args.paths) {
      const paths = machinePaths(args.name!, { to: args.to, limit: args.limit });
      out.write(args.json ? JSON.stringify(paths, null, 2) + '\n' : formatMachinePaths(paths));
      return 0;
    }
    if (args.coverage) return coverage(args.name !== undefined ? [args.name] : machineNames(), out);
    if (args.name === undefined && args.format === undefined) {
      out.write(listMachines());
      return 0;
    }
    await exportMachines(args.name !== undefined ? [args.name] : machineNames(), args.format ?? 'json', args.out, args.name === undefined, out);
    return 0;
  } catch (e) {
    if (!isDmError(e)) throw e;
    err.write(`dmstate: ${e.message}\n${e.code === 'DM_INVALID_ARGUMENT' ? MACHINES_USAGE : ''}`);
    return e.code === 'DM_INVALID_ARGUMENT' ? 2 : 1;
  }
}

function listMachines(): string {
  const rows = [['machine', 'states', 'transitions', 'events', 'initial', 'final states'],
    ...machineNames().map((name) => {
      const m = machineModel(name);
      return [name, String(m.states.length), String(m.transitions.length), String(m.events.length), m.initial,
        m.states.filter((s) => s.type === 'final').map((s) => s.path).join(' ') || '-'];
    })];
  const widths = rows[0].map((_, c) => Math.max(...rows.map((r) => r[c].length)));
  const numeric = (c: number): boolean => c >= 1 && c <= 3;
  return rows.map((r) => r.map((cell, c) => (numeric(c) ? cell.padStart(widths[c]) : cell.padEnd(widths[c]))).join('  ').trimEnd()).join('\n') + '\n';
}

async function exportMachines(names: readonly string[], format: MachineExportFormat, outDir: string | undefined, all: boolean, out: MachinesOutput): Promise<void> {
  if (outDir !== undefined) {
    // Every document is made before the first file is written: a failing export writes nothing.
    const docs = names.map((name) => ({ file: path.join(outDir, `${name}.${MACHINE_EXPORT_EXTENSIONS[format]}`), text: exportMachine(name, format) }));
    await fs.promises.mkdir(outDir, { recursive: true });
    for (const d of docs) {
      await fs.promises.writeFile(d.file, d.text);
      out.write(`${d.file}\n`);
    }
    return;
  }
  if (!all) out.write(exportMachine(names[0], format));
  else if (format === 'json') out.write(JSON.stringify(names.map((n) => toJsonDoc(n)), null, 2) + '\n');
  else if (format === 'dot') out.write(names.map((n) => exportMachine(n, format)).join('\n'));
  else throw new DmError('DM_INVALID_ARGUMENT', `machines: --format ${format} makes one document per machine: give a NAME or --out DIR`);
}

function coverage(names: readonly string[], out: MachinesOutput): number {
  const rows: Array<{ form: string; report: CoverageReport }> = [];
  for (const name of names) {
    const machine = machineByName(name);
    const compiled = compileMachine(machine);
    const paths = coveringPaths(machine);
    rows.push({ form: 'xstate', report: machineCoverage(name, paths.map((p) => traceOnXstate(machine, p))) });
    rows.push({ form: 'compiled', report: machineCoverage(name, paths.map((p) => traceOnCompiled(compiled, p))) });
  }
  out.write(formatCoverageTable(rows) + '\n');
  for (const r of rows) if (r.form === 'xstate') out.write(formatCoverageDetail(r.report));
  const complete = (r: CoverageReport): boolean =>
    r.states.covered === r.states.total && r.transitions.covered === r.transitions.total && r.unexpected.length === 0;
  // The detail is listed for the xstate form; a compiled form that differs gets its own listing.
  for (const r of rows) if (r.form === 'compiled' && !complete(r.report)) out.write(`compiled form:\n${formatCoverageDetail(r.report)}`);
  return rows.every((r) => complete(r.report)) ? 0 : 1;
}
