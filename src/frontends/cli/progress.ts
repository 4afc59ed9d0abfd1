/**
 * The progress line of the commands that watch long work in the daemon (`dmstate merge`, `dmstate resync`):
 * `[#####.....]  42.0%  420/1000 chunks  85 chunks/s  ETA 0:07`.
 */

/** `m:ss`, or `h:mm:ss` from an hour on; `--:--` when unknown (not finite). */
export function formatDuration(seconds: number): string {
  if (!Number.isFinite(seconds)) return '--:--';
  const s = Math.round(seconds);
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const r = s % 60;
  return h > 0 ? `${h}:${String(m).padStart(2, '0')}:${String(r).padStart(2, '0')}` : `${m}:${String(r).padStart(2, '0')}`;
}

/**
 * `done` of `total` `unit`s at `perSecond`. Nothing left is ETA 0:00 even at 0 per second (watching work that just
 * finished); no rate yet with work left is `--:--`.
 */
export function formatProgress(done: number, total: number, unit: string, perSecond: number, width = 30): string {
  const frac = total === 0 ? 1 : Math.min(1, done / total);
  const filled = Math.round(frac * width);
  const eta = done >= total ? 0 : perSecond > 0 ? (total - done) / perSecond : Infinity;
  return `[${'#'.repeat(filled)}${'.'.repeat(width - filled)}] ${(frac * 100).toFixed(1).padStart(5)}%  ${done}/${total} ${unit}  ${Math.round(perSecond)} ${unit}/s  ETA ${formatDuration(eta)}`;
}
