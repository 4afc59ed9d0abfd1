/** `npm run bench`: every benchmark, one after the other, results printed as lines. Not a test. */
import { benchLinearOverhead } from './linear-overhead.js';
import { benchSnapshotCow } from './snapshot-cow.js';
import { benchInspectOverhead } from './inspect-overhead.js';
import { benchReplay } from './replay.js';
import { benchMerge } from './merge.js';
import { benchMirror } from './mirror.js';

const only = process.argv[2];
const benches: Array<[string, () => Promise<string>]> = [
  ['linear-overhead', () => benchLinearOverhead()],
  ['snapshot-cow', () => benchSnapshotCow()],
  ['inspect-overhead', () => benchInspectOverhead()],
  ['replay', () => benchReplay()],
  ['merge', () => benchMerge()],
  ['mirror', () => benchMirror()],
];

for (const [name, run] of benches) {
  if (only && only !== name) continue;
  process.stdout.write(`${await run()}\n`);
}
