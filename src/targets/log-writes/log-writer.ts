/**
 * The writing side of a dm-log-writes log (Linux log_writes_kthread, log_one_block, log_super): entries are
 * placed one after another in the order they are appended, the super block is rewritten after each FUA and mark
 * entry, and a write error or a full log device turns logging off for good (status says `logging_disabled`).
 *
 * Positions are kept in 512-byte sectors of the log device (Linux next_sector, which is what the status line
 * prints); the format's own units are blocks of the logged device's logical block size.
 */
import type { BlockDevice } from '../../block/contract.js';
import type { Sector } from '../../block/units.js';
import { SECTOR_SIZE_BYTES } from '../../block/units.js';
import { encodeSuper, LOG_DISCARD_FLAG, LOG_FUA_FLAG, LOG_MARK_FLAG } from './format.js';

/** One entry waiting to be logged (Linux struct pending_block). */
export interface PendingEntry {
  readonly flags: number;
  /** In blocks of the log's block size. */
  readonly nrSectors: number;
  /** The entry block followed by the written data (writes), or the entry block alone. */
  readonly record: Buffer;
}

const RESOLVED: Promise<void> = Promise.resolve();

export class LogWriter {
  /** Entries placed in the log (Linux logged_entries): the super's nr_entries when next written. */
  loggedEntries = 0;
  /** Where the next entry goes, in 512-byte sectors of the log device (Linux next_sector). */
  nextSector: number;
  enabled = true;
  /** Why logging stopped, for messages and tests. */
  disabledReason: string | undefined = undefined;
  private readonly blockSectors: number;
  private readonly endSector: number;
  /** Writes of entries not yet completed. */
  private readonly outstanding = new Set<Promise<void>>();
  /** Super block writes, one after another (the kernel waits for each: an older one must not land last). */
  private superChain: Promise<void> = RESOLVED;

  constructor(
    private readonly logdev: BlockDevice,
    readonly blockSizeBytes: number,
  ) {
    this.blockSectors = blockSizeBytes / SECTOR_SIZE_BYTES;
    // The super is block 0; entries start at block 1.
    this.nextSector = this.blockSectors;
    this.endSector = logdev.sizeSectors;
  }

  /**
   * Places `entry` after the previous ones and starts writing it. Resolves when its record is written and, for
   * FUA and mark entries, when the super that counts it is written too. Never rejects: a failure turns logging
   * off, as the kernel does; the bio that caused the entry is not failed for it.
   */
  append(entry: PendingEntry): Promise<void> {
    if (!this.enabled) return RESOLVED;
    const sector = this.nextSector;
    if ((entry.flags & LOG_DISCARD_FLAG) === 0) this.nextSector += entry.nrSectors * this.blockSectors;
    this.nextSector += this.blockSectors;
    // `>=`: the kernel keeps the last sector of the log device unused.
    if (this.nextSector >= this.endSector) {
      this.disable('Ran out of space on the logdev');
      return RESOLVED;
    }
    this.loggedEntries++;
    const written = this.track(this.logdev.write(sector as Sector, entry.record));
    if ((entry.flags & (LOG_FUA_FLAG | LOG_MARK_FLAG)) === 0) return written;
    return this.writeSuper(this.loggedEntries);
  }

  /** Waits until every write started so far (entries and supers) is done. */
  async drain(): Promise<void> {
    while (this.outstanding.size > 0) await Promise.all(this.outstanding);
    await this.superChain;
  }

  disable(reason: string): void {
    if (!this.enabled) return;
    this.enabled = false;
    this.disabledReason = reason;
  }

  /**
   * Rewrites the super with `nrEntries` once every entry write started before it has finished (stricter than
   * the kernel, which only orders super writes among themselves: this way the super never counts an entry that
   * is not on the log device yet).
   */
  private writeSuper(nrEntries: number): Promise<void> {
    const before = [...this.outstanding];
    const next = this.superChain
      .then(() => Promise.all(before))
      .then(() => {
        if (!this.enabled) return;
        return this.logdev.write(0 as Sector, encodeSuper({ nrEntries, blockSizeBytes: this.blockSizeBytes })).catch((err: unknown) => {
          this.disable(`Couldn't write super: ${(err as Error).message}`);
        });
      });
    this.superChain = next;
    return next;
  }

  private track(p: Promise<void>): Promise<void> {
    const done = p.then(
      () => {
        this.outstanding.delete(done);
      },
      (err: unknown) => {
        this.outstanding.delete(done);
        this.disable(`Error writing log block: ${(err as Error).message}`);
      },
    );
    this.outstanding.add(done);
    return done;
  }
}
