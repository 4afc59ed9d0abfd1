/** One event as a line of text: sequence number, time, type, then the fields as key=value. */
import type { LoggedEvent } from '../log/events.js';

export function formatLoggedEvent(e: LoggedEvent): string {
  const { seq, timeMs, type, ...fields } = e as LoggedEvent & Record<string, unknown>;
  const parts = Object.entries(fields)
    .filter(([, v]) => v !== undefined)
    .map(([k, v]) => `${k}=${typeof v === 'string' ? (/\s/.test(v) || v === '' ? JSON.stringify(v) : v) : JSON.stringify(v)}`);
  return `${String(seq).padStart(8)} ${new Date(timeMs).toISOString()} ${type}${parts.length ? ' ' + parts.join(' ') : ''}`;
}
