/** The package version (kept in step with package.json; test/version.test.ts checks). */
export const DMSTATE_VERSION = '0.1.0';
