/**
 * `replay --into` pools with mirrors and snapshots:
 *
 * (a) a read-only replayed pool leaves every file as it found it: a log-writes device (its log, end mark
 *     included), a mirror with a dm-log disk log, one with an md write-intent bitmap and one with a core log, whose region logs say (as after a crash) that some regions may
 *     differ between the legs — and the legs do differ there — are served (in process, and by `dmstate serve`),
 *     read from, written to (refused), flushed, suspended, resumed and closed: every file's sha256 is unchanged,
 *     no resync ran, the logs were read (status shows their dirty regions) and never written, and reads of a
 *     region out of sync come from the default leg;
 * (b) digests: the new pool's log folds to the replayed state with every device read-only and nothing else; with
 *     the read-only flags of then it gives the replay's digest exactly — for a pool with P and N snapshots, a
 *     merging origin, mirrors and stacked devices — and so do the served engine, the CLI's output (--json and
 *     text), and a --writable pool of the latest state.
 */
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { sectors } from '../../src/block/units.js';
import { SimulatedClock } from '../../src/core/clock.js';
import type { Engine } from '../../src/core/engine.js';
import { DISK_LOG_BITS_OFFSET_BYTES } from '../../src/dirty-logs/disk-log.js';
import { createMdBitmapImage } from '../../src/dirty-logs/md-bitmap/create-image.js';
import { MD_BITMAP_SUPERBLOCK_BYTES } from '../../src/dirty-logs/md-bitmap/superblock.js';
import { openPool } from '../../src/frontends/open-pool.js';
import { canonicalState, stateDigest } from '../../src/replay/digest.js';
import { withReadOnlyFlags } from '../../src/replay/pool-state.js';
import { replay } from '../../src/replay/replay.js';
import { writeReplayedPool } from '../../src/replay/write-pool.js';
import type { MirrorInstance } from '../../src/targets/mirror/mirror.js';
import { ReadOnlyGuardDevice } from '../../src/targets/mirror/read-only-guard.js';
import { run, show, startDaemon, stopDaemon } from '../helpers/process.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const CLI = path.join(ROOT, 'bin/dmstate.js');
const SECTOR = 512;
/** Mirrors: 2048 sectors in 64-sector regions (32 regions). */
const MIRROR_SECTORS = 2048;
const REGION = 64;
const REGIONS = MIRROR_SECTORS / REGION;
const ORIGIN_SECTORS = 4096;
const CHUNK = 8;
/** Regions a "crash" leaves dirty in the disk log / md bitmap, where the second leg then differs from the first. */
const DISK_DIRTY = [3, 5];
const BITMAP_DIRTY = [4, 6];

const sha = (file: string): string => createHash('sha256').update(fs.readFileSync(file)).digest('hex');
const turn = (): Promise<void> => new Promise((r) => setImmediate(r));
const mirrorSet = (e: Engine, name: string) => (e.device(name)!.live!.targets[0].instance as MirrorInstance).set;

