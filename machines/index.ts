/** Every machine definition, by name (used by exports, path tests and inspection). */
import { bioMachine } from './bio.js';
import { kcopydJobMachine, kcopydPieceMachine } from './kcopyd.js';
import { mergeMachine } from './merge.js';

export { bioMachine, kcopydJobMachine, kcopydPieceMachine, mergeMachine };

export const MACHINES = {
  bio: bioMachine,
  'kcopyd-job': kcopydJobMachine,
  'kcopyd-piece': kcopydPieceMachine,
  merge: mergeMachine,
} as const;

export type MachineName = keyof typeof MACHINES;
