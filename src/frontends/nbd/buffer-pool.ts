/**
 * Distinct sizes remembered; past this the pool starts over. The lists of sizes no longer in use stay (empty): a
 * list emptied and refilled every request, the steady state of a client at queue depth 1, must not churn the Map.
 */
const SIZES_MAX = 64;

/**
 * Large buffers kept for reuse by one connection, by exact size. A fresh 1 MiB Buffer is a malloc the kernel
 * backs page by page on first touch: up to 256 page faults (and the zeroing of each page) per 1 MiB read reply,
 * as much CPU as the read itself in the daemon's worst allocator state. Sequential clients ask for the same sizes
 * over and over, so a handful of buffers per size serve them all.
 */
export class BufferPool {
  private readonly free = new Map<number, Buffer[]>();
  private idleBytes = 0;

  /** @param idleBytesMax the most bytes kept while not in use; beyond it, returned buffers are left to the GC. */
  constructor(private readonly idleBytesMax: number) {}

  /** A buffer of exactly `lengthBytes` bytes, with whatever it held before (like Buffer.allocUnsafe). */
  take(lengthBytes: number): Buffer {
    const buf = this.free.get(lengthBytes)?.pop();
    if (!buf) return Buffer.allocUnsafeSlow(lengthBytes);
    this.idleBytes -= lengthBytes;
    return buf;
  }

  /** Returns a buffer from take() once nothing refers to it any more. */
  give(buf: Buffer): void {
    if (this.idleBytes + buf.length > this.idleBytesMax) return;
    let list = this.free.get(buf.length);
    if (!list) {
      if (this.free.size >= SIZES_MAX) {
        this.free.clear();
        this.idleBytes = 0;
      }
      this.free.set(buf.length, (list = []));
    }
    list.push(buf);
    this.idleBytes += buf.length;
  }
}
