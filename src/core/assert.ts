/**
 * Assertions for programmer errors (invariants, arguments that callers already validated). A failed assertion
 * is a bug: it throws AssertionError and is never caught to carry on. Operating errors use DmError instead.
 */
export class AssertionError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'AssertionError';
  }
}

export function assert(condition: unknown, message = 'assertion failed'): asserts condition {
  if (!condition) throw new AssertionError(message);
}

/** Marks a branch that really can go either way (documentation for readers; no check). */
export function maybe(_condition: boolean): void {}
