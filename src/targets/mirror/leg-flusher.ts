/**
 * Group commit of one leg's flushes. A flush covers every write the leg completed before the flush started, so a
 * request needs a flush that starts after it: requests made while a flush runs share the next one, and a request
 * that already has one started after it (e.g. a mirror flush bio joining the flush the region log started for its
 * clean records) waits for that one instead of starting another.
 */
import type { BlockDevice } from '../../block/contract.js';

export class LegFlusher {
  /** Flushes started so far; flush number n is the n-th started. */
  startedCount = 0;
  private inFlight: Promise<void> | undefined = undefined;
  private inFlightNumber = 0;
  private next: Promise<void> | undefined = undefined;

  constructor(private readonly device: BlockDevice) {}

  /** A flush covering every write completed before now. */
  request(): Promise<void> {
    return this.flushAfter(this.startedCount);
  }

  /** A flush whose number is above `startedCount`, i.e. one that starts after the moment that count was read. */
  flushAfter(startedCount: number): Promise<void> {
    if (this.inFlight !== undefined) {
      if (this.inFlightNumber > startedCount) return this.inFlight;
      this.next ??= this.inFlight
        .catch(() => undefined)
        .then(() => {
          this.next = undefined;
          return this.flushAfter(startedCount);
        });
      return this.next;
    }
    const p = this.device.flush();
    this.inFlight = p;
    this.inFlightNumber = ++this.startedCount;
    const done = (): void => {
      if (this.inFlight === p) this.inFlight = undefined;
    };
    p.then(done, done);
    return p;
  }
}
