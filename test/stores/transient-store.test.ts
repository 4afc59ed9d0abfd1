import { describe, expect, test } from 'vitest';
import { MemoryBlockDevice } from '../../src/block/memory-device.js';
import { chunks, sectors } from '../../src/block/units.js';
import { transientStore } from '../../src/stores/transient-store.js';
import type { TransientStore } from '../../src/stores/transient-store.js';
import { exceptionStoreSuite } from '../../src/testing/conformance/exception-store.js';

exceptionStoreSuite({
  test,
  expect,
  name: 'transient (N)',
  type: transientStore,
  persistent: false,
  tableCode: 'N',
  factory: async (cowSizeSectors, chunkSizeSectors) => ({ cow: new MemoryBlockDevice({ sizeSectors: cowSizeSectors }), chunkSizeSectors, overflow: false }),
});

exceptionStoreSuite({
  test,
  expect,
  name: 'transient (N), 8-sector chunks',
  type: transientStore,
  persistent: false,
  chunkSizeSectors: sectors(8),
  factory: async (cowSizeSectors, chunkSizeSectors) => ({ cow: new MemoryBlockDevice({ sizeSectors: cowSizeSectors }), chunkSizeSectors, overflow: false }),
});

const open = async (sizeSectors: number, chunkSizeSectors: number): Promise<TransientStore> => {
  const store = await transientStore.create({ cow: new MemoryBlockDevice({ sizeSectors: sectors(sizeSectors) }), chunkSizeSectors: sectors(chunkSizeSectors), overflow: false });
  await transientStore.readMetadata(store, () => expect.fail('a transient store has no exceptions to report'));
  return store;
};

describe('transient store', () => {
  test('chunks from 0 upward; full when next_free + chunk_size > size (sectors); usage as Linux', async () => {
    const store = await open(8 * 5 + 7, 8);
    const got: number[] = [];
    for (let c = transientStore.prepareException(store); c !== -1; c = transientStore.prepareException(store)) got.push(c);
    expect(got).toEqual([0, 1, 2, 3, 4]);
    expect(transientStore.usage(store)).toEqual({ totalSectors: 47, sectorsAllocated: 40, metadataSectors: 0 });
    expect(transientStore.tableCode(store)).toBe('N 8');
    await transientStore.close(store);
  });

  test('commit callbacks run on a later turn, in order, with success', async () => {
    const store = await open(1024, 8);
    const order: number[] = [];
    for (let i = 0; i < 10; i++) {
      const c = transientStore.prepareException(store);
      transientStore.commitException(store, chunks(100 + i), c as never, (ok) => order.push(ok ? i : -1));
    }
    expect(order, 'not re-entrant').toEqual([]);
    await new Promise((resolve) => setImmediate(resolve));
    expect(order).toEqual([...Array(10).keys()]);
    await transientStore.close(store);
  });

  test('refuses chunk size 0 ("Chunk size not set") and bad chunk sizes', async () => {
    const cow = new MemoryBlockDevice({ sizeSectors: sectors(64) });
    await expect(transientStore.create({ cow, chunkSizeSectors: sectors(0), overflow: false })).rejects.toMatchObject({ code: 'DM_TABLE_INVALID' });
    await expect(transientStore.create({ cow, chunkSizeSectors: sectors(3), overflow: false })).rejects.toMatchObject({ code: 'DM_TABLE_INVALID' });
    const big = new MemoryBlockDevice({ sizeSectors: sectors(64), logicalBlockSizeBytes: 4096 as never });
    await expect(transientStore.create({ cow: big, chunkSizeSectors: sectors(4), overflow: false })).rejects.toMatchObject({ code: 'DM_TABLE_INVALID' });
  });

  test('has no merge slots and no checkpoint', () => {
    expect(transientStore.prepareMerge).toBeUndefined();
    expect(transientStore.commitMerge).toBeUndefined();
    expect(transientStore.checkpoint).toBeUndefined();
  });
});
