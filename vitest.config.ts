import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    testTimeout: 30_000,
    hookTimeout: 600_000,
    pool: 'forks',
    // One test file at a time: the kernel VMs, NBD peers and daemons of different files would otherwise compete
    // for the 2 cores and make time-outs flaky.
    fileParallelism: false,
    globalSetup: ['test/global-setup.ts'],
  },
});
