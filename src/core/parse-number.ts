import { DmError } from './errors.js';

/** Parses a non-negative decimal integer as the kernel's sscanf("%llu") would accept it, or throws. */
export function parseUnsigned(text: string, what: string, code: 'DM_TABLE_INVALID' | 'DM_INVALID_ARGUMENT' = 'DM_TABLE_INVALID'): number {
  if (!/^[0-9]+$/.test(text)) throw new DmError(code, `${what}: "${text}" is not a non-negative integer`);
  const n = Number(text);
  if (!Number.isSafeInteger(n)) throw new DmError(code, `${what}: ${text} is too large`);
  return n;
}
