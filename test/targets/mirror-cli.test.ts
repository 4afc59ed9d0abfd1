/**
 * `dmstate resync NAME`: the progress bar and the watch loop, in-process against an engine through dmsetup's
 * executor (the daemon runs the same), with a resync held back by a gated leg so that progress is seen moving.
 */
import { describe, expect, test } from 'vitest';
import { FaultyBlockDevice } from '../../src/block/faulty-device.js';
import { sectors } from '../../src/block/units.js';
import { isDmError } from '../../src/core/errors.js';
import { parseDmsetupArgs } from '../../src/frontends/dmsetup/command.js';
import { executeDmsetup } from '../../src/frontends/dmsetup/execute.js';
import type { DmsetupRunner } from '../../src/frontends/cli/dmsetup-runner.js';
import { formatResyncProgress, parseResyncStatus, runResync } from '../../src/frontends/cli/resync.js';
import type { Engine } from '../../src/core/engine.js';
import { DmError } from '../../src/core/errors.js';
import { TestDevice, mem, mirrorSetOf, openWorld, until } from './mirror-fixtures.js';

const LEN = 32768;

function runner(engine: Engine): DmsetupRunner {
  return async (argv) => {
    const r = await executeDmsetup(engine, parseDmsetupArgs(argv), 'test');
    if (r.exitCode !== 0) throw new DmError((r.errorCode as never) ?? 'DM_INVALID_ARGUMENT', r.stderr);
    return r.stdout;
  };
}

class Capture {
  text = '';
  isTTY = false;
  write(s: string): boolean {
    this.text += s;
    return true;
  }
}

describe('dmstate resync', () => {
  test('progress bar: fraction, counts, rate and ETA', () => {
    expect(formatResyncProgress(0, 100, 0, 10)).toBe('[..........]   0.0%  0/100 regions  0 regions/s  ETA --:--');
    expect(formatResyncProgress(50, 100, 25, 10)).toBe('[#####.....]  50.0%  50/100 regions  25 regions/s  ETA 0:02');
    expect(formatResyncProgress(100, 100, 0, 10)).toBe('[##########] 100.0%  100/100 regions  0 regions/s  ETA 0:00');
    expect(() => parseResyncStatus('hello')).toThrow(expect.objectContaining({ code: 'DM_INVALID_ARGUMENT' }));
  });

  test('watches a resync to the end, printing progress as regions come into sync', async () => {
    const b = new TestDevice(mem(LEN), 'b');
    b.gateWrites = true;
    const w = await openWorld({ a: mem(LEN), b });
    await w.engine.create('m', { table: `0 ${LEN} mirror core 1 1024 2 a 0 b 0` });
    const set = mirrorSetOf(w.engine, 'm');
    let now = 0;
    let polls = 0;
    const out = new Capture();
    const code = await runResync(runner(w.engine), 'm', out as never, {
      nowMs: () => now,
      wait: async () => {
        // Each poll lets the gated copy in flight through and advances the watcher's clock one second.
        now += 1000;
        polls++;
        b.release();
        await until(() => b.gatedCount > 0 || set.resync.state === 'IN_SYNC', 'the next copy');
        if (polls > 5) {
          b.gateWrites = false;
          b.release();
        }
      },
    });
    expect(code).toBe(0);
    const lines = out.text.trim().split('\n');
    expect(lines[0]).toMatch(/^\[\.+\]\s+0\.0% {2}0\/32 regions {2}0 regions\/s {2}ETA --:--$/);
    expect(lines.some((l) => /^\[#+\.+\]\s+\d+\.\d% {2}[1-9]\d*\/32 regions {2}[1-9]\d* regions\/s {2}ETA \d+:\d\d$/.test(l))).toBe(true);
    expect(lines[lines.length - 2]).toMatch(/^\[#{30}\] 100\.0% {2}32\/32 regions/);
    expect(lines[lines.length - 1]).toBe('m: in sync (32/32 regions, health AA)');
    await w.engine.close();
  });

  test('a failed leg: DEGRADED exits 1 and says how to re-add; --readd copies what it missed', async () => {
    const a = new FaultyBlockDevice(mem(LEN));
    const b = new FaultyBlockDevice(mem(LEN));
    const w = await openWorld({ a, b });
    await w.engine.create('m', { table: `0 ${LEN} mirror core 2 1024 nosync 2 a 0 b 0 1 handle_errors` });
    b.setErrorRules([{ op: 'write' }]);
    await w.engine.device('m')!.write(sectors(0), Buffer.alloc(4096, 1));
    await until(() => mirrorSetOf(w.engine, 'm').resync.state === 'DEGRADED', 'the resync to wait');
    const opts = { nowMs: () => 0, wait: async () => undefined };
    const out = new Capture();
    expect(await runResync(runner(w.engine), 'm', out as never, opts)).toBe(1);
    expect(out.text).toContain('m: a leg has failed (health AD); the resync waits until it is re-added');
    b.setErrorRules([]);
    const out2 = new Capture();
    expect(await runResync(runner(w.engine), 'm', out2 as never, { ...opts, readdLeg: 'b', throttlePercent: '50', wait: () => new Promise((r) => setImmediate(r)) })).toBe(0);
    expect(out2.text).toContain('re-added leg b of m');
    expect(out2.text).toContain('m: in sync (32/32 regions, health AA)');
    expect(mirrorSetOf(w.engine, 'm').resync.throttlePercent).toBe(50);
    await w.engine.close();
  });

  test('refuses a device that is not a mirror', async () => {
    const w = await openWorld({ a: mem(LEN) });
    await w.engine.create('lin', { table: `0 ${LEN} linear a 0` });
    const err = await runResync(runner(w.engine), 'lin', new Capture() as never, { nowMs: () => 0, wait: async () => undefined }).catch((e: unknown) => e);
    expect(isDmError(err) && err.code).toBe('DM_INVALID_ARGUMENT');
    await w.engine.close();
  });
});
