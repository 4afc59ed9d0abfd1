/**
 * `mirror <log_type> <#log_args> <log_args...> <#legs> <leg> <offset>... [<#features> <features>...]`: every write
 * goes to every leg, reads to one (Linux dm-raid1's mirror_target, version 1.14.0). The region log (`core`,
 * `disk`, or any type in src/dirty-logs/log-registry.ts) records which regions may differ between the legs so that
 * after a crash or a leg's return only those are copied.
 *
 * Status and table are the kernel's, byte for byte, with device labels where the kernel prints major:minor:
 *   status  2 LEG0 LEG1 <in sync>/<regions> 1 <health chars> <log status>      e.g. `2 a.img b.img 32/32 1 AA 1 core`
 *   table   <log table> 2 LEG0 0 LEG1 0 [1 handle_errors]
 *
 * Messages (dmstate's; the kernel's mirror takes none): `readd <leg index | leg label>` re-adds a failed leg and
 * resyncs what it missed; `resync-status` prints the resync state and counts; `resync-throttle <1..100>` sets the
 * percentage of time the resync may copy.
 *
 * Read-only (pinned) mirrors: a read-only replayed pool (`dmstate replay --into` without --writable) pins the legs
 * and region logs its mirror tables name (src/replay/pinned-files.ts), as it pins its snapshots' exceptions. A
 * mirror table naming a pinned file runs read-only, and leaves every file as it found it:
 *   - the legs and the log device are reached only through ReadOnlyGuardDevice (writes refused, flush a no-op);
 *   - the region log is created read-only: it reads the log device at resume and never writes it (no header or
 *     bits at resume, no mark or clear, no md daemon pass, nothing at suspend);
 *   - write and discard bios fail with DM_IO (the device is read-only anyway), flush bios complete at once;
 *   - no resync runs (the driver never asks the log for work: resync-driver.ts), `readd` is refused.
 * Reads work as in any mirror: a region the log says is in sync from any leg, another from the default leg.
 * Status: the kernel's format unchanged, showing what the kernel shows for a mirror whose recovery is not running
 * (a suspended one): the sync count as the log on disk has it (e.g. `30/32` when a crash left two regions
 * dirty; it does not move), every leg `A` and the log `A` — nothing has failed, so no `D`/`F` that would tell LVM
 * to repair anything, and no claim that regions are in sync that the log says are not. `resync-status` says
 * `state=STOPPED` (as for a suspended mirror) or `state=IN_SYNC` when the log has every region in sync, followed by
 * ` read_only=1`.
 */
import type { BlockDevice } from '../../block/contract.js';
import type { Sector } from '../../block/units.js';
import { MAP_DONE, MAP_HELD, MAP_KILL, type Bio } from '../../core/bio.js';
import { DmError } from '../../core/errors.js';
import type { DeviceRef, TargetContext, TargetType } from '../../core/target-contract.js';
import { findDirtyLogType } from '../../dirty-logs/log-registry.js';
import { KcopydClient } from '../../kcopyd/kcopyd.js';
import { pinnedFileLabels } from '../../replay/pinned-files.js';
import { MirrorLeg } from './leg.js';
import { MirrorSet, MirrorSets } from './mirror-set.js';
import { mapRead } from './read-path.js';
import { ReadOnlyGuardDevice } from './read-only-guard.js';
import { parseMirrorTableArgs } from './table-args.js';
import { startFlushGroup, startWriteGroup } from './write-group.js';

export interface MirrorInstance {
  readonly set: MirrorSet;
  /** The engine's mirror sets (live inspection finds this one there until its dtr). */
  readonly sets: MirrorSets;
}

const mirrorKcopyd = (ctx: TargetContext): KcopydClient =>
  ctx.shared('dm-mirror:kcopyd', () => new KcopydClient({ log: ctx.log, name: 'dm-mirror' }));

/** The engine's mirror sets; the engine hands shared objects to its live inspector, which watches them from there. */
const mirrorSets = (ctx: TargetContext): MirrorSets => ctx.shared('dm-mirror:sets', () => new MirrorSets());

async function mirrorCtr(args: readonly string[], ctx: TargetContext): Promise<MirrorInstance> {
  const a = parseMirrorTableArgs(args);
  const logType = findDirtyLogType(a.logTypeName);
  if (!logType) throw new DmError('DM_TABLE_INVALID', `mirror: Error creating mirror dirty log: unknown log type "${a.logTypeName}"`);
  const parsed = logType.parseArgs(a.logArgs);
  const legRefs: DeviceRef[] = [];
  for (const l of a.legs) {
    const ref = await ctx.openDevice(l.spec);
    if (l.offsetSectors + ctx.lengthSectors > ref.device.sizeSectors) {
      throw new DmError('DM_TABLE_INVALID', `mirror: ${ref.label} too small for target: offset ${l.offsetSectors} + len ${ctx.lengthSectors} > dev_size ${ref.device.sizeSectors}`);
    }
    legRefs.push(ref);
  }
  let logRef: DeviceRef | undefined;
  if (parsed.logPath !== undefined) logRef = await ctx.openDevice(parsed.logPath);
  // A read-only replayed pool pins the files of its mirrors: such a mirror writes none of them (see the header).
  const pinned = await pinnedFileLabels(ctx.log, [...(logRef ? [logRef.label] : []), ...legRefs.map((r) => r.label)]);
  const readOnly = pinned.length > 0;
  const why = `mirror ${ctx.mappedDeviceName} is read-only: ${pinned.join(', ')} pinned by a replayed pool`;
  const view = (d: BlockDevice): BlockDevice => (readOnly ? new ReadOnlyGuardDevice(d, why) : d);
  const legs = legRefs.map((ref, i) => new MirrorLeg(i, view(ref.device), ref.label, a.legs[i].offsetSectors as Sector));
  // The log's flushLegs needs the set, which needs the log: the callback looks the set up when it runs.
  const holder: { set?: MirrorSet } = {};
  const log: unknown = await logType.create({
    targetSizeSectors: ctx.lengthSectors,
    regionSizeSectors: parsed.regionSizeSectors,
    initialSync: parsed.initialSync,
    logDevice: logRef && view(logRef.device),
    logDeviceLabel: logRef?.label,
    extra: parsed.extra,
    clock: ctx.clock,
    flushLegs: () => holder.set!.flushAllLegs(),
    readOnly,
  });
  let set: MirrorSet;
  try {
    set = new MirrorSet({
      ctx,
      legs,
      logType,
      log,
      regionSizeSectors: parsed.regionSizeSectors,
      handleErrors: a.handleErrors,
      keepLog: a.keepLog,
      kcopyd: mirrorKcopyd(ctx),
      readOnly,
    });
  } catch (err) {
    await logType.close(log);
    throw err;
  }
  holder.set = set;
  // No bio crosses a region (Linux dm_set_target_max_io_len(ti, region_size)).
  ctx.setMaxIoSectors(parsed.regionSizeSectors);
  const sets = mirrorSets(ctx);
  sets.add(set);
  return { set, sets };
}

