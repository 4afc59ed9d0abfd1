/**
 * Devices below the mapped devices: files opened by path (one shared handle per file, reference counted), and
 * devices an embedding program registered by label (e.g. memory devices in tests and benchmarks).
 */
import * as path from 'node:path';
import type { BlockDevice } from '../block/contract.js';
import { FileBlockDevice } from '../block/file-device.js';
import { DmError } from './errors.js';

interface OpenFile {
  device: BlockDevice;
  refs: number;
}

export class BackingDevices {
  private readonly files = new Map<string, OpenFile>();
  private readonly registered = new Map<string, BlockDevice>();

  /** Makes `device` usable in tables under `label` (which must not look like a path). */
  register(label: string, device: BlockDevice): void {
    if (label.includes('/')) throw new DmError('DM_INVALID_ARGUMENT', `backing device label "${label}" must not contain '/'`);
    if (this.registered.has(label)) throw new DmError('DM_DEVICE_EXISTS', `backing device "${label}" is registered already`);
    this.registered.set(label, device);
  }

  unregister(label: string): void {
    this.registered.delete(label);
  }

  getRegistered(label: string): BlockDevice | undefined {
    return this.registered.get(label);
  }

  /** Opens (or shares) the file at an absolute path. */
  async openFile(absPath: string, readOnly: boolean): Promise<BlockDevice> {
    const key = path.resolve(absPath);
    const open = this.files.get(key);
    if (open) {
      open.refs++;
      return open.device;
    }
    let device: BlockDevice;
    try {
      device = await FileBlockDevice.open(key, { readOnly });
    } catch (err) {
      if (err instanceof DmError) throw new DmError('DM_TABLE_INVALID', err.message, { cause: err });
      throw new DmError('DM_TABLE_INVALID', `cannot open ${key}: ${(err as Error).message}`, { cause: err });
    }
    this.files.set(key, { device, refs: 1 });
    return device;
  }

  async releaseFile(absPath: string): Promise<void> {
    const key = path.resolve(absPath);
    const open = this.files.get(key);
    if (!open) return;
    if (--open.refs === 0) {
      this.files.delete(key);
      await open.device.close();
    }
  }

  async closeAll(): Promise<void> {
    for (const f of this.files.values()) await f.device.close();
    this.files.clear();
  }
}
