#!/usr/bin/env node
// The `dmstate` command. The TypeScript sources are compiled to dist/ by `npm ci` (the prepare script).
import { main } from '../dist/src/frontends/cli/main.js';

main(process.argv.slice(2)).then(
  (code) => { process.exitCode = code; },
  (err) => { console.error(`dmstate: ${err && err.message ? err.message : err}`); process.exitCode = 1; },
);
