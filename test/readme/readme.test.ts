/**
 * The README's embedding example runs as written (against the built package, imported by its name as a user's
 * program inside this checkout would).
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { spawnSync } from 'node:child_process';
import { expect, test } from 'vitest';

const root = path.resolve(import.meta.dirname, '../..');

test('the README embedding example runs and reads back what it wrote', () => {
  const readme = fs.readFileSync(path.join(root, 'README.md'), 'utf8');
  const blocks = [...readme.matchAll(/```js\n([\s\S]*?)```/g)].map((m) => m[1]);
  expect(blocks.length).toBe(1);
  // The example must sit inside the package for `import 'dmstate'` to resolve to this checkout.
  const dir = fs.mkdtempSync(path.join(root, '.readme-test-'));
  try {
    fs.writeFileSync(path.join(dir, 'tour.mjs'), blocks[0]);
    fs.writeFileSync(path.join(dir, 'disk.img'), '');
    fs.truncateSync(path.join(dir, 'disk.img'), 16 * 1024 * 1024);
    const r = spawnSync(process.execPath, ['tour.mjs'], { cwd: dir, encoding: 'utf8' });
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
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
