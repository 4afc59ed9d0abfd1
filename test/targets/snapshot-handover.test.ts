/**
 * dm-snapshot's exception handover rules at resume (Linux drivers/md/dm-snap.c, snapshot_preresume). The snapshot-merge
 * case is compared with Linux 6.1 on every run by test/kernel/merge-interop.test.ts (scenario H); the two-device
 * cases below were checked on Linux 6.1 by hand (same statuses, same refusals, same `dmsetup info`):
 *
 * - a table not resumed yet that shares its COW with a resumed table (a snapshot table on a second device, a
 *   snapshot-merge table on the origin) resumes only while the source's device is suspended, else
 *   "Unable to perform snapshot handover until source is suspended." (EINVAL);
 * - the source itself may not resume while such a table waits: "Unable to resume snapshot source until handover
 *   completes.";
 * - what a refused resume leaves is what the kernel's do_resume leaves: the table it swapped in is live (never
 *   resumed: it still waits for the handover), no inactive table, the device suspended; the source, its
 *   exceptions and the COW are untouched. `dmsetup create` with such a table leaves nothing (libdm removes the
 *   device when the resume fails). Once the source is suspended, the resume hands the exceptions over as before;
 * - a refused table survives an engine restart as it was, and so does a snapshot-merge table loaded on the origin
 *   and not resumed yet (it used to come back Invalid);
 * - the handover cancel (the source removed first, Linux snapshot_dtr) still holds.
 */
import { describe, expect, test } from 'vitest';
import { MemoryLevel } from 'memory-level';
import { Engine } from '../../src/core/engine.js';
import { DmError } from '../../src/core/errors.js';
import { MemoryBlockDevice } from '../../src/block/memory-device.js';
import type { BlockDevice } from '../../src/block/contract.js';
import { sectors } from '../../src/block/units.js';
import type { LevelDb } from '../../src/log/event-log.js';
import type { LoggedEvent } from '../../src/log/events.js';
import { replay } from '../../src/replay/replay.js';
import { executeDmsetup } from '../../src/frontends/dmsetup/execute.js';
import { parseDmsetupArgs } from '../../src/frontends/dmsetup/command.js';
import { SECTOR, writeData } from './merge-cow.js';

const ORIGIN_SECTORS = 2048;
const COW_SECTORS = 2048;
const CHUNK_SECTORS = 8;
const SNAP_TABLE = `0 ${ORIGIN_SECTORS} snapshot o c P ${CHUNK_SECTORS}`;
const MERGE_TABLE = `0 ${ORIGIN_SECTORS} snapshot-merge o c P ${CHUNK_SECTORS}`;
/** Three exceptions of 8 sectors, plus the header and one metadata area (as Linux 6.1 prints it). */
const SNAP_USAGE = `40/${COW_SECTORS} 16`;
/** A table waiting for the handover: the kernel has not read its store yet (chunk size 0). */
const WAITING_USAGE = `0/${COW_SECTORS} 0`;
const SOURCE_NOT_SUSPENDED = 'Unable to perform snapshot handover until source is suspended.';
const SOURCE_RESUME = 'Unable to resume snapshot source until handover completes.';

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

async function readAll(dev: BlockDevice): Promise<Buffer> {
  const b = Buffer.alloc(dev.sizeSectors * SECTOR);
  await dev.read(sectors(0), b);
  return b;
}

interface Rig {
  readonly db: LevelDb;
  readonly origin: MemoryBlockDevice;
  readonly cow: MemoryBlockDevice;
  e: Engine;
  /** The snapshot's content (the origin as it was before the three writes). */
  readonly snapshot: Buffer;
  readonly events: LoggedEvent[];
}

