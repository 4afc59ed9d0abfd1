/**
 * `dmstate demo` (what `npm start` runs): a daemon on the pool with a demo device `demo`, a linear device over a
 * 64 MiB file in the pool, and instructions for trying it.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { Daemon } from '../daemon.js';
import { untilSignal } from './main.js';

export const DEMO_FILE_BYTES = 64 * 1024 * 1024;

export async function runDemo(poolDir: string): Promise<number> {
  const daemon = await Daemon.start({ poolDir });
  const file = path.join(daemon.paths.dir, 'demo.img');
  if (!fs.existsSync(file)) {
    fs.writeFileSync(file, '');
    fs.truncateSync(file, DEMO_FILE_BYTES);
  }
  if (!daemon.engine.device('demo')) {
    await daemon.engine.create('demo', { table: `0 ${DEMO_FILE_BYTES / 512} linear ${file} 0` });
  }
  const pool = path.relative(process.cwd(), daemon.paths.dir) || '.';
  process.stdout.write(`dmstate demo: daemon running on pool ${daemon.paths.dir}
  device 'demo': linear over ${file} (${DEMO_FILE_BYTES / 1024 / 1024} MiB)
  NBD export:    nbd+unix:///demo?socket=${daemon.paths.nbdSocket}

In another terminal, try:
  npx dmstate dmsetup --pool ${pool} ls
  npx dmstate dmsetup --pool ${pool} table demo
  npx dmstate dmsetup --pool ${pool} create zeros --table "0 2048 zero"
  npx dmstate dmsetup --pool ${pool} message demo 0 mark hello
  npx dmstate log --pool ${pool}
  qemu-io -f raw 'nbd+unix:///demo?socket=${daemon.paths.nbdSocket}' -c 'write -P 0xab 0 4k' -c 'read -P 0xab 0 4k'

Ctrl-C stops the daemon cleanly; devices come back as they were on the next start.
`);
  await untilSignal();
  await daemon.close();
  return 0;
}
