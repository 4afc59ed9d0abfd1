/** Every machine definition, by name (used by exports, path tests and inspection). */
import { bioMachine } from './bio.js';
import { kcopydJobMachine, kcopydPieceMachine } from './kcopyd.js';
import { mergeMachine } from './merge.js';
import { mirrorResyncMachine } from './mirror-resync.js';
import { mirrorWriteGroupMachine } from './mirror-write-group.js';
import { mirrorWriteTransactionMachine } from './mirror-write-transaction.js';

export { bioMachine, kcopydJobMachine, kcopydPieceMachine, mergeMachine, mirrorResyncMachine, mirrorWriteGroupMachine, mirrorWriteTransactionMachine };

export const MACHINES = {
  bio: bioMachine,
  'kcopyd-job': kcopydJobMachine,
  'kcopyd-piece': kcopydPieceMachine,
  merge: mergeMachine,
  'mirror-write-group': mirrorWriteGroupMachine,
  'mirror-write-transaction': mirrorWriteTransactionMachine,
  'mirror-resync': mirrorResyncMachine,
} as const;

export type MachineName = keyof typeof MACHINES;