/** `orig` snapshot-origin and `snap` snapshot (P, chunk 8) over memory devices, three origin writes copied out. */
async function rig(): Promise<Rig> {
  const origin = new MemoryBlockDevice({ sizeSectors: sectors(ORIGIN_SECTORS), name: 'o' });
  await origin.write(sectors(0), writeData(0, 0, ORIGIN_SECTORS));
  const cow = new MemoryBlockDevice({ sizeSectors: sectors(COW_SECTORS), name: 'c' });
  const db = new MemoryLevel() as unknown as LevelDb;
  const r: Rig = { db, origin, cow, e: await open(db, origin, cow), snapshot: Buffer.alloc(0), events: [] };
  await r.e.create('orig', { table: `0 ${ORIGIN_SECTORS} snapshot-origin o` });
  await r.e.create('snap', { table: SNAP_TABLE });
  const snapshot = await readAll(r.e.device('snap')!);
  for (const chunk of [1, 5, 9]) await r.e.device('orig')!.write(sectors(chunk * CHUNK_SECTORS), writeData(1, chunk * CHUNK_SECTORS, CHUNK_SECTORS));
  const withEvents = { ...r, snapshot };
  withEvents.e.events$.subscribe((ev) => withEvents.events.push(ev));
  return withEvents;
}

function open(db: LevelDb, origin: BlockDevice, cow: BlockDevice): Promise<Engine> {
  return Engine.open({ db, backingDevices: { o: origin, c: cow } });
}

/** Closes the engine and opens a new one on the same pool (a daemon restart). */
async function restart(r: Rig): Promise<void> {
  await r.e.close();
  r.e = await open(r.db, r.origin, r.cow);
  r.e.events$.subscribe((ev) => r.events.push(ev));
}

/** The error a promise rejects with (fails the test when it resolves). */
async function refusal(p: Promise<unknown>): Promise<DmError> {
  const err = await p.then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(err, 'the operation was expected to be refused').toBeInstanceOf(DmError);
  return err as DmError;
}

function expectTables(e: Engine, name: string, want: { suspended: boolean; live: string[]; inactive: string[] }): void {
  const info = e.info(name);
  expect({ suspended: info.suspended, live: e.table(name), inactive: e.table(name, true) }, name).toEqual(want);
}

/** The replay of the pool's log equals the live state (the refused resume's events replay to what it left). */
async function expectReplayMatches(r: Rig): Promise<void> {
  await r.e.log.drain();
  expect((await replay(r.db)).digest).toBe(r.e.stateDigest());
}

