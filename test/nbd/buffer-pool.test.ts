/** BufferPool (NBD read replies and gathered write payloads) and ByteQueue's gathering into a caller's buffer. */
import { describe, expect, test } from 'vitest';
import { BufferPool } from '../../src/frontends/nbd/buffer-pool.js';
import { ByteQueue } from '../../src/frontends/nbd/byte-queue.js';

describe('BufferPool', () => {
  test('a buffer given back is the one taken next for its size, and only for its size', () => {
    const pool = new BufferPool(1 << 20);
    const a = pool.take(4096);
    expect(a.length).toBe(4096);
    pool.give(a);
    expect(pool.take(8192)).not.toBe(a);
    expect(pool.take(4096)).toBe(a);
    expect(pool.take(4096)).not.toBe(a); // taken already: a new one
  });

  test('emptied and refilled every request (queue depth 1), the same buffer keeps coming back', () => {
    const pool = new BufferPool(1 << 20);
    const first = pool.take(65536);
    pool.give(first);
    for (let i = 0; i < 100; i++) {
      const b = pool.take(65536);
      expect(b).toBe(first);
      pool.give(b);
    }
  });

  test('keeps at most idleBytesMax bytes of idle buffers', () => {
    const pool = new BufferPool(3 * 4096);
    const taken = [1, 2, 3, 4].map(() => pool.take(4096));
    for (const b of taken) pool.give(b);
    const again = [1, 2, 3, 4].map(() => pool.take(4096));
    expect(again.filter((b) => taken.includes(b))).toHaveLength(3);
  });

  test('past 64 distinct sizes it starts over instead of remembering every size', () => {
    const pool = new BufferPool(1 << 30);
    const first = pool.take(512);
    pool.give(first);
    for (let i = 2; i <= 64; i++) pool.give(pool.take(512 * i));
    expect(pool.take(512)).toBe(first); // 64 sizes: still remembered
    pool.give(first);
    pool.give(pool.take(512 * 65)); // the 65th size: forgets the others
    expect(pool.take(512)).not.toBe(first);
  });
});

describe('ByteQueue gathering', () => {
  test('bytes spread over chunks are copied into the buffer given; bytes in one chunk come without copying', () => {
    const q = new ByteQueue();
    const c1 = Buffer.from([1, 2, 3, 4, 5]);
    const c2 = Buffer.from([6, 7, 8, 9]);
    q.push(c1);
    q.push(c2);
    expect(q.inOneChunk(2)).toBe(true);
    const head = q.tryTake(2, Buffer.alloc(2))!;
    expect(head.buffer).toBe(c1.buffer); // a view of the chunk, the buffer given is not used
    expect([...head]).toEqual([1, 2]);
    expect(q.inOneChunk(5)).toBe(false);
    const into = Buffer.alloc(5);
    expect(q.tryTake(5, into)).toBe(into);
    expect([...into]).toEqual([3, 4, 5, 6, 7]);
    expect(q.inOneChunk(3)).toBe(false); // only 2 bytes left
    expect(q.tryTake(3, Buffer.alloc(3))).toBeUndefined();
    expect([...q.tryTake(2)!]).toEqual([8, 9]);
  });
});
