/** `error`: fails every read, write and discard (Linux dm-error); flushes succeed, as the kernel sends none to it. */
import { MAP_DONE, MAP_KILL, type Bio } from '../core/bio.js';
import type { TargetType } from '../core/target-contract.js';

export const errorTarget: TargetType<null> = Object.freeze({
  name: 'error',
  version: [1, 5, 0] as const,
  argCountMin: 0,
  argCountMax: Infinity, // the kernel's error target ignores its arguments
  ctr: async () => null,
  map: (_inst: null, bio: Bio) => (bio.op === 'flush' ? MAP_DONE : MAP_KILL),
  status: () => '',
  table: () => '',
});
