/** Every machine definition, by name (used by exports, path tests and inspection). */
import { bioMachine } from './bio.js';
import { kcopydJobMachine, kcopydPieceMachine } from './kcopyd.js';

export { bioMachine, kcopydJobMachine, kcopydPieceMachine };

export const MACHINES = {
  bio: bioMachine,
  'kcopyd-job': kcopydJobMachine,
  'kcopyd-piece': kcopydPieceMachine,
} as const;

export type MachineName = keyof typeof MACHINES;
