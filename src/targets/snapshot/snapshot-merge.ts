/**
 * `snapshot-merge <origin> <cow> P <chunk_sectors>`: loaded in place of the origin, it merges the snapshot back into
 * the origin (Linux merge_target). The merge starts on resume and stops on suspend/remove. While it runs, I/O to a
 * chunk the COW still holds goes to the COW; other I/O goes to the origin through the origin path, so the other
 * snapshots of the origin still get their copies. Writes to the run being merged wait until it is committed.
 *
 * `dmsetup message NAME 0 merge-status` (a dmstate extension) prints the merge's state and progress.
 */
import type { Sector } from '../../block/units.js';
import { MAP_HELD, MAP_DONE, MAP_REMAPPED, type Bio } from '../../core/bio.js';
import { DmError } from '../../core/errors.js';
import type { TargetContext, TargetType } from '../../core/target-contract.js';
import { Merger } from './merger.js';
import { mapOriginWrite } from './snapshot-origin.js';
import { originRegistry, snapshotKcopyd } from './shared.js';
import { snapshotCtr, snapshotDtr, snapshotPreresume, snapshotStatus, type SnapshotInstance } from './snapshot.js';

interface MergeInstance extends SnapshotInstance {
  readonly merger: Merger;
}

function mergeMap(inst: MergeInstance, bio: Bio, ctx: TargetContext): 0 | 1 | 2 | 3 {
  const s = inst.state;
  const m = inst.merger;
  // A table that does not own the state (handed over to a newer one, or whose handover was cancelled) is Invalid;
  // like the kernel's invalid merging snapshot, it sends all I/O to the origin.
  const owns = s.owner === inst;
  if (bio.op === 'flush') {
    // The kernel sends one flush to the origin and one to the COW.
    Promise.all([s.origin.device.flush(), s.cow.device.flush()]).then(
      () => ctx.endBio(bio),
      (err: unknown) => ctx.endBio(bio, err),
    );
    return MAP_HELD;
  }
  // Once merging, discards no longer change anything (as in the kernel).
  if (bio.op === 'discard') return MAP_DONE;
  const offset = bio.sector - ctx.beginSector;
  const held = { bio, ctx };
  if (owns && s.valid) {
    const chunk = s.chunkOf(offset);
    // Writes to chunks being merged wait until their commit is durable, also once the lock-step has cleared their
    // in-core exceptions (merger.ts: a batch's interlock holds until its metadata area writes are durable).
    if (bio.op === 'write' && m.inMergingRange(chunk)) {
      m.queueWrite(held);
      return MAP_HELD;
    }
    const e = s.table.lookup(chunk as never);
    if (e >= 0) {
      const cowSector = (e * s.chunkSizeSectors + (offset % s.chunkSizeSectors)) as Sector;
      if (bio.op === 'read') {
        bio.remapDevice = s.cow.device;
        bio.remapSector = cowSector;
        return MAP_REMAPPED;
      }
      // A write to a chunk still in the COW: tracked, so the merge's interlock can wait for it.
      m.cowWriteStart(chunk);
      s.cow.device.write(cowSector, bio.buf, bio.fua ? { fua: true } : undefined).then(
        () => {
          m.cowWriteEnd(chunk);
          ctx.endBio(bio);
        },
        (err: unknown) => {
          m.cowWriteEnd(chunk);
          ctx.endBio(bio, err);
        },
      );
      return MAP_HELD;
    }
  }
  if (bio.op === 'read') {
    bio.remapDevice = s.origin.device;
    bio.remapSector = offset as Sector;
    return MAP_REMAPPED;
  }
  return mapOriginWrite({ origin: s.origin, registry: originRegistry(ctx), kcopyd: snapshotKcopyd(ctx) }, ctx, bio, offset);
}

export const snapshotMergeTarget: TargetType<MergeInstance> = Object.freeze({
  name: 'snapshot-merge',
  version: [1, 5, 0] as const,
  argCountMin: 4,
  argCountMax: 7,
  async ctr(args: readonly string[], ctx: TargetContext): Promise<MergeInstance> {
    const inst = await snapshotCtr('snapshot-merge', args, ctx);
    const s = inst.state;
    if (!s.persistent) {
      await snapshotDtr(inst);
      throw new DmError('DM_TABLE_INVALID', 'snapshot-merge: the exception store must be persistent');
    }
    for (const other of originRegistry(ctx).snapshots(s.origin.device)) {
      if (other !== s && other.merging) {
        await snapshotDtr(inst);
        throw new DmError('DM_TABLE_INVALID', 'snapshot-merge: another snapshot of this origin is merging (one merge per origin)');
      }
    }
    // The state may be shared with a live snapshot table (handover); it keeps one merger for its lifetime.
    const merger = (s.merger as Merger | undefined) ?? new Merger(s, originRegistry(ctx), snapshotKcopyd(ctx));
    s.merger = merger;
    const mergeInst: MergeInstance = { ...inst, merger };
    s.claimIfUnowned(mergeInst, mergeInst.generation);
    return mergeInst;
  },
  async dtr(inst: MergeInstance) {
    await inst.merger.stop();
    originRegistry(inst.ctx).unregisterOriginTarget(inst.state.origin.device, inst.ctx);
    inst.state.merging = false;
    await snapshotDtr(inst);
  },
  map: mergeMap,
  // Resumed on the origin while the snapshot's table is live and not suspended: refused (Linux snapshot_preresume
  // is merge_target's preresume too), so LVM suspends the snapshot before it resumes the origin.
  preresume: snapshotPreresume,
  async resume(inst: MergeInstance) {
    const s = inst.state;
    if (!s.resumeTable(inst, inst.generation)) return;
    s.ctx = inst.ctx;
    s.deviceName = inst.ctx.mappedDeviceName;
    s.active = true;
    s.merging = true;
    // snapshot-merge acts as the origin: split bios at the origin's smallest chunk size.
    originRegistry(inst.ctx).registerOriginTarget(s.origin.device, inst.ctx);
    if (!s.pinned) inst.merger.start(); // a replayed read-only pool shows the merge as it stood, without running it
  },
  async postsuspend(inst: MergeInstance) {
    await inst.merger.stop();
    if (inst.state.valid) await inst.state.checkpoint();
  },
  async message(inst: MergeInstance, args: readonly string[]) {
    if (args.length === 1 && args[0] === 'merge-status') {
      const p = inst.merger.progress();
      return `state=${p.state} chunks_left=${p.chunksLeft} chunks_merged=${p.chunksMerged} chunks_total=${p.chunksTotal} runs_merged=${p.runsMerged}` +
        (p.reason ? ` reason=${JSON.stringify(p.reason)}` : '');
    }
    throw new DmError('DM_NOT_SUPPORTED', `snapshot-merge: unknown message "${args.join(' ')}" (try: merge-status)`);
  },
  status: snapshotStatus,
  table: (inst: MergeInstance) => `${inst.state.origin.label} ${inst.state.cow.label} ${inst.state.storeType.tableCode(inst.state.store)}`,
});