async function waitFor(what: string, cond: () => boolean | Promise<boolean>, ms = 20_000): Promise<void> {
  const until = performance.now() + ms;
  while (!(await cond())) {
    if (performance.now() > until) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

describe('replay --into: mirrors and snapshots', () => {
  let dir: string;
  let pool: string;
  const f = (name: string): string => path.join(dir, name);
  /** Every data file of the pool (legs, logs, bitmap, origins, COWs). */
  const FILES = ['a.img', 'b.img', 'log.img', 'c.img', 'd.img', 'bm.img', 'e.img', 'g.img', 'l1.img', 'l2.img', 'o.img', 'cow.img', 'cow2.img', 'o2.img', 'cow3.img', 'lwd.img', 'lwlog.img'];
  const hashes = (): Record<string, string> => Object.fromEntries(FILES.map((n) => [n, sha(f(n))]));
  let pointDigest: string;
  let latestDigest: string;

  beforeAll(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'dmstate-replay-into-'));
    pool = f('pool');
    for (const n of ['a.img', 'b.img', 'c.img', 'd.img', 'e.img', 'g.img', 'l1.img', 'l2.img']) fs.writeFileSync(f(n), Buffer.alloc(MIRROR_SECTORS * SECTOR));
    fs.writeFileSync(f('log.img'), Buffer.alloc(64 * 1024));
    fs.writeFileSync(f('lwd.img'), Buffer.alloc(MIRROR_SECTORS * SECTOR));
    fs.writeFileSync(f('lwlog.img'), Buffer.alloc(1024 * 1024));
    fs.writeFileSync(f('bm.img'), createMdBitmapImage({ syncSizeSectors: BigInt(MIRROR_SECTORS), chunkSizeBytes: REGION * SECTOR, daemonSleepSeconds: 1 }));
    for (const n of ['o.img', 'o2.img']) fs.writeFileSync(f(n), Buffer.alloc(ORIGIN_SECTORS * SECTOR, 0x11));
    for (const n of ['cow.img', 'cow2.img', 'cow3.img']) fs.writeFileSync(f(n), Buffer.alloc(2048 * SECTOR));

    const p = await openPool(pool);
    const e = p.engine;
    // Minors out of creation order (a removed device's minor is reused), a uuid, a read-only device.
    await e.create('gone', { table: '0 8 zero' });
    await e.create('l1', { table: `0 ${MIRROR_SECTORS} linear ${f('l1.img')} 0`, uuid: 'LIN-1' });
    await e.remove('gone');
    await e.create('l2', { table: `0 ${MIRROR_SECTORS} linear ${f('l2.img')} 0` });
    await e.create('md', { table: `0 ${MIRROR_SECTORS} mirror disk 2 ${f('log.img')} ${REGION} 2 ${f('a.img')} 0 ${f('b.img')} 0 1 handle_errors` });
    await e.create('mb', { table: `0 ${MIRROR_SECTORS} mirror md-bitmap 3 ${f('bm.img')} ${REGION} 1 2 ${f('c.img')} 0 ${f('d.img')} 0` });
    await e.create('mc', { table: `0 ${MIRROR_SECTORS} mirror core 1 ${REGION} 2 ${f('e.img')} 0 ${f('g.img')} 0` });
    // A mirror over mapped devices (stacked: restored after them), read-only.
    await e.create('ms', { table: `0 ${MIRROR_SECTORS} mirror core 2 ${REGION} nosync 2 l1 0 l2 0`, readOnly: true });
    // A write log: its log file (entries, marks, the end mark written when the table goes) must stay as it is.
    await e.create('lw', { table: `0 ${MIRROR_SECTORS} log-writes ${f('lwd.img')} ${f('lwlog.img')}` });
    await p.device('lw').write(sectors(8), Buffer.alloc(4096, 0x5a));
    await p.device('lw').flush();
    await e.message('lw', 0, ['mark', 'lw1']);
    await e.create('orig', { table: `0 ${ORIGIN_SECTORS} snapshot-origin ${f('o.img')}` });
    await e.create('sp', { table: `0 ${ORIGIN_SECTORS} snapshot ${f('o.img')} ${f('cow.img')} P ${CHUNK}` });
    await e.create('sn', { table: `0 ${ORIGIN_SECTORS} snapshot ${f('o.img')} ${f('cow2.img')} N ${CHUNK}` });
    await e.create('orig2', { table: `0 ${ORIGIN_SECTORS} snapshot-origin ${f('o2.img')}` });
    await e.create('sp2', { table: `0 ${ORIGIN_SECTORS} snapshot ${f('o2.img')} ${f('cow3.img')} P ${CHUNK}` });
    for (const m of ['md', 'mb', 'mc']) await waitFor(`${m} in sync`, () => mirrorSet(e, m).resync.state === 'IN_SYNC');
    for (let r = 0; r < REGIONS; r++) {
      for (const m of ['md', 'mb', 'mc']) await p.device(m).write(sectors(r * REGION), Buffer.alloc(REGION * SECTOR, 0x40 + r));
    }
    for (let i = 0; i < 20; i++) {
      await p.device('orig').write(sectors(i * 64), Buffer.alloc(CHUNK * SECTOR, 0x20 + i));
      await p.device('orig2').write(sectors(i * 128), Buffer.alloc(2 * CHUNK * SECTOR, 0x30 + i));
    }
    // orig2 starts merging sp2 back (as dmstate merge does) and is suspended at once: the point is mid-merge (a
    // suspended merge resumes from the newest exception left).
    await e.suspend('orig2');
    await e.suspend('sp2');
    await e.load('orig2', `0 ${ORIGIN_SECTORS} snapshot-merge ${f('o2.img')} ${f('cow3.img')} P ${CHUNK}`);
    await e.resume('orig2');
    await e.suspend('orig2');
    await e.remove('sp2');
    // A suspended device with an inactive table.
    await e.suspend('l2');
    await e.load('l2', `0 ${MIRROR_SECTORS} linear ${f('l2.img')} 0`);
    await e.message('orig', 0, ['mark', 'point']);
    await e.log.drain();
    // After the point: the snapshot gets more exceptions, the merge goes on, the mirrors are written again.
    await e.resume('l2');
    await e.resume('orig2');
    for (let i = 20; i < 40; i++) await p.device('orig').write(sectors(i * 64), Buffer.alloc(CHUNK * SECTOR, 0x50 + i));
    for (const m of ['md', 'mb', 'mc']) await p.device(m).write(sectors(0), Buffer.alloc(REGION * SECTOR, 0x99));
    await waitFor('the merge', async () => (await e.message('orig2', 0, ['merge-status'])).includes('state=DONE'));
    await e.log.drain();
    latestDigest = e.stateDigest();
    await p.close();
    pointDigest = (await replay(pool, { toMark: 'point' })).digest;

    // As a crash would leave them: regions the logs call dirty, where the second leg differs from the first.
    const log = fs.readFileSync(f('log.img'));
    for (const r of DISK_DIRTY) log[DISK_LOG_BITS_OFFSET_BYTES + (r >>> 3)] &= ~(1 << (r & 7));
    fs.writeFileSync(f('log.img'), log);
    const bm = fs.readFileSync(f('bm.img'));
    for (const c of BITMAP_DIRTY) bm[MD_BITMAP_SUPERBLOCK_BYTES + (c >>> 3)] |= 1 << (c & 7);
    fs.writeFileSync(f('bm.img'), bm);
    const scribble = (file: string, regions: number[], fill: number): void => {
      const fd = fs.openSync(f(file), 'r+');
      for (const r of regions) fs.writeSync(fd, Buffer.alloc(REGION * SECTOR, fill), 0, REGION * SECTOR, r * REGION * SECTOR);
      fs.closeSync(fd);
    };
    scribble('b.img', DISK_DIRTY, 0xee);
    scribble('d.img', BITMAP_DIRTY, 0xdd);
    scribble('g.img', [7], 0xcc); // the core log knows nothing: every region out of sync
  }, 120_000);

  afterAll(() => {
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  });

  test('(a) a read-only replayed pool with mirrors, served in process: every file untouched, reads work, no resync', async () => {
    const r = await replay(pool, { toMark: 'point' });
    const w = await writeReplayedPool(f('into-a'), r.state, { sourcePool: pool });
    // Every leg and region log of the four mirrors is pinned, and the log-writes device and log.
    expect(w.mirrorFiles).toBe(3 + 3 + 2 + 2 + 2);
    const before = hashes();
    const clock = new SimulatedClock(1_000_000);
    const p = await openPool(f('into-a'), { clock });
    try {
      const e = p.engine;
      expect(e.restoreFailures).toEqual([]);
      // The kernel's status format; the sync counts are what the logs on disk say, and stay so (no resync).
      const legs = (x: string, y: string): string => `2 ${f(x)} ${f(y)}`;
      expect(e.status('md')).toEqual([`0 ${MIRROR_SECTORS} mirror ${legs('a.img', 'b.img')} ${REGIONS - 2}/${REGIONS} 1 AA 3 disk ${f('log.img')} A`]);
      expect(e.status('mb')).toEqual([`0 ${MIRROR_SECTORS} mirror ${legs('c.img', 'd.img')} ${REGIONS - 2}/${REGIONS} 1 AA 3 md-bitmap ${f('bm.img')} A`]);
      expect(e.status('mc')).toEqual([`0 ${MIRROR_SECTORS} mirror ${legs('e.img', 'g.img')} 0/${REGIONS} 1 AA 1 core`]);
      expect(e.status('ms')).toEqual([`0 ${MIRROR_SECTORS} mirror 2 l1 l2 ${REGIONS}/${REGIONS} 1 AA 1 core`]);
      for (const m of ['md', 'mb', 'mc']) {
        expect(mirrorSet(e, m).readOnly, m).toBe(true);
        expect(await e.message(m, 0, ['resync-status']), m).toMatch(/^state=STOPPED regions_in_sync=\d+ regions_total=32 regions_copied=0 .* read_only=1\n$/);
      }
      expect(await e.message('ms', 0, ['resync-status'])).toMatch(/^state=IN_SYNC .*regions_copied=0 .* read_only=1\n$/);
      // The write log logs nothing: its log (entries, mark lw1, the end mark of the source's shutdown) stays.
      expect(e.status('lw')).toEqual([`0 ${MIRROR_SECTORS} log-writes 0 0 logging_disabled`]);
      expect(e.table('mb')).toEqual([`0 ${MIRROR_SECTORS} mirror md-bitmap 3 ${f('bm.img')} ${REGION} 1 2 ${f('c.img')} 0 ${f('d.img')} 0`]);

      // Reads: a region the log calls dirty comes from the default leg (today's a.img / c.img), the rest from any.
      const file = (n: string, r: number): Buffer => fs.readFileSync(f(n)).subarray(r * REGION * SECTOR, (r + 1) * REGION * SECTOR);
      const read = async (m: string, r: number): Promise<Buffer> => {
        const buf = Buffer.alloc(REGION * SECTOR);
        await p.device(m).read(sectors(r * REGION), buf);
        return buf;
      };
      for (const r of [0, 1, ...DISK_DIRTY]) expect((await read('md', r)).equals(file('a.img', r)), `md region ${r}`).toBe(true);
      for (const r of [0, 2, ...BITMAP_DIRTY]) expect((await read('mb', r)).equals(file('c.img', r)), `mb region ${r}`).toBe(true);
      expect((await read('mc', 7)).equals(file('e.img', 7))).toBe(true);
      expect(file('b.img', DISK_DIRTY[0]).equals(file('a.img', DISK_DIRTY[0]))).toBe(false);
      expect((await read('md', 1))[0]).toBe(0x41);
      // Writes are refused (the devices are read-only); flushes complete; no re-add.
      for (const m of ['md', 'mb', 'mc', 'ms']) {
        await expect(p.device(m).write(sectors(0), Buffer.alloc(4096, 0x77)), m).rejects.toMatchObject({ code: 'DM_IO' });
        await p.device(m).flush();
      }
      await expect(e.message('md', 0, ['readd', '1'])).rejects.toMatchObject({ code: 'DM_NOT_SUPPORTED' });
      // Suspend and resume (the logs' suspend and resume paths), time passing (md daemon passes, clean timers).
      for (const m of ['md', 'mb', 'mc']) {
        await e.suspend(m);
        await e.resume(m);
      }
      for (let i = 0; i < 10; i++) {
        clock.advance(5_000);
        await turn();
      }
      expect(e.status('md')[0]).toContain(` ${REGIONS - 2}/${REGIONS} 1 AA 3 disk ${f('log.img')} A`);
      expect(e.status('mb')[0]).toContain(` ${REGIONS - 2}/${REGIONS} 1 AA 3 md-bitmap ${f('bm.img')} A`);
      // Nothing inside the mirrors tried to write either (their devices are read-only views that count refusals).
      for (const m of ['md', 'mb', 'mc']) {
        const s = mirrorSet(e, m);
        for (const leg of s.legs) {
          expect(leg.device).toBeInstanceOf(ReadOnlyGuardDevice);
          expect((leg.device as ReadOnlyGuardDevice).refused, `${m} leg ${leg.index}`).toBe(0);
        }
      }
      // The snapshots read as usual.
      const snap = Buffer.alloc(CHUNK * SECTOR);
      await p.device('sp').read(sectors(0), snap);
      expect(snap.every((b) => b === 0x11)).toBe(true);
      expect(hashes()).toEqual(before);
    } finally {
      await p.close();
    }
    expect(hashes()).toEqual(before);

    // And again, opened a second time (restore from the records, resume, shutdown).
    const again = await openPool(f('into-a'));
    expect(again.engine.restoreFailures).toEqual([]);
    await again.close();
    expect(hashes()).toEqual(before);
  }, 60_000);

  test('(a) the same pool served by `dmstate serve`: status through the daemon, SIGTERM, every file untouched', async () => {
    const into = f('into-cli');
    const r = await run(process.execPath, [CLI, 'replay', '--pool', pool, '--to-mark', 'point', '--into', into]);
    expect(r.code, show(r)).toBe(0);
    expect(r.stdout).toMatch(/wrote pool .*into-cli \(read-only, exceptions pinned, 12 mirror\/log-writes files pinned\): 11 devices, 2 COWs; digest [0-9a-f]{64}\n/);
    const before = hashes();
    const daemon = await startDaemon(CLI, into);
    try {
      const status = await run(process.execPath, [CLI, 'dmsetup', '--pool', into, 'status', 'md']);
      expect(status.stdout).toBe(`0 ${MIRROR_SECTORS} mirror 2 ${f('a.img')} ${f('b.img')} ${REGIONS - 2}/${REGIONS} 1 AA 3 disk ${f('log.img')} A\n`);
      const mb = await run(process.execPath, [CLI, 'dmsetup', '--pool', into, 'message', 'mb', '0', 'resync-status']);
      expect(mb.stdout).toMatch(/^state=STOPPED .*read_only=1/);
      const info = await run(process.execPath, [CLI, 'dmsetup', '--pool', into, 'info', 'mb']);
      expect(info.stdout).toMatch(/State: +ACTIVE \(READ-ONLY\)/);
      // dmstate resync does not wait for a resync that will never run.
      const resync = await run(process.execPath, [CLI, 'resync', '--pool', into, 'md'], 20_000);
      expect(resync.code, show(resync)).toBe(1);
      expect(resync.stderr).toMatch(/md: the resync is stopped/);
      await new Promise((res) => setTimeout(res, 2_500)); // two md daemon periods of real time
    } finally {
      expect(await stopDaemon(daemon)).toBe(0);
    }
    expect(hashes()).toEqual(before);
  }, 90_000);

  test('(b) digests: the new pool is the replayed state with every device read-only, and nothing else', async () => {
    const r = await replay(pool, { toMark: 'point' });
    expect(r.digest).toBe(pointDigest);
    // What the state holds at the point: P and N snapshots, a merging origin, mirrors, stacked and suspended devices.
    const canonical = canonicalState(r.state);
    expect(canonical.devices.map((d) => `${d.name}:${d.live?.[0].split(' ')[2]}`)).toEqual([
      'l1:linear',
      'l2:linear',
      'lw:log-writes',
      'mb:mirror',
      'mc:mirror',
      'md:mirror',
      'ms:mirror',
      'orig:snapshot-origin',
      'orig2:snapshot-merge',
      'sn:snapshot',
      'sp:snapshot',
    ]);
    expect(canonical.devices.find((d) => d.name === 'l2')).toMatchObject({ suspended: true, minor: 0, inactive: [`0 ${MIRROR_SECTORS} linear ${f('l2.img')} 0`] });
    expect(canonical.cows.map((c) => [path.basename(c.cow), c.exceptions! > 0])).toEqual([
      ['cow.img', true],
      ['cow3.img', true],
    ]);

    const into = f('into-b');
    const w = await writeReplayedPool(into, r.state, { sourcePool: pool });
    const readOnlyThen = new Set([...r.state.devices].filter(([, d]) => d.readOnly).map(([n]) => n));
    expect([...readOnlyThen]).toEqual(['ms']);
    expect(w.madeReadOnly).toEqual(canonical.devices.map((d) => d.name).filter((n) => n !== 'ms'));
    expect(w.replayedDigest).toBe(r.digest);
    expect(w.digest).not.toBe(r.digest);

    // Independently: the new pool's log, folded, is the replayed state with every device read-only...
    const written = await replay(into);
    expect(written.digest).toBe(w.digest);
    const expected = canonicalState(r.state);
    expect(canonicalState(written.state)).toEqual({ ...expected, devices: expected.devices.map((d) => ({ ...d, readOnly: true })) });
    // ... and with the read-only flags of then, exactly the replayed state.
    expect(stateDigest(withReadOnlyFlags(written.state, readOnlyThen))).toBe(r.digest);
    expect(canonicalState(withReadOnlyFlags(written.state, readOnlyThen))).toEqual(expected);
    // The new pool knows it (replaying it says where it comes from and gives the replayed digest back).
    expect(written.replayedFrom).toEqual({ pool, seq: r.seq, digest: r.digest, readOnly: true, readOnlyDevices: ['ms'], digestWithFlagsOfThen: r.digest });

    // Served: the engine's own state is the same (mirrors, pinned snapshots and the pinned merge restored).
    const p = await openPool(into);
    try {
      expect(p.engine.restoreFailures).toEqual([]);
      expect(p.engine.stateDigest()).toBe(w.digest);
      expect(canonicalState(p.engine.poolState())).toEqual(canonicalState(written.state));
      expect((await p.replay()).digest).toBe(w.digest);
    } finally {
      await p.close();
    }
    const after = await replay(into);
    expect(after.digest).toBe(w.digest);
    expect(after.replayedFrom?.digestWithFlagsOfThen).toBe(r.digest);
  }, 60_000);

  test('(b) the CLI prints the replay digest for the new pool and explains the read-only difference', async () => {
    const into = f('into-json');
    const j = await run(process.execPath, [CLI, 'replay', '--pool', pool, '--to-mark', 'point', '--into', into, '--json']);
    expect(j.code, show(j)).toBe(0);
    const out = JSON.parse(j.stdout) as { digest: string; into: { digest: string; replayedDigest: string; madeReadOnly: string[]; readOnly: boolean } };
    expect(out.digest).toBe(pointDigest);
    expect(out.into.replayedDigest).toBe(pointDigest);
    expect(out.into.readOnly).toBe(true);
    expect(out.into.madeReadOnly).toEqual(['l1', 'l2', 'lw', 'mb', 'mc', 'md', 'orig', 'orig2', 'sn', 'sp']);
    expect(out.into.digest).toBe((await replay(into)).digest);

    const text = await run(process.execPath, [CLI, 'replay', '--pool', pool, '--to-mark', 'point', '--into', f('into-text')]);
    expect(text.code, show(text)).toBe(0);
    expect(text.stdout).toContain(`digest: ${pointDigest}\n`);
    expect(text.stdout).toMatch(/\n {2}= the replayed state with every device read-only \(made read-only: l1, l2, lw, mb, mc, md, orig, orig2, sn, sp\), the only difference from the replay's digest;\n/);
    const seq = (await replay(pool, { toMark: 'point' })).seq;
    expect(text.stdout).toContain(`the new pool's log with the read-only flags of #${seq} gives the replay's digest: ${pointDigest}\n`);
    // Replaying the new pool itself says what it is.
    const again = await run(process.execPath, [CLI, 'replay', '--pool', f('into-text')]);
    expect(again.code, show(again)).toBe(0);
    expect(again.stdout).toContain(`this pool was written by dmstate replay --into from ${pool} at #${seq}, read-only: every device made read-only (read-only then: ms);\n`);
    expect(again.stdout).toContain(`  with the read-only flags of then: digest ${pointDigest} (the digest of the replayed point)\n`);
  }, 60_000);

  test('(b) --writable (the latest state): the new pool has the replay digest itself', async () => {
    const latest = await replay(pool);
    expect(latest.digest).toBe(latestDigest);
    const into = f('into-writable');
    const w = await writeReplayedPool(into, latest.state, { sourcePool: pool, writable: true, latest: latest.state });
    expect(w).toMatchObject({ digest: latestDigest, replayedDigest: latestDigest, madeReadOnly: [], mirrorFiles: 0 });
    const p = await openPool(into);
    try {
      expect(p.engine.restoreFailures).toEqual([]);
      expect(p.engine.stateDigest()).toBe(latestDigest);
      // Not pinned: a writable pool's mirrors resync and take writes as usual.
      expect(mirrorSet(p.engine, 'md').readOnly).toBe(false);
      await p.device('md').write(sectors(0), Buffer.alloc(4096, 0x55));
    } finally {
      await p.close();
    }
    const cli = await run(process.execPath, [CLI, 'replay', '--pool', pool, '--into', f('into-writable-cli'), '--writable']);
    expect(cli.code, show(cli)).toBe(0);
    expect(cli.stdout).toMatch(/wrote pool .* \(writable\): 11 devices, 2 COWs; digest ([0-9a-f]{64})\n {2}= the replay's digest\n/);
  }, 60_000);
});
