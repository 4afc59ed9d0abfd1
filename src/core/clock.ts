/**
 * The only source of time in src/. A run with a SimulatedClock is replayable exactly.
 */
export interface Clock {
  /** Milliseconds since an arbitrary epoch (wall clock for the real clock). */
  nowMs(): number;
  setTimeout(fn: () => void, delayMs: number): ClockTimer;
  clearTimeout(timer: ClockTimer): void;
}

export interface ClockTimer {
  readonly id: number;
}

interface NodeTimer extends ClockTimer {
  handle: ReturnType<typeof setTimeout>;
}

export function createSystemClock(): Clock {
  let nextId = 1;
  return {
    // eslint-disable-next-line no-restricted-properties -- the one place real time enters
    nowMs: () => Date.now(),
    setTimeout(fn, delayMs) {
      const handle = setTimeout(fn, delayMs);
      handle.unref?.();
      const t: NodeTimer = { id: nextId++, handle };
      return t;
    },
    clearTimeout(timer) {
      clearTimeout((timer as NodeTimer).handle);
    },
  };
}

interface SimTimer extends ClockTimer {
  dueMs: number;
  fn: () => void;
}

/** A virtual clock: time moves only when the test says so; timers fire in (due, creation) order. */
export class SimulatedClock implements Clock {
  private timeMs: number;
  private timers: SimTimer[] = [];
  private nextId = 1;

  constructor(startMs = 0) {
    this.timeMs = startMs;
  }

  nowMs(): number {
    return this.timeMs;
  }

  setTimeout(fn: () => void, delayMs: number): ClockTimer {
    const t: SimTimer = { id: this.nextId++, dueMs: this.timeMs + Math.max(0, delayMs), fn };
    this.timers.push(t);
    return t;
  }

  clearTimeout(timer: ClockTimer): void {
    this.timers = this.timers.filter((t) => t.id !== timer.id);
  }

  /** Moves time forward by `ms`, firing due timers in order. */
  advance(ms: number): void {
    const endMs = this.timeMs + ms;
    for (;;) {
      let next: SimTimer | undefined;
      for (const t of this.timers) {
        if (t.dueMs <= endMs && (!next || t.dueMs < next.dueMs || (t.dueMs === next.dueMs && t.id < next.id))) next = t;
      }
      if (!next) break;
      this.timers = this.timers.filter((t) => t !== next);
      this.timeMs = next.dueMs;
      next.fn();
    }
    this.timeMs = endMs;
  }
}
