/** Once before all tests: make sure the real clients the NBD tests use are installed (test/install-tools.sh). */
import { spawnSync } from 'node:child_process';
import * as path from 'node:path';

export default function setup(): void {
  const script = path.join(import.meta.dirname, 'install-tools.sh');
  const r = spawnSync('bash', [script], { stdio: ['ignore', 'inherit', 'pipe'], encoding: 'utf8' });
  if (r.status !== 0) {
    // Not fatal here: the tests that need the tools fail with this reason; the others still run.
    process.env.DMSTATE_TOOLS_MISSING = r.stderr.trim() || 'test tools could not be installed';
    process.stderr.write(`${process.env.DMSTATE_TOOLS_MISSING}\n`);
  }
}