describe('a snapshot table on a second device, same COW, while the first one is live (Linux snapshot_preresume)', () => {
  test('its resume is refused while the source is not suspended; what is left is what the kernel leaves; then the handover works', async () => {
    const r = await rig();
    const cowBefore = await readAll(r.cow);
    await r.e.create('snap2');
    await r.e.load('snap2', SNAP_TABLE);
    expect(r.e.status('snap2', true)).toEqual([`0 2048 snapshot ${WAITING_USAGE}`]);

    const err = await refusal(r.e.resume('snap2'));
    expect(err.code).toBe('DM_INVALID_ARGUMENT');
    expect(err.message).toContain(SOURCE_NOT_SUSPENDED);
    expect(err.message).toMatch(/^snap2: snapshot: preresume failed: /);
    expect(err.message).toContain('source: snap');
    // Linux do_resume swapped the table in before the preresume failed: live, suspended, no inactive table.
    expectTables(r.e, 'snap2', { suspended: true, live: [SNAP_TABLE], inactive: [] });
    expect(r.e.status('snap2')).toEqual([`0 2048 snapshot ${WAITING_USAGE}`]);
    // The source is untouched: live, valid, its exceptions, its content; nothing was written to the COW.
    expectTables(r.e, 'snap', { suspended: false, live: [SNAP_TABLE], inactive: [] });
    expect(r.e.status('snap')).toEqual([`0 2048 snapshot ${SNAP_USAGE}`]);
    expect((await readAll(r.e.device('snap')!)).equals(r.snapshot)).toBe(true);
    expect((await readAll(r.cow)).equals(cowBefore)).toBe(true);
    expect(r.events.some((ev) => ev.type === 'snapshot.handover.cancelled')).toBe(false);
    await expectReplayMatches(r);

    // Again: the same refusal, nothing changes.
    expect((await refusal(r.e.resume('snap2'))).message).toContain(SOURCE_NOT_SUSPENDED);
    expectTables(r.e, 'snap2', { suspended: true, live: [SNAP_TABLE], inactive: [] });

    // The source keeps working as the snapshot: a new origin write is copied out to it.
    await r.e.device('orig')!.write(sectors(100 * CHUNK_SECTORS), writeData(2, 100 * CHUNK_SECTORS, CHUNK_SECTORS));
    const usage4 = `48/${COW_SECTORS} 16`;
    expect(r.e.status('snap')).toEqual([`0 2048 snapshot ${usage4}`]);

    // Source suspended: the resume hands the exceptions over, as before.
    await r.e.suspend('snap');
    await r.e.resume('snap2');
    expectTables(r.e, 'snap2', { suspended: false, live: [SNAP_TABLE], inactive: [] });
    expect(r.e.status('snap2')).toEqual([`0 2048 snapshot ${usage4}`]);
    expect(r.e.status('snap')).toEqual(['0 2048 snapshot Invalid']);
    expect((await readAll(r.e.device('snap2')!)).equals(r.snapshot)).toBe(true);
    // The handed-over table resumes (it is Invalid and has nothing to wait for).
    await r.e.resume('snap');
    expect(r.e.status('snap')).toEqual(['0 2048 snapshot Invalid']);
    await expectReplayMatches(r);
    await r.e.close();
  });

  test('`dmsetup create` with that table fails and leaves no device (libdm removes it when the resume fails)', async () => {
    const r = await rig();
    const eventsBefore = r.events.length;
    const err = await refusal(r.e.create('snap2', { table: SNAP_TABLE }));
    expect(err.message).toContain(SOURCE_NOT_SUSPENDED);
    expect(r.e.device('snap2')).toBeUndefined();
    expect(r.e.names()).toEqual(['orig', 'snap']);
    expect(r.events.slice(eventsBefore).filter((ev) => !ev.type.startsWith('bio'))).toEqual([]);
    expect(r.e.status('snap')).toEqual([`0 2048 snapshot ${SNAP_USAGE}`]);
    // With the source suspended the same create works and takes the snapshot over.
    await r.e.suspend('snap');
    await r.e.create('snap2', { table: SNAP_TABLE });
    expect(r.e.status('snap2')).toEqual([`0 2048 snapshot ${SNAP_USAGE}`]);
    expect(r.e.status('snap')).toEqual(['0 2048 snapshot Invalid']);
    await r.e.close();
  });

  test('`dmstate dmsetup resume` prints the reason and "Command failed.", exit code 1', async () => {
    const r = await rig();
    await r.e.create('snap2');
    await r.e.load('snap2', SNAP_TABLE);
    const res = await executeDmsetup(r.e, parseDmsetupArgs(['resume', 'snap2']), 'test');
    expect(res.exitCode).toBe(1);
    expect(res.errorCode).toBe('DM_INVALID_ARGUMENT');
    expect(res.stderr).toMatch(new RegExp(`^snap2: snapshot: preresume failed: ${SOURCE_NOT_SUSPENDED.replace(/\./g, '\\.')}.*\nCommand failed\\.\n$`));
    const info = await executeDmsetup(r.e, parseDmsetupArgs(['info', 'snap2']), 'test');
    expect(info.stdout).toMatch(/State:\s+SUSPENDED/);
    expect(info.stdout).toMatch(/Tables present:\s+LIVE\n/);
    await r.e.close();
  });

  test('the source may not resume while a table waits for its exceptions; the waiting one may', async () => {
    const r = await rig();
    await r.e.suspend('snap');
    await r.e.create('snap2');
    await r.e.load('snap2', SNAP_TABLE);
    const err = await refusal(r.e.resume('snap'));
    expect(err.message).toBe(`snap: snapshot: preresume failed: ${SOURCE_RESUME}`);
    expectTables(r.e, 'snap', { suspended: true, live: [SNAP_TABLE], inactive: [] });
    expect(r.e.status('snap')).toEqual([`0 2048 snapshot ${SNAP_USAGE}`]);
    await r.e.resume('snap2');
    expect(r.e.status('snap2')).toEqual([`0 2048 snapshot ${SNAP_USAGE}`]);
    await r.e.resume('snap');
    expect(r.e.status('snap')).toEqual(['0 2048 snapshot Invalid']);
    await r.e.close();
  });

  test('a reload on the same device needs nothing more: resume suspends the device, the source with it', async () => {
    const r = await rig();
    await r.e.load('snap', SNAP_TABLE);
    await r.e.resume('snap');
    expectTables(r.e, 'snap', { suspended: false, live: [SNAP_TABLE], inactive: [] });
    expect(r.e.status('snap')).toEqual([`0 2048 snapshot ${SNAP_USAGE}`]);
    await r.e.close();
  });

  test('the refused table comes back as it was after a restart, and takes over once the source is suspended', async () => {
    const r = await rig();
    await r.e.create('snap2');
    await r.e.load('snap2', SNAP_TABLE);
    await refusal(r.e.resume('snap2'));
    await restart(r);
    expectTables(r.e, 'snap2', { suspended: true, live: [SNAP_TABLE], inactive: [] });
    expect(r.e.status('snap2')).toEqual([`0 2048 snapshot ${WAITING_USAGE}`]);
    expect(r.e.status('snap')).toEqual([`0 2048 snapshot ${SNAP_USAGE}`]);
    expect((await refusal(r.e.resume('snap2'))).message).toContain(SOURCE_NOT_SUSPENDED);
    await r.e.suspend('snap');
    await r.e.resume('snap2');
    expect(r.e.status('snap2')).toEqual([`0 2048 snapshot ${SNAP_USAGE}`]);
    expect(r.e.status('snap')).toEqual(['0 2048 snapshot Invalid']);
    expect((await readAll(r.e.device('snap2')!)).equals(r.snapshot)).toBe(true);
    await r.e.close();
  });
});

