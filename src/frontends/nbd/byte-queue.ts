/**
 * Bytes received from a socket, taken off in pieces without copying when a piece lies in one chunk (the common
 * case for request headers and small payloads). A piece spread over chunks is gathered into one buffer: the
 * caller's, when it has one to reuse (a 64 KiB payload after its 28-byte header always straddles two of Node's
 * 64 KiB socket reads), else a new one.
 */
export class ByteQueue {
  private chunks: Buffer[] = [];
  private head = 0; // offset into chunks[0]
  length = 0;
  private waiter: { bytes: number; resolve: (b: Buffer) => void; reject: (e: Error) => void } | undefined;
  private error: Error | undefined;

  push(chunk: Buffer): void {
    this.chunks.push(chunk);
    this.length += chunk.length;
    const w = this.waiter;
    if (w && this.length >= w.bytes) {
      this.waiter = undefined;
      w.resolve(this.tryTake(w.bytes)!);
    }
  }

  /** Fails a pending take() (socket closed). */
  fail(err: Error): void {
    this.error = err;
    const w = this.waiter;
    this.waiter = undefined;
    w?.reject(err);
  }

  /** Whether the next `bytes` bytes have arrived and lie in one chunk, so that tryTake() will not copy them. */
  inOneChunk(bytes: number): boolean {
    return this.length >= bytes && (bytes === 0 || this.chunks[0].length - this.head >= bytes);
  }

  /**
   * The next `bytes` bytes, or undefined if not all have arrived. If they span chunks they are copied into
   * `gatherInto` (exactly `bytes` long) when given, else into a new buffer.
   */
  tryTake(bytes: number, gatherInto?: Buffer): Buffer | undefined {
    if (this.length < bytes) return undefined;
    this.length -= bytes;
    const first = this.chunks[0];
    if (bytes === 0) return Buffer.alloc(0);
    if (first.length - this.head >= bytes) {
      const out = first.subarray(this.head, this.head + bytes);
      this.head += bytes;
      if (this.head === first.length) {
        this.chunks.shift();
        this.head = 0;
      }
      return out;
    }
    const out = gatherInto ?? Buffer.allocUnsafe(bytes);
    let filled = 0;
    while (filled < bytes) {
      const c = this.chunks[0];
      const n = Math.min(c.length - this.head, bytes - filled);
      c.copy(out, filled, this.head, this.head + n);
      filled += n;
      this.head += n;
      if (this.head === c.length) {
        this.chunks.shift();
        this.head = 0;
      }
    }
    return out;
  }

  /** Drops up to `bytes` bytes; returns how many were dropped. */
  skip(bytes: number): number {
    let dropped = 0;
    while (dropped < bytes && this.chunks.length > 0) {
      const c = this.chunks[0];
      const n = Math.min(c.length - this.head, bytes - dropped);
      dropped += n;
      this.head += n;
      if (this.head === c.length) {
        this.chunks.shift();
        this.head = 0;
      }
    }
    this.length -= dropped;
    return dropped;
  }

  /** Waits for `bytes` bytes (handshake phase). */
  take(bytes: number): Promise<Buffer> {
    if (this.error) return Promise.reject(this.error);
    const b = this.tryTake(bytes);
    if (b) return Promise.resolve(b);
    return new Promise((resolve, reject) => {
      this.waiter = { bytes, resolve, reject };
    });
  }
}
