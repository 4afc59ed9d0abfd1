/**
 * The README's JavaScript examples run as written (against the built package, imported by its name as a user's
 * program inside this checkout would): the tour's embedding example and the Embedding section's snapshot program.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { spawnSync } from 'node:child_process';
import { afterEach, beforeEach, expect, test } from 'vitest';

const root = path.resolve(import.meta.dirname, '../..');
const readme = fs.readFileSync(path.join(root, 'README.md'), 'utf8');

/** The ```js blocks of one `## ` section of the README. */
function jsBlocks(section: string): string[] {
  const start = readme.indexOf(`\n## ${section}\n`);
  if (start < 0) throw new Error(`README has no section "${section}"`);
  const next = readme.indexOf('\n## ', start + 1);
  const text = readme.slice(start, next < 0 ? undefined : next);
  return [...text.matchAll(/```js\n([\s\S]*?)```/g)].map((m) => m[1]);
}

let dir: string;
beforeEach(() => {
  // The example must sit inside the package for `import 'dmstate'` to resolve to this checkout.
  dir = fs.mkdtempSync(path.join(root, '.readme-test-'));
});
afterEach(() => {
  fs.rmSync(dir, { recursive: true, force: true });
});

function runNode(file: string, code: string): { stdout: string; stderr: string; status: number | null } {
  fs.writeFileSync(path.join(dir, file), code);
  return spawnSync(process.execPath, [file], { cwd: dir, encoding: 'utf8', timeout: 60_000 });
}

test('the README has exactly these JavaScript examples: one in the tour, one in Embedding', () => {
  expect([...readme.matchAll(/```js\n/g)]).toHaveLength(2);
  expect(jsBlocks('A five-minute tour')).toHaveLength(1);
  expect(jsBlocks('Embedding')).toHaveLength(1);
});

test('the tour embedding example runs and reads back what it wrote', () => {
  fs.writeFileSync(path.join(dir, 'disk.img'), '');
  fs.truncateSync(path.join(dir, 'disk.img'), 16 * 1024 * 1024);
  const r = runNode('tour.mjs', jsBlocks('A five-minute tour')[0]);
  expect(r.stderr).toBe('');
  expect(r.status).toBe(0);
  expect(r.stdout).toContain('read back equal: true');
  expect(r.stdout).toMatch(/event \d+ device\.created lin/);
  expect(r.stdout).toMatch(/event \d+ mark lin/);
  expect(r.stdout).toContain(`0 16384 linear ${dir}/disk.img 0`);
  const log = spawnSync(process.execPath, [path.join(root, 'bin/dmstate.js'), 'log', '--pool', './pool-embedded', '--json'], { cwd: dir, encoding: 'utf8' });
  expect(log.status).toBe(0);
  const events = log.stdout.trim().split('\n').map((l) => JSON.parse(l) as { type: string; name?: string });
  expect(events.find((e) => e.type === 'mark')?.name).toBe('wrote-one-block');
  // The disk really holds the block at sector 8.
  const disk = fs.readFileSync(path.join(dir, 'disk.img'));
  expect(disk.subarray(8 * 512, 8 * 512 + 4096).every((b) => b === 0xab)).toBe(true);
});

test('the Embedding example: snapshot device in a Node program, exception commits from events$, bios from inspect$', () => {
  const code = jsBlocks('Embedding')[0];
  for (let run = 1; run <= 2; run++) {
    // Twice: the program cleans up after itself, so it runs again on the same pool.
    const r = runNode('embed.mjs', code);
    expect(r.stderr).toBe('');
    expect(r.status).toBe(0);
    const lines = r.stdout.trim().split('\n');
    // What the README says it prints.
    expect(lines[0]).toBe('exceptions committed: 2 (origin chunk -> COW chunk: 8->2 9->3)');
    const inspected = lines.filter((l) => l.startsWith('inspect '));
    for (const id of ['bio:snap:1', 'bio:snap:2']) {
      expect(inspected.filter((l) => l.startsWith(`inspect ${id}:`)).map((l) => l.slice(l.indexOf(': ') + 2))).toEqual([
        'SUBMITTED --MAP--> MAPPED',
        'MAPPED --REMAP--> REMAPPED',
        'REMAPPED --IO_DONE--> COMPLETED',
      ]);
    }
    expect(inspected).toHaveLength(6);
    expect(lines.slice(-3)).toEqual(['origin has the new data: true', 'snapshot kept the old data: true', '0 16384 snapshot 32/8192 16']);
  }
  // The files hold what the program says: new data in the origin, the old (zero) chunks copied to the COW.
  const origin = fs.readFileSync(path.join(dir, 'origin.img'));
  expect(origin.subarray(64 * 512, 64 * 512 + 8192).every((b) => b === 0xab)).toBe(true);
  const log = spawnSync(process.execPath, [path.join(root, 'bin/dmstate.js'), 'log', '--pool', './pool-embed', '--json'], { cwd: dir, encoding: 'utf8' });
  expect(log.status).toBe(0);
  const events = log.stdout.trim().split('\n').map((l) => JSON.parse(l) as { type: string; device?: string });
  expect(events.filter((e) => e.type === 'device.created').map((e) => e.device)).toEqual(['base', 'snap', 'base', 'snap']);
  expect(events.filter((e) => e.type === 'exception.committed')).toHaveLength(2);
});

test('the package exports types: a TypeScript program gets typed events and inspection records from `dmstate`', () => {
  // Resolved through package.json "exports" (types → dist/src/index.d.ts), as a user's program would.
  fs.writeFileSync(
    path.join(dir, 'typed.mts'),
    `import { openPool, type InspectionRecord, type LoggedEventOf } from 'dmstate';
const pool = await openPool('./p');
pool.events$ByType('exception.committed').subscribe((e: LoggedEventOf<'exception.committed'>) => {
  const chunks: Array<[number, number]> = e.chunks;
  // @ts-expect-error: an exception commit has no device field
  void e.device;
  void chunks;
});
pool.inspect$({ kinds: ['bio', 'merge'] }).subscribe((r: InspectionRecord) => {
  if (r.type === '@xstate.snapshot') {
    const to: string = r.value;
    void to;
  }
});
// @ts-expect-error: not an actor kind
pool.inspect$({ kinds: ['thread'] });
const size: number = pool.device('x').sizeSectors;
void size;
await pool.close();
`,
  );
  const tsc = path.join(root, 'node_modules/typescript/bin/tsc');
  const r = spawnSync(process.execPath, [tsc, '--noEmit', '--strict', '--module', 'nodenext', '--moduleResolution', 'nodenext', '--target', 'es2022', '--types', 'node', 'typed.mts'], {
    cwd: dir,
    encoding: 'utf8',
    timeout: 120_000,
  });
  expect(r.stdout + r.stderr).toBe('');
  expect(r.status).toBe(0);
});