function findLeg(set: MirrorSet, spec: string): MirrorLeg {
  const byIndex = /^[0-9]+$/.test(spec) ? set.legs[Number(spec)] : undefined;
  const leg = byIndex ?? set.legs.find((l) => l.label === spec);
  if (!leg) throw new DmError('DM_INVALID_ARGUMENT', `mirror: no leg ${spec} (an index from 0 to ${set.legs.length - 1}, or a leg's device as the table shows it)`);
  return leg;
}

async function mirrorMessage(inst: MirrorInstance, args: readonly string[]): Promise<string> {
  const set = inst.set;
  switch (args[0]) {
    case 'readd': {
      if (args.length !== 2) throw new DmError('DM_INVALID_ARGUMENT', 'mirror: usage: readd <leg index | leg device>');
      const leg = findLeg(set, args[1]);
      if (set.readOnly) throw new DmError('DM_NOT_SUPPORTED', `mirror: ${set.deviceName} is read-only (its files are pinned by a replayed pool): no re-add, no resync`);
      await set.readdLeg(leg);
      return '';
    }
    case 'resync-status': {
      if (args.length !== 1) throw new DmError('DM_INVALID_ARGUMENT', 'mirror: usage: resync-status');
      const p = set.resync.progress();
      return (
        `state=${p.state} regions_in_sync=${p.regionsInSync} regions_total=${p.regionsTotal} regions_copied=${p.regionsCopied} ` +
        `run_regions_copied=${p.runRegionsCopied} run_ms=${Math.round(p.runElapsedMs)} throttle=${p.throttlePercent} default_leg=${set.defaultLegIndex} health=${set.healthChars()}` +
        `${set.readOnly ? ' read_only=1' : ''}\n`
      );
    }
    case 'resync-throttle': {
      const n = args.length === 2 && /^[0-9]+$/.test(args[1]) ? Number(args[1]) : NaN;
      if (!(n >= 1 && n <= 100)) throw new DmError('DM_INVALID_ARGUMENT', 'mirror: usage: resync-throttle <percent from 1 to 100>');
      set.resync.throttlePercent = n;
      return '';
    }
    default:
      throw new DmError('DM_UNKNOWN_COMMAND', `mirror: unknown message ${args[0] ?? ''} (readd, resync-status, resync-throttle)`);
  }
}

export const mirrorTarget: TargetType<MirrorInstance> = Object.freeze({
  name: 'mirror',
  version: [1, 14, 0] as const,
  argCountMin: 2,
  argCountMax: 64,
  ctr: mirrorCtr,
  async dtr(inst: MirrorInstance) {
    const s = inst.set;
    try {
      await s.resync.stop();
      s.cancelClean();
      await s.logType.close(s.log);
    } finally {
      inst.sets.remove(s);
    }
  },
  map(inst: MirrorInstance, bio: Bio, ctx: TargetContext) {
    const s = inst.set;
    if (bio.op === 'read') return mapRead(s, bio, ctx);
    // Read-only (pinned): nothing was written, so a flush has nothing to do; a write or discard fails.
    if (s.readOnly) return bio.op === 'flush' ? MAP_DONE : MAP_KILL;
    if (bio.op === 'flush') startFlushGroup(s, bio, ctx);
    else startWriteGroup(s, bio, ctx);
    return MAP_HELD;
  },
  status: (inst: MirrorInstance) => inst.set.statusText(),
  table: (inst: MirrorInstance) => inst.set.tableText(),
  message: mirrorMessage,
  async postsuspend(inst: MirrorInstance) {
    const s = inst.set;
    if (s.suspended) return;
    s.suspended = true;
    await s.resync.stop();
    s.cancelClean();
    if (s.logType.suspend) await s.logType.suspend(s.log);
    else await s.logType.flush(s.log).catch(() => undefined);
  },
  async resume(inst: MirrorInstance) {
    const s = inst.set;
    if (!s.suspended) return;
    if (s.logType.resume) await s.logType.resume(s.log);
    s.suspended = false;
    s.resumedOnce = true;
    s.inSync = false;
    s.resync.start();
  },
});
