/**
 * `snapshot <origin> <cow> <P|PO|N> <chunk_sectors>`: the origin as it was when the snapshot was taken, kept by
 * copying chunks to the COW device before the origin overwrites them (Linux snapshot_target). Writable: a
 * snapshot write makes its own exception.
 */
import type { Sector } from '../../block/units.js';
import { MAP_HELD, MAP_KILL, MAP_REMAPPED, type Bio } from '../../core/bio.js';
import { DmError } from '../../core/errors.js';
import { parseUnsigned } from '../../core/parse-number.js';
import type { TargetContext, TargetType } from '../../core/target-contract.js';
import { findExceptionStoreType } from '../../stores/store-registry.js';
import { originRegistry, snapshotKcopyd, snapshotStates } from './shared.js';
import { SnapshotState } from './snapshot-state.js';
import { exceptionsLoadedEvent, pinnedExceptions } from '../../replay/snapshot-hooks.js';

export interface SnapshotInstance {
  readonly state: SnapshotState;
  readonly ctx: TargetContext;
  /** This table's number on the state (SnapshotState.addTable): its handover bookkeeping. */
  readonly generation: number;
}

/** Parses the arguments shared by snapshot and snapshot-merge and opens (or takes over) the snapshot state. */
export async function snapshotCtr(targetName: string, args: readonly string[], ctx: TargetContext): Promise<SnapshotInstance> {
  if (args.length > 4) {
    throw new DmError('DM_TABLE_INVALID', `${targetName}: optional features (${args.slice(4).join(' ')}) are not supported`);
  }
  const [originSpec, cowSpec, mode, chunkText] = args;
  const upper = mode.toUpperCase();
  if (upper !== 'P' && upper !== 'PO' && upper !== 'N') {
    throw new DmError('DM_TABLE_INVALID', `${targetName}: Couldn't create exception store: unknown type "${mode}" (P, PO or N)`);
  }
  if (targetName === 'snapshot-merge' && upper === 'N') {
    throw new DmError('DM_TABLE_INVALID', 'snapshot-merge: the exception store must be persistent (P)');
  }
  const chunkSizeSectors = parseUnsigned(chunkText, `${targetName}: chunk size`);
  const origin = await ctx.openDevice(originSpec);
  const cow = await ctx.openDevice(cowSpec);
  if (cow.device === origin.device) throw new DmError('DM_TABLE_INVALID', `${targetName}: COW device cannot be the same as origin device`);
  if (ctx.lengthSectors > origin.device.sizeSectors) {
    throw new DmError('DM_TABLE_INVALID', `${targetName}: ${origin.label} too small for target: len=${ctx.lengthSectors}, dev_size=${origin.device.sizeSectors}`);
  }
  const states = snapshotStates(ctx);
  const existing = states.get(cow.device);
  if (existing) {
    // Handover: a new table for the same snapshot takes over its state.
    if (existing.origin.device !== origin.device) {
      throw new DmError('DM_TABLE_INVALID', `${targetName}: ${cow.label} is the COW of a snapshot of another origin`);
    }
    ctx.setMaxIoSectors(existing.chunkSizeSectors);
    return { state: existing, ctx, generation: existing.addTable(ctx) };
  }
  const storeType = findExceptionStoreType(upper);
  const persistent = upper !== 'N';
  const wal = persistent ? ctx.walFor(cow) : undefined;
  // A read-only pool from `dmstate replay --into` pins the COW's exceptions as of the replayed point: they come from
  // the pool, the store only reads the COW's header (read-only, no WAL), and nothing is written.
  const pinned = wal?.pinned;
  const store = await storeType.create({
    cow: cow.device,
    chunkSizeSectors: chunkSizeSectors as Sector,
    overflow: upper === 'PO',
    wal: pinned ? undefined : wal,
    readOnly: pinned !== undefined,
  });
  let state: SnapshotState;
  try {
    let table: Array<[number, number]> = [];
    const meta = await storeType.readMetadata(store, (oldChunk, newChunk) => table.push([oldChunk, newChunk]));
    if (pinned) table = await pinnedExceptions(wal!, cow.label, meta.chunkSizeSectors);
    state = new SnapshotState(
      ctx.mappedDeviceName,
      origin,
      cow,
      storeType,
      store,
      meta.chunkSizeSectors,
      ctx.lengthSectors,
      persistent,
      upper === 'PO',
      snapshotKcopyd(ctx),
      ctx,
    );
    for (const [o, n] of table) state.table.insert(o as never, n as never);
    state.valid = pinned ? pinned.valid : meta.valid;
    if (pinned) {
      state.overflowed = pinned.overflowed;
      state.pinned = true;
    }
    // The COW's state as loaded, for replay: it replaces what the log knew (the kernel may have written the COW).
    if (persistent) void ctx.log.append(exceptionsLoadedEvent(cow.label, ctx.mappedDeviceName, state.chunkSizeSectors, state.valid, state.overflowed, table)).catch(() => undefined);
  } catch (err) {
    await storeType.close(store);
    throw err;
  }
  states.set(cow.device, state);
  // owner is set by the caller to its instance object (claimIfUnowned, see snapshotTarget.ctr).
  originRegistry(ctx).registerSnapshot(state);
  ctx.setMaxIoSectors(state.chunkSizeSectors);
  return { state, ctx, generation: state.addTable(ctx) };
}