/** Polls the merge until DONE (or FAILED/STOPPED). */
async function waitMerge(e: Engine, ms = 10_000): Promise<string> {
  const until = performance.now() + ms;
  for (;;) {
    const state = /state=(\S+)/.exec(await e.message('orig', 0, ['merge-status']))?.[1] ?? '?';
    if (state === 'DONE' || state === 'FAILED' || state === 'STOPPED') return state;
    if (performance.now() > until) throw new Error(`merge not finished within ${ms} ms: ${state}`);
    await sleep(2);
  }
}

/** The handover by the origin's resume (the snapshot Invalid from then on), the snapshot removed, the merge to DONE: origin = snapshot. */
async function resumeOriginAndMerge(r: Rig): Promise<void> {
  await r.e.resume('orig');
  expect(r.e.status('snap')).toEqual(['0 2048 snapshot Invalid']);
  await r.e.remove('snap');
  expect(await waitMerge(r.e)).toBe('DONE');
  expect((await readAll(r.origin)).equals(r.snapshot)).toBe(true);
  await r.e.close();
}

describe('snapshot-merge loaded on the origin while the snapshot is not suspended', () => {
  test('the origin resume is refused (suspended, snapshot-merge live, waiting); with the snapshot suspended it merges', async () => {
    const r = await rig();
    const cowBefore = await readAll(r.cow);
    const originBefore = await readAll(r.origin);
    await r.e.suspend('orig');
    await r.e.load('orig', MERGE_TABLE);
    const err = await refusal(r.e.resume('orig'));
    expect(err.message).toBe(`orig: snapshot-merge: preresume failed: ${SOURCE_NOT_SUSPENDED} (source: snap, not suspended)`);
    expectTables(r.e, 'orig', { suspended: true, live: [MERGE_TABLE], inactive: [] });
    expect(r.e.status('orig')).toEqual([`0 2048 snapshot-merge ${WAITING_USAGE}`]);
    expect(r.e.status('snap')).toEqual([`0 2048 snapshot ${SNAP_USAGE}`]);
    await sleep(20);
    // Nothing merged, nothing written.
    expect((await readAll(r.origin)).equals(originBefore)).toBe(true);
    expect((await readAll(r.cow)).equals(cowBefore)).toBe(true);
    expect(r.events.some((ev) => ev.type.startsWith('merge.') || ev.type === 'exception.merged')).toBe(false);
    await expectReplayMatches(r);

    // LVM's order from here: the snapshot suspended, then the origin resumed (the handover), the snapshot removed.
    await r.e.suspend('snap');
    await resumeOriginAndMerge(r);
  });

  test('loaded and not resumed across a restart (LVM stopped before the origin resume): the handover still happens', async () => {
    const r = await rig();
    await r.e.suspend('orig');
    await r.e.suspend('snap');
    await r.e.load('orig', MERGE_TABLE);
    await restart(r);
    expect(r.e.status('orig', true)).toEqual([`0 2048 snapshot-merge ${WAITING_USAGE}`]);
    expect(r.e.status('snap')).toEqual([`0 2048 snapshot ${SNAP_USAGE}`]);
    await resumeOriginAndMerge(r);
  });

  test('refused, then restarted: the origin comes back suspended with the waiting table, and merges once the snapshot is suspended', async () => {
    const r = await rig();
    await r.e.suspend('orig');
    await r.e.load('orig', MERGE_TABLE);
    await refusal(r.e.resume('orig'));
    await restart(r);
    expectTables(r.e, 'orig', { suspended: true, live: [MERGE_TABLE], inactive: [] });
    expect(r.e.status('orig')).toEqual([`0 2048 snapshot-merge ${WAITING_USAGE}`]);
    expect(r.e.status('snap')).toEqual([`0 2048 snapshot ${SNAP_USAGE}`]);
    await r.e.suspend('snap');
    await resumeOriginAndMerge(r);
  });
});

