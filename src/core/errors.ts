/**
 * Every operating error carries a code (tests check the code, never the message). The README lists them.
 */
export const DM_ERROR_CODES = {
  DM_INVALID_ARGUMENT: 'a malformed argument: table line, option, number',
  DM_TABLE_INVALID: 'a table that does not describe a device (gaps, overlaps, past the end, unknown target)',
  DM_NO_SUCH_DEVICE: 'no mapped device of that name',
  DM_DEVICE_EXISTS: 'a mapped device of that name exists already',
  DM_DEVICE_BUSY: 'the device is in use (opened by another device or export)',
  DM_DEVICE_SUSPENDED: 'the operation needs a device that is not suspended',
  DM_NO_TABLE: 'the device has no table in that slot',
  DM_IO: 'an I/O error from a device below',
  DM_IO_RANGE: 'I/O past the end of the device',
  DM_IO_ALIGNMENT: 'I/O not aligned to the logical block size',
  DM_NOT_SUPPORTED: 'the device or target does not support the operation',
  DM_CLOSED: 'the device or log is closed',
  DM_POOL_LOCKED: 'another daemon holds the pool',
  DM_POOL_CORRUPT: 'the pool folder or its database is unreadable',
  DM_NO_DAEMON: 'no daemon answers on the pool control socket',
  DM_UNKNOWN_COMMAND: 'unknown command or message',
} as const;

export type DmErrorCode = keyof typeof DM_ERROR_CODES;

export class DmError extends Error {
  readonly code: DmErrorCode;
  constructor(code: DmErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'DmError';
    this.code = code;
  }
}

export const isDmError = (e: unknown): e is DmError => e instanceof DmError;