export async function snapshotDtr(inst: SnapshotInstance): Promise<void> {
  const s = inst.state;
  if (s.cancelHandoverFrom(inst.generation)) {
    // The source goes while newer tables wait for its exceptions (a reload or snapshot-merge not resumed yet): as in
    // Linux snapshot_dtr, their handover is cancelled. They stay Invalid; the COW stays as it is (checkpointed
    // here), and origin writes stop copying into it, as for the kernel's inactive destination.
    s.active = false;
    void inst.ctx.log.append({ type: 'snapshot.handover.cancelled', device: inst.ctx.mappedDeviceName, cow: s.cow.label }).catch(() => undefined);
    if (s.valid) await s.checkpoint();
  }
  if (s.removeTable(inst.generation) > 0) return;
  await s.drainPending();
  originRegistry(inst.ctx).unregisterSnapshot(s);
  snapshotStates(inst.ctx).delete(s.cow.device);
  if (s.valid) await s.checkpoint();
  await s.storeType.close(s.store);
}

/**
 * `dmsetup status` of a snapshot or snapshot-merge table on a (possibly shared) snapshot state. The owner shows the
 * state. A newer table that has not been resumed yet waits for the exception handover: the kernel has not read its
 * store (snapshot_ctr sets its chunk size to 0 until the handover), so its usage reads `0/<COW sectors> 0` whatever
 * the state of the snapshot it will take over (verified on Linux 6.1: a reloaded P, N or PO snapshot, one whose
 * COW is full and Invalid, a snapshot-merge table loaded on the origin). An older table, handed over, is Invalid.
 */
export function snapshotStatus(inst: SnapshotInstance): string {
  const s = inst.state;
  if (s.owner === inst) return s.statusText();
  if (s.awaitsHandover(inst.generation)) return `0/${s.cow.device.sizeSectors} 0`;
  return 'Invalid';
}

/**
 * Linux snapshot_preresume: refuses the resume of a table while the exception handover it is part of cannot run
 * (see SnapshotState.preresumeRefusal). EINVAL in the kernel.
 */
export async function snapshotPreresume(inst: SnapshotInstance): Promise<void> {
  const why = inst.state.preresumeRefusal(inst.generation);
  if (why !== undefined) throw new DmError('DM_INVALID_ARGUMENT', why);
}

function snapshotMap(inst: SnapshotInstance, bio: Bio, ctx: TargetContext): 0 | 1 | 3 {
  const s = inst.state;
  if (s.owner !== inst) return MAP_KILL; // handed over to a newer table
  if (bio.op === 'flush') {
    bio.remapDevice = s.cow.device;
    return MAP_REMAPPED;
  }
  if (!s.valid) return MAP_KILL;
  // Discards need the kernel's discard features, which are not supported: fail them as the kernel's
  // snapshot target (no discard support) would.
  if (bio.op === 'discard') return MAP_KILL;
  const held = { bio, ctx };
  if (bio.op === 'write' && s.throttle(held)) return MAP_HELD;
  if (bio.op === 'write' && s.overflowed) return MAP_KILL;
  const offset = bio.sector - ctx.beginSector;
  const chunk = s.chunkOf(offset);
  const e = s.table.lookup(chunk as never);
  if (e >= 0) {
    bio.remapDevice = s.cow.device;
    bio.remapSector = (e * s.chunkSizeSectors + (offset % s.chunkSizeSectors)) as Sector;
    return MAP_REMAPPED;
  }
  if (bio.op === 'read') {
    s.readFromOrigin(held, chunk, offset);
    return MAP_HELD;
  }
  let pe = s.pending.get(chunk);
  if (!pe) {
    pe = s.newPending(chunk);
    if (!pe) {
      if (s.overflowMode) s.overflow();
      else s.invalidate('COW device full');
      return MAP_KILL;
    }
  }
  if (!pe.started && bio.lengthSectors === s.chunkSizeSectors) {
    s.startFullBio(pe, held);
    return MAP_HELD;
  }
  pe.snapshotBios.push(held);
  if (!pe.started) s.startCopy(pe);
  return MAP_HELD;
}

export const snapshotTarget: TargetType<SnapshotInstance> = Object.freeze({
  name: 'snapshot',
  version: [1, 16, 0] as const,
  argCountMin: 4,
  argCountMax: 7,
  async ctr(args: readonly string[], ctx: TargetContext) {
    const inst = await snapshotCtr('snapshot', args, ctx);
    inst.state.claimIfUnowned(inst, inst.generation);
    return inst;
  },
  dtr: snapshotDtr,
  map: snapshotMap,
  preresume: snapshotPreresume,
  async resume(inst: SnapshotInstance) {
    if (!inst.state.resumeTable(inst, inst.generation)) return; // handed over (or cancelled): stays Invalid
    inst.state.ctx = inst.ctx;
    inst.state.deviceName = inst.ctx.mappedDeviceName;
    inst.state.active = true;
  },
  async postsuspend(inst: SnapshotInstance) {
    if (inst.state.valid) await inst.state.checkpoint();
  },
  status: snapshotStatus,
  table: (inst: SnapshotInstance) => `${inst.state.origin.label} ${inst.state.cow.label} ${inst.state.storeType.tableCode(inst.state.store)}`,
});

