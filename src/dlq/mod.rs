//! Dead-letter triage, shared by `courier dlq` and the admin port's `/dlq` API: filters, the
//! walk through the dead-letter list in pages of bounded size, stats grouped by cause, and
//! requeue and purge of what a filter selects, one record at a time.
//!
//! **Positions.** Records are addressed by their position counted from the tail of the list
//! (1 = the oldest). Workers LPUSH new dead letters at the head, which leaves these positions
//! unchanged, so a walk (or a cursor held by a browser) is not disturbed by them. A requeue or
//! purge does not remove a record where it stands: it sets a tombstone in its place (same
//! position for everything else), and an `LREM` from the tail takes the tombstones out every
//! `SWEEP_EVERY` records and at the end.
//!
//! **Memory.** Each page is read by one script that stops at `PAGE_BYTES` of records (at least
//! one record), reads huge records one at a time, and returns records cut to `PREVIEW_BYTES`
//! when the whole is not needed (listing, stats). Only requeue reads whole records, a page at
//! a time, because the message that goes back is made from the whole record.
//!
//! **Kill safety.** Each record is moved by one script that checks the record at the position
//! is still the one read (by SHA-1), copies the message to the queue, then sets the tombstone.
//! Stopped at any point it leaves the record in the dead list, in the queue, or (stopped between
//! the copy and the tombstone: a denied LSET, OOM, a failover) in both: run again, it is
//! requeued a second time. Killing the process between scripts loses nothing and doubles
//! nothing: a moved record is no longer in the dead list; a tombstone left behind is skipped by
//! every reader and swept by the next requeue or purge.
//!
//! The files: `filter` (which letters, and the filter as text), `letter` (one record read),
//! `pages` (the walks through the list and the read of one letter), `stats` (grouped by
//! cause), `act` (requeue and purge).

mod act;
mod filter;
mod letter;
mod pages;
mod stats;

pub(crate) use self::act::{act, purge_all, usable_rate, Action, Options, Outcome};
pub(crate) use self::filter::{parse_time_bound, Filter, FilterText};
pub(crate) use self::letter::Letter;
pub(crate) use self::pages::{at, list, reasons, whole};
#[cfg(feature = "fuzzing")]
pub(crate) use self::stats::fold_error;
pub(crate) use self::stats::stats;

/// The most bytes of records one page script reads (a single larger record is read alone).
pub(crate) const PAGE_BYTES: u64 = 4 << 20;
/// The most records one page script reads.
pub(crate) const PAGE_RECORDS: u64 = 2000;
/// Listing and stats read at most this much of each record: the header and the start of the
/// message.
pub(crate) const PREVIEW_BYTES: u64 = 64 << 10;
/// Tombstones are swept after this many requeues or deletions (and at the end). Each sweep is
/// one `LREM` from the tail as deep as the walk has gone.
pub(crate) const SWEEP_EVERY: u64 = 2000;