describe('the handover cancel (Linux snapshot_dtr) still holds', () => {
  test('snapshot-merge waiting on the origin, the snapshot removed first: cancelled, Invalid, the origin resumes', async () => {
    const r = await rig();
    await r.e.suspend('orig');
    await r.e.load('orig', MERGE_TABLE);
    await r.e.remove('snap');
    expect(r.events.filter((ev) => ev.type === 'snapshot.handover.cancelled')).toHaveLength(1);
    expect(r.e.status('orig', true)).toEqual(['0 2048 snapshot-merge Invalid']);
    // No source left: nothing to wait for, the resume goes through and the table stays Invalid.
    await r.e.resume('orig');
    expect(r.e.status('orig')).toEqual(['0 2048 snapshot-merge Invalid']);
    await r.e.close();
  });

  test('a refused snapshot table whose source is removed: cancelled, then it resumes Invalid', async () => {
    const r = await rig();
    await r.e.create('snap2');
    await r.e.load('snap2', SNAP_TABLE);
    await refusal(r.e.resume('snap2'));
    await r.e.remove('snap');
    expect(r.events.filter((ev) => ev.type === 'snapshot.handover.cancelled')).toHaveLength(1);
    expect(r.e.status('snap2')).toEqual(['0 2048 snapshot Invalid']);
    await r.e.resume('snap2');
    expectTables(r.e, 'snap2', { suspended: false, live: [SNAP_TABLE], inactive: [] });
    expect(r.e.status('snap2')).toEqual(['0 2048 snapshot Invalid']);
    await r.e.close();
  });
});
